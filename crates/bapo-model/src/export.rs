//! The way out: a model's weights in HF naming and layout (LoRA adapters merged), an HF
//! checkpoint directory that transformers loads, and stable parameter ids for full
//! fine-tuning (so optimiser state saved by one process applies in the next).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::load::HostTensor;
use crate::model::{Llama, Proj};
use crate::tokenizer::Tokenizer;

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> HostTensor {
    HostTensor {
        shape: t.dims().to_vec(),
        data: t.into_data().convert::<f32>().to_vec::<f32>().expect("f32"),
    }
}

/// A projection's effective weight `[out, in]` (HF layout), `W + scale·(A·B)` when adapted.
fn proj_weight<B: Backend>(p: &Proj<B>) -> HostTensor {
    let mut w = match &p.quant {
        Some(q) => q.dense::<B>(&p.linear.weight.device()).transpose(),
        None => p.linear.weight.val(), // [in, out]
    };
    if let Some(l) = &p.lora {
        w = w + l.a.val().matmul(l.b.val()).mul_scalar(l.scale);
    }
    host(w.transpose())
}

/// Every weight in HF naming and layout, adapters merged into their projections.
pub fn hf_tensors<B: Backend>(model: &Llama<B>) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    let device = model.norm.gamma.device();
    let embed = match &model.quant_embed {
        Some(q) => q.dense::<B>(&device),
        None => model.embed_tokens.weight.val(),
    };
    out.insert("model.embed_tokens.weight".to_string(), host(embed));
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &l.self_attn;
        for (name, proj) in [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.o_proj", &a.o_proj),
            ("mlp.gate_proj", &l.mlp.gate_proj),
            ("mlp.up_proj", &l.mlp.up_proj),
            ("mlp.down_proj", &l.mlp.down_proj),
        ] {
            out.insert(format!("{p}.{name}.weight"), proj_weight(proj));
            if let Some(b) = &proj.linear.bias {
                out.insert(format!("{p}.{name}.bias"), host(b.val()));
            }
        }
        for (name, norm) in [("q_norm", &a.q_norm), ("k_norm", &a.k_norm)] {
            if let Some(n) = norm {
                out.insert(format!("{p}.self_attn.{name}.weight"), host(n.gamma.val()));
            }
        }
        out.insert(
            format!("{p}.input_layernorm.weight"),
            host(l.input_layernorm.gamma.val()),
        );
        out.insert(
            format!("{p}.post_attention_layernorm.weight"),
            host(l.post_attention_layernorm.gamma.val()),
        );
    }
    out.insert("model.norm.weight".into(), host(model.norm.gamma.val()));
    if let Some(h) = &model.lm_head {
        let w = match &model.quant_head {
            Some(q) => q.dense::<B>(&device),
            None => h.weight.val().transpose(),
        };
        out.insert("lm_head.weight".into(), host(w));
    }
    out
}

/// HF `config.json` for `config` (`LlamaForCausalLM`; `Qwen3ForCausalLM` with q/k norms;
/// `Qwen2ForCausalLM` when q/k/v carry a bias). RoPE scaling is written in both the
/// transformers 5 form (`rope_parameters`) and the older one (`rope_theta`, `rope_scaling`).
///
/// # Errors
/// When the model's RoPE scaling has no HF form (per-frequency factors read from a GGUF's
/// `rope_freqs` tensor that are not Llama 3's).
pub fn hf_config_json(config: &LlamaConfig) -> Result<serde_json::Value> {
    let c = config;
    let (arch, model_type) = if c.qk_norm {
        ("Qwen3ForCausalLM", "qwen3")
    } else if c.qkv_bias {
        ("Qwen2ForCausalLM", "qwen2")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    let scaling = match &c.rope_scaling {
        None => serde_json::json!({"rope_type": "default"}),
        Some(crate::config::RopeScaling::Factors { .. }) => {
            return Err(ModelError::Unsupported {
                path: "config.json".into(),
                what: "RoPE scaling given as per-frequency factors (a GGUF `rope_freqs` tensor \
                       that does not match Llama 3's rule) has no HF config form"
                    .into(),
            })
        }
        Some(s) => serde_json::to_value(s).expect("json"),
    };
    let mut parameters = scaling.clone();
    parameters["rope_theta"] = serde_json::json!(c.rope_theta);
    Ok(serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": parameters,
        "rope_scaling": if c.rope_scaling.is_some() { scaling } else { serde_json::Value::Null },
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_act": "silu",
        "bos_token_id": c.bos_token_id,
        "eos_token_id": match c.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        },
        "torch_dtype": "float32",
    }))
}

