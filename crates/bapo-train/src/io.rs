//! The job's plumbing: files written whole (temp file, then rename), progress bars, and the
//! typed error every stage of a job returns.

use std::io::Write;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};

/// Any failure of a job (training, evaluation, the experiment), by where it came from. The
/// leaf crates' errors keep their file, line, field or tensor; the job's own checks say what
/// they checked ([`RunError::Invalid`]); a file this layer reads or writes is named.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A model or checkpoint file (its path, tensor or field in the message).
    #[error(transparent)]
    Model(#[from] bapo_model::ModelError),
    /// A data file (its path, line and field in the message).
    #[error(transparent)]
    Data(#[from] bapo_data::DataError),
    /// A knowledge set (its path, line and field in the message).
    #[error(transparent)]
    Knowledge(#[from] bapo_drift::mc::McError),
    /// A preference example that does not encode (too long, a template failure), by line.
    #[error(transparent)]
    Encode(#[from] bapo_data::preference::EncodeError),
    /// The training loop stopped on an error.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// A Burn record (optimiser state) that does not save or load.
    #[error("optimiser state: {0}")]
    Record(#[from] burn::record::RecorderError),
    /// A chat template that does not render.
    #[error(transparent)]
    Template(#[from] bapo_data::chat::TemplateError),
    /// A file this layer reads or writes.
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing outside a named file (`write_atomic` names its file in the message).
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Data-parallel training: a peer or the collective failed.
    #[error(transparent)]
    Sync(#[from] crate::dist::SyncError),
    /// A JSON document that does not parse or serialise.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A check of the job's inputs or state failed; the message says which and why.
    #[error("{0}")]
    Invalid(String),
    /// A failure in another library (a plot, a peer), with its message.
    #[error("{0}")]
    Other(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl RunError {
    /// `source` while reading or writing `path`.
    pub fn file(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Self::File {
            path: path.into(),
            source,
        }
    }
}

impl From<String> for RunError {
    fn from(what: String) -> Self {
        Self::Invalid(what)
    }
}

impl From<&str> for RunError {
    fn from(what: &str) -> Self {
        Self::Invalid(what.to_string())
    }
}

impl From<Box<dyn std::error::Error + Send + Sync>> for RunError {
    fn from(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        Self::Other(e)
    }
}

pub fn bar(len: usize, what: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {what} [{{elapsed}} < {{eta}}]"
    ))
    .expect("template");
    ProgressBar::new(len as u64).with_style(style)
}

/// Writes `bytes` to `path` through a temp file and a rename. The temp file's name is unique to
/// the call (process id and a counter), so threads writing the same path never share one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{seq}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaf crate's error keeps its kind and its message (file, line, field) through `?`.
    #[test]
    fn leaf_errors_keep_their_kind_and_message() {
        let path = Path::new("/nonexistent/bapo/model.gguf");
        let leaf = bapo_model::load_pretrained::<burn::backend::NdArray>(path, &Default::default())
            .err()
            .expect("no such file");
        let msg = leaf.to_string();
        let e = RunError::from(leaf);
        assert!(matches!(e, RunError::Model(_)), "{e:?}");
        assert_eq!(e.to_string(), msg);
        assert!(msg.contains("/nonexistent/bapo/model.gguf"), "{msg}");
        let bad = bapo_data::parse_preferences(Path::new("pairs.jsonl"), b"{\"prompt\": 1}\n")
            .unwrap_err();
        let e = RunError::from(bad);
        assert!(matches!(e, RunError::Data(_)), "{e:?}");
        assert!(e.to_string().starts_with("pairs.jsonl:1:"), "{e}");
        let e = RunError::from("train.max_steps must be at least 1".to_string());
        assert!(matches!(e, RunError::Invalid(_)));
        let e = RunError::file("run/metrics.jsonl", std::io::Error::other("disk full"));
        assert_eq!(e.to_string(), "run/metrics.jsonl: disk full");
    }
}
