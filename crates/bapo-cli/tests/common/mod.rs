//! What the CLI tests share: the workspace root and the tiny Llama's run config.
#![allow(dead_code)] // each test crate uses part of it

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A 3-step LoRA run of the tiny Llama on the demo's concise pairs (micro-batches of 2 pairs,
/// a checkpoint at step 2) into `<dir>/run`; `extra` goes into `[train]`.
pub fn config(dir: &Path, extra: &str) -> PathBuf {
    let r = root();
    let text = format!(
        r#"[model]
path = "{model}"
[data]
train = "{data}"
eval_fraction = 0.125
max_length = 96
[anchor]
max_new_tokens = 6
batch_size = 8
[lora]
rank = 4
alpha = 8.0
[train]
max_steps = 3
batch_size = 2
learning_rate = 1e-2
{extra}
[output]
dir = "{out}"
eval_steps = 2
save_steps = 2
"#,
        model = r.join("tests/fixtures/tiny-llama").display(),
        data = r.join("data/demo/concise.jsonl").display(),
        out = dir.join("run").display(),
    );
    let p = dir.join("cfg.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The `bapo` binary run with `args`.
pub fn bapo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bapo"))
        .args(args)
        .output()
        .unwrap()
}

/// [`bapo`], asserting that it succeeded (its log in the failure message).
pub fn bapo_ok(args: &[&str]) -> std::process::Output {
    let res = bapo(args);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    res
}
