//! Products of f32 activations with frozen half-precision weights (`model.base_dtype = "bf16"`
//! or `"f16"`, `--weights bf16|f16`): `x · w` for `x` f32 `[n, k]` and `w` bf16/f16 `[k, m]`,
//! returned in f32.
//!
//! The weight is widened to f32 a block of columns at a time, each block multiplied by
//! burn-flex's own f32 GEMM and written into its columns of the result: the activations are
//! never rounded to the weight's type, nothing the size of the whole weight is allocated, and a
//! product reads the weight's 2-byte elements once. burn-flex 0.21's bf16 product instead rounds
//! `x` to bf16, copies a strided weight contiguous, widens both operands into new f32 buffers on
//! the calling thread and rounds the result back to bf16 (measured: 15.5 % of a bf16 training
//! run in its copies, 7 % in its widening loops, docs/performance.md).
//!
//! **Numerics.** Each result element is GEMM's dot product of `x`'s row with the weight's
//! column, widened exactly (every bf16/f16 value is an f32), so a product equals the f32
//! product with the same (rounded) weights up to GEMM's blocking of the reduction, and a row's
//! bits do not depend on the other rows (tested). Under `Autodiff<Flex>` the backward gives
//! `x`'s gradient `dy · wᵀ` by the same kernel on the transposed view; the weight must be frozen
//! (a weight that requires a gradient gets its inputs back).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::{FlexTensor, Layout};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::flex::{cast, same, tensor, with_f32};
use crate::mixed_rows::{Half, HalfWeight};

/// `x · w` through the kernel when `mixed` is [`crate::enabled`] and [`matmul_fused`] applies;
/// the inputs back otherwise.
///
/// # Shapes
/// `x`: `[n, k]`, `w`: `[k, m]` → `[n, m]`.
#[allow(clippy::type_complexity)]
pub fn matmul<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if !crate::enabled("mixed") {
        return Err((x, w));
    }
    matmul_fused(x, w)
}

/// [`matmul`] whatever `BAPO_FUSED` says: the kernel when `B` is `Flex` or `Autodiff<Flex>`, `x`
/// is f32, `w` bf16 or f16 and frozen, and the inner sizes agree; the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn matmul_fused<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if !fits(&x, &w) {
        return Err((x, w));
    }
    let x = match cast::<_, Tensor<Autodiff<Flex>, 2>>(x) {
        Ok(x) => {
            let w: Tensor<Autodiff<Flex>, 2> = same(w);
            // Any graph behind the weight (not only a leaf that requires a gradient) would need
            // the weight's gradient, which this op does not give.
            if !w
                .clone()
                .into_primitive()
                .tensor()
                .node
                .requirement
                .is_none()
            {
                return Err((same(x), same(w)));
            }
            return Ok(same(autodiff(x, w)));
        }
        Err(x) => x,
    };
    match cast::<_, Tensor<Flex, 2>>(x) {
        Ok(x) => {
            let w: Tensor<Flex, 2> = same(w);
            let y = product(&x.into_primitive().tensor(), &w.into_primitive().tensor());
            Ok(same(Tensor::<Flex, 2>::from_primitive(
                TensorPrimitive::Float(y),
            )))
        }
        Err(x) => Err((x, w)),
    }
}

/// `x · w` for a product of a few rows (decoding; plain `Flex` only), each row computed alone
/// by [`crate::mixed_rows`] (the weight read once in long runs, no GEMM call per block); the
/// inputs back where [`matmul_fused`]'s conditions fail, `mixed` is off or `B` is not `Flex`.
#[allow(clippy::type_complexity)]
pub fn matmul_rows<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if !crate::enabled("mixed") || !fits(&x, &w) {
        return Err((x, w));
    }
    match cast::<_, Tensor<Flex, 2>>(x) {
        Ok(x) => {
            let w: Tensor<Flex, 2> = same(w);
            let [n, _] = x.dims();
            let m = w.dims()[1];
            let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
            let w = runs(&w);
            let y = with_f32(&x, |x| crate::mixed_rows::product(x, n, &weight(&w)));
            Ok(same(Tensor::<Flex, 2>::from_primitive(
                TensorPrimitive::Float(tensor(y, vec![n, m])),
            )))
        }
        Err(x) => Err((x, w)),
    }
}

