//! Batched generation with a progress bar: decoded texts and the reference's base responses.

use bapo_data::BaseResponse;
use bapo_model::{generate, GenerationConfig, Llama};
use burn::tensor::backend::Backend;

use crate::io::{bar, RunError};

/// One decoded generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// Decoded without the EOS token.
    pub text: String,
    /// The generated ids, EOS excluded.
    pub ids: Vec<u32>,
    /// New tokens, EOS excluded.
    pub tokens: usize,
    /// Ended on EOS (not cut by `max_new_tokens`).
    pub eos: bool,
}

/// Generates continuations of `prompts`, `batch` prompts at a time, with a progress bar.
/// Batch `i` uses seed `cfg.seed + i`, so sampled outputs are reproducible.
pub fn generate_texts<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    batch: usize,
    tok: &bapo_model::Tokenizer,
    device: &B::Device,
    what: &str,
) -> Result<Vec<GeneratedText>, RunError> {
    let pb = bar(prompts.len(), what);
    let mut out = Vec::with_capacity(prompts.len());
    for (i, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let c = GenerationConfig {
            seed: cfg.seed.wrapping_add(i as u64),
            ..cfg.clone()
        };
        for g in generate(model, chunk, &c, device) {
            let mut ids = g.tokens;
            if g.stopped_on_eos {
                ids.pop();
            }
            out.push(GeneratedText {
                text: tok.decode(&ids)?,
                tokens: ids.len(),
                ids,
                eos: g.stopped_on_eos,
            });
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

/// Generates base responses for `prompts` with the reference, `batch` prompts at a time:
/// the decoded texts and the responses as generated (ids, ended on EOS or not).
pub(crate) fn generate_bases<B: Backend>(
    reference: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    batch: usize,
    tok: &bapo_model::Tokenizer,
    device: &B::Device,
) -> Result<(Vec<String>, Vec<BaseResponse>), RunError> {
    let g = generate_texts(
        reference,
        prompts,
        cfg,
        batch,
        tok,
        device,
        "base responses",
    )?;
    Ok(g.into_iter()
        .map(|g| {
            (
                g.text,
                BaseResponse {
                    ids: g.ids,
                    eos: g.eos,
                },
            )
        })
        .unzip())
}
