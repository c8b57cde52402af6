//! Output drift on a fixed prompt set: how long the answers are, how often the model stops by
//! itself, how repetitive it is.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// Statistics of a set of generations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OutputStats {
    /// Mean generated tokens (EOS excluded).
    pub mean_length: f64,
    /// Fraction of generations that ended on EOS before the token limit.
    pub eos_rate: f64,
    /// Distinct bigrams / total bigrams over all generations (1 = no repeated bigram).
    pub distinct_2: f64,
    pub n: usize,
}

impl OutputStats {
    /// From each generation's tokens (EOS excluded) and whether it ended on EOS.
    pub fn new(generations: &[(Vec<u32>, bool)]) -> Self {
        let n = generations.len();
        if n == 0 {
            return Self {
                mean_length: 0.0,
                eos_rate: 0.0,
                distinct_2: 0.0,
                n,
            };
        }
        let mut bigrams = HashSet::new();
        let mut total = 0usize;
        for (toks, _) in generations {
            for w in toks.windows(2) {
                bigrams.insert((w[0], w[1]));
                total += 1;
            }
        }
        Self {
            mean_length: generations.iter().map(|g| g.0.len()).sum::<usize>() as f64 / n as f64,
            eos_rate: generations.iter().filter(|g| g.1).count() as f64 / n as f64,
            distinct_2: if total == 0 {
                0.0
            } else {
                bigrams.len() as f64 / total as f64
            },
            n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_values() {
        // bigrams: (1,2) (2,1) (1,2) | (5,6): 3 distinct of 4
        let s = OutputStats::new(&[(vec![1, 2, 1, 2], true), (vec![5, 6], false)]);
        assert_eq!(s.mean_length, 3.0);
        assert_eq!(s.eos_rate, 0.5);
        assert_eq!(s.distinct_2, 0.75);
    }
}
