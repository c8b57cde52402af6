//! Times the head's log-prob of each target on the bench's `[768, 49152]` logits (its
//! completion rows), forward and forward + backward under `Autodiff<Flex>`, the fused kernel
//! (called directly, whatever `BAPO_FUSED` says) and the op-by-op path alternating in one
//! process:
//! `cargo run --release -p bapo-objective --features flex --example head -- [reps]`.

use std::time::Instant;

use bapo_kernels::head::target_logps_fused;
use bapo_objective::target_logps_op_by_op;
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, ElementConversion, Int, Tensor, TensorData};

type A = Autodiff<Flex>;

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let d = Default::default();
    <A as burn::tensor::backend::Backend>::seed(&d, 7);
    let (n, v) = (768, 49152);
    let logits = Tensor::<A, 2>::random([n, v], Distribution::Normal(0.0, 3.0), &d);
    let t: Vec<i64> = (0..n).map(|i| ((i * 7919) % v) as i64).collect();
    let targets = Tensor::<A, 1, Int>::from_data(TensorData::new(t, [n]), &d);
    for rep in 0..=reps {
        for fused in [true, false] {
            let x = logits.clone().detach().require_grad();
            let t0 = Instant::now();
            let lp = if fused {
                target_logps_fused(x.clone(), targets.clone())
                    .unwrap_or_else(|_| panic!("autodiff flex has the kernel"))
            } else {
                target_logps_op_by_op(x.clone(), targets.clone())
            };
            let sum: f32 = lp.clone().sum().into_scalar().elem();
            let fwd = t0.elapsed().as_secs_f64();
            let grads = lp.sum().backward();
            let g = x.grad(&grads).expect("logits gradient");
            let gsum: f32 = g.abs().sum().into_scalar().elem();
            let all = t0.elapsed().as_secs_f64();
            if rep > 0 {
                eprintln!(
                    "{:>9} [{n}, {v}]: forward {:6.1} ms, forward + backward {:6.1} ms (sum {sum:e}, |grad| {gsum:e})",
                    if fused { "fused" } else { "op-by-op" },
                    fwd * 1e3,
                    all * 1e3
                );
            }
        }
    }
}
