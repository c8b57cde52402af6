//! Tiny random Llama (bf16 safetensors, untied head, GQA 4/2) against HF transformers.

use bapo_tests::parity::{check_model, Tolerance};
use bapo_tests::{fixture, golden};

const TOL: Tolerance = Tolerance {
    token: 1e-3,
    sum: 1e-3 * 4.0,
};

#[test]
fn tiny_llama_matches_transformers_on_ndarray() {
    let device = Default::default();
    let loaded =
        bapo_model::load_pretrained::<burn::backend::NdArray>(&fixture("tiny-llama"), &device)
            .unwrap();
    let worst = check_model(&loaded, &golden("tiny-llama"), TOL, &device);
    eprintln!("tiny-llama ndarray: worst token |Δ log p| = {worst:.2e}");
}

#[test]
fn tiny_llama_matches_transformers_on_flex() {
    let device = Default::default();
    let loaded =
        bapo_model::load_pretrained::<burn::backend::Flex>(&fixture("tiny-llama"), &device)
            .unwrap();
    let worst = check_model(&loaded, &golden("tiny-llama"), TOL, &device);
    eprintln!("tiny-llama flex: worst token |Δ log p| = {worst:.2e}");
}

#[cfg(feature = "wgpu")]
#[test]
fn tiny_llama_matches_transformers_on_wgpu() {
    let device = burn::backend::wgpu::WgpuDevice::default();
    let loaded =
        bapo_model::load_pretrained::<burn::backend::Wgpu>(&fixture("tiny-llama"), &device)
            .unwrap();
    let worst = check_model(&loaded, &golden("tiny-llama"), TOL, &device);
    eprintln!("tiny-llama wgpu: worst token |Δ log p| = {worst:.2e}");
}

#[cfg(feature = "cuda")]
#[test]
fn tiny_llama_matches_transformers_on_cuda() {
    let device = burn::backend::cuda::CudaDevice::default();
    let loaded =
        bapo_model::load_pretrained::<burn::backend::Cuda>(&fixture("tiny-llama"), &device)
            .unwrap();
    let worst = check_model(&loaded, &golden("tiny-llama"), TOL, &device);
    eprintln!("tiny-llama cuda: worst token |Δ log p| = {worst:.2e}");
}
