//! Products of a few rows split by output column over threads, so that decoding uses every core.
//!
//! Batch-1 decoding multiplies one row by every weight matrix once per token. CPU GEMM
//! libraries run such a product (a GEMV) on the calling thread alone (measured with `perf` on
//! flex: 78 % of a batch-1 generation's samples in gemm's vectorised loop, all on the calling
//! thread, the rayon pool idle), so decoding is bound by what one core can read from memory.
//! Cutting the output columns into `n` contiguous ranges and computing each range on the rayon
//! pool reads disjoint parts of the weight at the same time.
//!
//! Each output column is the same dot product, in the same order, whichever range it falls in,
//! so the result is bit-for-bit the unsplit product (tested on SmolLM2's shapes in `tests/tests/smollm2.rs`).
//!
//! The split is a process-wide setting, off (1) by default: the binary turns it on for CPU
//! backends. On a GPU, one kernel already spans the device and splitting only adds launches.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

static THREADS: AtomicUsize = AtomicUsize::new(1);

/// Products with at most this many rows are split; larger ones use the backend's own threads.
pub const MAX_ROWS: usize = 8;

/// Below this many output columns per range a split costs more than it saves (thread hand-off
/// is ≈ 10–20 µs; a 576-column product in cache takes ≈ 40 µs).
const MIN_COLUMNS_PER_PART: usize = 256;

/// Sets how many ranges a product of at most [`MAX_ROWS`] rows is split into (1: never split).
pub fn set_split_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

/// The current setting of [`set_split_threads`].
pub fn split_threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// How many ranges `columns` output columns of a `rows`-row product are cut into (1: none).
/// Never on an autodiff backend: a graph's nodes stay on the thread that records them.
pub fn parts<B: Backend>(rows: usize, columns: usize, device: &B::Device) -> usize {
    if rows > MAX_ROWS || B::ad_enabled(device) {
        return 1;
    }
    split_threads().min(columns / MIN_COLUMNS_PER_PART).max(1)
}

/// `f(start, end)` for each of `parts` contiguous ranges of `0..len`, on the rayon pool, in order.
fn map_ranges<T: Send>(len: usize, parts: usize, f: &(dyn Fn(usize, usize) -> T + Sync)) -> Vec<T> {
    fn go<T: Send>(
        lo: usize,
        hi: usize,
        len: usize,
        parts: usize,
        f: &(dyn Fn(usize, usize) -> T + Sync),
    ) -> Vec<T> {
        let at = |p: usize| p * len / parts;
        if hi - lo == 1 {
            return vec![f(at(lo), at(hi))];
        }
        let mid = (lo + hi) / 2;
        let (mut a, b) = rayon::join(|| go(lo, mid, len, parts, f), || go(mid, hi, len, parts, f));
        a.extend(b);
        a
    }
    go(0, parts, len, parts, f)
}

/// `linear.forward(x)` for `x` `[n, in]`, split by output column when `n` is small.
pub fn linear<B: Backend>(linear: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let w = linear.weight.val();
    let [rows, _] = x.dims();
    let [inputs, outputs] = w.dims();
    let n = parts::<B>(rows, outputs, &x.device());
    if n == 1 {
        return crate::precision::linear_as_weight(linear, x);
    }
    // One cast of the input (and of the result) for the whole product, not one per range.
    let y = crate::precision::in_weight_type(x, w.dtype(), |x| {
        let pieces = map_ranges(outputs, n, &|a, b| {
            x.clone().matmul(w.clone().slice([0..inputs, a..b]))
        });
        Tensor::cat(pieces, 1)
    });
    crate::precision::add_bias(linear, y)
}

/// `w·h` for `w` `[v, e]` and `h` `[e, n]` (the tied head's form), split by rows of `w` when
/// `n` is small.
pub fn matmul_rows<B: Backend>(w: Tensor<B, 2>, h: Tensor<B, 2>) -> Tensor<B, 2> {
    let [v, e] = w.dims();
    let n = parts::<B>(h.dims()[1], v, &h.device());
    if n == 1 {
        return crate::precision::matmul_weight_first(w, h);
    }
    crate::precision::in_weight_type(h, w.dtype(), |h| {
        let pieces = map_ranges(v, n, &|a, b| {
            w.clone().slice([a..b, 0..e]).matmul(h.clone())
        });
        Tensor::cat(pieces, 0)
    })
}
