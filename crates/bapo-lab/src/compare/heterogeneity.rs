//! Design A's analysis: each user trained alone, a heterogeneity covariate per user, and the
//! rules declared in the README before the runs.
//!
//! - **Covariates** (from a finished run of the user's level and seed): `logp_gap`, the mean over
//!   the user's training pairs of the reference's per-token log-prob of the rejected answer
//!   minus the chosen one (> 0: the base model prefers what the user rejects); `measure_gap`, the
//!   mean move of the chosen answer away from the base model's own answer along the user's rule
//!   measure (words, grade, informality; > 0: toward the pole), and `rule_share`, the share of
//!   pairs whose chosen answer lies further toward the pole than the base answer.
//! - **Knowledge loss** = − the pooled chat-format gold-margin change against the base model
//!   (the primary endpoint, in nats; > 0: forgetting), averaged item by item over seeds, with a
//!   paired-bootstrap 95 % interval over items; the same against DPO; McNemar on the accuracy
//!   flips summed over seeds.
//! - **"BAPO prevents forgetting" for a user**: toward-pole success at least DPO's − 5 points,
//!   the method's change against the base includes 0, and its difference to DPO excludes 0
//!   (above).
//! - **Heterogeneity slope**: per seed, the least-squares slope of each method's knowledge loss
//!   on `logp_gap` over the users (with its own t interval); over seeds, the mean slope and its
//!   Student-t interval. DPO's effect is "reproduced" when that interval lies above 0, "not
//!   reproduced" only when it lies within ±[`EQUIVALENCE`], and never judged from fewer than
//!   [`MIN_SEEDS`] seeds.

use std::collections::BTreeMap;
use std::path::Path;

use bapo_drift::paired::{bootstrap_ci95, BOOTSTRAP_REPS};
use serde_json::{json, Value};

use super::stats::{pooled_chat, read_items, stat, t95, SEED};
use super::{data_dir, CompareSpec, Level, RunResult};
use bapo_train::io::RunError;

/// The equivalence margin of the heterogeneity slope (nats of knowledge loss per nat of
/// `logp_gap`), declared before the runs.
pub const EQUIVALENCE: f64 = 0.05;
/// Seeds the slope's verdict needs.
pub const MIN_SEEDS: usize = 3;
/// Toward-pole success a method may lose against DPO and still count as matched.
pub const MATCH_POINTS: f64 = 0.05;

/// The user's covariates from the run in `dir` (trained on `train`); `None` before any run of
/// the level and seed has finished.
pub fn covariates(user: &str, dir: &Path, train: &Path) -> Result<Option<Value>, RunError> {
    let cache = dir.join("reference_logps.cache.json");
    let anchors = dir.join("anchors.jsonl");
    if !cache.exists() || !anchors.exists() {
        return Ok(None);
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| bapo_train::io::RunError::file(p, e));
    let c: Value =
        serde_json::from_str(&read(&cache)?).map_err(|e| format!("{}: {e}", cache.display()))?;
    let refs: Vec<bapo_train::train::ReferenceLogps> =
        serde_json::from_value(c["train"].clone())
            .map_err(|e| format!("{}: field `train`: {e}", cache.display()))?;
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mut out = json!({
        "user": user,
        "pairs": refs.len(),
        "logp_gap": bapo_run::per_user::logp_gap(&refs),
        "logp_gap_sum": bapo_run::per_user::logp_gap_sum(&refs),
    });
    let Some((dim, pole)) = bapo_data::synth::Dimension::of_pole(user) else {
        return Ok(Some(out));
    };
    let rows: Vec<Value> = read(train)?
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", train.display())))
        .collect::<Result<_, _>>()?;
    let mut moves = Vec::new();
    for (i, line) in read(&anchors)?.lines().enumerate() {
        let a: Value = serde_json::from_str(line)
            .map_err(|e| format!("{} line {}: {e}", anchors.display(), i + 1))?;
        let (Some(n), Some(base)) = (a["line"].as_u64(), a["base"].as_str()) else {
            return Err(format!(
                "{} line {}: fields `line` and `base` are needed",
                anchors.display(),
                i + 1
            )
            .into());
        };
        let chosen = rows
            .get(n as usize - 1)
            .and_then(|r| r["chosen"].as_str())
            .ok_or_else(|| format!("{} line {n}: no `chosen` answer", train.display()))?;
        moves.push(dim.direction(pole) * (dim.measure(chosen) - dim.measure(base)));
    }
    out["measure_gap"] = json!(mean(&moves));
    out["rule_share"] = json!(mean(
        &moves
            .iter()
            .map(|m| f64::from(*m > 0.0))
            .collect::<Vec<_>>()
    ));
    Ok(Some(out))
}

