//! `cargo xtask data knowledge`: rebuilds `data/knowledge/` (multiple-choice knowledge sets and
//! held-out alignment pairs) from pinned packages. Every item has the same shape:
//! `{"id", "context", "question", "choices", "gold": [indices], "source"}` (BIG-bench
//! marks several options correct now and then: any of them counts): `context` is the raw-completion
//! prefix each `" " + choice` is scored after; `question` is the user turn of the chat format.
//!
//! - `capitals.jsonl`: Debian `bsdgames` 2.17-29 `quiz/{europe,asia,africa,america}` (BSD),
//!   country → capital, 4 choices: the gold capital and 3 distractors drawn from the same
//!   file (seeded), in a seeded order.
//! - `general_knowledge.jsonl`: BIG-bench `general_knowledge` (Apache-2.0; PyPI
//!   `bigbench==1.0.0` sdist), every listed option a choice.
//! - `mmlu.jsonl`: the MMLU slice in PyPI `evals==3.0.1.post1`
//!   (`sandbagging/samples-all.jsonl`, MIT): lm-eval's MMLU format, choices are the letters.
//! - `hhh_alignment.jsonl`: BIG-bench `hhh_alignment` (evaluation only: the files carry
//!   BIG-bench's no-training canary) as two-way items, the preferred response first: as in
//!   BIG-bench's `multiple_choice_grade`, the model should find it the more likely answer.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{cache_dir, fetch_member, root, run, sha256, write_atomic, Pinned};

const BIGBENCH: Pinned = Pinned {
    spec: "bigbench==1.0.0",
    file: "bigbench-1.0.0.tar.gz",
    sha256: "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    sdist: true,
};
const BSDGAMES_DEB: &str = "bsdgames_2.17-29+b1_amd64.deb";
const BSDGAMES_SHA256: &str = "cc92de974a1f66623a05ac0aed6dc790f682e5aac5205f0210294744d1532d10";

/// Pinned members: (archive member, cache name, sha256).
const GK: (&str, &str, &str) = (
    "bigbench-1.0.0/bigbench/benchmark_tasks/general_knowledge/task.json",
    "bigbench-1.0.0/general_knowledge.json",
    "7d8f07136b3539d5555f0452355fed441d94f02edf730745a772f2c612ce3445",
);
/// hhh_alignment categories and their task.json sha256.
const HHH: [(&str, &str); 4] = [
    (
        "harmless",
        "4720acbc916cc18413e48c6bb55c19af73400436a6304c7e110b8bb40f8952a1",
    ),
    (
        "helpful",
        "1bd2a58d9bb17b26af4806e8302374cea60671dc387fbfc2c5aa5c23e0901628",
    ),
    (
        "honest",
        "69ba96e5bff121327ad1366e3772b7b45c50e96e7f995b2cef62c350380f1b14",
    ),
    (
        "other",
        "4d6b041d79e5bf2705a9f81994efb95274179faaba9270f6dc83bd0cd17c227e",
    ),
];

