//! [`crate::mixed`]'s products of a few rows (decoding): `x · w` for `x` f32 `[n, k]`, `n`
//! small, and `w` bf16/f16 `[k, m]`, reading the weight once in long contiguous runs, widened
//! a piece at a time into a buffer that stays in L1, with no GEMM call per block.
//!
//! - `w` stored row-major (a projection, `[in, out]`): the rows `0..k` are cut into
//!   [`K_PARTS`] contiguous ranges; each range adds `x[r, i] · w[i, :]` into its own partial
//!   result, one piece of [`PIECE`] columns at a time (the piece stays in L1 for all of the
//!   range's rows); the partials are added in range order.
//! - `w` stored column-major (the tied head, `embeddingᵀ`): each output is the dot product of
//!   `x`'s row with one contiguous embedding row, in [`crate::simd::LANES`] fixed lanes.
//!
//! Every output element is computed in one fixed order that depends only on `k` and `m`: not on
//! the other rows, not on the thread count.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::simd::{dispatch, fold, LANES};

/// Row ranges of a row-major weight, each a task with its own partial result (a fixed number:
/// the sum's order must not depend on the threads).
const K_PARTS: usize = 8;

/// Columns widened at a time (8 KB of bf16 read as one run, 16 KB of f32 kept in L1).
const PIECE: usize = 4096;

/// Output columns a task of the column-major product computes.
const COLS_PER_TASK: usize = 64;

/// A 2-D half-precision weight `[k, m]` as its storage and layout.
pub(crate) struct HalfWeight<'a> {
    pub data: Half<'a>,
    pub offset: usize,
    pub k: usize,
    pub m: usize,
    /// Elements between rows (`by_rows`: `cs == 1`) or between columns (else: `rs == 1`).
    pub stride: usize,
    pub by_rows: bool,
}

/// The weight's storage, by type.
#[derive(Clone, Copy)]
pub(crate) enum Half<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl Half<'_> {
    /// Elements `from .. from + dst.len()` widened into `dst`.
    pub(crate) fn widen(&self, from: usize, dst: &mut [f32]) {
        match self {
            Half::Bf16(s) => widen_bf16_fast(&s[from..from + dst.len()], dst),
            // half's conversion uses the CPU's F16C instructions where it has them.
            Half::F16(s) => s[from..from + dst.len()].convert_to_f32_slice(dst),
        }
    }
}

/// bf16 is f32's upper half: widening is a shift, exact (a NaN stays a NaN; half's own
/// conversion also sets the quiet bit, a branch the compiler does not vectorise).
#[inline(always)]
fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x * y;
    }
    fold(acc)
}

dispatch!(widen_bf16_fast, widen_bf16, (src: &[bf16], dst: &mut [f32]) -> ());
dispatch!(axpy_fast, axpy, (a: f32, x: &[f32], y: &mut [f32]) -> ());
dispatch!(dot_fast, dot, (a: &[f32], b: &[f32]) -> f32);

/// `x · w` for `x` `[n, k]` row-major; the result `[n, m]` row-major.
pub(crate) fn product(x: &[f32], n: usize, w: &HalfWeight<'_>) -> Vec<f32> {
    assert_eq!(x.len(), n * w.k, "mixed rows: x is [n, k]");
    if w.by_rows {
        by_rows(x, n, w)
    } else {
        by_columns(x, n, w)
    }
}

fn by_rows(x: &[f32], n: usize, w: &HalfWeight<'_>) -> Vec<f32> {
    let (k, m) = (w.k, w.m);
    let parts = K_PARTS.min(k).max(1);
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (lo, hi) = (p * k / parts, (p + 1) * k / parts);
            let mut acc = vec![0.0f32; n * m];
            let mut buf = vec![0.0f32; PIECE.min(m)];
            for j0 in (0..m).step_by(PIECE) {
                let len = PIECE.min(m - j0);
                let buf = &mut buf[..len];
                for i in lo..hi {
                    w.data.widen(w.offset + i * w.stride + j0, buf);
                    for r in 0..n {
                        axpy_fast(x[r * k + i], buf, &mut acc[r * m + j0..r * m + j0 + len]);
                    }
                }
            }
            acc
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut y = parts.next().expect("at least one part");
    for p in parts {
        for (y, p) in y.iter_mut().zip(&p) {
            *y += p;
        }
    }
    y
}

fn by_columns(x: &[f32], n: usize, w: &HalfWeight<'_>) -> Vec<f32> {
    let (k, m) = (w.k, w.m);
    let tasks: Vec<Vec<f32>> = (0..m.div_ceil(COLS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let (j0, j1) = (t * COLS_PER_TASK, ((t + 1) * COLS_PER_TASK).min(m));
            let mut buf = vec![0.0f32; k];
            let mut out = vec![0.0f32; (j1 - j0) * n];
            for j in j0..j1 {
                w.data.widen(w.offset + j * w.stride, &mut buf);
                for r in 0..n {
                    out[(j - j0) * n + r] = dot_fast(&x[r * k..(r + 1) * k], &buf);
                }
            }
            out
        })
        .collect();
    gather_columns(&tasks, COLS_PER_TASK, n, m)
}

/// The row-major `[n, m]` result of tasks that each computed `per_task` output columns (the
/// last maybe fewer), column by column (`n` values each).
pub(crate) fn gather_columns(tasks: &[Vec<f32>], per_task: usize, n: usize, m: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n * m];
    for (t, out) in tasks.iter().enumerate() {
        let j0 = t * per_task;
        for (jj, col) in out.chunks(n).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * m + j0 + jj] = v;
            }
        }
    }
    y
}
