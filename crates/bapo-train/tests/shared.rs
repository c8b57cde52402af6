//! Prompt sharing ([`bapo_train::shared_prompt`]): each prompt computed once for its
//! completions gives the plain right-padded batch's log-probs and gradients.

use bapo_data::{EncodedExample, PreferenceBatch};
use bapo_model::Llama;
use bapo_train::logps::batch_logps;
use bapo_train::shared_prompt::SharedRows;
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Tensor};

use crate::common::{serial, setup};

fn host<B: Backend>(t: burn::tensor::Tensor<B, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Summed and mean log-probs of `batch` with sharing on and off.
fn both<B: Backend>(model: &Llama<B>, batch: &PreferenceBatch) -> [(Vec<f32>, Vec<f32>); 2] {
    let device = Default::default();
    let run = |on| {
        let (s, m) = batch_logps(model, batch, on, &device);
        (host(s), host(m))
    };
    [run(true), run(false)]
}

fn batches(enc: &[EncodedExample], pad: u32) -> Vec<PreferenceBatch> {
    let all: Vec<&EncodedExample> = enc.iter().collect();
    // Every example alone, all four (prompts of different lengths), and two without base rows.
    let mut out: Vec<PreferenceBatch> = all
        .iter()
        .map(|e| PreferenceBatch::collate(&[e], pad))
        .collect();
    out.push(PreferenceBatch::collate(&all, pad));
    let no_base: Vec<EncodedExample> = enc[1..3]
        .iter()
        .map(|e| EncodedExample {
            base_ids: None,
            ..e.clone()
        })
        .collect();
    out.push(PreferenceBatch::collate(
        &no_base.iter().collect::<Vec<_>>(),
        pad,
    ));
    out
}

/// Within float rounding of the plain batch (measured: equal, or one ulp apart); and
/// bit for bit the same whether an example is scored alone or among others whose prompts are
/// longer or shorter (the property the anchor's kink needs: the reference pass and training
/// group examples differently).
fn check_values<B: Backend>(name: &str, model: &Llama<B>, enc: &[EncodedExample], pad: u32) {
    let all = batches(enc, pad);
    for (i, batch) in all.iter().enumerate() {
        assert!(
            SharedRows::from_batch(batch).is_some(),
            "{name}: batch {i} not shared"
        );
        let [(s1, m1), (s0, m0)] = both(model, batch);
        for (a, b) in s1.iter().zip(&s0).chain(m1.iter().zip(&m0)) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name}: batch {i}: {s1:?} {s0:?}"
            );
        }
    }
    // Batches 0..4 are the examples alone, batch 4 all four: rows e, 4 + e, 8 + e of it.
    let together = &both(model, &all[4])[0].0;
    for (e, alone) in all[..4].iter().enumerate() {
        let alone = &both(model, alone)[0].0;
        let rows = [together[e], together[4 + e], together[8 + e]];
        assert_eq!(
            alone, &rows,
            "{name}: example {e} alone vs in a batch of four"
        );
    }
}

/// On both CPU backends, for batches whose prompts differ in length.
#[test]
fn shared_prompts_give_the_plain_batchs_log_probs() {
    let _g = serial();
    let (model, enc, _, pad) = setup();
    let model = model.valid();
    check_values("ndarray", &model, &enc, pad);
    let flex: Llama<burn::backend::Flex> =
        bapo_model::load_pretrained(&crate::common::fixture(), &Default::default())
            .unwrap()
            .model;
    check_values("flex", &flex, &enc, pad);
}

/// Completion rows grouped by length (each group padded to its own longest row) give every
/// logit bit for bit as one group padded to the batch's longest: the caches made before the
/// grouping stay valid, and the anchor's kink stays exact.
#[test]
fn completion_groups_give_the_one_groups_logits_bit_for_bit() {
    let _g = serial();
    let (model, enc, _, pad) = setup();
    let model = model.valid();
    check_groups("ndarray", &model, &enc, pad);
    let flex: Llama<burn::backend::Flex> =
        bapo_model::load_pretrained(&crate::common::fixture(), &Default::default())
            .unwrap()
            .model;
    check_groups("flex", &flex, &enc, pad);
}

