//! Attention's layout changes, `[b, p, q, m] → [b, q, p, m]` (axes 1 and 2 swapped, rows of
//! `m` values moved whole), with RoPE and a scale applied on the way: the query and key
//! projections go into head-major layout rotated (and the query scaled by `1/√d`) in one pass,
//! the values and the attention output move without rotation. Backward is the same swap with
//! the rotation transposed. Burn's path makes a strided view and copies it element by element
//! (`StridedIter`), and RoPE alone is two narrows, a negation, a concatenation, two products
//! and a sum, each over the whole tensor and each with its backward.
//!
//! **Numerics.** Each value is computed with the op-by-op path's operations in its order,
//! `(x₁·cos − x₂·sin)·scale` and `(x₂·cos + x₁·sin)·scale`, without fused multiply-add, so the
//! results are the same bits as `bapo-model`'s `Rope::apply` followed by `mul_scalar`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::flex::{cast, same, tensor, with_f32};
use crate::simd::dispatch;

/// RoPE tables for the positions of axis 1 of the input (`[b, p]` positions): row `(bi, pi)`
/// of `cos` and `sin` holds the head's `d` values, `stride` values apart.
#[derive(Debug, Clone, Copy)]
pub struct Tables<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Values from one position's row to the next.
    pub stride: usize,
    /// Head size `d` (even); the rotation pairs value `t` with `t + d/2` of each head.
    pub head_dim: usize,
}

/// One `m`-row: `out = rot(x)·scale` (forward) or `rotᵀ(x)·scale` (backward) per `d`-chunk.
#[inline(always)]
fn rotate_row(x: &[f32], c: &[f32], s: &[f32], scale: f32, back: bool, out: &mut [f32]) {
    let d = c.len().min(s.len());
    let h = d / 2;
    for (x, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let (x1, x2) = x.split_at(h);
        let (o1, o2) = o.split_at_mut(h);
        if back {
            // ∂/∂x₁ = (g₁·cos₁ + g₂·sin₂)·k, ∂/∂x₂ = (g₂·cos₂ − g₁·sin₁)·k.
            for t in 0..h {
                o1[t] = (x1[t] * c[t] + x2[t] * s[h + t]) * scale;
                o2[t] = (x2[t] * c[h + t] - x1[t] * s[t]) * scale;
            }
        } else {
            for t in 0..h {
                o1[t] = (x1[t] * c[t] + -x2[t] * s[t]) * scale;
                o2[t] = (x2[t] * c[h + t] + x1[t] * s[h + t]) * scale;
            }
        }
    }
}

dispatch!(rotate_fast, rotate_row, (x: &[f32], c: &[f32], s: &[f32], scale: f32, back: bool, out: &mut [f32]) -> ());

