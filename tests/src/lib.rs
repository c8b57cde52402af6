//! Shared helpers of the cross-crate parity tests: the fixture files (computed by HF
//! transformers, see `fixtures/README.md`) and a generic parity routine run on every backend.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `tests/fixtures/<name>`.
/// `BAPO_FIXTURES` overrides the folder (a test binary carried to another machine).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("BAPO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
        .join(name)
}

#[derive(Debug, Deserialize)]
pub struct Golden {
    pub sequences: Vec<GoldenPrompt>,
    pub last_position_top10: Top10,
    pub greedy_24: Vec<Greedy>,
    #[serde(default)]
    pub tokenizer: Vec<TokCase>,
    #[serde(default)]
    pub chat_template_example: Option<ChatExample>,
}

#[derive(Debug, Deserialize)]
pub struct GoldenPrompt {
    pub prompt: String,
    pub prompt_text: String,
    pub chosen: GoldenCompletion,
    pub rejected: GoldenCompletion,
    pub base: GoldenCompletion,
}

#[derive(Debug, Deserialize)]
pub struct GoldenCompletion {
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    pub token_logps: Vec<f64>,
    pub sum_logp: f64,
    pub mean_logp: f64,
}

#[derive(Debug, Deserialize)]
pub struct Top10 {
    pub ids: Vec<u32>,
    pub logps: Vec<f64>,
}

#[derive(Debug, Deserialize)]
pub struct Greedy {
    pub prompt: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct TokCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatExample {
    pub rendered: String,
}

/// Reads `fixtures/<model>/golden.json`.
pub fn golden(model: &str) -> Golden {
    let p = fixture(model).join("golden.json");
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `cargo xtask fetch`'s cache: `$BAPO_CACHE`, or `~/.cache/bapo`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("BAPO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache")
                .join("bapo")
        })
}

/// Where `cargo xtask fetch` puts the real SmolLM2 GGUF (`BAPO_CACHE` overrides `~/.cache/bapo`).
pub fn smollm2_gguf() -> PathBuf {
    cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Where `cargo xtask fetch` puts llama.cpp's vocabulary-only GGUFs and their test texts
/// (`ggml-vocab-<name>.gguf`, `.gguf.inp`, `.gguf.out`).
pub fn vocab_dir() -> PathBuf {
    cache_dir().join("vocab")
}

pub mod parity;

/// Held while a test changes or depends on the process-wide decoding split
/// (`bapo_model::split`): the test binary runs tests on parallel threads, and a split set by
/// one test would otherwise reach another's greedy decoding mid-run.
pub static SPLIT_SETTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Deterministic pseudo-random token ids in `[3, vocab)` (the benches' synthetic text).
pub fn bench_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            3 + (x % (vocab as u64 - 3)) as u32
        })
        .collect()
}

/// The benches' batch: `pairs` examples whose prompt and three completions each fill half of
/// `seq` tokens.
pub fn bench_examples(vocab: usize, pairs: usize, seq: usize) -> Vec<bapo_data::EncodedExample> {
    (0..pairs)
        .map(|i| {
            let s = i as u64 * 4;
            bapo_data::EncodedExample {
                prompt_ids: bench_ids(seq / 2, vocab, s + 1),
                chosen_ids: bench_ids(seq / 2, vocab, s + 2),
                rejected_ids: bench_ids(seq / 2, vocab, s + 3),
                base_ids: Some(bench_ids(seq / 2, vocab, s + 4)),
                line: i + 1,
            }
        })
        .collect()
}
