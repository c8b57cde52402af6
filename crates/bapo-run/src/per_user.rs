//! `bapo train --per-user`: one adapter per user of the data file, in turn, into
//! `<output.dir>/users/<user>/`. The base responses and reference log-probs of every selected
//! user's prompts are computed once (cached in `<output.dir>/shared/` when every user of the
//! file is selected, else in `shared-<hash of the selection>/`) and looked up by each user's
//! run; each user's run is the same job as `data.users = [user]` alone, bit for bit.
//! `users_summary.json` (rewritten after every user) ends with one row per user.
//! `bapo eval --per-user` evaluates each user's adapter the same way and writes an index page.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::backend::AutodiffBackend;

use crate::checkpoint::latest_checkpoint;
use crate::config::RunConfig;
use crate::prepare::{prepare, split_data, Shared};
use crate::run::{run_job, Mode};
use bapo_train::io::{write_atomic, RunError};

/// `--shard i/n`: this process trains the users at positions i-1, i-1+n, i-1+2n, ... of the
/// sorted user list (1-based, like `cargo nextest --partition count:i/n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard `{s}`: expected i/n with 1 <= i <= n (e.g. 1/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// What `--per-user` trains.
#[derive(Debug, Clone, Default)]
pub struct PerUser {
    /// `--users a,b`: only these (each must occur in the data); default: every user.
    pub users: Option<Vec<String>>,
    pub shard: Option<Shard>,
    /// Skip users whose run finished; continue an interrupted one from its newest checkpoint.
    pub resume: bool,
}

/// Every `user` of the training file (sorted), each line of both files checked to have one.
pub fn users_of(run: &RunConfig) -> Result<Vec<String>, RunError> {
    let mut users = BTreeSet::new();
    let mut files = vec![&run.data.train];
    files.extend(&run.data.eval);
    for (i, file) in files.into_iter().enumerate() {
        for e in bapo_data::read_preferences(file)? {
            match e.user {
                Some(u) if i == 0 => {
                    users.insert(u);
                }
                Some(_) => {}
                None => {
                    return Err(format!(
                        "{}:{}: field `user` is missing; --per-user trains one adapter per \
                         `user`, so every pair needs one",
                        file.display(),
                        e.line
                    )
                    .into())
                }
            }
        }
    }
    Ok(users.into_iter().collect())
}

/// The users this process trains: `--users` (checked against the file), then `--shard`.
pub fn select(all: &[String], spec: &PerUser, file: &Path) -> Result<Vec<String>, RunError> {
    let mut users = match &spec.users {
        None => all.to_vec(),
        Some(want) => {
            for u in want {
                if !all.contains(u) {
                    return Err(format!(
                        "--users: no pair of {} has user `{u}` (its users: {})",
                        file.display(),
                        all.join(", ")
                    )
                    .into());
                }
            }
            all.iter().filter(|u| want.contains(u)).cloned().collect()
        }
    };
    if let Some(s) = spec.shard {
        users = users
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % s.count == s.index - 1)
            .map(|(_, u)| u)
            .collect();
    }
    Ok(users)
}

/// What to do for each user.
pub enum Job {
    /// Train (`bapo train --per-user`): `users_summary.json`.
    Train,
    /// Evaluate each user's adapter, as `bapo eval --adapter users/<user>/adapter` would, into
    /// `users/<user>/report.{json,html}`, with the retention gate when given; then
    /// `users_report.json` and the index `report.html` beside `users/`.
    Eval {
        gate: Option<bapo_eval::gate::GateSpec>,
    },
}

