//! One optimiser step's micro-batches: forward, objective, metrics and backward of each, run one
//! after another or on several threads at once.
//!
//! Concurrent micro-batches give the same step bit for bit: each thread works on its own copy
//! of the model whose trainable parameters are fresh autodiff leaves (same values, same
//! `ParamId`s, so each backward pass has its own graph and lock), and the caller adds the
//! gradients and metrics in micro-batch order, as the sequential loop does (why it pays:
//! [`crate::concurrent`]).

use std::collections::BTreeMap;

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::Llama;
use bapo_objective::{bapo_loss, AnchorLogps, ObjectiveConfig, PairLogps};
use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

use crate::logps::batch_logps;
use crate::train_config::{Normalisation, ReferenceLogps, TrainConfig, TrainError};

/// The micro-batch thread count for `cfg`: its own value, else the process default
/// ([`crate::concurrent::set_default_threads`]).
pub fn micro_batch_threads(cfg: &TrainConfig) -> usize {
    cfg.micro_batch_threads
        .unwrap_or_else(crate::concurrent::default_threads)
}

/// What a step's micro-batches share.
pub(crate) struct StepInputs<'a, B: AutodiffBackend> {
    pub examples: &'a [EncodedExample],
    pub refs: &'a [ReferenceLogps],
    pub cfg: &'a TrainConfig,
    pub objective: &'a ObjectiveConfig,
    pub pad_id: u32,
    pub device: &'a B::Device,
    /// Optimiser step (0-based), for error messages.
    pub step: usize,
}

/// One micro-batch's contribution to a step.
pub(crate) struct MicroOut {
    pub grads: GradientsParams,
    /// Metrics already divided by `grad_accum`.
    pub metrics: BTreeMap<String, f64>,
    pub tokens: usize,
    pub forward_s: f64,
    pub backward_s: f64,
}

/// Runs the micro-batches `batches` (example indices each, with the weight of its loss: 1, or
/// in data-parallel training this rank's share of the micro-batch times the world size),
/// `threads` at a time, and returns their outputs in the order given. `threads <= 1` runs them
/// one after another on `model`.
pub(crate) fn micro_batches<B: AutodiffBackend>(
    model: &Llama<B>,
    batches: &[(Vec<usize>, f64)],
    threads: usize,
    inp: &StepInputs<'_, B>,
) -> Result<Vec<MicroOut>, TrainError> {
    if threads <= 1 || batches.len() <= 1 {
        return batches
            .iter()
            .map(|(b, w)| micro_batch(model, b, *w, inp))
            .collect();
    }
    crate::concurrent::map_ordered(
        batches,
        threads,
        |(idx, w)| micro_batch(&model.clone().map(&mut FreshLeaves), idx, *w, inp),
        |_, _| {},
    )
    .into_iter()
    .collect()
}

/// Forward, objective, metrics and backward of one micro-batch (loss times `weight`, divided by
/// `grad_accum`).
fn micro_batch<B: AutodiffBackend>(
    model: &Llama<B>,
    idx: &[usize],
    weight: f64,
    inp: &StepInputs<'_, B>,
) -> Result<MicroOut, TrainError> {
    let cfg = inp.cfg;
    let batch_ex: Vec<&EncodedExample> = idx.iter().map(|&i| &inp.examples[i]).collect();
    let batch = PreferenceBatch::collate(&batch_ex, inp.pad_id);
    let tokens = batch.attention.iter().filter(|&&a| a).count();
    let n = batch.pairs;
    let tf = std::time::Instant::now();
    let hook = crate::checkpoint::hook::<B>(cfg.gradient_checkpointing);
    let (sum, mean) = bapo_model::checkpoint::with_mlp_hook(hook, || {
        batch_logps(model, &batch, cfg.prompt_sharing, inp.device)
    });
    let picked = match cfg.normalisation {
        Normalisation::Sum => sum,
        Normalisation::Mean => mean.clone(),
    };
    let r: Vec<[f64; 3]> = idx
        .iter()
        .map(|&i| inp.refs[i].pick(cfg.normalisation))
        .collect();
    let column = |k: usize| host_tensor::<B>(r.iter().map(|x| x[k]).collect(), inp.device);
    let pairs = PairLogps {
        policy_chosen: picked.clone().narrow(0, 0, n),
        policy_rejected: picked.clone().narrow(0, n, n),
        reference_chosen: column(0),
        reference_rejected: column(1),
    };
    let anchor = batch.has_base.then(|| AnchorLogps {
        policy: picked.clone().narrow(0, 2 * n, n),
        reference: column(2),
    });
    let chosen_mean = mean.narrow(0, 0, n);
    let out = bapo_loss(inp.objective, &pairs, anchor.as_ref(), Some(&chosen_mean));
    let metrics = out.metrics(inp.objective, &pairs, anchor.as_ref());
    if !metrics["loss"].is_finite() {
        return Err(TrainError::NonFinite {
            step: inp.step,
            what: "loss".into(),
            lines: batch_ex.iter().map(|e| e.line).collect(),
        });
    }
    let metrics = metrics
        .into_iter()
        .map(|(k, v)| (k, v / cfg.grad_accum as f64))
        .collect();
    // The metrics' read-back synchronised the device: the forward pass ends here.
    let forward_s = tf.elapsed().as_secs_f64();
    let tb = std::time::Instant::now();
    let loss = if weight == 1.0 {
        out.loss.div_scalar(cfg.grad_accum as f64)
    } else {
        out.loss.mul_scalar(weight / cfg.grad_accum as f64)
    };
    let grads = loss.backward();
    let mut grads = GradientsParams::from_grads(grads, model);
    crate::checkpoint::collect(&mut grads, model);
    Ok(MicroOut {
        grads,
        metrics,
        tokens,
        forward_s,
        backward_s: tb.elapsed().as_secs_f64(),
    })
}

fn host_tensor<B: AutodiffBackend>(v: Vec<f64>, device: &B::Device) -> Tensor<B, 1> {
    let n = v.len();
    let v: Vec<f32> = v.into_iter().map(|x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [n]), device)
}

/// Makes every trainable parameter a new autodiff leaf with the same value and `ParamId`, so
/// a copy's graph shares no node with the original's.
pub(crate) struct FreshLeaves;

impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| {
            if t.is_require_grad() {
                t.detach().require_grad()
            } else {
                t
            }
        })
    }
}
