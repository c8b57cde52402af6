//! `bapo train`: the whole job. Load the model; read and split the preference data; have the
//! frozen reference answer every prompt (the base responses, cached); compute reference
//! log-probs once (cached, keyed by a fingerprint of everything they depend on); train with
//! the BAPO objective, evaluating on the held-out split and checkpointing; save the adapter.

use std::io::Write;
use std::path::{Path, PathBuf};

use bapo_data::{encode_examples, read_preferences, EncodeConfig, PreferenceExample};
use bapo_model::{Llama, LoadedModel};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::config::{expand_path, RunConfig};
use crate::train::{reference_logps, reference_of, train, Optim, StepLog};

pub use crate::cache::Numerics;
use crate::cache::{hash_path, hex, read_cache, AnchorCache, ReferenceCache, ANCHOR_CACHE_FORMAT};
use crate::checkpoint::{resume_from, save_checkpoint, Weights};
use crate::figure::training_figure;
use crate::generation::base_responses;
use crate::io::bar;
use crate::report::{eval_report, full_eval, weight_change_norms, EvalExtras};

pub use crate::io::{write_atomic, RunError};

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
    let (examples, train_ex, eval_ex) = split_data(run)?;
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
            let mut eos_ids = config.eos_token_ids.clone();
            eos_ids.push(eos);
            let (bases, responses) = base_responses(
                &reference,
                &all,
                train_ex.len(),
                run,
                &enc_cfg,
                (&template, &tok),
                eos_ids,
                context,
                device,
            )?;
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
        let (policy, state) = resume_from(out, policy, &weights, &metrics_path, device)?;
        (policy, Some(state))
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

/// Reads the preference data, keeps `data.users`, shuffles with the seed and splits off the
/// held-out examples (or reads `data.eval`): `(all, train, eval)`.
#[allow(clippy::type_complexity)]
fn split_data(
    run: &RunConfig,
) -> Result<
    (
        Vec<PreferenceExample>,
        Vec<PreferenceExample>,
        Vec<PreferenceExample>,
    ),
    RunError,
> {
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
    let (eval_ex, train_ex) = match &run.data.eval {
        Some(p) => (keep(read_preferences(p)?, p)?, examples.clone()),
        None => {
            let n_eval = ((examples.len() as f64) * run.data.eval_fraction).round() as usize;
            (examples[..n_eval].to_vec(), examples[n_eval..].to_vec())
        }
    };
    Ok((examples, train_ex, eval_ex))
}
