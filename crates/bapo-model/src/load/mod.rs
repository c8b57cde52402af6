//! Checkpoint loaders. Both formats are read into a [`HostTensors`] map in HF naming and
//! layout (f32, row-major, `[out, in]` for projections), then [`build_llama`] checks every
//! tensor against the config and assembles the Burn model. One assembly path means the two
//! loaders cannot disagree about layout.

pub mod gguf;
mod kquants;
pub mod safetensors;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor, TensorData};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::model::{linear, rms_norm, Attention, Block, Llama, Mlp, Proj};
use crate::quant::QuantWeight;

/// A dense f32 tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Tensors by HF name, plus the file they came from (for error messages): in host memory, or
/// (safetensors, when loading a model) still in the file, read when taken.
#[derive(Debug, Default)]
pub struct HostTensors {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, HostTensor>,
    pub deferred: BTreeMap<String, safetensors::Deferred>,
    /// Weights kept in their GGUF blocks (`[out, in]`), [`gguf::GgufFile::read_llama_tensors_kept`].
    pub quantised: BTreeMap<String, Arc<QuantWeight>>,
}

impl HostTensors {
    fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let mismatch = |got: Vec<usize>| ModelError::ShapeMismatch {
            path: self.path.clone(),
            name: name.to_string(),
            expected: expected.to_vec(),
            got,
        };
        if let Some(d) = self.deferred.remove(name) {
            if d.shape() != expected {
                return Err(mismatch(d.shape().to_vec()));
            }
            return d.read();
        }
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
            })?;
        if t.shape != expected {
            return Err(mismatch(t.shape));
        }
        Ok(t)
    }

    /// `name` if it is kept in GGUF blocks, checked to be `expected` (`[out, in]`).
    fn take_quantised(
        &mut self,
        name: &str,
        expected: &[usize],
    ) -> Result<Option<Arc<QuantWeight>>> {
        let Some(q) = self.quantised.remove(name) else {
            return Ok(None);
        };
        if q.shape() != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                got: q.shape().to_vec(),
            });
        }
        Ok(Some(q))
    }

    /// Drops `name` (in memory, deferred or quantised) if present.
    fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
        self.deferred.remove(name);
        self.quantised.remove(name);
    }

    /// The names not taken yet.
    fn left(&self) -> Vec<String> {
        self.tensors
            .keys()
            .chain(self.deferred.keys())
            .chain(self.quantised.keys())
            .cloned()
            .collect()
    }
}

fn tensor<B: Backend, const D: usize>(t: HostTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data, t.shape), device)
}

/// `{prefix}.bias` (`[out]`) when the layer has one.
fn take_bias<B: Backend>(
    w: &mut HostTensors,
    prefix: &str,
    out: usize,
    bias: bool,
    device: &B::Device,
) -> Result<Option<Tensor<B, 1>>> {
    if !bias {
        return Ok(None);
    }
    Ok(Some(tensor(
        w.take(&format!("{prefix}.bias"), &[out])?,
        device,
    )))
}

/// Takes an HF `[out, in]` projection and returns a Burn `[in, out]` linear layer.
fn take_linear<B: Backend>(
    w: &mut HostTensors,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
    device: &B::Device,
    dtype: FloatDType,
) -> Result<burn::nn::Linear<B>> {
    let weight = w.take(&format!("{prefix}.weight"), &[out, inp])?;
    let bias = take_bias(w, prefix, out, bias, device)?;
    // Transpose on the host so the device weight is contiguous `[in, out]`; a lazily
    // transposed (strided) weight makes every CPU matmul repack it.
    let mut data = vec![0.0f32; weight.data.len()];
    for (r, row) in weight.data.chunks_exact(inp).enumerate() {
        for (c, &x) in row.iter().enumerate() {
            data[c * out + r] = x;
        }
    }
    let weight = HostTensor {
        shape: vec![inp, out],
        data,
    };
    Ok(linear(in_type(tensor::<B, 2>(weight, device), dtype), bias))
}

fn take_proj<B: Backend>(
    w: &mut HostTensors,
    prefix: &str,
    out: usize,
    inp: usize,
    bias: bool,
    device: &B::Device,
    dtype: FloatDType,
) -> Result<Proj<B>> {
    if let Some(q) = w.take_quantised(&format!("{prefix}.weight"), &[out, inp])? {
        let bias = take_bias(w, prefix, out, bias, device)?;
        return Ok(Proj::quantised(q, bias, device));
    }
    take_linear(w, prefix, out, inp, bias, device, dtype).map(Proj::new)
}

