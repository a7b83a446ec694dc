//! edgellmd over D-Bus, end to end: a private `dbus-daemon`, the daemon running in-process
//! (`edgellm::run`) on a real exported package through ONNX Runtime, and a raw zbus client.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use edgellm::api::{Input, Request};
use edgellm::engine::Engine;
use edgellm::model::Model;
use edgellm_tests::harness::DbusBus;
use edgellm_tests::service::*;
use zbus::OwnedVariant;

/// The same greedy request in-process, for comparison with what the wire returns.
fn in_process(backend: &str, package: &std::path::Path, prompt: &str, max_tokens: usize) -> String {
    let input = Input::Messages(vec![edgellm::chat::Message::new("user", prompt)]);
    in_process_with(backend, package, input, max_tokens, |s| s.temperature = 0.0)
}

/// A request in-process with the package's default sampling, changed by `sampling`.
fn in_process_with(
    backend: &str,
    package: &std::path::Path,
    input: Input,
    max_tokens: usize,
    sampling: impl FnOnce(&mut edgellm::sampler::SamplingParams),
) -> String {
    let model = Model::load(package).unwrap();
    let backend = edgellm::backend::load(
        &model.package,
        edgellm::backend::BackendChoice::parse(backend).unwrap(),
        &edgellm::backend::BackendOptions {
            max_length: 256,
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap()
    .backend;
    let mut req = Request::new(input);
    req.sampling = model.default_sampling();
    sampling(&mut req.sampling);
    let mut engine = Engine::new(model, backend, 256);
    req.max_tokens = Some(max_tokens);
    engine
        .generate(&req, &mut |_| std::ops::ControlFlow::Continue(()))
        .unwrap()
        .text
}

async fn chat_complete_streaming_and_properties(backend: &'static str) {
    let bus_daemon = DbusBus::start();
    let pkg = tiny_package();
    let d = Daemon::start(config(backend, pkg, Some(bus_daemon.address()), None, "t")).await;
    let c = bus(bus_daemon.address()).await.unwrap();

    // Properties.
    let name = pkg.canonicalize().unwrap();
    let name = name.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        String::try_from(get_property(&c, "Model").await.unwrap()).unwrap(),
        name
    );
    assert_eq!(
        String::try_from(get_property(&c, "Backend").await.unwrap()).unwrap(),
        backend
    );
    assert_eq!(
        String::try_from(get_property(&c, "BackendReason").await.unwrap()).unwrap(),
        "configured"
    );
    assert_eq!(
        String::try_from(get_property(&c, "State").await.unwrap()).unwrap(),
        "ready"
    );
    assert_eq!(
        u32::try_from(get_property(&c, "QueueLength").await.unwrap()).unwrap(),
        0
    );
    assert_eq!(
        u32::try_from(get_property(&c, "MaxContext").await.unwrap()).unwrap(),
        256
    );

    // Chat: greedy (the package's default) text equals the in-process engine's, with usage.
    let max = 12u32;
    let (text, stats) = chat(
        &c,
        &user("Tell me about the sea"),
        &opts(&[("max_tokens", max.into())]),
    )
    .await
    .unwrap();
    assert_eq!(text, in_process(backend, pkg, "Tell me about the sea", 12));
    assert!(!text.is_empty());
    assert_eq!(stat_str(&stats, "finish_reason"), "length");
    assert_eq!(stat_u32(&stats, "completion_tokens"), max);
    assert!(stat_u32(&stats, "prompt_tokens") > 5);
    // The first request after start-up computes its whole prompt.
    assert_eq!(stat_u32(&stats, "cached_tokens"), 0);
    for k in ["ttft_ms", "prefill_tok_s", "decode_tok_s"] {
        assert!(
            matches!(&*stats[k], zbus::Variant::F64(f) if *f > 0.0),
            "{k}: {:?}",
            stats[k]
        );
    }

    // StartChat: deltas in order make up the same text; Finished carries the same stats.
    let mut s = start_chat(
        &c,
        &user("Tell me about the sea"),
        &opts(&[("max_tokens", max.into())]),
    )
    .await
    .unwrap();
    let (deltas, reason, stats) = s.finish().await;
    assert_eq!(deltas.concat(), text);
    assert!(deltas.len() > 1, "{deltas:?}");
    assert_eq!(reason, "length");
    assert_eq!(stat_u32(&stats, "completion_tokens"), max);
    // The same prompt again: all of it but the last token comes from the KV cache.
    assert_eq!(
        stat_u32(&stats, "cached_tokens"),
        stat_u32(&stats, "prompt_tokens") - 1
    );

    // Complete: plain text, no chat template; seeded sampling repeats.
    let complete = |seed: u64| {
        let c = c.clone();
        async move {
            let o = opts(&[
                ("max_tokens", 8u32.into()),
                ("temperature", 1.0f64.into()),
                ("seed", seed.into()),
            ]);
            let r = c
                .call_method(
                    Some(BUS_NAME),
                    PATH,
                    Some(BUS_NAME),
                    "Complete",
                    &("Once upon a time", &o),
                )
                .await
                .unwrap();
            let (t, s): (String, Dict) = r.body().deserialize().unwrap();
            assert_eq!(stat_u32(&s, "completion_tokens"), 8);
            t
        }
    };
    // The options reach the sampler: the text is what the engine samples in-process with the
    // same temperature and seed, other seeds give other texts, and none is the greedy one (a
    // daemon that dropped temperature or seed would answer greedily or unseeded).
    let sampled = |seed: u64| {
        in_process_with(
            backend,
            pkg,
            Input::Prompt {
                text: "Once upon a time".into(),
                raw: true,
            },
            8,
            |s| {
                s.temperature = 1.0;
                s.seed = Some(seed);
            },
        )
    };
    let greedy = in_process_with(
        backend,
        pkg,
        Input::Prompt {
            text: "Once upon a time".into(),
            raw: true,
        },
        8,
        |s| s.temperature = 0.0,
    );
    let texts = [complete(7).await, complete(8).await, complete(9).await];
    for (seed, text) in [7, 8, 9].into_iter().zip(&texts) {
        assert_eq!(text, &sampled(seed), "seed {seed}: not the engine's sample");
        assert_eq!(text, &complete(seed).await, "seed {seed} does not repeat");
    }
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "three seeds, one text: {texts:?}"
    );
    assert!(
        texts.iter().any(|t| t != &greedy),
        "every sample is the greedy text {greedy:?}"
    );
    d.stop().await;
}

