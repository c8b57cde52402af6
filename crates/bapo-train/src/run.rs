//! `bapo train`: the whole job. Load the model; read and split the preference data; have the
//! frozen reference answer every prompt (the base responses, cached); compute reference
//! log-probs once (cached, keyed by a fingerprint of everything they depend on); train with
//! the BAPO objective, evaluating on the held-out split and checkpointing; save the adapter.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bapo_data::{
    encode_examples, read_preferences, BaseResponse, EncodeConfig, EncodedExample, PreferenceBatch,
    PreferenceExample,
};
use bapo_model::{generate, GenerationConfig, Llama, LoadedModel};
use bapo_objective::{bapo_loss, AnchorLogps, PairLogps};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{expand_path, RunConfig};
use crate::train::{
    reference_logps, reference_of, train, Normalisation, Optim, OptimRecord, ReferenceLogps,
    Resume, StepLog,
};

/// Any failure of the job, with its context.
pub type RunError = Box<dyn std::error::Error + Send + Sync>;

fn bar(len: usize, what: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {what} [{{elapsed}} < {{eta}}]"
    ))
    .expect("template");
    ProgressBar::new(len as u64).with_style(style)
}

/// Writes `bytes` to `path` through a temp file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
    })
}

/// sha256 of a file, or of every file in a directory (sorted by name).
fn hash_path(h: &mut Sha256, path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for n in names.iter().filter(|n| n.is_file()) {
            h.update(
                n.file_name()
                    .map(|s| s.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            hash_path(h, n)?;
        }
        Ok(())
    } else {
        std::io::copy(&mut std::fs::File::open(path)?, h).map(|_| ())
    }
}

fn hex(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a cache's numbers were computed: the backend (its Burn name) and the version of the
/// log-prob computation. Log-probs from another backend differ at float precision, and at
/// step 1 (policy = reference) the anchor's hinge sits exactly on its kink, so any such
/// difference switches the anchor on for part of the batch: a cache is only reused by the
/// backend that made it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Numerics {
    pub backend: String,
    /// Bumped when the log-prob or generation code changes its floating-point results.
    pub logps: String,
    /// Worker threads when the cache was made (recorded, not compared: results do not depend
    /// on it on the CPU backends).
    pub threads: usize,
}

impl Numerics {
    /// This process's numerics on backend `B`.
    pub fn of<B: Backend>(device: &B::Device) -> Self {
        Self {
            backend: B::name(device),
            logps: "f32, completion rows only, logit - logsumexp, grouped attention, base responses as generated (v3)".into(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Version of the anchor cache's contents; older caches (text only, no token ids) are rebuilt.
const ANCHOR_CACHE_FORMAT: u32 = 2;

#[derive(Serialize, Deserialize)]
struct AnchorCache {
    #[serde(default)]
    format: u32,
    fingerprint: String,
    #[serde(default)]
    numerics: Numerics,
    /// Decoded text (for people: anchors.jsonl); the anchor scores `responses`' ids.
    bases: Vec<String>,
    #[serde(default)]
    responses: Vec<BaseResponse>,
}

impl AnchorCache {
    /// Fraction of base responses cut by `max_new_tokens` (no EOS) among `responses[range]`.
    fn cut_fraction(&self, range: std::ops::Range<usize>) -> f64 {
        let r = &self.responses[range];
        r.iter().filter(|b| !b.eos).count() as f64 / r.len().max(1) as f64
    }
}

#[derive(Serialize, Deserialize)]
struct ReferenceCache {
    fingerprint: String,
    #[serde(default)]
    numerics: Numerics,
    train: Vec<ReferenceLogps>,
    eval: Vec<ReferenceLogps>,
}

fn read_cache<T: for<'de> Deserialize<'de>>(
    path: &Path,
    fingerprint: &str,
    numerics: &Numerics,
    get: impl Fn(&T) -> (&str, &Numerics),
) -> Option<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(cache = %path.display(), "cache unreadable ({e}): rebuilding it");
            return None;
        }
    };
    let cache: T = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(cache = %path.display(), "cache is not a valid cache file ({e}): rebuilding it");
            return None;
        }
    };
    let (fp, made) = get(&cache);
    if fp != fingerprint {
        tracing::warn!(cache = %path.display(), "cache fingerprint differs from this run's model/data/settings: rebuilding it");
        None
    } else if made.backend != numerics.backend || made.logps != numerics.logps {
        tracing::warn!(
            cache = %path.display(),
            made_on = %made.backend,
            made_with = %made.logps,
            this_run = %numerics.backend,
            "cache was computed on another backend or by other log-prob code: rebuilding it \
             (reusing it would put the anchor off its kink at step 1)"
        );
        None
    } else {
        Some(cache)
    }
}

