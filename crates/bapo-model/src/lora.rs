//! LoRA on the frozen base weights. The adapters live in the model's projections
//! ([`crate::model::Proj::lora`]); this module attaches, removes, loads and saves them in PEFT's
//! layout (`adapter_config.json`, `adapter_model.safetensors` with `lora_A` `[r, in]`, `lora_B`
//! `[out, r]`), so a server or another project loads adapters with the model crate alone.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::ModelError;
use crate::load::HostTensor;
use crate::model::{Lora, Proj};
use crate::Llama;
use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Projections an adapter can target (PEFT's `target_modules` names).
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// LoRA hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

fn default_targets() -> Vec<String> {
    ALL_TARGETS.iter().map(|s| s.to_string()).collect()
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: default_targets(),
        }
    }
}

fn projs<B: Backend>(model: &mut Llama<B>) -> Vec<(String, &mut Proj<B>)> {
    let mut out = Vec::new();
    for (i, l) in model.layers.iter_mut().enumerate() {
        let a = &mut l.self_attn;
        let m = &mut l.mlp;
        for (name, p) in [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.o_proj", &mut a.o_proj),
            ("mlp.gate_proj", &mut m.gate_proj),
            ("mlp.up_proj", &mut m.up_proj),
            ("mlp.down_proj", &mut m.down_proj),
        ] {
            out.push((format!("model.layers.{i}.{name}"), p));
        }
    }
    out
}

