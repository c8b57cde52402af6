//! Criterion benchmarks, one binary for every compiled backend: `cargo xtask bench [--backend X]`.
//!
//! The backend is picked at run time by `BAPO_BENCH_BACKEND` (`flex`, the default, `ndarray`,
//! `wgpu`, `cuda`; the GPU ones need their cargo feature) and prefixes every group name, so reports of different
//! backends sit side by side in `target/criterion`. Every timed closure ends with a read back to
//! the host (or `B::sync`), so asynchronous devices are measured to completion. Throughput is in
//! tokens. SmolLM2 groups need the GGUF (`cargo xtask fetch`); without it they are skipped with a
//! message. `BAPO_BENCH_ONLY_TINY=1` skips them on purpose; `BAPO_BENCH_QUICK=1` measures each
//! group for 3 s instead of 20–30 s.

use std::time::Duration;

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::generate::{generate, GenerationConfig};
use bapo_model::{load_pretrained, Llama};
use bapo_objective::{bapo_loss, AnchorLogps, ObjectiveConfig, PairLogps};
use bapo_tests::{fixture, smollm2_gguf};
use bapo_train::train::batch_logps;
use bapo_train::{train, LoraConfig, ReferenceLogps, TrainConfig};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Pairs per BAPO step and tokens per sequence: the headline step (12 sequences of 128).
const PAIRS: usize = 4;
const SEQ: usize = 128;

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    bapo_tests::bench_ids(n, vocab, seed)
}

fn examples(vocab: usize) -> Vec<EncodedExample> {
    bapo_tests::bench_examples(vocab, PAIRS, SEQ)
}

/// `BAPO_BENCH_QUICK=1` shortens every group (a device check with a time budget).
fn quick() -> bool {
    std::env::var("BAPO_BENCH_QUICK").as_deref() == Ok("1")
}

/// Measurement time: `secs`, or 3 s in quick mode.
fn budget(secs: u64) -> Duration {
    Duration::from_secs(if quick() { 3 } else { secs })
}

fn sync<B: Backend>(device: &B::Device) {
    B::sync(device).expect("device sync");
}

struct Model<B: Backend> {
    name: &'static str,
    model: Llama<B>,
    vocab: usize,
    eos: Vec<u32>,
}

fn models<B: Backend>(device: &B::Device) -> Vec<Model<B>> {
    let mut out = Vec::new();
    let tiny = load_pretrained::<B>(&fixture("tiny-llama"), device).expect("tiny fixture");
    out.push(Model {
        name: "tiny",
        vocab: tiny.config.vocab_size,
        eos: Vec::new(),
        model: tiny.model,
    });
    let gguf = smollm2_gguf();
    if std::env::var("BAPO_BENCH_ONLY_TINY").as_deref() == Ok("1") {
        eprintln!("BAPO_BENCH_ONLY_TINY=1: SmolLM2 groups skipped");
    } else if gguf.exists() {
        let m = load_pretrained::<B>(&gguf, device).expect("SmolLM2 GGUF");
        out.push(Model {
            name: "smollm2",
            vocab: m.config.vocab_size,
            eos: Vec::new(),
            model: m.model,
        });
    } else {
        eprintln!(
            "{} is missing (cargo xtask fetch): SmolLM2 groups skipped",
            gguf.display()
        );
    }
    out
}

/// Forward + completion log-probs of the `[chosen; rejected; base]` batch (no gradient).
fn bench_forward<B: Backend>(
    c: &mut Criterion,
    backend: &str,
    ms: &[Model<B>],
    device: &B::Device,
) {
    let mut g = c.benchmark_group(format!("{backend}/forward_logps"));
    g.sample_size(10).measurement_time(budget(20));
    for m in ms {
        let ex = examples(m.vocab);
        let refs: Vec<&EncodedExample> = ex.iter().collect();
        let batch = PreferenceBatch::collate(&refs, 0);
        g.throughput(Throughput::Elements((batch.rows * batch.len) as u64));
        g.bench_function(
            BenchmarkId::new(m.name, format!("{}x{}", batch.rows, batch.len)),
            |b| {
                b.iter(|| {
                    let (sum, _) = batch_logps(&m.model, &batch, true, device);
                    sum.into_data()
                })
            },
        );
    }
    g.finish();
}

