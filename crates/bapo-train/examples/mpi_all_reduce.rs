//! The MPI engine's cost per step for LoRA r 8 gradients of a model (random values of the real
//! shapes): flatten, read back, `MPI_Allreduce`, upload, cut back out.
//!
//! ```sh
//! cargo build --release -p bapo-train --features mpi --example mpi_all_reduce
//! mpirun -np 2 target/release/examples/mpi_all_reduce ~/.cache/bapo/SmolLM2-135M-Instruct.Q4_1.gguf 50
//! ```
//! (criterion measures the local engine: `cargo xtask bench -- all_reduce`; an MPI job cannot
//! run inside criterion's process.)

use bapo_train::dist::mpi::MpiSync;
use bapo_train::dist::{all_reduce_grads, GradSync};
use bapo_train::LoraConfig;
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};

type A = Autodiff<Flex>;

struct RandomGrads(GradientsParams, usize);
impl ModuleVisitor<A> for RandomGrads {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
        let t = param.val();
        if t.is_require_grad() {
            let g = Tensor::<Flex, D>::random(
                t.shape(),
                Distribution::Normal(0.0, 1e-3),
                &Default::default(),
            );
            self.1 += t.shape().num_elements();
            self.0.register(param.id, g);
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().ok_or("usage: mpi_all_reduce MODEL [STEPS]")?;
    let steps: usize = args.next().map_or(Ok(20), |s| s.parse())?;
    let mut sync = MpiSync::init()?;
    let device = Default::default();
    let base = bapo_model::load_pretrained::<Flex>(std::path::Path::new(&model), &device)?.model;
    let policy = LoraConfig::default().attach(bapo_model::Llama::<A>::from_inner(base), 0, &device);
    let mut times = Vec::new();
    let mut numel = 0;
    for _ in 0..steps + 2 {
        let mut g = RandomGrads(GradientsParams::new(), 0);
        policy.visit(&mut g);
        numel = g.1;
        GradSync::<Flex>::barrier(&mut sync)?;
        let t0 = std::time::Instant::now();
        let out = all_reduce_grads(&policy, g.0, &mut sync)?;
        assert!(!out.is_empty());
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let times = &mut times[2..];
    times.sort_by(f64::total_cmp);
    if GradSync::<Flex>::rank(&sync) == 0 {
        println!(
            "{} ranks, {numel} LoRA r 8 parameters ({:.1} MB f32): all-reduce per step median {:.2} ms, min {:.2}, max {:.2} over {steps} steps",
            GradSync::<Flex>::world_size(&sync),
            numel as f64 * 4e-6,
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}
