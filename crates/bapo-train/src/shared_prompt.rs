//! Completion log-probs of a collated `[chosen; rejected; base]` batch with each prompt
//! computed once ([`Llama::forward_hidden_shared`]): the host-side layout, and the gather of
//! the hidden states that predict completion tokens.
//!
//! In the benches' batch (prompt and completions 64 tokens each) a pair's three rows are 256
//! positions instead of 384: a third less work in the projections, forward and backward.

use bapo_data::PreferenceBatch;
use bapo_model::{Llama, SharedLayout};
use bapo_objective::{scatter_logps, target_logps, CompletionRows, SequenceLogps};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Lengths of summed axes (prompt keys, prompt + completion keys, scored positions) are rounded
/// up to a multiple of this. Sums over a contiguous axis accumulate in several lanes and add a
/// remainder of `len mod lanes` terms last (ndarray: 8 lanes), so a batch's longest row would
/// otherwise decide which terms go where: with a multiple of 8, the terms of one row land in
/// the same lanes whatever it is batched with (measured: one ulp per log-prob otherwise).
pub const SUM_BLOCK: usize = 8;

/// A batch split into prompt rows and completion rows (host memory, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedRows {
    pub layout: SharedLayout,
    /// `[p, lp]`, right-padded with 0.
    pub prompts: Vec<i64>,
    pub prompt_len: usize,
    /// `[n, ls]`, right-padded with 0; row `r` is batch row `r`'s completion.
    pub completions: Vec<i64>,
    pub completion_len: usize,
}

impl SharedRows {
    /// The split of a right-padded `batch` (completion = each row's real tail, as
    /// [`PreferenceBatch::from_sequences`] builds it; `None` otherwise, and the caller takes the
    /// plain path). Rows with the same prompt tokens share one prompt row, whatever pairs they
    /// belong to; every row is computed the same way whichever rows it is batched with, so the
    /// reference pass and training (which group examples differently) agree bit for bit. A row
    /// without prompt tokens moves its first token (never scored: nothing predicts position 0)
    /// into its prompt, so that every prompt row has at least one position.
    pub fn from_batch(batch: &PreferenceBatch) -> Option<Self> {
        let (rows, len) = (batch.rows, batch.len);
        let mut splits = Vec::with_capacity(rows);
        for r in 0..rows {
            let attn = &batch.attention[r * len..(r + 1) * len];
            let mask = &batch.completion_mask[r * len..(r + 1) * len];
            let real = attn.iter().take_while(|&&a| a).count();
            let c = mask.iter().filter(|&&m| m != 0.0).count();
            let l = real.checked_sub(c)?;
            let tail =
                mask[..l].iter().all(|&m| m == 0.0) && mask[l..real].iter().all(|&m| m != 0.0);
            if !tail || attn[real..].iter().any(|&a| a) {
                return None;
            }
            splits.push((l.max(1).min(real), real));
        }
        let mut index: std::collections::HashMap<&[i64], usize> = Default::default();
        let (mut prompt_rows, mut owners) = (Vec::new(), Vec::with_capacity(rows));
        for (r, &(l, _)) in splits.iter().enumerate() {
            let key = &batch.tokens[r * len..r * len + l];
            let o = *index.entry(key).or_insert_with(|| {
                prompt_rows.push(key);
                prompt_rows.len() - 1
            });
            owners.push(o);
        }
        let prompt_lens: Vec<usize> = prompt_rows.iter().map(|p| p.len().max(1)).collect();
        let completion_lens: Vec<usize> = splits.iter().map(|&(l, real)| real - l).collect();
        if completion_lens.iter().all(|&c| c == 0) {
            return None;
        }
        let lp = prompt_lens.iter().max()?.next_multiple_of(SUM_BLOCK);
        let ls = completion_lens.iter().max()?.next_multiple_of(SUM_BLOCK);
        let mut prompts = vec![0i64; prompt_rows.len() * lp];
        for (o, p) in prompt_rows.iter().enumerate() {
            prompts[o * lp..o * lp + p.len()].copy_from_slice(p);
        }
        let mut completions = vec![0i64; rows * ls];
        for (r, &(l, real)) in splits.iter().enumerate() {
            completions[r * ls..r * ls + real - l]
                .copy_from_slice(&batch.tokens[r * len + l..r * len + real]);
        }
        Some(Self {
            layout: SharedLayout {
                prompt_lens,
                owners,
                completion_lens,
            },
            prompts,
            prompt_len: lp,
            completions,
            completion_len: ls,
        })
    }

    /// For every completion token, in [`CompletionRows`]' order (row-major), the row of
    /// `cat([prompt_hidden [p·lp, e]; completion_hidden [n·ls, e]])` that predicts it: the
    /// prompt's last position for the first token, the completion's previous one after that.
    pub fn predicting_rows(&self) -> Vec<i64> {
        let (lp, ls) = (self.prompt_len, self.completion_len);
        let base = self.layout.prompt_lens.len() * lp;
        let mut out = Vec::new();
        for (r, (&o, &c)) in self
            .layout
            .owners
            .iter()
            .zip(&self.layout.completion_lens)
            .enumerate()
        {
            for m in 0..c {
                out.push(if m == 0 {
                    o * lp + self.layout.prompt_lens[o] - 1
                } else {
                    base + r * ls + m - 1
                } as i64);
            }
        }
        out
    }
}

/// [`crate::logps::completion_logps`]'s result for a collated batch, each prompt computed once;
/// `None` when the batch does not share prompts ([`SharedRows::from_batch`]).
pub fn shared_prompt_logps<B: Backend>(
    model: &Llama<B>,
    batch: &PreferenceBatch,
    device: &B::Device,
) -> Option<SequenceLogps<B>> {
    let rows = SharedRows::from_batch(batch)?;
    // The per-row sum runs over `len - 1` positions: padded to a multiple of SUM_BLOCK.
    let len = (batch.len - 1).next_multiple_of(SUM_BLOCK) + 1;
    let (mut tokens, mut mask) = (vec![0i64; batch.rows * len], vec![0f32; batch.rows * len]);
    for r in 0..batch.rows {
        let (from, to) = (
            r * batch.len..(r + 1) * batch.len,
            r * len..r * len + batch.len,
        );
        tokens[to.clone()].copy_from_slice(&batch.tokens[from.clone()]);
        mask[to].copy_from_slice(&batch.completion_mask[from]);
    }
    let plan = CompletionRows::new(&tokens, &mask, batch.rows, len);
    let index = rows.predicting_rows();
    debug_assert_eq!(index.len(), plan.count());
    let (p, n) = (rows.layout.prompt_lens.len(), batch.rows);
    let int = |v: Vec<i64>, shape: [usize; 2]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device)
    };
    let (ph, ch) = model.forward_hidden_shared(
        int(rows.prompts.clone(), [p, rows.prompt_len]),
        int(rows.completions.clone(), [n, rows.completion_len]),
        &rows.layout,
    );
    let e = ph.dims()[2];
    let hidden = Tensor::cat(
        vec![
            ph.reshape([p * rows.prompt_len, e]),
            ch.reshape([n * rows.completion_len, e]),
        ],
        0,
    );
    let k = index.len();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [k]), device);
    let logits = model.logits_rows(hidden.select(0, index));
    let targets =
        Tensor::<B, 1, Int>::from_data(TensorData::new(plan.targets.clone(), [k]), device);
    Some(scatter_logps(target_logps(logits, targets), &plan, device))
}
