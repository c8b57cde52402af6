//! The training loop on the tiny Llama fixture (real tokenizer and chat template): LoRA starts
//! at the reference, DPO learns the preference, the anchor limits drift of the base responses,
//! adapters round-trip through safetensors.

use bapo_data::EncodedExample;
use bapo_model::Llama;
use bapo_train::lora::{adapter_delta_norms, load_adapter, save_adapter};
use bapo_train::train::Normalisation;
use bapo_train::{train, ReferenceLogps, TrainConfig};

use crate::common::*;

#[test]
fn fresh_adapters_start_at_the_reference() {
    let _rng = serial();
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
    let _rng = serial();
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
    let _rng = serial();
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
    let _rng = serial();
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
fn merged_export_reloads_with_the_adapted_log_probs() {
    let _rng = serial();
    let (_, trained, enc, _, eos) = run(1.0);
    let device = Default::default();
    let loaded = bapo_model::load_pretrained::<AD>(&fixture(), &device).unwrap();
    let dir = std::env::temp_dir().join(format!("bapo-export-{}", std::process::id()));
    bapo_model::export::save_pretrained(&trained, &loaded.config, &loaded.tokenizer, &dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let back = bapo_model::load_pretrained::<AD>(&dir, &device).unwrap();
    assert_eq!(back.config, loaded.config);
    assert_eq!(back.tokenizer.chat_template, loaded.tokenizer.chat_template);
    let text = "Hello there, how are you? 123";
    assert_eq!(
        back.tokenizer.encode(text).unwrap(),
        loaded.tokenizer.encode(text).unwrap()
    );
    let (a, b) = (logps(&trained, &enc, eos), logps(&back.model, &enc, eos));
    let base = logps(&loaded.model, &enc, eos);
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-3,
        "merged export differs by {worst}: {a:?} vs {b:?}"
    );
    // The adapter did move the model, so the check above is not vacuous.
    assert!(
        a.iter().zip(&base).any(|(x, y)| (x - y).abs() > 1e-2),
        "{a:?} vs {base:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A base response cut by `max_new_tokens` is the reference's own ids with no EOS appended;
/// its reference log-prob equals an independent full log-softmax over exactly those ids, and
/// the fresh policy's (step 0), so the anchor starts exactly at zero.
#[test]
fn a_base_response_cut_by_max_new_tokens_is_scored_without_eos() {
    let _rng = serial();
    use bapo_data::preference::prompt_ids;
    use bapo_data::{encode_examples, BaseResponse, EncodeConfig, Message, PreferenceExample};
    use bapo_model::{generate, GenerationConfig};
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, Tensor, TensorData};

    let device = Default::default();
    let loaded = bapo_model::load_pretrained::<AD>(&fixture(), &device).unwrap();
    let tok = &loaded.tokenizer;
    let eos = tok.eos_id().unwrap();
    let encode = bapo_train::encoder(tok);
    let template = bapo_train::chat_template(tok);
    let ex = PreferenceExample {
        prompt: vec![Message::user("Name a colour.")],
        chosen: "Blue.".into(),
        rejected: "No.".into(),
        user: None,
        conversational: false,
        line: 1,
    };
    let prompt = prompt_ids(&template, &encode, &ex.prompt, 1).unwrap();
    let reference = bapo_train::reference_of(&loaded.model);
    let cfg = GenerationConfig {
        max_new_tokens: 5,
        eos_ids: vec![eos],
        ..GenerationConfig::default()
    };
    let g = generate(&reference, std::slice::from_ref(&prompt), &cfg, &device).remove(0);
    assert!(!g.stopped_on_eos && g.tokens.len() == 5, "{g:?}");
    let base = BaseResponse {
        ids: g.tokens.clone(),
        eos: false,
    };
    let enc_cfg = EncodeConfig {
        max_length: 128,
        max_prompt_length: None,
        truncation_mode: bapo_data::TruncationMode::KeepEnd,
    };
    let (enc, _) =
        encode_examples(&[ex], Some(&[base]), &template, &encode, eos, &enc_cfg).unwrap();
    assert_eq!(enc[0].base_ids.as_deref(), Some(&g.tokens[..]));

    let refs = bapo_train::reference_logps(&reference, &enc, 1, eos, true, &device, |_| {});
    let seq: Vec<i64> = prompt.iter().chain(&g.tokens).map(|&t| t as i64).collect();
    let n = seq.len();
    let tokens = Tensor::<_, 2, Int>::from_data(TensorData::new(seq.clone(), [1, n]), &device);
    let lp = log_softmax(reference.forward(tokens, None), 2)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let v = lp.len() / n;
    let independent: f64 = (prompt.len()..n)
        .map(|i| lp[(i - 1) * v + seq[i] as usize] as f64)
        .sum();
    assert!(
        (refs[0].sum[2] - independent).abs() < 1e-4,
        "cached {} vs full log-softmax {independent}",
        refs[0].sum[2]
    );
    let policy = bapo_train::LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..Default::default()
    }
    .attach(loaded.model, 7, &device);
    let at_step_0 = logps(&policy, &enc, eos)[2];
    assert!(
        (at_step_0 - refs[0].sum[2]).abs() < 1e-5,
        "{at_step_0} vs {}",
        refs[0].sum[2]
    );
}

/// `gradient_checkpointing` trains as without it (ndarray, through `train`): the first step's
/// loss and gradient norm bit for bit, every later step's and the adapters after four steps
/// (two micro-batches a step) within 1e-3 relative (measured 4.1e-5: Adam's steps carry the
/// gradients' rounding differences forward, see `tests/tests/gradients.rs` for the gradients
/// themselves). A count of recomputations shows the checkpointed run took the other path.
#[test]
fn gradient_checkpointing_gives_the_same_steps() {
    let _rng = serial();
    let go = |ckpt: bool| {
        let (model, enc, refs, eos) = setup();
        let cfg = TrainConfig {
            learning_rate: 3e-2,
            warmup_steps: 1,
            max_steps: 4,
            batch_size: 1,
            grad_accum: 2,
            micro_batch_threads: Some(1),
            gradient_checkpointing: ckpt,
            ..Default::default()
        };
        let mut logs = Vec::new();
        let before = bapo_train::checkpoint::recomputed();
        let model = train(
            model,
            &enc,
            &refs,
            &cfg,
            eos,
            &Default::default(),
            None,
            |l, _, _| logs.push([l.metrics["loss"], l.grad_norm]),
        )
        .unwrap();
        let after = bapo_train::checkpoint::recomputed();
        let adapters: Vec<f64> = adapter_delta_norms(&model).into_values().collect();
        (logs, adapters, after - before)
    };
    let (plain, plain_adapters, none) = go(false);
    let (ckpt, ckpt_adapters, recomputed) = go(true);
    assert_eq!(none, 0);
    // 2 blocks × 2 passes (the shared prompts, then the completions) × 2 micro-batches × 4 steps.
    assert_eq!(recomputed, 2 * 2 * 2 * 4, "recomputed feed-forward halves");
    assert_eq!(
        plain[0].map(f64::to_bits),
        ckpt[0].map(f64::to_bits),
        "step 1"
    );
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-12);
    let mut worst = 0f64;
    for (p, c) in plain.iter().zip(&ckpt) {
        worst = worst.max(rel(c[0], p[0])).max(rel(c[1], p[1]));
    }
    assert_eq!(plain_adapters.len(), ckpt_adapters.len());
    for (p, c) in plain_adapters.iter().zip(&ckpt_adapters) {
        worst = worst.max(rel(*c, *p));
    }
    eprintln!("gradient checkpointing: worst relative difference {worst:.1e}");
    assert!(worst <= 1e-3, "{worst}");
}
