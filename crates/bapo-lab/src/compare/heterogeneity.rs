//! Design A's analysis: each user trained alone, a heterogeneity covariate per user, and the
//! rules declared in the README before the runs.
//!
//! - **Covariates** (from a finished run of the user's level and seed, over the pairs its
//!   optimiser steps drew — the training sampler replayed from the run's config): `logp_gap`,
//!   the mean over those pairs of the reference's per-token log-prob of the rejected answer
//!   minus the chosen one (> 0: the base model prefers what the user rejects); `measure_gap`, the
//!   mean move of the chosen answer away from the base model's own answer along the user's rule
//!   measure (words, grade, informality; > 0: toward the pole), and `rule_share`, the share of
//!   pairs whose chosen answer lies further toward the pole than the base answer.
//! - **Knowledge loss** = − the pooled chat-format gold-margin change against the base model
//!   (the primary endpoint, in nats; > 0: forgetting), averaged item by item over seeds, with a
//!   paired-bootstrap 95 % interval over items; the same against DPO; McNemar on the accuracy
//!   flips summed over seeds.
//! - **"BAPO prevents forgetting" for a user** (rules of 2026-12-06, one-sided since
//!   2026-12-08): toward-pole success not worse than DPO's by more than [`MATCH_MARGIN`] (the
//!   lower end of the Newcombe 95 % interval of the difference, answers pooled over the shared
//!   seeds), no loss against the base beyond [`PREVENT_MARGIN`] nats (the lower end of the
//!   change's interval ≥ −margin: non-inferiority, so a run that *gained* knowledge passes; the
//!   two-sided equivalence of 2026-12-06 failed such runs), and the difference to DPO's
//!   interval above 0.
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
/// Toward-pole success a method may lose against DPO and still count as matched: the
/// non-inferiority margin the difference's interval must clear.
pub const MATCH_MARGIN: f64 = 0.15;
/// Knowledge loss against the base (nats) a method may have and still count as not forgetting:
/// the non-inferiority margin the lower end of its change's interval must clear.
pub const PREVENT_MARGIN: f64 = 0.25;

/// Indices into a run's training examples of every pair its optimiser steps drew, with
/// multiplicity: the training loop's sampler replayed from the run's `train` config section.
pub fn trained_draws(n: usize, train: &Value) -> Result<Vec<usize>, String> {
    let get = |k: &str| {
        train[k]
            .as_u64()
            .ok_or_else(|| format!("config.json: field `train.{k}` is needed"))
    };
    let (seed, bs, accum, steps) = (
        get("seed")?,
        get("batch_size")? as usize,
        get("grad_accum")? as usize,
        get("max_steps")? as usize,
    );
    let mut sampler = bapo_train::train::Sampler::new(n, seed);
    Ok((0..steps * accum).flat_map(|_| sampler.next(bs)).collect())
}

/// Wilson score 95 % interval of `k` successes in `n`.
fn wilson(k: f64, n: f64) -> (f64, f64) {
    let z = 1.959_963_984_540_054_f64;
    let p = k / n;
    let d = 1.0 + z * z / n;
    let c = (p + z * z / (2.0 * n)) / d;
    let h = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / d;
    (c - h, c + h)
}

/// Newcombe's hybrid-score 95 % interval of `k1/n1 − k2/n2` (method 10 of Newcombe 1998).
pub fn newcombe(k1: f64, n1: f64, k2: f64, n2: f64) -> Option<[f64; 2]> {
    if n1 <= 0.0 || n2 <= 0.0 {
        return None;
    }
    let ((l1, u1), (l2, u2)) = (wilson(k1, n1), wilson(k2, n2));
    let (p1, p2) = (k1 / n1, k2 / n2);
    let d = p1 - p2;
    Some([
        d - ((p1 - l1).powi(2) + (u2 - p2).powi(2)).sqrt(),
        d + ((u1 - p1).powi(2) + (p2 - l2).powi(2)).sqrt(),
    ])
}

/// "prevents forgetting" or "not shown: …" from the toward-pole difference's interval (method −
/// DPO), the change against the base's and the difference to DPO's.
pub fn prevents_verdict(
    success: Option<[f64; 2]>,
    vs_base: Option<[f64; 2]>,
    vs_dpo: Option<[f64; 2]>,
) -> String {
    let mut why = Vec::new();
    match success {
        Some([lo, _]) if lo >= -MATCH_MARGIN => {}
        Some([lo, hi]) => why.push(format!(
            "toward-pole success vs DPO's [{:+.0}, {:+.0}] points: not within {:.0}",
            100.0 * lo,
            100.0 * hi,
            100.0 * MATCH_MARGIN
        )),
        None => why.push("no toward-pole success (eval.output_prompts = 0?)".into()),
    }
    match vs_base {
        Some([lo, _]) if lo >= -PREVENT_MARGIN => {}
        Some([lo, _]) => why.push(format!(
            "its change against the base may be a loss beyond {PREVENT_MARGIN} nats (interval \
             from {lo:+.2})"
        )),
        None => why.push("no change against the base".into()),
    }
    match vs_dpo {
        Some([lo, _]) if lo > 0.0 => {}
        _ => why.push("its difference to DPO includes 0 or is below".into()),
    }
    if why.is_empty() {
        "prevents forgetting".into()
    } else {
        format!("not shown: {}", why.join("; "))
    }
}

