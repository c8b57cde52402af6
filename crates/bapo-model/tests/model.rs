//! Model-level invariants on a small random Llama: KV-cache decoding equals the full forward,
//! batching with left padding changes nothing, sampling is seeded, loaders reject bad tensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bapo_model::load::{build_llama, safetensors, HostTensor, HostTensors};
use bapo_model::model::{causal_mask, KvCache};
use bapo_model::{generate, GenerationConfig, LlamaConfig, ModelError};
use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};

type B = NdArray;

fn config() -> LlamaConfig {
    LlamaConfig::new(64, 16, 24, 2, 4, 2, 4).with_rope_theta(500.0)
}

fn ids(v: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), [1, v.len()]),
        &Default::default(),
    )
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let device = Default::default();
    let model = config().init::<B>(&device);
    let tokens = [5i64, 9, 1, 33, 60, 2, 17];
    let full = model
        .forward(ids(&tokens), None)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let mut cache = KvCache::default();
    let pos = |a: usize, n: usize| {
        Tensor::<B, 2, Int>::from_data(
            TensorData::new((a as i64..(a + n) as i64).collect::<Vec<_>>(), [1, n]),
            &device,
        )
    };
    let h = model.forward_cached(
        ids(&tokens[..4]),
        pos(0, 4),
        causal_mask::<B>(1, 4, &device),
        &mut cache,
    );
    let mut got = model.logits(h).into_data().to_vec::<f32>().unwrap();
    for (i, &t) in tokens.iter().enumerate().skip(4) {
        let mask = Tensor::<B, 4, burn::tensor::Bool>::from_data(
            TensorData::new(vec![false; i + 1], [1, 1, 1, i + 1]),
            &device,
        );
        let h = model.forward_cached(ids(&[t]), pos(i, 1), mask, &mut cache);
        got.extend(model.logits(h).into_data().to_vec::<f32>().unwrap());
    }
    assert_eq!(cache.len(), tokens.len());
    let worst = full
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "cached vs full logits differ by {worst}");
}

#[test]
fn batched_left_padded_generation_equals_one_by_one() {
    let device = Default::default();
    let model = config().init::<B>(&device);
    let prompts = vec![
        vec![3u32, 4, 5],
        vec![10u32, 11, 12, 13, 14, 15],
        vec![7u32],
    ];
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let batched = generate(&model, &prompts, &cfg, &device);
    for (p, b) in prompts.iter().zip(&batched) {
        let single = generate(&model, std::slice::from_ref(p), &cfg, &device);
        assert_eq!(single[0].tokens, b.tokens, "prompt {p:?}");
        assert_eq!(b.tokens.len(), 8);
    }
}

#[test]
fn sampling_is_seeded_and_tiny_top_p_is_greedy() {
    let device = Default::default();
    let model = config().init::<B>(&device);
    let prompts = vec![vec![3u32, 4, 5], vec![9u32]];
    let greedy = generate(
        &model,
        &prompts,
        &GenerationConfig {
            max_new_tokens: 6,
            ..Default::default()
        },
        &device,
    );
    let nucleus = generate(
        &model,
        &prompts,
        &GenerationConfig {
            max_new_tokens: 6,
            temperature: 1.0,
            top_p: 1e-6,
            seed: 3,
            ..Default::default()
        },
        &device,
    );
    assert_eq!(greedy, nucleus);
    let hot = GenerationConfig {
        max_new_tokens: 12,
        temperature: 5.0,
        top_p: 1.0,
        seed: 11,
        ..Default::default()
    };
    let a = generate(&model, &prompts, &hot, &device);
    assert_eq!(a, generate(&model, &prompts, &hot, &device));
    let other = generate(
        &model,
        &prompts,
        &GenerationConfig {
            seed: 12,
            ..hot.clone()
        },
        &device,
    );
    assert_ne!(
        a, other,
        "different seeds should differ at temperature 5 over 24 draws"
    );
}

