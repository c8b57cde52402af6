//! The exponential as plain arithmetic (so the compiler vectorises it) and the macro that
//! compiles a kernel's body for AVX-512, AVX2 and the baseline.

/// `e^x` for `x ≤ 0` (finite), within ≈ 2 ulp of the exact value for `x ≥ −87`; below −87
/// (where `e^x < 1.7e−38`) it returns `e^−87` instead of a denormal or zero, which changes
/// a row's sum by less than one part in 10³⁰.
///
/// `x = k·ln 2 + r` with `k` rounded to nearest by the 1.5·2²³ trick (an add, so the integer
/// `k` is read from the sum's low bits), `|r| ≤ ln 2 / 2` in two parts (Cody–Waite), `e^r` by
/// its degree-6 Taylor polynomial (truncation ≤ 1.2e−7 relative), `2^k` by building the float's
/// exponent bits.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 rounded to 10 bits: k·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * LOG2E + MAGIC;
    let k = t - MAGIC; // round(x · log2 e), as a float
    let ki = t.to_bits().wrapping_sub(MAGIC.to_bits()); // the same integer (two's complement)
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(ki.wrapping_add(127) << 23);
    p * scale
}

/// `1 / (1 + e^−x)` for any finite `x`, through [`exp_nonpositive`] of `−|x|` (no overflow).
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(if x < 0.0 { x } else { -x });
    let s = 1.0 / (1.0 + e);
    if x < 0.0 {
        e * s
    } else {
        s
    }
}

/// Lanes of a row's partial sums in every kernel: lane `l` takes elements `l, l + 16, …`, and
/// the lanes are added by [`fold`] in one fixed order, so a row's sum does not depend on its
/// length's padding, on the thread or on the instruction set.
pub(crate) const LANES: usize = 16;

/// The 16 lane sums added pairwise in a fixed order (`l + 8`, then `l + 4`, …).
#[inline(always)]
pub(crate) fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0]
}

/// The per-row work compiled three times: for AVX-512, for AVX2 and for the baseline, picked
/// once per call by what the CPU reports. The arithmetic is identical in all three.
macro_rules! dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        // The crate's only unsafe: calling a `target_feature` function after checking the CPU.
        #[allow(unsafe_code)]
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret { $body($($arg),*) }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { $body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp_nonpositive(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e30) < 1.7e-38 && exp_nonpositive(f32::NEG_INFINITY) < 1.7e-38);
    }

    #[test]
    fn sigmoid_against_f64() {
        let mut worst = 0.0f64;
        let mut x = -30.0f32;
        while x <= 30.0 {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            worst = worst.max(((sigmoid(x) as f64 - want) / want).abs());
            x += 0.001_3;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
    }
}
