//! RMSNorm over the last axis, `y = x · rstd · γ` with `rstd = 1/√(mean(x²) + ε)`, in one pass
//! per row, and under `Autodiff<Flex>` its backward in one more, keeping `x` and the `[rows]`
//! `rstd` (Burn's `RmsNorm` runs a square, a mean, an add, a square root, a division and a
//! product forward and about twice as many ops backward, each over the whole `[rows, e]`).
//!
//! `dx = rstd · (g − x · rstd² · Σ(g·x)/e)` with `g = dy · γ`; `dγ = Σ_rows dy · x · rstd`, added
//! over fixed blocks of rows in a fixed order (the same bits at any thread count), and only
//! when `γ` is trained (a LoRA run freezes it).

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
use crate::simd::{dispatch, fold, LANES};

/// Rows per block of `dγ`'s partial sums: a fixed number, so the sum's order does not depend
/// on the threads.
const GAMMA_BLOCK: usize = 64;

/// Elements per forward/backward task.
const TASK_ELEMS: usize = 16 * 1024;

/// `Σ a·b` over one row in 16 lanes (element `i` in lane `i % 16`: whole chunks, then the
/// tail), added in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let full = n / LANES * LANES;
    let mut acc = [0.0f32; LANES];
    for (a, b) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    for i in full..n {
        acc[i - full] += a[i] * b[i];
    }
    fold(acc)
}

/// Rows of `x` normalised into `y`, each row's `rstd` into `rstd`.
#[inline(always)]
fn forward_rows(x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let e = gamma.len();
    for ((x, y), r) in x
        .chunks_exact(e)
        .zip(y.chunks_exact_mut(e))
        .zip(rstd.iter_mut())
    {
        let s = 1.0 / (dot(x, x) / e as f32 + eps).sqrt();
        *r = s;
        for ((y, &x), &g) in y.iter_mut().zip(x).zip(gamma) {
            *y = x * s * g;
        }
    }
}

/// Rows of `dx` from `x`, `rstd`, `γ` and `dy`.
#[inline(always)]
fn backward_rows(x: &[f32], rstd: &[f32], gamma: &[f32], dy: &[f32], dx: &mut [f32]) {
    let e = gamma.len();
    for (((x, &s), dy), dx) in x
        .chunks_exact(e)
        .zip(rstd)
        .zip(dy.chunks_exact(e))
        .zip(dx.chunks_exact_mut(e))
    {
        // g = dy·γ is written into dx first, then dx = s·g − x·(s³·Σ g·x / e).
        for ((d, &dy), &g) in dx.iter_mut().zip(dy).zip(gamma) {
            *d = dy * g;
        }
        let c = s * s * s * dot(dx, x) / e as f32;
        for (d, &x) in dx.iter_mut().zip(x) {
            *d = s * *d - x * c;
        }
    }
}

/// One block of rows' contribution to `dγ`: `Σ_rows dy · x · rstd` into `acc`.
#[inline(always)]
fn gamma_rows(x: &[f32], rstd: &[f32], dy: &[f32], acc: &mut [f32]) {
    let e = acc.len();
    for ((x, &s), dy) in x.chunks_exact(e).zip(rstd).zip(dy.chunks_exact(e)) {
        for ((a, &x), &dy) in acc.iter_mut().zip(x).zip(dy) {
            *a += dy * (x * s);
        }
    }
}

dispatch!(forward_fast, forward_rows, (x: &[f32], gamma: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) -> ());
dispatch!(backward_fast, backward_rows, (x: &[f32], rstd: &[f32], gamma: &[f32], dy: &[f32], dx: &mut [f32]) -> ());
dispatch!(gamma_fast, gamma_rows, (x: &[f32], rstd: &[f32], dy: &[f32], acc: &mut [f32]) -> ());

fn rows_per_task(e: usize) -> usize {
    TASK_ELEMS.div_ceil(e).max(1)
}

fn check(x: &[f32], gamma: &[f32]) -> usize {
    let e = gamma.len();
    assert!(
        e > 0 && x.len().is_multiple_of(e),
        "rms_norm: {} values in rows of {e}",
        x.len()
    );
    x.len() / e
}

/// `x · rstd · γ` over rows of `γ.len()`, and each row's `rstd`.
///
/// # Panics
/// When `x` is not whole rows (a caller's bug).
pub fn forward(x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let rows = check(x, gamma);
    let e = gamma.len();
    let (mut y, mut rstd) = (vec![0.0f32; x.len()], vec![0.0f32; rows]);
    let k = rows_per_task(e);
    y.par_chunks_mut(k * e)
        .zip(rstd.par_chunks_mut(k))
        .zip(x.par_chunks(k * e))
        .for_each(|((y, r), x)| forward_fast(x, gamma, eps, y, r));
    (y, rstd)
}