/// An `a{sv}` whose entries may repeat a key (what a HashMap cannot send).
struct TwiceDict(Vec<(&'static str, u32)>);

impl zbus::Type for TwiceDict {
    const SIGNATURE: &'static zbus::Signature = <Dict>::SIGNATURE;
}

impl serde::Serialize for TwiceDict {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, &zbus::Variant::from(*v))?;
        }
        m.end()
    }
}

async fn bad_input_is_answered_and_the_next_request_served(backend: &'static str) {
    let bus_daemon = DbusBus::start();
    let d = Daemon::start(config(
        backend,
        tiny_package(),
        Some(bus_daemon.address()),
        None,
        "t",
    ))
    .await;
    let c = bus(bus_daemon.address()).await.unwrap();
    const INVALID: &str = "org.edgellm.Inference1.Error.InvalidRequest";
    let invalid = INVALID;
    type Case = (Vec<(String, String)>, Dict, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (
            user("hi"),
            opts(&[("temperature", (-1.0f64).into())]),
            invalid,
            "temperature",
        ),
        (
            user("hi"),
            opts(&[("temperature", 1e9f64.into())]),
            invalid,
            "temperature",
        ),
        (
            user("hi"),
            opts(&[("top_p", 0.0f64.into())]),
            invalid,
            "top_p",
        ),
        (
            user("hi"),
            opts(&[("max_tokens", (-5i32).into())]),
            invalid,
            "max_tokens",
        ),
        (
            user("hi"),
            opts(&[("max_tokens", 0u32.into())]),
            invalid,
            "max_tokens",
        ),
        (
            user("hi"),
            opts(&[("temperature", OwnedVariant::from(zbus::Str::from("hot")))]),
            invalid,
            "temperature",
        ),
        (
            user("hi"),
            opts(&[("temprature", 1.0f64.into())]),
            invalid,
            "temprature",
        ),
        (vec![], Dict::new(), invalid, "messages"),
        (
            vec![("wizard".into(), "hi".into())],
            Dict::new(),
            invalid,
            "wizard",
        ),
        (
            user(&"word ".repeat(400)),
            Dict::new(),
            "org.edgellm.Inference1.Error.PromptTooLong",
            "max_length 256",
        ),
    ];
    for (messages, o, name, needle) in cases {
        let (n, msg) = chat(&c, &messages, &o).await.unwrap_err();
        assert_eq!(n, name, "{msg}");
        assert!(msg.contains(needle), "{msg:?} should name {needle:?}");
    }
    // An a{sv} naming a key twice (legal on the wire; a HashMap would keep the last value) is
    // refused, naming the key. An empty stop list is refused too.
    let e = c
        .call_method(
            Some(BUS_NAME),
            PATH,
            Some(BUS_NAME),
            "Chat",
            &(
                user("hi"),
                TwiceDict(vec![("max_tokens", 2), ("max_tokens", 500)]),
            ),
        )
        .await
        .unwrap_err();
    let (n, msg) = split_error(e);
    assert_eq!(n, invalid, "{msg}");
    assert!(msg.contains("\"max_tokens\" is given twice"), "{msg}");
    let empty: Vec<String> = Vec::new();
    let empty = zbus::OwnedVariant::try_from(zbus::Variant::from(empty)).unwrap();
    let (n, msg) = chat(&c, &user("hi"), &opts(&[("stop", empty)]))
        .await
        .unwrap_err();
    assert_eq!(n, invalid, "{msg}");
    assert!(msg.contains("stop: give 1 to 16 strings, got 0"), "{msg}");
    // A 10 MB prompt could never fit in 256 tokens: refused as too long from its size alone,
    // without tokenizing it, and the daemon goes on serving.
    let huge = "word ".repeat(2 << 20);
    let (n, msg) = chat(&c, &user(&huge), &opts(&[])).await.unwrap_err();
    assert_eq!(n, "org.edgellm.Inference1.Error.PromptTooLong", "{msg}");
    assert!(
        msg.contains("bytes cannot fit in max_length 256 tokens"),
        "{msg}"
    );
    // Wrong signature: zbus answers InvalidArgs.
    let e = c
        .call_method(
            Some(BUS_NAME),
            PATH,
            Some(BUS_NAME),
            "Chat",
            &("just a string",),
        )
        .await
        .unwrap_err();
    assert_eq!(split_error(e).0, "org.freedesktop.DBus.Error.InvalidArgs");
    // The daemon still serves.
    let (_, stats) = chat(&c, &user("hi"), &opts(&[("max_tokens", 3u32.into())]))
        .await
        .unwrap();
    assert_eq!(stat_u32(&stats, "completion_tokens"), 3);
    d.stop().await;
}

