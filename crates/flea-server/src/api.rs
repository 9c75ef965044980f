//! The HTTP side: an axum router speaking the OpenAI API, on its own tokio runtime thread,
//! in front of the engine loop that runs on the caller's thread.

use crate::engine::{EngineHandle, Event, GenRequest, Metrics, Prompt};
use crate::template::Message;
use crate::{Engine, ServerError};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use flea_model::SamplerConfig;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// HTTP settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    /// When set, `/v1/*` needs `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The name clients pass as `model` (and `/v1/models` lists).
    pub model_id: String,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

#[derive(Clone)]
struct AppState {
    engine: EngineHandle,
    opts: Arc<ServeOptions>,
    created: u64,
    next_id: Arc<AtomicU64>,
}

/// Bind, serve HTTP from a background thread and run the engine on this one until a
/// SIGINT/SIGTERM (or `handle.shutdown()`) has stopped both. `on_bound` gets the bound
/// address (port 0 picks a free one).
pub fn serve(
    engine: Engine<'_>,
    handle: EngineHandle,
    opts: ServeOptions,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let addr = format!("{}:{}", opts.host, opts.port);
    let listener = std::net::TcpListener::bind(&addr).map_err(|source| ServerError::Bind {
        addr: addr.clone(),
        source,
    })?;
    listener.set_nonblocking(true)?;
    on_bound(listener.local_addr()?);
    let state = AppState {
        engine: handle.clone(),
        opts: Arc::new(opts),
        created: unix_now(),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let http = std::thread::Builder::new().name("flea-http".into()).spawn(
        move || -> Result<(), ServerError> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let stopper = state.engine.clone();
            let result = rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, router(state))
                    .with_graceful_shutdown(shutdown_signal(stopper))
                    .await
            });
            // Whatever ended the HTTP side ends the engine too.
            handle.shutdown();
            drop(handle);
            result.map_err(ServerError::from)
        },
    )?;
    engine.run();
    http.join()
        .map_err(|_| ServerError::Engine("the HTTP thread panicked".into()))?
}

/// SIGINT, SIGTERM or an engine shutdown requested elsewhere.
async fn shutdown_signal(engine: EngineHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let poll = async {
        while !engine.is_shutting_down() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        _ = async { match int.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
        _ = poll => {}
    }
    engine.shutdown();
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            api_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                None,
                "no such route",
            )
        })
        .with_state(state)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An OpenAI-style error: status and `{"error": {message, type, param, code}}`.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind,
                                    "param": null, "code": self.code}});
        (self.status, axum::Json(body)).into_response()
    }
}

fn api_error(
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: &str,
) -> ApiError {
    ApiError {
        status,
        kind,
        code,
        message: message.to_string(),
    }
}

fn engine_error(e: &ServerError) -> ApiError {
    let msg = e.to_string();
    match e {
        ServerError::QueueFull | ServerError::ShuttingDown => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("overloaded"),
            &msg,
        ),
        ServerError::ContextOverflow { .. } => api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("context_length_exceeded"),
            &msg,
        ),
        ServerError::InvalidRequest(_) => {
            api_error(StatusCode::BAD_REQUEST, "invalid_request_error", None, &msg)
        }
        _ => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            &msg,
        ),
    }
}

fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.opts.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        Ok(())
    } else {
        Err(api_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "missing or wrong API key (Authorization: Bearer ...)",
        ))
    }
}

/// Comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body, parsed as `T`, within the size limit.
async fn read_json<T: serde::de::DeserializeOwned>(
    st: &AppState,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, st.opts.max_body_bytes)
        .await
        .map_err(|_| {
            api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                None,
                &format!(
                    "request body larger than {} bytes (or unreadable)",
                    st.opts.max_body_bytes
                ),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            &format!("invalid JSON body: {e}"),
        )
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Parameters both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Extensions beside OpenAI's parameters (as llama.cpp's and vLLM's servers take them).
    top_k: Option<u64>,
    min_p: Option<f32>,
    seed: Option<u64>,
    n: Option<u64>,
    stop: Option<StringOrList>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: StringOrList,
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

fn bad_request(msg: &str) -> ApiError {
    api_error(StatusCode::BAD_REQUEST, "invalid_request_error", None, msg)
}

/// Validate the shared parameters into a request (prompt filled in by the caller).
fn gen_request(st: &AppState, c: &Common, prompt: Prompt) -> Result<GenRequest, ApiError> {
    if c.model != st.opts.model_id {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            &format!(
                "the model '{}' does not exist (this server has '{}')",
                c.model, st.opts.model_id
            ),
        ));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(bad_request("only n=1 is supported"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad_request("temperature must be between 0 and 2"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request("top_p must be in (0, 1]"));
    }
    // 0 (the default): the whole vocabulary, sampled on the host; 1 to 64 can be sampled on
    // a GPU while the request runs alone.
    let top_k = usize::try_from(c.top_k.unwrap_or(0))
        .map_err(|_| bad_request("top_k must be at most the vocabulary"))?;
    let min_p = c.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(bad_request("min_p must be in [0, 1]"));
    }
    let max_tokens = c.max_completion_tokens.or(c.max_tokens);
    if max_tokens == Some(0) {
        return Err(bad_request("max_tokens must be at least 1"));
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StringOrList::One(s)) => vec![s.clone()],
        Some(StringOrList::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(bad_request(
            "stop: at most 4 non-empty strings of up to 256 bytes",
        ));
    }
    let seed = c.seed.unwrap_or_else(|| {
        // Unseeded requests differ from each other.
        let n = st.next_id.fetch_add(1, Ordering::Relaxed);
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(n, |d| d.as_nanos() as u64 ^ n.rotate_left(32))
    });
    Ok(GenRequest {
        prompt,
        max_tokens: max_tokens.map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
        sampling: SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed,
        },
        stop,
    })
}

/// Which endpoint's response shapes to use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let b: CompletionBody = read_json(&st, body).await?;
    let prompt = match b.prompt {
        StringOrList::One(s) => s,
        StringOrList::Many(mut v) if v.len() == 1 => v.remove(0),
        StringOrList::Many(_) => {
            return Err(bad_request("prompt: exactly one string is supported"))
        }
    };
    let req = gen_request(&st, &b.common, Prompt::Text(prompt))?;
    run(st, req, &b.common, Kind::Completion).await
}

async fn chat_completions(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let b: ChatBody = read_json(&st, body).await?;
    if b.messages.is_empty() {
        return Err(bad_request("messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(b.messages.len());
    for m in b.messages {
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        _ => return Err(bad_request("only text content parts are supported")),
                    }
                }
                s
            }
        };
        messages.push(Message {
            role: m.role,
            content,
        });
    }
    let req = gen_request(&st, &b.common, Prompt::Chat(messages))?;
    run(st, req, &b.common, Kind::Chat).await
}

/// Submit, wait for admission, answer whole or as a stream.
async fn run(st: AppState, req: GenRequest, c: &Common, kind: Kind) -> Result<Response, ApiError> {
    let mut rx = st.engine.submit(req).map_err(|e| engine_error(&e))?;
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Error(e)) => return Err(engine_error(&e)),
        _ => {
            return Err(engine_error(&ServerError::Engine(
                "the engine dropped the request".into(),
            )))
        }
    };
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let ctx = Ctx {
        id: match kind {
            Kind::Completion => format!("cmpl-{n}"),
            Kind::Chat => format!("chatcmpl-{n}"),
        },
        created: unix_now(),
        model: st.opts.model_id.clone(),
        kind,
        prompt_tokens,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    };
    if c.stream {
        Ok(stream_response(rx, ctx))
    } else {
        whole_response(rx, ctx).await
    }
}

/// What every response chunk repeats.
struct Ctx {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    include_usage: bool,
}

