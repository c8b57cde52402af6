//! # bapo-serve
//!
//! `bapo serve`: one base model in memory, every user's LoRA adapter over it, behind an
//! OpenAI-compatible HTTP API (axum on tokio): `POST /v1/chat/completions` (streamed with
//! server-sent events when `stream: true`), `GET /v1/models`, `GET /health`. The request's
//! `model` (`bapo/<user>`, `bapo/base`) or `user` field picks the adapter. Generic over the
//! Burn backend like every library crate; the binary names it.
//!
//! With [`ServeOptions::api_key`] set, every endpoint but `/health` requires
//! `Authorization: Bearer <key>` and answers 401 in OpenAI's error shape otherwise. Every
//! request the server cannot answer (malformed, out of range, too long, wrong method or route)
//! gets a 4xx JSON error in that shape; 5xx is kept for the server's own failures.

pub mod api;
pub mod engine;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bapo_data::ChatTemplate;
use bapo_model::{LoadedModel, Tokenizer};
use burn::tensor::backend::Backend;
use serde_json::json;

use api::{ApiError, ChatRequest, Target};
use engine::{Engine, Event, Job};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// Adapters: `<dir>/<user>/`, `<dir>/<user>/adapter/` or `<dir>/users/<user>/adapter/`.
    pub adapters: PathBuf,
    /// Adapters kept attached at once (least recently used dropped first).
    pub max_adapters: usize,
    /// `max_tokens` when a request gives none (cut to what the context leaves).
    pub default_max_tokens: usize,
    /// When set, the bearer token every endpoint but `/health` requires.
    pub api_key: Option<String>,
    /// Template arguments every request's prompt is rendered with (a request's
    /// `chat_template_kwargs` go on top).
    pub chat_template_kwargs: bapo_data::TemplateKwargs,
}

static SHUTDOWN: AtomicBool = AtomicBool::new(false);
static SERVING: AtomicBool = AtomicBool::new(false);

/// Asks a running server to stop accepting and finish its in-flight requests (a signal
/// handler may call it). Returns whether a server is running to honour it.
pub fn request_shutdown() -> bool {
    SHUTDOWN.store(true, Ordering::SeqCst);
    SERVING.load(Ordering::SeqCst)
}

struct AppState {
    tok: Tokenizer,
    template: ChatTemplate,
    context: usize,
    opts: ServeOptions,
    jobs: Mutex<mpsc::Sender<Job>>,
    counter: AtomicU64,
}

type Shared = Arc<AppState>;

/// Serves until [`request_shutdown`]; returns once in-flight requests are answered.
/// `on_listening` gets the bound address (port 0 picks a free one).
pub fn serve<B: Backend>(
    loaded: LoadedModel<B>,
    device: B::Device,
    opts: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    if !opts.adapters.is_dir() {
        anyhow::bail!("--adapters {}: not a directory", opts.adapters.display());
    }
    let LoadedModel {
        model,
        config,
        tokenizer,
    } = loaded;
    let mut eos_ids = config.eos_token_ids.clone();
    eos_ids.extend(tokenizer.eos_id());
    let (tx, rx) = mpsc::channel();
    let engine = Engine {
        base: model,
        tok: tokenizer.clone(),
        eos_ids,
        adapters: opts.adapters.clone(),
        max_adapters: opts.max_adapters,
        device,
    };
    let engine = std::thread::Builder::new()
        .name("bapo-engine".into())
        .spawn(move || engine.run(rx))?;
    let state = Arc::new(AppState {
        template: ChatTemplate::new(
            tokenizer.chat_template.clone(),
            tokenizer.bos_token.clone(),
            tokenizer.eos_token.clone(),
        )
        .with_fallback_bos(tokenizer.add_bos)
        .with_kwargs(opts.chat_template_kwargs.clone()),
        tok: tokenizer,
        context: config.max_position_embeddings,
        opts: opts.clone(),
        jobs: Mutex::new(tx),
        counter: AtomicU64::new(0),
    });
    if opts.api_key.is_none() && !opts.addr.ip().is_loopback() {
        tracing::warn!(
            addr = %opts.addr,
            "listening on a non-loopback address without an API key: anyone who can reach \
             this port can use the model (set --api-key or BAPO_API_KEY)"
        );
    }
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such route (POST /v1/chat/completions, GET /v1/models, GET /health)"
                    .into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            }
        })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: "method not allowed (POST /v1/chat/completions, GET /v1/models, \
                          GET /health)"
                    .into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("method_not_allowed"),
            }
        })
        // Everything above needs the key; `/health` (added after the layer) does not.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .with_state(state.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.addr).await?;
        let addr = listener.local_addr()?;
        SERVING.store(true, Ordering::SeqCst);
        on_listening(addr);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                while !SHUTDOWN.load(Ordering::SeqCst) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                tracing::info!("shutting down: finishing in-flight requests");
            })
            .await?;
        anyhow::Ok(())
    })?;
    SERVING.store(false, Ordering::SeqCst);
    drop(state); // the last job sender: the engine ends
    let _ = engine.join();
    Ok(())
}

