//! Evaluating a model at a step: every `eval_` metric (preference, anchor drift, token KL,
//! knowledge, output drift, weight distance) and the `bapo eval` report.

use std::collections::BTreeMap;

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::Llama;
use bapo_objective::{bapo_loss, AnchorLogps, PairLogps};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::section::EvalSettings;
use bapo_train::io::RunError;
use bapo_train::train::{Normalisation, ReferenceLogps};

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
/// the LM head only at completion positions ([`bapo_train::logps::completion_logits`]); the token
/// KL reuses the policy's logits at the base rows' positions beside the reference's there.
fn score_chunk<B: Backend>(
    model: &Llama<B>,
    reference: &Llama<B>,
    chunk: &[EncodedExample],
    run: EvalSettings<'_>,
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
    let Some((logits, plan)) =
        bapo_train::logps::completion_logits(model, &batch, run.train.prompt_sharing, device)
    else {
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
        let (ref_logits, ref_plan) = bapo_train::logps::completion_logits(
            reference,
            &base_batch,
            run.train.prompt_sharing,
            device,
        )
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
    run: EvalSettings<'_>,
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
            let parts = bapo_train::concurrent::map_ordered(
                &chunks,
                bapo_train::concurrent::default_threads(),
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
pub struct EvalExtras<'a> {
    pub sets: Vec<crate::knowledge::KnowledgeSet>,
    pub formats: Vec<bapo_drift::mc::Format>,
    pub out_prompts: Vec<Vec<u32>>,
    pub eos_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub base_knowledge: Option<crate::knowledge::KnowledgeResults>,
    pub base_output: Option<bapo_drift::OutputStats>,
    /// The user's dimension and pole when the run personalises for one known pole
    /// (`data.users = ["concise"]`, ...): `eval_personalisation/*` compares answers with
    /// `base_answers`, the base model's decoded answers to `out_prompts`.
    pub pole: Option<(bapo_data::synth::Dimension, usize)>,
    pub base_answers: Option<Vec<String>>,
    /// The conversation of each of `out_prompts`, as text (for the report).
    pub out_texts: Vec<String>,
    pub tok: &'a bapo_model::Tokenizer,
    pub template: &'a bapo_data::ChatTemplate,
}

/// Flat `eval_` metrics, knowledge summaries, per-item knowledge results, and the greedy
/// answers to `out_prompts` (tokens without EOS, whether it ended on EOS).
pub type EvalOutcome = (
    BTreeMap<String, f64>,
    BTreeMap<String, bapo_drift::McSummary>,
    crate::knowledge::KnowledgeResults,
    Vec<(Vec<u32>, bool)>,
);

/// Every eval metric (`eval_`-prefixed) of `model`, and the knowledge summaries.
#[allow(clippy::too_many_arguments)]
pub fn full_eval<B: Backend>(
    model: &Llama<B>,
    reference: Option<&Llama<B>>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    run: EvalSettings<'_>,
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
pub fn extras_eval<B: Backend>(
    model: &Llama<B>,
    run: EvalSettings<'_>,
    device: &B::Device,
    x: &EvalExtras<'_>,
) -> Result<EvalOutcome, RunError> {
    let mut m = BTreeMap::new();
    let t = std::time::Instant::now();
    let (results, summaries) = crate::knowledge::knowledge(
        model,
        &x.sets,
        &x.formats,
        x.tok,
        x.template,
        run.eval.batch_size,
        device,
        x.base_knowledge.as_ref(),
    )?;
    for (k, v) in crate::knowledge::knowledge_metrics(&summaries) {
        m.insert(format!("eval_{k}"), v);
    }
    tracing::debug!(
        secs = t.elapsed().as_secs_f64(),
        "eval: knowledge items scored"
    );
    let t = std::time::Instant::now();
    if run.eval.generative_items > 0 {
        let g = crate::knowledge::generative_knowledge(
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
        answers = crate::knowledge::greedy_answers(
            model,
            &x.out_prompts,
            x.max_new_tokens,
            &x.eos_ids,
            device,
        );
        let o = bapo_drift::OutputStats::new(&answers);
        if let (Some(pole), Some(base)) = (x.pole, &x.base_answers) {
            let texts = decode_all(x.tok, &answers)?;
            let (success, delta) = crate::knowledge::personalisation(pole, base, &texts);
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
pub fn decode_all(
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
pub fn weight_change_norms<B: Backend>(
    policy: &Llama<B>,
    reference: &Llama<B>,
) -> BTreeMap<String, f64> {
    let lora = bapo_train::lora::adapter_delta_norms(policy);
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
