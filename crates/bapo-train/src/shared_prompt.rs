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
    /// The split of `batch`, when its rows follow [`PreferenceBatch::collate`]'s contract: row
    /// `r` repeats row `r mod pairs`'s prompt (checked token by token), every prompt has at
    /// least one token (position 0 is never scored, so an empty prompt changes what is), and
    /// some completion token exists. `None` otherwise: the caller takes the plain path.
    pub fn from_batch(batch: &PreferenceBatch) -> Option<Self> {
        let (rows, len, p) = (batch.rows, batch.len, batch.pairs);
        if p == 0 || rows % p != 0 {
            return None;
        }
        let mut prompt_of = Vec::with_capacity(rows);
        let mut completion_lens = Vec::with_capacity(rows);
        for r in 0..rows {
            let attn = &batch.attention[r * len..(r + 1) * len];
            let mask = &batch.completion_mask[r * len..(r + 1) * len];
            let real = attn.iter().take_while(|&&a| a).count();
            let c = mask.iter().filter(|&&m| m != 0.0).count();
            let l = real.checked_sub(c)?;
            // Right-padded, completion exactly the real tail.
            let tail_ok =
                mask[..l].iter().all(|&m| m == 0.0) && mask[l..real].iter().all(|&m| m != 0.0);
            if !tail_ok || attn[real..].iter().any(|&a| a) {
                return None;
            }
            prompt_of.push(l);
            completion_lens.push(c);
        }
        let prompt_lens: Vec<usize> = prompt_of[..p].to_vec();
        for r in p..rows {
            let (o, l) = (r % p, prompt_of[r]);
            if l != prompt_lens[o]
                || batch.tokens[r * len..r * len + l] != batch.tokens[o * len..o * len + l]
            {
                return None;
            }
        }
        if prompt_lens.contains(&0) || completion_lens.iter().all(|&c| c == 0) {
            return None;
        }
        let lp = *prompt_lens.iter().max()?;
        let ls = *completion_lens.iter().max()?;
        let mut prompts = vec![0i64; p * lp];
        for (o, &l) in prompt_lens.iter().enumerate() {
            prompts[o * lp..o * lp + l].copy_from_slice(&batch.tokens[o * len..o * len + l]);
        }
        let mut completions = vec![0i64; rows * ls];
        for r in 0..rows {
            let (l, c) = (prompt_of[r], completion_lens[r]);
            completions[r * ls..r * ls + c]
                .copy_from_slice(&batch.tokens[r * len + l..r * len + l + c]);
        }
        Some(Self {
            layout: SharedLayout {
                prompt_lens,
                owners: (0..rows).map(|r| r % p).collect(),
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
    let plan = CompletionRows::new(&batch.tokens, &batch.completion_mask, batch.rows, batch.len);
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
