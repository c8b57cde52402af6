//! `bapo compare`: the forgetting experiment, in two designs.
//!
//! **A — distance from the base** (the paper's setting): each of the six users of
//! `data/personas` trained alone, with plain prompts (no profile turn), one level `solo_<user>`
//! each. Every user gets a heterogeneity covariate from the reference cache (`logp_gap`: how
//! much the base model prefers what the user rejects) and from behaviour (`measure_gap`: how far
//! the chosen answers sit from the base model's own along the user's rule); DPO's knowledge loss
//! is regressed on it ([`heterogeneity`]).
//!
//! **B — mixing users**: one user; two compatible users; two opposing users on disjoint
//! prompts; all six — each prompt carrying its user's profile as a system turn — and all six
//! without profiles (genuinely conflicting labels).
//!
//! Methods (DPO over β, BAPO over λ, DPO + NLL, rehearsal) are trained on the same data, seed and
//! budget; each seed also draws which training pairs are used. Each run's final held-out
//! evaluation is collected into `compare.json`, `compare.md` and figures ([`report`]), with
//! paired statistics item by item ([`stats`]). Runs of the same level and seed share the base
//! responses and reference log-probs (copied caches; their fingerprints are checked as usual).
//! A finished run leaves `result.json`; a rerun skips it, so an interrupted comparison
//! continues.

mod data;
mod figures;
pub mod halves;
pub mod heterogeneity;
mod report;
mod stats;

use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use bapo_run::config::RunConfig;
use bapo_run::run::run_training;
use bapo_train::io::{write_atomic, RunError};
pub use report::RunResult;

/// A set of users trained together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Level {
    pub name: String,
    pub users: Vec<String>,
    /// Each prompt carries its user's profile as a system turn.
    pub profile: bool,
    /// Each prompt goes to one of the users only (by its hash).
    pub disjoint: bool,
    /// Design A′: only the near or the far half of the (single) user's training pairs, split
    /// at the median per-pair `logp_gap` ([`halves`]).
    #[serde(default)]
    pub half: Option<Half>,
}

/// Which half of a user's training pairs a design-A′ level trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Half {
    /// The pairs whose per-token reference gap (rejected − chosen) is below the user's median:
    /// the base model already leans toward the chosen answer.
    Near,
    /// The pairs above the median: the base model prefers what the user rejects.
    Far,
}

impl Half {
    pub fn name(self) -> &'static str {
        match self {
            Half::Near => "near",
            Half::Far => "far",
        }
    }
}

impl Level {
    /// Design A: one user alone, plain prompts.
    pub fn is_solo(&self) -> bool {
        self.users.len() == 1 && !self.profile
    }
}

/// A training objective, as `--set` overrides of the base config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Method {
    pub name: String,
    pub overrides: Vec<String>,
}

/// What to compare.
#[derive(Debug, Clone, Serialize)]
pub struct CompareSpec {
    pub levels: Vec<Level>,
    pub methods: Vec<Method>,
    pub seeds: Vec<u64>,
    /// Output directory (data per level and seed, one run directory per level/method/seed,
    /// results).
    pub out: PathBuf,
    /// Training pairs kept per level (balanced over its users, drawn by the seed; `None`: all).
    pub max_train_pairs: Option<usize>,
    /// Held-out pairs kept per level (balanced, the same for every seed; `None`: all).
    pub max_eval_pairs: Option<usize>,
    /// Overrides applied to every run before the method's own.
    pub overrides: Vec<String>,
    /// Train nothing: report the runs that have finished (combining shards of a grid).
    pub report_only: bool,
}

/// The six users, pole 0 and pole 1 of each dimension.
pub const USERS: [&str; 6] = [
    "concise", "detailed", "child", "expert", "friendly", "formal",
];

/// Design A: `solo_<user>` for each of the six users, plain prompts.
pub fn design_a_levels() -> Vec<Level> {
    USERS
        .iter()
        .map(|u| Level {
            name: format!("solo_{u}"),
            users: vec![u.to_string()],
            profile: false,
            disjoint: false,
            half: None,
        })
        .collect()
}

/// Design A′: `near_<user>` and `far_<user>` for each of the six users (twelve levels), each
/// trained alone on one half of the user's pairs, split at the median per-pair `logp_gap`:
/// distance from the base varies within a direction, so it is no longer the pole.
pub fn design_a2_levels() -> Vec<Level> {
    USERS
        .iter()
        .flat_map(|u| {
            [Half::Near, Half::Far].map(|h| Level {
                name: format!("{}_{u}", h.name()),
                users: vec![u.to_string()],
                profile: false,
                disjoint: false,
                half: Some(h),
            })
        })
        .collect()
}

