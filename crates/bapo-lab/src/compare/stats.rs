//! `bapo compare`'s paired statistics: every run against the base model, and every other
//! method against DPO of the same level and seed, item by item on the same knowledge items
//! (`knowledge_items.json` of each run: its last evaluation beside the base model's).
//!
//! Per set and format, per subset (item ids `set/subset/n`), and pooled over the chat format of
//! [`PRIMARY_SETS`] — the primary endpoint, declared before running: the **pooled chat-format
//! gold-margin change** with its paired-bootstrap 95 % interval (`ci95`), and the accuracy
//! flips with McNemar's exact test (`mcnemar`).

use std::collections::BTreeMap;
use std::path::Path;

use bapo_drift::paired::{compare, PairedComparison};
use bapo_drift::McItemResult;
use serde::Serialize;
use serde_json::{json, Value};

use super::RunResult;
use bapo_train::io::RunError;

/// Per `set/format`, the items in scoring order.
pub(super) type Items = BTreeMap<String, Vec<McItemResult>>;

/// The bootstrap's seed: fixed, so compare.json is reproducible.
pub(super) const SEED: u64 = 0x6261_706f;

/// (base, policy) items of a finished run.
pub(super) fn read_items(dir: &Path) -> Result<(Items, Items), RunError> {
    let path = dir.join("knowledge_items.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| bapo_train::io::RunError::file(&path, e))?;
    let mut doc: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut take = |k: &str| -> Result<Items, RunError> {
        serde_json::from_value(doc[k].take())
            .map_err(|e| format!("{}: field `{k}`: {e}", path.display()).into())
    };
    Ok((take("base")?, take("policy")?))
}

/// The knowledge sets the primary endpoint pools (declared before the runs); any other set
/// (the MMLU slice, `hhh_alignment`) is reported on its own, per set and per subset.
pub(super) const PRIMARY_SETS: [&str; 2] = ["capitals", "general_knowledge"];

/// The primary sets' chat-format items, concatenated in key order.
pub(super) fn pooled_chat(items: &Items) -> Vec<McItemResult> {
    pooled(items, "chat")
}

/// The primary sets' items in `format`, in key order.
fn pooled(items: &Items, format: &str) -> Vec<McItemResult> {
    items
        .iter()
        .filter(|(k, _)| {
            k.split_once('/')
                .is_some_and(|(set, f)| f == format && PRIMARY_SETS.contains(&set))
        })
        .flat_map(|(_, v)| v.iter().cloned())
        .collect()
}

/// Items grouped by subset: the id up to its last `/` (`hhh_alignment/harmless/3` →
/// `hhh_alignment/harmless`), keyed `<subset>/<format>`; only sets whose ids have subsets.
fn subsets(items: &Items) -> BTreeMap<String, Vec<McItemResult>> {
    let mut out: BTreeMap<String, Vec<McItemResult>> = BTreeMap::new();
    for (key, v) in items {
        let Some((set, format)) = key.split_once('/') else {
            continue;
        };
        for it in v {
            if let Some((sub, _)) = it.id.rsplit_once('/').filter(|(s, _)| *s != set) {
                out.entry(format!("{sub}/{format}"))
                    .or_default()
                    .push(it.clone());
            }
        }
    }
    out
}

fn row(key: &str, c: &PairedComparison) -> Value {
    json!({
        "key": key,
        "n": c.n,
        "delta_acc": c.delta_acc,
        "delta_margin": c.delta_margin,
        "ci95": c.ci95,
        "mcnemar": c.mcnemar,
    })
}

/// `b` against `a`: the primary endpoint, the same under the users' own system turns (when
/// scored: `pooled_chat_system`), and every set/format, then every subset/format.
fn against(a: &Items, b: &Items) -> Result<(Value, Vec<Value>, Vec<Value>), RunError> {
    let primary = compare(&pooled_chat(a), &pooled_chat(b), SEED)
        .map_err(|e| format!("pooled chat items: {e}"))?;
    let own = pooled(b, "chat_system");
    let own = if own.is_empty() {
        Value::Null
    } else {
        let c = compare(&pooled(a, "chat_system"), &own, SEED)
            .map_err(|e| format!("pooled chat_system items: {e}"))?;
        row("pooled_chat_system", &c)
    };
    let mut primary = row("pooled_chat", &primary);
    primary["own_turn"] = own;
    let mut rows = Vec::new();
    for (key, items) in b {
        let base = a
            .get(key)
            .ok_or_else(|| format!("`{key}` missing on one side"))?;
        rows.push(row(
            key,
            &compare(base, items, SEED).map_err(|e| format!("`{key}`: {e}"))?,
        ));
    }
    let (sa, sb) = (subsets(a), subsets(b));
    let mut subs = Vec::new();
    for (key, items) in &sb {
        if let Some(base) = sa.get(key) {
            let c = compare(base, items, SEED).map_err(|e| format!("`{key}`: {e}"))?;
            subs.push(row(key, &c));
        }
    }
    Ok((primary, rows, subs))
}

/// Every run against the base model, and every method but `dpo` against `dpo` of the same level
/// and seed. Runs without `knowledge_items.json` (knowledge sets off) are left out.
pub(crate) fn comparisons(results: &[RunResult]) -> Result<Vec<Value>, RunError> {
    let mut items: BTreeMap<(String, String, u64), (Items, Items)> = BTreeMap::new();
    for r in results {
        if r.dir.join("knowledge_items.json").exists() {
            items.insert(
                (r.level.clone(), r.method.clone(), r.seed),
                read_items(&r.dir)?,
            );
        }
    }
    let mut out = Vec::new();
    for ((level, method, seed), (base, policy)) in &items {
        let (primary, per_set, per_subset) = against(base, policy)?;
        out.push(json!({
            "level": level, "method": method, "seed": seed, "against": "base",
            "primary": primary, "per_set": per_set, "per_subset": per_subset,
        }));
        if method == "dpo" {
            continue;
        }
        if let Some((_, dpo)) = items.get(&(level.clone(), "dpo".to_string(), *seed)) {
            let (primary, per_set, per_subset) = against(dpo, policy)?;
            out.push(json!({
                "level": level, "method": method, "seed": seed, "against": "dpo",
                "primary": primary, "per_set": per_set, "per_subset": per_subset,
            }));
        }
    }
    Ok(out)
}

/// The primary endpoint of every comparison as a Markdown table.
pub(crate) fn markdown(comparisons: &[Value]) -> String {
    if comparisons.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n### Paired, item by item\n\nPrimary endpoint (declared before running): the change of \
         the gold answer's margin over the best distractor, pooled over the chat-format knowledge \
         items, with a paired-bootstrap 95 % interval; accuracy flips with McNemar's exact test. \
         Levels with profile turns are also scored with each item after one of the level's \
         users' profiles (own turn).\n\n\
         | level | method | seed | against | items | Δ margin [95 % CI] | Δ acc | lost / gained | McNemar p | own turn: Δ margin [95 % CI] |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for c in comparisons {
        let p = &c["primary"];
        let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:+.3}"));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} [{}, {}] | {} | {} / {} | {} | {} |\n",
            c["level"].as_str().unwrap_or("-"),
            c["method"].as_str().unwrap_or("-"),
            c["seed"],
            c["against"].as_str().unwrap_or("-"),
            p["n"],
            f(&p["delta_margin"]),
            f(&p["ci95"][0]),
            f(&p["ci95"][1]),
            f(&p["delta_acc"]),
            p["mcnemar"]["lost"],
            p["mcnemar"]["gained"],
            p["mcnemar"]["p"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.3}")),
            match &p["own_turn"] {
                Value::Null => "-".to_string(),
                o => format!(
                    "{} [{}, {}]",
                    f(&o["delta_margin"]),
                    f(&o["ci95"][0]),
                    f(&o["ci95"][1])
                ),
            },
        ));
    }
    md
}

