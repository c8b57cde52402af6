//! A retention gate for CI: per knowledge set and format, how far a model's accuracy and gold
//! margin fell against a reference run on the very same items, with paired 95 % intervals, and
//! whether each drop is within what is allowed.
//!
//! Both runs score the same items, so the comparison is paired: per item
//! `d = reference − model` (correctness as 0/1, or the gold margin in nats); the drop is the
//! mean of `d` and its interval `mean ± 1.96 · sd(d) / √n` (normal approximation to the paired
//! difference). A set fails when the point estimate of its drop exceeds the limit; the interval
//! says how sure that is.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::mc::McItemResult;

/// Largest drops allowed; a drop equal to the limit passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateLimits {
    /// Accuracy, as a fraction (0.02 = two points).
    pub max_acc_drop: Option<f64>,
    /// Mean gold margin over the best distractor, in nats.
    pub max_margin_drop: Option<f64>,
}

/// One knowledge set and format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateRow {
    /// `<set>/<format>`.
    pub key: String,
    pub n: usize,
    pub acc_drop: f64,
    pub acc_drop_ci95: [f64; 2],
    pub margin_drop: f64,
    pub margin_drop_ci95: [f64; 2],
    /// Items right in the reference and wrong here.
    pub lost: usize,
    /// Items wrong in the reference and right here.
    pub gained: usize,
    /// Exact two-sided McNemar p-value of `lost` vs `gained` (1 when both are 0).
    pub mcnemar_p: f64,
    pub pass: bool,
}

/// Exact two-sided McNemar test: the probability, under "a flip is as likely either way", of
/// a split of `lost + gained` flips at least as uneven as the one seen
/// (`min(1, 2·P[Binomial(n, ½) ≤ min(lost, gained)])`).
pub fn mcnemar_exact(lost: usize, gained: usize) -> f64 {
    let n = lost + gained;
    let k = lost.min(gained);
    // log pmf(0) = −n ln 2, then pmf(i) = pmf(i − 1)·(n − i + 1)/i; in logs for large n.
    let mut log_pmf = -(n as f64) * std::f64::consts::LN_2;
    let mut tail = log_pmf.exp();
    for i in 1..=k {
        log_pmf += ((n - i + 1) as f64 / i as f64).ln();
        tail += log_pmf.exp();
    }
    (2.0 * tail).min(1.0)
}