#[test]
fn generation_stops_each_row_on_eos() {
    let device = Default::default();
    let model = config().init::<B>(&device);
    let prompts = vec![vec![3u32, 4, 5], vec![8u32, 1]];
    let free = generate(
        &model,
        &prompts,
        &GenerationConfig {
            max_new_tokens: 6,
            ..Default::default()
        },
        &device,
    );
    // Declare row 0's third greedy token an EOS: row 0 stops there, row 1 continues unchanged
    // unless it meets the same token.
    let eos = free[0].tokens[2];
    let out = generate(
        &model,
        &prompts,
        &GenerationConfig {
            max_new_tokens: 6,
            eos_ids: vec![eos],
            ..Default::default()
        },
        &device,
    );
    let first = free[0].tokens.iter().position(|&t| t == eos).unwrap();
    assert_eq!(out[0].tokens, free[0].tokens[..=first]);
    assert!(out[0].stopped_on_eos);
    let cut = free[1]
        .tokens
        .iter()
        .position(|&t| t == eos)
        .map(|i| i + 1)
        .unwrap_or(6);
    assert_eq!(out[1].tokens, free[1].tokens[..cut]);
}

fn host(shape: &[usize]) -> HostTensor {
    let n = shape.iter().product::<usize>();
    HostTensor {
        shape: shape.to_vec(),
        data: (0..n).map(|i| (i as f32 * 0.37).sin() * 0.1).collect(),
    }
}

/// HF-named tensors for `config()`.
fn hf_tensors(c: &LlamaConfig) -> BTreeMap<String, HostTensor> {
    let (e, q, kv, ff) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".into(), host(&[c.vocab_size, e]));
    m.insert("model.norm.weight".into(), host(&[e]));
    m.insert("lm_head.weight".into(), host(&[c.vocab_size, e]));
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("input_layernorm", vec![e]),
            ("post_attention_layernorm", vec![e]),
            ("self_attn.q_proj", vec![q, e]),
            ("self_attn.k_proj", vec![kv, e]),
            ("self_attn.v_proj", vec![kv, e]),
            ("self_attn.o_proj", vec![e, q]),
            ("mlp.gate_proj", vec![ff, e]),
            ("mlp.up_proj", vec![ff, e]),
            ("mlp.down_proj", vec![e, ff]),
        ] {
            m.insert(format!("{p}.{n}.weight"), host(&s));
        }
    }
    m
}

fn load(m: BTreeMap<String, HostTensor>) -> Result<bapo_model::Llama<B>, ModelError> {
    build_llama::<B>(
        &config(),
        HostTensors {
            path: PathBuf::from("ckpt.safetensors"),
            tensors: m,
            ..Default::default()
        },
        &Default::default(),
    )
}