/// Assembles a [`Llama`] from HF-named tensors; fails on any missing, mis-shaped or unused tensor.
pub fn build_llama<B: Backend>(
    config: &LlamaConfig,
    w: HostTensors,
    device: &B::Device,
) -> Result<Llama<B>> {
    build_llama_as(config, w, FloatDType::F32, device)
}

/// A weight in the base's float type (as it is made, so no f32 copy of the whole model is
/// ever held beside the cast one).
fn in_type<B: Backend>(t: Tensor<B, 2>, dtype: FloatDType) -> Tensor<B, 2> {
    if burn::tensor::DType::from(dtype) == t.dtype() {
        t
    } else {
        t.cast(dtype)
    }
}

/// [`build_llama`] with the projection, embedding and head weights in `dtype` (what
/// [`Llama::with_weight_dtype`] gives, without the f32 model first).
pub fn build_llama_as<B: Backend>(
    config: &LlamaConfig,
    mut w: HostTensors,
    dtype: FloatDType,
    device: &B::Device,
) -> Result<Llama<B>> {
    let c = config;
    let (e, q, kv, ff) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    // Made (in `dtype`) at once, so its f32 copy is not held while the layers are read.
    let quant_embed = w.take_quantised("model.embed_tokens.weight", &[c.vocab_size, e])?;
    let embed = match &quant_embed {
        Some(_) => crate::quant::placeholder(c.vocab_size, e, device),
        None => {
            let embed = w.take("model.embed_tokens.weight", &[c.vocab_size, e])?;
            in_type(tensor::<B, 2>(embed, device), dtype)
        }
    };
    let mut quant_head = None;
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let norm = |w: &mut HostTensors, name: &str| -> Result<_> {
            Ok(rms_norm(
                tensor::<B, 1>(w.take(&format!("{p}.{name}.weight"), &[e])?, device),
                c.rms_norm_eps,
            ))
        };
        let head_norm = |w: &mut HostTensors, name: &str| -> Result<_> {
            Ok(rms_norm(
                tensor::<B, 1>(
                    w.take(&format!("{p}.self_attn.{name}.weight"), &[c.head_dim])?,
                    device,
                ),
                c.rms_norm_eps,
            ))
        };
        let (q_norm, k_norm) = if c.qk_norm {
            (
                Some(head_norm(&mut w, "q_norm")?),
                Some(head_norm(&mut w, "k_norm")?),
            )
        } else {
            (None, None)
        };
        layers.push(Block {
            input_layernorm: norm(&mut w, "input_layernorm")?,
            self_attn: Attention {
                q_proj: take_proj(
                    &mut w,
                    &format!("{p}.self_attn.q_proj"),
                    q,
                    e,
                    c.qkv_bias,
                    device,
                    dtype,
                )?,
                k_proj: take_proj(
                    &mut w,
                    &format!("{p}.self_attn.k_proj"),
                    kv,
                    e,
                    c.qkv_bias,
                    device,
                    dtype,
                )?,
                v_proj: take_proj(
                    &mut w,
                    &format!("{p}.self_attn.v_proj"),
                    kv,
                    e,
                    c.qkv_bias,
                    device,
                    dtype,
                )?,
                o_proj: take_proj(
                    &mut w,
                    &format!("{p}.self_attn.o_proj"),
                    e,
                    q,
                    false,
                    device,
                    dtype,
                )?,
                q_norm,
                k_norm,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
            },
            post_attention_layernorm: norm(&mut w, "post_attention_layernorm")?,
            mlp: Mlp {
                gate_proj: take_proj(
                    &mut w,
                    &format!("{p}.mlp.gate_proj"),
                    ff,
                    e,
                    false,
                    device,
                    dtype,
                )?,
                up_proj: take_proj(
                    &mut w,
                    &format!("{p}.mlp.up_proj"),
                    ff,
                    e,
                    false,
                    device,
                    dtype,
                )?,
                down_proj: take_proj(
                    &mut w,
                    &format!("{p}.mlp.down_proj"),
                    e,
                    ff,
                    false,
                    device,
                    dtype,
                )?,
            },
        });
    }
    let norm = rms_norm(
        tensor::<B, 1>(w.take("model.norm.weight", &[e])?, device),
        c.rms_norm_eps,
    );
    let lm_head = if c.tie_word_embeddings {
        // Some tied checkpoints still store a copy of the head; it is the embedding by definition.
        w.discard("lm_head.weight");
        None
    } else if let Some(q) = w.take_quantised("lm_head.weight", &[c.vocab_size, e])? {
        quant_head = Some(q);
        Some(linear(
            crate::quant::placeholder(e, c.vocab_size, device),
            None,
        ))
    } else {
        Some(take_linear(
            &mut w,
            "lm_head",
            c.vocab_size,
            e,
            false,
            device,
            dtype,
        )?)
    };
    // Non-persistent RoPE buffers that old checkpoints saved are recomputed, not loaded.
    let names: Vec<String> = w
        .left()
        .into_iter()
        .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
        .collect();
    if !names.is_empty() {
        return Err(ModelError::UnexpectedTensors {
            path: w.path.clone(),
            names,
        });
    }
    Ok(Llama {
        embed_tokens: burn::nn::Embedding {
            weight: burn::module::Param::from_tensor(embed),
        },
        layers,
        norm,
        lm_head,
        head_dim: c.head_dim,
        rope_inv_freq: c.rope_inv_freq(),
        quant_embed,
        quant_head,
    })
}

