//! Helpers for the service tests: model packages exported once per test binary, an in-process
//! daemon ([`edgellm::run`]) with its configuration pointed at a private bus and broker, and
//! small D-Bus and MQTT clients that speak the wire protocols directly (not through edgellm's
//! own client code, so a bug there cannot hide one in the daemon).

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use edgellm::config::Config;
use edgellm_export::{ExportOptions, Precision};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A tiny model (the qwen2 fixture, fp32): fast, for protocol tests.
pub fn tiny_package() -> &'static Path {
    static PKG: OnceLock<&'static Path> = OnceLock::new();
    PKG.get_or_init(|| {
        let tmp = crate::export_fixture_with(
            "qwen2",
            ExportOptions {
                precision: Precision::Fp32,
                ..ExportOptions::default()
            },
        );
        crate::keep_until_exit(tmp).join("pkg").leak()
    })
}

/// A random-init Qwen2.5-0.5B int4 package: real size, ~50 tokens/s on two cores, so a long
/// request is still running when a test cancels it, restarts the broker or stops the daemon.
pub fn slow_package() -> &'static Path {
    static PKG: OnceLock<&'static Path> = OnceLock::new();
    PKG.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("temp dir");
        let ckpt = edgellm_export::random_init::TempCheckpoint::new("qwen2.5-0.5b", tmp.path(), 0)
            .expect("random-init checkpoint");
        edgellm_export::export(
            ckpt.dir(),
            &tmp.path().join("pkg"),
            &ExportOptions {
                embeddings: Precision::Int4,
                max_length: Some(1024),
                ..ExportOptions::default()
            },
        )
        .expect("export of the random-init model");
        crate::keep_until_exit(tmp).join("pkg").leak()
    })
}

/// A configuration for `package` served by `backend` (`ort` | `tract`) on `bus` (D-Bus
/// address) and `mqtt` (broker URL); `None` turns that transport off.
pub fn config(
    backend: &str,
    package: &Path,
    bus: Option<&str>,
    mqtt: Option<&str>,
    node: &str,
) -> Config {
    let mut c = Config::default();
    c.model.backend = edgellm::backend::BackendChoice::parse(backend).expect("auto, ort or tract");
    c.model.path = package.to_path_buf();
    c.model.max_length = 256;
    c.model.threads = 1;
    c.onnxruntime.allow_spinning = false;
    c.dbus.enabled = bus.is_some();
    c.dbus.bus = edgellm::config::Bus::Session;
    c.dbus.address = bus.unwrap_or_default().to_string();
    c.mqtt.enabled = mqtt.is_some();
    c.mqtt.url = mqtt.unwrap_or("mqtt://127.0.0.1:1").to_string();
    c.mqtt.node_id = node.to_string();
    c
}

/// An in-process daemon: `edgellm::run` on the test's runtime.
pub struct Daemon {
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), edgellm::service::RunError>>>,
}

impl Daemon {
    /// Starts the daemon and waits until it answers on D-Bus (when enabled) or until its
    /// retained MQTT status says `online`.
    pub async fn start(config: Config) -> Daemon {
        let shutdown = CancellationToken::new();
        let dbus = config.dbus.enabled.then(|| config.dbus.address.clone());
        // (The test client speaks plain MQTT: a TLS daemon is waited for over D-Bus only.)
        let mqtt = (config.mqtt.enabled && config.mqtt.url.starts_with("mqtt://"))
            .then(|| (config.mqtt.url.clone(), config.mqtt.node_id.clone()));
        let task = tokio::spawn(edgellm::run(config, shutdown.clone()));
        let d = Daemon {
            shutdown,
            task: Some(task),
        };
        let ready = async {
            if let Some(addr) = dbus {
                loop {
                    if let Ok(c) = bus(&addr).await
                        && get_property(&c, "State").await.is_ok()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            if let Some((url, node)) = mqtt {
                mqtt_online(&url, &node).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), ready)
            .await
            .expect("the daemon did not come up within 120 s");
        d
    }

    /// Cancels the shutdown token and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("the daemon did not stop within 30 s")
                .expect("the daemon task panicked")
                .expect("the daemon returned an error");
        }
    }
}

