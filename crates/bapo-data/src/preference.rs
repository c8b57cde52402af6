//! Preference data in TRL's two shapes, tokenised, truncated and collated.
//!
//! - standard: `{"prompt": "...", "chosen": "...", "rejected": "..."}`
//! - conversational: `{"prompt": [{"role": "user", "content": "..."}, ...],
//!   "chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}`
//!
//! A conversational pair is rendered as TRL renders it ([`ChatTemplate::pair_texts`]): the
//! completion is what the template writes for the assistant's turn (its end-of-turn included,
//! no EOS added); a standard pair's completion is its text followed by EOS (TRL's rule), after
//! the prompt rendered as one user turn.
//!
//! An optional `"user"` (or `"persona"`) string tags whose preference a pair is, so one file
//! can hold several users. Every malformed line is an error naming `file:line` and the field.

use std::path::Path;

use serde_json::Value;

use crate::chat::{ChatTemplate, Message, TemplateError};
use crate::jsonl::{kind, objects, objects_in, DataError};

/// One preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    /// Conversation up to the answer (ends with a user turn).
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    /// Whose preference this is (`user` or `persona` field).
    pub user: Option<String>,
    /// TRL's conversational shape (`prompt` is a message list): completions are rendered by
    /// the chat template.
    pub conversational: bool,
    /// 1-based line in the source file.
    pub line: usize,
}

pub(crate) fn completion(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    err: &dyn Fn(String) -> DataError,
) -> Result<String, DataError> {
    let text = match obj.get(field) {
        None => return Err(err(format!("field `{field}` is missing"))),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(msgs)) => {
            let [msg] = msgs.as_slice() else {
                return Err(err(format!(
                    "field `{field}` must hold exactly one assistant message, found {}",
                    msgs.len()
                )));
            };
            let m = message(msg, &format!("{field}[0]"), err)?;
            if m.role != "assistant" {
                return Err(err(format!(
                    "field `{field}[0].role` must be `assistant`, found `{}`",
                    m.role
                )));
            }
            m.content
        }
        Some(other) => {
            return Err(err(format!(
                "field `{field}` must be a string or a message list, found {}",
                kind(other)
            )))
        }
    };
    if text.trim().is_empty() {
        return Err(err(format!("field `{field}` is empty")));
    }
    Ok(text)
}

fn message(v: &Value, at: &str, err: &dyn Fn(String) -> DataError) -> Result<Message, DataError> {
    let Value::Object(o) = v else {
        return Err(err(format!(
            "field `{at}` must be a message object, found {}",
            kind(v)
        )));
    };
    let get = |k: &str| match o.get(k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(err(format!(
            "field `{at}.{k}` must be a string, found {}",
            kind(other)
        ))),
        None => Err(err(format!("field `{at}.{k}` is missing"))),
    };
    Ok(Message {
        role: get("role")?,
        content: get("content")?,
    })
}

pub(crate) fn prompt(
    obj: &serde_json::Map<String, Value>,
    err: &dyn Fn(String) -> DataError,
) -> Result<Vec<Message>, DataError> {
    match obj.get("prompt") {
        None => Err(err("field `prompt` is missing".into())),
        Some(Value::String(s)) if s.trim().is_empty() => Err(err("field `prompt` is empty".into())),
        Some(Value::String(s)) => Ok(vec![Message::user(s.clone())]),
        Some(Value::Array(items)) => {
            let msgs: Vec<Message> = items
                .iter()
                .enumerate()
                .map(|(i, m)| message(m, &format!("prompt[{i}]"), err))
                .collect::<Result<_, _>>()?;
            // Optional system turn, then user/assistant alternating, ending with the user.
            let start = usize::from(msgs.first().is_some_and(|m| m.role == "system"));
            for (i, m) in msgs.iter().enumerate().skip(start) {
                let want = if (i - start) % 2 == 0 {
                    "user"
                } else {
                    "assistant"
                };
                if m.role != want {
                    return Err(err(format!("field `prompt[{i}].role` is `{}` but `{want}` was expected (system?, then user/assistant alternating)", m.role)));
                }
            }
            match msgs.last() {
                Some(m) if m.role == "user" => Ok(msgs),
                _ => Err(err("field `prompt` must end with a user message".into())),
            }
        }
        Some(other) => Err(err(format!(
            "field `prompt` must be a string or a message list, found {}",
            kind(other)
        ))),
    }
}

