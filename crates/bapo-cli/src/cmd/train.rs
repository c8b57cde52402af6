//! `bapo train`: Personalise a model with BAPO (LoRA), as described by a TOML config.

use crate::prelude::*;

/// Personalise a model with BAPO (LoRA), as described by a TOML config.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub run: super::ConfigArgs,
    /// Override `train.max_steps`.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Continue from the newest `checkpoint-N` in the output directory. With --per-user:
    /// skip users that finished, continue the interrupted one.
    #[arg(long)]
    pub resume: bool,
    /// One adapter per `user` of the data, in turn, into `<output.dir>/users/<user>/`, base
    /// responses and reference log-probs computed once for all (`<output.dir>/shared/`);
    /// ends with `users_summary.json`. Replaces the config's `data.users`.
    #[arg(long)]
    pub per_user: bool,
    /// With --per-user: only these users (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "per_user")]
    pub users: Option<Vec<String>>,
    /// With --per-user: train the users at positions i, i+n, i+2n, ... (1-based) of the
    /// sorted list, so that n machines split the users without coordination.
    #[arg(long, value_name = "I/N", requires = "per_user")]
    pub shard: Option<bapo_run::per_user::Shard>,
    /// Data-parallel training on several devices of this machine, one thread each
    /// (burn-collective): `cuda:0,cuda:1`, or `flex,flex` to try it on a CPU. Each micro-batch
    /// is split between them; the result equals one device's run with the same batch.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "BACKEND[:INDEX],...",
        conflicts_with = "per_user"
    )]
    pub devices: Option<Vec<String>>,
    /// Data-parallel training over MPI processes: `mpirun -np N bapo train --mpi …` (or
    /// `srun` under Slurm). Rank 0 logs, evaluates and saves; with --devices, each process
    /// takes the entry at its node-local rank (modulo the list). Needs the `mpi` feature.
    #[arg(long, conflicts_with = "per_user")]
    pub mpi: bool,
}

pub fn run<B: Backend>(
    args: Args,
    device: B::Device,
    trainer: impl FnOnce(&RunConfig, &B::Device, Job) -> Result<PathBuf>,
) -> Result<()> {
    let Args {
        run,
        max_steps,
        resume,
        per_user,
        users,
        shard,
        devices: _,
        mpi,
    } = args;
    let mut cfg = run.load()?;
    if let Some(m) = max_steps {
        cfg.train.max_steps = m;
    }
    let job = if per_user {
        Job::PerUser(
            bapo_run::per_user::PerUser {
                users,
                shard,
                resume,
            },
            bapo_run::per_user::Job::Train,
        )
    } else {
        Job::Train { resume, mpi }
    };
    let adapter = trainer(&cfg, &device, job)?;
    println!("{}", adapter.display());
    Ok(())
}
