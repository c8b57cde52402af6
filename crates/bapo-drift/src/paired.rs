//! Paired comparisons of two models on the same knowledge items: the flips (McNemar) and a
//! percentile-bootstrap interval for the mean per-item difference (resampling items, which
//! keeps each item's pair together).

use serde::Serialize;

use crate::gate::mcnemar_exact;
use crate::mc::McItemResult;

/// Items the first model got right and the second wrong (`lost`), the reverse (`gained`), and
/// the exact two-sided McNemar p-value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct McNemar {
    pub lost: usize,
    pub gained: usize,
    pub p: f64,
}

/// `b` against `a` on the same items (same ids, same order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairedComparison {
    pub n: usize,
    /// Mean of `b.correct − a.correct`.
    pub delta_acc: f64,
    /// Mean of `b.margin − a.margin` (nats).
    pub delta_margin: f64,
    /// Paired-bootstrap 95 % interval of `delta_margin`.
    pub ci95: [f64; 2],
    pub mcnemar: McNemar,
}

/// Bootstrap resamples for [`compare`].
pub const BOOTSTRAP_REPS: usize = 4000;

/// SplitMix64: a small seeded generator, so an interval is the same on every machine.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64 * n as f64) as usize
    }
}

/// Percentile bootstrap 95 % interval of the mean of `d` (`reps` resamples of `d.len()` items
/// with replacement, seeded); `[NaN, NaN]` when `d` is empty.
pub fn bootstrap_ci95(d: &[f64], reps: usize, seed: u64) -> [f64; 2] {
    if d.is_empty() || reps == 0 {
        return [f64::NAN; 2];
    }
    let mut rng = SplitMix(seed);
    let n = d.len();
    let mut means: Vec<f64> = (0..reps)
        .map(|_| (0..n).map(|_| d[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * reps as f64).floor() as usize).min(reps - 1)];
    [at(0.025), at(0.975)]
}

/// `b` against `a`, item by item; an error names the first mismatched item.
pub fn compare(
    a: &[McItemResult],
    b: &[McItemResult],
    seed: u64,
) -> Result<PairedComparison, String> {
    if a.len() != b.len() {
        return Err(format!(
            "{} items against {}: not the same items",
            a.len(),
            b.len()
        ));
    }
    if let Some((x, y)) = a.iter().zip(b).find(|(x, y)| x.id != y.id) {
        return Err(format!(
            "item `{}` against `{}`: not the same items",
            x.id, y.id
        ));
    }
    let n = a.len();
    let margin: Vec<f64> = a.iter().zip(b).map(|(x, y)| y.margin - x.margin).collect();
    let lost = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.correct && !y.correct)
        .count();
    let gained = a
        .iter()
        .zip(b)
        .filter(|(x, y)| !x.correct && y.correct)
        .count();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(PairedComparison {
        n,
        delta_acc: if n == 0 {
            f64::NAN
        } else {
            (gained as f64 - lost as f64) / n as f64
        },
        delta_margin: mean(&margin),
        ci95: bootstrap_ci95(&margin, BOOTSTRAP_REPS, seed),
        mcnemar: McNemar {
            lost,
            gained,
            p: mcnemar_exact(lost, gained),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::tests::item;

    #[test]
    fn bootstrap_interval_is_seeded_and_near_the_normal_one() {
        // A constant difference has a degenerate interval.
        assert_eq!(bootstrap_ci95(&[0.5; 20], 1000, 1), [0.5, 0.5]);
        // 400 items of mean 0.1, sd 1 (a fixed ±1 pattern): the normal interval is
        // 0.1 ± 1.96·sd/√n; the bootstrap's lies within 10 % of its half-width.
        let d: Vec<f64> = (0..400)
            .map(|i| if i % 20 < 11 { 1.0 } else { -1.0 })
            .collect();
        let mean = d.iter().sum::<f64>() / 400.0;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 399.0).sqrt();
        let half = 1.96 * sd / 20.0;
        let ci = bootstrap_ci95(&d, 4000, 7);
        assert!(
            (ci[0] - (mean - half)).abs() < 0.1 * half,
            "{ci:?} vs {mean} ± {half}"
        );
        assert!(
            (ci[1] - (mean + half)).abs() < 0.1 * half,
            "{ci:?} vs {mean} ± {half}"
        );
        assert_eq!(ci, bootstrap_ci95(&d, 4000, 7));
        assert_ne!(ci, bootstrap_ci95(&d, 4000, 8));
    }

    #[test]
    fn compare_counts_flips_and_checks_items() {
        let a = vec![
            item("x", true, 1.0),
            item("y", true, 0.5),
            item("z", false, -1.0),
        ];
        let b = vec![
            item("x", false, -0.5),
            item("y", true, 0.5),
            item("z", false, -1.0),
        ];
        let c = compare(&a, &b, 0).unwrap();
        assert_eq!(
            c.mcnemar,
            McNemar {
                lost: 1,
                gained: 0,
                p: 1.0
            }
        );
        assert!((c.delta_acc + 1.0 / 3.0).abs() < 1e-15);
        assert!((c.delta_margin + 0.5).abs() < 1e-15);
        assert!(c.ci95[0] <= c.delta_margin && c.delta_margin <= c.ci95[1]);
        let e = compare(&a, &b[..2], 0).unwrap_err();
        assert!(e.contains("3 items against 2"), "{e}");
        let mut d = b.clone();
        d[1].id = "w".into();
        assert!(compare(&a, &d, 0)
            .unwrap_err()
            .contains("item `y` against `w`"));
    }
}
