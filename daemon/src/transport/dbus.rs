//! D-Bus transport (zbus): `org.edgellm.Inference1` at `/org/edgellm/Inference1`, wire <->
//! [`crate::api`] and nothing else. The full contract is `docs/dbus-api.md`.
//!
//! - `Chat(a(ss) messages, a{sv} options) -> (s text, a{sv} stats)` and
//!   `Complete(s prompt, a{sv} options) -> (s text, a{sv} stats)` reply when generation ends.
//! - `StartChat(a(ss), a{sv}) -> (o request)` exports a per-request object
//!   (`org.edgellm.Inference1.Request`: signals `Delta(s)`, `Finished(s reason, a{sv} stats)`
//!   unicast to the caller, method `Cancel()` for the caller only), at an unguessable path,
//!   removed after `Finished`.
//! - Properties `Model`, `Backend`, `State`, `QueueLength`, `MaxContext`, with
//!   `PropertiesChanged` for `State` and `QueueLength`.
//! - Errors `org.edgellm.Inference1.Error.{Busy,InvalidRequest,PromptTooLong,ShuttingDown,Internal}`.
//!
//! A caller that leaves the bus (its unique name loses its owner) cancels its requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Variant, interface};

use super::{Origin, invalid, parse_options};
use crate::api::{Completion, Event, Request};
use crate::chat::Message;
use crate::config::DbusConfig;
use crate::sampler::SamplingParams;
use crate::scheduler::{ErrorCode, Handle, RequestEvent, ServiceError};

pub const BUS_NAME: &str = "org.edgellm.Inference1";
pub const OBJECT_PATH: &str = "/org/edgellm/Inference1";
pub const REQUEST_INTERFACE: &str = "org.edgellm.Inference1.Request";

/// The error names of the interface.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.edgellm.Inference1.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    Busy(String),
    InvalidRequest(String),
    PromptTooLong(String),
    ShuttingDown(String),
    Internal(String),
}

impl From<ServiceError> for Error {
    fn from(e: ServiceError) -> Self {
        match e.code {
            ErrorCode::Busy => Error::Busy(e.message),
            ErrorCode::InvalidRequest => Error::InvalidRequest(e.message),
            ErrorCode::PromptTooLong => Error::PromptTooLong(e.message),
            ErrorCode::ShuttingDown => Error::ShuttingDown(e.message),
            ErrorCode::Internal => Error::Internal(e.message),
        }
    }
}

/// A request's `a{sv}` options in the order they came, every entry kept: a dictionary that names
/// a key twice is refused by [`chat_request_from`] (a `HashMap` would silently keep the last).
#[derive(Debug, Default)]
pub struct Options(Vec<(String, OwnedVariant)>);

impl zbus::Type for Options {
    const SIGNATURE: &'static zbus::Signature = <HashMap<String, OwnedVariant>>::SIGNATURE;
}

impl<'de> serde::Deserialize<'de> for Options {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Options;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an a{sv} dictionary")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Options, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, OwnedVariant>()? {
                    out.push(entry);
                }
                Ok(Options(out))
            }
        }
        d.deserialize_map(Entries)
    }
}
type Stats = HashMap<String, OwnedVariant>;

/// A D-Bus value as JSON, so options go through the same parser as MQTT payloads. Integers,
/// doubles, strings, booleans, arrays of them and string-keyed dictionaries (a nested
/// `response_format` or `grammar`) are options' types; anything else is named.
pub fn variant_to_json(key: &str, v: &Variant<'_>) -> Result<Value, ServiceError> {
    Ok(match v {
        Variant::Bool(b) => Value::Bool(*b),
        Variant::U8(n) => Value::from(*n),
        Variant::I16(n) => Value::from(*n),
        Variant::U16(n) => Value::from(*n),
        Variant::I32(n) => Value::from(*n),
        Variant::U32(n) => Value::from(*n),
        Variant::I64(n) => Value::from(*n),
        Variant::U64(n) => Value::from(*n),
        Variant::F64(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| invalid(format!("{key}: {f} is not a finite number")))?,
        Variant::Str(s) => Value::String(s.as_str().to_string()),
        Variant::Variant(inner) => variant_to_json(key, inner)?,
        Variant::Array(a) => Value::Array(
            a.inner()
                .iter()
                .map(|item| variant_to_json(key, item))
                .collect::<Result<_, _>>()?,
        ),
        // A nested dictionary (`response_format`, `grammar`): string keys only.
        Variant::Dict(d) => {
            let mut m = Map::new();
            for (k, v) in d.iter() {
                let Variant::Str(k) = k else {
                    return Err(invalid(format!(
                        "{key}: dictionary keys must be strings, got {}",
                        k.value_signature()
                    )));
                };
                if m.insert(k.as_str().to_string(), variant_to_json(key, v)?)
                    .is_some()
                {
                    return Err(invalid(format!("{key}: {:?} is given twice", k.as_str())));
                }
            }
            Value::Object(m)
        }
        other => {
            return Err(invalid(format!(
                "{key}: unsupported D-Bus type {}",
                other.value_signature()
            )));
        }
    })
}

