//! Completion log-probs of collated `[chosen; rejected; base]` batches (the LM head only at
//! completion positions), and the reference pass over every example.

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::Llama;
use bapo_objective::{scatter_logps, sequence_logps, target_logps, CompletionRows, SequenceLogps};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::train_config::ReferenceLogps;

/// Per-row summed and mean completion log-probs of a collated batch (each prompt computed once
/// for its two or three completions when `share_prompts` is set and the batch allows it:
/// [`crate::shared_prompt`]; otherwise every row is a full right-padded sequence; the two agree
/// to float rounding, so the choice is recorded where numbers are cached).
///
/// # Shapes
/// outputs `[rows]` each.
pub fn batch_logps<B: Backend>(
    model: &Llama<B>,
    batch: &PreferenceBatch,
    share_prompts: bool,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    if share_prompts {
        if let Some(out) = crate::shared_prompt::shared_prompt_logps(model, batch, device) {
            return (out.sum, out.mean);
        }
    }
    let shape = [batch.rows, batch.len];
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.tokens.clone(), shape), device);
    let attn =
        Tensor::<B, 2, Bool>::from_data(TensorData::new(batch.attention.clone(), shape), device);
    let out = completion_logps(
        model,
        tokens,
        attn,
        &batch.tokens,
        &batch.completion_mask,
        device,
    );
    (out.sum, out.mean)
}

/// The LM-head logits of every completion token of a collated batch (`[k, v]`, `k =
/// plan.count()`, in [`CompletionRows`]' row-major order: row by row, position by position),
/// computed as [`batch_logps`] computes them (prompts shared when `share_prompts` is set),
/// with the plan they follow; `None` when the batch has no completion token. For callers that
/// need whole distributions at the scored positions (token KL), not only the targets' log-probs.
pub fn completion_logits<B: Backend>(
    model: &Llama<B>,
    batch: &PreferenceBatch,
    share_prompts: bool,
    device: &B::Device,
) -> Option<(Tensor<B, 2>, CompletionRows)> {
    if share_prompts {
        if let Some(out) = crate::shared_prompt::shared_prompt_logits(model, batch, device) {
            return Some(out);
        }
    }
    let (b, s) = (batch.rows, batch.len);
    let plan = CompletionRows::new(&batch.tokens, &batch.completion_mask, b, s);
    if plan.count() == 0 {
        return None;
    }
    let tokens =
        Tensor::<B, 2, Int>::from_data(TensorData::new(batch.tokens.clone(), [b, s]), device);
    let attn =
        Tensor::<B, 2, Bool>::from_data(TensorData::new(batch.attention.clone(), [b, s]), device);
    Some((
        completion_rows_logits(model, tokens, attn, &plan, device),
        plan,
    ))
}

/// Completion log-probs of a right-padded batch with the LM head applied only where a logit is
/// used: the final hidden states of the positions that predict a completion token are gathered
/// (`[n, e]`, `n` = completion tokens), projected, and reduced to `logit[target] − logsumexp`.
/// Prompt and padding positions never reach the head. Same values and shift-by-one convention
/// as `sequence_logps(model.forward(..))`.
///
/// # Shapes
/// `tokens`, `attn`: `[b, s]`; `host_tokens`, `host_mask`: the same, row-major on the host.
pub fn completion_logps<B: Backend>(
    model: &Llama<B>,
    tokens: Tensor<B, 2, Int>,
    attn: Tensor<B, 2, Bool>,
    host_tokens: &[i64],
    host_mask: &[f32],
    device: &B::Device,
) -> SequenceLogps<B> {
    let [b, s] = tokens.dims();
    let plan = CompletionRows::new(host_tokens, host_mask, b, s);
    if plan.count() == 0 {
        // Nothing to score: keep the full path (zero sums, still a graph through the model).
        let mask = Tensor::<B, 2>::from_data(TensorData::new(host_mask.to_vec(), [b, s]), device);
        return sequence_logps(model.forward(tokens.clone(), Some(attn)), tokens, mask);
    }
    let n = plan.count();
    let logits = completion_rows_logits(model, tokens, attn, &plan, device);
    let targets =
        Tensor::<B, 1, Int>::from_data(TensorData::new(plan.targets.clone(), [n]), device);
    scatter_logps(target_logps(logits, targets), &plan, device)
}

/// The logits of the positions `plan` names, from a full forward pass of right-padded rows.
fn completion_rows_logits<B: Backend>(
    model: &Llama<B>,
    tokens: Tensor<B, 2, Int>,
    attn: Tensor<B, 2, Bool>,
    plan: &CompletionRows,
    device: &B::Device,
) -> Tensor<B, 2> {
    let [b, s] = tokens.dims();
    let hidden = model.forward_hidden(tokens, Some(attn));
    let e = hidden.dims()[2];
    let n = plan.count();
    let pos = Tensor::<B, 1, Int>::from_data(TensorData::new(plan.positions.clone(), [n]), device);
    let picked = hidden.reshape([b * s, e]).select(0, pos);
    model.logits_rows(picked.reshape([n, e]))
}

pub fn to_host<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("float")
}

/// Reference log-probs of every example (needs base responses), `batch_size` pairs at a time;
/// [`crate::concurrent::default_threads`] batches at once (the same numbers: every batch is
/// computed exactly as alone).
pub fn reference_logps<B: Backend>(
    reference: &Llama<B>,
    examples: &[EncodedExample],
    batch_size: usize,
    pad_id: u32,
    share_prompts: bool,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Vec<ReferenceLogps> {
    let one = |chunk: &[EncodedExample]| {
        let refs: Vec<&EncodedExample> = chunk.iter().collect();
        let batch = PreferenceBatch::collate(&refs, pad_id);
        assert!(
            batch.has_base,
            "reference_logps needs base responses on every example"
        );
        let (sum, mean) = batch_logps(reference, &batch, share_prompts, device);
        let (sum, mean) = (to_host(sum), to_host(mean));
        let n = chunk.len();
        (0..n)
            .map(|i| ReferenceLogps {
                sum: [sum[i], sum[n + i], sum[2 * n + i]],
                mean: [mean[i], mean[n + i], mean[2 * n + i]],
            })
            .collect::<Vec<_>>()
    };
    let chunks: Vec<&[EncodedExample]> = examples.chunks(batch_size.max(1)).collect();
    let mut finished = 0;
    let parts = crate::concurrent::map_ordered(
        &chunks,
        crate::concurrent::default_threads(),
        |chunk| one(chunk),
        |_, part| {
            finished += part.len();
            progress(finished);
        },
    );
    parts.into_iter().flatten().collect()
}
