//! Several completions of one prompt in one pass, the prompt computed once.
//!
//! A preference batch holds each prompt three times (`[chosen; rejected; base]`). Under causal
//! attention a prompt's hidden states and keys/values do not depend on what follows it, so the
//! prompts run once (`[p, lp]`), their per-layer keys/values are selected for every completion
//! row, and the completions run against them as a cached continuation, each at its own prompt's
//! length for RoPE. Forward and backward then do the prompt's work once instead of three times
//! (the gradient of a shared prompt position is the sum of its completions', which `select`'s
//! backward adds). Each completion row's keys are reordered to a full sequence's order, so the
//! values are the right-padded batch's dot products, terms in the same places. Sums over the
//! key axis still depend on its length on some backends (ndarray adds a `len mod 8` remainder
//! last): callers that need a row's result independent of its batch pad `lp` and `ls` to a
//! multiple of 8 (`bapo_train::shared_prompt::SUM_BLOCK`).

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::model::{KvCache, LayerCache, Llama};

/// Row layout of a prompt-shared batch, in host memory.
///
/// # Shapes
/// `prompt_lens`: `[p]` real tokens of each right-padded prompt row (every one ≥ 1);
/// `owners`, `completion_lens`: `[n]`, the prompt row and real length of each completion row.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedLayout {
    pub prompt_lens: Vec<usize>,
    pub owners: Vec<usize>,
    pub completion_lens: Vec<usize>,
}

impl<B: Backend> Llama<B> {
    /// Final hidden states of right-padded `prompts` `[p, lp]` and of right-padded
    /// `completions` `[n, ls]`, completion row `r` continuing prompt row `layout.owners[r]`.
    ///
    /// Returns `(prompt_hidden [p, lp, e], completion_hidden [n, ls, e])`; completion position
    /// `j` of row `r` is the hidden state of that sequence's position `prompt_len + j`.
    ///
    /// # Panics
    /// When the layout disagrees with the tensors' shapes or a prompt is empty (callers'
    /// bugs: the training path builds both from one batch).
    pub fn forward_hidden_shared(
        &self,
        prompts: Tensor<B, 2, Int>,
        completions: Tensor<B, 2, Int>,
        layout: &SharedLayout,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [n, ls] = completions.dims();
        assert!(
            layout.owners.len() == n
                && layout.completion_lens.len() == n
                && layout.completion_lens.iter().all(|&c| c <= ls),
            "forward_hidden_shared: layout {layout:?} does not fit [{n}, {ls}]"
        );
        let (prompt_hidden, cache) = self.prefill_shared(prompts, &layout.prompt_lens);
        let completion_hidden =
            self.continue_shared(&cache, completions, &layout.owners, &layout.prompt_lens);
        (prompt_hidden, completion_hidden)
    }

    /// The prompts' pass of [`Self::forward_hidden_shared`]: hidden states `[p, lp, e]` of the
    /// right-padded `prompts` (`prompt_lens[i]` real tokens in row `i`) and their per-layer
    /// keys/values, for any number of [`Self::continue_shared`] calls (completions grouped by
    /// length, each group padded only to its own longest row).
    ///
    /// # Panics
    /// When `prompt_lens` does not fit `[p, lp]` or a prompt is empty.
    pub fn prefill_shared(
        &self,
        prompts: Tensor<B, 2, Int>,
        prompt_lens: &[usize],
    ) -> (Tensor<B, 3>, KvCache<B>) {
        let [p, lp] = prompts.dims();
        assert!(
            prompt_lens.len() == p && prompt_lens.iter().all(|&l| (1..=lp).contains(&l)),
            "prefill_shared: prompt lengths {prompt_lens:?} do not fit [{p}, {lp}]"
        );
        let real: Vec<bool> = prompt_lens
            .iter()
            .flat_map(|&len| (0..lp).map(move |k| k < len))
            .collect();
        let real =
            Tensor::<B, 2, Bool>::from_data(TensorData::new(real, [p, lp]), &prompts.device());
        let mut cache = KvCache::default();
        let hidden = self.forward_hidden_cached(prompts, Some(real), &mut cache);
        (hidden, cache)
    }

    /// Hidden states `[n, ls, e]` of right-padded `completions`, row `r` continuing prompt row
    /// `owners[r]` of `prompts` (the [`Self::prefill_shared`] that made `prompts`, with the same
    /// `prompt_lens`). Each row's values do not depend on `ls` beyond its own length's keys
    /// being in a full sequence's order (see the module's note on sums over keys).
    ///
    /// # Panics
    /// When an owner is out of range or `prompts` holds no keys.
    pub fn continue_shared(
        &self,
        prompts: &KvCache<B>,
        completions: Tensor<B, 2, Int>,
        owners: &[usize],
        prompt_lens: &[usize],
    ) -> Tensor<B, 3> {
        let [n, ls] = completions.dims();
        let lp = prompts.len();
        assert!(
            lp > 0 && owners.len() == n && owners.iter().all(|&o| o < prompt_lens.len()),
            "continue_shared: owners {owners:?} do not fit {} prompts of {lp} keys and {n} rows",
            prompt_lens.len()
        );
        let device = completions.device();
        // Every completion row gets its prompt's keys/values.
        let rows = Tensor::<B, 1, Int>::from_data(
            TensorData::new(owners.iter().map(|&o| o as i64).collect(), [n]),
            &device,
        );
        // Keys in a full sequence's order: the prompt's real keys, the completion's, then the
        // prompt's padding (masked). A sum over keys then meets its terms in the same places
        // as for the right-padded sequence, whatever prompt lengths share the batch (measured:
        // with the padding between prompt and completion, ndarray's results moved by an ulp
        // with the batch's longest prompt).
        let t = lp + ls;
        let order: Vec<i64> = owners
            .iter()
            .enumerate()
            .flat_map(|(r, &o)| {
                let l = prompt_lens[o];
                (0..t).map(move |j| {
                    let src = if j < l {
                        j
                    } else if j < l + ls {
                        lp + j - l
                    } else {
                        j - ls
                    };
                    (r * t + src) as i64
                })
            })
            .collect();
        let order = Tensor::<B, 1, Int>::from_data(TensorData::new(order, [n * t]), &device);
        let mut cache = KvCache {
            layers: prompts
                .layers
                .iter()
                .map(|layer| {
                    let c = layer.as_ref().expect("every layer cached its prompt keys");
                    Some(LayerCache {
                        k: c.k.clone().select(0, rows.clone()),
                        v: c.v.clone().select(0, rows.clone()),
                        append_order: Some(order.clone()),
                    })
                })
                .collect(),
        };
        // The completions: position `len + j`, seeing (in that order) their prompt's real keys
        // and themselves causally: key `j` is visible to completion query `q` iff `j <= len + q`.
        let pos: Vec<i64> = owners
            .iter()
            .flat_map(|&o| (0..ls).map(move |j| (prompt_lens[o] + j) as i64))
            .collect();
        let positions = Tensor::<B, 2, Int>::from_data(TensorData::new(pos, [n, ls]), &device);
        let mut forbid = Vec::with_capacity(n * ls * t);
        for &o in owners {
            for q in 0..ls {
                forbid.extend((0..t).map(|k| k > prompt_lens[o] + q));
            }
        }
        let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(forbid, [n, 1, ls, t]), &device);
        self.forward_cached(completions, positions, mask, &mut cache)
    }
}