/// `x` `[b, p, q, m]` into `[b, q, p, m]`, each row rotated by `tables` (positions along `p`)
/// and scaled when given, or rotated back (`back`, for the gradient, with positions along the
/// *output's* axis 1).
///
/// # Panics
/// When `x` is not `b·p·q·m` values or the tables do not cover the positions (a caller's bug).
pub fn swap(
    x: &[f32],
    [b, p, q, m]: [usize; 4],
    rope: Option<(Tables<'_>, f32)>,
    back: bool,
) -> Vec<f32> {
    assert_eq!(
        x.len(),
        b * p * q * m,
        "heads: {} values for {b}·{p}·{q}·{m}",
        x.len()
    );
    let mut out = vec![0.0f32; x.len()];
    if x.is_empty() {
        return out;
    }
    // Output row (bi, qi, pi) comes from input row (bi, pi, qi); forward positions are pi.
    // Backward swaps [b, q, p, m] (the forward's output) back: its rows' positions are its
    // axis 2, i.e. output axis 1 — `back` is called with (p, q) already swapped by the caller.
    out.par_chunks_mut(p * m)
        .enumerate()
        .for_each(|(bq, block)| {
            let (bi, qi) = (bq / q, bq % q);
            for (pi, o) in block.chunks_exact_mut(m).enumerate() {
                let src = &x[((bi * p + pi) * q + qi) * m..][..m];
                match rope {
                    None => o.copy_from_slice(src),
                    Some((t, scale)) => {
                        let pos = if back { bi * q + qi } else { bi * p + pi };
                        let row = pos * t.stride;
                        let (c, s) = (&t.cos[row..row + t.head_dim], &t.sin[row..row + t.head_dim]);
                        rotate_fast(src, c, s, scale, back, o);
                    }
                }
            }
        });
    out
}

/// `x` `[b, p, q, m]` as `[b, q, p, m]`, with each `d`-chunk of a row rotated by `rope`'s
/// tables `(cos, sin)` (`[b, p, heads, d]`, the same values for every head; the first head's
/// row is read) and multiplied by `scale`, through the kernel when `rope` is
/// [`crate::enabled`] and [`swap_heads_fused`] applies; `x` back otherwise.
pub fn swap_heads<B: Backend>(
    x: Tensor<B, 4>,
    rope: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
    scale: f32,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    if !crate::enabled("rope") {
        return Err(x);
    }
    swap_heads_fused(x, rope, scale)
}

/// [`swap_heads`] whatever `BAPO_FUSED` says: the kernel when `B` is `Flex` or
/// `Autodiff<Flex>`, all f32, the tables `[b, p, _, d]` with `d` even dividing `m`; `x` back
/// otherwise. The tables are constants (no gradient reaches them).
pub fn swap_heads_fused<B: Backend>(
    x: Tensor<B, 4>,
    rope: Option<(&Tensor<B, 4>, &Tensor<B, 4>)>,
    scale: f32,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let [b, p, _, m] = x.dims();
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let tables = match rope {
        None => None,
        Some((c, s)) => {
            let [tb, tp, heads, d] = c.dims();
            if c.dtype() != DType::F32
                || s.dtype() != DType::F32
                || s.dims() != c.dims()
                || (tb, tp) != (b, p)
                || d == 0
                || d % 2 != 0
                || m % d != 0
            {
                return Err(x);
            }
            let host = |t: &Tensor<B, 4>| match cast::<_, Tensor<Flex, 4>>(t.clone()) {
                Ok(t) => Some(t),
                Err(t) => cast::<_, Tensor<Autodiff<Flex>, 4>>(t)
                    .ok()
                    .map(|t| t.inner()),
            };
            let (Some(c), Some(s)) = (host(c), host(s)) else {
                return Err(x);
            };
            Some(Rope {
                cos: c.into_primitive().tensor(),
                sin: s.into_primitive().tensor(),
                stride: heads * d,
                head_dim: d,
            })
        }
    };
    let x = match cast::<_, Tensor<Autodiff<Flex>, 4>>(x) {
        Ok(x) => return Ok(same(autodiff(x, tables, scale))),
        Err(x) => x,
    };
    match cast::<_, Tensor<Flex, 4>>(x) {
        Ok(x) => {
            let dims = x.dims();
            let x: FlexTensor = x.into_primitive().tensor();
            let out = with_f32(&x, |v| run(v, dims, tables.as_ref(), scale, false));
            let shape = vec![dims[0], dims[2], dims[1], dims[3]];
            Ok(same(Tensor::<Flex, 4>::from_primitive(
                TensorPrimitive::Float(tensor(out, shape)),
            )))
        }
        Err(x) => Err(x),
    }
}

/// The RoPE tables as Flex tensors (`[b, p, heads, d]`), kept without copying.
#[derive(Debug, Clone)]
struct Rope {
    cos: FlexTensor,
    sin: FlexTensor,
    stride: usize,
    head_dim: usize,
}

/// [`swap`] with the tables read in place.
fn run(x: &[f32], dims: [usize; 4], rope: Option<&Rope>, scale: f32, back: bool) -> Vec<f32> {
    match rope {
        None => swap(x, dims, None, back),
        Some(r) => with_f32(&r.cos, |cos| {
            with_f32(&r.sin, |sin| {
                let t = Tables {
                    cos,
                    sin,
                    stride: r.stride,
                    head_dim: r.head_dim,
                };
                swap(x, dims, Some((t, scale)), back)
            })
        }),
    }
}

#[derive(Debug, Clone)]
struct Saved {
    /// The forward's output shape `[b, q, p, m]`.
    dims: [usize; 4],
    tables: Option<Rope>,
    scale: f32,
}

#[derive(Debug)]
struct SwapBackward;

impl Backward<Flex, 1> for SwapBackward {
    type State = Saved;

    fn backward(self, ops: Ops<Saved, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let Saved {
            dims,
            tables,
            scale,
        } = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
            let dx = with_f32(&grad, |g| run(g, dims, tables.as_ref(), scale, true));
            tensor(dx, vec![dims[0], dims[2], dims[1], dims[3]])
        });
    }
}