#[test]
fn loader_names_missing_unexpected_and_misshaped_tensors() {
    assert!(load(hf_tensors(&config())).is_ok());
    let mut m = hf_tensors(&config());
    m.remove("model.layers.1.mlp.up_proj.weight");
    let e = load(m).unwrap_err().to_string();
    assert!(
        e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`") && e.contains("[24, 16]"),
        "{e}"
    );
    let mut m = hf_tensors(&config());
    m.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        host(&[16, 16]),
    );
    let e = load(m).unwrap_err().to_string();
    assert!(
        e.contains("`model.layers.0.self_attn.k_proj.weight` has shape [16, 16], expected [8, 16]"),
        "{e}"
    );
    let mut m = hf_tensors(&config());
    m.insert("model.layers.7.extra.weight".into(), host(&[2]));
    let e = load(m).unwrap_err().to_string();
    assert!(
        e.contains("unexpected") && e.contains("model.layers.7.extra.weight"),
        "{e}"
    );
}

/// Minimal safetensors writer (F32) for the reader tests.
fn write_safetensors(path: &std::path::Path, tensors: &BTreeMap<String, HostTensor>) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, t) in tensors {
        let begin = data.len();
        data.extend(t.data.iter().flat_map(|x| x.to_le_bytes()));
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [begin, data.len()]}));
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn safetensors_roundtrip_and_corruption() {
    let dir = std::env::temp_dir().join(format!("bapo-model-st-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    let tensors = hf_tensors(&config());
    write_safetensors(&path, &tensors);
    let mut read = BTreeMap::new();
    safetensors::read_file(&path, &mut read).unwrap();
    assert_eq!(read, tensors);
    // Truncated data block: the offsets of the last tensor now run past the end.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let e = safetensors::read_file(&path, &mut BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("data_offsets"),
        "{e}"
    );
    // Header length beyond the file.
    let mut evil = u64::MAX.to_le_bytes().to_vec();
    evil.extend(b"{}");
    std::fs::write(&path, evil).unwrap();
    let e = safetensors::read_file(&path, &mut BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("header length"), "{e}");
    // Header JSON that is bad, an absurd shape, an unknown dtype, offsets at u64::MAX.
    let file = |header: &str, data: usize| {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data]);
        b
    };
    for (header, want) in [
        (
            "{\"a\":\n {\"dtype\": F32}}",
            "header JSON: expected value at line 2 column 12 (at byte offset 25)",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#,
            "tensor `a`: absurd shape",
        ),
        (
            r#"{"a":{"dtype":"I8","shape":[4],"data_offsets":[0,4]}}"#,
            "tensor `a` has dtype I8 (only F32, BF16, F16)",
        ),
        (
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[18446744073709551615,16]}}"#,
            "tensor `a`: data_offsets [18446744073709551615, 16] do not fit",
        ),
    ] {
        let e = safetensors::read_bytes(&path, &file(header, 16), &mut BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.safetensors") && e.contains(want), "{e}");
    }
}

#[test]
fn sharded_checkpoint_reads_every_shard_and_checks_the_index() {
    let dir = std::env::temp_dir().join(format!("bapo-model-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tensors = hf_tensors(&config());
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = tensors
        .clone()
        .into_iter()
        .partition(|(k, _)| k.contains("layers.0") || k.contains("embed"));
    write_safetensors(&dir.join("model-00001-of-00002.safetensors"), &a);
    write_safetensors(&dir.join("model-00002-of-00002.safetensors"), &b);
    let mut map = serde_json::Map::new();
    for k in a.keys() {
        map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
    }
    for k in b.keys() {
        map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let read = safetensors::read_checkpoint_dir(&dir).unwrap();
    assert_eq!(read.tensors, tensors);
    // An index that names a tensor its shard lacks is an error naming both.
    map.insert(
        "model.layers.9.mlp.up_proj.weight".into(),
        "model-00002-of-00002.safetensors".into(),
    );
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let e = safetensors::read_checkpoint_dir(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors.index.json")
            && e.contains("model.layers.9.mlp.up_proj.weight"),
        "{e}"
    );
}

#[test]
fn hf_config_variants() {
    let parse = |s: &str| {
        serde_json::from_str::<bapo_model::HfConfig>(s)
            .unwrap()
            .to_llama(std::path::Path::new("config.json"))
    };
    let base = r#""vocab_size": 64, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4"#;
    // rope_theta at the top level (older files) or under rope_parameters (transformers 5).
    assert_eq!(
        parse(&format!("{{{base}, \"rope_theta\": 500000.0}}"))
            .unwrap()
            .rope_theta,
        500000.0
    );
    assert_eq!(parse(&format!("{{{base}, \"rope_parameters\": {{\"rope_theta\": 1000.0, \"rope_type\": \"default\"}}}}")).unwrap().rope_theta, 1000.0);
    // No num_key_value_heads: multi-head attention; head_dim derived.
    let c = parse(&format!("{{{base}}}")).unwrap();
    assert_eq!((c.num_kv_heads, c.head_dim, c.qkv_bias), (4, 4, false));
    // Qwen2 has q/k/v biases; eos lists are kept.
    let c = parse(&format!(
        "{{{base}, \"model_type\": \"qwen2\", \"eos_token_id\": [5, 7]}}"
    ))
    .unwrap();
    assert!(c.qkv_bias);
    assert_eq!(c.eos_token_ids, vec![5, 7]);
    // Llama 3.x RoPE scaling, in the older `rope_scaling` form (`type` or `rope_type`) and in
    // transformers 5's `rope_parameters`.
    let llama3 = r#""factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192"#;
    let want = Some(bapo_model::RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    for form in [
        format!("\"rope_theta\": 500000.0, \"rope_scaling\": {{\"type\": \"llama3\", {llama3}}}"),
        format!("\"rope_theta\": 500000.0, \"rope_scaling\": {{\"rope_type\": \"llama3\", {llama3}}}"),
        format!("\"rope_parameters\": {{\"rope_type\": \"llama3\", \"rope_theta\": 500000.0, {llama3}}}"),
    ] {
        let c = parse(&format!("{{{base}, {form}}}")).unwrap();
        assert_eq!((c.rope_scaling.clone(), c.rope_theta), (want.clone(), 500000.0), "{form}");
    }
    // Llama 3.2's numbers (theta 5e5, head_dim 64): high frequencies kept, low ones / 32.
    let c = parse(&format!(
        "{{{base}, \"head_dim\": 64, \"rope_parameters\": {{\"rope_type\": \"llama3\", \"rope_theta\": 500000.0, {llama3}}}}}"
    ))
    .unwrap();
    let (scaled, plain) = (
        c.rope_inv_freq(),
        c.clone().with_rope_scaling(None).rope_inv_freq(),
    );
    assert_eq!(scaled[0], plain[0]);
    assert!((scaled[31] as f64 - plain[31] as f64 / 32.0).abs() < 1e-12);
    assert!(scaled
        .iter()
        .zip(&plain)
        .all(|(s, p)| s <= p && *s >= p / 32.0));
    // Qwen3: per-head q/k norms, an explicit head_dim, no q/k/v bias.
    let c = parse(&format!(
        "{{{base}, \"model_type\": \"qwen3\", \"head_dim\": 8, \"attention_bias\": false}}"
    ))
    .unwrap();
    assert_eq!((c.qk_norm, c.head_dim, c.qkv_bias), (true, 8, false));
    // What the model cannot compute is refused, naming the field and the value.
    for (bad, field, value) in [
        (
            r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#,
            "rope_scaling.rope_type",
            "yarn",
        ),
        (
            r#""rope_parameters": {"rope_type": "dynamic", "factor": 2.0}"#,
            "rope_parameters.rope_type",
            "dynamic",
        ),
        (
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
            "rope_scaling.low_freq_factor",
            "llama3",
        ),
        (r#""model_type": "gemma2""#, "model_type", "gemma2"),
        (
            r#""model_type": "qwen3", "use_sliding_window": true"#,
            "use_sliding_window",
            "sliding",
        ),
        (
            r#""model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]"#,
            "layer_types",
            "sliding_attention",
        ),
    ] {
        let e = parse(&format!("{{{base}, {bad}}}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.json") && e.contains(field) && e.contains(value),
            "{bad}: {e}"
        );
    }
    let e = parse(&format!("{{{base}, \"num_key_value_heads\": 3}}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_key_value_heads"), "{e}");
}

#[test]
fn shared_context_scoring_equals_whole_sequence_scoring() {
    let device = Default::default();
    let model = config().init::<B>(&device);
    // Contexts of different lengths; continuations of different lengths, 1 to 4 tokens.
    let contexts = vec![vec![3u32, 8, 13, 2, 40], vec![7u32, 1], vec![9u32, 9, 9]];
    let mixed = vec![
        (0usize, vec![5u32, 6, 7]),
        (0, vec![11]),
        (1, vec![60, 2, 3, 4]),
        (2, vec![1, 2]),
        (1, vec![8]),
    ];
    // Only one-token continuations: no continuation pass at all.
    let single = vec![
        (0usize, vec![11u32]),
        (2, vec![4]),
        (1, vec![8]),
        (0, vec![2]),
    ];
    for conts in [mixed.clone(), single.clone()] {
        check_continuations(&model, &contexts, &conts);
    }
    // Contexts that share a 10-token prefix (a chat template's system turn): the prefix runs
    // once, the remainders (1 to 5 tokens) after it.
    let prefix: Vec<u32> = (20..30).collect();
    let shared: Vec<Vec<u32>> = [vec![3u32, 8, 13], vec![7u32], vec![9u32, 9, 9, 9, 1]]
        .iter()
        .map(|r| prefix.iter().chain(r).copied().collect())
        .collect();
    // Identical contexts: the shared part stops one token short, so each keeps a remainder.
    let same = vec![shared[2].clone(), shared[2].clone(), shared[2].clone()];
    for contexts in [shared, same] {
        for conts in [mixed.clone(), single.clone()] {
            check_continuations(&model, &contexts, &conts);
        }
    }
}

fn check_continuations(
    model: &bapo_model::Llama<B>,
    contexts: &[Vec<u32>],
    conts: &[(usize, Vec<u32>)],
) {
    use burn::tensor::activation::log_softmax;
    let device = Default::default();
    let got = bapo_model::generate::continuation_logps(model, contexts, conts, &device);
    assert_eq!(got.len(), conts.len());
    for (k, (c, cont)) in conts.iter().enumerate() {
        let seq: Vec<i64> = contexts[*c].iter().chain(cont).map(|&t| t as i64).collect();
        let lp = log_softmax(model.forward(ids(&seq), None), 2)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let (v, lc) = (64, contexts[*c].len());
        let want: f64 = cont
            .iter()
            .enumerate()
            .map(|(t, &tok)| lp[(lc + t - 1) * v + tok as usize] as f64)
            .sum();
        assert!(
            (got[k] - want).abs() < 1e-4,
            "continuation {k}: {} vs {want}",
            got[k]
        );
    }
}

/// A GGUF v3 byte image: metadata `(key, string value)` pairs and tensors `(name, dims,
/// ggml type, offset)`, followed by `data` at 32-byte alignment.
fn gguf_bytes(kv: &[(&str, &str)], tensors: &[(&str, &[u64], u32, u64)], data: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    for (k, v) in kv {
        s(&mut b, k);
        b.extend(8u32.to_le_bytes());
        s(&mut b, v);
    }
    for (name, dims, ty, off) in tensors {
        s(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(off.to_le_bytes());
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(data);
    b
}

#[test]
fn hostile_gguf_files_are_refused_with_file_offset_and_field() {
    use bapo_model::load::gguf::GgufFile;
    let dir = std::env::temp_dir().join(format!("bapo-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("evil.gguf");
    let open = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        GgufFile::open(&path).map(|_| ()).unwrap_err().to_string()
    };
    // A valid file first: one 4x8 F32 tensor.
    let ok = gguf_bytes(
        &[("general.architecture", "llama")],
        &[("token_embd.weight", &[8, 4], 0, 0)],
        &[0u8; 128],
    );
    std::fs::write(&path, &ok).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.architecture().unwrap(), "llama");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GGML\x03\0\0\0".to_vec(), "magic is not `GGUF`"),
        ({ let mut b = ok.clone(); b[4] = 1; b }, "GGUF version 1"),
        (ok[..30].to_vec(), "file ends inside"),
        (
            // The value's string length (bytes 37..45) claims a terabyte.
            {
                let mut b = gguf_bytes(&[("k", "v")], &[], &[]);
                b[37..45].copy_from_slice(&(1u64 << 40).to_le_bytes());
                b
            },
            "metadata `k`: string length 1099511627776 runs past the end of the file (at byte offset 37)",
        ),
        (
            { let mut b = ok.clone(); b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); b },
            "absurd counts",
        ),
        (
            gguf_bytes(&[], &[("t", &[1 << 40, 1 << 30], 0, 0)], &[0u8; 64]),
            "absurd dimensions",
        ),
        (
            gguf_bytes(&[], &[("t", &[8, 4], 0, 0), ("u", &[8, 4], 0, 1 << 20)], &[0u8; 128]),
            "tensor `u`: 128 bytes at offset 1048576 run past the end of the file",
        ),
        (
            gguf_bytes(&[], &[("q", &[256, 1], 16, 0)], &[0u8; 256]),
            "tensor `q` is quantised as IQ2_XXS (supported: F32, F16, Q4_0,",
        ),
        (
            gguf_bytes(&[], &[("q", &[128, 2], 12, 0)], &[0u8; 288]),
            "tensor `q`: row length 128 is not a multiple of Q4_K's block size 256",
        ),
        (
            gguf_bytes(&[], &[("t", &[8, 4, 1, 1, 1], 0, 0)], &[0u8; 128]),
            "5 dimensions",
        ),
    ];
    for (bytes, want) in cases {
        let e = open(&bytes);
        assert!(
            e.contains("evil.gguf") && e.contains(want),
            "wanted {want:?}, got: {e}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
