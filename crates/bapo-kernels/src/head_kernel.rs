//! The head's log-prob of each target on plain `f32` rows: one pass for the row's
//! log-sum-exp (forward) and one for `grad · (onehot(target) − softmax)` (backward).
//!
//! Every row is computed by the same instructions in the same order whatever else is in the
//! batch, whichever thread runs it and whichever instruction set the CPU offers (lane-wise
//! IEEE operations, no fused multiply-add, a fixed 16-lane reduction order): a row's result is
//! the same bits in any batch (the anchor's hinge sits on its kink at step 1, so this matters).

use rayon::prelude::*;

use crate::simd::{dispatch, exp_nonpositive, fold, LANES};

/// Maximum of a row (NaN-free rows; a NaN anywhere still reaches the sum and the output).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        acc[l] = if x > acc[l] { x } else { acc[l] };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `Σ e^(x − shift)` over a row, in 16 lanes added pairwise in a fixed order.
#[inline(always)]
fn row_sum_exp(row: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += exp_nonpositive(c[l] - shift);
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        acc[l] += exp_nonpositive(x - shift);
    }
    fold(acc)
}

/// `grad · (onehot(target) − e^(x − lse))` of one row, without the one-hot term, written over
/// the row.
#[inline(always)]
fn row_backward_in_place(row: &mut [f32], lse: f32, grad: f32) {
    for x in row.iter_mut() {
        *x = -(grad * exp_nonpositive(*x - lse));
    }
}

#[inline(always)]
fn forward_row(row: &[f32]) -> f32 {
    let max = row_max(row);
    max + row_sum_exp(row, max).ln()
}

dispatch!(forward_row_fast, forward_row, (row: &[f32]) -> f32);
dispatch!(backward_row_in_place_fast, row_backward_in_place, (row: &mut [f32], lse: f32, grad: f32) -> ());

/// Each row's `log softmax(row)[target]` and its log-sum-exp.
///
/// # Panics
/// When `logits.len() != targets.len() · vocab` or a target is outside `0..vocab` (a caller's
/// bug: the op-by-op path's gather would fail on it too).
pub fn target_logps(logits: &[f32], vocab: usize, targets: &[i64]) -> (Vec<f32>, Vec<f32>) {
    check(logits, vocab, targets);
    let lse: Vec<f32> = logits
        .par_chunks(vocab.max(1))
        .map(forward_row_fast)
        .collect();
    let out = targets
        .iter()
        .zip(&lse)
        .enumerate()
        .map(|(i, (&t, &l))| logits[i * vocab + t as usize] - l)
        .collect();
    (out, lse)
}

/// The gradient of [`target_logps`]'s output with respect to the logits, given the output's
/// gradient `grad` `[n]` and the forward's `lse` `[n]`: `grad · (onehot(target) − softmax)`.
pub fn target_logps_backward(
    logits: &[f32],
    vocab: usize,
    targets: &[i64],
    lse: &[f32],
    grad: &[f32],
) -> Vec<f32> {
    let mut out = logits.to_vec();
    target_logps_backward_in_place(&mut out, vocab, targets, lse, grad);
    out
}

/// [`target_logps_backward`] written over `logits` (no second `[n, v]` buffer: the saved
/// logits are not needed after the backward).
pub fn target_logps_backward_in_place(
    logits: &mut [f32],
    vocab: usize,
    targets: &[i64],
    lse: &[f32],
    grad: &[f32],
) {
    check(logits, vocab, targets);
    assert!(
        lse.len() == targets.len() && grad.len() == targets.len(),
        "target_logps_backward: {} rows, {} lse, {} grads",
        targets.len(),
        lse.len(),
        grad.len()
    );
    logits
        .par_chunks_mut(vocab.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            backward_row_in_place_fast(row, lse[i], grad[i]);
            row[targets[i] as usize] += grad[i];
        });
}

