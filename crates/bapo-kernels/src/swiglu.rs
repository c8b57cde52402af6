//! SwiGLU's gating, `silu(gate) · up`, element-wise in one pass, and under `Autodiff<Flex>`
//! both input gradients in one more, keeping `gate` and `up` (what the op-by-op path keeps
//! too, without its sigmoid output and four intermediate tensors a layer).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex::{cast, same, tensor, with_f32};
use crate::simd::{dispatch, sigmoid};

/// Elements per task: each element is computed alone, so the split never changes a bit.
const CHUNK: usize = 16 * 1024;

#[inline(always)]
fn forward_chunk(g: &[f32], u: &[f32], h: &mut [f32]) {
    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
        *h = g * sigmoid(g) * u;
    }
}

/// `∂/∂gate = dh · up · s · (1 + gate · (1 − s))`, `∂/∂up = dh · gate · s`, `s = σ(gate)`.
#[inline(always)]
fn backward_chunk(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g
        .len()
        .min(u.len())
        .min(dh.len())
        .min(dg.len())
        .min(du.len())
    {
        let s = sigmoid(g[i]);
        dg[i] = dh[i] * u[i] * (s * (1.0 + g[i] * (1.0 - s)));
        du[i] = dh[i] * (g[i] * s);
    }
}

dispatch!(forward_fast, forward_chunk, (g: &[f32], u: &[f32], h: &mut [f32]) -> ());
dispatch!(backward_fast, backward_chunk, (g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) -> ());

/// `silu(gate) · up` on slices of one length.
///
/// # Panics
/// When the lengths differ (a caller's bug).
pub fn forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu: gate and up lengths");
    let mut h = vec![0.0f32; gate.len()];
    h.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(h, (g, u))| forward_fast(g, u, h));
    h
}

/// The gradients of [`forward`] with respect to `gate` and `up`, given the output's `dh`.
pub fn backward(gate: &[f32], up: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(
        gate.len() == up.len() && up.len() == dh.len(),
        "swiglu backward: {} gate, {} up, {} grad",
        gate.len(),
        up.len(),
        dh.len()
    );
    let mut dg = vec![0.0f32; gate.len()];
    let mut du = vec![0.0f32; gate.len()];
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(dh.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), dh)| backward_fast(g, u, dh, dg, du));
    (dg, du)
}

/// `silu(gate) · up` through the fused kernel when `swiglu` is [`crate::enabled`] and
/// [`swiglu_fused`] applies; the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn swiglu<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if !crate::enabled("swiglu") {
        return Err((gate, up));
    }
    swiglu_fused(gate, up)
}

/// [`swiglu`] whatever `BAPO_FUSED` says: the kernel when `B` is `Flex` or `Autodiff<Flex>`,
/// both f32 and of one shape, the inputs back otherwise.
#[allow(clippy::type_complexity)]
pub fn swiglu_fused<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || gate.dims() != up.dims() {
        return Err((gate, up));
    }
    let gate = match cast::<_, Tensor<Autodiff<Flex>, D>>(gate) {
        Ok(g) => return Ok(same(autodiff(g, same(up)))),
        Err(g) => g,
    };
    match cast::<_, Tensor<Flex, D>>(gate) {
        Ok(g) => {
            let u: Tensor<Flex, D> = same(up);
            let shape = g.dims().to_vec();
            let (g, u): (FlexTensor, FlexTensor) =
                (g.into_primitive().tensor(), u.into_primitive().tensor());
            let h = with_f32(&g, |g| with_f32(&u, |u| forward(g, u)));
            Ok(same(Tensor::<Flex, D>::from_primitive(
                TensorPrimitive::Float(tensor(h, shape)),
            )))
        }
        Err(g) => Err((g, up)),
    }
}

#[derive(Debug, Clone)]
struct Saved {
    gate: FlexTensor,
    up: FlexTensor,
    shape: Vec<usize>,
}

#[derive(Debug)]
struct SwigluBackward;

impl Backward<Flex, 2> for SwigluBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved { gate, up, shape } = ops.state;
        let dh = grads.consume::<Flex>(&ops.node);
        let (dg, du) = with_f32(&gate, |g| {
            with_f32(&up, |u| with_f32(&dh, |dh| backward(g, u, dh)))
        });
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<Flex>(node.id, tensor(dg, shape.clone()));
        }
        if let Some(node) = up_node {
            grads.register::<Flex>(node.id, tensor(du, shape));
        }
    }
}