/// Where a model came from and what it needs besides weights.
pub struct LoadedModel<B: Backend> {
    pub model: Llama<B>,
    pub config: LlamaConfig,
    pub tokenizer: crate::tokenizer::Tokenizer,
}

/// [`load_pretrained_as`] or [`load_pretrained_kept`], as `base` says.
pub fn load_base<B: Backend>(
    path: &Path,
    base: crate::precision::BaseWeights,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    match base {
        crate::precision::BaseWeights::Float(dtype) => load_pretrained_as(path, dtype, device),
        crate::precision::BaseWeights::Gguf => load_pretrained_kept(path, device),
    }
}

/// [`load_pretrained`] of a GGUF file with every quantised projection, embedding and head kept
/// in its blocks ([`crate::quant`]; `model.base_dtype = "gguf"`); an error for a checkpoint
/// directory (nothing there is quantised).
pub fn load_pretrained_kept<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    if path.is_dir() {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            what: "keeping a base's quantised blocks needs a .gguf file (this is a checkpoint \
                   directory: use base_dtype f32, bf16 or f16)"
                .into(),
        });
    }
    let file = gguf::GgufFile::open(path)?;
    let config = file.llama_config()?;
    let tokenizer = crate::tokenizer::Tokenizer::from_gguf(&file)?;
    tokenizer.check_vocab(config.vocab_size)?;
    let tensors = file.read_llama_tensors_kept(&config)?;
    let model = build_llama_as(&config, tensors, FloatDType::F32, device)?;
    Ok(LoadedModel {
        model,
        config,
        tokenizer,
    })
}

/// Loads an HF checkpoint directory (`config.json`, safetensors, `tokenizer.json`) or a `.gguf`
/// file, whichever `path` is.
pub fn load_pretrained<B: Backend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    load_pretrained_as(path, FloatDType::F32, device)
}

/// [`load_pretrained`] with the projection, embedding and head weights built in `dtype`
/// (`model.base_dtype`): each is cast as it is made.
pub fn load_pretrained_as<B: Backend>(
    path: &Path,
    dtype: FloatDType,
    device: &B::Device,
) -> Result<LoadedModel<B>> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    if meta.is_dir() {
        let config = crate::config::HfConfig::from_file(&path.join("config.json"))?
            .to_llama(&path.join("config.json"))?;
        let tensors = safetensors::index_checkpoint_dir(path)?;
        let tokenizer = crate::tokenizer::Tokenizer::from_hf_dir(path)?;
        tokenizer.check_vocab(config.vocab_size)?;
        let model = build_llama_as(&config, tensors, dtype, device)?;
        Ok(LoadedModel {
            model,
            config,
            tokenizer,
        })
    } else {
        let file = gguf::GgufFile::open(path)?;
        let config = file.llama_config()?;
        let tokenizer = crate::tokenizer::Tokenizer::from_gguf(&file)?;
        tokenizer.check_vocab(config.vocab_size)?;
        let tensors = file.read_llama_tensors(&config)?;
        let model = build_llama_as(&config, tensors, dtype, device)?;
        Ok(LoadedModel {
            model,
            config,
            tokenizer,
        })
    }
}