async fn cancel_disconnect_and_busy(backend: &'static str) {
    let bus_daemon = DbusBus::start();
    let mut cfg = config(
        backend,
        slow_package(),
        Some(bus_daemon.address()),
        None,
        "t",
    );
    cfg.model.max_length = 1024;
    cfg.limits.queue_depth = 1;
    let d = Daemon::start(cfg).await;
    let c = bus(bus_daemon.address()).await.unwrap();
    let long = opts(&[("max_tokens", 600u32.into())]);

    // Cancel() mid-generation.
    let mut s = start_chat(&c, &user("Write a long story"), &long)
        .await
        .unwrap();
    assert!(matches!(s.next().await, Signal::Delta(_)));
    s.cancel(&c).await;
    let (_, reason, stats) = s.finish().await;
    assert_eq!(reason, "cancelled");
    assert!(stat_u32(&stats, "completion_tokens") < 600);

    // An outsider on the same bus listens to every Request signal and tries to cancel another
    // client's stream: the bus delivers it nothing (the signals are unicast to the owner), the
    // daemon refuses its Cancel with AccessDenied, and the owner's answer runs to its end.
    let outsider = bus(bus_daemon.address()).await.unwrap();
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.edgellm.Inference1.Request")
        .build()
        .expect("match rule");
    let mut snoop = zbus::MessageStream::for_match_rule(rule, &outsider, None)
        .await
        .unwrap();
    let mut s = start_chat(
        &c,
        &user("Write a long story"),
        &opts(&[("max_tokens", 24u32.into())]),
    )
    .await
    .unwrap();
    let name = s.path.as_str().rsplit('/').next().unwrap().to_string();
    assert!(
        name.len() == 32 && name.chars().all(|ch| ch.is_ascii_hexdigit()),
        "request path {} is guessable",
        s.path.as_str()
    );
    assert!(matches!(s.next().await, Signal::Delta(_)));
    let refused = outsider
        .call_method(
            Some(BUS_NAME),
            s.path.as_str(),
            Some("org.edgellm.Inference1.Request"),
            "Cancel",
            &(),
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("AccessDenied"),
        "an outsider's Cancel: {refused}"
    );
    let (_, reason, stats) = s.finish().await;
    assert_eq!(reason, "length", "the outsider ended the owner's answer");
    assert_eq!(stat_u32(&stats, "completion_tokens"), 24);
    {
        use futures_util::StreamExt;
        let got = tokio::time::timeout(Duration::from_millis(300), snoop.next()).await;
        assert!(got.is_err(), "the outsider received a signal: {got:?}");
    }

    // Queue full: one running, one waiting, the third is refused with Busy.
    let mut running = start_chat(&c, &user("one"), &long).await.unwrap();
    assert!(matches!(running.next().await, Signal::Delta(_)));
    let mut waiting = start_chat(&c, &user("two"), &long).await.unwrap();
    let (name, msg) = chat(&c, &user("three"), &long).await.unwrap_err();
    assert_eq!(name, "org.edgellm.Inference1.Error.Busy", "{msg}");
    assert_eq!(
        u32::try_from(get_property(&c, "QueueLength").await.unwrap()).unwrap(),
        1
    );
    assert_eq!(
        String::try_from(get_property(&c, "State").await.unwrap()).unwrap(),
        "busy"
    );
    waiting.cancel(&c).await;
    running.cancel(&c).await;
    assert_eq!(running.finish().await.1, "cancelled");
    assert_eq!(waiting.finish().await.1, "cancelled");

    // A caller that leaves the bus mid-stream cancels its request: the engine is free again
    // long before 600 tokens (12 s and more at this model's speed) could have been generated.
    let other = bus(bus_daemon.address()).await.unwrap();
    let mut s = start_chat(&other, &user("Write a long story"), &long)
        .await
        .unwrap();
    assert!(matches!(s.next().await, Signal::Delta(_)));
    drop(s);
    other.close().await.unwrap();
    let t = std::time::Instant::now();
    loop {
        let state = String::try_from(get_property(&c, "State").await.unwrap()).unwrap();
        if state == "ready" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the disconnected caller's request is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.stop().await;
}

/// The bus daemon dies while a request streams (it used to leave edgellmd running deaf
/// forever, finishing the request for nobody): the loss is logged, the D-Bus request is
/// cancelled, and `run` returns an error naming it, so edgellmd exits non-zero and systemd's
/// Restart=on-failure brings it back. Restarted on a new bus, it serves again.
async fn losing_the_bus_ends_the_daemon_with_an_error(backend: &'static str) {
    let bus_daemon = DbusBus::start();
    let mut cfg = config(
        backend,
        slow_package(),
        Some(bus_daemon.address()),
        None,
        "lost",
    );
    cfg.model.max_length = 1024;
    let d = Daemon::start(cfg.clone()).await;
    let c = bus(bus_daemon.address()).await.unwrap();
    let mut s = start_chat(
        &c,
        &user("Write a long story"),
        &opts(&[("max_tokens", 600u32.into())]),
    )
    .await
    .unwrap();
    assert!(matches!(s.next().await, Signal::Delta(_)));
    let t = std::time::Instant::now();
    drop(bus_daemon); // kills dbus-daemon
    let err = d
        .exited(Duration::from_secs(30))
        .await
        .expect_err("edgellmd must not run on without its bus")
        .to_string();
    assert!(
        err.contains("D-Bus: the bus connection closed; exiting"),
        "{err}"
    );
    // Well before the 600 tokens (12 s and more at this model's speed) could have been made.
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "the request ran on: {:?}",
        t.elapsed()
    );
    // What systemd does next: the daemon starts again once a bus is there, and serves.
    let bus2 = DbusBus::start();
    cfg.dbus.address = bus2.address().to_string();
    let d = Daemon::start(cfg).await;
    let c = bus(bus2.address()).await.unwrap();
    let (_, stats) = chat(&c, &user("hi"), &opts(&[("max_tokens", 2u32.into())]))
        .await
        .unwrap();
    assert_eq!(stat_u32(&stats, "completion_tokens"), 2);
    d.stop().await;
}