fn autodiff<const D: usize>(
    gate: Tensor<Autodiff<Flex>, D>,
    up: Tensor<Autodiff<Flex>, D>,
) -> Tensor<Autodiff<Flex>, D> {
    let shape = gate.dims().to_vec();
    let (g, u) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let h = with_f32(&g.primitive, |gs| {
        with_f32(&u.primitive, |us| forward(gs, us))
    });
    let h = tensor(h, shape.clone());
    let tracked = match SwigluBackward
        .prepare::<NoCheckpointing>([g.node.clone(), u.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                gate: g.primitive.clone(),
                up: u.primitive.clone(),
                shape,
            },
            h,
        ),
        OpsKind::UnTracked(prep) => prep.finish(h),
    };
    Tensor::from_primitive(TensorPrimitive::Float(tracked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::silu;
    use burn::tensor::Distribution;

    type A = Autodiff<Flex>;

    /// Forward and both gradients against Burn's op-by-op `silu(g) · u` on the same backend,
    /// with a non-uniform upstream gradient, on a shape that is not a multiple of the lanes.
    #[test]
    fn fused_matches_op_by_op() {
        let d = Default::default();
        <A as Backend>::seed(&d, 5);
        let g0 = Tensor::<A, 3>::random([2, 37, 301], Distribution::Normal(0.0, 3.0), &d);
        let u0 = Tensor::<A, 3>::random([2, 37, 301], Distribution::Normal(0.0, 1.0), &d);
        let w = Tensor::<A, 3>::random([2, 37, 301], Distribution::Normal(0.0, 1.0), &d);
        let run = |fused: bool| {
            let g = g0.clone().detach().require_grad();
            let u = u0.clone().detach().require_grad();
            let h = if fused {
                swiglu_fused(g.clone(), u.clone()).expect("autodiff flex has the kernel")
            } else {
                silu(g.clone()) * u.clone()
            };
            let grads = (h.clone() * w.clone()).sum().backward();
            let v = |t: Tensor<<A as burn::tensor::backend::AutodiffBackend>::InnerBackend, 3>| {
                t.into_data().into_vec::<f32>().unwrap()
            };
            (
                h.into_data().into_vec::<f32>().unwrap(),
                v(g.grad(&grads).expect("gate grad")),
                v(u.grad(&grads).expect("up grad")),
            )
        };
        let (fh, fg, fu) = run(true);
        let (oh, og, ou) = run(false);
        let rel = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                .fold(0.0f32, f32::max)
        };
        assert!(rel(&fh, &oh) < 1e-5, "forward {}", rel(&fh, &oh));
        assert!(rel(&fg, &og) < 1e-5, "gate gradient {}", rel(&fg, &og));
        assert!(rel(&fu, &ou) < 1e-5, "up gradient {}", rel(&fu, &ou));
    }

    /// Plain Flex and `Autodiff<Flex>` give the same bits, and an element's bits do not depend
    /// on the rest of the tensor (one row alone against the same row in a batch).
    #[test]
    fn bits_do_not_depend_on_backend_or_batch() {
        let d = Default::default();
        <Flex as Backend>::seed(&d, 9);
        let g = Tensor::<Flex, 2>::random([6, 40_000], Distribution::Normal(0.0, 3.0), &d);
        let u = Tensor::<Flex, 2>::random([6, 40_000], Distribution::Normal(0.0, 1.0), &d);
        let plain = swiglu_fused(g.clone(), u.clone())
            .expect("flex")
            .into_data();
        let ad = swiglu_fused(
            Tensor::<A, 2>::from_data(g.clone().into_data(), &d),
            Tensor::<A, 2>::from_data(u.clone().into_data(), &d),
        )
        .expect("autodiff flex")
        .into_data();
        assert_eq!(plain, ad);
        let row = swiglu_fused(g.narrow(0, 3, 1), u.narrow(0, 3, 1))
            .expect("flex")
            .into_data();
        let all = plain.into_vec::<f32>().unwrap();
        assert_eq!(
            row.into_vec::<f32>().unwrap(),
            all[3 * 40_000..4 * 40_000].to_vec()
        );
    }

    #[test]
    fn mismatched_shapes_get_their_inputs_back() {
        let d = Default::default();
        let g = Tensor::<Flex, 2>::zeros([2, 3], &d);
        let u = Tensor::<Flex, 2>::zeros([3, 2], &d);
        assert!(swiglu_fused(g, u).is_err());
    }
}
