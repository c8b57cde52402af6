//! Training settings (`[train]`), the reference log-probs an example carries, and why a run
//! stopped: the types the loop (`train.rs`) and its micro-batches (`step.rs`) share.

use bapo_objective::{Anchor, LossType, ObjectiveConfig};
use serde::{Deserialize, Serialize};

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
    /// Each prompt computed once for its chosen, rejected and base rows (default), instead of
    /// every row as a full sequence: log-probs agree to float rounding, a third less work on a
    /// typical batch. Caches record which was used (`bapo --no-prompt-sharing` sets it off).
    pub prompt_sharing: bool,
    /// Each decoder block's feed-forward half recomputed in the backward pass instead of its
    /// activations kept from the forward pass (`crate::checkpoint`): the same gradients, less
    /// memory, about one more forward pass of the feed-forward halves in time.
    pub gradient_checkpointing: bool,
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
            prompt_sharing: true,
            gradient_checkpointing: false,
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
    pub fn pick(&self, n: Normalisation) -> [f64; 3] {
        match n {
            Normalisation::Sum => self.sum,
            Normalisation::Mean => self.mean,
        }
    }
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
    /// A collective operation of data-parallel training failed (another rank failed, say).
    #[error("data-parallel training: {0}")]
    Sync(#[from] crate::dist::SyncError),
}
