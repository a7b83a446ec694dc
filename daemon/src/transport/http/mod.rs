//! The HTTP transport: an OpenAI- and Ollama-compatible API on axum (hyper, HTTP/1.1), a third
//! face of the same scheduler as D-Bus and MQTT: the same request vocabulary and checks
//! ([`super::parse_options`]), the same errors, one terminal answer per accepted request.
//!
//! Routes: `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent
//! events ending in `data: [DONE]`, or one JSON answer), `GET /v1/models`,
//! `GET /v1/models/{id}`; Ollama's `/api/chat`, `/api/generate`, `/api/tags`, `/api/ps` and
//! `/api/version` ([`ollama`]); `GET /metrics` (Prometheus/OpenMetrics text,
//! [`crate::metrics`]); and `GET /health` (200 while the engine makes progress and the service
//! is not stopping, else 503). With `[http] api_key_file`, every route but `/health` needs
//! `Authorization: Bearer <key>`. Errors are OpenAI error objects
//! (`{"error": {"message", "type", "param", "code"}}`; Ollama's routes: `{"error": "..."}`):
//! 400 for a bad request (the message names the field), 401 for a missing or wrong key, 413 for
//! a body over `max_body_bytes`, 429 with `Retry-After` when the queue is full, 503 while
//! stopping.
//!
//! A client that goes away cancels its request: the response (stream or future) owns the
//! request's event receiver, and the engine stops a request whose receiver is gone.
//!
//! Request fields are OpenAI's; `max_completion_tokens` is `max_tokens`, `n` must be 1, and the
//! fields OpenAI defines that edgellm cannot honour (`logprobs`, non-zero
//! `frequency_penalty`/`presence_penalty`, ...) are refused by name rather than ignored.
//! `response_format` (JSON object or schema) constrains the answer ([`crate::grammar`]);
//! `tools`, `tool_choice` and `parallel_tool_calls` work as OpenAI's ([`crate::tools`]): calls
//! come back as the message's `tool_calls` (streamed: one chunk with every call, before the
//! finish reason `tool_calls`), and the history may hold assistant `tool_calls` and `tool`
//! results. Our own fields (`grammar`, `top_k`, `min_p`, `repetition_penalty`) are accepted too.

mod ollama;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request as HttpRequest, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Inference, Origin, type_name};
use crate::api::{Completion, Event, Input, Request, RequestEvent, State as ServiceState};
use crate::chat::Message;
use crate::config::{HttpConfig, Listen};
use crate::scheduler::{ErrorCode, ServiceError};

/// Stall after which `/health` reports the engine unhealthy while it works on a request.
const HEALTH_STALL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{path}: {source}")]
    Keys {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: no API key in it (one per line)")]
    NoKeys(String),
    #[error("listening on {listen}: {source}")]
    Bind {
        listen: String,
        #[source]
        source: std::io::Error,
    },
}

struct Shared {
    inference: Arc<Inference>,
    /// Accepted bearer tokens; empty: none required.
    keys: Vec<String>,
    /// When the model was loaded (`created` of `/v1/models`).
    created: u64,
    next_id: AtomicU64,
}

/// The running HTTP server.
pub struct HttpServer {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    listen: Listen,
}

