//! Fused kernels for the backends that have them (feature `flex`: burn-flex, plain and under
//! `Autodiff`), chosen at run time by the backend's type, so every function of this crate
//! stays generic over any `B: Backend` and a backend without a kernel (ndarray, wgpu, cuda,
//! someone else's) takes the op-by-op path unchanged.
//!
//! Why a type check and not a `FusedOps: Backend` bound: a bound would have to be implemented
//! for every backend a caller uses, and the orphan rule lets only this crate do that, so a
//! model on a backend this crate does not know could no longer call [`crate::target_logps`].
//! The check is `Any` downcasting of the tensor (safe; the branch is decided by `TypeId`).
//!
//! The custom backward uses Burn's autodiff extension points (`Backward`, `prepare`,
//! `compute_bound().stateful()`, `Gradients::register` through `unary`), as burn's
//! custom-kernel example does.

pub mod kernel;

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

/// `T` as `U` when they are the same type, else `T` back.
fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// [`crate::target_logps`] through a fused kernel when `B` has one (f32 logits on Flex, with
/// or without autodiff); the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub(crate) fn target_logps<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 1, Int>)> {
    if logits.dtype() != DType::F32 || !crate::fused_kernels() {
        return Err((logits, targets));
    }
    let (logits, targets) = match cast::<_, Tensor<Autodiff<Flex>, 2>>(logits) {
        Ok(l) => {
            let t = cast::<_, Tensor<Autodiff<Flex>, 1, Int>>(targets)
                .unwrap_or_else(|_| unreachable!("float and int tensors share the backend"));
            let out = autodiff_flex(l, t);
            return Ok(cast(out).unwrap_or_else(|_| unreachable!("same backend")));
        }
        Err(l) => (l, targets),
    };
    match cast::<_, Tensor<Flex, 2>>(logits) {
        Ok(l) => {
            let t = cast::<_, Tensor<Flex, 1, Int>>(targets)
                .unwrap_or_else(|_| unreachable!("float and int tensors share the backend"));
            let [n, v] = l.dims();
            let device = l.device();
            let (out, _) = forward(&float_of(l), v, &targets_of(t));
            let out = Tensor::<Flex, 1>::from_data(TensorData::new(out, [n]), &device);
            Ok(cast(out).unwrap_or_else(|_| unreachable!("same backend")))
        }
        Err(l) => Err((l, targets)),
    }
}

fn float_of(t: Tensor<Flex, 2>) -> FlexTensor {
    t.into_primitive().tensor()
}

fn targets_of(t: Tensor<Flex, 1, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("i64 after convert")
}

/// The forward kernel on a Flex tensor (made contiguous first if it is a strided view).
fn forward(logits: &FlexTensor, vocab: usize, targets: &[i64]) -> (Vec<f32>, Vec<f32>) {
    match logits.as_slice::<f32>() {
        Some(x) => kernel::target_logps(x, vocab, targets),
        None => kernel::target_logps(
            logits
                .to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous f32"),
            vocab,
            targets,
        ),
    }
}

/// What the backward keeps: the logits (the head's output, which the op-by-op path keeps as
/// its `exp` instead), the targets and each row's log-sum-exp.
#[derive(Debug, Clone)]
struct Saved {
    logits: FlexTensor,
    targets: Vec<i64>,
    lse: Vec<f32>,
}

#[derive(Debug)]
struct TargetLogpsBackward;

impl Backward<Flex, 1> for TargetLogpsBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            logits,
            targets,
            lse,
        } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let grad = Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(grad))
                .into_data()
                .into_vec::<f32>()
                .expect("f32 gradient");
            let vocab = logits.layout().shape()[1];
            let n = targets.len();
            let contiguous;
            let x = match logits.as_slice::<f32>() {
                Some(x) => x,
                None => {
                    contiguous = logits.to_contiguous();
                    contiguous.as_slice::<f32>().expect("contiguous f32")
                }
            };
            let dx = kernel::target_logps_backward(x, vocab, &targets, &lse, &grad);
            FlexTensor::from_data(TensorData::new(dx, [n, vocab]))
        });
    }
}