/// One decoded generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// Decoded without the EOS token.
    pub text: String,
    /// The generated ids, EOS excluded.
    pub ids: Vec<u32>,
    /// New tokens, EOS excluded.
    pub tokens: usize,
    /// Ended on EOS (not cut by `max_new_tokens`).
    pub eos: bool,
}

/// Generates continuations of `prompts`, `batch` prompts at a time, with a progress bar.
/// Batch `i` uses seed `cfg.seed + i`, so sampled outputs are reproducible.
pub fn generate_texts<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    batch: usize,
    tok: &bapo_model::Tokenizer,
    device: &B::Device,
    what: &str,
) -> Result<Vec<GeneratedText>, RunError> {
    let pb = bar(prompts.len(), what);
    let mut out = Vec::with_capacity(prompts.len());
    for (i, chunk) in prompts.chunks(batch.max(1)).enumerate() {
        let c = GenerationConfig {
            seed: cfg.seed.wrapping_add(i as u64),
            ..cfg.clone()
        };
        for g in generate(model, chunk, &c, device) {
            let mut ids = g.tokens;
            if g.stopped_on_eos {
                ids.pop();
            }
            out.push(GeneratedText {
                text: tok.decode(&ids)?,
                tokens: ids.len(),
                ids,
                eos: g.stopped_on_eos,
            });
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

/// Generates base responses for `prompts` with the reference, `batch` prompts at a time:
/// the decoded texts and the responses as generated (ids, ended on EOS or not).
fn generate_bases<B: Backend>(
    reference: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    batch: usize,
    tok: &bapo_model::Tokenizer,
    device: &B::Device,
) -> Result<(Vec<String>, Vec<BaseResponse>), RunError> {
    let g = generate_texts(
        reference,
        prompts,
        cfg,
        batch,
        tok,
        device,
        "base responses",
    )?;
    Ok(g.into_iter()
        .map(|g| {
            (
                g.text,
                BaseResponse {
                    ids: g.ids,
                    eos: g.eos,
                },
            )
        })
        .unzip())
}

/// Eval metrics (prefixed `eval_`) of `model` on held-out examples: the preference and anchor
/// metrics of the objective, anchor drift of the base responses (`eval_anchor_drift/*`) and the
/// exact token-level KL(policy‖reference) over the base responses' tokens (`eval_kl/token`;
/// `reference = None` when `model` is the reference itself).
fn evaluate<B: Backend>(
    model: &Llama<B>,
    reference: Option<&Llama<B>>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    run: &RunConfig,
    pad: u32,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    let norm = run.train.normalisation;
    let (mut c, mut r, mut b, mut b_sum) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut base_tokens = Vec::new();
    let (mut kl_sum, mut kl_tokens) = (0.0, 0usize);
    // The reference scored against itself: its cached log-probs are the policy's, no forward.
    let chunk_size = if reference.is_none() {
        usize::MAX
    } else {
        run.train.batch_size.max(1) * 2
    };
    if reference.is_none() {
        let pick = |k: usize| {
            refs.iter().map(move |x| {
                if norm == Normalisation::Sum {
                    x.sum[k]
                } else {
                    x.mean[k]
                }
            })
        };
        c.extend(pick(0));
        r.extend(pick(1));
        b.extend(pick(2));
        b_sum.extend(refs.iter().map(|x| x.sum[2]));
        base_tokens.extend(
            examples
                .iter()
                .map(|e| e.base_ids.as_ref().map_or(0, Vec::len)),
        );
    }
    for chunk in examples.chunks(chunk_size).filter(|_| reference.is_some()) {
        let refs_: Vec<&EncodedExample> = chunk.iter().collect();
        let batch = PreferenceBatch::collate(&refs_, pad);
        let shape = [batch.rows, batch.len];
        let tokens = Tensor::<B, 2, burn::tensor::Int>::from_data(
            TensorData::new(batch.tokens.clone(), shape),
            device,
        );
        let attn = Tensor::<B, 2, burn::tensor::Bool>::from_data(
            TensorData::new(batch.attention.clone(), shape),
            device,
        );
        let mask = Tensor::<B, 2>::from_data(
            TensorData::new(batch.completion_mask.clone(), shape),
            device,
        );
        let logits = model.forward(tokens.clone(), Some(attn.clone()));
        let n = chunk.len();
        // Token KL on the base-response rows (the reference's own answers): position t
        // predicts token t+1, so count t where token t+1 is a completion token. Without a
        // separate reference the model is the reference: KL 0, no second forward.
        if let Some(reference) = reference {
            let base = |t: Tensor<B, 2, burn::tensor::Int>| t.narrow(0, 2 * n, n);
            let ref_logits =
                reference.forward(base(tokens.clone()), Some(attn.narrow(0, 2 * n, n)));
            let mut next = batch.completion_mask[2 * n * batch.len..].to_vec();
            for row in next.chunks_mut(batch.len) {
                row.rotate_left(1);
                *row.last_mut().expect("len > 0") = 0.0;
            }
            let kl_mask = Tensor::<B, 2>::from_data(TensorData::new(next, [n, batch.len]), device);
            let kl = bapo_drift::token_kl(
                logits.clone().narrow(0, 2 * n, n),
                ref_logits,
                kl_mask,
                run.eval.kl_vocab_chunk,
            );
            kl_sum += kl.mean_per_token * kl.tokens as f64;
            kl_tokens += kl.tokens;
        }
        let out = bapo_objective::sequence_logps(logits, tokens, mask);
        let sum: Vec<f64> = out
            .sum
            .clone()
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("f64");
        let v: Vec<f64> = match norm {
            Normalisation::Sum => out.sum,
            Normalisation::Mean => out.mean,
        }
        .into_data()
        .convert::<f64>()
        .to_vec()
        .expect("f64");
        c.extend_from_slice(&v[..n]);
        r.extend_from_slice(&v[n..2 * n]);
        b.extend_from_slice(&v[2 * n..3 * n]);
        b_sum.extend_from_slice(&sum[2 * n..3 * n]);
        for row in 2 * n..3 * n {
            let m = &batch.completion_mask[row * batch.len..(row + 1) * batch.len];
            base_tokens.push(m.iter().filter(|&&x| x > 0.0).count());
        }
    }
    let t = |v: Vec<f64>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), device);
    let pick = |k: usize| {
        refs.iter()
            .map(|x| {
                if norm == Normalisation::Sum {
                    x.sum[k]
                } else {
                    x.mean[k]
                }
            })
            .collect::<Vec<_>>()
    };
    let ref_base_sum: Vec<f64> = refs.iter().map(|x| x.sum[2]).collect();
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
struct EvalExtras<'a> {
    sets: Vec<crate::eval::KnowledgeSet>,
    formats: Vec<bapo_drift::mc::Format>,
    out_prompts: Vec<Vec<u32>>,
    eos_ids: Vec<u32>,
    max_new_tokens: usize,
    base_knowledge: Option<crate::eval::KnowledgeResults>,
    base_output: Option<bapo_drift::OutputStats>,
    tok: &'a bapo_model::Tokenizer,
    template: &'a bapo_data::ChatTemplate,
}

/// Flat `eval_` metrics, knowledge summaries, per-item knowledge results.
type EvalOutcome = (
    BTreeMap<String, f64>,
    BTreeMap<String, bapo_drift::McSummary>,
    crate::eval::KnowledgeResults,
);

/// Every eval metric (`eval_`-prefixed) of `model`, and the knowledge summaries.
#[allow(clippy::too_many_arguments)]
fn full_eval<B: Backend>(
    model: &Llama<B>,
    reference: Option<&Llama<B>>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    run: &RunConfig,
    pad: u32,
    device: &B::Device,
    x: &EvalExtras,
) -> Result<EvalOutcome, RunError> {
    let mut m = if examples.is_empty() {
        BTreeMap::new()
    } else {
        evaluate(model, reference, examples, refs, run, pad, device)
    };
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
    if !x.out_prompts.is_empty() {
        let o =
            crate::eval::output_stats(model, &x.out_prompts, x.max_new_tokens, &x.eos_ids, device);
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
    Ok((m, summaries, results))
}

/// Frobenius norm of each weight's change from the reference: `‖scale·A·B‖` per adapted
/// module for LoRA, `‖W − W₀‖` per tensor otherwise.
fn weight_change_norms<B: Backend>(
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

/// PEFT's `adapter_config.json` for the saved adapter.
fn adapter_config(run: &RunConfig) -> serde_json::Value {
    let l = run.lora.clone().unwrap_or_default();
    serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": l.rank, "lora_alpha": l.alpha, "lora_dropout": l.dropout,
        "target_modules": l.target_modules, "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
        "base_model_name_or_path": run.model.path,
    })
}

/// What a checkpoint holds besides the trainer state: the adapter (LoRA) or the whole model
/// as an HF checkpoint (full fine-tuning, which needs the config and tokenizer).
enum Weights<'a> {
    Adapter,
    Full(&'a bapo_model::LlamaConfig, &'a bapo_model::Tokenizer),
}

