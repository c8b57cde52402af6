//! Several devices in one process through burn-collective's local level: one thread per
//! device, each registered as a peer, gradients all-reduced by Burn's local server (a tree of
//! device-to-device additions, then a copy of the sum to every peer).
//!
//! A peer that fails (an error or a panic) must not leave the others waiting in a collective:
//! the failure is recorded, and until every peer has returned the coordinator keeps resetting
//! the collective server, which drops the pending operation and hands its waiters an error;
//! they report [`SyncError::PeerFailed`] naming the rank that failed.

use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::collective::{
    all_reduce, finish_collective, register, reset_collective, CollectiveConfig, PeerId,
    ReduceOperation,
};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use super::{GradSync, SyncError};
use crate::io::RunError;

/// The first peer that failed, and why.
#[derive(Default)]
struct Failure(Mutex<Option<(usize, String)>>);

impl Failure {
    fn set(&self, rank: usize, why: String) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert((rank, why));
    }
    fn get(&self) -> Option<(usize, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One peer of a local collective (lives on its own thread).
pub struct LocalPeer<B: Backend> {
    rank: usize,
    world: usize,
    failure: Arc<Failure>,
    device: B::Device,
    _backend: PhantomData<B>,
}

impl<B: Backend> LocalPeer<B> {
    fn failed(&self) -> Option<SyncError> {
        self.failure.get().map(|(rank, why)| SyncError::PeerFailed {
            rank,
            world: self.world,
            why,
        })
    }
    fn reduce(&mut self, t: Tensor<B, 1>, op: ReduceOperation) -> Result<Tensor<B, 1>, SyncError> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        match all_reduce::<B>(PeerId::from(self.rank), t.into_primitive().tensor(), op) {
            Ok(t) => Ok(Tensor::from_primitive(TensorPrimitive::Float(t))),
            Err(e) => Err(self.failed().unwrap_or(SyncError::Engine {
                engine: "burn-collective",
                what: format!("all-reduce: {e:?}"),
            })),
        }
    }
}

impl<B: Backend> GradSync<B> for LocalPeer<B> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn engine(&self) -> &'static str {
        "burn-collective (local)"
    }
    fn all_reduce_mean(&mut self, flat: Tensor<B, 1>) -> Result<Tensor<B, 1>, SyncError> {
        self.reduce(flat, ReduceOperation::Mean)
    }
    /// Sums in the backend's float type (f32 on every backend here): metrics to ~1e-7
    /// relative, counts exact below 2²⁴.
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<(), SyncError> {
        let n = values.len();
        let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
        let t = Tensor::from_data(TensorData::new(v, [n]), &self.device);
        let sum = self.reduce(t, ReduceOperation::Sum)?;
        let host = sum.into_data().convert::<f64>();
        values.copy_from_slice(host.as_slice::<f64>().expect("f64 data"));
        Ok(())
    }
}

