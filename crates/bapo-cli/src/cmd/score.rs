//! `bapo score`: Summed completion log-probs of chosen / rejected / base responses (TRL's rule).

use crate::prelude::*;

/// Summed completion log-probs of chosen / rejected / base responses (TRL's rule).
#[derive(clap::Args)]
pub struct Args {
    /// HF checkpoint directory or `.gguf` file.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL with `prompt`, `chosen`, `rejected` and optional `base` strings.
    #[arg(long)]
    pub input: PathBuf,
    /// Output JSONL, one line per input line.
    #[arg(long)]
    pub output: PathBuf,
    /// Examples per forward pass (each is 2–3 sequences).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Chat-template arguments as a JSON object, e.g. '{"enable_thinking": false}' for Qwen3
    /// (transformers' `apply_chat_template(**kwargs)`).
    #[arg(long, value_parser = super::template_kwargs, default_value = "{}")]
    pub chat_template_kwargs: bapo_data::TemplateKwargs,
}

pub fn run<B: Backend>(args: Args, device: B::Device) -> Result<()> {
    let Args {
        model,
        input,
        output,
        batch_size,
        chat_template_kwargs,
    } = args;
    let examples = bapo_data::read_score_file(&input)?;
    let t0 = Instant::now();
    let loaded = load_pretrained::<B>(&model, &device)?;
    tracing::info!(model = %model.display(), params = loaded.config.num_params(), secs = t0.elapsed().as_secs_f32(), "model loaded");
    let tok = &loaded.tokenizer;
    let template = bapo_train::chat_template(tok).with_kwargs(chat_template_kwargs);
    let pad_id = tok.eos_id().context("the tokenizer has no EOS token")?;
    let scorer = Scorer {
        model: &loaded.model,
        device: device.clone(),
        pad_id,
        context: loaded.config.max_position_embeddings,
    };
    let bar = ProgressBar::new(examples.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} examples [{elapsed} < {eta}]")
            .expect("template"),
    );
    let t1 = Instant::now();
    let rows = score_examples(&scorer, tok, &template, &examples, batch_size, |n| {
        bar.set_position(n as u64)
    })
    .with_context(|| format!("scoring {}", input.display()))?;
    bar.finish_and_clear();
    let secs = t1.elapsed().as_secs_f64();
    let tokens: usize = rows
        .iter()
        .map(|r| r.tokens_chosen + r.tokens_rejected + r.tokens_base.unwrap_or(0))
        .sum();
    let mut text = String::new();
    for r in &rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    write_atomic(&output, text.as_bytes())
        .with_context(|| format!("writing {}", output.display()))?;
    tracing::info!(
        examples = rows.len(),
        completion_tokens = tokens,
        secs,
        "scored; wrote {}",
        output.display()
    );
    Ok(())
}