impl HttpServer {
    /// Reads the API keys, binds `listen` (a stale Unix socket is replaced) and serves in
    /// a task until [`HttpServer::stop`].
    pub async fn start(inference: Arc<Inference>, config: &HttpConfig) -> Result<Self, HttpError> {
        let keys = match &config.api_key_file {
            Some(path) => read_keys(path)?,
            None => Vec::new(),
        };
        let shared = Arc::new(Shared {
            inference,
            keys,
            created: unix_now(),
            next_id: AtomicU64::new(1),
        });
        let app = router(shared, config.max_body_bytes);
        let stop = CancellationToken::new();
        let bind_err = |source| HttpError::Bind {
            listen: config.listen.to_string(),
            source,
        };
        let signal = stop.clone().cancelled_owned();
        let task = match &config.listen {
            Listen::Tcp(addr) => {
                use axum::serve::ListenerExt;
                // Nagle's algorithm would hold a stream's first small chunk back until the
                // client's delayed ACK of the headers (~40 ms on Linux): tokens go out at once.
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(bind_err)?
                    .tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, app).with_graceful_shutdown(signal).await {
                        tracing::error!("HTTP server: {e}");
                    }
                })
            }
            Listen::Unix(path) => {
                // A socket left by an earlier run is replaced; anything else there is not ours.
                use std::os::unix::fs::FileTypeExt;
                match std::fs::symlink_metadata(path) {
                    Ok(m) if m.file_type().is_socket() => {
                        std::fs::remove_file(path).map_err(bind_err)?;
                    }
                    Ok(_) => {
                        return Err(bind_err(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "a file that is not a socket is in the way",
                        )));
                    }
                    Err(_) => {}
                }
                let l = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
                // The unit's UMask (0077) would leave the socket to edgellmd alone: its group
                // may connect too.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                    .map_err(bind_err)?;
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, app).with_graceful_shutdown(signal).await {
                        tracing::error!("HTTP server: {e}");
                    }
                })
            }
        };
        Ok(HttpServer {
            task,
            stop,
            listen: config.listen.clone(),
        })
    }

    /// The address it listens on (a TCP port of 0 resolved is not reported: tests pick ports).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Stops accepting connections and waits for the open ones to finish their answers.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Listen::Unix(path) = &self.listen {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bearer tokens from `path`: one per line, blank lines and `#` comments skipped.
fn read_keys(path: &std::path::Path) -> Result<Vec<String>, HttpError> {
    let text = std::fs::read_to_string(path).map_err(|source| HttpError::Keys {
        path: path.display().to_string(),
        source,
    })?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Err(HttpError::NoKeys(path.display().to_string()));
    }
    Ok(keys)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn router(shared: Arc<Shared>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/metrics", get(metrics))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

// ------------------------------------------------------------------------------------------
// Errors

/// An OpenAI error object with its HTTP status.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            kind,
            code,
            message,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message.into(),
        )
    }

    /// The service's error code for it (the metrics count refusals by code).
    fn service_error(&self) -> ServiceError {
        let code = match self.status {
            StatusCode::TOO_MANY_REQUESTS => ErrorCode::Busy,
            StatusCode::SERVICE_UNAVAILABLE => ErrorCode::ShuttingDown,
            s if s.is_server_error() => ErrorCode::Internal,
            _ if self.code == "context_length_exceeded" => ErrorCode::PromptTooLong,
            _ => ErrorCode::InvalidRequest,
        };
        ServiceError {
            code,
            message: self.message.clone(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }})
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let (status, kind) = match e.code {
            ErrorCode::InvalidRequest => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorCode::PromptTooLong => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorCode::Busy => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            ErrorCode::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        let code = match e.code {
            ErrorCode::PromptTooLong => "context_length_exceeded",
            other => other.as_str(),
        };
        ApiError::new(status, kind, code, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such route (see docs/http-api.md)".into(),
    )
}

// ------------------------------------------------------------------------------------------
// Authorization, health, models

/// Equal in time whatever the first differing byte (the length is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(s): State<Arc<Shared>>, req: HttpRequest, next: Next) -> Response {
    if s.keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let message = match given {
        Some(key) if s.keys.iter().any(|k| same(k.as_bytes(), key.as_bytes())) => {
            return next.run(req).await;
        }
        Some(_) => "incorrect API key provided",
        None => "missing API key: send `Authorization: Bearer <key>`",
    };
    let e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
        message.into(),
    );
    if req.uri().path().starts_with("/api/") {
        // Ollama's routes answer Ollama's error shape.
        return ollama::error_response(e);
    }
    e.into_response()
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    let status = *s.inference.status().borrow();
    let engine = s.inference.healthy(HEALTH_STALL);
    let ok = engine && status.state != ServiceState::Stopping;
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "state": status.state.as_str(),
        "engine": if engine { "ok" } else { "stalled" },
        "running": status.running,
        "queue_length": status.queue_length,
    });
    (code, axum::Json(body)).into_response()
}

