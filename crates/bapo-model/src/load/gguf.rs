//! GGUF (v2/v3) reader: header, metadata, tensor infos, alignment; dequantisation to f32 of F32,
//! F16, BF16, Q4_0, Q4_1, Q8_0 here and of Q5_0, Q5_1 and the K-quants Q2_K … Q8_K in
//! [`super::kquants`], each tensor by its own type (a Q4_0 file's Q6_K `output.weight` loads
//! too); llama.cpp names mapped to HF names, and the Q/K row permutation that llama.cpp's
//! converter applies to `llama` checkpoints undone, so the model's rotate-half RoPE applies
//! unchanged.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count, metadata key/values, tensor infos (name, `u32` n_dims, `u64` dims fastest-first,
//! `u32` type, `u64` offset), padding to `general.alignment` (default 32), tensor data.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{kquants, HostTensor, HostTensors};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::quant::QuantWeight;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Row-major shape (GGUF stores dims fastest-first; this is reversed).
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Offset relative to the start of the data section.
    pub offset: u64,
}

/// Where a GGUF file's bytes live: a read-only memory map, or a buffer handed in.
enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// An opened, validated GGUF file (memory-mapped, or parsed from a buffer).
pub struct GgufFile {
    pub path: PathBuf,
    map: Bytes,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.bytes.len() - self.pos {
            return Err(ModelError::format(
                self.path,
                Some(self.pos as u64),
                format!(
                    "file ends inside {what} (needs {n} bytes, {} left)",
                    self.bytes.len() - self.pos
                ),
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos as u64;
        let n = self.u64(what)?;
        if n > (self.bytes.len() - self.pos) as u64 {
            return Err(ModelError::format(
                self.path,
                Some(at),
                format!("{what}: string length {n} runs past the end of the file"),
            ));
        }
        let b = self.take(n as usize, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            ModelError::format(self.path, Some(at), format!("{what}: string is not UTF-8"))
        })
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        let at = self.pos as u64;
        Ok(match ty {
            0 => Value::U64(self.take(1, what)?[0] as u64),
            1 => Value::I64(self.take(1, what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32(what)?) as f64),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 if depth == 0 => {
                let inner = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the file is hostile.
                if n > (self.bytes.len() - self.pos) as u64 {
                    return Err(ModelError::format(
                        self.path,
                        Some(at),
                        format!("{what}: array length {n} runs past the end of the file"),
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => {
                return Err(ModelError::format(
                    self.path,
                    Some(at),
                    format!("{what}: unknown metadata value type {other}"),
                ))
            }
        })
    }
}

/// Bytes per block, elements per block and name of a ggml type, for the types this reader knows.
pub(crate) fn block_layout(ty: u32) -> Option<(usize, usize, &'static str)> {
    Some(match ty {
        0 => (4, 1, "F32"),
        1 => (2, 1, "F16"),
        2 => (18, 32, "Q4_0"),
        3 => (20, 32, "Q4_1"),
        8 => (34, 32, "Q8_0"),
        30 => (2, 1, "BF16"),
        _ => return kquants::layout(ty),
    })
}

/// The names of the types [`block_layout`] knows, for error messages.
fn supported_types() -> String {
    (0..64)
        .filter_map(block_layout)
        .map(|(_, _, name)| name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn ggml_type_name(ty: u32) -> String {
    // ggml's type ids (31-33 and 36-38 are retired).
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "", "", "",
        "TQ1_0", "TQ2_0", "", "", "", "MXFP4", "NVFP4", "Q1_0",
    ];
    names
        .get(ty as usize)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("type {ty}"))
}

#[inline(always)]
fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantises `numel` values of type `ty` from `raw`.
fn dequantise(ty: u32, raw: &[u8], numel: usize) -> Vec<f32> {
    let mut out = vec![0.0; numel];
    dequantise_to(ty, raw, &mut out);
    out
}

/// Writes the values of the whole blocks of type `ty` (one [`block_layout`] knows) in `raw`
/// into `out`, which holds exactly that many. Each block goes into its own slice by
/// fixed-length loops the compiler vectorises: this is also the inner loop of products with
/// kept blocks (`crate::quant`), so it is compiled for AVX2 as well as the baseline and picked
/// by what the CPU reports (the same operations in the same order: the same bits).
#[allow(unsafe_code)]
pub(crate) fn dequantise_to(ty: u32, raw: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
        unsafe fn avx512(ty: u32, raw: &[u8], out: &mut [f32]) {
            dequantise_blocks(ty, raw, out)
        }
        // SAFETY: the CPU has AVX-512 F/BW/VL and F16C (checked just above).
        return unsafe { avx512(ty, raw, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn avx2(ty: u32, raw: &[u8], out: &mut [f32]) {
            dequantise_blocks(ty, raw, out)
        }
        // SAFETY: the CPU has AVX2 and F16C (checked just above).
        return unsafe { avx2(ty, raw, out) };
    }
    dequantise_blocks(ty, raw, out)
}

/// [`dequantise_to`]'s body.
#[inline(always)]
fn dequantise_blocks(ty: u32, raw: &[u8], out: &mut [f32]) {
    match ty {
        0 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().expect("4"));
            }
        }
        1 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = f16(c);
            }
        }
        30 => {
            for (o, c) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        8 => {
            for (blk, o) in raw.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16(&blk[..2]);
                for (o, &q) in o.iter_mut().zip(&blk[2..]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        2 | 3 => {
            let size = if ty == 2 { 18 } else { 20 };
            for (blk, o) in raw.chunks_exact(size).zip(out.chunks_exact_mut(32)) {
                let d = f16(&blk[..2]);
                let (m, qs) = if ty == 2 {
                    (-8.0 * d, &blk[2..])
                } else {
                    (f16(&blk[2..4]), &blk[4..])
                };
                // Low nibbles are elements 0..16, high nibbles 16..32.
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(qs) {
                    *l = d * (q & 0x0F) as f32 + m;
                    *h = d * (q >> 4) as f32 + m;
                }
            }
        }
        _ => {
            let known = kquants::dequantise_to(ty, raw, out);
            debug_assert!(known, "checked by block_layout");
        }
    }
}

/// Undoes llama.cpp's Q/K permutation: GGUF row `h·d + 2j + i` is HF row `h·d + i·d/2 + j`.
fn unpermute_rows<T: Copy + Default>(data: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                let src = h * d + 2 * j + i;
                let dst = h * d + i * half + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl GgufFile {
    /// Opens and validates the header, metadata and tensor table of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify; every access is bounds-checked.
        #[allow(unsafe_code)] // the crate's unsafe: this mmap and `dequantise_to`'s AVX2 call
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, Bytes::Map(map))
    }

    /// Parses and validates GGUF bytes already in memory; `path` only names them in errors.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(path, Bytes::Owned(bytes))
    }

    fn parse(path: &Path, map: Bytes) -> Result<Self> {
        let mut c = Cursor {
            bytes: &map,
            pos: 0,
            path,
        };
        if c.take(4, "the magic")? != b"GGUF" {
            return Err(ModelError::format(
                path,
                Some(0),
                "not a GGUF file (magic is not `GGUF`)",
            ));
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::Unsupported {
                path: path.into(),
                what: format!("GGUF version {version} (only 2 and 3)"),
            });
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        if n_tensors > 1 << 20 || n_kv > 1 << 20 {
            return Err(ModelError::format(
                path,
                Some(8),
                format!("absurd counts: {n_tensors} tensors, {n_kv} metadata entries"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata `{key}`"))?;
            let v = c.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let at = c.pos as u64;
            let name = c.string(&format!("tensor info #{i}"))?;
            let n_dims = c.u32(&format!("tensor `{name}` n_dims"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ModelError::format(
                    path,
                    Some(at),
                    format!("tensor `{name}`: {n_dims} dimensions (1 to 4 allowed)"),
                ));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("tensor `{name}` dims"))?);
            }
            if dims.iter().any(|&d| d == 0 || d > 1 << 32)
                || dims
                    .iter()
                    .try_fold(1u64, |a, &d| a.checked_mul(d))
                    .is_none_or(|n| n > 1 << 40)
            {
                return Err(ModelError::format(
                    path,
                    Some(at),
                    format!("tensor `{name}`: absurd dimensions {dims:?}"),
                ));
            }
            let ggml_type = c.u32(&format!("tensor `{name}` type"))?;
            let offset = c.u64(&format!("tensor `{name}` offset"))?;
            let shape = dims.iter().rev().map(|&d| d as usize).collect();
            tensors.push(TensorInfo {
                name,
                shape,
                ggml_type,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32);
        if align == 0 || !align.is_power_of_two() || align > 1 << 16 {
            return Err(ModelError::format(
                path,
                None,
                format!("general.alignment {align} is not a power of two"),
            ));
        }
        let data_start = (c.pos as u64).div_ceil(align) * align;
        let file = Self {
            path: path.into(),
            map,
            version,
            metadata,
            tensors,
            data_start,
        };
        for t in &file.tensors {
            file.tensor_bytes(t)?;
        }
        Ok(file)
    }

    /// The raw bytes of a tensor, checked against its type, shape and the file size.
    fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let (bytes_per_block, per_block, type_name) =
            block_layout(t.ggml_type).ok_or_else(|| ModelError::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "tensor `{}` is quantised as {} (supported: {})",
                    t.name,
                    ggml_type_name(t.ggml_type),
                    supported_types()
                ),
            })?;
        let numel: usize = t.shape.iter().product();
        let row = *t.shape.last().expect("n_dims >= 1");
        if !row.is_multiple_of(per_block) {
            return Err(ModelError::format(
                &self.path,
                None,
                format!(
                    "tensor `{}`: row length {row} is not a multiple of {type_name}'s block size \
                     {per_block}",
                    t.name
                ),
            ));
        }
        let len = (numel / per_block * bytes_per_block) as u64;
        let begin = self.data_start.checked_add(t.offset);
        match begin.and_then(|b| b.checked_add(len)) {
            Some(end) if end <= self.map.len() as u64 => {
                Ok(&self.map[begin.expect("checked") as usize..end as usize])
            }
            _ => Err(ModelError::format(
                &self.path,
                Some(self.data_start.saturating_add(t.offset)),
                format!(
                    "tensor `{}`: {len} bytes at offset {} run past the end of the file ({} bytes)",
                    t.name,
                    t.offset,
                    self.map.len()
                ),
            )),
        }
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::config(&self.path, key, "missing from GGUF metadata"))
    }

    fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| ModelError::config(&self.path, key, "not an unsigned integer"))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")?
            .as_str()
            .ok_or_else(|| ModelError::config(&self.path, "general.architecture", "not a string"))
    }

    /// Dequantises one tensor to f32 (row-major shape, GGUF names, no permutation undone).
    pub fn dequantise(&self, t: &TensorInfo) -> Result<HostTensor> {
        let raw = self.tensor_bytes(t)?;
        Ok(HostTensor {
            shape: t.shape.clone(),
            data: dequantise(t.ggml_type, raw, t.shape.iter().product()),
        })
    }

    /// Architecture numbers from the metadata, as an internal config.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?.to_string();
        if !["llama", "qwen2", "qwen3"].contains(&arch.as_str()) {
            return Err(ModelError::Unsupported {
                path: self.path.clone(),
                what: format!("general.architecture `{arch}` (supported: llama, qwen2, qwen3)"),
            });
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.get_u64(&k("embedding_length"))? as usize;
        let heads = self.get_u64(&k("attention.head_count"))? as usize;
        let kv_heads = match self.metadata.get(&k("attention.head_count_kv")) {
            Some(v) => v.as_u64().ok_or_else(|| {
                ModelError::config(
                    &self.path,
                    &k("attention.head_count_kv"),
                    "not an unsigned integer",
                )
            })? as usize,
            None => heads,
        };
        let vocab = match self.metadata.get(&k("vocab_size")).and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => self
                .get("tokenizer.ggml.tokens")?
                .as_array()
                .map(|a| a.len())
                .ok_or_else(|| {
                    ModelError::config(&self.path, "tokenizer.ggml.tokens", "not an array")
                })?,
        };
        // Qwen3 states its head size (`attention.key_length`); Llama's follows from the hidden size.
        let stated = ["attention.key_length", "rope.dimension_count"]
            .iter()
            .find_map(|key| self.metadata.get(&k(key)).and_then(Value::as_u64));
        if heads == 0
            || kv_heads == 0
            || !heads.is_multiple_of(kv_heads)
            || (stated.is_none() && !hidden.is_multiple_of(heads))
        {
            return Err(ModelError::config(
                &self.path,
                &k("attention.head_count"),
                format!("{heads} heads / {kv_heads} kv heads do not fit hidden size {hidden}"),
            ));
        }
        let head_dim = stated.map_or(hidden / heads, |d| d as usize);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::config(
                &self.path,
                &k("attention.key_length"),
                format!("head size {head_dim} must be even and positive"),
            ));
        }
        let eps = self
            .get(&k("attention.layer_norm_rms_epsilon"))?
            .as_f64()
            .ok_or_else(|| {
                ModelError::config(
                    &self.path,
                    &k("attention.layer_norm_rms_epsilon"),
                    "not a number",
                )
            })?;
        let theta = self
            .metadata
            .get(&k("rope.freq_base"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let ctx = self
            .metadata
            .get(&k("context_length"))
            .and_then(Value::as_u64)
            .unwrap_or(2048) as usize;
        let tied = !self.tensors.iter().any(|t| t.name == "output.weight");
        let eos = self
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64)
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        let bos = self
            .metadata
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32);
        Ok(LlamaConfig::new(
            vocab,
            hidden,
            self.get_u64(&k("feed_forward_length"))? as usize,
            self.get_u64(&k("block_count"))? as usize,
            heads,
            kv_heads,
            head_dim,
        )
        .with_rms_norm_eps(eps)
        .with_rope_theta(theta)
        .with_max_position_embeddings(ctx)
        .with_tie_word_embeddings(tied)
        .with_qkv_bias(arch == "qwen2")
        .with_qk_norm(arch == "qwen3")
        .with_rope_scaling(self.rope_scaling(&arch, theta, head_dim)?)
        .with_eos_token_ids(eos)
        .with_bos_token_id(bos))
    }

    /// RoPE scaling from `{arch}.rope.scaling.*` (`none`, `linear`) or the `rope_freqs` tensor
    /// (llama.cpp's per-frequency divisors, which its converter writes for Llama 3.x). Factors
    /// that Llama 3's rule reproduces with its usual low/high factors (1, 4) and a power-of-two
    /// original context become [`RopeScaling::Llama3`] (so an export can name them).
    fn rope_scaling(&self, arch: &str, theta: f64, head_dim: usize) -> Result<Option<RopeScaling>> {
        let key = format!("{arch}.rope.scaling.type");
        let stated = match self.metadata.get(&key) {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| ModelError::config(&self.path, &key, "not a string"))?,
            ),
        };
        let factor_key = format!("{arch}.rope.scaling.factor");
        let factor = || {
            self.metadata
                .get(&factor_key)
                .and_then(Value::as_f64)
                .filter(|f| *f > 0.0)
                .ok_or_else(|| {
                    ModelError::config(&self.path, &factor_key, "missing or not a positive number")
                })
        };
        let freqs = self.tensors.iter().find(|t| t.name == "rope_freqs.weight");
        match (stated, freqs) {
            (Some("linear"), None) => Ok(Some(RopeScaling::Linear { factor: factor()? })),
            (None | Some("none"), None) => Ok(None),
            (None | Some("none") | Some("llama3"), Some(t)) => {
                let f = self.dequantise(t)?;
                if f.shape != [head_dim / 2] {
                    return Err(ModelError::ShapeMismatch {
                        path: self.path.clone(),
                        name: t.name.clone(),
                        expected: vec![head_dim / 2],
                        got: f.shape,
                    });
                }
                Ok(Some(llama3_from_factors(&f.data, theta, head_dim)))
            }
            (Some("linear"), Some(_)) => Err(ModelError::config(
                &self.path,
                &key,
                "`linear` together with a `rope_freqs` tensor: two scalings, not implemented",
            )),
            (Some(other), _) => Err(ModelError::config(
                &self.path,
                &key,
                format!("`{other}` is not implemented (supported: none, linear, rope_freqs)"),
            )),
        }
    }

    /// Every tensor dequantised, renamed to HF names, Q/K permutation undone (`llama` only).
    /// `rope_freqs` is part of the config ([`Self::llama_config`]), not a weight.
    pub fn read_llama_tensors(&self, config: &LlamaConfig) -> Result<HostTensors> {
        self.read_llama_tensors_as(config, false)
    }

    /// [`Self::read_llama_tensors`] with every 2-D tensor of a block type (Q4_0, Q4_K, …) kept
    /// in its blocks ([`HostTensors::quantised`], rows unpermuted likewise); F32, F16 and BF16
    /// tensors are read as f32.
    pub fn read_llama_tensors_kept(&self, config: &LlamaConfig) -> Result<HostTensors> {
        self.read_llama_tensors_as(config, true)
    }

    fn read_llama_tensors_as(&self, config: &LlamaConfig, keep: bool) -> Result<HostTensors> {
        let permuted = self.architecture()? == "llama";
        let mut out = HostTensors {
            path: self.path.clone(),
            ..Default::default()
        };
        for t in self
            .tensors
            .iter()
            .filter(|t| t.name != "rope_freqs.weight")
        {
            let name = hf_name(&t.name).ok_or_else(|| ModelError::UnexpectedTensors {
                path: self.path.clone(),
                names: vec![t.name.clone()],
            })?;
            // Heads whose rows llama.cpp permuted (q/k of `llama` files).
            let heads = match () {
                _ if !permuted || t.shape.len() != 2 => None,
                _ if name.ends_with("q_proj.weight") => Some(config.num_heads),
                _ if name.ends_with("k_proj.weight") => Some(config.num_kv_heads),
                _ => None,
            };
            if let Some(heads) = heads {
                if t.shape[0] % (2 * heads) != 0 {
                    return Err(ModelError::ShapeMismatch {
                        path: self.path.clone(),
                        name: t.name.clone(),
                        expected: vec![heads * config.head_dim, config.hidden_size],
                        got: t.shape.clone(),
                    });
                }
            }
            let (_, per_block, type_name) = block_layout(t.ggml_type).unwrap_or((0, 1, ""));
            if keep && per_block > 1 && t.shape.len() == 2 {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let raw = self.tensor_bytes(t)?;
                let data = match heads {
                    Some(h) => unpermute_rows(raw, rows, raw.len() / rows.max(1), h),
                    None => raw.to_vec(),
                };
                let q = QuantWeight::new(t.ggml_type, type_name, [rows, cols], data);
                out.quantised.insert(name, Arc::new(q));
                continue;
            }
            let mut host = self.dequantise(t)?;
            if let Some(heads) = heads {
                let (rows, cols) = (host.shape[0], host.shape[1]);
                host.data = unpermute_rows(&host.data, rows, cols, heads);
            }
            out.tensors.insert(name, host);
        }
        Ok(out)
    }
}

