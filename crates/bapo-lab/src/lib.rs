//! # bapo-lab
//!
//! Research code on top of `bapo-train`: the DPO-vs-BAPO forgetting experiment
//! ([`compare`]: designs, runs, paired statistics, heterogeneity, figures) and the synthesis of
//! personalisation pairs from a model's own answers ([`synth`]). Nothing in the training
//! library depends on it; `bapo compare` and `bapo synth` are its commands.

pub mod compare;
pub mod synth;