/// Checks `Authorization: Bearer <key>` when the server has a key (401 otherwise, with
/// `WWW-Authenticate`); the comparison takes the same time wherever the keys differ.
async fn authorize(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let Some(key) = &s.opts.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let message = match given {
        Some(g) if same_key(g.as_bytes(), key.as_bytes()) => return next.run(req).await,
        Some(_) => "Incorrect API key provided.",
        None => "You didn't provide an API key: send it as `Authorization: Bearer <key>`.",
    };
    let mut res = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: message.into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
    }
    .into_response();
    res.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    res
}

/// Equality whose time depends only on the lengths.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn models(State(s): State<Shared>) -> Json<serde_json::Value> {
    let mut ids = vec![Target::Base.id()];
    ids.extend(
        engine::list_users(&s.opts.adapters)
            .into_iter()
            .map(|u| Target::User(u).id()),
    );
    let data: Vec<_> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "bapo"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The prompt's token ids, checked against the context; the completion's token budget.
fn prepare(s: &AppState, req: &ChatRequest) -> Result<(Vec<u32>, usize), ApiError> {
    let text = s
        .template
        .render_with(&req.messages, true, &req.chat_template_kwargs)
        .map_err(|e| ApiError::invalid("messages", format!("chat template: {e}")))?;
    let ids = s.tok.encode(&text).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("tokenizing: {e}"),
        kind: "server_error",
        param: None,
        code: None,
    })?;
    let room = s.context.saturating_sub(ids.len());
    let max_tokens = req
        .max_tokens
        .unwrap_or_else(|| s.opts.default_max_tokens.min(room));
    if max_tokens == 0 || max_tokens > room {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                "messages",
                format!(
                    "{} prompt tokens + {max_tokens} completion tokens exceed the model's context \
                     of {} tokens",
                    ids.len(),
                    s.context
                ),
            )
        });
    }
    Ok((ids, max_tokens))
}

async fn chat(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return ApiError {
                status: e.status(),
                message: format!("reading the request body: {}", e.body_text()),
                kind: "invalid_request_error",
                param: Some("body"),
                code: None,
            }
            .into_response()
        }
    };
    match chat_inner(s, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(s: Shared, body: Bytes) -> Result<Response, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("body", format!("the body is not valid JSON: {e}")))?;
    let req = api::parse_chat(&value)?;
    if let Target::User(u) = &req.target {
        if engine::adapter_dir(&s.opts.adapters, u).is_none() {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "model `bapo/{u}` does not exist: no adapter for user `{u}` under {}",
                    s.opts.adapters.display()
                ),
                kind: "invalid_request_error",
                param: Some("model"),
                code: Some("model_not_found"),
            });
        }
    }
    let (prompt, max_tokens) = prepare(&s, &req)?;
    let n = s.counter.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let prompt_tokens = prompt.len();
    let job = Job {
        target: req.target.clone(),
        prompt,
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed.unwrap_or(n),
        stop: req.stop.clone(),
        events: tx,
    };
    s.jobs
        .lock()
        .expect("job queue")
        .send(job)
        .map_err(|_| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: None,
        })?;
    let id = format!("chatcmpl-{n}");
    let (created, model) = (now(), req.target.id());
    if req.stream {
        let first = api::chunk(
            &id,
            created,
            &model,
            json!({"role": "assistant", "content": ""}),
            None,
        );
        let stream = async_stream(first, rx, id, created, model);
        return Ok(Sse::new(stream).into_response());
    }
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish,
                completion_tokens,
            } => {
                let doc = api::completion(
                    &id,
                    created,
                    &model,
                    &text,
                    finish,
                    (prompt_tokens, completion_tokens),
                );
                return Ok(Json(doc).into_response());
            }
            Event::Error(e) => return Err(server_error(e)),
        }
    }
    Err(server_error("the engine stopped".into()))
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        kind: "server_error",
        param: None,
        code: None,
    }
}

/// Server-sent events: the role chunk, a chunk per piece of text, the finishing chunk, then
/// `[DONE]`; an engine error becomes an `error` document.
fn async_stream(
    first: serde_json::Value,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
) -> impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    let start =
        futures_util::stream::once(async move { Ok(SseEvent::default().data(first.to_string())) });
    let rest = futures_util::stream::unfold(Some(rx), move |rx| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(Event::Text(t)) => {
                    let c = api::chunk(&id, created, &model, json!({"content": t}), None);
                    Some((vec![c.to_string()], Some(rx)))
                }
                Some(Event::Done { finish, .. }) => {
                    let c = api::chunk(&id, created, &model, json!({}), Some(finish));
                    Some((vec![c.to_string(), "[DONE]".into()], None))
                }
                Some(Event::Error(e)) => Some((vec![server_error(e).body().to_string()], None)),
                None => None,
            }
        }
    });
    use futures_util::StreamExt;
    start.chain(rest.flat_map(|datas| {
        futures_util::stream::iter(datas.into_iter().map(|d| Ok(SseEvent::default().data(d))))
    }))
}
