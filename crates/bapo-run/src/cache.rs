//! The anchor, reference-log-prob and base-evaluation caches: a sha256 fingerprint of every
//! input they depend on, the numerics that made them, and the rule for reusing or rebuilding
//! them.

use std::path::{Path, PathBuf};

use bapo_data::BaseResponse;
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use bapo_train::io::RunError;
use bapo_train::train::ReferenceLogps;

/// sha256 of a file, or of every file in a directory (sorted by name).
pub(crate) fn hash_path(h: &mut Sha256, path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for n in names.iter().filter(|n| n.is_file()) {
            h.update(
                n.file_name()
                    .map(|s| s.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            hash_path(h, n)?;
        }
        Ok(())
    } else {
        std::io::copy(&mut std::fs::File::open(path)?, h).map(|_| ())
    }
}

pub(crate) fn hex(h: Sha256) -> String {
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// How a cache's numbers were computed: the backend (its Burn name) and the version of the
/// log-prob computation. Log-probs from another backend differ at float precision, and at
/// step 1 (policy = reference) the anchor's hinge sits exactly on its kink, so any such
/// difference switches the anchor on for part of the batch: a cache is only reused by the
/// backend that made it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Numerics {
    pub backend: String,
    /// Bumped when the log-prob or generation code changes its floating-point results.
    pub logps: String,
    /// Worker threads when the cache was made (recorded, not compared: results do not depend
    /// on it on the CPU backends).
    pub threads: usize,
}

impl Numerics {
    /// Names a base kept in a smaller float type (its products run in that type).
    pub fn with_base_dtype(mut self, dtype: crate::config::BaseDtype) -> Self {
        use crate::config::BaseDtype;
        // The kernel list in `of` leaves `mixed` and `quant` out (they run only with such bases):
        // (the base, its kernel, the products with it and without it).
        let (base, kernel, with, without) = match dtype {
            BaseDtype::F32 => return self,
            BaseDtype::Gguf => (
                "in their GGUF blocks".to_string(),
                "quant",
                "f32 activations times rows dequantised per tile",
                "f32, each weight dequantised whole",
            ),
            half => (
                format!("{half:?}"),
                "mixed",
                "f32 activations times weights widened per block",
                "in the weights' type",
            ),
        };
        let on = bapo_objective::fused_kernels().contains(&kernel);
        let products = if on { with } else { without };
        self.logps = format!("base weights {base}, products {products}; {}", self.logps);
        self
    }

    /// The numerics of backend `B` with prompt sharing on or off (`train.prompt_sharing`).
    pub fn of<B: Backend>(device: &B::Device, prompt_sharing: bool) -> Self {
        Self {
            backend: B::name(device),
            logps: format!(
                "f32, completion rows only, logit - logsumexp{}, pairwise row sums, grouped attention, base responses as generated, few-row products in input halves{}",
                match bapo_objective::fused_kernels()
                    .into_iter()
                    .filter(|k| !["mixed", "quant"].contains(k))
                    .collect::<Vec<_>>()
                {
                    k if k.is_empty() => String::new(),
                    k => format!(" (fused kernels: {})", k.join(", ")),
                },
                if prompt_sharing {
                    ", prompts shared (v5)"
                } else {
                    " (v4)"
                }
            ),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Version of the anchor cache's contents; older caches (text only, no token ids) are rebuilt.
pub(crate) const ANCHOR_CACHE_FORMAT: u32 = 2;

#[derive(Serialize, Deserialize)]
pub(crate) struct AnchorCache {
    #[serde(default)]
    pub(crate) format: u32,
    pub(crate) fingerprint: String,
    #[serde(default)]
    pub(crate) numerics: Numerics,
    /// Decoded text (for people: anchors.jsonl); the anchor scores `responses`' ids.
    pub(crate) bases: Vec<String>,
    #[serde(default)]
    pub(crate) responses: Vec<BaseResponse>,
}

impl AnchorCache {
    /// Fraction of base responses cut by `max_new_tokens` (no EOS) among `responses[range]`.
    pub(crate) fn cut_fraction(&self, range: std::ops::Range<usize>) -> f64 {
        let r = &self.responses[range];
        r.iter().filter(|b| !b.eos).count() as f64 / r.len().max(1) as f64
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ReferenceCache {
    pub(crate) fingerprint: String,
    #[serde(default)]
    pub(crate) numerics: Numerics,
    pub(crate) train: Vec<ReferenceLogps>,
    pub(crate) eval: Vec<ReferenceLogps>,
}

pub(crate) fn read_cache<T: for<'de> Deserialize<'de>>(
    path: &Path,
    fingerprint: &str,
    numerics: &Numerics,
    get: impl Fn(&T) -> (&str, &Numerics),
) -> Option<T> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(cache = %path.display(), "cache unreadable ({e}): rebuilding it");
            return None;
        }
    };
    let cache: T = match serde_json::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(cache = %path.display(), "cache is not a valid cache file ({e}): rebuilding it");
            return None;
        }
    };
    let (fp, made) = get(&cache);
    if fp != fingerprint {
        tracing::warn!(cache = %path.display(), "cache fingerprint differs from this run's model/data/settings: rebuilding it");
        None
    } else if made.backend != numerics.backend || made.logps != numerics.logps {
        tracing::warn!(
            cache = %path.display(),
            made_on = %made.backend,
            made_with = %made.logps,
            this_run = %numerics.backend,
            "cache was computed on another backend or by other log-prob code: rebuilding it \
             (reusing it would put the anchor off its kink at step 1)"
        );
        None
    } else {
        Some(cache)
    }
}

/// The base model's knowledge results and output answers (`eval_base.cache.json`): the same for
/// every method trained on one level and seed of `bapo compare`.
#[derive(Serialize, Deserialize)]
pub(crate) struct BaseEvalCache {
    pub(crate) fingerprint: String,
    pub(crate) numerics: Numerics,
    pub(crate) outcome: bapo_eval::heldout::EvalOutcome,
}

/// The base evaluation's fingerprint: the reference cache's (model, data, seed, encoding), the
/// model file itself (the reference fingerprint is a placeholder under `--per-user`), the
/// `[eval]` section, every knowledge file's bytes, and `outputs` (the items scored, the formats,
/// the output prompts' ids, the token limit and the stop ids).
pub(crate) fn base_eval_key(
    reference: &str,
    run: &crate::config::RunConfig,
    outputs: &impl Serialize,
) -> Result<String, RunError> {
    let mut h = Sha256::new();
    h.update(reference.as_bytes());
    let model = crate::config::expand_path(&run.model.path);
    hash_path(&mut h, &model).map_err(|e| RunError::file(&model, e))?;
    h.update(serde_json::to_vec(&run.eval)?);
    for k in &run.eval.knowledge {
        hash_path(&mut h, k).map_err(|e| RunError::file(k, e))?;
    }
    h.update(serde_json::to_vec(outputs)?);
    Ok(hex(h))
}

/// The cached outcome at `path` when its fingerprint and numerics match, else `compute`'s
/// (then cached; a cache that cannot be written is only a warning).
pub(crate) fn base_eval(
    path: &Path,
    fingerprint: String,
    numerics: &Numerics,
    compute: impl FnOnce() -> Result<bapo_eval::heldout::EvalOutcome, RunError>,
) -> Result<bapo_eval::heldout::EvalOutcome, RunError> {
    if let Some(c) = read_cache::<BaseEvalCache>(path, &fingerprint, numerics, |c| {
        (&c.fingerprint, &c.numerics)
    }) {
        tracing::info!(cache = %path.display(), "reusing the base model's cached knowledge results and answers");
        return Ok(c.outcome);
    }
    let outcome = compute()?;
    let c = BaseEvalCache {
        fingerprint,
        numerics: numerics.clone(),
        outcome,
    };
    match serde_json::to_vec(&c) {
        Ok(bytes) => bapo_train::io::write_atomic(path, &bytes)?,
        Err(e) => tracing::warn!(cache = %path.display(), "base evaluation not cached: {e}"),
    }
    Ok(c.outcome)
}
