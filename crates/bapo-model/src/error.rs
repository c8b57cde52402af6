//! Errors of the model crate. Every variant names the file (and, where it applies, the tensor,
//! byte offset or field) so a user can find what is wrong without a debugger.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

/// What can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is malformed: wrong magic, truncated, offsets out of range, bad JSON...
    #[error("{path}: {what}{}", offset.map(|o| format!(" (at byte offset {o})")).unwrap_or_default())]
    Format {
        path: PathBuf,
        offset: Option<u64>,
        what: String,
    },
    /// A configuration field is missing or has an unusable value.
    #[error("{path}: field `{field}`: {what}")]
    Config {
        path: PathBuf,
        field: String,
        what: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    /// The checkpoint holds tensors the architecture does not use.
    #[error("{path}: unexpected tensor(s) not used by the model: {names:?}")]
    UnexpectedTensors { path: PathBuf, names: Vec<String> },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A feature of the file that this crate does not implement (a quantisation type, say).
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: PathBuf, what: String },
    /// Tokenizer construction or encoding failed.
    #[error("tokenizer ({origin}): {what}")]
    Tokenizer { origin: String, what: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn format(
        path: impl Into<PathBuf>,
        offset: Option<u64>,
        what: impl Into<String>,
    ) -> Self {
        Self::Format {
            path: path.into(),
            offset,
            what: what.into(),
        }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, field: &str, what: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            field: field.to_string(),
            what: what.into(),
        }
    }
}
