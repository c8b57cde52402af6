//! Completion log-probabilities from logits.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

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
    let count = mask.sum_dim(1).reshape([b]);
    SequenceLogps::reduce(token, count)
}

impl<B: Backend> SequenceLogps<B> {
    /// Per-row sum and mean of masked per-token log-probs `token` `[b, s - 1]`, given each
    /// row's number of scored tokens `count` `[b]`.
    fn reduce(token: Tensor<B, 2>, count: Tensor<B, 1>) -> Self {
        let sum = row_sums(token.clone());
        let mean = sum.clone() / count.clone().clamp_min(1.0);
        Self {
            sum,
            mean,
            count,
            token,
        }
    }
}

/// Each row's sum `[b]` of `token` `[b, l]`, bit for bit the same whatever zero padding
/// follows the row's scored tokens: the row is padded with zeros to a power-of-two width and
/// halved pairwise (`t[:, :w/2] + t[:, w/2..w]` until one column is left), so wider padding
/// only adds zeros in the first halvings. Element-wise adds are exact IEEE operations on every
/// backend, so this holds on every backend.
///
/// A backend's `sum_dim` gives no such promise: burn-flex sums a row in SIMD vectors and adds
/// the tail past the last full vector separately, so the same tokens padded to another length
/// are added in another order (measured: one ulp on a summed log-prob of -78.1). The reference
/// pass and training group examples differently, and the anchor's hinge sits on its kink at
/// step one, so a row's log-prob must not depend on the batch it is in.
pub fn row_sums<B: Backend>(token: Tensor<B, 2>) -> Tensor<B, 1> {
    let [b, l] = token.dims();
    let width = l.max(1).next_power_of_two();
    let mut t = if width > l {
        let zeros = Tensor::<B, 2>::zeros([b, width - l], &token.device());
        Tensor::cat(vec![token, zeros], 1)
    } else {
        token
    };
    let mut w = width;
    while w > 1 {
        w /= 2;
        t = t.clone().narrow(1, 0, w) + t.narrow(1, w, w);
    }
    t.reshape([b])
}

/// The logits rows a right-padded batch really needs: position `i` of row `r` is needed only
/// when token `i + 1` is a completion token (shift-by-one, as in [`sequence_logps`]). Prompt and
/// padding positions need no logits, so a training or scoring pass projects only these rows
/// through the LM head (with SmolLM2's 49,152-column head that is most of the head's work).
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRows {
    /// Batch rows `b` and positions per row `s` of the unshifted batch.
    pub rows: usize,
    pub len: usize,
    /// Flat index `r * s + i` of every needed position, row-major (so rows stay contiguous).
    pub positions: Vec<i64>,
    /// The token each needed position predicts: `tokens[r, i + 1]`.
    pub targets: Vec<i64>,
}

impl CompletionRows {
    /// From host copies of `tokens` and `completion_mask`, both `[rows, len]` row-major.
    ///
    /// # Panics
    /// When the slices are not `rows * len` long (a caller's bug, never an input's).
    pub fn new(tokens: &[i64], completion_mask: &[f32], rows: usize, len: usize) -> Self {
        assert!(
            tokens.len() == rows * len && completion_mask.len() == rows * len,
            "CompletionRows: {} tokens and {} mask entries for {rows} x {len}",
            tokens.len(),
            completion_mask.len()
        );
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for r in 0..rows {
            for i in 1..len {
                if completion_mask[r * len + i] != 0.0 {
                    positions.push((r * len + i - 1) as i64);
                    targets.push(tokens[r * len + i]);
                }
            }
        }
        Self {
            rows,
            len,
            positions,
            targets,
        }
    }

    /// Number of needed positions (completion tokens in the batch).
    pub fn count(&self) -> usize {
        self.positions.len()
    }
}

/// `log softmax(logits)[target]` of each row, as `logit[target] − logsumexp(row)`.
///
/// The row maximum is detached (it cancels in value and gradient), so the graph keeps one
/// shifted copy and its exponential: no `[n, v]` log-softmax is materialised, and the gradient
/// is `onehot(target) − softmax(row)`.
///
/// With feature `flex`, f32 logits on burn-flex (plain or under `Autodiff`) go through a fused
/// kernel instead (`bapo_kernels::head`): one pass for each row's log-sum-exp, the logits and
/// `[n]` log-sum-exps kept for a one-pass backward; the same values within float rounding (its
/// own exponential and summation order), each row's bits independent of the batch.
///
/// # Shapes
/// `logits`: `[n, v]`; `targets`: `[n]` → `[n]`.
pub fn target_logps<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    #[cfg(feature = "flex")]
    let (logits, targets) = match bapo_kernels::head::target_logps(logits, targets) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    target_logps_op_by_op(logits, targets)
}

