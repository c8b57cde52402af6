//! # bapo-objective
//!
//! Sequence log-probabilities, the DPO family of pairwise preference losses and the BAPO
//! anchor, for any Burn model: everything takes logits, labels, masks or log-prob tensors and
//! depends on `burn` only. Generic over `B: Backend`; gradients flow when `B` is an autodiff
//! backend.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::Tensor;
//! use bapo_objective::{bapo_loss, Anchor, AnchorLogps, ObjectiveConfig, PairLogps};
//! let d = Default::default();
//! let t = |v: [f32; 2]| Tensor::<NdArray, 1>::from_floats(v, &d);
//! let pairs = PairLogps { policy_chosen: t([-3.0, -4.0]), policy_rejected: t([-5.0, -4.5]),
//!                         reference_chosen: t([-3.5, -4.0]), reference_rejected: t([-5.0, -4.0]) };
//! let anchor = AnchorLogps { policy: t([-10.0, -8.0]), reference: t([-9.0, -8.5]) };
//! let out = bapo_loss(&ObjectiveConfig::default(), &pairs, Some(&anchor), None);
//! assert!(out.loss.into_scalar() > 0.0);
//! ```

mod logps;
mod losses;

/// The fused kernels that run where a backend has them (`bapo_kernels::active`): none without
/// feature `flex`; the environment variable `BAPO_FUSED` picks them (`0` = none, the op-by-op
/// path everywhere, for A/B timing and as an escape hatch).
pub fn fused_kernels() -> Vec<&'static str> {
    #[cfg(feature = "flex")]
    return bapo_kernels::active().to_vec();
    #[cfg(not(feature = "flex"))]
    Vec::new()
}

pub use logps::{
    row_sums, scatter_logps, sequence_logps, target_logps, target_logps_op_by_op, CompletionRows,
    SequenceLogps,
};
pub use losses::{
    bapo_loss, Anchor, AnchorLogps, LossType, Metrics, ObjectiveConfig, ObjectiveOutput, PairLogps,
};