fn check(logits: &[f32], vocab: usize, targets: &[i64]) {
    assert!(
        logits.len() == targets.len() * vocab,
        "target_logps: {} logits for {} rows of {vocab}",
        logits.len(),
        targets.len()
    );
    if let Some(t) = targets.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        panic!("target_logps: target {t} outside a vocabulary of {vocab}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forward and backward against f64 by hand, with a row length that is not a multiple of
    /// the lanes (the remainder path) and rows far apart in scale.
    #[test]
    fn matches_f64_by_hand() {
        let vocab = 37;
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| {
                (0..vocab)
                    .map(|j| ((j * 7 + r * 3) % 11) as f32 * (r as f32 + 0.5) - 20.0 * r as f32)
                    .collect()
            })
            .collect();
        let logits: Vec<f32> = rows.concat();
        let targets = [0i64, 36, 5, 17, 9];
        let grad = [1.0f32, -0.5, 2.0, 0.0, 0.25];
        let (out, lse) = target_logps(&logits, vocab, &targets);
        let dx = target_logps_backward(&logits, vocab, &targets, &lse, &grad);
        for (i, row) in rows.iter().enumerate() {
            let m = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
            let l = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let t = targets[i] as usize;
            assert!(
                (out[i] as f64 - (row[t] as f64 - l)).abs() < 2e-5,
                "row {i}: {}",
                out[i]
            );
            for (j, &x) in row.iter().enumerate() {
                let want = grad[i] as f64 * ((j == t) as u8 as f64 - (x as f64 - l).exp());
                let got = dx[i * vocab + j] as f64;
                assert!(
                    (got - want).abs() < 1e-6,
                    "row {i} col {j}: {got} vs {want}"
                );
            }
        }
    }

    /// A row gives the same bits alone and inside a batch (the kink test's premise).
    #[test]
    fn row_bits_do_not_depend_on_the_batch() {
        let vocab = 1000;
        let logits: Vec<f32> = (0..vocab * 9)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0)
            .collect();
        let targets: Vec<i64> = (0..9).map(|i| (i * 101) as i64).collect();
        let (all, lse_all) = target_logps(&logits, vocab, &targets);
        let grad = vec![1.0f32; 9];
        let dx_all = target_logps_backward(&logits, vocab, &targets, &lse_all, &grad);
        for i in 0..9 {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let (one, lse) = target_logps(row, vocab, &targets[i..=i]);
            assert_eq!(one[0].to_bits(), all[i].to_bits(), "row {i}");
            let dx = target_logps_backward(row, vocab, &targets[i..=i], &lse, &grad[..1]);
            assert!(dx
                .iter()
                .zip(&dx_all[i * vocab..])
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    /// The copying backward (for shared logits) gives the in-place one's bits, remainder path
    /// included, and the backward really changes the values.
    #[test]
    fn in_place_backward_equals_out_of_place() {
        let vocab = 1003;
        let logits: Vec<f32> = (0..vocab * 7)
            .map(|i| ((i * 7919) % 1013) as f32 / 31.0 - 16.0)
            .collect();
        let targets: Vec<i64> = (0..7).map(|i| (i * 143) as i64).collect();
        let grad: Vec<f32> = (0..7).map(|i| i as f32 * 0.75 - 2.0).collect();
        let (_, lse) = target_logps(&logits, vocab, &targets);
        let dx = target_logps_backward(&logits, vocab, &targets, &lse, &grad);
        let mut buf = logits.clone();
        target_logps_backward_in_place(&mut buf, vocab, &targets, &lse, &grad);
        assert!(dx.iter().zip(&buf).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(
            dx.iter().zip(&logits).any(|(a, b)| a != b),
            "a real backward"
        );
    }

    #[test]
    #[should_panic(expected = "outside a vocabulary of 4")]
    fn a_target_outside_the_vocabulary_is_refused() {
        target_logps(&[0.0; 8], 4, &[1, 4]);
    }
}