/// One BAPO step: LoRA r 8 on every projection, forward + backward over 12 sequences of 128,
/// the loss, gradient clipping and the AdamW update. Reference log-probs are precomputed.
fn bench_step<A: AutodiffBackend>(
    c: &mut Criterion,
    backend: &str,
    ms: &[Model<A::InnerBackend>],
    device: &A::Device,
) {
    let mut g = c.benchmark_group(format!("{backend}/bapo_step"));
    g.sample_size(10).measurement_time(budget(30));
    for m in ms {
        let ex = examples(m.vocab);
        let refs = vec![
            ReferenceLogps {
                sum: [-150.0, -160.0, -155.0],
                mean: [-2.3, -2.5, -2.4],
            };
            ex.len()
        ];
        // The same 4 pairs as one batch, and (CPU backends) as two micro-batches of 2 pairs
        // computed at once on two threads (`train.micro_batch_threads`, the binary's CPU default).
        let mut variants = vec![("lora_r8_4pairs_seq128", PAIRS, 1, Some(1))];
        if cpu(backend) {
            variants.push(("lora_r8_2x2pairs_seq128_concurrent", PAIRS / 2, 2, Some(2)));
        }
        for (id, batch_size, grad_accum, micro_batch_threads) in variants {
            let cfg = TrainConfig {
                max_steps: 1,
                warmup_steps: 0,
                batch_size,
                grad_accum,
                micro_batch_threads,
                learning_rate: 1e-4,
                ..TrainConfig::default()
            };
            let policy: Llama<A> =
                LoraConfig::default().attach(Llama::<A>::from_inner(m.model.clone()), 0, device);
            g.throughput(Throughput::Elements((3 * PAIRS * SEQ) as u64));
            g.bench_function(BenchmarkId::new(m.name, id), |b| {
                b.iter_batched(
                    || policy.clone(),
                    |p| {
                        let p = train(p, &ex, &refs, &cfg, 0, device, None, |_, _, _| {})
                            .expect("step");
                        sync::<A>(device);
                        p
                    },
                    criterion::BatchSize::LargeInput,
                )
            });
        }
    }
    g.finish();
}

/// Greedy KV-cache decoding of 64 new tokens after a 32-token prompt, batch 1 and 8.
fn bench_generate<B: Backend>(
    c: &mut Criterion,
    backend: &str,
    ms: &[Model<B>],
    device: &B::Device,
) {
    let mut g = c.benchmark_group(format!("{backend}/generate"));
    g.sample_size(10).measurement_time(budget(20));
    let new = 64;
    for m in ms {
        for batch in [1usize, 8] {
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|i| ids(32, m.vocab, 100 + i as u64))
                .collect();
            let cfg = GenerationConfig {
                max_new_tokens: new,
                eos_ids: m.eos.clone(),
                ..GenerationConfig::default()
            };
            g.throughput(Throughput::Elements((batch * new) as u64));
            g.bench_function(
                BenchmarkId::new(m.name, format!("batch{batch}_new{new}")),
                |b| b.iter(|| generate(&m.model, &prompts, &cfg, device)),
            );
        }
    }
    g.finish();
}

/// The objective alone (DPO sigmoid + hinge anchor + metrics) on 4 pairs, and token KL over a
/// SmolLM2-sized vocabulary in chunks of 8192.
fn bench_objective_kl<B: Backend>(c: &mut Criterion, backend: &str, device: &B::Device) {
    let mut g = c.benchmark_group(format!("{backend}/objective"));
    let t = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), device);
    let pairs = PairLogps {
        policy_chosen: t(&[-10.0, -12.0, -9.0, -11.0]),
        policy_rejected: t(&[-11.0, -10.0, -13.0, -12.5]),
        reference_chosen: t(&[-10.5, -11.0, -9.5, -11.0]),
        reference_rejected: t(&[-10.0, -10.5, -12.0, -12.0]),
    };
    let anchor = AnchorLogps {
        policy: t(&[-20.0, -21.0, -19.0, -25.0]),
        reference: t(&[-19.0, -22.0, -19.5, -24.0]),
    };
    let cfg = ObjectiveConfig::default();
    g.throughput(Throughput::Elements(PAIRS as u64));
    g.bench_function("bapo_loss_4pairs", |b| {
        b.iter(|| {
            let out = bapo_loss(&cfg, &pairs, Some(&anchor), None);
            out.metrics(&cfg, &pairs, Some(&anchor))
        })
    });
    g.finish();

    let mut g = c.benchmark_group(format!("{backend}/token_kl"));
    g.sample_size(10);
    let (b_, s, v) = (4, 128, 49152);
    let p = Tensor::<B, 3>::random([b_, s, v], Distribution::Normal(0.0, 2.0), device);
    let q = Tensor::<B, 3>::random([b_, s, v], Distribution::Normal(0.0, 2.0), device);
    let mask = Tensor::<B, 2>::ones([b_, s], device);
    g.throughput(Throughput::Elements((b_ * s) as u64));
    g.bench_function(BenchmarkId::new("vocab49152", "chunk8192"), |bch| {
        bch.iter(|| bapo_drift::kl::token_kl(p.clone(), q.clone(), mask.clone(), 8192))
    });
    g.finish();
}

