//! The transports: wire <-> [`crate::api`], nothing else. D-Bus, MQTT and HTTP speak one request
//! vocabulary (OpenAI chat field names, DESIGN.md "Transports"), parsed here once so they accept
//! exactly the same options and reject bad ones with the same messages, each naming the field
//! (HTTP maps OpenAI's and Ollama's own field names onto it first: [`http`]).
//!
//! D-Bus options (`a{sv}`) are converted to JSON values first ([`dbus::variant_to_json`]), then
//! go through [`parse_options`] like an MQTT payload's fields.

pub mod dbus;
pub mod http;
pub mod mqtt;

use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::api::{Input, Request, Usage};
use crate::chat::Message;
use crate::chat::harmony::ReasoningEffort;
use crate::grammar::Format;
pub use crate::metrics::Origin;
use crate::sampler::SamplingParams;
use crate::scheduler::{ErrorCode, Handle, Scheduler, ServiceError, Status};

/// What a transport may do with the daemon, and all it sees of it: build and submit requests,
/// read the status and the facts it reports ([`Info`]), and track its per-request forwarding
/// tasks (the shutdown waits for them). The service builds it; a transport never reaches the
/// service, the engine or the scheduler's controls (shutdown, health).
pub struct Inference {
    scheduler: Arc<Scheduler>,
    info: Info,
    tasks: TaskTracker,
}

/// The facts the transports report: D-Bus properties, the MQTT status.
#[derive(Debug, Clone)]
pub struct Info {
    /// The package folder's name (after resolving a `default` symlink).
    pub model: String,
    /// `ort` or `tract`.
    pub backend: &'static str,
    /// Why that backend serves.
    pub backend_reason: String,
    /// Tokens of context, prompt plus answer.
    pub max_context: usize,
    /// Requests that run together.
    pub parallel: usize,
}

impl std::fmt::Debug for Inference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inference")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Inference {
    pub fn new(scheduler: Arc<Scheduler>, info: Info, tasks: TaskTracker) -> Self {
        Inference {
            scheduler,
            info,
            tasks,
        }
    }

    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The package's sampling defaults (genai_config.json `search`).
    pub fn default_sampling(&self) -> SamplingParams {
        self.scheduler.model().default_sampling()
    }

    /// A request for `input` with the package's sampling defaults, which the request's own
    /// options then override.
    pub fn request(&self, input: Input) -> Request {
        let mut req = Request::new(input);
        req.sampling = self.default_sampling();
        req
    }

    /// Counts a request the transport refused itself, before the scheduler saw it.
    pub fn refused(&self, origin: Origin, e: &ServiceError) {
        self.scheduler.metrics().refused(origin, e.code);
    }

    /// Requests ended so far and tokens generated ([`crate::metrics::Metrics::totals`]).
    pub fn totals(&self) -> (u64, u64) {
        self.scheduler.metrics().totals()
    }

    /// The metrics in the Prometheus text format, the present's gauges read now.
    pub fn metrics_text(&self) -> String {
        let status = *self.scheduler.status().borrow();
        self.scheduler
            .metrics()
            .encode(status, self.scheduler.parallel() > 1)
    }

    /// Validates, tokenizes and queues `req` ([`Scheduler::submit_from_async`]).
    pub fn submit(&self, req: Request) -> Result<Handle, ServiceError> {
        self.scheduler.submit_from_async(req)
    }

    /// Whether the engine thread lives and, while it works, made progress within `stall`.
    pub fn healthy(&self, stall: std::time::Duration) -> bool {
        self.scheduler.health().healthy(stall)
    }

    /// The service's state, queue and running count, updated as they change.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.scheduler.status()
    }

    /// Runs a request's forwarding task; the shutdown waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// `future`, tracked like [`Inference::spawn`]'s tasks but awaited by the caller.
    pub fn track<F: std::future::Future>(
        &self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        self.tasks.track_future(future)
    }
}

/// The option names both transports accept, besides the input itself.
pub const OPTION_NAMES: &[&str] = &[
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "reasoning_effort",
    "response_format",
    "grammar",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];

/// Roles a chat message may have (OpenAI's, plus harmony's `developer`).
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

use crate::sampler::{MAX_STOP_BYTES, MAX_STOPS};

pub(crate) fn invalid(msg: impl Into<String>) -> ServiceError {
    ServiceError {
        code: ErrorCode::InvalidRequest,
        message: msg.into(),
    }
}