/// Saves the weights + configs into `dir` atomically (built in a temp dir, then renamed).
fn save_checkpoint<B: AutodiffBackend>(
    model: &Llama<B>,
    optim: Option<&Optim<B>>,
    run: &RunConfig,
    weights: &Weights,
    dir: &Path,
    state: &serde_json::Value,
) -> Result<(), RunError> {
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| -> Result<(), RunError> {
        std::fs::create_dir_all(&tmp)?;
        match weights {
            Weights::Adapter => {
                crate::lora::save_adapter(model, &tmp.join("adapter_model.safetensors"))?;
                write_atomic(
                    &tmp.join("adapter_config.json"),
                    serde_json::to_string_pretty(&adapter_config(run))?.as_bytes(),
                )?;
            }
            Weights::Full(config, tok) => {
                bapo_model::export::write_pretrained(&model.valid(), config, tok, &tmp)?
            }
        }
        if let Some(o) = optim {
            Recorder::<B>::record(
                &BinFileRecorder::<FullPrecisionSettings>::new(),
                o.to_record(),
                tmp.join("optimizer"),
            )?;
        }
        write_atomic(
            &tmp.join("trainer_state.json"),
            serde_json::to_string_pretty(state)?.as_bytes(),
        )?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::rename(&tmp, dir)?;
        Ok(())
    })();
    // A failed save (a full disk, say) leaves no half-written directory behind, and the
    // error names the checkpoint; earlier checkpoints are untouched.
    res.map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        format!("saving {}: {e}", dir.display()).into()
    })
}

