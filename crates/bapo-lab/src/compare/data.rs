//! Each level's training and held-out files for one seed: the level's users' pairs, balanced
//! round-robin over users when capped, each user's training pairs drawn by the seed (the
//! held-out pairs are the same for every seed, so seeds compare on the same items); each prompt
//! turned into `[system: profile, user: prompt]` when the level carries profiles; on a
//! `disjoint` level every prompt goes to one user only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::halves::Split;
use super::{profile, CompareSpec, Level};
use bapo_train::io::{write_atomic, RunError};

/// SplitMix64 of `(seed, x)`: a seeded sort key, the same on every machine.
fn mix(seed: u64, x: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(x)
        .wrapping_add(0x6a09_e667_f3bc_c909);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a prompt: which user a prompt goes to on a disjoint level.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The rows of `src` that belong to `level`, per user in file order (prompts still plain);
/// with `keep`, only those lines (1-based) of the file.
fn rows_by_user(
    level: &Level,
    src: &Path,
    keep: Option<&std::collections::BTreeSet<usize>>,
) -> Result<BTreeMap<String, Vec<Value>>, RunError> {
    let text = std::fs::read_to_string(src).map_err(|e| bapo_train::io::RunError::file(src, e))?;
    let mut by_user: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", src.display(), i + 1);
        let row: Value = serde_json::from_str(line).map_err(|e| format!("{}: {e}", at()))?;
        let Some(user) = row.get("user").and_then(Value::as_str) else {
            return Err(format!("{}: field `user` is missing", at()).into());
        };
        if !level.users.iter().any(|u| u == user) || keep.is_some_and(|k| !k.contains(&(i + 1))) {
            continue;
        }
        if !matches!(row.get("prompt"), Some(Value::String(_))) {
            return Err(format!("{}: field `prompt` must be a string here", at()).into());
        }
        by_user.entry(user.to_string()).or_default().push(row);
    }
    for u in &level.users {
        if !by_user.contains_key(u) {
            return Err(format!(
                "{}: level `{}` needs user `{u}`, which has no pair (build the data with `cargo xtask data --dimension informativeness --dimension expertise --dimension style`)",
                src.display(),
                level.name
            )
            .into());
        }
    }
    if level.disjoint {
        // Each prompt to one user, by its hash: opposing users never see the same prompt.
        let n = level.users.len() as u64;
        for (k, u) in level.users.iter().enumerate() {
            if let Some(rows) = by_user.get_mut(u) {
                rows.retain(|r| fnv(r["prompt"].as_str().unwrap_or_default()) % n == k as u64);
            }
        }
    }
    Ok(by_user)
}

/// Up to `cap` rows, round-robin over users (in the level's order).
fn balanced(
    level: &Level,
    mut by_user: BTreeMap<String, Vec<Value>>,
    cap: Option<usize>,
) -> Vec<Value> {
    let total: usize = by_user.values().map(Vec::len).sum();
    let cap = cap.unwrap_or(total).min(total);
    let mut iters: Vec<_> = level
        .users
        .iter()
        .filter_map(|u| by_user.remove(u))
        .map(Vec::into_iter)
        .collect();
    let mut rows = Vec::with_capacity(cap);
    while rows.len() < cap {
        for it in iters.iter_mut() {
            if let Some(r) = it.next() {
                if rows.len() < cap {
                    rows.push(r);
                }
            }
        }
    }
    rows
}

