//! # bapo-run
//!
//! The run directory behind `bapo train` and `bapo eval`: the TOML config ([`config`], read by
//! `load`, checked by [`validate`]), base responses and reference log-probs made once and cached
//! ([`prepare`], `cache`), checkpoints and `--resume` ([`checkpoint`]), one adapter per user
//! ([`per_user`]), and the jobs themselves ([`run`], [`eval_job`]).

mod cache;
pub mod checkpoint;
pub mod config;
pub mod eval_job;
pub mod generation;
mod load;
pub mod per_user;
mod prepare;
pub mod run;
pub mod validate;

pub use config::RunConfig;
pub use run::{run_anchors, run_eval, run_training};
