//! The Llama-family decoder: embedding, `num_layers` pre-norm blocks (grouped-query attention
//! with rotate-half RoPE, SwiGLU MLP), final RMSNorm, tied or untied LM head.
//!
//! Every block is a `Module`; shapes use `b` batch, `s` new positions, `t` key positions
//! (cache + new), `h` query heads, `g` key/value heads, `d` head dim, `e` hidden size,
//! `v` vocabulary.

use burn::module::{Module, Param};
use burn::nn::{Dropout, Embedding, Linear, RmsNorm};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use std::sync::Arc;

use crate::config::LlamaConfig;
use crate::quant::QuantWeight;

/// Key/value cache of one attention layer.
///
/// # Shapes
/// `k`, `v`: `[b, g, t, d]`; `append_order`: `[b · (t + s)]`.
#[derive(Clone, Debug)]
pub struct LayerCache<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    /// When set, the next call's keys/values, once appended (`t + s` per row), are reordered
    /// along the key axis: key `j` of row `r` becomes flat entry `append_order[r·(t + s) + j]`
    /// (`r·(t + s) + source position`). Used by [`crate::shared_prompt`] to put a completion's
    /// keys right after its prompt's real ones, where a full sequence has them.
    pub append_order: Option<Tensor<B, 1, Int>>,
}

/// Key/value cache of the whole model: one entry per layer, empty before the first call.
#[derive(Clone, Debug, Default)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<LayerCache<B>>>,
}

impl<B: Backend> KvCache<B> {
    /// Number of cached key positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|c| c.k.dims()[2])
            .unwrap_or(0)
    }
    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rotary position tables for one forward pass, materialised once in the projections' own
/// layout `[b, s, heads, d]` for the query and for the key heads (rotate-half layout: the two
/// halves repeat the frequencies) and shared by every layer. Every operand of the rotation then
/// has one shape and layout, so CPU backends take their contiguous element-wise path (measured:
/// a strided `[b, 1, s, d]` broadcast was 7 % of a SmolLM2 forward on flex).
#[derive(Clone, Debug)]
pub struct Rope<B: Backend> {
    /// `(cos, sin)`, each `[b, s, num_heads, d]`, every head's row the same (the fused
    /// `bapo_kernels::rope` reads the first head's).
    pub query: (Tensor<B, 4>, Tensor<B, 4>),
    /// `(cos, sin)`, each `[b, s, num_kv_heads, d]`.
    pub key: (Tensor<B, 4>, Tensor<B, 4>),
}

impl<B: Backend> Rope<B> {
    /// Builds the tables for integer `positions` `[b, s]` and the `head_dim / 2` inverse
    /// frequencies `inv_freq` ([`LlamaConfig::rope_inv_freq`]: `theta^(-2i/d)`, scaled).
    pub fn new(
        positions: Tensor<B, 2, Int>,
        inv_freq: &[f32],
        num_heads: usize,
        num_kv_heads: usize,
    ) -> Self {
        let [b, s] = positions.dims();
        let device = positions.device();
        let half = inv_freq.len();
        let head_dim = 2 * half;
        let inv_freq =
            Tensor::<B, 1>::from_data(TensorData::new(inv_freq.to_vec(), [half]), &device)
                .reshape([1, 1, half]);
        let angles = positions.float().reshape([b, s, 1]) * inv_freq; // [b, s, d/2]
        let angles = Tensor::cat(vec![angles.clone(), angles], 2).reshape([b, s, 1, head_dim]);
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        // A broadcast add into zeros materialises a table contiguously.
        let table = |x: &Tensor<B, 4>, heads: usize| {
            Tensor::<B, 4>::zeros([b, s, heads, head_dim], &device) + x.clone()
        };
        Self {
            query: (table(&cos, num_heads), table(&sin, num_heads)),
            key: (table(&cos, num_kv_heads), table(&sin, num_kv_heads)),
        }
    }

    /// Rotates `x` `[b, s, heads, d]` (contiguous) with `tables` of the same shape:
    /// `x·cos + rotate_half(x)·sin`.
    pub fn apply(x: Tensor<B, 4>, tables: &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * tables.0.clone() + rotated * tables.1.clone()
    }
}

