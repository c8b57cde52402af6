//! # bapo-data
//!
//! Preference data and prompt formatting: chat templates rendered with a real Jinja engine, and
//! JSONL readers whose every error names the file, line and field.

pub mod chat;
pub mod jsonl;
pub mod preference;
pub mod score_file;
pub mod synth;

pub use chat::{ChatTemplate, Message, PairTexts, TemplateKwargs};
pub use jsonl::DataError;
pub use preference::{
    encode_examples, parse_preferences, read_preferences, BaseResponse, EncodeConfig,
    EncodedExample, PreferenceBatch, PreferenceExample, TruncationMode, TruncationStats,
};
pub use score_file::{parse_score_file, read_score_file, ScoreExample};
