//! Frozen weights kept in a smaller float type (bf16, f16): `model.base_dtype` for training,
//! `--weights` for generation and serving.
//!
//! [`crate::Llama::with_weight_dtype`] (and loading with `load_pretrained_as`) keeps the
//! projection, embedding and head weights in the smaller type (not the norms, not LoRA
//! adapters). On burn-flex (feature `flex`) each product keeps the activations in f32 and
//! widens the weight a block at a time inside the product (`bapo_kernels::mixed`): the result
//! is the f32 product of the rounded weights, the weight's 2-byte elements read once. On other
//! backends the product runs in the weight's type ([`in_weight_type`]): the activation rounded
//! to it on the way in, the result rounded on the way out. The residual stream, norms, softmax,
//! KV cache and adapters stay f32. Parity per type: `tests/tests/half_base.rs`.
//!
//! Batch-1 decoding reads every weight once per token, so on a CPU it is bound by memory
//! bandwidth: half the bytes of f32. The reference pass and training use the same products as
//! generation, so a run's caches name the base's type (`bapo_run::cache::Numerics`).

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

/// `x·w` for `x` `[n, k]` f32 and `w` `[k, m]` in a smaller type by `bapo_kernels::mixed` (on
/// burn-flex with feature `flex`: `x` kept in f32, `w` widened a block at a time); the inputs
/// back where it does not apply.
#[allow(clippy::type_complexity)]
pub(crate) fn mixed<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    #[cfg(feature = "flex")]
    return bapo_kernels::mixed::matmul(x, w);
    #[cfg(not(feature = "flex"))]
    Err((x, w))
}

/// [`mixed`] for a product of a few rows (decoding, not under autodiff): each row alone, the
/// weight read once in long runs (`bapo_kernels::mixed::matmul_rows`).
#[allow(clippy::type_complexity)]
pub(crate) fn mixed_rows<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    #[cfg(feature = "flex")]
    return bapo_kernels::mixed::matmul_rows(x, w);
    #[cfg(not(feature = "flex"))]
    Err((x, w))
}

/// `x·w` with `w` in a smaller float type: by [`mixed`] where it applies (f32 activations), else
/// computed in `w`'s type and returned in `x`'s.
pub fn matmul_as_weight<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    if x.dtype() == w.dtype() {
        return x.matmul(w);
    }
    match mixed(x, w) {
        Ok(y) => y,
        Err((x, w)) => in_weight_type(x, w.dtype(), |x| x.matmul(w)),
    }
}

/// `w·h` (the tied head's form) with `w` in a smaller float type: `(hᵀ·wᵀ)ᵀ` by [`mixed`] where
/// it applies, else computed in `w`'s type and returned in `h`'s.
pub fn matmul_weight_first<B: Backend>(w: Tensor<B, 2>, h: Tensor<B, 2>) -> Tensor<B, 2> {
    if w.dtype() == h.dtype() {
        return w.matmul(h);
    }
    match mixed(h.transpose(), w.transpose()) {
        Ok(y) => y.transpose(),
        Err((h, w)) => in_weight_type(h.transpose(), w.dtype(), |h| w.transpose().matmul(h)),
    }
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

/// How a base model's frozen weights are held: in a float type, or (a GGUF file) in the file's
/// quantised blocks ([`crate::quant`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseWeights {
    Float(FloatDType),
    Gguf,
}

/// `f32`, `bf16`, `f16` or `gguf` (a `--weights` value); anything else is an error naming `key`.
pub fn parse_base_weights(key: &str, w: &str) -> Result<BaseWeights, String> {
    match w {
        "f32" => Ok(BaseWeights::Float(FloatDType::F32)),
        "f16" => Ok(BaseWeights::Float(FloatDType::F16)),
        "bf16" => Ok(BaseWeights::Float(FloatDType::BF16)),
        "gguf" => Ok(BaseWeights::Gguf),
        other => Err(format!(
            "{key} must be f32, bf16, f16 or gguf, got `{other}`"
        )),
    }
}
