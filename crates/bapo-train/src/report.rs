//! Evaluating a model at a step: every `eval_` metric (preference, anchor drift, token KL,
//! knowledge, output drift, weight distance) and the `bapo eval` report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::Llama;
use bapo_objective::{bapo_loss, AnchorLogps, PairLogps};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::config::RunConfig;
use crate::io::{write_atomic, RunError};
use crate::train::{Normalisation, ReferenceLogps};

/// One held-out chunk of `n` examples, scored by the policy (rows `[chosen; rejected; base]`).
struct ChunkScores {
    /// Completion log-probs, normalised as the objective says (`3n`).
    logps: Vec<f64>,
    /// Summed completion log-probs (`3n`).
    sums: Vec<f64>,
    /// Token KL(policy‖reference) summed over the base rows' predicted tokens, and their count.
    kl_sum: f64,
    kl_tokens: usize,
    /// Completion tokens of each base row (`n`).
    base_tokens: Vec<usize>,
}

/// Scores one held-out chunk the way training scores a batch: each prompt computed once and
/// the LM head only at completion positions ([`crate::logps::completion_logits`]); the token
/// KL reuses the policy's logits at the base rows' positions beside the reference's there.
fn score_chunk<B: Backend>(
    model: &Llama<B>,
    reference: &Llama<B>,
    chunk: &[EncodedExample],
    run: &RunConfig,
    pad: u32,
    device: &B::Device,
) -> ChunkScores {
    let refs_: Vec<&EncodedExample> = chunk.iter().collect();
    let batch = PreferenceBatch::collate(&refs_, pad);
    let n = chunk.len();
    assert!(batch.has_base, "held-out examples need base responses");
    let base_tokens: Vec<usize> = chunk
        .iter()
        .map(|e| e.base_ids.as_ref().map_or(0, Vec::len))
        .collect();
    let Some((logits, plan)) = crate::logps::completion_logits(model, &batch, device) else {
        // No completion token anywhere: zero log-probs, nothing for the KL to count.
        return ChunkScores {
            logps: vec![0.0; 3 * n],
            sums: vec![0.0; 3 * n],
            kl_sum: 0.0,
            kl_tokens: 0,
            base_tokens,
        };
    };
    // Base rows come last (`[chosen; rejected; base]`) and the plan is row-major, so their
    // positions are the plan's tail.
    let k = plan.count();
    let first_base = plan
        .positions
        .iter()
        .take_while(|&&p| (p as usize) / plan.len < 2 * n)
        .count();
    let (mut kl_sum, mut kl_tokens) = (0.0, 0);
    if first_base < k {
        let seqs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|e| {
                let base = e.base_ids.as_deref().expect("checked by has_base");
                (e.prompt_ids.as_slice(), base)
            })
            .collect();
        let base_batch = PreferenceBatch::from_sequences(&seqs, pad, n, false);
        let (ref_logits, ref_plan) =
            crate::logps::completion_logits(reference, &base_batch, device)
                .expect("the base rows have completion tokens");
        debug_assert_eq!(ref_plan.targets[..], plan.targets[first_base..]);
        let v = ref_logits.dims()[1];
        let m = k - first_base;
        let kl = bapo_drift::token_kl(
            logits.clone().narrow(0, first_base, m).reshape([1, m, v]),
            ref_logits.reshape([1, m, v]),
            Tensor::<B, 2>::ones([1, m], device),
            run.eval.kl_vocab_chunk,
        );
        (kl_sum, kl_tokens) = (kl.mean_per_token * kl.tokens as f64, kl.tokens);
    }
    let targets = Tensor::<B, 1, burn::tensor::Int>::from_data(
        TensorData::new(plan.targets.clone(), [k]),
        device,
    );
    let out =
        bapo_objective::scatter_logps(bapo_objective::target_logps(logits, targets), &plan, device);
    let host =
        |t: Tensor<B, 1>| -> Vec<f64> { t.into_data().convert::<f64>().to_vec().expect("f64") };
    let sums = host(out.sum.clone());
    let logps = host(match run.train.normalisation {
        Normalisation::Sum => out.sum,
        Normalisation::Mean => out.mean,
    });
    ChunkScores {
        logps,
        sums,
        kl_sum,
        kl_tokens,
        base_tokens,
    }
}

