//! Real external services for end-to-end tests: a private `dbus-daemon`, a `mosquitto`
//! broker, free loopback ports and a systemd-style `NOTIFY_SOCKET`.
//!
//! The daemon is tested against the real things it talks to in production ("No mock broker,
//! no mock bus."): a mock would only check our own idea of the D-Bus and MQTT protocols, while
//! the bugs that matter (authentication, reconnects after a broker crash, bus names and
//! policies, keep-alives) live in the interaction with the real implementations.
//!
//! Everything listens on loopback or on unix sockets inside a temporary folder; nothing
//! touches the network, the system bus or the user's session bus. A missing binary is a test
//! failure with the package to install, never a skip. Every child process is killed, and its
//! temporary folder removed, when its handle is dropped.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a service may take to start accepting connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a service may take to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(3);
/// Folders searched after `$PATH`: Debian installs `mosquitto` in /usr/sbin, which is often
/// missing from a non-root `$PATH`.
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin"];

/// Finds executable `name` on `$PATH`, then in the usual system folders.
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Like [`find_program`], but panics with the Debian package to install when `name` is missing.
pub fn require_program(name: &str, package: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!("{name} not found (searched $PATH and {FALLBACK_DIRS:?}): apt-get install {package}")
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to pick a free port")
        .port()
}

/// A unix datagram socket bound in a fresh temporary folder, to pass to the daemon as
/// `NOTIFY_SOCKET` (the folder, the socket and its path; keep the folder alive).
pub fn notify_socket() -> (tempfile::TempDir, UnixDatagram, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir for NOTIFY_SOCKET");
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path)
        .unwrap_or_else(|e| panic!("bind notify socket {}: {e}", path.display()));
    (dir, sock, path)
}

/// Reads one datagram from `sock` as text (e.g. `READY=1`); `None` when nothing arrives
/// within `timeout`.
pub fn recv_notify(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    // A zero read timeout is an error for the socket API: wait at least a millisecond.
    sock.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .expect("set notify socket read timeout");
    let mut buf = vec![0u8; 64 * 1024];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv on notify socket: {e}"),
    }
}