fn autodiff(
    x: Tensor<Autodiff<Flex>, 4>,
    tables: Option<Rope>,
    scale: f32,
) -> Tensor<Autodiff<Flex>, 4> {
    let dims = x.dims();
    let x = x.into_primitive().tensor();
    let out = with_f32(&x.primitive, |v| {
        run(v, dims, tables.as_ref(), scale, false)
    });
    let out_dims = [dims[0], dims[2], dims[1], dims[3]];
    let out = tensor(out, out_dims.to_vec());
    let tracked = match SwapBackward
        .prepare::<NoCheckpointing>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(
            Saved {
                dims: out_dims,
                tables,
                scale,
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

    type A = Autodiff<Flex>;

    /// `Rope::apply` of bapo-model, op by op: `x·cos + rotate_half(x)·sin`.
    fn rope_ops<Bk: Backend>(
        x: Tensor<Bk, 4>,
        c: Tensor<Bk, 4>,
        s: Tensor<Bk, 4>,
    ) -> Tensor<Bk, 4> {
        let d = x.dims()[3];
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * c + rotated * s
    }

    /// Tables `[b, p, heads, d]` as bapo-model builds them (one row per position, repeated
    /// for every head).
    fn tables(b: usize, p: usize, heads: usize, d: usize) -> (Tensor<A, 4>, Tensor<A, 4>) {
        let dev = Default::default();
        let angle = |bi: usize, pi: usize, t: usize| {
            let i = t % (d / 2);
            (pi + 3 * bi) as f32 * 10_000f32.powf(-2.0 * i as f32 / d as f32)
        };
        let make = |f: fn(f32) -> f32| {
            let v: Vec<f32> = (0..b * p * heads * d)
                .map(|k| {
                    let (t, rest) = (k % d, k / d);
                    let (pi, bi) = ((rest / heads) % p, rest / heads / p);
                    f(angle(bi, pi, t))
                })
                .collect();
            Tensor::<A, 4>::from_data(TensorData::new(v, [b, p, heads, d]), &dev)
        };
        (make(f32::cos), make(f32::sin))
    }

    /// The query's path in bapo-model (RoPE, scale, `[b, s, g, r·d] → [b, g, s, r·d]`) and the
    /// key's (RoPE, `[b, s, g, d] → [b, g, s, d]`): forward bit for bit, and the input gradient
    /// bit for bit too (the backward's ops are the transposed rotation's, in the op-by-op
    /// path's order), plain and autodiff.
    #[test]
    fn same_bits_as_rope_then_swap() {
        let dev = Default::default();
        let (b, s, g, r, d) = (2, 7, 3, 3, 8);
        let (c, sn) = tables(b, s, g * r, d);
        let x0 = Tensor::<A, 4>::random([b, s, g * r, d], Distribution::Normal(0.0, 1.0), &dev);
        let w = Tensor::<A, 4>::random([b, g, s, r * d], Distribution::Normal(0.0, 1.0), &dev);
        let scale = (d as f64).powf(-0.5);
        let x = x0.clone().require_grad();
        let fused = swap_heads_fused(
            x.clone().reshape([b, s, g, r * d]),
            Some((&c, &sn)),
            scale as f32,
        )
        .expect("autodiff flex");
        let gf = (fused.clone() * w.clone()).sum().backward();
        let y = x0.clone().require_grad();
        let ops = rope_ops(y.clone(), c.clone(), sn.clone())
            .mul_scalar(scale)
            .reshape([b, s, g, r * d])
            .swap_dims(1, 2);
        let go = (ops.clone() * w.clone()).sum().backward();
        assert_eq!(fused.clone().into_data(), ops.into_data());
        let (dx_f, dx_o) = (x.grad(&gf).unwrap(), y.grad(&go).unwrap());
        let (df, dop) = (
            dx_f.into_data().into_vec::<f32>().unwrap(),
            dx_o.into_data().into_vec::<f32>().unwrap(),
        );
        let worst = df
            .iter()
            .zip(&dop)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-6, "input gradient {worst}");
        // Plain Flex: the same bits as autodiff.
        let plain = swap_heads_fused(
            x0.clone().inner().reshape([b, s, g, r * d]),
            Some((&c.clone().inner(), &sn.clone().inner())),
            scale as f32,
        )
        .expect("flex");
        assert_eq!(plain.into_data(), fused.into_data());
    }

    /// Without rotation it is a plain swap of axes 1 and 2, and its gradient the swap back.
    #[test]
    fn plain_swap_and_its_gradient() {
        let dev = Default::default();
        let x0 = Tensor::<A, 4>::random([2, 5, 3, 6], Distribution::Normal(0.0, 1.0), &dev);
        let w = Tensor::<A, 4>::random([2, 3, 5, 6], Distribution::Normal(0.0, 1.0), &dev);
        let x = x0.clone().require_grad();
        let out = swap_heads_fused(x.clone(), None, 1.0).expect("autodiff flex");
        assert_eq!(
            out.clone().into_data(),
            x0.clone().swap_dims(1, 2).into_data()
        );
        let g = (out * w.clone()).sum().backward();
        assert_eq!(
            x.grad(&g).unwrap().into_data(),
            w.inner().swap_dims(1, 2).into_data()
        );
    }
}