fn model_object(s: &Shared) -> Value {
    json!({
        "id": s.inference.info().model,
        "object": "model",
        "created": s.created,
        "owned_by": "edgellm",
    })
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"object": "list", "data": [model_object(&s)]})).into_response()
}

async fn model(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if id == s.inference.info().model {
        axum::Json(model_object(&s)).into_response()
    } else {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model {id:?} does not exist (this daemon serves one model)"),
        )
        .into_response()
    }
}

// ------------------------------------------------------------------------------------------
// Completions

/// Which OpenAI route a request came through: it decides the shape of the answer.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// OpenAI fields every completion route takes besides its input, mapped onto ours.
const COMMON_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "response_format",
    // ours (as on D-Bus and MQTT)
    "grammar",
    "top_k",
    "min_p",
    "repetition_penalty",
];

/// The body as a JSON object: invalid UTF-8, malformed JSON or a key given twice is a 400
/// naming the problem.
fn json_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not UTF-8: {e}")))?;
    match super::parse_json(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::bad_request(format!(
            "the body must be a JSON object, got {}",
            type_name(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// The options of an OpenAI request as our shared option map, refusing what we cannot honour.
fn options(
    body: &Map<String, Value>,
    kind: Kind,
) -> Result<(Map<String, Value>, bool, bool), ApiError> {
    let own: &[&str] = match kind {
        Kind::Chat => &[
            "messages",
            "reasoning_effort",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
        ],
        Kind::Text => &["prompt", "echo", "suffix"],
    };
    if let Some(k) = body
        .keys()
        .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "Unrecognized request argument supplied: {k} (edgellm takes: {}, {})",
            own.join(", "),
            COMMON_FIELDS.join(", ")
        )));
    }
    let mut opts = Map::new();
    let mut stream = false;
    let mut usage = false;
    for (k, v) in body {
        match k.as_str() {
            "messages" | "prompt" | "model" | "user" => {}
            "stream" => {
                stream = match v {
                    Value::Bool(b) => *b,
                    Value::Null => false,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "stream: expected a boolean, got {}",
                            type_name(other)
                        )));
                    }
                }
            }
            "stream_options" => match v {
                Value::Null => {}
                Value::Object(o) => {
                    if let Some(bad) = o.keys().find(|k| *k != "include_usage") {
                        return Err(ApiError::bad_request(format!(
                            "stream_options: unknown field {bad:?} (known: include_usage)"
                        )));
                    }
                    usage = o.get("include_usage").and_then(Value::as_bool) == Some(true);
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "stream_options: expected an object, got {}",
                        type_name(other)
                    )));
                }
            },
            "n" if v.is_null() || v.as_u64() == Some(1) => {}
            "n" => return Err(ApiError::bad_request("n: only 1 choice per request")),
            "frequency_penalty" | "presence_penalty" if v.is_null() || v.as_f64() == Some(0.0) => {}
            "frequency_penalty" | "presence_penalty" => {
                return Err(ApiError::bad_request(format!(
                    "{k}: not supported (use repetition_penalty)"
                )));
            }
            "logprobs" if v.is_null() || *v == Value::Bool(false) => {}
            "logprobs" => return Err(ApiError::bad_request("logprobs: not supported")),
            "echo" if v.is_null() || *v == Value::Bool(false) => {}
            "echo" => return Err(ApiError::bad_request("echo: not supported")),
            "suffix" if v.is_null() => {}
            "suffix" => return Err(ApiError::bad_request("suffix: not supported")),
            "max_completion_tokens" => {
                if body.contains_key("max_tokens") {
                    return Err(ApiError::bad_request(
                        "give max_tokens or max_completion_tokens, not both",
                    ));
                }
                opts.insert("max_tokens".into(), v.clone());
            }
            // OpenAI's null means "the default".
            _ if v.is_null() => {}
            _ => {
                opts.insert(k.clone(), v.clone());
            }
        }
    }
    if !stream && body.get("stream_options").is_some_and(|o| !o.is_null()) {
        return Err(ApiError::bad_request(
            "stream_options: only allowed with stream: true",
        ));
    }
    Ok((opts, stream, usage))
}

