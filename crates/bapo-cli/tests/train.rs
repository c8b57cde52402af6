//! `bapo train` end to end on the tiny Llama: outputs, TRL metric names, cache reuse, config errors.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
mod serve;
use common::{bapo, bapo_ok, config, root};

/// [`config`] without the `[lora]` section (every weight trains) at a full-fine-tuning rate.
fn full_ft_config(dir: &Path) -> PathBuf {
    let cfg = config(dir, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("[lora]\nrank = 4\nalpha = 8.0\n", "")
        .replace("learning_rate = 1e-2", "learning_rate = 1e-3");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// An empty per-process temporary directory `<tmp>/<name>-<pid>`.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn train_writes_metrics_anchors_and_adapter_and_reuses_caches() {
    let dir = fresh_dir("bapo-train-cli");
    // With the NLL-on-chosen term on, so that path (training and eval) runs end to end too.
    let cfg = config(&dir, "nll_weight = 0.1");
    let res = bapo(&["train", "--config", cfg.to_str().unwrap()]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let run = dir.join("run");
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "checkpoint-2/adapter_model.safetensors",
        "anchors.jsonl",
        "metrics.jsonl",
        "config.json",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for key in [
        "loss",
        "nll_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logps/base",
        "anchor/loss",
        "anchor/violation_rate",
        "learning_rate",
        "grad_norm",
        "time/forward_s",
        "time/backward_s",
        "time/optimizer_s",
    ] {
        assert!(
            rows[2][key].as_f64().is_some_and(f64::is_finite),
            "step 3 lacks {key}: {}",
            rows[2]
        );
    }
    assert!(
        rows[1]["eval_rewards/accuracies"].is_number() && rows[2]["eval_anchor/loss"].is_number()
    );
    // Step 1 starts at the reference: zero rewards, no anchor violation.
    assert_eq!(rows[0]["rewards/margins"].as_f64(), Some(0.0));
    assert_eq!(rows[0]["anchor/violation_rate"].as_f64(), Some(0.0));
    let anchors = std::fs::read_to_string(run.join("anchors.jsonl")).unwrap();
    assert_eq!(anchors.lines().count(), 28);
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (peft["peft_type"].as_str(), peft["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    // `--resume` continues from checkpoint-2 and recomputes step 3 identically.
    let res = bapo(&["train", "--config", cfg.to_str().unwrap(), "--resume"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success() && err.contains("resuming"), "{err}");
    let again: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(again.len(), 3);
    assert_eq!(again[..2], rows[..2]);
    let (a, b) = (
        again[2]["loss"].as_f64().unwrap(),
        rows[2]["loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-5,
        "resumed step-3 loss {a} vs uninterrupted {b}"
    );
    assert_eq!(again[2]["num_tokens"], rows[2]["num_tokens"]);
    // The personalised model generates through `--adapter`.
    let model = root().join("tests/fixtures/tiny-llama");
    let gen = bapo(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        run.join("adapter").to_str().unwrap(),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "3",
    ]);
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    // Second run: both caches are reused (no regeneration).
    // `--set` overrides any config value; β is not part of the cache fingerprint.
    let again = bapo(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--max-steps",
        "1",
        "--set",
        "train.beta=0.25",
    ]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("reusing 32 cached base responses"), "{err}");
    assert!(!err.contains("base responses generated"), "{err}");
    let resolved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(resolved["train"]["beta"].as_f64(), Some(0.25));
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    let bad = bapo(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "train.nope=1",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("nope"), "{err}");
    // `bapo anchor` alone: a different anchor setting misses the cache and regenerates.
    let anchors = bapo(&[
        "anchor",
        "--config",
        cfg.to_str().unwrap(),
        "--output",
        dir.join("anchors-only").to_str().unwrap(),
        "--set",
        "anchor.max_new_tokens=3",
    ]);
    let err = String::from_utf8_lossy(&anchors.stderr);
    assert!(anchors.status.success(), "{err}");
    assert!(err.contains("base responses generated"), "{err}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("anchors-only/anchors.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 28);
    assert!(
        lines
            .iter()
            .all(|l| l["tokens"].as_u64().unwrap() <= 3
                && l["reference_logp"].as_f64().unwrap() < 0.0)
    );
    // The anchor scores the reference's own ids: an EOS only where generation produced one,
    // none on responses cut by max_new_tokens (the random tiny model rarely stops by itself).
    let cut = lines.iter().filter(|l| l["eos"] == false).count();
    assert!(cut > 0, "no cut response to check");
    for l in &lines {
        let scored = l["base_ids"].as_array().unwrap().len() as u64;
        let extra = u64::from(l["eos"].as_bool().unwrap());
        assert_eq!(scored, l["tokens"].as_u64().unwrap() + extra, "{l}");
    }
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval_base.json")).unwrap())
            .unwrap();
    let f = base["anchor/base_cut_fraction"].as_f64().unwrap();
    assert!(f > 0.0 && f <= 1.0, "{base}");
    assert!(!dir.join("anchors-only/adapter").exists());
}

#[test]
fn config_errors_name_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("bapo-train-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, "bogus_key = 3");
    let res = bapo(&["train", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        err.contains("cfg.toml") && err.contains("line 17") && err.contains("bogus_key"),
        "{err}"
    );
    let cfg = config(&dir, "beta = \"high\"");
    let err = String::from_utf8_lossy(&bapo(&["train", "--config", cfg.to_str().unwrap()]).stderr)
        .to_string();
    assert!(
        err.contains("cfg.toml") && err.contains("line 17") && err.contains("invalid type"),
        "{err}"
    );
    let cfg = config(&dir, "loss_type = [\"sigmoid\", \"kto\"]");
    let err = String::from_utf8_lossy(&bapo(&["train", "--config", cfg.to_str().unwrap()]).stderr)
        .to_string();
    assert!(err.contains("unknown loss type `kto`"), "{err}");
    // Values out of range: the file and line, or the `--set` that gave them, and the key.
    let cfg = config(&dir, "beta = -1");
    let err = String::from_utf8_lossy(&bapo(&["train", "--config", cfg.to_str().unwrap()]).stderr)
        .to_string();
    assert!(
        err.contains("cfg.toml: line 17: train.beta must be finite and > 0, got -1"),
        "{err}"
    );
    let cfg = config(&dir, "");
    for (set, want) in [
        (
            "train.learning_rate=-1",
            "train.learning_rate must be finite and > 0, got -1",
        ),
        ("lora.rank=0", "lora.rank must be at least 1, got 0"),
        ("lora.alpha=-2", "lora.alpha must be finite and > 0"),
        ("train.beta=0", "train.beta must be finite and > 0"),
        (
            "train.label_smoothing=0.5",
            "train.label_smoothing must be in [0, 0.5)",
        ),
        (
            "train.anchor_weight=-1",
            "train.anchor_weight must be finite and >= 0",
        ),
        ("train.batch_size=0", "train.batch_size must be at least 1"),
        (
            "train.micro_batch_threads=0",
            "train.micro_batch_threads must be at least 1, got 0",
        ),
        ("anchor.top_p=1.5", "anchor.top_p must be in (0, 1]"),
        (
            "eval.formats=[\"chat_system\"]",
            "eval.formats is invalid: eval.formats: `chat_system` needs eval.system_turns",
        ),
        (
            "train.anchor=\"sideways\"",
            "train.anchor is invalid: unknown anchor `sideways`",
        ),
        (
            "data.max_prompt_length=96",
            "data.max_prompt_length (96) must be below data.max_length (96)",
        ),
    ] {
        let res = bapo(&["train", "--config", cfg.to_str().unwrap(), "--set", set]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            res.status.code() == Some(1) && err.contains(&format!("--set {set}: {want}")),
            "{set}: {err}"
        );
    }
    // Two settings that exclude each other: the error names the key that completes the pair.
    let res = bapo(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "lora.dropout=0.1",
        "--set",
        "train.gradient_checkpointing=true",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.code() == Some(1)
            && err.contains("train.gradient_checkpointing is on with lora.dropout = 0.1"),
        "{err}"
    );
    let res = bapo(&[
        "--concurrent",
        "0",
        "train",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.code() == Some(1) && err.contains("--concurrent must be at least 1"),
        "{err}"
    );
    // Lengths beyond the model's context (the tiny model has 256 positions).
    let res = bapo(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        "data.max_length=4096",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.code() == Some(1)
            && err.contains("data.max_length = 4096 exceeds the context")
            && err.contains("256 positions"),
        "{err}"
    );
    // The data selection: a second held-out split, an empty user list, users nobody has.
    let cfg = config(&dir, "");
    let c = cfg.to_str().unwrap();
    let run = |set: &str| {
        String::from_utf8_lossy(&bapo(&["train", "--config", c, "--set", set]).stderr).to_string()
    };
    let err = run("data.eval=\"pairs.jsonl\"");
    assert!(err.contains("data.eval_fraction must be 0"), "{err}");
    let err = run("data.users=[]");
    assert!(err.contains("data.users is empty"), "{err}");
    let err = run("data.users=[\"nobody\"]");
    assert!(
        err.contains("concise.jsonl") && err.contains("no pair has a `user`"),
        "{err}"
    );
    // A prompt that alone fills max_length: an error naming the file and line, before any
    // base response is generated; with drop_long_prompts the run skips them (all, here).
    let err = run("data.max_length=8");
    assert!(
        err.contains("concise.jsonl:1: field `prompt` alone is longer than data.max_length = 8")
            && !err.contains("base responses generated"),
        "{err}"
    );
    let res = bapo(&[
        "train",
        "--config",
        c,
        "--set",
        "data.max_length=8",
        "--set",
        "data.drop_long_prompts=true",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success()
            && err.contains("examples dropped")
            && err.contains("no training examples left"),
        "{err}"
    );
    // Missing files: the config itself, the training data, the held-out data.
    let err =
        String::from_utf8_lossy(&bapo(&["train", "--config", "/nonexistent/cfg.toml"]).stderr)
            .to_string();
    assert!(err.contains("/nonexistent/cfg.toml"), "{err}");
    let err = run("data.train=\"no-such.jsonl\"");
    assert!(
        err.contains("no-such.jsonl") && err.contains("No such file"),
        "{err}"
    );
    let res = bapo(&[
        "train",
        "--config",
        c,
        "--set",
        "data.eval_fraction=0.0",
        "--set",
        "data.eval=\"held-out.jsonl\"",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("held-out.jsonl"),
        "{err}"
    );
    // The backend: from `--backend` or the config's `backend` key; one not compiled in names
    // its cargo feature, an unknown one the file.
    let with_backend = |b: &str| {
        let p = dir.join(format!("backend-{b}.toml"));
        let text = std::fs::read_to_string(dir.join("cfg.toml")).unwrap();
        std::fs::write(&p, format!("backend = \"{b}\"\n{text}")).unwrap();
        p
    };
    if !cfg!(feature = "cuda") {
        let p = with_backend("cuda");
        let err =
            String::from_utf8_lossy(&bapo(&["train", "--config", p.to_str().unwrap()]).stderr)
                .to_string();
        assert!(
            err.contains("`cuda` is not compiled into this binary")
                && err.contains("--features cuda"),
            "{err}"
        );
        let err =
            String::from_utf8_lossy(&bapo(&["--backend", "cuda", "train", "--config", c]).stderr)
                .to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
    let p = with_backend("gpu");
    let err = String::from_utf8_lossy(&bapo(&["train", "--config", p.to_str().unwrap()]).stderr)
        .to_string();
    assert!(
        err.contains("backend-gpu.toml") && err.contains("expected ndarray, flex, wgpu or cuda"),
        "{err}"
    );
}

#[test]
fn full_fine_tuning_checkpoints_resumes_and_exports_an_hf_directory() {
    let dir = fresh_dir("bapo-full-ft");
    let cfg = full_ft_config(&dir);
    let c = cfg.to_str().unwrap();
    let res = bapo(&["train", "--config", c]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let run = dir.join("run");
    for f in [
        "model/model.safetensors",
        "model/config.json",
        "model/tokenizer.json",
        "checkpoint-2/model.safetensors",
        "checkpoint-2/optimizer.bin",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    assert!(!run.join("adapter").exists());
    let losses = |p: &Path| -> Vec<f64> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let full = losses(&run);
    assert_eq!(full.len(), 3);
    assert!(
        full[2] < full[0],
        "full fine-tuning did not lower the loss: {full:?}"
    );
    // Resume from checkpoint-2: step 3 is recomputed from the saved weights and AdamW state.
    let res = bapo(&["train", "--config", c, "--resume"]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let resumed = losses(&run);
    assert_eq!(resumed.len(), 3);
    assert!(
        (resumed[2] - full[2]).abs() < 1e-5,
        "{resumed:?} vs {full:?}"
    );
    // The exported directory is a model `bapo` (and transformers) loads.
    let out = dir.join("scores.jsonl");
    let res = bapo(&[
        "score",
        "--model",
        run.join("model").to_str().unwrap(),
        "--input",
        root()
            .join("tests/fixtures/tiny-llama/pairs.jsonl")
            .to_str()
            .unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(std::fs::read_to_string(&out).unwrap().lines().count() > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn drift_and_knowledge_metrics_during_training_figure_and_eval_report() {
    let dir = fresh_dir("bapo-drift-cli");
    let cfg = config(&dir, "");
    let knowledge = root().join("data/knowledge/capitals.jsonl");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[output]",
        &format!(
            "[eval]\nknowledge = [\"{}\"]\nknowledge_items = 6\noutput_prompts = 2\ngenerative_items = 3\nkl_vocab_chunk = 100\n[output]",
            knowledge.display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let res = bapo(&["train", "--config", c]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let run = dir.join("run");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = &rows[2];
    for key in [
        "eval_kl/token",
        "eval_anchor_drift/mean",
        "eval_anchor_drift/per_token",
        "eval_anchor_drift/fell_fraction",
        "eval_output/mean_length",
        "eval_output/eos_rate",
        "eval_output/distinct_2",
        "eval_knowledge/capitals/raw/acc",
        "eval_knowledge/capitals/chat/acc",
        "eval_knowledge/capitals/chat/margin",
        "eval_knowledge/capitals/chat/delta_gold_loglik",
        "eval_knowledge/capitals/generative/acc",
        "eval_weight_distance",
    ] {
        assert!(
            last[key].as_f64().is_some_and(f64::is_finite),
            "step 3 lacks {key}: {last}"
        );
    }
    // Trained adapters moved the policy: positive KL and weight distance.
    assert!(last["eval_kl/token"].as_f64().unwrap() > 0.0);
    assert!(last["eval_weight_distance"].as_f64().unwrap() > 0.0);
    // The base row (step 0): the reference against itself has no drift.
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval_base.json")).unwrap())
            .unwrap();
    assert!(
        base["eval_kl/token"].as_f64().unwrap().abs() < 1e-6,
        "{base}"
    );
    assert_eq!(base["eval_anchor_drift/mean"].as_f64(), Some(0.0));
    // Three items asked generatively: a fraction in thirds.
    let g = base["eval_knowledge/capitals/generative/acc"]
        .as_f64()
        .unwrap();
    assert!(
        (g * 3.0 - (g * 3.0).round()).abs() < 1e-12 && (0.0..=1.0).contains(&g),
        "{g}"
    );
    assert!(
        base["eval_knowledge/capitals/raw/acc"].is_number(),
        "{base}"
    );
    let png = std::fs::read(run.join("training.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(std::fs::read_to_string(run.join("training.svg"))
        .unwrap()
        .contains("Knowledge accuracy"));
    // `bapo eval` scores every item (221 capitals) for base and policy and writes the report.
    let report = dir.join("report.json");
    let res = bapo(&[
        "eval",
        "--config",
        c,
        "--adapter",
        run.join("adapter").to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--set",
        "eval.formats=[\"raw\"]",
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let table = String::from_utf8_lossy(&res.stdout);
    assert!(
        table.contains("knowledge/capitals/raw/acc 95% CI (n=221)"),
        "{table}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(
        r["knowledge"]["base"]["capitals/raw"]["n"].as_u64(),
        Some(221)
    );
    assert!(r["policy"]["eval_kl/token"].as_f64().unwrap() > 0.0);
    assert!(r["knowledge"]["policy"]["capitals/raw"]["delta_margin"].is_number());
    assert_eq!(
        r["items"]["policy"]["capitals/raw"]
            .as_array()
            .unwrap()
            .len(),
        221
    );
    assert!(r["gate"].is_null());
    // report.html: every number it shows is report.json's; the answers side by side.
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let (checked, texts) = check_html_numbers(&html, &r);
    assert!(checked > 20, "{checked} numeric cells");
    let answers = r["answers"].as_array().unwrap();
    assert!(!answers.is_empty());
    for a in answers {
        for k in ["prompt", "base", "policy"] {
            let t = a[k].as_str().unwrap();
            assert!(
                texts.iter().any(|x| x == t),
                "{k} answer missing from the page: {t}"
            );
        }
    }
    assert!(html.contains("<svg"), "the training figure is embedded");

    // The retention gate, passing: against the base model, a 100 % drop is allowed. Its drop
    // is the paired mean, so it equals base acc minus policy acc from the same report.
    let eval_with = |extra: &[&str], report: &std::path::Path| {
        let adapter = run.join("adapter");
        let mut args = vec![
            "eval",
            "--config",
            c,
            "--adapter",
            adapter.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            "--set",
            "eval.formats=[\"raw\"]",
        ];
        args.extend_from_slice(extra);
        let res = bapo(&args);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
        (res, doc)
    };
    let (res, g) = eval_with(&["--max-drop", "1"], &dir.join("gated.json"));
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(String::from_utf8_lossy(&res.stdout).contains("retention gate"));
    let row = &g["gate"]["rows"][0];
    assert_eq!(g["gate"]["pass"], serde_json::json!(true));
    assert_eq!(
        (row["key"].as_str(), row["n"].as_u64()),
        (Some("capitals/raw"), Some(221))
    );
    let acc = |who: &str| g["knowledge"][who]["capitals/raw"]["acc"].as_f64().unwrap();
    let drop = row["acc_drop"].as_f64().unwrap();
    assert!(
        (drop - (acc("base") - acc("policy"))).abs() < 1e-12,
        "{drop}"
    );
    let flips = |row: &serde_json::Value| {
        let (l, g) = (
            row["lost"].as_u64().unwrap(),
            row["gained"].as_u64().unwrap(),
        );
        (l as f64 - g as f64) / 221.0
    };
    assert!(
        (flips(row) - drop).abs() < 1e-12,
        "lost - gained = n * acc drop"
    );
    let ci = row["acc_drop_ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() <= drop && drop <= ci[1].as_f64().unwrap());

    // Failing: a baseline whose every item is right with a margin 100 nats wider than this
    // model's, so the margin drop is exactly 100 on every item.
    let mut baseline = g.clone();
    for item in baseline["items"]["policy"]["capitals/raw"]
        .as_array_mut()
        .unwrap()
    {
        item["correct"] = serde_json::json!(true);
        item["margin"] = serde_json::json!(item["margin"].as_f64().unwrap() + 100.0);
    }
    let base_path = dir.join("baseline.json");
    std::fs::write(&base_path, serde_json::to_string(&baseline).unwrap()).unwrap();
    let failed = dir.join("failed.json");
    let (res, f) = eval_with(
        &[
            "--baseline",
            base_path.to_str().unwrap(),
            "--max-margin-drop",
            "50",
        ],
        &failed,
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "the gate passed: {err}");
    assert!(
        err.contains("retention gate failed")
            && err.contains("capitals/raw (n=221)")
            && err.contains("margin drop 100.0000 nats"),
        "{err}"
    );
    assert_eq!(
        f["gate"]["pass"],
        serde_json::json!(false),
        "report written all the same"
    );
    assert!((f["gate"]["rows"][0]["margin_drop"].as_f64().unwrap() - 100.0).abs() < 1e-9);
    // The accuracy drop against an all-right baseline is one minus this model's accuracy.
    let d = f["gate"]["rows"][0]["acc_drop"].as_f64().unwrap();
    assert!((d - (1.0 - acc("policy"))).abs() < 1e-12, "{d}");
    assert_eq!(f["gate"]["rows"][0]["gained"].as_u64(), Some(0));
    assert!((flips(&f["gate"]["rows"][0]) - d).abs() < 1e-12);

    // Bad gate flags are refused before any work.
    for (flags, msg) in [
        (
            vec!["--max-drop", "2"],
            "--max-drop must be an accuracy fraction in [0, 1]",
        ),
        (
            vec!["--max-margin-drop=-1"],
            "--max-margin-drop must be a finite number",
        ),
        (
            vec!["--baseline", "x.json"],
            "--baseline x.json needs a limit",
        ),
    ] {
        let mut args = vec!["eval", "--config", c];
        args.extend(flags);
        let res = bapo(&args);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && err.contains(msg), "{err}");
    }
    let res = bapo(&["eval", "--config", c, "--max-drop", "0.02"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("needs --adapter"), "{err}");
    // A baseline without per-item results (an old report) is refused before any evaluation.
    let old = dir.join("old-report.json");
    std::fs::write(&old, r#"{"knowledge": {}}"#).unwrap();
    let adapter = run.join("adapter");
    let res = bapo(&[
        "eval",
        "--config",
        c,
        "--adapter",
        adapter.to_str().unwrap(),
        "--max-drop",
        "0.02",
        "--baseline",
        old.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("old-report.json: field `items`"),
        "{err}"
    );
    assert!(
        !err.contains("base model evaluated"),
        "refused only after the work: {err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tiny model's config on the persona data with held-out pairs, six capitals items and
/// two answered prompts: what the compare tests run.
fn compare_config(dir: &Path) -> PathBuf {
    let cfg = config(dir, "");
    let r = root();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            &format!("train = \"{}\"", r.join("data/demo/concise.jsonl").display()),
            &format!(
                "train = \"{}\"\neval = \"{}\"",
                r.join("data/personas/train.jsonl").display(),
                r.join("data/personas/test.jsonl").display()
            ),
        )
        .replace("eval_fraction = 0.125", "eval_fraction = 0.0")
        .replace(
            "[output]",
            &format!(
                "[eval]\nknowledge = [\"{}\"]\nknowledge_items = 6\noutput_prompts = 2\nkl_vocab_chunk = 4096\n[output]",
                r.join("data/knowledge/capitals.jsonl").display()
            ),
        );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// Design A′: the user's pairs scanned once, split at the median per-token gap into equal
/// halves, each half-level trained on its own half only, and the near/far difference reported.
#[test]
fn compare_design_a2_splits_each_user_at_the_median_gap() {
    let dir = fresh_dir("bapo-compare-a2");
    let cfg = compare_config(&dir);
    let out = dir.join("cmp");
    let res = bapo(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--levels",
        "near_concise,far_concise",
        "--methods",
        "dpo",
        "--max-train-pairs",
        "4",
        "--max-eval-pairs",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.max_steps=2",
        "--set",
        "output.eval_steps=2",
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let gaps: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("data/scan/concise/gaps.json")).unwrap(),
    )
    .unwrap();
    let pairs = gaps["pairs"].as_array().unwrap();
    let half = |h: &str| -> Vec<(u64, f64)> {
        pairs
            .iter()
            .filter(|p| p["half"] == h)
            .map(|p| {
                (
                    p["line"].as_u64().unwrap(),
                    p["gap_token"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let (near, far, median) = (half("near"), half("far"), half("median"));
    assert_eq!(
        (pairs.len(), near.len(), far.len(), median.len()),
        (73, 36, 36, 1)
    );
    let top_near = near.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let low_far = far.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    assert!(
        top_near <= median[0].1 && median[0].1 <= low_far,
        "{top_near} {median:?} {low_far}"
    );
    // Each half-level trains on prompts of its own half only.
    let source: Vec<serde_json::Value> =
        std::fs::read_to_string(root().join("data/personas/train.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    for (level, lines) in [("near_concise", &near), ("far_concise", &far)] {
        let allowed: Vec<&serde_json::Value> = lines
            .iter()
            .map(|(l, _)| &source[*l as usize - 1]["prompt"])
            .collect();
        let train =
            std::fs::read_to_string(out.join(format!("data/{level}/seed0/train.jsonl"))).unwrap();
        let rows: Vec<serde_json::Value> = train
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 4);
        assert!(
            rows.iter()
                .all(|r| r["user"] == "concise" && allowed.contains(&&r["prompt"])),
            "{level}"
        );
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let m = &doc["design_a"]["design_a2"]["methods"][0];
    let d = &m["directions"][0];
    assert_eq!(
        (m["method"].as_str(), d["user"].as_str()),
        (Some("dpo"), Some("concise"))
    );
    let diff = d["loss_far"].as_f64().unwrap() - d["loss_near"].as_f64().unwrap();
    assert!(
        (d["far_minus_near"].as_f64().unwrap() - diff).abs() < 1e-12,
        "{d}"
    );
    assert!(
        m["verdict"]
            .as_str()
            .unwrap()
            .starts_with("undetermined: 1 of 6"),
        "{m}"
    );
    // The near half's trained gap lies below the far half's.
    let users = doc["design_a"]["users"].as_array().unwrap();
    let gap = |lvl: &str| {
        users.iter().find(|u| u["level"] == lvl).unwrap()["logp_gap"]
            .as_f64()
            .unwrap()
    };
    assert!(gap("near_concise") < gap("far_concise"));
}

#[test]
fn compare_trains_each_method_on_per_level_data_and_reports() {
    let dir = fresh_dir("bapo-compare-cli");
    let cfg = compare_config(&dir);
    let out = dir.join("cmp");
    let args = [
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--levels",
        "solo_concise,solo_detailed,solo_friendly",
        "--methods",
        "dpo,bapo_l1",
        "--max-train-pairs",
        "6",
        "--max-eval-pairs",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.max_steps=2",
        "--set",
        "output.eval_steps=2",
    ];
    let res = bapo(&args);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let md = String::from_utf8_lossy(&res.stdout);
    for level in ["solo_concise", "solo_detailed", "solo_friendly"] {
        for row in ["dpo | 1 |", "bapo_l1 | 1 |", "base model | - |"] {
            assert!(md.contains(&format!("| {level} | {row}")), "{md}");
        }
    }
    // Per-level data: the level's user only, capped, drawn by the seed; design A's prompts
    // stay plain (no profile turn).
    let train = std::fs::read_to_string(out.join("data/solo_concise/seed0/train.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = train
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    assert!(rows
        .iter()
        .all(|r| r["user"] == "concise" && r["prompt"].is_string()));
    // Each method's config: its own anchor weight, the level's data; shared anchor cache.
    let runs = out.join("runs/solo_concise");
    let weight = |m: &str| {
        let c: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(runs.join(m).join("config.json")).unwrap(),
        )
        .unwrap();
        (c["train"]["anchor_weight"].as_f64().unwrap(), c)
    };
    let (wd, cd) = weight("dpo-seed0");
    let (wb, _) = weight("bapo_l1-seed0");
    assert_eq!((wd, wb), (0.0, 1.0));
    assert_eq!(cd["data"]["users"], serde_json::json!(["concise"]));
    for cache in ["anchors.cache.json", "eval_base.cache.json"] {
        assert_eq!(
            std::fs::read(runs.join("dpo-seed0").join(cache)).unwrap(),
            std::fs::read(runs.join("bapo_l1-seed0").join(cache)).unwrap(),
            "{cache}"
        );
    }
    // The base model was evaluated once per level: the second method reused it.
    let log = String::from_utf8_lossy(&res.stderr);
    assert_eq!(
        log.matches("reusing the base model's cached knowledge results")
            .count(),
        3,
        "one reuse per level"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(doc["runs"].as_array().unwrap().len(), 6);
    for run in doc["runs"].as_array().unwrap() {
        let m = &run["metrics"];
        for key in [
            "eval_rewards/accuracies",
            "eval_anchor_drift/mean",
            "eval_kl/token",
            "knowledge/retention",
            "knowledge/delta_margin",
        ] {
            assert!(m[key].as_f64().is_some_and(f64::is_finite), "{key}: {m}");
        }
    }
    // Paired statistics: each run against the base model, BAPO against DPO; the primary
    // endpoint recomputed here from the runs' per-item results.
    let cmp = doc["comparisons"].as_array().unwrap();
    let find = |m: &str, against: &str| {
        cmp.iter()
            .find(|c| c["level"] == "solo_concise" && c["method"] == m && c["against"] == against)
            .unwrap_or_else(|| panic!("no {m} vs {against} in {cmp:?}"))
    };
    assert_eq!(cmp.len(), 9, "per level: dpo and bapo vs base, bapo vs dpo");
    let items = |m: &str| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(runs.join(m).join("knowledge_items.json")).unwrap(),
        )
        .unwrap()
    };
    let (dpo, bapo_items) = (items("dpo-seed0"), items("bapo_l1-seed0"));
    let pairs = |a: &serde_json::Value, b: &serde_json::Value| -> Vec<(bool, f64, bool, f64)> {
        let (a, b) = (
            a["capitals/chat"].as_array().unwrap(),
            b["capitals/chat"].as_array().unwrap(),
        );
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                assert_eq!(x["id"], y["id"]);
                let f = |v: &serde_json::Value| v["margin"].as_f64().unwrap();
                let c = |v: &serde_json::Value| v["correct"].as_bool().unwrap();
                (c(x), f(x), c(y), f(y))
            })
            .collect()
    };
    for (c, a, b) in [
        (find("dpo", "base"), &dpo["base"], &dpo["policy"]),
        (
            find("bapo_l1", "base"),
            &bapo_items["base"],
            &bapo_items["policy"],
        ),
        (
            find("bapo_l1", "dpo"),
            &dpo["policy"],
            &bapo_items["policy"],
        ),
    ] {
        let p = &c["primary"];
        let v = pairs(a, b);
        assert_eq!(p["n"].as_u64(), Some(v.len() as u64));
        let dm = v.iter().map(|x| x.3 - x.1).sum::<f64>() / v.len() as f64;
        let got = p["delta_margin"].as_f64().unwrap();
        assert!((got - dm).abs() < 1e-12, "{got} vs {dm}");
        let lost = v.iter().filter(|x| x.0 && !x.2).count() as u64;
        let gained = v.iter().filter(|x| !x.0 && x.2).count() as u64;
        assert_eq!(p["mcnemar"]["lost"].as_u64(), Some(lost));
        assert_eq!(p["mcnemar"]["gained"].as_u64(), Some(gained));
        let p_value = p["mcnemar"]["p"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p_value));
        let ci = [
            p["ci95"][0].as_f64().unwrap(),
            p["ci95"][1].as_f64().unwrap(),
        ];
        assert!(
            ci[0] <= got + 1e-12 && got <= ci[1] + 1e-12,
            "{ci:?} around {got}"
        );
        assert_eq!(c["per_set"].as_array().unwrap().len(), 2, "{c}");
        // Per subset (capitals/<continent>/n): the subsets' items add up to the set's.
        let subs = c["per_subset"].as_array().unwrap();
        let chat: u64 = subs
            .iter()
            .filter(|s| s["key"].as_str().unwrap().ends_with("/chat"))
            .map(|s| s["n"].as_u64().unwrap())
            .sum();
        assert_eq!(chat, v.len() as u64, "{subs:?}");
    }
    assert!(md.contains("### Paired, item by item"), "{md}");
    assert_eq!(
        &std::fs::read(out.join("compare.png")).unwrap()[1..4],
        b"PNG"
    );
    // Design A: each user's logp_gap from its reference cache, each method's knowledge loss
    // from its per-item results, and DPO's slope over the users, recomputed here.
    let design = &doc["design_a"];
    let mut pts = Vec::new();
    for user in ["concise", "detailed", "friendly"] {
        let u = design["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["user"] == user)
            .unwrap();
        let dir = out.join(format!("runs/solo_{user}/dpo-seed0"));
        let cache: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference_logps.cache.json")).unwrap(),
        )
        .unwrap();
        let gaps: Vec<f64> = cache["train"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["mean"][1].as_f64().unwrap() - r["mean"][0].as_f64().unwrap())
            .collect();
        let gap = gaps.iter().sum::<f64>() / gaps.len() as f64;
        assert!(
            (u["logp_gap_drawn"].as_f64().unwrap() - gap).abs() < 1e-12,
            "{u}"
        );
        // The covariate proper: over the pairs the optimiser steps drew (the training loop's
        // sampler replayed from the run's config), with multiplicity.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let t = &cfg["train"];
        let n = |k: &str| t[k].as_u64().unwrap() as usize;
        let mut sampler = bapo_train::train::Sampler::new(gaps.len(), t["seed"].as_u64().unwrap());
        let draws: Vec<usize> = (0..n("max_steps") * n("grad_accum"))
            .flat_map(|_| sampler.next(n("batch_size")))
            .collect();
        let trained = draws.iter().map(|&i| gaps[i]).sum::<f64>() / draws.len() as f64;
        assert!(
            (u["logp_gap"].as_f64().unwrap() - trained).abs() < 1e-12,
            "{u}"
        );
        assert!(u["measure_gap"].as_f64().is_some_and(f64::is_finite), "{u}");
        let k: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("knowledge_items.json")).unwrap(),
        )
        .unwrap();
        let (b, p) = (
            k["base"]["capitals/chat"].as_array().unwrap(),
            k["policy"]["capitals/chat"].as_array().unwrap(),
        );
        let loss = -b
            .iter()
            .zip(p)
            .map(|(x, y)| y["margin"].as_f64().unwrap() - x["margin"].as_f64().unwrap())
            .sum::<f64>()
            / b.len() as f64;
        let method = |name: &str| {
            u["methods"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["method"] == name)
                .unwrap()
        };
        let m = method("dpo");
        assert!(
            (m["knowledge_loss"].as_f64().unwrap() - loss).abs() < 1e-12,
            "{m}"
        );
        assert!(m["vs_base"]["ci95"].is_array() && m["vs_base"]["mcnemar"]["p"].is_f64());
        assert!(m["toward_pole_success"].is_f64(), "output_prompts = 2: {m}");
        let bapo = method("bapo_l1");
        assert!(bapo["vs_dpo"]["ci95"].is_array(), "{bapo}");
        let verdict = bapo["verdict"].as_str().unwrap();
        assert!(
            verdict == "prevents forgetting" || verdict.starts_with("not shown: "),
            "{verdict}"
        );
        pts.push((trained, loss));
    }
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let slope = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
        / pts.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
    let dpo_slope = design["slopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["method"] == "dpo")
        .unwrap();
    let got = dpo_slope["per_seed"][0]["slope"].as_f64().unwrap();
    assert!((got - slope).abs() < 1e-9, "{got} vs {slope}");
    assert!(
        dpo_slope["verdict"]
            .as_str()
            .unwrap()
            .starts_with("undetermined: 1 seed"),
        "{dpo_slope}"
    );
    assert!(md.contains("### Design A"), "{md}");
    for fig in ["heterogeneity.png", "tradeoff.png"] {
        assert_eq!(
            &std::fs::read(out.join(fig)).unwrap()[1..4],
            b"PNG",
            "{fig}"
        );
    }
    // A rerun reuses the finished runs (no training: metrics.jsonl untouched).
    let metrics = runs.join("dpo-seed0/metrics.jsonl");
    let before = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    let res = bapo(&args);
    assert!(res.status.success());
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        before
    );
    // Design B: profile turns in the prompts, and knowledge also scored after them.
    let out_b = dir.join("cmp-b");
    bapo_ok(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--levels",
        "two_opposing",
        "--methods",
        "dpo",
        "--max-train-pairs",
        "4",
        "--max-eval-pairs",
        "2",
        "--out",
        out_b.to_str().unwrap(),
        "--set",
        "train.max_steps=1",
        "--set",
        "output.eval_steps=1",
    ]);
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(out_b.join("data/two_opposing/seed0/train.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let prompts = |u: &str| -> Vec<&serde_json::Value> {
        rows.iter()
            .filter(|r| r["user"] == u)
            .map(|r| &r["prompt"][1]["content"])
            .collect()
    };
    assert!(rows.iter().all(|r| r["prompt"][0]["role"] == "system"));
    let (c, d) = (prompts("concise"), prompts("detailed"));
    assert!(
        !c.is_empty() && !d.is_empty() && c.iter().all(|p| !d.contains(p)),
        "disjoint"
    );
    let run_b = out_b.join("runs/two_opposing/dpo-seed0");
    let k: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_b.join("knowledge_items.json")).unwrap())
            .unwrap();
    assert_eq!(
        k["policy"]["capitals/chat_system"]
            .as_array()
            .unwrap()
            .len(),
        k["policy"]["capitals/chat"].as_array().unwrap().len()
    );
    let doc_b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_b.join("compare.json")).unwrap())
            .unwrap();
    let own = &doc_b["comparisons"][0]["primary"]["own_turn"];
    assert_eq!(own["key"], "pooled_chat_system", "{own}");
    assert!(
        own["ci95"].is_array() && own["mcnemar"]["p"].is_f64(),
        "{own}"
    );
    assert_eq!(
        &std::fs::read(out_b.join("own_turn.png")).unwrap()[1..4],
        b"PNG"
    );
    // --report-only trains nothing: a level never run is left out.
    let res = bapo_ok(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--levels",
        "solo_concise,solo_expert",
        "--methods",
        "dpo,bapo_l1",
        "--out",
        out.to_str().unwrap(),
        "--report-only",
    ]);
    assert!(!out.join("runs/solo_expert").exists());
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(doc["runs"].as_array().unwrap().len(), 2, "{:?}", res.status);
    // A level whose users are not in the data is a clear error.
    let only = dir.join("only-concise.jsonl");
    std::fs::write(
        &only,
        "{\"prompt\": \"Hi?\", \"chosen\": \"Hello.\", \"rejected\": \"Hello there, friend.\", \"user\": \"concise\"}\n",
    )
    .unwrap();
    let res = bapo(&[
        "compare",
        "--config",
        cfg.to_str().unwrap(),
        "--levels",
        "two_compatible",
        "--out",
        out.to_str().unwrap(),
        "--set",
        &format!("data.train=\"{}\"", only.display()),
        "--set",
        &format!("data.eval=\"{}\"", only.display()),
    ]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("needs user `expert`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shipped_configs_parse_and_their_data_reads() {
    for name in [
        "default.toml",
        "dpo-baseline.toml",
        "compare.toml",
        "1b-class.toml",
    ] {
        let path = root().join("configs").join(name);
        let cfg = bapo_run::RunConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let users = cfg.data.users.clone().unwrap_or_default();
        for p in std::iter::once(&cfg.data.train).chain(cfg.data.eval.as_ref()) {
            let pairs = bapo_data::read_preferences(p).unwrap_or_else(|e| panic!("{e}"));
            let mine = pairs
                .iter()
                .filter(|e| e.user.as_ref().is_some_and(|u| users.contains(u)))
                .count();
            assert!(
                mine >= 10,
                "{}: only {mine} pairs for {users:?}",
                p.display()
            );
        }
        for k in &cfg.eval.knowledge {
            let items = bapo_drift::mc::read_items(k).unwrap_or_else(|e| panic!("{e}"));
            assert!(items.len() >= 50, "{}: {} items", k.display(), items.len());
        }
    }
}

/// Losses by step from `metrics.jsonl`.
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn sigkill_at_random_points_then_resume_reproduces_the_uninterrupted_curve() {
    let dir = fresh_dir("bapo-kill");
    let extra = "max_steps = 6";
    let cfg = config(&dir, extra);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps = 3\n", "")
        .replace(
            "eval_steps = 2\nsave_steps = 2",
            "eval_steps = 100\nsave_steps = 1",
        );
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    // The uninterrupted run.
    let full = dir.join("full");
    let t_full = std::time::Instant::now();
    let res = bapo(&["train", "--config", c, "--output", full.to_str().unwrap()]);
    // Kill delays are drawn within a quarter of the whole run's time, so that a faster build
    // still gets killed mid-run (fixed delays of up to 1.5 s outlived the run once it got faster).
    let quarter_ms = (t_full.elapsed().as_millis() as u64 / 4).max(20);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let want = losses(&full);
    assert_eq!(want.len(), 6);
    // Killed runs: SIGKILL after a pseudo-random delay past the first checkpoint (so at any point
    // of a step, a checkpoint write or a metrics append), then `--resume`, twice in a row.
    let run = dir.join("killed");
    let out = run.to_str().unwrap();
    let mut seed = std::process::id() as u64;
    let mut interrupted = 0;
    for round in 0..2 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bapo"))
            .args(["train", "--config", c, "--output", out])
            .args(if round == 0 { vec![] } else { vec!["--resume"] })
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let first = run.join(format!("checkpoint-{}", round * 2 + 1));
        let t0 = std::time::Instant::now();
        while !first.exists() && t0.elapsed().as_secs() < 300 {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(std::time::Duration::from_millis((seed >> 33) % quarter_ms));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        interrupted += usize::from(!finished);
        // Whatever the kill interrupted, no half-written checkpoint is visible under its name.
        for e in std::fs::read_dir(&run).unwrap() {
            let e = e.unwrap().path();
            if e.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint-")
                && e.extension().is_none()
            {
                assert!(e.join("trainer_state.json").exists(), "{}", e.display());
                assert!(
                    e.join("adapter_model.safetensors").exists(),
                    "{}",
                    e.display()
                );
            }
        }
    }
    assert!(interrupted > 0, "no run was killed before it finished");
    let res = bapo(&["train", "--config", c, "--output", out, "--resume"]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let got = losses(&run);
    assert_eq!(
        got.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<u64>>(),
        "every step exactly once: {got:?}"
    );
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        assert!(
            (a - b).abs() < 1e-5,
            "step {s}: resumed {a} vs uninterrupted {b}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130_then_resume_finishes() {
    let dir = fresh_dir("bapo-sigint");
    let cfg = config(&dir, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps = 3", "max_steps = 8")
        .replace(
            "eval_steps = 2\nsave_steps = 2",
            "eval_steps = 100\nsave_steps = 100",
        );
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let run = dir.join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_bapo"))
        .args(["train", "--config", c])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = run.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 1
        && t0.elapsed().as_secs() < 300
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let steps = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!((1..8).contains(&steps), "{steps} steps logged: {err}");
    let ckpt = run.join(format!("checkpoint-{steps}"));
    assert!(
        err.contains("continue with --resume") && ckpt.join("trainer_state.json").exists(),
        "{err}"
    );
    assert!(
        !run.join("adapter").exists(),
        "no final adapter after an interruption"
    );
    let res = bapo(&["train", "--config", c, "--resume"]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(losses(&run).len(), 8);
    assert!(run.join("adapter/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `bapo` under `sh` with `ulimit -f` (RLIMIT_FSIZE, 512-byte blocks) and SIGXFSZ
/// ignored: any write past `limit_kib` fails in the kernel with EFBIG, exactly where a full
/// disk fails with ENOSPC, without root or a small filesystem.
fn bapo_with_file_size_limit(limit_kib: u64, args: &[&str]) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {}; exec \"$0\" \"$@\"",
            limit_kib * 2
        ))
        .arg(env!("CARGO_BIN_EXE_bapo"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_write_failing_mid_checkpoint_stops_cleanly_and_keeps_earlier_checkpoints() {
    let dir = fresh_dir("bapo-diskfull");
    // Full fine-tuning: a checkpoint holds the 6.3 MB model, far bigger than any other output.
    let cfg = full_ft_config(&dir);
    let c = cfg.to_str().unwrap();
    let run = dir.join("run");
    assert!(bapo(&["train", "--config", c]).status.success());
    let ckpt2 = std::fs::read(run.join("checkpoint-2/model.safetensors")).unwrap();
    let ckpt2_state = std::fs::read(run.join("checkpoint-2/trainer_state.json")).unwrap();

    // Resume towards step 6 with writes capped at 1 MiB: checkpoint-4 cannot be written.
    let res = bapo_with_file_size_limit(
        1024,
        &["train", "--config", c, "--resume", "--max-steps", "6"],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{err}");
    assert!(
        err.contains("checkpoint-4") && err.contains("File too large"),
        "the error must name the checkpoint and the cause: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let left: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-") && n != "checkpoint-2")
        .collect();
    assert!(left.is_empty(), "half-written checkpoints left: {left:?}");
    // The run stopped at the failed save (step 4), not after more unsaved steps.
    let steps: Vec<u64> = losses(&run).into_iter().map(|(step, _)| step).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    // checkpoint-2 is byte for byte what it was, and a resume without the limit finishes.
    assert_eq!(
        std::fs::read(run.join("checkpoint-2/model.safetensors")).unwrap(),
        ckpt2
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint-2/trainer_state.json")).unwrap(),
        ckpt2_state
    );
    let res = bapo(&["train", "--config", c, "--resume", "--max-steps", "6"]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let steps: Vec<u64> = losses(&run).into_iter().map(|(step, _)| step).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    assert!(run.join("checkpoint-4/model.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stale_mismatched_or_corrupt_caches_are_detected_and_rebuilt() {
    let dir = fresh_dir("bapo-cache-fp");
    // Own copies of the data and the model, to change them under the caches.
    let data = dir.join("pairs.jsonl");
    std::fs::copy(root().join("data/demo/concise.jsonl"), &data).unwrap();
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(root().join("tests/fixtures/tiny-llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let cfg = config(&dir, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            &root().join("data/demo/concise.jsonl").display().to_string(),
            &data.display().to_string(),
        )
        .replace(
            &root()
                .join("tests/fixtures/tiny-llama")
                .display()
                .to_string(),
            &model.display().to_string(),
        );
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let cache = dir.join("run/anchors.cache.json");
    let anchor = || {
        let res = bapo(&["anchor", "--config", c]);
        let err = String::from_utf8_lossy(&res.stderr).into_owned();
        assert!(res.status.success(), "{err}");
        (err, std::fs::read_to_string(&cache).unwrap())
    };
    let fp = |cache: &str| -> String {
        serde_json::from_str::<serde_json::Value>(cache).unwrap()["fingerprint"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (err, first) = anchor();
    assert!(err.contains("base responses generated"), "{err}");
    let (err, same) = anchor();
    assert!(
        err.contains("reusing 32 cached base responses") && same == first,
        "{err}"
    );

    // Different data: one rejected answer edited.
    let edited = std::fs::read_to_string(&data).unwrap().replacen(
        "\"rejected\": \"",
        "\"rejected\": \"Well, ",
        1,
    );
    std::fs::write(&data, edited).unwrap();
    let (err, after_data) = anchor();
    assert!(
        err.contains("cache fingerprint differs") && err.contains("base responses generated"),
        "{err}"
    );
    assert_ne!(fp(&after_data), fp(&first));

    // A different model: the same architecture with other numbers in config.json.
    let cfg_json = std::fs::read_to_string(model.join("config.json"))
        .unwrap()
        .replace("\"rms_norm_eps\": 1e-05", "\"rms_norm_eps\": 1e-06");
    std::fs::write(model.join("config.json"), cfg_json).unwrap();
    let (err, after_model) = anchor();
    assert!(err.contains("cache fingerprint differs"), "{err}");
    assert_ne!(fp(&after_model), fp(&after_data));

    // Different settings: the reference-log-prob cache depends on max_length too.
    let res = bapo(&["anchor", "--config", c, "--set", "data.max_length=64"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(
        err.contains("reusing 32 cached base responses")
            && err.contains("reference_logps.cache.json")
            && err.contains("fingerprint differs"),
        "anchors stay valid, reference log-probs are rebuilt: {err}"
    );

    // Another backend: same fingerprint, other numerics. Both caches are rebuilt (reusing
    // another backend's log-probs would put the anchor off its kink at step 1), and the
    // cache records which backend made it.
    let made_on = |cache: &str| -> String {
        serde_json::from_str::<serde_json::Value>(cache).unwrap()["numerics"]["backend"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(made_on(&std::fs::read_to_string(&cache).unwrap()), "flex");
    let res = bapo(&[
        "--backend",
        "ndarray",
        "anchor",
        "--config",
        c,
        "--set",
        "data.max_length=64",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(
        err.contains("computed on another backend")
            && err.contains("made_on")
            && err.contains("base responses generated"),
        "{err}"
    );
    let ndarray_cache = std::fs::read_to_string(&cache).unwrap();
    assert_eq!(made_on(&ndarray_cache), "ndarray");
    let ref_cache = std::fs::read_to_string(dir.join("run/reference_logps.cache.json")).unwrap();
    assert_eq!(made_on(&ref_cache), "ndarray");

    // A truncated (corrupt) cache file is reported and rebuilt, never half-used.
    let text = std::fs::read_to_string(&cache).unwrap();
    std::fs::write(&cache, &text[..text.len() / 2]).unwrap();
    let (err, rebuilt) = anchor();
    assert!(
        err.contains("not a valid cache file") && err.contains("base responses generated"),
        "{err}"
    );
    assert_eq!(rebuilt, after_model);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `v` at a `/`-joined path whose keys may themselves contain `/` (metric names): the longest
/// key that matches a prefix wins; array elements by index.
fn at_path<'a>(v: &'a serde_json::Value, segs: &[&str]) -> Option<&'a serde_json::Value> {
    if segs.is_empty() {
        return Some(v);
    }
    if let Some(a) = v.as_array() {
        return at_path(a.get(segs[0].parse::<usize>().ok()?)?, &segs[1..]);
    }
    (1..=segs.len())
        .rev()
        .find_map(|n| at_path(v.get(segs[..n].join("/"))?, &segs[n..]))
}

/// Parses `html` and checks every numeric cell against `doc` (report.json): the cell's
/// `data-value` is the JSON number at its `data-key` path and its text that number to 4
/// places. Returns the number of cells checked and the page's table-cell texts.
fn check_html_numbers(html: &str, doc: &serde_json::Value) -> (usize, Vec<String>) {
    let dom = tl::parse(html, tl::ParserOptions::default()).expect("valid HTML");
    let parser = dom.parser();
    let (mut checked, mut texts) = (0, Vec::new());
    for h in dom.query_selector("td").unwrap() {
        let tag = h.get(parser).unwrap().as_tag().unwrap();
        let text = tag.inner_text(parser).to_string();
        let attr = |k: &str| {
            tag.attributes()
                .get(k)
                .flatten()
                .map(|b| b.as_utf8_str().to_string())
        };
        if let (Some(key), Some(value)) = (attr("data-key"), attr("data-value")) {
            let segs: Vec<&str> = key.split('/').collect();
            let want = at_path(doc, &segs)
                .and_then(|v| v.as_f64())
                .unwrap_or_else(|| panic!("{key} not a number in the report"));
            assert_eq!(value.parse::<f64>().unwrap(), want, "{key}");
            assert_eq!(text, format!("{want:.4}"), "{key}");
            checked += 1;
        }
        texts.push(text);
    }
    (checked, texts)
}

/// The first `n` pairs of each of `users` from the bundled persona data, into `dir/users.jsonl`.
fn persona_subset(dir: &Path, users: &[&str], n: usize) -> PathBuf {
    let text = std::fs::read_to_string(root().join("data/personas/train.jsonl")).unwrap();
    let mut out = String::new();
    for u in users {
        let tag = format!("\"user\":\"{u}\"");
        for l in text.lines().filter(|l| l.contains(&tag)).take(n) {
            out.push_str(l);
            out.push('\n');
        }
    }
    let p = dir.join("users.jsonl");
    std::fs::write(&p, out).unwrap();
    p
}

/// [`config`] on [`persona_subset`]'s 8 pairs per user (prompts cut to 64 tokens), with
/// `edits` (from, to) applied to the text: the data file and the config.
fn persona_config(dir: &Path, users: &[&str], edits: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let data = persona_subset(dir, users, 8);
    let cfg = config(dir, "");
    let mut text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            &root().join("data/demo/concise.jsonl").display().to_string(),
            &data.display().to_string(),
        )
        .replace(
            "max_length = 96",
            "max_length = 128\nmax_prompt_length = 64",
        );
    for (from, to) in edits {
        assert!(text.contains(from), "{from}");
        text = text.replace(from, to);
    }
    std::fs::write(&cfg, text).unwrap();
    (data, cfg)
}

#[test]
fn per_user_trains_each_user_as_its_own_run_with_shared_caches() {
    let dir = fresh_dir("bapo-per-user");
    let (data, cfg) = persona_config(
        &dir,
        &["concise", "child", "friendly"],
        &[
            ("eval_fraction = 0.125", "eval_fraction = 0.25"),
            ("[output]", "[eval]\noutput_prompts = 2\n[output]"),
        ],
    );
    let cfg = cfg.to_str().unwrap();
    let run = dir.join("run");
    let res = bapo(&[
        "train",
        "--config",
        cfg,
        "--per-user",
        "--users",
        "child,concise",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    // Base responses and reference log-probs once, for the selection (not every user: no
    // `shared/`); none per user.
    assert!(!run.join("shared").exists());
    let shared: Vec<PathBuf> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("shared-")
        })
        .collect();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert!(shared[0].join("anchors.cache.json").exists());
    assert!(shared[0].join("reference_logps.cache.json").exists());
    let made = std::fs::metadata(shared[0].join("anchors.cache.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert!(!run.join("users/friendly").exists(), "not selected");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("users_summary.json")).unwrap())
            .unwrap();
    let rows = summary["users"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, user) in rows.iter().zip(["child", "concise"]) {
        assert_eq!(row["user"], user);
        assert_eq!(row["status"], "trained", "{row}");
        let udir = run.join("users").join(user);
        assert!(udir.join("adapter/adapter_model.safetensors").exists());
        assert!(
            !udir.join("anchors.cache.json").exists(),
            "recomputed per user"
        );
        let last: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(udir.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        let m = &row["metrics"];
        for k in [
            "eval_rewards/accuracies",
            "eval_kl/token",
            "eval_personalisation/success",
        ] {
            assert_eq!(m[k], last[k], "{user} {k}");
        }
        let h = &row["heterogeneity"];
        assert_eq!(h["pairs"], row["train_pairs"], "{row}");
        assert!(h["logp_gap"].as_f64().is_some_and(f64::is_finite), "{row}");
        assert!(
            h["measure_gap"].as_f64().is_some_and(f64::is_finite),
            "{row}"
        );
        let s = m["eval_personalisation/success"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s), "{s}");
        // Knowledge change = final accuracy - the base model's (eval_base.json).
        let base: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(udir.join("eval_base.json")).unwrap())
                .unwrap();
        for (k, v) in m.as_object().unwrap() {
            if let Some(stem) = k.strip_suffix("/delta_acc") {
                let want = last[format!("{stem}/acc")].as_f64().unwrap()
                    - base[format!("{stem}/acc")].as_f64().unwrap();
                assert_eq!(v.as_f64().unwrap(), want, "{k}");
            }
        }
    }
    assert!(err.contains("| child | trained |"), "{err}");

    // A user's run is the single-user run bit for bit: same adapter, same losses.
    let single = dir.join("single");
    let res = bapo(&[
        "train",
        "--config",
        cfg,
        "--set",
        r#"data.users=["child"]"#,
        "--output",
        single.to_str().unwrap(),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let bytes = |p: PathBuf| std::fs::read(p).unwrap();
    assert!(
        bytes(single.join("adapter/adapter_model.safetensors"))
            == bytes(run.join("users/child/adapter/adapter_model.safetensors")),
        "per-user adapter differs from the single-user run's"
    );
    assert_eq!(losses(&single), losses(&run.join("users/child")));

    // --resume skips finished users (nothing retrained: metrics untouched).
    let metrics = run.join("users/concise/metrics.jsonl");
    let before = std::fs::metadata(&metrics).unwrap().modified().unwrap();
    let resume = [
        "train",
        "--config",
        cfg,
        "--per-user",
        "--users",
        "child,concise",
        "--resume",
    ];
    bapo_ok(&resume);
    let again = std::fs::metadata(shared[0].join("anchors.cache.json"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(again, made, "the same selection reuses its shared caches");
    assert_eq!(
        std::fs::metadata(&metrics).unwrap().modified().unwrap(),
        before
    );
    // --shard 2/2 of [child, concise] is concise alone, with its own summary file.
    bapo_ok(&[&resume[..], &["--shard", "2/2"]].concat());
    let shard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("users_summary-2-of-2.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(shard["users"].as_array().unwrap().len(), 1);
    assert_eq!(shard["users"][0]["user"], "concise");
    assert_eq!(shard["users"][0]["status"], "finished earlier");

    // Bad input: an unknown user, a bad shard, a pair without a user.
    let res = bapo(&["train", "--config", cfg, "--per-user", "--users", "nobody"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        err.contains("`nobody`")
            && err.contains("users.jsonl")
            && err.contains("child, concise, friendly"),
        "{err}"
    );
    let res = bapo(&["train", "--config", cfg, "--per-user", "--shard", "3/2"]);
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("--shard `3/2`"));

    // bapo eval --per-user: each user's report (gated), their pages, and an index.
    let res = bapo(&[
        "eval",
        "--config",
        cfg,
        "--per-user",
        "--users",
        "child,concise",
        "--max-drop",
        "1",
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("users_report.json")).unwrap())
            .unwrap();
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    let (checked, texts) = check_html_numbers(&html, &index);
    assert!(checked >= 8, "{checked}");
    for (i, user) in ["child", "concise"].iter().enumerate() {
        assert!(texts.contains(&user.to_string()));
        assert!(html.contains(&format!("href=\"users/{user}/report.html\"")));
        let row = &index["users"][i];
        assert_eq!(row["status"], "evaluated");
        assert_eq!(row["metrics"]["gate/pass"], true);
        let udir = run.join("users").join(user);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(udir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(
            row["metrics"]["eval_kl/token"],
            doc["policy"]["eval_kl/token"]
        );
        let page = std::fs::read_to_string(udir.join("report.html")).unwrap();
        let (checked, _) = check_html_numbers(&page, &doc);
        assert!(checked > 10, "{user}: {checked}");
        assert!(page.contains("Retention gate"));
    }
    let res = bapo(&["train", "--config", cfg, "--users", "child"]);
    assert!(!res.status.success(), "--users without --per-user");
    let mut lines: Vec<String> = std::fs::read_to_string(&data)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines[1] = lines[1].replace("\"user\":\"concise\"", "\"note\":\"x\"");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let res = bapo(&["train", "--config", cfg, "--per-user"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        err.contains("users.jsonl:2: field `user` is missing"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prompt sharing is an option passed down with the config, not a process-wide switch:
/// `--no-prompt-sharing` and `--set train.prompt_sharing=false` make the same full-row
/// reference log-probs (the cache records the path), which agree with the shared path's to
/// float rounding; switching back rebuilds the cache rather than mixing the two.
#[test]
fn prompt_sharing_is_a_config_option_that_caches_record() {
    let dir = fresh_dir("bapo-prompt-sharing");
    let cfg = config(&dir, "");
    let c = cfg.to_str().unwrap();
    let cache = dir.join("run/reference_logps.cache.json");
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap()
    };
    let sums = |v: &serde_json::Value| -> Vec<f64> {
        v["train"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r["sum"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
            })
            .collect()
    };
    bapo_ok(&["anchor", "--config", c, "--no-prompt-sharing"]);
    let flag = read();
    let path = flag["numerics"]["logps"].as_str().unwrap().to_string();
    assert!(!path.contains("prompts shared"), "{path}");
    std::fs::remove_file(&cache).unwrap();
    bapo_ok(&[
        "anchor",
        "--config",
        c,
        "--set",
        "train.prompt_sharing=false",
    ]);
    let key = read();
    assert_eq!(key["numerics"], flag["numerics"]);
    assert_eq!(
        sums(&key),
        sums(&flag),
        "the flag and the key are the same setting"
    );
    bapo_ok(&["anchor", "--config", c]);
    let shared = read();
    assert!(
        shared["numerics"]["logps"]
            .as_str()
            .unwrap()
            .contains("prompts shared"),
        "{shared}"
    );
    for (a, b) in sums(&shared).iter().zip(sums(&flag)) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
