//! Tokenizer construction: from an HF `tokenizer.json` (+ `tokenizer_config.json`), or rebuilt
//! from GGUF metadata (`tokenizer.ggml.*`: byte-level BPE and SentencePiece BPE, [`gguf`]), so a
//! lone `.gguf` file is enough to run.

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{ModelError, Result};
use crate::load::gguf::GgufFile;

pub mod gguf;

/// A tokenizer plus what the chat template and generation need to know about it.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    /// Text of the end-of-sequence token (e.g. `<|im_end|>` for ChatML models).
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    /// Whether the model's tokenizer puts BOS before a text when special tokens are added (HF's
    /// post-processor; GGUF `tokenizer.ggml.add_bos_token`). [`Tokenizer::encode`] never adds
    /// it (chat templates write it); [`Tokenizer::encode_with_special`] does.
    pub add_bos: bool,
    /// The same for EOS after a text.
    pub add_eos: bool,
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
            .field("add_bos", &self.add_bos)
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

/// `tokenizer_config.json`'s `chat_template`: a string, or (as transformers writes several)
/// a list of `{"name", "template"}` of which transformers uses `default`.
fn chat_template_of(cfg: &Json, path: &Path) -> Result<Option<String>> {
    let bad = |what: String| ModelError::config(path, "chat_template", what);
    match cfg.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for (i, t) in list.iter().enumerate() {
                let name = t.get("name").and_then(Json::as_str);
                let text = t.get("template").and_then(Json::as_str);
                let (Some(name), Some(text)) = (name, text) else {
                    return Err(bad(format!(
                        "entry {i} is not a {{\"name\", \"template\"}} object"
                    )));
                };
                if name == "default" {
                    return Ok(Some(text.to_string()));
                }
                names.push(name.to_string());
            }
            Err(bad(format!(
                "holds named templates ({}) but none is named `default`, the one transformers uses",
                names.join(", ")
            )))
        }
        Some(_) => Err(bad("must be a string or a list of named templates".into())),
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
            chat_template_of(&cfg, &cfg_path)?
        };
        // What the post-processor adds, unless tokenizer_config.json says (as transformers reads it).
        let (with, without) = (
            inner.encode("a", true).map_err(|e| ModelError::Tokenizer {
                origin: path.display().to_string(),
                what: e.to_string(),
            })?,
            inner
                .encode("a", false)
                .map_err(|e| ModelError::Tokenizer {
                    origin: path.display().to_string(),
                    what: e.to_string(),
                })?,
        );
        let (with, without) = (with.get_ids(), without.get_ids());
        let added = with.len() > without.len();
        let post_bos = added && with.first() != without.first();
        let post_eos = added && with.last() != without.last();
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(Json::as_bool)
            .unwrap_or(post_bos);
        let add_eos = cfg
            .get("add_eos_token")
            .and_then(Json::as_bool)
            .unwrap_or(post_eos);
        Ok(Self {
            inner,
            eos_token: token_text(cfg.get("eos_token")),
            bos_token: token_text(cfg.get("bos_token")),
            add_bos,
            add_eos,
            chat_template,
            origin: path.display().to_string(),
        })
    }

    /// Rebuilds the tokenizer from GGUF metadata: byte-level BPE (`tokenizer.ggml.model = gpt2`,
    /// the splits of `tokenizer.ggml.pre`) or SentencePiece BPE (`llama`); see [`gguf`].
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        gguf::from_gguf(file)
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

    /// Token ids of `text` as HF's `encode(text)` gives them with special tokens added: BOS first
    /// when [`Tokenizer::add_bos`], EOS last when [`Tokenizer::add_eos`]. For plain text (no
    /// chat template); special-token strings in the text map to their ids.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(|e| self.err(e))?
            .get_ids()
            .to_vec())
    }

    /// Id of the BOS token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn named_chat_templates_pick_default() {
        let p = Path::new("tokenizer_config.json");
        let cfg = json!({"chat_template": [
            {"name": "tool_use", "template": "T"},
            {"name": "default", "template": "D"},
        ]});
        assert_eq!(chat_template_of(&cfg, p).unwrap().as_deref(), Some("D"));
        let cfg = json!({"chat_template": [{"name": "rag", "template": "R"}]});
        let e = chat_template_of(&cfg, p).unwrap_err().to_string();
        assert!(e.contains("rag") && e.contains("default"), "{e}");
        let cfg = json!({"chat_template": 3});
        assert!(chat_template_of(&cfg, p).is_err());
        assert_eq!(chat_template_of(&json!({}), p).unwrap(), None);
    }
}
