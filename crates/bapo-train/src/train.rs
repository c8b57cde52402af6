//! The training loop: policy log-probs on `[chosen; rejected; base]` batches, reference
//! log-probs precomputed once (adapters off, no grad), the BAPO objective, AdamW with warmup +
//! cosine/linear decay, global-norm gradient clipping, gradient accumulation, seeded shuffling
//! and a NaN/Inf guard.

use std::collections::BTreeMap;

use bapo_data::EncodedExample;
use bapo_model::Llama;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::dist::{agree, all_reduce_grads, fingerprint_str, rank_slice, GradSync, Single};
use crate::logps::to_host;
pub use crate::logps::{batch_logps, completion_logps, reference_logps};
use crate::step::{micro_batches, StepInputs};
pub use crate::train_config::{Normalisation, ReferenceLogps, Schedule, TrainConfig, TrainError};

/// What a [`train`] callback returns: `()` goes on; a `ControlFlow` stops on `Break`.
pub trait StepControl {
    fn stop(&self) -> bool;
}
impl StepControl for () {
    fn stop(&self) -> bool {
        false
    }
}
impl StepControl for std::ops::ControlFlow<()> {
    fn stop(&self) -> bool {
        self.is_break()
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static TRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks the running [`train`] loop to stop after the step in progress (a signal handler may
/// call it). Returns whether a loop is running to honour it: if not, the caller should exit.
pub fn request_stop() -> bool {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    TRAINING.load(std::sync::atomic::Ordering::SeqCst)
}

/// Whether a stop was requested (checked by `on_step` callbacks to save a checkpoint).
pub fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// Marks the training loop as running for [`request_stop`] while alive.
struct TrainingGuard;
impl TrainingGuard {
    fn new() -> Self {
        TRAINING.store(true, std::sync::atomic::Ordering::SeqCst);
        Self
    }
}
impl Drop for TrainingGuard {
    fn drop(&mut self) {
        TRAINING.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What one optimiser step reports.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Tokens (prompt + completions, padding excluded) processed so far.
    pub num_tokens: usize,
    /// Tokens per second of this step (forward + backward + update).
    pub tokens_per_s: f64,
    #[serde(flatten)]
    pub metrics: BTreeMap<String, f64>,
}

/// Visits every parameter that has a gradient, for the global norm.
struct GradNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sq: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sq.push(g.square().sum());
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// Global L2 norm of all gradients; scales them to `max_norm` when above it (PyTorch's
/// `clip_grad_norm_` semantics, unlike Burn's per-tensor clipping).
pub fn clip_global_norm<B: AutodiffBackend>(
    model: &Llama<B>,
    mut grads: GradientsParams,
    max_norm: Option<f64>,
) -> (GradientsParams, f64) {
    let mut v = GradNorm::<B> {
        grads: &grads,
        sq: Vec::new(),
    };
    model.visit(&mut v);
    let norm = if v.sq.is_empty() {
        0.0
    } else {
        to_host(Tensor::cat(v.sq, 0).sum())[0].sqrt()
    };
    if let Some(max) = max_norm {
        if norm > max && norm.is_finite() {
            model.visit(&mut Scale::<B> {
                grads: &mut grads,
                factor: max / (norm + 1e-6),
                _backend: std::marker::PhantomData,
            });
        }
    }
    (grads, norm)
}

/// Seeded epoch-wise shuffled order of example indices.
pub struct Sampler {
    rng: StdRng,
    order: Vec<usize>,
    pos: usize,
    pub epoch: usize,
    n: usize,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut s = Self {
            rng: StdRng::seed_from_u64(seed),
            order: (0..n).collect(),
            pos: 0,
            epoch: 0,
            n,
        };
        s.order.shuffle(&mut s.rng);
        s
    }
    /// The next `k` indices (wrapping into a reshuffled next epoch).
    pub fn next(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k.min(self.n) {
            if self.pos == self.n {
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
                self.epoch += 1;
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
    /// Fractional epochs consumed.
    pub fn progress(&self) -> f64 {
        self.epoch as f64 + self.pos as f64 / self.n.max(1) as f64
    }
}

/// The optimiser `train` uses.
pub type Optim<B> = burn::optim::adaptor::OptimizerAdaptor<burn::optim::AdamW, Llama<B>, B>;
/// Its state (AdamW moments, keyed by parameter id).
pub type OptimRecord<B> = <Optim<B> as Optimizer<Llama<B>, B>>::Record;

/// Where an interrupted run continues: the optimiser state after `step` steps. The model passed
/// to [`train`] must hold the weights of that step; data order and learning rate are replayed
/// from the seed and the step count.
pub struct Resume<B: AutodiffBackend> {
    pub step: usize,
    pub num_tokens: usize,
    pub optimizer: OptimRecord<B>,
}

/// Trains `model` (adapters attached, or fully trainable) on `examples` up to `cfg.max_steps`
/// optimiser steps (from `resume.step` when given); `on_step` receives each step's log, the
/// model and the optimiser (for checkpoints), and returns `()` to go on or a
/// [`ControlFlow`](std::ops::ControlFlow): `Break` (a checkpoint that could not be written, say)
/// stops the loop, and `train` returns [`TrainError::Interrupted`] for that step.
#[allow(clippy::too_many_arguments)] // data, references, settings, device, resume point, callback: all distinct
pub fn train<B: AutodiffBackend, C: StepControl>(
    model: Llama<B>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    cfg: &TrainConfig,
    pad_id: u32,
    device: &B::Device,
    resume: Option<Resume<B>>,
    on_step: impl FnMut(&StepLog, &Llama<B>, &Optim<B>) -> C,
) -> Result<Llama<B>, TrainError> {
    train_dist(
        model,
        examples,
        refs,
        cfg,
        pad_id,
        device,
        resume,
        on_step,
        &mut Single,
    )
}

/// [`train`] as one rank of data-parallel training: every rank passes the same arguments
/// (model, data, settings, resume point) and its own `sync`. Rank r takes slice r of each
/// micro-batch ([`rank_slice`]); the gradients are averaged over the ranks after accumulation
/// and before clipping, and the step's metrics, token count and stop request are summed, so
/// every rank clips, steps and stops identically and `on_step` sees the same log on each (the
/// caller decides which rank writes). With one rank this is [`train`], bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn train_dist<B: AutodiffBackend, C: StepControl>(
    mut model: Llama<B>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    cfg: &TrainConfig,
    pad_id: u32,
    device: &B::Device,
    resume: Option<Resume<B>>,
    mut on_step: impl FnMut(&StepLog, &Llama<B>, &Optim<B>) -> C,
    sync: &mut dyn GradSync<B::InnerBackend>,
) -> Result<Llama<B>, TrainError> {
    let (rank, world) = (sync.rank(), sync.world_size());
    let objective = cfg
        .objective()
        .map_err(|what| TrainError::Config { what })?;
    if examples.is_empty() || examples.len() != refs.len() {
        return Err(TrainError::Config {
            what: format!(
                "{} examples but {} reference entries",
                examples.len(),
                refs.len()
            ),
        });
    }
    let mut optim = AdamWConfig::new()
        .with_weight_decay(cfg.weight_decay as f32)
        .with_epsilon(1e-8)
        .init::<B, Llama<B>>();
    if examples.len().min(cfg.batch_size) < world {
        return Err(TrainError::Config {
            what: format!(
                "train.batch_size {} over {} training pairs gives micro-batches of {} pairs, \
                 fewer than the {world} ranks: every rank needs at least one pair",
                cfg.batch_size,
                examples.len(),
                examples.len().min(cfg.batch_size)
            ),
        });
    }
    let mut sampler = Sampler::new(examples.len(), cfg.seed);
    let (first_step, mut num_tokens) = match resume {
        Some(r) => {
            optim = optim.load_record(r.optimizer);
            // Replay the data order up to where the run stopped.
            for _ in 0..r.step * cfg.grad_accum {
                sampler.next(cfg.batch_size);
            }
            (r.step, r.num_tokens)
        }
        None => (0, 0),
    };
    let threads = match crate::step::micro_batch_threads(cfg) {
        n if n > 1 && crate::lora::has_dropout(&model) => {
            tracing::warn!(
                threads = n,
                "micro-batches run one at a time: dropout draws from one RNG, so concurrent \
                 micro-batches would not reproduce"
            );
            1
        }
        n => n,
    };
    if cfg.gradient_checkpointing && crate::lora::has_dropout(&model) {
        return Err(TrainError::Config {
            what: "train.gradient_checkpointing needs lora.dropout = 0: the recomputed \
                   feed-forward halves would draw new dropout masks"
                .into(),
        });
    }
    let _guard = TrainingGuard::new();
    for step in first_step..cfg.max_steps {
        // With several ranks the stop request travels with the step's sums (below), so that
        // every rank stops after the same step.
        if world == 1 && stop_requested() {
            return Err(TrainError::Interrupted { step });
        }
        // Dropout masks come from the backend's RNG: reseed it per step, so a resumed run draws
        // the same masks as the uninterrupted one without saving the RNG state.
        B::seed(
            device,
            cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let t0 = std::time::Instant::now();
        // (this rank's pairs, loss weight, share of the micro-batch's pairs)
        let batches: Vec<(Vec<usize>, f64)> = (0..cfg.grad_accum)
            .map(|_| {
                let b = sampler.next(cfg.batch_size);
                if world == 1 {
                    return (b, 1.0);
                }
                let mine = b[rank_slice(b.len(), rank, world)].to_vec();
                let weight = (mine.len() * world) as f64 / b.len() as f64;
                (mine, weight)
            })
            .collect();
        let inputs = StepInputs {
            examples,
            refs,
            cfg,
            objective: &objective,
            pad_id,
            device,
            step,
        };
        let outs = micro_batches(&model, &batches, threads, &inputs)?;
        let mut acc = GradientsAccumulator::<Llama<B>>::new();
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let (mut forward_s, mut backward_s, mut step_tokens) = (0.0, 0.0, 0usize);
        for (out, (_, weight)) in outs.into_iter().zip(&batches) {
            // Metrics are means over the micro-batch's pairs: this rank's share of the sum.
            let share = weight / world as f64;
            for (k, v) in out.metrics {
                *sums.entry(k).or_default() += if world == 1 { v } else { v * share };
            }
            acc.accumulate(&model, out.grads);
            forward_s += out.forward_s;
            backward_s += out.backward_s;
            step_tokens += out.tokens;
        }
        let ts = std::time::Instant::now();
        let mut grads = acc.grads();
        let mut stop_all = false;
        if world > 1 {
            grads = all_reduce_grads(&model, grads, sync)?;
            let mut v: Vec<f64> = sums.values().copied().collect();
            v.push(step_tokens as f64);
            v.push(f64::from(u8::from(stop_requested())));
            sync.all_reduce_sum(&mut v)?;
            let names: Vec<&str> = sums.keys().map(String::as_str).collect();
            if !agree(sync, fingerprint_str(&names.join("\n")))? {
                return Err(crate::dist::SyncError::Diverged {
                    what: format!("the step's metric names (this rank: {names:?})"),
                }
                .into());
            }
            stop_all = v.pop() != Some(0.0);
            step_tokens = v.pop().expect("token count") as usize;
            for (slot, x) in sums.values_mut().zip(v) {
                *slot = x;
            }
            if stop_all {
                // Every rank's `on_step` saves its checkpoint as on Ctrl-C.
                STOP.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let sync_s = ts.elapsed().as_secs_f64();
        let tb = std::time::Instant::now();
        let (grads, grad_norm) = clip_global_norm(&model, grads, cfg.max_grad_norm);
        // The norm's read-back waits for the backward pass on asynchronous devices.
        backward_s += tb.elapsed().as_secs_f64();
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                what: "gradient norm".into(),
                lines: Vec::new(),
            });
        }
        let lr = cfg.lr_at(step);
        let to = std::time::Instant::now();
        model = optim.step(lr, model, grads);
        let optimizer_s = to.elapsed().as_secs_f64();
        num_tokens += step_tokens;
        // Where the step's time went (seconds; on GPUs the optimiser's kernels may still run
        // when its clock stops, and are then counted in the next step's forward).
        sums.insert("time/forward_s".into(), forward_s);
        sums.insert("time/backward_s".into(), backward_s);
        sums.insert("time/optimizer_s".into(), optimizer_s);
        if world > 1 {
            sums.insert("time/sync_s".into(), sync_s);
        }
        tracing::debug!(
            step = step + 1,
            forward_s,
            backward_s,
            optimizer_s,
            "step timing"
        );
        let log = StepLog {
            step: step + 1,
            epoch: sampler.progress(),
            learning_rate: lr,
            grad_norm,
            num_tokens,
            tokens_per_s: step_tokens as f64 / t0.elapsed().as_secs_f64(),
            metrics: sums,
        };
        if on_step(&log, &model, &optim).stop() || stop_all {
            return Err(TrainError::Interrupted { step: step + 1 });
        }
    }
    Ok(model)
}

/// The reference model for a policy: adapters removed, autodiff stripped.
pub fn reference_of<B: AutodiffBackend>(model: &Llama<B>) -> Llama<B::InnerBackend> {
    crate::lora::without_adapters(model.valid())
}