/// Writes `dir/{train,test}.jsonl` for `level` and `seed`; returns their paths. A design-A′
/// level's training pairs come from its half of `split` (its user's; an error without one).
pub(super) fn level_data(
    level: &Level,
    seed: u64,
    (train, eval): (&Path, &Path),
    dir: &Path,
    spec: &CompareSpec,
    split: Option<&Split>,
) -> Result<(PathBuf, PathBuf), RunError> {
    std::fs::create_dir_all(dir)?;
    let keep = match (level.half, split) {
        (None, _) => None,
        (Some(h), Some(s)) => Some(s.lines(h)),
        (Some(_), None) => {
            return Err(format!("level `{}` needs a split of its user's pairs", level.name).into())
        }
    };
    let mut paths = Vec::new();
    for (src, name, cap, draw) in [
        (train, "train.jsonl", spec.max_train_pairs, true),
        (eval, "test.jsonl", spec.max_eval_pairs, false),
    ] {
        let mut by_user = rows_by_user(level, src, if draw { keep } else { None })?;
        if draw {
            // The seed draws which of a user's training pairs are kept (and their order).
            for rows in by_user.values_mut() {
                let mut keyed: Vec<(u64, Value)> = std::mem::take(rows)
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| (mix(seed, i as u64), r))
                    .collect();
                keyed.sort_by_key(|(k, _)| *k);
                *rows = keyed.into_iter().map(|(_, r)| r).collect();
            }
        }
        let mut out = String::new();
        for mut r in balanced(level, by_user, cap) {
            if level.profile {
                let user = r["user"].as_str().unwrap_or_default().to_string();
                let prompt = r["prompt"].clone();
                r["prompt"] = json!([
                    {"role": "system", "content": profile(&user)},
                    {"role": "user", "content": prompt},
                ]);
            }
            out.push_str(&serde_json::to_string(&r)?);
            out.push('\n');
        }
        let path = dir.join(name);
        write_atomic(&path, out.as_bytes())?;
        paths.push(path);
    }
    Ok((paths[0].clone(), paths[1].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn level(name: &str, users: &[&str], profile: bool, disjoint: bool) -> Level {
        Level {
            name: name.into(),
            users: users.iter().map(|u| u.to_string()).collect(),
            profile,
            disjoint,
            half: None,
        }
    }

    #[test]
    fn level_data_balances_users_draws_by_seed_and_adds_profiles() {
        let dir = std::env::temp_dir().join(format!("bapo-compare-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.jsonl");
        let row = |u: &str, i: usize| {
            json!({"prompt": format!("q{i}"), "chosen": "a", "rejected": "b", "user": u})
                .to_string()
        };
        let lines: Vec<String> = (0..6)
            .map(|i| row("concise", i))
            .chain((0..6).map(|i| row("detailed", i)))
            .chain([row("child", 9)])
            .collect();
        std::fs::write(&src, lines.join("\n")).unwrap();
        let two = level("two", &["concise", "detailed"], true, false);
        let mut spec = CompareSpec {
            levels: vec![two.clone()],
            methods: super::super::default_methods(),
            seeds: vec![0],
            out: dir.clone(),
            max_train_pairs: Some(3),
            max_eval_pairs: None,
            overrides: vec![],
            report_only: false,
        };
        let (train, eval) =
            level_data(&two, 0, (&src, &src), &dir.join("d0"), &spec, None).unwrap();
        let t = read(&train);
        let users: Vec<&str> = t.iter().map(|r| r["user"].as_str().unwrap()).collect();
        assert_eq!(users, ["concise", "detailed", "concise"]);
        assert_eq!(t[1]["prompt"][0]["role"], "system");
        assert_eq!(t[1]["prompt"][0]["content"], profile("detailed"));
        let e = read(&eval);
        assert_eq!(e.len(), 12, "uncapped: every pair of the level's users");
        assert_eq!(
            e[0]["prompt"][1]["content"], "q0",
            "held-out pairs keep file order"
        );
        // Another seed draws other training pairs; the same seed the same ones.
        let prompts = |s: u64, d: &str| -> Vec<Value> {
            let (t, _) = level_data(&two, s, (&src, &src), &dir.join(d), &spec, None).unwrap();
            read(&t)
                .iter()
                .map(|r| r["prompt"][1]["content"].clone())
                .collect()
        };
        assert_eq!(prompts(0, "d0b"), prompts(0, "d0c"));
        assert!((1..6).any(|s| prompts(s, "ds") != prompts(0, "d0b")));
        // No profile: the plain prompt stays.
        let plain = level("plain", &["concise"], false, false);
        let (t, _) = level_data(&plain, 0, (&src, &src), &dir.join("p"), &spec, None).unwrap();
        assert!(read(&t)[0]["prompt"].is_string());
        // Disjoint: no prompt goes to both users.
        spec.max_train_pairs = None;
        let disj = level("disj", &["concise", "detailed"], true, true);
        let (t, _) = level_data(&disj, 0, (&src, &src), &dir.join("x"), &spec, None).unwrap();
        let t = read(&t);
        let of = |u: &str| -> Vec<Value> {
            t.iter()
                .filter(|r| r["user"] == u)
                .map(|r| r["prompt"][1]["content"].clone())
                .collect()
        };
        let (c, d) = (of("concise"), of("detailed"));
        assert_eq!(c.len() + d.len(), 6, "each of the 6 prompts once");
        assert!(c.iter().all(|p| !d.contains(p)));
        let missing = level("x", &["formal"], true, false);
        let err = level_data(&missing, 0, (&src, &src), &dir.join("e"), &spec, None).unwrap_err();
        assert!(err.to_string().contains("needs user `formal`"), "{err}");
        // A design-A′ half: training pairs from its lines only; held-out pairs all of them.
        let far = Level {
            half: Some(super::super::Half::Far),
            ..level("far_concise", &["concise"], false, false)
        };
        let split = Split {
            near: [1, 2].into(),
            far: [4, 6].into(),
        };
        let (t, e) =
            level_data(&far, 0, (&src, &src), &dir.join("h"), &spec, Some(&split)).unwrap();
        let mut got: Vec<String> = read(&t)
            .iter()
            .map(|r| r["prompt"].as_str().unwrap().to_string())
            .collect();
        got.sort();
        assert_eq!(got, ["q3", "q5"], "lines 4 and 6 hold q3 and q5");
        assert_eq!(read(&e).len(), 6, "every held-out pair of the user");
        let err = level_data(&far, 0, (&src, &src), &dir.join("h2"), &spec, None).unwrap_err();
        assert!(err.to_string().contains("needs a split"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