impl LoraConfig {
    /// Checks the target names.
    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("lora.rank must be at least 1".into());
        }
        for t in &self.target_modules {
            if !ALL_TARGETS.contains(&t.as_str()) {
                return Err(format!(
                    "lora.target_modules: unknown module `{t}` (known: {})",
                    ALL_TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Freezes every base weight and attaches fresh adapters (`A` ~ U(±1/√in), seeded; `B` = 0,
    /// so the adapted model starts equal to the base).
    pub fn attach<B: Backend>(&self, model: Llama<B>, seed: u64, device: &B::Device) -> Llama<B> {
        let mut model = model.no_grad();
        let mut rng = StdRng::seed_from_u64(seed);
        for (name, proj) in projs(&mut model) {
            if !self
                .target_modules
                .iter()
                .any(|t| name.ends_with(t.as_str()))
            {
                continue;
            }
            let [d_in, d_out] = proj.linear.weight.val().dims();
            let bound = 1.0 / (d_in as f64).sqrt();
            let a: Vec<f32> = (0..d_in * self.rank)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect();
            proj.lora = Some(Lora {
                a: Param::initialized(
                    crate::export::stable_id(&format!("{name}.lora_A")),
                    Tensor::from_data(TensorData::new(a, [d_in, self.rank]), device).require_grad(),
                ),
                b: Param::initialized(
                    crate::export::stable_id(&format!("{name}.lora_B")),
                    Tensor::zeros([self.rank, d_out], device).require_grad(),
                ),
                scale: self.alpha / self.rank as f64,
                dropout: Dropout { prob: self.dropout },
            });
        }
        model
    }
}

/// The model without adapters (the reference: frozen base weights, shared, not copied).
pub fn without_adapters<B: Backend>(mut model: Llama<B>) -> Llama<B> {
    for (_, proj) in projs(&mut model) {
        proj.lora = None;
    }
    model
}

/// Whether any adapter applies dropout (its masks come from the backend's one RNG).
pub fn has_dropout<B: Backend>(model: &Llama<B>) -> bool {
    let mut model = model.clone();
    projs(&mut model)
        .into_iter()
        .any(|(_, p)| p.lora.as_ref().is_some_and(|l| l.dropout.prob > 0.0))
}

fn host<B: Backend>(t: Tensor<B, 2>) -> HostTensor {
    HostTensor {
        shape: t.dims().to_vec(),
        data: t.into_data().convert::<f32>().to_vec::<f32>().expect("f32"),
    }
}

/// Adapter weights in PEFT's naming and layout.
pub fn adapter_tensors<B: Backend>(model: &Llama<B>) -> BTreeMap<String, HostTensor> {
    let mut model = model.clone();
    let mut out = BTreeMap::new();
    for (name, proj) in projs(&mut model) {
        if let Some(l) = &proj.lora {
            out.insert(
                format!("base_model.model.{name}.lora_A.weight"),
                host(l.a.val().transpose()),
            );
            out.insert(
                format!("base_model.model.{name}.lora_B.weight"),
                host(l.b.val().transpose()),
            );
        }
    }
    out
}

/// Loads adapter weights saved by [`save_adapter`] into a model whose adapters are attached.
pub fn load_adapter<B: Backend>(
    model: Llama<B>,
    path: &Path,
    device: &B::Device,
) -> crate::Result<Llama<B>> {
    let mut tensors = BTreeMap::new();
    crate::load::safetensors::read_file(path, &mut tensors)?;
    let mut model = model;
    for (name, proj) in projs(&mut model) {
        if let Some(l) = proj.lora.as_mut() {
            for (suffix, param) in [("lora_A", &mut l.a), ("lora_B", &mut l.b)] {
                let key = format!("base_model.model.{name}.{suffix}.weight");
                let [r, c] = param.val().dims();
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| ModelError::MissingTensor {
                        path: path.into(),
                        name: key.clone(),
                        expected: vec![c, r],
                    })?;
                if t.shape != [c, r] {
                    return Err(ModelError::ShapeMismatch {
                        path: path.into(),
                        name: key,
                        expected: vec![c, r],
                        got: t.shape,
                    });
                }
                let value =
                    Tensor::<B, 2>::from_data(TensorData::new(t.data, [c, r]), device).transpose();
                *param = Param::initialized(param.id, value.require_grad());
            }
        }
    }
    if !tensors.is_empty() {
        return Err(ModelError::UnexpectedTensors {
            path: path.into(),
            names: tensors.into_keys().collect(),
        });
    }
    Ok(model)
}

/// Writes the adapter as `adapter_model.safetensors` (atomically).
pub fn save_adapter<B: Backend>(model: &Llama<B>, path: &Path) -> crate::Result<()> {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::load::safetensors::write_file(path, &adapter_tensors(model), &meta)
}

/// Frobenius norm of `scale · B·A` per adapted module (the weight change LoRA applies).
pub fn adapter_delta_norms<B: Backend>(model: &Llama<B>) -> BTreeMap<String, f64> {
    let mut model = model.clone();
    let mut out = BTreeMap::new();
    for (name, proj) in projs(&mut model) {
        if let Some(l) = &proj.lora {
            let delta = l.a.val().matmul(l.b.val()).mul_scalar(l.scale);
            let n: f64 = delta
                .square()
                .sum()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .expect("f64")[0];
            out.insert(name, n.sqrt());
        }
    }
    out
}

/// Attaches and loads a saved adapter directory (`adapter_config.json` +
/// `adapter_model.safetensors`, PEFT layout) onto `model`.
pub fn load_adapter_dir<B: Backend>(
    model: Llama<B>,
    dir: &Path,
    device: &B::Device,
) -> crate::Result<Llama<B>> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::format(&cfg_path, None, format!("line {}: {e}", e.line())))?;
    let field = |k: &str| {
        v.get(k)
            .ok_or_else(|| ModelError::config(&cfg_path, k, "missing"))
    };
    let rank = field("r")?
        .as_u64()
        .ok_or_else(|| ModelError::config(&cfg_path, "r", "not an integer"))?
        as usize;
    let alpha = field("lora_alpha")?
        .as_f64()
        .ok_or_else(|| ModelError::config(&cfg_path, "lora_alpha", "not a number"))?;
    let targets: Vec<String> = field("target_modules")?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let cfg = LoraConfig {
        rank,
        alpha,
        dropout: 0.0,
        target_modules: targets,
    };
    cfg.validate()
        .map_err(|what| ModelError::config(&cfg_path, "target_modules", what))?;
    load_adapter(
        cfg.attach(model, 0, device),
        &dir.join("adapter_model.safetensors"),
        device,
    )
}
