//! Exact token-level KL(π_θ‖π_ref), teacher-forced, over the whole vocabulary.
//!
//! At each counted position `t`, with policy logits `x` and reference logits `y`:
//! `KL_t = Σ_v p_v (log p_v − log q_v) = Σ_v p_v (x_v − y_v) − lse(x) + lse(y)`
//! (using `Σ_v p_v = 1`). The vocabulary is processed in chunks of `vocab_chunk` columns, so
//! no intermediate tensor is larger than `[b, s, vocab_chunk]`: one pass for the two maxima,
//! one for the two log-sum-exps, one for `Σ p (x − y)`.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// KL summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KlStats {
    /// Mean over every counted position (nats per token).
    pub mean_per_token: f64,
    /// Mean over each sequence's counted positions (0 for a sequence with none).
    pub per_sequence: Vec<f64>,
    /// Counted positions.
    pub tokens: usize,
}

fn chunks(v: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let c = chunk.max(1);
    (0..v.div_ceil(c)).map(move |i| (i * c, c.min(v - i * c)))
}

/// KL(π_θ‖π_ref) per position, averaged where `mask` is 1.
///
/// # Shapes
/// `policy`, `reference`: `[b, s, v]` logits; `mask`: `[b, s]` (1 = count the position).
pub fn token_kl<B: Backend>(
    policy: Tensor<B, 3>,
    reference: Tensor<B, 3>,
    mask: Tensor<B, 2>,
    vocab_chunk: usize,
) -> KlStats {
    let [b, s, v] = policy.dims();
    assert_eq!(
        reference.dims(),
        [b, s, v],
        "policy and reference logits differ in shape"
    );
    assert_eq!(mask.dims(), [b, s], "mask must be [b, s]");
    let max = |t: &Tensor<B, 3>| {
        chunks(v, vocab_chunk)
            .map(|(o, n)| t.clone().narrow(2, o, n).max_dim(2))
            .reduce(|a, c| a.max_pair(c))
            .expect("v > 0")
    };
    let (mx, my) = (max(&policy), max(&reference));
    let lse = |t: &Tensor<B, 3>, m: &Tensor<B, 3>| {
        let sum = chunks(v, vocab_chunk)
            .map(|(o, n)| (t.clone().narrow(2, o, n) - m.clone()).exp().sum_dim(2))
            .reduce(|a, c| a + c)
            .expect("v > 0");
        sum.log() + m.clone()
    };
    let (lx, ly) = (lse(&policy, &mx), lse(&reference, &my));
    let cross = chunks(v, vocab_chunk)
        .map(|(o, n)| {
            let x = policy.clone().narrow(2, o, n);
            let y = reference.clone().narrow(2, o, n);
            ((x.clone() - lx.clone()).exp() * (x - y)).sum_dim(2)
        })
        .reduce(|a, c| a + c)
        .expect("v > 0");
    let kl = (cross - lx + ly).reshape([b, s]).clamp_min(0.0) * mask.clone();
    let kl: Vec<f64> = kl.into_data().convert::<f64>().to_vec().expect("f64");
    let m: Vec<f64> = mask.into_data().convert::<f64>().to_vec().expect("f64");
    let mut per_sequence = Vec::with_capacity(b);
    let (mut total, mut count) = (0.0, 0.0);
    for r in 0..b {
        let k: f64 = kl[r * s..(r + 1) * s].iter().sum();
        let c: f64 = m[r * s..(r + 1) * s].iter().sum();
        per_sequence.push(if c > 0.0 { k / c } else { 0.0 });
        total += k;
        count += c;
    }
    KlStats {
        mean_per_token: if count > 0.0 { total / count } else { 0.0 },
        per_sequence,
        tokens: count as usize,
    }
}
