//! The training loop: policy log-probs on `[chosen; rejected; base]` batches, reference
//! log-probs precomputed once (adapters off, no grad), the BAPO objective, AdamW with warmup +
//! cosine/linear decay, global-norm gradient clipping, gradient accumulation, seeded shuffling
//! and a NaN/Inf guard.

use std::collections::BTreeMap;

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::Llama;
use bapo_objective::{
    scatter_logps, sequence_logps, target_logps, Anchor, CompletionRows, LossType, ObjectiveConfig,
    SequenceLogps,
};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::step::{micro_batches, StepInputs};

/// Log-prob normalisation shared by the preference term and the anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Normalisation {
    /// Summed over completion tokens (DPO's definition).
    #[default]
    Sum,
    /// Per-token mean.
    Mean,
}

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

/// Optimisation and objective settings (`[train]` in a config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub max_steps: usize,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Global gradient-norm clip (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    pub weight_decay: f64,
    pub seed: u64,
    pub beta: f64,
    /// TRL's `loss_type` list: sigmoid, robust, hinge, ipo.
    pub loss_type: Vec<String>,
    /// TRL's `loss_weights` (default: all 1).
    pub loss_weights: Option<Vec<f64>>,
    pub label_smoothing: f64,
    /// Weight of the NLL term on chosen (TRL's `rpo_alpha`).
    pub nll_weight: f64,
    /// Anchor weight λ (0 = plain DPO).
    pub anchor_weight: f64,
    /// hinge, abs or square.
    pub anchor: String,
    pub normalisation: Normalisation,
    /// Micro-batches of one step computed at once on separate threads (the step is the same
    /// bit for bit; needs LoRA dropout 0). `None`: the process default
    /// ([`crate::concurrent::set_default_threads`]; 1 unless set, and the binary sets 2 on CPU
    /// backends).
    pub micro_batch_threads: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            warmup_steps: 2,
            schedule: Schedule::Cosine,
            max_steps: 20,
            batch_size: 2,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
            seed: 42,
            beta: 0.1,
            loss_type: vec!["sigmoid".into()],
            loss_weights: None,
            label_smoothing: 0.0,
            nll_weight: 0.0,
            anchor_weight: 1.0,
            anchor: "hinge".into(),
            normalisation: Normalisation::Sum,
            micro_batch_threads: None,
        }
    }
}

impl TrainConfig {
    /// The objective this config describes, or what is wrong with it.
    pub fn objective(&self) -> Result<ObjectiveConfig, String> {
        let types: Vec<LossType> = self
            .loss_type
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()?;
        let weights = self
            .loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; types.len()]);
        if types.is_empty() || weights.len() != types.len() {
            return Err(format!(
                "loss_weights has {} entries for {} loss types",
                weights.len(),
                types.len()
            ));
        }
        if self.beta <= 0.0 {
            return Err(format!("beta must be positive, got {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            ));
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err("batch_size and grad_accum must be at least 1".into());
        }
        let anchor: Anchor = self.anchor.parse()?;
        Ok(ObjectiveConfig {
            beta: self.beta,
            losses: types.into_iter().zip(weights).collect(),
            label_smoothing: self.label_smoothing,
            nll_weight: self.nll_weight,
            anchor_weight: self.anchor_weight,
            anchor,
        })
    }

    /// Learning rate at optimiser step `step` (0-based): linear warmup, then decay to 0.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.learning_rate * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.learning_rate,
            Schedule::Linear => self.learning_rate * (1.0 - progress),
            Schedule::Cosine => {
                self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// Reference log-probs of one example: `[chosen, rejected, base]`, summed and per-token mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReferenceLogps {
    pub sum: [f64; 3],
    pub mean: [f64; 3],
}

impl ReferenceLogps {
    pub(crate) fn pick(&self, n: Normalisation) -> [f64; 3] {
        match n {
            Normalisation::Sum => self.sum,
            Normalisation::Mean => self.mean,
        }
    }
}

/// Per-row summed and mean completion log-probs of a collated batch.
///
/// # Shapes
/// outputs `[rows]` each.
pub fn batch_logps<B: Backend>(
    model: &Llama<B>,
    batch: &PreferenceBatch,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let shape = [batch.rows, batch.len];
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.tokens.clone(), shape), device);
    let attn =
        Tensor::<B, 2, Bool>::from_data(TensorData::new(batch.attention.clone(), shape), device);
    let out = completion_logps(
        model,
        tokens,
        attn,
        &batch.tokens,
        &batch.completion_mask,
        device,
    );
    (out.sum, out.mean)
}