/// `w` itself when one of its axes has unit stride and none is negative, else a contiguous copy.
fn runs(w: &FlexTensor) -> FlexTensor {
    match w.layout().as_2d_strides() {
        Some((_, _, rs, cs)) if rs >= 0 && cs >= 0 && (rs == 1 || cs == 1) => w.clone(),
        _ => w.to_contiguous(),
    }
}

/// A [`runs`] weight's storage and layout.
fn weight(w: &FlexTensor) -> HalfWeight<'_> {
    let (k, m, rs, cs) = w.layout().as_2d_strides().expect("2-D");
    let by_rows = cs == 1;
    HalfWeight {
        data: match w.dtype() {
            DType::BF16 => Half::Bf16(w.storage::<bf16>()),
            DType::F16 => Half::F16(w.storage::<f16>()),
            other => panic!("mixed product: weight type {other:?}"),
        },
        offset: w.layout().start_offset(),
        k,
        m,
        stride: if by_rows { rs as usize } else { cs as usize },
        by_rows,
    }
}

/// f32 activations, a bf16/f16 weight, inner sizes that agree (the kernels' shared condition;
/// a weight in a graph is refused where the autodiff backend is recognised).
fn fits<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> bool {
    x.dtype() == DType::F32
        && matches!(w.dtype(), DType::BF16 | DType::F16)
        && x.dims()[1] == w.dims()[0]
}

/// Widened weight elements per block when the product has few rows (decoding): a block stays in
/// the core's L2 cache between its widening and its product.
const SMALL_BLOCK: usize = 128 * 1024;

/// Columns per block when the product has many rows (training, prefill): wide enough that
/// GEMM's per-call packing of `x` is a small part of the block's work (1/2048 of its
/// multiply-adds), and the widened block (`k · 1024` f32) small next to the activations.
const WIDE_COLS: usize = 1024;

/// Rows up to which a product counts as "few rows".
const FEW_ROWS: usize = 16;

/// `x · w` for `x` f32 `[n, k]` (any layout) and `w` bf16/f16 `[k, m]` (any layout), in f32.
///
/// # Panics
/// When the shapes do not fit or the types are not f32 and bf16/f16 (a caller's bug:
/// [`matmul_fused`] checks both).
pub fn product(x: &FlexTensor, w: &FlexTensor) -> FlexTensor {
    let xs = x.layout().shape();
    let ws = w.layout().shape();
    assert!(
        xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0],
        "mixed product: shapes {xs:?} and {ws:?}"
    );
    assert_eq!(x.dtype(), DType::F32, "mixed product: activations");
    let (n, k, m) = (xs[0], xs[1], ws[1]);
    let w = runs(w);
    let cols = if n <= FEW_ROWS {
        (SMALL_BLOCK / k.max(1)).max(16) / 16 * 16
    } else {
        WIDE_COLS
    }
    .min(m)
    .max(1);
    let starts: Vec<usize> = (0..m).step_by(cols).collect();
    if starts.len() == 1 {
        return block_product(x, &w, 0, m);
    }
    let mut y = vec![0.0f32; n * m];
    if n <= FEW_ROWS {
        // Few rows: the blocks run side by side, each product on one thread.
        let blocks: Vec<FlexTensor> = starts
            .par_iter()
            .map(|&c0| block_product(x, &w, c0, cols.min(m - c0)))
            .collect();
        for (&c0, b) in starts.iter().zip(&blocks) {
            scatter(&mut y, m, c0, b);
        }
    } else {
        // Many rows: one block at a time, GEMM's own threads inside it.
        for &c0 in &starts {
            let b = block_product(x, &w, c0, cols.min(m - c0));
            scatter(&mut y, m, c0, &b);
        }
    }
    tensor(y, vec![n, m])
}

