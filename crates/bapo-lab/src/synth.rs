//! `bapo synth`: personalisation pairs from the model's own answers (see `bapo_data::synth` for
//! the dimensions, instructions and labelling rules).
//!
//! For every prompt and every pole of every requested dimension the model answers the prompt
//! with the pole's instruction appended. A prompt's two answers on a dimension become two pairs
//! (one per pole-user: `user = "concise"` prefers the concise answer, `user = "detailed"` the
//! detailed one) when the dimension's rule confirms they differ; otherwise both are discarded
//! and the reason is counted. Outputs, each written atomically into the output directory:
//! `responses.jsonl` (every generation with its measure), `train.jsonl` / `test.jsonl` (TRL
//! standard pairs plus `user`, `dimension`, provenance) and `synth.json` (settings and counts).

use std::collections::BTreeMap;
use std::path::Path;

use bapo_data::synth::{read_prompts, Dimension, SynthPrompt};
use bapo_data::Message;
use bapo_model::{GenerationConfig, LoadedModel};
use burn::tensor::backend::Backend;
use serde::Serialize;
use serde_json::{json, Value};

use bapo_run::generation::{generate_texts, GeneratedText};
use bapo_train::io::{write_atomic, RunError};

/// Generation settings of a synthesis run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthConfig {
    pub dimensions: Vec<String>,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub batch_size: usize,
}

/// Counts per dimension.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DimensionCounts {
    pub prompts: usize,
    pub labelled: usize,
    pub pairs_train: usize,
    pub pairs_test: usize,
    pub discarded: usize,
    /// Discard reasons by kind (`cut`, `empty`, `identical`, `rule`).
    pub discard_reasons: BTreeMap<String, usize>,
}

