//! Activation checkpointing (`train.gradient_checkpointing`): each decoder block's
//! feed-forward half, `mlp(norm(x))`, runs in the forward pass without recording its graph and
//! is recomputed, with its graph, in the backward pass.
//!
//! The forward pass computes the half on the inner backend (no saved activations) and records
//! one custom autodiff operation whose state is the half's input `x` and the block's modules.
//! Its backward makes `x` and the block's adapter weights fresh leaves, runs the half again
//! with autodiff, and back-propagates the incoming gradient `dy` through it (the surrogate
//! `sum(y · dy)`, whose gradient with respect to `y` is exactly `dy`): `x`'s gradient goes on
//! into the outer graph; the adapter weights' gradients, which the outer graph never saw, are
//! kept for this thread and moved into the step's gradients by [`collect`]. Every recomputed
//! value equals the forward pass's bit for bit (the same operations on the same inputs), so the
//! gradients are the ones without checkpointing (tested).
//!
//! Burn's custom operations exist only on its concrete `Autodiff` backend (default
//! checkpointing strategy); on any other autodiff backend the half runs as usual. A block whose
//! input needs no gradient (no adapter upstream) also runs as usual, so its adapter weights
//! still get theirs.

use std::any::Any;
use std::cell::RefCell;

use bapo_model::checkpoint::MlpHook;
use bapo_model::model::Mlp;
use bapo_model::Llama;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::nn::RmsNorm;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorPrimitive};

use crate::step::FreshLeaves;

/// Recomputed feed-forward halves since the process started (every thread): what tests read to
/// see that checkpointing ran.
static RECOMPUTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many feed-forward halves have been recomputed in backward passes so far.
pub fn recomputed() -> usize {
    RECOMPUTED.load(std::sync::atomic::Ordering::Relaxed)
}

thread_local! {
    /// Adapter gradients of the recomputed halves of this thread's backward passes.
    static GRADS: RefCell<Vec<GradientsParams>> = const { RefCell::new(Vec::new()) };
}

/// The hook that checkpoints every block's feed-forward half of an autodiff model (`None` when
/// `on` is false).
pub fn hook<A: AutodiffBackend>(on: bool) -> Option<MlpHook<A>> {
    on.then_some(recompute::<A> as MlpHook<A>)
}

fn recompute<A: AutodiffBackend>(mlp: &Mlp<A>, norm: &RmsNorm<A>, x: Tensor<A, 3>) -> Tensor<A, 3> {
    type Ad<A> = Autodiff<<A as AutodiffBackend>::InnerBackend>;
    let (m, n) = (
        (mlp as &dyn Any).downcast_ref::<Mlp<Ad<A>>>(),
        (norm as &dyn Any).downcast_ref::<RmsNorm<Ad<A>>>(),
    );
    let (Some(m), Some(n)) = (m, n) else {
        return mlp.forward_normed(norm, x);
    };
    let x: Box<dyn Any> = Box::new(x);
    let x = *x
        .downcast::<Tensor<Ad<A>, 3>>()
        .expect("the same backend as the modules");
    // An input in no graph (no adapter upstream): the half as usual, so its adapters still
    // get their gradients from the outer graph.
    if x.clone()
        .into_primitive()
        .tensor()
        .node
        .requirement
        .is_none()
    {
        let y: Box<dyn Any> = Box::new(m.forward_normed(n, x));
        return *y.downcast::<Tensor<A, 3>>().expect("converted back");
    }
    let y: Box<dyn Any> = Box::new(op(m, n, x));
    *y.downcast::<Tensor<A, 3>>().expect("converted back")
}

#[derive(Debug, Clone)]
struct State<I: Backend> {
    x: I::FloatTensorPrimitive,
    mlp: Mlp<Autodiff<I>>,
    norm: RmsNorm<Autodiff<I>>,
}

#[derive(Debug)]
struct Recompute;

impl<I: Backend> Backward<I, 1> for Recompute {
    type State = State<I>;

    fn backward(self, ops: Ops<State<I>, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State { x, mlp, norm } = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |dy| {
            let leaf = |t| Tensor::<Autodiff<I>, 3>::from_inner(Tensor::from_primitive(t));
            let x = leaf(TensorPrimitive::Float(x)).require_grad();
            let mlp = mlp.map(&mut FreshLeaves);
            let y = mlp.forward_normed(&norm, x.clone());
            let g = (y * leaf(TensorPrimitive::Float(dy))).sum().backward();
            let dx = x.grad(&g).expect("x is a leaf that requires a gradient");
            let params = GradientsParams::from_grads(g, &mlp);
            GRADS.with(|v| v.borrow_mut().push(params));
            RECOMPUTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            dx.into_primitive().tensor()
        });
    }
}

fn op<I: Backend>(
    mlp: &Mlp<Autodiff<I>>,
    norm: &RmsNorm<Autodiff<I>>,
    x: Tensor<Autodiff<I>, 3>,
) -> Tensor<Autodiff<I>, 3> {
    let y = mlp
        .valid()
        .forward_normed(&norm.valid(), x.clone().inner())
        .into_primitive()
        .tensor();
    let x = x.into_primitive().tensor();
    let out = match Recompute
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            State {
                x: x.primitive,
                mlp: mlp.clone(),
                norm: norm.clone(),
            },
            y,
        ),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Ids of the model's parameters that require a gradient (its adapters' 2-D weights).
struct Trainable(Vec<ParamId>);

impl<B: Backend> ModuleVisitor<B> for Trainable {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.val().is_require_grad() {
            self.0.push(param.id);
        }
    }
}

/// Moves the adapter gradients that this thread's recomputations produced (since the last
/// call) into `grads` (made by `GradientsParams::from_grads` from the same backward pass);
/// nothing when checkpointing was off. The training step calls it after every backward pass.
pub fn collect<A: AutodiffBackend>(grads: &mut GradientsParams, model: &Llama<A>) {
    let parts = GRADS.with(|v| std::mem::take(&mut *v.borrow_mut()));
    if parts.is_empty() {
        return;
    }
    let mut ids = Trainable(Vec::new());
    model.visit(&mut ids);
    for mut part in parts {
        for &id in &ids.0 {
            if let Some(t) = part.remove::<A::InnerBackend, 2>(id) {
                // A block runs more than once a forward pass (shared prompts, then their
                // completions): its recomputations' gradients add up.
                let t = match grads.remove::<A::InnerBackend, 2>(id) {
                    Some(before) => before + t,
                    None => t,
                };
                grads.register::<A::InnerBackend, 2>(id, t);
            }
        }
    }
}
