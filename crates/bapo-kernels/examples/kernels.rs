//! Each kernel against the op-by-op path it replaces, at the BAPO step's shapes (SmolLM2-135M,
//! 12 rows × 128 tokens, no prompt sharing): the forward on plain Flex (the reference pass and
//! decoding) and forward + backward under `Autodiff<Flex>` (training), median of 9 after 2
//! warm-ups, the result read back to the host inside the clock.
//! `cargo run --release -p bapo-kernels --example kernels [softmax|rmsnorm|rope|swiglu]`

use std::time::Instant;

use bapo_kernels::{rmsnorm, rope, softmax, swiglu};
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor, TensorData};

type A = Autodiff<Flex>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `f` (which returns something to drop after the clock stops).
fn time<T>(mut f: impl FnMut() -> T) -> f64 {
    for _ in 0..2 {
        drop(f());
    }
    median(
        (0..9)
            .map(|_| {
                let t = Instant::now();
                let out = f();
                let ms = t.elapsed().as_secs_f64() * 1e3;
                drop(out);
                ms
            })
            .collect(),
    )
}

/// Times `plain` (forward on Flex) and `run` (forward + backward under autodiff), each with the
/// kernel (`true`) and without, and prints the four medians.
fn compare<T, U>(name: &str, plain: impl Fn(bool) -> T, run: impl Fn(bool) -> U) {
    let (f, o) = (
        (time(|| plain(true)), time(|| run(true))),
        (time(|| plain(false)), time(|| run(false))),
    );
    println!(
        "{name}: forward {:.2} ms fused vs {:.2} ms op-by-op; forward+backward {:.2} vs {:.2} ms",
        f.0, o.0, f.1, o.1
    );
}

fn softmax_ops<B: Backend>(s: Tensor<B, 4>, bias: Tensor<B, 4>) -> Tensor<B, 4> {
    let x = s + bias;
    let max = x.clone().detach().max_dim(3);
    let e = (x - max).exp();
    e.clone() / e.sum_dim(3)
}

fn rmsnorm_ops<B: Backend>(x: Tensor<B, 3>, gamma: Tensor<B, 1>) -> Tensor<B, 3> {
    let rms = (x.clone().square().mean_dim(2) + 1e-5).sqrt();
    (x / rms) * gamma.unsqueeze()
}

fn softmax_case() {
    let d = Default::default();
    let shape = [12, 3, 384, 128];
    let s0 = Tensor::<A, 4>::random(shape, Distribution::Normal(0.0, 2.0), &d);
    // Causal over positions (row i·3 + j sees keys 0..=i).
    let bias: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|k| {
            let (row, key) = ((k / 128) % 384, k % 128);
            if key > row / 3 {
                -1.0e30
            } else {
                0.0
            }
        })
        .collect();
    let bias = Tensor::<A, 4>::from_data(TensorData::new(bias, shape), &d);
    let run = |fused: bool| {
        let s = s0.clone().detach().require_grad();
        let p = if fused {
            softmax::softmax_fused(s.clone(), bias.clone()).expect("flex")
        } else {
            softmax_ops(s.clone(), bias.clone())
        };
        let g = p.sum().backward();
        s.grad(&g).map(|t| t.into_data())
    };
    let plain = |fused: bool| {
        let (s, b) = (s0.clone().inner(), bias.clone().inner());
        match fused {
            true => softmax::softmax_fused(s, b).expect("flex"),
            false => softmax_ops(s, b),
        }
        .into_data()
    };
    compare("softmax [12, 3, 384, 128]", plain, run);
}

fn rmsnorm_case() {
    let d = Default::default();
    let x0 = Tensor::<A, 3>::random([12, 128, 576], Distribution::Normal(0.0, 1.0), &d);
    let gamma = Tensor::<A, 1>::random([576], Distribution::Normal(1.0, 0.2), &d);
    let run = |fused: bool| {
        let x = x0.clone().detach().require_grad();
        let y = if fused {
            rmsnorm::rms_norm_fused(x.clone(), gamma.clone(), 1e-5).expect("flex")
        } else {
            rmsnorm_ops(x.clone(), gamma.clone())
        };
        let g = y.sum().backward();
        x.grad(&g).map(|t| t.into_data())
    };
    let plain = |fused: bool| {
        let (x, g) = (x0.clone().inner(), gamma.clone().inner());
        match fused {
            true => rmsnorm::rms_norm_fused(x, g, 1e-5).expect("flex"),
            false => rmsnorm_ops(x, g),
        }
        .into_data()
    };
    compare("rmsnorm [12, 128, 576], γ frozen", plain, run);
}