/// Reads a preference JSONL file (blank lines skipped).
pub fn read_preferences(path: &Path) -> Result<Vec<PreferenceExample>, DataError> {
    preference_examples(path, objects(path)?)
}

/// [`read_preferences`] over bytes already in memory; `path` only names them in errors.
pub fn parse_preferences(path: &Path, bytes: &[u8]) -> Result<Vec<PreferenceExample>, DataError> {
    preference_examples(path, objects_in(path, bytes)?)
}

fn preference_examples(
    path: &Path,
    objects: Vec<(usize, crate::jsonl::Object)>,
) -> Result<Vec<PreferenceExample>, DataError> {
    let mut out = Vec::new();
    for (line, obj) in objects {
        let err = |what: String| DataError::Line {
            path: path.into(),
            line,
            what,
        };
        let prompt = prompt(&obj, &err)?;
        let chosen = completion(&obj, "chosen", &err)?;
        let rejected = completion(&obj, "rejected", &err)?;
        if chosen == rejected {
            return Err(err(
                "fields `chosen` and `rejected` are identical: the pair carries no preference"
                    .into(),
            ));
        }
        let user = match obj.get("user").or_else(|| obj.get("persona")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(err(format!(
                    "field `user` must be a string, found {}",
                    kind(other)
                )))
            }
        };
        out.push(PreferenceExample {
            prompt,
            chosen,
            rejected,
            user,
            conversational: matches!(obj.get("prompt"), Some(Value::Array(_))),
            line,
        });
    }
    Ok(out)
}

/// Which end of an over-long prompt survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TruncationMode {
    /// Keep the last tokens (the question, next to the answer). TRL's default.
    #[default]
    KeepEnd,
    KeepStart,
}

/// Length limits.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeConfig {
    /// Max tokens of prompt + completion (each of chosen, rejected, base).
    pub max_length: usize,
    /// Prompts longer than this are truncated (by `truncation_mode`) before anything else.
    pub max_prompt_length: Option<usize>,
    pub truncation_mode: TruncationMode,
}

impl EncodeConfig {
    /// `ids` cut to `max_prompt_length` by `truncation_mode` (unchanged when within it).
    pub fn truncate_prompt(&self, ids: Vec<u32>) -> Vec<u32> {
        match self.max_prompt_length {
            Some(maxp) if ids.len() > maxp => match self.truncation_mode {
                TruncationMode::KeepEnd => ids[ids.len() - maxp..].to_vec(),
                TruncationMode::KeepStart => ids[..maxp].to_vec(),
            },
            _ => ids,
        }
    }
}

/// A pair (and optionally the base response) as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedExample {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub base_ids: Option<Vec<u32>>,
    pub line: usize,
}

/// What truncation did, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TruncationStats {
    pub examples: usize,
    pub examples_truncated: usize,
    pub prompt_tokens_cut: usize,
    pub completion_tokens_cut: usize,
    /// Lines dropped because the prompt alone leaves no room for a completion token.
    pub dropped_prompt_too_long: Vec<usize>,
}

/// Encoding failed on one example.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("line {line}: chat template: {source}")]
    Template {
        line: usize,
        #[source]
        source: TemplateError,
    },
    #[error("line {line}: tokenizer: {what}")]
    Tokenize { line: usize, what: String },
}

