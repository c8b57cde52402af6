//! Products of a few rows (decoding) computed on every core.
//!
//! Batch-1 decoding multiplies one row by every weight matrix once per token, so it is bound
//! by how fast the weights stream from memory. CPU GEMM libraries run such a product (a GEMV)
//! on the calling thread alone, and one core cannot read memory as fast as two (measured on a
//! 2-core VM with `profile bandwidth`: 22 GB/s with one thread, 33 GB/s with two).
//!
//! A projection `x·W` (`W` `[in, out]`, row-major) of at most [`MAX_ROWS`] rows is computed as
//! two halves of its inputs, `x[:, ..h]·W[..h, :] + x[:, h..]·W[h.., :]`: each half reads one
//! contiguous half of the weight, on its own thread. Cutting by output column instead (the
//! first form of this module) gives each thread every other 1–3 KB of each weight row, and the
//! hardware prefetchers then pull most of the other thread's lines too (measured on SmolLM2's
//! 210 projections, 424 MB, batch 1, gemm 0.19, best of 12: 20.0 ms on one thread, 31.4 ms
//! with column halves on two, 16.5 ms with input halves on two; `bapo generate`'s loop, 64
//! tokens: 24–26 tok/s with column halves, 35–42 with input halves).
//!
//! The halves are summed in a fixed order whether one thread or several compute them, so a
//! result never depends on the thread count (tested on SmolLM2's shapes in
//! `tests/tests/smollm2.rs`); it differs from the plain product by float rounding (a sum
//! regrouped). With more than two threads each half is also cut by output column, which keeps
//! every column's dot product in the same order. Weights kept in f16 (`--weights f16`) keep
//! the output-column cut (the plain bits): two f16-rounded partial sums instead of one moved
//! greedy decoding off transformers' on a parity prompt. The tied head `W·h` (`W` `[vocab, e]`) is cut
//! by rows of `W` (contiguous, and every output the same dot product: the plain product's
//! bits).
//!
//! The form is a process-wide setting, off by default: the binary turns it on for CPU
//! backends. On a GPU, one kernel already spans the device and splitting only adds launches.

use std::sync::atomic::{AtomicUsize, Ordering};

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// 0: off; `n >= 1`: on, computed by up to `n` threads.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Products with at most this many rows take the split form; larger ones use the backend's
/// own threads.
pub const MAX_ROWS: usize = 8;

/// Below this many output columns per range a split costs more than it saves (thread hand-off
/// is ≈ 10–20 µs; a 576-column product in cache takes ≈ 40 µs).
const MIN_COLUMNS_PER_PART: usize = 256;

/// Projections with fewer inputs than this are never cut into input halves (none of a Llama's;
/// a shape-only rule, so results still do not depend on the thread count).
const MIN_INPUTS: usize = 128;

/// Turns the split form of products of at most [`MAX_ROWS`] rows on, computed by up to `n`
/// threads (`n >= 1`: the same numbers for every `n`), or off (`n = 0`: plain products).
pub fn set_split_threads(n: usize) {
    THREADS.store(n, Ordering::Relaxed);
}

/// The current setting of [`set_split_threads`] (0: off).
pub fn split_threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// Whether a `rows`-row product takes the split form. Never on an autodiff backend: a graph's
/// nodes stay on the thread that records them.
pub fn applies<B: Backend>(rows: usize, device: &B::Device) -> bool {
    split_threads() > 0 && rows <= MAX_ROWS && !B::ad_enabled(device)
}

/// How many ranges `columns` output columns of a `rows`-row product are cut into (1: none);
/// `threads` is how many threads share the product.
fn column_parts(columns: usize, threads: usize) -> usize {
    threads.min(columns / MIN_COLUMNS_PER_PART).max(1)
}

/// How many row ranges the tied head's product with `rows` rows of activations is cut into
/// (1: none).
pub fn parts<B: Backend>(rows: usize, columns: usize, device: &B::Device) -> usize {
    if !applies::<B>(rows, device) {
        return 1;
    }
    column_parts(columns, split_threads())
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

/// `linear.forward(x)` for `x` `[n, in]`; in the split form (module docs) when `n` is small.
pub fn linear<B: Backend>(linear: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let w = linear.weight.val();
    let [rows, _] = x.dims();
    let [inputs, outputs] = w.dims();
    if !applies::<B>(rows, &x.device()) || inputs < MIN_INPUTS {
        return crate::precision::linear_as_weight(linear, x);
    }
    let threads = split_threads();
    if w.dtype() != x.dtype() {
        // The few-row mixed-precision kernel splits the product itself.
        let (x, w) = match crate::precision::mixed_rows(x, w) {
            Ok(y) => return crate::precision::add_bias(linear, y),
            Err(xw) => xw,
        };
        // Weights kept in a smaller type (f16): input halves would round two partial sums to
        // it instead of one total (measured: greedy decoding then leaves transformers' at token
        // 22 of a parity prompt), so these products are cut by output column, each column the
        // plain product's dot product: the plain bits.
        let n = column_parts(outputs, threads);
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
        return crate::precision::add_bias(linear, y);
    }
    // Each half gets half the threads; its columns are cut among them.
    let per_half = column_parts(outputs, threads.div_ceil(2));
    let half = |x: &Tensor<B, 2>, lo: usize, hi: usize| {
        let (x, w) = (
            x.clone().slice([0..rows, lo..hi]),
            w.clone().slice([lo..hi, 0..outputs]),
        );
        let pieces = map_ranges(outputs, per_half, &|a, b| {
            x.clone().matmul(w.clone().slice([0..hi - lo, a..b]))
        });
        if pieces.len() == 1 {
            pieces.into_iter().next().expect("one piece")
        } else {
            Tensor::cat(pieces, 1)
        }
    };
    let h = inputs / 2;
    let (a, b) = if threads > 1 {
        rayon::join(|| half(&x, 0, h), || half(&x, h, inputs))
    } else {
        (half(&x, 0, h), half(&x, h, inputs))
    };
    crate::precision::add_bias(linear, a + b)
}

/// `w·h` for `w` `[v, e]` and `h` `[e, n]` (the tied head's form), split by rows of `w` when
/// `n` is small.
pub fn matmul_rows<B: Backend>(w: Tensor<B, 2>, h: Tensor<B, 2>) -> Tensor<B, 2> {
    let (w, h) = if w.dtype() != h.dtype() && applies::<B>(h.dims()[1], &h.device()) {
        // The few-row mixed-precision kernel splits the product itself.
        match crate::precision::mixed_rows(h.transpose(), w.transpose()) {
            Ok(y) => return y.transpose(),
            Err((ht, wt)) => (wt.transpose(), ht.transpose()),
        }
    } else {
        (w, h)
    };
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
