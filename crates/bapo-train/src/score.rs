//! Completion log-probs under the chat template, TRL's rule: the prompt is one user message
//! rendered with the generation prompt; each completion is tokenised on its own and followed by
//! the tokenizer's EOS token; the log-prob is summed over the completion tokens only.

use bapo_data::preference::{completion_ids, prompt_ids, EncodeError};
use bapo_data::{ChatTemplate, Message, PreferenceBatch, ScoreExample};
use bapo_model::{Llama, Tokenizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use serde::Serialize;

/// Why scoring failed.
#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("the tokenizer has no EOS token to end completions with ({0})")]
    NoEos(String),
    #[error("line {line}: {what} is {len} tokens, beyond the model's context of {context} positions (max_position_embeddings); shorten it")]
    TooLong {
        line: usize,
        what: &'static str,
        len: usize,
        context: usize,
    },
}

/// A prompt and one completion, as token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedCompletion {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
}

/// `tokenizer.encode` as the closure `bapo-data` expects.
pub fn encoder(tokenizer: &Tokenizer) -> impl Fn(&str) -> Result<Vec<u32>, String> + '_ {
    move |text| tokenizer.encode(text).map_err(|e| e.to_string())
}

/// Tokenises `prompt` (chat-templated) and `completion` (+ EOS) the way `bapo score` does.
pub fn encode_pair(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    prompt: &[Message],
    completion: &str,
    line: usize,
) -> Result<EncodedCompletion, ScoreError> {
    let eos = tokenizer
        .eos_id()
        .ok_or_else(|| ScoreError::NoEos(tokenizer.origin.clone()))?;
    let encode = encoder(tokenizer);
    Ok(EncodedCompletion {
        prompt_ids: prompt_ids(template, &encode, prompt, line)?,
        completion_ids: completion_ids(&encode, completion, eos, line)?,
    })
}

/// One output line of `bapo score`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScoreRow {
    pub line: usize,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    #[serde(rename = "logps/base", skip_serializing_if = "Option::is_none")]
    pub logps_base: Option<f64>,
    pub tokens_chosen: usize,
    pub tokens_rejected: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_base: Option<usize>,
}

/// Scores batches of encoded sequences with one model.
pub struct Scorer<'a, B: Backend> {
    pub model: &'a Llama<B>,
    pub device: B::Device,
    /// Token used to right-pad (never scored).
    pub pad_id: u32,
    /// The model's context (`max_position_embeddings`): longer sequences are refused before
    /// anything is allocated for them.
    pub context: usize,
}

impl<B: Backend> Scorer<'_, B> {
    /// Summed completion log-prob and per-token log-probs of each sequence, one forward pass
    /// for the whole batch (right-padded, padding masked out of attention and the sum).
    pub fn score(&self, seqs: &[EncodedCompletion]) -> Vec<(f64, Vec<f32>)> {
        let b = seqs.len();
        if b == 0 {
            return Vec::new();
        }
        let rows: Vec<(&[u32], &[u32])> = seqs
            .iter()
            .map(|s| (s.prompt_ids.as_slice(), s.completion_ids.as_slice()))
            .collect();
        let batch = PreferenceBatch::from_sequences(&rows, self.pad_id, 0, false);
        let (d, len) = (&self.device, batch.len);
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(batch.tokens.clone(), [b, len]), d);
        let attn = Tensor::<B, 2, Bool>::from_data(TensorData::new(batch.attention, [b, len]), d);
        let out = crate::train::completion_logps(
            self.model,
            tokens,
            attn,
            &batch.tokens,
            &batch.completion_mask,
            d,
        );
        let sums = out.sum.into_data().to_vec::<f32>().expect("f32");
        let tok = out.token.into_data().to_vec::<f32>().expect("f32");
        seqs.iter()
            .enumerate()
            .map(|(r, s)| {
                // token[:, j] scores tokens[:, j + 1]: the completion starts at j = prompt_len - 1.
                let start = r * (len - 1) + s.prompt_ids.len() - 1;
                (
                    sums[r] as f64,
                    tok[start..start + s.completion_ids.len()].to_vec(),
                )
            })
            .collect()
    }
}

/// Scores examples `batch_size` at a time; `progress` is called with the number done.
pub fn score_examples<B: Backend>(
    scorer: &Scorer<'_, B>,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    examples: &[ScoreExample],
    batch_size: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<ScoreRow>, ScoreError> {
    let mut rows = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let mut seqs = Vec::new();
        for ex in chunk {
            let parts = [
                ("prompt + chosen", Some(&ex.chosen)),
                ("prompt + rejected", Some(&ex.rejected)),
                ("prompt + base", ex.base.as_ref()),
            ];
            for (what, text) in parts {
                let Some(text) = text else { continue };
                let e = encode_pair(tokenizer, template, &ex.prompt, text, ex.line)?;
                let len = e.prompt_ids.len() + e.completion_ids.len();
                if len > scorer.context {
                    return Err(ScoreError::TooLong {
                        line: ex.line,
                        what,
                        len,
                        context: scorer.context,
                    });
                }
                seqs.push(e);
            }
        }
        let scores = scorer.score(&seqs);
        let mut k = 0;
        for ex in chunk {
            let mut next = || {
                k += 1;
                (scores[k - 1].0, seqs[k - 1].completion_ids.len())
            };
            let (c, nc) = next();
            let (r, nr) = next();
            let base = ex.base.as_ref().map(|_| next());
            rows.push(ScoreRow {
                line: ex.line,
                logps_chosen: c,
                logps_rejected: r,
                logps_base: base.map(|b| b.0),
                tokens_chosen: nc,
                tokens_rejected: nr,
                tokens_base: base.map(|b| b.1),
            });
        }
        progress(rows.len());
    }
    Ok(rows)
}
