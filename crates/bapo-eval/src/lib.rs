//! # bapo-eval
//!
//! What a personalised model is measured by, on top of the training library: held-out
//! preference and anchor metrics with drift and exact token KL ([`heldout`]), knowledge
//! retention on multiple-choice sets ([`knowledge`]), the retention gate ([`gate`]), the HTML
//! report ([`html`]) and the training figure ([`figure`]). It reads an eval section and the
//! objective's settings ([`EvalSettings`]), never a whole run configuration.

pub mod figure;
pub mod gate;
pub mod heldout;
pub mod html;
pub mod knowledge;
pub mod section;

pub use heldout::evaluate;
pub use section::{EvalSection, EvalSettings};