/// A low-rank adapter: `Δ(x) = scale · dropout(x) · A · B`, `scale = alpha / rank`.
///
/// # Shapes
/// `a`: `[in, r]`, `b`: `[r, out]` (`b` starts at zero, so a fresh adapter changes nothing).
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    pub a: Param<Tensor<B, 2>>,
    pub b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

/// A projection: a (usually frozen) `Linear` plus an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct Proj<B: Backend> {
    pub linear: Linear<B>,
    pub lora: Option<Lora<B>>,
    /// The frozen weight in its GGUF blocks (`[out, in]`), `linear.weight` then a placeholder
    /// ([`crate::quant`]).
    #[module(skip)]
    pub quant: Option<Arc<QuantWeight>>,
}

impl<B: Backend> Proj<B> {
    /// Wraps a plain linear layer (no adapter).
    pub fn new(linear: Linear<B>) -> Self {
        Self {
            linear,
            lora: None,
            quant: None,
        }
    }

    /// A projection whose frozen weight `w` (`[out, in]`) stays in its GGUF blocks.
    pub fn quantised(w: Arc<QuantWeight>, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        let [out, inp] = w.shape();
        Self {
            linear: linear(crate::quant::placeholder(inp, out, device), bias),
            lora: None,
            quant: Some(w),
        }
    }

    /// The frozen part, `x·W (+ bias)`, for `x` `[n, in]`.
    fn base(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.quant {
            Some(q) => crate::precision::add_bias(&self.linear, crate::quant::matmul(x, q)),
            None => crate::split::linear(&self.linear, x),
        }
    }

    /// # Shapes
    /// `[b, s, in]` → `[b, s, out]`.
    ///
    /// The batch and sequence axes are merged first so every weight is used in one 2-D matmul:
    /// a batched `[b, s, in] × [1, in, out]` matmul repacks the weight once per batch row on
    /// CPU backends (measured: 16× slower decoding at batch 16 on ndarray).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, i] = x.dims();
        let x = x.reshape([b * s, i]);
        let y = match &self.lora {
            None => self.base(x),
            Some(l) => {
                // The scale multiplies the rank-r intermediate, not the `[n, out]` result:
                // one pass over `n·r` values instead of `n·out`, forward and backward.
                let delta = l
                    .dropout
                    .forward(x.clone())
                    .matmul(l.a.val())
                    .mul_scalar(l.scale)
                    .matmul(l.b.val());
                self.base(x) + delta
            }
        };
        let o = y.dims()[1];
        y.reshape([b, s, o])
    }
}

/// Grouped-query self-attention, with Qwen3's per-head RMSNorm of queries and keys (before
/// RoPE) when `q_norm`/`k_norm` are present.
///
/// The `r = h / g` query heads that share a key/value head are folded into the row axis of one
/// product per key/value head (`[s·r, d] × [d, t]`), so keys and values are never repeated per
/// query head: no `[b, h, t, d]` copies forward, no group sums backward.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Proj<B>,
    pub k_proj: Proj<B>,
    pub v_proj: Proj<B>,
    pub o_proj: Proj<B>,
    /// RMSNorm over each query head's `d` values (Qwen3), `None` for Llama.
    pub q_norm: Option<RmsNorm<B>>,
    /// RMSNorm over each key head's `d` values (Qwen3), `None` for Llama.
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - `x`: `[b, s, e]`; `bias`: `[b, g, s·r, t]` from [`attention_bias`].
    /// - output: `[b, s, e]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Tensor<B, 4>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, g, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let r = h / g;
        let mut q = self.q_proj.forward(x.clone()).reshape([b, s, h, d]);
        if let Some(n) = &self.q_norm {
            q = norm(n, q);
        }
        // Query heads gi·r .. gi·r + r serve key/value head gi (HF's `repeat_kv` order), so the
        // contiguous `[b, s, g, r·d]` view groups them; rows of a group are (position, head).
        let scale = (d as f64).powf(-0.5);
        let q = to_heads(q.reshape([b, s, g, r * d]), Some(&rope.query), scale).reshape([
            b,
            g,
            s * r,
            d,
        ]);
        let mut k = self.k_proj.forward(x.clone()).reshape([b, s, g, d]);
        if let Some(n) = &self.k_norm {
            k = norm(n, k);
        }
        let mut k = to_heads(k, Some(&rope.key), 1.0); // [b, g, s, d]
        let mut v = to_heads(self.v_proj.forward(x).reshape([b, s, g, d]), None, 1.0);
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                k = Tensor::cat(vec![prev.k, k], 2);
                v = Tensor::cat(vec![prev.v, v], 2);
                if let Some(order) = prev.append_order {
                    k = reorder_keys(k, order.clone());
                    v = reorder_keys(v, order);
                }
            }
            *slot = Some(LayerCache {
                k: k.clone(),
                v: v.clone(),
                append_order: None,
            });
        }
        let scores = q.matmul(k.swap_dims(2, 3)); // [b, g, s·r, t]
        let out = biased_softmax(scores, bias).matmul(v); // [b, g, s·r, d]
        let out = to_heads(out.reshape([b, g, s, r * d]), None, 1.0).reshape([b, s, h * d]);
        self.o_proj.forward(out)
    }
}

