//! Ollama's API on the HTTP transport, enough for Ollama's clients (the `ollama` Python and JS
//! packages, Open WebUI, Home Assistant's Ollama integration) to list the model and chat with
//! it: `POST /api/chat`, `POST /api/generate` (streamed as NDJSON, one JSON object per line,
//! unless `"stream": false`), `GET /api/tags`, `GET /api/ps`, `GET /api/version`.
//!
//! Ollama's `options` map onto the request vocabulary: `temperature`, `top_p`, `top_k`, `min_p`,
//! `repeat_penalty` (-> `repetition_penalty`), `seed`, `stop`, `num_predict` (-> `max_tokens`;
//! -1 and -2: as long as the context allows). Options about how Ollama loads a model
//! (`num_ctx`, `num_thread`, `num_gpu`, ...) do not apply to a daemon whose model is loaded
//! once and are ignored; any other option is refused by name, as are `images` and `think`
//! until edgellm serves them. `format` ("json" or a schema) constrains the answer; `tools`
//! (OpenAI's function definitions, as Ollama takes them) may be called: the calls come back as
//! the message's `tool_calls` (`[{"id", "function": {"index", "name", "arguments": {...}}}]`,
//! in the final object when streaming), and the history may hold an assistant's `tool_calls`
//! and `tool` results (`tool_name` naming the function, as Ollama sends them). `/api/generate` renders the prompt (and
//! `system`) with the chat template as Ollama does; `"raw": true` sends it as it is. Errors
//! are Ollama's `{"error": "..."}` with the same statuses as the OpenAI routes.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::{ApiError, Origin, Shared, read_body, unix_now};
use crate::api::{Completion, Event, Input, Request, RequestEvent};
use crate::chat::Message;
use crate::grammar::Format;
use crate::scheduler::{ErrorCode, ServiceError};
use crate::transport::{parse_options, type_name};

/// Options that tune how Ollama loads a model: nothing to do for a daemon whose model is
/// loaded once, so accepted and not used.
const LOAD_OPTIONS: &[&str] = &[
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "num_keep",
    "use_mmap",
    "use_mlock",
    "numa",
    "low_vram",
    "f16_kv",
    "vocab_only",
];

/// An error in Ollama's shape.
struct OllamaError(ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        OllamaError(e)
    }
}

impl From<ServiceError> for OllamaError {
    fn from(e: ServiceError) -> Self {
        OllamaError(e.into())
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let mut r = (self.0.status, axum::Json(json!({"error": self.0.message}))).into_response();
        if self.0.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

/// `e` in Ollama's shape (`{"error": "..."}`), for the routes' shared checks.
pub(super) fn error_response(e: ApiError) -> Response {
    OllamaError(e).into_response()
}

fn bad(message: impl Into<String>) -> OllamaError {
    OllamaError(ApiError::bad_request(message))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Generate,
}

/// RFC 3339 UTC time, as Ollama's `created_at` and `modified_at`.
fn rfc3339(unix: u64) -> String {
    crate::chat::strftime_utc("%Y-%m-%dT%H:%M:%SZ", unix as i64)
}

fn model_entry(s: &Shared) -> Value {
    let name = &s.inference.info().model;
    json!({
        "name": name,
        "model": name,
        "modified_at": rfc3339(s.created),
        "size": 0,
        "digest": "",
        "details": {
            "parent_model": "",
            "format": "onnx",
            "family": "",
            "families": null,
            "parameter_size": "",
            "quantization_level": "",
        },
    })
}

pub(super) async fn tags(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"models": [model_entry(&s)]})).into_response()
}

pub(super) async fn ps(State(s): State<Arc<Shared>>) -> Response {
    let mut m = model_entry(&s);
    m["expires_at"] = json!("2262-04-11T23:47:16Z"); // loaded for good
    m["size_vram"] = json!(0);
    axum::Json(json!({"models": [m]})).into_response()
}

pub(super) async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

pub(super) async fn chat(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(s, Kind::Chat, body).await
}

pub(super) async fn generate(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(s, Kind::Generate, body).await
}

async fn answer(s: Arc<Shared>, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    let built = read_body(body)
        .and_then(|b| super::json_body(&b))
        .map_err(OllamaError::from)
        .and_then(|body| build(&s, kind, &body));
    let (req, stream) = match built {
        Ok(r) => r,
        Err(e) => {
            s.inference.refused(Origin::http, &e.0.service_error());
            return e.into_response();
        }
    };
    let handle = match s.inference.submit(req) {
        Ok(h) => h,
        Err(e) => return OllamaError::from(e).into_response(),
    };
    let model = s.inference.info().model.clone();
    if stream {
        return ndjson(kind, model, handle.events);
    }
    // A whole answer: no events come (`req.stream` is false), only the completion.
    let mut events = handle.events;
    loop {
        match events.recv().await {
            Some(RequestEvent::Event(_)) => {}
            Some(RequestEvent::Done(c)) => {
                return axum::Json(last(kind, &model, &c, &c.text)).into_response();
            }
            Some(RequestEvent::Error(e)) => return OllamaError::from(e).into_response(),
            None => {
                return OllamaError::from(ServiceError {
                    code: ErrorCode::Internal,
                    message: "the request ended without an answer".into(),
                })
                .into_response();
            }
        }
    }
}

