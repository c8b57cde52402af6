//! Dot products of an f32 row with one weight row still in GGUF blocks (Q4_0, Q8_0, Q4_K,
//! Q6_K: the types of llama.cpp's Q4_0, Q8_0 and Q4_K_M files), for [`crate::quant`]'s few-row
//! products: nothing is dequantised into memory. Each block's sum is factored as llama.cpp's
//! kernels do, `Σ x·(a·q − b) = a·Σ x·q − b·Σ x` per scale group, with `x` kept in f32.
//!
//! **Numerics.** The per-group sums run in [`LANES`] fixed lanes, each group's scale applied
//! lane by lane into one of [`CHAINS`] accumulators chosen by the group's position in its
//! block, the accumulators added in order and the lanes folded once at the end: one order on every instruction set, for
//! every batch size. The result is the dot product with the dequantised weights (bapo's GGUF
//! dequantisation) up to the rounding of these regrouped sums (measured in the tests: within
//! 1e-6 relative). Block layouts are llama.cpp's (`ggml-common.h`), as the loader reads them.

use half::f16;

use crate::simd::{dispatch, fold, LANES};

/// The ggml type ids this module multiplies: Q4_0, Q8_0, Q4_K, Q6_K.
pub(crate) fn supports(ty: u32) -> bool {
    matches!(ty, 2 | 8 | 12 | 14)
}

#[inline(always)]
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Independent accumulators (four add chains in flight, not one), each chain fed by groups at
/// fixed positions (constant indices, so the chains stay in registers).
const CHAINS: usize = 4;

type Acc = [[f32; LANES]; CHAINS];

/// `acc[l] += scale · part[l]`.
#[inline(always)]
fn add_scaled(acc: &mut [f32; LANES], scale: f32, part: &[f32; LANES]) {
    for l in 0..LANES {
        acc[l] += scale * part[l];
    }
}

/// Blocks of `$size` bytes and 32 elements, block `i` into chain `i mod 2`, each by `$block`
/// (a macro, so the block's code is inlined: a closure here was not, costing a call a block).
macro_rules! pairs {
    ($raw:expr, $x:expr, $acc:expr, $size:expr, $block:ident) => {{
        let (raw, x, size): (&[u8], &[f32], usize) = ($raw, $x, $size);
        let whole = raw.len() / (2 * size);
        let [a0, a1, _, _] = $acc;
        for p in 0..whole {
            let (b, x) = (&raw[2 * p * size..], &x[64 * p..]);
            $block(&b[..size], &x[..32], a0);
            $block(&b[size..2 * size], &x[32..64], a1);
        }
        if raw.len() / size > 2 * whole {
            $block(&raw[2 * whole * size..], &x[64 * whole..], a0);
        }
    }};
}

/// One Q8_0 block (34 bytes: f16 `d`, 32 `i8`): `d · q`.
#[inline(always)]
fn q8_0_block(b: &[u8], x: &[f32], a: &mut [f32; LANES]) {
    let d = half(b, 0);
    let mut s = [0.0f32; LANES];
    for l in 0..LANES {
        s[l] = x[l] * (b[2 + l] as i8) as f32 + x[16 + l] * (b[18 + l] as i8) as f32;
    }
    add_scaled(a, d, &s);
}

/// One Q4_0 block (18 bytes: f16 `d`, 16 bytes of nibbles, low nibbles elements 0..16):
/// `d · (q − 8)`.
#[inline(always)]
fn q4_0_block(b: &[u8], x: &[f32], a: &mut [f32; LANES]) {
    let d = half(b, 0);
    let mut s = [0.0f32; LANES];
    for l in 0..LANES {
        let q = b[2 + l];
        s[l] = x[l] * ((q & 0x0F) as i8 - 8) as f32 + x[16 + l] * ((q >> 4) as i8 - 8) as f32;
    }
    add_scaled(a, d, &s);
}

/// Q4_K's 6-bit scale and min of sub-block `k` from its 12 scale bytes.
#[inline(always)]
fn scale_min(sc: &[u8], k: usize) -> (u8, u8) {
    if k < 4 {
        (sc[k] & 0x3F, sc[k + 4] & 0x3F)
    } else {
        (
            (sc[k + 4] & 0x0F) | ((sc[k - 4] >> 2) & 0x30),
            (sc[k + 4] >> 4) | ((sc[k] >> 2) & 0x30),
        )
    }
}

