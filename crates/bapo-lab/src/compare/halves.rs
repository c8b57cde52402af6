//! Design A′: distance from the base separated from direction.
//!
//! In design A the two users of a dimension are each other's mirror (same pairs, labels
//! swapped), so the sign of a user's `logp_gap` is its pole and a slope over users cannot tell
//! distance from direction. Here each user's training pairs are split at the median per-pair
//! gap (the reference's per-token log-prob of the rejected answer minus the chosen one, from a
//! scan of every pair before any training): `near_<user>` trains on the lower half (the base
//! model already leans toward the chosen answers), `far_<user>` on the upper half. Within a
//! direction the pole is fixed and only the distance moves.
//!
//! Rules (declared in docs/experiment.md before the runs):
//! - **Primary**: per direction (user), DPO's knowledge loss on the far half minus on the near
//!   half, averaged over the seeds both halves ran; then the mean over the six directions with
//!   its Student-t 95 % interval (5 df). "Reproduced" when the interval lies above 0, "reversed"
//!   when below 0, "not reproduced" when it lies within ±[`NEAR_FAR_MARGIN`] nats, else
//!   "inconclusive"; "undetermined" until all six directions have run.
//! - Robustness (reported, not judged): the same over the three dimensions (mirrored directions
//!   averaged first: they share prompt sets, so a prompt set that makes any training forget
//!   cancels), t interval with 2 df.
//! - Secondary (described, not judged): the pole effect at fixed distance (least squares of the
//!   loss on `|logp_gap|` and the pole over the twelve half-users, the pole coefficient with its
//!   t interval), and the loss against token KL (slope over the half-users).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use serde_json::{json, Value};

use super::stats::{stat, t95};
use super::{CompareSpec, Half, USERS};
use bapo_run::config::RunConfig;
use bapo_train::io::{write_atomic, RunError};

/// The primary test's equivalence margin: a far-minus-near difference in knowledge loss inside
/// ±0.25 nats of pooled gold margin counts as no effect (a quarter of DPO's typical loss in
/// design A), declared before the runs.
pub const NEAR_FAR_MARGIN: f64 = 0.25;

/// One user's pairs split at the median gap: 1-based lines of the source training file.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub near: BTreeSet<usize>,
    pub far: BTreeSet<usize>,
}

impl Split {
    pub fn lines(&self, half: Half) -> &BTreeSet<usize> {
        match half {
            Half::Near => &self.near,
            Half::Far => &self.far,
        }
    }
}

/// Splits `(line, gap)` pairs at the median gap: the lowest ⌊n/2⌋ are near, the highest ⌊n/2⌋
/// far (with an odd count the median pair is in neither); ties broken by line.
pub fn split_at_median(gaps: &[(usize, f64)]) -> Split {
    let mut sorted = gaps.to_vec();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let h = sorted.len() / 2;
    Split {
        near: sorted[..h].iter().map(|x| x.0).collect(),
        far: sorted[sorted.len() - h..].iter().map(|x| x.0).collect(),
    }
}

/// The split of every user a design-A′ level of `spec` needs, from `out/data/scan/<user>/
/// gaps.json`; a missing scan is made first (the reference's log-probs of every training pair
/// of the user, through `bapo anchor` with one-token base responses, which the gap does not
/// use), or, with `spec.report_only`, the user is left out (none of its runs can exist).
pub(super) fn splits<B: AutodiffBackend>(
    config: &Path,
    spec: &CompareSpec,
    base: &RunConfig,
    device: &B::Device,
) -> Result<BTreeMap<String, Split>, RunError> {
    let users: BTreeSet<&String> = spec
        .levels
        .iter()
        .filter(|l| l.half.is_some())
        .map(|l| &l.users[0])
        .collect();
    let mut out = BTreeMap::new();
    for user in users {
        let dir = spec.out.join("data").join("scan").join(user);
        let gaps_path = dir.join("gaps.json");
        if !gaps_path.exists() {
            if spec.report_only {
                // Nothing of this user has run: nothing to report.
                continue;
            }
            scan::<B>(config, spec, base, user, &dir, device)?;
        }
        let text =
            std::fs::read_to_string(&gaps_path).map_err(|e| RunError::file(&gaps_path, e))?;
        let doc: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", gaps_path.display()))?;
        let mut split = Split {
            near: BTreeSet::new(),
            far: BTreeSet::new(),
        };
        for (i, p) in doc["pairs"].as_array().into_iter().flatten().enumerate() {
            let bad = || {
                format!(
                    "{}: pairs[{i}]: fields `line` and `half` are needed",
                    gaps_path.display()
                )
            };
            let line = p["line"].as_u64().ok_or_else(bad)? as usize;
            match p["half"].as_str() {
                Some("near") => split.near.insert(line),
                Some("far") => split.far.insert(line),
                Some("median") => false,
                _ => return Err(bad().into()),
            };
        }
        out.insert(user.clone(), split);
    }
    Ok(out)
}

