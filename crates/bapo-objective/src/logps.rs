//! Completion log-probabilities from logits.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Per-sequence completion log-probabilities.
///
/// # Shapes
/// `sum`, `mean`, `count`: `[b]`; `token`: `[b, s - 1]` (zero where the mask is off).
#[derive(Debug, Clone)]
pub struct SequenceLogps<B: Backend> {
    /// Summed log-prob of the masked tokens.
    pub sum: Tensor<B, 1>,
    /// `sum / count` (per-token mean; `0` for an empty mask).
    pub mean: Tensor<B, 1>,
    /// Number of masked tokens.
    pub count: Tensor<B, 1>,
    /// Log-prob of each target token, masked.
    pub token: Tensor<B, 2>,
}

/// Log-probs of `tokens` under `logits`, restricted to `completion_mask`.
///
/// **Shift-by-one convention** (as in HF/TRL): `logits[:, i]` is the model's prediction for
/// `tokens[:, i + 1]`. `tokens` and `completion_mask` are the *unshifted* model inputs; the mask
/// marks the completion tokens themselves (`completion_mask[:, i] = 1` ⇒ `tokens[:, i]` is
/// scored, using `logits[:, i - 1]`). Position 0 can never be scored. `token[:, j]` in the
/// output is the log-prob of `tokens[:, j + 1]`.
///
/// Stable: one `log_softmax` over the vocabulary, then a gather; no softmax is materialised.
///
/// # Shapes
/// - `logits`: `[b, s, v]`; `tokens`: `[b, s]`; `completion_mask`: `[b, s]` (0/1 floats).
pub fn sequence_logps<B: Backend>(
    logits: Tensor<B, 3>,
    tokens: Tensor<B, 2, Int>,
    completion_mask: Tensor<B, 2>,
) -> SequenceLogps<B> {
    let [b, s, _] = logits.dims();
    assert!(
        s >= 2,
        "sequence_logps needs at least two positions, got {s}"
    );
    let logits = logits.narrow(1, 0, s - 1);
    let targets = tokens.narrow(1, 1, s - 1).reshape([b, s - 1, 1]);
    let mask = completion_mask.narrow(1, 1, s - 1);
    let token = log_softmax(logits, 2)
        .gather(2, targets)
        .reshape([b, s - 1])
        * mask.clone();
    let sum = token.clone().sum_dim(1).reshape([b]);
    let count = mask.sum_dim(1).reshape([b]);
    let mean = sum.clone() / count.clone().clamp_min(1.0);
    SequenceLogps {
        sum,
        mean,
        count,
        token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray;

    #[test]
    fn shift_by_one_by_hand() {
        let device = Default::default();
        // Vocabulary 3; logits row i predicts token i+1.
        let logits = Tensor::<B, 3>::from_data(
            TensorData::new(
                vec![0.0f32, 1.0, 2.0, 2.0, 0.0, 0.0, 5.0, 5.0, 5.0],
                [1, 3, 3],
            ),
            &device,
        );
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![0i64, 2, 0], [1, 3]), &device);
        let mask =
            Tensor::<B, 2>::from_data(TensorData::new(vec![0.0f32, 1.0, 1.0], [1, 3]), &device);
        let out = sequence_logps(logits, tokens, mask);
        let lse = |xs: [f64; 3]| xs.iter().map(|x| x.exp()).sum::<f64>().ln();
        let t1 = 2.0 - lse([0.0, 1.0, 2.0]); // token 2 from row 0
        let t2 = 2.0 - lse([2.0, 0.0, 0.0]); // token 0 from row 1
        let tok = out.token.into_data().to_vec::<f32>().unwrap();
        assert!(
            (tok[0] as f64 - t1).abs() < 1e-6 && (tok[1] as f64 - t2).abs() < 1e-6,
            "{tok:?}"
        );
        let sum = out.sum.into_data().to_vec::<f32>().unwrap()[0] as f64;
        assert!((sum - (t1 + t2)).abs() < 1e-6);
        let mean = out.mean.into_data().to_vec::<f32>().unwrap()[0] as f64;
        assert!((mean - (t1 + t2) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn masked_positions_do_not_count() {
        let device = Default::default();
        let logits = Tensor::<B, 3>::from_data(
            TensorData::new(
                vec![0.3f32, -1.0, 4.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0],
                [1, 3, 3],
            ),
            &device,
        );
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 1, 2], [1, 3]), &device);
        let mask =
            Tensor::<B, 2>::from_data(TensorData::new(vec![0.0f32, 0.0, 1.0], [1, 3]), &device);
        let out = sequence_logps(logits, tokens, mask);
        let expect = -(3.0f64).ln(); // uniform row 1 -> log(1/3)
        let sum = out.sum.into_data().to_vec::<f32>().unwrap()[0] as f64;
        assert!((sum - expect).abs() < 1e-6, "{sum} vs {expect}");
        assert_eq!(out.count.into_data().to_vec::<f32>().unwrap(), vec![1.0]);
    }
}
