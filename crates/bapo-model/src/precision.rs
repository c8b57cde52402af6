//! Frozen weights kept in a smaller float type (f16) for inference.
//!
//! Batch-1 decoding reads every weight once per token, so on a CPU it is bound by memory
//! bandwidth: SmolLM2-135M is 540 MB a token in f32 and 270 MB in f16. [`crate::Llama::with_weight_dtype`]
//! casts the projection, embedding and head weights (not the norms, not LoRA adapters); each
//! product then runs in the weight's type and returns in the activations' type
//! ([`matmul_as_weight`]): the activation row is rounded to f16 on the way in, the product is
//! accumulated in f32 by CPU GEMM kernels (gemm's f16 path packs to f32), and the result is
//! rounded to f16 on the way out. The residual stream, norms, softmax and KV cache stay f32.
//!
//! This is an inference setting for batch-1 decoding (`bapo generate --weights f16`,
//! `bapo serve --weights f16`). Measured on SmolLM2 (flex, 2 threads): batch 1 1.3× the f32
//! speed, batch 8 0.7× (not yet profiled: use it for one stream at a time). Its log-probs stay
//! within 2.2e-2 nats a token of transformers' f32, above the f32 path's 1e-2 tolerance (top-10
//! next tokens and greedy completions identical: `tests/tests/smollm2.rs`), so scoring, the
//! reference pass and training keep f32.

use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};

/// `f(x)` with `x` cast to the weight's float type `wt` and the result cast back to `x`'s (no
/// casts when the types agree: the f32 path is unchanged bit for bit).
pub(crate) fn in_weight_type<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    wt: burn::tensor::DType,
    f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Tensor<B, D> {
    let xt = x.dtype();
    if xt == wt {
        return f(x);
    }
    f(x.cast(wt)).cast(xt)
}

/// `x·w` computed in `w`'s float type, returned in `x`'s.
pub fn matmul_as_weight<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, D>,
) -> Tensor<B, D> {
    in_weight_type(x, w.dtype(), |x| x.matmul(w))
}

/// `w·h` computed in `w`'s float type, returned in `h`'s (the tied head's form).
pub fn matmul_weight_first<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    h: Tensor<B, D>,
) -> Tensor<B, D> {
    in_weight_type(h, w.dtype(), |h| w.matmul(h))
}

/// `linear.forward(x)` with the product in the weight's type (the bias, if any, stays as is).
pub fn linear_as_weight<B: Backend>(linear: &Linear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let w = linear.weight.val();
    if w.dtype() == x.dtype() {
        return linear.forward(x);
    }
    add_bias(linear, matmul_as_weight(x, w))
}

/// `y` plus `linear`'s bias, if it has one (broadcast over the rows of `y` `[n, out]`).
pub(crate) fn add_bias<B: Backend>(linear: &Linear<B>, y: Tensor<B, 2>) -> Tensor<B, 2> {
    match &linear.bias {
        Some(bias) => y + bias.val().unsqueeze(),
        None => y,
    }
}

/// `f32` or `f16` (a `--weights` value) as a float type; anything else is an error naming `key`.
pub fn parse_weight_dtype(key: &str, w: &str) -> Result<FloatDType, String> {
    match w {
        "f32" => Ok(FloatDType::F32),
        "f16" => Ok(FloatDType::F16),
        "bf16" => Ok(FloatDType::BF16),
        other => Err(format!("{key} must be f32, bf16 or f16, got `{other}`")),
    }
}
