//! # bapo-model
//!
//! A Llama-family decoder written against Burn's generic `Backend` (CPU, wgpu, CUDA), with
//! loaders for HF safetensors checkpoint directories and GGUF files, tokenizer construction
//! (from `tokenizer.json` or GGUF metadata) and batched KV-cache generation.
//!
//! ```no_run
//! use burn::backend::NdArray;
//! let device = Default::default();
//! let loaded = bapo_model::load_pretrained::<NdArray>("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(), &device).unwrap();
//! let ids = loaded.tokenizer.encode("Hello").unwrap();
//! ```

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod load;
pub mod lora;
pub mod model;
pub mod precision;
pub mod quant;
pub mod shared_prompt;
pub mod split;
pub mod tokenizer;
pub mod weight_dtype;

pub use config::{HfConfig, LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use generate::{generate, generate_streaming, Generated, GenerationConfig, OnStep};
pub use load::{load_base, load_pretrained, load_pretrained_as, load_pretrained_kept, LoadedModel};
pub use lora::LoraConfig;
pub use model::{KvCache, Llama};
pub use shared_prompt::SharedLayout;
pub use tokenizer::Tokenizer;
