//! Products of f32 activations with frozen weights kept block-quantised (GGUF's Q4_0, Q4_K,
//! Q6_K, Q8_0, …: `model.base_dtype = "gguf"`, `--weights gguf`): `y = x · Wᵀ` for `x` f32
//! `[n, k]` and `W` `[m, k]` held by a [`Rows`], which dequantises rows on demand.
//!
//! The weight is never held dequantised whole: rows are dequantised a tile at a time into a
//! buffer and multiplied from there. Few rows (decoding): each task dequantises
//! [`ROWS_PER_TASK`] weight rows into an L1/L2-sized buffer and takes each output as the
//! fixed-lane dot product of `x`'s row with one weight row. Many rows (training, prefill): a
//! tile of [`TILE_ROWS`] weight rows is dequantised (on all threads) and multiplied by
//! burn-flex's own f32 GEMM. Under `Autodiff<Flex>` the backward gives `x`'s gradient
//! `dy · W` by tiles of the same rows; the weight is frozen (it has no gradient).
//!
//! **Numerics.** The rows are the values the [`Rows`] gives (bapo's GGUF dequantisation, bit
//! for bit gguf-py's), so a product is the f32 product of the dequantised weight up to the
//! order of its sums; a row's bits do not depend on the other rows of `x` (tested).

use std::fmt::Debug;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

use crate::flex::{cast, same, tensor, with_f32};
use crate::mixed::scatter;
use crate::mixed_rows::gather_columns;
use crate::simd::{dispatch, fold, LANES};

/// A frozen weight `[m, k]` that gives its rows as f32 on demand.
pub trait Rows: Send + Sync + Debug {
    /// `[m, k]`: the number of rows (the product's outputs) and their length (its inputs).
    fn shape(&self) -> [usize; 2];
    /// Rows `j0 .. j1` into `out` (`(j1 − j0) · k` values).
    fn rows(&self, j0: usize, j1: usize, out: &mut [f32]);
    /// Row `j` as stored: its ggml type id and its GGUF blocks (llama.cpp's layouts), for the
    /// few-row product's dot products straight from the blocks (`None`: rows are dequantised).
    fn raw_row(&self, _j: usize) -> Option<(u32, &[u8])> {
        None
    }
}

/// A shared [`Rows`] (models and backward passes hold it without copying).
pub type Weight = Arc<dyn Rows>;

/// Rows up to which a product counts as "few rows" (decoding).
const FEW_ROWS: usize = 16;

/// Weight rows a task of the few-row product computes, one row dequantised at a time into a
/// buffer that stays in L1 (a 2,048-long row: 8 KB).
const ROWS_PER_TASK: usize = 32;

/// Independent accumulators of [`LANES`] lanes in [`dot`]: four add chains in flight.
const CHAINS: usize = 4;

/// Rows up to which the few-row product takes its dot products straight from the blocks
/// (`crate::quant_dot`); more rows share one dequantised copy of each weight row.
const FROM_BLOCKS: usize = 4;

/// Weight rows per tile of the many-row product: GEMM's packing of `x` per call is then a
/// small part of a tile's work, and the tile (`k · 512` f32) small next to the activations.
const TILE_ROWS: usize = 512;

/// Weight rows one thread dequantises at a time when a tile is filled.
const FILL_ROWS: usize = 16;

/// `x · Wᵀ` through the kernel when `quant` is [`crate::enabled`], `B` is `Flex` or
/// `Autodiff<Flex>`, `x` is f32 and its width is `W`'s row length; `x` back otherwise.
///
/// # Shapes
/// `x`: `[n, k]`, `w`: `[m, k]` → `[n, m]`.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: &Weight) -> Result<Tensor<B, 2>, Tensor<B, 2>> {
    if !crate::enabled("quant") || x.dtype() != DType::F32 || x.dims()[1] != w.shape()[1] {
        return Err(x);
    }
    let x = match cast::<_, Tensor<Autodiff<Flex>, 2>>(x) {
        Ok(x) => return Ok(same(autodiff(x, w.clone()))),
        Err(x) => x,
    };
    match cast::<_, Tensor<Flex, 2>>(x) {
        Ok(x) => {
            let y = product(&x.into_primitive().tensor(), &**w);
            Ok(same(Tensor::<Flex, 2>::from_primitive(
                TensorPrimitive::Float(y),
            )))
        }
        Err(x) => Err(x),
    }
}