/// Held-out prompts a run answered greedily: the level's held-out pairs, up to the run's
/// `eval.output_prompts`.
fn answered(run: &Path, test: &Path) -> Option<f64> {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).ok()?).ok()?;
    let pairs = std::fs::read_to_string(test)
        .ok()?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    Some(pairs.min(cfg["eval"]["output_prompts"].as_u64()? as usize) as f64)
}

/// The reference log-probs of every training example of the run in `dir` (its
/// `reference_logps.cache.json`), in the run's training order.
pub(super) fn train_refs(dir: &Path) -> Result<Vec<bapo_train::train::ReferenceLogps>, RunError> {
    let cache = dir.join("reference_logps.cache.json");
    let text = std::fs::read_to_string(&cache).map_err(|e| RunError::file(&cache, e))?;
    let c: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", cache.display()))?;
    Ok(serde_json::from_value(c["train"].clone())
        .map_err(|e| format!("{}: field `train`: {e}", cache.display()))?)
}

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
    let refs = train_refs(dir)?;
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let config = dir.join("config.json");
    let cfg: Value =
        serde_json::from_str(&read(&config)?).map_err(|e| format!("{}: {e}", config.display()))?;
    let draws =
        trained_draws(refs.len(), &cfg["train"]).map_err(|e| format!("{}: {e}", dir.display()))?;
    let trained: Vec<_> = draws.iter().map(|&i| refs[i]).collect();
    let distinct: std::collections::BTreeSet<usize> = draws.iter().copied().collect();
    let mut out = json!({
        "user": user,
        "pairs": refs.len(),
        "trained_pairs": distinct.len(),
        "trained_draws": draws.len(),
        "logp_gap": bapo_run::per_user::logp_gap(&trained),
        "logp_gap_sum": bapo_run::per_user::logp_gap_sum(&trained),
        "logp_gap_drawn": bapo_run::per_user::logp_gap(&refs),
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
    // Over the trained draws, like the gap.
    let moves: Vec<f64> = draws
        .iter()
        .filter_map(|&i| moves.get(i).copied())
        .collect();
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
    // Design A′'s runs.
    let mut half_pts = Vec::new();
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
        // method → seed → toward-pole success, and held-out prompts answered per seed.
        let mut success: BTreeMap<&str, BTreeMap<u64, f64>> = BTreeMap::new();
        let mut prompts: BTreeMap<u64, f64> = BTreeMap::new();
        // method → seed → eval_kl/token.
        let mut kl: BTreeMap<&str, BTreeMap<u64, f64>> = BTreeMap::new();
        for r in &runs {
            if let Some((b, p)) = pooled(&r.dir)? {
                base.entry(r.seed).or_insert(b);
                items.entry(&r.method).or_default().insert(r.seed, p);
            }
            if let Some(s) = r.metrics.get("eval_personalisation/success") {
                success.entry(&r.method).or_default().insert(r.seed, *s);
            }
            if let Some(k) = r.metrics.get("eval_kl/token") {
                kl.entry(&r.method).or_default().insert(r.seed, *k);
            }
            if let Some(n) = answered(
                &r.dir,
                &data_dir(&spec.out, level, r.seed).join("test.jsonl"),
            ) {
                prompts.insert(r.seed, n);
            }
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        // Newcombe interval of `method`'s success minus DPO's, answers pooled over the seeds both
        // ran (like with like).
        let success_ci = |method: &str| {
            let (m, d) = (success.get(method)?, success.get("dpo")?);
            let (mut k1, mut k2, mut n) = (0.0, 0.0, 0.0);
            for (seed, s) in m {
                let (Some(ds), Some(ns)) = (d.get(seed), prompts.get(seed)) else {
                    continue;
                };
                k1 += (s * ns).round();
                k2 += (ds * ns).round();
                n += ns;
            }
            newcombe(k1, n, k2, n)
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
                if let Some(half) = level.half {
                    half_pts.push(super::halves::Point {
                        method: method.to_string(),
                        user: user.clone(),
                        half,
                        seed: *seed,
                        loss,
                        gap,
                        gap_sum: c["logp_gap_sum"].as_f64(),
                        kl: kl.get(method).and_then(|k| k.get(seed)).copied(),
                    });
                }
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
            let vs_dpo = match (*method != "dpo", items.get("dpo")) {
                (true, Some(d)) => paired_over_seeds(d, per_seed)?,
                _ => None,
            };
            let s_ci = success_ci(method);
            let verdict = vs_dpo
                .as_ref()
                .map(|d| prevents_verdict(s_ci, ci(&vs_base), ci(d)));
            methods.push(json!({
                "method": method,
                "seeds": per_seed.len(),
                "toward_pole_success": s,
                "toward_pole_vs_dpo_ci95": s_ci,
                "knowledge_loss": -vs_base["delta_margin"].as_f64().unwrap_or(f64::NAN),
                "vs_base": vs_base,
                "vs_dpo": vs_dpo,
                "verdict": verdict,
            }));
        }
        users.push(json!({
            "user": user,
            "level": level.name,
            "half": level.half.map(|h| h.name()),
            "logp_gap": mean_of("logp_gap"),
            "logp_gap_sum": mean_of("logp_gap_sum"),
            "logp_gap_drawn": mean_of("logp_gap_drawn"),
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
    let halves = super::halves::analyse(&half_pts);
    let doc = json!({
        "rules": {
            "endpoint": "knowledge loss = − pooled chat-format gold-margin change against the base model (nats), over the pairs the run trained on",
            "prevents_forgetting": format!("toward-pole success minus DPO's: Newcombe 95 % CI lower end ≥ −{MATCH_MARGIN}; change vs base CI lower end ≥ −{PREVENT_MARGIN} nats (one-sided: gains pass); difference to DPO CI above 0"),
            "slope": format!("DPO's loss on logp_gap: reproduced when the CI over ≥ {MIN_SEEDS} seeds lies above 0; not reproduced when within ±{EQUIVALENCE}"),
        },
        "users": users,
        "slopes": slopes,
        "design_a2": halves,
    });
    let md = markdown(&doc) + &super::halves::markdown(&doc["design_a2"]);
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
         | level | logp_gap | measure_gap | method | seeds | toward pole | Δ vs base [95 % CI] | Δ vs DPO [95 % CI] | lost / gained vs base (p) | verdict |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for u in doc["users"].as_array().into_iter().flatten() {
        for m in u["methods"].as_array().into_iter().flatten() {
            let mc = &m["vs_base"]["mcnemar"];
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} ({}) | {} |\n",
                u["level"].as_str().unwrap_or("-"),
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

    /// Newcombe's interval against a published example (Newcombe 1998, table II, 56/70 vs
    /// 48/80: −0.0524 to 0.3339), and the verdict's three conditions one at a time.
    #[test]
    fn newcombe_and_the_prevents_forgetting_rule() {
        let [lo, hi] = newcombe(56.0, 70.0, 48.0, 80.0).unwrap();
        assert!(
            (lo - 0.0524).abs() < 5e-4 && (hi - 0.3339).abs() < 5e-4,
            "{lo} {hi}"
        );
        assert!(newcombe(1.0, 0.0, 1.0, 2.0).is_none());
        let ok = prevents_verdict(Some([-0.1, 0.2]), Some([-0.2, 0.2]), Some([0.1, 0.5]));
        assert_eq!(ok, "prevents forgetting");
        let v = prevents_verdict(Some([-0.2, 0.2]), Some([-0.2, 0.2]), Some([0.1, 0.5]));
        assert!(v.contains("not within 15"), "{v}");
        // One-sided: an interval that reaches a loss beyond the margin fails however much of it
        // is near 0, and a run that gained knowledge (the whole interval above the margin)
        // passes: the two-sided rule of 2026-12-06 failed it.
        let v = prevents_verdict(Some([-0.1, 0.2]), Some([-0.4, 0.1]), Some([0.1, 0.5]));
        assert!(v.contains("a loss beyond 0.25"), "{v}");
        let gained = prevents_verdict(Some([-0.1, 0.2]), Some([0.3, 0.45]), Some([0.1, 0.5]));
        assert_eq!(gained, "prevents forgetting");
        let v = prevents_verdict(Some([-0.1, 0.2]), None, Some([0.1, 0.5]));
        assert!(v.contains("no change against the base"), "{v}");
        let v = prevents_verdict(Some([-0.1, 0.2]), Some([-0.2, 0.2]), Some([-0.1, 0.5]));
        assert!(v.contains("includes 0"), "{v}");
    }

    /// The covariate's pairs are the training loop's own draws: every drawn pair once when the
    /// budget equals the draw, a subset otherwise.
    #[test]
    fn trained_draws_replay_the_sampler() {
        let cfg =
            |steps: u64| json!({"seed": 3, "batch_size": 2, "grad_accum": 1, "max_steps": steps});
        let mut all = trained_draws(16, &cfg(8)).unwrap();
        all.sort();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        let some = trained_draws(24, &cfg(8)).unwrap();
        let distinct: std::collections::BTreeSet<_> = some.iter().collect();
        assert_eq!((some.len(), distinct.len()), (16, 16));
        assert!(some.iter().all(|&i| i < 24));
        let mut s = bapo_train::train::Sampler::new(24, 3);
        let direct: Vec<usize> = (0..8).flat_map(|_| s.next(2)).collect();
        assert_eq!(some, direct);
        assert!(trained_draws(4, &json!({"seed": 1}))
            .unwrap_err()
            .contains("batch_size"));
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