/// OpenAI chat messages: `content` a string, or a list of `{"type": "text", "text"}` parts
/// (joined), or null for an assistant turn; `name` is accepted and not used.
fn chat_messages(v: Option<&Value>) -> Result<Vec<Message>, ApiError> {
    let items = v
        .ok_or_else(|| ApiError::bad_request("messages: missing"))?
        .as_array()
        .ok_or_else(|| ApiError::bad_request("messages: expected a list of messages"))?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| {
            ApiError::bad_request(format!(
                "messages[{i}]: expected an object, got {}",
                type_name(item)
            ))
        })?;
        if let Some(k) = obj
            .keys()
            .find(|k| !super::MESSAGE_FIELDS.contains(&k.as_str()))
        {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: unknown field {k:?} (known: {})",
                super::MESSAGE_FIELDS.join(", ")
            )));
        }
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.clone(),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].role: expected a string, got {}",
                    type_name(other)
                )));
            }
            None => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}]: missing \"role\""
                )));
            }
        };
        let content = match obj.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None if role == "assistant" => String::new(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported"
                            )));
                        }
                    }
                }
                text
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}].content: expected a string or a list of text parts, got {}",
                    type_name(other)
                )));
            }
            None => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}]: missing \"content\""
                )));
            }
        };
        let tool_calls = match obj.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(v) => Some(super::tool_calls_from_json(i, &role, v)?),
        };
        let text = |k: &str| match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::bad_request(format!(
                "messages[{i}].{k}: expected a string, got {}",
                type_name(other)
            ))),
        };
        out.push(Message {
            tool_calls,
            tool_call_id: text("tool_call_id")?,
            name: text("name")?,
            ..Message::new(role, content)
        });
    }
    super::check_messages(&out)?;
    Ok(out)
}

/// The completions route's prompt: a string, or a list of exactly one string.
fn text_prompt(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or_default().to_owned())
        }
        Some(Value::Array(_)) => Err(ApiError::bad_request(
            "prompt: only one prompt per request (a string or a list of one string)",
        )),
        Some(other) => Err(ApiError::bad_request(format!(
            "prompt: expected a string, got {}",
            type_name(other)
        ))),
        None => Err(ApiError::bad_request("prompt: missing")),
    }
}

/// The request body, or why it could not be read: over `max_body_bytes` is a 413.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "invalid_request_error",
                "request_too_large",
                "the body is larger than [http] max_body_bytes".into(),
            )
        } else {
            ApiError::new(
                status,
                "invalid_request_error",
                "invalid_request",
                format!("reading the body: {}", e.body_text()),
            )
        }
    })
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.inference.metrics_text(),
    )
        .into_response()
}

async fn chat_completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(s, Kind::Chat, body).await
}

async fn completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(s, Kind::Text, body).await
}

/// A completion route's response; a request refused before the scheduler saw it is counted.
async fn answer(s: Arc<Shared>, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match read_body(body) {
        Ok(b) => b,
        Err(e) => {
            s.inference.refused(Origin::http, &e.service_error());
            return e.into_response();
        }
    };
    complete(s, kind, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// What every chunk and answer of one request shares.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// A streamed piece of text.
    fn delta(&self, text: &str, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat if first => {
                json!({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": null})
            }
            Kind::Chat => json!({"index": 0, "delta": {"content": text}, "finish_reason": null}),
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})
            }
        };
        self.envelope(true, json!([choice]))
    }

    /// The streamed chunk with the calls the model made, each whole (`index` numbers them).
    fn calls(&self, c: &Completion) -> Value {
        let calls: Vec<Value> = c
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut v = t.to_json();
                v["index"] = json!(i);
                v
            })
            .collect();
        self.envelope(
            true,
            json!([{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": null}]),
        )
    }

    /// The streamed chunk that carries the finish reason (and the engine's timings).
    fn last(&self, c: &Completion) -> Value {
        let reason = c.finish_reason.as_str();
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "delta": {}, "finish_reason": reason}),
            Kind::Text => {
                json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason})
            }
        };
        let mut v = self.envelope(true, json!([choice]));
        v["timings"] = timings(c);
        v
    }

    /// The answer of a request not streamed.
    fn whole(&self, c: &Completion) -> Value {
        let reason = c.finish_reason.as_str();
        let choice = match self.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": c.text});
                if !c.tool_calls.is_empty() {
                    message["tool_calls"] = super::tool_calls_json(c);
                    if c.text.is_empty() {
                        message["content"] = Value::Null;
                    }
                }
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": reason,
                })
            }
            Kind::Text => {
                json!({"index": 0, "text": c.text, "logprobs": null, "finish_reason": reason})
            }
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage(c);
        v["timings"] = timings(c);
        v
    }
}

