//! Synthetic personalisation data in the spirit of P-Soups: preference *dimensions*, each with
//! two opposing *poles*; the model answers every prompt once per pole (the pole's instruction
//! appended to the prompt), and a pair is kept only when a checkable rule confirms the two
//! answers really differ along the dimension. A *user* picks one pole per dimension; their
//! pairs prefer their pole's answer. The pair's prompt is the plain prompt, without the
//! instruction: the user's preference is what training must learn.
//!
//! The rules (all on whitespace words and sentence ends, deterministic):
//! - informativeness (concise ↔ detailed): the concise answer has ≤ 60 words and at most half
//!   the detailed answer's words;
//! - expertise (child ↔ expert): the expert answer's Flesch–Kincaid grade is ≥ 3 above the
//!   child answer's;
//! - style (friendly ↔ formal): the friendly answer's informality score (exclamation marks,
//!   contractions, second person and greeting words per 100 words) exceeds the formal one's by
//!   ≥ 3, and the formal answer has no exclamation mark.
//!
//! An answer cut by the token limit is trimmed back to its last complete sentence (the concise
//! pole's answer must instead have ended on EOS: a concise answer stops by itself). Both
//! answers must be non-empty and differ.

use std::path::Path;

use crate::jsonl::{kind, objects, DataError};

/// A preference dimension with two poles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    Informativeness,
    Expertise,
    Style,
}

impl Dimension {
    pub const ALL: [Dimension; 3] = [Self::Informativeness, Self::Expertise, Self::Style];

    pub fn name(self) -> &'static str {
        match self {
            Self::Informativeness => "informativeness",
            Self::Expertise => "expertise",
            Self::Style => "style",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }

    /// The two poles' names, `[0]` and `[1]`.
    pub fn poles(self) -> [&'static str; 2] {
        match self {
            Self::Informativeness => ["concise", "detailed"],
            Self::Expertise => ["child", "expert"],
            Self::Style => ["friendly", "formal"],
        }
    }

    /// The instruction appended (after a blank line) to the prompt when generating a pole.
    pub fn instruction(self, pole: usize) -> &'static str {
        match (self, pole) {
            (Self::Informativeness, 0) => "Answer in one or two short sentences. Be brief.",
            (Self::Informativeness, _) => {
                "Give a detailed, thorough answer: explain the background, the reasons and an example."
            }
            (Self::Expertise, 0) => {
                "Explain it so that a five-year-old child understands: short, simple words."
            }
            (Self::Expertise, _) => {
                "Answer as an expert writing for other experts: precise technical terminology."
            }
            (Self::Style, 0) => {
                "Answer in a warm, friendly, casual tone, like chatting with a good friend!"
            }
            (Self::Style, _) => "Answer in a formal, impersonal, professional register.",
        }
    }

    /// The dimension and pole index a user name stands for (`concise` → informativeness, 0).
    pub fn of_pole(name: &str) -> Option<(Self, usize)> {
        Self::ALL
            .into_iter()
            .find_map(|d| d.poles().iter().position(|p| *p == name).map(|i| (d, i)))
    }

    /// +1 when pole `pole` has the higher [`Self::measure`] (detailed: more words; expert: a
    /// higher grade; friendly: more informal), −1 otherwise.
    pub fn direction(self, pole: usize) -> f64 {
        let higher = match self {
            Self::Informativeness | Self::Expertise => 1,
            Self::Style => 0,
        };
        if pole == higher {
            1.0
        } else {
            -1.0
        }
    }

    /// The measure the rule compares (words; FK grade; informality per 100 words).
    pub fn measure(self, text: &str) -> f64 {
        match self {
            Self::Informativeness => words(text).len() as f64,
            Self::Expertise => fk_grade(text),
            Self::Style => informality(text),
        }
    }

    /// Whether `pole0` (the answer under pole 0's instruction) and `pole1` differ along the
    /// dimension clearly enough to label; `Err` says why not.
    pub fn check(self, pole0: &str, pole1: &str) -> Result<(), String> {
        let (a, b) = (self.measure(pole0), self.measure(pole1));
        match self {
            Self::Informativeness if a > 60.0 => Err(format!("concise answer has {a} words")),
            Self::Informativeness if a > 0.5 * b => {
                Err(format!("concise {a} words vs detailed {b}: not half"))
            }
            Self::Expertise if b - a < 3.0 => {
                Err(format!("grade child {a:.1} vs expert {b:.1}: gap < 3"))
            }
            Self::Style if a - b < 3.0 => Err(format!(
                "informality friendly {a:.1} vs formal {b:.1}: gap < 3"
            )),
            Self::Style if pole1.contains('!') => Err("formal answer has an exclamation".into()),
            _ => Ok(()),
        }
    }
}

