//! Data-parallel `bapo train` on the tiny Llama: two local peers (burn-collective) and two MPI
//! ranks against one process with the same global batch; resume with another world size; a
//! rank that dies ends the job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
#[cfg(feature = "mpi")]
use std::process::Command;

use bapo_model::load::HostTensor;

mod common;
use common::{bapo, bapo_ok, config};

/// An empty per-process temporary directory with [`config`] at micro-batches of 4 pairs (its
/// output `<dir>/run` is the one-process run).
/// The two tests run one at a time: each compares a data-parallel run with one process to 1e-5,
/// and beside a 2-rank MPI job on a 2-core machine the local-peers comparison once ended 2 %
/// apart (each path alone is bit-identical run to run; the cause is not found yet, see the
/// 2026-12-06 closing note). Holding this lock for the whole test keeps them apart.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn setup(name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("batch_size = 2\n"));
    std::fs::write(
        &cfg,
        text.replacen("batch_size = 2\n", "batch_size = 4\n", 1),
    )
    .unwrap();
    (dir, cfg)
}

fn adapter(run: &Path) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    bapo_model::load::safetensors::read_file(
        &run.join("adapter/adapter_model.safetensors"),
        &mut out,
    )
    .unwrap();
    out
}

/// The largest per-tensor relative L2 difference ‖a − b‖ / ‖a‖ between two adapters.
fn worst_relative(a: &BTreeMap<String, HostTensor>, b: &BTreeMap<String, HostTensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let (worst, name) = a
        .iter()
        .map(|(k, x)| {
            let y = &b[k];
            assert_eq!(x.shape, y.shape, "{k}");
            let d: f64 = x
                .data
                .iter()
                .zip(&y.data)
                .map(|(p, q)| (*p as f64 - *q as f64).powi(2))
                .sum();
            let n: f64 = x.data.iter().map(|p| (*p as f64).powi(2)).sum();
            ((d / n.max(1e-30)).sqrt(), k)
        })
        .fold(
            (0.0, ""),
            |m, (r, k)| if r > m.0 { (r, k.as_str()) } else { m },
        );
    eprintln!("worst relative difference {worst:e} in {name}");
    worst
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn dist_json(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("dist.json")).unwrap()).unwrap()
}

/// Same losses and token counts, step by step (1e-5 relative on the loss).
fn same_curve(a: &Path, b: &Path) {
    let (ma, mb) = (metrics(a), metrics(b));
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["num_tokens"], y["num_tokens"], "step {}", x["step"]);
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!(
            (lx - ly).abs() <= 1e-5 * lx.abs(),
            "step {}: loss {lx} vs {ly}",
            x["step"]
        );
    }
}

/// Tolerance between one process and several ranks with the same global batch: each rank pads
/// its slice to its own longest sequence and the gradients are summed in another order, so the
/// float results differ by rounding. The worst tensor is layer 0's `k_proj` LoRA B in every
/// measurement: it starts at zero and AdamW's first steps move each element by about the
/// learning rate whatever its gradient's size, so rounding in small gradients shows there
/// most. Measured (2026-12-07, worst tensor, two local peers): 9.7e-6 without fused kernels,
/// 7.2e-6 with head, RMSNorm, softmax and SwiGLU, 8.7e-7 with RoPE alone, 1.8e-5 with all five
/// (so the bound was raised from 1e-5, which the op-by-op path already nearly reached).
const REL: f64 = 5e-5;