/// The options as JSON fields, each key once.
fn options_json(options: &Options) -> Result<Map<String, Value>, ServiceError> {
    let mut map = Map::new();
    for (k, v) in &options.0 {
        if map.insert(k.clone(), variant_to_json(k, v)?).is_some() {
            return Err(invalid(format!("options: {k:?} is given twice")));
        }
    }
    Ok(map)
}

fn request_with(
    defaults: SamplingParams,
    input: crate::api::Input,
    map: &Map<String, Value>,
) -> Result<Request, ServiceError> {
    let mut req = Request::new(input);
    req.sampling = defaults;
    req.origin = Origin::dbus;
    parse_options(map, &["messages"], &mut req)?;
    Ok(req)
}

/// `Chat`'s and `StartChat`'s arguments as a request (over `defaults`, the package's sampling),
/// or why they are refused. Pure: the `dbus_options` fuzz target calls it on arbitrary
/// D-Bus-encoded arguments.
pub fn chat_request_from(
    messages: Vec<(String, String)>,
    options: &Options,
    defaults: SamplingParams,
) -> Result<Request, ServiceError> {
    let map = options_json(options)?;
    request_with(defaults, chat_input(messages, &map)?, &map)
}

/// `Complete`'s arguments as a request, or why they are refused.
pub fn complete_request_from(
    prompt: String,
    options: &Options,
    defaults: SamplingParams,
) -> Result<Request, ServiceError> {
    let map = options_json(options)?;
    if map.contains_key("messages") {
        return Err(invalid("messages: Complete takes a prompt; use Chat"));
    }
    request_with(defaults, super::complete_input(prompt)?, &map)
}

/// A chat's history: the `a(ss)` argument, or (for histories with tool calls, which `a(ss)`
/// cannot carry) the `messages` option, OpenAI's message list as JSON or `aa{sv}`, when the
/// argument is empty.
fn chat_input(
    messages: Vec<(String, String)>,
    map: &Map<String, Value>,
) -> Result<crate::api::Input, ServiceError> {
    match map.get("messages") {
        Some(_) if !messages.is_empty() => Err(invalid(
            "messages: give the history as the a(ss) argument or as the messages option, not both",
        )),
        Some(Value::String(s)) => super::chat_input(super::messages_from_json(
            &super::parse_json(s)
                .map_err(|e| invalid(format!("messages: the string is not JSON: {e}")))?,
        )?),
        Some(v) => super::chat_input(super::messages_from_json(v)?),
        None => super::chat_input(
            messages
                .into_iter()
                .map(|(role, content)| Message::new(role, content))
                .collect(),
        ),
    }
}

/// The request, or why it is refused (counted in the metrics as a D-Bus refusal).
fn counted(svc: &super::Inference, req: Result<Request, ServiceError>) -> Result<Request, Error> {
    if let Err(e) = &req {
        svc.refused(Origin::dbus, e);
    }
    Ok(req?)
}