/// [`target_logps`] in Burn's ops, on any backend (the path without a fused kernel).
pub fn target_logps_op_by_op<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let max = logits.clone().detach().max_dim(1); // [n, 1]
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let picked = logits.gather(1, targets.reshape([n, 1]));
    (picked - lse).reshape([n])
}

/// [`SequenceLogps`] from the log-probs of the needed positions only ([`CompletionRows`]):
/// scattered back into `[b, s - 1]` and summed per row, exactly as [`sequence_logps`] sums.
///
/// # Shapes
/// `token_logps`: `[n]` with `n = plan.count()`; outputs as in [`SequenceLogps`].
pub fn scatter_logps<B: Backend>(
    token_logps: Tensor<B, 1>,
    plan: &CompletionRows,
    device: &B::Device,
) -> SequenceLogps<B> {
    let (b, s) = (plan.rows, plan.len);
    assert!(
        s >= 2,
        "sequence log-probs need at least two positions, got {s}"
    );
    // Position r*s + i (i < s - 1) of the flat logits is entry r*(s-1) + i of `token`.
    let idx: Vec<i64> = plan.positions.iter().map(|&p| p - p / s as i64).collect();
    let n = idx.len();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), device);
    let token = Tensor::<B, 1>::zeros([b * (s - 1)], device)
        .select_assign(0, idx, token_logps, IndexingUpdateOp::Add)
        .reshape([b, s - 1]);
    // Scored tokens per row, from the plan (row r owns positions r*s .. r*s + s - 1).
    let mut count = vec![0.0f32; b];
    for &p in &plan.positions {
        count[p as usize / s] += 1.0;
    }
    let count = Tensor::<B, 1>::from_data(TensorData::new(count, [b]), device);
    SequenceLogps::reduce(token, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    /// A row's sum is the same bits whatever zero padding follows it (the row sums of a batch
    /// padded to its longest row equal each row's sum alone), and within f32 rounding of the
    /// f64 sum. Rows of 1..=70 scored tokens, padded by 0..=70 columns.
    fn row_sums_ignore_padding<Bk: Backend>() {
        let device = Default::default();
        let value =
            |r: usize, j: usize| -(((r * 31 + j * 17) % 23) as f32 * 0.37 + 0.013 * j as f32);
        for len in 1..=70usize {
            let alone: Vec<f32> = (0..len).map(|j| value(len, j)).collect();
            let one = Tensor::<Bk, 2>::from_data(TensorData::new(alone.clone(), [1, len]), &device);
            let want = row_sums(one).into_data().to_vec::<f32>().unwrap()[0];
            let exact: f64 = alone.iter().map(|&x| x as f64).sum();
            assert!(
                (want as f64 - exact).abs() <= 4e-7 * exact.abs(),
                "{len}: {want} vs {exact}"
            );
            for pad in 1..=70usize {
                let mut row = alone.clone();
                row.resize(len + pad, 0.0);
                // Two rows, so the batch also differs: this row and a full one.
                let full: Vec<f32> = (0..len + pad).map(|j| value(pad, j)).collect();
                let data = TensorData::new([row, full].concat(), [2, len + pad]);
                let got = row_sums(Tensor::<Bk, 2>::from_data(data, &device));
                let got = got.into_data().to_vec::<f32>().unwrap()[0];
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{len} padded by {pad}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn row_sums_ignore_padding_on_ndarray() {
        row_sums_ignore_padding::<B>();
    }

    #[cfg(feature = "flex")]
    #[test]
    fn row_sums_ignore_padding_on_flex() {
        row_sums_ignore_padding::<burn::backend::Flex>();
    }

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

    /// Only the needed rows, projected and reduced, give `sequence_logps`'s numbers — values
    /// and the gradient with respect to the logits — on a padded batch with prompts.
    #[test]
    fn completion_rows_path_equals_full_log_softmax() {
        use burn::backend::Autodiff;
        type A = Autodiff<NdArray>;
        let device = Default::default();
        let (b, s, v) = (3, 6, 7);
        let vals: Vec<f32> = (0..b * s * v)
            .map(|i| ((i * 37 % 101) as f32 / 17.0).sin() * 4.0)
            .collect();
        let tokens: Vec<i64> = (0..b * s).map(|i| (i * 5 % v) as i64).collect();
        // Row 0: prompt 2 + completion 4; row 1: prompt 3 + completion 2 + pad; row 2: one token.
        let mask: Vec<f32> = [
            [0., 0., 1., 1., 1., 1.],
            [0., 0., 0., 1., 1., 0.],
            [0., 1., 0., 0., 0., 0.],
        ]
        .concat();
        let plan = CompletionRows::new(&tokens, &mask, b, s);
        assert_eq!(plan.count(), 7);
        let full = Tensor::<A, 3>::from_data(TensorData::new(vals.clone(), [b, s, v]), &device)
            .require_grad();
        let tok = Tensor::<A, 2, Int>::from_data(TensorData::new(tokens.clone(), [b, s]), &device);
        let m = Tensor::<A, 2>::from_data(TensorData::new(mask.clone(), [b, s]), &device);
        let want = sequence_logps(full.clone(), tok, m);
        let g_want = want.sum.clone().sum().backward();
        let g_want = full
            .grad(&g_want)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();

        let full2 =
            Tensor::<A, 3>::from_data(TensorData::new(vals, [b, s, v]), &device).require_grad();
        let n = plan.count();
        let pos =
            Tensor::<A, 1, Int>::from_data(TensorData::new(plan.positions.clone(), [n]), &device);
        let tg =
            Tensor::<A, 1, Int>::from_data(TensorData::new(plan.targets.clone(), [n]), &device);
        let rows = full2.clone().reshape([b * s, v]).select(0, pos);
        let got = scatter_logps(target_logps(rows, tg), &plan, &device);
        let g_got = got.sum.clone().sum().backward();
        let g_got = full2
            .grad(&g_got)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();

        let close = |x: Vec<f32>, y: Vec<f32>, what: &str| {
            assert_eq!(x.len(), y.len());
            for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                assert!((a - b).abs() < 1e-5, "{what}[{i}]: {a} vs {b}");
            }
        };
        let host = |t: Tensor<A, 1>| t.into_data().to_vec::<f32>().unwrap();
        close(host(got.sum), host(want.sum), "sum");
        close(host(got.mean), host(want.mean), "mean");
        assert_eq!(host(got.count), vec![4.0, 2.0, 1.0]);
        close(
            got.token.into_data().to_vec::<f32>().unwrap(),
            want.token.into_data().to_vec::<f32>().unwrap(),
            "token",
        );
        close(g_got, g_want, "grad");
    }

    /// The fused kernel (feature `flex`) against this op-by-op path on the same backend:
    /// forward and gradient, with a different upstream weight on every row.
    #[cfg(feature = "flex")]
    #[test]
    fn fused_matches_op_by_op_forward_and_gradient() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::Distribution;
        type A = Autodiff<Flex>;
        let d = Default::default();
        <A as Backend>::seed(&d, 11);
        let (n, v) = (13, 3001);
        let logits = Tensor::<A, 2>::random([n, v], Distribution::Normal(0.0, 4.0), &d);
        let t: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
        let targets = Tensor::<A, 1, Int>::from_data(TensorData::new(t, [n]), &d);
        let w: Vec<f32> = (0..n).map(|i| i as f32 - 4.0).collect();
        let weights = Tensor::<A, 1>::from_data(TensorData::new(w, [n]), &d);
        let run = |fused: bool| {
            let x = logits.clone().detach().require_grad();
            let out = if fused {
                bapo_kernels::head::target_logps_fused(x.clone(), targets.clone())
                    .unwrap_or_else(|_| panic!("autodiff flex has the kernel"))
            } else {
                target_logps_op_by_op(x.clone(), targets.clone())
            };
            let g = (out.clone() * weights.clone()).sum().backward();
            let dx = x.grad(&g).expect("gradient");
            (
                out.into_data().into_vec::<f32>().unwrap(),
                dx.into_data().into_vec::<f32>().unwrap(),
            )
        };
        let ((fo, fg), (oo, og)) = (run(true), run(false));
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(max_diff(&fo, &oo) < 2e-5, "forward {}", max_diff(&fo, &oo));
        assert!(max_diff(&fg, &og) < 1e-6, "gradient {}", max_diff(&fg, &og));
    }
}
