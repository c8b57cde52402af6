//! # bapo-train
//!
//! Composes `bapo-model`, `bapo-data` and `bapo-objective`: the scoring pass behind
//! `bapo score`, LoRA adapters, reference log-probs and the BAPO training loop.

pub mod config;
pub mod lora;
pub mod run;
pub mod score;
pub mod train;

pub use config::RunConfig;
pub use lora::LoraConfig;
pub use run::run_training;
pub use score::{
    encode_pair, encoder, score_examples, EncodedCompletion, ScoreError, ScoreRow, Scorer,
};
pub use train::{
    reference_logps, reference_of, train, ReferenceLogps, StepLog, TrainConfig, TrainError,
};
