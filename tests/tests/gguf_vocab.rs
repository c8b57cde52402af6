//! The GGUF tokenizer on real vocabularies: llama.cpp's vocabulary-only GGUFs of Llama 3,
//! Qwen2, Qwen3.5, Llama 2 (SentencePiece), Phi-3, GPT-2 and others, with the texts llama.cpp
//! tests them on (`.gguf.inp`: code, digits, CJK, emoji, whitespace runs) and the ids HF
//! tokenizers gave for each (`.gguf.out`, no special tokens added). Fetched by `cargo xtask
//! fetch` from the pinned llama-cpp-python sdist.

use bapo_model::load::gguf::GgufFile;
use bapo_model::Tokenizer;
use bapo_tests::vocab_dir;

/// Every vocabulary with reference ids whose `tokenizer.ggml.pre` the tokenizer handles.
const VOCABS: [&str; 13] = [
    "llama-bpe",
    "qwen2",
    "qwen35",
    "llama-spm",
    "phi-3",
    "gpt-2",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "falcon",
    "deepseek-coder",
    "deepseek-llm",
];

/// `vocab_dir()/name`, failing with what to run when it is missing.
fn path(name: &str) -> std::path::PathBuf {
    let p = vocab_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo xtask fetch` (cargo xtask test does it)",
        p.display()
    );
    p
}

fn read(name: &str) -> String {
    let p = path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn tokenizer(name: &str) -> Tokenizer {
    let p = path(&format!("ggml-vocab-{name}.gguf"));
    Tokenizer::from_gguf(&GgufFile::open(&p).unwrap()).unwrap()
}

/// The texts (each followed by a `__ggml_vocab_test__` line) and their reference ids.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = read(&format!("ggml-vocab-{name}.gguf.inp"));
    let out = read(&format!("ggml-vocab-{name}.gguf.out"));
    let texts: Vec<&str> = inp
        .strip_suffix("\n__ggml_vocab_test__\n")
        .expect("ends with a separator")
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|i| i.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: texts and id lines differ");
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

#[test]
fn gguf_vocabularies_tokenize_as_hf_tokenizers() {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for name in VOCABS {
        let tok = tokenizer(name);
        let cases = cases(name);
        let mut equal = 0;
        for (text, ids) in &cases {
            let got = tok.encode(text).unwrap();
            if &got == ids {
                equal += 1;
            } else if failures.len() < 20 {
                failures.push(format!(
                    "{name} on {text:?}:\n  HF   {ids:?}\n  bapo {got:?}"
                ));
            }
        }
        report.push(format!("{name} {equal}/{}", cases.len()));
        assert!(cases.len() >= 40, "{name}: only {} texts", cases.len());
    }
    eprintln!("agreement: {}", report.join(", "));
    assert!(
        failures.is_empty(),
        "{}\n{}",
        report.join(", "),
        failures.join("\n")
    );
}

/// BOS as HF's post-processors add it: Llama 3 and SentencePiece models add it, Qwen2 does
/// not; `encode` never does.
#[test]
fn gguf_vocabularies_add_bos_as_hf_does() {
    for (name, bos) in [
        ("llama-bpe", Some(128000)),
        ("llama-spm", Some(1)),
        ("phi-3", Some(1)),
        ("qwen2", None),
        ("gpt-2", None),
    ] {
        let tok = tokenizer(name);
        let plain = tok.encode("Hello world").unwrap();
        let with = tok.encode_with_special("Hello world").unwrap();
        assert_eq!(tok.add_bos, bos.is_some(), "{name}");
        assert!(!tok.add_eos, "{name}");
        let expected: Vec<u32> = bos.into_iter().chain(plain.iter().copied()).collect();
        assert_eq!(with, expected, "{name}");
        if let Some(b) = bos {
            assert_eq!(tok.bos_id(), Some(b), "{name}");
        }
    }
}

/// Control tokens are matched whole, like HF's added tokens, and SentencePiece restarts the
/// `▁` prefix after one (HF's legacy Llama behaviour).
#[test]
fn gguf_special_tokens_are_matched_whole() {
    let llama3 = tokenizer("llama-bpe");
    let ids = llama3
        .encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
        .unwrap();
    assert_eq!(ids, [128000, 128006, 882, 128007]);
    let qwen = tokenizer("qwen2");
    assert_eq!(
        qwen.encode("<|im_start|>user\nHi<|im_end|>").unwrap(),
        [151644, 872, 198, 13048, 151645]
    );
    let llama2 = tokenizer("llama-spm");
    let hello = llama2.encode("Hello").unwrap();
    let both: Vec<u32> = [1].into_iter().chain(hello.iter().copied()).collect();
    assert_eq!(llama2.encode("<s>Hello").unwrap(), both);
    assert_eq!(llama2.decode(&both).unwrap(), "<s> Hello");
}

/// `from_hf_dir` reads `add_bos` off the post-processor: a SentencePiece tokenizer rebuilt from
/// GGUF, written out as tokenizer.json, says BOS; SmolLM2's tokenizer.json (no BOS) does not.
#[test]
fn hf_tokenizer_json_tells_whether_bos_is_added() {
    let dir = std::env::temp_dir().join(format!("bapo-gguf-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let llama2 = tokenizer("llama-spm");
    std::fs::write(
        dir.join("tokenizer.json"),
        llama2.inner.to_string(false).unwrap(),
    )
    .unwrap();
    let back = Tokenizer::from_hf_dir(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    let back = back.unwrap();
    assert!(back.add_bos && !back.add_eos);
    let text = "  Hello, 世界 🦙 <s> 123";
    assert_eq!(back.encode(text).unwrap(), llama2.encode(text).unwrap());
    assert_eq!(
        back.encode_with_special(text).unwrap(),
        llama2.encode_with_special(text).unwrap()
    );
    let smollm = Tokenizer::from_hf_dir(&bapo_tests::fixture("smollm2")).unwrap();
    assert!(!smollm.add_bos && !smollm.add_eos);
}
