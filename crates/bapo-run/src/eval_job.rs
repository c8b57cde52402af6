//! `bapo eval`'s report: the base model and (with an adapter) the personalised one on every
//! eval metric, the retention gate, `report.json` and its HTML page.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bapo_data::EncodedExample;
use bapo_eval::heldout::{decode_all, full_eval, weight_change_norms, EvalExtras};
use bapo_model::Llama;
use bapo_train::io::{write_atomic, RunError};
use bapo_train::train::ReferenceLogps;
use burn::tensor::backend::Backend;

use crate::config::RunConfig;

/// The eval report of `run_eval` (see there).
#[allow(clippy::too_many_arguments)]
pub fn eval_report<B: Backend>(
    run: &RunConfig,
    device: &B::Device,
    base: Llama<B>,
    reference: &Llama<B>,
    adapter: Option<&Path>,
    report: &Path,
    eval_enc: &[EncodedExample],
    refs: &[ReferenceLogps],
    eos: u32,
    extras: &EvalExtras<'_>,
    base_metrics: &BTreeMap<String, f64>,
    base_summaries: &BTreeMap<String, bapo_drift::McSummary>,
    gate: Option<&bapo_eval::gate::GateSpec>,
) -> Result<PathBuf, RunError> {
    if gate.is_some() && adapter.is_none() {
        return Err(bapo_eval::gate::NEEDS_ADAPTER.into());
    }
    let policy = match adapter {
        None => None,
        Some(dir) if dir.join("adapter_config.json").exists() => {
            Some(bapo_train::lora::load_adapter_dir(base, dir, device)?)
        }
        Some(dir) => Some(bapo_model::load_pretrained::<B>(dir, device)?.model),
    };
    let (metrics, summaries, items, distance, answers) = match &policy {
        Some(p) => {
            let (mut m, s, items, answers) = full_eval(
                p,
                Some(reference),
                eval_enc,
                refs,
                run.eval_settings(),
                eos,
                device,
                extras,
            )?;
            let wd = bapo_drift::weights::weight_distance(&weight_change_norms(p, reference));
            m.insert("eval_weight_distance".into(), wd.global);
            let answers = decode_all(extras.tok, &answers)?;
            (Some(m), Some(s), Some(items), Some(wd), Some(answers))
        }
        None => (None, None, None, None, None),
    };
    // Held-out prompts with the base model's and the personalised model's greedy answers.
    let base_answers = extras.base_answers.clone().unwrap_or_default();
    let answers: Vec<serde_json::Value> = extras
        .out_texts
        .iter()
        .zip(&base_answers)
        .enumerate()
        .map(|(i, (prompt, base))| {
            let policy = answers.as_ref().and_then(|a| a.get(i));
            serde_json::json!({"prompt": prompt, "base": base, "policy": policy})
        })
        .collect();
    let no_items = bapo_eval::knowledge::KnowledgeResults::new();
    let base_items = extras.base_knowledge.as_ref().unwrap_or(&no_items);
    let verdict = match (gate, &items) {
        (Some(spec), Some(items)) => {
            let (rows, json) = bapo_eval::gate::run_gate(spec, base_items, items)?;
            Some((bapo_eval::gate::gate_table(&rows, spec.limits), json))
        }
        _ => None,
    };
    let mut table = format!("{:<48} {:>12} {:>12}\n", "metric", "base", "policy");
    for (k, v) in base_metrics {
        let p = metrics
            .as_ref()
            .and_then(|m| m.get(k))
            .map_or(String::from("-"), |p| format!("{p:.4}"));
        table.push_str(&format!("{k:<48} {v:>12.4} {p:>12}\n"));
    }
    for (k, s) in base_summaries {
        let ci = |c: [f64; 2]| format!("[{:.3}, {:.3}]", c[0], c[1]);
        let p = summaries.as_ref().and_then(|m| m.get(k));
        table.push_str(&format!(
            "{:<48} {:>12} {:>12}\n",
            format!("knowledge/{k}/acc 95% CI (n={})", s.n),
            ci(s.acc_ci95),
            p.map_or(String::from("-"), |p| ci(p.acc_ci95))
        ));
    }
    println!("{table}");
    if let Some(((gate_table, _), _)) = &verdict {
        println!("{gate_table}");
    }
    let doc = serde_json::json!({
        "model": run.model.path,
        "adapter": adapter.map(|a| a.display().to_string()),
        "base": base_metrics,
        "policy": metrics,
        "weight_distance": distance,
        "knowledge": {
            "base": base_summaries,
            "policy": summaries,
        },
        // Per item, so that a later run's retention gate can pair its items with these.
        "items": {
            "base": base_items,
            "policy": items,
        },
        "gate": verdict.as_ref().map(|(_, json)| json),
        "answers": answers,
    });
    if let Some(dir) = report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(report, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    let svg = std::fs::read_to_string(run.output.dir.join("training.svg")).ok();
    let html = report.with_extension("html");
    write_atomic(
        &html,
        bapo_eval::html::report_page(&doc, svg.as_deref()).as_bytes(),
    )?;
    tracing::info!(report = %report.display(), html = %html.display(), "report written");
    if let Some(((_, Some(failed)), _)) = &verdict {
        return Err(format!(
            "retention gate failed ({} written): {failed}",
            report.display()
        )
        .into());
    }
    Ok(report.to_path_buf())
}
