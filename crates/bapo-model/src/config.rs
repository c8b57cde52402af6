//! Model configuration in two layers: [`HfConfig`] mirrors HF `config.json` (the wire format);
//! [`LlamaConfig`] is the internal Burn `Config` the model is built from.

use std::path::Path;

use burn::config::Config;
use serde::Deserialize;

use crate::error::ModelError;
type LoadResult<T> = std::result::Result<T, ModelError>;

/// HF `config.json` fields that matter for Llama-family decoders (Llama 2/3.x, SmolLM2,
/// TinyLlama, Mistral, Qwen2). Unknown fields are ignored: HF configs carry many.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Older checkpoints write `rope_theta` at the top level ...
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// ... transformers 5 writes it under `rope_parameters`.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's `attention_bias`; Qwen2 has q/k/v biases without saying so.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub pad_token_id: Option<serde_json::Value>,
}

/// `rope_parameters` block of transformers 5 configs.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// Internal configuration of a Llama-family decoder.
#[derive(Config, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    #[config(default = 1e-5)]
    pub rms_norm_eps: f64,
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    #[config(default = 2048)]
    pub max_position_embeddings: usize,
    #[config(default = false)]
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    #[config(default = false)]
    pub qkv_bias: bool,
    /// End-of-sequence token ids from the config (generation stops on any of them).
    #[config(default = "Vec::new()")]
    pub eos_token_ids: Vec<u32>,
    #[config(default = "None")]
    pub bos_token_id: Option<u32>,
}

fn ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> LoadResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| {
            ModelError::format(
                path,
                None,
                format!("line {} column {}: {e}", e.line(), e.column()),
            )
        })
    }

    /// Converts the wire format into the internal config, checking what the model relies on.
    pub fn to_llama(&self, path: &Path) -> LoadResult<LlamaConfig> {
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(ModelError::config(
                    path,
                    "hidden_act",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                return Err(ModelError::config(
                    path,
                    "rope_scaling",
                    "RoPE scaling is not implemented",
                ));
            }
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.as_deref())
        {
            if t != "default" {
                return Err(ModelError::config(
                    path,
                    "rope_parameters.rope_type",
                    format!("`{t}` is not implemented (only default)"),
                ));
            }
        }
        if self.mlp_bias {
            return Err(ModelError::config(
                path,
                "mlp_bias",
                "MLP biases are not implemented",
            ));
        }
        let heads = self.num_attention_heads;
        let kv = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(ModelError::config(
                path,
                "num_key_value_heads",
                format!("{kv} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::config(
                path,
                "head_dim",
                format!("{head_dim} must be even and positive"),
            ));
        }
        let rope_theta = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let qkv_bias = self.attention_bias || self.model_type.as_deref() == Some("qwen2");
        Ok(LlamaConfig::new(
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            heads,
            kv,
            head_dim,
        )
        .with_rms_norm_eps(self.rms_norm_eps)
        .with_rope_theta(rope_theta)
        .with_max_position_embeddings(self.max_position_embeddings)
        .with_tie_word_embeddings(self.tie_word_embeddings)
        .with_qkv_bias(qkv_bias)
        .with_eos_token_ids(ids(&self.eos_token_id))
        .with_bos_token_id(ids(&self.bos_token_id).first().copied()))
    }
}

impl LlamaConfig {
    /// Number of parameters of the model this config describes.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q * 2 + h * kv * 2 + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}
