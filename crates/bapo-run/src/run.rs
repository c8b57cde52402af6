//! `bapo train`, `bapo anchor` and `bapo eval`: the job driver. Prepare what every job shares
//! (`prepare`: model, data split, cached base responses and reference log-probs); evaluate the
//! base model (step 0 of every curve); then either write the evaluation report, or train with
//! the BAPO objective, evaluating on the held-out split and checkpointing, and save the adapter.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bapo_data::ChatTemplate;
use bapo_model::{Llama, Tokenizer};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::RunConfig;
use bapo_train::dist::{agree, parameter_fingerprint, GradSync, Single};
use bapo_train::train::{train_dist, Optim, StepLog};

pub use crate::cache::Numerics;
use crate::checkpoint::{resume_from, save_checkpoint, Weights};
use crate::prepare::{prepare, Prepared, Shared};
use bapo_eval::figure::training_figure;
use bapo_eval::gate::GateSpec;
use bapo_eval::heldout::{full_eval, weight_change_norms, EvalExtras};

use crate::eval_job::eval_report;

pub use bapo_train::io::{write_atomic, RunError};

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
    run_job::<B>(run, device, Mode::Train { resume }, None)
}

/// [`run_training`] as one rank of data-parallel training (every rank calls it with the same
/// `run`): rank 0 prepares first (base responses and reference log-probs into the caches) while
/// the others wait, then they load what it cached; rank 0 alone evaluates, logs, checkpoints and
/// saves the adapter, and writes `dist.json` (engine, world size, and whether every replica
/// ended with the same parameters, bit for bit — an error if not).
pub fn run_training_dist<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    resume: bool,
    sync: &mut dyn GradSync<B::InnerBackend>,
) -> Result<PathBuf, RunError> {
    run_job_with::<B>(run, device, Mode::Train { resume }, None, sync)
}

/// `bapo anchor`: only the base responses and reference log-probs (cached as for training);
/// returns the path of `anchors.jsonl`.
pub fn run_anchors<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
) -> Result<PathBuf, RunError> {
    run_job::<B>(run, device, Mode::Anchors, None)
}

/// What `run_job` does after the shared preparation (data, anchors, reference log-probs).
pub(crate) enum Mode {
    Anchors,
    Train {
        resume: bool,
    },
    Eval {
        adapter: Option<PathBuf>,
        report: PathBuf,
        gate: Option<GateSpec>,
    },
}

/// `bapo eval`: the base model and (with `adapter`: a LoRA adapter directory or a full
/// fine-tuned HF directory) the personalised one, on every metric: held-out preference
/// accuracy, anchor drift, token KL, output drift, and every item of every knowledge set in
/// both formats. Prints a table and writes `report` (JSON, with every knowledge item's result);
/// returns its path.
///
/// With `gate`, the personalised model's knowledge is also compared, item by item, with a
/// baseline report's (or the base model's): the report gets a `gate` section, and any set and
/// format that dropped more than allowed makes this an error naming each of them (after the
/// report is written).
pub fn run_eval<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    adapter: Option<PathBuf>,
    report: PathBuf,
    gate: Option<GateSpec>,
) -> Result<PathBuf, RunError> {
    run_job::<B>(
        run,
        device,
        Mode::Eval {
            adapter,
            report,
            gate,
        },
        None,
    )
}

pub(crate) fn run_job<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    mode: Mode,
    shared: Option<&Shared>,
) -> Result<PathBuf, RunError> {
    run_job_with::<B>(run, device, mode, shared, &mut Single)
}

