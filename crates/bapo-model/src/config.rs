//! Model configuration in two layers: [`HfConfig`] mirrors HF `config.json` (the wire format);
//! [`LlamaConfig`] is the internal Burn `Config` the model is built from.

use std::path::Path;

use burn::config::Config;
use serde::Deserialize;

use crate::error::ModelError;
type LoadResult<T> = std::result::Result<T, ModelError>;

/// HF `config.json` fields that matter for Llama-family decoders (Llama 2/3.x, SmolLM2,
/// TinyLlama, Mistral, Qwen2, Qwen3). Unknown fields are ignored: HF configs carry many.
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
    /// Older checkpoints' RoPE scaling block (`rope_type` or `type`, `factor`, ...);
    /// transformers 5 puts the same keys in `rope_parameters`.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Qwen2/Qwen3's sliding-window attention switch (not implemented: refused when on).
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Per-layer attention kinds (Qwen3, Gemma): only `full_attention` is implemented.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
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

/// `rope_parameters` block of transformers 5 configs (the scaling keys, when there are any,
/// are read from the raw JSON by [`RopeScaling::from_hf`]).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

/// How RoPE's frequencies are changed from `theta^(-2i/d)` for a longer context.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (position interpolation; HF `linear`).
    Linear { factor: f64 },
    /// Llama 3.x (`rope_type = "llama3"`): wavelengths above `original / low_freq_factor`
    /// divided by `factor`, below `original / high_freq_factor` kept, smoothly blended between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Each frequency divided by its own factor: llama.cpp's `rope_freqs` tensor.
    Factors { factors: Vec<f32> },
}

impl RopeScaling {
    /// The scaling an HF config asks for: `rope_scaling` (older files, `rope_type` or `type`)
    /// or `rope_parameters` (transformers 5). `None` for default RoPE; an error naming the
    /// field for any other type or a missing or ill-typed key.
    pub fn from_hf(cfg: &HfConfig, path: &Path) -> LoadResult<Option<Self>> {
        let (block, mut map) = match (&cfg.rope_scaling, &cfg.rope_parameters) {
            (Some(serde_json::Value::Object(m)), _) => ("rope_scaling", m.clone()),
            (Some(serde_json::Value::Null) | None, Some(p)) => {
                let mut m = p.rest.clone();
                if let Some(t) = &p.rope_type {
                    m.insert("rope_type".into(), t.clone().into());
                }
                ("rope_parameters", m)
            }
            (Some(serde_json::Value::Null) | None, None) => return Ok(None),
            (Some(_), _) => {
                return Err(ModelError::config(path, "rope_scaling", "not an object"));
            }
        };
        let kind = match map.remove("rope_type").or_else(|| map.remove("type")) {
            None => return Ok(None),
            Some(serde_json::Value::String(s)) => s,
            Some(_) => {
                return Err(ModelError::config(
                    path,
                    &format!("{block}.rope_type"),
                    "not a string",
                ))
            }
        };
        let num = |key: &str| -> LoadResult<f64> {
            map.get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| {
                    ModelError::config(
                        path,
                        &format!("{block}.{key}"),
                        format!("missing or not a number (needed by rope_type `{kind}`)"),
                    )
                })
        };
        match kind.as_str() {
            "default" => Ok(None),
            "linear" => Ok(Some(Self::Linear {
                factor: num("factor")?,
            })),
            "llama3" => {
                let (factor, lo, hi) = (
                    num("factor")?,
                    num("low_freq_factor")?,
                    num("high_freq_factor")?,
                );
                let original = num("original_max_position_embeddings")?;
                if !(factor > 0.0 && lo > 0.0 && hi > lo && original >= 1.0) {
                    return Err(ModelError::config(
                        path,
                        block,
                        format!(
                            "llama3 scaling needs factor > 0, high_freq_factor > low_freq_factor \
                             > 0 and original_max_position_embeddings >= 1, got {factor}, {lo}, \
                             {hi}, {original}"
                        ),
                    ));
                }
                Ok(Some(Self::Llama3 {
                    factor,
                    low_freq_factor: lo,
                    high_freq_factor: hi,
                    original_max_position_embeddings: original as usize,
                }))
            }
            other => Err(ModelError::config(
                path,
                &format!("{block}.rope_type"),
                format!("`{other}` is not implemented (supported: default, linear, llama3)"),
            )),
        }
    }

    /// `inv_freq` (from `theta^(-2i/d)`) with this scaling applied, as transformers computes it.
    pub fn apply(&self, inv_freq: &mut [f64]) {
        match self {
            Self::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Self::Factors { factors } => {
                for (f, s) in inv_freq.iter_mut().zip(factors) {
                    *f /= *s as f64;
                }
            }
            Self::Llama3 {
                factor,
                low_freq_factor: lo,
                high_freq_factor: hi,
                original_max_position_embeddings: original,
            } => {
                let original = *original as f64;
                let (low_wavelen, high_wavelen) = (original / lo, original / hi);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original / wavelen - lo) / (hi - lo);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
    }
}

/// Unscaled RoPE inverse frequencies `theta^(-2i/d)`, `i < d / 2`, in f64.
pub(crate) fn base_inv_freq(theta: f64, head_dim: usize) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
        .collect()
}

/// Model types whose decoder this crate implements.
pub const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

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
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3's `q_norm`/`k_norm`).
    #[config(default = false)]
    pub qk_norm: bool,
    /// RoPE frequency scaling (Llama 3.x, linear), `None` for plain RoPE.
    #[config(default = "None")]
    pub rope_scaling: Option<RopeScaling>,
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
        let model_type = self.model_type.as_deref().unwrap_or("llama");
        if !SUPPORTED_MODEL_TYPES.contains(&model_type) {
            return Err(ModelError::config(
                path,
                "model_type",
                format!(
                    "`{model_type}` is not supported (supported: {})",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ),
            ));
        }
        if self.use_sliding_window {
            return Err(ModelError::config(
                path,
                "use_sliding_window",
                "sliding-window attention is not implemented",
            ));
        }
        if let Some(other) = self
            .layer_types
            .iter()
            .flatten()
            .find(|t| *t != "full_attention")
        {
            return Err(ModelError::config(
                path,
                "layer_types",
                format!("`{other}` layers are not implemented (only full_attention)"),
            ));
        }
        let rope_scaling = RopeScaling::from_hf(self, path)?;
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
        let qkv_bias = self.attention_bias || model_type == "qwen2";
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
        .with_qk_norm(model_type == "qwen3")
        .with_rope_scaling(rope_scaling)
        .with_eos_token_ids(ids(&self.eos_token_id))
        .with_bos_token_id(ids(&self.bos_token_id).first().copied()))
    }
}

impl LlamaConfig {
    /// RoPE's inverse frequencies (`head_dim / 2` of them): `theta^(-2i/d)`, scaled by
    /// [`Self::rope_scaling`]; computed in f64, rounded once.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let mut f = base_inv_freq(self.rope_theta, self.head_dim);
        if let Some(s) = &self.rope_scaling {
            s.apply(&mut f);
        }
        f.into_iter().map(|x| x as f32).collect()
    }

    /// Number of parameters of the model this config describes.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q * 2 + h * kv * 2 + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * h * self.intermediate_size;
        let qk_norm = if self.qk_norm { 2 * self.head_dim } else { 0 };
        let layer = attn + mlp + 2 * h + qk_norm;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}
