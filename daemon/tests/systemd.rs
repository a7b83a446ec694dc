//! The `edgellmd` binary under a service manager's eyes: a real `NOTIFY_SOCKET` (a unix
//! datagram socket this test binds), `WATCHDOG_USEC`, and a real SIGTERM. READY=1 comes only
//! after the model is loaded and the engine answered; WATCHDOG=1 keeps coming while the engine
//! lives; SIGTERM gives STOPPING=1 and exit status 0. Also the configuration flags.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/src/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn edgellmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgellmd"))
}

fn recv(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    sock.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn ready_status_watchdog_and_stopping_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = common::export("qwen2", tmp.path());
    let sock_path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let cfg = tmp.path().join("edgellm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 128\nthreads = 1\n[dbus]\nenabled = false\n[mqtt]\nenabled = false\n",
            pkg.display().to_string()
        ),
    )
    .unwrap();
    let start = Instant::now();
    let mut child = edgellmd()
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // STATUS= while loading, then READY=1 with a status line.
    let mut seen = Vec::new();
    let ready = loop {
        let m = recv(&sock, Duration::from_secs(60)).expect("no READY=1 within 60 s");
        seen.push(m.clone());
        if m.contains("READY=1") {
            break m;
        }
    };
    assert!(
        seen[0].starts_with("STATUS=loading"),
        "first notification: {seen:?}"
    );
    assert!(ready.contains("STATUS=ready"), "{ready}");
    // backend = "auto": ONNX Runtime when this build has it (the library is found), else tract.
    let expected = if cfg!(feature = "ort") {
        "(ort)"
    } else {
        "(tract)"
    };
    assert!(ready.contains(expected), "{ready}");

    // WATCHDOG=1 every half period (200 ms) while idle.
    let t = Instant::now();
    let mut pings = 0;
    while t.elapsed() < Duration::from_secs(2) {
        if let Some(m) = recv(&sock, Duration::from_secs(1))
            && m == "WATCHDOG=1"
        {
            pings += 1;
        }
    }
    assert!(pings >= 4, "{pings} watchdog pings in 2 s");

    // SIGTERM: STOPPING=1, then exit 0.
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let stopping = loop {
        let m = recv(&sock, Duration::from_secs(10)).expect("no STOPPING=1");
        if m.contains("STOPPING=1") {
            break m;
        }
    };
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(start.elapsed() < Duration::from_secs(90));
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

/// WATCHDOG=1 messages received within `window`.
fn pings_within(sock: &UnixDatagram, window: Duration) -> usize {
    let t = Instant::now();
    let mut pings = 0;
    while let Some(left) = window.checked_sub(t.elapsed()) {
        if recv(sock, left.max(Duration::from_millis(1))).as_deref() == Some("WATCHDOG=1") {
            pings += 1;
        }
    }
    pings
}

/// Issue 18 §1: the watchdog covers the transports, not only the engine. WATCHDOG=1 comes only
/// while a D-Bus round trip to the daemon's own object succeeds and the MQTT event loop answers
/// a probe: a hung bus daemon (SIGSTOP: its socket stays open, nothing is routed) stops the
/// pings, so systemd would restart the daemon; they come back when the bus does. A broker that
/// cannot be reached stops nothing (the daemon keeps serving D-Bus and retries the broker).
#[test]
fn the_watchdog_stops_while_the_bus_hangs_and_not_for_an_absent_broker() {
    let tmp = tempfile::tempdir().unwrap();
    let pkg = common::export("qwen2", tmp.path());
    let bus = harness::DbusBus::start();
    let (_sock_dir, sock, sock_path) = harness::notify_socket();
    let no_broker = harness::free_port();
    let cfg = tmp.path().join("edgellm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 128\nthreads = 1\n\
             [dbus]\nenabled = true\naddress = {:?}\n\
             [mqtt]\nenabled = true\nurl = \"mqtt://127.0.0.1:{no_broker}\"\n",
            pkg.display().to_string(),
            bus.address()
        ),
    )
    .unwrap();
    let log = tmp.path().join("edgellmd.log");
    let mut child = edgellmd()
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        // 1 s: a ping every 500 ms, each after probes answered within 250 ms (generous on a
        // loaded machine: a round trip on an idle one takes well under a millisecond).
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    while !recv(&sock, Duration::from_secs(60))
        .expect("no READY=1 within 60 s")
        .contains("READY=1")
    {}

    // Healthy bus, no broker: pings every 500 ms.
    let before = pings_within(&sock, Duration::from_secs(3));
    assert!(before >= 3, "{before} pings in 3 s with the bus up");

    // The bus hangs: after the ping in flight, none.
    signal(bus.pid(), "-STOP");
    std::thread::sleep(Duration::from_millis(700));
    while recv(&sock, Duration::from_millis(1)).is_some() {}
    let hung = pings_within(&sock, Duration::from_secs(3));
    signal(bus.pid(), "-CONT");
    assert_eq!(hung, 0, "watchdog pings went on while the bus daemon hung");

    let after = pings_within(&sock, Duration::from_secs(3));
    assert!(
        after >= 3,
        "{after} pings in 3 s once the bus answers again"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("watchdog not fed: D-Bus self-ping unanswered"),
        "the log says why the watchdog starves:\n{text}"
    );
    assert!(
        !text.contains("watchdog not fed: the MQTT"),
        "an absent broker must not starve the watchdog:\n{text}"
    );

    signal(child.id(), "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn config_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let out = edgellmd().arg("--print-default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[mqtt]") && text.contains("queue_depth = 8"));
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, &text).unwrap();
    let out = edgellmd()
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nqueue_dept = 3\n").unwrap();
    let out = edgellmd().arg("--check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_dept"));

    // A configuration that names a missing model fails at start with exit 1, naming it.
    let missing = tmp.path().join("missing.toml");
    std::fs::write(
        &missing,
        "[model]\npath = \"/nonexistent/model\"\n[dbus]\nenabled = false\n[mqtt]\nenabled = false\n",
    )
    .unwrap();
    let out = edgellmd()
        .arg("--config")
        .arg(&missing)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
}