/// One streamed piece of the answer.
fn piece(kind: Kind, model: &str, text: &str) -> Value {
    let mut v = json!({"model": model, "created_at": rfc3339(unix_now()), "done": false});
    match kind {
        Kind::Chat => v["message"] = json!({"role": "assistant", "content": text}),
        Kind::Generate => v["response"] = json!(text),
    }
    v
}

/// The final object: the finish reason and Ollama's counts and durations (nanoseconds).
fn last(kind: Kind, model: &str, c: &Completion, text: &str) -> Value {
    let u = &c.usage;
    let ns = |s: f64| (s * 1e9).round() as u64;
    let ttft = u.ttft_ms / 1e3;
    let decode = if u.decode_tok_s > 0.0 {
        u.completion_tokens.saturating_sub(1) as f64 / u.decode_tok_s
    } else {
        0.0
    };
    let mut v = piece(kind, model, text);
    v["done"] = json!(true);
    // Ollama ends an answer that calls tools with "stop" too.
    v["done_reason"] = json!(match c.finish_reason {
        crate::api::FinishReason::ToolCalls => "stop",
        other => other.as_str(),
    });
    if kind == Kind::Chat && !c.tool_calls.is_empty() {
        v["message"]["tool_calls"] = c
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let args: Value = serde_json::from_str(&t.arguments).unwrap_or_else(|_| json!({}));
                json!({"id": t.id, "function": {"index": i, "name": t.name, "arguments": args}})
            })
            .collect();
    }
    v["total_duration"] = json!(ns(ttft + decode));
    v["load_duration"] = json!(0);
    v["prompt_eval_count"] = json!(u.prompt_tokens);
    v["prompt_eval_duration"] = json!(ns(ttft));
    v["eval_count"] = json!(u.completion_tokens);
    v["eval_duration"] = json!(ns(decode));
    v
}

/// The answer as NDJSON: a line per piece of text, then the final object; an error after the
/// start is a last `{"error": ...}` line, as Ollama sends it.
fn ndjson(kind: Kind, model: String, events: mpsc::UnboundedReceiver<RequestEvent>) -> Response {
    let lines = futures_util::stream::unfold(
        (events, model, false),
        move |(mut events, model, done)| async move {
            if done {
                return None;
            }
            loop {
                let (v, done) = match events.recv().await? {
                    RequestEvent::Event(Event::Delta(t)) => (piece(kind, &model, &t), false),
                    RequestEvent::Event(Event::Reasoning(_)) => continue,
                    RequestEvent::Done(c) => (last(kind, &model, &c, ""), true),
                    RequestEvent::Error(e) => (json!({"error": e.message}), true),
                };
                let mut line = v.to_string();
                line.push('\n');
                return Some((
                    Ok::<_, Infallible>(Bytes::from(line)),
                    (events, model, done),
                ));
            }
        },
    );
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// The request an Ollama body asks for, and whether to stream it (Ollama's default: yes).
fn build(
    s: &Shared,
    kind: Kind,
    body: &Map<String, Value>,
) -> Result<(Request, bool), OllamaError> {
    let own: &[&str] = match kind {
        Kind::Chat => &["messages"],
        Kind::Generate => &["prompt", "system", "raw"],
    };
    let common = [
        "model",
        "stream",
        "options",
        "keep_alive",
        "format",
        "tools",
        "images",
        "think",
    ];
    if let Some(k) = body
        .keys()
        .find(|k| !own.contains(&k.as_str()) && !common.contains(&k.as_str()))
    {
        return Err(bad(format!(
            "unknown field {k:?} (edgellm takes: {}, {})",
            own.join(", "),
            common.join(", ")
        )));
    }
    match body.get("think") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(_) => return Err(bad("think: not supported by edgellm yet")),
    }
    if kind == Kind::Generate && body.get("tools").is_some_and(|t| !t.is_null()) {
        return Err(bad("tools: only /api/chat takes tools"));
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(format!(
                "stream: expected a boolean, got {}",
                type_name(other)
            )));
        }
    };
    let input = match kind {
        Kind::Chat => Input::Messages(messages(body.get("messages"))?),
        Kind::Generate => generate_input(body)?,
    };
    let mut req = s.inference.request(input);
    req.origin = Origin::http;
    let mut opts = options(body.get("options"))?;
    if let Some(t) = body.get("tools").filter(|t| !t.is_null()) {
        opts.insert("tools".into(), t.clone());
    }
    parse_options(&opts, &[], &mut req)?;
    req.stream = stream;
    // Ollama's `format`: "json" (any JSON value, as Ollama's own grammar; here an object) or
    // a JSON schema.
    req.format = match body.get("format") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "json" => Some(Format::JsonObject),
        Some(Value::String(s)) if s.is_empty() => None,
        Some(schema @ Value::Object(_)) => Some(Format::JsonSchema {
            name: "format".into(),
            schema: schema.clone(),
        }),
        Some(other) => {
            return Err(bad(format!(
                "format: expected \"json\" or a JSON schema object, got {}",
                match other {
                    Value::String(s) => format!("{s:?}"),
                    v => type_name(v).to_string(),
                }
            )));
        }
    };
    Ok((req, stream))
}

