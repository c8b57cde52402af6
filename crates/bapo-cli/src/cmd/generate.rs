//! `bapo generate`: Continue prompts (chat-templated) with the KV cache; prints JSONL.

use crate::prelude::*;

/// Continue prompts (chat-templated) with the KV cache; prints JSONL.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// A prompt (repeatable); batched together.
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Feed the prompt as raw text instead of through the chat template.
    #[arg(long)]
    pub raw: bool,
    /// A trained adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// `f16` (or `bf16`) keeps the projection, embedding and head weights in that type
    /// (batch-1 decoding reads half the bytes a token; `bf16` is `model.base_dtype`'s path);
    /// `gguf` keeps a GGUF file's quantised weights in their blocks (Q4_K: about an eighth).
    #[arg(long, default_value = "f32")]
    pub weights: String,
    /// Chat-template arguments as a JSON object, e.g. '{"enable_thinking": false}' for Qwen3
    /// (transformers' `apply_chat_template(**kwargs)`).
    #[arg(long, value_parser = super::template_kwargs, default_value = "{}")]
    pub chat_template_kwargs: bapo_data::TemplateKwargs,
}

pub fn run<B: Backend>(args: Args, device: B::Device) -> Result<()> {
    let Args {
        model,
        prompt,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        raw,
        adapter,
        weights,
        chat_template_kwargs,
    } = args;
    let base = bapo_model::precision::parse_base_weights("--weights", &weights)
        .map_err(anyhow::Error::msg)?;
    // Each base weight is cast as it is built (no f32 model beside its cast copy); adapters
    // stay f32.
    let mut loaded = bapo_model::load_base::<B>(&model, base, &device)?;
    if let Some(dir) = adapter {
        loaded.model = bapo_train::lora::load_adapter_dir(loaded.model, &dir, &device)?;
    }
    let tok = &loaded.tokenizer;
    let template = bapo_train::chat_template(tok).with_kwargs(chat_template_kwargs);
    let mut prompts = Vec::new();
    for p in &prompt {
        let text = if raw {
            p.clone()
        } else {
            template.render(&[Message::user(p.clone())], true)?
        };
        let ids = tok.encode(&text)?;
        let context = loaded.config.max_position_embeddings;
        if ids.len() + max_new_tokens > context {
            anyhow::bail!(
                    "--prompt #{}: {} prompt tokens + --max-new-tokens {max_new_tokens} exceed the model's context of {context} positions (max_position_embeddings)",
                    prompts.len() + 1,
                    ids.len()
                );
        }
        prompts.push(ids);
    }
    let mut eos_ids = loaded.config.eos_token_ids.clone();
    eos_ids.extend(tok.eos_id());
    let cfg = GenerationConfig {
        max_new_tokens,
        temperature,
        top_p,
        seed,
        eos_ids,
    };
    let t0 = Instant::now();
    let out = generate(&loaded.model, &prompts, &cfg, &device);
    let secs = t0.elapsed().as_secs_f64();
    let n: usize = out.iter().map(|o| o.tokens.len()).sum();
    for (p, o) in prompt.iter().zip(&out) {
        let line = serde_json::json!({"prompt": p, "completion": tok.decode(&o.tokens)?, "ids": o.tokens, "stopped_on_eos": o.stopped_on_eos});
        println!("{line}");
    }
    tracing::info!(
        new_tokens = n,
        secs,
        tokens_per_s = n as f64 / secs,
        "generated"
    );
    Ok(())
}