/// Completion ids: the text's tokens, then exactly one EOS (an EOS the text already ends with
/// is not doubled).
pub fn completion_ids(
    encode: &dyn Fn(&str) -> Result<Vec<u32>, String>,
    text: &str,
    eos_id: u32,
    line: usize,
) -> Result<Vec<u32>, EncodeError> {
    let mut ids = encode(text).map_err(|what| EncodeError::Tokenize { line, what })?;
    if ids.last() != Some(&eos_id) {
        ids.push(eos_id);
    }
    Ok(ids)
}

/// A base response exactly as the reference produced it: its token ids (EOS excluded, never
/// decoded and re-encoded) and whether generation ended on EOS. A response cut by
/// `max_new_tokens` gets no EOS: the reference never emitted one there, and scoring an EOS it
/// did not produce would reward (or punish) that one unlikely token in the anchor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseResponse {
    pub ids: Vec<u32>,
    /// Generation ended on EOS (`false`: cut by `max_new_tokens`).
    pub eos: bool,
}

impl BaseResponse {
    /// A finished, written answer (fixtures, tests): `text`'s tokens, ending on EOS.
    pub fn from_text(
        encode: &dyn Fn(&str) -> Result<Vec<u32>, String>,
        text: &str,
        eos_id: u32,
        line: usize,
    ) -> Result<Self, EncodeError> {
        let mut ids = completion_ids(encode, text, eos_id, line)?;
        ids.pop();
        Ok(Self { ids, eos: true })
    }

    /// The completion the anchor scores: the ids, then EOS only if the reference emitted it.
    pub fn completion_ids(&self, eos_id: u32) -> Vec<u32> {
        let mut ids = self.ids.clone();
        if self.eos {
            ids.push(eos_id);
        }
        ids
    }
}

/// Prompt ids: the conversation through the chat template, with the generation prompt.
pub fn prompt_ids(
    template: &ChatTemplate,
    encode: &dyn Fn(&str) -> Result<Vec<u32>, String>,
    prompt: &[Message],
    line: usize,
) -> Result<Vec<u32>, EncodeError> {
    let text = template
        .render(prompt, true)
        .map_err(|source| EncodeError::Template { line, source })?;
    encode(&text).map_err(|what| EncodeError::Tokenize { line, what })
}

/// One pair's ids before truncation.
struct Encoded {
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    /// Tokens between the shared prompt and where base responses were generated (the
    /// generation prompt's tail when a template renders it longer than the common prefix).
    base_prefix: Vec<u32>,
}

fn encode_pair_texts(
    ex: &PreferenceExample,
    template: &ChatTemplate,
    encode: &dyn Fn(&str) -> Result<Vec<u32>, String>,
    eos_id: u32,
) -> Result<Encoded, EncodeError> {
    let line = ex.line;
    if !(ex.conversational && template.is_jinja()) {
        return Ok(Encoded {
            prompt: prompt_ids(template, encode, &ex.prompt, line)?,
            chosen: completion_ids(encode, &ex.chosen, eos_id, line)?,
            rejected: completion_ids(encode, &ex.rejected, eos_id, line)?,
            base_prefix: Vec::new(),
        });
    }
    let t = template
        .pair_texts(&ex.prompt, &ex.chosen, &ex.rejected)
        .map_err(|source| EncodeError::Template { line, source })?;
    let enc = |s: &str| encode(s).map_err(|what| EncodeError::Tokenize { line, what });
    Ok(Encoded {
        prompt: enc(&t.prompt)?,
        chosen: enc(&t.chosen)?,
        rejected: enc(&t.rejected)?,
        base_prefix: enc(&t.generation_prompt[t.prompt.len()..])?,
    })
}

