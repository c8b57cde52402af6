//! Batched generation with a progress bar: decoded texts, and the reference's base responses
//! (prompts cut and checked against the context first).

use bapo_data::{BaseResponse, ChatTemplate, EncodeConfig, PreferenceExample};
use bapo_model::{generate, GenerationConfig, Llama, Tokenizer};
use burn::tensor::backend::Backend;

use crate::config::RunConfig;
use bapo_train::concurrent::default_threads;
use bapo_train::io::{bar, RunError};

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

/// Generates continuations of `prompts`, `batch` prompts at a time
/// ([`default_threads`] batches at once), with a progress bar. Batch `i` uses seed
/// `cfg.seed + i`, so sampled outputs are reproducible and do not depend on the thread count.
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
    let chunks: Vec<(usize, &[Vec<u32>])> = prompts.chunks(batch.max(1)).enumerate().collect();
    let one = |&(i, chunk): &(usize, &[Vec<u32>])| -> Result<Vec<GeneratedText>, RunError> {
        let c = GenerationConfig {
            seed: cfg.seed.wrapping_add(i as u64),
            ..cfg.clone()
        };
        generate(model, chunk, &c, device)
            .into_iter()
            .map(|g| {
                let mut ids = g.tokens;
                if g.stopped_on_eos {
                    ids.pop();
                }
                Ok(GeneratedText {
                    text: tok.decode(&ids)?,
                    tokens: ids.len(),
                    ids,
                    eos: g.stopped_on_eos,
                })
            })
            .collect()
    };
    let parts = bapo_train::concurrent::map_ordered(&chunks, default_threads(), one, |i, _| {
        pb.inc(chunks[i].1.len() as u64)
    });
    pb.finish_and_clear();
    let mut out = Vec::with_capacity(prompts.len());
    for p in parts {
        out.extend(p?);
    }
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

/// The reference's base responses for `examples` (the `n_train` training examples first, then
/// the held-out ones): each prompt cut by `data.max_prompt_length` as the policy sees it,
/// refused with its file and line when it and `anchor.max_new_tokens` exceed `context`, then
/// generated as `run.anchor` says. Returns the decoded texts and the responses as generated.
#[allow(clippy::too_many_arguments)]
pub(crate) fn base_responses<B: Backend>(
    reference: &Llama<B>,
    examples: &[&PreferenceExample],
    n_train: usize,
    run: &RunConfig,
    enc_cfg: &EncodeConfig,
    (template, tok): (&ChatTemplate, &Tokenizer),
    eos_ids: Vec<u32>,
    context: usize,
    device: &B::Device,
) -> Result<(Vec<String>, Vec<BaseResponse>), RunError> {
    let encode = bapo_train::encoder(tok);
    let mut prompts = Vec::with_capacity(examples.len());
    for (i, e) in examples.iter().enumerate() {
        let ids = bapo_data::preference::prompt_ids(template, &encode, &e.prompt, e.line)?;
        let ids = enc_cfg.truncate_prompt(ids);
        let need = ids.len() + run.anchor.max_new_tokens;
        if need > context {
            let file = match &run.data.eval {
                Some(eval) if i >= n_train => eval,
                _ => &run.data.train,
            };
            return Err(format!(
                "{}:{}: field `prompt` is {} tokens; with anchor.max_new_tokens = {} the \
                 base response needs {need} positions, beyond the model's context of \
                 {context}; set data.max_prompt_length to truncate prompts",
                file.display(),
                e.line,
                ids.len(),
                run.anchor.max_new_tokens
            )
            .into());
        }
        prompts.push(ids);
    }
    let a = &run.anchor;
    let gcfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        eos_ids,
    };
    let t0 = std::time::Instant::now();
    let (bases, responses) = generate_bases(reference, &prompts, &gcfg, a.batch_size, tok, device)?;
    let n: usize = responses.iter().map(|r| r.ids.len()).sum();
    tracing::info!(
        responses = bases.len(),
        tokens = n,
        tokens_per_s = n as f64 / t0.elapsed().as_secs_f64(),
        "base responses generated"
    );
    Ok((bases, responses))
}
