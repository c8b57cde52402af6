//! Batched generation with a KV cache: prompts of different lengths are left-padded, each row
//! gets its own positions and padding mask; greedy or temperature/top-p sampling (seeded);
//! rows stop on EOS independently.

use std::ops::ControlFlow;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{KvCache, Llama};

/// How to decode.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// `0.0` means greedy.
    pub temperature: f32,
    /// Nucleus mass kept when sampling (`1.0` keeps everything).
    pub top_p: f32,
    pub seed: u64,
    /// Any of these ends a row (the token itself is kept in the output).
    pub eos_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_ids: Vec::new(),
        }
    }
}

/// One row's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub stopped_on_eos: bool,
}

/// Picks the next token from one row of logits.
pub fn sample_next(logits: &[f32], cfg: &GenerationConfig, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, (((x - max) / cfg.temperature) as f64).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut n = 0;
    for p in &probs {
        kept += p.1 / total;
        n += 1;
        if kept >= cfg.top_p as f64 {
            break;
        }
    }
    probs.truncate(n);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * mass;
    for p in &probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0;
        }
    }
    probs.last().map(|p| p.0).unwrap_or_else(argmax)
}

/// Generates continuations of `prompts` (token ids; they may differ in length).
///
/// With [`crate::split`] on and at most [`crate::split::MAX_ROWS`] prompts, decoding runs on a
/// rayon worker, so that each split product hands one half to the other worker and computes
/// the other itself (measured on SmolLM2, 2 threads: 20.5–21.3 tok/s at batch 1, against
/// 16.5–18.7 when the caller waits outside the pool and 14.7–15.5 unsplit).
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    device: &B::Device,
) -> Vec<Generated> {
    generate_streaming(model, prompts, cfg, device, &mut |_| {
        ControlFlow::Continue(())
    })
}

/// What [`generate_streaming`]'s callback sees after each decoding step: every row so far.
pub type OnStep<'a> = dyn FnMut(&[Generated]) -> ControlFlow<()> + Send + 'a;

/// [`generate`], calling `on_step` with every row after each new token (a server streams from
/// it); `Break` stops decoding there (every consumer has what it wants). Same tokens as
/// `generate` up to the step it stops at.
pub fn generate_streaming<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    device: &B::Device,
    on_step: &mut OnStep<'_>,
) -> Vec<Generated> {
    // Only where products will be split: larger batches keep their threads as they were.
    let split = crate::split::split_threads() > 1 && prompts.len() <= crate::split::MAX_ROWS;
    if split && rayon::current_thread_index().is_none() {
        rayon::scope(|_| generate_here(model, prompts, cfg, device, on_step))
    } else {
        generate_here(model, prompts, cfg, device, on_step)
    }
}

fn generate_here<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    device: &B::Device,
    on_step: &mut OnStep<'_>,
) -> Vec<Generated> {
    let b = prompts.len();
    let mut out: Vec<Generated> = vec![
        Generated {
            tokens: Vec::new(),
            stopped_on_eos: false
        };
        b
    ];
    if b == 0 || cfg.max_new_tokens == 0 {
        return out;
    }
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let pads: Vec<usize> = prompts.iter().map(|p| len - p.len()).collect();
    let mut ids = Vec::with_capacity(b * len);
    let mut valid = vec![Vec::with_capacity(len + cfg.max_new_tokens); b];
    let mut positions = Vec::with_capacity(b * len);
    for (r, p) in prompts.iter().enumerate() {
        for i in 0..len {
            let real = i >= pads[r];
            ids.push(if real { p[i - pads[r]] as i64 } else { 0 });
            valid[r].push(real);
            positions.push(i.saturating_sub(pads[r]) as i64);
        }
    }
    let key_mask = |valid: &[Vec<bool>], s: usize| {
        let t = valid[0].len();
        let flat: Vec<bool> = valid.iter().flat_map(|v| v.iter().map(|&x| !x)).collect();
        Tensor::<B, 4, Bool>::from_data(TensorData::new(flat, [b, 1, 1, t]), device)
            .expand([b, 1, s, t])
    };
    let causal = crate::model::causal_mask::<B>(b, len, device);
    let mask = causal.bool_or(key_mask(&valid, len));
    let mut cache = KvCache::default();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, len]), device);
    let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [b, len]), device);
    let mut hidden = model
        .forward_cached(tokens, pos, mask, &mut cache)
        .narrow(1, len - 1, 1);
    let mut next_pos: Vec<i64> = pads.iter().map(|&p| (len - p) as i64).collect();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    for step in 0..cfg.max_new_tokens {
        let logits = model
            .logits(hidden)
            .into_data()
            .to_vec::<f32>()
            .expect("f32 logits");
        let vocab = logits.len() / b;
        let mut step_ids = Vec::with_capacity(b);
        for (r, row) in out.iter_mut().enumerate() {
            let tok = if row.stopped_on_eos {
                0
            } else {
                sample_next(&logits[r * vocab..(r + 1) * vocab], cfg, &mut rng)
            };
            if !row.stopped_on_eos {
                row.tokens.push(tok);
                row.stopped_on_eos = cfg.eos_ids.contains(&tok);
            }
            step_ids.push(tok as i64);
        }
        let wanted = on_step(&out);
        if step + 1 == cfg.max_new_tokens
            || out.iter().all(|r| r.stopped_on_eos)
            || wanted.is_break()
        {
            break;
        }
        for v in valid.iter_mut() {
            v.push(true);
        }
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(step_ids, [b, 1]), device);
        let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(next_pos.clone(), [b, 1]), device);
        next_pos.iter_mut().for_each(|p| *p += 1);
        hidden = model.forward_cached(tokens, pos, key_mask(&valid, 1), &mut cache);
    }
    out
}

