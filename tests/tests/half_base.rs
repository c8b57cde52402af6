//! `model.base_dtype`: the tiny Llama's frozen base weights in bf16 or f16 (as training keeps
//! them), scored on Flex against transformers at the same `torch_dtype` (golden_half.json, made
//! by tests/fixtures/make_half_golden.py) and against transformers' f32 (golden.json).
//!
//! Tolerances, declared from transformers' own rounding: its bf16 model is 8.7e-3 nats a token
//! off its f32 model, its f16 model 1.1e-3; bapo at a type may differ from transformers at that
//! type by at most twice that gap from f32 (the two round in different places: bapo keeps the
//! residual stream, norms and softmax in f32), so 2e-2 (bf16) and 3e-3 (f16), against both.

use bapo_model::LoadedModel;
use bapo_tests::{fixture, golden};
use bapo_train::{EncodedCompletion, Scorer};
use burn::backend::Flex;
use burn::tensor::FloatDType;
use serde::Deserialize;

#[derive(Deserialize)]
struct Half {
    bf16: Vec<Row>,
    f16: Vec<Row>,
}

#[derive(Deserialize)]
struct Row {
    token_logps: Vec<f64>,
}

/// Worst |Δ| per token of bapo with the base in `dtype` against transformers' f32 and against
/// transformers at that dtype.
fn worst(dtype: FloatDType, at_dtype: &[Row]) -> (f64, f64) {
    let device = Default::default();
    let LoadedModel {
        model, tokenizer, ..
    } = bapo_model::load_pretrained::<Flex>(&fixture("tiny-llama"), &device).unwrap();
    let model = model.with_weight_dtype(dtype);
    assert_eq!(model.weight_dtype(), burn::tensor::DType::from(dtype));
    let g = golden("tiny-llama");
    let mut seqs = Vec::new();
    let mut f32_logps = Vec::new();
    for p in &g.sequences {
        for c in [&p.chosen, &p.rejected, &p.base] {
            seqs.push(EncodedCompletion {
                prompt_ids: c.prompt_ids.clone(),
                completion_ids: c.completion_ids.clone(),
            });
            f32_logps.push(&c.token_logps);
        }
    }
    let scorer = Scorer {
        model: &model,
        device,
        pad_id: tokenizer.eos_id().unwrap(),
        context: 2048,
    };
    let (mut to_f32, mut to_half) = (0f64, 0f64);
    for (((_, toks), f), h) in scorer.score(&seqs).into_iter().zip(f32_logps).zip(at_dtype) {
        assert_eq!(toks.len(), f.len());
        for ((a, b), c) in toks.iter().zip(f).zip(&h.token_logps) {
            to_f32 = to_f32.max((*a as f64 - b).abs());
            to_half = to_half.max((*a as f64 - c).abs());
        }
    }
    (to_f32, to_half)
}

fn half() -> Half {
    let p = fixture("tiny-llama").join("golden_half.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn bf16_base_matches_transformers_bf16_and_f32() {
    let (to_f32, to_bf16) = worst(FloatDType::BF16, &half().bf16);
    eprintln!(
        "bf16 base: {to_f32:.2e} from transformers f32, {to_bf16:.2e} from transformers bf16"
    );
    assert!(to_f32 <= 2e-2 && to_bf16 <= 2e-2, "{to_f32} {to_bf16}");
    // The rounding is real: the bf16 path is not the f32 one.
    assert!(to_f32 > 1e-5, "{to_f32}");
}

#[test]
fn f16_base_matches_transformers_f16_and_f32() {
    let (to_f32, to_f16) = worst(FloatDType::F16, &half().f16);
    eprintln!("f16 base: {to_f32:.2e} from transformers f32, {to_f16:.2e} from transformers f16");
    assert!(to_f32 <= 3e-3 && to_f16 <= 3e-3, "{to_f32} {to_f16}");
    assert!(to_f32 > 1e-6, "{to_f32}");
}

/// Loading straight into bf16 (each weight cast as it is built, `model.base_dtype`'s path)
/// gives the same model, bit for bit, as casting the loaded f32 model.
#[test]
fn loading_into_bf16_equals_casting_after() {
    let device = Default::default();
    let path = fixture("tiny-llama");
    let cast = bapo_model::load_pretrained::<Flex>(&path, &device)
        .unwrap()
        .model
        .with_weight_dtype(FloatDType::BF16);
    let built = bapo_model::load_pretrained_as::<Flex>(&path, FloatDType::BF16, &device)
        .unwrap()
        .model;
    assert_eq!(built.weight_dtype(), burn::tensor::DType::BF16);
    let ids = burn::tensor::Tensor::<Flex, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(vec![1i64, 5, 9, 300, 2], [1, 5]),
        &device,
    );
    let a = cast.forward(ids.clone(), None).into_data();
    let b = built.forward(ids, None).into_data();
    assert_eq!(a, b);
}
