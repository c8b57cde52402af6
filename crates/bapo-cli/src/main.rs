//! The `bapo` binary. The only place a Burn backend is named: every command is written once,
//! generic over `B: Backend`, and `--backend` picks the instantiation.

mod cmd;
mod dist;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use bapo_eval::gate::GateSpec;
use bapo_run::{run_anchors, run_eval, RunConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::{Parser, Subcommand, ValueEnum};

/// What the command modules (`cmd/`) share: the common imports and this file's helpers.
mod prelude {
    pub(crate) use std::path::PathBuf;
    pub(crate) use std::time::Instant;

    pub(crate) use anyhow::{Context, Result};
    pub(crate) use bapo_data::Message;
    pub(crate) use bapo_model::{generate, load_pretrained, GenerationConfig};
    pub(crate) use bapo_run::run::write_atomic;
    pub(crate) use bapo_run::RunConfig;
    pub(crate) use bapo_train::{score_examples, Scorer};
    pub(crate) use burn::tensor::backend::Backend;
    pub(crate) use indicatif::{ProgressBar, ProgressStyle};

    pub(crate) use crate::Job;
}

#[derive(Parser)]
#[command(
    name = "bapo",
    version,
    about = "Base-anchored preference optimisation for Llama-family models, on any Burn backend"
)]
struct Cli {
    /// Compute backend (must be compiled in: cargo features `flex`, `ndarray`, `wgpu`, `cuda`).
    /// Default: the config's top-level `backend` key, else flex (multi-threaded CPU).
    #[arg(long, value_enum, global = true)]
    backend: Option<BackendKind>,
    /// CPU threads for the flex backend (and ndarray built with `ndarray-threads`). Default:
    /// `RAYON_NUM_THREADS`, else one per logical core. On CPU backends, products of at most 8
    /// rows (decoding) are computed as two input halves on up to this many threads
    /// (`bapo_model::split`; the same numbers at any thread count).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Independent batches computed at once, each on its own thread: the reference pass,
    /// generation, knowledge scoring, held-out evaluation, and a step's micro-batches (unless
    /// `train.micro_batch_threads` says otherwise). Numbers do not depend on it. Default: 2 on
    /// CPU backends (burn-flex runs element-wise ops on the calling thread, so two passes keep
    /// two cores busy), 1 on GPUs. 1 halves the activation memory of concurrent passes.
    #[arg(long, global = true)]
    concurrent: Option<usize>,
    /// Compute every row of a preference batch as a full sequence, instead of each prompt
    /// once for its chosen, rejected and base rows (the default; log-probs agree to float
    /// rounding, a third less work in the benches' batch). Caches record which was used.
    #[arg(long, global = true)]
    no_prompt_sharing: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum BackendKind {
    Ndarray,
    Flex,
    Wgpu,
    Cuda,
}

#[derive(Subcommand)]
enum Cmd {
    /// Summed completion log-probs of chosen / rejected / base responses (TRL's rule).
    Score(cmd::score::Args),
    /// Personalise a model with BAPO (LoRA), as described by a TOML config.
    Train(cmd::train::Args),
    /// The forgetting experiment: design A (each user alone, no profile turn) and design B
    /// (users mixed); DPO over β, BAPO over λ, DPO + NLL and rehearsal on the same data, seed
    /// and budget; writes compare.json, compare.md and figures (heterogeneity, trade-off).
    Compare(cmd::compare::Args),
    /// Only the base responses: the frozen reference answers every training prompt; writes
    /// `anchors.jsonl` (prompt, base response, token count, reference log-prob) and the caches
    /// `bapo train` reuses.
    Anchor(cmd::anchor::Args),
    /// Drift and knowledge report: the base model and (with --adapter) the personalised one on
    /// held-out preference accuracy, anchor drift, token KL, output drift and every knowledge
    /// item (raw and chat formats). Prints a table, writes report.json.
    Eval(cmd::eval::Args),
    /// Merge a LoRA adapter into the base weights and write an HF checkpoint directory
    /// (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that HF
    /// transformers and `bapo --model` load.
    Export(cmd::export::Args),
    /// Personalisation pairs from the model's own answers: each prompt answered once per pole
    /// of each dimension (e.g. concise / detailed), labelled by checkable rules.
    Synth(cmd::synth::Args),
    /// Continue prompts (chat-templated) with the KV cache; prints JSONL.
    Generate(cmd::generate::Args),
    /// An OpenAI-compatible HTTP server: one base model, every user's LoRA adapter over it
    /// (`model: "bapo/<user>"` or the `user` field; `bapo/base` for the base model).
    Serve(cmd::serve::Args),
}

/// Whether log lines carry ANSI colours: on a terminal, unless `NO_COLOR` is set and non-empty.
fn colour_logs(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

fn main() {
    // Under MPI only rank 0 logs at `info`; the others say only what goes wrong.
    let level = match dist::launcher_rank() {
        Some(r) if r > 0 && std::env::args().any(|a| a == "--mpi") => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal, never with NO_COLOR set (https://no-color.org).
        .with_ansi(colour_logs(
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
            std::env::var_os("NO_COLOR"),
        ))
        .init();
    let cli = Cli::parse();
    // Ctrl-C during training: finish the step, save a checkpoint, exit 130. Outside training
    // (or a second Ctrl-C) exit at once: every file is written through a temp file and a rename,
    // so nothing is left half-written.
    let _ = ctrlc::set_handler(|| {
        static PRESSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if PRESSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("interrupted");
            std::process::exit(130);
        }
        if bapo_serve::request_shutdown() {
            eprintln!("Ctrl-C: finishing in-flight requests (Ctrl-C again to quit now)");
            return;
        }
        if !bapo_train::train::request_stop() {
            eprintln!("interrupted");
            std::process::exit(130);
        }
        eprintln!(
            "Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)"
        );
    });
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e:#}");
        let interrupted = format!("{e}").starts_with("interrupted after step");
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}

/// The `--config` file of the command, if it has one.
fn config_path(cmd: &Cmd) -> Option<&PathBuf> {
    match cmd {
        Cmd::Train(cmd::train::Args { run, .. })
        | Cmd::Eval(cmd::eval::Args { run, .. })
        | Cmd::Anchor(cmd::anchor::Args { run, .. }) => Some(&run.config),
        Cmd::Compare(cmd::compare::Args { config, .. }) => Some(config),
        _ => None,
    }
}

/// The backend when neither `--backend` nor the config names one: flex when compiled in.
const DEFAULT_BACKEND: BackendKind = if cfg!(feature = "flex") {
    BackendKind::Flex
} else {
    BackendKind::Ndarray
};

/// `--backend`, else the config's `backend` key, else [`DEFAULT_BACKEND`].
fn backend(cli: &Cli) -> Result<BackendKind> {
    if let Some(b) = cli.backend {
        return Ok(b);
    }
    let Some(path) = config_path(&cli.command) else {
        return Ok(DEFAULT_BACKEND);
    };
    // A missing or malformed file is reported by the command itself with line numbers.
    let Ok(table) = std::fs::read_to_string(path)
        .map_err(|_| ())
        .and_then(|t| t.parse::<toml::Table>().map_err(|_| ()))
    else {
        return Ok(DEFAULT_BACKEND);
    };
    match table.get("backend") {
        None => Ok(DEFAULT_BACKEND),
        Some(toml::Value::String(s)) => BackendKind::from_str(s, true).map_err(|_| {
            anyhow::anyhow!(
                "{}: `backend = \"{s}\"`: expected ndarray, flex, wgpu or cuda",
                path.display()
            )
        }),
        Some(v) => bail!(
            "{}: `backend` must be a string, got a {}",
            path.display(),
            v.type_str()
        ),
    }
}

/// `--devices` of `bapo train`, if given.
fn device_list(cmd: &Cmd) -> Option<&[String]> {
    match cmd {
        Cmd::Train(cmd::train::Args {
            devices: Some(d), ..
        }) => Some(d),
        _ => None,
    }
}

fn dispatch(mut cli: Cli) -> Result<()> {
    // `--no-prompt-sharing` is the config key `train.prompt_sharing = false`, passed down with
    // the config (caches record it), for every command that reads one.
    if cli.no_prompt_sharing {
        if let Cmd::Train(cmd::train::Args {
            run: cmd::ConfigArgs { set, .. },
            ..
        })
        | Cmd::Eval(cmd::eval::Args {
            run: cmd::ConfigArgs { set, .. },
            ..
        })
        | Cmd::Anchor(cmd::anchor::Args {
            run: cmd::ConfigArgs { set, .. },
            ..
        })
        | Cmd::Compare(cmd::compare::Args { set, .. }) = &mut cli.command
        {
            set.push("train.prompt_sharing=false".into());
        }
    }
    let (kind, indices) = match device_list(&cli.command) {
        Some(list) => {
            let (k, indices) = dist::parse_devices(list)?;
            if let Some(b) = cli.backend.filter(|&b| b != k) {
                bail!("--devices names {k:?} devices but --backend is {b:?}");
            }
            (k, indices)
        }
        None => (backend(&cli)?, vec![0]),
    };
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads: setting up the thread pool")?;
    }
    let threads = rayon::current_num_threads();
    // Two batches or micro-batches at once keep both cores of a CPU busy (burn-flex runs
    // element-wise ops on the calling thread; bapo_train::concurrent). GPUs keep one.
    let micro = match (cli.concurrent, kind) {
        (Some(0), _) => bail!("--concurrent must be at least 1"),
        (Some(n), _) => n,
        (None, BackendKind::Flex | BackendKind::Ndarray) => threads.min(2),
        (None, BackendKind::Wgpu | BackendKind::Cuda) => 1,
    };
    bapo_train::concurrent::set_default_threads(micro);
    // Products of a few rows (decoding) cut into input halves over the pool's threads: one
    // thread alone cannot read the weights as fast as memory delivers them (bapo_model::split;
    // the same numbers at any thread count). Off (0) on GPUs.
    let split = match kind {
        BackendKind::Flex | BackendKind::Ndarray => threads,
        BackendKind::Wgpu | BackendKind::Cuda => 0,
    };
    bapo_model::split::set_split_threads(split);
    tracing::info!(backend = ?kind, threads, concurrent = micro, split, prompt_sharing = !cli.no_prompt_sharing, "compute backend");
    // A CPU backend has one device: its peers share it (a test of the wiring, no speed-up).
    let cpu = |i: usize| {
        if i == 0 {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "--devices: {kind:?} has one device, index 0 (got {i})"
            ))
        }
    };
    if let (
        BackendKind::Ndarray,
        Cmd::Generate(cmd::generate::Args { weights, .. })
        | Cmd::Serve(cmd::serve::Args { weights, .. }),
    ) = (kind, &cli.command)
    {
        if !matches!(weights.as_str(), "f32" | "gguf") {
            anyhow::bail!(
                "--weights {weights}: burn-ndarray 0.21 has no f16 tensors; use --backend flex (the default), wgpu or cuda"
            );
        }
    }
    match kind {
        BackendKind::Ndarray => {
            #[cfg(feature = "ndarray")]
            return run::<burn::backend::Autodiff<burn::backend::NdArray>>(
                cli.command,
                indices
                    .iter()
                    .map(|&i| cpu(i).map(|_| Default::default()))
                    .collect::<Result<_>>()?,
            );
        }
        BackendKind::Flex => {
            #[cfg(feature = "flex")]
            return run::<burn::backend::Autodiff<burn::backend::Flex>>(
                cli.command,
                indices
                    .iter()
                    .map(|&i| cpu(i).map(|_| Default::default()))
                    .collect::<Result<_>>()?,
            );
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            return run::<burn::backend::Autodiff<burn::backend::Wgpu>>(
                cli.command,
                indices
                    .iter()
                    .map(|&i| match i {
                        0 => burn::backend::wgpu::WgpuDevice::DefaultDevice,
                        i => burn::backend::wgpu::WgpuDevice::DiscreteGpu(i),
                    })
                    .collect(),
            );
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            return run::<burn::backend::Autodiff<burn::backend::Cuda>>(
                cli.command,
                indices
                    .iter()
                    .map(|&i| burn::backend::cuda::CudaDevice::new(i))
                    .collect(),
            );
        }
    }
    #[allow(unreachable_code)]
    {
        let feature = format!("{kind:?}").to_lowercase();
        bail!("backend `{feature}` is not compiled into this binary: rebuild with `cargo build --release -p bapo-cli --features {feature}`")
    }
}