/// `x` `[b, p, q, m]` as `[b, q, p, m]` (attention's layout changes), each head of `d` values
/// rotated by `rope`'s tables (positions along `p`, `d` the tables' last axis) and multiplied
/// by `scale` when `rope` is given: one pass on burn-flex with feature `flex`
/// (`bapo_kernels::rope`, the same bits as these ops), [`Rope::apply`], `mul_scalar` and
/// `swap_dims` everywhere else.
fn to_heads<B: Backend>(
    x: Tensor<B, 4>,
    rope: Option<&(Tensor<B, 4>, Tensor<B, 4>)>,
    scale: f64,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let x = match bapo_kernels::rope::swap_heads(x, rope.map(|(c, s)| (c, s)), scale as f32) {
        Ok(y) => return y,
        Err(x) => x,
    };
    let Some(tables) = rope else {
        return x.swap_dims(1, 2);
    };
    let [b, p, q, m] = x.dims();
    let d = tables.0.dims()[3];
    let rotated = Rope::apply(x.reshape([b, p, q * m / d, d]), tables);
    let rotated = if scale == 1.0 {
        rotated
    } else {
        rotated.mul_scalar(scale)
    };
    rotated.reshape([b, p, q, m]).swap_dims(1, 2)
}

/// `x` `[b, g, t, d]` with key `j` of row `r` taken from flat key `order[r·t + j]` (see
/// [`LayerCache::append_order`]).
fn reorder_keys<B: Backend>(x: Tensor<B, 4>, order: Tensor<B, 1, Int>) -> Tensor<B, 4> {
    let [b, g, t, d] = x.dims();
    x.swap_dims(1, 2)
        .reshape([b * t, g * d])
        .select(0, order)
        .reshape([b, t, g, d])
        .swap_dims(1, 2)
}

/// `softmax(scores + bias)` over the last axis: one fused pass on burn-flex with feature `flex`
/// (`bapo_kernels::softmax`, within float rounding, and its own backward keeping only the
/// output), [`softmax_same_ops`] everywhere else.
fn biased_softmax<B: Backend>(scores: Tensor<B, 4>, bias: Tensor<B, 4>) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (scores, bias) = match bapo_kernels::softmax::softmax(scores, bias) {
        Ok(p) => return p,
        Err(inputs) => inputs,
    };
    softmax_same_ops(scores + bias)
}

/// Softmax over the last axis as explicit primitive ops (detached max, subtract, exp, sum,
/// divide), so that the autodiff backend (which has no fused softmax and decomposes it) and the
/// inner backend (which may have a fused one, e.g. flex) compute it with the same operations in
/// the same order: the reference pass and the policy at step 1 then agree bit for bit and the
/// anchor's hinge starts exactly on its kink (measured: flex's fused softmax differs from the
/// decomposition by an ulp, enough to switch the anchor on for half a batch).
fn softmax_same_ops<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let max = x.clone().detach().max_dim(3);
    let e = (x - max).exp();
    e.clone() / e.sum_dim(3)
}