/// Scores every training pair of `user` with the reference and writes `dir/gaps.json`.
fn scan<B: AutodiffBackend>(
    config: &Path,
    spec: &CompareSpec,
    base: &RunConfig,
    user: &str,
    dir: &Path,
    device: &B::Device,
) -> Result<(), RunError> {
    let q = super::toml_path;
    let run_dir = dir.join("run");
    let eval = base
        .data
        .eval
        .as_ref()
        .ok_or("compare needs data.eval (a held-out pair file) in the config")?;
    // Overrides resolve against the config's folder: pass absolute paths.
    let (train, eval) = (
        std::path::absolute(&base.data.train)?,
        std::path::absolute(eval)?,
    );
    let mut ov = spec.overrides.clone();
    ov.extend([
        format!("data.train={}", q(&train)),
        format!("data.eval={}", q(&eval)),
        format!("data.users=[\"{user}\"]"),
        format!("output.dir={}", q(&run_dir)),
        "anchor.max_new_tokens=1".into(),
    ]);
    let cfg = RunConfig::from_file_with(config, &ov)?;
    tracing::info!(
        user,
        "design A′: scanning every training pair's reference gap"
    );
    bapo_run::run::run_anchors::<B>(&cfg, device)?;
    let anchors = run_dir.join("anchors.jsonl");
    let refs = super::heterogeneity::train_refs(&run_dir)?;
    let lines: Vec<usize> = std::fs::read_to_string(&anchors)
        .map_err(|e| RunError::file(&anchors, e))?
        .lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v["line"].as_u64())
                .map(|n| n as usize)
                .ok_or_else(|| {
                    format!(
                        "{} line {}: field `line` is needed",
                        anchors.display(),
                        i + 1
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    if lines.len() != refs.len() {
        return Err(format!(
            "{}: {} rows for {} reference log-probs in {}",
            anchors.display(),
            lines.len(),
            refs.len(),
            run_dir.join("reference_logps.cache.json").display()
        )
        .into());
    }
    let gaps: Vec<(usize, f64)> = lines
        .iter()
        .zip(&refs)
        .map(|(&l, r)| (l, r.mean[1] - r.mean[0]))
        .collect();
    let split = split_at_median(&gaps);
    let mut pairs: Vec<Value> = lines
        .iter()
        .zip(&refs)
        .map(|(&l, r)| {
            let half = if split.near.contains(&l) {
                "near"
            } else if split.far.contains(&l) {
                "far"
            } else {
                "median"
            };
            json!({"line": l, "gap_token": r.mean[1] - r.mean[0], "gap_sum": r.sum[1] - r.sum[0], "half": half})
        })
        .collect();
    pairs.sort_by_key(|p| p["line"].as_u64());
    let doc = json!({
        "user": user,
        "source": base.data.train,
        "rule": "per-pair gap = reference per-token log-prob of rejected − chosen; the lowest ⌊n/2⌋ pairs are `near`, the highest ⌊n/2⌋ `far`",
        "pairs": pairs,
    });
    write_atomic(
        &dir.join("gaps.json"),
        serde_json::to_string_pretty(&doc)?.as_bytes(),
    )?;
    Ok(())
}

/// One finished run's numbers the design-A′ analysis reads.
#[derive(Debug, Clone)]
pub struct Point {
    pub method: String,
    pub user: String,
    pub half: Half,
    pub seed: u64,
    /// Knowledge loss (nats, > 0: forgetting).
    pub loss: f64,
    /// `logp_gap` over the pairs the run trained on (per token, and summed).
    pub gap: f64,
    pub gap_sum: Option<f64>,
    /// `eval_kl/token`.
    pub kl: Option<f64>,
}

/// The primary verdict from the interval over `directions` directions.
pub fn near_far_verdict(directions: usize, ci: Option<[f64; 2]>) -> String {
    match ci {
        _ if directions < USERS.len() => {
            format!(
                "undetermined: {directions} of {} directions ran",
                USERS.len()
            )
        }
        Some([lo, _]) if lo > 0.0 => "reproduced: the far half forgets more".into(),
        Some([_, hi]) if hi < 0.0 => "reversed: the near half forgets more".into(),
        Some([lo, hi]) if lo >= -NEAR_FAR_MARGIN && hi <= NEAR_FAR_MARGIN => {
            "not reproduced".into()
        }
        Some(_) => "inconclusive".into(),
        None => "undetermined".into(),
    }
}

/// Least squares of `y` on the columns of `x` (each row one observation; include a column of
/// ones for an intercept): the coefficients and their 95 % t half-widths (df = n − p), `None`
/// when the design is singular or has no residual degree of freedom.
pub fn ols(x: &[Vec<f64>], y: &[f64]) -> Option<(Vec<f64>, Vec<f64>)> {
    let (n, p) = (x.len(), x.first()?.len());
    if n <= p || y.len() != n {
        return None;
    }
    // [X'X | I] → [I | (X'X)^-1] by Gauss-Jordan with partial pivoting.
    let mut a = vec![vec![0.0; 2 * p]; p];
    for (i, row) in a.iter_mut().enumerate() {
        for j in 0..p {
            row[j] = x.iter().map(|r| r[i] * r[j]).sum();
        }
        row[p + i] = 1.0;
    }
    for c in 0..p {
        let piv = (c..p).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[piv][c].abs() < 1e-12 {
            return None;
        }
        a.swap(c, piv);
        let d = a[c][c];
        a[c].iter_mut().for_each(|v| *v /= d);
        for r in 0..p {
            if r != c {
                let f = a[r][c];
                let pivot_row = a[c].clone();
                a[r].iter_mut()
                    .zip(&pivot_row)
                    .for_each(|(v, pv)| *v -= f * pv);
            }
        }
    }
    let xty: Vec<f64> = (0..p)
        .map(|j| x.iter().zip(y).map(|(r, yi)| r[j] * yi).sum())
        .collect();
    let b: Vec<f64> = (0..p)
        .map(|i| (0..p).map(|j| a[i][p + j] * xty[j]).sum())
        .collect();
    let ssr: f64 = x
        .iter()
        .zip(y)
        .map(|(r, yi)| (yi - r.iter().zip(&b).map(|(v, c)| v * c).sum::<f64>()).powi(2))
        .sum();
    let s2 = ssr / (n - p) as f64;
    let half = (0..p)
        .map(|i| t95(n - p) * (s2 * a[i][p + i]).sqrt())
        .collect();
    Some((b, half))
}

fn interval(mean: f64, half: Option<f64>) -> Option<[f64; 2]> {
    half.map(|h| [mean - h, mean + h])
}

/// Design A′'s numbers per method: the near/far difference per direction, over directions
/// (primary) and over dimensions, the pole effect at fixed distance and the loss against token
/// KL. `Value::Null` without half-levels.
pub fn analyse(points: &[Point]) -> Value {
    if points.is_empty() {
        return Value::Null;
    }
    let methods: BTreeSet<&str> = points.iter().map(|p| p.method.as_str()).collect();
    let mut out = Vec::new();
    for method in methods {
        let of = |user: &str, half: Half| -> BTreeMap<u64, &Point> {
            points
                .iter()
                .filter(|p| p.method == method && p.user == user && p.half == half)
                .map(|p| (p.seed, p))
                .collect()
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mut directions = Vec::new();
        let mut diff_of: BTreeMap<&str, f64> = BTreeMap::new();
        // Per half-user, seed means: (|gap|, pole, loss, kl).
        let mut half_users = Vec::new();
        for user in USERS {
            let (near, far) = (of(user, Half::Near), of(user, Half::Far));
            for (h, runs) in [(Half::Near, &near), (Half::Far, &far)] {
                if runs.is_empty() {
                    continue;
                }
                let v: Vec<&&Point> = runs.values().collect();
                let kls: Vec<f64> = v.iter().filter_map(|p| p.kl).collect();
                half_users.push(json!({
                    "user": user,
                    "half": h.name(),
                    "seeds": runs.keys().collect::<Vec<_>>(),
                    "logp_gap": mean(&v.iter().map(|p| p.gap).collect::<Vec<_>>()),
                    "logp_gap_sum": v.iter().map(|p| p.gap_sum).collect::<Option<Vec<f64>>>().map(|s| mean(&s)),
                    "loss": mean(&v.iter().map(|p| p.loss).collect::<Vec<_>>()),
                    "kl_token": (kls.len() == v.len()).then(|| mean(&kls)),
                    "pole": bapo_data::synth::Dimension::of_pole(user).map(|(_, p)| p),
                }));
            }
            let shared: Vec<u64> = near
                .keys()
                .filter(|s| far.contains_key(s))
                .copied()
                .collect();
            if shared.is_empty() {
                continue;
            }
            let d: Vec<f64> = shared.iter().map(|s| far[s].loss - near[s].loss).collect();
            let g: Vec<f64> = shared.iter().map(|s| far[s].gap - near[s].gap).collect();
            diff_of.insert(user, mean(&d));
            directions.push(json!({
                "user": user,
                "seeds": shared,
                "loss_near": mean(&shared.iter().map(|s| near[s].loss).collect::<Vec<_>>()),
                "loss_far": mean(&shared.iter().map(|s| far[s].loss).collect::<Vec<_>>()),
                "far_minus_near": mean(&d),
                "gap_far_minus_near": mean(&g),
            }));
        }
        let diffs: Vec<f64> = diff_of.values().copied().collect();
        let primary = (!diffs.is_empty()).then(|| stat(&diffs));
        let ci = primary.as_ref().and_then(|s| interval(s.mean, s.ci95));
        // Mirrored directions share prompt sets: average them per dimension.
        let dims: Vec<f64> = USERS
            .chunks(2)
            .filter_map(|pair| Some((diff_of.get(pair[0])? + diff_of.get(pair[1])?) / 2.0))
            .collect();
        let by_dim = (!dims.is_empty()).then(|| stat(&dims));
        // Pole at fixed |gap|, and loss on token KL, over the half-users.
        let rows: Vec<(f64, f64, f64)> = half_users
            .iter()
            .filter_map(|h| {
                Some((
                    h["logp_gap"].as_f64()?.abs(),
                    h["pole"].as_u64()? as f64,
                    h["loss"].as_f64()?,
                ))
            })
            .collect();
        let pole = ols(
            &rows.iter().map(|r| vec![1.0, r.0, r.1]).collect::<Vec<_>>(),
            &rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        );
        let kl: Vec<(f64, f64)> = half_users
            .iter()
            .filter_map(|h| Some((h["kl_token"].as_f64()?, h["loss"].as_f64()?)))
            .collect();
        let kl_fit = super::heterogeneity::ols_slope(
            &kl.iter().map(|p| p.0).collect::<Vec<_>>(),
            &kl.iter().map(|p| p.1).collect::<Vec<_>>(),
        );
        let seeds = directions
            .iter()
            .filter_map(|d| d["seeds"].as_array().map(Vec::len))
            .min();
        out.push(json!({
            "method": method,
            "seeds": seeds,
            "directions": directions,
            "far_minus_near": primary.as_ref().map(|s| s.mean),
            "ci95": ci,
            "verdict": (method == "dpo").then(|| near_far_verdict(diffs.len(), ci)),
            "by_dimension": by_dim.as_ref().map(|s| json!({"n": s.n, "mean": s.mean, "ci95": interval(s.mean, s.ci95)})),
            "half_users": half_users,
            "pole_at_fixed_gap": pole.as_ref().map(|(b, h)| json!({
                "n": rows.len(), "intercept": b[0], "per_abs_gap": b[1], "pole1_minus_pole0": b[2],
                "ci95": [b[2] - h[2], b[2] + h[2]],
            })),
            "loss_on_kl": kl_fit.map(|(b, ci)| json!({"n": kl.len(), "slope": b, "ci95": ci})),
        }));
    }
    json!({
        "rules": {
            "primary": format!("per direction DPO's loss(far) − loss(near), seed-averaged; mean over the 6 directions with a t interval: reproduced above 0, reversed below 0, not reproduced within ±{NEAR_FAR_MARGIN} nats, else inconclusive"),
            "robustness": "the same over the 3 dimensions (mirrored directions averaged), reported, not judged",
            "secondary": "pole coefficient of loss ~ 1 + |logp_gap| + pole over the half-users; loss on token KL; described, not judged",
        },
        "methods": out,
    })
}

/// A Markdown section for [`analyse`]'s output (empty for `Null`).
pub fn markdown(doc: &Value) -> String {
    let Some(methods) = doc["methods"].as_array() else {
        return String::new();
    };
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:+.3}"));
    let ci = |v: &Value| match (v[0].as_f64(), v[1].as_f64()) {
        (Some(a), Some(b)) => format!("[{a:+.3}, {b:+.3}]"),
        _ => "-".into(),
    };
    let mut md = format!(
        "\n### Design A′: near and far halves of each user\n\n\
         Knowledge loss (nats, > 0: forgetting) on the far half minus the near half of each \
         user's pairs, averaged over the seeds both ran; the mean over directions with a t \
         interval (primary, declared margin ±{NEAR_FAR_MARGIN}).\n\n\
         | method | seeds | {} | mean over directions [95 % CI] | over dimensions [95 % CI] | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        USERS.join(" | ")
    );
    for m in methods {
        let per: Vec<String> = USERS
            .iter()
            .map(|u| {
                m["directions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|d| d["user"] == *u)
                    .map_or("-".into(), |d| f(&d["far_minus_near"]))
            })
            .collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} {} | {} {} | {} |\n",
            m["method"].as_str().unwrap_or("-"),
            m["seeds"],
            per.join(" | "),
            f(&m["far_minus_near"]),
            ci(&m["ci95"]),
            f(&m["by_dimension"]["mean"]),
            ci(&m["by_dimension"]["ci95"]),
            m["verdict"].as_str().unwrap_or("-"),
        ));
    }
    md.push_str(
        "\nSecondary (described, not judged): pole effect at fixed distance (loss ~ 1 + |logp_gap| + pole over the half-users) and loss per nat/token of KL.\n\n\
         | method | half-users | pole 1 − pole 0 [95 % CI] | loss per |logp_gap| | loss on token KL [95 % CI] |\n|---|---|---|---|---|\n",
    );
    for m in methods {
        let p = &m["pole_at_fixed_gap"];
        let k = &m["loss_on_kl"];
        md.push_str(&format!(
            "| {} | {} | {} {} | {} | {} {} |\n",
            m["method"].as_str().unwrap_or("-"),
            m["half_users"].as_array().map_or(0, Vec::len),
            f(&p["pole1_minus_pole0"]),
            ci(&p["ci95"]),
            f(&p["per_abs_gap"]),
            f(&k["slope"]),
            ci(&k["ci95"]),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_split_keeps_equal_halves_and_drops_the_middle_of_an_odd_count() {
        let g = [(1, 0.3), (2, -0.1), (3, 0.9), (4, 0.3), (5, -0.5)];
        let s = split_at_median(&g);
        assert_eq!(s.near, [2, 5].into());
        assert_eq!(
            s.far,
            [3, 4].into(),
            "tie at 0.3 broken by line: 1 is the median"
        );
        let s = split_at_median(&g[..4]);
        assert_eq!((s.near, s.far), ([1, 2].into(), [3, 4].into()));
        assert_eq!(split_at_median(&g[..4]).lines(Half::Far).len(), 2);
    }

    #[test]
    fn ols_matches_the_simple_slope_and_recovers_an_exact_fit() {
        let x = [0.0, 1.0, 2.0, 3.0, 5.0];
        let y = [1.0, 0.0, 1.0, 4.0, 4.5];
        let (b, h) = ols(&x.iter().map(|&v| vec![1.0, v]).collect::<Vec<_>>(), &y).unwrap();
        let (b1, ci) = super::super::heterogeneity::ols_slope(&x, &y).unwrap();
        let ci = ci.unwrap();
        assert!((b[1] - b1).abs() < 1e-12);
        assert!((h[1] - (ci[1] - ci[0]) / 2.0).abs() < 1e-9);
        // y = 2 + 3 a − 1.5 b exactly: coefficients back, zero width.
        let rows: Vec<Vec<f64>> = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (2.0, 1.0), (1.0, 1.0)]
            .iter()
            .map(|&(a, b)| vec![1.0, a, b])
            .collect();
        let y: Vec<f64> = rows.iter().map(|r| 2.0 + 3.0 * r[1] - 1.5 * r[2]).collect();
        let (b, h) = ols(&rows, &y).unwrap();
        for (got, want) in b.iter().zip([2.0, 3.0, -1.5]) {
            assert!((got - want).abs() < 1e-9, "{b:?}");
        }
        assert!(h.iter().all(|v| v.abs() < 1e-6));
        // A column repeated: singular.
        let sing: Vec<Vec<f64>> = x.iter().map(|&v| vec![1.0, v, v]).collect();
        assert!(ols(&sing, &y[..5]).is_none());
    }

    #[test]
    fn near_far_verdicts_follow_the_declared_rule() {
        assert!(near_far_verdict(5, Some([0.5, 1.0])).starts_with("undetermined"));
        assert!(near_far_verdict(6, Some([0.01, 1.0])).starts_with("reproduced"));
        assert!(near_far_verdict(6, Some([-1.0, -0.01])).starts_with("reversed"));
        assert_eq!(near_far_verdict(6, Some([-0.2, 0.24])), "not reproduced");
        assert_eq!(near_far_verdict(6, Some([-0.2, 0.3])), "inconclusive");
    }

    #[test]
    fn analyse_pairs_halves_on_shared_seeds_and_averages_directions() {
        let mut pts = Vec::new();
        for (i, u) in USERS.iter().enumerate() {
            for seed in 0..2u64 {
                for (h, loss) in [
                    (Half::Near, 0.5),
                    (Half::Far, 0.5 + 0.1 * i as f64 + seed as f64),
                ] {
                    pts.push(Point {
                        method: "dpo".into(),
                        user: u.to_string(),
                        half: h,
                        seed,
                        loss,
                        gap: if h == Half::Far { 0.4 } else { 0.1 },
                        gap_sum: None,
                        kl: Some(loss),
                    });
                }
            }
        }
        // A third seed of one half only: not paired.
        pts.push(Point {
            seed: 2,
            loss: 99.0,
            kl: Some(99.0),
            ..pts[0].clone()
        });
        let doc = analyse(&pts);
        let m = &doc["methods"][0];
        let d: Vec<f64> = m["directions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["far_minus_near"].as_f64().unwrap())
            .collect();
        // Direction i: (0.1 i + 0 + 0.1 i + 1) / 2 = 0.1 i + 0.5.
        for (i, v) in d.iter().enumerate() {
            assert!((v - (0.1 * i as f64 + 0.5)).abs() < 1e-12, "{d:?}");
        }
        assert!((m["far_minus_near"].as_f64().unwrap() - 0.75).abs() < 1e-12);
        assert!(
            m["verdict"].as_str().unwrap().starts_with("reproduced"),
            "{m}"
        );
        assert_eq!(m["by_dimension"]["n"], 3);
        // loss = kl exactly: slope 1.
        assert!((m["loss_on_kl"]["slope"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        assert!(markdown(&doc).contains("| dpo |"));
    }
}
