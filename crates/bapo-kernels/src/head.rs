//! The head's log-prob of each target, `logit[target] − logsumexp(row)`, on Flex: forward
//! through [`crate::head_kernel`], and under `Autodiff<Flex>` a backward that keeps the logits,
//! the targets and the `[n]` log-sum-exps (the op-by-op path keeps a `[n, v]` exponential and
//! allocates half a dozen `[n, v]` tensors a step).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;

use crate::flex::{cast, ints, same, tensor, with_f32};
use crate::head_kernel as kernel;

/// Each row's `log softmax(logits)[target]` through the fused kernel when `head` is
/// [`crate::enabled`] and [`target_logps_fused`] applies; the inputs back otherwise.
///
/// # Shapes
/// `logits`: `[n, v]`; `targets`: `[n]` → `[n]`.
#[allow(clippy::type_complexity)]
pub fn target_logps<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 1, Int>)> {
    if !crate::enabled("head") {
        return Err((logits, targets));
    }
    target_logps_fused(logits, targets)
}

/// [`target_logps`] whatever `BAPO_FUSED` says: the kernel when `B` is `Flex` or
/// `Autodiff<Flex>` with f32 logits, the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn target_logps_fused<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Result<Tensor<B, 1>, (Tensor<B, 2>, Tensor<B, 1, Int>)> {
    if logits.dtype() != DType::F32 {
        return Err((logits, targets));
    }
    let logits = match cast::<_, Tensor<Autodiff<Flex>, 2>>(logits) {
        Ok(l) => return Ok(same(autodiff(l, same(targets)))),
        Err(l) => l,
    };
    match cast::<_, Tensor<Flex, 2>>(logits) {
        Ok(l) => {
            let [n, v] = l.dims();
            let targets = ints(same(targets));
            let x: FlexTensor = l.into_primitive().tensor();
            let (out, _) = with_f32(&x, |x| kernel::target_logps(x, v, &targets));
            let out = tensor(out, vec![n]);
            Ok(same(Tensor::<Flex, 1>::from_primitive(
                TensorPrimitive::Float(out),
            )))
        }
        Err(l) => Err((l, targets)),
    }
}

/// What the backward keeps.
#[derive(Debug, Clone)]
struct Saved {
    logits: FlexTensor,
    targets: Vec<i64>,
    lse: Vec<f32>,
}

#[derive(Debug)]
struct TargetLogpsBackward;

/// Backward passes that wrote over the saved logits (tests only).
#[cfg(test)]
static IN_PLACE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Backward<Flex, 1> for TargetLogpsBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            logits,
            targets,
            lse,
        } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let grad = with_f32(&grad, <[f32]>::to_vec);
            let vocab = logits.layout().shape()[1];
            let n = targets.len();
            // The saved logits are this op's alone (nothing else holds them after the forward):
            // the gradient is written over them, saving an `[n, v]` allocation (≈ 150 MB at the
            // bench's 768 scored positions) and its page faults.
            let mut logits = logits;
            // Row-major from the first element of a buffer holding exactly these logits.
            let whole = logits.layout().start_offset() == 0
                && logits.as_slice::<f32>().map(<[f32]>::len) == Some(n * vocab)
                && logits.bytes().len() == n * vocab * 4;
            if whole {
                if let Some(x) = logits.try_storage_mut::<f32>() {
                    kernel::target_logps_backward_in_place(x, vocab, &targets, &lse, &grad);
                    #[cfg(test)]
                    IN_PLACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return logits;
                }
            }
            let dx = with_f32(&logits, |x| {
                kernel::target_logps_backward(x, vocab, &targets, &lse, &grad)
            });
            tensor(dx, vec![n, vocab])
        });
    }
}

fn autodiff(
    logits: Tensor<Autodiff<Flex>, 2>,
    targets: Tensor<Autodiff<Flex>, 1, Int>,
) -> Tensor<Autodiff<Flex>, 1> {
    let [n, v] = logits.dims();
    let targets = ints(Tensor::<Flex, 1, Int>::from_primitive(
        targets.into_primitive(),
    ));
    let logits = logits.into_primitive().tensor();
    let (out, lse) = with_f32(&logits.primitive, |x| kernel::target_logps(x, v, &targets));
    let out = tensor(out, vec![n]);
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
    use burn::tensor::{Distribution, TensorData};

    fn inputs<B: Backend>(n: usize, v: usize) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
        let d = Default::default();
        B::seed(&d, 11);
        let logits = Tensor::<B, 2>::random([n, v], Distribution::Normal(0.0, 4.0), &d);
        let t: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
        (logits, Tensor::from_data(TensorData::new(t, [n]), &d))
    }

    /// The inference path (plain Flex) gives the autodiff path's values bit for bit.
    #[test]
    fn plain_flex_equals_autodiff_flex() {
        let (logits, targets) = inputs::<Flex>(5, 700);
        let plain =
            target_logps_fused(logits.clone(), targets.clone()).expect("flex has the kernel");
        let ad = target_logps_fused(
            Tensor::<Autodiff<Flex>, 2>::from_data(logits.into_data(), &Default::default()),
            Tensor::<Autodiff<Flex>, 1, Int>::from_data(targets.into_data(), &Default::default()),
        )
        .expect("autodiff flex has the kernel");
        assert_eq!(
            plain.into_data().into_vec::<f32>().unwrap(),
            ad.into_data().into_vec::<f32>().unwrap()
        );
    }

    /// Logits that only the op holds (the training path: a product's fresh result) get their
    /// gradient written in place; shared ones (here the leaf itself) a new buffer. Same bits.
    #[test]
    fn in_place_and_fresh_gradients_agree() {
        use std::sync::atomic::Ordering;
        type A = Autodiff<Flex>;
        let (logits, targets) = inputs::<A>(6, 1003);
        let weights = Tensor::<A, 1>::from_data(
            TensorData::new((0..6).map(|i| i as f32 - 2.5).collect::<Vec<_>>(), [6]),
            &Default::default(),
        );
        let run = |fresh: bool| {
            let x = logits.clone().detach().require_grad();
            let l = if fresh {
                x.clone().mul_scalar(1.0)
            } else {
                x.clone()
            };
            let before = IN_PLACE.load(Ordering::Relaxed);
            let out = target_logps_fused(l, targets.clone()).expect("kernel");
            let g = (out * weights.clone()).sum().backward();
            let in_place = IN_PLACE.load(Ordering::Relaxed) > before;
            let dx = x.grad(&g).expect("gradient").into_data().into_vec::<f32>();
            (dx.unwrap(), in_place)
        };
        let (shared, shared_in_place) = run(false);
        let (fresh, fresh_in_place) = run(true);
        assert!(
            !shared_in_place,
            "the leaf's buffer must not be overwritten"
        );
        assert!(
            fresh_in_place,
            "a fresh product's logits take the in-place path"
        );
        assert!(shared
            .iter()
            .zip(&fresh)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        // The leaf still holds its values.
        assert_eq!(
            logits.into_data().into_vec::<f32>().unwrap(),
            inputs::<A>(6, 1003)
                .0
                .into_data()
                .into_vec::<f32>()
                .unwrap()
        );
    }

    /// Another backend gets its inputs back untouched.
    #[test]
    fn other_backends_get_their_inputs_back() {
        use burn::backend::NdArray;
        let (logits, targets) = inputs::<NdArray>(4, 300);
        let (l, t) = target_logps_fused(logits.clone(), targets.clone()).expect_err("no kernel");
        assert_eq!(l.into_data(), logits.into_data());
        assert_eq!(t.into_data(), targets.into_data());
    }
}