/// "a string", "an array", ...: for error messages about a JSON value's type.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn number(key: &str, v: &Value) -> Result<f32, ServiceError> {
    v.as_f64()
        .map(|f| f as f32)
        .ok_or_else(|| invalid(format!("{key}: expected a number, got {}", type_name(v))))
}

fn unsigned(key: &str, v: &Value) -> Result<u64, ServiceError> {
    v.as_u64().ok_or_else(|| match v.as_f64() {
        Some(f) if f < 0.0 => invalid(format!("{key}: must not be negative (got {f})")),
        Some(f) => invalid(format!("{key}: expected an integer (got {f})")),
        None => invalid(format!(
            "{key}: expected a non-negative integer, got {}",
            type_name(v)
        )),
    })
}

/// Applies the options in `fields` to `req`. Keys in `skip` belong to the caller (the input, the
/// MQTT routing fields); any other key not in [`OPTION_NAMES`] is refused, naming it.
pub fn parse_options(
    fields: &Map<String, Value>,
    skip: &[&str],
    req: &mut Request,
) -> Result<(), ServiceError> {
    if fields.contains_key("response_format") && fields.contains_key("grammar") {
        return Err(invalid(
            "response_format and grammar: give one of them, not both",
        ));
    }
    for (key, v) in fields {
        let key = key.as_str();
        match key {
            _ if skip.contains(&key) => {}
            "max_tokens" => {
                let n = unsigned(key, v)?;
                if n == 0 {
                    return Err(invalid("max_tokens: must be positive"));
                }
                req.max_tokens = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
            "temperature" => req.sampling.temperature = number(key, v)?,
            "top_p" => req.sampling.top_p = number(key, v)?,
            "min_p" => req.sampling.min_p = number(key, v)?,
            "repetition_penalty" => req.sampling.repetition_penalty = number(key, v)?,
            "top_k" => {
                req.sampling.top_k = usize::try_from(unsigned(key, v)?).unwrap_or(usize::MAX)
            }
            "seed" => req.sampling.seed = Some(unsigned(key, v)?),
            "stop" => {
                req.stop = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(items) => items
                        .iter()
                        .map(|i| {
                            i.as_str().map(str::to_string).ok_or_else(|| {
                                invalid(format!(
                                    "stop: expected strings, got {} in the list",
                                    type_name(i)
                                ))
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    other => {
                        return Err(invalid(format!(
                            "stop: expected a string or a list of strings, got {}",
                            type_name(other)
                        )));
                    }
                };
                if req.stop.is_empty() || req.stop.len() > MAX_STOPS {
                    return Err(invalid(format!(
                        "stop: give 1 to {MAX_STOPS} strings, got {}",
                        req.stop.len()
                    )));
                }
                if req.stop.iter().any(String::is_empty) {
                    return Err(invalid("stop: strings must not be empty"));
                }
                if let Some(long) = req.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
                    return Err(invalid(format!(
                        "stop: each string at most {MAX_STOP_BYTES} bytes, got one of {}",
                        long.len()
                    )));
                }
            }
            "reasoning_effort" => {
                let s = v.as_str().ok_or_else(|| {
                    invalid(format!(
                        "reasoning_effort: expected a string, got {}",
                        type_name(v)
                    ))
                })?;
                req.reasoning_effort = Some(ReasoningEffort::parse(s).ok_or_else(|| {
                    invalid(format!(
                        "reasoning_effort: {s:?}: expected low, medium or high"
                    ))
                })?);
            }
            "response_format" => {
                req.format =
                    Format::from_response_format(&structured(key, v)?).map_err(|e| invalid(e.0))?;
            }
            "grammar" => {
                req.format =
                    Some(Format::from_grammar(&structured(key, v)?).map_err(|e| invalid(e.0))?);
            }
            // Read together below.
            "tools" | "tool_choice" | "parallel_tool_calls" => {}
            other => {
                return Err(invalid(format!(
                    "unknown field {other:?} (known: {})",
                    OPTION_NAMES.join(", ")
                )));
            }
        }
    }
    let tools = fields
        .get("tools")
        .map(|v| structured("tools", v))
        .transpose()?;
    let choice = match fields.get("tool_choice") {
        Some(Value::String(s)) if ["auto", "none", "required"].contains(&s.as_str()) => {
            Some(Value::String(s.clone()))
        }
        Some(v) => Some(structured("tool_choice", v)?),
        None => None,
    };
    let parallel = match fields.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(invalid(format!(
                "parallel_tool_calls: expected a boolean, got {}",
                type_name(other)
            )));
        }
    };
    if tools.is_some() || choice.is_some() {
        let mut t = crate::tools::Tools::parse(tools.as_ref(), choice.as_ref())
            .map_err(|e| invalid(e.0))?;
        t.parallel = parallel;
        req.tools = (!t.list.is_empty()).then(|| Arc::new(t));
    }
    req.sampling
        .validate()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(())
}

/// A request as the JSON fields the transports read (`messages` or `prompt`, then the options
/// of [`parse_options`]): the inverse of parsing, so that parsing these fields gives the same
/// request again. The sampling values are written whether or not they are the defaults (the
/// fields stand alone); f32 values widen exactly. The fuzz targets `mqtt_request` and
/// `dbus_options` check the round trip on every request they parse.
pub fn request_fields(req: &Request) -> Map<String, Value> {
    use crate::tools::ToolChoice;
    let mut m = Map::new();
    match &req.input {
        Input::Messages(msgs) => {
            let msgs = serde_json::to_value(msgs).expect("messages serialize to JSON");
            m.insert("messages".into(), msgs);
        }
        Input::Prompt { text, .. } => {
            m.insert("prompt".into(), text.clone().into());
        }
    }
    if let Some(n) = req.max_tokens {
        m.insert("max_tokens".into(), n.into());
    }
    let s = &req.sampling;
    let float = |f: f32| Value::from(f64::from(f));
    m.insert("temperature".into(), float(s.temperature));
    m.insert("top_p".into(), float(s.top_p));
    m.insert("min_p".into(), float(s.min_p));
    m.insert("repetition_penalty".into(), float(s.repetition_penalty));
    m.insert("top_k".into(), s.top_k.into());
    if let Some(seed) = s.seed {
        m.insert("seed".into(), seed.into());
    }
    if !req.stop.is_empty() {
        m.insert("stop".into(), req.stop.clone().into());
    }
    if let Some(e) = req.reasoning_effort {
        m.insert("reasoning_effort".into(), e.as_str().into());
    }
    match &req.format {
        None => {}
        Some(Format::JsonObject) => {
            m.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(Format::JsonSchema { name, schema }) => {
            m.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema}}),
            );
        }
        Some(Format::Lark(g)) => {
            m.insert("grammar".into(), json!({"type": "lark", "value": g}));
        }
        Some(Format::Regex(r)) => {
            m.insert("grammar".into(), json!({"type": "regex", "value": r}));
        }
    }
    if let Some(t) = &req.tools {
        m.insert("tools".into(), t.template_json());
        let choice = match &t.choice {
            ToolChoice::Auto => json!("auto"),
            ToolChoice::None => json!("none"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Function(name) => json!({"type": "function", "function": {"name": name}}),
        };
        m.insert("tool_choice".into(), choice);
        m.insert("parallel_tool_calls".into(), t.parallel.into());
    }
    m
}

