//! A short BAPO training run (LoRA, 3 optimiser steps) on the tiny Llama: the first step's loss is
//! exactly ln 2 (the adapters start at zero, so policy = reference and the anchor is slack), and
//! every compiled GPU backend reproduces ndarray's loss curve.

use bapo_data::{encode_examples, read_preferences, BaseResponse, EncodeConfig, TruncationMode};
use bapo_tests::fixture;
use bapo_train::{reference_logps, train, LoraConfig, TrainConfig};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

/// The fixture's pairs with `bases`, tokenised with the chat template (64 tokens at most).
fn encode(
    tok: &bapo_model::Tokenizer,
    examples: &[bapo_data::PreferenceExample],
    bases: &[BaseResponse],
) -> Vec<bapo_data::EncodedExample> {
    let eos = tok.eos_id().unwrap();
    let cfg = EncodeConfig {
        max_length: 64,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let encoder = bapo_train::encoder(tok);
    let template = bapo_train::chat_template(tok);
    encode_examples(examples, Some(bases), &template, &encoder, eos, &cfg)
        .unwrap()
        .0
}

/// Step losses of a 3-step run on `A`.
fn losses<A: AutodiffBackend>(device: &A::Device) -> Vec<f64> {
    logs::<A>(device).iter().map(|m| m["loss"]).collect()
}

/// Every step's metrics of a 3-step run on `A` (reference log-probs made on `A` too).
fn logs<A: AutodiffBackend>(device: &A::Device) -> Vec<std::collections::BTreeMap<String, f64>> {
    run::<A>(device, |c| c).0
}

/// The tiny Llama fixture's pairs with their base responses, chat-templated (64 tokens at most).
pub(crate) fn fixture_pairs(tok: &bapo_model::Tokenizer) -> Vec<bapo_data::EncodedExample> {
    let dir = fixture("tiny-llama");
    let examples = read_preferences(&dir.join("pairs.jsonl")).unwrap();
    let eos = tok.eos_id().unwrap();
    let bases: Vec<BaseResponse> = std::fs::read_to_string(dir.join("pairs.jsonl"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let text = v["base"]
                .as_str()
                .expect("fixture pairs carry base responses");
            BaseResponse::from_text(&bapo_train::encoder(tok), text, eos, i + 1).unwrap()
        })
        .collect();
    encode(tok, &examples, &bases)
}

/// A 3-step run with `cfg` adjusted by `adjust`: every step's metrics and the final adapter.
fn run<A: AutodiffBackend>(
    device: &A::Device,
    adjust: impl FnOnce(TrainConfig) -> TrainConfig,
) -> (
    Vec<std::collections::BTreeMap<String, f64>>,
    std::collections::BTreeMap<String, bapo_model::load::HostTensor>,
) {
    let loaded =
        bapo_model::load_pretrained::<A::InnerBackend>(&fixture("tiny-llama"), device).unwrap();
    let eos = loaded.tokenizer.eos_id().unwrap();
    let enc = fixture_pairs(&loaded.tokenizer);
    let refs = reference_logps(&loaded.model, &enc, 4, eos, true, device, |_| {});
    let cfg = adjust(TrainConfig {
        max_steps: 3,
        warmup_steps: 0,
        batch_size: 2,
        learning_rate: 1e-2,
        ..TrainConfig::default()
    });
    let policy =
        LoraConfig::default().attach(bapo_model::Llama::<A>::from_inner(loaded.model), 7, device);
    let mut out = Vec::new();
    let model = train(policy, &enc, &refs, &cfg, eos, device, None, |log, _, _| {
        out.push(log.metrics.clone())
    })
    .unwrap();
    (out, bapo_train::lora::adapter_tensors(&model))
}

/// Two micro-batches per step computed at once on two threads give the same run bit for bit as
/// one after another: every metric (timings aside) and every adapter weight after 3 steps.
#[test]
fn concurrent_micro_batches_give_the_same_steps_bit_for_bit() {
    type A = burn::backend::Autodiff<burn::backend::Flex>;
    let with = |threads| {
        run::<A>(&Default::default(), |c| TrainConfig {
            batch_size: 1,
            grad_accum: 2,
            micro_batch_threads: Some(threads),
            ..c
        })
    };
    let (one_logs, one_adapter) = with(1);
    let (two_logs, two_adapter) = with(2);
    assert_eq!(one_logs.len(), 3);
    for (step, (a, b)) in one_logs.iter().zip(&two_logs).enumerate() {
        let keep = |m: &std::collections::BTreeMap<String, f64>| {
            m.iter()
                .filter(|(k, _)| !k.starts_with("time/"))
                .map(|(k, v)| (k.clone(), v.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(keep(a), keep(b), "step {}", step + 1);
    }
    assert!(!one_adapter.is_empty());
    for (name, t) in &one_adapter {
        assert_eq!(t.data, two_adapter[name].data, "{name}");
    }
    // The run really trained: the adapters' B matrices left zero.
    assert!(one_adapter
        .iter()
        .any(|(k, t)| k.contains("lora_B") && t.data.iter().any(|&x| x != 0.0)));
}

/// Step 1: the policy is the reference, so every base response sits exactly on the hinge's kink.
/// With the reference cache made on the same backend, no base response may count as a violation
/// (a float difference between the cached and the training pass would switch the anchor on).
fn check_anchor_at_kink<A: AutodiffBackend>(name: &str) {
    let l = logs::<A>(&Default::default());
    assert_eq!(
        l[0]["anchor/violation_rate"], 0.0,
        "{name}: step 1 {:?}",
        l[0]
    );
    assert_eq!(l[0]["anchor/loss"], 0.0, "{name}: step 1 {:?}", l[0]);
}

#[test]
fn anchor_is_exact_at_the_kink_on_ndarray() {
    check_anchor_at_kink::<burn::backend::Autodiff<burn::backend::NdArray>>("ndarray");
}

#[test]
fn anchor_is_exact_at_the_kink_on_flex() {
    check_anchor_at_kink::<burn::backend::Autodiff<burn::backend::Flex>>("flex");
}

#[test]
fn flex_training_matches_ndarray() {
    same_curve(
        "flex",
        &losses::<burn::backend::Autodiff<burn::backend::Flex>>(&Default::default()),
    );
}

fn ndarray() -> Vec<f64> {
    losses::<burn::backend::Autodiff<burn::backend::NdArray>>(&Default::default())
}

#[test]
fn first_step_is_ln2_and_training_moves_the_loss() {
    let l = ndarray();
    assert_eq!(l.len(), 3);
    assert!((l[0] - std::f64::consts::LN_2).abs() < 1e-5, "{l:?}");
    assert!(
        (l[2] - l[0]).abs() > 1e-4,
        "the adapters did not move: {l:?}"
    );
}

#[allow(dead_code)]
fn same_curve(name: &str, other: &[f64]) {
    let reference = ndarray();
    eprintln!("{name}: {other:?} vs ndarray {reference:?}");
    for (a, b) in other.iter().zip(&reference) {
        assert!(
            (a - b).abs() < 2e-3,
            "{name} {other:?} vs ndarray {reference:?}"
        );
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_training_matches_ndarray() {
    same_curve(
        "wgpu",
        &losses::<burn::backend::Autodiff<burn::backend::Wgpu>>(&Default::default()),
    );
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_training_matches_ndarray() {
    same_curve(
        "cuda",
        &losses::<burn::backend::Autodiff<burn::backend::Cuda>>(&Default::default()),
    );
}

/// The reference pass (and with it every no-grad pass that runs batches concurrently) gives the
/// same numbers with one batch at a time and with two at once.
#[test]
fn reference_pass_is_the_same_with_concurrent_batches() {
    type B = burn::backend::Flex;
    let dir = fixture("tiny-llama");
    let loaded = bapo_model::load_pretrained::<B>(&dir, &Default::default()).unwrap();
    let tok = &loaded.tokenizer;
    let eos = tok.eos_id().unwrap();
    let examples = read_preferences(&dir.join("pairs.jsonl")).unwrap();
    let bases: Vec<BaseResponse> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| BaseResponse::from_text(&bapo_train::encoder(tok), &e.chosen, eos, i + 1))
        .collect::<Result<_, _>>()
        .unwrap();
    let enc = encode(tok, &examples, &bases);
    assert!(enc.len() >= 2, "needs several batches");
    let pass = |threads| {
        bapo_train::concurrent::set_default_threads(threads);
        let mut seen = Vec::new();
        let r = reference_logps(
            &loaded.model,
            &enc,
            1,
            eos,
            true,
            &Default::default(),
            |n| seen.push(n),
        );
        bapo_train::concurrent::set_default_threads(1);
        (r, seen)
    };
    let (one, seen_one) = pass(1);
    let (two, seen_two) = pass(2);
    assert_eq!(one, two);
    assert_eq!(seen_one, (1..=enc.len()).collect::<Vec<_>>());
    assert_eq!(
        seen_two, seen_one,
        "progress counts every example once, in order"
    );
}