/// Design B: one user; two compatible users (different dimensions); two opposing users (both
/// poles of one dimension) on disjoint prompts; all six — with profile turns — and all six
/// without them.
pub fn design_b_levels() -> Vec<Level> {
    let l = |name: &str, users: &[&str], profile: bool, disjoint: bool| Level {
        name: name.into(),
        users: users.iter().map(|u| u.to_string()).collect(),
        profile,
        disjoint,
        half: None,
    };
    vec![
        l("one_user", &["concise"], true, false),
        l("two_compatible", &["concise", "expert"], true, false),
        l("two_opposing", &["concise", "detailed"], true, true),
        l("all_six", &USERS, true, false),
        l("all_six_no_profile", &USERS, false, false),
    ]
}

/// Every level of the default grid: design A, then design B (design A′ is asked for by name,
/// `--levels a2`: it needs a scan of each user's pairs first).
pub fn default_levels() -> Vec<Level> {
    design_a_levels()
        .into_iter()
        .chain(design_b_levels())
        .collect()
}

/// The methods: DPO over β ∈ {0.1, 0.3, 1}, DPO + NLL on chosen (TRL's `rpo_alpha` = 1), BAPO
/// over λ ∈ {0.03, 0.1, 0.3, 1}, and rehearsal (NLL on the base responses, no hinge: the
/// `linear` anchor at weight 1).
pub fn default_methods() -> Vec<Method> {
    let m = |name: &str, o: &[&str]| Method {
        name: name.into(),
        overrides: o.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        m("dpo", &["train.anchor_weight=0"]),
        m("dpo_beta0.3", &["train.anchor_weight=0", "train.beta=0.3"]),
        m("dpo_beta1", &["train.anchor_weight=0", "train.beta=1.0"]),
        m(
            "dpo_nll",
            &["train.anchor_weight=0", "train.nll_weight=1.0"],
        ),
        m("bapo_l0.03", &["train.anchor_weight=0.03"]),
        m("bapo_l0.1", &["train.anchor_weight=0.1"]),
        m("bapo_l0.3", &["train.anchor_weight=0.3"]),
        m("bapo_l1", &["train.anchor_weight=1.0"]),
        m(
            "rehearsal",
            &["train.anchor_weight=1.0", "train.anchor=\"linear\""],
        ),
    ]
}

/// The system turn that tells the model which user it is answering.
pub fn profile(user: &str) -> String {
    match user {
        "concise" => "This user wants brief answers: one or two short sentences.".into(),
        "detailed" => {
            "This user wants detailed, thorough answers with background, reasons and an example."
                .into()
        }
        "child" => "This user is a young child: use simple words and short sentences.".into(),
        "expert" => "This user is an expert: use precise, technical language.".into(),
        "friendly" => "This user likes a warm, friendly, casual tone.".into(),
        "formal" => "This user wants a formal, impersonal, professional register.".into(),
        other => format!("This user is `{other}`."),
    }
}

/// `p` as a quoted TOML string for a `--set` override (forward slashes on every platform).
fn toml_path(p: &Path) -> String {
    format!("\"{}\"", p.display().to_string().replace('\\', "/"))
}

/// `out/data/<level>/seed<k>`: the level's files for one seed.
pub(crate) fn data_dir(out: &Path, level: &Level, seed: u64) -> PathBuf {
    out.join("data")
        .join(&level.name)
        .join(format!("seed{seed}"))
}

/// `out/runs/<level>/<method>-seed<k>`.
fn run_dir(out: &Path, level: &Level, method: &Method, seed: u64) -> PathBuf {
    out.join("runs")
        .join(&level.name)
        .join(format!("{}-seed{seed}", method.name))
}

