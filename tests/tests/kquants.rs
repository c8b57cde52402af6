//! GGUF K-quants end to end against HF transformers (`tests/fixtures/make_kquants.py`): a tiny
//! Llama in llama.cpp's Q4_K_M mix (Q4_K matrices, Q6_K `output.weight`, last layer's `attn_v`
//! and `ffn_down`) and one in a Q4_0 file's mix (Q4_0 matrices, Q8_0 embedding, Q6_K
//! `output.weight`, Q5_0/Q5_1 `attn_v`), each loaded by bapo from the GGUF and scored on
//! token-id sequences; transformers loaded the same files itself (dequantising with gguf-py).
//! Tolerance: 1e-3 nats a token (the tiny models' bound), a sequence's sum 1e-3 × its tokens.
//! Bit equality of the dequantisation itself is `bapo-model`'s unit test on `kquants/blocks.json`.

use std::collections::BTreeMap;

use bapo_model::load::gguf::GgufFile;
use bapo_model::load::{build_llama, load_pretrained, load_pretrained_kept};
use bapo_model::LoadedModel;
use bapo_tests::fixture;
use bapo_train::{EncodedCompletion, Scorer};
use burn::tensor::backend::Backend;
use serde::Deserialize;

const TOKEN_TOL: f64 = 1e-3;

#[derive(Deserialize)]
struct Golden {
    files: BTreeMap<String, FileGolden>,
}

#[derive(Deserialize)]
struct FileGolden {
    file: String,
    tensor_types: BTreeMap<String, String>,
    sequences: Vec<Sequence>,
}

#[derive(Deserialize)]
struct Sequence {
    ids: Vec<u32>,
    token_logps: Vec<f64>,
    sum_logp: f64,
}

fn golden() -> Golden {
    let p = fixture("kquants").join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("kquants/golden.json"))
        .expect("kquants/golden.json")
}

/// Every token after the first of each sequence, scored in one padded batch.
fn token_logps<B: Backend>(loaded: &LoadedModel<B>, g: &FileGolden) -> Vec<(f64, Vec<f32>)> {
    let seqs: Vec<EncodedCompletion> = g
        .sequences
        .iter()
        .map(|s| EncodedCompletion {
            prompt_ids: s.ids[..1].to_vec(),
            completion_ids: s.ids[1..].to_vec(),
        })
        .collect();
    let scorer = Scorer {
        model: &loaded.model,
        device: Default::default(),
        pad_id: loaded.tokenizer.eos_id().expect("eos"),
        context: loaded.config.max_position_embeddings,
    };
    scorer.score(&seqs)
}

/// The largest |Δ log p| of a token, asserting each within [`TOKEN_TOL`] when `assert`.
fn worst<B: Backend>(loaded: &LoadedModel<B>, g: &FileGolden, assert: bool) -> f64 {
    let mut worst: f64 = 0.0;
    for ((sum, toks), s) in token_logps(loaded, g).into_iter().zip(&g.sequences) {
        assert_eq!(toks.len(), s.token_logps.len());
        for (i, (a, b)) in toks.iter().zip(&s.token_logps).enumerate() {
            let d = (*a as f64 - b).abs();
            worst = worst.max(d);
            assert!(
                !assert || d <= TOKEN_TOL,
                "{}: token {i} of {:?}: bapo {a}, transformers {b}",
                g.file,
                s.ids
            );
        }
        let tol = TOKEN_TOL * s.token_logps.len() as f64;
        assert!(
            !assert || (sum - s.sum_logp).abs() <= tol,
            "{}: sum of {:?}: bapo {sum}, transformers {}",
            g.file,
            s.ids,
            s.sum_logp
        );
    }
    worst
}

fn check_all<B: Backend>(backend: &str) {
    let device = Default::default();
    for (name, g) in golden().files {
        let path = fixture("kquants").join(&g.file);
        let loaded = load_pretrained::<B>(&path, &device).unwrap_or_else(|e| panic!("{name}: {e}"));
        let worst = worst(&loaded, &g, true);
        eprintln!("kquants {name} {backend}: worst token |Δ log p| = {worst:.2e}");
    }
}

