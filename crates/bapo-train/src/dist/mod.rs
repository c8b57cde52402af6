//! Data-parallel training's seam: what a step needs from the ranks it trains with.
//!
//! [`GradSync`] is all the training loop knows of the engine: its rank, the world size, an
//! element-wise mean of one flat tensor (every trainable parameter's gradient, concatenated in
//! the model's visiting order, the same on every rank) and a sum of a few host numbers
//! (metrics, counters, the stop flag). Rank r takes slice r of every micro-batch
//! ([`rank_slice`]), its loss weighted by its share of the pairs, so that the mean over the
//! ranks is the gradient of the whole micro-batch; gradients are averaged after accumulation
//! and before clipping, so every replica clips and steps identically.
//!
//! Engines: [`Single`] (one process, the default), `local` (burn-collective's local level, one
//! thread per device; feature `collective`) and `mpi` (an MPI communicator through the `mpi`
//! crate; feature `mpi`). Swapping the engine when Burn's changes means one new impl here.

#[cfg(feature = "collective")]
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;

use std::ops::Range;

use bapo_model::Llama;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

/// Why a collective operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Another rank failed; this one stops instead of waiting for it.
    #[error("rank {rank} of {world} failed: {why}")]
    PeerFailed {
        rank: usize,
        world: usize,
        why: String,
    },
    /// The engine itself reported an error.
    #[error("{engine}: {what}")]
    Engine { engine: &'static str, what: String },
    /// Ranks that must agree do not (a different configuration or data on some rank).
    #[error("the ranks disagree on {what}")]
    Diverged { what: String },
}

/// The ranks a training step synchronises with.
pub trait GradSync<B: Backend> {
    /// This process's (or thread's) rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// How many ranks train together.
    fn world_size(&self) -> usize;
    /// The engine's name, for logs and `dist.json`.
    fn engine(&self) -> &'static str;
    /// Element-wise mean over the ranks of `flat`; every rank receives the same tensor, bit for
    /// bit.
    fn all_reduce_mean(&mut self, flat: Tensor<B, 1>) -> Result<Tensor<B, 1>, SyncError>;
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<(), SyncError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), SyncError> {
        self.all_reduce_sum(&mut [0.0])
    }
}

/// One process training alone: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl<B: Backend> GradSync<B> for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "single"
    }
    fn all_reduce_mean(&mut self, flat: Tensor<B, 1>) -> Result<Tensor<B, 1>, SyncError> {
        Ok(flat)
    }
    fn all_reduce_sum(&mut self, _values: &mut [f64]) -> Result<(), SyncError> {
        Ok(())
    }
}

/// The positions of a micro-batch of `len` pairs that `rank` of `world` takes: contiguous, in
/// rank order, sizes differing by at most one.
pub fn rank_slice(len: usize, rank: usize, world: usize) -> Range<usize> {
    len * rank / world..len * (rank + 1) / world
}

/// Whether every rank passed the same `value`: per 8-bit digit d, Σd² · world = (Σd)² holds
/// only when every rank's digit is equal, and both sums are exact even when an engine sums in
/// f32 (below 2²⁴ for fewer than 258 ranks).
pub fn agree<B: Backend>(sync: &mut dyn GradSync<B>, value: u64) -> Result<bool, SyncError> {
    let world = sync.world_size() as f64;
    let digits: Vec<f64> = (0..8).map(|k| ((value >> (8 * k)) & 0xff) as f64).collect();
    let mut v: Vec<f64> = digits.iter().chain(digits.iter()).copied().collect();
    for x in &mut v[8..] {
        *x *= *x;
    }
    sync.all_reduce_sum(&mut v)?;
    Ok((0..8).all(|k| v[8 + k] * world == v[k] * v[k]))
}

