//! The `bapo` binary. The only place a Burn backend is named: every command is written once,
//! generic over `B: Backend`, and `--backend` picks the instantiation.

mod dist;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bapo_data::Message;
use bapo_eval::gate::{Baseline, GateLimits, GateSpec};
use bapo_model::{generate, load_pretrained, GenerationConfig};
use bapo_run::run::write_atomic;
use bapo_run::{run_anchors, run_eval, RunConfig};
use bapo_train::{score_examples, Scorer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

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
    /// rows (decoding) are also cut into this many column ranges computed at once
    /// (`bapo_model::split`; same numbers bit for bit).
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
    Score {
        /// HF checkpoint directory or `.gguf` file.
        #[arg(long)]
        model: PathBuf,
        /// JSONL with `prompt`, `chosen`, `rejected` and optional `base` strings.
        #[arg(long)]
        input: PathBuf,
        /// Output JSONL, one line per input line.
        #[arg(long)]
        output: PathBuf,
        /// Examples per forward pass (each is 2–3 sequences).
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
    },
    /// Personalise a model with BAPO (LoRA), as described by a TOML config.
    Train {
        /// Run configuration (see configs/).
        #[arg(long)]
        config: PathBuf,
        /// Override `output.dir`.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Override `train.max_steps`.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Override any config value: `--set train.beta=0.2 --set lora.rank=16`.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Continue from the newest `checkpoint-N` in the output directory. With --per-user:
        /// skip users that finished, continue the interrupted one.
        #[arg(long)]
        resume: bool,
        /// One adapter per `user` of the data, in turn, into `<output.dir>/users/<user>/`, base
        /// responses and reference log-probs computed once for all (`<output.dir>/shared/`);
        /// ends with `users_summary.json`. Replaces the config's `data.users`.
        #[arg(long)]
        per_user: bool,
        /// With --per-user: only these users (comma-separated).
        #[arg(long, value_delimiter = ',', requires = "per_user")]
        users: Option<Vec<String>>,
        /// With --per-user: train the users at positions i, i+n, i+2n, ... (1-based) of the
        /// sorted list, so that n machines split the users without coordination.
        #[arg(long, value_name = "I/N", requires = "per_user")]
        shard: Option<bapo_run::per_user::Shard>,
        /// Data-parallel training on several devices of this machine, one thread each
        /// (burn-collective): `cuda:0,cuda:1`, or `flex,flex` to try it on a CPU. Each micro-batch
        /// is split between them; the result equals one device's run with the same batch.
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "BACKEND[:INDEX],...",
            conflicts_with = "per_user"
        )]
        devices: Option<Vec<String>>,
        /// Data-parallel training over MPI processes: `mpirun -np N bapo train --mpi …` (or
        /// `srun` under Slurm). Rank 0 logs, evaluates and saves; with --devices, each process
        /// takes the entry at its node-local rank (modulo the list). Needs the `mpi` feature.
        #[arg(long, conflicts_with = "per_user")]
        mpi: bool,
    },
    /// The forgetting experiment: design A (each user alone, no profile turn) and design B
    /// (users mixed); DPO over β, BAPO over λ, DPO + NLL and rehearsal on the same data, seed
    /// and budget; writes compare.json, compare.md and figures (heterogeneity, trade-off).
    Compare {
        /// Base run configuration (configs/compare.toml).
        #[arg(long)]
        config: PathBuf,
        /// A small version that shows the pipeline (≤ 20 min on 2 CPU cores): design A for
        /// three users, DPO and BAPO λ 1, one seed, 16 training / 8 held-out pairs, 6 steps of
        /// 2 pairs at a 4× higher learning rate, chat-format knowledge (16 items per set).
        #[arg(long)]
        quick: bool,
        /// Seeds 0..N per level and method.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Levels to run (default: all; `a` = design A's solo_<user> levels, `b` = design B's
        /// one_user, two_compatible, two_opposing, all_six, all_six_no_profile).
        #[arg(long, value_delimiter = ',')]
        levels: Vec<String>,
        /// Methods to run (default: all; known: dpo, dpo_beta0.3, dpo_beta1, dpo_nll,
        /// bapo_l0.03, bapo_l0.1, bapo_l0.3, bapo_l1, rehearsal).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Output directory (default: runs/compare, or runs/compare-quick).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Training pairs per level, balanced over its users, drawn by the seed (default: all;
        /// --quick: 16).
        #[arg(long)]
        max_train_pairs: Option<usize>,
        /// Held-out pairs per level, the same for every seed (default: all; --quick: 8).
        #[arg(long)]
        max_eval_pairs: Option<usize>,
        /// Override any base config value for every run.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Train nothing: write compare.{json,md} and the figures from the runs that have
        /// finished (e.g. to combine a grid run in several processes).
        #[arg(long)]
        report_only: bool,
    },
    /// Only the base responses: the frozen reference answers every training prompt; writes
    /// `anchors.jsonl` (prompt, base response, token count, reference log-prob) and the caches
    /// `bapo train` reuses.
    Anchor {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
    },
    /// Drift and knowledge report: the base model and (with --adapter) the personalised one on
    /// held-out preference accuracy, anchor drift, token KL, output drift and every knowledge
    /// item (raw and chat formats). Prints a table, writes report.json.
    Eval {
        #[arg(long)]
        config: PathBuf,
        /// A LoRA adapter directory (`adapter/`) or a full fine-tuned HF directory (`model/`).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Where the JSON report goes (default: `<output.dir>/report.json`).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Run directory with the anchor and reference caches (default: the config's).
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
        /// Retention gate: exit non-zero when any knowledge set and format's accuracy fell by
        /// more than this fraction (0.02 = two points), item by item against `--baseline`, else
        /// against the base model. Needs `--adapter`.
        #[arg(long, value_name = "FRACTION")]
        max_drop: Option<f64>,
        /// Retention gate: the same for the mean gold margin over the best distractor (nats).
        #[arg(long, value_name = "NATS")]
        max_margin_drop: Option<f64>,
        /// The `report.json` of an earlier `bapo eval` (same model, config and knowledge sets)
        /// that the gate compares against: its adapter's results, or its base model's.
        #[arg(long, value_name = "REPORT")]
        baseline: Option<PathBuf>,
        /// Evaluate every user trained by `bapo train --per-user`: `users/<user>/adapter` into
        /// `users/<user>/report.{json,html}` (the gate, when given, applies to each), then
        /// `users_report.json` and the index `report.html`.
        #[arg(long, conflicts_with_all = ["adapter", "report"])]
        per_user: bool,
        /// With --per-user: only these users (comma-separated).
        #[arg(long, value_delimiter = ',', requires = "per_user")]
        users: Option<Vec<String>>,
        /// With --per-user: the users at positions i, i+n, ... (1-based) of the sorted list.
        #[arg(long, value_name = "I/N", requires = "per_user")]
        shard: Option<bapo_run::per_user::Shard>,
    },
    /// Merge a LoRA adapter into the base weights and write an HF checkpoint directory
    /// (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that HF
    /// transformers and `bapo --model` load.
    Export {
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory (PEFT layout); without it the base model is converted as is.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Personalisation pairs from the model's own answers: each prompt answered once per pole
    /// of each dimension (e.g. concise / detailed), labelled by checkable rules.
    Synth {
        #[arg(long)]
        model: PathBuf,
        /// JSONL of `{"prompt", "split": "train"|"test", ...provenance}`.
        #[arg(long)]
        prompts: PathBuf,
        /// Directory for responses.jsonl, train.jsonl, test.jsonl, synth.json.
        #[arg(long)]
        out: PathBuf,
        /// informativeness, expertise, style (repeatable).
        #[arg(long = "dimension", default_values_t = vec!["informativeness".to_string()])]
        dimensions: Vec<String>,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
    },
    /// Continue prompts (chat-templated) with the KV cache; prints JSONL.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// A prompt (repeatable); batched together.
        #[arg(long, required = true)]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Feed the prompt as raw text instead of through the chat template.
        #[arg(long)]
        raw: bool,
        /// A trained adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// `f16` keeps the projection, embedding and head weights in f16 (same transformers
        /// parity; batch-1 decoding reads half the bytes a token).
        #[arg(long, default_value = "f32")]
        weights: String,
    },
    /// An OpenAI-compatible HTTP server: one base model, every user's LoRA adapter over it
    /// (`model: "bapo/<user>"` or the `user` field; `bapo/base` for the base model).
    Serve {
        #[arg(long)]
        model: PathBuf,
        /// Adapters: `<dir>/<user>/`, `<dir>/<user>/adapter/`, or the output of
        /// `bapo train --per-user` (`<dir>/users/<user>/adapter/`).
        #[arg(long)]
        adapters: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// 0 picks a free port (the address is printed).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Adapters kept attached at once (least recently used dropped first).
        #[arg(long, default_value_t = 8)]
        max_adapters: usize,
        /// `max_tokens` of a request that gives none (cut to what the context leaves).
        #[arg(long, default_value_t = 256)]
        default_max_tokens: usize,
        /// `f16` keeps the base model's projection, embedding and head weights in f16
        /// (adapters stay f32), as `bapo generate --weights`.
        #[arg(long, default_value = "f32")]
        weights: String,
        /// Every endpoint but `/health` then requires `Authorization: Bearer KEY` (401
        /// otherwise). Prefer the environment variable: a flag shows in `ps`.
        #[arg(long, env = "BAPO_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
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
        Cmd::Train { config, .. }
        | Cmd::Eval { config, .. }
        | Cmd::Anchor { config, .. }
        | Cmd::Compare { config, .. } => Some(config),
        _ => None,
    }
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
        Cmd::Train {
            devices: Some(d), ..
        } => Some(d),
        _ => None,
    }
}