/// Eval metrics (prefixed `eval_`) of `model` on held-out examples: the preference and anchor
/// metrics of the objective, anchor drift of the base responses (`eval_anchor_drift/*`) and the
/// exact token-level KL(policy‖reference) over the base responses' tokens (`eval_kl/token`;
/// `reference = None` when `model` is the reference itself).
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    reference: Option<&Llama<B>>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    run: &RunConfig,
    pad: u32,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    let norm = run.train.normalisation;
    let pick = |k: usize| -> Vec<f64> { refs.iter().map(|x| x.pick(norm)[k]).collect() };
    let ref_base_sum: Vec<f64> = refs.iter().map(|x| x.sum[2]).collect();
    let (mut c, mut r, mut b, mut b_sum) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut base_tokens = Vec::new();
    let (mut kl_sum, mut kl_tokens) = (0.0, 0usize);
    match reference {
        // The reference scored against itself: its cached log-probs are the policy's, no forward.
        None => {
            (c, r, b, b_sum) = (pick(0), pick(1), pick(2), ref_base_sum.clone());
            base_tokens = examples
                .iter()
                .map(|e| e.base_ids.as_ref().map_or(0, Vec::len))
                .collect();
        }
        // Chunks run concurrently and are combined in order.
        Some(reference) => {
            let chunks: Vec<&[EncodedExample]> =
                examples.chunks(run.train.batch_size.max(1) * 2).collect();
            let parts = crate::concurrent::map_ordered(
                &chunks,
                crate::concurrent::default_threads(),
                |chunk| score_chunk(model, reference, chunk, run, pad, device),
                |_, _| {},
            );
            for p in parts {
                let n = p.base_tokens.len();
                kl_sum += p.kl_sum;
                kl_tokens += p.kl_tokens;
                c.extend_from_slice(&p.logps[..n]);
                r.extend_from_slice(&p.logps[n..2 * n]);
                b.extend_from_slice(&p.logps[2 * n..3 * n]);
                b_sum.extend_from_slice(&p.sums[2 * n..3 * n]);
                base_tokens.extend(p.base_tokens);
            }
        }
    }
    let t = |v: Vec<f64>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
    let drift = bapo_drift::AnchorDrift::new(&ref_base_sum, &b_sum, &base_tokens);
    let pairs = PairLogps {
        policy_chosen: t(c),
        policy_rejected: t(r),
        reference_chosen: t(pick(0)),
        reference_rejected: t(pick(1)),
    };
    let anchor = AnchorLogps {
        policy: t(b),
        reference: t(pick(2)),
    };
    // The held-out loss is the preference + anchor objective; the NLL-on-chosen term (a
    // training regulariser) is left out, so eval losses compare across `nll_weight` settings.
    let objective = bapo_objective::ObjectiveConfig {
        nll_weight: 0.0,
        ..run.train.objective().expect("validated")
    };
    let out = bapo_loss(&objective, &pairs, Some(&anchor), None);
    let mut m: BTreeMap<String, f64> = out
        .metrics(&objective, &pairs, Some(&anchor))
        .into_iter()
        .collect();
    m.insert("anchor_drift/mean".into(), drift.mean);
    m.insert("anchor_drift/per_token".into(), drift.mean_per_token);
    m.insert("anchor_drift/fell_fraction".into(), drift.fell_fraction);
    m.insert(
        "kl/token".into(),
        if kl_tokens > 0 {
            kl_sum / kl_tokens as f64
        } else {
            0.0
        },
    );
    m.into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect()
}