/// Sends SIGTERM, waits up to [`TERM_GRACE`], then SIGKILLs; always reaps the child.
fn terminate(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    // std has no portable SIGTERM and the crate takes no libc dependency: use kill(1).
    let termed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if termed {
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// A private `dbus-daemon` listening on a unix socket in a temporary folder.
///
/// It runs with a minimal configuration of its own instead of the system's session.conf, so
/// no service activation directories are read and nothing outside the test can be started.
pub struct DbusBus {
    child: Child,
    address: String,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl DbusBus {
    /// Starts the bus and returns once its socket accepts connections.
    pub fn start() -> DbusBus {
        let exe = require_program("dbus-daemon", "dbus");
        let dir = tempfile::tempdir().expect("temp dir for dbus-daemon");
        let socket = dir.path().join("bus");
        let stderr_path = dir.path().join("dbus-daemon.stderr");
        let stderr = File::create(&stderr_path).expect("create dbus-daemon stderr file");

        let mut child = Command::new(&exe)
            .arg(format!("--config-file={}", PRIVATE_BUS_CONF))
            .arg(format!("--address=unix:path={}", socket.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));

        // Read the address line in a thread (a blocking read has no timeout), which then keeps
        // draining the pipe so the daemon can never block on a full stdout.
        let stdout = child.stdout.take().expect("dbus-daemon stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = tx.send(reader.read_line(&mut line).map(|_| line));
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let address = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(line)) if !line.trim().is_empty() => line.trim().to_string(),
            other => {
                terminate(&mut child);
                panic!(
                    "dbus-daemon printed no address ({other:?}); stderr:\n{}",
                    read_lossy(&stderr_path)
                );
            }
        };

        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                terminate(&mut child);
                panic!(
                    "dbus-daemon at {address} does not accept connections; stderr:\n{}",
                    read_lossy(&stderr_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        DbusBus {
            child,
            address,
            socket,
            dir,
        }
    }

    /// The bus address (`unix:path=…,guid=…`), for `DBUS_SESSION_BUS_ADDRESS` or zbus's
    /// `connection::Builder::address`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Path of the bus's unix socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// What dbus-daemon wrote to stderr so far, for assertion messages.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("dbus-daemon.stderr"))
    }

    /// The bus daemon's process id (to hang it with SIGSTOP, say).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for DbusBus {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// The private bus configuration the demo and the benchmark scripts use too (a session-type
/// bus where everyone may own any name and call anything; the socket comes from `--address`).
const PRIVATE_BUS_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/private-bus.conf");

/// A real `mosquitto` broker on a free 127.0.0.1 port, configured in a temporary folder.
pub struct Mosquitto {
    child: Option<Child>,
    exe: PathBuf,
    port: u16,
    conf: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    // Last: removed after the broker is gone.
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts an anonymous broker and returns once it accepts TCP connections.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// Like [`Mosquitto::start`], with `extra_conf` lines appended to the configuration
    /// (`password_file …`, `allow_anonymous false`, …). `allow_anonymous true` is written
    /// only when `extra_conf` does not set `allow_anonymous` itself.
    pub fn start_with(extra_conf: &str) -> Mosquitto {
        let exe = require_program("mosquitto", "mosquitto");
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let log = dir.path().join("mosquitto.log");
        let stderr = dir.path().join("mosquitto.stderr");

        let mut text = format!("listener {port} 127.0.0.1\n");
        let sets_anonymous = extra_conf
            .lines()
            .any(|l| l.split_whitespace().next() == Some("allow_anonymous"));
        if !sets_anonymous {
            text.push_str("allow_anonymous true\n");
        }
        text.push_str("persistence false\n");
        text.push_str(&format!("log_dest file {}\nlog_type all\n", log.display()));
        // Started as root, mosquitto switches to user `mosquitto`, which cannot open the log
        // or a password file in our 0700 temp folder; `root` disables the switch. Ignored when
        // not started as root.
        text.push_str("user root\n");
        text.push_str(extra_conf);
        text.push('\n');
        std::fs::write(&conf, text).expect("write mosquitto config");

        let mut broker = Mosquitto {
            child: None,
            exe,
            port,
            conf,
            log,
            stderr,
            _dir: dir,
        };
        broker.spawn_and_wait();
        broker
    }

    /// Creates a mosquitto password file `dir/passwd` holding `user` with `password`
    /// (`mosquitto_passwd -b -c`), for `password_file <path>` in [`Mosquitto::start_with`].
    pub fn password_file(dir: &Path, user: &str, password: &str) -> PathBuf {
        let exe = require_program("mosquitto_passwd", "mosquitto");
        let file = dir.join("passwd");
        let out = Command::new(&exe)
            .args(["-b", "-c"])
            .arg(&file)
            .args([user, password])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "mosquitto_passwd failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        file
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log so far (log file, then anything it wrote to stdout/stderr).
    pub fn log(&self) -> String {
        let mut text = read_lossy(&self.log);
        let stderr = read_lossy(&self.stderr);
        if !stderr.is_empty() {
            text.push_str("\n--- stdout/stderr ---\n");
            text.push_str(&stderr);
        }
        text
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the broker (SIGKILL: a crash, no clean disconnects) and reaps it. The port stays
    /// this broker's, for [`Mosquitto::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the broker if it runs, starts it again on the same port with the same
    /// configuration and returns once it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    fn spawn_and_wait(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            let out = File::options()
                .create(true)
                .append(true)
                .open(&self.stderr)
                .expect("open mosquitto stdout/stderr file");
            let err = out.try_clone().expect("clone mosquitto output file");
            let mut child = Command::new(&self.exe)
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.exe.display()));
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    self.child = Some(child);
                    return;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    // A restart can race the old socket's release: retry while time is left.
                    if Instant::now() < deadline && self.log().contains("Address already in use") {
                        std::thread::sleep(Duration::from_millis(100));
                        break;
                    }
                    panic!(
                        "mosquitto exited ({status}) before accepting on {addr}; log:\n{}",
                        self.log()
                    );
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "mosquitto does not accept on {addr} after {START_TIMEOUT:?}; log:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}