/// A hash of a string, for [`agree`] on names.
pub fn fingerprint_str(s: &str) -> u64 {
    let d = <sha2::Sha256 as sha2::Digest>::digest(s.as_bytes());
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The trainable parameters of `model` in visiting order: id and shape.
struct Trainable(Vec<(ParamId, Vec<usize>)>);

impl<B: Backend> ModuleVisitor<B> for Trainable {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        if t.is_require_grad() {
            self.0.push((param.id, t.dims().to_vec()));
        }
    }
}

fn trainable<B: Backend>(model: &Llama<B>) -> Vec<(ParamId, Vec<usize>)> {
    let mut v = Trainable(Vec::new());
    model.visit(&mut v);
    v.0
}

/// Takes each trainable parameter's gradient out of `grads` (zeros where a rank has none),
/// flattened and concatenated in the model's visiting order.
struct Flatten<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        if !t.is_require_grad() {
            return;
        }
        let g = self
            .grads
            .remove::<B::InnerBackend, D>(param.id)
            .unwrap_or_else(|| Tensor::zeros(t.shape(), &t.inner().device()));
        let n = g.shape().num_elements();
        self.parts.push(g.reshape([n]));
    }
}

/// Every trainable parameter's gradient averaged over the ranks: one flat all-reduce, then
/// each gradient cut back out in the same order.
pub fn all_reduce_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    mut grads: GradientsParams,
    sync: &mut dyn GradSync<B::InnerBackend>,
) -> Result<GradientsParams, SyncError> {
    if sync.world_size() == 1 {
        return Ok(grads);
    }
    let mut f = Flatten::<B> {
        grads: &mut grads,
        parts: Vec::new(),
    };
    model.visit(&mut f);
    if f.parts.is_empty() {
        return Ok(grads);
    }
    let flat = sync.all_reduce_mean(Tensor::cat(f.parts, 0))?;
    let mut offset = 0;
    for (id, dims) in trainable(model) {
        let n: usize = dims.iter().product();
        let g = flat.clone().narrow(0, offset, n);
        offset += n;
        register(&mut grads, id, g, &dims);
    }
    Ok(grads)
}

/// Registers `g` under `id` in the parameter's own rank (1 to 4 dimensions).
fn register<B: Backend>(grads: &mut GradientsParams, id: ParamId, g: Tensor<B, 1>, dims: &[usize]) {
    match *dims {
        [a] => grads.register(id, g.reshape([a])),
        [a, b] => grads.register(id, g.reshape([a, b])),
        [a, b, c] => grads.register(id, g.reshape([a, b, c])),
        [a, b, c, d] => grads.register(id, g.reshape([a, b, c, d])),
        _ => panic!("a parameter of rank {} has no gradient layout", dims.len()),
    }
}

/// A hash of every trainable parameter's exact bits (visiting order), to check that the
/// replicas are identical.
pub fn parameter_fingerprint<B: Backend>(model: &Llama<B>) -> u64 {
    struct Hash(sha2::Sha256);
    impl<B: Backend> ModuleVisitor<B> for Hash {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            if t.is_require_grad() {
                let v = t.into_data().convert::<f32>();
                for x in v.as_slice::<f32>().expect("f32 data") {
                    sha2::Digest::update(&mut self.0, x.to_bits().to_le_bytes());
                }
            }
        }
    }
    let mut h = Hash(<sha2::Sha256 as sha2::Digest>::new());
    model.visit(&mut h);
    let d = sha2::Digest::finalize(h.0);
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_slices_partition_a_micro_batch() {
        for len in 1..9 {
            for world in 1..=len {
                let s: Vec<Range<usize>> = (0..world).map(|r| rank_slice(len, r, world)).collect();
                assert_eq!(s[0].start, 0);
                assert_eq!(s[world - 1].end, len);
                for w in s.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<usize> = s.iter().map(|r| r.len()).collect();
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(*lo >= 1 && hi - lo <= 1, "{len} over {world}: {sizes:?}");
            }
        }
    }
}