fn text_field(body: &Map<String, Value>, key: &str) -> Result<Option<String>, OllamaError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(format!(
            "{key}: expected a string, got {}",
            type_name(other)
        ))),
    }
}

/// `/api/generate`'s input: the prompt (and `system`) as a chat, or as it is with `raw`.
fn generate_input(body: &Map<String, Value>) -> Result<Input, OllamaError> {
    if body
        .get("images")
        .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(bad("images: not supported by edgellm"));
    }
    let prompt = text_field(body, "prompt")?.unwrap_or_default();
    if prompt.is_empty() {
        return Err(bad("prompt: missing or empty"));
    }
    let raw = match body.get("raw") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(format!(
                "raw: expected a boolean, got {}",
                type_name(other)
            )));
        }
    };
    let system = text_field(body, "system")?;
    if raw {
        if system.is_some() {
            return Err(bad("system: not used with raw: true"));
        }
        return Ok(crate::transport::complete_input(prompt)?);
    }
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", prompt));
    Ok(crate::transport::chat_input(messages)?)
}

/// Ollama chat messages: `role`, `content`; `images`, `tool_calls` and `thinking` only empty.
fn messages(v: Option<&Value>) -> Result<Vec<Message>, OllamaError> {
    let items = v
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages: expected a list of {role, content} objects"))?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item
            .as_object()
            .ok_or_else(|| bad(format!("messages[{i}]: expected an object")))?;
        for (k, v) in obj {
            match k.as_str() {
                "role" | "content" | "tool_calls" | "tool_name" | "tool_call_id" => {}
                "images" | "thinking"
                    if v.is_null()
                        || v.as_array().is_some_and(Vec::is_empty)
                        || v.as_str() == Some("") => {}
                other => {
                    return Err(bad(format!(
                        "messages[{i}].{other}: not supported by edgellm"
                    )));
                }
            }
        }
        let field = |name: &str| match obj.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(bad(format!(
                "messages[{i}].{name}: expected a string, got {}",
                type_name(other)
            ))),
            None => Err(bad(format!("messages[{i}]: missing {name:?}"))),
        };
        let role = field("role")?;
        let tool_calls = match obj.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(v) => Some(crate::transport::tool_calls_from_json(i, &role, v)?),
        };
        let content = match obj.get("content") {
            None | Some(Value::Null) if tool_calls.is_some() => String::new(),
            _ => field("content")?,
        };
        let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
        out.push(Message {
            tool_calls,
            tool_call_id: text("tool_call_id"),
            name: text("tool_name"),
            ..Message::new(role, content)
        });
    }
    crate::transport::check_messages(&out)?;
    Ok(out)
}

/// Ollama `options` as the shared option map.
fn options(v: Option<&Value>) -> Result<Map<String, Value>, OllamaError> {
    let mut out = Map::new();
    let o = match v {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(bad(format!(
                "options: expected an object, got {}",
                type_name(other)
            )));
        }
    };
    for (k, v) in o {
        match k.as_str() {
            _ if LOAD_OPTIONS.contains(&k.as_str()) => {}
            "temperature" | "top_p" | "top_k" | "min_p" | "seed" | "stop" => {
                out.insert(k.clone(), v.clone());
            }
            "repeat_penalty" => {
                out.insert("repetition_penalty".into(), v.clone());
            }
            // -1: no limit, -2: fill the context; both: as long as the context allows.
            "num_predict" if matches!(v.as_i64(), Some(-1 | -2)) => {}
            "num_predict" => {
                out.insert("max_tokens".into(), v.clone());
            }
            other => {
                return Err(bad(format!(
                    "options.{other}: not supported by edgellm (supported: temperature, top_p, \
                     top_k, min_p, repeat_penalty, seed, stop, num_predict)"
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_103_750), "2026-12-01T05:42:30Z");
    }

    #[test]
    fn ollama_options_map_to_ours() {
        let o = options(Some(
            &json!({"num_predict": 7, "repeat_penalty": 1.1, "num_ctx": 4096, "stop": ["x"]}),
        ))
        .unwrap_or_else(|e| panic!("{}", e.0.message));
        assert_eq!(o.get("max_tokens"), Some(&json!(7)));
        assert_eq!(o.get("repetition_penalty"), Some(&json!(1.1)));
        assert!(!o.contains_key("num_ctx"));
        assert!(options(Some(&json!({"num_predict": -1}))).is_ok_and(|o| o.is_empty()));
        let err = options(Some(&json!({"mirostat": 2})))
            .err()
            .map(|e| e.0.message);
        assert!(err.is_some_and(|m| m.starts_with("options.mirostat")));
    }
}
