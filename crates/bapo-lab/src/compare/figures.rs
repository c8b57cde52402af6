//! Design A's figures: `heterogeneity.{png,svg}` (each method's knowledge loss and toward-pole
//! success against the user's `logp_gap`, with the loss's 95 % interval) and
//! `tradeoff.{png,svg}` (toward-pole success against knowledge loss, averaged over the users:
//! DPO over β, BAPO over λ, DPO over training steps, rehearsal and DPO + NLL as points).
//! Design B's: `own_turn.{png,svg}` (knowledge change under the default system turn against
//! the change under the users' own profile turns, one point per level and method).

use std::collections::BTreeMap;

use bapo_drift::plot::{write_figure, Panel, Series};
use serde_json::Value;

use super::{CompareSpec, RunResult};
use bapo_train::io::RunError;

/// An (x, y) point.
type Point = (f64, f64);
/// One user's point of a method: (`logp_gap`, knowledge loss, the loss's 95 % interval,
/// toward-pole success).
type UserPoint = (f64, f64, Point, Option<f64>);

/// The knob a method varies along its family's curve: (family, value).
fn family(method: &str) -> Option<(&'static str, f64)> {
    let num = |p: &str| method.strip_prefix(p)?.parse::<f64>().ok();
    match method {
        "dpo" => Some(("dpo_beta", 0.1)),
        _ => num("dpo_beta")
            .map(|b| ("dpo_beta", b))
            .or_else(|| num("bapo_l").map(|l| ("bapo_lambda", l))),
    }
}

/// Mean knowledge loss (−Δ of the chat-format sets' gold margins, averaged over the sets) and
/// toward-pole success per step of the runs of `method` on design A's levels.
fn by_step(spec: &CompareSpec, results: &[RunResult], method: &str) -> Vec<(f64, f64)> {
    let mut acc: BTreeMap<u64, (f64, f64, usize)> = BTreeMap::new();
    let solo: Vec<&str> = spec
        .levels
        .iter()
        .filter(|l| l.is_solo())
        .map(|l| l.name.as_str())
        .collect();
    for r in results
        .iter()
        .filter(|r| r.method == method && solo.contains(&r.level.as_str()))
    {
        let Ok(text) = std::fs::read_to_string(r.dir.join("metrics.jsonl")) else {
            continue;
        };
        for row in text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            let (Some(step), Some(s)) = (
                row["step"].as_u64(),
                row["eval_personalisation/success"].as_f64(),
            ) else {
                continue;
            };
            let d: Vec<f64> = row
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    k.starts_with("eval_knowledge/") && k.ends_with("/chat/delta_margin")
                })
                .filter_map(|(_, v)| v.as_f64())
                .collect();
            if d.is_empty() {
                continue;
            }
            let e = acc.entry(step).or_default();
            e.0 += s;
            e.1 -= d.iter().sum::<f64>() / d.len() as f64;
            e.2 += 1;
        }
    }
    let mut pts = vec![(0.0, 0.0)];
    pts.extend(acc.values().map(|(s, l, n)| (s / *n as f64, l / *n as f64)));
    pts
}

