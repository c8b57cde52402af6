//! # bapo-serve
//!
//! `bapo serve`: one base model in memory, every user's LoRA adapter over it, behind an
//! OpenAI-compatible HTTP API (axum on tokio): `POST /v1/chat/completions` (streamed with
//! server-sent events when `stream: true`), `GET /v1/models`, `GET /health`. The request's
//! `model` (`bapo/<user>`, `bapo/base`) or `user` field picks the adapter. Generic over the
//! Burn backend like every library crate; the binary names it.

pub mod api;
pub mod engine;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
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
        template: bapo_train::chat_template(&tokenizer),
        tok: tokenizer,
        context: config.max_position_embeddings,
        opts: opts.clone(),
        jobs: Mutex::new(tx),
        counter: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .fallback(|| async {
            ApiError {
                status: axum::http::StatusCode::NOT_FOUND,
                message: "no such route (POST /v1/chat/completions, GET /v1/models, GET /health)"
                    .into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            }
        })
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
        .render(&req.messages, true)
        .map_err(|e| ApiError::invalid("messages", format!("chat template: {e}")))?;
    let ids = s.tok.encode(&text).map_err(|e| ApiError {
        status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        message: format!("tokenizing: {e}"),
        kind: "server_error",
        param: None,
        code: None,
    })?;
    let room = s.context.saturating_sub(ids.len());
    let max_tokens = req
        .max_tokens
        .unwrap_or_else(|| s.opts.default_max_tokens.min(room));
    if max_tokens == 0 || ids.len() + max_tokens > s.context {
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

async fn chat(State(s): State<Shared>, body: Bytes) -> Response {
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
                status: axum::http::StatusCode::NOT_FOUND,
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
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
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
        status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
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
