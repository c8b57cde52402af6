//! Attention's `softmax(scores + bias)` over the last axis in one pass per row, and under
//! `Autodiff<Flex>` its backward, `p · (dp − Σ dp·p)`, in one more, keeping only the output `p`.
//!
//! The op-by-op path (a bias add, then a detached max, a subtraction, an exponential, a sum and
//! a division, so that plain and autodiff backends agree) reads and writes the `[b, g, s·r, t]`
//! scores about six times forward and ten times backward, and keeps the exponential and the
//! sums for its backward.
//!
//! Masked keys (a bias of −1e30) get exactly zero weight, as `exp` gives them on the op-by-op
//! path, and each row's sums run over 16 fixed lanes, so keys appended as padding (masked) do
//! not change a row's bits: a row gives the same output in any batch.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex::{cast, same, tensor, with_f32};
use crate::simd::{dispatch, exp_nonpositive, fold, LANES};

/// Rows per task: at least this many elements, so short rows do not become tiny tasks.
const TASK_ELEMS: usize = 16 * 1024;

/// `e^x` for `x ≤ 0`, exactly zero below −87 (a masked key's weight is zero, as on the op-by-op
/// path, and not `e^−87`).
#[inline(always)]
fn exp_or_zero(x: f32) -> f32 {
    let e = exp_nonpositive(x);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// One row: `p = softmax(x + bias)` into `p` (three passes over a row that stays in cache).
/// Element `i` goes to lane `i % 16` (whole 16-element chunks, then the tail), so the
/// compiler can keep the lanes in one vector register.
#[inline(always)]
fn forward_row(x: &[f32], bias: &[f32], p: &mut [f32]) {
    let n = p.len().min(x.len()).min(bias.len());
    let (x, bias, p) = (&x[..n], &bias[..n], &mut p[..n]);
    let full = n / LANES * LANES;
    let mut max = [f32::NEG_INFINITY; LANES];
    for ((p, x), b) in p[..full]
        .chunks_exact_mut(LANES)
        .zip(x.chunks_exact(LANES))
        .zip(bias.chunks_exact(LANES))
    {
        for l in 0..LANES {
            let y = x[l] + b[l];
            p[l] = y;
            max[l] = if y > max[l] { y } else { max[l] };
        }
    }
    for i in full..n {
        let (y, l) = (x[i] + bias[i], i - full);
        p[i] = y;
        max[l] = if y > max[l] { y } else { max[l] };
    }
    let m = max
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let mut sum = [0.0f32; LANES];
    for p in p[..full].chunks_exact_mut(LANES) {
        for l in 0..LANES {
            let e = exp_or_zero(p[l] - m);
            p[l] = e;
            sum[l] += e;
        }
    }
    for i in full..n {
        let e = exp_or_zero(p[i] - m);
        p[i] = e;
        sum[i - full] += e;
    }
    let s = fold(sum);
    for p in p.iter_mut() {
        *p /= s;
    }
}

/// One row: `dx = p · (dp − Σ dp·p)` into `dx` (lanes as in [`forward_row`]).
#[inline(always)]
fn backward_row(p: &[f32], dp: &[f32], dx: &mut [f32]) {
    let n = dx.len().min(p.len()).min(dp.len());
    let (p, dp, dx) = (&p[..n], &dp[..n], &mut dx[..n]);
    let full = n / LANES * LANES;
    let mut dot = [0.0f32; LANES];
    for (p, g) in p[..full]
        .chunks_exact(LANES)
        .zip(dp[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            dot[l] += p[l] * g[l];
        }
    }
    for i in full..n {
        dot[i - full] += p[i] * dp[i];
    }
    let c = fold(dot);
    for ((dx, &p), &g) in dx.iter_mut().zip(p).zip(dp) {
        *dx = p * (g - c);
    }
}

/// [`forward_row`] over a block of whole rows of length `t`.
#[inline(always)]
fn forward_rows(x: &[f32], bias: &[f32], p: &mut [f32], t: usize) {
    for ((x, b), p) in x
        .chunks_exact(t)
        .zip(bias.chunks_exact(t))
        .zip(p.chunks_exact_mut(t))
    {
        forward_row(x, b, p);
    }
}

/// [`backward_row`] over a block of whole rows of length `t`.
#[inline(always)]
fn backward_rows(p: &[f32], dp: &[f32], dx: &mut [f32], t: usize) {
    for ((p, g), dx) in p
        .chunks_exact(t)
        .zip(dp.chunks_exact(t))
        .zip(dx.chunks_exact_mut(t))
    {
        backward_row(p, g, dx);
    }
}

dispatch!(forward_fast, forward_rows, (x: &[f32], bias: &[f32], p: &mut [f32], t: usize) -> ());
dispatch!(backward_fast, backward_rows, (p: &[f32], dp: &[f32], dx: &mut [f32], t: usize) -> ());

/// Whole rows of length `t` per task.
fn task_len(t: usize) -> usize {
    t * TASK_ELEMS.div_ceil(t).max(1)
}

/// `softmax(x + bias)` over rows of length `t` (`x` and `bias` of one length, a multiple of `t`).
///
/// # Panics
/// When the lengths differ or are not whole rows (a caller's bug).
pub fn forward(x: &[f32], bias: &[f32], t: usize) -> Vec<f32> {
    assert!(
        t > 0 && x.len() == bias.len() && x.len().is_multiple_of(t),
        "softmax: {} scores, {} bias, rows of {t}",
        x.len(),
        bias.len()
    );
    let mut p = vec![0.0f32; x.len()];
    let task = task_len(t);
    p.par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(bias.par_chunks(task)))
        .for_each(|(p, (x, b))| forward_fast(x, b, p, t));
    p
}