/// Columns `c0 .. c0 + len` of `x · w`, contiguous `[n, len]`.
fn block_product(x: &FlexTensor, w: &FlexTensor, c0: usize, len: usize) -> FlexTensor {
    burn_flex::ops::matmul::matmul(x.clone(), widen(w, c0, len))
}

/// Columns `c0 .. c0 + len` of `w` `[k, m]` (unit stride along one axis) as an f32 `[k, len]`
/// tensor: contiguous when `w`'s rows are runs, a transposed view of a contiguous `[len, k]`
/// when its columns are.
fn widen(w: &FlexTensor, c0: usize, len: usize) -> FlexTensor {
    let hw = weight(w);
    let k = hw.k;
    let mut buf = vec![0.0f32; k * len];
    let (run, first) = if hw.by_rows {
        (len, hw.offset + c0) // row i: elements first + i·stride ..
    } else {
        (k, hw.offset + c0 * hw.stride) // column j: elements first + j·stride ..
    };
    // Runs of at least 16 K elements a task: widening is memory-bound, the split changes no bit.
    let per_task = (16 * 1024 / run).max(1) * run;
    buf.par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(t, chunk)| {
            let first_run = t * (per_task / run);
            for (r, dst) in chunk.chunks_mut(run).enumerate() {
                hw.data.widen(first + (first_run + r) * hw.stride, dst);
            }
        });
    if hw.by_rows {
        tensor(buf, vec![k, len])
    } else {
        tensor(buf, vec![len, k])
            .with_layout(Layout::contiguous(vec![len, k].into()).transpose(0, 1))
    }
}

/// Writes block `b` `[n, len]` into columns `c0 ..` of the row-major `[n, m]` result.
pub(crate) fn scatter(y: &mut [f32], m: usize, c0: usize, b: &FlexTensor) {
    let len = b.layout().shape()[1];
    let src = b.as_slice::<f32>().expect("a fresh product is contiguous");
    y.par_chunks_mut(m)
        .zip(src.par_chunks(len))
        .for_each(|(row, s)| row[c0..c0 + len].copy_from_slice(s));
}

#[derive(Debug)]
struct MixedBackward;

impl Backward<Flex, 1> for MixedBackward {
    /// The weight (shared, not copied).
    type State = FlexTensor;

    fn backward(self, ops: Ops<FlexTensor, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            product(&dy, &w.transpose(0, 1))
        });
    }
}

