//! `bapo train`: the whole job. Load the model; read and split the preference data; have the
//! frozen reference answer every prompt (the base responses, cached); compute reference
//! log-probs once (cached, keyed by a fingerprint of everything they depend on); train with
//! the BAPO objective, evaluating on the held-out split and checkpointing; save the adapter.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bapo_data::{
    encode_examples, read_preferences, EncodeConfig, EncodedExample, PreferenceBatch,
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
    batch_logps, reference_logps, reference_of, train, Normalisation, Optim, OptimRecord,
    ReferenceLogps, Resume, StepLog,
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
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
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

#[derive(Serialize, Deserialize)]
struct AnchorCache {
    fingerprint: String,
    bases: Vec<String>,
    tokens: Vec<usize>,
}

#[derive(Serialize, Deserialize)]
struct ReferenceCache {
    fingerprint: String,
    train: Vec<ReferenceLogps>,
    eval: Vec<ReferenceLogps>,
}

fn read_cache<T: for<'de> Deserialize<'de>>(
    path: &Path,
    fingerprint: &str,
    get: impl Fn(&T) -> &str,
) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    let cache: T = serde_json::from_str(&text).ok()?;
    if get(&cache) == fingerprint {
        Some(cache)
    } else {
        tracing::warn!(cache = %path.display(), "cache fingerprint differs from this run's model/data/settings: rebuilding it");
        None
    }
}

/// One decoded generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// Decoded without the EOS token.
    pub text: String,
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
                eos: g.stopped_on_eos,
            });
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    Ok(out)
}

/// Generates base responses for `prompts` with the reference, `batch` prompts at a time.
fn generate_bases<B: Backend>(
    reference: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    batch: usize,
    tok: &bapo_model::Tokenizer,
    device: &B::Device,
) -> Result<(Vec<String>, Vec<usize>), RunError> {
    let g = generate_texts(reference, prompts, cfg, batch, tok, device, "base responses")?;
    Ok(g.into_iter().map(|g| (g.text, g.tokens)).unzip())
}