/// The gradient with respect to `x`, and with respect to `γ` when `want_gamma`.
pub fn backward(
    x: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    dy: &[f32],
    want_gamma: bool,
) -> (Vec<f32>, Option<Vec<f32>>) {
    let rows = check(x, gamma);
    assert!(
        rstd.len() == rows && dy.len() == x.len(),
        "rms_norm backward: {rows} rows, {} rstd, {} grads",
        rstd.len(),
        dy.len()
    );
    let e = gamma.len();
    let mut dx = vec![0.0f32; x.len()];
    let k = rows_per_task(e);
    dx.par_chunks_mut(k * e)
        .zip(x.par_chunks(k * e).zip(rstd.par_chunks(k)))
        .zip(dy.par_chunks(k * e))
        .for_each(|((dx, (x, r)), dy)| backward_fast(x, r, gamma, dy, dx));
    let dgamma = want_gamma.then(|| {
        let blocks: Vec<Vec<f32>> = x
            .par_chunks(GAMMA_BLOCK * e)
            .zip(rstd.par_chunks(GAMMA_BLOCK))
            .zip(dy.par_chunks(GAMMA_BLOCK * e))
            .map(|((x, r), dy)| {
                let mut acc = vec![0.0f32; e];
                gamma_fast(x, r, dy, &mut acc);
                acc
            })
            .collect();
        let mut total = vec![0.0f32; e];
        for b in &blocks {
            for (t, &v) in total.iter_mut().zip(b) {
                *t += v;
            }
        }
        total
    });
    (dx, dgamma)
}

/// RMSNorm of `x` over its last axis with weight `gamma` through the fused kernel when
/// `rmsnorm` is [`crate::enabled`] and [`rms_norm_fused`] applies; the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>)> {
    if !crate::enabled("rmsnorm") {
        return Err((x, gamma));
    }
    rms_norm_fused(x, gamma, eps)
}

/// [`rms_norm`] whatever `BAPO_FUSED` says: the kernel when `B` is `Flex` or `Autodiff<Flex>`,
/// both f32 and `gamma` as long as `x`'s last axis; the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn rms_norm_fused<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>)> {
    if x.dtype() != DType::F32
        || gamma.dtype() != DType::F32
        || D == 0
        || x.dims()[D - 1] != gamma.dims()[0]
        || gamma.dims()[0] == 0
    {
        return Err((x, gamma));
    }
    let x = match cast::<_, Tensor<Autodiff<Flex>, D>>(x) {
        Ok(x) => return Ok(same(autodiff(x, same(gamma), eps as f32))),
        Err(x) => x,
    };
    match cast::<_, Tensor<Flex, D>>(x) {
        Ok(x) => {
            let g: Tensor<Flex, 1> = same(gamma);
            let shape = x.dims().to_vec();
            let (x, g): (FlexTensor, FlexTensor) =
                (x.into_primitive().tensor(), g.into_primitive().tensor());
            let (y, _) = with_f32(&x, |x| with_f32(&g, |g| forward(x, g, eps as f32)));
            Ok(same(Tensor::<Flex, D>::from_primitive(
                TensorPrimitive::Float(tensor(y, shape)),
            )))
        }
        Err(x) => Err((x, gamma)),
    }
}

#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    gamma: FlexTensor,
    rstd: Vec<f32>,
    shape: Vec<usize>,
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            x,
            gamma,
            rstd,
            shape,
        } = ops.state;
        let dy = grads.consume::<Flex>(&ops.node);
        let [x_node, gamma_node] = ops.parents;
        let e = shape[shape.len() - 1];
        let (dx, dgamma) = with_f32(&x, |x| {
            with_f32(&gamma, |g| {
                with_f32(&dy, |dy| backward(x, &rstd, g, dy, gamma_node.is_some()))
            })
        });
        if let (Some(node), Some(dg)) = (gamma_node, dgamma) {
            grads.register::<Flex>(node.id, tensor(dg, vec![e]));
        }
        if let Some(node) = x_node {
            grads.register::<Flex>(node.id, tensor(dx, shape));
        }
    }
}

