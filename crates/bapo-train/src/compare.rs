//! `bapo compare`: the forgetting experiment. Plain DPO, DPO with a larger β, DPO + NLL on the
//! chosen answer and BAPO at several λ are trained on the same data, seed and budget, for each
//! heterogeneity level (how many, and how conflicting, the users mixed into one training set
//! are); each run's final held-out evaluation (preference accuracy, anchor drift, token KL,
//! knowledge accuracy and gold margin, on boundary and easy items) is collected into
//! `compare.json`, a markdown table and a figure (knowledge retention against preference
//! accuracy, one point per method and level).
//!
//! Every pair's prompt carries its user's profile as a system turn, so a mixed training set is
//! learnable (opposing users answer the same prompt differently) and the level changes only how
//! heterogeneous the preferences are. Runs of the same level and seed share the base responses
//! and reference log-probs (copied caches; their fingerprints are checked as usual). A finished
//! run leaves `result.json`; a rerun skips it, so an interrupted comparison continues.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::RunConfig;
use crate::io::{write_atomic, RunError};
use crate::run::run_training;

/// A set of users trained together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Level {
    pub name: String,
    pub users: Vec<String>,
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
    /// Output directory (data per level, one run directory per level/method/seed, results).
    pub out: PathBuf,
    /// Training pairs kept per level (balanced over its users; `None`: all).
    pub max_train_pairs: Option<usize>,
    /// Held-out pairs kept per level (balanced; `None`: all).
    pub max_eval_pairs: Option<usize>,
    /// Overrides applied to every run before the method's own.
    pub overrides: Vec<String>,
}

/// The three heterogeneity levels: one user; one pole of each of the three dimensions
/// (different but compatible preferences); both poles of every dimension (opposing users).
pub fn default_levels() -> Vec<Level> {
    let l = |name: &str, users: &[&str]| Level {
        name: name.into(),
        users: users.iter().map(|u| u.to_string()).collect(),
    };
    vec![
        l("one_user", &["concise"]),
        l("three_users", &["concise", "expert", "formal"]),
        l(
            "opposing",
            &[
                "concise", "detailed", "child", "expert", "friendly", "formal",
            ],
        ),
    ]
}