/// `x · Wᵀ` for `x` f32 `[n, k]` (any layout), in f32 `[n, m]`.
///
/// # Panics
/// When `x` is not 2-D f32 with `k` columns (a caller's bug: [`matmul`] checks).
pub fn product(x: &FlexTensor, w: &dyn Rows) -> FlexTensor {
    let xs = x.layout().shape();
    let [m, k] = w.shape();
    assert!(
        xs.num_dims() == 2 && xs[1] == k && x.dtype() == DType::F32,
        "quantised product: x {xs:?} {:?}, weight [{m}, {k}]",
        x.dtype()
    );
    let n = xs[0];
    if n <= FEW_ROWS {
        let y = with_f32(x, |x| few_rows(x, n, w));
        return tensor(y, vec![n, m]);
    }
    let mut y = vec![0.0f32; n * m];
    for j0 in (0..m).step_by(TILE_ROWS) {
        let j1 = (j0 + TILE_ROWS).min(m);
        // [len, k] row-major, seen as the `[k, len]` right-hand side.
        let t = tile(w, j0, j1).transpose(0, 1);
        scatter(&mut y, m, j0, &burn_flex::ops::matmul::matmul(x.clone(), t));
    }
    tensor(y, vec![n, m])
}

/// Rows `j0 .. j1` of `w` dequantised (on rayon's threads) as a contiguous f32 `[j1 − j0, k]`.
fn tile(w: &dyn Rows, j0: usize, j1: usize) -> FlexTensor {
    let k = w.shape()[1];
    let mut buf = vec![0.0f32; (j1 - j0) * k];
    buf.par_chunks_mut(FILL_ROWS * k)
        .enumerate()
        .for_each(|(t, chunk)| {
            let a = j0 + t * FILL_ROWS;
            w.rows(a, a + chunk.len() / k, chunk);
        });
    tensor(buf, vec![j1 - j0, k])
}

/// `Σ a_i b_i` in [`CHAINS`] × [`LANES`] fixed lanes (lane `l` takes elements `l, l + 64, …`),
/// the chains added in order and the lanes by [`fold`]: one order on every instruction set.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const W: usize = CHAINS * LANES;
    let mut acc = [[0.0f32; LANES]; CHAINS];
    let mut ca = a.chunks_exact(W);
    let mut cb = b.chunks_exact(W);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for c in 0..CHAINS {
            for l in 0..LANES {
                acc[c][l] += x[c * LANES + l] * y[c * LANES + l];
            }
        }
    }
    for (i, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[i / LANES][i % LANES] += x * y;
    }
    let mut total = acc[0];
    for chain in &acc[1..] {
        for l in 0..LANES {
            total[l] += chain[l];
        }
    }
    fold(total)
}

dispatch!(dot_fast, dot, (a: &[f32], b: &[f32]) -> f32);

/// The few-row product: tasks of [`ROWS_PER_TASK`] weight rows; up to [`FROM_BLOCKS`] rows
/// of `x`, each output is a dot product straight from the row's blocks where
/// `crate::quant_dot` knows its type; otherwise each weight row is dequantised once into an L1
/// buffer and each output is one fixed-order [`dot`]. (A row of `x`'s bits do not depend on
/// the threads; they depend on `n` only through which of the two ways it took.)
fn few_rows(x: &[f32], n: usize, w: &dyn Rows) -> Vec<f32> {
    let [m, k] = w.shape();
    let tasks: Vec<Vec<f32>> = (0..m.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let (j0, j1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(m));
            let mut row = Vec::new(); // allocated when a row is dequantised
            let mut out = vec![0.0f32; (j1 - j0) * n];
            for j in j0..j1 {
                let o = &mut out[(j - j0) * n..(j - j0 + 1) * n];
                match w.raw_row(j) {
                    Some((ty, raw)) if n <= FROM_BLOCKS && crate::quant_dot::supports(ty) => {
                        for (r, o) in o.iter_mut().enumerate() {
                            *o = crate::quant_dot::row_dot(ty, raw, &x[r * k..(r + 1) * k]);
                        }
                    }
                    _ => {
                        row.resize(k, 0.0);
                        w.rows(j, j + 1, &mut row);
                        for (r, o) in o.iter_mut().enumerate() {
                            *o = dot_fast(&x[r * k..(r + 1) * k], &row);
                        }
                    }
                }
            }
            out
        })
        .collect();
    gather_columns(&tasks, ROWS_PER_TASK, n, m)
}

/// `dy · W` for `dy` f32 `[n, m]`: `x`'s gradient, by tiles of [`TILE_ROWS`] weight rows (each
/// tile's product added in tile order).
fn backward_product(dy: &FlexTensor, w: &dyn Rows) -> FlexTensor {
    let [m, k] = w.shape();
    let n = dy.layout().shape()[0];
    let dy = dy.to_contiguous();
    let mut dx = vec![0.0f32; n * k];
    for j0 in (0..m).step_by(TILE_ROWS) {
        let j1 = (j0 + TILE_ROWS).min(m);
        let cols = dy
            .clone()
            .with_layout(Layout::contiguous(vec![n, m].into()).narrow(1, j0, j1 - j0));
        let part = burn_flex::ops::matmul::matmul(cols, tile(w, j0, j1));
        let src = part
            .as_slice::<f32>()
            .expect("a fresh product is contiguous");
        dx.par_chunks_mut(k * 64)
            .zip(src.par_chunks(k * 64))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
    }
    tensor(dx, vec![n, k])
}

