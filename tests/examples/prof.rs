//! Quick timing of the pieces of one decoding step and one training-sized forward (SmolLM2).
use bapo_model::model::KvCache;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use std::time::Instant;
fn main() {
    type B = burn::backend::NdArray;
    let device = Default::default();
    let l = bapo_model::load_pretrained::<B>(&bapo_tests::smollm2_gguf(), &device).unwrap();
    let m = &l.model;
    let x = Tensor::<B, 2>::ones([1, 576], &device);
    let w = m.layers[0].mlp.gate_proj.linear.weight.val();
    for _ in 0..2 {
        let t = Instant::now();
        let y = x.clone().matmul(w.clone()).into_data();
        println!("[1,576]x[576,1536] {:?} {}", t.elapsed(), y.num_elements());
    }
    let mut cache = KvCache::default();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64; 30], [1, 30]), &device);
    let pos = Tensor::<B, 2, Int>::from_data(
        TensorData::new((0..30i64).collect::<Vec<_>>(), [1, 30]),
        &device,
    );
    let t = Instant::now();
    let y = m
        .forward_cached(
            ids,
            pos,
            bapo_model::model::causal_mask::<B>(1, 30, &device),
            &mut cache,
        )
        .into_data();
    println!("prefill 30 {:?} {}", t.elapsed(), y.num_elements());
    for i in 30..32 {
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64], [1, 1]), &device);
        let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![i as i64], [1, 1]), &device);
        let mask = Tensor::<B, 4, Bool>::from_data(
            TensorData::new(vec![false; i + 1], [1, 1, 1, i + 1]),
            &device,
        );
        let t = Instant::now();
        let y = m.forward_cached(ids, pos, mask, &mut cache).into_data();
        println!(
            "decode step (no head) {:?} {}",
            t.elapsed(),
            y.num_elements()
        );
    }
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64; 6 * 64], [6, 64]), &device);
    let t = Instant::now();
    let y = m.forward(ids, None).into_data();
    println!(
        "forward 6x64 with logits {:?} {}",
        t.elapsed(),
        y.num_elements()
    );
}