/// Trains (or evaluates) every selected user (see the module docs); returns the summary's
/// path. A user whose job fails is reported in the summary and the others still run; the
/// error then names every failed user. Ctrl-C stops at once (`--resume` continues).
pub fn run_per_user<B: AutodiffBackend>(
    run: &RunConfig,
    device: &B::Device,
    spec: &PerUser,
    job: Job,
) -> Result<PathBuf, RunError> {
    let all = users_of(run)?;
    let users = select(&all, spec, &run.data.train)?;
    if let Some(u) = &run.data.users {
        tracing::info!(config = ?u, "--per-user: data.users from the config is replaced by each user in turn");
    }
    let out = &run.output.dir;
    let tag = spec
        .shard
        .map(|s| format!("-{}-of-{}", s.index, s.count))
        .unwrap_or_default();
    let summary_path = match job {
        Job::Train => out.join(format!("users_summary{tag}.json")),
        Job::Eval { .. } => out.join(format!("users_report{tag}.json")),
    };
    tracing::info!(users = ?users, shard = ?spec.shard.map(|s| s.to_string()), "per user");
    let mut rows = Vec::new();
    if users.is_empty() {
        tracing::warn!("no user falls in this shard: nothing to train");
        write_summary(&summary_path, spec, &rows)?;
        return Ok(summary_path);
    }
    // Once for every selected user: base responses and reference log-probs, in `shared/`
    // when that is every user of the file, else in a directory named after the selection (so
    // no selection recomputes or overwrites another's).
    let mut shared_run = run.clone();
    shared_run.data.users = Some(users.clone());
    shared_run.output.dir = out.join(shared_dir_name(&users, &all));
    let shared = {
        let (_, p) = prepare::<B>(&shared_run, device, None)?;
        Shared::of(&shared_run, &p)
    };
    let mut failed = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let mut user_run = run.clone();
        user_run.data.users = Some(vec![user.clone()]);
        user_run.output.dir = out.join("users").join(user);
        let dir = user_run.output.dir.clone();
        let (_, train_ex, eval_ex) = split_data(&user_run)?;
        let mut row = serde_json::json!({
            "user": user,
            "dir": dir,
            "train_pairs": train_ex.len(),
            "eval_pairs": eval_ex.len(),
            "heterogeneity": heterogeneity(user, &train_ex, &run.data.train, &shared),
        });
        if let Job::Eval { gate } = &job {
            let outcome = eval_user::<B>(&user_run, device, gate.clone(), &shared);
            match outcome {
                Ok(metrics) => {
                    row["status"] = "evaluated".into();
                    row["metrics"] = metrics;
                }
                Err(e) => {
                    tracing::error!(user, error = %e, "evaluation failed; the next user goes on");
                    row["status"] = "failed".into();
                    row["error"] = e.to_string().into();
                    failed.push(user.clone());
                    // A failed gate still wrote the report: show its numbers.
                    if let Ok(m) = report_metrics(&dir.join("report.json")) {
                        row["metrics"] = m;
                    }
                }
            }
            rows.push(row);
            write_summary(&summary_path, spec, &rows)?;
            continue;
        }
        if spec.resume && finished(&dir, run.train.max_steps) {
            tracing::info!(user, "already trained: skipped (--resume)");
            row["status"] = "finished earlier".into();
        } else {
            let resume = spec.resume && latest_checkpoint(&dir).is_some();
            eprintln!(
                "user {}/{}: {user} ({} pairs{})",
                i + 1,
                users.len(),
                train_ex.len(),
                if resume { ", resuming" } else { "" }
            );
            let t0 = std::time::Instant::now();
            let res = run_job::<B>(&user_run, device, Mode::Train { resume }, Some(&shared));
            row["seconds"] = t0.elapsed().as_secs_f64().into();
            match res {
                Ok(_) => row["status"] = "trained".into(),
                Err(e) if bapo_train::train::stop_requested() => {
                    write_summary(&summary_path, spec, &rows)?;
                    return Err(format!("user {user}: {e}").into());
                }
                Err(e) => {
                    tracing::error!(user, error = %e, "training failed; the next user goes on");
                    row["status"] = "failed".into();
                    row["error"] = e.to_string().into();
                    failed.push(user.clone());
                }
            }
        }
        if row["status"] != "failed" {
            row["metrics"] = user_metrics(&dir)?;
        }
        rows.push(row);
        write_summary(&summary_path, spec, &rows)?;
    }
    eprintln!("{}", summary_table(&rows));
    if let Job::Eval { .. } = job {
        let index = out.join(format!("report{tag}.html"));
        write_atomic(
            &index,
            bapo_eval::html::index_page(&rows, &COLUMNS).as_bytes(),
        )?;
        tracing::info!(index = %index.display(), "per-user report written");
    }
    if !failed.is_empty() {
        let what = match job {
            Job::Train => "training",
            Job::Eval { .. } => "evaluation (or its retention gate)",
        };
        return Err(format!(
            "{what} failed for {} of {} users ({}); see {}",
            failed.len(),
            users.len(),
            failed.join(", "),
            summary_path.display()
        )
        .into());
    }
    Ok(summary_path)
}

/// `bapo eval` of one user's adapter (or fully fine-tuned model) into its directory; the
/// report's numbers for the summary.
fn eval_user<B: AutodiffBackend>(
    user_run: &RunConfig,
    device: &B::Device,
    gate: Option<bapo_eval::gate::GateSpec>,
    shared: &Shared,
) -> Result<serde_json::Value, RunError> {
    let dir = &user_run.output.dir;
    let adapter = ["adapter", "model"]
        .map(|d| dir.join(d))
        .into_iter()
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            format!(
                "{}: no adapter/ or model/ (train this user first: bapo train --per-user)",
                dir.display()
            )
        })?;
    let report = dir.join("report.json");
    let mode = Mode::Eval {
        adapter: Some(adapter),
        report: report.clone(),
        gate,
    };
    run_job::<B>(user_run, device, mode, Some(shared))?;
    report_metrics(&report)
}

