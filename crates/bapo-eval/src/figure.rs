//! The training figure (`training.svg` / `.png`).

use std::path::Path;

use bapo_train::io::RunError;

/// The training figure (`training.svg` / `.png` in the run directory): knowledge accuracy, the
/// gold answer's margin, drift from the reference and preference accuracy against steps, with
/// the base model as step 0.
pub fn training_figure(
    out: &Path,
    base: &serde_json::Value,
    rows: &[serde_json::Value],
) -> Result<(), RunError> {
    use bapo_drift::plot::{Panel, Series};
    let evals: Vec<&serde_json::Value> = std::iter::once(base)
        .chain(rows.iter().filter(|r| {
            r.get("eval_rewards/accuracies").is_some()
                || r.as_object()
                    .is_some_and(|o| o.keys().any(|k| k.starts_with("eval_knowledge/")))
        }))
        .collect();
    let series = |key: &str, name: &str| {
        Series::new(
            name,
            evals
                .iter()
                .filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?)))
                .collect(),
        )
    };
    let keys: Vec<String> = base
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| k.starts_with("eval_knowledge/") && k.ends_with("/acc"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let label = |k: &str| {
        k.trim_start_matches("eval_knowledge/")
            .trim_end_matches("/acc")
            .replace('/', " ")
    };
    let panels = vec![
        Panel {
            title: "Knowledge accuracy (multiple choice)".into(),
            x_label: "optimiser step (0 = base model)".into(),
            y_label: "accuracy".into(),
            series: keys.iter().map(|k| series(k, &label(k))).collect(),
            y_range: Some((0.0, 1.05)),
        },
        Panel {
            title: "Gold answer's margin over best distractor".into(),
            x_label: "optimiser step (0 = base model)".into(),
            y_label: "nats".into(),
            series: keys
                .iter()
                .map(|k| series(&k.replace("/acc", "/margin"), &label(k)))
                .collect(),
            y_range: None,
        },
        Panel {
            title: "Drift from the reference (held-out)".into(),
            x_label: "optimiser step (0 = base model)".into(),
            y_label: "nats per token".into(),
            series: vec![
                series(
                    "eval_anchor_drift/per_token",
                    "anchor drift (base responses)",
                ),
                series("eval_kl/token", "token KL(policy || reference)"),
            ],
            y_range: None,
        },
        Panel {
            title: "Preference accuracy".into(),
            x_label: "optimiser step (0 = base model)".into(),
            y_label: "fraction of pairs ranked right".into(),
            series: vec![series(
                "eval_rewards/accuracies",
                "held-out pairs (TRL counts margin > 0: 0 at the base)",
            )],
            y_range: Some((0.0, 1.05)),
        },
    ];
    bapo_drift::plot::write_figure(
        &out.join("training"),
        "bapo training: personalisation vs retention",
        &panels,
    )
    .map_err(RunError::from)
}