fn run_job_with<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    mode: Mode,
    shared: Option<&Shared>,
    sync: &mut dyn GradSync<B::InnerBackend>,
) -> Result<PathBuf, RunError> {
    let lead = sync.rank() == 0;
    let (model, p) = if lead {
        let prepared = prepare::<B>(run, device, shared)?;
        sync.barrier()?;
        prepared
    } else {
        sync.barrier()?;
        prepare::<B>(run, device, shared)?
    };
    let resume = match mode {
        Mode::Anchors => return Ok(run.output.dir.join("anchors.jsonl")),
        Mode::Train { resume } => resume,
        Mode::Eval { .. } => false,
    };
    if !lead {
        return fit(run, device, model, &p, None, resume, sync);
    }
    let all_items = matches!(mode, Mode::Eval { .. });
    let (extras, base) = evaluate_base(run, &p, (&p.tok, &p.template), all_items, device)?;
    if let Mode::Eval {
        adapter,
        report,
        gate,
    } = &mode
    {
        return eval_report(
            run,
            device,
            model.valid(),
            &p.reference,
            adapter.as_deref(),
            report,
            &p.eval_enc,
            &p.refs.eval,
            p.eos,
            &extras,
            &base.metrics,
            &base.summaries,
            gate.as_ref(),
        );
    }
    write_atomic(
        &run.output.dir.join("eval_base.json"),
        serde_json::to_string_pretty(&base.row)?.as_bytes(),
    )?;
    fit(
        run,
        device,
        model,
        &p,
        Some((&extras, &base.row)),
        resume,
        sync,
    )
}

/// The base model's own results: flat metrics, knowledge summaries, and the `eval_base.json` row.
struct BaseEval {
    metrics: BTreeMap<String, f64>,
    summaries: BTreeMap<String, bapo_drift::McSummary>,
    row: serde_json::Value,
}

/// The evaluation extras (knowledge sets, output prompts) and the base model's results on them.
/// Every knowledge item when `all_items` (`bapo eval`), else `eval.knowledge_items` per set.
fn evaluate_base<'a, B: AutodiffBackend>(
    run: &RunConfig,
    p: &Prepared<B>,
    (tok, template): (&'a Tokenizer, &'a ChatTemplate),
    all_items: bool,
    device: &B::Device,
) -> Result<(EvalExtras<'a>, BaseEval), RunError> {
    let mut eos_ids = p.config.eos_token_ids.clone();
    eos_ids.push(p.eos);
    let encode = bapo_train::encoder(tok);
    let items = if all_items {
        0
    } else {
        run.eval.knowledge_items
    };
    let mut extras = EvalExtras {
        sets: {
            let mut sets = bapo_eval::knowledge::load_knowledge(&run.eval.knowledge, items)?;
            bapo_eval::knowledge::with_system_turns(&mut sets, &run.eval.system_turns);
            sets
        },
        formats: run.eval.formats()?,
        // Cut like the training prompts; within the context by the anchor's check.
        out_prompts: p
            .eval_ex
            .iter()
            .take(run.eval.output_prompts)
            .map(|e| {
                bapo_data::preference::prompt_ids(template, &encode, &e.prompt, e.line)
                    .map(|ids| p.enc_cfg.truncate_prompt(ids))
            })
            .collect::<Result<_, _>>()?,
        eos_ids,
        max_new_tokens: match run.eval.output_max_new_tokens {
            0 => run.anchor.max_new_tokens,
            n => n,
        },
        base_knowledge: None,
        base_output: None,
        pole: match run.data.users.as_deref() {
            Some([user]) => bapo_data::synth::Dimension::of_pole(user),
            _ => None,
        },
        base_answers: None,
        out_texts: p
            .eval_ex
            .iter()
            .take(run.eval.output_prompts)
            .map(|e| {
                let turns = e
                    .prompt
                    .iter()
                    .map(|m| format!("{}: {}", m.role, m.content));
                turns.collect::<Vec<_>>().join("\n")
            })
            .collect(),
        tok,
        template,
    };
    let context = p.config.max_position_embeddings;
    bapo_eval::knowledge::check_knowledge_context(
        &extras.sets,
        &extras.formats,
        tok,
        template,
        context,
    )?;
    let t0 = std::time::Instant::now();
    let mut metrics = if p.eval_enc.is_empty() {
        BTreeMap::new()
    } else {
        bapo_eval::heldout::evaluate(
            &p.reference,
            None,
            &p.eval_enc,
            &p.refs.eval,
            run.eval_settings(),
            p.eos,
            device,
        )
    };
    // Knowledge and output answers of the base model: the same for every method of a
    // comparison level, so cached under a fingerprint of what they depend on.
    // The items actually scored (`bapo eval` scores every item, training a subset).
    let items = extras
        .sets
        .iter()
        .map(|s| {
            let ids = s.items.iter().map(|i| (i.id.as_str(), i.system.as_deref()));
            (s.name.as_str(), ids.collect::<Vec<_>>())
        })
        .collect::<Vec<_>>();
    let key = crate::cache::base_eval_key(
        &p.refs.fingerprint,
        run,
        &(
            &items,
            &extras.formats,
            (&extras.out_prompts, extras.max_new_tokens, &extras.eos_ids),
        ),
    )?;
    let (extra, summaries, results, answers) = crate::cache::base_eval(
        &run.output.dir.join("eval_base.cache.json"),
        key,
        &p.refs.numerics,
        || bapo_eval::heldout::extras_eval(&p.reference, run.eval_settings(), device, &extras),
    )?;
    metrics.extend(extra);
    if !extras.out_prompts.is_empty() {
        extras.base_output = Some(bapo_drift::OutputStats::new(&answers));
        extras.base_answers = Some(bapo_eval::heldout::decode_all(tok, &answers)?);
    }
    extras.base_knowledge = Some(results);
    tracing::info!(secs = t0.elapsed().as_secs_f64(), "base model evaluated");
    let (n_train, n_all) = (p.train_ex.len(), p.train_ex.len() + p.eval_ex.len());
    let mut row = serde_json::json!({
        "step": 0,
        "anchor/base_cut_fraction": p.anchors.cut_fraction(0..n_train),
        "eval_anchor/base_cut_fraction": p.anchors.cut_fraction(n_train..n_all),
    });
    for (k, v) in &metrics {
        row[k] = serde_json::json!(v);
    }
    let base = BaseEval {
        metrics,
        summaries,
        row,
    };
    Ok((extras, base))
}

