//! # bapo-drift
//!
//! How far a fine-tuned policy has moved from its reference, and whether it still knows what it
//! knew. Every function works on numbers it is handed (log-probs, logits, generated tokens,
//! weight norms): the crate runs no model, so any Burn model (or none) can use it.
//!
//! - [`anchor::AnchorDrift`]: `log π_ref(y_b|x) − log π_θ(y_b|x)` on base responses.
//! - [`kl::token_kl`]: exact token-level KL(π_θ‖π_ref) over the vocabulary, vocabulary-chunked.
//! - [`weights`]: ‖θ − θ₀‖ global and per layer.
//! - [`output::OutputStats`]: generated length, EOS rate, distinct-2.
//! - [`mc`]: multiple-choice knowledge scoring with lm-evaluation-harness semantics.
//! - [`gate`]: a retention gate (paired drops against a reference run, with limits).
//! - [`paired`]: two models on the same items — McNemar flips, paired-bootstrap intervals.
//! - [`plot`]: the training-curve figure (SVG and PNG).

pub mod anchor;
pub mod gate;
pub mod kl;
pub mod mc;
pub mod output;
pub mod paired;
pub mod plot;
pub mod weights;

pub use anchor::AnchorDrift;
pub use kl::{token_kl, KlStats};
pub use mc::{McItem, McItemResult, McSummary};
pub use output::OutputStats;