/// The summary's numbers from a user's `report.json`: the personalised model's metrics of
/// [`COLUMNS`], the mean knowledge accuracy change, and whether the gate passed.
fn report_metrics(path: &Path) -> Result<serde_json::Value, RunError> {
    let text = std::fs::read_to_string(path).map_err(|e| RunError::file(path, e))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let mut m = serde_json::Map::new();
    for (_, k) in COLUMNS {
        if let Some(v) = doc["policy"].get(k).filter(|v| v.is_number()) {
            m.insert(k.into(), v.clone());
        }
    }
    let deltas: Vec<f64> = doc["knowledge"]["policy"]
        .as_object()
        .map(|o| o.values().filter_map(|s| s["delta_acc"].as_f64()).collect())
        .unwrap_or_default();
    if !deltas.is_empty() {
        let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
        m.insert("eval_knowledge/mean_delta_acc".into(), mean.into());
    }
    if let Some(p) = doc["gate"]["pass"].as_bool() {
        m.insert("gate/pass".into(), p.into());
    }
    Ok(m.into())
}

/// How far a user's preferences lie from what the base model already does, over the user's
/// training pairs: `logp_gap`, the mean of the reference's per-token log-prob of the rejected
/// answer minus the chosen one (> 0: the base model prefers what the user rejects); and, for a
/// user named after a pole (`concise`, ...), `measure_gap`, the mean move of the chosen answer
/// from the base model's own answer along the pole's measure (> 0: toward the pole; the base
/// answers are cut at `anchor.max_new_tokens`).
fn heterogeneity(
    user: &str,
    train_ex: &[bapo_data::PreferenceExample],
    file: &Path,
    shared: &Shared,
) -> serde_json::Value {
    let refs: Vec<bapo_train::train::ReferenceLogps> = train_ex
        .iter()
        .filter_map(|e| shared.reference(file, e.line).copied())
        .collect();
    let mut h = serde_json::json!({
        "pairs": refs.len(),
        "logp_gap": logp_gap(&refs),
    });
    if let Some((dim, pole)) = bapo_data::synth::Dimension::of_pole(user) {
        let moves: Vec<f64> = train_ex
            .iter()
            .filter_map(|e| {
                let base = shared.base_text(file, e.line)?;
                Some(dim.direction(pole) * (dim.measure(&e.chosen) - dim.measure(base)))
            })
            .collect();
        if !moves.is_empty() {
            h["measure_gap"] = (moves.iter().sum::<f64>() / moves.len() as f64).into();
        }
    }
    h
}

/// Mean over pairs of the per-token reference log-prob of rejected minus chosen.
pub fn logp_gap(refs: &[bapo_train::train::ReferenceLogps]) -> Option<f64> {
    if refs.is_empty() {
        return None;
    }
    Some(refs.iter().map(|r| r.mean[1] - r.mean[0]).sum::<f64>() / refs.len() as f64)
}

/// [`logp_gap`] on summed log-probs (what DPO with `train.normalisation = "sum"` trains on):
/// its sign can differ from the per-token gap's when one side is much longer.
pub fn logp_gap_sum(refs: &[bapo_train::train::ReferenceLogps]) -> Option<f64> {
    if refs.is_empty() {
        return None;
    }
    Some(refs.iter().map(|r| r.sum[1] - r.sum[0]).sum::<f64>() / refs.len() as f64)
}