/// The query's path: RoPE, the `1/√d` scale and `[b, s, g, r·d] → [b, g, s·r, d]`, made
/// contiguous (as the next product needs it).
fn rope_ops<B: Backend>(x: Tensor<B, 4>, c: Tensor<B, 4>, s: Tensor<B, 4>) -> Tensor<B, 4> {
    let d = 64;
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    (x * c + rotated * s)
        .mul_scalar(0.125)
        .reshape([12, 128, 3, 192])
        .swap_dims(1, 2)
        .reshape([12, 3, 128 * 3, 64])
}

fn rope_case() {
    let d = Default::default();
    let x0 = Tensor::<A, 4>::random([12, 128, 9, 64], Distribution::Normal(0.0, 1.0), &d);
    let angle = Tensor::<A, 4>::random([12, 128, 1, 64], Distribution::Uniform(0.0, 6.0), &d);
    let table = |t: Tensor<A, 4>| Tensor::<A, 4>::zeros([12, 128, 9, 64], &d) + t;
    let (c, s) = (table(angle.clone().cos()), table(angle.sin()));
    let fused = |x: Tensor<A, 4>| {
        rope::swap_heads_fused(x.reshape([12, 128, 3, 192]), Some((&c, &s)), 0.125)
            .expect("flex")
            .reshape([12, 3, 128 * 3, 64])
    };
    let run = |use_kernel: bool| {
        let x = x0.clone().detach().require_grad();
        let y = if use_kernel {
            fused(x.clone())
        } else {
            rope_ops(x.clone(), c.clone(), s.clone())
        };
        let g = y.sum().backward();
        x.grad(&g).map(|t| t.into_data())
    };
    let plain = |use_kernel: bool| {
        let x = x0.clone().inner();
        let (ci, si) = (c.clone().inner(), s.clone().inner());
        match use_kernel {
            true => rope::swap_heads_fused(x.reshape([12, 128, 3, 192]), Some((&ci, &si)), 0.125)
                .expect("flex")
                .reshape([12, 3, 128 * 3, 64]),
            false => rope_ops(x, ci, si),
        }
        .into_data()
    };
    compare(
        "rope, query [12, 128, 9, 64] -> [12, 3, 384, 64]",
        plain,
        run,
    );
}

fn swiglu_case() {
    let d = Default::default();
    let g0 = Tensor::<A, 2>::random([1536, 1536], Distribution::Normal(0.0, 2.0), &d);
    let u0 = Tensor::<A, 2>::random([1536, 1536], Distribution::Normal(0.0, 1.0), &d);
    let run = |fused: bool| {
        let g = g0.clone().detach().require_grad();
        let u = u0.clone().detach().require_grad();
        let h = if fused {
            swiglu::swiglu_fused(g.clone(), u.clone()).expect("flex")
        } else {
            silu(g.clone()) * u.clone()
        };
        let grads = h.sum().backward();
        g.grad(&grads).map(|t| t.into_data())
    };
    let plain = |fused: bool| {
        let (g, u) = (g0.clone().inner(), u0.clone().inner());
        match fused {
            true => swiglu::swiglu_fused(g, u).expect("flex"),
            false => silu(g) * u,
        }
        .into_data()
    };
    compare("swiglu [1536, 1536]", plain, run);
}

fn main() {
    let which = std::env::args().nth(1);
    let want = |n: &str| which.as_deref().is_none_or(|w| w == n);
    if want("softmax") {
        softmax_case();
    }
    if want("rmsnorm") {
        rmsnorm_case();
    }
    if want("rope") {
        rope_case();
    }
    if want("swiglu") {
        swiglu_case();
    }
}
