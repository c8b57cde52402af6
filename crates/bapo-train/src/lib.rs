//! # bapo-train
//!
//! Composes `bapo-model`, `bapo-data` and `bapo-objective`: the scoring pass behind
//! `bapo score`, LoRA adapters, reference log-probs and the BAPO training loop.

mod cache;
mod checkpoint;
pub mod concurrent;
pub mod config;
pub mod dist;
pub mod eval;
mod figure;
pub mod gate;
pub mod generation;
pub mod html;
pub mod io;
pub mod logps;
pub mod per_user;
mod prepare;
mod report;
pub mod run;
pub mod score;
pub mod shared_prompt;
pub mod step;
pub mod train;
pub mod train_config;
pub mod validate;

/// LoRA lives in the model crate (PEFT load/save included); re-exported for existing paths.
pub use bapo_model::lora;
pub use bapo_model::LoraConfig;
pub use config::RunConfig;
pub use report::evaluate;
pub use run::{run_anchors, run_eval, run_training};
pub use score::{
    encode_pair, encoder, score_examples, EncodedCompletion, ScoreError, ScoreRow, Scorer,
};
pub use train::{
    reference_logps, reference_of, train, ReferenceLogps, Resume, StepLog, TrainConfig, TrainError,
};

/// The chat template a tokenizer ships (or the plain-text fallback), with its BOS/EOS text.
pub fn chat_template(tok: &bapo_model::Tokenizer) -> bapo_data::ChatTemplate {
    bapo_data::ChatTemplate::new(
        tok.chat_template.clone(),
        tok.bos_token.clone(),
        tok.eos_token.clone(),
    )
}
