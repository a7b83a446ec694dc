//! MQTT transport (rumqttc, MQTT 5): wire <-> [`crate::api`], and the delivery guarantees. The
//! full contract is `docs/mqtt-api.md`.
//!
//! Topics, under `<topic_prefix>/<node_id>/`: `request` (QoS 1), `cancel`, `status` (retained,
//! last will `offline`), `response/<id>` (the default reply topic), `errors` (replies to payloads
//! too broken to carry an id). With `share_group` set, also `$share/<group>/<prefix>/<group>/request`
//! and `<prefix>/<group>/cancel`.
//!
//! Replies go to the request's MQTT 5 Response Topic with its Correlation Data echoed, else to
//! the payload's `reply_to` (MQTT 3.1.1 clients), else to `response/<id>`: chunks
//! `{"id","seq","delta"}` at QoS 0, then exactly one terminal message at QoS 1, a final
//! `{"id","seq","done":true,"node","text","finish_reason","usage"}` or
//! `{"id","done":true,"node","error"}` (`node`: which daemon answered, for fleets).
//!
//! Delivery across broker outages: every outgoing message goes through one queue owned by the
//! connection task. A message leaves the queue only once rumqttc has written it (QoS 0) or the
//! broker has acknowledged it (QoS 1); whatever was not, when the connection drops, is sent again
//! after the reconnect (which retries with exponential backoff, 0.25 s to 10 s). So a request in
//! flight while the broker restarts still gets its terminal message.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{Outgoing, Transport};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Origin, invalid, messages_from_json, parse_options, type_name, usage_json};
use crate::api::{Event as ApiEvent, Request};
use crate::config::MqttConfig;
use crate::scheduler::{ErrorCode, Handle, RequestEvent, ServiceError, Status};

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt.url {0:?}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")]
    Url(String),
    #[error("{what} {path}: {msg}")]
    File {
        what: &'static str,
        path: String,
        msg: String,
    },
    #[error("TLS: {0}")]
    Tls(String),
}

/// Payload fields that are not request options.
const ROUTING_FIELDS: &[&str] = &["id", "reply_to", "stream", "messages", "prompt"];

/// Topics of one daemon.
#[derive(Debug, Clone)]
struct Topics {
    node: String,
    request: String,
    cancel: String,
    status: String,
    errors: String,
    response_prefix: String,
    /// `(shared subscription filter, plain request topic, cancel topic)` of the share group.
    group: Option<(String, String, String)>,
}

impl Topics {
    fn new(cfg: &MqttConfig) -> Self {
        let node = if cfg.node_id.is_empty() {
            host_name()
        } else {
            cfg.node_id.clone()
        };
        let base = format!("{}/{}", cfg.topic_prefix, node);
        let group = (!cfg.share_group.is_empty()).then(|| {
            let g = format!("{}/{}", cfg.topic_prefix, cfg.share_group);
            (
                format!("$share/{}/{g}/request", cfg.share_group),
                format!("{g}/request"),
                format!("{g}/cancel"),
            )
        });
        Topics {
            request: format!("{base}/request"),
            cancel: format!("{base}/cancel"),
            status: format!("{base}/status"),
            errors: format!("{base}/errors"),
            response_prefix: format!("{base}/response/"),
            node,
            group,
        }
    }

    fn is_request(&self, topic: &str) -> bool {
        topic == self.request || self.group.as_ref().is_some_and(|g| topic == g.1)
    }

    fn is_cancel(&self, topic: &str) -> bool {
        topic == self.cancel || self.group.as_ref().is_some_and(|g| topic == g.2)
    }
}

/// The host name, made safe for a topic level.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "localhost".into());
    let name: String = raw
        .trim()
        .chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// `(tls, host, port)` of an `mqtt://` or `mqtts://` URL (the daemon's and `edgellm ask`'s).
