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

/// Rows of one continuation pass: completion rows of about the same length, padded only to
/// their own longest (rounded up to [`SUM_BLOCK`]). A row's last completion token is left out:
/// it predicts nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionGroup {
    /// Batch rows, ascending.
    pub rows: Vec<usize>,
    /// `[rows.len(), len]`, right-padded with 0; entry `i` is batch row `rows[i]`'s completion
    /// without its last token.
    pub tokens: Vec<i64>,
    pub len: usize,
}

/// Positions a continuation pass is charged beyond its rows', for its fixed per-op cost (an
/// estimate for CPUs: a position's forward pass on SmolLM2 is ≈ 0.27 GFLOP, ≈ 3 ms at the
/// ≈ 90 GFLOP/s of flex's GEMM on 2 threads, and a pass's ≈ 600 ops at tens of µs each cost
/// a few such positions). Only decides where runs are cut, never a value.
const GROUP_OVERHEAD: usize = 8;

/// Splits completion rows into contiguous runs of ascending length (`lens` sorted) minimising
/// the positions computed: `Σ rows · pad(longest)` plus [`GROUP_OVERHEAD`] per run. Returns the
/// runs' ends. Exact dynamic programme over the `n ≤` a few hundred rows of a batch.
fn length_runs(lens: &[usize]) -> Vec<usize> {
    let n = lens.len();
    let mut best = vec![(0usize, 0usize); n + 1]; // (cost, start of the last run)
    for end in 1..=n {
        best[end] = (0..end)
            .map(|start| {
                let run = (end - start) * lens[end - 1].next_multiple_of(SUM_BLOCK);
                (best[start].0 + run + GROUP_OVERHEAD, start)
            })
            .min()
            .expect("end > 0");
    }
    let mut ends = Vec::new();
    let mut end = n;
    while end > 0 {
        ends.push(end);
        end = best[end].1;
    }
    ends.reverse();
    ends
}

/// A batch split into prompt rows and completion rows (host memory, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct SharedRows {
    pub layout: SharedLayout,
    /// `[p, lp]`, right-padded with 0.
    pub prompts: Vec<i64>,
    pub prompt_len: usize,
    /// The completion rows, grouped by length ([`SharedRows::from_batch`]); rows with one
    /// completion token (or none) are in no group.
    pub groups: Vec<CompletionGroup>,
}

impl SharedRows {
    /// The split of a right-padded `batch` (completion = each row's real tail, as
    /// [`PreferenceBatch::from_sequences`] builds it; `None` otherwise, and the caller takes the
    /// plain path). Rows with the same prompt tokens share one prompt row, whatever pairs they
    /// belong to; every row is computed the same way whichever rows it is batched with, so the
    /// reference pass and training (which group examples differently) agree bit for bit. A row
    /// without prompt tokens moves its first token (never scored: nothing predicts position 0)
    /// into its prompt, so that every prompt row has at least one position.
    ///
    /// Completion rows are grouped by length ([`length_runs`]): in a preference batch the
    /// chosen, rejected and base answers often differ several-fold in length, and one pass
    /// would pad every row to the longest.
    pub fn from_batch(batch: &PreferenceBatch) -> Option<Self> {
        Self::from_batch_grouped(batch, true)
    }

    /// [`Self::from_batch`], with every completion row in one group when `by_length` is false.
    pub fn from_batch_grouped(batch: &PreferenceBatch, by_length: bool) -> Option<Self> {
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
        let mut prompts = vec![0i64; prompt_rows.len() * lp];
        for (o, p) in prompt_rows.iter().enumerate() {
            prompts[o * lp..o * lp + p.len()].copy_from_slice(p);
        }
        // A completion's last token predicts nothing and its first is predicted by the prompt's
        // last position: a row needs its first `len - 1` tokens run, and none when `len <= 1`.
        let run_lens: Vec<usize> = completion_lens
            .iter()
            .map(|c| c.saturating_sub(1))
            .collect();
        // Rows by that length (stable: ties keep batch order), cut into runs.
        let mut order: Vec<usize> = (0..rows).filter(|&r| run_lens[r] > 0).collect();
        order.sort_by_key(|&r| run_lens[r]);
        let ends = match (by_length, order.len()) {
            (_, 0) => vec![],
            (true, _) => length_runs(&order.iter().map(|&r| run_lens[r]).collect::<Vec<_>>()),
            (false, n) => vec![n],
        };
        let mut groups = Vec::with_capacity(ends.len());
        let mut start = 0;
        for end in ends {
            let mut members = order[start..end].to_vec();
            members.sort_unstable();
            let ls = run_lens[order[end - 1]].next_multiple_of(SUM_BLOCK);
            let mut tokens = vec![0i64; members.len() * ls];
            for (i, &r) in members.iter().enumerate() {
                let from = r * len + splits[r].0;
                tokens[i * ls..i * ls + run_lens[r]]
                    .copy_from_slice(&batch.tokens[from..from + run_lens[r]]);
            }
            groups.push(CompletionGroup {
                rows: members,
                tokens,
                len: ls,
            });
            start = end;
        }
        Some(Self {
            layout: SharedLayout {
                prompt_lens,
                owners,
                completion_lens,
            },
            prompts,
            prompt_len: lp,
            groups,
        })
    }