/// A completion's `tool_calls` in OpenAI's shape (`[{"id", "type": "function", "function":
/// {"name", "arguments"}}]`), as MQTT and HTTP report them.
pub fn tool_calls_json(c: &crate::api::Completion) -> Value {
    Value::Array(c.tool_calls.iter().map(|t| t.to_json()).collect())
}

/// A structured option's value: the object itself, or (for D-Bus callers, whose nested
/// dictionaries are awkward for a JSON schema) a string holding it as JSON.
fn structured(key: &str, v: &Value) -> Result<Value, ServiceError> {
    match v {
        Value::String(s) => {
            parse_json(s).map_err(|e| invalid(format!("{key}: the string is not JSON: {e}")))
        }
        other => Ok(other.clone()),
    }
}

/// Checks chat messages: at least one, known roles.
pub fn check_messages(messages: &[Message]) -> Result<(), ServiceError> {
    if messages.is_empty() {
        return Err(invalid("messages: must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(invalid(format!(
                "messages[{i}].role: {:?} is not one of {}",
                m.role,
                ROLES.join(", ")
            )));
        }
    }
    Ok(())
}

/// Fields a chat message may have (OpenAI's).
pub const MESSAGE_FIELDS: &[&str] = &["role", "content", "name", "tool_calls", "tool_call_id"];

