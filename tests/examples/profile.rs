//! A profiling driver with the bench's exact shapes, for `perf record` and quick A/B timings:
//! `cargo run --release -p bapo-tests --example profile -- [flex|ndarray] [step|generate1|generate8|forward] [N]`
//! (also `flex matmul`, `flex concat` and `flex elementwise`: single ops at the step's exact
//! shapes; the head's log-prob kernel: `cargo run --release -p bapo-objective --features flex
//! --example head`). `BAPO_FUSED=0` runs without the fused kernels.
//! Prints each repetition's wall time (and, for steps, the forward/backward/optimiser split from
//! `train`'s step log). SmolLM2 from `cargo xtask fetch`. `BAPO_PROFILE_SHARE=0` turns prompt
//! sharing off (every row a full sequence), `BAPO_PROFILE_THREADS=N` sets concurrent passes.
//! Other models and shapes (the PyTorch peer's `--shape`): `BAPO_PROFILE_MODEL=DIR` loads that
//! checkpoint instead (e.g. `scripts/shape_checkpoint.py llama3.2-1b DIR`),
//! `BAPO_PROFILE_SEQ=N` makes each row N tokens (prompt and completion N/2 each; default 128),
//! `BAPO_PROFILE_RANK=R` the LoRA rank (default 8, alpha 2R), `BAPO_PROFILE_BASE=bf16` keeps the
//! base in bf16 (`model.base_dtype`; `gguf` keeps a GGUF's quantised blocks), `BAPO_PROFILE_CKPT=1` turns on gradient checkpointing.

use std::time::Instant;

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::generate::{generate, GenerationConfig};
use bapo_model::Llama;
use bapo_tests::smollm2_gguf;
use bapo_train::train::batch_logps;
use bapo_train::{train, LoraConfig, ReferenceLogps, TrainConfig};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    bapo_tests::bench_ids(n, vocab, seed)
}

/// The bench's batch: 4 pairs, prompt and each completion 64 tokens (12 × 128), or
/// `BAPO_PROFILE_SEQ` tokens a row.
fn examples(vocab: usize) -> Vec<EncodedExample> {
    bapo_tests::bench_examples(vocab, 4, env_usize("BAPO_PROFILE_SEQ").unwrap_or(128))
}

fn env_usize(key: &str) -> Option<usize> {
    std::env::var(key).ok().and_then(|s| s.parse().ok())
}

