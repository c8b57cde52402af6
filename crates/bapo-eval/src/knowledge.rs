//! Evaluation passes that run the model and hand the numbers to `bapo-drift`: multiple-choice
//! knowledge in the raw and chat formats, and output drift of greedy generations.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bapo_data::{ChatTemplate, Message};
use bapo_drift::mc::{read_items, Format, McItem, McItemResult, McSummary};
use bapo_model::{generate, GenerationConfig, Llama, Tokenizer};
use burn::tensor::backend::Backend;

use bapo_train::io::RunError;
use bapo_train::score::EncodedCompletion;

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
            (0..max_items)
                .map(|i| items[i * n / max_items].clone())
                .collect()
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

/// Gives item `i` of every set the system turn `turns[i % turns.len()]` (the `chat_system`
/// format's; a level with several users spreads the items over their profiles).
pub fn with_system_turns(sets: &mut [KnowledgeSet], turns: &[String]) {
    if turns.is_empty() {
        return;
    }
    for set in sets {
        for (i, item) in set.items.iter_mut().enumerate() {
            item.system = Some(turns[i % turns.len()].clone());
        }
    }
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
            Format::ChatSystem => {
                let Some(system) = &item.system else {
                    return Err(format!(
                        "knowledge item `{}`: the chat_system format needs eval.system_turns",
                        item.id
                    )
                    .into());
                };
                let turns = [
                    Message::system(system.clone()),
                    Message::user(item.question.clone()),
                ];
                template.render(&turns, true)?
            }
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

/// Refuses any (item, choice) of `sets` in `formats` longer than the model's `context`, naming
/// the set, the item's line and the length (run before any scoring allocates for it).
pub fn check_knowledge_context(
    sets: &[KnowledgeSet],
    formats: &[Format],
    tok: &Tokenizer,
    template: &ChatTemplate,
    context: usize,
) -> Result<(), RunError> {
    for set in sets {
        for &f in formats {
            for (i, s) in mc_sequences(&set.items, f, tok, template)? {
                let len = s.prompt_ids.len() + s.completion_ids.len();
                if len > context {
                    let item = &set.items[i];
                    return Err(format!(
                        "knowledge set `{}` line {} (item `{}`, {} format): {len} tokens, beyond \
                         the model's context of {context} positions",
                        set.name,
                        item.line,
                        item.id,
                        f.name()
                    )
                    .into());
                }
            }
        }
    }
    Ok(())
}

/// Scores every item of `set` in `format`. Each context is computed once and shared by its
/// choices ([`bapo_model::generate::continuation_logps`]); items are sorted by context length
/// and grouped so that a forward pass holds about `batch` choices; groups run
/// [`bapo_train::concurrent::default_threads`] at a time (each computed exactly as alone).
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
    let mut per_item: Vec<(Vec<u32>, Vec<Vec<u32>>)> =
        vec![(Vec::new(), Vec::new()); set.items.len()];
    for (i, s) in seqs {
        per_item[i].0 = s.prompt_ids;
        per_item[i].1.push(s.completion_ids);
    }
    let mut order: Vec<usize> = (0..per_item.len()).collect();
    order.sort_by_key(|&i| per_item[i].0.len());
    let pb = indicatif::ProgressBar::new(order.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {} ({}) items [{{elapsed}} < {{eta}}]",
            set.name,
            format.name()
        ))
        .expect("template"),
    );
    let t0 = std::time::Instant::now();
    // Items until about `batch` choices per forward pass.
    let mut groups: Vec<&[usize]> = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let (mut end, mut choices) = (start, 0);
        while end < order.len()
            && (end == start || choices + per_item[order[end]].1.len() <= batch.max(1))
        {
            choices += per_item[order[end]].1.len();
            end += 1;
        }
        groups.push(&order[start..end]);
        start = end;
    }
    let score = |group: &&[usize]| {
        let contexts: Vec<Vec<u32>> = group.iter().map(|&i| per_item[i].0.clone()).collect();
        let conts: Vec<(usize, Vec<u32>)> = group
            .iter()
            .enumerate()
            .flat_map(|(g, &i)| per_item[i].1.iter().map(move |c| (g, c.clone())))
            .collect();
        bapo_model::generate::continuation_logps(model, &contexts, &conts, device)
    };
    let scores = bapo_train::concurrent::map_ordered(
        &groups,
        bapo_train::concurrent::default_threads(),
        score,
        |g, _| pb.inc(groups[g].len() as u64),
    );
    let mut lls: Vec<Vec<f64>> = vec![Vec::new(); per_item.len()];
    for (group, scores) in groups.iter().zip(scores) {
        let mut k = 0;
        for &i in group.iter() {
            let n = per_item[i].1.len();
            lls[i] = scores[k..k + n].to_vec();
            k += n;
        }
    }
    pb.finish_and_clear();
    tracing::debug!(
        set = set.name,
        format = format.name(),
        items = per_item.len(),
        secs = t0.elapsed().as_secs_f64(),
        "knowledge scored"
    );
    Ok(set
        .items
        .iter()
        .zip(lls)
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
        for (name, sub) in [("boundary", &s.boundary), ("easy", &s.easy)] {
            if let Some(x) = sub.as_ref().filter(|x| x.n > 0) {
                put(&format!("{name}_n"), x.n as f64);
                put(&format!("{name}_acc"), x.acc);
                put(&format!("{name}_delta_acc"), x.acc - x.base_acc);
                put(&format!("{name}_delta_margin"), x.margin - x.base_margin);
            }
        }
    }
    m
}

