//! `bapo anchor`: Only the base responses: the frozen reference answers every training prompt; writes
//! `anchors.jsonl` (prompt, base response, token count, reference log-prob) and the caches
//! `bapo train` reuses.

use crate::prelude::*;

/// Only the base responses: the frozen reference answers every training prompt; writes
/// `anchors.jsonl` (prompt, base response, token count, reference log-prob) and the caches
/// `bapo train` reuses.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub run: super::ConfigArgs,
}

pub fn run<B: Backend>(
    args: Args,
    device: B::Device,
    trainer: impl FnOnce(&RunConfig, &B::Device, Job) -> Result<PathBuf>,
) -> Result<()> {
    let cfg = args.run.load()?;
    println!("{}", trainer(&cfg, &device, Job::Anchors)?.display());
    Ok(())
}