/// Runs the whole job described by `run`.
///
/// With `resume`, training continues from the newest `checkpoint-N` in the output directory
/// (adapter, AdamW state, step and token counters; data order and learning rate are replayed
/// from the seed), and `metrics.jsonl` is cut back to step N before new lines are appended.
pub fn run_training<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    resume: bool,
) -> Result<PathBuf, RunError> {
    run_job::<B>(run, device, Mode::Train { resume })
}

/// The newest `checkpoint-N` directory under `out`.
fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    std::fs::read_dir(out)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
}

/// `bapo anchor`: only the base responses and reference log-probs (cached as for training);
/// returns the path of `anchors.jsonl`.
pub fn run_anchors<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
) -> Result<PathBuf, RunError> {
    run_job::<B>(run, device, Mode::Anchors)
}

/// What `run_job` does after the shared preparation (data, anchors, reference log-probs).
enum Mode {
    Anchors,
    Train {
        resume: bool,
    },
    Eval {
        adapter: Option<PathBuf>,
        report: PathBuf,
    },
}

/// `bapo eval`: the base model and (with `adapter`: a LoRA adapter directory or a full
/// fine-tuned HF directory) the personalised one, on every metric: held-out preference
/// accuracy, anchor drift, token KL, output drift, and every item of every knowledge set in
/// both formats. Prints a table and writes `report` (JSON); returns its path.
pub fn run_eval<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    adapter: Option<PathBuf>,
    report: PathBuf,
) -> Result<PathBuf, RunError> {
    run_job::<B>(run, device, Mode::Eval { adapter, report })
}

/// The eval report of `run_eval` (see there).
#[allow(clippy::too_many_arguments)]
fn eval_report<B: Backend>(
    run: &RunConfig,
    device: &B::Device,
    base: Llama<B>,
    reference: &Llama<B>,
    adapter: Option<&Path>,
    report: &Path,
    eval_enc: &[EncodedExample],
    refs: &[ReferenceLogps],
    eos: u32,
    extras: &EvalExtras,
    base_metrics: &BTreeMap<String, f64>,
    base_summaries: &BTreeMap<String, bapo_drift::McSummary>,
) -> Result<PathBuf, RunError> {
    let policy = match adapter {
        None => None,
        Some(dir) if dir.join("adapter_config.json").exists() => {
            Some(crate::lora::load_adapter_dir(base, dir, device)?)
        }
        Some(dir) => Some(bapo_model::load_pretrained::<B>(dir, device)?.model),
    };
    let (metrics, summaries, distance) = match &policy {
        Some(p) => {
            let (mut m, s, _) =
                full_eval(p, Some(reference), eval_enc, refs, run, eos, device, extras)?;
            let wd = bapo_drift::weights::weight_distance(&weight_change_norms(p, reference));
            m.insert("eval_weight_distance".into(), wd.global);
            (Some(m), Some(s), Some(wd))
        }
        None => (None, None, None),
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
    });
    if let Some(dir) = report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(report, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    Ok(report.to_path_buf())
}

/// The training figure (`training.svg` / `.png` in the run directory): knowledge accuracy, the
/// gold answer's margin, drift from the reference and preference accuracy against steps, with
/// the base model as step 0.
fn training_figure(
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
    let series = |key: &str, name: &str| Series {
        name: name.to_string(),
        points: evals
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?)))
            .collect(),
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
}