/// The methods: DPO (λ = 0), DPO with β = 0.5 (a five times stronger KL constraint than the
/// default 0.1), DPO + NLL on chosen (TRL's `rpo_alpha` = 1), BAPO with λ ∈ {0.5, 1, 2}.
pub fn default_methods() -> Vec<Method> {
    let m = |name: &str, o: &[&str]| Method {
        name: name.into(),
        overrides: o.iter().map(|s| s.to_string()).collect(),
    };
    vec![
        m("dpo", &["train.anchor_weight=0"]),
        m("dpo_beta0.5", &["train.anchor_weight=0", "train.beta=0.5"]),
        m(
            "dpo_nll",
            &["train.anchor_weight=0", "train.nll_weight=1.0"],
        ),
        m("bapo_l0.5", &["train.anchor_weight=0.5"]),
        m("bapo_l1", &["train.anchor_weight=1.0"]),
        m("bapo_l2", &["train.anchor_weight=2.0"]),
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

/// Writes `dir/{train,test}.jsonl`: the level's users' pairs (balanced round-robin over users
/// when capped), each prompt turned into `[system: profile, user: prompt]`.
fn level_data(
    level: &Level,
    train: &Path,
    eval: &Path,
    dir: &Path,
    spec: &CompareSpec,
) -> Result<(PathBuf, PathBuf), RunError> {
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for (src, name, cap) in [
        (train, "train.jsonl", spec.max_train_pairs),
        (eval, "test.jsonl", spec.max_eval_pairs),
    ] {
        let text = std::fs::read_to_string(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let mut by_user: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut row: Value = serde_json::from_str(line)
                .map_err(|e| format!("{} line {}: {e}", src.display(), i + 1))?;
            let Some(user) = row.get("user").and_then(Value::as_str).map(str::to_string) else {
                return Err(
                    format!("{} line {}: field `user` is missing", src.display(), i + 1).into(),
                );
            };
            let Some(u) = level.users.iter().find(|u| **u == user) else {
                continue;
            };
            let prompt = match row.get("prompt") {
                Some(Value::String(p)) => p.clone(),
                _ => {
                    return Err(format!(
                        "{} line {}: field `prompt` must be a string here",
                        src.display(),
                        i + 1
                    )
                    .into())
                }
            };
            row["prompt"] = json!([
                {"role": "system", "content": profile(u)},
                {"role": "user", "content": prompt},
            ]);
            by_user.entry(u.as_str()).or_default().push(row);
        }
        for u in &level.users {
            if !by_user.contains_key(u.as_str()) {
                return Err(format!(
                    "{}: level `{}` needs user `{u}`, which has no pair (build the data with `cargo xtask data --dimension informativeness --dimension expertise --dimension style`)",
                    src.display(),
                    level.name
                )
                .into());
            }
        }
        let total: usize = by_user.values().map(Vec::len).sum();
        let cap = cap.unwrap_or(total).min(total);
        let mut rows = Vec::with_capacity(cap);
        let mut iters: Vec<_> = by_user.into_values().map(Vec::into_iter).collect();
        while rows.len() < cap {
            for it in iters.iter_mut() {
                if let Some(r) = it.next() {
                    if rows.len() < cap {
                        rows.push(r);
                    }
                }
            }
        }
        let mut out = String::new();
        for r in &rows {
            out.push_str(&serde_json::to_string(r)?);
            out.push('\n');
        }
        let path = dir.join(name);
        write_atomic(&path, out.as_bytes())?;
        paths.push(path);
    }
    Ok((paths[0].clone(), paths[1].clone()))
}

/// One finished run's numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    pub level: String,
    pub method: String,
    pub seed: u64,
    pub dir: PathBuf,
    pub base: BTreeMap<String, f64>,
    pub metrics: BTreeMap<String, f64>,
}

/// Metric name → value.
type Metrics = BTreeMap<String, f64>;

/// The base row, and the last row of `metrics.jsonl` that holds held-out metrics.
fn read_run(dir: &Path) -> Result<(Metrics, Metrics), RunError> {
    let nums = |v: &Value| -> BTreeMap<String, f64> {
        v.as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let path = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let last = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("eval_rewards/accuracies").is_some())
        .ok_or_else(|| format!("{}: no evaluation row", path.display()))?;
    let base_path = dir.join("eval_base.json");
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(&base_path)
            .map_err(|e| format!("{}: {e}", base_path.display()))?,
    )?;
    Ok((nums(&base), derived(nums(&last))))
}

/// Adds the headline aggregates: mean knowledge retention and margin change over every
/// set × format, and the same on boundary and easy items.
fn derived(mut m: BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mean_of = |suffix: &str| {
        let v: Vec<f64> = m
            .iter()
            .filter(|(k, _)| k.starts_with("eval_knowledge/") && k.ends_with(suffix))
            .map(|(_, v)| *v)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let add: Vec<(&str, Option<f64>)> = vec![
        ("knowledge/retention", mean_of("/retention")),
        ("knowledge/delta_margin", mean_of("/delta_margin")),
        (
            "knowledge/boundary_delta_acc",
            mean_of("/boundary_delta_acc"),
        ),
        (
            "knowledge/boundary_delta_margin",
            mean_of("/boundary_delta_margin"),
        ),
        ("knowledge/easy_delta_acc", mean_of("/easy_delta_acc")),
    ];
    for (k, v) in add {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    }
    m
}

/// Two-sided 95 % Student-t quantile for `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    if df == 0 {
        f64::NAN
    } else {
        T.get(df - 1).copied().unwrap_or(1.96)
    }
}

/// Mean and 95 % confidence half-width (Student t over seeds; `null` with one seed).
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub ci95: Option<f64>,
    pub n: usize,
}

fn stat(v: &[f64]) -> Stat {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n.max(1) as f64;
    let ci95 = (n > 1).then(|| {
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        t95(n - 1) * (var / n as f64).sqrt()
    });
    Stat { mean, ci95, n }
}

