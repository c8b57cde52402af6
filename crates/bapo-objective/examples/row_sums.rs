//! Why the per-row sum of token log-probs is `row_sums` and not `sum_dim`: counts, on flex, the
//! rows whose sum changes bits when zero padding is appended (as a batch pads every row to its
//! longest), for rows of 1..=70 tokens padded by 1..=70 zeros.
//! `cargo run --release -p bapo-objective --features flex --example row_sums`

use bapo_objective::row_sums;
use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};

fn main() {
    let d = Default::default();
    let value = |r: usize, j: usize| -(((r * 31 + j * 17) % 23) as f32 * 0.37 + 0.013 * j as f32);
    let (mut cases, mut sum_dim_differs, mut row_sums_differs) = (0, 0, 0);
    for len in 1..=70usize {
        let row: Vec<f32> = (0..len).map(|j| value(len, j)).collect();
        let one = || Tensor::<Flex, 2>::from_data(TensorData::new(row.clone(), [1, len]), &d);
        let a = one().sum_dim(1).into_data().to_vec::<f32>().unwrap()[0];
        let b = row_sums(one()).into_data().to_vec::<f32>().unwrap()[0];
        for pad in 1..=70usize {
            let mut padded = row.clone();
            padded.resize(len + pad, 0.0);
            let t = || {
                Tensor::<Flex, 2>::from_data(TensorData::new(padded.clone(), [1, len + pad]), &d)
            };
            let a2 = t().sum_dim(1).into_data().to_vec::<f32>().unwrap()[0];
            let b2 = row_sums(t()).into_data().to_vec::<f32>().unwrap()[0];
            cases += 1;
            sum_dim_differs += usize::from(a.to_bits() != a2.to_bits());
            row_sums_differs += usize::from(b.to_bits() != b2.to_bits());
        }
    }
    println!(
        "{cases} (length, padding) cases: sum_dim's bits change in {sum_dim_differs}, row_sums' in {row_sums_differs}"
    );
}
