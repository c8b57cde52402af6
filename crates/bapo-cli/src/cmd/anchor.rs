//! `bapo anchor`: Only the base responses: the frozen reference answers every training prompt; writes
//! `anchors.jsonl` (prompt, base response, token count, reference log-prob) and the caches
//! `bapo train` reuses.

use crate::prelude::*;

/// Only the base responses: the frozen reference answers every training prompt; writes
/// `anchors.jsonl` (prompt, base response, token count, reference log-prob) and the caches
/// `bapo train` reuses.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run<B: Backend>(
    args: Args,
    device: B::Device,
    trainer: impl FnOnce(&RunConfig, &B::Device, Job) -> Result<PathBuf>,
) -> Result<()> {
    let Args {
        config,
        output,
        set,
    } = args;
    let mut cfg = RunConfig::from_file_with(&config, &set)?;
    if let Some(o) = output {
        cfg.output.dir = o;
    }
    println!("{}", trainer(&cfg, &device, Job::Anchors)?.display());
    Ok(())
}
