//! The cross-crate tests, as one test binary: every backend's code (ndarray, flex, wgpu, their
//! autodiff wrappers) is compiled and linked once instead of once per file. Run one file's tests
//! with a filter: `cargo test --release -p bapo-tests --test suite -- smollm2::`.

#[path = "architectures.rs"]
mod architectures;
#[path = "fuzz_corpus.rs"]
mod fuzz_corpus;
#[path = "gguf_vocab.rs"]
mod gguf_vocab;
#[path = "gradients.rs"]
mod gradients;
#[path = "half_base.rs"]
mod half_base;
#[path = "kquants.rs"]
mod kquants;
#[path = "smollm2.rs"]
mod smollm2;
#[path = "tiny_llama.rs"]
mod tiny_llama;
#[path = "train_step.rs"]
mod train_step;