fn autodiff<const D: usize>(
    x: Tensor<Autodiff<Flex>, D>,
    gamma: Tensor<Autodiff<Flex>, 1>,
    eps: f32,
) -> Tensor<Autodiff<Flex>, D> {
    let shape = x.dims().to_vec();
    let (x, g) = (x.into_primitive().tensor(), gamma.into_primitive().tensor());
    let (y, rstd) = with_f32(&x.primitive, |xs| {
        with_f32(&g.primitive, |gs| forward(xs, gs, eps))
    });
    let y = tensor(y, shape.clone());
    let tracked = match RmsNormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), g.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                x: x.primitive.clone(),
                gamma: g.primitive.clone(),
                rstd,
                shape,
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(tracked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    /// Forward and both gradients (x and γ) against Burn's `RmsNorm` on the same backend, with
    /// a non-uniform upstream gradient, rows not a multiple of the lanes, and rows far apart
    /// in scale.
    #[test]
    fn fused_matches_burns_rms_norm() {
        let d = Default::default();
        <A as Backend>::seed(&d, 11);
        let scale = Tensor::<A, 3>::from_data(
            burn::tensor::TensorData::new(
                (0..2 * 23)
                    .map(|i| 0.01 + (i % 7) as f32 * 3.0)
                    .collect::<Vec<_>>(),
                [2, 23, 1],
            ),
            &d,
        );
        let x0 = Tensor::<A, 3>::random([2, 23, 75], Distribution::Normal(0.0, 1.0), &d) * scale;
        let w = Tensor::<A, 3>::random([2, 23, 75], Distribution::Normal(0.0, 1.0), &d);
        let g0 = Tensor::<A, 1>::random([75], Distribution::Normal(1.0, 0.3), &d);
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            let g = g0.clone().detach().require_grad();
            let y = if fused {
                rms_norm_fused(x.clone(), g.clone(), 1e-5).expect("autodiff flex has the kernel")
            } else {
                // burn::nn::RmsNorm::forward's ops.
                let rms = (x.clone().square().mean_dim(2) + 1e-5).sqrt();
                (x.clone() / rms) * g.clone().unsqueeze()
            };
            let grads = (y.clone() * w.clone()).sum().backward();
            let host = |t: Tensor<Flex, 3>| t.into_data().into_vec::<f32>().unwrap();
            (
                y.into_data().into_vec::<f32>().unwrap(),
                host(x.grad(&grads).expect("x grad")),
                g.grad(&grads)
                    .expect("gamma grad")
                    .into_data()
                    .into_vec::<f32>()
                    .unwrap(),
            )
        };
        let (fy, fx, fg) = run(true);
        let (oy, ox, og) = run(false);
        let rel = |a: &[f32], b: &[f32]| {
            let m = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / m.max(1e-30))
                .fold(0.0f32, f32::max)
        };
        assert!(rel(&fy, &oy) < 2e-6, "forward {}", rel(&fy, &oy));
        assert!(rel(&fx, &ox) < 2e-5, "x gradient {}", rel(&fx, &ox));
        assert!(rel(&fg, &og) < 2e-5, "gamma gradient {}", rel(&fg, &og));
    }

    /// Plain Flex and `Autodiff<Flex>` give the same bits, a row's bits do not depend on the
    /// batch, and `dγ` is the same bits at any number of threads.
    #[test]
    fn bits_do_not_depend_on_backend_batch_or_threads() {
        let (rows, e) = (150, 77);
        let x: Vec<f32> = (0..rows * e)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let gamma: Vec<f32> = (0..e).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
        let (y, rstd) = forward(&x, &gamma, 1e-6);
        let d = Default::default();
        let ad = rms_norm_fused(
            Tensor::<A, 2>::from_data(burn::tensor::TensorData::new(x.clone(), [rows, e]), &d),
            Tensor::<A, 1>::from_data(burn::tensor::TensorData::new(gamma.clone(), [e]), &d),
            1e-6,
        )
        .expect("autodiff flex")
        .into_data()
        .into_vec::<f32>()
        .unwrap();
        assert_eq!(y, ad);
        let dy: Vec<f32> = (0..rows * e).map(|i| (i % 13) as f32 - 6.0).collect();
        let (dx, dg) = backward(&x, &rstd, &gamma, &dy, true);
        for r in [0, 77, 149] {
            let row = r * e..(r + 1) * e;
            let (y1, s1) = forward(&x[row.clone()], &gamma, 1e-6);
            assert_eq!((&y1[..], s1[0]), (&y[row.clone()], rstd[r]), "row {r}");
            let (dx1, _) = backward(&x[row.clone()], &s1, &gamma, &dy[row.clone()], false);
            assert_eq!(&dx1[..], &dx[row], "row {r} backward");
        }
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (_, dg1) = one.install(|| backward(&x, &rstd, &gamma, &dy, true));
        assert_eq!(dg, dg1);
    }
}