impl Daemon {
    /// Waits (at most `within`) for `run` to return on its own, and returns its result.
    pub async fn exited(mut self, within: Duration) -> Result<(), edgellm::service::RunError> {
        let t = self.task.take().expect("not stopped yet");
        tokio::time::timeout(within, t)
            .await
            .expect("the daemon did not exit")
            .expect("the daemon task panicked")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ------------------------------------------------------------------------------------------
// D-Bus

pub const BUS_NAME: &str = "org.edgellm.Inference1";
pub const PATH: &str = "/org/edgellm/Inference1";

pub type Dict = HashMap<String, zbus::OwnedVariant>;

pub async fn bus(address: &str) -> zbus::Result<zbus::Connection> {
    zbus::connection::Builder::address(address).build().await
}

pub async fn get_property(c: &zbus::Connection, name: &str) -> zbus::Result<zbus::OwnedVariant> {
    let reply = c
        .call_method(
            Some(BUS_NAME),
            PATH,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(BUS_NAME, name),
        )
        .await?;
    reply.body().deserialize()
}

pub fn opts(pairs: &[(&str, zbus::OwnedVariant)]) -> Dict {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.try_clone().expect("clone")))
        .collect()
}

pub fn user(text: &str) -> Vec<(String, String)> {
    vec![("user".to_string(), text.to_string())]
}

/// `Chat` and its reply, or the D-Bus error name and message.
pub async fn chat(
    c: &zbus::Connection,
    messages: &[(String, String)],
    options: &Dict,
) -> Result<(String, Dict), (String, String)> {
    let reply = c
        .call_method(
            Some(BUS_NAME),
            PATH,
            Some(BUS_NAME),
            "Chat",
            &(messages, options),
        )
        .await
        .map_err(split_error)?;
    Ok(reply
        .body()
        .deserialize()
        .expect("Chat reply is (s, a{sv})"))
}

pub fn split_error(e: zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, msg, _) => (name.to_string(), msg.unwrap_or_default()),
        zbus::Error::FDO(e) => {
            use zbus::DBusError;
            (
                e.name().to_string(),
                e.description().unwrap_or_default().to_string(),
            )
        }
        other => panic!("expected a D-Bus error reply, got {other}"),
    }
}

pub fn stat_u32(stats: &Dict, key: &str) -> u32 {
    match stats.get(key).map(|v| &**v) {
        Some(zbus::Variant::U32(n)) => *n,
        other => panic!("stats[{key}] is not a u32: {other:?}"),
    }
}

pub fn stat_str(stats: &Dict, key: &str) -> String {
    match stats.get(key).map(|v| &**v) {
        Some(zbus::Variant::Str(s)) => s.to_string(),
        other => panic!("stats[{key}] is not a string: {other:?}"),
    }
}

/// A `StartChat` in progress: the request object's signals, in order.
pub struct Stream {
    pub path: zbus::OwnedObjectPath,
    signals: zbus::MessageStream,
}

pub enum Signal {
    Delta(String),
    Finished(String, Dict),
}

/// Subscribes to the request interface's signals, then calls `StartChat`.
pub async fn start_chat(
    c: &zbus::Connection,
    messages: &[(String, String)],
    options: &Dict,
) -> Result<Stream, (String, String)> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.edgellm.Inference1.Request")
        .build()
        .expect("match rule");
    let signals = zbus::MessageStream::for_match_rule(rule, c, std::num::NonZeroUsize::new(4096))
        .await
        .expect("match rule");
    let reply = c
        .call_method(
            Some(BUS_NAME),
            PATH,
            Some(BUS_NAME),
            "StartChat",
            &(messages, options),
        )
        .await
        .map_err(split_error)?;
    let path = reply.body().deserialize().expect("StartChat reply is o");
    Ok(Stream { path, signals })
}

impl Stream {
    pub async fn next(&mut self) -> Signal {
        use futures_util::StreamExt;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(120), self.signals.next())
                .await
                .expect("no signal within 120 s")
                .expect("the bus connection closed")
                .expect("a readable message");
            let h = msg.header();
            if h.path().map(|p| p.as_str()) != Some(self.path.as_str()) {
                continue;
            }
            return match h.member().map(|m| m.as_str()) {
                Some("Delta") => Signal::Delta(msg.body().deserialize().expect("Delta(s)")),
                Some("Finished") => {
                    let (r, s) = msg.body().deserialize().expect("Finished(s, a{sv})");
                    Signal::Finished(r, s)
                }
                other => panic!("unexpected signal {other:?}"),
            };
        }
    }

    /// Reads to `Finished`: (deltas, reason, stats).
    pub async fn finish(&mut self) -> (Vec<String>, String, Dict) {
        let mut deltas = Vec::new();
        loop {
            match self.next().await {
                Signal::Delta(d) => deltas.push(d),
                Signal::Finished(r, s) => return (deltas, r, s),
            }
        }
    }

    pub async fn cancel(&self, c: &zbus::Connection) {
        c.call_method(
            Some(BUS_NAME),
            self.path.as_str(),
            Some("org.edgellm.Inference1.Request"),
            "Cancel",
            &(),
        )
        .await
        .expect("Cancel");
    }
}