/// Two-sided 95 % Student-t quantile for `df` degrees of freedom: the exact table to 30, then
/// the Cornish-Fisher expansion in 1/df (within 2e-4 of the exact value at 31 and closer after;
/// not the normal's 1.96, which understates the interval by 6 % at 11 df).
pub(crate) fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => T[df - 1],
        _ => {
            let (z, n) = (1.959_963_984_540_054_f64, df as f64);
            z + (z.powi(3) + z) / (4.0 * n)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * n * n)
                + (3.0 * z.powi(7) + 19.0 * z.powi(5) + 17.0 * z.powi(3) - 15.0 * z)
                    / (384.0 * n.powi(3))
        }
    }
}

/// Mean and 95 % confidence half-width (Student t over seeds; `null` with one seed).
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub ci95: Option<f64>,
    pub n: usize,
}

pub(crate) fn stat(v: &[f64]) -> Stat {
    let n = v.len();
    let mean = v.iter().sum::<f64>() / n.max(1) as f64;
    let ci95 = (n > 1).then(|| {
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        t95(n - 1) * (var / n as f64).sqrt()
    });
    Stat { mean, ci95, n }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Student-t 95 % quantiles (two-sided) against published values, above 10 df included.
    #[test]
    fn t95_matches_the_t_table() {
        for (df, want) in [
            (1, 12.706),
            (10, 2.228),
            (11, 2.201),
            (30, 2.042),
            (31, 2.040),
            (40, 2.021),
            (60, 2.000),
            (120, 1.980),
        ] {
            assert!(
                (t95(df) - want).abs() < 1e-3,
                "df {df}: {} vs {want}",
                t95(df)
            );
        }
        assert!(t95(0).is_nan());
        assert!(t95(100_000) > 1.959 && t95(100_000) < 1.961);
    }
}
