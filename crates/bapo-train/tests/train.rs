//! The training loop on the tiny Llama fixture (real tokenizer and chat template): LoRA starts
//! at the reference, DPO learns the preference, the anchor limits drift of the base responses,
//! adapters round-trip through safetensors.

use std::path::{Path, PathBuf};

use bapo_data::{
    encode_examples, EncodeConfig, EncodedExample, PreferenceBatch, PreferenceExample,
    TruncationMode,
};
use bapo_model::Llama;
use bapo_train::lora::{adapter_delta_norms, load_adapter, save_adapter};
use bapo_train::train::{batch_logps, Normalisation};
use bapo_train::{
    encoder, reference_logps, reference_of, train, LoraConfig, ReferenceLogps, TrainConfig,
};
use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;

type AD = Autodiff<NdArray>;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

fn data(loaded: &bapo_model::LoadedModel<AD>) -> (Vec<EncodedExample>, u32) {
    let tok = &loaded.tokenizer;
    let pairs = [
        (
            "Name a colour.",
            "Blue.",
            "I refuse to answer that question.",
            "Red is a colour.",
        ),
        (
            "Say hi.",
            "Hi!",
            "No greetings today, sorry.",
            "Hello there.",
        ),
        (
            "Count to three.",
            "1, 2, 3.",
            "Counting is boring.",
            "One, two, three.",
        ),
        (
            "Is water wet?",
            "Yes.",
            "Who knows, maybe, perhaps not.",
            "Water is wet.",
        ),
    ];
    let examples: Vec<PreferenceExample> = pairs
        .iter()
        .enumerate()
        .map(|(i, (p, c, r, _))| PreferenceExample {
            prompt: vec![bapo_data::Message::user(*p)],
            chosen: c.to_string(),
            rejected: r.to_string(),
            user: None,
            line: i + 1,
        })
        .collect();
    let bases: Vec<String> = pairs.iter().map(|x| x.3.to_string()).collect();
    let template = bapo_train::chat_template(tok);
    let eos = tok.eos_id().unwrap();
    let cfg = EncodeConfig {
        max_length: 128,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let (enc, stats) =
        encode_examples(&examples, Some(&bases), &template, &encoder(tok), eos, &cfg).unwrap();
    assert_eq!(stats.examples_truncated, 0);
    (enc, eos)
}

fn setup() -> (Llama<AD>, Vec<EncodedExample>, Vec<ReferenceLogps>, u32) {
    let device = Default::default();
    let loaded = bapo_model::load_pretrained::<AD>(&fixture(), &device).unwrap();
    let (enc, eos) = data(&loaded);
    let model = LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    }
    .attach(loaded.model, 7, &device);
    let refs = reference_logps(&reference_of(&model), &enc, 3, eos, &device, |_| {});
    (model, enc, refs, eos)
}