/// `Finished`'s and the replies' stats dictionary.
pub fn stats(c: &Completion) -> Stats {
    let u = &c.usage;
    let mut s = Stats::new();
    s.insert(
        "finish_reason".into(),
        OwnedVariant::from(zbus::Str::from(c.finish_reason.as_str().to_string())),
    );
    s.insert("prompt_tokens".into(), (u.prompt_tokens as u32).into());
    s.insert("cached_tokens".into(), (u.cached_tokens as u32).into());
    s.insert(
        "completion_tokens".into(),
        (u.completion_tokens as u32).into(),
    );
    s.insert("ttft_ms".into(), u.ttft_ms.into());
    s.insert("prefill_tok_s".into(), u.prefill_tok_s.into());
    s.insert("decode_tok_s".into(), u.decode_tok_s.into());
    s.insert("grammar_ms".into(), u.grammar_ms.into());
    s.insert("forced_tokens".into(), (u.forced_tokens as u32).into());
    if !c.tool_calls.is_empty() {
        let calls: Vec<(String, String, String)> = c
            .tool_calls
            .iter()
            .map(|t| (t.id.clone(), t.name.clone(), t.arguments.clone()))
            .collect();
        if let Ok(v) = OwnedVariant::try_from(Variant::from(calls)) {
            s.insert("tool_calls".into(), v);
        }
    }
    s
}

/// The service object.
pub struct Inference {
    svc: Arc<super::Inference>,
    next_id: AtomicU64,
}

impl Inference {
    /// Submits, then answers from the event stream when the request ends.
    async fn run_to_end(
        &self,
        conn: &Connection,
        hdr: &Header<'_>,
        mut req: Request,
    ) -> Result<(String, Stats), Error> {
        req.stream = false;
        let Handle { mut events, cancel } = self.svc.submit(req)?;
        let _watch = watch_caller(conn, hdr.sender(), cancel);
        self.svc
            .track(async move {
                while let Some(ev) = events.recv().await {
                    match ev {
                        RequestEvent::Event(_) => {}
                        RequestEvent::Done(c) => return Ok((c.text.clone(), stats(&c))),
                        RequestEvent::Error(e) => return Err(Error::from(e)),
                    }
                }
                Err(Error::Internal(
                    "the engine dropped the request without an answer".into(),
                ))
            })
            .await
    }
}

#[interface(name = "org.edgellm.Inference1")]
impl Inference {
    /// Chat completion; replies with the whole answer and its stats.
    #[zbus(out_args("text", "stats"))]
    async fn chat(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        messages: Vec<(String, String)>,
        options: Options,
    ) -> Result<(String, Stats), Error> {
        let req = counted(
            &self.svc,
            chat_request_from(messages, &options, self.svc.default_sampling()),
        )?;
        self.run_to_end(conn, &hdr, req).await
    }

    /// Plain-text completion (no chat template); replies with the whole answer and its stats.
    #[zbus(out_args("text", "stats"))]
    async fn complete(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        prompt: String,
        options: Options,
    ) -> Result<(String, Stats), Error> {
        let req = counted(
            &self.svc,
            complete_request_from(prompt, &options, self.svc.default_sampling()),
        )?;
        self.run_to_end(conn, &hdr, req).await
    }

