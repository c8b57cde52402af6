//! Range checks of every numeric key of a [`RunConfig`], each failure naming its dotted key so
//! the loader can point at the file and line it came from.

use crate::config::RunConfig;

/// One value out of range: its dotted key (`train.learning_rate`) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub key: String,
    pub what: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.key, self.what)
    }
}

fn need(ok: bool, key: &str, what: impl FnOnce() -> String) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(Invalid {
            key: key.into(),
            what: what(),
        })
    }
}

fn positive(key: &str, v: f64) -> Result<(), Invalid> {
    need(v.is_finite() && v > 0.0, key, || {
        format!("must be finite and > 0, got {v}")
    })
}

fn non_negative(key: &str, v: f64) -> Result<(), Invalid> {
    need(v.is_finite() && v >= 0.0, key, || {
        format!("must be finite and >= 0, got {v}")
    })
}

fn at_least_one(key: &str, v: usize) -> Result<(), Invalid> {
    need(v >= 1, key, || format!("must be at least 1, got {v}"))
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, hi_open: bool) -> Result<(), Invalid> {
    let ok = v.is_finite() && v >= lo && if hi_open { v < hi } else { v <= hi };
    let close = if hi_open { ")" } else { "]" };
    need(ok, key, || {
        format!("must be in [{lo}, {hi}{close}, got {v}")
    })
}

/// Every numeric range and every consistency between lengths that does not need the model
/// (those that do are checked against the model's context when it loads).
pub fn check_ranges(c: &RunConfig) -> Result<(), Invalid> {
    let t = &c.train;
    positive("train.learning_rate", t.learning_rate)?;
    at_least_one("train.max_steps", t.max_steps)?;
    at_least_one("train.batch_size", t.batch_size)?;
    at_least_one("train.grad_accum", t.grad_accum)?;
    if let Some(n) = t.micro_batch_threads {
        at_least_one("train.micro_batch_threads", n)?;
    }
    if let Some(n) = t.max_grad_norm {
        positive("train.max_grad_norm", n)?;
    }
    non_negative("train.weight_decay", t.weight_decay)?;
    positive("train.beta", t.beta)?;
    in_range("train.label_smoothing", t.label_smoothing, 0.0, 0.5, true)?;
    non_negative("train.nll_weight", t.nll_weight)?;
    non_negative("train.anchor_weight", t.anchor_weight)?;
    for w in t.loss_weights.iter().flatten() {
        non_negative("train.loss_weights", *w)?;
    }
    need(
        c.model.base_dtype.is_f32() || c.lora.is_some(),
        "model.base_dtype",
        || {
            format!(
            "is {:?} but there is no [lora] section: a base kept in a smaller type is frozen, so only adapters can train (full fine-tuning keeps f32)",
            c.model.base_dtype
        )
        },
    )?;
    if let Some(l) = &c.lora {
        at_least_one("lora.rank", l.rank)?;
        positive("lora.alpha", l.alpha)?;
        in_range("lora.dropout", l.dropout, 0.0, 1.0, true)?;
        need(
            l.dropout == 0.0 || !t.gradient_checkpointing,
            "train.gradient_checkpointing",
            || {
                format!(
                    "is on with lora.dropout = {}: the recomputed feed-forward halves would draw new dropout masks (set lora.dropout = 0)",
                    l.dropout
                )
            },
        )?;
    }
    let a = &c.anchor;
    at_least_one("anchor.max_new_tokens", a.max_new_tokens)?;
    at_least_one("anchor.batch_size", a.batch_size)?;
    non_negative("anchor.temperature", a.temperature as f64)?;
    need(
        a.top_p.is_finite() && a.top_p > 0.0 && a.top_p <= 1.0,
        "anchor.top_p",
        || format!("must be in (0, 1], got {}", a.top_p),
    )?;
    let d = &c.data;
    in_range("data.eval_fraction", d.eval_fraction, 0.0, 1.0, true)?;
    need(d.max_length >= 2, "data.max_length", || {
        format!(
            "must be at least 2 (a prompt token and a completion token), got {}",
            d.max_length
        )
    })?;
    if let Some(p) = d.max_prompt_length {
        at_least_one("data.max_prompt_length", p)?;
        need(p < d.max_length, "data.max_prompt_length", || {
            format!(
                "({p}) must be below data.max_length ({}) to leave room for a completion",
                d.max_length
            )
        })?;
    }
    let e = &c.eval;
    at_least_one("eval.batch_size", e.batch_size)?;
    at_least_one("eval.kl_vocab_chunk", e.kl_vocab_chunk)?;
    at_least_one("output.eval_steps", c.output.eval_steps)?;
    Ok(())
}

/// The 1-based line of dotted `key` (`section.name`) in TOML `text`, if it is written there.
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let (section, name) = key.rsplit_once('.').unwrap_or(("", key));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = h.trim().to_string();
            continue;
        }
        if current == section {
            if let Some((k, _)) = l.split_once('=') {
                if k.trim() == name {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

impl RunConfig {
    /// Range checks of every numeric key, then cross-field checks.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_ranges(self)?;
        let bad = |key: &str, what: String| Invalid {
            key: key.into(),
            what,
        };
        self.train
            .anchor
            .parse::<bapo_objective::Anchor>()
            .map_err(|e| bad("train.anchor", format!("is invalid: {e}")))?;
        self.train
            .objective()
            .map_err(|e| bad("train.loss_type", format!("is invalid: {e}")))?;
        self.data
            .truncation()
            .map_err(|e| bad("data.truncation_mode", format!("is invalid: {e}")))?;
        if self.data.eval.is_some() && self.data.eval_fraction > 0.0 {
            return Err(bad(
                "data.eval_fraction",
                "must be 0 because data.eval is set (one held-out split, not two)".into(),
            ));
        }
        if self.data.users.as_ref().is_some_and(Vec::is_empty) {
            return Err(bad(
                "data.users",
                "is empty: list at least one user, or leave it out".into(),
            ));
        }
        if let Some(l) = &self.lora {
            l.validate()
                .map_err(|e| bad("lora.target_modules", format!("is invalid: {e}")))?;
        }
        self.eval
            .formats()
            .map_err(|e| bad("eval.formats", format!("is invalid: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_of_finds_keys_in_their_section_only() {
        let text = "[data]\nmax_length = 3\n[train]\n# c\nbatch_size = 2\nlearning_rate=-1\n";
        assert_eq!(line_of(text, "train.learning_rate"), Some(6));
        assert_eq!(line_of(text, "train.batch_size"), Some(5));
        assert_eq!(line_of(text, "data.batch_size"), None);
        assert_eq!(line_of(text, "data.max_length"), Some(2));
    }
}
