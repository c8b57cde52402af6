//! Weight distance ‖θ − θ₀‖ (Frobenius), global and per decoder layer.
//!
//! Input is a map from parameter (or module) name to the Frobenius norm of its change, e.g.
//! `‖W − W₀‖` per tensor for full fine-tuning, or `‖scale·A·B‖` per adapted module for LoRA.
//! Names containing `layers.N.` are grouped into layer `N`; everything else under `other`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Global and per-layer weight distance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightDistance {
    pub global: f64,
    /// Layer index (as a string, `other` for non-layer tensors) → norm of that layer's change.
    pub per_layer: BTreeMap<String, f64>,
}

/// `‖a − b‖` for two equally long slices.
pub fn diff_norm(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "tensors differ in size");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x as f64) - (*y as f64);
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

fn layer_of(name: &str) -> String {
    name.split("layers.")
        .nth(1)
        .and_then(|rest| rest.split('.').next())
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| "other".into())
}

/// Combines per-tensor change norms (disjoint tensors: squares add).
pub fn weight_distance(norms: &BTreeMap<String, f64>) -> WeightDistance {
    let mut sq: BTreeMap<String, f64> = BTreeMap::new();
    for (name, n) in norms {
        *sq.entry(layer_of(name)).or_default() += n * n;
    }
    WeightDistance {
        global: sq.values().sum::<f64>().sqrt(),
        per_layer: sq.into_iter().map(|(k, v)| (k, v.sqrt())).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_layer_and_adds_squares() {
        let norms = BTreeMap::from([
            ("model.layers.0.self_attn.q_proj".to_string(), 3.0),
            ("model.layers.0.mlp.up_proj".to_string(), 4.0),
            ("model.layers.12.mlp.up_proj".to_string(), 12.0),
            ("model.embed_tokens.weight".to_string(), 0.0),
        ]);
        let w = weight_distance(&norms);
        assert_eq!(w.per_layer["0"], 5.0);
        assert_eq!(w.per_layer["12"], 12.0);
        assert_eq!(w.per_layer["other"], 0.0);
        assert_eq!(w.global, 13.0);
        assert_eq!(diff_norm(&[1.0, 2.0], &[4.0, 6.0]), 5.0);
    }
}
