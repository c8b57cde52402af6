//! Hand-computed loss values, finite-difference gradients (f64), and λ = 0 ≡ DPO.

use bapo_objective::{bapo_loss, Anchor, AnchorLogps, LossType, ObjectiveConfig, PairLogps};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

type F = NdArray<f64>;
type AD = Autodiff<F>;

fn t<B: Backend>(v: &[f64]) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
}

fn scalar<B: Backend>(x: Tensor<B, 1>) -> f64 {
    x.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0]
}

// Two pairs and two base responses.
const PC: [f64; 2] = [-3.0, -4.0];
const PR: [f64; 2] = [-5.0, -4.5];
const RC: [f64; 2] = [-3.5, -4.0];
const RR: [f64; 2] = [-5.0, -4.0];
const PB: [f64; 2] = [-10.0, -8.0];
const RB: [f64; 2] = [-9.0, -8.5];

fn pairs<B: Backend>(pc: &[f64]) -> PairLogps<B> {
    PairLogps {
        policy_chosen: t(pc),
        policy_rejected: t(&PR),
        reference_chosen: t(&RC),
        reference_rejected: t(&RR),
    }
}

fn ls(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

#[test]
fn hand_computed_values() {
    // h = (pc - pr) - (rc - rr) = [2 - 1.5, 0.5 - 0] = [0.5, 0.5]
    let h = [0.5, 0.5];
    let beta = 0.1;
    let anchor = AnchorLogps {
        policy: t::<F>(&PB),
        reference: t::<F>(&RB),
    };
    let cases: Vec<(LossType, f64, f64)> = vec![
        (
            LossType::Sigmoid,
            0.0,
            h.iter().map(|h| -ls(beta * h)).sum::<f64>() / 2.0,
        ),
        (
            LossType::Sigmoid,
            0.2,
            h.iter()
                .map(|h| -0.8 * ls(beta * h) - 0.2 * ls(-beta * h))
                .sum::<f64>()
                / 2.0,
        ),
        (
            LossType::Robust,
            0.2,
            h.iter()
                .map(|h| (-0.8 * ls(beta * h) + 0.2 * ls(-beta * h)) / 0.6)
                .sum::<f64>()
                / 2.0,
        ),
        (
            LossType::Hinge,
            0.0,
            h.iter().map(|h| f64::max(0.0, 1.0 - beta * h)).sum::<f64>() / 2.0,
        ),
        (
            LossType::Ipo,
            0.0,
            h.iter()
                .map(|h| (h - 1.0 / (2.0 * beta)).powi(2))
                .sum::<f64>()
                / 2.0,
        ),
    ];
    for (ty, eps, pref) in cases {
        let cfg = ObjectiveConfig {
            beta,
            losses: vec![(ty, 1.0)],
            label_smoothing: eps,
            anchor_weight: 0.0,
            ..Default::default()
        };
        let out = bapo_loss(&cfg, &pairs::<F>(&PC), Some(&anchor), None);
        let got = scalar(out.loss);
        assert!(
            (got - pref).abs() < 1e-12,
            "{ty:?} ε={eps}: {got} vs {pref}"
        );
    }
    // Anchor: d = ref - policy = [1.0, -0.5].
    for (kind, want) in [
        (Anchor::Hinge, 0.5),
        (Anchor::Abs, 0.75),
        (Anchor::Square, (1.0 + 0.25) / 2.0),
        (Anchor::Linear, (1.0 - 0.5) / 2.0),
    ] {
        let cfg = ObjectiveConfig {
            anchor: kind,
            anchor_weight: 2.0,
            ..Default::default()
        };
        let out = bapo_loss(&cfg, &pairs::<F>(&PC), Some(&anchor), None);
        let pref = scalar(out.preference_loss.clone());
        assert!(
            (scalar(out.anchor_loss.clone().unwrap()) - want).abs() < 1e-12,
            "{kind:?}"
        );
        assert!(
            (scalar(out.loss) - (pref + 2.0 * want)).abs() < 1e-12,
            "{kind:?}"
        );
    }
    // Weighted combination + NLL on chosen per-token means.
    let cfg = ObjectiveConfig {
        losses: vec![(LossType::Sigmoid, 0.7), (LossType::Hinge, 0.3)],
        nll_weight: 0.5,
        anchor_weight: 0.0,
        ..Default::default()
    };
    let means = t::<F>(&[-1.0, -2.0]);
    let out = bapo_loss(&cfg, &pairs::<F>(&PC), None, Some(&means));
    let want = 0.7 * -ls(0.05) + 0.3 * (1.0 - 0.05) + 0.5 * 1.5;
    assert!((scalar(out.loss) - want).abs() < 1e-12);
}

#[test]
fn metrics_use_trl_names_and_values() {
    let cfg = ObjectiveConfig::default();
    let p = pairs::<F>(&PC);
    let a = AnchorLogps {
        policy: t::<F>(&PB),
        reference: t::<F>(&RB),
    };
    let out = bapo_loss(&cfg, &p, Some(&a), None);
    let m = out.metrics(&cfg, &p, Some(&a));
    let close = |k: &str, v: f64| assert!((m[k] - v).abs() < 1e-12, "{k}: {} vs {v}", m[k]);
    close("rewards/chosen", 0.1 * (0.5 + 0.0) / 2.0);
    close("rewards/rejected", 0.1 * (0.0 - 0.5) / 2.0);
    close("rewards/margins", 0.05);
    close("rewards/accuracies", 1.0);
    close("logps/chosen", -3.5);
    close("logps/rejected", -4.75);
    close("logps/base", -9.0);
    close("anchor/loss", 0.5);
    close("anchor/violation_rate", 0.5);
}

/// Loss as a function of the policy log-probs `[pc0, pc1, pr0, pr1, pb0, pb1]`.
fn loss_of<B: Backend>(cfg: &ObjectiveConfig, x: &[f64]) -> Tensor<B, 1> {
    let p = PairLogps {
        policy_chosen: t::<B>(&x[0..2]),
        policy_rejected: t::<B>(&x[2..4]),
        reference_chosen: t::<B>(&RC),
        reference_rejected: t::<B>(&RR),
    };
    let a = AnchorLogps {
        policy: t::<B>(&x[4..6]),
        reference: t::<B>(&RB),
    };
    let means = t::<B>(&x[0..2]).div_scalar(3.0);
    bapo_loss(cfg, &p, Some(&a), Some(&means)).loss
}

fn autodiff_grad(cfg: &ObjectiveConfig, x: &[f64]) -> Vec<f64> {
    let d = Default::default();
    let leaves: Vec<Tensor<AD, 1>> = [&x[0..2], &x[2..4], &x[4..6]]
        .iter()
        .map(|v| Tensor::<AD, 1>::from_data(TensorData::new(v.to_vec(), [2]), &d).require_grad())
        .collect();
    let p = PairLogps {
        policy_chosen: leaves[0].clone(),
        policy_rejected: leaves[1].clone(),
        reference_chosen: t::<AD>(&RC),
        reference_rejected: t::<AD>(&RR),
    };
    let a = AnchorLogps {
        policy: leaves[2].clone(),
        reference: t::<AD>(&RB),
    };
    let means = leaves[0].clone().div_scalar(3.0);
    let grads = bapo_loss(cfg, &p, Some(&a), Some(&means)).loss.backward();
    // A leaf the loss does not touch has no gradient: that is a zero gradient.
    leaves
        .iter()
        .flat_map(|l| {
            l.grad(&grads)
                .map(|g| g.into_data().to_vec::<f64>().unwrap())
                .unwrap_or(vec![0.0; 2])
        })
        .collect()
}

#[test]
fn gradients_match_finite_differences() {
    let x: Vec<f64> = PC.iter().chain(&PR).chain(&PB).copied().collect();
    for losses in [
        vec![(LossType::Sigmoid, 1.0)],
        vec![(LossType::Robust, 1.0)],
        vec![(LossType::Ipo, 1.0)],
        vec![(LossType::Sigmoid, 0.5), (LossType::Hinge, 0.5)],
    ] {
        for anchor in [Anchor::Hinge, Anchor::Abs, Anchor::Square, Anchor::Linear] {
            let cfg = ObjectiveConfig {
                beta: 0.3,
                losses: losses.clone(),
                label_smoothing: 0.1,
                nll_weight: 0.2,
                anchor_weight: 1.5,
                anchor,
            };
            let g = autodiff_grad(&cfg, &x);
            for i in 0..x.len() {
                let h = 1e-6;
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += h;
                down[i] -= h;
                let fd = (scalar(loss_of::<F>(&cfg, &up)) - scalar(loss_of::<F>(&cfg, &down)))
                    / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() < 1e-6,
                    "{losses:?} {anchor:?} ∂/∂x{i}: autodiff {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn zero_lambda_is_exactly_dpo() {
    let x: Vec<f64> = PC.iter().chain(&PR).chain(&PB).copied().collect();
    let bapo = ObjectiveConfig {
        anchor_weight: 0.0,
        ..Default::default()
    };
    let g_bapo = autodiff_grad(&bapo, &x);
    // Plain DPO: no anchor input at all.
    let d = Default::default();
    let leaves: Vec<Tensor<AD, 1>> = [&x[0..2], &x[2..4]]
        .iter()
        .map(|v| Tensor::<AD, 1>::from_data(TensorData::new(v.to_vec(), [2]), &d).require_grad())
        .collect();
    let p = PairLogps {
        policy_chosen: leaves[0].clone(),
        policy_rejected: leaves[1].clone(),
        reference_chosen: t::<AD>(&RC),
        reference_rejected: t::<AD>(&RR),
    };
    let dpo = bapo_loss(&bapo, &p, None, None).loss;
    assert_eq!(scalar(dpo.clone()), scalar(loss_of::<F>(&bapo, &x)));
    let grads = dpo.backward();
    let g_dpo: Vec<f64> = leaves
        .iter()
        .flat_map(|l| l.grad(&grads).unwrap().into_data().to_vec::<f64>().unwrap())
        .collect();
    assert_eq!(&g_bapo[..4], &g_dpo[..]);
    assert_eq!(&g_bapo[4..], &[0.0, 0.0]);
}
