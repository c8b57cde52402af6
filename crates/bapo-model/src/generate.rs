//! Batched generation with a KV cache: prompts of different lengths are left-padded, each row
//! gets its own positions and padding mask; greedy or temperature/top-p sampling (seeded);
//! rows stop on EOS independently.

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
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    device: &B::Device,
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
        if step + 1 == cfg.max_new_tokens || out.iter().all(|r| r.stopped_on_eos) {
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