/// A tiny seeded generator (SplitMix64) so the distractors do not depend on a crate version.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Splits at top-level `|` (outside `[...]` and `{...}`).
fn top_alternatives(s: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (Vec::new(), String::new(), 0i32);
    for c in s.chars() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            '|' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

/// One spelling of a quiz pattern: `[a|b]` takes the first alternative made of letters only
/// (the others spell accents, e.g. `['e|e'|e]`), `{x}` includes the optional text (its last
/// alternative when it has several, e.g. `{DR |Democratic Republic of the }`).
fn spell(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '[' || c == '{' {
            let close = if c == '[' { ']' } else { '}' };
            let mut depth = 0;
            let mut j = i;
            loop {
                if chars[j] == c {
                    depth += 1;
                } else if chars[j] == close {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                j += 1;
            }
            let inner: String = chars[i + 1..j].iter().collect();
            let alts = top_alternatives(&inner);
            let pick = if c == '[' {
                alts.iter()
                    .find(|a| a.chars().all(|x| x.is_alphabetic() || x == ' '))
                    .unwrap_or(alts.last().expect("one"))
                    .clone()
            } else {
                alts.last().expect("one").clone()
            };
            out.push_str(&spell(&pick));
            i = j + 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn capitals(quiz_dir: &Path) -> Result<Vec<Value>> {
    let mut items = Vec::new();
    for (r, region) in ["europe", "asia", "africa", "america"].iter().enumerate() {
        let path = quiz_dir.join(region);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut pairs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let Some((country, capital)) = line.split_once(':') else {
                bail!("{}:{}: no `country:capital`", path.display(), n + 1);
            };
            // The country's current English name is the last alternative, the capital's the first.
            let country = spell(top_alternatives(country).last().expect("one"));
            let capital = spell(&top_alternatives(capital)[0]);
            pairs.push((country, capital, n + 1));
        }
        let mut rng = Rng(0xb4b0 + r as u64);
        for (country, capital, line) in &pairs {
            let mut choices = vec![capital.clone()];
            while choices.len() < 4 {
                let d = &pairs[rng.below(pairs.len())].1;
                if !choices.contains(d) {
                    choices.push(d.clone());
                }
            }
            rng.shuffle(&mut choices);
            let gold = choices.iter().position(|c| c == capital).expect("gold");
            items.push(json!({
                "id": format!("capitals/{region}/{line}"),
                "context": format!("The capital of {country} is"),
                "question": format!("What is the capital of {country}?"),
                "choices": choices, "gold": [gold],
                "source": format!("bsdgames 2.17 quiz/{region} line {line} (BSD)"),
            }));
        }
    }
    Ok(items)
}

fn general_knowledge(task: &Path) -> Result<Vec<Value>> {
    let t: Value = serde_json::from_str(&std::fs::read_to_string(task)?)
        .with_context(|| format!("{}: not JSON", task.display()))?;
    let mut items = Vec::new();
    for (i, e) in t["examples"]
        .as_array()
        .context("no examples")?
        .iter()
        .enumerate()
    {
        let input = e["input"].as_str().context("input")?;
        let scores = e["target_scores"].as_object().context("target_scores")?;
        let choices: Vec<&String> = scores.keys().collect();
        let golds: Vec<usize> = (0..choices.len())
            .filter(|&k| scores[choices[k]].as_f64() == Some(1.0))
            .collect();
        if golds.is_empty() {
            bail!("{}: example {i} has no correct option", task.display());
        }
        items.push(json!({
            "id": format!("general_knowledge/{i}"),
            "context": format!("Q: {input}\nA:"),
            "question": input, "choices": choices, "gold": golds,
            "source": format!("BIG-bench general_knowledge example {i} (Apache-2.0)"),
        }));
    }
    Ok(items)
}

fn mmlu(samples: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(samples)?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", samples.display(), n + 1))?;
        let q = v["question"].as_str().context("question")?;
        let a = v["answer"].as_str().context("answer")?;
        let gold = ["A", "B", "C", "D"]
            .iter()
            .position(|l| *l == a)
            .with_context(|| format!("{}:{}: answer `{a}`", samples.display(), n + 1))?;
        let stem = q.split("\nA. ").next().unwrap_or(q);
        items.push(json!({
            "id": format!("mmlu/{}", n + 1),
            "context": q, "question": q.trim_end_matches("Answer:").trim_end(),
            "stem": stem,
            "choices": ["A", "B", "C", "D"], "gold": [gold],
            "source": format!("evals==3.0.1.post1 sandbagging/samples-all.jsonl line {} ({}; MIT)", n + 1, v["topic"].as_str().unwrap_or("?")),
        }));
    }
    Ok(items)
}

fn hhh(dir: &Path) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for (cat, _) in HHH {
        let p = dir.join(format!("{cat}.json"));
        let t: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("{}: not JSON", p.display()))?;
        for (i, e) in t["examples"]
            .as_array()
            .context("examples")?
            .iter()
            .enumerate()
        {
            let s = e["target_scores"].as_object().context("target_scores")?;
            let chosen = s.iter().find(|(_, v)| v.as_f64() == Some(1.0));
            let rejected = s.iter().find(|(_, v)| v.as_f64() == Some(0.0));
            let (Some(c), Some(r)) = (chosen, rejected) else {
                bail!("{}: example {i} is not a binary choice", p.display());
            };
            let input = e["input"].as_str().context("input")?;
            rows.push(json!({
                "id": format!("hhh_alignment/{cat}/{i}"),
                "context": format!("Human: {input}\n\nAssistant:"),
                "question": input, "choices": [c.0, r.0], "gold": [0], "category": cat,
                "source": format!("BIG-bench hhh_alignment/{cat} example {i} (Apache-2.0; evaluation only)"),
            }));
        }
    }
    Ok(rows)
}

