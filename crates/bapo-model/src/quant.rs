//! Frozen base weights kept as a GGUF file stores them (`model.base_dtype = "gguf"`,
//! `--weights gguf`): a quantised projection, embedding or head stays in its blocks (Q4_0,
//! Q4_K, Q6_K, Q8_0, …) and is dequantised a tile of rows at a time inside each product.
//!
//! A quantised [`crate::model::Proj`] keeps its [`QuantWeight`] in `quant`; its `linear.weight`
//! is then a placeholder with the right shape and no storage (one NaN broadcast to `[in, out]`,
//! so a product that forgot the quantised weight shows at once). The embedding and the head
//! likewise ([`crate::model::Llama`]'s `quant_embed` and `quant_head`).
//!
//! **Numerics.** Rows are dequantised by the loader's own code (bit for bit gguf-py's), so a
//! product is the f32 product of the dequantised weights: on burn-flex (feature `flex`) by
//! `bapo_kernels::quant`, up to the order of its sums; on other backends by dequantising the
//! whole weight for the product and multiplying in f32 (correct, but it reads four bytes a
//! weight: the kept blocks save memory only where the kernel runs). Activations, norms, KV
//! cache and adapters stay f32. Parity: `tests/tests/kquants.rs`.

use std::fmt;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::load::gguf::dequantise_to;

/// A 2-D weight `[m, k]` in a GGUF block type: `m` rows (outputs) of `k` values (inputs), each
/// row `row_bytes` of whole blocks, rows in the model's order (llama.cpp's Q/K row permutation
/// undone).
pub struct QuantWeight {
    ggml_type: u32,
    type_name: &'static str,
    m: usize,
    k: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QuantWeight({} [{}, {}])",
            self.type_name, self.m, self.k
        )
    }
}

impl QuantWeight {
    /// `m` rows of `row_bytes` bytes each from `data` (checked by the loader).
    pub(crate) fn new(
        ggml_type: u32,
        type_name: &'static str,
        [m, k]: [usize; 2],
        data: Vec<u8>,
    ) -> Self {
        let row_bytes = data.len() / m.max(1);
        assert_eq!(row_bytes * m, data.len(), "whole rows");
        Self {
            ggml_type,
            type_name,
            m,
            k,
            row_bytes,
            data,
        }
    }

    /// `m` rows of `k` values in GGUF blocks of ggml type `ggml_type` (Q4_0, Q4_K, …: a block
    /// type the GGUF reader knows), `data` their bytes in llama.cpp's layout; an error naming
    /// what does not fit.
    pub fn from_blocks(ggml_type: u32, [m, k]: [usize; 2], data: Vec<u8>) -> Result<Self, String> {
        let (size, elems, name) = crate::load::gguf::block_layout(ggml_type)
            .filter(|&(_, elems, _)| elems > 1)
            .ok_or_else(|| format!("ggml type {ggml_type} is not a block type bapo reads"))?;
        if k % elems != 0 || data.len() != m * (k / elems) * size {
            return Err(format!(
                "{name} [{m}, {k}]: rows must be whole {elems}-element blocks of {size} bytes \
                 ({} bytes given)",
                data.len()
            ));
        }
        Ok(Self::new(ggml_type, name, [m, k], data))
    }

    /// `[m, k]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.m, self.k]
    }

    /// The GGUF type's name (`Q4_K`, …).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Rows `j0 .. j1` dequantised into `out` (`(j1 − j0) · k` values).
    pub fn rows(&self, j0: usize, j1: usize, out: &mut [f32]) {
        assert_eq!(out.len(), (j1 - j0) * self.k, "rows {j0}..{j1} of {self:?}");
        dequantise_to(
            self.ggml_type,
            &self.data[j0 * self.row_bytes..j1 * self.row_bytes],
            out,
        );
    }

    /// The whole weight dequantised, `[m, k]` f32.
    pub fn dense<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let mut v = vec![0.0; self.m * self.k];
        self.rows(0, self.m, &mut v);
        Tensor::from_data(TensorData::new(v, [self.m, self.k]), device)
    }
}

#[cfg(feature = "flex")]
impl bapo_kernels::quant::Rows for QuantWeight {
    fn shape(&self) -> [usize; 2] {
        QuantWeight::shape(self)
    }
    fn rows(&self, j0: usize, j1: usize, out: &mut [f32]) {
        QuantWeight::rows(self, j0, j1, out)
    }
    fn raw_row(&self, j: usize) -> Option<(u32, &[u8])> {
        let rb = self.row_bytes;
        Some((self.ggml_type, &self.data[j * rb..(j + 1) * rb]))
    }
}

/// The `[k, m]` placeholder a quantised projection's `Linear` holds (see the module docs).
pub(crate) fn placeholder<B: Backend>(k: usize, m: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::<B, 2>::full([1, 1], f32::NAN, device).expand([k, m])
}

/// `x · Wᵀ` for `x` f32 `[n, k]` and `w` `[m, k]`: `[n, m]`.
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: &Arc<QuantWeight>) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let x = {
        let rows: bapo_kernels::quant::Weight = w.clone();
        match bapo_kernels::quant::matmul(x, &rows) {
            Ok(y) => return y,
            Err(x) => x,
        }
    };
    let dense = w.dense::<B>(&x.device());
    x.matmul(dense.transpose())
}

/// Rows `ids` of `w` (an embedding `[vocab, e]`): `[b, s, e]`.
///
/// # Panics
/// On an id outside the vocabulary (as an embedding lookup does).
pub fn embed<B: Backend>(ids: Tensor<B, 2, Int>, w: &QuantWeight) -> Tensor<B, 3> {
    let [b, s] = ids.dims();
    let device = ids.device();
    let ids = ids
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("i64 after convert");
    let mut v = vec![0.0; b * s * w.k];
    for (id, row) in ids.into_iter().zip(v.chunks_exact_mut(w.k)) {
        assert!(
            (0..w.m as i64).contains(&id),
            "token id {id} outside the embedding's {} rows",
            w.m
        );
        w.rows(id as usize, id as usize + 1, row);
    }
    Tensor::from_data(TensorData::new(v, [b, s, w.k]), &device)
}