impl Ctx {
    fn usage(&self, completion: usize) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    /// One streamed chunk: text (or the role announcement) and maybe a finish reason.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, role: bool) -> Value {
        match self.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"text": text.unwrap_or(""), "index": 0, "logprobs": null,
                             "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                })
            }
        }
    }

    fn usage_chunk(&self, completion: usize) -> Value {
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created, "model": self.model, "choices": [],
            "usage": self.usage(completion),
        })
    }
}

async fn whole_response(mut rx: mpsc::Receiver<Event>, ctx: Ctx) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done {
                finish_reason,
                completion_tokens,
            }) => {
                let usage = ctx.usage(completion_tokens);
                let body = match ctx.kind {
                    Kind::Completion => json!({
                        "id": ctx.id, "object": "text_completion", "created": ctx.created,
                        "model": ctx.model,
                        "choices": [{"text": text, "index": 0, "logprobs": null,
                                     "finish_reason": finish_reason.as_str()}],
                        "usage": usage,
                    }),
                    Kind::Chat => json!({
                        "id": ctx.id, "object": "chat.completion", "created": ctx.created,
                        "model": ctx.model,
                        "choices": [{"index": 0,
                                     "message": {"role": "assistant", "content": text},
                                     "logprobs": null,
                                     "finish_reason": finish_reason.as_str()}],
                        "usage": usage,
                    }),
                };
                return Ok(axum::Json(body).into_response());
            }
            Some(Event::Error(e)) => return Err(engine_error(&e)),
            Some(Event::Started { .. }) => {}
            None => {
                return Err(engine_error(&ServerError::Engine(
                    "the engine dropped the request".into(),
                )))
            }
        }
    }
}

/// Server-sent events: chunks as tokens arrive, then `[DONE]`. Dropping the stream (the
/// client went away) drops the receiver, which frees the sequence at the next step.
fn stream_response(rx: mpsc::Receiver<Event>, ctx: Ctx) -> Response {
    struct St {
        rx: mpsc::Receiver<Event>,
        ctx: Ctx,
        out: VecDeque<SseEvent>,
        done: bool,
    }
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let mut first = VecDeque::new();
    if ctx.kind == Kind::Chat {
        first.push_back(data(ctx.chunk(Some(""), None, true)));
    }
    let st = St {
        rx,
        ctx,
        out: first,
        done: false,
    };
    let stream = futures_util::stream::unfold(st, move |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), s));
            }
            if s.done {
                return None;
            }
            match s.rx.recv().await {
                Some(Event::Text(t)) => s.out.push_back(data(s.ctx.chunk(Some(&t), None, false))),
                Some(Event::Done {
                    finish_reason,
                    completion_tokens,
                }) => {
                    let text = (s.ctx.kind == Kind::Completion).then_some("");
                    s.out
                        .push_back(data(s.ctx.chunk(text, Some(finish_reason.as_str()), false)));
                    if s.ctx.include_usage {
                        s.out.push_back(data(s.ctx.usage_chunk(completion_tokens)));
                    }
                    s.out.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                Some(Event::Error(e)) => {
                    s.out
                        .push_back(data(json!({"error": {"message": e.to_string(),
                        "type": "server_error", "param": null, "code": null}})));
                    s.out.push_back(SseEvent::default().data("[DONE]"));
                    s.done = true;
                }
                Some(Event::Started { .. }) => {}
                None => {
                    s.out.push_back(data(
                        json!({"error": {"message": "the engine dropped the request",
                        "type": "server_error", "param": null, "code": null}}),
                    ));
                    s.done = true;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn models(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{"id": st.opts.model_id, "object": "model", "created": st.created,
                  "owned_by": "flea"}],
    }))
    .into_response())
}

async fn health(State(st): State<AppState>) -> Response {
    if st.engine.is_shutting_down() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus_text(&st.engine.metrics),
    )
        .into_response()
}

