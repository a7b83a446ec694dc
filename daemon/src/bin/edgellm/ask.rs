//! `edgellm ask`: one request to a running `edgellmd`, over D-Bus or MQTT. Prints the answer
//! (streamed with `--stream`), or one JSON object `{"text","finish_reason","usage","client"}`
//! with `--json`. A refused request prints the daemon's error code and message and exits 1.
//! `--repeat N` sends the request N times, one after the other, over one connection (what a
//! long-lived client pays per request, without the connection set-up).

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use crate::{InputArgs, RequestArgs};
use edgellm::api::Input;

#[derive(Debug, Args)]
pub struct AskArgs {
    /// Ask over D-Bus (the session bus unless --system or --address).
    #[arg(long, conflicts_with = "mqtt", required_unless_present = "mqtt")]
    dbus: bool,
    /// The system bus (production), not the session bus.
    #[arg(long, requires = "dbus")]
    system: bool,
    /// A D-Bus address (unix:path=...) instead of the session or system bus.
    #[arg(long, requires = "dbus", value_name = "ADDRESS")]
    address: Option<String>,
    /// Ask over MQTT: the broker's mqtt://HOST:PORT.
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// The daemon's node id (MQTT topics <topic-prefix>/<node>/...). Default: this host's name.
    #[arg(long, requires = "mqtt")]
    node: Option<String>,
    #[arg(long, requires = "mqtt", default_value = "edgellm")]
    topic_prefix: String,
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    request: RequestArgs,
    /// Print the answer as it is generated.
    #[arg(long)]
    stream: bool,
    /// Print one JSON object at the end: {"text", "finish_reason", "usage", "client"}; `client`
    /// holds what this client measured: `total_ms` (request sent to final reply received) and,
    /// with --stream, `first_token_ms` (request sent to first piece received).
    #[arg(long)]
    json: bool,
    /// Send the request N times, one after the other, over one connection (one answer, or JSON
    /// line, each).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// The input as transport fields: `messages`, or (raw) `prompt`.
fn input(args: &AskArgs) -> anyhow::Result<Value> {
    Ok(match args.input.input()? {
        Input::Prompt { text, raw: true } => json!({ "prompt": text }),
        Input::Prompt { text, raw: false } => {
            json!({ "messages": [{"role": "user", "content": text}] })
        }
        Input::Messages(m) => json!({ "messages": m }),
    })
}

pub fn ask(args: &AskArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let work = async {
            if args.dbus {
                dbus(args).await
            } else {
                mqtt(args).await
            }
        };
        tokio::time::timeout(Duration::from_secs(args.timeout), work)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {} s", args.timeout))?
    })
}

/// When one request was sent, and when its first piece of text arrived.
struct Timing {
    sent: Instant,
    first: Option<Instant>,
}

impl Timing {
    fn start() -> Self {
        Timing {
            sent: Instant::now(),
            first: None,
        }
    }

    fn piece(&mut self) {
        self.first.get_or_insert_with(Instant::now);
    }

    fn json(&self) -> Value {
        let ms = |t: Instant| (t - self.sent).as_secs_f64() * 1e3;
        let mut v = json!({ "total_ms": ms(Instant::now()) });
        if let Some(first) = self.first {
            v["first_token_ms"] = json!(ms(first));
        }
        v
    }
}

/// Prints the end of an answer: a newline after streamed text, or the text, or the JSON.
fn finish(
    args: &AskArgs,
    timing: &Timing,
    text: &str,
    finish_reason: &str,
    usage: Value,
    tool_calls: Value,
) -> anyhow::Result<()> {
    let client = timing.json();
    let mut out = std::io::stdout().lock();
    let calls = tool_calls.as_array().cloned().unwrap_or_default();
    if args.json {
        let mut v =
            json!({"text": text, "finish_reason": finish_reason, "usage": usage, "client": client});
        if !calls.is_empty() {
            v["tool_calls"] = tool_calls;
        }
        writeln!(out, "{v}")?;
    } else {
        if args.stream {
            writeln!(out)?;
        } else {
            writeln!(out, "{text}")?;
        }
        // Tool calls, one JSON object a line (OpenAI's shape).
        for call in calls {
            writeln!(out, "{call}")?;
        }
    }
    Ok(())
}