/// The engine's own timings of a request, as an extension field (`timings`, as llama.cpp's
/// server adds one; OpenAI's clients ignore it): time to first token, prefill and decode rates,
/// and with `response_format` or `grammar` the time spent on token masks and the tokens the
/// grammar forced.
fn timings(c: &Completion) -> Value {
    let u = &c.usage;
    json!({
        "ttft_ms": u.ttft_ms,
        "prefill_tok_s": u.prefill_tok_s,
        "decode_tok_s": u.decode_tok_s,
        "grammar_ms": u.grammar_ms,
        "forced_tokens": u.forced_tokens,
    })
}

fn usage(c: &Completion) -> Value {
    let u = &c.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

async fn complete(s: Arc<Shared>, kind: Kind, body: &[u8]) -> Result<Response, ApiError> {
    let (req, stream, include_usage) = build(&s, kind, body).inspect_err(|e| {
        s.inference.refused(Origin::http, &e.service_error());
    })?;
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Reply {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-edgellm-{n}"),
            Kind::Text => format!("cmpl-edgellm-{n}"),
        },
        created: unix_now(),
        model: s.inference.info().model.clone(),
    };
    let handle = s.inference.submit(req)?;
    if stream {
        return Ok(sse(reply, handle.events, include_usage).into_response());
    }
    let mut events = handle.events;
    // Dropping this future (the client went away) drops `events`: the engine cancels.
    loop {
        match events.recv().await {
            Some(RequestEvent::Event(_)) => {}
            Some(RequestEvent::Done(c)) => return Ok(axum::Json(reply.whole(&c)).into_response()),
            Some(RequestEvent::Error(e)) => return Err(e.into()),
            None => {
                return Err(ServiceError {
                    code: ErrorCode::Internal,
                    message: "the request ended without an answer".into(),
                }
                .into());
            }
        }
    }
}

/// The request a body asks for, whether to stream it, and whether to send usage when streaming.
fn build(s: &Shared, kind: Kind, body: &[u8]) -> Result<(Request, bool, bool), ApiError> {
    let body = json_body(body)?;
    let (opts, stream, include_usage) = options(&body, kind)?;
    let input = match kind {
        Kind::Chat => Input::Messages(chat_messages(body.get("messages"))?),
        Kind::Text => super::complete_input(text_prompt(body.get("prompt"))?)?,
    };
    let mut req = s.inference.request(input);
    req.origin = Origin::http;
    // OpenAI's completions route answers 16 tokens unless told otherwise.
    if kind == Kind::Text {
        req.max_tokens = Some(16);
    }
    super::parse_options(&opts, &[], &mut req)?;
    req.stream = stream;
    Ok((req, stream, include_usage))
}