fn dispatch(mut cli: Cli) -> Result<()> {
    // `--no-prompt-sharing` is the config key `train.prompt_sharing = false`, passed down with
    // the config (caches record it), for every command that reads one.
    if cli.no_prompt_sharing {
        if let Cmd::Train { set, .. }
        | Cmd::Eval { set, .. }
        | Cmd::Anchor { set, .. }
        | Cmd::Compare { set, .. } = &mut cli.command
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
    // Products of a few rows (decoding) split by column over the pool's threads: one thread
    // alone cannot read the weights as fast as memory delivers them (bapo_model::split).
    let split = match kind {
        BackendKind::Flex | BackendKind::Ndarray => threads,
        BackendKind::Wgpu | BackendKind::Cuda => 1,
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
    if let (BackendKind::Ndarray, Cmd::Generate { weights, .. } | Cmd::Serve { weights, .. }) =
        (kind, &cli.command)
    {
        if weights != "f32" {
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

/// `want` (by name) out of `all`; everything when `want` is empty.
fn pick<T: Clone>(
    all: Vec<T>,
    want: &[String],
    kind: &str,
    name: fn(&T) -> &str,
) -> Result<Vec<T>> {
    if want.is_empty() {
        return Ok(all);
    }
    want.iter()
        .map(|w| {
            all.iter().find(|x| name(x) == w).cloned().ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(name).collect();
                anyhow::anyhow!("unknown {kind} `{w}` (known: {})", known.join(", "))
            })
        })
        .collect()
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
        Cmd::Train {
            config,
            output,
            max_steps,
            set,
            resume,
            per_user,
            users,
            shard,
            devices: _,
            mpi,
        } => {
            let mut cfg = RunConfig::from_file_with(&config, &set)?;
            if let Some(o) = output {
                cfg.output.dir = o;
            }
            if let Some(m) = max_steps {
                cfg.train.max_steps = m;
            }
            let job = if per_user {
                Job::PerUser(
                    bapo_run::per_user::PerUser {
                        users,
                        shard,
                        resume,
                    },
                    bapo_run::per_user::Job::Train,
                )
            } else {
                Job::Train { resume, mpi }
            };
            let adapter = trainer(&cfg, &device, job)?;
            println!("{}", adapter.display());
            Ok(())
        }
        Cmd::Eval {
            config,
            adapter,
            report,
            output,
            set,
            max_drop,
            max_margin_drop,
            baseline,
            per_user,
            users,
            shard,
        } => {
            let has_adapter = adapter.is_some() || per_user;
            let gate = gate_spec(max_drop, max_margin_drop, baseline, has_adapter)?;
            let mut cfg = RunConfig::from_file_with(&config, &set)?;
            if let Some(o) = output {
                cfg.output.dir = o;
            }
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
        Cmd::Compare {
            config,
            quick,
            seeds,
            levels,
            methods,
            out,
            max_train_pairs,
            max_eval_pairs,
            set,
            report_only,
        } => {
            use bapo_lab::compare::{
                default_levels, default_methods, design_a_levels, design_b_levels, CompareSpec,
            };
            let (def_levels, def_methods, mut overrides, caps) = if quick {
                (
                    ["solo_concise", "solo_expert", "solo_friendly"]
                        .map(String::from)
                        .to_vec(),
                    vec!["dpo".to_string(), "bapo_l1".to_string()],
                    [
                        "train.max_steps=6",
                        "train.warmup_steps=1",
                        "train.grad_accum=1",
                        "train.learning_rate=2e-3",
                        "eval.knowledge_items=16",
                        "eval.formats=[\"chat\"]",
                        "eval.output_prompts=4",
                        "eval.output_max_new_tokens=64",
                        "anchor.max_new_tokens=32",
                        "output.eval_steps=6",
                        "output.save_steps=6",
                    ]
                    .map(String::from)
                    .to_vec(),
                    (Some(16), Some(8)),
                )
            } else {
                (Vec::new(), Vec::new(), Vec::new(), (None, None))
            };
            overrides.extend(set);
            // `a` and `b` stand for the designs' levels.
            let group = |names: Vec<bapo_lab::compare::Level>| -> Vec<String> {
                names.into_iter().map(|l| l.name).collect()
            };
            let levels: Vec<String> = if levels.is_empty() {
                def_levels
            } else {
                levels
            }
            .into_iter()
            .flat_map(|l| match l.as_str() {
                "a" => group(design_a_levels()),
                "b" => group(design_b_levels()),
                _ => vec![l],
            })
            .collect();
            let levels = pick(default_levels(), &levels, "level", |l| l.name.as_str())?;
            let methods = pick(
                default_methods(),
                if methods.is_empty() {
                    &def_methods
                } else {
                    &methods
                },
                "method",
                |m| m.name.as_str(),
            )?;
            let spec = CompareSpec {
                levels,
                methods,
                seeds: (0..seeds.max(1)).collect(),
                out: out.unwrap_or_else(|| {
                    PathBuf::from(if quick {
                        "runs/compare-quick"
                    } else {
                        "runs/compare"
                    })
                }),
                max_train_pairs: max_train_pairs.or(caps.0),
                max_eval_pairs: max_eval_pairs.or(caps.1),
                overrides,
                report_only,
            };
            let cfg = RunConfig::from_file_with(&config, &spec.overrides)?;
            println!(
                "{}",
                trainer(&cfg, &device, Job::Compare { config, spec })?.display()
            );
            Ok(())
        }
        Cmd::Anchor {
            config,
            output,
            set,
        } => {
            let mut cfg = RunConfig::from_file_with(&config, &set)?;
            if let Some(o) = output {
                cfg.output.dir = o;
            }
            println!("{}", trainer(&cfg, &device, Job::Anchors)?.display());
            Ok(())
        }
        Cmd::Score {
            model,
            input,
            output,
            batch_size,
        } => {
            let examples = bapo_data::read_score_file(&input)?;
            let t0 = Instant::now();
            let loaded = load_pretrained::<B>(&model, &device)?;
            tracing::info!(model = %model.display(), params = loaded.config.num_params(), secs = t0.elapsed().as_secs_f32(), "model loaded");
            let tok = &loaded.tokenizer;
            let template = bapo_train::chat_template(tok);
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
        Cmd::Export {
            model,
            adapter,
            out,
        } => {
            let mut loaded = load_pretrained::<B>(&model, &device)?;
            if let Some(dir) = adapter {
                loaded.model = bapo_train::lora::load_adapter_dir(loaded.model, &dir, &device)?;
            }
            bapo_model::export::save_pretrained(
                &loaded.model,
                &loaded.config,
                &loaded.tokenizer,
                &out,
            )?;
            println!("{}", out.display());
            Ok(())
        }
        Cmd::Synth {
            model,
            prompts,
            out,
            dimensions,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            batch_size,
        } => {
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
        Cmd::Serve {
            model,
            adapters,
            host,
            port,
            max_adapters,
            default_max_tokens,
            weights,
            api_key,
        } => {
            if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
                anyhow::bail!("--api-key / BAPO_API_KEY is empty: give a key, or unset it");
            }
            let dtype = bapo_model::precision::parse_weight_dtype("--weights", &weights)
                .map_err(anyhow::Error::msg)?;
            let mut loaded = load_pretrained::<B>(&model, &device)?;
            loaded.model = loaded.model.with_weight_dtype(dtype);
            let opts = bapo_serve::ServeOptions {
                addr: std::net::SocketAddr::new(host, port),
                adapters,
                max_adapters,
                default_max_tokens,
                api_key,
            };
            bapo_serve::serve(loaded, device, opts, |addr| {
                eprintln!("bapo serve: listening on http://{addr}");
            })
        }
        Cmd::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            raw,
            adapter,
            weights,
        } => {
            let dtype = bapo_model::precision::parse_weight_dtype("--weights", &weights)
                .map_err(anyhow::Error::msg)?;
            let mut loaded = load_pretrained::<B>(&model, &device)?;
            if let Some(dir) = adapter {
                loaded.model = bapo_train::lora::load_adapter_dir(loaded.model, &dir, &device)?;
            }
            loaded.model = loaded.model.with_weight_dtype(dtype);
            let tok = &loaded.tokenizer;
            let template = bapo_train::chat_template(tok);
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
    }
}
