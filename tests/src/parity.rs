//! Parity against HF transformers, generic over the backend so each backend test is one line.

use bapo_model::{generate, GenerationConfig, LoadedModel};
use bapo_train::{encode_pair, Scorer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::Golden;

/// Tolerances for one model.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Max |Δ| per completion token log-prob.
    pub token: f64,
    /// Max |Δ| of a completion's summed log-prob.
    pub sum: f64,
}

/// Checks tokenisation, completion log-probs (batched: all 9 sequences in one padded forward),
/// last-position top-10 and greedy decoding against `golden`. Returns the worst token error.
pub fn check_model<B: Backend>(
    loaded: &LoadedModel<B>,
    golden: &Golden,
    tol: Tolerance,
    device: &B::Device,
) -> f64 {
    let tok = &loaded.tokenizer;
    let template = bapo_train::chat_template(tok);
    let mut seqs = Vec::new();
    let mut expected = Vec::new();
    for p in &golden.sequences {
        for c in [&p.chosen, &p.rejected, &p.base] {
            let prompt = [bapo_data::Message::user(p.prompt.clone())];
            let enc = encode_pair(tok, &template, &prompt, &c.text, 0).expect("encode");
            assert_eq!(enc.prompt_ids, c.prompt_ids, "prompt ids of {:?}", p.prompt);
            assert_eq!(
                enc.completion_ids, c.completion_ids,
                "completion ids of {:?}",
                c.text
            );
            seqs.push(enc);
            expected.push(c);
        }
    }
    let pad_id = tok.eos_id().expect("eos");
    let scorer = Scorer {
        model: &loaded.model,
        device: device.clone(),
        pad_id,
        context: loaded.config.max_position_embeddings,
    };
    let mut worst: f64 = 0.0;
    for ((sum, toks), exp) in scorer.score(&seqs).into_iter().zip(&expected) {
        assert!(
            (sum - exp.sum_logp).abs() <= tol.sum,
            "sum_logp of {:?}: bapo {sum}, transformers {}",
            exp.text,
            exp.sum_logp
        );
        for (i, (a, b)) in toks.iter().zip(&exp.token_logps).enumerate() {
            let d = (*a as f64 - b).abs();
            worst = worst.max(d);
            assert!(
                d <= tol.token,
                "token {i} of {:?}: bapo {a}, transformers {b}",
                exp.text
            );
        }
    }

    // Last position of the first prompt: the same top-10 ids, log-probs within tolerance.
    let prompt = &golden.sequences[0].chosen.prompt_ids;
    let n = prompt.len();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]),
        device,
    );
    let logits = loaded
        .model
        .forward(ids, None)
        .narrow(1, n - 1, 1)
        .reshape([1, loaded.config.vocab_size]);
    let logp = burn::tensor::activation::log_softmax(logits, 1)
        .into_data()
        .to_vec::<f32>()
        .expect("f32");
    let mut order: Vec<usize> = (0..logp.len()).collect();
    order.sort_by(|&a, &b| logp[b].total_cmp(&logp[a]));
    let top: Vec<u32> = order[..10].iter().map(|&i| i as u32).collect();
    assert_eq!(
        top, golden.last_position_top10.ids,
        "top-10 ids at the last prompt position"
    );
    for (id, lp) in golden
        .last_position_top10
        .ids
        .iter()
        .zip(&golden.last_position_top10.logps)
    {
        assert!(
            (logp[*id as usize] as f64 - lp).abs() <= tol.token,
            "top-10 log-prob of id {id}"
        );
    }

    // Greedy decoding of all prompts in one left-padded batch (different lengths), stop on EOS.
    let prompts: Vec<Vec<u32>> = golden
        .sequences
        .iter()
        .map(|p| p.chosen.prompt_ids.clone())
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        eos_ids: vec![pad_id],
        ..Default::default()
    };
    let out = {
        let _split = crate::SPLIT_SETTING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        generate(&loaded.model, &prompts, &cfg, device)
    };
    for (g, exp) in out.iter().zip(&golden.greedy_24) {
        assert_eq!(g.tokens, exp.ids, "greedy ids of {:?}", exp.prompt);
    }
    worst
}

/// The largest |Δ log p| of a completion token between `loaded` and `golden` (no assertion):
/// for checking that a fixture notices a missing feature.
pub fn worst_token_error<B: Backend>(
    loaded: &LoadedModel<B>,
    golden: &Golden,
    device: &B::Device,
) -> f64 {
    let tok = &loaded.tokenizer;
    let template = bapo_train::chat_template(tok);
    let (mut seqs, mut expected) = (Vec::new(), Vec::new());
    for p in &golden.sequences {
        for c in [&p.chosen, &p.rejected, &p.base] {
            let prompt = [bapo_data::Message::user(p.prompt.clone())];
            seqs.push(encode_pair(tok, &template, &prompt, &c.text, 0).expect("encode"));
            expected.push(c);
        }
    }
    let scorer = Scorer {
        model: &loaded.model,
        device: device.clone(),
        pad_id: tok.eos_id().expect("eos"),
        context: loaded.config.max_position_embeddings,
    };
    let mut worst: f64 = 0.0;
    for ((_, toks), exp) in scorer.score(&seqs).into_iter().zip(&expected) {
        for (a, b) in toks.iter().zip(&exp.token_logps) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    worst
}
