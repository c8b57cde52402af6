//! An HF tokenizer rebuilt from GGUF metadata (`tokenizer.ggml.*`), so a lone `.gguf` file is
//! enough to run. Two families:
//!
//! - byte-level BPE (`tokenizer.ggml.model = gpt2`): the vocabulary and merges as stored, with
//!   the splitting `tokenizer.ggml.pre` names (llama.cpp's names; the regexes are those of the
//!   models' own `tokenizer.json`, which llama.cpp's `llama-vocab.cpp` records);
//! - SentencePiece BPE (`tokenizer.ggml.model = llama`: Llama 2, Mistral, TinyLlama, Phi-3):
//!   rebuilt the way HF's converter builds these models' `tokenizer.json` — a `▁` prepended to
//!   every text segment and spaces replaced by `▁`, no pre-tokenizer, BPE whose merges are all
//!   pairs of normal pieces that concatenate to a normal piece, ranked by that piece's score
//!   (SentencePiece merges the pair with the highest score), and byte fallback to `<0xXX>`.
//!
//! Control, user-defined and unknown tokens (token types 3, 4, 2) are HF added tokens: matched
//! whole in the text before anything else. `tokenizer.ggml.add_bos_token` / `add_eos_token`
//! become a post-processor, as in HF, so `encode(text, add_special_tokens = true)` adds them.
//! Anything else is refused with an error naming the field and its value.

use serde_json::{json, Map, Value as Json};

use super::Tokenizer;
use crate::error::{ModelError, Result};
use crate::load::gguf::{GgufFile, Value};

/// llama.cpp token types.
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;
const NORMAL: u64 = 1;

/// Llama 3's split (its `tokenizer.json`): contractions, letters with one leading non-letter,
/// numbers of up to three digits, punctuation runs, newline runs, other whitespace.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: as Llama 3's but every digit alone.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's: as Qwen2's, combining marks (`\p{M}`) counted with the letters.
const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// DeepSeek-LLM's letters: an optional whitespace, then a run from its list of cased scripts.
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn sequence(parts: Vec<Json>) -> Json {
    json!({"type": "Sequence", "pretokenizers": parts})
}

fn digits() -> Json {
    json!({"type": "Digits", "individual_digits": true})
}

/// How a byte-level BPE model splits and normalises its text.
struct ByteLevelStyle {
    normalizer: Json,
    pre_tokenizer: Json,
    /// A whole pre-token found in the vocabulary is one token, merges or not (Llama 3).
    ignore_merges: bool,
    /// llama.cpp's default for `tokenizer.ggml.add_bos_token` when the file does not say.
    add_bos: bool,
}