/// A prefix shared by every context is computed once (batch 1) and its keys/values repeated
/// for every row, when it is at least this many tokens (a chat template's system turn is tens;
/// below a few tokens the extra pass costs more than it saves).
const MIN_SHARED_PREFIX: usize = 8;

/// Every context run into a fresh KV cache. Returns the last pass's final hidden states
/// `[n, l, e]` (each context's last token at position `l - 1`), which cached keys are padding
/// (`n × t` flags, row-major), the cached length `t`, and the cache.
///
/// Contexts are left-padded to a common length. When they all start with the same
/// [`MIN_SHARED_PREFIX`] or more tokens, that prefix runs once and the remainders (at least one
/// token each) run after it, left-padded between the prefix and themselves: positions stay the
/// tokens' own, padded keys are masked, so every row sees what it would see alone.
#[allow(clippy::type_complexity)]
fn prefill_contexts<B: Backend>(
    model: &Llama<B>,
    contexts: &[Vec<u32>],
    device: &B::Device,
) -> (Tensor<B, 3>, Vec<bool>, usize, KvCache<B>) {
    let n = contexts.len();
    let shortest = contexts.iter().map(Vec::len).min().unwrap_or(0);
    let mut p = 0;
    while p + 1 < shortest && contexts.iter().all(|c| c[p] == contexts[0][p]) {
        p += 1;
    }
    if n < 2 || p < MIN_SHARED_PREFIX {
        p = 0;
    }
    let mut cache = KvCache::default();
    if p > 0 {
        let ids: Vec<i64> = contexts[0][..p].iter().map(|&t| t as i64).collect();
        let pos: Vec<i64> = (0..p as i64).collect();
        model.forward_cached(
            Tensor::from_data(TensorData::new(ids, [1, p]), device),
            Tensor::from_data(TensorData::new(pos, [1, p]), device),
            crate::model::causal_mask::<B>(1, p, device),
            &mut cache,
        );
        let rows = Tensor::<B, 1, Int>::zeros([n], device);
        for layer in cache.layers.iter_mut().flatten() {
            layer.k = layer.k.clone().select(0, rows.clone());
            layer.v = layer.v.clone().select(0, rows.clone());
        }
    }
    // The remainders (whole contexts when nothing is shared), left-padded.
    let l = contexts.iter().map(|c| c.len() - p).max().unwrap_or(1);
    let (mut ids, mut pos) = (Vec::with_capacity(n * l), Vec::with_capacity(n * l));
    let mut pad_key = Vec::with_capacity(n * (p + l));
    for c in contexts {
        let pad = l - (c.len() - p);
        pad_key.extend(std::iter::repeat_n(false, p));
        for i in 0..l {
            ids.push(if i >= pad { c[p + i - pad] as i64 } else { 0 });
            pos.push((p + i.saturating_sub(pad)) as i64);
            pad_key.push(i < pad);
        }
    }
    let t = p + l;
    // Remainder query i may see the prefix and remainder keys p..=p + i that are not padding.
    let keys =
        Tensor::<B, 4, Bool>::from_data(TensorData::new(pad_key.clone(), [n, 1, 1, t]), device)
            .expand([n, 1, l, t]);
    let causal: Vec<bool> = (0..l)
        .flat_map(|i| (0..t).map(move |k| k > p + i))
        .collect();
    let causal = Tensor::<B, 4, Bool>::from_data(TensorData::new(causal, [1, 1, l, t]), device)
        .expand([n, 1, l, t]);
    let hidden = model.forward_cached(
        Tensor::from_data(TensorData::new(ids, [n, l]), device),
        Tensor::from_data(TensorData::new(pos, [n, l]), device),
        causal.bool_or(keys),
        &mut cache,
    );
    (hidden, pad_key, t, cache)
}

