//! Collecting finished runs: each run's base and final metrics (`result.json`), the mean and
//! Student-t interval over seeds per level and method, and the outputs — `compare.json`,
//! `compare.md`, `compare.{png,svg}` — plus design A's heterogeneity analysis
//! ([`super::heterogeneity`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::stats::{stat, Stat};
use super::CompareSpec;
use bapo_train::io::{write_atomic, RunError};

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
pub(super) fn read_run(dir: &Path) -> Result<(Metrics, Metrics), RunError> {
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
    let text =
        std::fs::read_to_string(&path).map_err(|e| bapo_train::io::RunError::file(&path, e))?;
    let last = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v.get("eval_rewards/accuracies").is_some())
        .ok_or_else(|| format!("{}: no evaluation row", path.display()))?;
    let base_path = dir.join("eval_base.json");
    let base: Value = serde_json::from_str(
        &std::fs::read_to_string(&base_path)
            .map_err(|e| bapo_train::io::RunError::file(&base_path, e))?,
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

/// The table's columns: (metric key, header).
const COLUMNS: [(&str, &str); 10] = [
    ("eval_rewards/accuracies", "pref. acc"),
    ("eval_personalisation/success", "toward pole"),
    ("eval_rewards/margins", "pref. margin"),
    ("knowledge/retention", "knowledge retention"),
    ("knowledge/delta_margin", "Δ gold margin (nats)"),
    ("knowledge/boundary_delta_acc", "Δ acc, boundary items"),
    ("knowledge/easy_delta_acc", "Δ acc, easy items"),
    ("eval_anchor_drift/mean", "anchor drift (nats)"),
    ("eval_kl/token", "KL/token"),
    ("eval_output/mean_length", "answer tokens"),
];

/// Aggregates over seeds and writes the three outputs.
pub(super) fn report(
    spec: &CompareSpec,
    results: &[RunResult],
    secs: f64,
) -> Result<String, RunError> {
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
                stats.get("knowledge/delta_margin"),
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
    let comparisons = super::stats::comparisons(results)?;
    md.push_str(&super::stats::markdown(&comparisons));
    super::figures::design_b(spec, &comparisons)?;
    let (design_a, design_a_md) = super::heterogeneity::analyse(spec, results)?;
    md.push_str(&design_a_md);
    let doc = json!({
        "spec": spec,
        "wall_s": secs,
        "runs": results,
        "summary": summary,
        "comparisons": comparisons,
        "design_a": design_a,
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
        y_label: "gold-margin change, every set and format (nats)".into(),
        series: points
            .into_iter()
            .map(|(name, points)| Series::new(name, points))
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