/// Data-parallel synchronisation of one step: every LoRA r 8 gradient (random values of the real
/// shapes) flattened, averaged over 2 local peers by burn-collective and cut back out
/// (`bapo_train::dist::all_reduce_grads`), timed on rank 0 over `iters` steps.
fn bench_all_reduce<A: AutodiffBackend>(
    c: &mut Criterion,
    backend: &str,
    ms: &[Model<A::InnerBackend>],
    device: &A::Device,
) {
    use burn::module::ParamId;
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    /// Random gradients for the trainable (LoRA, all 2-D) parameters.
    struct RandomGrads<A: AutodiffBackend>(Vec<(ParamId, Tensor<A::InnerBackend, 2>)>);
    impl<A: AutodiffBackend> ModuleVisitor<A> for RandomGrads<A> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            let t = param.val();
            if t.is_require_grad() {
                let [a, b] = t.dims()[..] else {
                    panic!("a trainable parameter that is not 2-D")
                };
                let g = Tensor::<A::InnerBackend, 2>::random(
                    [a, b],
                    Distribution::Normal(0.0, 1e-3),
                    &t.inner().device(),
                );
                self.0.push((param.id, g));
            }
        }
    }
    let mut g = c.benchmark_group(format!("{backend}/all_reduce"));
    g.sample_size(10).measurement_time(budget(10));
    for m in ms {
        let policy: Llama<A> =
            LoraConfig::default().attach(Llama::<A>::from_inner(m.model.clone()), 0, device);
        let mut v = RandomGrads::<A>(Vec::new());
        policy.visit(&mut v);
        let grads = v.0;
        let numel: usize = grads.iter().map(|(_, t)| t.shape().num_elements()).sum();
        let fresh = || {
            let mut g = GradientsParams::new();
            for (id, t) in &grads {
                g.register(*id, t.clone());
            }
            g
        };
        g.throughput(Throughput::Bytes((4 * numel) as u64));
        let devices = vec![device.clone(); 2];
        g.bench_function(BenchmarkId::new(m.name, "lora_r8_2peers"), |b| {
            b.iter_custom(|iters| {
                let times = bapo_train::dist::local::run_local_peers::<A::InnerBackend, _>(
                    &devices,
                    |peer, _| {
                        let t0 = std::time::Instant::now();
                        for _ in 0..iters {
                            let out = bapo_train::dist::all_reduce_grads(&policy, fresh(), peer)?;
                            assert_eq!(out.len(), grads.len());
                        }
                        sync::<A::InnerBackend>(&devices[0]);
                        Ok(t0.elapsed())
                    },
                )
                .expect("all-reduce");
                times[0]
            })
        });
    }
    g.finish();
}

/// The products of a Llama-3.2-1B layer and its tied head with the weights in f32 and in bf16
/// (`model.base_dtype`, `--weights`), as the model calls them: few-row products (decoding, the
/// split form) and 512-row ones (training and prefill). Random weights, no file needed.
fn bench_half_products<B: Backend>(c: &mut Criterion, backend: &str, device: &B::Device) {
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::FloatDType;
    let mut g = c.benchmark_group(format!("{backend}/half_products"));
    g.sample_size(10).measurement_time(budget(10));
    let shapes = [
        ("q_proj", 2048, 2048),
        ("k_proj", 2048, 512),
        ("up_proj", 2048, 8192),
        ("down_proj", 8192, 2048),
    ];
    for (name, d_in, d_out) in shapes {
        let f32_layer: Linear<B> = LinearConfig::new(d_in, d_out).with_bias(false).init(device);
        let mut bf16_layer = f32_layer.clone();
        bf16_layer.weight = bf16_layer.weight.map(|t| t.cast(FloatDType::BF16));
        for rows in [1, 512] {
            let x = Tensor::<B, 2>::random([rows, d_in], Distribution::Default, device);
            g.throughput(Throughput::Elements((d_in * d_out) as u64));
            for (dtype, layer) in [("f32", &f32_layer), ("bf16", &bf16_layer)] {
                let id = format!("llama3.2-1b_{name}_rows{rows}");
                g.bench_function(BenchmarkId::new(id, dtype), |b| {
                    b.iter(|| bapo_model::split::linear(layer, x.clone()).into_data())
                });
            }
        }
    }
    // The tied head `W·hᵀ` (W `[128256, 2048]`), decoding form.
    let w = Tensor::<B, 2>::random([128_256, 2048], Distribution::Default, device);
    let h = Tensor::<B, 2>::random([2048, 1], Distribution::Default, device);
    g.throughput(Throughput::Elements(128_256 * 2048));
    for (dtype, w) in [("f32", w.clone()), ("bf16", w.cast(FloatDType::BF16))] {
        g.bench_function(
            BenchmarkId::new("llama3.2-1b_tied_head_rows1", dtype),
            |b| b.iter(|| bapo_model::split::matmul_rows(w.clone(), h.clone()).into_data()),
        );
    }
    g.finish();
}