/// The table's columns: (metric key, header).
const COLUMNS: [(&str, &str); 9] = [
    ("eval_rewards/accuracies", "pref. acc"),
    ("eval_rewards/margins", "pref. margin"),
    ("knowledge/retention", "knowledge retention"),
    ("knowledge/delta_margin", "Δ gold margin (nats)"),
    ("knowledge/boundary_delta_acc", "Δ acc, boundary items"),
    ("knowledge/easy_delta_acc", "Δ acc, easy items"),
    ("eval_anchor_drift/mean", "anchor drift (nats)"),
    ("eval_kl/token", "KL/token"),
    ("eval_output/mean_length", "answer tokens"),
];

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
    let started = std::time::Instant::now();
    let total = spec.levels.len() * spec.methods.len() * spec.seeds.len();
    let mut results = Vec::new();
    let mut done = 0;
    for level in &spec.levels {
        let (train, eval) = level_data(
            level,
            &base_cfg.data.train,
            &eval_src,
            &spec.out.join("data").join(&level.name),
            spec,
        )?;
        for &seed in &spec.seeds {
            let mut first: Option<PathBuf> = None;
            for method in &spec.methods {
                done += 1;
                let dir = spec
                    .out
                    .join("runs")
                    .join(&level.name)
                    .join(format!("{}-seed{seed}", method.name));
                let result_path = dir.join("result.json");
                if let Ok(text) = std::fs::read_to_string(&result_path) {
                    if let Ok(r) = serde_json::from_str::<RunResult>(&text) {
                        tracing::info!(level = %level.name, method = %method.name, seed, "finished earlier: reusing result.json");
                        first.get_or_insert(dir.clone());
                        results.push(r);
                        continue;
                    }
                }
                let q = |p: &Path| format!("\"{}\"", p.display().to_string().replace('\\', "/"));
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
                ov.extend(method.overrides.iter().cloned());
                let cfg = RunConfig::from_file_with(config, &ov)?;
                std::fs::create_dir_all(&dir)?;
                if let Some(src) = &first {
                    for f in ["anchors.cache.json", "reference_logps.cache.json"] {
                        if src.join(f).exists() && !dir.join(f).exists() {
                            std::fs::copy(src.join(f), dir.join(f))?;
                        }
                    }
                }
                tracing::info!(run = done, of = total, level = %level.name, method = %method.name, seed, elapsed_s = started.elapsed().as_secs(), "compare: training");
                run_training::<B>(&cfg, device, false)?;
                let (base, metrics) = read_run(&dir)?;
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
                report(spec, &results, started.elapsed().as_secs_f64())?;
            }
        }
    }
    report(spec, &results, started.elapsed().as_secs_f64())
}