fn run_job<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    mode: Mode,
) -> Result<PathBuf, RunError> {
    let out = &run.output.dir;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(run)?.as_bytes(),
    )?;
    let model_path = expand_path(&run.model.path);
    let LoadedModel {
        model,
        config,
        tokenizer: tok,
    } = bapo_model::load_pretrained::<B>(&model_path, device)?;
    tracing::info!(model = %model_path.display(), params = config.num_params(), "model loaded");
    let eos = tok.eos_id().ok_or("the tokenizer has no EOS token")?;
    let template = crate::chat_template(&tok);

    // Data and the seeded train/eval split.
    let keep = |mut v: Vec<PreferenceExample>, path: &Path| -> Result<_, RunError> {
        if let Some(users) = &run.data.users {
            v.retain(|e| e.user.as_ref().is_some_and(|u| users.contains(u)));
            if v.is_empty() {
                return Err(format!(
                    "{}: no pair has a `user` in data.users {users:?}",
                    path.display()
                )
                .into());
            }
        }
        Ok(v)
    };
    let mut examples = keep(read_preferences(&run.data.train)?, &run.data.train)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.train.seed);
    examples.shuffle(&mut rng);
    let (eval_ex, train_ex): (Vec<PreferenceExample>, Vec<PreferenceExample>) = match &run.data.eval
    {
        Some(p) => (keep(read_preferences(p)?, p)?, examples.clone()),
        None => {
            let n_eval = ((examples.len() as f64) * run.data.eval_fraction).round() as usize;
            (examples[..n_eval].to_vec(), examples[n_eval..].to_vec())
        }
    };
    let users: std::collections::BTreeSet<&str> =
        examples.iter().filter_map(|e| e.user.as_deref()).collect();
    tracing::info!(
        train = train_ex.len(),
        eval = eval_ex.len(),
        ?users,
        "preference data"
    );

    // Fingerprint of everything the base responses depend on.
    let mut h = Sha256::new();
    hash_path(&mut h, &model_path)?;
    hash_path(&mut h, &run.data.train)?;
    if let Some(p) = &run.data.eval {
        hash_path(&mut h, p)?;
    }
    h.update(serde_json::to_vec(&run.data.users)?);
    h.update(
        template
            .render(&[bapo_data::Message::user("x")], true)?
            .as_bytes(),
    );
    h.update(serde_json::to_vec(&run.anchor)?);
    // Base responses answer the prompt as the policy sees it (cut to max_prompt_length).
    h.update(serde_json::to_vec(&(
        run.data.max_prompt_length,
        &run.data.truncation_mode,
    ))?);
    h.update(run.train.seed.to_le_bytes());
    h.update(run.data.eval_fraction.to_le_bytes());
    let anchor_fp = hex(h.clone());

    // A prompt that alone fills max_length is an error unless dropping is asked for: checked
    // before the (slow) base responses, by a dry tokenisation without them.
    let enc_cfg = EncodeConfig {
        max_length: run.data.max_length,
        max_prompt_length: run.data.max_prompt_length,
        truncation_mode: run.data.truncation()?,
    };
    // The file each split's line numbers refer to.
    let eval_file = run.data.eval.as_ref().unwrap_or(&run.data.train);
    let context = config.max_position_embeddings;
    if run.data.max_length > context {
        return Err(format!(
            "data.max_length = {} exceeds the context of {} ({context} positions, \
             max_position_embeddings)",
            run.data.max_length,
            model_path.display()
        )
        .into());
    }
    if !run.data.drop_long_prompts {
        for (split, ex, file) in [
            ("train", &train_ex, &run.data.train),
            ("eval", &eval_ex, eval_file),
        ] {
            let (_, s) =
                encode_examples(ex, None, &template, &crate::encoder(&tok), eos, &enc_cfg)?;
            let mut lines = s.dropped_prompt_too_long;
            lines.sort_unstable();
            if let Some(first) = lines.first() {
                return Err(format!(
                    "{}:{first}: field `prompt` alone is longer than data.max_length = {} tokens \
                     ({} such line(s) in the {split} split: {:?}); raise data.max_length, set \
                     data.max_prompt_length to truncate prompts, or data.drop_long_prompts = \
                     true to skip them",
                    file.display(),
                    enc_cfg.max_length,
                    lines.len(),
                    lines
                )
                .into());
            }
        }
    }

    let reference = reference_of(&model);
    let all: Vec<&PreferenceExample> = train_ex.iter().chain(&eval_ex).collect();
    let anchor_path = out.join("anchors.cache.json");
    let numerics = Numerics::of::<B::InnerBackend>(device);
    let cached = read_cache::<AnchorCache>(&anchor_path, &anchor_fp, &numerics, |c| {
        (&c.fingerprint, &c.numerics)
    })
    .filter(|c| {
        if c.format != ANCHOR_CACHE_FORMAT {
            tracing::warn!(cache = %anchor_path.display(), "anchor cache predates format {ANCHOR_CACHE_FORMAT} (the reference's own token ids and EOS flags): rebuilding it");
        }
        c.format == ANCHOR_CACHE_FORMAT
            && c.bases.len() == all.len()
            && c.responses.len() == all.len()
    });
    let anchors = match cached {
        Some(c) => {
            tracing::info!("reusing {} cached base responses", c.bases.len());
            c
        }
        None => {
            let encode = crate::encoder(&tok);
            let mut prompts = Vec::with_capacity(all.len());
            for (i, e) in all.iter().enumerate() {
                let ids = bapo_data::preference::prompt_ids(&template, &encode, &e.prompt, e.line)?;
                let ids = enc_cfg.truncate_prompt(ids);
                let need = ids.len() + run.anchor.max_new_tokens;
                if need > context {
                    let file = if i < train_ex.len() {
                        &run.data.train
                    } else {
                        eval_file
                    };
                    return Err(format!(
                        "{}:{}: field `prompt` is {} tokens; with anchor.max_new_tokens = {} the \
                         base response needs {need} positions, beyond the model's context of \
                         {context}; set data.max_prompt_length to truncate prompts",
                        file.display(),
                        e.line,
                        ids.len(),
                        run.anchor.max_new_tokens
                    )
                    .into());
                }
                prompts.push(ids);
            }
            let mut eos_ids = config.eos_token_ids.clone();
            eos_ids.push(eos);
            let a = &run.anchor;
            let gcfg = GenerationConfig {
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                seed: a.seed,
                eos_ids,
            };
            let t0 = std::time::Instant::now();
            let (bases, responses) =
                generate_bases(&reference, &prompts, &gcfg, a.batch_size, &tok, device)?;
            let n: usize = responses.iter().map(|r| r.ids.len()).sum();
            tracing::info!(
                responses = bases.len(),
                tokens = n,
                tokens_per_s = n as f64 / t0.elapsed().as_secs_f64(),
                "base responses generated"
            );
            let c = AnchorCache {
                format: ANCHOR_CACHE_FORMAT,
                fingerprint: anchor_fp.clone(),
                numerics: numerics.clone(),
                bases,
                responses,
            };
            write_atomic(&anchor_path, serde_json::to_string(&c)?.as_bytes())?;
            c
        }
    };

    // Tokenise with the base responses; reference log-probs (cached).
    let encode = crate::encoder(&tok);
    let (train_bases, eval_bases) = anchors.responses.split_at(train_ex.len());
    let cut = anchors.cut_fraction(0..train_ex.len());
    if cut > 0.0 {
        tracing::info!(
            fraction = cut,
            max_new_tokens = run.anchor.max_new_tokens,
            "training base responses cut by anchor.max_new_tokens (scored without an EOS)"
        );
    }
    let (train_enc, ts) = encode_examples(
        &train_ex,
        Some(train_bases),
        &template,
        &encode,
        eos,
        &enc_cfg,
    )?;
    let (eval_enc, es) = encode_examples(
        &eval_ex,
        Some(eval_bases),
        &template,
        &encode,
        eos,
        &enc_cfg,
    )?;
    for (split, s, file) in [("train", &ts, &run.data.train), ("eval", &es, eval_file)] {
        if !s.dropped_prompt_too_long.is_empty() {
            tracing::warn!(split, file = %file.display(), dropped = s.dropped_prompt_too_long.len(), lines = ?s.dropped_prompt_too_long, max_length = enc_cfg.max_length, "examples dropped: the prompt alone exceeds max_length");
        }
        if s.examples_truncated > 0 {
            tracing::info!(
                split,
                examples = s.examples_truncated,
                prompt_tokens_cut = s.prompt_tokens_cut,
                completion_tokens_cut = s.completion_tokens_cut,
                "truncated"
            );
        }
    }
    if train_enc.is_empty() {
        return Err("no training examples left after truncation".into());
    }
    h.update(serde_json::to_vec(&(
        enc_cfg.max_length,
        enc_cfg.max_prompt_length,
        &run.data.truncation_mode,
    ))?);
    let ref_fp = hex(h);
    let ref_path = out.join("reference_logps.cache.json");
    let refs = match read_cache::<ReferenceCache>(&ref_path, &ref_fp, &numerics, |c| {
        (&c.fingerprint, &c.numerics)
    }) {
        Some(c) if c.train.len() == train_enc.len() && c.eval.len() == eval_enc.len() => c,
        _ => {
            let pb = bar(train_enc.len() + eval_enc.len(), "reference log-probs");
            let bs = run.train.batch_size.max(1) * 2;
            let train = reference_logps(&reference, &train_enc, bs, eos, device, |n| {
                pb.set_position(n as u64)
            });
            let eval = reference_logps(&reference, &eval_enc, bs, eos, device, |n| {
                pb.set_position((train_enc.len() + n) as u64)
            });
            pb.finish_and_clear();
            let c = ReferenceCache {
                fingerprint: ref_fp,
                numerics: numerics.clone(),
                train,
                eval,
            };
            write_atomic(&ref_path, serde_json::to_string(&c)?.as_bytes())?;
            c
        }
    };
    // Human-readable anchors: prompt, base response, token count, reference log-prob.
    let mut lines = String::new();
    for (i, e) in train_enc.iter().enumerate() {
        // Dropped examples leave gaps, so find the source example (and its base) by line.
        let j = train_ex
            .iter()
            .position(|x| x.line == e.line)
            .expect("same data");
        let row = serde_json::json!({"line": e.line, "prompt": train_ex[j].prompt, "base": anchors.bases[j], "tokens": anchors.responses[j].ids.len(), "eos": anchors.responses[j].eos, "base_ids": e.base_ids, "reference_logp": refs.train[i].sum[2]});
        lines.push_str(&format!("{row}\n"));
    }
    write_atomic(&out.join("anchors.jsonl"), lines.as_bytes())?;
    if matches!(mode, Mode::Anchors) {
        return Ok(out.join("anchors.jsonl"));
    }

    // Evaluation extras and the base model's own results (step 0 of every curve).
    let all_items = matches!(mode, Mode::Eval { .. });
    let mut eos_ids = config.eos_token_ids.clone();
    eos_ids.push(eos);
    let encode = crate::encoder(&tok);
    let mut extras = EvalExtras {
        sets: crate::eval::load_knowledge(
            &run.eval.knowledge,
            if all_items {
                0
            } else {
                run.eval.knowledge_items
            },
        )?,
        formats: run.eval.formats()?,
        // Cut like the training prompts; within the context by the anchor's check above.
        out_prompts: eval_ex
            .iter()
            .take(run.eval.output_prompts)
            .map(|e| {
                bapo_data::preference::prompt_ids(&template, &encode, &e.prompt, e.line)
                    .map(|ids| enc_cfg.truncate_prompt(ids))
            })
            .collect::<Result<_, _>>()?,
        eos_ids,
        max_new_tokens: run.anchor.max_new_tokens,
        base_knowledge: None,
        base_output: None,
        tok: &tok,
        template: &template,
    };
    crate::eval::check_knowledge_context(&extras.sets, &extras.formats, &tok, &template, context)?;
    let t0 = std::time::Instant::now();
    let (base_metrics, base_summaries, base_results) = full_eval(
        &reference, None, &eval_enc, &refs.eval, run, eos, device, &extras,
    )?;
    if !extras.out_prompts.is_empty() {
        extras.base_output = Some(crate::eval::output_stats(
            &reference,
            &extras.out_prompts,
            extras.max_new_tokens,
            &extras.eos_ids,
            device,
        ));
    }
    extras.base_knowledge = Some(base_results);
    tracing::info!(secs = t0.elapsed().as_secs_f64(), "base model evaluated");
    let mut base_row = serde_json::json!({
        "step": 0,
        "anchor/base_cut_fraction": anchors.cut_fraction(0..train_ex.len()),
        "eval_anchor/base_cut_fraction": anchors.cut_fraction(train_ex.len()..all.len()),
    });
    for (k, v) in &base_metrics {
        base_row[k] = serde_json::json!(v);
    }
    if let Mode::Eval { adapter, report } = &mode {
        return eval_report(
            run,
            device,
            model.valid(),
            &reference,
            adapter.as_deref(),
            report,
            &eval_enc,
            &refs.eval,
            eos,
            &extras,
            &base_metrics,
            &base_summaries,
        );
    }
    let resume = matches!(mode, Mode::Train { resume: true });
    write_atomic(
        &out.join("eval_base.json"),
        serde_json::to_string_pretty(&base_row)?.as_bytes(),
    )?;

    // Policy: LoRA on the frozen base, or (no [lora] section) every weight trainable, with ids
    // derived from the HF names so a saved optimiser state applies after a restart.
    let weights = match &run.lora {
        Some(_) => Weights::Adapter,
        None => Weights::Full(&config, &tok),
    };
    let policy = match &run.lora {
        Some(l) => l.attach(model, run.train.seed, device),
        None => bapo_model::export::with_stable_ids(model, true),
    };
    let metrics_path = out.join("metrics.jsonl");
    let (policy, resume_state) = if resume {
        let (step, dir) = latest_checkpoint(out)
            .ok_or_else(|| format!("--resume: no checkpoint-N directory in {}", out.display()))?;
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json"))?)?;
        let num_tokens = state["num_tokens"].as_u64().ok_or_else(|| {
            format!(
                "{}: no num_tokens",
                dir.join("trainer_state.json").display()
            )
        })? as usize;
        let policy = match &weights {
            Weights::Adapter => {
                crate::lora::load_adapter(policy, &dir.join("adapter_model.safetensors"), device)?
            }
            Weights::Full(..) => bapo_model::export::with_stable_ids(
                bapo_model::load_pretrained::<B>(&dir, device)?.model,
                true,
            ),
        };
        let optimizer: OptimRecord<B> = Recorder::<B>::load(
            &BinFileRecorder::<FullPrecisionSettings>::new(),
            dir.join("optimizer"),
            device,
        )
        .map_err(|e| format!("{}: {e}", dir.join("optimizer.bin").display()))?;
        // Keep the log up to the checkpoint; steps after it are recomputed.
        let kept: String = std::fs::read_to_string(&metrics_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&metrics_path, kept.as_bytes())?;
        tracing::info!(step, checkpoint = %dir.display(), "resuming");
        (
            policy,
            Some(Resume {
                step,
                num_tokens,
                optimizer,
            }),
        )
    } else {
        std::fs::File::create(&metrics_path)?;
        (policy, None)
    };
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)?;
    let pb = ProgressBar::new(run.train.max_steps as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed} < {eta}] {msg}")
            .expect("template"),
    );
    let mut last = serde_json::Value::Null;
    let mut write_err: Option<RunError> = None;
    let mut on_step = |l: &StepLog, m: &Llama<B>, o: &Optim<B>| {
        let mut row = serde_json::to_value(l).expect("serialisable");
        if (!eval_enc.is_empty() || !extras.sets.is_empty())
            && (l.step.is_multiple_of(run.output.eval_steps.max(1))
                || l.step == run.train.max_steps)
        {
            match full_eval(
                &m.valid(),
                Some(&reference),
                &eval_enc,
                &refs.eval,
                run,
                eos,
                device,
                &extras,
            ) {
                Ok((ev, _, _)) => {
                    for (k, v) in ev {
                        row[k] = serde_json::json!(v);
                    }
                }
                Err(e) => {
                    write_err.get_or_insert(e);
                }
            }
            let wd =
                bapo_drift::weights::weight_distance(&weight_change_norms(&m.valid(), &reference));
            row["eval_weight_distance"] = serde_json::json!(wd.global);
        }
        if let Err(e) = writeln!(log, "{row}").and_then(|_| log.flush()) {
            write_err.get_or_insert(Box::new(e));
        }
        tracing::debug!(
            step = l.step,
            loss = l.metrics["loss"],
            lr = l.learning_rate,
            "step"
        );
        pb.set_message(format!(
            "loss {:.4} margins {:+.3} anchor {:.3} {:.0} tok/s",
            l.metrics["loss"],
            l.metrics["rewards/margins"],
            l.metrics.get("anchor/loss").copied().unwrap_or(0.0),
            l.tokens_per_s
        ));
        last = row.clone();
        // Ctrl-C: the loop stops before the next step; save this one so `--resume` continues.
        if (crate::train::stop_requested()
            || (run.output.save_steps > 0 && l.step.is_multiple_of(run.output.save_steps)))
            && l.step < run.train.max_steps
        {
            if let Err(e) = save_checkpoint(
                m,
                Some(o),
                run,
                &weights,
                &out.join(format!("checkpoint-{}", l.step)),
                &row,
            ) {
                write_err.get_or_insert(e);
            }
        }
        pb.inc(1);
        // A write that failed (a full disk): stop now rather than train on without saving.
        if write_err.is_some() {
            std::ops::ControlFlow::Break(())
        } else {
            std::ops::ControlFlow::Continue(())
        }
    };
    let trained = match train(
        policy,
        &train_enc,
        &refs.train,
        &run.train,
        eos,
        device,
        resume_state,
        &mut on_step,
    ) {
        Ok(policy) => Ok(policy),
        Err(crate::train::TrainError::Interrupted { step }) => Err(step),
        Err(other) => return Err(other.into()),
    };
    pb.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e);
    }
    let policy = match trained {
        Ok(policy) => policy,
        Err(step) => {
            let ckpt = out.join(format!("checkpoint-{step}"));
            return Err(if ckpt.exists() {
                format!(
                    "interrupted after step {step}: {} saved; continue with --resume",
                    ckpt.display()
                )
            } else {
                format!("interrupted after step {step}: no new checkpoint")
            }
            .into());
        }
    };
    let adapter_dir = out.join(match weights {
        Weights::Adapter => "adapter",
        Weights::Full(..) => "model",
    });
    save_checkpoint(&policy, None, run, &weights, &adapter_dir, &last)?;
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    match training_figure(out, &base_row, &rows) {
        Ok(()) => tracing::info!(figure = %out.join("training.png").display(), "figure written"),
        Err(e) => tracing::warn!(error = %e, "the training figure could not be drawn"),
    }
    // A short summary a person can read; the same numbers are the last line of metrics.jsonl.
    let keys = [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "anchor/violation_rate",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_anchor/violation_rate",
        "eval_anchor_drift/mean",
        "eval_kl/token",
        "eval_knowledge/capitals/chat/acc",
        "eval_knowledge/capitals/chat/delta_margin",
        "eval_output/mean_length",
        "eval_logps/base",
        "tokens_per_s",
    ];
    let summary: Vec<String> = keys
        .iter()
        .filter_map(|k| {
            last.get(*k)
                .and_then(|v| v.as_f64())
                .map(|v| format!("{k} {v:.4}"))
        })
        .collect();
    eprintln!("final step {}: {}", run.train.max_steps, summary.join(", "));
    eprintln!(
        "adapter: {}\nmetrics: {}",
        adapter_dir.display(),
        metrics_path.display()
    );
    Ok(adapter_dir)
}