#[derive(Debug)]
struct QuantBackward;

impl Backward<Flex, 1> for QuantBackward {
    /// The weight (shared, not copied).
    type State = Weight;

    fn backward(self, ops: Ops<Weight, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |dy| {
            backward_product(&dy, &*w)
        });
    }
}

fn autodiff(x: Tensor<Autodiff<Flex>, 2>, w: Weight) -> Tensor<Autodiff<Flex>, 2> {
    let x = x.into_primitive().tensor();
    let y = product(&x.primitive, &*w);
    let tracked = match QuantBackward
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
    use burn::tensor::{Distribution, TensorData};

    type A = Autodiff<Flex>;

    /// Rows kept as f32 values, rounded to a coarse grid (as dequantised blocks are).
    #[derive(Debug)]
    struct Plain {
        m: usize,
        k: usize,
        data: Vec<f32>,
    }

    impl Rows for Plain {
        fn shape(&self) -> [usize; 2] {
            [self.m, self.k]
        }
        fn rows(&self, j0: usize, j1: usize, out: &mut [f32]) {
            out.copy_from_slice(&self.data[j0 * self.k..j1 * self.k]);
        }
    }

    fn weight(m: usize, k: usize, seed: u64) -> Arc<Plain> {
        let mut s = seed;
        let data = (0..m * k)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) % 15) as f32 / 8.0 - 0.875
            })
            .collect();
        Arc::new(Plain { m, k, data })
    }

    fn vals<Bk: Backend>(t: Tensor<Bk, 2>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
    }

    /// Both kernels against an f64 product, with a short last tile/task; a row alone has the
    /// bits it has in the batch (few rows, and GEMM's rows among many).
    #[test]
    fn matches_an_f64_product_and_rows_do_not_depend_on_the_batch() {
        let d = Default::default();
        <Flex as Backend>::seed(&d, 5);
        for (n, k, m) in [(3, 96, 1000), (40, 64, 1100), (1, 512, 70)] {
            let p = weight(m, k, 7);
            let w: Weight = p.clone();
            let x = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &d);
            let xv = vals(x.clone());
            let y = vals(matmul(x.clone(), &w).expect("flex kernel"));
            for i in 0..n {
                for j in 0..m {
                    let want: f64 = (0..k)
                        .map(|c| xv[i * k + c] as f64 * p.data[j * k + c] as f64)
                        .sum();
                    let got = y[i * m + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{n}x{k}x{m} ({i},{j}): {got} vs {want}"
                    );
                }
            }
            let (a, len) = if n > FEW_ROWS { (3, 17) } else { (n - 1, 1) };
            let part = vals(matmul(x.narrow(0, a, len), &w).expect("flex"));
            assert!(
                part == y[a * m..(a + len) * m],
                "{n}x{k}x{m}: rows {a}.. alone differ"
            );
        }
    }

    /// Under autodiff: the plain forward's bits, and `x`'s gradient `dy · W` within rounding.
    #[test]
    fn gradient_is_dy_times_the_weight() {
        let d = Default::default();
        <Flex as Backend>::seed(&d, 6);
        let (n, k, m) = (37, 80, 1300);
        let p = weight(m, k, 9);
        let w: Weight = p.clone();
        let x0 = Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &d);
        let dy = Tensor::<Flex, 2>::random([n, m], Distribution::Normal(0.0, 1.0), &d);
        let x = Tensor::<A, 2>::from_data(x0.clone().into_data(), &d).require_grad();
        let y = matmul(x.clone(), &w).expect("autodiff flex");
        assert_eq!(vals(y.clone().inner()), vals(matmul(x0, &w).expect("flex")));
        let dy_a = Tensor::<A, 2>::from_data(dy.clone().into_data(), &d);
        let grads = (y * dy_a).sum().backward();
        let got = vals(x.grad(&grads).expect("x grad"));
        let wt = Tensor::<Flex, 2>::from_data(TensorData::new(p.data.clone(), [m, k]), &d);
        let want = vals(dy.matmul(wt));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn what_it_does_not_take_comes_back() {
        let d = Default::default();
        let w: Weight = weight(4, 3, 1);
        assert!(matmul(Tensor::<Flex, 2>::zeros([2, 5], &d), &w).is_err());
        let nd = Tensor::<burn::backend::NdArray, 2>::zeros([2, 3], &Default::default());
        assert!(matmul(nd, &w).is_err());
    }
}
