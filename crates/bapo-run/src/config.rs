//! The run configuration (`configs/*.toml`): model, data, anchors, LoRA, training, output.
//! Types only: [`crate::load`] reads a file into them, [`crate::validate`] checks them.

use std::path::PathBuf;

use bapo_data::TruncationMode;
use serde::{Deserialize, Serialize};

pub use bapo_eval::EvalSection;
use bapo_train::lora::LoraConfig;
use bapo_train::train::TrainConfig;

/// Everything `bapo train` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Compute backend the `bapo` binary runs this config on (`ndarray`, `flex`, `wgpu`,
    /// `cuda`) unless `--backend` says otherwise; the library ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub anchor: AnchorSection,
    /// Absent: full fine-tuning.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    #[serde(default)]
    pub train: TrainConfig,
    /// Drift and knowledge metrics at every `eval_steps` (absent: preference metrics only).
    #[serde(default)]
    pub eval: EvalSection,
    pub output: OutputSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF checkpoint directory or `.gguf` file; `~` and `$BAPO_CACHE`/`${BAPO_CACHE}` expand.
    pub path: String,
    /// The type the frozen base weights are kept in (projections, embedding, head; norms and
    /// LoRA weights, their gradients and AdamW state stay f32), or `gguf`: a GGUF file's
    /// quantised blocks as they are. Needs `[lora]`.
    #[serde(default, skip_serializing_if = "BaseDtype::is_f32")]
    pub base_dtype: BaseDtype,
}

/// `model.base_dtype`: the frozen base weights' float type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    /// As loaded (dequantised GGUF, or the safetensors' values) in f32: the parity path.
    #[default]
    F32,
    /// bfloat16 (half the memory; the products with base weights run in bf16, as
    /// transformers' `torch_dtype = bfloat16`).
    Bf16,
    /// float16.
    F16,
    /// A GGUF file's quantised weights kept in their blocks (Q4_0, Q4_K, Q6_K, Q8_0, …),
    /// dequantised a tile at a time inside each product; its F32/F16/BF16 tensors in f32.
    /// Activations stay f32: the numbers are the f32 model's (`bapo_model::quant`).
    Gguf,
}

impl BaseDtype {
    pub fn is_f32(&self) -> bool {
        *self == BaseDtype::F32
    }

    /// bf16 or f16 (tensors burn-ndarray cannot hold).
    pub fn is_half(&self) -> bool {
        matches!(self, BaseDtype::Bf16 | BaseDtype::F16)
    }

    /// How the model loader holds the base.
    pub fn base_weights(self) -> bapo_model::precision::BaseWeights {
        use bapo_model::precision::BaseWeights;
        use burn::tensor::FloatDType;
        match self {
            BaseDtype::F32 => BaseWeights::Float(FloatDType::F32),
            BaseDtype::Bf16 => BaseWeights::Float(FloatDType::BF16),
            BaseDtype::F16 => BaseWeights::Float(FloatDType::F16),
            BaseDtype::Gguf => BaseWeights::Gguf,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Preference JSONL (TRL standard or conversational shape), relative to the config file.
    pub train: PathBuf,
    /// A held-out preference file (relative to the config file). When set, it is the eval
    /// split and `eval_fraction` must be 0.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Keep only pairs whose `user` is one of these (both files); absent keeps every pair.
    #[serde(default)]
    pub users: Option<Vec<String>>,
    /// Fraction of pairs held out for evaluation (seeded split).
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    #[serde(default = "default_truncation")]
    pub truncation_mode: String,
    /// A pair whose prompt alone leaves no room for a completion token within `max_length`
    /// is an error (naming the file and lines) unless this is set: then it is skipped with a
    /// warning. Setting `max_prompt_length` instead truncates such prompts (TRL's behaviour).
    #[serde(default)]
    pub drop_long_prompts: bool,
    /// Arguments of the model's chat template (transformers' `apply_chat_template(**kwargs)`),
    /// e.g. `{ enable_thinking = false }` for Qwen3: used by every rendering of the run
    /// (prompts, base responses, knowledge items in chat format).
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub chat_template_kwargs: bapo_data::TemplateKwargs,
}

fn default_eval_fraction() -> f64 {
    0.1
}
fn default_max_length() -> usize {
    256
}
fn default_truncation() -> String {
    "keep_end".into()
}

impl DataSection {
    pub fn truncation(&self) -> Result<TruncationMode, String> {
        match self.truncation_mode.as_str() {
            "keep_end" => Ok(TruncationMode::KeepEnd),
            "keep_start" => Ok(TruncationMode::KeepStart),
            other => Err(format!(
                "data.truncation_mode: `{other}` (keep_end or keep_start)"
            )),
        }
    }
}

/// How the reference model answers the training prompts (the base responses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnchorSection {
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Prompts per generation batch.
    pub batch_size: usize,
}

impl Default for AnchorSection {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            batch_size: 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run directory (anchors, caches, metrics, checkpoints), relative to the working directory.
    pub dir: PathBuf,
    #[serde(default = "default_eval_steps")]
    pub eval_steps: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_steps: usize,
}

fn default_eval_steps() -> usize {
    10
}

/// A configuration error with its location.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub what: String,
}

/// Expands `~/` and `$BAPO_CACHE` (default `~/.cache/bapo`) in a model path.
pub fn expand_path(p: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let cache = std::env::var("BAPO_CACHE").unwrap_or_else(|_| format!("{home}/.cache/bapo"));
    let s = p
        .replace("${BAPO_CACHE}", &cache)
        .replace("$BAPO_CACHE", &cache);
    match s.strip_prefix("~/") {
        Some(rest) => PathBuf::from(home).join(rest),
        None => PathBuf::from(s),
    }
}

impl RunConfig {
    /// What evaluation reads of this config: the eval section and the objective's settings.
    pub fn eval_settings(&self) -> bapo_eval::EvalSettings<'_> {
        bapo_eval::EvalSettings {
            eval: &self.eval,
            train: &self.train,
        }
    }
}

impl From<ConfigError> for bapo_train::io::RunError {
    fn from(e: ConfigError) -> Self {
        Self::Other(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_template_kwargs_come_from_the_data_section() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/default.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let cfg: RunConfig = toml::from_str(&text).unwrap();
        assert!(cfg.data.chat_template_kwargs.is_empty());
        let with = text.replacen(
            "[data]\n",
            "[data]\nchat_template_kwargs = { enable_thinking = false, date_string = \"26 Jul 2024\" }\n",
            1,
        );
        let cfg: RunConfig = toml::from_str(&with).unwrap();
        let kw = &cfg.data.chat_template_kwargs;
        assert_eq!(kw["enable_thinking"], serde_json::json!(false));
        assert_eq!(kw["date_string"], serde_json::json!("26 Jul 2024"));
    }
}