/// The additive form of an attention mask for [`Attention::forward`]'s grouped layout: `0`
/// where a query may see a key, `-1e30` where `mask` forbids it, materialised once per forward
/// pass and shared by every layer (a contiguous add costs a fraction of a strided `mask_fill`,
/// and its gradient is the identity).
///
/// # Shapes
/// `mask`: `[b, 1, s, t]`, `true` where attention is forbidden → `[b, g, s·r, t]`, row
/// `i·r + j` for position `i` and query head `j` of the group.
pub fn attention_bias<B: Backend>(
    mask: Tensor<B, 4, Bool>,
    num_kv_heads: usize,
    group: usize,
) -> Tensor<B, 4> {
    let [b, _, s, t] = mask.dims();
    let bias = Tensor::<B, 4>::zeros([b, 1, s, t], &mask.device()).mask_fill(mask, -1.0e30);
    bias.reshape([b, 1, s, 1, t])
        .expand([b, num_kv_heads, s, group, t])
        .reshape([b, num_kv_heads, s * group, t])
}

/// SwiGLU feed-forward: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Proj<B>,
    pub up_proj: Proj<B>,
    pub down_proj: Proj<B>,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// `[b, s, e]` → `[b, s, e]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj.forward(gated(gate, self.up_proj.forward(x)))
    }

    /// `self.forward(norm(x))`, the norm as the model computes it (the fused kernel on
    /// burn-flex): a block's feed-forward half without its residual.
    pub fn forward_normed(&self, norm_layer: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward(norm(norm_layer, x))
    }
}

/// `silu(gate) · up`: one fused pass on burn-flex with feature `flex` (`bapo_kernels::swiglu`,
/// equal within float rounding), Burn's ops everywhere else.
fn gated<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    let (gate, up) = match bapo_kernels::swiglu::swiglu(gate, up) {
        Ok(h) => return h,
        Err(inputs) => inputs,
    };
    silu(gate) * up
}

/// RMSNorm over the last axis: one fused pass on burn-flex with feature `flex`
/// (`bapo_kernels::rmsnorm`, within float rounding of Burn's, and its own backward keeping `x`
/// and one `rstd` a row), Burn's `RmsNorm::forward` everywhere else.
fn norm<B: Backend, const D: usize>(n: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let x = match bapo_kernels::rmsnorm::rms_norm(x, n.gamma.val(), n.epsilon) {
        Ok(y) => return y,
        Err((x, _)) => x,
    };
    n.forward(x)
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    /// # Shapes
    /// `x`: `[b, s, e]` → `[b, s, e]`; `bias` as in [`Attention::forward`].
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &Rope<B>,
        bias: Tensor<B, 4>,
        cache: Option<&mut Option<LayerCache<B>>>,
    ) -> Tensor<B, 3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(norm(&self.input_layernorm, x), rope, bias, cache);
        // `mlp(norm(x))`, or a trainer's recomputing version of it (`crate::checkpoint`).
        x.clone() + crate::checkpoint::mlp(&self.mlp, &self.post_attention_layernorm, x)
    }
}

/// A Llama-family causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub layers: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    pub head_dim: usize,
    /// RoPE's inverse frequencies ([`LlamaConfig::rope_inv_freq`]), `head_dim / 2` of them.
    #[module(skip)]
    pub rope_inv_freq: Vec<f32>,
    /// The embedding in its GGUF blocks (`[vocab, e]`; also the tied head), `embed_tokens` then
    /// a placeholder ([`crate::quant`]).
    #[module(skip)]
    pub quant_embed: Option<Arc<QuantWeight>>,
    /// The untied head in its GGUF blocks (`[vocab, e]`), `lm_head` then a placeholder.
    #[module(skip)]
    pub quant_head: Option<Arc<QuantWeight>>,
}

