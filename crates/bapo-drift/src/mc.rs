//! Multiple-choice knowledge scoring with lm-evaluation-harness semantics.
//!
//! Each choice is scored by the summed log-likelihood of its continuation after the context:
//! `" " + choice` after the raw context (lm-eval's target delimiter), or the bare choice at the
//! start of the assistant turn in the chat format. `acc` takes the argmax of the sums; `acc_norm`
//! the argmax of the sum divided by the choice's length in characters (lm-eval's `acc_norm`).
//! An item may list several correct choices (BIG-bench does): the argmax must be one of them.
//!
//! Accuracy moves late; two continuous signals move first: the log-likelihood of the (best)
//! gold answer, and its margin over the best distractor, both in nats.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The prompt formats a knowledge set is scored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `context` + `" " + choice`.
    Raw,
    /// `question` as a user turn through the chat template, the choice opening the answer.
    Chat,
    /// As `Chat`, after the item's own system turn ([`McItem::system`]; e.g. a user's profile,
    /// so that knowledge is measured as that user would see the model).
    ChatSystem,
}

impl Format {
    pub const ALL: [Format; 2] = [Format::Raw, Format::Chat];

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Chat => "chat",
            Format::ChatSystem => "chat_system",
        }
    }

    /// The text scored for `choice` in this format.
    pub fn continuation(self, choice: &str) -> String {
        match self {
            Format::Raw => format!(" {choice}"),
            Format::Chat | Format::ChatSystem => choice.to_string(),
        }
    }
}

/// One multiple-choice item (`data/knowledge/*.jsonl`).
#[derive(Debug, Clone, PartialEq)]
pub struct McItem {
    pub id: String,
    /// Raw-completion prefix.
    pub context: String,
    /// The question as a user would ask it (chat format).
    pub question: String,
    pub choices: Vec<String>,
    /// Indices of the correct choices (at least one).
    pub gold: Vec<usize>,
    pub line: usize,
    /// The system turn of the `chat_system` format (not in the file: set by the evaluation).
    pub system: Option<String>,
}

/// A malformed knowledge file.
#[derive(Debug, thiserror::Error)]
pub enum McError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Line {
        path: PathBuf,
        line: usize,
        what: String,
    },
}

/// Reads `{"id", "context", "question", "choices": [str, ...], "gold": [int, ...]}` lines
/// (blank lines skipped; anything else malformed is an error naming the line and field).
pub fn read_items(path: &Path) -> Result<Vec<McItem>, McError> {
    let text = std::fs::read_to_string(path).map_err(|source| McError::Io {
        path: path.into(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line = i + 1;
        let err = |what: String| McError::Line {
            path: path.into(),
            line,
            what,
        };
        let v: Value = serde_json::from_str(raw).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| err(format!("field `{k}` missing or not a string")))
        };
        let choices: Vec<String> = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|c| c.as_str().map(str::to_string)).collect())
            .ok_or_else(|| err("field `choices` must be a list of strings".into()))?;
        if choices.len() < 2 {
            return Err(err(format!(
                "field `choices` has {} entries (need 2+)",
                choices.len()
            )));
        }
        let gold: Vec<usize> = match v.get("gold") {
            Some(Value::Number(n)) => n.as_u64().map(|g| vec![g as usize]),
            Some(Value::Array(a)) => a.iter().map(|g| g.as_u64().map(|g| g as usize)).collect(),
            _ => None,
        }
        .filter(|g| !g.is_empty())
        .ok_or_else(|| {
            err("field `gold` must be an index or a non-empty list of indices".into())
        })?;
        if let Some(&g) = gold.iter().find(|&&g| g >= choices.len()) {
            return Err(err(format!(
                "field `gold`: index {g} but only {} choices",
                choices.len()
            )));
        }
        out.push(McItem {
            id: s("id")?,
            context: s("context")?,
            question: s("question")?,
            choices,
            gold,
            line,
            system: None,
        });
    }
    Ok(out)
}

/// One item scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McItemResult {
    pub id: String,
    /// Summed log-likelihood of each choice's continuation.
    pub logliks: Vec<f64>,
    pub correct: bool,
    pub correct_norm: bool,
    /// Log-likelihood of the best gold choice.
    pub gold_loglik: f64,
    /// `gold_loglik` minus the best distractor's log-likelihood (> 0: the gold wins).
    pub margin: f64,
}

