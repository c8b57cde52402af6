//! One module per `bapo` command: its arguments (`Args`) and what it does (`run`).

pub mod anchor;
pub mod compare;
pub mod eval;
pub mod export;
pub mod generate;
pub mod score;
pub mod serve;
pub mod synth;
pub mod train;

use crate::prelude::*;

/// `--chat-template-kwargs`: a JSON object of chat-template arguments.
pub fn template_kwargs(s: &str) -> Result<bapo_data::TemplateKwargs, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("expected a JSON object, e.g. '{\"enable_thinking\": false}'".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The run-config arguments of `train`, `eval` and `anchor`.
#[derive(clap::Args)]
pub struct ConfigArgs {
    /// Run configuration (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override `output.dir` (the run directory with the caches, checkpoints and reports).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Override any config value: `--set train.beta=0.2 --set lora.rank=16`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
}

impl ConfigArgs {
    /// The config file with the `--set` overrides and `--output` applied.
    pub fn load(&self) -> Result<RunConfig> {
        let mut cfg = RunConfig::from_file_with(&self.config, &self.set)?;
        if let Some(o) = &self.output {
            cfg.output.dir = o.clone();
        }
        Ok(cfg)
    }
}