impl<B: Backend> Llama<B> {
    /// Logits for right-padded sequences (the training/scoring path).
    ///
    /// # Shapes
    /// - `tokens`: `[b, s]`; `attention_mask`: `[b, s]`, `true` on real tokens (`None`: all real).
    /// - output: `[b, s, v]`; position `i` predicts token `i + 1`.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let hidden = self.forward_hidden(tokens, attention_mask);
        self.logits(hidden)
    }

    /// Final hidden states (after the last RMSNorm), for callers that project chunks themselves.
    ///
    /// # Shapes
    /// `[b, s]` → `[b, s, e]`.
    pub fn forward_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let (positions, mask) = right_padded::<B>(tokens.dims(), attention_mask, &tokens.device());
        self.forward_blocks(tokens, positions, mask, None)
    }

    /// [`Llama::forward_hidden`] that also keeps every layer's keys/values in `cache` (which
    /// must be empty): the prefill of right-padded rows, for a continuation to run against.
    pub fn forward_hidden_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        assert!(
            cache.is_empty(),
            "forward_hidden_cached: the cache is not empty"
        );
        let (positions, mask) = right_padded::<B>(tokens.dims(), attention_mask, &tokens.device());
        self.forward_cached(tokens, positions, mask, cache)
    }

    /// One step of cached decoding (or the prefill): runs `tokens` at `positions` against
    /// everything in `cache`, appends their keys/values, and returns final hidden states.
    ///
    /// # Shapes
    /// - `tokens`, `positions`: `[b, s]`; `mask`: `[b, 1, s, t]` with `t = cache.len() + s`,
    ///   `true` where attention is forbidden.
    /// - output: `[b, s, e]`.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        mask: Tensor<B, 4, Bool>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        self.forward_blocks(tokens, positions, mask, Some(cache))
    }

    fn forward_blocks(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: Tensor<B, 2, Int>,
        mask: Tensor<B, 4, Bool>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        // In the norms' type: the embedding may be kept in f16 (`Llama::with_weight_dtype`).
        let mut x = match &self.quant_embed {
            Some(q) => crate::quant::embed(tokens, q),
            None => self.embed_tokens.forward(tokens),
        };
        let activations = self.norm.gamma.val().dtype();
        if x.dtype() != activations {
            x = x.cast(activations);
        }
        if let Some(a) = self.layers.first().map(|l| &l.self_attn) {
            let (h, g) = (a.num_heads, a.num_kv_heads);
            let rope = Rope::new(positions, &self.rope_inv_freq, h, g);
            let bias = attention_bias(mask, g, h / g);
            for (i, layer) in self.layers.iter().enumerate() {
                let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                x = layer.forward(x, &rope, bias.clone(), slot);
            }
        }
        norm(&self.norm, x)
    }

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Shapes
    /// `[b, s, e]` → `[b, s, v]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        if let Some(q) = self.quantised_head() {
            let [b, s, e] = hidden.dims();
            let y = crate::quant::matmul(hidden.reshape([b * s, e]), q);
            let v = y.dims()[1];
            return y.reshape([b, s, v]);
        }
        match &self.lm_head {
            Some(head) => {
                let [b, s, e] = hidden.dims();
                let y = crate::split::linear(head, hidden.reshape([b * s, e]));
                let v = y.dims()[1];
                y.reshape([b, s, v])
            }
            None => {
                // Tied head: `W·hᵀ` with the embedding `W` `[v, e]` as stored (contiguous), then
                // transpose the small result; `h·Wᵀ` would repack the whole matrix every call.
                let [b, s, e] = hidden.dims();
                let w = self.embed_tokens.weight.val();
                let v = w.dims()[0];
                crate::split::matmul_rows(w, hidden.reshape([b * s, e]).transpose())
                    .transpose()
                    .reshape([b, s, v])
            }
        }
    }
}

impl<B: Backend> Llama<B> {
    /// The head in GGUF blocks: the untied head's, or the tied embedding's.
    fn quantised_head(&self) -> Option<&Arc<QuantWeight>> {
        match &self.lm_head {
            Some(_) => self.quant_head.as_ref(),
            None => self.quant_embed.as_ref(),
        }
    }

    /// Logits of a set of final hidden states, as `h·Wᵀ` (a contiguous `[n, v]` result: the
    /// log-softmax that follows reads it row by row). The training and scoring path.
    ///
    /// # Shapes
    /// `[n, e]` → `[n, v]`.
    pub fn logits_rows(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        if let Some(q) = self.quantised_head() {
            return crate::quant::matmul(hidden, q);
        }
        match &self.lm_head {
            Some(head) => crate::precision::linear_as_weight(head, hidden),
            None => crate::precision::matmul_as_weight(
                hidden,
                self.embed_tokens.weight.val().transpose(),
            ),
        }
    }
}

