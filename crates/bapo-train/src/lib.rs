//! # bapo-train
//!
//! What a Rust user embeds to train: composes `bapo-model`, `bapo-data` and `bapo-objective`
//! into the scoring pass behind `bapo score`, reference log-probs, the BAPO step and training
//! loop, shared prompts, concurrent batches and data-parallel training. The run directory
//! (config, caches, checkpoints, jobs) is `bapo-run`; evaluation is `bapo-eval`.

pub mod checkpoint;
pub mod concurrent;
pub mod dist;
pub mod io;
pub mod logps;
pub mod score;
pub mod shared_prompt;
pub mod step;
pub mod train;
pub mod train_config;

/// LoRA lives in the model crate (PEFT load/save included); re-exported for existing paths.
pub use bapo_model::lora;
pub use bapo_model::LoraConfig;
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
    .with_fallback_bos(tok.add_bos)
}
