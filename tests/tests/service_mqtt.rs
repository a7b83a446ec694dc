//! edgellmd over MQTT, end to end: a real `mosquitto` on a free loopback port, the daemon
//! in-process (`edgellm::run`) on a real exported package through ONNX Runtime, and raw
//! rumqttc clients (MQTT 5, and 3.1.1 for the payload fallback).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use edgellm_tests::harness::Mosquitto;
use edgellm_tests::service::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

fn chat_payload(id: &str, text: &str, max_tokens: u32) -> Value {
    json!({"id": id, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})
}

async fn request_response_streaming_and_fallbacks(backend: &'static str) {
    let broker = Mosquitto::start();
    let d = Daemon::start(config(
        backend,
        tiny_package(),
        None,
        Some(&broker.url()),
        "n1",
    ))
    .await;
    let mut c = MqttClient::connect(&broker.url()).await;
    c.subscribe("replies/#").await;
    c.subscribe("edgellm/n1/response/#").await;

    // MQTT 5: Response Topic + Correlation Data; chunks with contiguous seq, then one final.
    c.request_v5(
        "edgellm/n1/request",
        &chat_payload("a1", "Tell me about the sea", 12),
        "replies/v5",
        b"corr-1",
    )
    .await;
    let (chunks, fin) = c.until_done().await;
    assert!(chunks.len() > 1);
    for (i, m) in chunks.iter().enumerate() {
        assert_eq!(m.topic, "replies/v5");
        assert_eq!(m.correlation.as_deref(), Some(&b"corr-1"[..]));
        assert_eq!(m.json["id"], "a1");
        assert_eq!(m.json["seq"], i);
    }
    assert_eq!(fin.topic, "replies/v5");
    assert_eq!(fin.correlation.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(fin.json["seq"], chunks.len());
    assert_eq!(fin.json["finish_reason"], "length");
    assert_eq!(fin.json["node"], "n1");
    assert_eq!(fin.json["usage"]["completion_tokens"], 12);
    assert!(fin.json["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert_eq!(fin.json["usage"]["cached_tokens"], 0);
    assert!(fin.json["usage"]["ttft_ms"].as_f64().unwrap() > 0.0);
    let streamed: String = chunks
        .iter()
        .map(|m| m.json["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, fin.json["text"].as_str().unwrap());
    let text = streamed;

    // stream: false -> only the final message, seq 0, same greedy text.
    let mut p = chat_payload("a2", "Tell me about the sea", 12);
    p["stream"] = json!(false);
    c.request_v5("edgellm/n1/request", &p, "replies/v5", b"corr-2")
        .await;
    let (chunks, fin) = c.until_done().await;
    assert!(chunks.is_empty());
    assert_eq!(fin.json["seq"], 0);
    assert_eq!(fin.json["text"], text.as_str());
    // The same prompt again: all of it but the last token comes from the KV cache.
    assert_eq!(
        fin.json["usage"]["cached_tokens"].as_u64().unwrap(),
        fin.json["usage"]["prompt_tokens"].as_u64().unwrap() - 1
    );

    // MQTT 3.1.1 client: reply_to and id in the payload.
    let mut v4 = rumqttc::MqttOptions::new("v311-client", "127.0.0.1", broker.port());
    v4.set_keep_alive(Duration::from_secs(30));
    let (v4c, mut v4loop) = rumqttc::AsyncClient::new(v4, 16);
    tokio::spawn(async move { while v4loop.poll().await.is_ok() {} });
    let mut p = chat_payload("b1", "Tell me about the sea", 12);
    p["reply_to"] = json!("replies/v311");
    v4c.publish(
        "edgellm/n1/request",
        rumqttc::QoS::AtLeastOnce,
        false,
        p.to_string(),
    )
    .await
    .unwrap();
    let (_, fin) = c.until_done().await;
    assert_eq!(fin.topic, "replies/v311");
    assert_eq!(fin.json["id"], "b1");
    assert_eq!(fin.json["text"], text.as_str());

    // Neither: edgellm/<node>/response/<id>.
    c.publish(
        "edgellm/n1/request",
        json!({"id": 42, "prompt": "Once upon a time", "max_tokens": 4}).to_string(),
    )
    .await;
    let (_, fin) = c.until_done().await;
    assert_eq!(fin.topic, "edgellm/n1/response/42");
    assert_eq!(fin.json["id"], 42);
    assert_eq!(fin.json["usage"]["completion_tokens"], 4);
    d.stop().await;
}

async fn bad_input_gets_an_error_naming_the_problem(backend: &'static str) {
    let broker = Mosquitto::start();
    let mut cfg = config(backend, tiny_package(), None, Some(&broker.url()), "n1");
    cfg.mqtt.max_payload_bytes = 1024;
    let d = Daemon::start(cfg).await;
    let mut c = MqttClient::connect(&broker.url()).await;
    c.subscribe("edgellm/n1/response/#").await;
    c.subscribe("edgellm/n1/errors").await;
    c.subscribe("replies/#").await;

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            br#"{"id":"m1","messages":[{"role":"user","content":"hi"}],"#.to_vec(),
            "not valid JSON",
        ),
        (b"\xff\xfe{}".to_vec(), "not valid UTF-8"),
        // A key given twice is refused, not silently the last one.
        (
            br#"{"id":"d1","prompt":"x","max_tokens":2,"max_tokens":500}"#.to_vec(),
            "key \"max_tokens\" appears twice",
        ),
        (
            json!({"id":"e13","prompt":"x","stop":[]})
                .to_string()
                .into(),
            "stop: give 1 to 16 strings, got 0",
        ),
        (br#"[1,2]"#.to_vec(), "JSON object"),
        (
            json!({"id":"e1","messages":"hi"}).to_string().into(),
            "messages: expected a list",
        ),
        (
            json!({"id":"e2","messages":[]}).to_string().into(),
            "messages: must not be empty",
        ),
        (
            json!({"id":"e3","messages":[{"role":"wizard","content":"x"}]})
                .to_string()
                .into(),
            "wizard",
        ),
        (
            json!({"id":"e4","prompt":"x","temperature":-0.5})
                .to_string()
                .into(),
            "temperature",
        ),
        (
            json!({"id":"e5","prompt":"x","temperature":1e12})
                .to_string()
                .into(),
            "temperature",
        ),
        (
            json!({"id":"e6","prompt":"x","top_k":-3})
                .to_string()
                .into(),
            "top_k",
        ),
        (
            json!({"id":"e7","prompt":"x","max_tokens":"ten"})
                .to_string()
                .into(),
            "max_tokens",
        ),
        (
            json!({"id":"e8","prompt":"x","colour":"red"})
                .to_string()
                .into(),
            "\"colour\"",
        ),
        (
            json!({"id":"e9","prompt":"x","stream":"yes"})
                .to_string()
                .into(),
            "stream",
        ),
        (
            json!({"id":"e10","prompt":"x","reply_to":"a/#"})
                .to_string()
                .into(),
            "reply_to",
        ),
        (
            json!({"id":"a+b","prompt":"x"}).to_string().into(),
            "id: expected",
        ),
        (
            json!({"id":"e11","prompt":"x".repeat(2000)})
                .to_string()
                .into(),
            "mqtt.max_payload_bytes",
        ),
        (
            json!({"id":"e12","prompt":"word ".repeat(180)})
                .to_string()
                .into(),
            "max_length",
        ),
    ];
    for (payload, needle) in &cases {
        c.publish("edgellm/n1/request", payload.clone()).await;
        let m = c.recv(WAIT).await;
        assert_eq!(m.json["done"], true, "{m:?}");
        let msg = m.json["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should name {needle:?}");
        let code = m.json["error"]["code"].as_str().unwrap();
        if *needle == "max_length" {
            assert_eq!(code, "prompt_too_long");
        } else {
            assert_eq!(code, "invalid_request", "{msg}");
        }
        match m.json["id"].as_str() {
            // Payloads with no readable id go to the errors topic.
            Some(id) if id.starts_with('e') || *needle == "id: expected" => {
                assert_eq!(m.topic, format!("edgellm/n1/response/{id}"))
            }
            _ => assert_eq!(m.topic, "edgellm/n1/errors"),
        }
    }
    // A broken payload still answers on the MQTT 5 Response Topic when it has one.
    c.request_v5(
        "edgellm/n1/request",
        &json!("not an object"),
        "replies/x",
        b"c",
    )
    .await;
    let m = c.recv(WAIT).await;
    assert_eq!(m.topic, "replies/x");
    assert_eq!(m.correlation.as_deref(), Some(&b"c"[..]));
    assert_eq!(m.json["error"]["code"], "invalid_request");

    // Still serving.
    c.publish(
        "edgellm/n1/request",
        chat_payload("ok", "hi", 3).to_string(),
    )
    .await;
    let (_, fin) = c.until_done().await;
    assert_eq!(fin.json["usage"]["completion_tokens"], 3);
    c.assert_quiet(Duration::from_millis(300)).await;
    d.stop().await;
}

async fn status_is_retained_and_goes_offline_on_stop(backend: &'static str) {
    let broker = Mosquitto::start();
    let d = Daemon::start(config(
        backend,
        tiny_package(),
        None,
        Some(&broker.url()),
        "n1",
    ))
    .await;
    // A client arriving later gets the retained status.
    let mut c = MqttClient::connect(&broker.url()).await;
    c.subscribe("edgellm/n1/status").await;
    let m = c.recv(WAIT).await;
    assert!(m.retain);
    assert_eq!(m.json["state"], "online");
    assert_eq!(m.json["backend"], backend);
    assert_eq!(m.json["backend_reason"], "configured");
    assert_eq!(m.json["max_context"], 256);
    assert_eq!(m.json["activity"], "ready");
    d.stop().await;
    loop {
        let m = c.recv(WAIT).await;
        if m.json["state"] == "offline" {
            break;
        }
    }
    // And it stays: a new subscriber sees offline.
    let mut late = MqttClient::connect(&broker.url()).await;
    late.subscribe("edgellm/n1/status").await;
    let m = late.recv(WAIT).await;
    assert!(m.retain);
    assert_eq!(m.json["state"], "offline");
}

async fn cancel_topic_and_broker_restart_mid_stream(backend: &'static str) {
    let mut broker = Mosquitto::start();
    // The daemon reaches the broker through a gate, this test's client straight: after the
    // restart the gate opens once the client has subscribed again, so the daemon's kept message
    // cannot reach the new broker before anyone listens there (a race a CI run lost once).
    let gate = TcpGate::start(broker.port()).await;
    // D-Bus too: it shows the engine's state while the broker is down.
    let bus_daemon = edgellm_tests::harness::DbusBus::start();
    let mut cfg = config(
        backend,
        slow_package(),
        Some(bus_daemon.address()),
        Some(&gate.url()),
        "n1",
    );
    cfg.model.max_length = 1024;
    let d = Daemon::start(cfg).await;
    let mut c = MqttClient::connect(&broker.url()).await;
    c.subscribe("replies/#").await;

    // Cancel topic.
    c.request_v5(
        "edgellm/n1/request",
        &chat_payload("long", "Write a long story", 600),
        "replies/c",
        b"x",
    )
    .await;
    let first = c.recv(WAIT).await;
    assert_eq!(first.json["seq"], 0);
    c.publish("edgellm/n1/cancel", json!({"id": "long"}).to_string())
        .await;
    let (_, fin) = c.until_done().await;
    assert_eq!(fin.json["finish_reason"], "cancelled");
    assert!(fin.json["usage"]["completion_tokens"].as_u64().unwrap() < 600);

    // The broker goes away mid-stream and the request finishes while it is down: the daemon
    // keeps the final message and delivers it after reconnecting.
    c.request_v5(
        "edgellm/n1/request",
        &chat_payload("r1", "Write a story", 40),
        "replies/r",
        b"y",
    )
    .await;
    let first = c.recv(WAIT).await;
    assert_eq!(first.json["id"], "r1");
    gate.set_open(false);
    broker.stop();
    // The answer must finish while the broker is down (so the final message has to wait for
    // the reconnection): the engine is idle again, seen over D-Bus, before the restart.
    let dbus = bus(bus_daemon.address()).await.unwrap();
    let t = std::time::Instant::now();
    loop {
        let state = String::try_from(get_property(&dbus, "State").await.unwrap()).unwrap();
        if state == "ready" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "r1 did not finish during the outage (state {state})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!broker.is_running(), "the broker came back too early");
    // Stay down a while longer: the daemon's reconnect backoff (0.25 s doubling, to 10 s) grows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = c.subacks();
    broker.restart();
    c.resubscribed(seen).await;
    gate.set_open(true);
    let mut terminal = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while terminal.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no final message");
        let m = c.recv(WAIT).await;
        if m.json["done"] == true {
            terminal.push(m);
        }
    }
    let fin = &terminal[0];
    assert_eq!(fin.json["id"], "r1");
    assert_eq!(fin.correlation.as_deref(), Some(&b"y"[..]));
    assert_eq!(fin.json["usage"]["completion_tokens"], 40);
    // Exactly one.
    c.assert_quiet(Duration::from_secs(1)).await;
    d.stop().await;
}

async fn a_share_group_splits_requests_between_two_daemons(backend: &'static str) {
    let broker = Mosquitto::start();
    let mut daemons = Vec::new();
    for node in ["dev-a", "dev-b"] {
        let mut cfg = config(backend, tiny_package(), None, Some(&broker.url()), node);
        cfg.mqtt.share_group = "fleet".into();
        daemons.push(Daemon::start(cfg).await);
    }
    let mut c = MqttClient::connect(&broker.url()).await;
    c.subscribe("replies/#").await;
    for i in 0..10 {
        c.request_v5(
            "edgellm/fleet/request",
            &chat_payload(&format!("f{i}"), "hi", 2),
            "replies/f",
            b"",
        )
        .await;
    }
    let mut by_id = HashMap::new();
    let mut by_node: HashMap<String, usize> = HashMap::new();
    while by_id.len() < 10 {
        let m = c.recv(WAIT).await;
        if m.json["done"] == true {
            let id = m.json["id"].as_str().unwrap().to_string();
            assert!(by_id.insert(id, ()).is_none(), "duplicate final: {m:?}");
            *by_node
                .entry(m.json["node"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    c.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(by_node.len(), 2, "both daemons answer: {by_node:?}");
    for d in daemons {
        d.stop().await;
    }
}

async fn twenty_clients_times_five_requests_each_get_one_terminal_message(backend: &'static str) {
    twenty_by_five(backend, 1).await
}

/// The same with continuous batching (`parallel = 4`; tract runs one at a time and says so in
/// its status).
async fn twenty_clients_times_five_requests_with_parallel_4(backend: &'static str) {
    twenty_by_five(backend, 4).await
}

async fn twenty_by_five(backend: &'static str, parallel: usize) {
    let broker = Mosquitto::start();
    let mut cfg = config(backend, tiny_package(), None, Some(&broker.url()), "n1");
    cfg.limits.queue_depth = 64;
    cfg.limits.parallel = parallel;
    let d = Daemon::start(cfg).await;
    let mut status = MqttClient::connect(&broker.url()).await;
    status.subscribe("edgellm/n1/status").await;
    let s = status.recv(WAIT).await;
    let batched = if backend == "ort" { parallel } else { 1 };
    assert_eq!(s.json["parallel"], batched, "{s:?}");
    let mut clients = Vec::new();
    for k in 0..20 {
        let mut c = MqttClient::connect(&broker.url()).await;
        c.subscribe(&format!("replies/{k}")).await;
        clients.push(c);
    }
    for (k, c) in clients.iter().enumerate() {
        for j in 0..5 {
            c.request_v5(
                "edgellm/n1/request",
                &chat_payload(&format!("c{k}-{j}"), "hi", 4),
                &format!("replies/{k}"),
                format!("{k}-{j}").as_bytes(),
            )
            .await;
        }
    }
    let (mut finished, mut busy) = (0, 0);
    for (k, c) in clients.iter_mut().enumerate() {
        let mut seen = HashMap::new();
        while seen.len() < 5 {
            let m = c.recv(WAIT).await;
            if m.json["done"] != true {
                continue;
            }
            let id = m.json["id"].as_str().unwrap().to_string();
            assert!(id.starts_with(&format!("c{k}-")), "{id} went to client {k}");
            assert_eq!(
                m.correlation.as_deref(),
                Some(&id.as_bytes()[1..]),
                "correlation data of {id}"
            );
            if m.json["error"]["code"] == "busy" {
                busy += 1;
            } else {
                assert_eq!(m.json["usage"]["completion_tokens"], 4, "{m:?}");
                finished += 1;
            }
            assert!(seen.insert(id, ()).is_none(), "duplicate terminal message");
        }
    }
    for c in &mut clients {
        c.assert_quiet(Duration::from_millis(100)).await;
    }
    assert_eq!(finished + busy, 100);
    assert!(finished >= 64, "{finished} finished, {busy} busy");
    d.stop().await;
}

/// `[model] system_prompts`: computed at start-up; a conversation that starts with one reuses
/// it (`cached_tokens` = the system turn's tokens) even after other conversations ran, and
/// answers exactly as a daemon without it does.
async fn kept_system_prompt_is_reused_and_changes_no_answer(backend: &'static str) {
    const SYSTEM: &str = "You are a terse assistant on a factory floor. Answer in one line.";
    let prefix = edgellm::model::Model::load(tiny_package())
        .unwrap()
        .system_prefix_ids(SYSTEM)
        .unwrap()
        .len();
    assert!(prefix > 10, "{prefix}");
    let ask = |id: &str, system: Option<&str>, text: &str| {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(json!({"role": "system", "content": s}));
        }
        messages.push(json!({"role": "user", "content": text}));
        json!({"id": id, "messages": messages, "max_tokens": 6})
    };
    let broker = Mosquitto::start();
    let cache = tempfile::tempdir().unwrap();
    let saved = || -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
        std::fs::read_dir(cache.path())
            .map(|d| {
                d.map(|e| {
                    let e = e.unwrap();
                    (e.path(), e.metadata().unwrap().modified().unwrap())
                })
                .collect()
            })
            .unwrap_or_default()
    };
    let mut answers = Vec::new();
    // Kept and saved to [model] prefix_cache_dir; kept again after a restart, restored from
    // that file (which stays as it was); not kept.
    for (kept, restored) in [(true, false), (true, true), (false, false)] {
        let mut cfg = config(backend, tiny_package(), None, Some(&broker.url()), "n1");
        if kept {
            cfg.model.system_prompts = vec![SYSTEM.to_string()];
            cfg.model.prefix_cache_dir = Some(cache.path().to_path_buf());
        }
        let before = saved();
        let d = Daemon::start(cfg).await;
        let after = saved();
        if kept {
            assert_eq!(
                after.len(),
                1,
                "one file for the one system prompt: {after:?}"
            );
            assert!(
                after[0].0.extension().is_some_and(|e| e == "kv"),
                "{after:?}"
            );
        }
        if restored {
            assert_eq!(before, after, "restored, not computed and written again");
        }
        let mut c = MqttClient::connect(&broker.url()).await;
        c.subscribe("replies/sys").await;
        let mut texts = Vec::new();
        for (i, (system, text)) in [
            (Some(SYSTEM), "Is the line running?"),
            (None, "Something else entirely"),
            (Some(SYSTEM), "How many parts today?"),
        ]
        .into_iter()
        .enumerate()
        {
            c.request_v5(
                "edgellm/n1/request",
                &ask(&format!("s{i}"), system, text),
                "replies/sys",
                b"s",
            )
            .await;
            let (_, fin) = c.until_done().await;
            let cached = fin.json["usage"]["cached_tokens"].as_u64().unwrap() as usize;
            if kept && system.is_some() {
                assert_eq!(cached, prefix, "request {i}: {:?}", fin.json);
            }
            texts.push(fin.json["text"].as_str().unwrap().to_string());
        }
        answers.push(texts);
        d.stop().await;
    }
    assert_eq!(answers[0], answers[2]);
    assert_eq!(answers[1], answers[2]);
}

edgellm_tests::on_both_backends!(
    kept_system_prompt_is_reused_and_changes_no_answer,
    request_response_streaming_and_fallbacks,
    bad_input_gets_an_error_naming_the_problem,
    status_is_retained_and_goes_offline_on_stop,
    cancel_topic_and_broker_restart_mid_stream,
    a_share_group_splits_requests_between_two_daemons,
    twenty_clients_times_five_requests_each_get_one_terminal_message,
    twenty_clients_times_five_requests_with_parallel_4,
);