/// Mean and paired 95 % interval of `d`.
fn paired(d: &[f64]) -> (f64, [f64; 2]) {
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = if d.len() > 1 {
        d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let half = 1.96 * (var / n).sqrt();
    (mean, [mean - half, mean + half])
}

/// The drops of `model` against `reference` for every key of `model`. Fails, naming the key,
/// when the reference lacks a key, the item counts differ or the items are not the same ones
/// in the same order (compared by id).
pub fn gate(
    reference: &BTreeMap<String, Vec<McItemResult>>,
    model: &BTreeMap<String, Vec<McItemResult>>,
    limits: GateLimits,
) -> Result<Vec<GateRow>, String> {
    let mut rows = Vec::with_capacity(model.len());
    for (key, items) in model {
        let r = reference
            .get(key)
            .ok_or_else(|| format!("`{key}`: the reference has no results for this set/format"))?;
        if r.len() != items.len() {
            return Err(format!(
                "`{key}`: {} items in the reference, {} here: not the same items",
                r.len(),
                items.len()
            ));
        }
        if let Some((a, b)) = r.iter().zip(items).find(|(a, b)| a.id != b.id) {
            return Err(format!(
                "`{key}`: item `{}` in the reference where `{}` is here: not the same items",
                a.id, b.id
            ));
        }
        if items.is_empty() {
            continue;
        }
        let acc: Vec<f64> = r
            .iter()
            .zip(items)
            .map(|(a, b)| f64::from(u8::from(a.correct)) - f64::from(u8::from(b.correct)))
            .collect();
        let margin: Vec<f64> = r
            .iter()
            .zip(items)
            .map(|(a, b)| a.margin - b.margin)
            .collect();
        let (acc_drop, acc_drop_ci95) = paired(&acc);
        let (margin_drop, margin_drop_ci95) = paired(&margin);
        let lost = r
            .iter()
            .zip(items)
            .filter(|(a, b)| a.correct && !b.correct)
            .count();
        let gained = r
            .iter()
            .zip(items)
            .filter(|(a, b)| !a.correct && b.correct)
            .count();
        let pass = limits.max_acc_drop.is_none_or(|m| acc_drop <= m)
            && limits.max_margin_drop.is_none_or(|m| margin_drop <= m);
        rows.push(GateRow {
            key: key.clone(),
            n: items.len(),
            acc_drop,
            acc_drop_ci95,
            margin_drop,
            margin_drop_ci95,
            lost,
            gained,
            mcnemar_p: mcnemar_exact(lost, gained),
            pass,
        });
    }
    Ok(rows)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A scored item with only what the paired comparisons read.
    pub(crate) fn item(id: &str, correct: bool, margin: f64) -> McItemResult {
        McItemResult {
            id: id.into(),
            logliks: vec![],
            correct,
            correct_norm: correct,
            gold_loglik: 0.0,
            margin,
        }
    }

    #[test]
    fn drops_and_paired_intervals_by_hand() {
        let reference = BTreeMap::from([(
            "capitals/raw".to_string(),
            vec![
                item("a", true, 2.0),
                item("b", true, 1.0),
                item("c", false, -1.0),
                item("d", true, 0.5),
            ],
        )]);
        let model = BTreeMap::from([(
            "capitals/raw".to_string(),
            vec![
                item("a", true, 1.0),
                item("b", false, -0.5),
                item("c", false, -1.0),
                item("d", true, 0.5),
            ],
        )]);
        let limits = |acc| GateLimits {
            max_acc_drop: Some(acc),
            max_margin_drop: None,
        };
        let rows = gate(&reference, &model, limits(0.25)).unwrap();
        let r = &rows[0];
        // d_acc = [0, 1, 0, 0]: mean 0.25, sd = 0.5, half-width 1.96 * 0.5 / 2 = 0.49.
        assert_eq!((r.key.as_str(), r.n), ("capitals/raw", 4));
        assert!((r.acc_drop - 0.25).abs() < 1e-12);
        assert!((r.acc_drop_ci95[0] - (0.25 - 0.49)).abs() < 1e-12);
        assert!((r.acc_drop_ci95[1] - (0.25 + 0.49)).abs() < 1e-12);
        // d_margin = [1, 1.5, 0, 0]: mean 0.625.
        assert!((r.margin_drop - 0.625).abs() < 1e-12);
        // One item lost, none gained: p = 2 · ½ = 1.
        assert_eq!((r.lost, r.gained, r.mcnemar_p), (1, 0, 1.0));
        assert!(r.pass, "a drop equal to the limit passes");
        assert!(!gate(&reference, &model, limits(0.2)).unwrap()[0].pass);
        let margin_only = GateLimits {
            max_acc_drop: None,
            max_margin_drop: Some(0.5),
        };
        assert!(!gate(&reference, &model, margin_only).unwrap()[0].pass);
        // The reference against itself: no drop.
        let same = gate(&reference, &reference, limits(0.0)).unwrap();
        assert!(same[0].pass && same[0].acc_drop == 0.0 && same[0].acc_drop_ci95 == [0.0, 0.0]);
    }

    #[test]
    fn mcnemar_exact_by_hand() {
        // 1 vs 4 flips: 2·(C(5,0) + C(5,1))/2⁵ = 12/32.
        assert!((mcnemar_exact(1, 4) - 0.375).abs() < 1e-15);
        assert!((mcnemar_exact(4, 1) - 0.375).abs() < 1e-15);
        // 0 vs 6: 2/64.
        assert!((mcnemar_exact(0, 6) - 0.03125).abs() < 1e-15);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(3, 3), 1.0);
        // 10 vs 30: 2·Σ_{k≤10} C(40, k)/2⁴⁰ = 2·1,221,246,132/2⁴⁰ (exact integers, Python).
        let p = mcnemar_exact(10, 30);
        assert!(
            (p - 2.0 * 1_221_246_132.0 / 2f64.powi(40)).abs() < 1e-15,
            "{p}"
        );
        // 500 vs 700 (2⁻¹²⁰⁰ underflows; the sum is taken in logs): 8.535366081034334e-9.
        let big = mcnemar_exact(500, 700);
        assert!((big / 8.535366081034334e-9 - 1.0).abs() < 1e-9, "{big}");
    }

    #[test]
    fn different_items_are_refused_by_key() {
        let reference = BTreeMap::from([("capitals/raw".to_string(), vec![item("a", true, 1.0)])]);
        let other = BTreeMap::from([("capitals/raw".to_string(), vec![item("z", true, 1.0)])]);
        let missing = BTreeMap::from([("capitals/chat".to_string(), vec![item("a", true, 1.0)])]);
        let l = GateLimits {
            max_acc_drop: Some(0.0),
            max_margin_drop: None,
        };
        let e = gate(&reference, &other, l).unwrap_err();
        assert!(
            e.contains("capitals/raw") && e.contains("`a`") && e.contains("`z`"),
            "{e}"
        );
        let e = gate(&reference, &missing, l).unwrap_err();
        assert!(
            e.contains("capitals/chat") && e.contains("no results"),
            "{e}"
        );
    }
}