/// Positions `0..s` of every row and the causal mask of right-padded rows `[b, s]` (padding
/// keys forbidden too, when `attention_mask` marks the real tokens).
fn right_padded<B: Backend>(
    [b, s]: [usize; 2],
    attention_mask: Option<Tensor<B, 2, Bool>>,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 4, Bool>) {
    let positions = Tensor::<B, 1, Int>::arange(0..s as i64, device)
        .reshape([1, s])
        .expand([b, s]);
    let causal = causal_mask::<B>(b, s, device);
    let mask = match attention_mask {
        Some(m) => causal.bool_or(m.bool_not().reshape([b, 1, 1, s]).expand([b, 1, s, s])),
        None => causal,
    };
    (positions, mask)
}

/// `[b, 1, s, s]` mask, `true` above the diagonal (key after query: forbidden).
///
/// (Burn's `tril_mask(shape, 0)` is `true` *outside* the lower triangle, i.e. exactly there.)
pub fn causal_mask<B: Backend>(b: usize, s: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    Tensor::<B, 2, Bool>::tril_mask([s, s], 0, device)
        .reshape([1, 1, s, s])
        .expand([b, 1, s, s])
}

/// Builds a `Linear` from an `[in, out]` weight (Burn's layout) and optional bias.
pub fn linear<B: Backend>(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Linear<B> {
    Linear {
        weight: Param::from_tensor(weight),
        bias: bias.map(Param::from_tensor),
    }
}

/// Builds an `RmsNorm` from its weight.
pub fn rms_norm<B: Backend>(gamma: Tensor<B, 1>, eps: f64) -> RmsNorm<B> {
    RmsNorm {
        gamma: Param::from_tensor(gamma),
        epsilon: eps,
    }
}

impl LlamaConfig {
    /// A randomly initialised model (for tests and benchmarks; real weights come from the loaders).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        use burn::nn::{EmbeddingConfig, LinearConfig, RmsNormConfig};
        let (e, q, kv) = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let lin = |i, o, bias| Proj::new(LinearConfig::new(i, o).with_bias(bias).init(device));
        let norm_of = |n| {
            RmsNormConfig::new(n)
                .with_epsilon(self.rms_norm_eps)
                .init(device)
        };
        let norm = || norm_of(e);
        let head_norm = || self.qk_norm.then(|| norm_of(self.head_dim));
        let layers = (0..self.num_layers)
            .map(|_| Block {
                input_layernorm: norm(),
                self_attn: Attention {
                    q_proj: lin(e, q, self.qkv_bias),
                    k_proj: lin(e, kv, self.qkv_bias),
                    v_proj: lin(e, kv, self.qkv_bias),
                    o_proj: lin(q, e, false),
                    q_norm: head_norm(),
                    k_norm: head_norm(),
                    num_heads: self.num_heads,
                    num_kv_heads: self.num_kv_heads,
                    head_dim: self.head_dim,
                },
                post_attention_layernorm: norm(),
                mlp: Mlp {
                    gate_proj: lin(e, self.intermediate_size, false),
                    up_proj: lin(e, self.intermediate_size, false),
                    down_proj: lin(self.intermediate_size, e, false),
                },
            })
            .collect();
        Llama {
            embed_tokens: EmbeddingConfig::new(self.vocab_size, e).init(device),
            layers,
            norm: norm(),
            lm_head: (!self.tie_word_embeddings).then(|| {
                LinearConfig::new(e, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            head_dim: self.head_dim,
            rope_inv_freq: self.rope_inv_freq(),
            quant_embed: None,
            quant_head: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn causal_mask_forbids_only_future_keys() {
        let m = causal_mask::<NdArray>(1, 3, &Default::default())
            .into_data()
            .to_vec::<bool>()
            .unwrap();
        assert_eq!(
            m,
            vec![false, true, true, false, false, true, false, false, false]
        );
    }
}