/// The autodiff-backed jobs `infer` hands back to `run`.
enum Job {
    Anchors,
    Eval {
        adapter: Option<PathBuf>,
        report: PathBuf,
        gate: Option<GateSpec>,
    },
    Train {
        resume: bool,
        mpi: bool,
    },
    PerUser(bapo_run::per_user::PerUser, bapo_run::per_user::Job),
    Compare {
        config: PathBuf,
        spec: bapo_lab::compare::CompareSpec,
    },
}

/// Every command, generic over an autodiff backend; inference uses its inner backend. Every
/// command but data-parallel `train` uses the first of `devices`.
fn run<A: AutodiffBackend>(cmd: Cmd, devices: Vec<A::Device>) -> Result<()> {
    let device = devices[0].clone();
    infer::<A::InnerBackend>(cmd, device, |cfg, device, job| {
        let res = match job {
            Job::Anchors => run_anchors::<A>(cfg, device),
            Job::Eval {
                adapter,
                report,
                gate,
            } => run_eval::<A>(cfg, device, adapter, report, gate),
            Job::Train { resume, mpi } => dist::train::<A>(cfg, &devices, resume, mpi),
            Job::PerUser(spec, job) => {
                bapo_run::per_user::run_per_user::<A>(cfg, device, &spec, job)
            }
            Job::Compare { config, spec } => {
                bapo_lab::compare::run_compare::<A>(&config, &spec, device).map(|md| {
                    println!("{md}");
                    spec.out.join("compare.md")
                })
            }
        };
        res.map_err(|e| anyhow::anyhow!("{e}"))
    })
}

fn infer<B: Backend>(
    cmd: Cmd,
    device: B::Device,
    trainer: impl FnOnce(&RunConfig, &B::Device, Job) -> Result<PathBuf>,
) -> Result<()> {
    match cmd {
        Cmd::Score(a) => cmd::score::run::<B>(a, device),
        Cmd::Train(a) => cmd::train::run::<B>(a, device, trainer),
        Cmd::Compare(a) => cmd::compare::run::<B>(a, device, trainer),
        Cmd::Anchor(a) => cmd::anchor::run::<B>(a, device, trainer),
        Cmd::Eval(a) => cmd::eval::run::<B>(a, device, trainer),
        Cmd::Export(a) => cmd::export::run::<B>(a, device),
        Cmd::Synth(a) => cmd::synth::run::<B>(a, device),
        Cmd::Generate(a) => cmd::generate::run::<B>(a, device),
        Cmd::Serve(a) => cmd::serve::run::<B>(a, device),
    }
}
