//! [`Llama::with_weight_dtype`]: the model's frozen projection, embedding and head weights in
//! another float type (f16) for inference; the products that use them are in
//! [`crate::precision`], which documents the numbers.

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::FloatDType;

use crate::model::Llama;

fn cast_weight<B: Backend>(l: &mut Linear<B>, dtype: FloatDType) {
    l.weight = l.weight.clone().map(|t| t.cast(dtype));
}

impl<B: Backend> Llama<B> {
    /// The model with its projection, embedding and head weights cast to `dtype` (norms and
    /// LoRA adapters unchanged), for inference only: see the module documentation.
    pub fn with_weight_dtype(mut self, dtype: FloatDType) -> Self {
        if burn::tensor::DType::from(dtype) == self.weight_dtype() {
            return self;
        }
        let w = self.embed_tokens.weight.clone();
        self.embed_tokens.weight = w.map(|t| t.cast(dtype));
        if let Some(h) = self.lm_head.as_mut() {
            cast_weight(h, dtype);
        }
        for l in &mut self.layers {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for p in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                cast_weight(&mut p.linear, dtype);
            }
            for p in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj] {
                cast_weight(&mut p.linear, dtype);
            }
        }
        self
    }

    /// The float type of the projection weights (F32 unless [`Llama::with_weight_dtype`] changed it).
    pub fn weight_dtype(&self) -> burn::tensor::DType {
        self.embed_tokens.weight.val().dtype()
    }
}