/// The byte-level BPE styles, by `tokenizer.ggml.pre`; `None` for a value not handled.
fn byte_level_style(pre: &str) -> Option<ByteLevelStyle> {
    let nfc = json!({"type": "NFC"});
    let style = |normalizer: Json, pre_tokenizer: Json| ByteLevelStyle {
        normalizer,
        pre_tokenizer,
        ignore_merges: false,
        add_bos: false,
    };
    Some(match pre {
        // GPT-2's own split (ByteLevel's built-in regex). `default` and `gpt2` are what this
        // crate accepted before; the rest are the values llama.cpp maps to the GPT-2 split.
        "default" | "gpt2" | "gpt-2" | "phi-2" | "jais" | "trillion" | "granite-docling"
        | "exaone4" | "gigachat" | "a.x-4.0" | "mellum" => style(Json::Null, byte_level(true)),
        // GPT-NeoX's tokenizer (MPT, OLMo) normalises to NFC first.
        "mpt" | "olmo" => style(nfc, byte_level(true)),
        // Every digit alone, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            style(Json::Null, sequence(vec![digits(), byte_level(true)]))
        }
        // Command-R's tokenizer normalises to NFC first.
        "command-r" => style(nfc, sequence(vec![digits(), byte_level(true)])),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => ByteLevelStyle {
            ignore_merges: true,
            add_bos: true,
            ..style(Json::Null, sequence(vec![split(LLAMA3), byte_level(false)]))
        },
        "dbrx" | "smaug-bpe" => style(Json::Null, sequence(vec![split(LLAMA3), byte_level(false)])),
        // Qwen's own tokenizers (Qwen2, 2.5, 3 and the R1 distills) normalise to NFC first.
        "qwen2" | "deepseek-r1-qwen" => style(nfc, sequence(vec![split(QWEN2), byte_level(false)])),
        "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan" | "solar-open" | "grok-2" => {
            style(Json::Null, sequence(vec![split(QWEN2), byte_level(false)]))
        }
        // Qwen3.5 keeps decomposed accents apart (its reference ids show no NFC).
        "qwen35" => style(Json::Null, sequence(vec![split(QWEN35), byte_level(false)])),
        "falcon" => style(
            Json::Null,
            sequence(vec![
                json!({"type": "Punctuation", "behavior": "Contiguous"}),
                byte_level(true),
                json!({"type": "Digits", "individual_digits": false}),
                split("[0-9][0-9][0-9]"),
            ]),
        ),
        "deepseek-llm" => style(
            Json::Null,
            sequence(vec![
                split(r"[\r\n]"),
                split(DEEPSEEK_LLM_LETTERS),
                split(
                    r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
                ),
                split(r"\s+$"),
                split(r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"),
                split(r"\p{N}+"),
                byte_level(false),
            ]),
        ),
        "deepseek-coder" => style(
            Json::Null,
            sequence(vec![
                split(r"[\r\n]"),
                split(r"\s?\p{L}+"),
                split(r"\s?\p{P}+"),
                split(r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+"),
                digits(),
                byte_level(false),
            ]),
        ),
        _ => return None,
    })
}

const BYTE_LEVEL_PRES: &str = "llama-bpe/llama3, qwen2, qwen35, gpt-2, smollm, starcoder, command-r, falcon, deepseek-coder, deepseek-llm, mpt and the names llama.cpp gives the same split";

/// Reads a string array.
fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    file.get(key)?
        .as_array()
        .ok_or_else(|| ModelError::config(&file.path, key, "not an array"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| ModelError::config(&file.path, key, "holds a non-string"))
        })
        .collect()
}

fn flag(file: &GgufFile, key: &str, default: bool) -> Result<bool> {
    match file.metadata.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ModelError::config(
            &file.path,
            key,
            format!("{v:?} is not a boolean"),
        )),
    }
}

/// The token id stored under `key` (`None` when absent), bounds-checked.
fn token_id(file: &GgufFile, key: &str, n: usize) -> Result<Option<usize>> {
    match file.metadata.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(i) if (i as usize) < n => Ok(Some(i as usize)),
            _ => Err(ModelError::config(
                &file.path,
                key,
                format!("{v:?} is not a token id below the vocabulary size {n}"),
            )),
        },
    }
}

