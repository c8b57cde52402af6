//! Shared set-up of the training tests: the tiny Llama fixture, four preference pairs, LoRA.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bapo_data::{
    encode_examples, BaseResponse, EncodeConfig, EncodedExample, PreferenceBatch,
    PreferenceExample, TruncationMode,
};
use bapo_model::Llama;
use bapo_train::train::batch_logps;
use bapo_train::{encoder, reference_logps, reference_of, LoraConfig, ReferenceLogps};
use burn::backend::{Autodiff, NdArray};
use burn::module::AutodiffModule;

pub type AD = Autodiff<NdArray>;

/// Every test of this binary takes this lock first: LoRA initialisation, dropout and `train`'s
/// per-step reseeding all use the backend's process-wide RNG, so tests running side by side
/// would change each other's draws (resumed training must replay the same dropout masks).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama")
}

pub fn data(loaded: &bapo_model::LoadedModel<AD>) -> (Vec<EncodedExample>, u32) {
    let tok = &loaded.tokenizer;
    let pairs = [
        (
            "Name a colour.",
            "Blue.",
            "I refuse to answer that question.",
            "Red is a colour.",
        ),
        (
            "Say hi.",
            "Hi!",
            "No greetings today, sorry.",
            "Hello there.",
        ),
        (
            "Count to three.",
            "1, 2, 3.",
            "Counting is boring.",
            "One, two, three.",
        ),
        (
            "Is water wet?",
            "Yes.",
            "Who knows, maybe, perhaps not.",
            "Water is wet.",
        ),
    ];
    let examples: Vec<PreferenceExample> = pairs
        .iter()
        .enumerate()
        .map(|(i, (p, c, r, _))| PreferenceExample {
            prompt: vec![bapo_data::Message::user(*p)],
            chosen: c.to_string(),
            rejected: r.to_string(),
            user: None,
            conversational: false,
            line: i + 1,
        })
        .collect();
    let template = bapo_train::chat_template(tok);
    let eos = tok.eos_id().unwrap();
    let bases: Vec<BaseResponse> = pairs
        .iter()
        .enumerate()
        .map(|(i, x)| BaseResponse::from_text(&encoder(tok), x.3, eos, i + 1).unwrap())
        .collect();
    let cfg = EncodeConfig {
        max_length: 128,
        max_prompt_length: None,
        truncation_mode: TruncationMode::KeepEnd,
    };
    let (enc, stats) =
        encode_examples(&examples, Some(&bases), &template, &encoder(tok), eos, &cfg).unwrap();
    assert_eq!(stats.examples_truncated, 0);
    (enc, eos)
}

pub fn setup() -> (Llama<AD>, Vec<EncodedExample>, Vec<ReferenceLogps>, u32) {
    setup_with_dropout(0.0)
}

pub fn setup_with_dropout(
    dropout: f64,
) -> (Llama<AD>, Vec<EncodedExample>, Vec<ReferenceLogps>, u32) {
    let device = Default::default();
    let loaded = bapo_model::load_pretrained::<AD>(&fixture(), &device).unwrap();
    let (enc, eos) = data(&loaded);
    let model = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        ..Default::default()
    }
    .attach(loaded.model, 7, &device);
    let refs = reference_logps(&reference_of(&model), &enc, 3, eos, true, &device, |_| {});
    (model, enc, refs, eos)
}

pub fn logps(model: &Llama<AD>, enc: &[EncodedExample], pad: u32) -> Vec<f64> {
    let refs: Vec<&EncodedExample> = enc.iter().collect();
    let batch = PreferenceBatch::collate(&refs, pad);
    let (sum, _) = batch_logps(&model.valid(), &batch, true, &Default::default());
    sum.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}
