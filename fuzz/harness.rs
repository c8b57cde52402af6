//! What each fuzz target does with one input. Shared, through `#[path]`, by the libFuzzer
//! targets in `fuzz/fuzz_targets/` and by `tests/tests/fuzz_corpus.rs`, which replays every
//! committed corpus input in CI. Beyond "does not panic", each target checks the contract: an
//! error names the input file; a success is internally consistent.

#![allow(dead_code)] // each target uses one function

use std::collections::BTreeMap;
use std::path::Path;

/// SmolLM2's ChatML template (shortened): a real Jinja template for every parsed prompt.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn names_file(err: &dyn std::fmt::Display, file: &str) {
    let msg = err.to_string();
    assert!(msg.contains(file), "error does not name {file}: {msg}");
}

/// The preference and scoring JSONL readers, then every parsed prompt through a chat template.
/// Returns how many preference pairs parsed (`None`: the file was refused).
pub fn jsonl(data: &[u8]) -> Option<usize> {
    let path = Path::new("fuzz.jsonl");
    let template =
        bapo_data::ChatTemplate::new(Some(CHATML.into()), None, Some("<|im_end|>".into()));
    let parsed = match bapo_data::parse_preferences(path, data) {
        Ok(examples) => {
            let mut last = 0;
            for ex in &examples {
                assert!(ex.line > last, "lines out of order");
                last = ex.line;
                assert_ne!(ex.chosen, ex.rejected);
                assert!(!ex.chosen.trim().is_empty() && !ex.rejected.trim().is_empty());
                assert_eq!(ex.prompt.last().map(|m| m.role.as_str()), Some("user"));
                let text = template
                    .render(&ex.prompt, true)
                    .expect("a valid prompt renders");
                assert!(text.ends_with("<|im_start|>assistant\n"));
            }
            Some(examples.len())
        }
        Err(e) => {
            names_file(&e, "fuzz.jsonl:");
            None
        }
    };
    match bapo_data::parse_score_file(path, data) {
        Ok(examples) => assert!(examples.windows(2).all(|w| w[0].line < w[1].line)),
        Err(e) => names_file(&e, "fuzz.jsonl:"),
    }
    parsed
}

/// The GGUF header/metadata/tensor-table parser, then the llama config, every tensor
/// dequantised and renamed, and the byte-level BPE tokenizer rebuilt from the metadata.
/// Returns the stages that succeeded: `header`, `llama`, `tokenizer`.
pub fn gguf(data: &[u8]) -> Vec<&'static str> {
    use bapo_model::load::gguf::GgufFile;
    let path = Path::new("fuzz.gguf");
    let mut passed = Vec::new();
    let file = match GgufFile::from_bytes(path, data.to_vec()) {
        Ok(f) => f,
        Err(e) => {
            names_file(&e, "fuzz.gguf");
            return passed;
        }
    };
    passed.push("header");
    for t in &file.tensors {
        match file.dequantise(t) {
            Ok(h) => assert_eq!(h.data.len(), h.shape.iter().product::<usize>()),
            Err(e) => names_file(&e, "fuzz.gguf"),
        }
    }
    match file.llama_config() {
        Ok(config) => match file.read_llama_tensors(&config) {
            Ok(host) => {
                for t in host.tensors.values() {
                    assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
                }
                passed.push("llama");
            }
            Err(e) => names_file(&e, "fuzz.gguf"),
        },
        Err(e) => names_file(&e, "fuzz.gguf"),
    }
    match bapo_model::Tokenizer::from_gguf(&file) {
        Ok(tok) => {
            if let Ok(ids) = tok.encode("Hi there, 1234 <|im_end|> ünïcode") {
                assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size().max(1)));
                let _ = tok.decode(&ids);
            }
            passed.push("tokenizer");
        }
        Err(e) => names_file(&e, "fuzz.gguf"),
    }
    passed
}

/// The safetensors header and data-offset checks, and the conversion to f32. Returns how many
/// tensors were read (`None`: the file was refused).
pub fn safetensors(data: &[u8]) -> Option<usize> {
    let path = Path::new("fuzz.safetensors");
    let mut out = BTreeMap::new();
    match bapo_model::load::safetensors::read_bytes(path, data, &mut out) {
        Ok(()) => {
            for t in out.values() {
                assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
            }
            Some(out.len())
        }
        Err(e) => {
            names_file(&e, "fuzz.safetensors");
            None
        }
    }
}