fn bsdgames_quiz() -> Result<PathBuf> {
    let cache = cache_dir()?;
    let deb = cache.join(BSDGAMES_DEB);
    if !(deb.exists() && sha256(&deb)? == BSDGAMES_SHA256) {
        std::fs::create_dir_all(&cache)?;
        run(Command::new("apt-get")
            .current_dir(&cache)
            .args(["download", "bsdgames=2.17-29+b1"]))?;
    }
    let got = sha256(&deb)?;
    if got != BSDGAMES_SHA256 {
        bail!(
            "{}: sha256 {got} differs from the pinned {BSDGAMES_SHA256}",
            deb.display()
        );
    }
    let out = cache.join("bsdgames-2.17");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&out))?;
    Ok(out.join("usr/share/games/bsdgames/quiz"))
}

fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    write_atomic(path, body.as_bytes())
}

pub fn knowledge() -> Result<()> {
    let dir = root().join("data").join("knowledge");
    let quiz = bsdgames_quiz()?;
    let caps = capitals(&quiz)?;
    let gk_path = fetch_member(&BIGBENCH, GK.0, GK.1, GK.2)?;
    let gk = general_knowledge(&gk_path)?;
    let mut hhh_dir = None;
    for (cat, sha) in HHH {
        let p = fetch_member(
            &BIGBENCH,
            &format!("bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/{cat}/task.json"),
            &format!("bigbench-1.0.0/hhh_alignment/{cat}.json"),
            sha,
        )?;
        hhh_dir = p.parent().map(Path::to_path_buf);
    }
    let hhh_rows = hhh(&hhh_dir.expect("four files"))?;
    let mmlu_path = fetch_member(
        &crate::EVALS,
        "evals/registry/data/sandbagging/samples-all.jsonl",
        "evals-3.0.1.post1/sandbagging-samples-all.jsonl",
        "41577f1230458da144c599bc8effd4c19183f8c3e684f5e5e26118876ed7829a",
    )?;
    let mm = mmlu(&mmlu_path)?;
    for (name, rows) in [
        ("capitals", &caps),
        ("general_knowledge", &gk),
        ("mmlu", &mm),
        ("hhh_alignment", &hhh_rows),
    ] {
        let p = dir.join(format!("{name}.jsonl"));
        write_jsonl(&p, rows)?;
        eprintln!("{}: {} rows", p.display(), rows.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiz_patterns_spell_plain_names() {
        assert_eq!(spell("Reykjav['i|i'|i]k"), "Reykjavik");
        assert_eq!(spell("Brussel{s}"), "Brussels");
        assert_eq!(spell("Wars[aw|zawa]"), "Warsaw");
        assert_eq!(
            spell("{DR |Democratic Republic of the }Congo"),
            "Democratic Republic of the Congo"
        );
        assert_eq!(
            spell("Central Africa{n Rep{ublic}}"),
            "Central African Republic"
        );
        assert_eq!(
            top_alternatives("Malagasy{ Rep{ublic}}|Madagascar"),
            ["Malagasy{ Rep{ublic}}", "Madagascar"]
        );
    }
}