fn check_groups<B: Backend>(name: &str, model: &Llama<B>, enc: &[EncodedExample], pad: u32) {
    use bapo_train::shared_prompt::shared_rows_logits;
    let device = Default::default();
    let mut split = 0;
    // The fixture's answers are all short: add a batch whose rejected answers are stretched to
    // 40 tokens (their own tokens repeated), as a persona batch's long rejected answers are.
    let long: Vec<EncodedExample> = enc
        .iter()
        .map(|e| EncodedExample {
            rejected_ids: e.rejected_ids.iter().copied().cycle().take(40).collect(),
            ..e.clone()
        })
        .collect();
    let mut all = batches(enc, pad);
    all.push(PreferenceBatch::collate(
        &long.iter().collect::<Vec<_>>(),
        pad,
    ));
    for (i, batch) in all.iter().enumerate() {
        let grouped = SharedRows::from_batch_grouped(batch, true).unwrap();
        let one = SharedRows::from_batch_grouped(batch, false).unwrap();
        assert!(one.groups.len() <= 1);
        split += usize::from(grouped.groups.len() > 1);
        let logits = |rows| {
            let (l, plan) = shared_rows_logits(model, batch, rows, &device);
            (
                l.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                plan,
            )
        };
        let (a, pa) = logits(&grouped);
        let (b, pb) = logits(&one);
        assert_eq!(pa, pb);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: batch {i}: grouped logits differ from one group's"
        );
    }
    assert!(split > 0, "{name}: no batch had its rows in several groups");
}

/// The LoRA gradients of a loss on every row agree with the plain batch's (float-level: the
/// shared prompt's gradient is a sum over its completions in another order).
#[test]
fn shared_prompts_give_the_plain_batchs_gradients() {
    let _g = serial();
    let (model, enc, _, pad) = setup();
    // Make the adapters non-zero so that every LoRA factor has a gradient.
    let model = perturb(model);
    let all: Vec<&EncodedExample> = enc.iter().collect();
    let batch = PreferenceBatch::collate(&all, pad);
    let grads = |on| {
        let (sum, mean) = batch_logps(&model, &batch, on, &Default::default());
        let loss = sum.sum() + mean.sum().mul_scalar(3.0);
        let g = loss.backward();
        let mut v = Grads(&g, Vec::new());
        model.visit(&mut v);
        v.1
    };
    let (on, off) = (grads(true), grads(false));
    assert_eq!(on.len(), off.len());
    assert!(!on.is_empty());
    for ((name, a), (_, b)) in on.iter().zip(&off) {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            diff <= 1e-4 * scale,
            "{name}: max diff {diff} at scale {scale}"
        );
    }
}

/// Trainable parameters that are all zero (the adapters' B factors) get small random values.
pub(crate) fn perturb<A: AutodiffBackend>(model: Llama<A>) -> Llama<A> {
    struct Noise;
    impl<A: AutodiffBackend> ModuleMapper<A> for Noise {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<A, D>>) -> Param<Tensor<A, D>> {
            p.map(|t| {
                if t.is_require_grad() && t.clone().abs().max().into_scalar().elem::<f32>() == 0.0 {
                    let r = Tensor::<A, D>::random(
                        t.shape(),
                        Distribution::Normal(0.0, 0.05),
                        &t.device(),
                    );
                    r.detach().require_grad()
                } else {
                    t
                }
            })
        }
    }
    model.map(&mut Noise)
}

/// Host copies of every trainable parameter's gradient, in visiting order.
struct Grads<'a, A: AutodiffBackend>(&'a A::Gradients, Vec<(String, Vec<f32>)>);

impl<A: AutodiffBackend> ModuleVisitor<A> for Grads<'_, A> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<A, D>>) {
        if let Some(g) = p.val().grad(self.0) {
            let v = g.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            self.1
                .push((format!("{} {:?}", self.1.len(), p.shape()), v));
        }
    }
}

