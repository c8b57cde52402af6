//! Replays every committed fuzz input (`fuzz/seeds/<target>/`; `fuzz/corpus/<target>/`, the
//! minimised corpus the fuzzers grew; `fuzz/regressions/<target>/`, inputs that once crashed a
//! target) through the same harness the libFuzzer targets run, so a fixed crash stays fixed
//! and every parser branch the fuzzers reached is exercised in CI without a fuzzer. The seeds,
//! written by independent tools (llama.cpp's gguf-py, HF's safetensors), must also parse
//! completely.

#[path = "../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

fn inputs(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn jsonl_seeds_parse_and_regressions_do_not_panic() {
    let seeds = inputs("seeds", "jsonl");
    assert!(seeds.len() >= 3, "seeds missing");
    for (name, bytes) in &seeds {
        let pairs = harness::jsonl(bytes);
        assert!(pairs.is_some_and(|n| n >= 1), "seed {name} did not parse");
    }
    let replay = [inputs("corpus", "jsonl"), inputs("regressions", "jsonl")].concat();
    assert!(replay.len() > 100, "the committed corpus is missing");
    for (_, bytes) in replay {
        harness::jsonl(&bytes);
    }
}

#[test]
fn gguf_seeds_from_gguf_py_load_and_regressions_do_not_panic() {
    let seeds = inputs("seeds", "gguf");
    assert!(seeds.len() >= 3, "seeds missing");
    for (name, bytes) in &seeds {
        let passed = harness::gguf(bytes);
        let want: &[&str] = if name.contains("no-tokenizer") {
            &["header", "llama"]
        } else {
            &["header", "llama", "tokenizer"]
        };
        assert_eq!(passed, want, "seed {name}");
    }
    let replay = [inputs("corpus", "gguf"), inputs("regressions", "gguf")].concat();
    assert!(replay.len() > 100, "the committed corpus is missing");
    for (_, bytes) in replay {
        harness::gguf(&bytes);
    }
}

#[test]
fn safetensors_seeds_parse_and_regressions_do_not_panic() {
    let seeds = inputs("seeds", "safetensors");
    assert!(seeds.len() >= 3, "seeds missing");
    for (name, bytes) in &seeds {
        assert!(harness::safetensors(bytes).is_some(), "seed {name}");
    }
    let replay = [
        inputs("corpus", "safetensors"),
        inputs("regressions", "safetensors"),
    ]
    .concat();
    assert!(replay.len() > 100, "the committed corpus is missing");
    for (_, bytes) in replay {
        harness::safetensors(&bytes);
    }
}

/// The bug the GGUF target found, as a named case: a repeated token string in
/// `tokenizer.ggml.tokens` left an id the vocabulary did not count. Built from the gguf-py seed
/// by renaming token 31 (`er`) to `re`, which token 32 already is.
#[test]
fn gguf_tokenizer_with_a_repeated_token_is_refused() {
    use bapo_model::load::gguf::GgufFile;
    let (_, seed) = inputs("seeds", "gguf")
        .into_iter()
        .find(|(n, _)| n == "tiny-llama-quantised.gguf")
        .unwrap();
    let from = b"\x02\0\0\0\0\0\0\0er";
    let at = seed.windows(from.len()).position(|w| w == from).unwrap();
    let mut bytes = seed.clone();
    bytes[at + 8..at + 10].copy_from_slice(b"re");
    let path = std::path::Path::new("dup.gguf");
    let ok = GgufFile::from_bytes(path, seed).unwrap();
    assert!(bapo_model::Tokenizer::from_gguf(&ok).is_ok());
    let file = GgufFile::from_bytes(path, bytes).unwrap();
    let err = bapo_model::Tokenizer::from_gguf(&file)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("dup.gguf")
            && err.contains("tokenizer.ggml.tokens")
            && err.contains("token \"re\" appears twice (ids 31 and 32)"),
        "{err}"
    );
}