#[test]
fn kquant_ggufs_match_transformers_on_ndarray() {
    check_all::<burn::backend::NdArray>("ndarray");
}

#[test]
fn kquant_ggufs_match_transformers_on_flex() {
    check_all::<burn::backend::Flex>("flex");
}

/// Bound on a token's |Δ log p| between the blocks-kept model and the dequantised f32 one: the
/// same f32 weights, sums in another order (measured: below 1e-6).
const KEPT_TOL: f64 = 2e-5;

/// The same files with their quantised blocks kept (`model.base_dtype = "gguf"`): every
/// projection, the embedding and the head held as blocks; transformers' numbers within
/// [`TOKEN_TOL`] and the dequantised f32 model's within [`KEPT_TOL`] (flex: the
/// `bapo_kernels::quant` products; ndarray: the generic dequantise-then-multiply path).
fn check_kept<B: Backend>(backend: &str) {
    let device = Default::default();
    for (name, g) in golden().files {
        let path = fixture("kquants").join(&g.file);
        let kept = load_pretrained_kept::<B>(&path, &device).unwrap_or_else(|e| panic!("{e}"));
        let m = &kept.model;
        assert!(m.quant_embed.is_some() && m.quant_head.is_some(), "{name}");
        for l in &m.layers {
            let a = &l.self_attn;
            for p in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                assert!(p.quant.is_some(), "{name}");
            }
            for p in [&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj] {
                assert!(p.quant.is_some(), "{name}");
            }
        }
        let dense = load_pretrained::<B>(&path, &device).unwrap();
        let mut apart: f64 = 0.0;
        for ((ks, kt), (ds, dt)) in token_logps(&kept, &g)
            .into_iter()
            .zip(token_logps(&dense, &g))
        {
            for (a, b) in kt.iter().zip(&dt) {
                apart = apart.max((a - b).abs() as f64);
            }
            apart = apart.max((ks - ds).abs() / kt.len() as f64);
        }
        assert!(
            apart <= KEPT_TOL,
            "{name} {backend}: kept vs dequantised {apart:e}"
        );
        let worst = worst(&kept, &g, true);
        // Casting the base leaves weights kept in blocks as they are (nothing else here is 2-D).
        let before = token_logps(&kept, &g);
        let mut cast = kept;
        cast.model = cast.model.with_weight_dtype(burn::tensor::FloatDType::BF16);
        assert_eq!(
            token_logps(&cast, &g),
            before,
            "{name}: cast touched the blocks"
        );
        let up = cast.model.layers[0].mlp.up_proj.linear.weight.val();
        assert_eq!(
            up.dtype(),
            burn::tensor::DType::F32,
            "{name}: placeholder cast"
        );
        eprintln!(
            "kquants {name} {backend}, blocks kept: {apart:.2e} from the f32 model, worst token \
             |Δ log p| vs transformers {worst:.2e}"
        );
    }
}

/// Every kept weight of both files (Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K) times 1, 3 and 8 random
/// rows (the decoding products: straight from the blocks up to 4 rows, through dequantised
/// rows above) and 40 rows (tiles of dequantised rows and GEMM), against the f32 product of the
/// dequantised weight: within 1e-5 of the rows' scale (measured: below 1e-6).
#[test]
fn kept_block_products_equal_dequantised_products() {
    use burn::tensor::{Distribution, Tensor};
    type B = burn::backend::Flex;
    let device = Default::default();
    <B as Backend>::seed(&device, 11);
    let mut worst: f64 = 0.0;
    for (name, g) in golden().files {
        let m = load_pretrained_kept::<B>(&fixture("kquants").join(&g.file), &device)
            .unwrap()
            .model;
        let mut weights = vec![
            m.quant_embed.clone().unwrap(),
            m.quant_head.clone().unwrap(),
        ];
        for l in &m.layers {
            let a = &l.self_attn;
            for p in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                weights.push(p.quant.clone().unwrap());
            }
            for p in [&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj] {
                weights.push(p.quant.clone().unwrap());
            }
        }
        for w in &weights {
            let [_, k] = w.shape();
            let dense = w.dense::<B>(&device).transpose();
            for n in [1, 3, 8, 40] {
                let x = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &device);
                let got = bapo_model::quant::matmul(x.clone(), w);
                let want = x.clone().matmul(dense.clone());
                // The scale of an output: Σ |x_i · w_i|.
                let scale = x.abs().matmul(dense.clone().abs());
                let d = ((got - want) / (scale + 1e-12)).abs().max().into_scalar() as f64;
                assert!(d <= 1e-5, "{name} {} x {n} rows: {d:e}", w.type_name());
                worst = worst.max(d);
            }
        }
    }
    eprintln!("kept-block products vs dequantised: worst {worst:.1e} of the rows' scale");
}