/// Rows share a prompt row exactly when their prompt tokens are equal; a row without prompt
/// tokens lends its first (unscored) token to its prompt.
#[test]
fn rows_share_prompt_rows_by_their_tokens() {
    let a: &[u32] = &[5, 6, 7];
    let b: &[u32] = &[5, 6, 8];
    let c: &[u32] = &[9, 9];
    let empty: &[u32] = &[];
    let batch = PreferenceBatch::from_sequences(&[(a, c), (b, c), (a, b)], 0, 1, false);
    let rows = SharedRows::from_batch(&batch).unwrap();
    assert_eq!(rows.layout.owners, vec![0, 1, 0]);
    // Prompt and completion rows padded to 8 positions (SUM_BLOCK).
    let pad = |v: &[i64]| [v, &[0; 8][..8 - v.len()]].concat();
    assert_eq!(rows.prompts, [pad(&[5, 6, 7]), pad(&[5, 6, 8])].concat());
    // One group (all padded to 8 positions), each completion without its last token.
    assert_eq!(rows.groups.len(), 1);
    assert_eq!(rows.groups[0].rows, vec![0, 1, 2]);
    assert_eq!(
        rows.groups[0].tokens,
        [pad(&[9]), pad(&[9]), pad(&[5, 6])].concat()
    );
    // First tokens from a prompt's last position (2 or 10); then the completion rows (from 16).
    assert_eq!(rows.predicting_rows(), vec![2, 16, 10, 24, 2, 32, 33]);
    let batch = PreferenceBatch::from_sequences(&[(empty, c), (empty, a)], 0, 1, false);
    let rows = SharedRows::from_batch(&batch).unwrap();
    assert_eq!(rows.prompts, [pad(&[9]), pad(&[5])].concat());
    assert_eq!(rows.layout.completion_lens, vec![1, 2]);
    // The one-token completion needs no continuation: only row 1 runs (from position 16).
    assert_eq!(rows.groups.len(), 1);
    assert_eq!(rows.groups[0].rows, vec![1]);
    assert_eq!(rows.predicting_rows(), vec![0, 8, 16]);
    // Not right-padded (a completion token after padding): the plain path.
    let mut odd = PreferenceBatch::from_sequences(&[(a, c)], 0, 1, false);
    odd.attention[3] = false;
    assert_eq!(SharedRows::from_batch(&odd), None);
}

/// The tiny fixture's pairs (prompts of 37, 38 and 39 tokens): each example's log-probs are the
/// same bit for bit alone and batched with the others, on ndarray and flex (before the
/// SUM_BLOCK padding and the key reordering, ndarray's moved by an ulp).
#[test]
fn each_example_scores_the_same_alone_and_batched() {
    let _g = serial();
    check_alone_vs_batched::<burn::backend::NdArray>("ndarray");
    check_alone_vs_batched::<burn::backend::Flex>("flex");
}

fn check_alone_vs_batched<B: Backend>(name: &str) {
    use bapo_data::*;
    let dir = crate::common::fixture();
    let loaded = bapo_model::load_pretrained::<B>(&dir, &Default::default()).unwrap();
    let tok = &loaded.tokenizer;
    let examples = read_preferences(&dir.join("pairs.jsonl")).unwrap();
    let eos = tok.eos_id().unwrap();
    let bases: Vec<BaseResponse> = std::fs::read_to_string(dir.join("pairs.jsonl"))
        .unwrap()
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let text = v["base"].as_str().unwrap();
            BaseResponse::from_text(&bapo_train::encoder(tok), text, eos, i + 1).unwrap()
        })
        .collect();
    let cfg = EncodeConfig {
        max_length: 64,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let template = bapo_train::chat_template(tok);
    let encoder = bapo_train::encoder(tok);
    let enc = encode_examples(&examples, Some(&bases), &template, &encoder, eos, &cfg)
        .unwrap()
        .0;
    let lens: Vec<usize> = enc.iter().map(|e| e.prompt_ids.len()).collect();
    assert_eq!(lens, vec![37, 38, 39]);
    let all: Vec<&EncodedExample> = enc.iter().collect();
    let score = |b: &[&EncodedExample]| {
        let batch = PreferenceBatch::collate(b, eos);
        assert!(SharedRows::from_batch(&batch).is_some());
        host(batch_logps(&loaded.model, &batch, true, &Default::default()).0)
    };
    let full = score(&all);
    let n = all.len();
    for i in 0..n {
        let one = score(&[all[i]]);
        let f = [full[i], full[n + i], full[2 * n + i]];
        assert_eq!(one, f, "{name}: example {i} alone vs batched");
    }
}
