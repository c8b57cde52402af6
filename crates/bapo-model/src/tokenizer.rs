//! Tokenizer construction: from an HF `tokenizer.json` (+ `tokenizer_config.json`), or rebuilt
//! from GGUF metadata (`tokenizer.ggml.*`) for byte-level BPE models, so a lone `.gguf` file is
//! enough to run.

use std::path::Path;

use serde_json::{json, Value as Json};

use crate::error::{ModelError, Result};
use crate::load::gguf::{GgufFile, Value};

/// A tokenizer plus what the chat template and generation need to know about it.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// Text of the end-of-sequence token (e.g. `<|im_end|>` for ChatML models).
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    /// Jinja chat template, when the model ships one.
    pub chat_template: Option<String>,
    /// Where it came from, for error messages.
    pub origin: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("vocab", &self.vocab_size())
            .field("eos", &self.eos_token)
            .finish()
    }
}

fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    fn err(&self, what: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            origin: self.origin.clone(),
            what: what.to_string(),
        }
    }

    /// Loads `tokenizer.json`, and `tokenizer_config.json` / `chat_template.jinja` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            origin: path.display().to_string(),
            what: e.to_string(),
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Json = if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
            serde_json::from_str(&text).map_err(|e| {
                ModelError::format(&cfg_path, None, format!("line {}: {e}", e.line()))
            })?
        } else {
            Json::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        } else {
            cfg.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        };
        Ok(Self {
            inner,
            eos_token: token_text(cfg.get("eos_token")),
            bos_token: token_text(cfg.get("bos_token")),
            chat_template,
            origin: path.display().to_string(),
        })
    }

    /// Rebuilds a byte-level BPE tokenizer from GGUF metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let origin = file.path.display().to_string();
        let bad = |field: &str, what: &str| ModelError::config(&file.path, field, what.to_string());
        let model = file
            .get("tokenizer.ggml.model")?
            .as_str()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(ModelError::Unsupported {
                path: file.path.clone(),
                what: format!("tokenizer.ggml.model `{model}` (only byte-level BPE, `gpt2`)"),
            });
        }
        let tokens: Vec<&str> = file
            .get("tokenizer.ggml.tokens")?
            .as_array()
            .ok_or_else(|| bad("tokenizer.ggml.tokens", "not an array"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad("tokenizer.ggml.tokens", "holds a non-string"))
            })
            .collect::<Result<_>>()?;
        let merges: Vec<&str> = file
            .get("tokenizer.ggml.merges")?
            .as_array()
            .ok_or_else(|| bad("tokenizer.ggml.merges", "not an array"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad("tokenizer.ggml.merges", "holds a non-string"))
            })
            .collect::<Result<_>>()?;
        let types: Vec<u64> = match file.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("tokenizer.ggml.token_type", "not an array"))?
                .iter()
                .map(|t| t.as_u64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(bad(
                "tokenizer.ggml.token_type",
                "length differs from tokenizer.ggml.tokens",
            ));
        }
        // Ids must map one-to-one to token strings: a repeated token would leave an id the
        // vocabulary cannot hold (found by fuzzing).
        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            if let Some(first) = vocab.insert(t.to_string(), json!(i)) {
                return Err(bad(
                    "tokenizer.ggml.tokens",
                    &format!("token {t:?} appears twice (ids {first} and {i})"),
                ));
            }
        }
        // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        let added: Vec<Json> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
            .map(|(i, (t, &ty))| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": ty == 4, "special": ty == 3}))
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre = file
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let pre_tokenizer = match pre {
            // SmolLM: every digit is its own pre-token, then GPT-2 byte-level splitting.
            "smollm" => {
                json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
            }
            "default" | "gpt2" => byte_level.clone(),
            other => {
                return Err(ModelError::Unsupported {
                    path: file.path.clone(),
                    what: format!("tokenizer.ggml.pre `{other}` (known: smollm, gpt2, default)"),
                })
            }
        };
        let doc = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": pre_tokenizer, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
        });
        let inner: tokenizers::Tokenizer =
            doc.to_string()
                .parse()
                .map_err(|e: tokenizers::Error| ModelError::Tokenizer {
                    origin: origin.clone(),
                    what: e.to_string(),
                })?;
        let id_text = |key: &str| {
            file.metadata
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string())
        };
        Ok(Self {
            inner,
            eos_token: id_text("tokenizer.ggml.eos_token_id"),
            bos_token: id_text("tokenizer.ggml.bos_token_id"),
            chat_template: file
                .metadata
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
            origin,
        })
    }

    /// Token ids of `text`; special-token strings in the text map to their ids; no BOS/EOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.err(e))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Id of the EOS token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// Fails when the tokenizer can produce ids the model has no embedding for.
    pub fn check_vocab(&self, model_vocab: usize) -> Result<()> {
        let ids = self
            .inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1)
            .max(self.vocab_size());
        if ids > model_vocab {
            return Err(self.err(format!("has {ids} token ids but the model's vocabulary has {model_vocab} rows: they do not belong together")));
        }
        Ok(())
    }
}