/// `backend = "auto"` with an ONNX Runtime library that does not exist: the daemon serves on
/// tract, and the bus says so and why (the reason names the library path).
/// Issue 13 §4 on a fixture package (fp32): five concurrent requests over D-Bus and MQTT to a
/// daemon with `parallel = 4` get exactly their answers alone (the real model's run is in
/// `real_model.rs`).
#[cfg(feature = "ort")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_a_fixture_get_their_answers_alone() {
    let talk = |system: &str, user: &str| {
        vec![
            ("system".to_string(), system.to_string()),
            ("user".to_string(), user.to_string()),
        ]
    };
    let conversations = vec![
        talk("You are terse.", "Tell me about the sea"),
        talk(
            "You are a poet.",
            "Write about the wind in the trees, at length",
        ),
        user("Count to ten"),
        talk("You answer in lists.", "Name some tools"),
        user("Write a long story about a lighthouse keeper and a storm"),
    ];
    // The fixture decodes a token in about a millisecond: its answers rarely overlap long
    // enough for a 5 ms poll to see them together (`daemon/tests/batching.rs` and the real
    // model's run show that); what this run checks is the answers over both transports.
    concurrent_requests_match_alone(tiny_package(), 256, &conversations, 1).await;
}

#[cfg(all(feature = "ort", feature = "tract"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_fallback_is_visible_on_the_bus() {
    let bus_daemon = DbusBus::start();
    let pkg = tiny_package();
    let mut cfg = config("auto", pkg, Some(bus_daemon.address()), None, "t");
    let missing = "/nonexistent/libonnxruntime.so";
    cfg.onnxruntime.library = Some(missing.into());
    let d = Daemon::start(cfg).await;
    let c = bus(bus_daemon.address()).await.unwrap();
    assert_eq!(
        String::try_from(get_property(&c, "Backend").await.unwrap()).unwrap(),
        "tract"
    );
    let reason = String::try_from(get_property(&c, "BackendReason").await.unwrap()).unwrap();
    assert!(
        reason.starts_with("auto: ONNX Runtime cannot serve the package")
            && reason.contains(missing),
        "{reason}"
    );
    let (text, _) = chat(
        &c,
        &user("Tell me about the sea"),
        &opts(&[("max_tokens", 12u32.into())]),
    )
    .await
    .unwrap();
    assert_eq!(text, in_process("tract", pkg, "Tell me about the sea", 12));
    d.stop().await;
}

edgellm_tests::on_both_backends!(
    chat_complete_streaming_and_properties,
    bad_input_is_answered_and_the_next_request_served,
    cancel_disconnect_and_busy,
    losing_the_bus_ends_the_daemon_with_an_error,
);