/// Least-squares slope of `y` on `x`, with its 95 % t interval (df = n − 2; `None` below 3
/// points or without spread in `x`).
pub fn ols_slope(x: &[f64], y: &[f64]) -> Option<(f64, Option<[f64; 2]>)> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let (mx, my) = (
        x[..n].iter().sum::<f64>() / n as f64,
        y[..n].iter().sum::<f64>() / n as f64,
    );
    let sxx: f64 = x[..n].iter().map(|a| (a - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = x[..n].iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let b = sxy / sxx;
    let ci = (n > 2).then(|| {
        let ssr: f64 = x[..n]
            .iter()
            .zip(y)
            .map(|(a, c)| (c - my - b * (a - mx)).powi(2))
            .sum();
        let se = (ssr / (n - 2) as f64 / sxx).sqrt();
        [b - t95(n - 2) * se, b + t95(n - 2) * se]
    });
    Some((b, ci))
}

/// The heterogeneity effect's verdict from the slope's interval over `seeds` seeds.
pub fn slope_verdict(seeds: usize, ci: Option<[f64; 2]>) -> String {
    match ci {
        _ if seeds < MIN_SEEDS => {
            format!("undetermined: {seeds} seed(s), the declared rule needs ≥ {MIN_SEEDS}")
        }
        Some([lo, _]) if lo > 0.0 => "reproduced".into(),
        Some([lo, hi]) if lo >= -EQUIVALENCE && hi <= EQUIVALENCE => "not reproduced".into(),
        Some(_) => "inconclusive".into(),
        None => "undetermined".into(),
    }
}

/// Per-item pooled chat-format margins and correctness of a run, and its base model's.
type Pooled = (Vec<(String, f64, bool)>, Vec<(String, f64, bool)>);
/// Seed → the pooled items of one run: (item id, gold margin, correct), in a fixed order.
type SeedItems = BTreeMap<u64, Vec<(String, f64, bool)>>;

fn pooled(dir: &Path) -> Result<Option<Pooled>, RunError> {
    if !dir.join("knowledge_items.json").exists() {
        return Ok(None);
    }
    let (base, policy) = read_items(dir)?;
    let f = |i: &super::stats::Items| {
        pooled_chat(i)
            .iter()
            .map(|r| (r.id.clone(), r.margin, r.correct))
            .collect::<Vec<_>>()
    };
    Ok(Some((f(&base), f(&policy))))
}

/// The means of `a` and of `b` over the seeds both have (`None` where none is shared).
fn shared_means(a: &BTreeMap<u64, f64>, b: &BTreeMap<u64, f64>) -> (Option<f64>, Option<f64>) {
    let shared: Vec<u64> = a.keys().filter(|s| b.contains_key(s)).copied().collect();
    let mean = |x: &BTreeMap<u64, f64>| {
        (!shared.is_empty()).then(|| shared.iter().map(|s| x[s]).sum::<f64>() / shared.len() as f64)
    };
    (mean(a), mean(b))
}

/// Whether two runs scored the same items in the same order; an error naming the seed and
/// the first item where they part otherwise (a pairing by position would be meaningless).
fn same_items(
    seed: u64,
    a: &[(String, f64, bool)],
    b: &[(String, f64, bool)],
) -> Result<(), RunError> {
    if let Some(i) =
        (0..a.len().max(b.len())).find(|&i| a.get(i).map(|x| &x.0) != b.get(i).map(|x| &x.0))
    {
        return Err(format!(
            "seed {seed}: knowledge items differ at position {i} ({:?} vs {:?}; {} vs {} items): \
             the runs cannot be paired",
            a.get(i).map(|x| &x.0),
            b.get(i).map(|x| &x.0),
            a.len(),
            b.len()
        )
        .into());
    }
    Ok(())
}

/// `b − a` per item, averaged over the seeds both have; the bootstrap interval of its mean,
/// and McNemar on the flips summed over those seeds. `None` when no seed is shared; an error
/// when a shared seed's runs scored different items.
fn paired_over_seeds(a: &SeedItems, b: &SeedItems) -> Result<Option<Value>, RunError> {
    let seeds: Vec<u64> = a.keys().filter(|s| b.contains_key(s)).copied().collect();
    let Some(first) = seeds.first() else {
        return Ok(None);
    };
    for s in &seeds {
        same_items(*s, &a[s], &b[s])?;
        same_items(*s, &a[first], &a[s])?;
    }
    let n = a[first].len();
    if n == 0 {
        return Ok(None);
    }
    let mut d = vec![0.0; n];
    let (mut lost, mut gained) = (0, 0);
    for s in &seeds {
        for (i, ((_, ma, ca), (_, mb, cb))) in a[s].iter().zip(&b[s]).enumerate() {
            d[i] += (mb - ma) / seeds.len() as f64;
            lost += usize::from(*ca && !*cb);
            gained += usize::from(!*ca && *cb);
        }
    }
    let mean = d.iter().sum::<f64>() / n as f64;
    Ok(Some(json!({
        "seeds": seeds,
        "items": n,
        "delta_margin": mean,
        "ci95": bootstrap_ci95(&d, BOOTSTRAP_REPS, SEED),
        "mcnemar": {"lost": lost, "gained": gained, "p": bapo_drift::gate::mcnemar_exact(lost, gained)},
    })))
}

fn ci(v: &Value) -> Option<[f64; 2]> {
    Some([v["ci95"][0].as_f64()?, v["ci95"][1].as_f64()?])
}

/// Design A's numbers: per user its covariates and, per method, toward-pole success and
/// knowledge change against the base and against DPO with the verdict; per method the
/// heterogeneity slope. Returns the JSON and a Markdown section (empty without solo levels).
pub fn analyse(spec: &CompareSpec, results: &[RunResult]) -> Result<(Value, String), RunError> {
    let solo: Vec<&Level> = spec.levels.iter().filter(|l| l.is_solo()).collect();
    if solo.is_empty() || results.is_empty() {
        return Ok((Value::Null, String::new()));
    }
    let mut users = Vec::new();
    // method → seed → (user, logp_gap, loss)
    let mut slope_pts: BTreeMap<String, BTreeMap<u64, Vec<(f64, f64)>>> = BTreeMap::new();
    for level in &solo {
        let user = &level.users[0];
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.level == level.name).collect();
        let mut cov = BTreeMap::new();
        for &seed in &spec.seeds {
            let train = data_dir(&spec.out, level, seed).join("train.jsonl");
            if let Some(r) = runs.iter().find(|r| r.seed == seed) {
                if let Some(c) = covariates(user, &r.dir, &train)? {
                    cov.insert(seed, c);
                }
            }
        }
        let mean_of = |k: &str| {
            let v: Vec<f64> = cov.values().filter_map(|c| c[k].as_f64()).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        // method → seed → items; the base model's items per seed.
        let mut items: BTreeMap<&str, SeedItems> = BTreeMap::new();
        let mut base: SeedItems = BTreeMap::new();
        // method → seed → toward-pole success.
        let mut success: BTreeMap<&str, BTreeMap<u64, f64>> = BTreeMap::new();
        for r in &runs {
            if let Some((b, p)) = pooled(&r.dir)? {
                base.entry(r.seed).or_insert(b);
                items.entry(&r.method).or_default().insert(r.seed, p);
            }
            if let Some(s) = r.metrics.get("eval_personalisation/success") {
                success.entry(&r.method).or_default().insert(r.seed, *s);
            }
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        // Mean success of `method` and of DPO over the seeds both ran (the matched-
        // personalisation check compares like with like).
        let success_pair = |method: &str| match (success.get(method), success.get("dpo")) {
            (Some(m), Some(d)) => shared_means(m, d),
            (m, _) => (
                m.and_then(|m| mean(&m.values().copied().collect::<Vec<_>>())),
                None,
            ),
        };
        let mut methods = Vec::new();
        for (method, per_seed) in &items {
            let Some(vs_base) = paired_over_seeds(&base, per_seed)? else {
                continue;
            };
            for (seed, p) in per_seed {
                let (Some(b), Some(c)) = (base.get(seed), cov.get(seed)) else {
                    continue;
                };
                let (Some(gap), n) = (c["logp_gap"].as_f64(), p.len().max(1)) else {
                    continue;
                };
                same_items(*seed, b, p)?;
                let loss = -p.iter().zip(b).map(|(x, y)| x.1 - y.1).sum::<f64>() / n as f64;
                slope_pts
                    .entry(method.to_string())
                    .or_default()
                    .entry(*seed)
                    .or_default()
                    .push((gap, loss));
            }
            let s = success
                .get(method)
                .and_then(|v| mean(&v.values().copied().collect::<Vec<_>>()));
            let (s_shared, dpo_success) = success_pair(method);
            let vs_dpo = match (*method != "dpo", items.get("dpo")) {
                (true, Some(d)) => paired_over_seeds(d, per_seed)?,
                _ => None,
            };
            let verdict = vs_dpo.as_ref().map(|d| {
                let mut why = Vec::new();
                match (s_shared, dpo_success) {
                    (Some(s), Some(ds)) if s >= ds - MATCH_POINTS => {}
                    (Some(s), Some(ds)) => why.push(format!(
                        "toward-pole success {:.0} % vs DPO's {:.0} %: not matched",
                        100.0 * s,
                        100.0 * ds
                    )),
                    _ => why.push("no toward-pole success (eval.output_prompts = 0?)".into()),
                }
                match ci(&vs_base) {
                    Some([lo, hi]) if lo <= 0.0 && hi >= 0.0 => {}
                    _ => why.push("its change against the base excludes 0".into()),
                }
                match ci(d) {
                    Some([lo, _]) if lo > 0.0 => {}
                    _ => why.push("its difference to DPO includes 0 or is below".into()),
                }
                if why.is_empty() {
                    "prevents forgetting".to_string()
                } else {
                    format!("not shown: {}", why.join("; "))
                }
            });
            methods.push(json!({
                "method": method,
                "seeds": per_seed.len(),
                "toward_pole_success": s,
                "knowledge_loss": -vs_base["delta_margin"].as_f64().unwrap_or(f64::NAN),
                "vs_base": vs_base,
                "vs_dpo": vs_dpo,
                "verdict": verdict,
            }));
        }
        users.push(json!({
            "user": user,
            "level": level.name,
            "logp_gap": mean_of("logp_gap"),
            "logp_gap_sum": mean_of("logp_gap_sum"),
            "measure_gap": mean_of("measure_gap"),
            "rule_share": mean_of("rule_share"),
            "covariates_per_seed": cov,
            "methods": methods,
        }));
    }
    let mut slopes = Vec::new();
    for (method, per_seed) in &slope_pts {
        let mut seed_slopes = Vec::new();
        for (seed, pts) in per_seed {
            let (x, y): (Vec<f64>, Vec<f64>) = pts.iter().copied().unzip();
            if let Some((b, ci)) = ols_slope(&x, &y) {
                seed_slopes.push(json!({"seed": seed, "users": pts.len(), "slope": b, "ci95": ci}));
            }
        }
        let b: Vec<f64> = seed_slopes
            .iter()
            .filter(|s| s["users"].as_u64() >= Some(3))
            .filter_map(|s| s["slope"].as_f64())
            .collect();
        let st = (!b.is_empty()).then(|| stat(&b));
        let ci = st
            .as_ref()
            .and_then(|s| s.ci95.map(|h| [s.mean - h, s.mean + h]));
        slopes.push(json!({
            "method": method,
            "per_seed": seed_slopes,
            "mean_slope": st.as_ref().map(|s| s.mean),
            "ci95": ci,
            "verdict": (method == "dpo").then(|| slope_verdict(b.len(), ci)),
        }));
    }
    let doc = json!({
        "rules": {
            "endpoint": "knowledge loss = − pooled chat-format gold-margin change against the base model (nats)",
            "prevents_forgetting": format!("toward-pole success ≥ DPO's − {MATCH_POINTS}, change vs base CI includes 0, difference to DPO CI above 0"),
            "slope": format!("DPO's loss on logp_gap: reproduced when the CI over ≥ {MIN_SEEDS} seeds lies above 0; not reproduced when within ±{EQUIVALENCE}"),
        },
        "users": users,
        "slopes": slopes,
    });
    let md = markdown(&doc);
    super::figures::design_a(spec, results, &doc)?;
    Ok((doc, md))
}

fn markdown(doc: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:+.3}"));
    let p = |v: &Value| {
        v.as_f64()
            .map_or("-".into(), |x| format!("{:.0} %", 100.0 * x))
    };
    let c = |v: &Value| match ci(v) {
        Some([lo, hi]) => format!("{} [{lo:+.3}, {hi:+.3}]", f(&v["delta_margin"])),
        None => "-".into(),
    };
    let mut md = String::from(
        "\n### Design A: each user alone, no profile turn\n\n\
         Knowledge change = pooled chat-format gold-margin change (nats; < 0: forgetting), \
         averaged item by item over seeds, paired-bootstrap 95 % interval; McNemar on the \
         accuracy flips summed over seeds.\n\n\
         | user | logp_gap | measure_gap | method | seeds | toward pole | Δ vs base [95 % CI] | Δ vs DPO [95 % CI] | lost / gained vs base (p) | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for u in doc["users"].as_array().into_iter().flatten() {
        for m in u["methods"].as_array().into_iter().flatten() {
            let mc = &m["vs_base"]["mcnemar"];
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} ({}) | {} |\n",
                u["user"].as_str().unwrap_or("-"),
                f(&u["logp_gap"]),
                f(&u["measure_gap"]),
                m["method"].as_str().unwrap_or("-"),
                m["seeds"],
                p(&m["toward_pole_success"]),
                c(&m["vs_base"]),
                c(&m["vs_dpo"]),
                mc["lost"],
                mc["gained"],
                mc["p"].as_f64().map_or("-".into(), |x| format!("{x:.3}")),
                m["verdict"].as_str().unwrap_or("-"),
            ));
        }
    }
    md.push_str(
        "\nHeterogeneity slope: knowledge loss (nats) per nat of `logp_gap`, least squares over \
         the users of each seed; the interval is Student-t over seeds.\n\n\
         | method | slope per seed [95 % CI, n − 2 df] | mean slope [95 % CI over seeds] | verdict |\n\
         |---|---|---|---|\n",
    );
    for s in doc["slopes"].as_array().into_iter().flatten() {
        let per: Vec<String> = s["per_seed"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| match ci(x) {
                Some([lo, hi]) => format!("{} [{lo:+.3}, {hi:+.3}]", f(&x["slope"])),
                None => f(&x["slope"]),
            })
            .collect();
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            s["method"].as_str().unwrap_or("-"),
            per.join("; "),
            match ci(s) {
                Some([lo, hi]) => format!("{} [{lo:+.3}, {hi:+.3}]", f(&s["mean_slope"])),
                None => f(&s["mean_slope"]),
            },
            s["verdict"].as_str().unwrap_or("-"),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ols_slope_and_its_interval() {
        let x = [0.0, 1.0, 2.0, 3.0];
        let (b, ci) = ols_slope(&x, &[1.0, 3.0, 5.0, 7.0]).unwrap();
        assert!((b - 2.0).abs() < 1e-12);
        let [lo, hi] = ci.unwrap();
        assert!(
            (lo - 2.0).abs() < 1e-9 && (hi - 2.0).abs() < 1e-9,
            "exact fit: zero width"
        );
        // y = x + e, e = [1, -1, -1, 1]: b = 1, SSR = 4, Sxx = 5, se = sqrt(4 / 2 / 5).
        let (b, ci) = ols_slope(&x, &[1.0, 0.0, 1.0, 4.0]).unwrap();
        assert!((b - 1.0).abs() < 1e-12);
        let half = 4.303 * (0.4f64).sqrt();
        assert!((ci.unwrap()[1] - 1.0 - half).abs() < 1e-9);
        assert!(
            ols_slope(&[1.0, 1.0], &[0.0, 1.0]).is_none(),
            "no spread in x"
        );
        assert!(ols_slope(&[0.0, 1.0], &[0.0, 1.0]).unwrap().1.is_none());
    }

    #[test]
    fn slope_verdicts_follow_the_declared_rule() {
        assert!(slope_verdict(1, Some([0.1, 0.2])).starts_with("undetermined"));
        assert_eq!(slope_verdict(3, Some([0.01, 0.3])), "reproduced");
        assert_eq!(slope_verdict(3, Some([-0.04, 0.04])), "not reproduced");
        assert_eq!(slope_verdict(3, Some([-0.04, 0.06])), "inconclusive");
    }

    /// The matched-personalisation check compares a method with DPO on the seeds both ran.
    #[test]
    fn success_is_compared_on_shared_seeds() {
        let bapo: BTreeMap<u64, f64> = [(0, 0.5), (1, 0.7)].into();
        let dpo: BTreeMap<u64, f64> = [(0, 0.6), (1, 0.8), (2, 0.1)].into();
        let (a, b) = shared_means(&bapo, &dpo);
        assert!((a.unwrap() - 0.6).abs() < 1e-12);
        assert!(
            (b.unwrap() - 0.7).abs() < 1e-12,
            "seed 2 is DPO's alone: left out"
        );
        assert_eq!(shared_means(&bapo, &[(5, 1.0)].into()), (None, None));
    }

    #[test]
    fn paired_over_seeds_averages_items_and_sums_flips() {
        let it = |v: [(f64, bool); 2]| -> Vec<(String, f64, bool)> {
            v.iter()
                .enumerate()
                .map(|(i, &(m, c))| (format!("capitals/{i}"), m, c))
                .collect()
        };
        let a: SeedItems = [
            (0, it([(1.0, true), (0.0, false)])),
            (1, it([(1.0, true), (0.0, false)])),
        ]
        .into();
        let mut b: SeedItems = [
            (0, it([(0.0, false), (1.0, true)])),
            (1, it([(2.0, true), (0.0, false)])),
            (2, it([(9.0, true), (9.0, true)])),
        ]
        .into();
        let v = paired_over_seeds(&a, &b).unwrap().unwrap();
        assert_eq!(v["seeds"], json!([0, 1]), "only the seeds both have");
        // Item 0: (-1 + 1) / 2 = 0; item 1: (1 + 0) / 2 = 0.5.
        assert!((v["delta_margin"].as_f64().unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(v["mcnemar"]["lost"], 1);
        assert_eq!(v["mcnemar"]["gained"], 1);
        // Same lengths, other items (reordered): an error naming the seed, not a pairing.
        b.get_mut(&1).unwrap().swap(0, 1);
        let e = paired_over_seeds(&a, &b).unwrap_err().to_string();
        assert!(e.contains("seed 1") && e.contains("capitals/0"), "{e}");
        // Disjoint seeds: nothing to pair.
        let c: SeedItems = [(7, it([(0.0, true), (0.0, true)]))].into();
        assert!(paired_over_seeds(&a, &c).unwrap().is_none());
    }
}
