//! The OpenAI wire format: a chat-completion request read and checked field by field, the
//! error shape (`{"error": {"message", "type", "param", "code"}}`), and the response and
//! streaming-chunk documents.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// An error as OpenAI's API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param),
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Which model serves a request: the base, or one user's adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Base,
    User(String),
}

impl Target {
    /// The `model` id the API reports (`bapo/base`, `bapo/<user>`).
    pub fn id(&self) -> String {
        match self {
            Self::Base => "bapo/base".into(),
            Self::User(u) => format!("bapo/{u}"),
        }
    }
}

/// A checked `POST /v1/chat/completions` body.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub target: Target,
    pub messages: Vec<bapo_data::Message>,
    /// `None`: as many as the context leaves (up to the server's default).
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    /// Template arguments of this request (vLLM's `chat_template_kwargs`, e.g.
    /// `{"enable_thinking": false}`), on top of the server's.
    pub chat_template_kwargs: bapo_data::TemplateKwargs,
}

fn number(v: &Value, param: &'static str) -> Result<Option<f64>, ApiError> {
    match v.get(param) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(param, format!("`{param}` must be a number"))),
    }
}

/// Reads and checks a request body (already parsed as JSON).
pub fn parse_chat(v: &Value) -> Result<ChatRequest, ApiError> {
    if !v.is_object() {
        return Err(ApiError::invalid("body", "the body must be a JSON object"));
    }
    let user = match v.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid("user", "`user` must be a string")),
    };
    let target = match (v.get("model").and_then(Value::as_str), user) {
        (Some("bapo/base"), _) => Target::Base,
        (Some(m), _) if m.starts_with("bapo/") => Target::User(m["bapo/".len()..].to_string()),
        (_, Some(u)) => Target::User(u),
        (Some(m), None) => {
            return Err(ApiError::invalid(
                "model",
                format!("model `{m}`: expected `bapo/<user>` or `bapo/base` (or a `user` field)"),
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "model",
                "`model` is required: `bapo/<user>` or `bapo/base`",
            ))
        }
    };
    let msgs = v
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be a non-empty array"))?;
    let mut messages = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid("messages", format!("messages[{i}].role must be a string"))
        })?;
        if !["system", "user", "assistant", "developer"].contains(&role) {
            return Err(ApiError::invalid(
                "messages",
                format!("messages[{i}].role `{role}`: expected system, user or assistant"),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text parts, joined.
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!("messages[{i}].content: only text parts are supported"),
                            ))
                        }
                    }
                }
                text
            }
            _ => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("messages[{i}].content must be a string"),
                ))
            }
        };
        let role = if role == "developer" { "system" } else { role };
        messages.push(bapo_data::Message {
            role: role.into(),
            content,
        });
    }
    let max_tokens = match (
        number(v, "max_completion_tokens")?,
        number(v, "max_tokens")?,
    ) {
        (Some(x), _) | (None, Some(x)) => {
            if x < 1.0 || x.fract() != 0.0 {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("max_tokens must be a whole number >= 1, got {x}"),
                ));
            }
            Some(x as usize)
        }
        (None, None) => None,
    };
    let temperature = number(v, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be in [0, 2], got {temperature}"),
        ));
    }
    let top_p = number(v, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let seed = match v.get("seed") {
        None | Some(Value::Null) => None,
        Some(s) => Some(
            s.as_u64()
                .ok_or_else(|| ApiError::invalid("seed", "`seed` must be a whole number >= 0"))?,
        ),
    };
    if let Some(n) = number(v, "n")? {
        if n != 1.0 {
            return Err(ApiError::invalid("n", "only n = 1 is supported"));
        }
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "`stop` must be strings"))?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or an array of at most 4 strings",
            ))
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "a stop string must not be empty"));
    }
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be a boolean")),
    };
    let chat_template_kwargs = match v.get("chat_template_kwargs") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                "`chat_template_kwargs` must be an object",
            ))
        }
    };
    Ok(ChatRequest {
        target,
        messages,
        chat_template_kwargs,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        stop,
        stream,
    })
}

/// A whole (non-streamed) completion.
pub fn completion(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: &str,
    (prompt_tokens, completion_tokens): (usize, usize),
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    })
}

/// One streamed chunk: `delta` and, on the last, the finish reason.
pub fn chunk(id: &str, created: u64, model: &str, delta: Value, finish: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_field_by_field() {
        let ok = parse_chat(&json!({
            "model": "bapo/concise",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 8, "temperature": 0, "stop": "\n", "seed": 3,
            "chat_template_kwargs": {"enable_thinking": false},
        }))
        .unwrap();
        assert_eq!(ok.chat_template_kwargs["enable_thinking"], json!(false));
        assert_eq!(ok.target, Target::User("concise".into()));
        assert_eq!(ok.messages[0].content, "Hi");
        assert_eq!(
            (ok.max_tokens, ok.temperature, ok.seed),
            (Some(8), 0.0, Some(3))
        );
        assert_eq!(ok.stop, ["\n"]);
        let by_user = parse_chat(&json!({"model": "gpt-4o", "user": "child",
            "messages": [{"role": "user", "content": "x"}]}))
        .unwrap();
        assert_eq!(by_user.target, Target::User("child".into()));
        let base = parse_chat(&json!({"model": "bapo/base",
            "messages": [{"role": "user", "content": "x"}]}))
        .unwrap();
        assert_eq!((base.target, base.temperature), (Target::Base, 1.0));
        for (bad, param) in [
            (json!([]), "body"),
            (
                json!({"model": "bapo/a", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": true}),
                "chat_template_kwargs",
            ),
            (json!({"model": "bapo/a"}), "messages"),
            (
                json!({"model": "bapo/a", "messages": [{"role": "robot", "content": "x"}]}),
                "messages",
            ),
            (
                json!({"model": "bapo/a", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"model": "bapo/a", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
                "temperature",
            ),
            (
                json!({"model": "bapo/a", "messages": [{"role": "user", "content": "x"}], "top_p": 0}),
                "top_p",
            ),
            (
                json!({"model": "bapo/a", "messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                json!({"model": "bapo/a", "messages": [{"role": "user", "content": "x"}], "stop": [1]}),
                "stop",
            ),
            (
                json!({"model": "bapo/a", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
                "stream",
            ),
            (
                json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}),
                "model",
            ),
        ] {
            let e = parse_chat(&bad).unwrap_err();
            assert_eq!(
                (e.status, e.param),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{bad}"
            );
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
    }
}