fn print_delta(args: &AskArgs, text: &str) -> anyhow::Result<()> {
    if args.stream && !args.json {
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// D-Bus

type Dict = std::collections::HashMap<String, zbus::OwnedVariant>;

fn to_variant(v: &Value) -> anyhow::Result<zbus::OwnedVariant> {
    Ok(match v {
        Value::Bool(b) => (*b).into(),
        Value::Number(n) if n.is_u64() => n.as_u64().unwrap_or_default().into(),
        Value::Number(n) => n.as_f64().unwrap_or_default().into(),
        Value::String(s) => zbus::OwnedVariant::from(zbus::Str::from(s.clone())),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let strings: Vec<String> = items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect();
            zbus::OwnedVariant::try_from(zbus::Variant::from(strings))?
        }
        // Objects and lists of them (a schema, `tools`) go as JSON strings: their lists may
        // mix types, which a D-Bus array cannot.
        Value::Object(_) | Value::Array(_) => {
            zbus::OwnedVariant::from(zbus::Str::from(v.to_string()))
        }
        other => bail!("{other} is not an option value"),
    })
}

/// The finish reason, the usage figures and the tool calls (`a(sss)`: id, name, arguments)
/// of a stats dictionary.
fn stats_json(stats: &Dict) -> (String, Value, Value) {
    let mut usage = Map::new();
    let mut reason = String::new();
    let mut calls = Vec::new();
    for (k, v) in stats {
        match &**v {
            zbus::Variant::Str(s) if k == "finish_reason" => reason = s.to_string(),
            zbus::Variant::Array(_) if k == "tool_calls" => {
                let list: Vec<(String, String, String)> = v
                    .try_clone()
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .unwrap_or_default();
                calls = list
                    .into_iter()
                    .map(|(id, name, arguments)| {
                        json!({"id": id, "type": "function",
                               "function": {"name": name, "arguments": arguments}})
                    })
                    .collect();
            }
            zbus::Variant::U32(n) => {
                usage.insert(k.clone(), json!(n));
            }
            zbus::Variant::F64(f) => {
                usage.insert(k.clone(), json!(f));
            }
            _ => {}
        }
    }
    (reason, Value::Object(usage), Value::Array(calls))
}

fn dbus_error(e: zbus::Error) -> anyhow::Error {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            anyhow::anyhow!("{}: {}", name.as_str(), msg.unwrap_or_default())
        }
        other => anyhow::anyhow!("D-Bus: {other}"),
    }
}

async fn dbus(args: &AskArgs) -> anyhow::Result<()> {
    let builder = match (&args.address, args.system) {
        (Some(a), _) => zbus::connection::Builder::address(a.as_str()),
        (None, true) => zbus::connection::Builder::system(),
        (None, false) => zbus::connection::Builder::session(),
    };
    let conn = builder.build().await.context("connecting to D-Bus")?;
    let mut options = Dict::new();
    for (k, v) in args.request.to_json()? {
        options.insert(k, to_variant(&v)?);
    }
    // Complete(s, a{sv}) for a raw prompt, else Chat / StartChat(a(ss), a{sv}); a history
    // with tool calls, which a(ss) cannot carry, goes as the `messages` option.
    let (prompt, messages): (Option<String>, Vec<(String, String)>) = match args.input.input()? {
        Input::Prompt { text, raw: true } => (Some(text), Vec::new()),
        Input::Prompt { text, raw: false } => (None, vec![("user".into(), text)]),
        Input::Messages(m)
            if m.iter()
                .any(|m| m.tool_calls.is_some() || m.tool_call_id.is_some()) =>
        {
            options.insert(
                "messages".into(),
                to_variant(&Value::String(serde_json::to_string(&m)?))?,
            );
            (None, Vec::new())
        }
        Input::Messages(m) => (None, m.into_iter().map(|m| (m.role, m.content)).collect()),
    };
    let call = |method: &'static str| (BUS, PATH, Some(IFACE), method);
    const BUS: &str = "org.edgellm.Inference1";
    const PATH: &str = "/org/edgellm/Inference1";
    const IFACE: &str = "org.edgellm.Inference1";

    if args.stream && prompt.is_some() {
        bail!("--stream over D-Bus needs chat messages (StartChat); drop --raw or --stream");
    }
    // Subscribe before the first call: a Delta may follow StartChat's reply at once.
    let mut signals = if args.stream {
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.edgellm.Inference1.Request")
            .build()?;
        Some(
            zbus::MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(1024))
                .await?,
        )
    } else {
        None
    };
    for _ in 0..args.repeat {
        let mut timing = Timing::start();
        let Some(signals) = signals.as_mut() else {
            let reply = match &prompt {
                Some(p) => {
                    let (dest, path, iface, method) = call("Complete");
                    conn.call_method(Some(dest), path, iface, method, &(p, &options))
                        .await
                }
                None => {
                    let (dest, path, iface, method) = call("Chat");
                    conn.call_method(Some(dest), path, iface, method, &(&messages, &options))
                        .await
                }
            }
            .map_err(dbus_error)?;
            let (text, stats): (String, Dict) = reply.body().deserialize()?;
            let (reason, usage, calls) = stats_json(&stats);
            finish(args, &timing, &text, &reason, usage, calls)?;
            continue;
        };
        let (dest, path, iface, method) = call("StartChat");
        let reply = conn
            .call_method(Some(dest), path, iface, method, &(&messages, &options))
            .await
            .map_err(dbus_error)?;
        let request: zbus::OwnedObjectPath = reply.body().deserialize()?;
        stream_answer(args, signals, &request, &mut timing).await?;
    }
    Ok(())
}