/// The metrics in Prometheus' text format.
pub fn prometheus_text(m: &Metrics) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let mut put = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
    };
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let lu = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as f64;
    put(
        "flea_requests_total",
        "counter",
        "Requests accepted into the queue.",
        &[("", ld(&m.requests_total))],
    );
    put(
        "flea_requests_rejected_total",
        "counter",
        "Requests refused because the queue was full or the server was stopping.",
        &[("", ld(&m.requests_rejected))],
    );
    put(
        "flea_requests_failed_total",
        "counter",
        "Requests that ended in an error (bad prompt, context overflow, engine failure).",
        &[("", ld(&m.requests_failed))],
    );
    put(
        "flea_requests_cancelled_total",
        "counter",
        "Requests whose client went away, or cancelled at shutdown.",
        &[("", ld(&m.requests_cancelled))],
    );
    put(
        "flea_prompt_tokens_total",
        "counter",
        "Prompt tokens evaluated.",
        &[("", ld(&m.prompt_tokens_total))],
    );
    put(
        "flea_generated_tokens_total",
        "counter",
        "Tokens generated.",
        &[("", ld(&m.generated_tokens_total))],
    );
    put(
        "flea_chained_tokens_total",
        "counter",
        "Tokens chosen on the device in chained bursts (a request running alone on a GPU).",
        &[("", ld(&m.chained_tokens_total))],
    );
    put(
        "flea_tokens_per_second",
        "gauge",
        "Generated tokens per second of step time over the last 32 steps.",
        &[(
            "",
            f64::from_bits(m.tokens_per_second.load(Ordering::Relaxed)),
        )],
    );
    put(
        "flea_steps_total",
        "counter",
        "Weight passes run.",
        &[("", ld(&m.steps_total))],
    );
    put(
        "flea_step_rows_total",
        "counter",
        "Rows (tokens) fed to the weight passes, prompts and decodes alike.",
        &[("", ld(&m.step_rows_total))],
    );
    let secs = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
    put(
        "flea_forward_seconds_total",
        "counter",
        "Time in the weight passes, the logits' read-back included.",
        &[("", secs(&m.forward_nanos_total))],
    );
    put(
        "flea_sampling_seconds_total",
        "counter",
        "Time choosing tokens from read-back logits on the host.",
        &[("", secs(&m.sampling_nanos_total))],
    );
    put(
        "flea_queue_depth",
        "gauge",
        "Requests waiting for a sequence slot.",
        &[("", lu(&m.queue_depth))],
    );
    put(
        "flea_active_sequences",
        "gauge",
        "Sequences holding a KV slot.",
        &[("", lu(&m.active_sequences))],
    );
    put(
        "flea_sequence_slots",
        "gauge",
        "KV cache sequence slots.",
        &[("", lu(&m.n_seq))],
    );
    put(
        "flea_batch_rows",
        "gauge",
        "Rows (tokens) in the last weight pass.",
        &[("", lu(&m.last_batch_rows))],
    );
    put(
        "flea_batch_sequences",
        "gauge",
        "Sequences sampled from in the last weight pass.",
        &[("", lu(&m.last_batch_sequences))],
    );
    let u = m.usage.lock().map(|u| *u).unwrap_or_default();
    put(
        "flea_bytes_read_total",
        "counter",
        "Weight bytes read by compute, per link (disk: streamed through the ring).",
        &[
            ("{link=\"disk\"}", u.bytes_disk as f64),
            ("{link=\"host_cache\"}", u.bytes_host_cache as f64),
            ("{link=\"device_memory\"}", u.bytes_resident as f64),
        ],
    );
    put(
        "flea_arena_used_bytes",
        "gauge",
        "Bytes reserved in each accounted arena.",
        &[
            ("{arena=\"device\"}", u.device_used as f64),
            ("{arena=\"host_cache\"}", u.host_used as f64),
        ],
    );
    put(
        "flea_arena_budget_bytes",
        "gauge",
        "Each arena's budget.",
        &[
            ("{arena=\"device\"}", u.device_budget as f64),
            ("{arena=\"host_cache\"}", u.host_budget as f64),
        ],
    );
    s
}