/// An assistant turn's `tool_calls`: `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`, `arguments` a JSON string or object.
pub(crate) fn tool_calls_from_json(
    i: usize,
    role: &str,
    v: &Value,
) -> Result<Vec<Value>, ServiceError> {
    if role != "assistant" {
        return Err(invalid(format!(
            "messages[{i}].tool_calls: only an assistant message makes calls"
        )));
    }
    let calls = v.as_array().ok_or_else(|| {
        invalid(format!(
            "messages[{i}].tool_calls: expected a list, got {}",
            type_name(v)
        ))
    })?;
    for (j, c) in calls.iter().enumerate() {
        let at = format!("messages[{i}].tool_calls[{j}]");
        let f = c
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid(format!("{at}.function: expected an object")))?;
        if !f.get("name").is_some_and(Value::is_string) {
            return Err(invalid(format!("{at}.function.name: expected a string")));
        }
        match f.get("arguments") {
            Some(Value::String(_) | Value::Object(_)) | None => {}
            Some(other) => {
                return Err(invalid(format!(
                    "{at}.function.arguments: expected a JSON string or an object, got {}",
                    type_name(other)
                )));
            }
        }
        if let Some(id) = c.get("id")
            && !id.is_string()
        {
            return Err(invalid(format!("{at}.id: expected a string")));
        }
    }
    Ok(calls.clone())
}

/// Parses `messages` from a JSON value: `[{"role": "...", "content": "..."}, ...]`, with
/// OpenAI's tool fields (`tool_calls`, `tool_call_id`, `name`).
pub fn messages_from_json(v: &Value) -> Result<Vec<Message>, ServiceError> {
    let items = v.as_array().ok_or_else(|| {
        invalid(format!(
            "messages: expected a list of {{role, content}} objects, got {}",
            type_name(v)
        ))
    })?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item.as_object().ok_or_else(|| {
            invalid(format!(
                "messages[{i}]: expected an object, got {}",
                type_name(item)
            ))
        })?;
        let text = |name: &str| match obj.get(name) {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            None => Ok(None),
            Some(other) => Err(invalid(format!(
                "messages[{i}].{name}: expected a string, got {}",
                type_name(other)
            ))),
        };
        if let Some(k) = obj.keys().find(|k| !MESSAGE_FIELDS.contains(&k.as_str())) {
            return Err(invalid(format!(
                "messages[{i}]: unknown field {k:?} (known: {})",
                MESSAGE_FIELDS.join(", ")
            )));
        }
        let role =
            text("role")?.ok_or_else(|| invalid(format!("messages[{i}]: missing \"role\"")))?;
        let tool_calls = match obj.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(v) => Some(tool_calls_from_json(i, &role, v)?),
        };
        // An assistant turn that only calls tools may have no content (OpenAI sends null).
        let content = match obj.get("content") {
            Some(Value::Null) | None if tool_calls.is_some() => String::new(),
            _ => text("content")?
                .ok_or_else(|| invalid(format!("messages[{i}]: missing \"content\"")))?,
        };
        let tool_call_id = text("tool_call_id")?;
        if tool_call_id.is_some() && role != "tool" {
            return Err(invalid(format!(
                "messages[{i}].tool_call_id: only a tool message answers a call"
            )));
        }
        out.push(Message {
            role,
            content,
            tool_calls,
            tool_call_id,
            name: text("name")?,
        });
    }
    check_messages(&out)?;
    Ok(out)
}

/// Chat input, checked.
pub fn chat_input(messages: Vec<Message>) -> Result<Input, ServiceError> {
    check_messages(&messages)?;
    Ok(Input::Messages(messages))
}

/// Plain-text completion input: the prompt is tokenized as is, without a chat template.
pub fn complete_input(prompt: String) -> Result<Input, ServiceError> {
    if prompt.is_empty() {
        return Err(invalid("prompt: must not be empty"));
    }
    Ok(Input::Prompt {
        text: prompt,
        raw: true,
    })
}

/// Parses JSON as `serde_json` does, but refuses an object that names a key twice (serde_json
/// keeps the last one silently, so `{"max_tokens": 5, "max_tokens": 500}` would be a
/// 500-token request nobody sees): the error names the key and its position.
pub fn parse_json(text: &str) -> Result<Value, serde_json::Error> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_str(text);
    let v = NoDuplicateKeys.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

struct NoDuplicateKeys;

impl<'de> serde::de::DeserializeSeed<'de> for NoDuplicateKeys {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(NoDuplicateKeys)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = m.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("key {k:?} appears twice")));
            }
            let v = m.next_value_seed(NoDuplicateKeys)?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// `usage` as both transports report it.