/// What the evaluation passes need besides the held-out pairs: knowledge sets, output-drift
/// prompts, and the base model's results to compare against.
pub(crate) struct EvalExtras<'a> {
    pub(crate) sets: Vec<crate::eval::KnowledgeSet>,
    pub(crate) formats: Vec<bapo_drift::mc::Format>,
    pub(crate) out_prompts: Vec<Vec<u32>>,
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) max_new_tokens: usize,
    pub(crate) base_knowledge: Option<crate::eval::KnowledgeResults>,
    pub(crate) base_output: Option<bapo_drift::OutputStats>,
    /// The user's dimension and pole when the run personalises for one known pole
    /// (`data.users = ["concise"]`, ...): `eval_personalisation/*` compares answers with
    /// `base_answers`, the base model's decoded answers to `out_prompts`.
    pub(crate) pole: Option<(bapo_data::synth::Dimension, usize)>,
    pub(crate) base_answers: Option<Vec<String>>,
    /// The conversation of each of `out_prompts`, as text (for the report).
    pub(crate) out_texts: Vec<String>,
    pub(crate) tok: &'a bapo_model::Tokenizer,
    pub(crate) template: &'a bapo_data::ChatTemplate,
}

/// Flat `eval_` metrics, knowledge summaries, per-item knowledge results, and the greedy
/// answers to `out_prompts` (tokens without EOS, whether it ended on EOS).
pub(crate) type EvalOutcome = (
    BTreeMap<String, f64>,
    BTreeMap<String, bapo_drift::McSummary>,
    crate::eval::KnowledgeResults,
    Vec<(Vec<u32>, bool)>,
);

/// Every eval metric (`eval_`-prefixed) of `model`, and the knowledge summaries.
#[allow(clippy::too_many_arguments)]
pub(crate) fn full_eval<B: Backend>(
    model: &Llama<B>,
    reference: Option<&Llama<B>>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    run: &RunConfig,
    pad: u32,
    device: &B::Device,
    x: &EvalExtras<'_>,
) -> Result<EvalOutcome, RunError> {
    let t = std::time::Instant::now();
    let mut m = if examples.is_empty() {
        BTreeMap::new()
    } else {
        evaluate(model, reference, examples, refs, run, pad, device)
    };
    tracing::debug!(
        secs = t.elapsed().as_secs_f64(),
        pairs = examples.len(),
        "eval: held-out pairs scored"
    );
    let (extra, summaries, results, answers) = extras_eval(model, run, device, x)?;
    m.extend(extra);
    tracing::debug!(secs = t.elapsed().as_secs_f64(), "eval: done");
    Ok((m, summaries, results, answers))
}

