//! The architectures users bring, against HF transformers (`tests/fixtures/make_tiny.py`):
//! Llama 3.x RoPE scaling (`rope_type = "llama3"`) and Qwen3 (per-head q/k RMSNorm, head_dim ≠
//! hidden / heads), each from its HF safetensors directory and from its GGUF file, with the
//! tolerance of the tiny Llama fixture. Each fixture is checked to notice the feature: without
//! the scaling or the norms, log-probs move by more than 0.1 nats.

use bapo_model::{load_pretrained, LoadedModel, RopeScaling};
use bapo_tests::parity::{check_model, worst_token_error, Tolerance};
use bapo_tests::{fixture, golden};
use burn::tensor::backend::Backend;

const TOL: Tolerance = Tolerance {
    token: 1e-3,
    sum: 1e-3 * 4.0,
};

const FIXTURES: [&str; 2] = ["tiny-llama3", "tiny-qwen3"];

fn load<B: Backend>(name: &str, gguf: bool, device: &B::Device) -> LoadedModel<B> {
    let dir = fixture(name);
    let path = if gguf { dir.join("model.gguf") } else { dir };
    load_pretrained::<B>(&path, device).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check_all<B: Backend>(backend: &str) {
    let device = Default::default();
    for name in FIXTURES {
        for gguf in [false, true] {
            let loaded = load::<B>(name, gguf, &device);
            let worst = check_model(&loaded, &golden(name), TOL, &device);
            let form = if gguf { "gguf" } else { "safetensors" };
            eprintln!("{name} ({form}) {backend}: worst token |Δ log p| = {worst:.2e}");
        }
    }
}

#[test]
fn llama3_and_qwen3_match_transformers_on_ndarray() {
    check_all::<burn::backend::NdArray>("ndarray");
}

#[test]
fn llama3_and_qwen3_match_transformers_on_flex() {
    check_all::<burn::backend::Flex>("flex");
}

#[cfg(feature = "wgpu")]
#[test]
fn llama3_and_qwen3_match_transformers_on_wgpu() {
    check_all::<burn::backend::Wgpu>("wgpu");
}

#[cfg(feature = "cuda")]
#[test]
fn llama3_and_qwen3_match_transformers_on_cuda() {
    check_all::<burn::backend::Cuda>("cuda");
}

/// Both forms describe the same model: the GGUF's `rope_freqs` tensor reads back as Llama 3's
/// rule with the HF config's numbers, Qwen3's head size comes from `attention.key_length`.
#[test]
fn gguf_configs_equal_the_hf_configs() {
    type B = burn::backend::NdArray;
    let device = Default::default();
    for name in FIXTURES {
        let hf = load::<B>(name, false, &device).config;
        let gguf = load::<B>(name, true, &device).config;
        assert_eq!(
            (
                &hf.rope_scaling,
                hf.qk_norm,
                hf.head_dim,
                hf.rope_theta,
                hf.tie_word_embeddings
            ),
            (
                &gguf.rope_scaling,
                gguf.qk_norm,
                gguf.head_dim,
                gguf.rope_theta,
                gguf.tie_word_embeddings
            ),
            "{name}"
        );
    }
    let llama3 = load::<B>("tiny-llama3", true, &device).config;
    assert_eq!(
        llama3.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        })
    );
    let qwen3 = load::<B>("tiny-qwen3", true, &device).config;
    assert!(qwen3.qk_norm && qwen3.num_heads * qwen3.head_dim != qwen3.hidden_size);
}

/// The fixtures can fail: plain RoPE on the Llama 3 weights, or Qwen3 without its q/k norms,
/// is off by more than 0.1 nats a token somewhere (the tolerance is 1e-3).
#[test]
fn fixtures_notice_a_missing_scaling_or_norm() {
    type B = burn::backend::NdArray;
    let device = Default::default();
    let mut llama3 = load::<B>("tiny-llama3", false, &device);
    llama3.model.rope_inv_freq = llama3
        .config
        .clone()
        .with_rope_scaling(None)
        .rope_inv_freq();
    let off = worst_token_error(&llama3, &golden("tiny-llama3"), &device);
    assert!(off > 0.1, "tiny-llama3 without RoPE scaling: worst {off}");
    let mut qwen3 = load::<B>("tiny-qwen3", false, &device);
    for layer in &mut qwen3.model.layers {
        layer.self_attn.q_norm = None;
        layer.self_attn.k_norm = None;
    }
    let off = worst_token_error(&qwen3, &golden("tiny-qwen3"), &device);
    assert!(off > 0.1, "tiny-qwen3 without q/k norms: worst {off}");
}

/// An HF export of each loads back (config and weights) to the same log-probs, and names the
/// architecture transformers needs (`Qwen3ForCausalLM`, `rope_type = "llama3"`).
#[test]
fn exports_round_trip() {
    type B = burn::backend::NdArray;
    let device = Default::default();
    for name in FIXTURES {
        let loaded = load::<B>(name, true, &device);
        let dir = std::env::temp_dir().join(format!("bapo-export-{name}-{}", std::process::id()));
        bapo_model::export::save_pretrained(&loaded.model, &loaded.config, &loaded.tokenizer, &dir)
            .unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let back = load_pretrained::<B>(&dir, &device).unwrap();
        assert_eq!(back.config, loaded.config, "{name}");
        let worst = check_model(&back, &golden(name), TOL, &device);
        eprintln!("{name} exported: worst token |Δ log p| = {worst:.2e}");
        match name {
            "tiny-qwen3" => assert_eq!(cfg["architectures"][0], "Qwen3ForCausalLM"),
            _ => assert_eq!(cfg["rope_parameters"]["rope_type"], "llama3"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