    /// For every completion token, in [`CompletionRows`]' order (row-major), the row of
    /// `cat([prompt_hidden [p·lp, e]; group 0's hidden [n₀·ls₀, e]; group 1's; …])` that
    /// predicts it: the prompt's last position for the first token, the completion's previous
    /// one after that.
    pub fn predicting_rows(&self) -> Vec<i64> {
        let lp = self.prompt_len;
        let n = self.layout.owners.len();
        // Where each batch row's completion starts in the concatenation, and its stride.
        let mut start = vec![0usize; n];
        let mut at = self.layout.prompt_lens.len() * lp;
        for g in &self.groups {
            for &r in &g.rows {
                start[r] = at;
                at += g.len;
            }
        }
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
                    start[r] + m - 1
                } as i64);
            }
        }
        out
    }
}

/// The LM-head logits of every completion token of a collated batch, each prompt computed
/// once (`[k, v]`, `k = plan.count()`, in [`CompletionRows`]' row-major order), with the plan
/// they follow; `None` when the batch does not share prompts ([`SharedRows::from_batch`]).
pub fn shared_prompt_logits<B: Backend>(
    model: &Llama<B>,
    batch: &PreferenceBatch,
    device: &B::Device,
) -> Option<(Tensor<B, 2>, CompletionRows)> {
    let rows = SharedRows::from_batch(batch)?;
    Some(shared_rows_logits(model, batch, &rows, device))
}

/// [`shared_prompt_logits`] for a given split of `batch` (the one [`SharedRows`] made of it).
pub fn shared_rows_logits<B: Backend>(
    model: &Llama<B>,
    batch: &PreferenceBatch,
    rows: &SharedRows,
    device: &B::Device,
) -> (Tensor<B, 2>, CompletionRows) {
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
    let p = rows.layout.prompt_lens.len();
    let int = |v: Vec<i64>, shape: [usize; 2]| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device)
    };
    let (ph, cache) = model.prefill_shared(
        int(rows.prompts.clone(), [p, rows.prompt_len]),
        &rows.layout.prompt_lens,
    );
    let e = ph.dims()[2];
    let mut parts = vec![ph.reshape([p * rows.prompt_len, e])];
    for g in &rows.groups {
        let owners: Vec<usize> = g.rows.iter().map(|&r| rows.layout.owners[r]).collect();
        let ch = model.continue_shared(
            &cache,
            int(g.tokens.clone(), [g.rows.len(), g.len]),
            &owners,
            &rows.layout.prompt_lens,
        );
        parts.push(ch.reshape([g.rows.len() * g.len, e]));
    }
    let hidden = Tensor::cat(parts, 0);
    let k = index.len();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [k]), device);
    (model.logits_rows(hidden.select(0, index)), plan)
}

/// [`crate::logps::completion_logps`]'s result for a collated batch, each prompt computed once;
/// `None` when the batch does not share prompts ([`SharedRows::from_batch`]).
pub fn shared_prompt_logps<B: Backend>(
    model: &Llama<B>,
    batch: &PreferenceBatch,
    device: &B::Device,
) -> Option<SequenceLogps<B>> {
    let (logits, plan) = shared_prompt_logits(model, batch, device)?;
    let k = plan.count();
    let targets =
        Tensor::<B, 1, Int>::from_data(TensorData::new(plan.targets.clone(), [k]), device);
    Some(scatter_logps(target_logps(logits, targets), &plan, device))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs cut where a long row would otherwise pad short ones: lengths padded to 8, 8, 40,
    /// 48, 104 cost 240 positions as three runs (2·8 + 2·48 + 104 + 3·8) against 528 as one.
    #[test]
    fn length_runs_cut_between_short_and_long_rows() {
        assert_eq!(length_runs(&[3, 5, 40, 44, 100]), vec![2, 4, 5]);
        // Equal padded lengths never pay for a second run.
        assert_eq!(length_runs(&[1, 2, 7, 8]), vec![4]);
        assert_eq!(length_runs(&[9]), vec![1]);
        assert_eq!(length_runs(&[]), Vec::<usize>::new());
    }
}