/// Prints the `Delta` signals of `request` until its `Finished`.
async fn stream_answer(
    args: &AskArgs,
    signals: &mut zbus::MessageStream,
    request: &zbus::OwnedObjectPath,
    timing: &mut Timing,
) -> anyhow::Result<()> {
    let mut text = String::new();
    while let Some(msg) = signals.next().await {
        let msg = msg?;
        let header = msg.header();
        if header.path().map(|p| p.as_str()) != Some(request.as_str()) {
            continue;
        }
        match header.member().map(|m| m.as_str()) {
            Some("Delta") => {
                timing.piece();
                let delta: String = msg.body().deserialize()?;
                print_delta(args, &delta)?;
                text.push_str(&delta);
            }
            Some("Finished") => {
                let (reason, stats): (String, Dict) = msg.body().deserialize()?;
                if reason == "error" {
                    let get = |k: &str| match stats.get(k).map(|v| &**v) {
                        Some(zbus::Variant::Str(s)) => s.to_string(),
                        _ => String::new(),
                    };
                    bail!("{}: {}", get("error_code"), get("error_message"));
                }
                let (_, usage, calls) = stats_json(&stats);
                return finish(args, timing, &text, &reason, usage, calls);
            }
            _ => {}
        }
    }
    bail!("the bus connection closed before the answer finished")
}

// ---------------------------------------------------------------------------------------------
// MQTT

async fn mqtt(args: &AskArgs) -> anyhow::Result<()> {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let url = args.mqtt.as_deref().unwrap_or_default();
    let (tls, host, port) = edgellm::transport::mqtt::parse_url(url)?;
    if tls {
        bail!("--mqtt {url:?}: edgellm ask speaks plain mqtt:// only (no TLS yet)");
    }
    let node = args
        .node
        .clone()
        .unwrap_or_else(edgellm::transport::mqtt::host_name);
    let me = format!("edgellm-ask-{}-{}", std::process::id(), nanos());
    let reply_topic = format!("{}/client/{me}/reply", args.topic_prefix);
    let mut opts = MqttOptions::new(me.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);

    let mut fields = match input(args)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    fields.extend(args.request.to_json()?);
    fields.insert("stream".into(), json!(args.stream));
    let request_topic = format!("{}/{node}/request", args.topic_prefix);
    // Request `n` (1-based) carries id and correlation data `<me>-<n>`.
    let send = |n: u32| {
        let id = format!("{me}-{n}");
        let mut fields = fields.clone();
        fields.insert("id".into(), json!(id));
        let props = PublishProperties {
            response_topic: Some(reply_topic.clone()),
            correlation_data: Some(id.into_bytes().into()),
            ..Default::default()
        };
        client.publish_with_properties(
            request_topic.clone(),
            QoS::AtLeastOnce,
            false,
            Value::Object(fields).to_string(),
            props,
        )
    };
    let mut sent = 0;
    let mut timing = Timing::start();
    loop {
        let ev = eventloop
            .poll()
            .await
            .with_context(|| format!("MQTT broker {url}"))?;
        match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                client.subscribe(&reply_topic, QoS::AtLeastOnce).await?;
            }
            Event::Incoming(Packet::SubAck(_)) if sent == 0 => {
                sent = 1;
                timing = Timing::start();
                send(sent).await?;
            }
            Event::Incoming(Packet::Publish(p)) => {
                let msg: Value =
                    serde_json::from_slice(&p.payload).context("the daemon's reply is not JSON")?;
                if let Some(err) = msg.get("error") {
                    bail!(
                        "{}: {}",
                        err["code"].as_str().unwrap_or("error"),
                        err["message"].as_str().unwrap_or_default()
                    );
                }
                if msg.get("done").and_then(Value::as_bool) == Some(true) {
                    let full = msg["text"].as_str().unwrap_or_default();
                    finish(
                        args,
                        &timing,
                        full,
                        msg["finish_reason"].as_str().unwrap_or_default(),
                        msg["usage"].clone(),
                        msg.get("tool_calls").cloned().unwrap_or_default(),
                    )?;
                    if sent == args.repeat {
                        let _ = client.disconnect().await;
                        return Ok(());
                    }
                    sent += 1;
                    timing = Timing::start();
                    send(sent).await?;
                    continue;
                }
                if let Some(delta) = msg["delta"].as_str() {
                    timing.piece();
                    print_delta(args, delta)?;
                }
            }
            _ => {}
        }
    }
}

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
}
