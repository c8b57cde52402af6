//! `bapo score`'s input: `{"prompt", "chosen", "rejected", "base"?}` lines in either of TRL's
//! shapes, every malformed line an error naming `file:line` and the field.

use std::path::Path;

use crate::jsonl::{kind, objects, objects_in, DataError, Object};

/// One line of a `bapo score` input: `{"prompt", "chosen", "rejected", "base"?}`, in either of
/// TRL's shapes (strings, or a message list for the prompt and one assistant message for each
/// completion), as the training data reader accepts them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreExample {
    /// Conversation up to the answer (a plain-string prompt is one user turn).
    pub prompt: Vec<crate::Message>,
    pub chosen: String,
    pub rejected: String,
    pub base: Option<String>,
    /// 1-based line number in the file.
    pub line: usize,
}

fn string_field(
    obj: &serde_json::Map<String, serde_json::Value>,
    field: &str,
    path: &Path,
    line: usize,
    required: bool,
) -> Result<Option<String>, DataError> {
    let err = |what: String| DataError::Line {
        path: path.into(),
        line,
        what,
    };
    match obj.get(field) {
        None | Some(serde_json::Value::Null) if !required => Ok(None),
        None => Err(err(format!("field `{field}` is missing"))),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(err(format!(
            "field `{field}` must be a string, found {}",
            kind(other)
        ))),
    }
}

/// Reads a scoring file. Blank lines are skipped; anything else must be a JSON object with
/// `prompt`, `chosen`, `rejected` and optional `base`, in TRL's standard or conversational shape.
pub fn read_score_file(path: &Path) -> Result<Vec<ScoreExample>, DataError> {
    score_examples(path, objects(path)?)
}

/// [`read_score_file`] over bytes already in memory; `path` only names them in errors.
pub fn parse_score_file(path: &Path, bytes: &[u8]) -> Result<Vec<ScoreExample>, DataError> {
    score_examples(path, objects_in(path, bytes)?)
}

fn score_examples(
    path: &Path,
    objects: Vec<(usize, Object)>,
) -> Result<Vec<ScoreExample>, DataError> {
    let mut out = Vec::new();
    for (line, obj) in objects {
        let err = |what: String| DataError::Line {
            path: path.into(),
            line,
            what,
        };
        // A string completion is scored as written (even empty); a message list must hold one
        // assistant message, as in training data.
        let get = |f: &str, req: bool| match obj.get(f) {
            Some(serde_json::Value::Array(_)) => {
                crate::preference::completion(&obj, f, &err).map(Some)
            }
            _ => string_field(&obj, f, path, line, req),
        };
        out.push(ScoreExample {
            prompt: crate::preference::prompt(&obj, &err)?,
            chosen: get("chosen", true)?.unwrap_or_default(),
            rejected: get("rejected", true)?.unwrap_or_default(),
            base: get("base", false)?,
            line,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bapo-data-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("in.jsonl");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn reads_valid_lines_and_skips_blank() {
        let p = write("ok", "{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}\n\n{\"prompt\":\"p2\",\"chosen\":\"c2\",\"rejected\":\"r2\",\"base\":\"b\"}\n");
        let ex = read_score_file(&p).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[1].base.as_deref(), Some("b"));
        assert_eq!(ex[1].line, 3);
    }

    #[test]
    fn errors_name_line_and_field() {
        let p = write("bad", "{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}\n{\"prompt\":\"p\",\"chosen\":3,\"rejected\":\"r\"}\n");
        let e = read_score_file(&p).unwrap_err().to_string();
        assert!(
            e.contains(":2:") && e.contains("`chosen`") && e.contains("a number"),
            "{e}"
        );
        let p = write("json", "{\"prompt\":\n");
        let e = read_score_file(&p).unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("invalid JSON"), "{e}");
        let p = write("missing", "{\"prompt\":\"p\",\"chosen\":\"c\"}\n");
        let e = read_score_file(&p).unwrap_err().to_string();
        assert!(
            e.contains(":1:") && e.contains("`rejected` is missing"),
            "{e}"
        );
    }

    #[test]
    fn non_utf8_line_is_named_and_crlf_is_accepted() {
        let ok = b"{\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}\r\n";
        let mut bytes = ok.to_vec();
        bytes.extend_from_slice(b"{\"prompt\":\"caf\xe9\",\"chosen\":\"c\",\"rejected\":\"r\"}\n");
        let e = parse_score_file(Path::new("latin1.jsonl"), &bytes)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("latin1.jsonl:2:")
                && e.contains("not valid UTF-8")
                && e.contains("column 15"),
            "{e}"
        );
        let ex = parse_score_file(Path::new("crlf.jsonl"), &ok.repeat(2)).unwrap();
        assert_eq!((ex.len(), ex[1].line, ex[1].rejected.as_str()), (2, 2, "r"));
    }
}