/// `text` up to and including its last sentence end (`.`, `!` or `?` followed by whitespace or
/// the end, or a line break); `None` when there is no complete sentence.
pub fn complete_sentences(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    // "1." opening a line is a list marker, not a sentence end.
    let list_marker = |i: usize| {
        let start = b[..i]
            .iter()
            .rposition(|c| !c.is_ascii_digit())
            .map_or(0, |j| j + 1);
        start < i && (start == 0 || b[start - 1] == b'\n')
    };
    let end = (0..b.len()).rev().find(|&i| {
        (matches!(b[i], b'.' | b'!' | b'?')
            && b.get(i + 1).is_none_or(u8::is_ascii_whitespace)
            && !(b[i] == b'.' && list_marker(i)))
            || b[i] == b'\n'
    })?;
    let kept = text[..=end].trim_end();
    kept.chars().any(char::is_alphanumeric).then_some(kept)
}

/// Whitespace-separated words with at least one letter or digit.
pub fn words(text: &str) -> Vec<&str> {
    text.split_whitespace()
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .collect()
}

/// Vowel-group syllable estimate (silent final `e` dropped, at least one).
pub fn syllables(word: &str) -> usize {
    let w: Vec<char> = word
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if w.is_empty() {
        return 1;
    }
    let vowel = |c: char| "aeiouy".contains(c);
    let mut n = 0;
    let mut prev = false;
    for &c in &w {
        let v = vowel(c);
        if v && !prev {
            n += 1;
        }
        prev = v;
    }
    if w.len() > 2 && w[w.len() - 1] == 'e' && !vowel(w[w.len() - 2]) && n > 1 {
        n -= 1;
    }
    n.max(1)
}

/// Flesch–Kincaid grade: `0.39·words/sentences + 11.8·syllables/words − 15.59`.
pub fn fk_grade(text: &str) -> f64 {
    let ws = words(text);
    if ws.is_empty() {
        return 0.0;
    }
    let sentences = text
        .split(['.', '!', '?'])
        .filter(|s| s.chars().any(char::is_alphanumeric))
        .count()
        .max(1);
    let syl: usize = ws.iter().map(|w| syllables(w)).sum();
    0.39 * ws.len() as f64 / sentences as f64 + 11.8 * syl as f64 / ws.len() as f64 - 15.59
}

/// Informal markers per 100 words: `!`, contractions (`'` inside a word), second person
/// (you, your, you're...), greetings and chatty words.
pub fn informality(text: &str) -> f64 {
    const CHATTY: [&str; 12] = [
        "hey", "hi", "hello", "wow", "awesome", "cool", "great", "fun", "super", "totally",
        "friend", "buddy",
    ];
    let ws = words(text);
    if ws.is_empty() {
        return 0.0;
    }
    let bangs = text.matches('!').count();
    let mut n = bangs;
    for w in &ws {
        let core: String = w
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase()
            .replace('’', "'");
        if core.contains('\'') {
            n += 1;
        }
        if core == "you" || core.starts_with("you'") || core == "your" || core == "yours" {
            n += 1;
        }
        if CHATTY.contains(&core.as_str()) {
            n += 1;
        }
    }
    100.0 * n as f64 / ws.len() as f64
}

/// One prompt of a synthesis input file.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthPrompt {
    pub prompt: String,
    /// `train` or `test`.
    pub split: String,
    /// Everything else on the line (provenance), carried into the outputs.
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub line: usize,
}