/// Rebuilds the tokenizer; see the module documentation.
pub(super) fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let origin = file.path.display().to_string();
    let bad = |field: &str, what: String| ModelError::config(&file.path, field, what);
    let model = file
        .get("tokenizer.ggml.model")?
        .as_str()
        .ok_or_else(|| bad("tokenizer.ggml.model", "not a string".into()))?;
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        other => {
            return Err(ModelError::Unsupported {
                path: file.path.clone(),
                what: format!(
                    "tokenizer.ggml.model `{other}` (known: `gpt2`, byte-level BPE; `llama`, SentencePiece BPE)"
                ),
            })
        }
    };
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let types: Vec<u64> = match file.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .ok_or_else(|| bad("tokenizer.ggml.token_type", "not an array".into()))?
            .iter()
            .map(|t| t.as_u64().unwrap_or(NORMAL))
            .collect(),
        None => vec![NORMAL; n],
    };
    if types.len() != n {
        return Err(bad(
            "tokenizer.ggml.token_type",
            format!("{} entries for {n} tokens", types.len()),
        ));
    }
    // Ids must map one-to-one to token strings: a repeated token would leave an id the
    // vocabulary cannot hold (found by fuzzing).
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(t.to_string(), json!(i)) {
            return Err(bad(
                "tokenizer.ggml.tokens",
                format!("token {t:?} appears twice (ids {first} and {i})"),
            ));
        }
    }
    let general_name = file
        .metadata
        .get("general.name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_lowercase();
    // llama.cpp (and Phi-3's own tokenizer.json) let Phi-3's chat tokens swallow the
    // whitespace after them; `<unk>`, `<s>` and `<|endoftext|>` do not, `</s>` does.
    let phi3 = general_name.contains("phi-3") || general_name.contains("phi3");
    let added: Vec<Json> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        // An empty added token would match everywhere.
        .filter(|(_, (t, &ty))| matches!(ty, UNKNOWN | CONTROL | USER_DEFINED) && !t.is_empty())
        .map(|(i, (t, &ty))| {
            let rstrip = phi3 && (*t == "</s>" || !matches!(*t, "<unk>" | "<s>" | "<|endoftext|>"));
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": rstrip,
                   "normalized": !spm && ty == USER_DEFINED, "special": ty != USER_DEFINED})
        })
        .collect();
    let bos = token_id(file, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(file, "tokenizer.ggml.eos_token_id", n)?;

    let (normalizer, pre_tokenizer, model_json, decoder, default_bos) = if spm {
        if flag(file, "tokenizer.ggml.remove_extra_whitespaces", false)? {
            return Err(ModelError::Unsupported {
                path: file.path.clone(),
                what: "tokenizer.ggml.remove_extra_whitespaces `true` (SentencePiece whitespace folding)".into(),
            });
        }
        let scores: Vec<f64> = match file.metadata.get("tokenizer.ggml.scores") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| bad("tokenizer.ggml.scores", "not an array".into()))?
                .iter()
                .map(|s| {
                    s.as_f64()
                        .ok_or_else(|| bad("tokenizer.ggml.scores", "holds a non-number".into()))
                })
                .collect::<Result<_>>()?,
            None => vec![0.0; n],
        };
        if scores.len() != n {
            return Err(bad(
                "tokenizer.ggml.scores",
                format!("{} entries for {n} tokens", scores.len()),
            ));
        }
        let unk = token_id(file, "tokenizer.ggml.unknown_token_id", n)?.unwrap_or(0);
        let unk = *tokens
            .get(unk)
            .ok_or_else(|| bad("tokenizer.ggml.tokens", "is empty".into()))?;
        let prefix = flag(file, "tokenizer.ggml.add_space_prefix", true)?;
        let mut normalizers = Vec::new();
        if prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let model = json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": spm_merges(&tokens, &types, &scores)});
        (
            json!({"type": "Sequence", "normalizers": normalizers}),
            Json::Null,
            model,
            json!({"type": "Sequence", "decoders": decoders}),
            true,
        )
    } else {
        let merges = strings(file, "tokenizer.ggml.merges")?;
        let pre = file
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let style = byte_level_style(pre).ok_or_else(|| ModelError::Unsupported {
            path: file.path.clone(),
            what: format!("tokenizer.ggml.pre `{pre}` (known: {BYTE_LEVEL_PRES})"),
        })?;
        let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": style.ignore_merges, "vocab": vocab, "merges": merges});
        (
            style.normalizer,
            style.pre_tokenizer,
            model,
            byte_level(true),
            style.add_bos,
        )
    };
    let add_bos = flag(file, "tokenizer.ggml.add_bos_token", default_bos)?;
    let add_eos = flag(file, "tokenizer.ggml.add_eos_token", false)?;
    let special = |on: bool, id: Option<usize>, field: &str| -> Result<Option<(usize, &str)>> {
        match (on, id) {
            (false, _) => Ok(None),
            (true, Some(i)) => Ok(Some((i, tokens[i]))),
            (true, None) => Err(bad(
                field,
                "missing, but the tokenizer is to add that token".into(),
            )),
        }
    };
    let post_processor = post_processor(
        special(add_bos, bos, "tokenizer.ggml.bos_token_id")?,
        special(add_eos, eos, "tokenizer.ggml.eos_token_id")?,
    );
    let doc = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": decoder, "model": model_json,
    });
    let inner: tokenizers::Tokenizer =
        doc.to_string()
            .parse()
            .map_err(|e: tokenizers::Error| ModelError::Tokenizer {
                origin: origin.clone(),
                what: e.to_string(),
            })?;
    Ok(Tokenizer {
        inner,
        eos_token: eos.map(|i| tokens[i].to_string()),
        bos_token: bos.map(|i| tokens[i].to_string()),
        add_bos,
        add_eos,
        chat_template: file
            .metadata
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
        origin,
    })
}