pub fn usage_json(u: &Usage) -> Value {
    serde_json::json!({
        "prompt_tokens": u.prompt_tokens,
        "cached_tokens": u.cached_tokens,
        "completion_tokens": u.completion_tokens,
        "ttft_ms": u.ttft_ms,
        "prefill_tok_s": u.prefill_tok_s,
        "decode_tok_s": u.decode_tok_s,
        "grammar_ms": u.grammar_ms,
        "forced_tokens": u.forced_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(json: &str) -> Result<Request, ServiceError> {
        let map: Map<String, Value> = serde_json::from_str(json).unwrap();
        let mut r = Request::new(complete_input("x".into()).unwrap());
        parse_options(&map, &["prompt"], &mut r).map(|()| r)
    }

    #[test]
    fn options_are_applied() {
        let r = opts(r#"{"prompt":"x","max_tokens":5,"temperature":0,"top_p":0.9,"top_k":40,"min_p":0.05,"repetition_penalty":1.1,"seed":7,"stop":["\n","END"],"reasoning_effort":"low"}"#).unwrap();
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.sampling.top_k, 40);
        assert_eq!(r.sampling.seed, Some(7));
        assert_eq!(r.stop, ["\n", "END"]);
        assert_eq!(r.reasoning_effort, Some(ReasoningEffort::Low));
        assert_eq!(opts(r#"{"stop":"x"}"#).unwrap().stop, ["x"]);
    }

    #[test]
    fn json_with_a_key_twice_is_refused_at_any_depth() {
        let ok = parse_json(r#"{"a":1,"b":[{"a":2},{"a":3}],"c":{"d":null}}"#).unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"a":1,"b":[{"a":2},{"a":3}],"c":{"d":null}})
        );
        for (text, key) in [
            (r#"{"max_tokens":2,"max_tokens":500}"#, "max_tokens"),
            (r#"{"messages":[{"role":"user","role":"system"}]}"#, "role"),
            (r#"{"x":{"y":1,"y":1}}"#, "y"),
        ] {
            let e = parse_json(text).unwrap_err().to_string();
            assert!(e.contains(&format!("key {key:?} appears twice")), "{e}");
        }
        assert!(parse_json("{} x").is_err(), "trailing characters");
    }

    #[test]
    fn bad_options_name_the_field() {
        let e = |j: &str| opts(j).unwrap_err().message;
        assert!(e(r#"{"temprature":1}"#).contains("\"temprature\""));
        assert!(e(r#"{"temperature":"hot"}"#).starts_with("temperature: expected a number"));
        assert!(e(r#"{"temperature":-1}"#).starts_with("temperature"));
        assert!(e(r#"{"temperature":1e9}"#).starts_with("temperature"));
        assert!(e(r#"{"max_tokens":-3}"#).starts_with("max_tokens: must not be negative"));
        assert!(e(r#"{"max_tokens":0}"#).starts_with("max_tokens"));
        assert!(e(r#"{"max_tokens":2.5}"#).starts_with("max_tokens: expected an integer"));
        assert!(e(r#"{"top_p":0}"#).starts_with("top_p"));
        assert!(e(r#"{"top_k":-1}"#).starts_with("top_k"));
        assert!(e(r#"{"seed":"x"}"#).starts_with("seed"));
        assert!(e(r#"{"stop":[1]}"#).starts_with("stop"));
        let long = format!(r#"{{"stop":["{}"]}}"#, "z".repeat(300));
        assert!(e(&long).starts_with("stop: each string at most 256 bytes, got one of 300"));
        assert!(e(r#"{"reasoning_effort":"max"}"#).starts_with("reasoning_effort"));
    }

    #[test]
    fn messages_are_checked() {
        let e = |j: &str| {
            messages_from_json(&serde_json::from_str(j).unwrap())
                .unwrap_err()
                .message
        };
        assert_eq!(e("[]"), "messages: must not be empty");
        assert!(e(r#"[{"role":"wizard","content":"x"}]"#).starts_with("messages[0].role"));
        assert!(e(r#"[{"role":"user"}]"#).contains("missing \"content\""));
        assert!(e(r#"[{"role":"user","content":5}]"#).starts_with("messages[0].content"));
        assert!(e(r#"[{"role":"user","content":"x","nom":"a"}]"#).contains("\"nom\""));
        assert!(
            e(r#"[{"role":"user","content":"x","tool_calls":[]}]"#).contains("only an assistant")
        );
        assert!(
            e(r#"[{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":3}}]}]"#)
                .starts_with("messages[0].tool_calls[0].function.arguments")
        );
        let ok = messages_from_json(&serde_json::json!([
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}])).unwrap();
        assert_eq!(ok[1].tool_call_id.as_deref(), Some("c1"));
        assert!(e(r#"{"role":"user"}"#).starts_with("messages: expected a list"));
        let ok = messages_from_json(&serde_json::json!([{"role":"user","content":"hi"}])).unwrap();
        assert_eq!(ok[0].content, "hi");
    }
}