/// The request's events as server-sent events: a chunk per piece of text, the finish reason,
/// the usage when asked for, then `[DONE]`. An error after the stream started is sent as an
/// error object, then the stream ends.
fn sse(
    reply: Reply,
    events: mpsc::UnboundedReceiver<RequestEvent>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        reply: Reply,
        events: mpsc::UnboundedReceiver<RequestEvent>,
        pending: std::collections::VecDeque<SseEvent>,
        first: bool,
        done: bool,
        include_usage: bool,
    }
    let st = St {
        reply,
        events,
        pending: std::collections::VecDeque::new(),
        first: true,
        done: false,
        include_usage,
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let stream = futures_util::stream::unfold(st, move |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.events.recv().await {
                Some(RequestEvent::Event(Event::Delta(text))) => {
                    let chunk = st.reply.delta(&text, st.first);
                    st.first = false;
                    st.pending.push_back(data(chunk));
                }
                Some(RequestEvent::Event(Event::Reasoning(_))) => {}
                Some(RequestEvent::Done(c)) => {
                    if st.first && st.reply.kind == Kind::Chat {
                        st.pending.push_back(data(st.reply.delta("", true)));
                    }
                    if !c.tool_calls.is_empty() {
                        st.pending.push_back(data(st.reply.calls(&c)));
                    }
                    st.pending.push_back(data(st.reply.last(&c)));
                    if st.include_usage {
                        let mut u = st.reply.envelope(true, json!([]));
                        u["usage"] = usage(&c);
                        st.pending.push_back(data(u));
                    }
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(RequestEvent::Error(e)) => {
                    st.pending.push_back(data(ApiError::from(e).body()));
                    st.done = true;
                }
                None => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_per_line_and_an_empty_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        std::fs::write(&p, "# fleet keys\n\nalpha-1\n  beta-2  \n").unwrap();
        assert_eq!(read_keys(&p).unwrap(), ["alpha-1", "beta-2"]);
        std::fs::write(&p, "# none\n\n").unwrap();
        assert!(matches!(read_keys(&p), Err(HttpError::NoKeys(_))));
        assert!(matches!(
            read_keys(&dir.path().join("missing")),
            Err(HttpError::Keys { .. })
        ));
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"abc", b"ab"));
    }

    #[test]
    fn openai_fields_map_to_ours_and_the_rest_is_refused_by_name() {
        let body = |s: &str| json_body(s.as_bytes());
        let (o, stream, usage) = options(
            &body(r#"{"model":"m","messages":[],"max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true},"n":1,"temperature":0,"user":"u","presence_penalty":0}"#).unwrap_or_default(),
            Kind::Chat,
        )
        .unwrap_or_else(|e| panic!("{}", e.message));
        assert!(stream && usage);
        assert_eq!(o.get("max_tokens"), Some(&json!(5)));
        assert_eq!(o.get("temperature"), Some(&json!(0)));
        assert!(!o.contains_key("n") && !o.contains_key("model"));
        let refused = |s: &str, kind| match options(&body(s).unwrap_or_default(), kind) {
            Err(e) => e.message,
            Ok(_) => panic!("{s} was accepted"),
        };
        assert!(
            refused(r#"{"functions":[]}"#, Kind::Chat)
                .starts_with("Unrecognized request argument supplied: functions")
        );
        assert!(
            refused(r#"{"tools":[]}"#, Kind::Text)
                .starts_with("Unrecognized request argument supplied: tools")
        );
        assert!(refused(r#"{"n":2}"#, Kind::Chat).starts_with("n:"));
        assert!(refused(r#"{"logprobs":true}"#, Kind::Chat).starts_with("logprobs"));
        assert!(refused(r#"{"messages":[]}"#, Kind::Text).contains("messages"));
        assert!(
            refused(r#"{"stream_options":{"include_usage":true}}"#, Kind::Chat)
                .contains("stream: true")
        );
        assert!(
            json_body(b"\xff")
                .err()
                .is_some_and(|e| e.message.contains("UTF-8"))
        );
        assert!(
            json_body(b"[1]")
                .err()
                .is_some_and(|e| e.message.contains("JSON object"))
        );
        assert!(
            json_body(br#"{"a":1,"a":2}"#)
                .err()
                .is_some_and(|e| e.message.contains("twice"))
        );
    }

    #[test]
    fn chat_content_may_be_text_parts() {
        let m = chat_messages(Some(&json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "name": "ann"},
            {"role": "assistant", "content": null},
        ])))
        .unwrap_or_else(|e| panic!("{}", e.message));
        assert_eq!(m[1].content, "Hi there");
        assert_eq!(m[2].content, "");
        let err = |v: Value| {
            chat_messages(Some(&v))
                .err()
                .map(|e| e.message)
                .unwrap_or_default()
        };
        assert!(
            err(json!([{"role": "user", "content": [{"type": "image_url"}]}])).contains("text")
        );
        assert!(err(json!([{"role": "user"}])).contains("content"));
        assert!(err(json!([{"role": "wizard", "content": "x"}])).contains("role"));
    }
}