/// Completion log-probs of a right-padded batch with the LM head applied only where a logit is
/// used: the final hidden states of the positions that predict a completion token are gathered
/// (`[n, e]`, `n` = completion tokens), projected, and reduced to `logit[target] − logsumexp`.
/// Prompt and padding positions never reach the head. Same values and shift-by-one convention
/// as `sequence_logps(model.forward(..))`.
///
/// # Shapes
/// `tokens`, `attn`: `[b, s]`; `host_tokens`, `host_mask`: the same, row-major on the host.
pub fn completion_logps<B: Backend>(
    model: &Llama<B>,
    tokens: Tensor<B, 2, Int>,
    attn: Tensor<B, 2, Bool>,
    host_tokens: &[i64],
    host_mask: &[f32],
    device: &B::Device,
) -> SequenceLogps<B> {
    let [b, s] = tokens.dims();
    let plan = CompletionRows::new(host_tokens, host_mask, b, s);
    if plan.count() == 0 {
        // Nothing to score: keep the full path (zero sums, still a graph through the model).
        let mask = Tensor::<B, 2>::from_data(TensorData::new(host_mask.to_vec(), [b, s]), device);
        return sequence_logps(model.forward(tokens.clone(), Some(attn)), tokens, mask);
    }
    let hidden = model.forward_hidden(tokens, Some(attn));
    let e = hidden.dims()[2];
    let n = plan.count();
    let pos = Tensor::<B, 1, Int>::from_data(TensorData::new(plan.positions.clone(), [n]), device);
    let picked = hidden.reshape([b * s, e]).select(0, pos);
    let logits = model.logits_rows(picked.reshape([n, e]));
    let targets =
        Tensor::<B, 1, Int>::from_data(TensorData::new(plan.targets.clone(), [n]), device);
    scatter_logps(target_logps(logits, targets), &plan, device)
}

fn to_host<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("float")
}

/// Reference log-probs of every example (needs base responses), `batch_size` pairs at a time;
/// [`crate::concurrent::default_threads`] batches at once (the same numbers: every batch is
/// computed exactly as alone).
pub fn reference_logps<B: Backend>(
    reference: &Llama<B>,
    examples: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Vec<ReferenceLogps> {
    let one = |chunk: &[EncodedExample]| {
        let refs: Vec<&EncodedExample> = chunk.iter().collect();
        let batch = PreferenceBatch::collate(&refs, pad_id);
        assert!(
            batch.has_base,
            "reference_logps needs base responses on every example"
        );
        let (sum, mean) = batch_logps(reference, &batch, device);
        let (sum, mean) = (to_host(sum), to_host(mean));
        let n = chunk.len();
        (0..n)
            .map(|i| ReferenceLogps {
                sum: [sum[i], sum[n + i], sum[2 * n + i]],
                mean: [mean[i], mean[n + i], mean[2 * n + i]],
            })
            .collect::<Vec<_>>()
    };
    let chunks: Vec<&[EncodedExample]> = examples.chunks(batch_size.max(1)).collect();
    let mut finished = 0;
    let parts = crate::concurrent::map_ordered(
        &chunks,
        crate::concurrent::default_threads(),
        |chunk| one(chunk),
        |_, part| {
            finished += part.len();
            progress(finished);
        },
    );
    parts.into_iter().flatten().collect()
}

/// Why training stopped early.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{what}")]
    Config { what: String },
    #[error("step {step}: non-finite {what} on the batch of data lines {lines:?}; stopped before updating the model")]
    NonFinite {
        step: usize,
        what: String,
        lines: Vec<usize>,
    },
    /// [`request_stop`] was called (Ctrl-C): the loop stopped after step `step`, whose
    /// `on_step` call (which saves the checkpoint) had completed.
    #[error("interrupted after step {step}")]
    Interrupted { step: usize },
}

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
    mut model: Llama<B>,
    examples: &[EncodedExample],
    refs: &[ReferenceLogps],
    cfg: &TrainConfig,
    pad_id: u32,
    device: &B::Device,
    resume: Option<Resume<B>>,
    mut on_step: impl FnMut(&StepLog, &Llama<B>, &Optim<B>) -> C,
) -> Result<Llama<B>, TrainError> {
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
    let _guard = TrainingGuard::new();
    for step in first_step..cfg.max_steps {
        if stop_requested() {
            return Err(TrainError::Interrupted { step });
        }
        // Dropout masks come from the backend's RNG: reseed it per step, so a resumed run draws
        // the same masks as the uninterrupted one without saving the RNG state.
        B::seed(
            device,
            cfg.seed ^ (step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let t0 = std::time::Instant::now();
        let batches: Vec<Vec<usize>> = (0..cfg.grad_accum)
            .map(|_| sampler.next(cfg.batch_size))
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
        for out in outs {
            for (k, v) in out.metrics {
                *sums.entry(k).or_default() += v;
            }
            acc.accumulate(&model, out.grads);
            forward_s += out.forward_s;
            backward_s += out.backward_s;
            step_tokens += out.tokens;
        }
        let tb = std::time::Instant::now();
        let (grads, grad_norm) = clip_global_norm(&model, acc.grads(), cfg.max_grad_norm);
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
        if on_step(&log, &model, &optim).stop() {
            return Err(TrainError::Interrupted { step: step + 1 });
        }
    }
    Ok(model)
}

/// The reference model for a policy: adapters removed, autodiff stripped.
pub fn reference_of<B: AutodiffBackend>(model: &Llama<B>) -> Llama<B::InnerBackend> {
    crate::lora::without_adapters(model.valid())
}