pub fn parse_url(url: &str) -> Result<(bool, String, u16), MqttError> {
    let bad = || MqttError::Url(url.to_string());
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default_port,
            None => return Err(bad()),
        };
        (h.to_string(), port)
    } else if let Some((h, p)) = rest.rsplit_once(':') {
        (h.to_string(), p.parse().map_err(|_| bad())?)
    } else {
        (rest.to_string(), default_port)
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad());
    }
    Ok((tls, host, port))
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|e| MqttError::File {
        what,
        path: path.display().to_string(),
        msg: e.to_string(),
    })
}

fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, MqttError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca_file) = ca_file {
        let pem = read_file("mqtt.ca_file", ca_file)?;
        let bad = |e: &dyn std::fmt::Display| MqttError::Tls(format!("{}: {e}", ca_file.display()));
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bad(&e))?;
            roots.add(cert).map_err(|e| bad(&e))?;
        }
    } else {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            let _ = roots.add(cert);
        }
    }
    if roots.is_empty() {
        return Err(MqttError::Tls(format!(
            "no CA certificates ({})",
            ca_file.map_or("the system has none; set mqtt.ca_file".to_string(), |f| f
                .display()
                .to_string())
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One message to publish.
#[derive(Debug, Clone)]
struct OutMsg {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
    correlation: Option<bytes::Bytes>,
}

/// Where a request's replies go.
#[derive(Debug, Clone)]
struct Route {
    id: Value,
    /// This daemon's node id: which device of a share group answered.
    node: String,
    topic: String,
    correlation: Option<bytes::Bytes>,
}

impl Route {
    fn msg(&self, body: Value, qos: QoS) -> OutMsg {
        OutMsg {
            topic: self.topic.clone(),
            payload: body.to_string().into_bytes(),
            qos,
            retain: false,
            correlation: self.correlation.clone(),
        }
    }

    fn error(&self, e: &ServiceError) -> OutMsg {
        self.msg(
            json!({
                "id": self.id,
                "done": true,
                "node": self.node,
                "error": {"code": e.code.as_str(), "message": e.message},
            }),
            QoS::AtLeastOnce,
        )
    }
}

/// The MQTT side of the daemon: owns the connection and the outgoing queue.
pub struct MqttTransport {
    svc: Arc<super::Inference>,
    cfg: MqttConfig,
    topics: Topics,
    options: MqttOptions,
    /// Requests in flight by id, for the cancel topic.
    active: Arc<Mutex<HashMap<String, CancellationToken>>>,
    out_tx: mpsc::UnboundedSender<OutMsg>,
    out_rx: mpsc::UnboundedReceiver<OutMsg>,
    /// Liveness probes from the watchdog, answered by the event loop ([`MqttTransport::prober`]).
    probe_tx: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    probe_rx: mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    next_id: u64,
}

/// Asks a running [`MqttTransport`]'s event loop to answer: the watchdog's proof that the loop
/// is not wedged. A broker outage does not fail it (the loop answers between reconnects, and
/// the daemon keeps serving D-Bus meanwhile); only a loop that stopped turning does.
#[derive(Clone)]
pub struct MqttProber(mpsc::Sender<tokio::sync::oneshot::Sender<()>>);

impl MqttProber {
    pub async fn probe(&self, within: Duration) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let answered = async {
            self.0.send(tx).await.map_err(|_| ())?;
            rx.await.map_err(|_| ())
        };
        match tokio::time::timeout(within, answered).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(())) => Err("the MQTT event loop has stopped".into()),
            Err(_) => Err(format!(
                "the MQTT event loop did not answer within {within:?}"
            )),
        }
    }
}

impl MqttTransport {
    pub fn new(svc: Arc<super::Inference>, cfg: &MqttConfig) -> Result<Self, MqttError> {
        let topics = Topics::new(cfg);
        let (tls, host, port) = parse_url(&cfg.url)?;
        let mut options = MqttOptions::new(format!("edgellmd-{}", topics.node), host, port);
        options.set_keep_alive(Duration::from_secs(15));
        // Small messages (chunks, acks) must not wait for Nagle's algorithm: with it, a reply
        // waits up to a delayed-ACK timeout (~40 ms) on loopback.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        options.set_network_options(net);
        options.set_clean_start(true);
        options.set_request_channel_capacity(1024);
        // Payloads up to twice the limit reach us and get an error reply; the broker drops
        // larger ones for us (MQTT 5 Maximum Packet Size) instead of breaking the connection.
        let max_packet = (cfg.max_payload_bytes.saturating_mul(2) + 4096).min(256 << 20);
        options.set_max_packet_size(Some(max_packet as u32));
        options.set_last_will(LastWill::new(
            &topics.status,
            json!({"state": "offline", "node": topics.node}).to_string(),
            QoS::AtLeastOnce,
            true,
            None,
        ));
        if !cfg.username.is_empty() {
            let password = if let Some(file) = &cfg.password_file {
                let raw = read_file("mqtt.password_file", file)?;
                String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\r', '\n'])
                    .to_string()
            } else {
                String::new()
            };
            options.set_credentials(cfg.username.clone(), password);
        }
        if tls {
            options.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(cfg.ca_file.as_deref())?)),
            ));
        }
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (probe_tx, probe_rx) = mpsc::channel(1);
        Ok(MqttTransport {
            svc,
            cfg: cfg.clone(),
            topics,
            options,
            active: Arc::new(Mutex::new(HashMap::new())),
            out_tx,
            out_rx,
            probe_tx,
            probe_rx,
            next_id: 1,
        })
    }

    /// A handle for the watchdog to probe the event loop with, once [`MqttTransport::run`] runs.
    pub fn prober(&self) -> MqttProber {
        MqttProber(self.probe_tx.clone())
    }

    fn status_msg(&self, s: Status) -> OutMsg {
        let (requests, tokens) = self.svc.totals();
        OutMsg {
            topic: self.topics.status.clone(),
            payload: json!({
                "state": "online",
                "node": self.topics.node,
                "activity": s.state.as_str(),
                "model": self.svc.info().model,
                "backend": self.svc.info().backend,
                "backend_reason": self.svc.info().backend_reason,
                "max_context": self.svc.info().max_context,
                "queue_length": s.queue_length,
                "running": s.running,
                "parallel": self.svc.info().parallel,
                "requests_total": requests,
                "completion_tokens_total": tokens,
            })
            .to_string()
            .into_bytes(),
            qos: QoS::AtLeastOnce,
            retain: true,
            correlation: None,
        }
    }

    /// Runs until `close` is cancelled (after the service drained), then publishes the retained
    /// `offline` status, flushes and disconnects.
    pub async fn run(mut self, close: CancellationToken) {
        let (client, mut eventloop) = AsyncClient::new(self.options.clone(), 1024);
        let mut status = self.svc.status();
        let mut conn = Connection::default();
        let mut backoff = Duration::from_millis(250);
        let mut closing = false;
        let mut close_deadline = None;
        loop {
            if conn.connected {
                conn.pump(&client);
            }
            if closing && conn.idle() {
                break;
            }
            tokio::select! {
                ev = eventloop.poll() => match ev {
                    Ok(ev) => {
                        backoff = Duration::from_millis(250);
                        // Copied out first: a watch borrow held during `on_event` would
                        // deadlock the scheduler's status update on submit.
                        let now = *status.borrow();
                        self.on_event(ev, &client, &mut conn, now);
                    }
                    Err(e) => {
                        if conn.connected {
                            tracing::warn!("MQTT connection to {} lost: {e}", self.cfg.url);
                        } else {
                            tracing::warn!("MQTT broker {} unreachable: {e}", self.cfg.url);
                        }
                        conn.lost();
                        if closing {
                            break;
                        }
                        let retry = tokio::time::Instant::now() + backoff;
                        loop {
                            tokio::select! {
                                () = tokio::time::sleep_until(retry) => break,
                                () = close.cancelled() => break,
                                Some(ack) = self.probe_rx.recv() => {
                                    let _ = ack.send(());
                                }
                            }
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                },
                Some(msg) = self.out_rx.recv() => conn.queue.push_back(msg),
                Some(ack) = self.probe_rx.recv() => {
                    let _ = ack.send(());
                }
                Ok(()) = status.changed(), if !closing => {
                    let s = *status.borrow_and_update();
                    conn.queue.push_back(self.status_msg(s));
                }
                () = close.cancelled(), if !closing => {
                    closing = true;
                    while let Ok(msg) = self.out_rx.try_recv() {
                        conn.queue.push_back(msg);
                    }
                    conn.queue.push_back(OutMsg {
                        topic: self.topics.status.clone(),
                        payload: json!({"state": "offline", "node": self.topics.node})
                            .to_string()
                            .into_bytes(),
                        qos: QoS::AtLeastOnce,
                        retain: true,
                        correlation: None,
                    });
                    close_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                }
                () = sleep_until(close_deadline) => break,
            }
        }
        if conn.connected {
            let _ = client.try_disconnect();
            let flush = async {
                while let Ok(ev) = eventloop.poll().await {
                    if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
        }
        if !conn.queue.is_empty() {
            tracing::warn!(
                "MQTT: {} message(s) undelivered at exit (broker unreachable)",
                conn.queue.len()
            );
        }
    }

    fn on_event(&mut self, ev: Event, client: &AsyncClient, conn: &mut Connection, s: Status) {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                tracing::info!("MQTT connected to {}", self.cfg.url);
                conn.connected = true;
                let mut filters = vec![self.topics.request.clone(), self.topics.cancel.clone()];
                if let Some((shared, _, cancel)) = &self.topics.group {
                    filters.push(shared.clone());
                    filters.push(cancel.clone());
                }
                for f in filters {
                    if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                        tracing::error!("MQTT subscribe {f}: {e}");
                    }
                }
                if ack.session_present {
                    tracing::debug!("MQTT session resumed");
                }
                // A fresh retained status replaces the last will's `offline`.
                conn.queue.push_front(self.status_msg(s));
            }
            Event::Incoming(Packet::Publish(p)) => self.on_publish(p),
            Event::Incoming(Packet::PubAck(ack)) => conn.acked(ack.pkid),
            Event::Incoming(Packet::SubAck(ack)) => {
                for r in &ack.return_codes {
                    if !matches!(
                        r,
                        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                    ) {
                        tracing::error!("MQTT subscription refused: {r:?}");
                    }
                }
            }
            Event::Incoming(Packet::Disconnect(d)) => {
                tracing::warn!("MQTT broker disconnected us: {:?}", d.reason_code);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => conn.written(pkid),
            _ => {}
        }
    }

    fn on_publish(&mut self, p: Publish) {
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        tracing::trace!("MQTT message on {topic}, {} bytes", p.payload.len());
        if self.topics.is_cancel(&topic) {
            self.on_cancel(&p.payload);
        } else if self.topics.is_request(&topic) {
            self.on_request(p);
        } else {
            tracing::debug!("MQTT: ignoring a message on {topic}");
        }
    }

    fn on_cancel(&self, payload: &[u8]) {
        let id = serde_json::from_slice::<Value>(payload)
            .ok()
            .and_then(|v| v.get("id").and_then(id_key));
        let Some(id) = id else {
            tracing::warn!("MQTT cancel without an id: ignored");
            return;
        };
        let token = lock(&self.active).get(&id).cloned();
        match token {
            Some(t) => {
                tracing::info!("MQTT cancel of {id}");
                t.cancel();
            }
            // Fleets: another daemon of the share group may run it.
            None => tracing::debug!("MQTT cancel of {id}: not running here"),
        }
    }

    /// Parses, routes and submits one request; every outcome ends in a reply.
    fn on_request(&mut self, p: Publish) {
        let props = p.properties.unwrap_or_default();
        let parsed = payload_fields(&p.payload);
        let empty = Map::new();
        let fields = parsed.as_ref().unwrap_or(&empty);

        // The route first, so that even a bad request gets its error where it is expected.
        let id_field = fields.get("id").cloned();
        let id_field = id_field.as_ref();
        let id = match id_field {
            Some(v) if id_key(v).is_some() => v.clone(),
            _ => {
                let n = self.next_id;
                self.next_id += 1;
                Value::String(format!("{}-{n}", self.topics.node))
            }
        };
        let key = id_key(&id).unwrap_or_default();
        let reply_to = fields
            .get("reply_to")
            .and_then(Value::as_str)
            .map(str::to_string);
        let reply_to = reply_to.as_deref();
        let topic = match (&props.response_topic, reply_to) {
            (Some(t), _) if valid_topic(t) => t.clone(),
            (_, Some(t)) if valid_topic(t) => t.to_string(),
            _ if parsed.is_ok() => format!("{}{key}", self.topics.response_prefix),
            _ => self.topics.errors.clone(),
        };
        let route = Route {
            id,
            node: self.topics.node.clone(),
            topic,
            correlation: props.correlation_data.clone(),
        };

        let checked = parsed.and_then(|fields| {
            request_from_fields(
                &fields,
                p.payload.len(),
                self.cfg.max_payload_bytes,
                self.svc.default_sampling(),
            )
        });
        let (req, stream) = match checked {
            Ok(r) => r,
            Err(e) => {
                tracing::info!("MQTT request {key} refused: {}", e.message);
                self.svc.refused(Origin::mqtt, &e);
                let _ = self.out_tx.send(route.error(&e));
                return;
            }
        };
        if lock(&self.active).contains_key(&key) {
            let e = invalid(format!("id {key:?} is already in flight"));
            self.svc.refused(Origin::mqtt, &e);
            let _ = self.out_tx.send(route.error(&e));
            return;
        }
        match self.svc.submit(req) {
            Ok(handle) => {
                tracing::debug!("MQTT request {key} accepted, replies to {}", route.topic);
                lock(&self.active).insert(key.clone(), handle.cancel.clone());
                let out = self.out_tx.clone();
                let active = self.active.clone();
                self.svc.spawn(async move {
                    forward(handle, route, stream, out).await;
                    lock(&active).remove(&key);
                });
            }
            Err(e) => {
                let _ = self.out_tx.send(route.error(&e));
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An id as a map key: strings as they are, integers in decimal.
fn id_key(v: &Value) -> Option<String> {
    match v {
        // The id may become a topic level (response/<id>): no wildcards.
        Value::String(s) if !s.is_empty() && s.len() <= 256 && !s.contains(['+', '#']) => {
            Some(s.clone())
        }
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// The request a payload asks for; `defaults` are the package's sampling settings.
/// Whether `t` can be a reply topic: not empty, no wildcards.
fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#'])
}

/// A request payload's fields: the JSON object it must be, or why it is not one.
pub fn payload_fields(payload: &[u8]) -> Result<Map<String, Value>, ServiceError> {
    let text = std::str::from_utf8(payload).map_err(|e| {
        invalid(format!(
            "payload is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    match super::parse_json(text).map_err(|e| invalid(format!("payload is not valid JSON: {e}")))? {
        Value::Object(m) => Ok(m),
        other => Err(invalid(format!(
            "payload must be a JSON object, got {}",
            type_name(&other)
        ))),
    }
}

/// The request a payload's fields ask for (over `defaults`, the package's sampling) and
/// whether it streams, or why it is refused. Pure: the `mqtt_request` fuzz target calls it
/// (with [`payload_fields`]) on arbitrary payloads.
pub fn request_from_fields(
    fields: &Map<String, Value>,
    payload_len: usize,
    max_payload_bytes: usize,
    defaults: crate::sampler::SamplingParams,
) -> Result<(Request, bool), ServiceError> {
    if payload_len > max_payload_bytes {
        return Err(invalid(format!(
            "payload of {payload_len} bytes exceeds the limit of {max_payload_bytes} \
             (mqtt.max_payload_bytes)"
        )));
    }
    if let Some(v) = fields.get("id")
        && id_key(v).is_none()
    {
        return Err(invalid(
            "id: expected an integer or a string of 1 to 256 characters without + or #",
        ));
    }
    if let Some(v) = fields.get("reply_to")
        && !v.as_str().is_some_and(valid_topic)
    {
        return Err(invalid(
            "reply_to: expected a topic name (a non-empty string without + or #)",
        ));
    }
    let stream = match fields.get("stream") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream: expected a boolean")),
    };
    let mut req = build_request(fields, defaults)?;
    req.stream = stream;
    Ok((req, stream))
}

fn build_request(
    fields: &Map<String, Value>,
    defaults: crate::sampler::SamplingParams,
) -> Result<Request, ServiceError> {
    let input = match (fields.get("messages"), fields.get("prompt")) {
        (Some(_), Some(_)) => {
            return Err(invalid("give either messages or prompt, not both"));
        }
        (Some(m), None) => super::chat_input(messages_from_json(m)?)?,
        (None, Some(Value::String(p))) => super::complete_input(p.clone())?,
        (None, Some(_)) => return Err(invalid("prompt: expected a string")),
        (None, None) => return Err(invalid("missing messages (or prompt)")),
    };
    let mut req = Request::new(input);
    req.origin = Origin::mqtt;
    req.sampling = defaults;
    parse_options(fields, ROUTING_FIELDS, &mut req)?;
    Ok(req)
}

/// Forwards one request's events to its route until the terminal one.
async fn forward(
    mut handle: Handle,
    route: Route,
    stream: bool,
    out: mpsc::UnboundedSender<OutMsg>,
) {
    let mut seq = 0u64;
    while let Some(ev) = handle.events.recv().await {
        match ev {
            RequestEvent::Event(ApiEvent::Delta(text)) => {
                if stream {
                    let _ = out.send(route.msg(
                        json!({"id": route.id, "seq": seq, "delta": text}),
                        QoS::AtMostOnce,
                    ));
                    seq += 1;
                }
            }
            RequestEvent::Event(ApiEvent::Reasoning(_)) => {}
            RequestEvent::Done(c) => {
                let mut last = json!({
                    "id": route.id,
                    "seq": seq,
                    "done": true,
                    "node": route.node,
                    "text": c.text,
                    "finish_reason": c.finish_reason.as_str(),
                    "usage": usage_json(&c.usage),
                });
                if !c.tool_calls.is_empty() {
                    last["tool_calls"] = super::tool_calls_json(&c);
                }
                let _ = out.send(route.msg(last, QoS::AtLeastOnce));
                return;
            }
            RequestEvent::Error(e) => {
                let _ = out.send(route.error(&e));
                return;
            }
        }
    }
    let _ = out.send(route.error(&ServiceError {
        code: ErrorCode::Internal,
        message: "the engine dropped the request without an answer".into(),
    }));
}

/// The outgoing side of one connection: what is queued, handed to rumqttc, written, acked.
#[derive(Default)]
struct Connection {
    connected: bool,
    /// Not yet handed to rumqttc.
    queue: VecDeque<OutMsg>,
    /// Handed to rumqttc, not yet written (rumqttc writes in order).
    handed: VecDeque<OutMsg>,
    /// QoS 1, written, waiting for the broker's PubAck, by packet id.
    unacked: Vec<(u16, OutMsg)>,
}

impl Connection {
    /// Hands queued messages to rumqttc while its request channel has room.
    fn pump(&mut self, client: &AsyncClient) {
        while let Some(msg) = self.queue.pop_front() {
            if msg.topic.is_empty() || msg.topic.contains(['+', '#']) {
                // rumqttc refuses it the same way as a full channel: never retry it.
                tracing::error!(
                    "MQTT: dropping a message for the invalid topic {:?}",
                    msg.topic
                );
                continue;
            }
            let props = PublishProperties {
                correlation_data: msg.correlation.clone(),
                ..Default::default()
            };
            match client.try_publish_with_properties(
                msg.topic.clone(),
                msg.qos,
                msg.retain,
                msg.payload.clone(),
                props,
            ) {
                Ok(()) => self.handed.push_back(msg),
                Err(_) => {
                    // Channel full: try again after the next event.
                    self.queue.push_front(msg);
                    break;
                }
            }
        }
    }

    fn written(&mut self, pkid: u16) {
        if let Some(msg) = self.handed.pop_front()
            && msg.qos != QoS::AtMostOnce
        {
            self.unacked.push((pkid, msg));
        }
    }

    fn acked(&mut self, pkid: u16) {
        if let Some(i) = self.unacked.iter().position(|(p, _)| *p == pkid) {
            self.unacked.remove(i);
        }
    }

    /// The connection dropped: rumqttc starts a clean session and forgets what it held, so
    /// everything not yet confirmed goes back to the front of the queue, in order.
    fn lost(&mut self) {
        self.connected = false;
        let mut again: VecDeque<OutMsg> = self.unacked.drain(..).map(|(_, m)| m).collect();
        again.extend(self.handed.drain(..));
        while let Some(m) = again.pop_back() {
            self.queue.push_front(m);
        }
    }

    /// Nothing left to send or confirm.
    fn idle(&self) -> bool {
        self.queue.is_empty() && self.handed.is_empty() && self.unacked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            (false, "127.0.0.1".into(), 1884)
        );
        assert_eq!(
            parse_url("mqtts://broker.example").unwrap(),
            (true, "broker.example".into(), 8883)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1883").unwrap(),
            (false, "::1".into(), 1883)
        );
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("mqtt://:1883").is_err());
        assert!(parse_url("mqtt://h:port").is_err());
    }

    #[test]
    fn requests_need_an_input() {
        let f = |j: &str| {
            build_request(
                &serde_json::from_str(j).unwrap(),
                crate::sampler::SamplingParams::default(),
            )
        };
        assert!(f(r#"{"prompt":"hi","max_tokens":3,"id":"a","reply_to":"x"}"#).is_ok());
        assert_eq!(
            f(r#"{"id":"a"}"#).unwrap_err().message,
            "missing messages (or prompt)"
        );
        assert!(
            f(r#"{"prompt":"x","messages":[]}"#)
                .unwrap_err()
                .message
                .contains("not both")
        );
        assert!(
            f(r#"{"prompt":"x","bogus":1}"#)
                .unwrap_err()
                .message
                .contains("\"bogus\"")
        );
    }

    fn msg(n: u8, qos: QoS) -> OutMsg {
        OutMsg {
            topic: format!("t{n}"),
            payload: vec![n],
            qos,
            retain: false,
            correlation: None,
        }
    }

    #[test]
    fn unconfirmed_messages_are_sent_again_in_order() {
        let mut c = Connection::default();
        for (n, q) in [
            (1, QoS::AtLeastOnce),
            (2, QoS::AtMostOnce),
            (3, QoS::AtLeastOnce),
            (4, QoS::AtLeastOnce),
        ] {
            c.handed.push_back(msg(n, q));
        }
        c.queue.push_back(msg(5, QoS::AtLeastOnce));
        c.written(1); // 1 written, waits for its ack
        c.written(0); // 2 written at QoS 0: done
        c.written(2); // 3 written
        c.acked(2); // 3 acked: done
        c.lost(); // 1 unacked, 4 never written, 5 still queued
        let order: Vec<u8> = c.queue.iter().map(|m| m.payload[0]).collect();
        assert_eq!(order, [1, 4, 5]);
        assert!(!c.idle());
    }
}
