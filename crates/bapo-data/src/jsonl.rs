//! JSONL reading shared by the data files: lines to JSON objects, and the error that names
//! `file:line` and the field. Readers of particular files build on it (`preference`, `score_file`).

use std::path::{Path, PathBuf};

/// A data error with its location.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Line {
        path: PathBuf,
        line: usize,
        what: String,
    },
}

/// A JSON value's kind, for error messages (`a number`, `an array`...).
pub(crate) fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A JSON object as read from one line.
pub(crate) type Object = serde_json::Map<String, serde_json::Value>;

/// Every non-blank line of a JSONL file as a JSON object, with its 1-based line number; the
/// first line that is not UTF-8, not valid JSON or not an object is an error naming `file:line`.
pub(crate) fn objects(path: &Path) -> Result<Vec<(usize, Object)>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    objects_in(path, &bytes)
}

/// [`objects`] over bytes already in memory; `path` only names them in errors.
pub(crate) fn objects_in(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, Object)>, DataError> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let err = |what: String| DataError::Line {
            path: path.into(),
            line,
            what,
        };
        let raw = std::str::from_utf8(raw).map_err(|e| {
            err(format!(
                "not valid UTF-8 (bad byte at column {})",
                e.valid_up_to() + 1
            ))
        })?;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(raw)
            .map_err(|e| err(format!("invalid JSON at column {}: {e}", e.column())))?;
        let serde_json::Value::Object(obj) = value else {
            return Err(err(format!(
                "expected a JSON object, found {}",
                kind(&value)
            )));
        };
        out.push((line, obj));
    }
    Ok(out)
}