fn autodiff_flex(
    logits: Tensor<Autodiff<Flex>, 2>,
    targets: Tensor<Autodiff<Flex>, 1, Int>,
) -> Tensor<Autodiff<Flex>, 1> {
    let [n, v] = logits.dims();
    let targets: Vec<i64> = targets
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("i64 after convert");
    let logits = logits.into_primitive().tensor();
    let (out, lse) = forward(&logits.primitive, v, &targets);
    let out = FlexTensor::from_data(TensorData::new(out, [n]));
    let tracked = match TargetLogpsBackward
        .prepare::<NoCheckpointing>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                logits: logits.primitive.clone(),
                targets,
                lse,
            },
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::from_primitive(TensorPrimitive::Float(tracked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{target_logps as fused_or_not, target_logps_op_by_op};
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    fn inputs<B: Backend>(n: usize, v: usize) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
        let d = Default::default();
        B::seed(&d, 11);
        let logits = Tensor::<B, 2>::random([n, v], Distribution::Normal(0.0, 4.0), &d);
        let t: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
        (logits, Tensor::from_data(TensorData::new(t, [n]), &d))
    }

    fn max_diff(a: Vec<f32>, b: Vec<f32>) -> f32 {
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// The fused forward and gradient against Burn's op-by-op path on the same backend, with a
    /// non-uniform upstream gradient (each row's weight differs, as the loss's do).
    #[test]
    fn fused_matches_op_by_op_forward_and_gradient() {
        assert!(crate::fused_kernels(), "run the tests without BAPO_FUSED=0");
        let (n, v) = (13, 3001);
        let (logits, targets) = inputs::<A>(n, v);
        let weights = Tensor::<A, 1>::from_data(
            TensorData::new((0..n).map(|i| i as f32 - 4.0).collect::<Vec<_>>(), [n]),
            &Default::default(),
        );
        let run = |fused: bool| {
            let x = logits.clone().detach().require_grad();
            let out = if fused {
                fused_or_not(x.clone(), targets.clone())
            } else {
                target_logps_op_by_op(x.clone(), targets.clone())
            };
            let g = (out.clone() * weights.clone()).sum().backward();
            let dx = x.grad(&g).expect("gradient");
            (
                out.into_data().into_vec::<f32>().unwrap(),
                dx.into_data().into_vec::<f32>().unwrap(),
            )
        };
        let (fo, fg) = run(true);
        let (oo, og) = run(false);
        assert!(max_diff(fo, oo) < 2e-5, "forward");
        assert!(max_diff(fg, og) < 1e-6, "gradient");
    }

    /// The inference path (plain Flex) gives the autodiff path's values bit for bit.
    #[test]
    fn plain_flex_equals_autodiff_flex() {
        let (logits, targets) = inputs::<Flex>(5, 700);
        let plain = fused_or_not(logits.clone(), targets.clone()).into_data();
        let ad = fused_or_not(
            Tensor::<A, 2>::from_data(logits.into_data(), &Default::default()),
            Tensor::<A, 1, Int>::from_data(targets.into_data(), &Default::default()),
        )
        .into_data();
        assert_eq!(
            plain.into_vec::<f32>().unwrap(),
            ad.into_vec::<f32>().unwrap()
        );
    }

    /// The op is taken only where a kernel exists: NdArray goes op by op (same numbers as
    /// calling that path directly, bit for bit).
    #[test]
    fn other_backends_go_op_by_op() {
        use burn::backend::NdArray;
        let (logits, targets) = inputs::<NdArray>(4, 300);
        let a = fused_or_not(logits.clone(), targets.clone()).into_data();
        let b = target_logps_op_by_op(logits, targets).into_data();
        assert_eq!(a.into_vec::<f32>().unwrap(), b.into_vec::<f32>().unwrap());
    }
}