/// Writes an HF checkpoint directory (`config.json`, `model.safetensors`, `tokenizer.json`,
/// `tokenizer_config.json` with the chat template) that transformers and [`crate::load_pretrained`]
/// load. Built in a temp directory next to `dir`, then renamed into place.
pub fn save_pretrained<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    dir: &Path,
) -> Result<()> {
    let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    if let Err(e) = write_pretrained(model, config, tokenizer, &tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| ModelError::io(dir, e))
}

/// The files of [`save_pretrained`], written into `dir` (created if needed) as they are.
pub fn write_pretrained<B: Backend>(
    model: &Llama<B>,
    config: &LlamaConfig,
    tokenizer: &Tokenizer,
    tmp: &Path,
) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| ModelError::io(&p, e)
    };
    std::fs::create_dir_all(tmp).map_err(io(tmp))?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::load::safetensors::write_file(
        &tmp.join("model.safetensors"),
        &hf_tensors(model),
        &meta,
    )?;
    let write = |name: &str, v: &serde_json::Value| {
        let p = tmp.join(name);
        std::fs::write(&p, serde_json::to_string_pretty(v).expect("json")).map_err(io(&p))
    };
    write("config.json", &hf_config_json(config)?)?;
    let tok_json = tokenizer
        .inner
        .to_string(true)
        .map_err(|e| ModelError::Tokenizer {
            origin: "tokenizer.json".into(),
            what: format!("serialising: {e}"),
        })?;
    let p = tmp.join("tokenizer.json");
    std::fs::write(&p, tok_json).map_err(io(&p))?;
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "model_max_length": config.max_position_embeddings,
    });
    if let Some(t) = &tokenizer.chat_template {
        tc["chat_template"] = serde_json::json!(t);
    }
    write("tokenizer_config.json", &tc)
}

/// A parameter id from a name (FNV-1a): the same in every process.
pub fn stable_id(name: &str) -> ParamId {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    ParamId::from(h)
}

fn restamp<B: Backend, const D: usize>(p: &mut Param<Tensor<B, D>>, name: &str, grad: bool) {
    let t = p.val();
    let t = if grad {
        t.require_grad()
    } else {
        t.set_require_grad(false)
    };
    *p = Param::initialized(stable_id(name), t);
}

/// Every base weight (not the adapters) gets an id derived from its HF name, and is made
/// trainable (`trainable = true`, full fine-tuning) or frozen.
pub fn with_stable_ids<B: Backend>(mut model: Llama<B>, trainable: bool) -> Llama<B> {
    restamp(
        &mut model.embed_tokens.weight,
        "model.embed_tokens.weight",
        trainable,
    );
    for (i, l) in model.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        let a = &mut l.self_attn;
        for (name, proj) in [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut l.mlp.gate_proj),
            ("mlp.up_proj", &mut l.mlp.up_proj),
            ("mlp.down_proj", &mut l.mlp.down_proj),
        ] {
            restamp(
                &mut proj.linear.weight,
                &format!("{p}.{name}.weight"),
                trainable,
            );
            if let Some(b) = proj.linear.bias.as_mut() {
                restamp(b, &format!("{p}.{name}.bias"), trainable);
            }
        }
        for (name, norm) in [("q_norm", &mut a.q_norm), ("k_norm", &mut a.k_norm)] {
            if let Some(n) = norm.as_mut() {
                restamp(
                    &mut n.gamma,
                    &format!("{p}.self_attn.{name}.weight"),
                    trainable,
                );
            }
        }
        restamp(
            &mut l.input_layernorm.gamma,
            &format!("{p}.input_layernorm.weight"),
            trainable,
        );
        restamp(
            &mut l.post_attention_layernorm.gamma,
            &format!("{p}.post_attention_layernorm.weight"),
            trainable,
        );
    }
    restamp(&mut model.norm.gamma, "model.norm.weight", trainable);
    if let Some(h) = model.lm_head.as_mut() {
        restamp(&mut h.weight, "lm_head.weight", trainable);
    }
    model
}
