//! The `[eval]` section of a run config, and what evaluation reads of a run: that section and
//! the objective's settings ([`EvalSettings`]), never the whole run configuration.

use std::path::PathBuf;

use bapo_train::train::TrainConfig;
use serde::{Deserialize, Serialize};

/// What the evaluation passes measure besides the held-out preference metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Multiple-choice knowledge sets (`data/knowledge/*.jsonl` shape), relative to the config.
    pub knowledge: Vec<PathBuf>,
    /// Items per set scored during training (an evenly spaced subset; 0 = all). `bapo eval`
    /// scores every item.
    pub knowledge_items: usize,
    /// `raw`, `chat` and/or `chat_system` (the chat format after a system turn from
    /// `system_turns`).
    pub formats: Vec<String>,
    /// The `chat_system` format's system turns: item `i` of each set gets turn `i % len`
    /// (`bapo compare` sets the level's user profiles here).
    pub system_turns: Vec<String>,
    /// Held-out prompts generated from for output drift (0 = off).
    pub output_prompts: usize,
    /// New tokens each of those answers may take (0 = `anchor.max_new_tokens`).
    pub output_max_new_tokens: usize,
    /// Items per knowledge set also asked generatively (the question as a user turn, a greedy
    /// answer of at most 24 tokens, right when it names a gold choice): `eval_knowledge/<set>/
    /// generative/acc`. 0 = off.
    pub generative_items: usize,
    /// Vocabulary columns per chunk in the token-KL pass.
    pub kl_vocab_chunk: usize,
    /// Sequences per forward pass when scoring knowledge items.
    pub batch_size: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            knowledge: Vec::new(),
            knowledge_items: 0,
            formats: vec!["raw".into(), "chat".into()],
            system_turns: Vec::new(),
            output_prompts: 0,
            output_max_new_tokens: 0,
            generative_items: 0,
            kl_vocab_chunk: 8192,
            batch_size: 16,
        }
    }
}

impl EvalSection {
    pub fn formats(&self) -> Result<Vec<bapo_drift::mc::Format>, String> {
        self.formats
            .iter()
            .map(|f| match f.as_str() {
                "raw" => Ok(bapo_drift::mc::Format::Raw),
                "chat" => Ok(bapo_drift::mc::Format::Chat),
                "chat_system" if self.system_turns.is_empty() => Err(
                    "eval.formats: `chat_system` needs eval.system_turns (the system turns to \
                     put before each question)"
                        .into(),
                ),
                "chat_system" => Ok(bapo_drift::mc::Format::ChatSystem),
                other => Err(format!(
                    "eval.formats: `{other}` (raw, chat or chat_system)"
                )),
            })
            .collect()
    }
}

/// The parts of a run's configuration that evaluation reads.
#[derive(Debug, Clone, Copy)]
pub struct EvalSettings<'a> {
    pub eval: &'a EvalSection,
    /// Normalisation, batch size and objective (the held-out metrics are the training
    /// objective's, on held-out pairs).
    pub train: &'a TrainConfig,
}