fn autodiff(
    x: Tensor<Autodiff<Flex>, 2>,
    w: Tensor<Autodiff<Flex>, 2>,
) -> Tensor<Autodiff<Flex>, 2> {
    let x = x.into_primitive().tensor();
    let w = w.into_primitive().tensor().primitive;
    let y = product(&x.primitive, &w);
    let tracked = match MixedBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(w, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(tracked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, FloatDType, TensorData};

    type A = Autodiff<Flex>;

    fn vals<Bk: Backend>(t: Tensor<Bk, 2>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    /// The product against an f64 product of the same (widened) weights, for both half types,
    /// both weight layouts (as stored and transposed), few rows and many, with several blocks
    /// and a short last one, by both kernels; the few-row kernel's last row alone has its bits in
    /// the batch, and GEMM's 17 rows alone have the bits they have among 40.
    #[test]
    fn matches_an_f64_product_and_rows_do_not_depend_on_the_batch() {
        let d = Default::default();
        <Flex as Backend>::seed(&d, 3);
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            for (n, k, m) in [(3, 300, 1000), (40, 96, 2100), (1, 2048, 70)] {
                let x = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &d);
                let w32 = Tensor::<Flex, 2>::random([k, m], Distribution::Normal(0.0, 1.0), &d);
                let stored = w32.clone().cast(dtype);
                let transposed = Tensor::<Flex, 2>::from_data(w32.transpose().into_data(), &d)
                    .cast(dtype)
                    .transpose();
                let xv = vals(x.clone());
                for w in [stored, transposed] {
                    let wv = vals(w.clone());
                    let y = vals(matmul_fused(x.clone(), w.clone()).expect("flex kernel"));
                    let few = vals(matmul_rows(x.clone(), w.clone()).expect("flex kernel"));
                    for i in 0..n {
                        for j in 0..m {
                            let want: f64 = (0..k)
                                .map(|c| xv[i * k + c] as f64 * wv[c * m + j] as f64)
                                .sum();
                            for (path, got) in [("gemm", y[i * m + j]), ("rows", few[i * m + j])] {
                                let got = got as f64;
                                assert!(
                                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "{path} {dtype:?} {n}x{k}x{m} ({i},{j}): {got} vs {want}"
                                );
                            }
                        }
                    }
                    // The few-row kernel computes each row alone: the last row by itself has
                    // the bits it has in the batch.
                    let last = x.clone().narrow(0, n - 1, 1);
                    let alone = vals(matmul_rows(last, w.clone()).expect("flex"));
                    let same_bits = alone == few[(n - 1) * m..];
                    assert!(
                        same_bits,
                        "rows {dtype:?} {n}x{k}x{m}: the last row alone differs"
                    );
                    if n > FEW_ROWS {
                        // GEMM keeps a row's bits whatever the other rows, for products of
                        // more than a few rows (as the f32 path: training rows are sequences).
                        let part = vals(matmul_fused(x.clone().narrow(0, 3, 17), w).expect("flex"));
                        let same_bits = part == y[3 * m..20 * m];
                        assert!(same_bits, "{dtype:?} {n}x{k}x{m}: rows 3..20 alone differ");
                    }
                }
            }
        }
    }

    /// Under autodiff: the same forward bits as plain Flex, and `x`'s gradient equal to the op
    /// `dy · wᵀ` computed in f32 on the widened weight, within float rounding.
    #[test]
    fn gradient_is_dy_times_the_transposed_weight() {
        let d = Default::default();
        <Flex as Backend>::seed(&d, 4);
        let (n, k, m) = (37, 200, 1500);
        let x0 = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &d);
        let w0 = Tensor::<Flex, 2>::random([k, m], Distribution::Normal(0.0, 1.0), &d)
            .cast(FloatDType::BF16);
        let dy = Tensor::<Flex, 2>::random([n, m], Distribution::Normal(0.0, 1.0), &d);
        let x = Tensor::<A, 2>::from_data(x0.clone().into_data(), &d).require_grad();
        let w = Tensor::<A, 2>::from_data(w0.clone().into_data(), &d).cast(FloatDType::BF16);
        let y = matmul_fused(x.clone(), w).expect("autodiff flex");
        let plain = matmul_fused(x0, w0.clone()).expect("flex");
        assert_eq!(vals(y.clone().inner()), vals(plain));
        let dy_a = Tensor::<A, 2>::from_data(dy.clone().into_data(), &d);
        let grads = (y * dy_a).sum().backward();
        let got = vals(x.grad(&grads).expect("x grad"));
        let want = vals(dy.matmul(w0.cast(FloatDType::F32).transpose()));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn what_it_does_not_take_comes_back() {
        let d = Default::default();
        let x = Tensor::<Flex, 2>::zeros([2, 3], &d);
        let f32_weight = Tensor::<Flex, 2>::zeros([3, 4], &d);
        assert!(matmul_fused(x.clone(), f32_weight).is_err());
        let wrong_inner = Tensor::<Flex, 2>::zeros([4, 4], &d).cast(FloatDType::BF16);
        assert!(matmul_fused(x, wrong_inner).is_err());
        let x = Tensor::<A, 2>::zeros([2, 3], &d);
        let trained = Tensor::<A, 2>::from_data(TensorData::new(vec![0.0f32; 12], [3, 4]), &d)
            .cast(FloatDType::BF16)
            .require_grad();
        assert!(matmul_fused(x.clone(), trained.clone()).is_err());
        // A weight computed from one that requires a gradient is in the graph too.
        assert!(matmul_fused(x, trained.mul_scalar(2.0)).is_err());
    }
}
