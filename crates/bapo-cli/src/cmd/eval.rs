//! `bapo eval`: Drift and knowledge report: the base model and (with --adapter) the personalised one on
//! held-out preference accuracy, anchor drift, token KL, output drift and every knowledge
//! item (raw and chat formats).

use crate::prelude::*;
use anyhow::bail;
use bapo_eval::gate::{Baseline, GateLimits, GateSpec};

/// Drift and knowledge report: the base model and (with --adapter) the personalised one on
/// held-out preference accuracy, anchor drift, token KL, output drift and every knowledge
/// item (raw and chat formats). Prints a table, writes report.json.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub run: super::ConfigArgs,
    /// A LoRA adapter directory (`adapter/`) or a full fine-tuned HF directory (`model/`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Where the JSON report goes (default: `<output.dir>/report.json`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Retention gate: exit non-zero when any knowledge set and format's accuracy fell by
    /// more than this fraction (0.02 = two points), item by item against `--baseline`, else
    /// against the base model. Needs `--adapter`.
    #[arg(long, value_name = "FRACTION")]
    pub max_drop: Option<f64>,
    /// Retention gate: the same for the mean gold margin over the best distractor (nats).
    #[arg(long, value_name = "NATS")]
    pub max_margin_drop: Option<f64>,
    /// The `report.json` of an earlier `bapo eval` (same model, config and knowledge sets)
    /// that the gate compares against: its adapter's results, or its base model's.
    #[arg(long, value_name = "REPORT")]
    pub baseline: Option<PathBuf>,
    /// Evaluate every user trained by `bapo train --per-user`: `users/<user>/adapter` into
    /// `users/<user>/report.{json,html}` (the gate, when given, applies to each), then
    /// `users_report.json` and the index `report.html`.
    #[arg(long, conflicts_with_all = ["adapter", "report"])]
    pub per_user: bool,
    /// With --per-user: only these users (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "per_user")]
    pub users: Option<Vec<String>>,
    /// With --per-user: the users at positions i, i+n, ... (1-based) of the sorted list.
    #[arg(long, value_name = "I/N", requires = "per_user")]
    pub shard: Option<bapo_run::per_user::Shard>,
}

pub fn run<B: Backend>(
    args: Args,
    device: B::Device,
    trainer: impl FnOnce(&RunConfig, &B::Device, Job) -> Result<PathBuf>,
) -> Result<()> {
    let Args {
        run,
        adapter,
        report,
        max_drop,
        max_margin_drop,
        baseline,
        per_user,
        users,
        shard,
    } = args;
    let has_adapter = adapter.is_some() || per_user;
    let gate = gate_spec(max_drop, max_margin_drop, baseline, has_adapter)?;
    let cfg = run.load()?;
    if per_user {
        let spec = bapo_run::per_user::PerUser {
            users,
            shard,
            resume: false,
        };
        let job = Job::PerUser(spec, bapo_run::per_user::Job::Eval { gate });
        println!("{}", trainer(&cfg, &device, job)?.display());
        return Ok(());
    }
    let report = report.unwrap_or_else(|| cfg.output.dir.join("report.json"));
    println!(
        "{}",
        trainer(
            &cfg,
            &device,
            Job::Eval {
                adapter,
                report,
                gate
            }
        )?
        .display()
    );
    Ok(())
}

/// The retention gate from `bapo eval`'s flags (`None` when no limit is given).
fn gate_spec(
    max_drop: Option<f64>,
    max_margin_drop: Option<f64>,
    baseline: Option<PathBuf>,
    has_adapter: bool,
) -> Result<Option<GateSpec>> {
    if let Some(d) = max_drop.filter(|d| !(d.is_finite() && (0.0..=1.0).contains(d))) {
        bail!("--max-drop must be an accuracy fraction in [0, 1], got {d}");
    }
    if let Some(d) = max_margin_drop.filter(|d| !(d.is_finite() && *d >= 0.0)) {
        bail!("--max-margin-drop must be a finite number of nats >= 0, got {d}");
    }
    if max_drop.is_none() && max_margin_drop.is_none() {
        if let Some(b) = baseline {
            bail!(
                "--baseline {} needs a limit: --max-drop and/or --max-margin-drop",
                b.display()
            );
        }
        return Ok(None);
    }
    if !has_adapter {
        bail!(bapo_eval::gate::NEEDS_ADAPTER);
    }
    let baseline = baseline
        .map(|b| Baseline::read(&b))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--baseline: {e}"))?;
    Ok(Some(GateSpec {
        baseline,
        limits: GateLimits {
            max_acc_drop: max_drop,
            max_margin_drop,
        },
    }))
}