/// Runs the synthesis; returns the counts by dimension name.
pub fn run_synth<B: Backend>(
    loaded: &LoadedModel<B>,
    model_file: &Path,
    prompts_path: &Path,
    out_dir: &Path,
    cfg: &SynthConfig,
    device: &B::Device,
) -> Result<BTreeMap<String, DimensionCounts>, RunError> {
    let dims: Vec<Dimension> = cfg
        .dimensions
        .iter()
        .map(|d| {
            Dimension::parse(d).ok_or_else(|| {
                format!("unknown dimension `{d}` (informativeness, expertise or style)")
            })
        })
        .collect::<Result<_, _>>()?;
    let prompts = read_prompts(prompts_path)?;
    let tok = &loaded.tokenizer;
    let template = bapo_train::chat_template(tok);
    let encode = bapo_train::encoder(tok);
    let mut eos_ids = loaded.config.eos_token_ids.clone();
    eos_ids.extend(tok.eos_id());
    let gcfg = GenerationConfig {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        seed: cfg.seed,
        eos_ids,
    };
    std::fs::create_dir_all(out_dir)?;

    let mut responses = String::new();
    let mut pairs: BTreeMap<&str, String> = [("train", String::new()), ("test", String::new())]
        .into_iter()
        .collect();
    let mut counts = BTreeMap::new();
    for &dim in &dims {
        // Both poles' requests, ordered by prompt length so batches carry little padding.
        let mut jobs: Vec<(usize, usize, Vec<u32>)> = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            for pole in 0..2 {
                let text = format!("{}\n\n{}", p.prompt, dim.instruction(pole));
                let ids = bapo_data::preference::prompt_ids(
                    &template,
                    &encode,
                    &[Message::user(text)],
                    p.line,
                )?;
                jobs.push((i, pole, ids));
            }
        }
        jobs.sort_by_key(|j| (j.1, j.2.len()));
        let ids: Vec<Vec<u32>> = jobs.iter().map(|j| j.2.clone()).collect();
        let t0 = std::time::Instant::now();
        let gen = generate_texts(
            &loaded.model,
            &ids,
            &gcfg,
            cfg.batch_size,
            tok,
            device,
            &format!("{} answers", dim.name()),
        )?;
        let n_tok: usize = gen.iter().map(|g| g.tokens).sum();
        tracing::info!(
            dimension = dim.name(),
            answers = gen.len(),
            tokens = n_tok,
            tokens_per_s = n_tok as f64 / t0.elapsed().as_secs_f64(),
            "answers generated"
        );
        let mut by_prompt: Vec<[Option<GeneratedText>; 2]> = vec![[None, None]; prompts.len()];
        for ((i, pole, _), g) in jobs.into_iter().zip(gen) {
            by_prompt[i][pole] = Some(g);
        }
        let c = label(dim, &prompts, &by_prompt, &mut responses, &mut pairs)?;
        tracing::info!(dimension = dim.name(), ?c, "labelled");
        counts.insert(dim.name().to_string(), c);
    }
    write_atomic(&out_dir.join("responses.jsonl"), responses.as_bytes())?;
    for (split, body) in &pairs {
        write_atomic(&out_dir.join(format!("{split}.jsonl")), body.as_bytes())?;
    }
    let summary = json!({
        "model_file": model_file.file_name().map(|f| f.to_string_lossy().to_string()),
        "prompts_file": prompts_path.file_name().map(|f| f.to_string_lossy().to_string()),
        "settings": cfg,
        "instructions": dims.iter().map(|d| (d.name(), json!({
            d.poles()[0]: d.instruction(0), d.poles()[1]: d.instruction(1)
        }))).collect::<BTreeMap<_, _>>(),
        "counts": counts,
    });
    write_atomic(
        &out_dir.join("synth.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(counts)
}

/// Labels one dimension's answers; appends to the response log and the split's pair files.
fn label(
    dim: Dimension,
    prompts: &[SynthPrompt],
    answers: &[[Option<GeneratedText>; 2]],
    responses: &mut String,
    pairs: &mut BTreeMap<&str, String>,
) -> Result<DimensionCounts, RunError> {
    let mut c = DimensionCounts {
        prompts: prompts.len(),
        ..Default::default()
    };
    let poles = dim.poles();
    for (p, ans) in prompts.iter().zip(answers) {
        let [Some(a), Some(b)] = ans else {
            return Err(format!("internal: prompt line {} lacks an answer", p.line).into());
        };
        // A cut answer keeps its complete sentences, except a concise one (it must stop itself).
        let fix = |g: &GeneratedText, pole: usize| -> (Option<String>, bool) {
            let concise = dim == Dimension::Informativeness && pole == 0;
            match (g.eos, concise) {
                (true, _) => (Some(g.text.trim().to_string()), false),
                (false, true) => (None, false),
                (false, false) => (
                    bapo_data::synth::complete_sentences(&g.text).map(|t| t.trim().to_string()),
                    true,
                ),
            }
        };
        let (ta, trim_a) = fix(a, 0);
        let (tb, trim_b) = fix(b, 1);
        for (pole, (g, (t, trimmed))) in [(a, (&ta, trim_a)), (b, (&tb, trim_b))]
            .into_iter()
            .enumerate()
        {
            let mut row = json!({
                "prompt": p.prompt, "split": p.split, "dimension": dim.name(),
                "pole": poles[pole], "instruction": dim.instruction(pole),
                "response": g.text, "tokens": g.tokens, "eos": g.eos,
                "trimmed": trimmed, "kept": t,
                "measure": t.as_deref().map(|t| dim.measure(t)),
            });
            merge(&mut row, &p.extra);
            responses.push_str(&format!("{row}\n"));
        }
        let verdict = match (&ta, &tb) {
            (None, _) | (_, None) => Err((
                "cut",
                "an answer hit max_new_tokens with no complete sentence (or is concise)".into(),
            )),
            (Some(x), Some(y)) if x.is_empty() || y.is_empty() => {
                Err(("empty", "an answer is empty".to_string()))
            }
            (Some(x), Some(y)) if x == y => Err(("identical", "the answers are identical".into())),
            (Some(x), Some(y)) => dim.check(x, y).map_err(|why| ("rule", why)),
        };
        match verdict {
            Err((kind, why)) => {
                c.discarded += 1;
                *c.discard_reasons.entry(kind.to_string()).or_default() += 1;
                tracing::debug!(line = p.line, dimension = dim.name(), why, "pair discarded");
            }
            Ok(()) => {
                c.labelled += 1;
                let (x, y) = (ta.as_deref().unwrap_or(""), tb.as_deref().unwrap_or(""));
                for (pole, (chosen, rejected)) in [(x, y), (y, x)].into_iter().enumerate() {
                    let mut row = json!({
                        "prompt": p.prompt, "chosen": chosen, "rejected": rejected,
                        "user": poles[pole], "dimension": dim.name(),
                        "measure_chosen": dim.measure(chosen),
                        "measure_rejected": dim.measure(rejected),
                    });
                    merge(&mut row, &p.extra);
                    let split = if p.split == "test" { "test" } else { "train" };
                    pairs
                        .get_mut(split)
                        .expect("both splits")
                        .push_str(&format!("{row}\n"));
                    if split == "test" {
                        c.pairs_test += 1;
                    } else {
                        c.pairs_train += 1;
                    }
                }
            }
        }
    }
    Ok(c)
}

/// Adds the prompt line's provenance fields (never overwriting).
fn merge(row: &mut Value, extra: &serde_json::Map<String, Value>) {
    if let Value::Object(o) = row {
        for (k, v) in extra {
            o.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}
