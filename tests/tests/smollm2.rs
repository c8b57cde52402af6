//! The real model: SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by `cargo xtask fetch`) against
//! HF transformers' numbers for the same dequantised weights.

use bapo_model::load::gguf::GgufFile;
use bapo_model::Tokenizer;
use bapo_tests::parity::{check_model, Tolerance};
use bapo_tests::{fixture, golden, smollm2_gguf};

fn gguf_path() -> std::path::PathBuf {
    let p = smollm2_gguf();
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask fetch` (cargo xtask test does it)",
        p.display()
    );
    p
}

#[test]
fn gguf_tokenizer_matches_transformers() {
    let g = golden("smollm2");
    let from_gguf = Tokenizer::from_gguf(&GgufFile::open(&gguf_path()).unwrap()).unwrap();
    let from_json = Tokenizer::from_hf_dir(&fixture("smollm2")).unwrap();
    assert_eq!(from_gguf.vocab_size(), 49152);
    assert_eq!(from_gguf.eos_token.as_deref(), Some("<|im_end|>"));
    for case in &g.tokenizer {
        assert_eq!(
            from_gguf.encode(&case.text).unwrap(),
            case.ids,
            "GGUF tokenizer on {:?}",
            case.text
        );
        assert_eq!(
            from_json.encode(&case.text).unwrap(),
            case.ids,
            "tokenizer.json on {:?}",
            case.text
        );
    }
    // Beyond the golden strings: both tokenizers agree on a mixed corpus (digits, code, unicode).
    let corpus = [
        include_str!("../fixtures/README.md"),
        "x = 12345.678e-9; print(f\"{x:>10}\")\r\n\t\tif a != b: return [1,2,3]",
        "Ünïcödé — 東京 🚀🚀 <|im_start|>assistant\nok<|im_end|><|endoftext|>",
        "   many   spaces    and\n\n\n\nnewlines   ",
    ];
    for text in corpus {
        assert_eq!(
            from_gguf.encode(text).unwrap(),
            from_json.encode(text).unwrap(),
            "on {text:?}"
        );
    }
    // Known, deliberate difference: the GGUF says `tokenizer.ggml.pre = smollm`, which (like
    // llama.cpp and SmolLM2's own tokenizer.json) splits *every* Unicode number character into
    // its own pre-token; transformers' GGUF conversion uses plain byte-level splitting and so
    // merges " ١" into one token. ASCII digits have no such merges, so they agree there.
    let split: Vec<u32> = [" ", "١", "٢", "٣"]
        .iter()
        .flat_map(|t| from_gguf.encode(t).unwrap())
        .collect();
    assert_eq!(from_gguf.encode(" ١٢٣").unwrap(), split);
    let rendered = bapo_train::chat_template(&from_gguf)
        .render(
            &[bapo_data::Message::user("What is the capital of France?")],
            true,
        )
        .unwrap();
    assert_eq!(
        rendered,
        g.chat_template_example
            .expect("smollm2 golden has a chat example")
            .rendered
    );
}

/// Per completion token and per summed completion (nats): the GGUF is dequantised identically on
/// both sides, so what remains is float32 accumulation order over 30 layers.
const TOL: Tolerance = Tolerance {
    token: 0.01,
    sum: 0.05,
};

#[test]
fn smollm2_gguf_matches_transformers_on_ndarray() {
    let device = Default::default();
    let loaded =
        bapo_model::load_pretrained::<burn::backend::NdArray>(&gguf_path(), &device).unwrap();
    assert_eq!(loaded.config.num_layers, 30);
    assert!(loaded.config.tie_word_embeddings);
    let worst = check_model(&loaded, &golden("smollm2"), TOL, &device);
    eprintln!("smollm2 ndarray: worst token |Δ log p| = {worst:.2e}");
}

/// The default CPU backend (burn-flex with rayon threads and SIMD kernels).
#[test]
fn smollm2_gguf_matches_transformers_on_flex() {
    let device = Default::default();
    let loaded = bapo_model::load_pretrained::<burn::backend::Flex>(&gguf_path(), &device).unwrap();
    let worst = check_model(&loaded, &golden("smollm2"), TOL, &device);
    eprintln!("smollm2 flex: worst token |Δ log p| = {worst:.2e}");
}

#[cfg(feature = "cuda")]
#[test]
fn smollm2_gguf_matches_transformers_on_cuda() {
    let device = burn::backend::cuda::CudaDevice::default();
    let loaded = bapo_model::load_pretrained::<burn::backend::Cuda>(&gguf_path(), &device).unwrap();
    let worst = check_model(&loaded, &golden("smollm2"), TOL, &device);
    eprintln!("smollm2 cuda: worst token |Δ log p| = {worst:.2e}");
}
