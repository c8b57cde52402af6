//! Checkpoints: the adapter (PEFT layout) or the whole model, the optimiser state and the
//! trainer state, assembled aside and renamed into place; finding the newest one and restoring
//! it for `--resume`.

use std::path::{Path, PathBuf};

use bapo_model::Llama;
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;

use crate::config::RunConfig;
use bapo_train::io::{write_atomic, RunError};
use bapo_train::train::{Optim, OptimRecord, Resume};

/// PEFT's `adapter_config.json` for the saved adapter.
pub(crate) fn adapter_config(run: &RunConfig) -> serde_json::Value {
    let l = run.lora.clone().unwrap_or_default();
    serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": l.rank, "lora_alpha": l.alpha, "lora_dropout": l.dropout,
        "target_modules": l.target_modules, "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
        "base_model_name_or_path": run.model.path,
    })
}

/// What a checkpoint holds besides the trainer state: the adapter (LoRA) or the whole model
/// as an HF checkpoint (full fine-tuning, which needs the config and tokenizer).
pub(crate) enum Weights<'a> {
    Adapter,
    Full(&'a bapo_model::LlamaConfig, &'a bapo_model::Tokenizer),
}

/// Saves the weights + configs into `dir` atomically (built in a temp dir, then renamed).
pub(crate) fn save_checkpoint<B: AutodiffBackend>(
    model: &Llama<B>,
    optim: Option<&Optim<B>>,
    run: &RunConfig,
    weights: &Weights<'_>,
    dir: &Path,
    state: &serde_json::Value,
) -> Result<(), RunError> {
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let res = (|| -> Result<(), RunError> {
        std::fs::create_dir_all(&tmp)?;
        match weights {
            Weights::Adapter => {
                bapo_train::lora::save_adapter(model, &tmp.join("adapter_model.safetensors"))?;
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

/// The newest `checkpoint-N` directory under `out`.
pub(crate) fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
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

/// Restores the newest checkpoint under `out` for `--resume`: the weights into `policy`, the
/// AdamW state and counters; `metrics.jsonl` is cut back to the checkpoint's step (later steps
/// are recomputed).
pub(crate) fn resume_from<B: AutodiffBackend>(
    out: &Path,
    policy: Llama<B>,
    weights: &Weights<'_>,
    metrics_path: Option<&Path>,
    device: &B::Device,
) -> Result<(Llama<B>, Resume<B>), RunError> {
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
            bapo_train::lora::load_adapter(policy, &dir.join("adapter_model.safetensors"), device)?
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
    // Keep the log up to the checkpoint; steps after it are recomputed (by the rank that
    // writes it: `metrics_path` is `None` on the others).
    if let Some(metrics_path) = metrics_path {
        truncate_log(metrics_path, step)?;
    }
    tracing::info!(step, checkpoint = %dir.display(), "resuming");
    Ok((
        policy,
        Resume {
            step,
            num_tokens,
            optimizer,
        },
    ))
}

/// Cuts `metrics.jsonl` back to the lines of steps up to `step`.
fn truncate_log(metrics_path: &Path, step: usize) -> Result<(), RunError> {
    let kept: String = std::fs::read_to_string(metrics_path)
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
    write_atomic(metrics_path, kept.as_bytes())?;
    Ok(())
}
