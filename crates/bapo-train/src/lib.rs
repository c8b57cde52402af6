//! # bapo-train
//!
//! Composes `bapo-model`, `bapo-data` and `bapo-objective`. Today: the scoring pass behind
//! `bapo score` (completion log-probs of chosen / rejected / base responses under the chat
//! template), shared by the CLI and the parity tests.

pub mod score;

pub use score::{
    encode_pair, encoder, score_examples, EncodedCompletion, ScoreError, ScoreRow, Scorer,
};