fn run<A: AutodiffBackend>(what: &str, reps: usize) {
    let device = Default::default();
    let t = Instant::now();
    let base = std::env::var("BAPO_PROFILE_BASE").unwrap_or_else(|_| "f32".into());
    let base = bapo_model::precision::parse_base_weights("BAPO_PROFILE_BASE", &base).unwrap();
    let path = std::env::var("BAPO_PROFILE_MODEL").map_or_else(|_| smollm2_gguf(), Into::into);
    let m = bapo_model::load_base::<A::InnerBackend>(&path, base, &device)
        .expect("the model (SmolLM2 GGUF unless BAPO_PROFILE_MODEL)");
    eprintln!("load: {:.2} s", t.elapsed().as_secs_f64());
    let vocab = m.config.vocab_size;
    let model: Llama<A::InnerBackend> = match std::env::var("BAPO_PROFILE_WEIGHTS").as_deref() {
        // Frozen weights in f16 (inference only: generation, forward).
        Ok("f16") => m.model.with_weight_dtype(burn::tensor::FloatDType::F16),
        _ => m.model,
    };
    let ex = examples(vocab);
    for r in 0..reps {
        let t = Instant::now();
        match what {
            "step" | "step2x2" | "step1x4" => {
                let refs = vec![
                    ReferenceLogps {
                        sum: [-150.0, -160.0, -155.0],
                        mean: [-2.3, -2.5, -2.4]
                    };
                    ex.len()
                ];
                let cfg = TrainConfig {
                    prompt_sharing: sharing(),
                    max_steps: 1,
                    warmup_steps: 0,
                    batch_size: match what {
                        "step" => 4,
                        "step2x2" => 2,
                        _ => 1,
                    },
                    grad_accum: match what {
                        "step" => 1,
                        "step2x2" => 2,
                        _ => 4,
                    },
                    micro_batch_threads: std::env::var("BAPO_PROFILE_THREADS")
                        .ok()
                        .and_then(|s| s.parse().ok()),
                    learning_rate: 1e-4,
                    gradient_checkpointing: std::env::var("BAPO_PROFILE_CKPT").is_ok(),
                    ..TrainConfig::default()
                };
                let lora = match env_usize("BAPO_PROFILE_RANK") {
                    Some(r) => LoraConfig {
                        rank: r,
                        alpha: 2.0 * r as f64,
                        ..LoraConfig::default()
                    },
                    None => LoraConfig::default(),
                };
                let policy: Llama<A> =
                    lora.attach(Llama::<A>::from_inner(model.clone()), 0, &device);
                train(policy, &ex, &refs, &cfg, 0, &device, None, |log, _, _| {
                    eprintln!(
                        "  forward {:.2} s, backward {:.2} s, optimiser {:.3} s",
                        log.metrics["time/forward_s"],
                        log.metrics["time/backward_s"],
                        log.metrics["time/optimizer_s"]
                    )
                })
                .expect("step");
            }
            "forward" => {
                let refs: Vec<&EncodedExample> = ex.iter().collect();
                let batch = PreferenceBatch::collate(&refs, 0);
                let (sum, _) = batch_logps(&model, &batch, sharing(), &device);
                let _ = sum.into_data();
            }
            "reference" => {
                // The reference pass over 8 pairs, 2 at a time (4 batches of 6 x 128).
                let more: Vec<EncodedExample> = ex.iter().chain(ex.iter()).cloned().collect();
                let r =
                    bapo_train::reference_logps(&model, &more, 2, 0, sharing(), &device, |_| {});
                assert_eq!(r.len(), 8);
            }
            "forward2" => {
                // The same 12 rows as two 6-row halves, each on its own OS thread.
                std::thread::scope(|sc| {
                    let hs: Vec<_> = ex
                        .chunks(2)
                        .map(|half| {
                            let m = model.clone();
                            let d = device.clone();
                            sc.spawn(move || {
                                let refs: Vec<&EncodedExample> = half.iter().collect();
                                let batch = PreferenceBatch::collate(&refs, 0);
                                let (sum, _) = batch_logps(&m, &batch, sharing(), &d);
                                sum.into_data()
                            })
                        })
                        .collect();
                    for h in hs {
                        let _ = h.join().expect("thread");
                    }
                });
            }
            "forward_halves" => {
                for half in ex.chunks(2) {
                    let refs: Vec<&EncodedExample> = half.iter().collect();
                    let batch = PreferenceBatch::collate(&refs, 0);
                    let (sum, _) = batch_logps(&model, &batch, sharing(), &device);
                    let _ = sum.into_data();
                }
            }
            g => {
                let b: usize = g.trim_start_matches("generate").parse().expect("generateN");
                let prompts: Vec<Vec<u32>> =
                    (0..b).map(|i| ids(32, vocab, 100 + i as u64)).collect();
                let cfg = GenerationConfig {
                    max_new_tokens: 64,
                    eos_ids: Vec::new(),
                    ..GenerationConfig::default()
                };
                generate(&model, &prompts, &cfg, &device);
                let dt = t.elapsed().as_secs_f64();
                eprintln!("  {:.1} tok/s", (b * 64) as f64 / dt);
            }
        }
        eprintln!("{what} #{r}: {:.2} s", t.elapsed().as_secs_f64());
    }
}

/// One `[m, k] × [k, n]` product on the inner backend, GFLOP/s (the shapes of a projection).
/// Element-wise ops at the step's exact shapes (12 × 128 rows; the head's 768 completion rows
/// × 49,152): median of 20 repetitions each, in ms, and the result's sum (the same bits on any
/// thread count: a check that a faster path computes the same numbers).
fn elementwise<B: burn::tensor::backend::Backend>() {
    use burn::tensor::{activation, Distribution, Tensor};
    let d = Default::default();
    B::seed(&d, 7);
    let head = Tensor::<B, 2>::random([768, 49152], Distribution::Default, &d);
    let mlp = Tensor::<B, 2>::random([1536, 1536], Distribution::Default, &d);
    let mlp2 = Tensor::<B, 2>::random([1536, 1536], Distribution::Default, &d);
    let hid = Tensor::<B, 2>::random([1536, 576], Distribution::Default, &d);
    let hid2 = Tensor::<B, 2>::random([1536, 576], Distribution::Default, &d);
    let time = |name: &str, f: &dyn Fn() -> Tensor<B, 2>| {
        let mut v: Vec<f64> = (0..21)
            .map(|_| {
                let t = Instant::now();
                let y = f();
                B::sync(&d).unwrap();
                let dt = t.elapsed().as_secs_f64() * 1e3;
                drop(y);
                dt
            })
            .skip(1)
            .collect();
        v.sort_by(f64::total_cmp);
        let sum: f32 = f().sum().into_scalar().elem();
        eprintln!("{name}: {:.2} ms (sum {sum:e})", v[v.len() / 2]);
    };
    use burn::tensor::ElementConversion;
    time("exp [768, 49152]", &|| head.clone().exp());
    time("exp(x - 1) [768, 49152]", &|| (head.clone() - 1.0).exp());
    time("silu [1536, 1536]", &|| activation::silu(mlp.clone()));
    time("mul [1536, 1536]", &|| mlp.clone() * mlp2.clone());
    time("add [1536, 576]", &|| hid.clone() + hid2.clone());
    time("sqrt(x^2 + 1) [1536, 576]", &|| {
        (hid.clone().powi_scalar(2) + 1.0).sqrt()
    });
}

