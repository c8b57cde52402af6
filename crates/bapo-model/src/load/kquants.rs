//! GGUF's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K: 256-element super-blocks) and the older
//! Q5_0 / Q5_1 (32-element blocks) dequantised to f32, bit for bit as gguf-py's
//! `gguf.quants.dequantize` (the code transformers loads GGUF files with): the same f16 → f32
//! conversions, the same float32 operations in the same order (`(d · sc) · q − dmin · m`, never
//! fused), the same signed offsets. Q8_K, which gguf-py does not dequantise, follows llama.cpp's
//! `d · q`. Block layouts (little-endian) are llama.cpp's; a block is read only through
//! `chunks_exact`, so every index is in bounds by construction.

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// Bytes per block, elements per block and name of the types this module dequantises.
pub(super) fn layout(ty: u32) -> Option<(usize, usize, &'static str)> {
    Some(match ty {
        6 => (22, 32, "Q5_0"),
        7 => (24, 32, "Q5_1"),
        10 => (84, QK_K, "Q2_K"),
        11 => (110, QK_K, "Q3_K"),
        12 => (144, QK_K, "Q4_K"),
        13 => (176, QK_K, "Q5_K"),
        14 => (210, QK_K, "Q6_K"),
        15 => (292, QK_K, "Q8_K"),
        _ => return None,
    })
}

#[inline(always)]
fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Appends the values of every whole block of type `ty` in `raw` to `out`; `false` (and nothing
/// appended) when [`layout`] does not know `ty`.
#[cfg(test)]
fn dequantise(ty: u32, raw: &[u8], out: &mut Vec<f32>) -> bool {
    let Some((size, elems, _)) = layout(ty) else {
        return false;
    };
    let start = out.len();
    out.resize(start + raw.len() / size * elems, 0.0);
    dequantise_to(ty, raw, &mut out[start..])
}

/// Writes the values of every whole block of type `ty` in `raw` into `out` (exactly that many
/// values); `false` when [`layout`] does not know `ty`. Each block into its own slice by
/// fixed-length loops the compiler vectorises; the arithmetic per element is the documented
/// one.
#[inline(always)]
pub(super) fn dequantise_to(ty: u32, raw: &[u8], out: &mut [f32]) -> bool {
    let Some((size, elems, _)) = layout(ty) else {
        return false;
    };
    let blocks = (raw.len() / size).min(out.len() / elems);
    // One loop per type, each block's code inlined into it (and so into the caller's
    // instruction set, `gguf::dequantise_to`).
    macro_rules! each {
        ($block:ident) => {
            for i in 0..blocks {
                $block(
                    &raw[i * size..(i + 1) * size],
                    &mut out[i * elems..(i + 1) * elems],
                );
            }
        };
    }
    match ty {
        6 => each!(q5_0),
        7 => each!(q5_1),
        10 => each!(q2_k),
        11 => each!(q3_k),
        12 => each!(q4_k),
        13 => each!(q5_k),
        14 => each!(q6_k),
        _ => each!(q8_k),
    }
    true
}

/// The 5-bit quants of a Q5_0/Q5_1 block into `q`: low nibbles are elements 0..16, high
/// nibbles 16..32, bit `i` of the `u32` `qh` is element `i`'s fifth bit.
#[inline(always)]
fn q5_quants(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for i in 0..16 {
        q[i] = (qs[i] & 0x0F) | ((((qh >> i) & 1) as u8) << 4);
        q[i + 16] = (qs[i] >> 4) | ((((qh >> (i + 16)) & 1) as u8) << 4);
    }
    q
}

/// Q5_0 (22 bytes): f16 `d`, `u32` high bits, 16 bytes of nibbles; `d · (q − 16)`.
#[inline(always)]
fn q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16(b, 0);
    for (o, q) in out.iter_mut().zip(q5_quants(&b[2..6], &b[6..22])) {
        *o = d * ((q as i8) - 16) as f32;
    }
}

