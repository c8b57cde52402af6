//! The seam for activation checkpointing of each decoder block's feed-forward half
//! (`train.gradient_checkpointing`).
//!
//! A block's MLP keeps, for the backward pass, its normed input, `gate` and `up`
//! (`intermediate_size` values each) and the gated product: about three fifths of what a
//! Llama block keeps per token. A trainer that wants them recomputed in the backward pass
//! instead installs an [`MlpHook`] for the current thread around its forward pass
//! ([`with_mlp_hook`]); [`Block::forward`](crate::model::Block::forward) then calls the hook in
//! place of `mlp(norm(x))`. The hook is typed on the backend, so a model of any other backend
//! (the reference pass, evaluation, generation, another thread) never sees it.
//!
//! Recomputing needs a custom autodiff operation, which Burn only offers on its concrete
//! `Autodiff` backend: the hook lives where the autodiff backend is known
//! (`bapo_train::checkpoint`); this crate stays generic over `B: Backend`.

use std::any::Any;
use std::cell::RefCell;

use burn::nn::RmsNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::model::Mlp;

/// `mlp(norm(x))` computed some other way (same values, same gradients).
pub type MlpHook<B> = fn(&Mlp<B>, &RmsNorm<B>, Tensor<B, 3>) -> Tensor<B, 3>;

thread_local! {
    static HOOK: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Runs `f` with `hook` installed for this thread (when `Some`), restoring what was there
/// before, also when `f` panics.
pub fn with_mlp_hook<B: Backend, R>(hook: Option<MlpHook<B>>, f: impl FnOnce() -> R) -> R {
    let Some(hook) = hook else {
        return f();
    };
    struct Restore(Option<Box<dyn Any>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            HOOK.with(|h| *h.borrow_mut() = before);
        }
    }
    let before = HOOK.with(|h| h.borrow_mut().replace(Box::new(hook)));
    let _restore = Restore(before);
    f()
}

/// `mlp(norm(x))` by this thread's hook for backend `B`, or directly.
pub(crate) fn mlp<B: Backend>(mlp: &Mlp<B>, norm: &RmsNorm<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let hook = HOOK.with(|h| {
        h.borrow()
            .as_ref()
            .and_then(|b| b.downcast_ref::<MlpHook<B>>().copied())
    });
    match hook {
        Some(hook) => hook(mlp, norm, x),
        None => mlp.forward_normed(norm, x),
    }
}
