//! Token KL against hand-computed values, chunking invariance, and the figure files.

use bapo_drift::plot::{write_figure, Panel, Series};
use bapo_drift::token_kl;
use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};

type B = NdArray<f64>;

fn t3(v: Vec<f64>, shape: [usize; 3]) -> Tensor<B, 3> {
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

/// KL(p‖q) computed directly from two distributions.
fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum()
}

#[test]
fn kl_of_known_distributions_any_chunk_size() {
    // Position 0: p = (0.5, 0.25, 0.25), q = uniform; position 1: p = q (KL 0); position 2 masked.
    let p0 = [0.5f64, 0.25, 0.25];
    let q0 = [1.0f64 / 3.0; 3];
    let logits_p: Vec<f64> = p0
        .iter()
        .map(|x| x.ln() + 2.0) // shift: softmax-invariant
        .chain([0.1, 0.2, 0.3])
        .chain([5.0, -5.0, 0.0])
        .collect();
    let logits_q: Vec<f64> = q0
        .iter()
        .map(|x| x.ln() - 1.0)
        .chain([1.1, 1.2, 1.3])
        .chain([0.0, 0.0, 0.0])
        .collect();
    let want0 = kl(&p0, &q0); // = 0.5 ln 1.5 + 0.5 ln 0.75 = 0.0589
    for chunk in [1, 2, 3, 64] {
        let mask = Tensor::<B, 2>::from_data(
            TensorData::new(vec![1.0f64, 1.0, 0.0], [1, 3]),
            &Default::default(),
        );
        let s = token_kl(
            t3(logits_p.clone(), [1, 3, 3]),
            t3(logits_q.clone(), [1, 3, 3]),
            mask,
            chunk,
        );
        assert_eq!(s.tokens, 2);
        assert!(
            (s.mean_per_token - want0 / 2.0).abs() < 1e-12,
            "chunk {chunk}: {}",
            s.mean_per_token
        );
        assert!((s.per_sequence[0] - want0 / 2.0).abs() < 1e-12);
    }
    assert!((want0 - 0.058_891_517).abs() < 1e-8);
}

#[test]
fn figure_files_are_written() {
    let dir = std::env::temp_dir().join(format!("bapo-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let panel = |t: &str| Panel {
        title: t.into(),
        x_label: "step".into(),
        y_label: "value".into(),
        series: vec![
            Series {
                name: "a".into(),
                points: vec![(0.0, 1.0), (6.0, 0.5), (12.0, 0.25)],
                y_err: vec![(0.8, 1.2), (0.4, 0.6), (0.1, 0.4)],
            },
            Series::new("b", vec![(0.0, 0.2), (12.0, 0.9)]),
        ],
        y_range: None,
    };
    write_figure(
        &dir.join("fig"),
        "test figure",
        &[panel("one"), panel("two"), panel("three")],
    )
    .unwrap();
    let svg = std::fs::read_to_string(dir.join("fig.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("test figure") && svg.contains("step"));
    let png = std::fs::read(dir.join("fig.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(png.len() > 10_000, "png only {} bytes", png.len());
    std::fs::remove_dir_all(&dir).unwrap();
}
