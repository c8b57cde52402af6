//! `bapo synth`: Personalisation pairs from the model's own answers: each prompt answered once per pole of
//! each dimension (e.g.

use crate::prelude::*;

/// Personalisation pairs from the model's own answers: each prompt answered once per pole
/// of each dimension (e.g. concise / detailed), labelled by checkable rules.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL of `{"prompt", "split": "train"|"test", ...provenance}`.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Directory for responses.jsonl, train.jsonl, test.jsonl, synth.json.
    #[arg(long)]
    pub out: PathBuf,
    /// informativeness, expertise, style (repeatable).
    #[arg(long = "dimension", default_values_t = vec!["informativeness".to_string()])]
    pub dimensions: Vec<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

pub fn run<B: Backend>(args: Args, device: B::Device) -> Result<()> {
    let Args {
        model,
        prompts,
        out,
        dimensions,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        batch_size,
    } = args;
    let loaded = load_pretrained::<B>(&model, &device)?;
    let cfg = bapo_lab::synth::SynthConfig {
        dimensions,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        batch_size,
    };
    let counts = bapo_lab::synth::run_synth(&loaded, &model, &prompts, &out, &cfg, &device)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}", serde_json::to_string_pretty(&counts)?);
    Ok(())
}
