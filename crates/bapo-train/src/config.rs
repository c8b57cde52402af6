//! The run configuration (`configs/*.toml`): model, data, anchors, LoRA, training, output.
//! Unknown keys and wrong types are errors naming the file, line and key.

use std::path::{Path, PathBuf};

use bapo_data::TruncationMode;
use serde::{Deserialize, Serialize};

use crate::lora::LoraConfig;
use crate::train::TrainConfig;
use crate::validate::Invalid;

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
    /// Like [`RunConfig::from_file`], then applies `section.key=value` overrides (the value is
    /// read as TOML — `3`, `1e-4`, `true`, `["a", "b"]` — or, failing that, as a string).
    pub fn from_file_with(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Self::from_file(path);
        }
        let err = |what: String| ConfigError {
            path: path.into(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
        for o in overrides {
            let (key, raw) = o
                .split_once('=')
                .ok_or_else(|| err(format!("--set {o}: expected section.key=value")))?;
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let mut parts: Vec<&str> = key.trim().split('.').collect();
            let last = parts
                .pop()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| err(format!("--set {o}: empty key")))?;
            let mut at = &mut table;
            for p in parts {
                at = at
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| err(format!("--set {o}: `{p}` is not a section")))?;
            }
            at.insert(last.to_string(), value);
        }
        let cfg: RunConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| err(format!("after --set overrides: {}", e.message())))?;
        cfg.resolve(path, &text, overrides)
    }

    /// Parses and validates a TOML config; `data.train` is resolved against the file's folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |what: String| ConfigError {
            path: path.into(),
            what,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: RunConfig = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|s| {
                let line = text[..s.start].matches('\n').count() + 1;
                format!("line {line}: ")
            });
            err(format!("{}{}", at.unwrap_or_default(), e.message()))
        })?;
        cfg.resolve(path, &text, &[])
    }

    /// Resolves `data.train` against the config file's folder, then validates; a value out of
    /// range is reported at its line in `text`, or at the `--set` override that gave it.
    fn resolve(
        mut self,
        path: &Path,
        text: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if self.data.train.is_relative() {
            self.data.train = base.join(&self.data.train);
        }
        if let Some(e) = self.data.eval.as_mut().filter(|e| e.is_relative()) {
            *e = base.join(&*e);
        }
        for k in self.eval.knowledge.iter_mut().filter(|k| k.is_relative()) {
            *k = base.join(&*k);
        }
        self.validate().map_err(|bad| {
            let set = overrides
                .iter()
                .rev()
                .find(|o| o.split_once('=').is_some_and(|(k, _)| k.trim() == bad.key));
            let at = match (set, crate::validate::line_of(text, &bad.key)) {
                (Some(o), _) => format!("--set {o}: "),
                (None, Some(line)) => format!("line {line}: "),
                (None, None) => String::new(),
            };
            ConfigError {
                path: path.into(),
                what: format!("{at}{bad}"),
            }
        })?;
        Ok(self)
    }

    /// Range checks of every numeric key, then cross-field checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        crate::validate::check_ranges(self)?;
        let bad = |key: &str, what: String| Invalid {
            key: key.into(),
            what,
        };
        self.train
            .anchor
            .parse::<bapo_objective::Anchor>()
            .map_err(|e| bad("train.anchor", format!("is invalid: {e}")))?;
        self.train
            .objective()
            .map_err(|e| bad("train.loss_type", format!("is invalid: {e}")))?;
        self.data
            .truncation()
            .map_err(|e| bad("data.truncation_mode", format!("is invalid: {e}")))?;
        if self.data.eval.is_some() && self.data.eval_fraction > 0.0 {
            return Err(bad(
                "data.eval_fraction",
                "must be 0 because data.eval is set (one held-out split, not two)".into(),
            ));
        }
        if self.data.users.as_ref().is_some_and(Vec::is_empty) {
            return Err(bad(
                "data.users",
                "is empty: list at least one user, or leave it out".into(),
            ));
        }
        if let Some(l) = &self.lora {
            l.validate()
                .map_err(|e| bad("lora.target_modules", format!("is invalid: {e}")))?;
        }
        self.eval
            .formats()
            .map_err(|e| bad("eval.formats", format!("is invalid: {e}")))?;
        Ok(())
    }
}