/// Summed log-probabilities of several continuations per shared context, computing each
/// context once: the contexts are prefilled together (left-padded; a prefix they all share,
/// such as a chat template's system turn, computed once: [`MIN_SHARED_PREFIX`]) into a KV cache, the cache
/// rows are repeated for every continuation of their context, and all continuations
/// (right-padded) run in one cached pass. Equals scoring `context + continuation` as one
/// sequence (tested), at a fraction of the cost when contexts are long and continuations short
/// (multiple-choice evaluation).
///
/// `continuations[k] = (i, ids)` scores `ids` after `contexts[i]`; every context and
/// continuation must be non-empty. Returns one sum per continuation, in order.
pub fn continuation_logps<B: Backend>(
    model: &Llama<B>,
    contexts: &[Vec<u32>],
    continuations: &[(usize, Vec<u32>)],
    device: &B::Device,
) -> Vec<f64> {
    use burn::tensor::activation::log_softmax;
    let (n, r) = (contexts.len(), continuations.len());
    if n == 0 || r == 0 {
        return vec![0.0; r];
    }
    assert!(contexts.iter().all(|c| !c.is_empty()), "empty context");
    assert!(
        continuations.iter().all(|c| !c.1.is_empty() && c.0 < n),
        "bad continuation"
    );
    let (hidden, pad_key, lc, mut cache) = prefill_contexts(model, contexts, device);
    // Each continuation's first token, from its context's last position: [n, 1, v].
    let last = hidden.dims()[1];
    let first = log_softmax(model.logits(hidden.narrow(1, last - 1, 1)), 2);
    let rows: Vec<i64> = continuations.iter().map(|c| c.0 as i64).collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [r]), device);
    let heads: Vec<i64> = continuations.iter().map(|c| c.1[0] as i64).collect();
    let heads = Tensor::<B, 3, Int>::from_data(TensorData::new(heads, [r, 1, 1]), device);
    let mut sums: Vec<f64> = first
        .select(0, idx.clone())
        .gather(2, heads)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32")
        .into_iter()
        .map(f64::from)
        .collect();
    // Continuation step t predicts token t + 1: only steps t < len - 1 are needed, so each
    // continuation runs without its last token (a one-token continuation needs no step at all;
    // multiple-choice answers are often one or two tokens).
    let lk = continuations
        .iter()
        .map(|c| c.1.len() - 1)
        .max()
        .unwrap_or(0);
    if lk == 0 {
        return sums;
    }
    // Repeat each context's cache rows for its continuations.
    for layer in cache.layers.iter_mut().flatten() {
        layer.k = layer.k.clone().select(0, idx.clone());
        layer.v = layer.v.clone().select(0, idx.clone());
    }
    // Right-padded, attending to their context (minus its padding) and causally to themselves.
    let (mut ids, mut pos, mut key_pad) = (Vec::new(), Vec::new(), Vec::new());
    for (ctx, cont) in continuations {
        let clen = contexts[*ctx].len();
        for t in 0..lk {
            let real = t + 1 < cont.len();
            ids.push(if real { cont[t] as i64 } else { 0 });
            pos.push((clen + t) as i64);
        }
        key_pad.extend_from_slice(&pad_key[ctx * lc..(ctx + 1) * lc]);
        key_pad.extend(std::iter::repeat_n(false, lk));
    }
    let keys =
        Tensor::<B, 4, Bool>::from_data(TensorData::new(key_pad, [r, 1, 1, lc + lk]), device)
            .expand([r, 1, lk, lc + lk]);
    // Continuation step t may see keys 0..lc+t.
    let causal: Vec<bool> = (0..lk)
        .flat_map(|t| (0..lc + lk).map(move |k| k > lc + t))
        .collect();
    let causal =
        Tensor::<B, 4, Bool>::from_data(TensorData::new(causal, [1, 1, lk, lc + lk]), device)
            .expand([r, 1, lk, lc + lk]);
    let hidden = model.forward_cached(
        Tensor::from_data(TensorData::new(ids, [r, lk]), device),
        Tensor::from_data(TensorData::new(pos, [r, lk]), device),
        causal.bool_or(keys),
        &mut cache,
    );
    // The LM head and log-softmax only at the steps that predict a token (not the padding);
    // gathered on the device: step t's log-prob of token t + 1.
    let (mut rows, mut next) = (Vec::new(), Vec::new());
    for (k, (_, c)) in continuations.iter().enumerate() {
        for t in 0..c.len() - 1 {
            rows.push((k * lk + t) as i64);
            next.push(c[t + 1] as i64);
        }
    }
    let m = rows.len();
    let e = hidden.dims()[2];
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [m]), device);
    let hidden = hidden
        .reshape([r * lk, e])
        .select(0, rows)
        .reshape([1, m, e]);
    let next = Tensor::<B, 3, Int>::from_data(TensorData::new(next, [1, m, 1]), device);
    let lp: Vec<f32> = log_softmax(model.logits(hidden), 2)
        .gather(2, next)
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32");
    let mut at = 0;
    for (k, (_, c)) in continuations.iter().enumerate() {
        sums[k] += lp[at..at + c.len() - 1]
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>();
        at += c.len() - 1;
    }
    sums
}
