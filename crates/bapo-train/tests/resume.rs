//! Resume equality with LoRA dropout on (dropout draws from the backend's process-wide RNG:
//! every test of this binary holds `common::serial`).

use crate::common::*;

use bapo_train::lora::{load_adapter, save_adapter};
use bapo_train::{train, TrainConfig};

#[test]
fn resumed_training_matches_the_uninterrupted_run() {
    let _rng = serial();
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
    // LoRA dropout on: the resumed run must also draw the same dropout masks.
    let (model, enc, refs, eos) = setup_with_dropout(0.2);
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
    let (fresh, ..) = setup_with_dropout(0.2);
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