fn logps(model: &Llama<AD>, enc: &[EncodedExample], pad: u32) -> Vec<f64> {
    let refs: Vec<&EncodedExample> = enc.iter().collect();
    let batch = PreferenceBatch::collate(&refs, pad);
    let (sum, _) = batch_logps(&model.valid(), &batch, &Default::default());
    sum.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

#[test]
fn fresh_adapters_start_at_the_reference() {
    let (model, enc, refs, eos) = setup();
    let policy = logps(&model, &enc, eos);
    let n = enc.len();
    for (i, r) in refs.iter().enumerate() {
        for k in 0..3 {
            assert!(
                (policy[k * n + i] - r.sum[k]).abs() < 1e-4,
                "example {i} part {k}: {} vs {}",
                policy[k * n + i],
                r.sum[k]
            );
        }
    }
    assert!(adapter_delta_norms(&model).values().all(|&v| v == 0.0));
    assert_eq!(adapter_delta_norms(&model).len(), 2 * 7);
}

fn run(
    lambda: f64,
) -> (
    Vec<bapo_train::StepLog>,
    Llama<AD>,
    Vec<EncodedExample>,
    Vec<ReferenceLogps>,
    u32,
) {
    let (model, enc, refs, eos) = setup();
    let base_before = model.layers[1]
        .mlp
        .down_proj
        .linear
        .weight
        .val()
        .into_data();
    let cfg = TrainConfig {
        learning_rate: 3e-2,
        warmup_steps: 1,
        max_steps: 12,
        batch_size: 2,
        anchor_weight: lambda,
        beta: 0.5,
        normalisation: Normalisation::Sum,
        ..Default::default()
    };
    let mut logs = Vec::new();
    let model = train(
        model,
        &enc,
        &refs,
        &cfg,
        eos,
        &Default::default(),
        None,
        |l, _, _| logs.push(l.clone()),
    )
    .unwrap();
    // Frozen base weights did not move; the adapters did.
    assert_eq!(
        model.layers[1]
            .mlp
            .down_proj
            .linear
            .weight
            .val()
            .into_data(),
        base_before
    );
    assert!(adapter_delta_norms(&model).values().all(|&v| v > 0.0));
    (logs, model, enc, refs, eos)
}

#[test]
fn dpo_learns_the_preference_and_the_anchor_limits_base_drift() {
    let (logs, dpo, enc, refs, eos) = run(0.0);
    assert_eq!(logs.len(), 12);
    let first = logs[0].metrics["loss"];
    let last = logs
        .iter()
        .rev()
        .take(3)
        .map(|l| l.metrics["loss"])
        .sum::<f64>()
        / 3.0;
    assert!(last < first * 0.7, "loss {first} -> {last}");
    assert!(logs.iter().all(|l| l.grad_norm.is_finite()
        && l.metrics.contains_key("rewards/margins")
        && l.metrics.contains_key("anchor/violation_rate")));
    // On the training pairs, every chosen now beats its rejected relative to the reference.
    let n = enc.len();
    let p = logps(&dpo, &enc, eos);
    for (i, r) in refs.iter().enumerate() {
        assert!(
            (p[i] - r.sum[0]) - (p[n + i] - r.sum[1]) > 0.0,
            "pair {i} not learned"
        );
    }
    let drift = |p: &[f64]| {
        refs.iter()
            .enumerate()
            .map(|(i, r)| (r.sum[2] - p[2 * n + i]).max(0.0))
            .sum::<f64>()
            / n as f64
    };
    let (_, bapo, ..) = run(5.0);
    let pb = logps(&bapo, &enc, eos);
    let (d_dpo, d_bapo) = (drift(&p), drift(&pb));
    eprintln!("mean base-response log-prob fall: DPO {d_dpo:.3} nats, BAPO(λ=5) {d_bapo:.3} nats");
    assert!(
        d_bapo < d_dpo,
        "anchor did not reduce drift: DPO {d_dpo}, BAPO {d_bapo}"
    );
}

#[test]
fn adapter_roundtrips_through_safetensors() {
    let (_, trained, enc, _, eos) = run(1.0);
    let dir = std::env::temp_dir().join(format!("bapo-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("adapter_model.safetensors");
    save_adapter(&trained, &path).unwrap();
    let (fresh, ..) = setup();
    let restored = load_adapter(fresh, &path, &Default::default()).unwrap();
    let (a, b) = (logps(&trained, &enc, eos), logps(&restored, &enc, eos));
    assert!(
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5),
        "{a:?} vs {b:?}"
    );
    assert!(adapter_delta_norms(&restored).values().any(|&v| v > 0.0));
}

#[test]
fn learning_rate_schedule() {
    let cfg = TrainConfig {
        learning_rate: 1.0,
        warmup_steps: 3,
        max_steps: 13,
        ..Default::default()
    };
    assert_eq!(cfg.lr_at(0), 0.25);
    assert_eq!(cfg.lr_at(2), 0.75);
    assert_eq!(cfg.lr_at(3), 1.0);
    assert!((cfg.lr_at(8) - 0.5).abs() < 1e-12);
    assert!(cfg.lr_at(12) < 0.03);
    let lin = TrainConfig {
        schedule: bapo_train::train::Schedule::Linear,
        ..cfg.clone()
    };
    assert!((lin.lr_at(8) - 0.5).abs() < 1e-12);
}

#[test]
fn resumed_training_matches_the_uninterrupted_run() {
    use bapo_train::train::{Optim, OptimRecord, Resume};
    use burn::optim::Optimizer;
    use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
    let cfg = TrainConfig {
        learning_rate: 3e-2,
        warmup_steps: 1,
        max_steps: 5,
        batch_size: 2,
        grad_accum: 2,
        beta: 0.5,
        ..Default::default()
    };
    let dir = std::env::temp_dir().join(format!("bapo-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Uninterrupted, saving adapter + optimiser after step 2 (as a checkpoint does).
    let (model, enc, refs, eos) = setup();
    let mut full = Vec::new();
    train(
        model,
        &enc,
        &refs,
        &cfg,
        eos,
        &Default::default(),
        None,
        |l, m, o: &Optim<AD>| {
            full.push((l.metrics["loss"], l.num_tokens));
            if l.step == 2 {
                save_adapter(m, &dir.join("adapter.safetensors")).unwrap();
                Recorder::<AD>::record(
                    &BinFileRecorder::<FullPrecisionSettings>::new(),
                    o.to_record(),
                    dir.join("optimizer"),
                )
                .unwrap();
            }
        },
    )
    .unwrap();
    // A fresh process-like start: new model, adapter and optimiser state loaded from disk.
    let (fresh, ..) = setup();
    let model = load_adapter(fresh, &dir.join("adapter.safetensors"), &Default::default()).unwrap();
    let optimizer: OptimRecord<AD> = Recorder::<AD>::load(
        &BinFileRecorder::<FullPrecisionSettings>::new(),
        dir.join("optimizer"),
        &Default::default(),
    )
    .unwrap();
    let mut resumed = Vec::new();
    train(
        model,
        &enc,
        &refs,
        &cfg,
        eos,
        &Default::default(),
        Some(Resume {
            step: 2,
            num_tokens: full[1].1,
            optimizer,
        }),
        |l, _, _| resumed.push((l.metrics["loss"], l.num_tokens)),
    )
    .unwrap();
    assert_eq!(resumed.len(), 3);
    for (i, (r, f)) in resumed.iter().zip(&full[2..]).enumerate() {
        assert!(
            (r.0 - f.0).abs() < 1e-5,
            "step {}: resumed loss {} vs uninterrupted {}",
            i + 3,
            r.0,
            f.0
        );
        assert_eq!(r.1, f.1);
    }
}