/// The gradient of [`forward`] with respect to its input, from its output `p` and the
/// output's gradient `dp`.
pub fn backward(p: &[f32], dp: &[f32], t: usize) -> Vec<f32> {
    assert!(
        t > 0 && p.len() == dp.len() && p.len().is_multiple_of(t),
        "softmax backward: {} outputs, {} grads, rows of {t}",
        p.len(),
        dp.len()
    );
    let mut dx = vec![0.0f32; p.len()];
    let task = task_len(t);
    dx.par_chunks_mut(task)
        .zip(p.par_chunks(task).zip(dp.par_chunks(task)))
        .for_each(|(dx, (p, g))| backward_fast(p, g, dx, t));
    dx
}

/// `softmax(scores + bias)` over the last axis through the fused kernel when `softmax` is
/// [`crate::enabled`] and [`softmax_fused`] applies; the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn softmax<B: Backend, const D: usize>(
    scores: Tensor<B, D>,
    bias: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if !crate::enabled("softmax") {
        return Err((scores, bias));
    }
    softmax_fused(scores, bias)
}

/// [`softmax`] whatever `BAPO_FUSED` says: the kernel when `B` is `Flex` or `Autodiff<Flex>`,
/// both f32 and of one shape, the inputs back otherwise. Under autodiff the gradient reaches
/// both inputs (it is the same for both).
#[allow(clippy::type_complexity)]
pub fn softmax_fused<B: Backend, const D: usize>(
    scores: Tensor<B, D>,
    bias: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if scores.dtype() != DType::F32
        || bias.dtype() != DType::F32
        || scores.dims() != bias.dims()
        || D == 0
        || scores.dims()[D - 1] == 0
    {
        return Err((scores, bias));
    }
    let scores = match cast::<_, Tensor<Autodiff<Flex>, D>>(scores) {
        Ok(s) => return Ok(same(autodiff(s, same(bias)))),
        Err(s) => s,
    };
    match cast::<_, Tensor<Flex, D>>(scores) {
        Ok(s) => {
            let b: Tensor<Flex, D> = same(bias);
            let shape = s.dims().to_vec();
            let t = shape[D - 1];
            let (s, b): (FlexTensor, FlexTensor) =
                (s.into_primitive().tensor(), b.into_primitive().tensor());
            let p = with_f32(&s, |s| with_f32(&b, |b| forward(s, b, t)));
            Ok(same(Tensor::<Flex, D>::from_primitive(
                TensorPrimitive::Float(tensor(p, shape)),
            )))
        }
        Err(s) => Err((s, bias)),
    }
}

#[derive(Debug, Clone)]
struct Saved {
    p: FlexTensor,
    shape: Vec<usize>,
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 2> for SoftmaxBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved { p, shape } = ops.state;
        let dp = grads.consume::<Flex>(&ops.node);
        let t = shape[shape.len() - 1];
        let dx = with_f32(&p, |p| with_f32(&dp, |dp| backward(p, dp, t)));
        let dx = tensor(dx, shape);
        let [scores, bias] = ops.parents;
        if let Some(node) = bias {
            grads.register::<Flex>(node.id, dx.clone());
        }
        if let Some(node) = scores {
            grads.register::<Flex>(node.id, dx);
        }
    }
}

