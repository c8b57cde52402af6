//! Several processes (on one machine or many) through MPI, the engine HPC clusters already run:
//! `mpirun -np N bapo train --mpi …`, or `srun` under Slurm. The flat gradient goes through host
//! memory (LoRA's are a few MB) and one `MPI_Allreduce`; metrics are summed in f64.
//!
//! A rank that dies takes the job with it: Open MPI's launcher kills the other ranks and names
//! the dead one, and a rank that fails with an error calls [`MpiSync::abort`] after printing it,
//! so no rank waits forever in a collective.

use ::mpi::collective::{CommunicatorCollectives, SystemOperation};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use super::{GradSync, SyncError};

/// This process's place in `MPI_COMM_WORLD`. Dropping it finalises MPI.
pub struct MpiSync {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    // Last: MPI_Finalize runs when this drops.
    _universe: Universe,
}

impl MpiSync {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self, SyncError> {
        let universe = ::mpi::initialize().ok_or(SyncError::Engine {
            engine: "mpi",
            what: "MPI was already initialised in this process".into(),
        })?;
        let world = universe.world();
        Ok(Self {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            _universe: universe,
        })
    }

    /// The rank among the processes on this node (to pick a GPU), from the launcher's
    /// environment (Open MPI, MPICH/Hydra, Slurm); 0 when none says.
    pub fn local_rank() -> usize {
        [
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MPI_LOCALRANKID",
            "SLURM_LOCALID",
        ]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
        .unwrap_or(0)
    }

    /// Ends every rank of the job with `code` (after this rank printed why).
    pub fn abort(&self, code: i32) -> ! {
        use ::mpi::topology::Communicator as _;
        self.world.abort(code)
    }
}

impl<B: Backend> GradSync<B> for MpiSync {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_mean(&mut self, flat: Tensor<B, 1>) -> Result<Tensor<B, 1>, SyncError> {
        let device = flat.device();
        let n = flat.dims()[0];
        let host = flat.into_data().convert::<f32>();
        let send = host.as_slice::<f32>().map_err(|e| SyncError::Engine {
            engine: "mpi",
            what: format!("reading the gradient back: {e:?}"),
        })?;
        let mut sum = vec![0f32; n];
        self.world
            .all_reduce_into(send, &mut sum[..], SystemOperation::sum());
        let inv = 1.0 / self.size as f32;
        for x in &mut sum {
            *x *= inv;
        }
        Ok(Tensor::from_data(TensorData::new(sum, [n]), &device))
    }
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<(), SyncError> {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }
}