/// HF's `TemplateProcessing` adding `bos` before and `eos` after each sequence.
fn post_processor(bos: Option<(usize, &str)>, eos: Option<(usize, &str)>) -> Json {
    if bos.is_none() && eos.is_none() {
        return Json::Null;
    }
    let mut specials = Map::new();
    let piece = |tok: Option<(usize, &str)>, type_id: u32, specials: &mut Map<String, Json>| {
        tok.map(|(id, text)| {
            specials.insert(
                text.to_string(),
                json!({"id": text, "ids": [id], "tokens": [text]}),
            );
            json!({"SpecialToken": {"id": text, "type_id": type_id}})
        })
    };
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (part, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        out.extend(piece(bos, type_id, &mut specials));
        out.push(seq(part, type_id));
        out.extend(piece(eos, type_id, &mut specials));
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// SentencePiece BPE as ranked merges: every split of a normal piece into two normal pieces,
/// ranked by the piece's score (highest first), then its id, then the left and right ids.
fn spm_merges(tokens: &[&str], types: &[u64], scores: &[f64]) -> Vec<[String; 2]> {
    let normal: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter(|&(i, _)| types[i] == NORMAL)
        .map(|(i, &t)| (t, i))
        .collect();
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if types[i] != NORMAL {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (normal.get(&t[..at]), normal.get(&t[at..])) {
                merges.push((i, l, r));
            }
        }
    }
    merges.sort_by(|a, b| {
        scores[b.0]
            .total_cmp(&scores[a.0])
            .then(a.0.cmp(&b.0))
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    merges
        .into_iter()
        .map(|(_, l, r)| [tokens[l].to_string(), tokens[r].to_string()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file(meta: Vec<(&str, Value)>) -> GgufFile {
        let mut f = GgufFile::from_bytes(
            &PathBuf::from("tiny.gguf"),
            // Magic, version 3, no tensors, no metadata.
            [
                b"GGUF".as_slice(),
                &3u32.to_le_bytes(),
                &0u64.to_le_bytes(),
                &0u64.to_le_bytes(),
            ]
            .concat(),
        )
        .unwrap();
        f.metadata = meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        f
    }

    fn strs(v: &[&str]) -> Value {
        Value::Array(v.iter().map(|s| Value::Str(s.to_string())).collect())
    }

    fn err(meta: Vec<(&str, Value)>) -> String {
        match from_gguf(&file(meta)) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unknown_model_and_pre_tokenizer_are_named() {
        let e = err(vec![("tokenizer.ggml.model", Value::Str("bert".into()))]);
        assert!(
            e.contains("tiny.gguf") && e.contains("tokenizer.ggml.model `bert`"),
            "{e}"
        );
        let e = err(vec![
            ("tokenizer.ggml.model", Value::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Value::Str("my-new-split".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", strs(&["a b"])),
        ]);
        assert!(
            e.contains("tiny.gguf") && e.contains("tokenizer.ggml.pre `my-new-split`"),
            "{e}"
        );
    }

    /// A four-piece SentencePiece vocabulary: the `▁` prefix, merges by score, byte fallback,
    /// BOS from the post-processor, control tokens matched whole.
    #[test]
    fn sentencepiece_from_scores() {
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x21>", "▁", "a", "b", "ab", "▁ab", "ba",
        ];
        let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -3.5];
        let types = [2u64, 3, 3, 6, 1, 1, 1, 1, 1, 1];
        let f = file(vec![
            ("tokenizer.ggml.model", Value::Str("llama".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.iter().map(|&s| Value::F64(s)).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.iter().map(|&t| Value::U64(t)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U64(1)),
        ]);
        let tok = from_gguf(&f).unwrap();
        assert!(tok.add_bos && !tok.add_eos);
        // "▁aba": `ba` (-3.5) outranks `ab` (-4): ▁ a ba, then no `▁a` piece.
        assert_eq!(tok.encode("aba").unwrap(), vec![4, 5, 9]);
        // "▁ab": `ab` first, then `▁ab`; `!` only as a byte; `</s>` whole.
        assert_eq!(tok.encode("ab!</s>").unwrap(), vec![8, 3, 2]);
        assert_eq!(tok.encode_with_special("ab").unwrap(), vec![1, 8]);
        assert_eq!(tok.decode(&[8, 3]).unwrap(), "ab!");
        let e = err(vec![
            ("tokenizer.ggml.model", Value::Str("llama".into())),
            ("tokenizer.ggml.tokens", strs(&tokens)),
        ]);
        assert!(e.contains("tokenizer.ggml.bos_token_id"), "{e}");
    }
}