/// Trains the policy (LoRA on the frozen base, or every weight when there is no `[lora]`
/// section), logging `metrics.jsonl`, evaluating and checkpointing as configured; saves the
/// adapter (or model), draws the training figure and prints a summary. Returns the saved
/// directory. `lead` (the evaluation extras and the base model's row) is given on the rank that
/// writes; on the other ranks of data-parallel training `fit` only trains (returns the output
/// directory).
fn fit<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    model: Llama<B>,
    p: &Prepared<B>,
    lead: Option<(&EvalExtras<'_>, &serde_json::Value)>,
    resume: bool,
    sync: &mut dyn GradSync<B::InnerBackend>,
) -> Result<PathBuf, RunError> {
    let out = &run.output.dir;
    // Full fine-tuning: ids derived from the HF names, so a saved optimiser state applies
    // after a restart.
    let weights = match &run.lora {
        Some(_) => Weights::Adapter,
        None => Weights::Full(&p.config, &p.tok),
    };
    let policy = match &run.lora {
        Some(l) => l.attach(model, run.train.seed, device),
        None => bapo_model::export::with_stable_ids(model, true),
    };
    let metrics_path = out.join("metrics.jsonl");
    // Only the writing rank starts the log or cuts it back to the checkpoint.
    let log_path = lead.is_some().then_some(metrics_path.as_path());
    let (policy, resume_state) = if resume {
        let (policy, state) = resume_from(out, policy, &weights, log_path, device)?;
        (policy, Some(state))
    } else {
        if log_path.is_some() {
            std::fs::File::create(&metrics_path)?;
        }
        (policy, None)
    };
    let Some((extras, base_row)) = lead else {
        let nothing = |_: &StepLog, _: &Llama<B>, _: &Optim<B>| {};
        let res = train_dist(
            policy,
            &p.train_enc,
            &p.refs.train,
            &run.train,
            p.eos,
            device,
            resume_state,
            nothing,
            sync,
        );
        let policy = match res {
            Ok(policy) => policy,
            // Every rank stopped after the same step; rank 0 reports it.
            Err(bapo_train::train::TrainError::Interrupted { .. }) => return Ok(out.clone()),
            Err(e) => return Err(format!("rank {}: {e}", sync.rank()).into()),
        };
        agree(sync, parameter_fingerprint(&policy))?;
        return Ok(out.clone());
    };
    let (reference, eos) = (&p.reference, p.eos);
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
        if (!p.eval_enc.is_empty() || !extras.sets.is_empty())
            && (l.step.is_multiple_of(run.output.eval_steps.max(1))
                || l.step == run.train.max_steps)
        {
            match full_eval(
                &m.valid(),
                Some(reference),
                &p.eval_enc,
                &p.refs.eval,
                run.eval_settings(),
                eos,
                device,
                extras,
            ) {
                Ok((ev, _, items, _)) => {
                    for (k, v) in ev {
                        row[k] = serde_json::json!(v);
                    }
                    // The last step's per-item knowledge results beside the base model's, so
                    // that runs on the same items can be compared item by item (`bapo compare`).
                    if l.step == run.train.max_steps && !items.is_empty() {
                        let doc = serde_json::json!({
                            "base": extras.base_knowledge,
                            "policy": items,
                        });
                        if let Err(e) = write_atomic(
                            &out.join("knowledge_items.json"),
                            doc.to_string().as_bytes(),
                        ) {
                            write_err.get_or_insert(RunError::from(e));
                        }
                    }
                }
                Err(e) => {
                    write_err.get_or_insert(e);
                }
            }
            let wd =
                bapo_drift::weights::weight_distance(&weight_change_norms(&m.valid(), reference));
            row["eval_weight_distance"] = serde_json::json!(wd.global);
        }
        if let Err(e) = writeln!(log, "{row}").and_then(|_| log.flush()) {
            write_err.get_or_insert(RunError::from(e));
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
        if (bapo_train::train::stop_requested()
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
    let trained = train_dist(
        policy,
        &p.train_enc,
        &p.refs.train,
        &run.train,
        eos,
        device,
        resume_state,
        &mut on_step,
        sync,
    );
    pb.finish_and_clear();
    if let Some(e) = write_err {
        return Err(e);
    }
    let policy = match trained {
        Ok(policy) => policy,
        Err(bapo_train::train::TrainError::Interrupted { step }) => {
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
        Err(other) => return Err(other.into()),
    };
    if sync.world_size() > 1 {
        write_dist_report(out, &policy, &run.train, sync)?;
    }
    let adapter_dir = out.join(match weights {
        Weights::Adapter => "adapter",
        Weights::Full(..) => "model",
    });
    save_checkpoint(&policy, None, run, &weights, &adapter_dir, &last)?;
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    match training_figure(out, base_row, &rows) {
        Ok(()) => tracing::info!(figure = %out.join("training.png").display(), "figure written"),
        Err(e) => tracing::warn!(error = %e, "the training figure could not be drawn"),
    }
    print_summary(run, &last, &adapter_dir, &metrics_path);
    Ok(adapter_dir)
}

/// Checks with every rank that the replicas ended identical (an error if not) and writes
/// `dist.json`.
fn write_dist_report<B: AutodiffBackend>(
    out: &Path,
    policy: &Llama<B>,
    cfg: &bapo_train::train::TrainConfig,
    sync: &mut dyn GradSync<B::InnerBackend>,
) -> Result<(), RunError> {
    let identical = agree(sync, parameter_fingerprint(policy))?;
    let world = sync.world_size();
    let doc = serde_json::json!({
        "engine": sync.engine(),
        "world_size": world,
        "global_batch_pairs": cfg.batch_size * cfg.grad_accum,
        "pairs_per_rank_per_micro_batch": (0..world)
            .map(|r| bapo_train::dist::rank_slice(cfg.batch_size, r, world).len())
            .collect::<Vec<_>>(),
        "replicas_identical": identical,
    });
    write_atomic(
        &out.join("dist.json"),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?;
    if !identical {
        return Err(format!(
            "the {world} replicas ended with different parameters ({})",
            out.join("dist.json").display()
        )
        .into());
    }
    Ok(())
}

/// A short summary a person can read; the same numbers are the last line of metrics.jsonl.
fn print_summary(run: &RunConfig, last: &serde_json::Value, adapter_dir: &Path, metrics: &Path) {
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
        metrics.display()
    );
}