    /// Streaming chat: returns a request object whose `Delta` and `Finished` signals are sent to
    /// the caller only. Subscribe to them (interface `org.edgellm.Inference1.Request`) before
    /// calling, as the first `Delta` may follow the reply at once.
    #[zbus(out_args("request"))]
    async fn start_chat(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
        messages: Vec<(String, String)>,
        options: Options,
    ) -> Result<OwnedObjectPath, Error> {
        let req = counted(
            &self.svc,
            chat_request_from(messages, &options, self.svc.default_sampling()),
        )?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let path =
            OwnedObjectPath::try_from(format!("{OBJECT_PATH}/request/{}", unguessable_name(id)))
                .map_err(|e| Error::Internal(e.to_string()))?;
        let caller = hdr
            .sender()
            .map(|s| s.to_owned())
            .ok_or_else(|| Error::InvalidRequest("the call has no sender".into()))?;
        let Handle { events, cancel } = self.svc.submit(req)?;
        conn.object_server()
            .at(
                &path,
                RequestObject {
                    cancel: cancel.clone(),
                    owner: caller.to_owned(),
                },
            )
            .await?;
        let emitter = SignalEmitter::new(conn, path.clone())?
            .set_destination(BusName::Unique(caller.clone()))
            .into_owned();
        let watch = watch_caller(conn, Some(&caller), cancel);
        let conn = conn.clone();
        self.svc
            .spawn(stream_request(conn, emitter, path.clone(), events, watch));
        Ok(path)
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn model(&self) -> String {
        self.svc.info().model.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn backend(&self) -> String {
        self.svc.info().backend.to_string()
    }

    /// Why `Backend` serves: "configured", or what `auto` found (including why ONNX Runtime
    /// could not, when tract serves instead).
    #[zbus(property(emits_changed_signal = "const"))]
    fn backend_reason(&self) -> String {
        self.svc.info().backend_reason.clone()
    }

    /// `loading` | `ready` | `busy` | `stopping`.
    #[zbus(property)]
    fn state(&self) -> String {
        self.svc.status().borrow().state.as_str().to_string()
    }

    /// Requests waiting behind the running ones.
    #[zbus(property)]
    fn queue_length(&self) -> u32 {
        self.svc.status().borrow().queue_length as u32
    }

    /// Requests running now (prefilling or decoding), at most `Parallel`.
    #[zbus(property)]
    fn running(&self) -> u32 {
        self.svc.status().borrow().running as u32
    }

    /// Requests that run together: `[limits] parallel` when the backend batches, else 1.
    #[zbus(property(emits_changed_signal = "const"))]
    fn parallel(&self) -> u32 {
        self.svc.info().parallel as u32
    }

    /// Requests ended since the daemon started, whatever their transport and outcome (the
    /// `edgellm_requests_total` of `/metrics`, summed). Not signalled: read it when needed.
    #[zbus(property(emits_changed_signal = "false"))]
    fn requests_total(&self) -> u64 {
        self.svc.totals().0
    }

    /// Tokens generated since the daemon started. Not signalled.
    #[zbus(property(emits_changed_signal = "false"))]
    fn completion_tokens_total(&self) -> u64 {
        self.svc.totals().1
    }

    /// Tokens of context: prompt plus answer (the configured `max_length`).
    #[zbus(property(emits_changed_signal = "const"))]
    fn max_context(&self) -> u32 {
        self.svc.info().max_context as u32
    }
}

/// The per-request object of `StartChat`. It answers its owner only (the unique name that
/// called `StartChat`): its signals are unicast to that name, and `Cancel` from anyone else is
/// refused with `org.freedesktop.DBus.Error.AccessDenied`, so one client of a shared system
/// bus can neither read nor end another's answer. The path ends in 128 random bits, so it
/// cannot be guessed either.
pub struct RequestObject {
    cancel: CancellationToken,
    owner: UniqueName<'static>,
}

#[interface(name = "org.edgellm.Inference1.Request")]
impl RequestObject {
    /// Ends the request; `Finished` follows with reason `cancelled`.
    fn cancel(&self, #[zbus(header)] hdr: Header<'_>) -> zbus::fdo::Result<()> {
        if hdr.sender() != Some(&self.owner) {
            return Err(zbus::fdo::Error::AccessDenied(
                "only the client that started this request may cancel it".into(),
            ));
        }
        self.cancel.cancel();
        Ok(())
    }

    #[zbus(signal)]
    async fn delta(emitter: &SignalEmitter<'_>, text: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn finished(emitter: &SignalEmitter<'_>, reason: &str, stats: Stats) -> zbus::Result<()>;
}

/// Forwards a request's events as signals, then removes its object.
async fn stream_request(
    conn: Connection,
    emitter: SignalEmitter<'static>,
    path: OwnedObjectPath,
    mut events: tokio::sync::mpsc::UnboundedReceiver<RequestEvent>,
    watch: CallerWatch,
) {
    let mut send_failed = false;
    let mut watch = Some(watch);
    while let Some(ev) = events.recv().await {
        if !matches!(ev, RequestEvent::Event(_)) {
            // Terminal: a caller leaving after this is no cancellation.
            watch.take();
        }
        let sent = match ev {
            RequestEvent::Event(Event::Delta(text)) => RequestObject::delta(&emitter, &text).await,
            RequestEvent::Event(Event::Reasoning(_)) => Ok(()),
            RequestEvent::Done(c) => {
                RequestObject::finished(&emitter, c.finish_reason.as_str(), stats(&c)).await
            }
            RequestEvent::Error(e) => {
                let mut s = Stats::new();
                s.insert(
                    "error_code".into(),
                    OwnedVariant::from(zbus::Str::from(e.code.as_str().to_string())),
                );
                s.insert(
                    "error_message".into(),
                    OwnedVariant::from(zbus::Str::from(e.message.clone())),
                );
                RequestObject::finished(&emitter, "error", s).await
            }
        };
        if let Err(e) = sent
            && !send_failed
        {
            send_failed = true;
            tracing::warn!("D-Bus signal on {}: {e}", path.as_str());
        }
    }
    let _ = conn.object_server().remove::<RequestObject, _>(&path).await;
}

/// A request object's name: 128 bits from the kernel's random source (the request counter
/// mixed with the std hasher's per-process random keys if /dev/urandom cannot be read).
fn unguessable_name(counter: u64) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut bytes = [0u8; 16];
    let from_kernel =
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_kernel.is_err() {
        for (i, half) in bytes.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(counter);
            h.write_usize(i);
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
}

/// Cancels a request when its caller leaves the bus; stops watching when dropped.
pub struct CallerWatch(Option<tokio::task::JoinHandle<()>>);

impl Drop for CallerWatch {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}

fn watch_caller(
    conn: &Connection,
    caller: Option<&UniqueName<'_>>,
    cancel: CancellationToken,
) -> CallerWatch {
    let Some(caller) = caller.map(|c| c.to_string()) else {
        return CallerWatch(None);
    };
    let conn = conn.clone();
    CallerWatch(Some(tokio::spawn(async move {
        let gone = async {
            let proxy = zbus::fdo::DBusProxy::new(&conn).await?;
            let mut changes = proxy
                .receive_name_owner_changed_with_args(&[(0, caller.as_str())])
                .await?;
            // Subscribed first, then checked: a caller gone in between is not missed.
            let name = BusName::try_from(caller.as_str())?;
            if !proxy.name_has_owner(name).await? {
                return Ok::<_, zbus::Error>(true);
            }
            while let Some(change) = changes.next().await {
                if change.args()?.new_owner().is_none() {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        match gone.await {
            Ok(true) => {
                tracing::info!("D-Bus caller {caller} left: cancelling its request");
                cancel.cancel();
            }
            // The stream ended without the caller leaving: our bus connection closed, and the
            // answer could never be delivered.
            Ok(false) => {
                tracing::warn!("D-Bus connection closed: cancelling {caller}'s request");
                cancel.cancel();
            }
            Err(e) => tracing::warn!("watching D-Bus caller {caller}: {e}"),
        }
    })))
}

/// The running D-Bus service: its connection, the task forwarding status changes as
/// `PropertiesChanged`, and the watch on the connection itself.
///
/// A lost bus connection (the bus daemon died or dropped us) or a lost bus name is fatal: the
/// daemon logs it, its D-Bus requests are cancelled (their answers could never be delivered),
/// and `run` returns an error, so edgellmd exits non-zero and systemd's `Restart=on-failure`
/// starts it again once the bus is back. The same on the session bus: a session bus that dies
/// is a session that ended. (Reconnecting in place would also need every client to find the
/// restarted name; a restart does that for free and resets everything else too.)
pub struct DbusServer {
    conn: Connection,
    status_task: tokio::task::JoinHandle<()>,
    lost: CancellationToken,
    why: Arc<std::sync::Mutex<String>>,
    stopping: CancellationToken,
}

impl DbusServer {
    /// Connects to the configured bus, exports the object and takes the bus name.
    pub async fn start(svc: Arc<super::Inference>, cfg: &DbusConfig) -> Result<Self, zbus::Error> {
        let builder = if !cfg.address.is_empty() {
            zbus::connection::Builder::address(cfg.address.as_str())
        } else if cfg.bus == crate::config::Bus::Session {
            zbus::connection::Builder::session()
        } else {
            zbus::connection::Builder::system()
        };
        let iface = Inference {
            svc: svc.clone(),
            next_id: AtomicU64::new(1),
        };
        let conn = builder
            .serve_at(OBJECT_PATH, iface)
            .name(BUS_NAME)
            .build()
            .await?;
        // PropertiesChanged is emitted by hand, not through the interface's generated
        // `*_changed` methods: those lock the object server, which `StartChat` also locks to
        // export its request object, and the two would deadlock.
        let emitter = SignalEmitter::new(&conn, OBJECT_PATH)?.into_owned();
        let mut status = svc.status();
        let status_task = tokio::spawn(async move {
            let mut last = *status.borrow_and_update();
            while status.changed().await.is_ok() {
                let now = *status.borrow_and_update();
                let mut changed = HashMap::new();
                if now.state != last.state {
                    changed.insert("State", Variant::from(now.state.as_str()));
                }
                if now.queue_length != last.queue_length {
                    changed.insert("QueueLength", Variant::from(now.queue_length as u32));
                }
                if now.running != last.running {
                    changed.insert("Running", Variant::from(now.running as u32));
                }
                last = now;
                if !changed.is_empty() {
                    let _ = zbus::fdo::Properties::properties_changed(
                        &emitter,
                        zbus::names::InterfaceName::from_static_str_unchecked(BUS_NAME),
                        changed,
                        std::borrow::Cow::Borrowed(&[]),
                    )
                    .await;
                }
            }
        });
        let (lost, why, stopping) = (
            CancellationToken::new(),
            Arc::new(std::sync::Mutex::new(String::new())),
            CancellationToken::new(),
        );
        // The owner changes of our own name: a stream that ends means the connection closed;
        // a new owner means the name was taken from us.
        let proxy = zbus::fdo::DBusProxy::new(&conn).await?;
        let mut owners = proxy
            .receive_name_owner_changed_with_args(&[(0, BUS_NAME)])
            .await?;
        let me = conn
            .unique_name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        let (lost_tx, why_tx, stop_rx) = (lost.clone(), why.clone(), stopping.clone());
        tokio::spawn(async move {
            let reason = loop {
                let next = tokio::select! {
                    // `stop` gives the name up on purpose.
                    () = stop_rx.cancelled() => return,
                    next = owners.next() => next,
                };
                match next {
                    None => break "the bus connection closed".to_string(),
                    Some(change) => {
                        let owner = change
                            .args()
                            .ok()
                            .and_then(|a| a.new_owner().as_ref().map(|o| o.to_string()));
                        if owner.as_deref() != Some(me.as_str()) {
                            break format!(
                                "the bus name {BUS_NAME} passed to {}",
                                owner.as_deref().unwrap_or("nobody")
                            );
                        }
                    }
                }
            };
            tracing::error!("D-Bus lost: {reason}");
            if let Ok(mut w) = why_tx.lock() {
                *w = reason;
            }
            lost_tx.cancel();
        });
        Ok(DbusServer {
            conn,
            status_task,
            lost,
            why,
            stopping,
        })
    }

    /// Cancelled when the connection or the bus name is lost ([`DbusServer`]).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// A round trip through the bus to our own object (`org.freedesktop.DBus.Peer.Ping` on
    /// [`BUS_NAME`]): the watchdog's proof that the connection is open, the bus daemon routes,
    /// we still own the name and the object server dispatches. A hung bus daemon or a wedged
    /// dispatcher fails it (the connection alone would still look open).
    pub async fn ping(&self, within: std::time::Duration) -> Result<(), String> {
        let call = self.conn.call_method(
            Some(BUS_NAME),
            OBJECT_PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        );
        match tokio::time::timeout(within, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("D-Bus self-ping failed: {e}")),
            Err(_) => Err(format!("D-Bus self-ping unanswered within {within:?}")),
        }
    }

    /// Why [`DbusServer::lost`] fired.
    pub fn why_lost(&self) -> String {
        self.why.lock().map(|w| w.clone()).unwrap_or_default()
    }

    /// Gives the bus name up (new callers get "no such name" at once), then waits for the
    /// method calls still running to be answered.
    pub async fn stop(self) {
        self.stopping.cancel();
        let _ = self.conn.release_name(BUS_NAME).await;
        self.status_task.abort();
        let _ = self.status_task.await;
        self.conn.graceful_shutdown().await;
    }
}
