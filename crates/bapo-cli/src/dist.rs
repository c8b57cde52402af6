//! `bapo train --devices …` and `bapo train --mpi`: one run spread over several devices of this
//! machine (burn-collective's local level, one thread per device) or over MPI processes
//! (`mpirun -np N bapo train --mpi …`). The engines live in `bapo_train::dist`; this module
//! only reads the flags and names the devices.

use std::path::PathBuf;

use anyhow::{bail, Result};
use bapo_run::RunConfig;
use burn::tensor::backend::AutodiffBackend;

use crate::BackendKind;

/// The backend named by every entry of `--devices` (`flex`, `ndarray:0`, `cuda:1`, …) and the
/// entries' indices.
pub(crate) fn parse_devices(list: &[String]) -> Result<(BackendKind, Vec<usize>)> {
    let mut kind: Option<BackendKind> = None;
    let mut indices = Vec::new();
    for entry in list {
        let (name, index) = match entry.split_once(':') {
            Some((n, i)) => (
                n,
                i.parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("--devices: `{entry}`: the index after `:` must be a number")
                })?,
            ),
            None => (entry.as_str(), 0),
        };
        let k = <BackendKind as clap::ValueEnum>::from_str(name, true).map_err(|_| {
            anyhow::anyhow!("--devices: `{entry}`: expected flex, ndarray, wgpu or cuda[:index]")
        })?;
        match kind {
            Some(prev) if prev != k => {
                bail!("--devices: every device must be of one backend (`{entry}` after {prev:?})")
            }
            _ => kind = Some(k),
        }
        indices.push(index);
    }
    let kind = kind.ok_or_else(|| anyhow::anyhow!("--devices: no device given"))?;
    Ok((kind, indices))
}

/// The rank MPI's launcher gave this process (Open MPI, MPICH/Hydra, Slurm), read before MPI
/// starts so that only rank 0 logs at `info`.
pub(crate) fn launcher_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// `bapo train` on `devices` (one: plain training; several: local peers), or under MPI.
pub(crate) fn train<A: AutodiffBackend>(
    cfg: &RunConfig,
    devices: &[A::Device],
    resume: bool,
    mpi: bool,
) -> Result<PathBuf, bapo_run::run::RunError> {
    if mpi {
        return train_mpi::<A>(cfg, devices, resume);
    }
    if let [device] = devices {
        return bapo_run::run_training::<A>(cfg, device, resume);
    }
    tracing::info!(
        peers = devices.len(),
        "data-parallel training on local peers"
    );
    let outs =
        bapo_train::dist::local::run_local_peers::<A::InnerBackend, _>(devices, |sync, device| {
            bapo_run::run::run_training_dist::<A>(cfg, device, resume, sync)
        })?;
    Ok(outs.into_iter().next().expect("rank 0's result"))
}

#[cfg(feature = "mpi")]
fn train_mpi<A: AutodiffBackend>(
    cfg: &RunConfig,
    devices: &[A::Device],
    resume: bool,
) -> Result<PathBuf, bapo_run::run::RunError> {
    use bapo_train::dist::mpi::MpiSync;
    use bapo_train::dist::GradSync;
    let mut sync = MpiSync::init()?;
    let (rank, world) = (
        GradSync::<A::InnerBackend>::rank(&sync),
        GradSync::<A::InnerBackend>::world_size(&sync),
    );
    // Processes of one node share its devices round-robin (one GPU per rank, usually).
    let device = &devices[MpiSync::local_rank() % devices.len()];
    tracing::info!(rank, world, "data-parallel training under MPI");
    match bapo_run::run::run_training_dist::<A>(cfg, device, resume, &mut sync) {
        Ok(out) => Ok(out),
        Err(e) if world > 1 && !e.to_string().starts_with("interrupted after step") => {
            // The other ranks may be waiting in a collective: end the whole job.
            eprintln!("error: rank {rank} of {world}: {e}");
            sync.abort(1)
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(feature = "mpi"))]
fn train_mpi<A: AutodiffBackend>(
    _cfg: &RunConfig,
    _devices: &[A::Device],
    _resume: bool,
) -> Result<PathBuf, bapo_run::run::RunError> {
    Err("--mpi: this binary was built without MPI: rebuild with \
         `cargo build --release -p bapo-cli --features mpi` (needs an MPI library and libclang)"
        .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_name_one_backend() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (k, i) = parse_devices(&s(&["cuda:0", "cuda:1"])).unwrap();
        assert_eq!((k, i), (BackendKind::Cuda, vec![0, 1]));
        let (k, i) = parse_devices(&s(&["flex", "flex"])).unwrap();
        assert_eq!((k, i), (BackendKind::Flex, vec![0, 0]));
        for (bad, msg) in [
            (&["cuda:0", "flex"][..], "of one backend"),
            (&["cuda:x"][..], "must be a number"),
            (&["tpu"][..], "expected flex"),
        ] {
            let e = parse_devices(&s(bad)).unwrap_err().to_string();
            assert!(e.contains(msg), "{bad:?}: {e}");
        }
    }
}