fn argmax(x: impl Iterator<Item = f64>) -> usize {
    x.enumerate()
        .fold(
            (0, f64::NEG_INFINITY),
            |b, (i, v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

impl McItemResult {
    /// Scores `item` from its choices' summed log-likelihoods.
    pub fn new(item: &McItem, logliks: Vec<f64>) -> Self {
        assert_eq!(
            logliks.len(),
            item.choices.len(),
            "one log-likelihood per choice"
        );
        let best = argmax(logliks.iter().copied());
        let best_norm = argmax(
            logliks
                .iter()
                .zip(&item.choices)
                .map(|(l, c)| l / c.chars().count().max(1) as f64),
        );
        let gold_loglik = item
            .gold
            .iter()
            .map(|&g| logliks[g])
            .fold(f64::NEG_INFINITY, f64::max);
        let distractor = (0..logliks.len())
            .filter(|i| !item.gold.contains(i))
            .map(|i| logliks[i])
            .fold(f64::NEG_INFINITY, f64::max);
        Self {
            id: item.id.clone(),
            correct: item.gold.contains(&best),
            correct_norm: item.gold.contains(&best_norm),
            gold_loglik,
            margin: if distractor.is_finite() {
                gold_loglik - distractor
            } else {
                0.0
            },
            logliks,
        }
    }
}

/// Wilson score interval (95 %) for `k` successes of `n`.
pub fn wilson95(k: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (z, n_f) = (1.959_963_984_540_054, n as f64);
    let p = k as f64 / n_f;
    let den = 1.0 + z * z / n_f;
    let centre = (p + z * z / (2.0 * n_f)) / den;
    let half = z * (p * (1.0 - p) / n_f + z * z / (4.0 * n_f * n_f)).sqrt() / den;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// Summary of a scored set, optionally against the base model on the same items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McSummary {
    pub n: usize,
    pub acc: f64,
    pub acc_ci95: [f64; 2],
    pub acc_norm: f64,
    pub acc_norm_ci95: [f64; 2],
    /// Mean log-likelihood of the gold answer (nats).
    pub gold_loglik: f64,
    /// Mean margin of the gold answer over the best distractor (nats).
    pub margin: f64,
    /// Fraction of the base model's accuracy kept (`acc / base acc`).
    pub retention: Option<f64>,
    pub delta_acc: Option<f64>,
    pub delta_gold_loglik: Option<f64>,
    pub delta_margin: Option<f64>,
    /// Items the base model was unsure of (`|base margin| < BOUNDARY_NATS`): where forgetting
    /// shows first. Set when a base is given.
    pub boundary: Option<McSubset>,
    /// Items the base model answered confidently right (`base margin >= BOUNDARY_NATS`).
    pub easy: Option<McSubset>,
}

/// Half-width, in nats, of the band of base-model margins that counts as the decision boundary.
pub const BOUNDARY_NATS: f64 = 1.0;

/// Accuracy and margin on a subset of items chosen by the base model's margin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McSubset {
    pub n: usize,
    pub acc: f64,
    pub base_acc: f64,
    pub margin: f64,
    pub base_margin: f64,
}

impl McSubset {
    fn new(pairs: &[(&McItemResult, &McItemResult)]) -> Self {
        let n = pairs.len().max(1) as f64;
        let sum = |f: &dyn Fn(&McItemResult) -> f64, which: usize| {
            pairs
                .iter()
                .map(|p| f(if which == 0 { p.0 } else { p.1 }))
                .sum::<f64>()
                / n
        };
        let acc = |r: &McItemResult| f64::from(u8::from(r.correct));
        Self {
            n: pairs.len(),
            acc: sum(&acc, 0),
            base_acc: sum(&acc, 1),
            margin: sum(&|r| r.margin, 0),
            base_margin: sum(&|r| r.margin, 1),
        }
    }
}

impl McSummary {
    /// # Panics
    /// If `base` is given and lists different items.
    pub fn new(results: &[McItemResult], base: Option<&[McItemResult]>) -> Self {
        let n = results.len();
        let mean = |f: &dyn Fn(&McItemResult) -> f64, r: &[McItemResult]| {
            if r.is_empty() {
                0.0
            } else {
                r.iter().map(f).sum::<f64>() / r.len() as f64
            }
        };
        let k = results.iter().filter(|r| r.correct).count();
        let kn = results.iter().filter(|r| r.correct_norm).count();
        let acc = if n == 0 { 0.0 } else { k as f64 / n as f64 };
        let gold = mean(&|r| r.gold_loglik, results);
        let margin = mean(&|r| r.margin, results);
        let mut s = Self {
            n,
            acc,
            acc_ci95: wilson95(k, n),
            acc_norm: if n == 0 { 0.0 } else { kn as f64 / n as f64 },
            acc_norm_ci95: wilson95(kn, n),
            gold_loglik: gold,
            margin,
            retention: None,
            delta_acc: None,
            delta_gold_loglik: None,
            delta_margin: None,
            boundary: None,
            easy: None,
        };
        if let Some(b) = base {
            assert!(
                b.len() == n && b.iter().zip(results).all(|(x, y)| x.id == y.id),
                "base results are for different items"
            );
            let base_acc = mean(&|r| f64::from(u8::from(r.correct)), b);
            s.retention = (base_acc > 0.0).then(|| acc / base_acc);
            s.delta_acc = Some(acc - base_acc);
            s.delta_gold_loglik = Some(gold - mean(&|r| r.gold_loglik, b));
            s.delta_margin = Some(margin - mean(&|r| r.margin, b));
            let pairs: Vec<(&McItemResult, &McItemResult)> = results.iter().zip(b).collect();
            let pick = |f: &dyn Fn(f64) -> bool| -> Vec<(&McItemResult, &McItemResult)> {
                pairs.iter().filter(|p| f(p.1.margin)).copied().collect()
            };
            s.boundary = Some(McSubset::new(&pick(&|m| m.abs() < BOUNDARY_NATS)));
            s.easy = Some(McSubset::new(&pick(&|m| m >= BOUNDARY_NATS)));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(choices: &[&str], gold: &[usize]) -> McItem {
        McItem {
            id: "x".into(),
            context: "c".into(),
            question: "q".into(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            gold: gold.to_vec(),
            line: 1,
            system: None,
        }
    }

    #[test]
    fn acc_and_acc_norm_differ_on_a_crafted_item() {
        // Raw sums favour the short wrong answer "Rome" (-4 > -6); per character the long gold
        // "Amsterdam" wins (-6/9 = -0.67 > -4/4 = -1).
        let it = item(&["Rome", "Amsterdam", "Oslo"], &[1]);
        let r = McItemResult::new(&it, vec![-4.0, -6.0, -9.0]);
        assert!(!r.correct);
        assert!(r.correct_norm);
        assert_eq!(r.gold_loglik, -6.0);
        assert_eq!(r.margin, -2.0);
        // Several golds: any counts, the best gold's log-likelihood is used.
        let it = item(&["red", "pink", "blue"], &[0, 1]);
        let r = McItemResult::new(&it, vec![-3.0, -1.0, -2.0]);
        assert!(r.correct);
        assert_eq!(r.margin, 1.0);
    }

    #[test]
    fn summary_ci_and_deltas() {
        let ci = wilson95(85, 100);
        assert!(
            (ci[0] - 0.7672).abs() < 1e-3 && (ci[1] - 0.9069).abs() < 1e-3,
            "{ci:?}"
        );
        let it = item(&["a", "b"], &[0]);
        let base = vec![
            McItemResult::new(&it, vec![-1.0, -2.0]),
            McItemResult::new(&it, vec![-1.0, -3.0]),
        ];
        let now = vec![
            McItemResult::new(&it, vec![-2.0, -1.5]),
            McItemResult::new(&it, vec![-1.5, -3.0]),
        ];
        let s = McSummary::new(&now, Some(&base));
        assert_eq!(s.acc, 0.5);
        assert_eq!(s.retention, Some(0.5));
        assert_eq!(s.delta_acc, Some(-0.5));
        assert!((s.delta_gold_loglik.unwrap() - (-1.75 + 1.0)).abs() < 1e-12);
        assert!((s.delta_margin.unwrap() - ((-0.5 + 1.5) / 2.0 - 1.5)).abs() < 1e-12);
    }

    #[test]
    fn bad_lines_name_line_and_field() {
        let dir = std::env::temp_dir().join(format!("bapo-mc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k.jsonl");
        std::fs::write(&p, "{\"id\":\"a\",\"context\":\"c\",\"question\":\"q\",\"choices\":[\"x\",\"y\"],\"gold\":[0]}\n\n{\"id\":\"b\",\"context\":\"c\",\"question\":\"q\",\"choices\":[\"x\",\"y\"],\"gold\":[2]}\n").unwrap();
        let e = read_items(&p).unwrap_err().to_string();
        assert!(
            e.contains(":3:") && e.contains("`gold`") && e.contains("index 2"),
            "{e}"
        );
    }

    #[test]
    fn boundary_and_easy_subsets_follow_the_base_margin() {
        let it = |id: &str| McItem {
            id: id.into(),
            ..item(&["a", "b"], &[0])
        };
        let score = |id: &str, gold: f64, other: f64| McItemResult::new(&it(id), vec![gold, other]);
        // Base margins: +0.5 (boundary), +2 (easy), -0.3 (boundary), -3 (neither).
        let base = [
            score("1", -1.0, -1.5),
            score("2", -1.0, -3.0),
            score("3", -1.3, -1.0),
            score("4", -4.0, -1.0),
        ];
        // The policy loses item 1 (margin -0.5) and keeps item 2 (margin +1).
        let pol = [
            score("1", -2.0, -1.5),
            score("2", -1.0, -2.0),
            score("3", -1.3, -1.0),
            score("4", -4.0, -1.0),
        ];
        let s = McSummary::new(&pol, Some(&base));
        let b = s.boundary.unwrap();
        assert_eq!(b.n, 2);
        assert!((b.base_acc - 0.5).abs() < 1e-12 && b.acc.abs() < 1e-12);
        assert!((b.base_margin - 0.1).abs() < 1e-12 && (b.margin + 0.4).abs() < 1e-12);
        let e = s.easy.unwrap();
        assert_eq!(e.n, 1);
        assert!((e.acc - 1.0).abs() < 1e-12 && (e.margin - 1.0).abs() < 1e-12);
    }
}
