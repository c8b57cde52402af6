//! Evaluation passes that run the model and hand the numbers to `bapo-drift`: multiple-choice
//! knowledge in the raw and chat formats, and output drift of greedy generations.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bapo_data::{ChatTemplate, Message};
use bapo_drift::mc::{read_items, Format, McItem, McItemResult, McSummary};
use bapo_drift::OutputStats;
use bapo_model::{generate, GenerationConfig, Llama, Tokenizer};
use burn::tensor::backend::Backend;

use crate::run::RunError;
use crate::score::{EncodedCompletion, Scorer};

/// A named knowledge set.
#[derive(Debug, Clone)]
pub struct KnowledgeSet {
    /// The file stem (`capitals`, `general_knowledge`, ...).
    pub name: String,
    pub items: Vec<McItem>,
}

/// Loads each file; `max_items > 0` keeps an evenly spaced subset of that many items.
pub fn load_knowledge(paths: &[PathBuf], max_items: usize) -> Result<Vec<KnowledgeSet>, RunError> {
    let mut out = Vec::new();
    for p in paths {
        let items = read_items(p)?;
        let n = items.len();
        let items = if max_items > 0 && max_items < n {
            (0..max_items).map(|i| items[i * n / max_items].clone()).collect()
        } else {
            items
        };
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| p.display().to_string());
        out.push(KnowledgeSet { name, items });
    }
    Ok(out)
}

/// Context and continuation ids for every (item, choice), lm-eval style: the continuation is
/// what encoding `context + continuation` adds after the context's own encoding (so a leading
/// space merges into the first choice token as it would in running text).
fn mc_sequences(
    items: &[McItem],
    format: Format,
    tok: &Tokenizer,
    template: &ChatTemplate,
) -> Result<Vec<(usize, EncodedCompletion)>, RunError> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let context = match format {
            Format::Raw => item.context.clone(),
            Format::Chat => template.render(&[Message::user(item.question.clone())], true)?,
        };
        let ctx = tok.encode(&context)?;
        for choice in &item.choices {
            let cont = format.continuation(choice);
            let whole = tok.encode(&format!("{context}{cont}"))?;
            let completion_ids = if whole.len() > ctx.len() && whole.starts_with(&ctx) {
                whole[ctx.len()..].to_vec()
            } else {
                tok.encode(&cont)?
            };
            if ctx.is_empty() || completion_ids.is_empty() {
                return Err(format!(
                    "knowledge item `{}` (line {}): empty context or choice `{choice}`",
                    item.id, item.line
                )
                .into());
            }
            out.push((
                i,
                EncodedCompletion {
                    prompt_ids: ctx.clone(),
                    completion_ids,
                },
            ));
        }
    }
    Ok(out)
}

/// Scores every item of `set` in `format` (sequences sorted by length, `batch` per forward).
pub fn score_knowledge<B: Backend>(
    model: &Llama<B>,
    set: &KnowledgeSet,
    format: Format,
    tok: &Tokenizer,
    template: &ChatTemplate,
    batch: usize,
    device: &B::Device,
) -> Result<Vec<McItemResult>, RunError> {
    let seqs = mc_sequences(&set.items, format, tok, template)?;
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&k| seqs[k].1.prompt_ids.len() + seqs[k].1.completion_ids.len());
    let scorer = Scorer {
        model,
        device: device.clone(),
        pad_id: tok.eos_id().unwrap_or(0),
    };
    let mut ll = vec![0.0; seqs.len()];
    let pb = indicatif::ProgressBar::new(seqs.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {} ({}) choices [{{elapsed}} < {{eta}}]",
            set.name,
            format.name()
        ))
        .expect("template"),
    );
    let t0 = std::time::Instant::now();
    let tokens: usize = seqs.iter().map(|s| s.1.prompt_ids.len() + s.1.completion_ids.len()).sum();
    for chunk in order.chunks(batch.max(1)) {
        let batch: Vec<EncodedCompletion> = chunk.iter().map(|&k| seqs[k].1.clone()).collect();
        for (&k, (sum, _)) in chunk.iter().zip(scorer.score(&batch)) {
            ll[k] = sum;
        }
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    tracing::debug!(
        set = set.name,
        format = format.name(),
        sequences = seqs.len(),
        tokens,
        tokens_per_s = tokens as f64 / t0.elapsed().as_secs_f64(),
        "knowledge scored"
    );
    let mut per_item: Vec<Vec<f64>> = vec![Vec::new(); set.items.len()];
    for ((i, _), l) in seqs.iter().zip(ll) {
        per_item[*i].push(l);
    }
    Ok(set
        .items
        .iter()
        .zip(per_item)
        .map(|(item, l)| McItemResult::new(item, l))
        .collect())
}

/// Per-item results of every (set, format), keyed `set/format`.
pub type KnowledgeResults = BTreeMap<String, Vec<McItemResult>>;

/// Scores every set in every format; returns the results and flat metrics
/// (`knowledge/<set>/<format>/{acc,acc_norm,gold_loglik,margin}`, plus `retention`,
/// `delta_gold_loglik` and `delta_margin` against `base` when given) and the summaries.
#[allow(clippy::too_many_arguments)]
pub fn knowledge<B: Backend>(
    model: &Llama<B>,
    sets: &[KnowledgeSet],
    formats: &[Format],
    tok: &Tokenizer,
    template: &ChatTemplate,
    batch: usize,
    device: &B::Device,
    base: Option<&KnowledgeResults>,
) -> Result<(KnowledgeResults, BTreeMap<String, McSummary>), RunError> {
    let mut results = BTreeMap::new();
    let mut summaries = BTreeMap::new();
    for set in sets {
        for &f in formats {
            let key = format!("{}/{}", set.name, f.name());
            let r = score_knowledge(model, set, f, tok, template, batch, device)?;
            let s = McSummary::new(&r, base.and_then(|b| b.get(&key)).map(Vec::as_slice));
            summaries.insert(key.clone(), s);
            results.insert(key, r);
        }
    }
    Ok((results, summaries))
}

/// Flattens summaries into `knowledge/<set>/<format>/<metric>` numbers.
pub fn knowledge_metrics(summaries: &BTreeMap<String, McSummary>) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for (key, s) in summaries {
        let mut put = |k: &str, v: f64| {
            m.insert(format!("knowledge/{key}/{k}"), v);
        };
        put("acc", s.acc);
        put("acc_norm", s.acc_norm);
        put("gold_loglik", s.gold_loglik);
        put("margin", s.margin);
        if let Some(v) = s.retention {
            put("retention", v);
        }
        if let Some(v) = s.delta_gold_loglik {
            put("delta_gold_loglik", v);
        }
        if let Some(v) = s.delta_margin {
            put("delta_margin", v);
        }
    }
    m
}

/// Greedy generations from `prompts` (token ids), summarised.
pub fn output_stats<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos_ids: &[u32],
    device: &B::Device,
) -> OutputStats {
    let cfg = GenerationConfig {
        max_new_tokens,
        eos_ids: eos_ids.to_vec(),
        ..Default::default()
    };
    let gens: Vec<(Vec<u32>, bool)> = generate(model, prompts, &cfg, device)
        .into_iter()
        .map(|g| {
            let mut t = g.tokens;
            if g.stopped_on_eos {
                t.pop();
            }
            (t, g.stopped_on_eos)
        })
        .collect();
    OutputStats::new(&gens)
}