/// Writes both figures into `spec.out` from the analysis `doc`.
pub(super) fn design_a(
    spec: &CompareSpec,
    results: &[RunResult],
    doc: &Value,
) -> Result<(), RunError> {
    let users = doc["users"].as_array().cloned().unwrap_or_default();
    // method → [(logp_gap, loss, (lo, hi), success)]
    let mut per: BTreeMap<String, Vec<UserPoint>> = BTreeMap::new();
    for u in &users {
        let Some(gap) = u["logp_gap"].as_f64() else {
            continue;
        };
        for m in u["methods"].as_array().into_iter().flatten() {
            let d = &m["vs_base"];
            let (Some(dm), Some(lo), Some(hi)) = (
                d["delta_margin"].as_f64(),
                d["ci95"][0].as_f64(),
                d["ci95"][1].as_f64(),
            ) else {
                continue;
            };
            per.entry(m["method"].as_str().unwrap_or("-").to_string())
                .or_default()
                .push((gap, -dm, (-hi, -lo), m["toward_pole_success"].as_f64()));
        }
    }
    if per.is_empty() {
        return Ok(());
    }
    let mut loss = Vec::new();
    let mut success = Vec::new();
    for (name, mut pts) in per.clone() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        loss.push(Series {
            name: name.clone(),
            points: pts.iter().map(|p| (p.0, p.1)).collect(),
            y_err: pts.iter().map(|p| p.2).collect(),
        });
        success.push(Series::new(
            name,
            pts.iter().filter_map(|p| Some((p.0, p.3?))).collect(),
        ));
    }
    let x_label = "logp_gap: base prefers the rejected answer by (nats/token)";
    write_figure(
        &spec.out.join("heterogeneity"),
        "Design A: forgetting against distance from the base (one model per user)",
        &[
            Panel {
                title: "Knowledge loss (95 % CI over items)".into(),
                x_label: x_label.into(),
                y_label: "− Δ pooled chat gold margin (nats)".into(),
                series: loss,
                y_range: None,
            },
            Panel {
                title: "Personalisation: answers moved toward the pole".into(),
                x_label: x_label.into(),
                y_label: "toward-pole success (vs base answers)".into(),
                series: success,
                y_range: Some((0.0, 1.0)),
            },
        ],
    )
    .map_err(|e| format!("heterogeneity figure: {e}"))?;
    // The trade-off: per method the mean over users of (success, loss).
    let mean_point = |pts: &[UserPoint]| {
        let s: Vec<f64> = pts.iter().filter_map(|p| p.3).collect();
        (s.len() == pts.len() && !s.is_empty()).then(|| {
            (
                s.iter().sum::<f64>() / s.len() as f64,
                pts.iter().map(|p| p.1).sum::<f64>() / pts.len() as f64,
            )
        })
    };
    let mut curves: BTreeMap<&str, Vec<(f64, Point)>> = BTreeMap::new();
    for (name, pts) in &per {
        let Some(pt) = mean_point(pts) else { continue };
        match family(name) {
            Some((fam, v)) => {
                curves.entry(fam).or_default().push((v, pt));
                if name == "dpo" {
                    curves.entry("bapo_lambda").or_default().push((0.0, pt));
                }
            }
            None => curves.entry(name.as_str()).or_default().push((0.0, pt)),
        }
    }
    let mut series: Vec<Series> = curves
        .into_iter()
        .map(|(fam, mut v)| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            let name = match fam {
                "dpo_beta" => "DPO over β (0.1 → 1)".to_string(),
                "bapo_lambda" => "BAPO over λ (0 = DPO → 1)".to_string(),
                other => other.to_string(),
            };
            Series::new(name, v.into_iter().map(|(_, p)| p).collect())
        })
        .collect();
    let steps = by_step(spec, results, "dpo");
    if steps.len() > 2 {
        series.push(Series::new(
            "DPO over steps (loss averaged over sets)",
            steps,
        ));
    }
    write_figure(
        &spec.out.join("tradeoff"),
        "Design A: trade-off (mean over users)",
        &[Panel {
            title: "Personalisation against forgetting".into(),
            x_label: "toward-pole success on held-out prompts".into(),
            y_label: "knowledge loss (nats, pooled chat)".into(),
            series,
            y_range: None,
        }],
    )
    .map_err(|e| format!("trade-off figure: {e}").into())
}

/// `own_turn.{png,svg}` from the comparisons against the base model that were also scored
/// under the users' own turns (seed means); nothing without such runs.
pub(super) fn design_b(spec: &CompareSpec, comparisons: &[Value]) -> Result<(), RunError> {
    // method → level → [(default, own)] over seeds
    let mut pts: BTreeMap<&str, BTreeMap<&str, Vec<Point>>> = BTreeMap::new();
    for c in comparisons.iter().filter(|c| c["against"] == "base") {
        let p = &c["primary"];
        let (Some(d), Some(o)) = (
            p["delta_margin"].as_f64(),
            p["own_turn"]["delta_margin"].as_f64(),
        ) else {
            continue;
        };
        pts.entry(c["method"].as_str().unwrap_or("-"))
            .or_default()
            .entry(c["level"].as_str().unwrap_or("-"))
            .or_default()
            .push((d, o));
    }
    if pts.is_empty() {
        return Ok(());
    }
    let series = pts
        .into_iter()
        .map(|(method, levels)| {
            let mut v: Vec<(f64, f64)> = levels
                .values()
                .map(|s| {
                    let n = s.len() as f64;
                    (
                        s.iter().map(|p| p.0).sum::<f64>() / n,
                        s.iter().map(|p| p.1).sum::<f64>() / n,
                    )
                })
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series::new(method, v)
        })
        .collect();
    write_figure(
        &spec.out.join("own_turn"),
        "Design B: default turn vs own profile turn",
        &[Panel {
            title: "Δ pooled chat gold margin, one point per level".into(),
            x_label: "default system turn (nats)".into(),
            y_label: "users' own profile turns (nats)".into(),
            series,
            y_range: None,
        }],
    )
    .map_err(|e| format!("own-turn figure: {e}").into())
}