/// Greedy answers to `prompts` (token ids): each answer's tokens (EOS removed) and whether it
/// ended on EOS.
pub fn greedy_answers<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos_ids: &[u32],
    device: &B::Device,
) -> Vec<(Vec<u32>, bool)> {
    let cfg = GenerationConfig {
        max_new_tokens,
        eos_ids: eos_ids.to_vec(),
        ..Default::default()
    };
    generate(model, prompts, &cfg, device)
        .into_iter()
        .map(|g| {
            let mut t = g.tokens;
            if g.stopped_on_eos {
                t.pop();
            }
            (t, g.stopped_on_eos)
        })
        .collect()
}

/// New tokens a generative knowledge answer may take.
pub const GENERATIVE_TOKENS: usize = 24;

/// Whether `answer` names one of `item`'s gold choices (case-insensitive substring).
pub fn names_gold(item: &McItem, answer: &str) -> bool {
    let a = answer.to_lowercase();
    item.gold.iter().any(|&g| {
        item.choices
            .get(g)
            .is_some_and(|c| a.contains(&c.to_lowercase()))
    })
}

/// The generative knowledge check: the first `n` items of every set asked as a user turn
/// (chat template, generation prompt), answered greedily in batches of `batch`; the fraction
/// whose answer names a gold choice, as `knowledge/<set>/generative/acc`.
#[allow(clippy::too_many_arguments)] // model, items, tokenizer, template, stop ids, sizes, device
pub fn generative_knowledge<B: Backend>(
    model: &Llama<B>,
    sets: &[KnowledgeSet],
    n: usize,
    tok: &Tokenizer,
    template: &ChatTemplate,
    eos_ids: &[u32],
    batch: usize,
    device: &B::Device,
) -> Result<BTreeMap<String, f64>, RunError> {
    let mut out = BTreeMap::new();
    for set in sets {
        let items: Vec<&McItem> = set.items.iter().take(n).collect();
        if items.is_empty() {
            continue;
        }
        let prompts = items
            .iter()
            .map(|it| {
                let text = template.render(&[Message::user(it.question.clone())], true)?;
                Ok(tok.encode(&text)?)
            })
            .collect::<Result<Vec<Vec<u32>>, RunError>>()?;
        let mut right = 0usize;
        for (chunk, its) in prompts.chunks(batch.max(1)).zip(items.chunks(batch.max(1))) {
            for ((ids, _), it) in greedy_answers(model, chunk, GENERATIVE_TOKENS, eos_ids, device)
                .iter()
                .zip(its)
            {
                let text = tok
                    .decode(ids)
                    .map_err(|e| format!("decoding an answer to `{}`: {e}", it.id))?;
                right += usize::from(names_gold(it, &text));
            }
        }
        out.insert(
            format!("knowledge/{}/generative/acc", set.name),
            right as f64 / items.len() as f64,
        );
    }
    Ok(out)
}

/// Personalisation on held-out prompts for a user who is a pole of a known dimension
/// (`concise`, `expert`, ...): the fraction of prompts whose personalised answer lies further
/// toward that pole than the base model's answer by the dimension's own measure (words, grade,
/// informality; ties are failures), and the mean signed change of the measure (positive =
/// toward the pole). Answers pair up by position.
pub fn personalisation(
    (dim, pole): (bapo_data::synth::Dimension, usize),
    base: &[String],
    policy: &[String],
) -> (f64, f64) {
    let n = base.len().min(policy.len());
    if n == 0 {
        return (0.0, 0.0);
    }
    let moves: Vec<f64> = base
        .iter()
        .zip(policy)
        .map(|(b, p)| dim.direction(pole) * (dim.measure(p) - dim.measure(b)))
        .collect();
    let success = moves.iter().filter(|m| **m > 0.0).count() as f64 / n as f64;
    (success, moves.iter().sum::<f64>() / n as f64)
}

#[cfg(test)]
mod tests {
    use bapo_data::synth::Dimension;

    #[test]
    fn a_generative_answer_is_right_when_it_names_a_gold_choice() {
        let item = super::McItem {
            id: "capitals/europe/2".into(),
            context: "The capital of Albania is".into(),
            question: "What is the capital of Albania?".into(),
            choices: vec![
                "Gibraltar".into(),
                "Tbilisi".into(),
                "London".into(),
                "Tirana".into(),
            ],
            gold: vec![3],
            line: 2,
            system: None,
        };
        assert!(super::names_gold(
            &item,
            "The capital of Albania is Tirana."
        ));
        assert!(super::names_gold(&item, "TIRANA"));
        assert!(!super::names_gold(&item, "It is London."));
        assert!(!super::names_gold(&item, "I am not sure."));
    }

    #[test]
    fn personalisation_counts_moves_toward_the_pole() {
        let base = ["one two three four".to_string(), "one two".to_string()];
        let policy = ["one two".to_string(), "one two three".to_string()];
        // concise: 4 → 2 words is toward the pole (+2), 2 → 3 is away (−1).
        let (s, d) = super::personalisation((Dimension::Informativeness, 0), &base, &policy);
        assert_eq!((s, d), (0.5, 0.5));
        // detailed: the opposite moves.
        let (s, d) = super::personalisation((Dimension::Informativeness, 1), &base, &policy);
        assert_eq!((s, d), (0.5, -0.5));
        // An unchanged answer is not a success.
        let (s, _) = super::personalisation((Dimension::Style, 0), &base[..1], &base[..1]);
        assert_eq!(s, 0.0);
    }
}