// ------------------------------------------------------------------------------------------
// MQTT

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub json: Value,
    pub correlation: Option<bytes::Bytes>,
    pub retain: bool,
}

/// Waits, on a client of its own, for node `node`'s retained status to say `online`. The daemon
/// publishes it after it has asked for its request subscriptions on the same connection, so
/// the broker routes requests published from here on to it; before, a request can find no
/// subscriber and be dropped by the broker.
pub async fn mqtt_online(url: &str, node: &str) {
    let mut c = MqttClient::connect(url).await;
    c.subscribe(&format!("edgellm/{node}/status")).await;
    loop {
        let m = c.recv(Duration::from_secs(120)).await;
        if m.json["state"] == "online" {
            break;
        }
    }
}

/// An MQTT 5 test client: reconnects every 100 ms when the broker goes away and subscribes
/// again after each connect, so it outlives broker restarts.
pub struct MqttClient {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Received>,
    subs: tokio::sync::watch::Sender<Vec<String>>,
    acked: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

static NEXT_CLIENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl MqttClient {
    pub async fn connect(url: &str) -> MqttClient {
        let port: u16 = url
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("mqtt://127.0.0.1:PORT");
        let n = NEXT_CLIENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut opts = MqttOptions::new(
            format!("test-{}-{n}", std::process::id()),
            "127.0.0.1",
            port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(Some(1 << 20));
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subs, subs_rx) = tokio::sync::watch::channel(Vec::<String>::new());
        let (acked_tx, acked) = tokio::sync::watch::channel(0usize);
        let sub_client = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in subs_rx.borrow().iter() {
                            let _ = sub_client.try_subscribe(t.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acked_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let _ = tx.send(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            json,
                            correlation: p.properties.and_then(|pr| pr.correlation_data),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        MqttClient {
            client,
            rx,
            subs,
            acked,
            task,
        }
    }

    /// Subscribes (QoS 1) and waits for the broker's SubAck.
    pub async fn subscribe(&mut self, topic: &str) {
        let before = self.subacks();
        self.subs.send_modify(|s| s.push(topic.to_string()));
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        self.subacks_after(before, Duration::from_secs(10)).await;
    }

    /// SubAcks received so far (the client subscribes again on every reconnection).
    pub fn subacks(&self) -> usize {
        *self.acked.borrow()
    }

    /// Waits until more than `seen` SubAcks have arrived: after a broker restart, the client
    /// has reconnected and holds its subscriptions again.
    pub async fn resubscribed(&mut self, seen: usize) {
        self.subacks_after(seen, Duration::from_secs(30)).await;
    }

    async fn subacks_after(&mut self, seen: usize, within: Duration) {
        tokio::time::timeout(within, self.acked.wait_for(|n| *n > seen))
            .await
            .unwrap_or_else(|_| panic!("no SubAck within {within:?}"))
            .expect("client task alive");
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Publishes with an MQTT 5 Response Topic and Correlation Data.
    pub async fn request_v5(&self, topic: &str, payload: &Value, reply: &str, correlation: &[u8]) {
        let props = PublishProperties {
            response_topic: Some(reply.to_string()),
            correlation_data: Some(bytes::Bytes::copy_from_slice(correlation)),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.to_string().into_bytes(),
                props,
            )
            .await
            .expect("publish");
    }

    pub async fn recv(&mut self, timeout: Duration) -> Received {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no MQTT message within {timeout:?}"))
            .expect("client task alive")
    }

    /// Messages until (and including) the terminal one of a request: (chunks, terminal).
    pub async fn until_done(&mut self) -> (Vec<Received>, Received) {
        let mut chunks = Vec::new();
        loop {
            let m = self.recv(Duration::from_secs(120)).await;
            if m.json["done"] == true {
                return (chunks, m);
            }
            chunks.push(m);
        }
    }

    /// Nothing arrives within `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Some(m)) = tokio::time::timeout(wait, self.rx.recv()).await {
            panic!("unexpected message {m:?}");
        }
    }
}

impl Drop for MqttClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Issue 13 §4, on any package: five requests at once over D-Bus and MQTT to a daemon with
/// `parallel = 4` (continuous batching on ONNX Runtime), built from the first five
/// `conversations` with mixed lengths and sampling settings, the fifth cancelled midway after
/// three deltas. Each answer is exactly the one the engine gives that request alone, and the
/// `Running` property (polled every 5 ms) shows at least `min_running` running together.
#[allow(clippy::unwrap_used)] // a test body: a panic is the failure report
pub async fn concurrent_requests_match_alone(
    pkg: &Path,
    max_length: usize,
    conversations: &[Vec<(String, String)>],
    min_running: u32,
) {
    use edgellm::api::{Input, Request};
    use edgellm::backend::{BackendChoice, BackendOptions};
    use edgellm::chat::Message;
    use edgellm::model::Model;
    use serde_json::json;
    use zbus::OwnedVariant;

    assert!(conversations.len() >= 5, "five conversations");
    let messages = |i: usize| -> Vec<Message> {
        conversations[i]
            .iter()
            .map(|(role, content)| Message::new(role.clone(), content.clone()))
            .collect()
    };
    // (case, max_tokens, temperature, top_k, seed)
    let settings: [(usize, u32, f64, u32, u64); 5] = [
        (0, 24, 0.0, 0, 0),
        (1, 32, 0.8, 0, 5),
        (2, 20, 0.7, 20, 9),
        (3, 12, 0.0, 0, 0),
        (4, 200, 0.0, 0, 0),
    ];
    // Alone, in-process, from the package's default sampling changed by the same options.
    let model = Model::load(pkg).unwrap();
    let loaded = edgellm::backend::load(
        &model.package,
        BackendChoice::Ort,
        &BackendOptions {
            max_length,
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let defaults = model.default_sampling();
    let mut engine = edgellm::engine::Engine::new(model, loaded.backend, max_length);
    let alone: Vec<String> = settings
        .iter()
        .map(|&(case, max, temp, top_k, seed)| {
            let mut req = Request::new(Input::Messages(messages(case)));
            req.sampling = defaults.clone();
            req.sampling.temperature = temp as f32;
            if top_k > 0 {
                req.sampling.top_k = top_k as usize;
            }
            if seed > 0 {
                req.sampling.seed = Some(seed);
            }
            req.max_tokens = Some(max as usize);
            engine.forget_cache();
            engine
                .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
                .unwrap()
                .text
        })
        .collect();
    drop(engine);

    let bus_daemon = crate::harness::DbusBus::start();
    let broker = crate::harness::Mosquitto::start();
    let mut cfg = config(
        "ort",
        pkg,
        Some(bus_daemon.address()),
        Some(&broker.url()),
        "rm",
    );
    cfg.model.max_length = max_length;
    cfg.limits.parallel = 4;
    let daemon = Daemon::start(cfg).await;
    let c = bus(bus_daemon.address()).await.unwrap();
    assert_eq!(
        u32::try_from(get_property(&c, "Parallel").await.unwrap()).unwrap(),
        4
    );
    let mut mq = MqttClient::connect(&broker.url()).await;
    mq.subscribe("replies/#").await;
    let dbus_opts = |i: usize| {
        let (_, max, temp, top_k, seed) = settings[i];
        let mut o: Vec<(&str, OwnedVariant)> =
            vec![("max_tokens", max.into()), ("temperature", temp.into())];
        if top_k > 0 {
            o.push(("top_k", top_k.into()));
        }
        if seed > 0 {
            o.push(("seed", seed.into()));
        }
        opts(&o)
    };
    let pairs = |i: usize| -> Vec<(String, String)> {
        messages(settings[i].0)
            .into_iter()
            .map(|m| (m.role, m.content))
            .collect()
    };

    // The one cancelled midway (D-Bus StartChat), then two Chats and two MQTT requests.
    let mut cancelled = start_chat(&c, &pairs(4), &dbus_opts(4)).await.unwrap();
    let chats: Vec<_> = [0, 1]
        .into_iter()
        .map(|i| {
            let (c, msgs, o) = (c.clone(), pairs(i), dbus_opts(i));
            tokio::spawn(async move { chat(&c, &msgs, &o).await.unwrap().0 })
        })
        .collect();
    for i in [2usize, 3] {
        let (_, max, temp, top_k, seed) = settings[i];
        let mut p = json!({
            "id": format!("q{i}"),
            "messages": pairs(i).iter().map(|(r, t)| json!({"role": r, "content": t})).collect::<Vec<_>>(),
            "max_tokens": max,
            "temperature": temp,
            "stream": false,
        });
        if top_k > 0 {
            p["top_k"] = json!(top_k);
        }
        if seed > 0 {
            p["seed"] = json!(seed);
        }
        mq.request_v5("edgellm/rm/request", &p, &format!("replies/{i}"), b"c")
            .await;
    }
    // Watch `Running` while they run; cancel the long one after three deltas.
    let reader = bus(bus_daemon.address()).await.unwrap();
    let sampler = reader.clone();
    let watch = tokio::spawn(async move {
        let mut most = 0;
        for _ in 0..400 {
            let n = u32::try_from(get_property(&reader, "Running").await.unwrap()).unwrap();
            most = most.max(n);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        most
    });
    let mut deltas = Vec::new();
    while deltas.len() < 3 {
        match cancelled.next().await {
            Signal::Delta(d) => deltas.push(d),
            Signal::Finished(r, _) => panic!("the long request ended ({r}) too soon"),
        }
    }
    // The long request is running now (three deltas of its 200 in, not cancelled yet): a sample
    // a loaded machine's 5 ms poll cannot miss, where short answers may all fall between polls.
    let running_now = u32::try_from(get_property(&sampler, "Running").await.unwrap()).unwrap();
    cancelled.cancel(&c).await;
    let (_, reason, _) = cancelled.finish().await;
    assert_eq!(reason, "cancelled");
    assert!(alone[4].starts_with(&deltas.concat()));

    for (i, t) in chats.into_iter().enumerate() {
        assert_eq!(
            t.await.unwrap(),
            alone[i],
            "D-Bus request {i} differs from alone"
        );
    }
    let mut mqtt_answers = std::collections::HashMap::new();
    while mqtt_answers.len() < 2 {
        let (_, fin) = mq.until_done().await;
        mqtt_answers.insert(
            fin.topic.clone(),
            fin.json["text"].as_str().unwrap().to_string(),
        );
    }
    for i in [2usize, 3] {
        assert_eq!(
            mqtt_answers[&format!("replies/{i}")],
            alone[i],
            "MQTT request {i} differs from alone"
        );
    }
    let most = watch.await.unwrap().max(running_now);
    assert!(
        most >= min_running,
        "at most {most} requests were seen running at once"
    );
    daemon.stop().await;
}

/// The Python of the test venv (scripts/setup-test-venv.sh: the `openai` and `ollama` clients,
/// `jsonschema`, `lark`); scripts/test.sh sets `EDGELLM_TEST_PYTHON`.
pub fn test_python() -> std::path::PathBuf {
    std::env::var_os("EDGELLM_TEST_PYTHON")
        .map(std::path::PathBuf::from)
        .expect(
            "EDGELLM_TEST_PYTHON is not set: the HTTP and structured-output tests need the venv \
             of scripts/setup-test-venv.sh (it prints its python; scripts/test.sh sets this)",
        )
}

/// tests/http/openai_checks.py, which drives the HTTP API with the stock clients.
pub fn http_checks_script() -> std::path::PathBuf {
    crate::repo_root().join("tests/http/openai_checks.py")
}

/// Runs a subcommand of tests/http/openai_checks.py to its end (at most 300 s) and returns the
/// JSON object it prints last; a failure shows its output.
pub async fn http_checks(args: &[&str]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(test_python())
            .arg(http_checks_script())
            .args(args)
            .output(),
    )
    .await
    .expect("the openai checks did not finish within 300 s")
    .expect("run the openai checks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai checks {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("checks {args:?} printed no JSON ({e}): {stdout}"))
}

/// A TCP forwarder on a loopback port in front of another (a broker): the daemon connects
/// through it while test clients connect straight to the broker. Closed, it accepts and drops
/// new connections (connections already forwarded go on), so a test decides when the daemon may
/// reach a restarted broker: after its own client has subscribed there again.
pub struct TcpGate {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpGate {
    /// Starts an open gate to `127.0.0.1:target`.
    pub async fn start(target: u16) -> TcpGate {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the gate's port");
        let port = listener.local_addr().expect("the gate's address").port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let is_open = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !is_open.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the peer sees the connection closed
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        TcpGate { port, open, task }
    }

    /// `mqtt://127.0.0.1:PORT` of the gate.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Opens or closes the gate to new connections.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}