fn matmul<B: burn::tensor::backend::Backend>(m: usize, k: usize, n: usize, transposed: bool) {
    use burn::tensor::{Distribution, Tensor};
    let d = Default::default();
    let a = Tensor::<B, 2>::random([m, k], Distribution::Default, &d);
    let w = Tensor::<B, 2>::random([n, k], Distribution::Default, &d);
    let b = Tensor::<B, 2>::random([k, n], Distribution::Default, &d);
    let half = std::env::var("BAPO_PROFILE_F16").is_ok();
    let (a, w, b) = if half {
        use burn::tensor::FloatDType::F16;
        (a.cast(F16), w.cast(F16), b.cast(F16))
    } else {
        (a, w, b)
    };
    let once = || {
        let y = if transposed {
            a.clone().matmul(w.clone().transpose())
        } else {
            a.clone().matmul(b.clone())
        };
        B::sync(&d).unwrap();
        y
    };
    once();
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        once();
    }
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    eprintln!(
        "{m}x{k}x{n}{}: {:.2} ms, {:.1} GFLOP/s",
        if transposed { " (rhs transposed)" } else { "" },
        dt * 1e3,
        2.0 * (m * k * n) as f64 / dt / 1e9
    );
}

/// Memory read bandwidth: a 540 MB f32 buffer (SmolLM2's weights) summed by 1..=`max` threads.
fn bandwidth(max: usize) {
    let v: Vec<f32> = (0..135_000_000).map(|i| (i % 7) as f32).collect();
    for threads in 1..=max.max(1) {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            let total: f32 = std::thread::scope(|sc| {
                let hs: Vec<_> = v
                    .chunks(v.len().div_ceil(threads))
                    .map(|c| {
                        sc.spawn(move || {
                            let mut acc = [0f32; 16];
                            for x in c.chunks_exact(16) {
                                for i in 0..16 {
                                    acc[i] += x[i];
                                }
                            }
                            acc.iter().sum::<f32>()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            std::hint::black_box(total);
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!("{threads} thread(s): {:.1} GB/s", 540e6 / best / 1e9);
    }
}

/// The tied head at one row, `W·hᵀ` with `W` `[49152, 576]`: whole vs row halves on two threads.
fn split_gemv<B: burn::tensor::backend::Backend>(parts: usize) {
    use burn::tensor::{Distribution, Tensor};
    let d = Default::default();
    for (v, e, b) in [
        (49152, 576, 1),
        (1536, 576, 1),
        (576, 576, 1),
        (49152, 576, 8),
        (1536, 576, 8),
        (576, 576, 8),
    ] {
        let w = Tensor::<B, 2>::random([v, e], Distribution::Default, &d);
        let h = Tensor::<B, 2>::random([e, b], Distribution::Default, &d);
        let whole = || w.clone().matmul(h.clone());
        let split = || {
            let chunk = v / parts;
            let outs: Vec<Tensor<B, 2>> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..parts)
                    .map(|i| {
                        let wi = w.clone().slice([i * chunk..(i + 1) * chunk, 0..e]);
                        let h = h.clone();
                        sc.spawn(move || wi.matmul(h))
                    })
                    .collect();
                hs.into_iter().map(|t| t.join().unwrap()).collect()
            });
            Tensor::cat(outs, 0)
        };
        let join = || {
            let half = v / 2;
            let (a, b) = rayon::join(
                || w.clone().slice([0..half, 0..e]).matmul(h.clone()),
                || w.clone().slice([half..v, 0..e]).matmul(h.clone()),
            );
            Tensor::cat(vec![a, b], 0)
        };
        // The projection's form: `x·W` with `x` `[b, e]` and `W` `[e, v]`, split by columns.
        let wt = w.clone().transpose().into_data();
        let wt = Tensor::<B, 2>::from_data(wt, &d);
        let x = h.clone().transpose().into_data();
        let x = Tensor::<B, 2>::from_data(x, &d);
        let cols = || {
            let half = v / 2;
            let (a, b) = rayon::join(
                || x.clone().matmul(wt.clone().slice([0..e, 0..half])),
                || x.clone().matmul(wt.clone().slice([0..e, half..v])),
            );
            Tensor::cat(vec![a, b], 1)
        };
        let xw = || x.clone().matmul(wt.clone());
        let same_cols = xw().into_data().to_vec::<f32>().unwrap()
            == cols().into_data().to_vec::<f32>().unwrap();
        for (name, f) in [
            ("x·W", &xw as &(dyn Fn() -> Tensor<B, 2> + Sync)),
            ("x·W column halves, rayon join", &cols),
        ] {
            let t = Instant::now();
            for _ in 0..50 {
                let _ = f().into_data();
            }
            eprintln!(
                "{b}x{e}x{v} {name}: {:.2} ms (bitwise equal: {same_cols})",
                t.elapsed().as_secs_f64() * 20.0
            );
        }
        let a = whole().into_data().to_vec::<f32>().unwrap();
        let c = split().into_data().to_vec::<f32>().unwrap();
        let same = a == c && a == join().into_data().to_vec::<f32>().unwrap();
        for (name, inside, f) in [
            ("whole", false, &whole as &(dyn Fn() -> Tensor<B, 2> + Sync)),
            ("split", false, &split),
            ("rayon join", false, &join),
            ("rayon join in pool", true, &join),
        ] {
            let t = Instant::now();
            let run = || {
                for _ in 0..50 {
                    let _ = f().into_data();
                }
            };
            if inside {
                rayon::scope(|_| run());
            } else {
                run();
            }
            eprintln!(
                "{v}x{e}x{b} {name}: {:.2} ms (bitwise equal: {same})",
                t.elapsed().as_secs_f64() * 20.0
            );
        }
    }
}

/// Prompt sharing, unless `BAPO_PROFILE_SHARE=0`.
fn sharing() -> bool {
    std::env::var("BAPO_PROFILE_SHARE").as_deref() != Ok("0")
}

fn main() {
    if let Some(n) = std::env::var("BAPO_PROFILE_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        bapo_train::concurrent::set_default_threads(n);
    }
    if let Some(n) = std::env::var("BAPO_PROFILE_SPLIT")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        bapo_model::split::set_split_threads(n);
    }
    let a: Vec<String> = std::env::args().collect();
    let backend = a.get(1).map_or("flex", String::as_str);
    let what = a.get(2).map_or("step", String::as_str);
    let reps = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    if what == "bandwidth" {
        bandwidth(reps);
        return;
    }
    if what == "split" {
        split_gemv::<burn::backend::Flex>(reps);
        return;
    }
    if what == "elementwise" {
        elementwise::<burn::backend::Flex>();
        return;
    }
    if what == "matmul" || what == "concat" {
        // `concat`: the projections of one layer at the bench's 12 × 128 rows, apart (Q, K, V;
        // gate, up) and concatenated (QKV 576 → 960; gate‖up 576 → 3072), forward (x·Wᵀ) and
        // the input gradient (dy·W), to size what concatenating the weights at load could save.
        let shapes: &[(usize, usize, usize)] = if what == "concat" {
            &[
                (1536, 576, 576),
                (1536, 576, 192),
                (1536, 576, 960),
                (1536, 576, 1536),
                (1536, 576, 3072),
                (1536, 192, 576),
                (1536, 960, 576),
                (1536, 1536, 576),
                (1536, 3072, 576),
            ]
        } else {
            &[
                (1536, 576, 1536),
                (1536, 576, 192),
                (1536, 1536, 576),
                (768, 576, 49152),
                (1, 576, 49152),
            ]
        };
        for &(m, k, n) in shapes {
            for tr in [false, true] {
                match backend {
                    "flex" => matmul::<burn::backend::Flex>(m, k, n, tr),
                    _ => matmul::<burn::backend::NdArray>(m, k, n, tr),
                }
            }
        }
        return;
    }
    match backend {
        "flex" => run::<Autodiff<burn::backend::Flex>>(what, reps),
        "ndarray" => run::<Autodiff<burn::backend::NdArray>>(what, reps),
        other => panic!("backend {other}: flex or ndarray"),
    }
}
