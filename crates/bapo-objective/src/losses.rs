//! The DPO family of pairwise losses and the BAPO anchor, on per-sequence log-probs.
//!
//! With `h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))` per pair:
//!
//! | `LossType` | per-pair loss (ε = `label_smoothing`) |
//! |---|---|
//! | `Sigmoid` (DPO; ε > 0: cDPO) | `−(1−ε)·logσ(βh) − ε·logσ(−βh)` |
//! | `Robust` (rDPO) | `(−(1−ε)·logσ(βh) + ε·logσ(−βh)) / (1 − 2ε)` |
//! | `Hinge` (SLiC) | `max(0, 1 − βh)` |
//! | `Ipo` | `(h − 1/(2β))²` |
//!
//! Several types combine as `Σ wᵢ·lossᵢ` (TRL's `loss_type` list + `loss_weights`). An optional
//! NLL term on the chosen responses (TRL's `rpo_alpha`) adds `α · mean(−mean-token log π(y_c))`.
//!
//! The BAPO anchor on base responses `y_b` (the reference model's own answers), with
//! `d = log π_ref(y_b) − log π(y_b)`: `Hinge` `max(0, d)` (default), `Abs` `|d|`, `Square` `d²`,
//! and `Linear` `d` itself — rehearsal, the baseline without a hinge: its gradient is exactly
//! that of the NLL of the base responses (`log π_ref` is a constant); the total is `L_pref + λ · mean(anchor)`. `λ = 0` returns exactly the DPO loss (the anchor is
//! not even added, so gradients are bit-identical).
//!
//! All log-prob tensors must use the same normalisation (summed or per-token mean, see
//! [`crate::SequenceLogps`]): the caller picks it once for the pair and the anchor terms.

use std::collections::BTreeMap;

use burn::tensor::activation::{log_sigmoid, relu};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A pairwise preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    Sigmoid,
    Robust,
    Hinge,
    Ipo,
}

/// How the anchor penalises the base-response log-prob gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Anchor {
    /// `max(0, ref − policy)`: only a *fall* below the reference is penalised.
    #[default]
    Hinge,
    /// `|ref − policy|`.
    Abs,
    /// `(ref − policy)²`.
    Square,
    /// `ref − policy`: rehearsal (NLL on the base responses, shifted by the constant reference
    /// log-prob so that it reads 0 at the start); rewards rising above the reference too.
    Linear,
}

/// Settings of the objective.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectiveConfig {
    /// KL strength β.
    pub beta: f64,
    /// `(loss type, weight)` pairs, summed.
    pub losses: Vec<(LossType, f64)>,
    /// ε of cDPO / robust DPO; must be in `[0, 0.5)`.
    pub label_smoothing: f64,
    /// Weight of the NLL term on chosen responses (0 disables it).
    pub nll_weight: f64,
    /// Anchor weight λ (0 = plain preference loss).
    pub anchor_weight: f64,
    pub anchor: Anchor,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            losses: vec![(LossType::Sigmoid, 1.0)],
            label_smoothing: 0.0,
            nll_weight: 0.0,
            anchor_weight: 1.0,
            anchor: Anchor::Hinge,
        }
    }
}

/// Per-pair log-probs of chosen and rejected completions under policy and reference.
///
/// # Shapes
/// Each `[n]` (one entry per pair).
#[derive(Debug, Clone)]
pub struct PairLogps<B: Backend> {
    pub policy_chosen: Tensor<B, 1>,
    pub policy_rejected: Tensor<B, 1>,
    pub reference_chosen: Tensor<B, 1>,
    pub reference_rejected: Tensor<B, 1>,
}

/// Log-probs of the base responses under policy and reference.
///
/// # Shapes
/// Each `[m]` (one per prompt with a base response).
#[derive(Debug, Clone)]
pub struct AnchorLogps<B: Backend> {
    pub policy: Tensor<B, 1>,
    pub reference: Tensor<B, 1>,
}

/// The scalar loss (shape `[1]`) and its parts, still on the device (no sync).
#[derive(Debug, Clone)]
pub struct ObjectiveOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub preference_loss: Tensor<B, 1>,
    pub anchor_loss: Option<Tensor<B, 1>>,
    pub nll_loss: Option<Tensor<B, 1>>,
}

fn pair_loss<B: Backend>(ty: LossType, h: Tensor<B, 1>, cfg: &ObjectiveConfig) -> Tensor<B, 1> {
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let bh = h.clone().mul_scalar(beta);
    match ty {
        LossType::Sigmoid => {
            log_sigmoid(bh.clone()).mul_scalar(-(1.0 - eps)) - log_sigmoid(bh.neg()).mul_scalar(eps)
        }
        LossType::Robust => (log_sigmoid(bh.clone()).mul_scalar(-(1.0 - eps))
            + log_sigmoid(bh.neg()).mul_scalar(eps))
        .div_scalar(1.0 - 2.0 * eps),
        LossType::Hinge => relu(bh.neg().add_scalar(1.0)),
        LossType::Ipo => h.sub_scalar(1.0 / (2.0 * beta)).square(),
    }
}

/// Per-base-response anchor penalty, shape `[m]`.
pub fn anchor_penalty<B: Backend>(kind: Anchor, a: &AnchorLogps<B>) -> Tensor<B, 1> {
    let d = a.reference.clone() - a.policy.clone();
    match kind {
        Anchor::Hinge => relu(d),
        Anchor::Abs => d.abs(),
        Anchor::Square => d.square(),
        Anchor::Linear => d,
    }
}

