//! `bapo export`: Merge a LoRA adapter into the base weights and write an HF checkpoint directory
//! (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that HF
//! transformers and `bapo --model` load.

use crate::prelude::*;

/// Merge a LoRA adapter into the base weights and write an HF checkpoint directory
/// (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that HF
/// transformers and `bapo --model` load.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory (PEFT layout); without it the base model is converted as is.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run<B: Backend>(args: Args, device: B::Device) -> Result<()> {
    let Args {
        model,
        adapter,
        out,
    } = args;
    let mut loaded = load_pretrained::<B>(&model, &device)?;
    if let Some(dir) = adapter {
        loaded.model = bapo_train::lora::load_adapter_dir(loaded.model, &dir, &device)?;
    }
    bapo_model::export::save_pretrained(&loaded.model, &loaded.config, &loaded.tokenizer, &out)?;
    println!("{}", out.display());
    Ok(())
}