/// `shared` for every user of the file, else `shared-<8 hex digits of the selection's hash>`.
fn shared_dir_name(users: &[String], all: &[String]) -> String {
    if users == all {
        return "shared".into();
    }
    use sha2::Digest;
    let h = sha2::Sha256::digest(users.join("\n").as_bytes());
    format!(
        "shared-{}",
        h[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// A user's run ended: its adapter (or model) is saved and metrics reach `max_steps`.
fn finished(dir: &Path, max_steps: usize) -> bool {
    let saved =
        dir.join("adapter/adapter_config.json").exists() || dir.join("model/config.json").exists();
    saved
        && last_row(&dir.join("metrics.jsonl"))
            .and_then(|r| r["step"].as_u64())
            .is_some_and(|s| s as usize == max_steps)
}

fn last_row(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

/// The summary's numbers for one user: the final evaluation's held-out preference accuracy
/// and margin, personalisation toward the user's pole, drift, and each knowledge set's and
/// format's accuracy change from the base model (`eval_base.json`), with their mean.
fn user_metrics(dir: &Path) -> Result<serde_json::Value, RunError> {
    let metrics = dir.join("metrics.jsonl");
    let last = last_row(&metrics).ok_or_else(|| format!("{}: no metrics", metrics.display()))?;
    let base_path = dir.join("eval_base.json");
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&base_path).map_err(|e| RunError::file(&base_path, e))?,
    )?;
    let mut m = serde_json::Map::new();
    for k in [
        "step",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_personalisation/success",
        "eval_personalisation/delta_measure",
        "eval_anchor_drift/mean",
        "eval_anchor/violation_rate",
        "eval_kl/token",
        "eval_weight_distance",
        "eval_output/delta_mean_length",
    ] {
        if let Some(v) = last.get(k).filter(|v| v.is_number()) {
            m.insert(k.into(), v.clone());
        }
    }
    let mut deltas = Vec::new();
    if let Some(obj) = last.as_object() {
        for (k, v) in obj {
            let Some(stem) = k.strip_suffix("/acc") else {
                continue;
            };
            if !stem.starts_with("eval_knowledge/") {
                continue;
            }
            if let (Some(a), Some(b)) = (v.as_f64(), base[k].as_f64()) {
                m.insert(format!("{stem}/delta_acc"), (a - b).into());
                deltas.push(a - b);
            }
            if let Some(d) = obj.get(&format!("{stem}/delta_margin")) {
                m.insert(format!("{stem}/delta_margin"), d.clone());
            }
        }
    }
    if !deltas.is_empty() {
        let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
        m.insert("eval_knowledge/mean_delta_acc".into(), mean.into());
    }
    Ok(m.into())
}

fn write_summary(path: &Path, spec: &PerUser, rows: &[serde_json::Value]) -> Result<(), RunError> {
    let doc = serde_json::json!({
        "shard": spec.shard.map(|s| s.to_string()),
        "users": rows,
    });
    write_atomic(path, serde_json::to_string_pretty(&doc)?.as_bytes())?;
    Ok(())
}

/// The summary's columns: heading and metric.
pub const COLUMNS: [(&str, &str); 6] = [
    ("pref. acc", "eval_rewards/accuracies"),
    ("margin", "eval_rewards/margins"),
    ("toward pole", "eval_personalisation/success"),
    ("Δ knowledge acc", "eval_knowledge/mean_delta_acc"),
    ("anchor drift", "eval_anchor_drift/mean"),
    ("KL/token", "eval_kl/token"),
];

/// The summary as a markdown table (printed at the end).
pub fn summary_table(rows: &[serde_json::Value]) -> String {
    let cols = COLUMNS;
    let mut s = String::from("| user | status | logp gap |");
    for (h, _) in cols {
        s.push_str(&format!(" {h} |"));
    }
    s.push_str(&format!("\n|---|---|---:|{}\n", "---:|".repeat(cols.len())));
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} |",
            r["user"].as_str().unwrap_or("?"),
            r["status"].as_str().unwrap_or("?"),
            r["heterogeneity"]["logp_gap"]
                .as_f64()
                .map_or("–".into(), |v| format!("{v:+.3}"))
        ));
        for (_, k) in cols {
            match r["metrics"][k].as_f64() {
                Some(v) => s.push_str(&format!(" {v:+.3} |")),
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logp_gap_is_the_mean_per_token_rejected_minus_chosen() {
        let r = |c: f64, rj: f64| bapo_train::train::ReferenceLogps {
            sum: [0.0; 3],
            mean: [c, rj, -1.0],
        };
        // (-1 - -3) and (-2 - -1): mean of +2 and -1.
        assert_eq!(logp_gap(&[r(-3.0, -1.0), r(-1.0, -2.0)]), Some(0.5));
        assert_eq!(logp_gap(&[]), None);
        // Summed form: a short chosen (-6 over 3 tokens) and a long rejected (-40 over 40):
        // per token the rejected is more likely (+1), summed far less likely (-34).
        let long = bapo_train::train::ReferenceLogps {
            sum: [-6.0, -40.0, -1.0],
            mean: [-2.0, -1.0, -1.0],
        };
        assert_eq!(logp_gap(std::slice::from_ref(&long)), Some(1.0));
        assert_eq!(logp_gap_sum(&[long]), Some(-34.0));
        assert_eq!(logp_gap_sum(&[]), None);
    }

    #[test]
    fn shards_partition_the_users_and_bad_specs_are_refused() {
        let all: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let mut seen = Vec::new();
        for i in 1..=3 {
            let spec = PerUser {
                shard: Some(format!("{i}/3").parse().unwrap()),
                ..Default::default()
            };
            seen.extend(select(&all, &spec, Path::new("f")).unwrap());
        }
        seen.sort();
        assert_eq!(seen, all);
        let spec = PerUser {
            shard: Some("2/3".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(select(&all, &spec, Path::new("f")).unwrap(), ["b", "e"]);
        for bad in ["0/2", "3/2", "2", "a/b", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let spec = PerUser {
            users: Some(vec!["c".into(), "zed".into()]),
            ..Default::default()
        };
        let e = select(&all, &spec, Path::new("f.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`zed`") && e.contains("f.jsonl"), "{e}");
    }
}