/// `L = Σ wᵢ·mean(lossᵢ) + α·NLL + λ·mean(anchor)`.
///
/// `chosen_token_mean`: per-token mean log-prob of the chosen responses under the policy
/// (needed only when `nll_weight > 0`).
pub fn bapo_loss<B: Backend>(
    cfg: &ObjectiveConfig,
    pairs: &PairLogps<B>,
    anchor: Option<&AnchorLogps<B>>,
    chosen_token_mean: Option<&Tensor<B, 1>>,
) -> ObjectiveOutput<B> {
    assert!(cfg.beta > 0.0, "beta must be positive");
    assert!(
        (0.0..0.5).contains(&cfg.label_smoothing),
        "label_smoothing must be in [0, 0.5)"
    );
    assert!(!cfg.losses.is_empty(), "at least one loss type");
    let h = (pairs.policy_chosen.clone() - pairs.policy_rejected.clone())
        - (pairs.reference_chosen.clone() - pairs.reference_rejected.clone());
    let mut preference: Option<Tensor<B, 1>> = None;
    for &(ty, w) in &cfg.losses {
        let l = pair_loss(ty, h.clone(), cfg).mean().mul_scalar(w);
        preference = Some(match preference {
            Some(p) => p + l,
            None => l,
        });
    }
    let preference = preference.expect("non-empty");
    let mut loss = preference.clone();
    let nll = (cfg.nll_weight > 0.0).then(|| {
        let c =
            chosen_token_mean.expect("nll_weight > 0 needs the chosen per-token mean log-probs");
        c.clone().neg().mean()
    });
    if let Some(n) = &nll {
        loss = loss + n.clone().mul_scalar(cfg.nll_weight);
    }
    let anchor_loss = anchor.map(|a| anchor_penalty(cfg.anchor, a).mean());
    if cfg.anchor_weight != 0.0 {
        if let Some(a) = &anchor_loss {
            loss = loss + a.clone().mul_scalar(cfg.anchor_weight);
        }
    }
    ObjectiveOutput {
        loss,
        preference_loss: preference,
        anchor_loss,
        nll_loss: nll,
    }
}

/// Metrics with TRL's names (`rewards/chosen`, `rewards/rejected`, `rewards/margins`,
/// `rewards/accuracies`, `logps/chosen`, `logps/rejected`) plus `logps/base`, `anchor/loss`
/// and `anchor/violation_rate` (fraction of base responses whose policy log-prob is below the
/// reference's). Means over the batch; rewards are `β·(log π − log π_ref)`.
pub type Metrics = BTreeMap<String, f64>;

fn host<B: Backend>(t: &Tensor<B, 1>) -> Vec<f64> {
    t.clone()
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("float data")
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

impl<B: Backend> ObjectiveOutput<B> {
    /// Reads the metrics back to the host (one sync).
    pub fn metrics(
        &self,
        cfg: &ObjectiveConfig,
        pairs: &PairLogps<B>,
        anchor: Option<&AnchorLogps<B>>,
    ) -> Metrics {
        let (pc, pr, rc, rr) = (
            host(&pairs.policy_chosen),
            host(&pairs.policy_rejected),
            host(&pairs.reference_chosen),
            host(&pairs.reference_rejected),
        );
        let chosen: Vec<f64> = pc
            .iter()
            .zip(&rc)
            .map(|(p, r)| cfg.beta * (p - r))
            .collect();
        let rejected: Vec<f64> = pr
            .iter()
            .zip(&rr)
            .map(|(p, r)| cfg.beta * (p - r))
            .collect();
        let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
        let acc: Vec<f64> = margins
            .iter()
            .map(|m| if *m > 0.0 { 1.0 } else { 0.0 })
            .collect();
        let mut m = Metrics::new();
        m.insert("loss".into(), host(&self.loss)[0]);
        m.insert("rewards/chosen".into(), mean(&chosen));
        m.insert("rewards/rejected".into(), mean(&rejected));
        m.insert("rewards/margins".into(), mean(&margins));
        m.insert("rewards/accuracies".into(), mean(&acc));
        m.insert("logps/chosen".into(), mean(&pc));
        m.insert("logps/rejected".into(), mean(&pr));
        if let Some(n) = &self.nll_loss {
            m.insert("nll_loss".into(), host(n)[0]);
        }
        if let (Some(a), Some(l)) = (anchor, &self.anchor_loss) {
            let (p, r) = (host(&a.policy), host(&a.reference));
            m.insert("logps/base".into(), mean(&p));
            m.insert("anchor/loss".into(), host(l)[0]);
            m.insert(
                "anchor/violation_rate".into(),
                mean(
                    &p.iter()
                        .zip(&r)
                        .map(|(p, r)| if p < r { 1.0 } else { 0.0 })
                        .collect::<Vec<_>>(),
                ),
            );
        }
        m
    }
}

impl std::str::FromStr for LossType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "sigmoid" => Self::Sigmoid,
            "robust" => Self::Robust,
            "hinge" => Self::Hinge,
            "ipo" => Self::Ipo,
            other => {
                return Err(format!(
                    "unknown loss type `{other}` (sigmoid, robust, hinge, ipo)"
                ))
            }
        })
    }
}

impl std::str::FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "hinge" => Self::Hinge,
            "abs" => Self::Abs,
            "square" => Self::Square,
            "linear" => Self::Linear,
            other => {
                return Err(format!(
                    "unknown anchor `{other}` (hinge, abs, square, linear)"
                ))
            }
        })
    }
}
