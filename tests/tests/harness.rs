//! The test harness's real services start, answer and stop: a private dbus-daemon that
//! dbus-send can talk to, a mosquitto broker that accepts TCP and survives a restart on the
//! same port, and the systemd notify socket.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::Command;
use std::time::Duration;

use edgellm_tests::harness::{
    DbusBus, Mosquitto, free_port, notify_socket, recv_notify, require_program,
};

#[test]
fn dbus_bus_accepts_connections_and_answers_dbus_send() {
    let bus = DbusBus::start();
    assert!(bus.address().starts_with("unix:"), "{}", bus.address());
    UnixStream::connect(bus.socket_path()).unwrap();

    let out = Command::new(require_program("dbus-send", "dbus"))
        .arg(format!("--bus={}", bus.address()))
        .args([
            "--dest=org.freedesktop.DBus",
            "--print-reply",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.ListNames",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dbus-send failed: {stdout}{}\nbus log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        bus.log()
    );
    assert!(stdout.contains("org.freedesktop.DBus"), "{stdout}");
}

#[test]
fn dbus_bus_is_gone_after_drop() {
    let bus = DbusBus::start();
    let socket = bus.socket_path().to_path_buf();
    drop(bus);
    assert!(UnixStream::connect(&socket).is_err());
    assert!(!socket.exists(), "temp dir removed");
}

#[test]
fn mosquitto_accepts_and_restarts_on_the_same_port() {
    let mut broker = Mosquitto::start();
    let port = broker.port();
    assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{port}"));
    TcpStream::connect(("127.0.0.1", port)).unwrap();

    broker.stop();
    assert!(!broker.is_running());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "stopped broker still accepts"
    );

    broker.restart();
    assert_eq!(broker.port(), port);
    assert!(broker.is_running());
    TcpStream::connect(("127.0.0.1", port)).unwrap();

    // restart() of a running broker works too.
    broker.restart();
    TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(broker.log().contains("running"), "{}", broker.log());
}

#[test]
fn mosquitto_takes_extra_config_and_a_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = Mosquitto::password_file(dir.path(), "edge", "s3cret");
    let text = std::fs::read_to_string(&passwd).unwrap();
    assert!(text.starts_with("edge:"), "{text}");

    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}",
        passwd.display()
    ));
    let log = broker.log();
    assert!(!log.contains("Error"), "{log}");
    // The extra lines are in force: anonymous is refused, the password file's user is not.
    assert_eq!(connack(broker.port(), None), 5, "{}", broker.log());
    assert_eq!(connack(broker.port(), Some(("edge", "wrong"))), 5);
    assert_eq!(connack(broker.port(), Some(("edge", "s3cret"))), 0);
}

#[test]
fn mosquitto_is_anonymous_by_default() {
    let broker = Mosquitto::start();
    assert_eq!(connack(broker.port(), None), 0, "{}", broker.log());
}

/// Sends a bare MQTT 3.1.1 CONNECT and returns the CONNACK return code (0 accepted,
/// 5 not authorized), without an MQTT client.
fn connack(port: u16, login: Option<(&str, &str)>) -> u8 {
    fn field(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(if login.is_some() { 0xC2 } else { 0x02 }); // user+password, clean session
    body.extend_from_slice(&10u16.to_be_bytes()); // keep-alive
    field(&mut body, "harness-test");
    if let Some((user, password)) = login {
        field(&mut body, user);
        field(&mut body, password);
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);

    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&packet).unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).unwrap();
    assert_eq!(ack[..2], [0x20, 0x02], "CONNACK header");
    ack[3]
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
}

#[test]
fn notify_socket_receives_datagrams() {
    let (_dir, sock, path) = notify_socket();
    assert_eq!(recv_notify(&sock, Duration::from_millis(10)), None);
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"READY=1\nSTATUS=up", &path)
        .unwrap();
    assert_eq!(
        recv_notify(&sock, Duration::from_secs(5)).as_deref(),
        Some("READY=1\nSTATUS=up")
    );
}