#[test]
fn kept_blocks_match_the_dequantised_model_on_flex() {
    check_kept::<burn::backend::Flex>("flex");
}

#[test]
fn kept_blocks_match_the_dequantised_model_on_ndarray() {
    check_kept::<burn::backend::NdArray>("ndarray");
}

/// The files really are K-quant files: the types gguf-py read back when making the golden,
/// and llama.cpp's layouts by name (ggml ids: Q4_0 2, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q6_K 14).
#[test]
fn fixture_tensors_have_the_quantised_types() {
    let names = [
        (0, "F32"),
        (2, "Q4_0"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (12, "Q4_K"),
        (14, "Q6_K"),
    ];
    let g = golden();
    assert_eq!(g.files.len(), 2);
    for (name, fg) in &g.files {
        let file = GgufFile::open(&fixture("kquants").join(&fg.file)).unwrap();
        let types: BTreeMap<String, String> = file
            .tensors
            .iter()
            .map(|t| {
                let n = names.iter().find(|(id, _)| *id == t.ggml_type);
                (t.name.clone(), n.map_or("?", |(_, n)| n).to_string())
            })
            .collect();
        assert_eq!(types, fg.tensor_types, "{name}");
        let ty = |t: &str| types[t].as_str();
        assert_eq!(ty("output.weight"), "Q6_K", "{name}");
        match name.as_str() {
            "q4_k_m" => {
                assert_eq!(ty("token_embd.weight"), "Q4_K");
                for i in 0..2 {
                    for part in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
                        assert_eq!(ty(&format!("blk.{i}.{part}.weight")), "Q4_K");
                    }
                }
                for part in ["attn_v", "ffn_down"] {
                    assert_eq!(ty(&format!("blk.0.{part}.weight")), "Q4_K");
                    assert_eq!(ty(&format!("blk.1.{part}.weight")), "Q6_K");
                }
            }
            "q4_0" => {
                assert_eq!(ty("token_embd.weight"), "Q8_0");
                assert_eq!(ty("blk.0.attn_q.weight"), "Q4_0");
                assert_eq!(ty("blk.1.ffn_down.weight"), "Q4_0");
                assert_eq!(ty("blk.0.attn_v.weight"), "Q5_0");
                assert_eq!(ty("blk.1.attn_v.weight"), "Q5_1");
            }
            other => panic!("unexpected fixture {other}"),
        }
        assert_eq!(ty("output_norm.weight"), "F32");
    }
}

/// The fixtures notice a layout error: the Q6_K head read with its two 128-element halves of a
/// super-block swapped is off by more than 0.1 nats a token somewhere (the tolerance is 1e-3).
#[test]
fn kquant_fixtures_notice_a_misread_super_block() {
    type B = burn::backend::NdArray;
    let device = Default::default();
    for (name, g) in golden().files {
        let path = fixture("kquants").join(&g.file);
        let mut loaded = load_pretrained::<B>(&path, &device).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let mut tensors = file.read_llama_tensors(&loaded.config).unwrap();
        let head = tensors.tensors.get_mut("lm_head.weight").unwrap();
        for block in head.data.chunks_exact_mut(256) {
            let (a, b) = block.split_at_mut(128);
            a.swap_with_slice(b);
        }
        loaded.model = build_llama(&loaded.config, tensors, &device).unwrap();
        let off = worst(&loaded, &g, false);
        assert!(off > 0.1, "{name} with a misread head: worst {off}");
        eprintln!("kquants {name}, head halves swapped: worst token |Δ log p| = {off:.2}");
    }
}
