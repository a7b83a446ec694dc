//! edgellmd's lifecycle with both transports up: shutdown in the middle of a generation (the
//! running request ends `shutdown`, queued ones get `shutting_down`, over D-Bus and MQTT, and
//! the status goes `offline`), and MQTT over TLS with a username and a password file.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgellm_tests::harness::{DbusBus, Mosquitto, require_program};
use edgellm_tests::service::*;
use serde_json::json;

async fn shutdown_mid_generation_answers_everything(backend: &'static str) {
    let bus_daemon = DbusBus::start();
    let broker = Mosquitto::start();
    let mut cfg = config(
        backend,
        slow_package(),
        Some(bus_daemon.address()),
        Some(&broker.url()),
        "n1",
    );
    cfg.model.max_length = 1024;
    cfg.limits.shutdown_grace_s = 10;
    let d = Daemon::start(cfg).await;
    let c = bus(bus_daemon.address()).await.unwrap();
    let mut m = MqttClient::connect(&broker.url()).await;
    m.subscribe("replies/#").await;
    m.subscribe("edgellm/n1/status").await;
    let long = opts(&[("max_tokens", 600u32.into())]);

    let mut running = start_chat(&c, &user("Write a long story"), &long)
        .await
        .unwrap();
    assert!(matches!(running.next().await, Signal::Delta(_)));
    let mut queued = start_chat(&c, &user("another"), &long).await.unwrap();
    m.request_v5(
        "edgellm/n1/request",
        &json!({"id": "q", "prompt": "x", "max_tokens": 600}),
        "replies/q",
        b"q",
    )
    .await;
    // Let the MQTT request reach the queue.
    let t = Instant::now();
    while u32::try_from(get_property(&c, "QueueLength").await.unwrap()).unwrap() < 2 {
        assert!(t.elapsed() < Duration::from_secs(10), "requests not queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t = Instant::now();
    d.stop().await;
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let (_, reason, stats) = running.finish().await;
    assert_eq!(reason, "shutdown");
    assert!(stat_u32(&stats, "completion_tokens") < 600);
    let (_, reason, stats) = queued.finish().await;
    assert_eq!(reason, "error");
    assert_eq!(stat_str(&stats, "error_code"), "shutting_down");
    let mut got_error = false;
    let mut got_offline = false;
    while !(got_error && got_offline) {
        let msg = m.recv(Duration::from_secs(30)).await;
        if msg.topic == "replies/q" && msg.json["done"] == true {
            assert!(!got_error, "two terminal messages");
            assert_eq!(msg.json["error"]["code"], "shutting_down");
            got_error = true;
        }
        if msg.topic == "edgellm/n1/status" && msg.json["state"] == "offline" {
            got_offline = true;
        }
    }
    // The bus name is gone.
    assert!(get_property(&c, "State").await.is_err());
}

/// A CA and a server certificate for localhost/127.0.0.1, made with openssl.
/// A CA (`{name}-ca.crt`) and a server certificate it signed for localhost / 127.0.0.1
/// (`{name}-server.crt`, `.key`), in `dir`.
fn certificates(dir: &Path, name: &str) {
    let openssl = require_program("openssl", "openssl");
    let run = |args: &[&str]| {
        let out = Command::new(&openssl)
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let f = |file: &str| format!("{name}-{file}");
    let (ca_key, ca_crt, key, csr, crt) = (
        f("ca.key"),
        f("ca.crt"),
        f("server.key"),
        f("server.csr"),
        f("server.crt"),
    );
    let subject = format!("/CN=edgellm-test-{name}-ca");
    run(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &ca_key, "-out", &ca_crt,
        "-days", "2", "-subj", &subject,
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_crt,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &crt,
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
}

async fn mqtt_over_tls_with_a_password_file(backend: &'static str) {
    let tmp = tempfile::tempdir().unwrap();
    certificates(tmp.path(), "good");
    let passwd = Mosquitto::password_file(tmp.path(), "edge", "s3cret");
    let d = tmp.path().display();
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\ncafile {d}/good-ca.crt\ncertfile {d}/good-server.crt\nkeyfile {d}/good-server.key\n",
        passwd.display()
    ));
    let url = format!("mqtts://localhost:{}", broker.port());
    let pw_file = tmp.path().join("pw");
    std::fs::write(&pw_file, "s3cret\n").unwrap();
    let bus_daemon = DbusBus::start();

    let mut cfg = config(
        backend,
        tiny_package(),
        Some(bus_daemon.address()),
        None,
        "tls",
    );
    cfg.mqtt.enabled = true;
    cfg.mqtt.url = url.clone();
    cfg.mqtt.ca_file = Some(format!("{d}/good-ca.crt").into());
    cfg.mqtt.username = "edge".into();
    cfg.mqtt.password_file = Some(pw_file.clone());
    let daemon = Daemon::start(cfg.clone()).await;
    // The broker accepted the daemon over TLS with the password: its client id is connected as
    // user `edge`.
    let t = Instant::now();
    while !broker
        .log()
        .contains("as edgellmd-tls (p5, c1, k15, u'edge')")
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the daemon did not log in over TLS:\n{}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;

    // A wrong password is refused by the broker (and the daemon keeps serving D-Bus).
    std::fs::write(&pw_file, "wrong\n").unwrap();
    let bus2 = DbusBus::start();
    cfg.dbus.address = bus2.address().to_string();
    cfg.mqtt.node_id = "tls-wrong".into();
    let daemon = Daemon::start(cfg.clone()).await;
    let t = Instant::now();
    while !broker.log().contains("disconnected, not authorised") {
        assert!(t.elapsed() < Duration::from_secs(20), "{}", broker.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !broker
            .log()
            .contains("as edgellmd-tls-wrong (p5, c1, k15, u'edge')"),
        "a wrong password was accepted"
    );
    let c = bus(bus2.address()).await.unwrap();
    let (_, stats) = chat(&c, &user("hi"), &opts(&[("max_tokens", 2u32.into())]))
        .await
        .unwrap();
    assert_eq!(stat_u32(&stats, "completion_tokens"), 2);
    daemon.stop().await;

    // A broker whose certificate another CA signed (right name, right password): the daemon
    // trusts only its ca_file, so the handshake fails and it never logs in, nor sends the
    // password; it keeps serving D-Bus.
    certificates(tmp.path(), "rogue");
    let rogue = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\ncafile {d}/rogue-ca.crt\ncertfile {d}/rogue-server.crt\nkeyfile {d}/rogue-server.key\n",
        passwd.display()
    ));
    std::fs::write(&pw_file, "s3cret\n").unwrap();
    let bus3 = DbusBus::start();
    cfg.dbus.address = bus3.address().to_string();
    cfg.mqtt.url = format!("mqtts://localhost:{}", rogue.port());
    cfg.mqtt.node_id = "tls-rogue".into();
    let daemon = Daemon::start(cfg).await;
    let t = Instant::now();
    // mosquitto logs the aborted handshake (the client's "unknown CA" alert).
    while !rogue.log().to_lowercase().contains("unknown ca") {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the daemon did not try the rogue broker, or the handshake did not fail:\n{}",
            rogue.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !rogue.log().contains("edgellmd-tls-rogue"),
        "a broker with another CA's certificate was trusted:\n{}",
        rogue.log()
    );
    let c = bus(bus3.address()).await.unwrap();
    let (_, stats) = chat(&c, &user("hi"), &opts(&[("max_tokens", 2u32.into())]))
        .await
        .unwrap();
    assert_eq!(stat_u32(&stats, "completion_tokens"), 2);
    daemon.stop().await;
}

edgellm_tests::on_both_backends!(
    shutdown_mid_generation_answers_everything,
    mqtt_over_tls_with_a_password_file,
);

/// A package whose context is huge, served with a huge max_length: the KV cache could never
/// fit, so the daemon refuses to start, with the numbers, before allocating anything (it used
/// to allocate ~1.3 GB/s until the kernel killed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_cache_larger_than_memory_is_refused_with_the_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = tmp.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    for f in std::fs::read_dir(tiny_package()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, pkg.join(f.file_name().unwrap())).unwrap();
    }
    let gc = pkg.join("genai_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gc).unwrap()).unwrap();
    cfg["model"]["context_length"] = json!(1_000_000_000u64);
    std::fs::write(&gc, cfg.to_string()).unwrap();
    std::fs::remove_file(pkg.join("SHA256SUMS")).unwrap();
    let mut config = config("tract", &pkg, None, None, "kv");
    config.model.max_length = 1_000_000_000;
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        edgellm::run(config, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("the daemon should refuse at once, not run")
    .expect_err("a KV cache larger than memory must be refused")
    .to_string();
    assert!(
        err.contains("the KV cache for max_length 1000000000 needs")
            && err.contains("exceeds")
            && err.contains("lower [model] max_length"),
        "{err}"
    );
    eprintln!("refused after {:?}: {err}", started.elapsed());
}
