//! [`Llama::with_weight_dtype`]: the model's frozen projection, embedding and head weights in
//! another float type (f16) for inference; the products that use them are in
//! [`crate::precision`], which documents the numbers.

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

use crate::model::Llama;

fn map_linear<B: Backend>(l: &mut Linear<B>, f: &impl Fn(Tensor<B, 2>) -> Tensor<B, 2>) {
    l.weight = l.weight.clone().map(f);
}

impl<B: Backend> Llama<B> {
    /// The model with its projection, embedding and head weights cast to `dtype` (norms and
    /// LoRA adapters unchanged), for inference only: see the module documentation.
    pub fn with_weight_dtype(self, dtype: FloatDType) -> Self {
        if burn::tensor::DType::from(dtype) == self.weight_dtype() {
            return self;
        }
        self.map_base_weights(|t| t.cast(dtype))
    }

    /// The model with `f` applied to each projection, embedding and head weight (the weights a
    /// base kept in a smaller type holds in it; norms and LoRA adapters untouched). Weights kept
    /// in GGUF blocks ([`crate::quant`]) stay as they are.
    pub fn map_base_weights(mut self, f: impl Fn(Tensor<B, 2>) -> Tensor<B, 2>) -> Self {
        if self.quant_embed.is_none() {
            let w = self.embed_tokens.weight.clone();
            self.embed_tokens.weight = w.map(&f);
        }
        if let (Some(h), None) = (self.lm_head.as_mut(), &self.quant_head) {
            map_linear(h, &f);
        }
        for l in &mut self.layers {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for p in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]
                .into_iter()
                .chain([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj])
                .filter(|p| p.quant.is_none())
            {
                map_linear(&mut p.linear, &f);
            }
        }
        self
    }

    /// The float type of the projection weights (F32 unless [`Llama::with_weight_dtype`] changed it).
    pub fn weight_dtype(&self) -> burn::tensor::DType {
        self.embed_tokens.weight.val().dtype()
    }
}