#[test]
fn two_local_peers_equal_one_process_and_resume_with_another_world_size() {
    let _one_at_a_time = serial();
    let (dir, cfg) = setup("bapo-dist-local");
    let cfg = cfg.to_str().unwrap();
    let (single, local) = (dir.join("run"), dir.join("local"));
    bapo_ok(&["train", "--config", cfg]);
    bapo_ok(&[
        "train",
        "--config",
        cfg,
        "--output",
        local.to_str().unwrap(),
        "--devices",
        "flex,flex",
    ]);
    let d = dist_json(&local);
    assert_eq!(d["engine"], "burn-collective (local)");
    assert_eq!(d["world_size"], 2);
    assert_eq!(
        d["pairs_per_rank_per_micro_batch"],
        serde_json::json!([2, 2])
    );
    // Every replica's final parameters hashed bit for bit and compared across the ranks.
    assert_eq!(d["replicas_identical"], true);
    let worst = worst_relative(&adapter(&single), &adapter(&local));
    assert!(worst <= REL, "local peers vs one process: {worst}");
    same_curve(&single, &local);
    // Only rank 0 wrote: one metrics line per step, the sync time among them.
    let m = metrics(&local);
    assert_eq!(m.len(), 3);
    assert!(m[0]["time/sync_s"].as_f64().unwrap() >= 0.0);

    // Resume with another world size: the local run's checkpoint-2, finished by one process,
    // ends where the uninterrupted single run did.
    let resumed = dir.join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    for f in [
        "checkpoint-2",
        "metrics.jsonl",
        "anchors.cache.json",
        "reference_logps.cache.json",
        "anchors.jsonl",
    ] {
        let from = local.join(f);
        if from.is_dir() {
            std::fs::create_dir_all(resumed.join(f)).unwrap();
            for e in std::fs::read_dir(&from).unwrap() {
                let e = e.unwrap();
                std::fs::copy(e.path(), resumed.join(f).join(e.file_name())).unwrap();
            }
        } else {
            std::fs::copy(&from, resumed.join(f)).unwrap();
        }
    }
    bapo_ok(&[
        "train",
        "--config",
        cfg,
        "--output",
        resumed.to_str().unwrap(),
        "--resume",
    ]);
    let worst = worst_relative(&adapter(&single), &adapter(&resumed));
    assert!(worst <= REL, "resumed on one process: {worst}");
    same_curve(&single, &resumed);

    // Errors name what is wrong.
    let res = bapo(&[
        "train",
        "--config",
        cfg,
        "--output",
        dir.join("x").to_str().unwrap(),
        "--devices",
        "flex,flex,flex,flex,flex",
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(err.contains("fewer than the 5 ranks"), "{err}");
    let res = bapo(&["train", "--config", cfg, "--devices", "flex:1"]);
    assert!(String::from_utf8_lossy(&res.stderr).contains("has one device, index 0"));
    let res = bapo(&["train", "--config", cfg, "--devices", "cuda:0,flex"]);
    assert!(String::from_utf8_lossy(&res.stderr).contains("of one backend"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(feature = "mpi")]
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    // CI runs as root in a container with fewer cores than some runs want.
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args([
            "--oversubscribe",
            "-np",
            &np.to_string(),
            env!("CARGO_BIN_EXE_bapo"),
        ]);
    c
}

/// The pid of the `bapo` process MPI launched as `rank`, once it exists.
#[cfg(feature = "mpi")]
fn rank_pid(rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let is_bapo = String::from_utf8_lossy(&cmd).contains("bapo-dist-mpi");
        let is_rank = env.split(|&b| b == 0).any(|kv| kv == want.as_bytes());
        (is_bapo && is_rank).then_some(pid)
    })
}

#[cfg(feature = "mpi")]
#[test]
fn mpirun_two_ranks_equal_one_process_and_a_killed_rank_ends_the_job() {
    let _one_at_a_time = serial();
    let (dir, cfg) = setup("bapo-dist-mpi");
    let cfg = cfg.to_str().unwrap();
    let (single, mpi) = (dir.join("run"), dir.join("mpi"));
    bapo_ok(&["train", "--config", cfg]);
    let res = mpirun(2)
        .args([
            "train",
            "--config",
            cfg,
            "--output",
            mpi.to_str().unwrap(),
            "--mpi",
        ])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let d = dist_json(&mpi);
    assert_eq!(
        (d["engine"].as_str(), d["world_size"].as_u64()),
        (Some("mpi"), Some(2))
    );
    assert_eq!(d["replicas_identical"], true);
    let worst = worst_relative(&adapter(&single), &adapter(&mpi));
    assert!(worst <= REL, "mpi vs one process: {worst}");
    same_curve(&single, &mpi);

    // Rank 1 killed mid-run: the launcher ends rank 0 too and names the dead rank.
    let killed = dir.join("killed");
    let child = mpirun(2)
        .args([
            "train",
            "--config",
            cfg,
            "--output",
            killed.to_str().unwrap(),
            "--mpi",
            "--max-steps",
            "100000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let pid = loop {
        let started = std::fs::metadata(killed.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
        match rank_pid(1) {
            Some(pid) if started => break pid,
            _ if t0.elapsed().as_secs() > 120 => panic!("rank 1 never started training"),
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    let t1 = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        t1.elapsed().as_secs() < 60,
        "the job took {:?} to end",
        t1.elapsed()
    );
    assert!(err.contains("rank 1") && err.contains("Killed"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