/// Eval metrics (prefixed `eval_`) of `model` on held-out examples.
fn evaluate<B: Backend>(
    model: &Llama<B>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    run: &RunConfig,
    pad: u32,
    device: &B::Device,
) -> BTreeMap<String, f64> {
    let norm = run.train.normalisation;
    let (mut c, mut r, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in examples.chunks(run.train.batch_size.max(1) * 2) {
        let refs_: Vec<&EncodedExample> = chunk.iter().collect();
        let batch = PreferenceBatch::collate(&refs_, pad);
        let (sum, mean) = batch_logps(model, &batch, device);
        let v: Vec<f64> = match norm {
            Normalisation::Sum => sum,
            Normalisation::Mean => mean,
        }
        .into_data()
        .convert::<f64>()
        .to_vec()
        .expect("f64");
        let n = chunk.len();
        c.extend_from_slice(&v[..n]);
        r.extend_from_slice(&v[n..2 * n]);
        b.extend_from_slice(&v[2 * n..3 * n]);
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
    out.metrics(&objective, &pairs, Some(&anchor))
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
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
    run_job::<B>(run, device, false, resume)
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
    run_job::<B>(run, device, true, false)
}

fn run_job<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    anchors_only: bool,
    resume: bool,
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
                return Err(format!("{}: no pair has a `user` in data.users {users:?}", path.display()).into());
            }
        }
        Ok(v)
    };
    let mut examples = keep(read_preferences(&run.data.train)?, &run.data.train)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.train.seed);
    examples.shuffle(&mut rng);
    let (eval_ex, train_ex): (Vec<PreferenceExample>, Vec<PreferenceExample>) =
        match &run.data.eval {
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
    h.update(run.train.seed.to_le_bytes());
    h.update(run.data.eval_fraction.to_le_bytes());
    let anchor_fp = hex(h.clone());

    let reference = reference_of(&model);
    let all: Vec<&PreferenceExample> = train_ex.iter().chain(&eval_ex).collect();
    let anchor_path = out.join("anchors.cache.json");
    let anchors = match read_cache::<AnchorCache>(&anchor_path, &anchor_fp, |c| &c.fingerprint) {
        Some(c) if c.bases.len() == all.len() => {
            tracing::info!("reusing {} cached base responses", c.bases.len());
            c
        }
        _ => {
            let encode = crate::encoder(&tok);
            let prompts: Vec<Vec<u32>> = all
                .iter()
                .map(|e| bapo_data::preference::prompt_ids(&template, &encode, &e.prompt, e.line))
                .collect::<Result<_, _>>()?;
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
            let (bases, tokens) =
                generate_bases(&reference, &prompts, &gcfg, a.batch_size, &tok, device)?;
            let n: usize = tokens.iter().sum();
            tracing::info!(
                responses = bases.len(),
                tokens = n,
                tokens_per_s = n as f64 / t0.elapsed().as_secs_f64(),
                "base responses generated"
            );
            let c = AnchorCache {
                fingerprint: anchor_fp.clone(),
                bases,
                tokens,
            };
            write_atomic(&anchor_path, serde_json::to_string(&c)?.as_bytes())?;
            c
        }
    };

    // Tokenise with the base responses; reference log-probs (cached).
    let enc_cfg = EncodeConfig {
        max_length: run.data.max_length,
        max_prompt_length: run.data.max_prompt_length,
        truncation_mode: run.data.truncation()?,
    };
    let encode = crate::encoder(&tok);
    let (train_bases, eval_bases) = anchors.bases.split_at(train_ex.len());
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
    for (split, s) in [("train", &ts), ("eval", &es)] {
        if !s.dropped_prompt_too_long.is_empty() {
            tracing::warn!(split, dropped = s.dropped_prompt_too_long.len(), lines = ?s.dropped_prompt_too_long, max_length = enc_cfg.max_length, "examples dropped: the prompt alone exceeds max_length");
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
    let refs = match read_cache::<ReferenceCache>(&ref_path, &ref_fp, |c| &c.fingerprint) {
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
                train,
                eval,
            };
            write_atomic(&ref_path, serde_json::to_string(&c)?.as_bytes())?;
            c
        }
    };
    drop(reference);
    // Human-readable anchors: prompt, base response, token count, reference log-prob.
    let mut lines = String::new();
    for (i, e) in train_enc.iter().enumerate() {
        // Dropped examples leave gaps, so find the source example (and its base) by line.
        let j = train_ex
            .iter()
            .position(|x| x.line == e.line)
            .expect("same data");
        let row = serde_json::json!({"line": e.line, "prompt": train_ex[j].prompt, "base": anchors.bases[j], "tokens": anchors.tokens[j], "reference_logp": refs.train[i].sum[2]});
        lines.push_str(&format!("{row}\n"));
    }
    write_atomic(&out.join("anchors.jsonl"), lines.as_bytes())?;
    if anchors_only {
        return Ok(out.join("anchors.jsonl"));
    }

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
        if !eval_enc.is_empty()
            && (l.step.is_multiple_of(run.output.eval_steps.max(1))
                || l.step == run.train.max_steps)
        {
            let ev = evaluate(&m.valid(), &eval_enc, &refs.eval, run, eos, device);
            for (k, v) in ev {
                row[k] = serde_json::json!(v);
            }
            if matches!(weights, Weights::Adapter) {
                let norms = crate::lora::adapter_delta_norms(m);
                row["eval_weight_distance"] =
                    serde_json::json!(norms.values().map(|v| v * v).sum::<f64>().sqrt());
            }
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
        if run.output.save_steps > 0
            && l.step.is_multiple_of(run.output.save_steps)
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
    };
    let policy = train(
        policy,
        &train_enc,
        &refs.train,
        &run.train,
        eos,
        device,
        resume_state,
        &mut on_step,
    )?;
    pb.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e);
    }
    let adapter_dir = out.join(match weights {
        Weights::Adapter => "adapter",
        Weights::Full(..) => "model",
    });
    save_checkpoint(&policy, None, run, &weights, &adapter_dir, &last)?;
    // A short summary a person can read; the same numbers are the last line of metrics.jsonl.
    let keys = [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "anchor/violation_rate",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_anchor/violation_rate",
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