fn autodiff<const D: usize>(
    scores: Tensor<Autodiff<Flex>, D>,
    bias: Tensor<Autodiff<Flex>, D>,
) -> Tensor<Autodiff<Flex>, D> {
    let shape = scores.dims().to_vec();
    let t = shape[D - 1];
    let (s, b) = (
        scores.into_primitive().tensor(),
        bias.into_primitive().tensor(),
    );
    let p = with_f32(&s.primitive, |x| {
        with_f32(&b.primitive, |b| forward(x, b, t))
    });
    let p = tensor(p, shape.clone());
    let tracked = match SoftmaxBackward
        .prepare::<NoCheckpointing>([s.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                p: p.clone(),
                shape,
            },
            p,
        ),
        OpsKind::UnTracked(prep) => prep.finish(p),
    };
    Tensor::from_primitive(TensorPrimitive::Float(tracked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    /// The op-by-op softmax the model runs without the kernel.
    fn op_by_op<Bk: Backend>(x: Tensor<Bk, 3>) -> Tensor<Bk, 3> {
        let max = x.clone().detach().max_dim(2);
        let e = (x - max).exp();
        e.clone() / e.sum_dim(2)
    }

    /// A bias like attention's: 0 where a key is visible, −1e30 where masked (causal, plus the
    /// last `pad` keys of every row).
    fn bias(rows: usize, t: usize, pad: usize) -> Vec<f32> {
        (0..rows * t)
            .map(|i| {
                let (r, j) = (i / t, i % t);
                if j > r % t || j >= t - pad {
                    -1.0e30
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Forward and both input gradients against the op-by-op softmax of `scores + bias`, with
    /// masked keys and a non-uniform upstream gradient, rows not a multiple of the lanes.
    #[test]
    fn fused_matches_op_by_op() {
        let d = Default::default();
        <A as Backend>::seed(&d, 3);
        let (rows, t) = (2 * 45, 37);
        let s0 = Tensor::<A, 3>::random([2, 45, t], Distribution::Normal(0.0, 4.0), &d);
        let b0 = Tensor::<A, 3>::from_data(
            burn::tensor::TensorData::new(bias(rows, t, 3), [2, 45, t]),
            &d,
        );
        let w = Tensor::<A, 3>::random([2, 45, t], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let s = s0.clone().detach().require_grad();
            let b = b0.clone().detach().require_grad();
            let p = if fused {
                softmax_fused(s.clone(), b.clone()).expect("autodiff flex has the kernel")
            } else {
                op_by_op(s.clone() + b.clone())
            };
            let grads = (p.clone() * w.clone()).sum().backward();
            let v = |t: Tensor<Flex, 3>| t.into_data().into_vec::<f32>().unwrap();
            (
                p.into_data().into_vec::<f32>().unwrap(),
                v(s.grad(&grads).expect("scores grad")),
                v(b.grad(&grads).expect("bias grad")),
            )
        };
        let (fp, fs, fb) = run(true);
        let (op, os, _) = run(false);
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(worst(&fp, &op) < 1e-6, "forward {}", worst(&fp, &op));
        assert!(
            worst(&fs, &os) < 1e-6,
            "scores gradient {}",
            worst(&fs, &os)
        );
        assert_eq!(fs, fb, "the bias gets the scores' gradient");
        // Masked keys: exactly zero weight and gradient, as on the op-by-op path.
        let b = bias(rows, t, 3);
        for (i, &m) in b.iter().enumerate() {
            if m < 0.0 {
                assert_eq!((fp[i], fs[i], op[i]), (0.0, 0.0, 0.0), "masked {i}");
            }
        }
    }

    /// Plain Flex and `Autodiff<Flex>` give the same bits, and a row's bits do not depend on
    /// the other rows or on masked keys appended after it (padding).
    #[test]
    fn bits_do_not_depend_on_backend_batch_or_padding() {
        let (rows, t) = (40, 53);
        let x: Vec<f32> = (0..rows * t)
            .map(|i| ((i * 7919) % 1013) as f32 / 61.0 - 8.0)
            .collect();
        let b = bias(rows, t, 5);
        let all = forward(&x, &b, t);
        let d = Default::default();
        let ad = softmax_fused(
            Tensor::<A, 2>::from_data(burn::tensor::TensorData::new(x.clone(), [rows, t]), &d),
            Tensor::<A, 2>::from_data(burn::tensor::TensorData::new(b.clone(), [rows, t]), &d),
        )
        .expect("autodiff flex")
        .into_data()
        .into_vec::<f32>()
        .unwrap();
        assert_eq!(all, ad);
        let dp: Vec<f32> = (0..rows * t).map(|i| (i % 17) as f32 - 8.0).collect();
        let dx_all = backward(&all, &dp, t);
        for r in 0..rows {
            let row = r * t..(r + 1) * t;
            // Alone, without the five masked keys at the end, and with 30 more.
            for keep in [t - 5, t + 30] {
                let pad = |v: &[f32], fill: f32| {
                    let mut v = v[..(t - 5).min(keep)].to_vec();
                    v.resize(keep, fill);
                    v
                };
                let p = forward(
                    &pad(&x[row.clone()], 1.0),
                    &pad(&b[row.clone()], -1.0e30),
                    keep,
                );
                assert_eq!(
                    &p[..t - 5],
                    &all[r * t..r * t + t - 5],
                    "row {r}, {keep} keys"
                );
                let dx = backward(&p, &pad(&dp[row.clone()], 3.0), keep);
                assert_eq!(
                    &dx[..t - 5],
                    &dx_all[r * t..r * t + t - 5],
                    "row {r} backward"
                );
            }
        }
    }

    #[test]
    fn mismatched_shapes_get_their_inputs_back() {
        let d = Default::default();
        let s = Tensor::<Flex, 2>::zeros([2, 3], &d);
        let b = Tensor::<Flex, 2>::zeros([3, 2], &d);
        assert!(softmax_fused(s, b).is_err());
    }
}