/// Runs every level × method × seed (skipping finished runs), then writes `compare.json`,
/// `compare.md` and `compare.{png,svg}` into `spec.out`; returns the markdown table.
pub fn run_compare<B: AutodiffBackend>(
    config: &Path,
    spec: &CompareSpec,
    device: &B::Device,
) -> Result<String, RunError> {
    // Per-run paths go into `--set` overrides, which resolve against the config's folder:
    // make them absolute first.
    let spec = &CompareSpec {
        out: std::path::absolute(&spec.out)?,
        ..spec.clone()
    };
    let base_cfg = RunConfig::from_file_with(config, &spec.overrides)?;
    let eval_src = base_cfg
        .data
        .eval
        .clone()
        .ok_or("compare needs data.eval (a held-out pair file) in the config")?;
    std::fs::create_dir_all(&spec.out)?;
    // Design A′: each user's pairs split at the median gap, from one scan per user.
    let splits = halves::splits::<B>(config, spec, &base_cfg, device)?;
    let started = std::time::Instant::now();
    let total = spec.levels.len() * spec.methods.len() * spec.seeds.len();
    let mut results = Vec::new();
    let mut done = 0;
    // Seeds outermost: the first seed of every level (design A's slope) comes first.
    for &seed in &spec.seeds {
        for level in &spec.levels {
            // A report reads the data the runs were trained on; it writes none.
            let dir = data_dir(&spec.out, level, seed);
            let (train, eval) = if spec.report_only {
                (dir.join("train.jsonl"), dir.join("test.jsonl"))
            } else {
                data::level_data(
                    level,
                    seed,
                    (&base_cfg.data.train, &eval_src),
                    &dir,
                    spec,
                    splits.get(&level.users[0]),
                )?
            };
            let mut first: Option<PathBuf> = None;
            for method in &spec.methods {
                done += 1;
                let dir = run_dir(&spec.out, level, method, seed);
                let result_path = dir.join("result.json");
                if let Ok(text) = std::fs::read_to_string(&result_path) {
                    if let Ok(mut r) = serde_json::from_str::<RunResult>(&text) {
                        // The run's files are read from where they are now (results restored
                        // from docs/ into another clone), not where they were written.
                        r.dir = dir.clone();
                        tracing::info!(level = %level.name, method = %method.name, seed, "finished earlier: reusing result.json");
                        first.get_or_insert(dir.clone());
                        results.push(r);
                        continue;
                    }
                }
                if spec.report_only {
                    tracing::info!(level = %level.name, method = %method.name, seed, "not finished: left out (--report-only)");
                    continue;
                }
                let q = toml_path;
                let users = level
                    .users
                    .iter()
                    .map(|u| format!("\"{u}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut ov = spec.overrides.clone();
                ov.extend([
                    format!("data.train={}", q(&train)),
                    format!("data.eval={}", q(&eval)),
                    format!("data.users=[{users}]"),
                    format!("output.dir={}", q(&dir)),
                    format!("train.seed={seed}"),
                ]);
                if level.profile {
                    // Knowledge also as the users see the model: after their profile turns.
                    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
                    let mut formats: Vec<String> = base_cfg.eval.formats.clone();
                    if !formats.iter().any(|f| f == "chat_system") {
                        formats.push("chat_system".into());
                    }
                    let list = |v: Vec<String>| format!("[{}]", v.join(", "));
                    ov.extend([
                        format!(
                            "eval.formats={}",
                            list(formats.iter().map(|f| quote(f)).collect())
                        ),
                        format!(
                            "eval.system_turns={}",
                            list(level.users.iter().map(|u| quote(&profile(u))).collect())
                        ),
                    ]);
                }
                ov.extend(method.overrides.iter().cloned());
                let cfg = RunConfig::from_file_with(config, &ov)?;
                std::fs::create_dir_all(&dir)?;
                if let Some(src) = &first {
                    for f in [
                        "anchors.cache.json",
                        "reference_logps.cache.json",
                        "eval_base.cache.json",
                    ] {
                        if src.join(f).exists() && !dir.join(f).exists() {
                            std::fs::copy(src.join(f), dir.join(f))?;
                        }
                    }
                }
                tracing::info!(run = done, of = total, level = %level.name, method = %method.name, seed, elapsed_s = started.elapsed().as_secs(), "compare: training");
                run_training::<B>(&cfg, device, false)?;
                let (base, metrics) = report::read_run(&dir)?;
                let r = RunResult {
                    level: level.name.clone(),
                    method: method.name.clone(),
                    seed,
                    dir: dir.clone(),
                    base,
                    metrics,
                };
                write_atomic(&result_path, serde_json::to_string_pretty(&r)?.as_bytes())?;
                first.get_or_insert(dir.clone());
                results.push(r);
                // Rewrite the outputs after every run: an interrupted comparison still reports.
                report::report(spec, &results, started.elapsed().as_secs_f64())?;
            }
        }
    }
    report::report(spec, &results, started.elapsed().as_secs_f64())
}
