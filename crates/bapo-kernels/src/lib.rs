//! # bapo-kernels
//!
//! Fused CPU kernels with their own autodiff backward for burn-flex: the head's log-prob of
//! each target ([`head`]), RMSNorm ([`rmsnorm`]), RoPE with attention's layout changes
//! ([`rope`]), products of f32 activations with half-precision weights ([`mixed`]) and with
//! block-quantised ones ([`quant`]), attention's biased softmax ([`softmax`]) and SwiGLU ([`swiglu`]). Each entry point takes a generic Burn
//! tensor and runs its kernel only when the backend *is* `Flex` or `Autodiff<Flex>` (checked
//! by type with `Any`, safely), handing the inputs back otherwise, so its callers keep a plain
//! `B: Backend` bound and every other backend (ndarray, wgpu, cuda, someone else's) runs the
//! caller's op-by-op path unchanged.
//!
//! Why not a `FusedOps: Backend` extension trait: the bound would have to be implemented for
//! every backend a caller uses, and the orphan rule lets only this crate do that, so a model on
//! a backend this crate does not know could no longer call the library.
//!
//! The backward passes use Burn's autodiff extension points (`Backward`, `prepare`,
//! `compute_bound().stateful()`, `Gradients::register`), as burn's custom-kernel example does.
//!
//! **Numerics.** A kernel computes each row (or element) alone, in a fixed order: fixed-lane
//! sums, no fused multiply-add, the same code compiled for AVX-512, AVX2 and the baseline and
//! picked by CPU detection. So an element's bits do not depend on its batch or on the thread
//! that ran it, and the plain and autodiff backends share each forward kernel (the anchor's
//! kink at step 1 holds). Results differ from the op-by-op path within float rounding.

mod flex;
pub mod head;
pub mod head_kernel;
pub mod mixed;
mod mixed_rows;
pub mod quant;
mod quant_dot;
pub mod rmsnorm;
pub mod rope;
mod simd;
pub mod softmax;
pub mod swiglu;

pub use simd::exp_nonpositive;

/// The kernels this crate has, by the names `BAPO_FUSED` takes.
pub const KERNELS: [&str; 7] = [
    "head", "mixed", "quant", "rmsnorm", "rope", "softmax", "swiglu",
];

/// The kernels on by default: all of them. (`head` was opt-in for a while: with it, one
/// example's summed log-prob came out one ulp apart alone and in a batch of four. The cause was
/// not the kernel but the per-row sum after it, whose order depended on the row's padding;
/// `bapo_objective::row_sums` now sums in an order padding cannot change.)
pub const DEFAULT: [&str; 7] = KERNELS;

/// The kernels that run, from the environment variable `BAPO_FUSED` (read once): unset or `1`
/// = [`DEFAULT`]; `all` = every kernel; `0` = none (the op-by-op path everywhere, for A/B
/// timing and as an escape hatch); otherwise a comma-separated list of names from [`KERNELS`].
///
/// # Panics
/// On a name that is not a kernel (a typo would otherwise silently turn kernels off).
pub fn active() -> &'static [&'static str] {
    static ON: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    ON.get_or_init(|| {
        parse(std::env::var("BAPO_FUSED").ok().as_deref()).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// [`active`]'s reading of a `BAPO_FUSED` value.
fn parse(value: Option<&str>) -> Result<Vec<&'static str>, String> {
    let list = match value.map(str::trim) {
        None | Some("") | Some("1") => return Ok(DEFAULT.to_vec()),
        Some("all") => return Ok(KERNELS.to_vec()),
        Some("0") | Some("none") => return Ok(Vec::new()),
        Some(list) => list,
    };
    for name in list.split(',').map(str::trim) {
        if !KERNELS.contains(&name) {
            return Err(format!(
                "BAPO_FUSED: `{name}` is not a kernel (kernels: {}; or 0, 1, all)",
                KERNELS.join(", ")
            ));
        }
    }
    Ok(KERNELS
        .into_iter()
        .filter(|k| list.split(',').any(|x| x.trim() == *k))
        .collect())
}

/// Whether kernel `name` runs ([`active`]).
pub fn enabled(name: &str) -> bool {
    active().contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bapo_fused_values() {
        assert_eq!(parse(None).unwrap(), DEFAULT.to_vec());
        assert_eq!(parse(Some("1")).unwrap(), DEFAULT.to_vec());
        assert_eq!(parse(Some("all")).unwrap(), KERNELS.to_vec());
        assert!(parse(Some("0")).unwrap().is_empty());
        assert_eq!(parse(Some("swiglu, head")).unwrap(), vec!["head", "swiglu"]);
        assert_eq!(parse(Some("rmsnorm")).unwrap(), vec!["rmsnorm"]);
        let e = parse(Some("head,haed")).unwrap_err();
        assert!(e.contains("`haed` is not a kernel"), "{e}");
    }
}