/// Runs `job` once per device, each on its own thread as rank i of `devices.len()` peers of a
/// burn-collective local group, and returns every rank's result in rank order. When a rank
/// fails, the others stop at their next collective, and the error is the failing rank's own.
pub fn run_local_peers<B: Backend, T: Send>(
    devices: &[B::Device],
    job: impl Fn(&mut dyn GradSync<B>, &B::Device) -> Result<T, RunError> + Sync,
) -> Result<Vec<T>, RunError> {
    let world = devices.len();
    if world == 0 {
        return Err("no devices to train on".into());
    }
    reset_collective::<B>();
    let failure = Arc::new(Failure::default());
    let config = CollectiveConfig::default().with_num_devices(world);
    let results: Vec<Result<T, RunError>> = std::thread::scope(|s| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let (failure, config, job) = (failure.clone(), config.clone(), &job);
                std::thread::Builder::new()
                    .name(format!("rank-{rank}"))
                    .spawn_scoped(s, move || {
                        let run = || -> Result<T, RunError> {
                            register::<B>(PeerId::from(rank), device.clone(), config)
                                .map_err(|e| format!("registering peer {rank}: {e:?}"))?;
                            let mut peer = LocalPeer::<B> {
                                rank,
                                world,
                                failure: failure.clone(),
                                device: device.clone(),
                                _backend: PhantomData,
                            };
                            let out = job(&mut peer, device)?;
                            finish_collective::<B>(PeerId::from(rank))
                                .map_err(|e| format!("peer {rank} finishing: {e:?}"))?;
                            Ok(out)
                        };
                        let res = match std::panic::catch_unwind(AssertUnwindSafe(run)) {
                            Ok(r) => r,
                            Err(p) => Err(panic_text(p).into()),
                        };
                        if let Err(e) = &res {
                            // A peer stopped because another failed is not the cause.
                            if !matches!(e, RunError::Sync(SyncError::PeerFailed { .. })) {
                                failure.set(rank, e.to_string());
                            }
                        }
                        res
                    })
                    .expect("spawning a peer thread")
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            if failure.get().is_some() {
                // Drops any pending collective: its waiters get an error and stop.
                reset_collective::<B>();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        handles
            .into_iter()
            .map(|h| h.join().expect("peer panics are caught"))
            .collect()
    });
    if let Some((rank, why)) = failure.get() {
        return Err(format!("rank {rank} of {world} failed: {why}").into());
    }
    results.into_iter().collect()
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    format!("panicked: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// One test function: burn-collective's local server is one per backend type and process.
    #[test]
    fn peers_average_exactly_and_a_failing_peer_stops_the_others() {
        let devices = vec![Default::default(); 3];
        let out = run_local_peers::<NdArray, _>(&devices, |sync, device| {
            let r = sync.rank() as f32;
            let t = Tensor::<NdArray, 1>::from_data(
                TensorData::new(vec![r, 2.0 * r, 1.0], [3]),
                device,
            );
            let mean = sync
                .all_reduce_mean(t)?
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let mut s = [r as f64, 1.0];
            sync.all_reduce_sum(&mut s)?;
            let same = super::super::agree(sync, 0xdead_beef_u64)?;
            let rank = sync.rank() as u64;
            let differ = super::super::agree(sync, rank)?;
            Ok((mean, s, same, differ))
        })
        .unwrap();
        for (mean, s, same, differ) in out {
            assert_eq!(mean, vec![1.0, 2.0, 1.0]);
            assert_eq!(s, [3.0, 3.0]);
            assert!(same && !differ);
        }
        // Rank 1 fails before its first collective; ranks 0 and 2 wait in theirs, and must
        // return with rank 1's error instead of hanging.
        let t0 = std::time::Instant::now();
        let err = run_local_peers::<NdArray, ()>(&devices, |sync, device| {
            if sync.rank() == 1 {
                std::thread::sleep(Duration::from_millis(100));
                return Err("its data file is unreadable".into());
            }
            let t = Tensor::<NdArray, 1>::zeros([4], device);
            sync.all_reduce_mean(t)?;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(err, "rank 1 of 3 failed: its data file is unreadable");
        assert!(t0.elapsed() < Duration::from_secs(10));
        // A panic is a failure too, and the server is usable again afterwards.
        let err = run_local_peers::<NdArray, ()>(&devices[..2], |sync, device| {
            if sync.rank() == 0 {
                panic!("boom");
            }
            sync.all_reduce_mean(Tensor::<NdArray, 1>::zeros([2], device))?;
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(err, "rank 0 of 2 failed: panicked: boom");
        let ok = run_local_peers::<NdArray, _>(&devices[..2], |sync, device| {
            let t = Tensor::<NdArray, 1>::ones([2], device);
            Ok(sync
                .all_reduce_mean(t)?
                .into_data()
                .to_vec::<f32>()
                .unwrap())
        })
        .unwrap();
        assert_eq!(ok, vec![vec![1.0, 1.0]; 2]);
    }
}