/// Reads `{"prompt": str, "split": "train"|"test", ...}` lines.
pub fn read_prompts(path: &Path) -> Result<Vec<SynthPrompt>, DataError> {
    let mut out = Vec::new();
    for (line, mut obj) in objects(path)? {
        let err = |what: String| DataError::Line {
            path: path.into(),
            line,
            what,
        };
        let mut take = |k: &str| match obj.remove(k) {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s),
            Some(serde_json::Value::String(_)) => Err(err(format!("field `{k}` is empty"))),
            Some(v) => Err(err(format!(
                "field `{k}` must be a string, found {}",
                kind(&v)
            ))),
            None => Err(err(format!("field `{k}` is missing"))),
        };
        let prompt = take("prompt")?;
        let split = take("split")?;
        if split != "train" && split != "test" {
            return Err(err(format!(
                "field `split` must be `train` or `test`, found `{split}`"
            )));
        }
        out.push(SynthPrompt {
            prompt,
            split,
            extra: obj,
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syllables_and_grade() {
        assert_eq!(syllables("cat"), 1);
        assert_eq!(syllables("make"), 1);
        assert_eq!(syllables("banana"), 3);
        assert_eq!(syllables("terminology"), 5);
        // 1 sentence, 4 words, 4 syllables: 0.39*4 + 11.8*1 - 15.59
        let g = fk_grade("The cat sat down.");
        assert!((g - (0.39 * 4.0 + 11.8 - 15.59)).abs() < 1e-9, "{g}");
        assert!(
            fk_grade("Photosynthetic organisms metabolise atmospheric carbon dioxide.")
                > fk_grade("Plants eat air. They like sun.") + 3.0
        );
    }

    #[test]
    fn trimming_keeps_whole_sentences() {
        assert_eq!(
            complete_sentences("First one. Second one! Third is cu"),
            Some("First one. Second one!")
        );
        assert_eq!(complete_sentences("Version 2.5 is out and"), None);
        assert_eq!(
            complete_sentences("A list:\n1. item and mo"),
            Some("A list:")
        );
        assert_eq!(complete_sentences("no end at all"), None);
        assert_eq!(
            complete_sentences("Built in 1776. It was"),
            Some("Built in 1776.")
        );
    }

    #[test]
    fn informality_counts_markers() {
        // 5 words: "Hey" (chatty), "you're" (contraction + you), "great!" (chatty), one "!"
        let s = informality("Hey, you're doing great today!");
        assert!((s - 100.0 * 5.0 / 5.0).abs() < 1e-9, "{s}");
        assert_eq!(informality("The procedure is documented herein."), 0.0);
    }

    #[test]
    fn rules_accept_clear_pairs_and_reject_ambiguous_ones() {
        let d = Dimension::Informativeness;
        let long = "word ".repeat(40);
        assert!(d.check("Tokyo is the capital.", &long).is_ok());
        assert!(d.check(&"word ".repeat(25), &long).is_err()); // 25 > 40/2
        assert!(d.check(&"word ".repeat(70), &"word ".repeat(200)).is_err()); // > 60 words
        let s = Dimension::Style;
        assert!(s
            .check("Hey friend, you'll love it!", "The result is satisfactory.")
            .is_ok());
        assert!(s
            .check("Hey friend, you'll love it!", "The result is great!")
            .is_err());
        assert_eq!(Dimension::parse("expertise"), Some(Dimension::Expertise));
    }

    #[test]
    fn poles_name_their_dimension_and_direction_agrees_with_the_rules() {
        assert_eq!(
            Dimension::of_pole("concise"),
            Some((Dimension::Informativeness, 0))
        );
        assert_eq!(
            Dimension::of_pole("expert"),
            Some((Dimension::Expertise, 1))
        );
        assert_eq!(Dimension::of_pole("formal"), Some((Dimension::Style, 1)));
        assert_eq!(Dimension::of_pole("alice"), None);
        // Pairs the labelling rules accept: each pole's answer lies on its own side.
        let pairs = [
            (
                Dimension::Informativeness,
                "Tokyo is the capital.".to_string(),
                "word ".repeat(40),
            ),
            (
                Dimension::Expertise,
                "Plants eat air. They like sun.".to_string(),
                "Photosynthetic organisms metabolise atmospheric carbon dioxide.".to_string(),
            ),
            (
                Dimension::Style,
                "Hey friend, you'll love it!".to_string(),
                "The result is satisfactory.".to_string(),
            ),
        ];
        for (d, p0, p1) in pairs {
            assert!(d.check(&p0, &p1).is_ok(), "{d:?}");
            let gap = d.measure(&p1) - d.measure(&p0);
            assert!(
                d.direction(1) * gap > 0.0 && d.direction(0) * gap < 0.0,
                "{d:?} {gap}"
            );
        }
        assert_eq!(Dimension::parse("tone"), None);
    }
}