/// Tokenises and truncates `examples` (`bases[i]`, when given, is example `i`'s base response).
pub fn encode_examples(
    examples: &[PreferenceExample],
    bases: Option<&[BaseResponse]>,
    template: &ChatTemplate,
    encode: &dyn Fn(&str) -> Result<Vec<u32>, String>,
    eos_id: u32,
    cfg: &EncodeConfig,
) -> Result<(Vec<EncodedExample>, TruncationStats), EncodeError> {
    let mut stats = TruncationStats {
        examples: examples.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let Encoded {
            prompt: full,
            chosen,
            rejected,
            base_prefix,
        } = encode_pair_texts(ex, template, encode, eos_id)?;
        let n = full.len();
        let p = cfg.truncate_prompt(full);
        let mut truncated = p.len() < n;
        stats.prompt_tokens_cut += n - p.len();
        if p.len() >= cfg.max_length {
            stats.dropped_prompt_too_long.push(ex.line);
            continue;
        }
        let room = cfg.max_length - p.len();
        let mut cut = |ids: Vec<u32>| {
            if ids.len() > room {
                stats.completion_tokens_cut += ids.len() - room;
                truncated = true;
                ids[..room].to_vec()
            } else {
                ids
            }
        };
        let chosen_ids = cut(chosen);
        let rejected_ids = cut(rejected);
        let base_ids =
            bases.map(|b| cut([base_prefix.as_slice(), &b[i].completion_ids(eos_id)].concat()));
        stats.examples_truncated += usize::from(truncated);
        out.push(EncodedExample {
            prompt_ids: p,
            chosen_ids,
            rejected_ids,
            base_ids,
            line: ex.line,
        });
    }
    Ok((out, stats))
}

/// Right-padded rows `[chosen…; rejected…; base…]` with attention and completion masks, in
/// host memory (row-major `[rows, len]`), ready to become tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceBatch {
    pub pairs: usize,
    pub has_base: bool,
    pub rows: usize,
    pub len: usize,
    pub tokens: Vec<i64>,
    pub attention: Vec<bool>,
    pub completion_mask: Vec<f32>,
}

impl PreferenceBatch {
    /// Collates examples; base rows are included only when every example has one.
    pub fn collate(examples: &[&EncodedExample], pad_id: u32) -> Self {
        let has_base = !examples.is_empty() && examples.iter().all(|e| e.base_ids.is_some());
        let mut seqs: Vec<(&[u32], &[u32])> = examples
            .iter()
            .map(|e| (e.prompt_ids.as_slice(), e.chosen_ids.as_slice()))
            .collect();
        seqs.extend(
            examples
                .iter()
                .map(|e| (e.prompt_ids.as_slice(), e.rejected_ids.as_slice())),
        );
        if has_base {
            seqs.extend(examples.iter().map(|e| {
                (
                    e.prompt_ids.as_slice(),
                    e.base_ids.as_deref().expect("checked"),
                )
            }));
        }
        Self::from_sequences(&seqs, pad_id, examples.len(), has_base)
    }

    /// Right-pads arbitrary `(prompt, completion)` rows (the scoring pass uses this directly;
    /// `pairs`/`has_base` describe the row layout for [`PreferenceBatch::collate`]'s callers).
    pub fn from_sequences(
        seqs: &[(&[u32], &[u32])],
        pad_id: u32,
        pairs: usize,
        has_base: bool,
    ) -> Self {
        let len = seqs
            .iter()
            .map(|(p, c)| p.len() + c.len())
            .max()
            .unwrap_or(0)
            .max(2);
        let rows = seqs.len();
        let (mut tokens, mut attention, mut completion_mask) = (
            Vec::with_capacity(rows * len),
            Vec::with_capacity(rows * len),
            Vec::with_capacity(rows * len),
        );
        for (p, c) in seqs {
            let n = p.len() + c.len();
            tokens.extend(
                p.iter()
                    .chain(c.iter())
                    .map(|&t| t as i64)
                    .chain(std::iter::repeat_n(pad_id as i64, len - n)),
            );
            attention.extend((0..len).map(|i| i < n));
            completion_mask.extend((0..len).map(|i| if i >= p.len() && i < n { 1.0 } else { 0.0 }));
        }
        Self {
            pairs,
            has_base,
            rows,
            len,
            tokens,
            attention,
            completion_mask,
        }
    }
}