/// Q4_K (144 bytes: f16 `d`, f16 `dmin`, 12 scale bytes, 128 bytes of nibbles; sub-block
/// `k = 2c + n` of 32 takes nibble `n` of bytes `32c..32c+32`): `(d·sc)·q − dmin·m`. Low-nibble
/// sub-blocks feed chains 0 (`q`) and 2 (`m`), high-nibble ones chains 1 and 3.
#[inline(always)]
fn q4_k(raw: &[u8], x: &[f32], acc: &mut Acc) {
    let [a0, a1, a2, a3] = acc;
    for (b, x) in raw.chunks_exact(144).zip(x.chunks_exact(256)) {
        let (d, dmin) = (half(b, 0), half(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for c in 0..4 {
            let q = &qs[c * 32..c * 32 + 32];
            let (x0, x1) = (&x[64 * c..64 * c + 32], &x[64 * c + 32..64 * c + 64]);
            let (mut q0, mut q1) = ([0.0f32; LANES], [0.0f32; LANES]);
            let (mut s0, mut s1) = ([0.0f32; LANES], [0.0f32; LANES]);
            for l in 0..LANES {
                let (lo, hi) = (q[l], q[16 + l]);
                q0[l] = x0[l] * (lo & 0x0F) as f32 + x0[16 + l] * (hi & 0x0F) as f32;
                q1[l] = x1[l] * (lo >> 4) as f32 + x1[16 + l] * (hi >> 4) as f32;
                s0[l] = x0[l] + x0[16 + l];
                s1[l] = x1[l] + x1[16 + l];
            }
            let ((sc0, m0), (sc1, m1)) = (scale_min(scales, 2 * c), scale_min(scales, 2 * c + 1));
            add_scaled(a0, d * sc0 as f32, &q0);
            add_scaled(a1, d * sc1 as f32, &q1);
            add_scaled(a2, -(dmin * m0 as f32), &s0);
            add_scaled(a3, -(dmin * m1 as f32), &s1);
        }
    }
}

/// Q6_K's elements `128h + 32s .. + 32` times `x` (those 32 values): two groups of 16, the
/// quants `q − 32` of low nibble `s / 2` of `lo` and bits `2s..2s+2` of `hi`.
#[inline(always)]
fn q6_group(lo: &[u8], hi: &[u8], s: usize, x: &[f32]) -> ([f32; LANES], [f32; LANES]) {
    let (mut g0, mut g1) = ([0.0f32; LANES], [0.0f32; LANES]);
    let q = |j: usize| {
        let low = (lo[j] >> (4 * (s / 2))) & 0x0F;
        let high = (hi[j] >> (2 * s)) & 3;
        (((low | (high << 4)) as i8) - 32) as f32
    };
    for l in 0..LANES {
        g0[l] = x[l] * q(l);
        g1[l] = x[LANES + l] * q(LANES + l);
    }
    (g0, g1)
}

/// Q6_K (210 bytes: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 `i8` scales, f16
/// `d`; element `128h + 32s + j` takes nibble `s / 2` of low byte `64h + 32(s mod 2) + j` and
/// bits `2s..2s+2` of high byte `32h + j`): `(d·sc)·(q − 32)`, one scale per 16 elements.
/// Group `2s + half` of each half-block feeds chain `half + 2·(s mod 2)`.
#[inline(always)]
fn q6_k(raw: &[u8], x: &[f32], acc: &mut Acc) {
    let [a0, a1, a2, a3] = acc;
    for (b, x) in raw.chunks_exact(210).zip(x.chunks_exact(256)) {
        let d = half(b, 208);
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        for h in 0..2 {
            let hi = &qh[h * 32..h * 32 + 32];
            let sc = |g: usize| d * (scales[h * 8 + g] as i8) as f32;
            for s2 in 0..2 {
                let (s, t) = (2 * s2, 2 * s2 + 1);
                let (g0, g1) = q6_group(&ql[h * 64..], hi, s, &x[h * 128 + 32 * s..]);
                let (g2, g3) = q6_group(&ql[h * 64 + 32..], hi, t, &x[h * 128 + 32 * t..]);
                add_scaled(a0, sc(2 * s), &g0);
                add_scaled(a1, sc(2 * s + 1), &g1);
                add_scaled(a2, sc(2 * t), &g2);
                add_scaled(a3, sc(2 * t + 1), &g3);
            }
        }
    }
}

/// `Σ x_i · w_i` for `w` the row in `raw` (ggml type `ty`, one [`supports`] names; `x` as long
/// as the row).
#[inline(always)]
fn dot(ty: u32, raw: &[u8], x: &[f32]) -> f32 {
    let mut acc = [[0.0f32; LANES]; CHAINS];
    match ty {
        2 => pairs!(raw, x, &mut acc, 18, q4_0_block),
        8 => pairs!(raw, x, &mut acc, 34, q8_0_block),
        12 => q4_k(raw, x, &mut acc),
        14 => q6_k(raw, x, &mut acc),
        other => unreachable!("quant_dot: type {other} (checked by `supports`)"),
    }
    let mut total = acc[0];
    for chain in &acc[1..] {
        for l in 0..LANES {
            total[l] += chain[l];
        }
    }
    fold(total)
}

dispatch!(dot_fast, dot, (ty: u32, raw: &[u8], x: &[f32]) -> f32);

/// [`dot`] on the CPU's widest instruction set.
pub(crate) fn row_dot(ty: u32, raw: &[u8], x: &[f32]) -> f32 {
    dot_fast(ty, raw, x)
}