/// The part of [`full_eval`] that needs no preference pairs: knowledge items (against
/// `x.base_knowledge` when given), the generative check and the greedy answers to the output
/// prompts (with personalisation and output drift against the base model's when given).
pub(crate) fn extras_eval<B: Backend>(
    model: &Llama<B>,
    run: &RunConfig,
    device: &B::Device,
    x: &EvalExtras<'_>,
) -> Result<EvalOutcome, RunError> {
    let mut m = BTreeMap::new();
    let t = std::time::Instant::now();
    let (results, summaries) = crate::eval::knowledge(
        model,
        &x.sets,
        &x.formats,
        x.tok,
        x.template,
        run.eval.batch_size,
        device,
        x.base_knowledge.as_ref(),
    )?;
    for (k, v) in crate::eval::knowledge_metrics(&summaries) {
        m.insert(format!("eval_{k}"), v);
    }
    tracing::debug!(
        secs = t.elapsed().as_secs_f64(),
        "eval: knowledge items scored"
    );
    let t = std::time::Instant::now();
    if run.eval.generative_items > 0 {
        let g = crate::eval::generative_knowledge(
            model,
            &x.sets,
            run.eval.generative_items,
            x.tok,
            x.template,
            &x.eos_ids,
            run.eval.batch_size,
            device,
        )?;
        for (k, v) in g {
            m.insert(format!("eval_{k}"), v);
        }
    }
    tracing::debug!(secs = t.elapsed().as_secs_f64(), "eval: generative check");
    let t = std::time::Instant::now();
    let mut answers = Vec::new();
    if !x.out_prompts.is_empty() {
        answers = crate::eval::greedy_answers(
            model,
            &x.out_prompts,
            x.max_new_tokens,
            &x.eos_ids,
            device,
        );
        let o = bapo_drift::OutputStats::new(&answers);
        if let (Some(pole), Some(base)) = (x.pole, &x.base_answers) {
            let texts = decode_all(x.tok, &answers)?;
            let (success, delta) = crate::eval::personalisation(pole, base, &texts);
            m.insert("eval_personalisation/success".into(), success);
            m.insert("eval_personalisation/delta_measure".into(), delta);
        }
        m.insert("eval_output/mean_length".into(), o.mean_length);
        m.insert("eval_output/eos_rate".into(), o.eos_rate);
        m.insert("eval_output/distinct_2".into(), o.distinct_2);
        if let Some(b) = &x.base_output {
            m.insert(
                "eval_output/delta_mean_length".into(),
                o.mean_length - b.mean_length,
            );
        }
    }
    tracing::debug!(
        secs = t.elapsed().as_secs_f64(),
        prompts = x.out_prompts.len(),
        "eval: output prompts answered"
    );
    Ok((m, summaries, results, answers))
}

/// The text of each answer (tokens without EOS).
pub(crate) fn decode_all(
    tok: &bapo_model::Tokenizer,
    answers: &[(Vec<u32>, bool)],
) -> Result<Vec<String>, RunError> {
    answers
        .iter()
        .map(|(t, _)| {
            tok.decode(t)
                .map_err(|e| format!("decoding an answer: {e}").into())
        })
        .collect()
}

/// Frobenius norm of each weight's change from the reference: `‖scale·A·B‖` per adapted
/// module for LoRA, `‖W − W₀‖` per tensor otherwise.
pub(crate) fn weight_change_norms<B: Backend>(
    policy: &Llama<B>,
    reference: &Llama<B>,
) -> BTreeMap<String, f64> {
    let lora = crate::lora::adapter_delta_norms(policy);
    if !lora.is_empty() {
        return lora;
    }
    let before = bapo_model::export::hf_tensors(reference);
    bapo_model::export::hf_tensors(policy)
        .into_iter()
        .filter_map(|(k, t)| {
            let b = before.get(&k)?;
            Some((k, bapo_drift::weights::diff_norm(&t.data, &b.data)))
        })
        .collect()
}

/// The eval report of `run_eval` (see there).
#[allow(clippy::too_many_arguments)]
pub(crate) fn eval_report<B: Backend>(
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
    gate: Option<&crate::gate::GateSpec>,
) -> Result<PathBuf, RunError> {
    if gate.is_some() && adapter.is_none() {
        return Err(crate::gate::NEEDS_ADAPTER.into());
    }
    let policy = match adapter {
        None => None,
        Some(dir) if dir.join("adapter_config.json").exists() => {
            Some(crate::lora::load_adapter_dir(base, dir, device)?)
        }
        Some(dir) => Some(bapo_model::load_pretrained::<B>(dir, device)?.model),
    };
    let (metrics, summaries, items, distance, answers) = match &policy {
        Some(p) => {
            let (mut m, s, items, answers) =
                full_eval(p, Some(reference), eval_enc, refs, run, eos, device, extras)?;
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
    let no_items = crate::eval::KnowledgeResults::new();
    let base_items = extras.base_knowledge.as_ref().unwrap_or(&no_items);
    let verdict = match (gate, &items) {
        (Some(spec), Some(items)) => {
            let (rows, json) = crate::gate::run_gate(spec, base_items, items)?;
            Some((crate::gate::gate_table(&rows, spec.limits), json))
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
        crate::html::report_page(&doc, svg.as_deref()).as_bytes(),
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