/// Q5_1 (24 bytes): f16 `d`, f16 `m`, `u32` high bits, 16 bytes of nibbles; `d · q + m`.
#[inline(always)]
fn q5_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    for (o, q) in out.iter_mut().zip(q5_quants(&b[4..8], &b[8..24])) {
        *o = d * q as f32 + m;
    }
}

/// Q2_K (84 bytes): 16 scale bytes (low nibble scale, high nibble min, one per 16 elements),
/// 64 bytes of 2-bit quants, f16 `d`, f16 `dmin`. Element `128h + 32s + j` is bits `2s..2s+2`
/// of quant byte `32h + j`; its value is `(d · sc) · q − dmin · m`.
#[inline(always)]
fn q2_k(b: &[u8], out: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16(b, 80), f16(b, 82));
    for h in 0..2 {
        for s in 0..4 {
            for half in 0..2 {
                let sc = scales[h * 8 + s * 2 + half];
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                let src = &qs[h * 32 + half * 16..][..16];
                let o = &mut out[h * 128 + s * 32 + half * 16..][..16];
                for (o, &q) in o.iter_mut().zip(src) {
                    *o = dl * ((q >> (2 * s)) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// Q3_K (110 bytes): 32 bytes of high-bit masks, 64 bytes of 2-bit quants, 12 bytes of 6-bit
/// scales (offset by 32), f16 `d`. Element `i = 128h + 32s + j` takes bits `2s..2s+2` of quant
/// byte `32h + j` and subtracts 4 unless bit `i / 32` of mask byte `j` is set; its value is
/// `(d · (sc − 32)) · q`.
#[inline(always)]
fn q3_k(b: &[u8], out: &mut [f32]) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16(b, 108);
    for h in 0..2 {
        for s in 0..4 {
            let bit = h * 4 + s; // i / 32
            for half in 0..2 {
                let g = bit * 2 + half; // i / 16
                let low = if g < 8 { sc[g] & 0x0F } else { sc[g - 8] >> 4 };
                let high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
                let dl = d * (((low | (high << 4)) as i8) - 32) as f32;
                let o = &mut out[h * 128 + s * 32 + half * 16..][..16];
                for (jj, o) in o.iter_mut().enumerate() {
                    let j = half * 16 + jj;
                    let q = ((qs[h * 32 + j] >> (2 * s)) & 3) as i8;
                    let minus = 4 - 4 * ((hmask[j] >> bit) & 1) as i8;
                    *o = dl * (q - minus) as f32;
                }
            }
        }
    }
}

/// Q4_K/Q5_K's 12 bytes of 6-bit scales and mins, one pair per 32 elements.
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

/// Q4_K (144 bytes) and Q5_K (176 bytes, `FIVE`): f16 `d`, f16 `dmin`, 12 scale bytes, [32
/// bytes of fifth bits,] 128 bytes of nibbles. Sub-block `k = 2c + n` (32 elements) takes
/// nibble `n` of bytes `32c..32c+32` [and bit `k` of the 32 high-bit bytes]; its values are
/// `(d · sc) · q − dmin · m`.
#[inline(always)]
fn q45_k<const FIVE: bool>(b: &[u8], qh: &[u8], qs: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    for k in 0..8 {
        let (sc, m) = scale_min(&b[4..16], k);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let (c, shift) = (k / 2, 4 * (k % 2));
        let src: &[u8; 32] = qs[c * 32..c * 32 + 32].try_into().expect("32 bytes");
        let o: &mut [f32; 32] = (&mut out[k * 32..k * 32 + 32]).try_into().expect("32");
        for j in 0..32 {
            let mut q = (src[j] >> shift) & 0x0F;
            if FIVE {
                q |= ((qh[j] >> k) & 1) << 4;
            }
            o[j] = dl * q as f32 - ml;
        }
    }
}

#[inline(always)]
fn q4_k(b: &[u8], out: &mut [f32]) {
    q45_k::<false>(b, &[], &b[16..144], out);
}

#[inline(always)]
fn q5_k(b: &[u8], out: &mut [f32]) {
    q45_k::<true>(b, &b[16..48], &b[48..176], out);
}

/// Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed scales,
/// f16 `d`. Element `128h + 64n + j` (`j < 64`) takes nibble `n` of low byte `64h + j`; element
/// `128h + 32s + j` (`j < 32`) takes bits `2s..2s+2` of high byte `32h + j`; its value is
/// `(d · sc) · (q − 32)`, `sc` the scale of its 16 elements.
#[inline(always)]
fn q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(b, 208);
    for h in 0..2 {
        let hi: &[u8; 32] = qh[h * 32..h * 32 + 32].try_into().expect("32 bytes");
        for s in 0..4 {
            // Elements 128h + 32s + j: low byte 64h + 32(s mod 2) + j, nibble s / 2.
            let lo: &[u8; 32] = ql[h * 64 + 32 * (s % 2)..][..32].try_into().expect("32");
            let o: &mut [f32; 32] = (&mut out[h * 128 + 32 * s..][..32]).try_into().expect("32");
            let (dl0, dl1) = (
                d * (scales[h * 8 + 2 * s] as i8) as f32,
                d * (scales[h * 8 + 2 * s + 1] as i8) as f32,
            );
            for j in 0..32 {
                let low = (lo[j] >> (4 * (s / 2))) & 0x0F;
                let high = (hi[j] >> (2 * s)) & 3;
                let dl = if j < 16 { dl0 } else { dl1 };
                o[j] = dl * (((low | (high << 4)) as i8) - 32) as f32;
            }
        }
    }
}

/// Q8_K (292 bytes): f32 `d`, 256 signed quants, 16 `i16` group sums (unused here); `d · q`.
#[inline(always)]
fn q8_k(b: &[u8], out: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in out.iter_mut().zip(&b[4..4 + QK_K]) {
        *o = d * (q as i8) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// `tests/fixtures/kquants/blocks.json` (`make_kquants.py`): random blocks of every type here
    /// and the float32 values gguf-py's `gguf.quants.dequantize` gives for them (Q8_K: llama.cpp's
    /// `d · q` in numpy float32). Every value must have the same bits.
    #[test]
    fn kquant_blocks_equal_gguf_py_bit_for_bit() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/kquants/blocks.json");
        let text = std::fs::read_to_string(&path).expect("blocks.json");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut seen = Vec::new();
        for t in doc["types"].as_array().expect("types") {
            let name = t["name"].as_str().expect("name");
            let ty = t["ggml_type"].as_u64().expect("type") as u32;
            let (size, elems, ours) = layout(ty).expect("a type of this module");
            assert_eq!(ours, name);
            assert_eq!(
                (size, elems),
                (
                    t["block_bytes"].as_u64().unwrap() as usize,
                    t["block_elems"].as_u64().unwrap() as usize
                ),
                "{name}"
            );
            let raw = hex(t["blocks_hex"].as_str().unwrap());
            let want: Vec<u32> = hex(t["f32_bits_hex"].as_str().unwrap())
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let n_blocks = t["n_blocks"].as_u64().unwrap() as usize;
            assert_eq!((raw.len(), want.len()), (n_blocks * size, n_blocks * elems));
            let mut got = Vec::new();
            assert!(dequantise(ty, &raw, &mut got));
            assert_eq!(got.len(), want.len(), "{name}");
            let differ: Vec<_> = got
                .iter()
                .zip(&want)
                .enumerate()
                .filter(|(_, (g, w))| g.to_bits() != **w)
                .map(|(i, (g, w))| (i, *g, f32::from_bits(*w)))
                .take(5)
                .collect();
            assert!(
                differ.is_empty(),
                "{name}: (index, bapo, gguf-py) {differ:?}"
            );
            // The fixture is not trivial: many distinct values (both signs of `d` are in it).
            let mut distinct = want.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(
                distinct.len() > elems / 4,
                "{name}: {} values",
                distinct.len()
            );
            seen.push(name.to_string());
        }
        assert_eq!(
            seen,
            ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"]
        );
    }

    #[test]
    fn unknown_types_and_partial_blocks_append_nothing() {
        let mut out = Vec::new();
        assert!(!dequantise(2, &[0; 18], &mut out));
        assert!(dequantise(12, &[0; 143], &mut out));
        assert!(out.is_empty());
    }
}