/// Products with weights kept in GGUF blocks (`model.base_dtype = "gguf"`) at Llama-3.2-1B's
/// projection shapes: Q4_K and Q6_K (llama.cpp's Q4_K_M mix) and Q8_0, random valid blocks
/// (random bytes, small finite f16 scales). Rows 1 and 4: dot products straight from the
/// blocks; 8: dequantised rows; 512: tiles and GEMM. Compare `half_products`' f32 rows.
fn bench_quant_products<B: Backend>(c: &mut Criterion, backend: &str, device: &B::Device) {
    use std::sync::Arc;
    let mut g = c.benchmark_group(format!("{backend}/quant_products"));
    g.sample_size(10).measurement_time(budget(10));
    // (ggml id, name, bytes per block, elements per block, offsets of its f16 scales)
    let types: [(u32, &str, usize, usize, &[usize]); 3] = [
        (12, "q4_k", 144, 256, &[0, 2]),
        (14, "q6_k", 210, 256, &[208]),
        (8, "q8_0", 34, 32, &[0]),
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let shapes = [
        ("q_proj", 2048, 2048),
        ("up_proj", 2048, 8192),
        ("down_proj", 8192, 2048),
    ];
    for (name, d_in, d_out) in shapes {
        for &(ty, tname, size, elems, scales) in &types {
            let mut data: Vec<u8> = (0..d_out * d_in / elems * size)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let scale = 0x1419u16.to_le_bytes(); // f16 1.0004e-3
            for block in data.chunks_exact_mut(size) {
                for &at in scales {
                    block[at..at + 2].copy_from_slice(&scale);
                }
            }
            let w = bapo_model::quant::QuantWeight::from_blocks(ty, [d_out, d_in], data)
                .expect("whole blocks");
            let w = Arc::new(w);
            for rows in [1, 4, 8, 512] {
                let x = Tensor::<B, 2>::random([rows, d_in], Distribution::Default, device);
                g.throughput(Throughput::Elements((d_in * d_out) as u64));
                let id = format!("llama3.2-1b_{name}_rows{rows}");
                g.bench_function(BenchmarkId::new(id, tname), |b| {
                    b.iter(|| bapo_model::quant::matmul(x.clone(), &w).into_data())
                });
            }
        }
    }
    g.finish();
}

/// CPU backends, where concurrent micro-batches pay (`bapo_train::concurrent`).
fn cpu(backend: &str) -> bool {
    matches!(backend, "flex" | "ndarray")
}

fn run<A: AutodiffBackend>(c: &mut Criterion, backend: &str, device: A::Device) {
    // As the binary does: few-row products split over the pool's threads on CPU backends.
    if cpu(backend) {
        bapo_model::split::set_split_threads(rayon::current_num_threads());
    }
    let ms = models::<A::InnerBackend>(&device);
    bench_forward(c, backend, &ms, &device);
    bench_step::<A>(c, backend, &ms, &device);
    bench_generate(c, backend, &ms, &device);
    bench_objective_kl::<A::InnerBackend>(c, backend, &device);
    bench_all_reduce::<A>(c, backend, &ms, &device);
    // burn-ndarray 0.21 has no half-precision tensors.
    if backend != "ndarray" {
        bench_half_products::<A::InnerBackend>(c, backend, &device);
    }
    if cpu(backend) {
        bench_quant_products::<A::InnerBackend>(c, backend, &device);
    }
}

fn benches(c: &mut Criterion) {
    let backend = std::env::var("BAPO_BENCH_BACKEND").unwrap_or_else(|_| "flex".into());
    match backend.as_str() {
        "flex" => run::<Autodiff<burn::backend::Flex>>(c, "flex", Default::default()),
        "ndarray" => run::<Autodiff<burn::backend::NdArray>>(c, "ndarray", Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<Autodiff<burn::backend::Wgpu>>(c, "wgpu", Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => run::<Autodiff<burn::backend::Cuda>>(c, "cuda", Default::default()),
        other => panic!(
            "BAPO_BENCH_BACKEND={other}: not compiled into this bench (features: wgpu, cuda; `cargo xtask bench --backend {other}` builds it)"
        ),
    }
}

criterion_group!(bapo, benches);
criterion_main!(bapo);