/// Aggregates over seeds and writes the three outputs.
fn report(spec: &CompareSpec, results: &[RunResult], secs: f64) -> Result<String, RunError> {
    let mut summary: Vec<Value> = Vec::new();
    let mut md = String::from("| level | method | seeds |");
    for (_, h) in COLUMNS {
        md.push_str(&format!(" {h} |"));
    }
    md.push_str("\n|---|---|---|");
    md.push_str(&"---|".repeat(COLUMNS.len()));
    md.push('\n');
    let mut points: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for level in &spec.levels {
        // The base model's row (identical for every method of a level: take the first run).
        if let Some(r) = results.iter().find(|r| r.level == level.name) {
            md.push_str(&format!("| {} | base model | - |", level.name));
            for (k, _) in COLUMNS {
                let v = match k {
                    "knowledge/retention" => Some(1.0),
                    "knowledge/delta_margin"
                    | "knowledge/boundary_delta_acc"
                    | "knowledge/easy_delta_acc" => Some(0.0),
                    _ => r.base.get(k).copied(),
                };
                md.push_str(&v.map_or(" - |".into(), |v| format!(" {v:.3} |")));
            }
            md.push('\n');
        }
        for method in &spec.methods {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.level == level.name && r.method == method.name)
                .collect();
            if runs.is_empty() {
                continue;
            }
            let mut keys: Vec<&String> = runs.iter().flat_map(|r| r.metrics.keys()).collect();
            keys.sort();
            keys.dedup();
            let stats: BTreeMap<String, Stat> = keys
                .into_iter()
                .map(|k| {
                    let v: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.metrics.get(k).copied())
                        .collect();
                    (k.clone(), stat(&v))
                })
                .collect();
            md.push_str(&format!(
                "| {} | {} | {} |",
                level.name,
                method.name,
                runs.len()
            ));
            for (k, _) in COLUMNS {
                md.push_str(&match stats.get(k) {
                    Some(Stat {
                        mean,
                        ci95: Some(c),
                        ..
                    }) => format!(" {mean:.3} ± {c:.3} |"),
                    Some(s) => format!(" {:.3} |", s.mean),
                    None => " - |".into(),
                });
            }
            md.push('\n');
            if let (Some(p), Some(k)) = (
                stats.get("eval_rewards/accuracies"),
                stats.get("knowledge/retention"),
            ) {
                points
                    .entry(method.name.clone())
                    .or_default()
                    .push((p.mean, k.mean));
            }
            summary.push(json!({
                "level": level.name,
                "users": level.users,
                "method": method.name,
                "overrides": method.overrides,
                "stats": stats,
            }));
        }
    }
    md.push_str(
        "\n± = 95 % Student-t half-width over seeds. Knowledge retention = policy accuracy / base \
         accuracy, averaged over every set and format; boundary items: |base margin| < 1 nat; \
         easy: base margin ≥ 1 nat.\n",
    );
    let comparisons = crate::compare_stats::comparisons(results)?;
    md.push_str(&crate::compare_stats::markdown(&comparisons));
    let doc = json!({
        "spec": spec,
        "wall_s": secs,
        "runs": results,
        "summary": summary,
        "comparisons": comparisons,
    });
    write_atomic(
        &spec.out.join("compare.json"),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?;
    write_atomic(&spec.out.join("compare.md"), md.as_bytes())?;
    use bapo_drift::plot::{write_figure, Panel, Series};
    let panel = Panel {
        title: "Knowledge kept vs preference learned".into(),
        x_label: "held-out preference accuracy".into(),
        y_label: "knowledge retention (policy acc / base acc)".into(),
        series: points
            .into_iter()
            .map(|(name, points)| Series { name, points })
            .collect(),
        y_range: None,
    };
    write_figure(
        &spec.out.join("compare"),
        "DPO vs BAPO: forgetting",
        &[panel],
    )
    .map_err(|e| format!("compare figure: {e}"))?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_uses_student_t() {
        let s = stat(&[1.0, 2.0, 3.0]);
        assert!((s.mean - 2.0).abs() < 1e-12);
        // sd = 1, n = 3: 4.303 / sqrt(3).
        assert!((s.ci95.unwrap() - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert!(stat(&[5.0]).ci95.is_none());
    }

    #[test]
    fn level_data_balances_users_and_adds_profiles() {
        let dir = std::env::temp_dir().join(format!("bapo-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.jsonl");
        let row = |u: &str, i: usize| {
            json!({"prompt": format!("q{i}"), "chosen": "a", "rejected": "b", "user": u})
                .to_string()
        };
        let lines: Vec<String> = (0..4)
            .map(|i| row("concise", i))
            .chain((0..4).map(|i| row("detailed", i)))
            .chain([row("child", 9)])
            .collect();
        std::fs::write(&src, lines.join("\n")).unwrap();
        let level = Level {
            name: "two".into(),
            users: vec!["concise".into(), "detailed".into()],
        };
        let spec = CompareSpec {
            levels: vec![level.clone()],
            methods: default_methods(),
            seeds: vec![0],
            out: dir.clone(),
            max_train_pairs: Some(3),
            max_eval_pairs: None,
            overrides: vec![],
        };
        let (train, eval) = level_data(&level, &src, &src, &dir.join("d"), &spec).unwrap();
        let read = |p: &Path| -> Vec<Value> {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let t = read(&train);
        let users: Vec<&str> = t.iter().map(|r| r["user"].as_str().unwrap()).collect();
        assert_eq!(users, ["concise", "detailed", "concise"]);
        assert_eq!(t[1]["prompt"][0]["role"], "system");
        assert_eq!(t[1]["prompt"][0]["content"], profile("detailed"));
        assert_eq!(t[1]["prompt"][1]["content"], "q0");
        assert_eq!(
            read(&eval).len(),
            8,
            "uncapped: every pair of the level's users"
        );
        let missing = Level {
            name: "x".into(),
            users: vec!["formal".into()],
        };
        let err = level_data(&missing, &src, &src, &dir.join("e"), &spec).unwrap_err();
        assert!(err.to_string().contains("needs user `formal`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
