//! `cargo xtask data`: rebuilds the committed personalisation data from pinned sources.
//!
//! 1. Prompts: the `steganography/samples.jsonl` rows of PyPI `evals==3.0.1.post1` (MIT) whose
//!    `task_type` is `alespalla/chatbot_instruction_prompts` (Apache-2.0) or `akoksal/LongForm`
//!    (MIT); the MMLU rows are left to the knowledge evaluation. Kept: 15–300 characters after
//!    whitespace is collapsed and wrapping quotes removed; chatbot rows only when they are a
//!    question (end with `?`: the rest are mid-conversation fragments such as "That's true");
//!    no prompt that dictates its own length ("Respond in 26 words", "21 key steps"), since
//!    length is what the users disagree about. Split: FNV-1a of the text, 1 in 8 held out.
//! 2. Responses and pairs: `bapo synth` (the model answers each prompt once per pole of each
//!    dimension; pairs are labelled by checkable rules).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{fetch_member, root, run, EVALS};

const STEGANOGRAPHY: &str = "evals/registry/data/steganography/samples.jsonl";
const STEGANOGRAPHY_SHA256: &str =
    "fb3b1de00891dcc8166d067a9a501aa869f2361c3950f0c562d3617542e2bb03";

/// Licence of each kept source dataset (as the evals registry credits them).
const SOURCES: [(&str, &str); 2] = [
    ("alespalla/chatbot_instruction_prompts", "Apache-2.0"),
    ("akoksal/LongForm", "MIT"),
];

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Whether the prompt fixes its own length ("Respond in 3 sentences", "18 clear instructions").
fn dictates_length(p: &str) -> bool {
    let lower = p.to_lowercase();
    if lower.contains("respond in ") || lower.contains("in one sentence") {
        return true;
    }
    const UNITS: [&str; 14] = [
        "words",
        "sentences",
        "paragraphs",
        "steps",
        "tips",
        "instructions",
        "ways",
        "points",
        "reasons",
        "ideas",
        "things",
        "examples",
        "items",
        "questions",
    ];
    let words: Vec<String> = lower
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string())
        .collect();
    words.iter().enumerate().any(|(i, w)| {
        w.parse::<u32>().is_ok()
            && words[i + 1..]
                .iter()
                .take(4)
                .any(|u| UNITS.contains(&u.as_str()))
    })
}

/// Extracts, filters and splits the prompts; returns (kept, train, test).
pub fn prompts(out: &Path) -> Result<(usize, usize, usize)> {
    let src = fetch_member(
        &EVALS,
        STEGANOGRAPHY,
        "evals-3.0.1.post1/steganography-samples.jsonl",
        STEGANOGRAPHY_SHA256,
    )?;
    let text =
        std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", src.display(), i + 1))?;
        let field = |k: &str| {
            v.get(k).and_then(Value::as_str).with_context(|| {
                format!(
                    "{}:{}: field `{k}` missing or not a string",
                    src.display(),
                    i + 1
                )
            })
        };
        let task_type = field("task_type")?;
        let Some((_, licence)) = SOURCES.iter().find(|(s, _)| *s == task_type) else {
            continue;
        };
        let mut p = field("task_prompt")?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if p.len() >= 2 && p.starts_with('"') && p.ends_with('"') {
            p = p[1..p.len() - 1].trim().to_string();
        }
        let chars = p.chars().count();
        if !(15..=300).contains(&chars)
            || (task_type.starts_with("alespalla") && !p.ends_with('?'))
            || dictates_length(&p)
            || !seen.insert(p.clone())
        {
            continue;
        }
        let split = if fnv1a(&p).is_multiple_of(8) {
            "test"
        } else {
            "train"
        };
        rows.push(json!({
            "prompt": p,
            "split": split,
            "source": task_type,
            "licence": licence,
            "origin": format!("{} {STEGANOGRAPHY} line {}", EVALS.spec, i + 1),
        }));
    }
    if rows.is_empty() {
        bail!("{}: no prompt survived the filters", src.display());
    }
    let test = rows.iter().filter(|r| r["split"] == "test").count();
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    crate::write_atomic(out, body.as_bytes())?;
    Ok((rows.len(), rows.len() - test, test))
}

/// `cargo xtask data [bapo synth args...]`.
pub fn data(extra: &[String]) -> Result<()> {
    if extra.first().map(String::as_str) == Some("knowledge") {
        return crate::knowledge::knowledge();
    }
    let root = root();
    let dir = root.join("data").join("personas");
    let prompts_path = dir.join("prompts.jsonl");
    let (n, train, test) = prompts(&prompts_path)?;
    eprintln!(
        "{}: {n} prompts ({train} train, {test} test)",
        prompts_path.display()
    );
    let gguf = crate::fetch()?;
    let bapo = crate::build_bapo(&[])?;
    run(Command::new(bapo)
        .arg("synth")
        .arg("--model")
        .arg(&gguf)
        .arg("--prompts")
        .arg(&prompts_path)
        .arg("--out")
        .arg(&dir)
        .args(extra))
}