/// Llama 3's scaling when it reproduces `factors` (to 1e-5 relative) with low/high frequency
/// factors 1 and 4, `factor` the largest divisor and a power-of-two original context (every
/// Llama 3.1/3.2 release); otherwise the factors as they are.
fn llama3_from_factors(factors: &[f32], theta: f64, head_dim: usize) -> RopeScaling {
    let largest = factors.iter().fold(1.0f32, |a, &b| a.max(b)) as f64;
    let base = crate::config::base_inv_freq(theta, head_dim);
    for log2 in 4..=20 {
        let s = RopeScaling::Llama3 {
            factor: largest,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 1 << log2,
        };
        let mut scaled = base.clone();
        s.apply(&mut scaled);
        let fits = base
            .iter()
            .zip(&scaled)
            .zip(factors)
            .all(|((b, s), &f)| ((b / s) - f as f64).abs() <= 1e-5 * f as f64);
        if largest > 1.0 && fits {
            return s;
        }
    }
    RopeScaling::Factors {
        factors: factors.to_vec(),
    }
}

/// Maps a llama.cpp tensor name to its HF name.
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = tail.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2): row h·d + i·d/2 + j -> h·d + 2j + i.
        let (heads, d, cols) = (3, 8, 2);
        let hf: Vec<f32> = (0..heads * d * cols).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..d / 2 {
                    let (src, dst) = (h * d + i * d / 2 + j, h * d + 2 * j + i);
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, heads * d, cols, heads), hf);
    }

    #[test]
    fn q4_1_and_q8_0_blocks_dequantise_by_hand() {
        // Q4_1: d = 0.5, m = -1.0; byte 0x21 gives low nibble 1 (element j), high nibble 2 (element j+16).
        let mut blk = Vec::new();
        blk.extend(half::f16::from_f32(0.5).to_le_bytes());
        blk.extend(half::f16::from_f32(-1.0).to_le_bytes());
        blk.extend([0x21u8; 16]);
        let x = dequantise(3, &blk, 32);
        assert_eq!(x[0], -0.5);
        assert_eq!(x[16], 0.0);
        // Q8_0: d = 0.25, q = -4 .. 27.
        let mut blk = Vec::new();
        blk.extend(half::f16::from_f32(0.25).to_le_bytes());
        blk.extend((0..32).map(|i| (i as i8 - 4) as u8));
        let x = dequantise(8, &blk, 32);
        assert_eq!(x[0], -1.0);
        assert_eq!(x[31], 6.75);
    }

    /// A GGUF with no metadata and one tensor `w` of `dims` (fastest first), type `ty`, `data`.
    fn one_tensor(dims: &[u64], ty: u32, data: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.push(b'w');
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.resize(b.len().div_ceil(32) * 32, 0);
        b.extend(data);
        b
    }

    #[test]
    fn kquant_tensors_dequantise_and_bad_rows_are_errors() {
        let path = Path::new("k.gguf");
        // Q6_K, 2 rows of 256: every quant 32 (value 0) but one, d = 0.5, scale 3.
        let mut blk = vec![0u8; 210];
        blk[..128].fill(0x00);
        blk[128..192].fill(0xAA); // high bits 2 -> quant 32
        blk[192..208].fill(3);
        blk[208..210].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        blk[0] = 0x05; // element 0: low nibble 5 -> quant 37 -> 0.5 · 3 · 5
        let file = GgufFile::from_bytes(path, one_tensor(&[256, 2], 14, &blk.repeat(2))).unwrap();
        let t = file.dequantise(&file.tensors[0]).unwrap();
        assert_eq!(t.shape, [2, 256]);
        assert_eq!((t.data[0], t.data[1], t.data[256]), (7.5, 0.0, 7.5));
        // A row of 128 cannot hold a 256-element super-block: an error naming the tensor.
        let err = GgufFile::from_bytes(path, one_tensor(&[128, 4], 12, &[0; 288]))
            .err()
            .expect("row of 128 in Q4_K")
            .to_string();
        assert!(
            err.contains("`w`") && err.contains("Q4_K") && err.contains("256"),
            "{err}"
        );
        // Too few bytes for the blocks: an error, not a panic.
        let err = GgufFile::from_bytes(path, one_tensor(&[256, 2], 12, &[0; 200]))
            .err()
            .expect("short Q4_K data")
            .to_string();
        assert!(err.contains("`w`") && err.contains("288 bytes"), "{err}");
    }

    #[test]
    fn unsupported_types_are_named_with_the_supported_list() {
        let err = GgufFile::from_bytes(Path::new("iq.gguf"), one_tensor(&[256], 16, &[0; 66]))
            .err()
            .expect("IQ2_XXS")
            .to_string();
        assert!(err.contains("IQ2_XXS"), "{err}");
        assert!(
            err.contains(
                "F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, BF16"
            ),
            "{err}"
        );
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
    }
}
