//! The retention gate of `bapo eval`: which items the personalised model is compared against
//! (a baseline report's, or this run's base model's), the verdict, and its table.

use std::path::{Path, PathBuf};

use bapo_drift::gate::gate;
pub use bapo_drift::gate::{GateLimits, GateRow};

use crate::knowledge::KnowledgeResults;
use bapo_train::io::RunError;

/// Why a gate without a personalised model is refused (the CLI says it before any work).
pub const NEEDS_ADAPTER: &str = "the retention gate (--max-drop / --max-margin-drop) needs \
                                 --adapter: the personalised model it judges";

/// `--baseline`, `--max-drop`, `--max-margin-drop`.
#[derive(Debug, Clone, PartialEq)]
pub struct GateSpec {
    /// An earlier `bapo eval`'s report, read; `None`: this run's base model.
    pub baseline: Option<Baseline>,
    pub limits: GateLimits,
}

/// A `report.json` of an earlier `bapo eval` and the per-item results it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Baseline {
    pub path: PathBuf,
    pub items: KnowledgeResults,
}

impl Baseline {
    /// Reads once, before any work, so a wrong file is refused at once.
    pub fn read(path: &Path) -> Result<Self, RunError> {
        let items = baseline_items(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            items,
        })
    }
}

/// The per-item knowledge results a baseline report holds: its personalised model's, or its
/// base model's when it evaluated no adapter.
fn baseline_items(path: &Path) -> Result<KnowledgeResults, RunError> {
    let text = std::fs::read_to_string(path).map_err(|e| RunError::file(path, e))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let items = &doc["items"];
    let pick = if items["policy"].is_object() {
        &items["policy"]
    } else {
        &items["base"]
    };
    if !pick.is_object() {
        return Err(format!(
            "{}: field `items` (per-item knowledge results) is missing: the report predates the \
             retention gate; make it again with `bapo eval`",
            path.display()
        )
        .into());
    }
    serde_json::from_value(pick.clone())
        .map_err(|e| format!("{}: field `items`: {e}", path.display()).into())
}

/// The gate's rows for `policy` against the baseline (or `base`), and its JSON for the report.
pub fn run_gate(
    spec: &GateSpec,
    base: &KnowledgeResults,
    policy: &KnowledgeResults,
) -> Result<(Vec<GateRow>, serde_json::Value), RunError> {
    let (reference, name) = match &spec.baseline {
        Some(b) => (&b.items, b.path.display().to_string()),
        None => (base, "the base model".to_string()),
    };
    let rows = gate(reference, policy, spec.limits).map_err(|e| match &spec.baseline {
        Some(b) => format!("{}: {e}", b.path.display()),
        None => e,
    })?;
    let json = serde_json::json!({
        "against": name,
        "max_acc_drop": spec.limits.max_acc_drop,
        "max_margin_drop": spec.limits.max_margin_drop,
        "pass": rows.iter().all(|r| r.pass),
        "rows": rows,
    });
    Ok((rows, json))
}

/// One line per set and format, and the failures as one message (`None`: all passed).
pub fn gate_table(rows: &[GateRow], limits: GateLimits) -> (String, Option<String>) {
    let ci = |c: [f64; 2]| format!("[{:+.3}, {:+.3}]", c[0], c[1]);
    let mut table = format!(
        "{:<32} {:>5} {:>9} {:>18} {:>11} {:>18} {:>11} {:>9}  verdict\n",
        "retention gate",
        "n",
        "acc drop",
        "95% CI",
        "margin drop",
        "95% CI",
        "lost/gained",
        "McNemar p"
    );
    let mut failed = Vec::new();
    for r in rows {
        table.push_str(&format!(
            "{:<32} {:>5} {:>+9.4} {:>18} {:>+11.4} {:>18} {:>11} {:>9.3}  {}\n",
            r.key,
            r.n,
            r.acc_drop,
            ci(r.acc_drop_ci95),
            r.margin_drop,
            ci(r.margin_drop_ci95),
            format!("{}/{}", r.lost, r.gained),
            r.mcnemar_p,
            if r.pass { "pass" } else { "FAIL" }
        ));
        if r.pass {
            continue;
        }
        let mut why = Vec::new();
        if let Some(m) = limits.max_acc_drop.filter(|&m| r.acc_drop > m) {
            why.push(format!(
                "accuracy drop {:.4} {} > --max-drop {m} ({} lost, {} gained, McNemar p = {:.3})",
                r.acc_drop,
                ci(r.acc_drop_ci95),
                r.lost,
                r.gained,
                r.mcnemar_p
            ));
        }
        if let Some(m) = limits.max_margin_drop.filter(|&m| r.margin_drop > m) {
            why.push(format!(
                "margin drop {:.4} nats {} > --max-margin-drop {m}",
                r.margin_drop,
                ci(r.margin_drop_ci95)
            ));
        }
        failed.push(format!("{} (n={}): {}", r.key, r.n, why.join(", ")));
    }
    let failure = (!failed.is_empty()).then(|| failed.join("; "));
    (table, failure)
}
