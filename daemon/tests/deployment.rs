//! What the packages install from `systemd/`, checked with the real tools: the unit passes
//! `systemd-analyze verify` and scores at most 2.0 in `systemd-analyze security`, the default
//! config passes `edgellmd --check-config`, `systemd-sysusers` creates the user and groups, and
//! a real `dbus-daemon` running a system-bus-like configuration that includes our policy
//! admits exactly the daemon's user as owner and root and `edgellm-clients` as callers.
//!
//! The policy test runs processes as other users, so it needs root (CI runs as root). The
//! users exist only inside private mount namespaces (`unshare -m` with `/etc/passwd` and
//! `/etc/group` bind-mounted from a temporary folder), so the host's accounts are untouched.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../tests/src/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::require_program;

const NAME: &str = "org.edgellm.Inference1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn systemd_dir() -> PathBuf {
    repo().join("systemd")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A root folder for `systemd-analyze --root`: the host's unit folder (for the targets the
/// unit names), our unit where the packages install it, and the built `edgellmd` as
/// `/usr/bin/edgellmd`.
fn unit_root(tmp: &Path, dropins: &[&Path]) -> PathBuf {
    let root = tmp.join("root");
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("multi-user.target").exists())
        .expect("no multi-user.target under /usr/lib/systemd/system: apt-get install systemd");
    for entry in std::fs::read_dir(host_units).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), units.join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(
        systemd_dir().join("edgellmd.service"),
        units.join("edgellmd.service"),
    )
    .unwrap();
    if !dropins.is_empty() {
        let d = root.join("etc/systemd/system/edgellmd.service.d");
        std::fs::create_dir_all(&d).unwrap();
        for f in dropins {
            std::fs::copy(f, d.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::copy(
        env!("CARGO_BIN_EXE_edgellmd"),
        root.join("usr/bin/edgellmd"),
    )
    .unwrap();
    root
}

/// `systemd-analyze verify` of edgellmd.service as installed under `root`.
fn verify(analyze: &Path, root: &Path) -> Output {
    Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("edgellmd.service")
        .output()
        .unwrap()
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let analyze = require_program("systemd-analyze", "systemd");
    let tmp = tempfile::tempdir().unwrap();
    let jetson = systemd_dir().join("jetson-cuda.conf");
    for dropins in [vec![], vec![jetson.as_path()]] {
        let root = unit_root(&tmp.path().join(dropins.len().to_string()), &dropins);
        let o = verify(&analyze, &root);
        // verify exits 0 on unknown keys and only warns: any output is a finding.
        assert!(
            o.status.success() && o.stderr.is_empty() && o.stdout.is_empty(),
            "systemd-analyze verify (drop-ins {dropins:?}): {}",
            text(&o)
        );
    }

    // The check is live: a misspelt directive is reported.
    let root = unit_root(&tmp.path().join("typo"), &[]);
    let unit = root.join("usr/lib/systemd/system/edgellmd.service");
    let body = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(
        &unit,
        body.replace("Restart=on-failure", "Restrat=on-failure"),
    )
    .unwrap();
    let o = verify(&analyze, &root);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Restrat"),
        "{}",
        text(&o)
    );
}

/// `systemd-analyze security --offline=yes` exposure of the unit file, e.g. 1.4.
fn exposure(analyze: &Path, unit: &Path) -> f64 {
    let o = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in {}", text(&o)));
    let after = line.rsplit(':').next().unwrap().trim();
    after
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure from {line:?}"))
}

#[test]
fn the_unit_is_sandboxed_to_an_exposure_of_at_most_2() {
    let analyze = require_program("systemd-analyze", "systemd");
    let unit = systemd_dir().join("edgellmd.service");
    let score = exposure(&analyze, &unit);
    eprintln!("edgellmd.service exposure: {score}");
    assert!(score <= 2.0, "exposure {score} > 2.0");
    // --threshold makes systemd-analyze itself fail above 2.0 (its scale is exposure x 10).
    let o = Command::new(&analyze)
        .args(["security", "--offline=yes", "--no-pager", "--threshold=20"])
        .arg(&unit)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // The score measures the sandbox: without it the same unit is far more exposed.
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("edgellmd.service");
    let body = std::fs::read_to_string(&unit).unwrap();
    let kept: Vec<&str> = body
        .lines()
        .filter(|l| !l.starts_with("Protect") && !l.starts_with("Private"))
        .collect();
    std::fs::write(&bare, kept.join("\n")).unwrap();
    let loose = exposure(&analyze, &bare);
    assert!(loose > score + 1.0, "without Protect*/Private*: {loose}");
}

#[test]
fn the_installed_config_passes_check_config() {
    let o = Command::new(env!("CARGO_BIN_EXE_edgellmd"))
        .arg("--check-config")
        .arg(systemd_dir().join("edgellm.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let printed = Command::new(env!("CARGO_BIN_EXE_edgellmd"))
        .arg("--print-default-config")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(printed.stdout).unwrap(),
        std::fs::read_to_string(systemd_dir().join("edgellm.toml")).unwrap(),
        "systemd/edgellm.toml must equal `edgellmd --print-default-config`"
    );
}

/// An `/etc` with the host's accounts plus what `systemd-sysusers` makes of our sysusers.d
/// file and of `extra` (more sysusers.d lines).
fn accounts(tmp: &Path, extra: &str) -> PathBuf {
    let sysusers = require_program("systemd-sysusers", "systemd");
    let root = tmp.join("accounts");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    for f in ["passwd", "group", "shadow", "gshadow"] {
        let host = Path::new("/etc").join(f);
        if host.exists() {
            std::fs::copy(&host, root.join("etc").join(f)).unwrap();
        }
    }
    let extra_file = tmp.join("test-users.conf");
    std::fs::write(&extra_file, extra).unwrap();
    let o = Command::new(sysusers)
        .arg(format!("--root={}", root.display()))
        .arg(systemd_dir().join("edgellm.sysusers"))
        .arg(&extra_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "systemd-sysusers: {}", text(&o));
    root.join("etc")
}

fn entry<'a>(file: &'a str, name: &str) -> Option<Vec<&'a str>> {
    file.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == name)
}

#[test]
fn sysusers_creates_the_daemon_user_and_the_clients_group() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = accounts(tmp.path(), "");
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
    let group = std::fs::read_to_string(etc.join("group")).unwrap();
    let user = entry(&passwd, "edgellm").expect("no user edgellm");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "edgellm is a system user: uid {uid}");
    assert_eq!(user[5], "/var/lib/edgellm");
    let own = entry(&group, "edgellm").expect("no group edgellm");
    assert_eq!(own[2], user[3], "edgellm's primary group is edgellm");
    assert!(entry(&group, "edgellm-clients").is_some());
}

/// Runs `cmd` inside a fresh private mount namespace where `/etc/passwd` and `/etc/group` are
/// the test's, as `user` (with that user's groups) unless `user` is `root`.
fn as_user(etc: &Path, user: &str, cmd: &Path) -> Command {
    let mut c = Command::new(require_program("unshare", "util-linux"));
    c.args(["--mount", "--propagation", "private", "--"])
        .arg(require_program("sh", "dash"))
        .arg("-c")
        .arg(r#"mount --bind "$1/passwd" /etc/passwd && mount --bind "$1/group" /etc/group && shift && exec "$@""#)
        .arg("sh")
        .arg(etc);
    if user != "root" {
        c.arg(require_program("setpriv", "util-linux"))
            .arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .arg("--init-groups")
            .arg("--");
    }
    c.arg(cmd);
    c
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's /usr/share/dbus-1/system.conf policy (what every system bus runs), listening on a
/// socket in `dir`, plus our policy file included verbatim.
fn system_bus_config(dir: &Path) -> (PathBuf, String) {
    let socket = dir.join("system_bus_socket");
    let conf = dir.join("system.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus" send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Debug.Stats"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.systemd1.Activator"/>
  </policy>
  <include>{policy}</include>
  <limit name="max_replies_per_connection">128</limit>
</busconfig>
"#,
            socket = socket.display(),
            policy = systemd_dir()
                .join("dbus/org.edgellm.Inference1.conf")
                .display(),
        ),
    )
    .unwrap();
    (conf, format!("unix:path={}", socket.display()))
}

/// `dbus-send` as `user`: a method call to the bus driver or to our service.
fn dbus_send(etc: &Path, user: &str, address: &str, args: &[&str]) -> Output {
    as_user(etc, user, &require_program("dbus-send", "dbus"))
        .arg(format!("--bus={address}"))
        .args(["--print-reply", "--reply-timeout=20000"])
        .args(args)
        .output()
        .unwrap()
}

/// Whether the bus refused the call (the client got `AccessDenied`).
fn access_denied(o: &Output) -> bool {
    !o.status.success()
        && String::from_utf8_lossy(&o.stderr).contains("org.freedesktop.DBus.Error.AccessDenied")
}

/// `Properties.Get` of one of our properties, as `user`.
fn get_property(etc: &Path, user: &str, address: &str, property: &str) -> Output {
    dbus_send(
        etc,
        user,
        address,
        &[
            &format!("--dest={NAME}"),
            "/org/edgellm/Inference1",
            "org.freedesktop.DBus.Properties.Get",
            &format!("string:{NAME}"),
            &format!("string:{property}"),
        ],
    )
}

/// `edgellm ask --dbus` as `user`.
fn ask(etc: &Path, user: &str, address: &str, extra: &[&str]) -> Output {
    as_user(etc, user, Path::new(env!("CARGO_BIN_EXE_edgellm")))
        .args(["ask", "--dbus", "--address", address])
        .args(["--prompt", "hi", "--max-tokens", "4", "--timeout", "60"])
        .args(extra)
        .output()
        .unwrap()
}

fn make_readable(p: &Path) {
    let mut dir = Some(p);
    while let Some(d) = dir {
        if d == Path::new("/") || d == std::env::temp_dir() {
            break;
        }
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
        dir = d.parent();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|ids| ids.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn the_dbus_policy_admits_only_edgellm_and_its_clients() {
    assert!(
        is_root(),
        "this test runs processes as other users and needs root (CI runs as root): \
         run `sudo -E scripts/test.sh`, or `cargo test --test deployment` as root"
    );
    let dbus_daemon = require_program("dbus-daemon", "dbus");
    let tmp = tempfile::tempdir().unwrap();
    make_readable(tmp.path());
    let etc = accounts(
        tmp.path(),
        "u edgellm-test-client - \"in edgellm-clients\"\n\
         m edgellm-test-client edgellm-clients\n\
         u edgellm-test-other - \"in no edgellm group\"\n",
    );

    let (conf, address) = system_bus_config(tmp.path());
    let bus = Kill(
        as_user(&etc, "root", &dbus_daemon)
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile", "--nosyslog"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let socket = tmp.path().join("system_bus_socket");
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "dbus-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Nobody but edgellm may own the name, root included.
    for user in ["root", "edgellm-test-client", "edgellm-test-other"] {
        let o = dbus_send(
            &etc,
            user,
            &address,
            &[
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.RequestName",
                &format!("string:{NAME}"),
                "uint32:4",
            ],
        );
        assert!(
            access_denied(&o),
            "{user} must not own {NAME}: {}",
            text(&o)
        );
    }

    // edgellmd as edgellm owns it.
    let pkg = common::export("qwen2", tmp.path());
    make_readable(&pkg);
    let cfg = tmp.path().join("edgellm.toml");
    let library = std::env::var("ORT_DYLIB_PATH").unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 256\n[onnxruntime]\nlibrary = {library:?}\n\
             [dbus]\naddress = {address:?}\n[mqtt]\nenabled = false\n",
            pkg.display().to_string()
        ),
    )
    .unwrap();
    let mut daemon = Kill(
        as_user(&etc, "edgellm", Path::new(env!("CARGO_BIN_EXE_edgellmd")))
            .arg("--config")
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    loop {
        let o = dbus_send(
            &etc,
            "root",
            &address,
            &[
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                &format!("string:{NAME}"),
            ],
        );
        if String::from_utf8_lossy(&o.stdout).contains("boolean true") {
            break;
        }
        assert!(
            daemon.0.try_wait().unwrap().is_none(),
            "edgellmd (as edgellm) exited"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "edgellmd did not take {NAME}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Root and members of edgellm-clients are served, streaming included (the Delta and
    // Finished signals reach them through the policy).
    let served = |user: &str, extra: &[&str]| {
        let o = ask(&etc, user, &address, extra);
        assert!(o.status.success(), "{user} must be served: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{user}: {e}: {}", text(&o)));
        assert_eq!(v["usage"]["completion_tokens"], 4, "{user}: {v}");
    };
    served("root", &["--json"]);
    served("edgellm-test-client", &["--json"]);
    // Streaming, twice on one connection (`--repeat`): each answer came as Delta signals.
    let o = ask(
        &etc,
        "edgellm-test-client",
        &address,
        &["--stream", "--json", "--repeat", "2"],
    );
    assert!(o.status.success(), "streaming: {}", text(&o));
    let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{}", text(&o));
    for a in &answers {
        assert_eq!(a["usage"]["completion_tokens"], 4, "{a}");
        assert!(
            a["client"]["first_token_ms"].as_f64().is_some(),
            "no Delta: {a}"
        );
    }

    // A stream answers its owner only: another member of edgellm-clients, whom the bus policy
    // lets call the daemon, cannot cancel it (the daemon refuses with AccessDenied). Four
    // queued requests keep the last one's object alive long enough for the attempt.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let owner = zbus::connection::Builder::address(address.as_str())
                .build()
                .await
                .unwrap();
            let messages = vec![("user".to_string(), "Write a long story".to_string())];
            let options =
                std::collections::HashMap::from([("max_tokens", zbus::Variant::from(240u32))]);
            let mut paths = Vec::new();
            for _ in 0..4 {
                let reply = owner
                    .call_method(
                        Some(NAME),
                        "/org/edgellm/Inference1",
                        Some(NAME),
                        "StartChat",
                        &(&messages, &options),
                    )
                    .await
                    .unwrap();
                let path: zbus::OwnedObjectPath = reply.body().deserialize().unwrap();
                paths.push(path);
            }
            let last = paths.last().unwrap().as_str().to_string();
            let o = dbus_send(
                &etc,
                "edgellm-test-client",
                &address,
                &[
                    &format!("--dest={NAME}"),
                    &last,
                    "org.edgellm.Inference1.Request.Cancel",
                ],
            );
            assert!(
                access_denied(&o),
                "another client cancelled the stream: {}",
                text(&o)
            );
            // The owner may cancel its own (those already finished have no object left).
            for p in &paths {
                let r = owner
                    .call_method(
                        Some(NAME),
                        p.as_str(),
                        Some("org.edgellm.Inference1.Request"),
                        "Cancel",
                        &(),
                    )
                    .await;
                let finished = matches!(
                    &r,
                    Err(zbus::Error::FDO(e)) if matches!(**e, zbus::fdo::Error::UnknownObject(_))
                );
                assert!(
                    r.is_ok() || finished,
                    "the owner could not cancel {p}: {r:?}"
                );
            }
        });

    // Anyone else is refused by the bus before edgellmd sees the call: methods and properties.
    let o = ask(&etc, "edgellm-test-other", &address, &["--json"]);
    assert!(
        access_denied(&o),
        "edgellm-test-other must be refused: {}",
        text(&o)
    );
    let o = get_property(&etc, "edgellm-test-other", &address, "Model");
    assert!(access_denied(&o), "{}", text(&o));
    let o = get_property(&etc, "edgellm-test-client", &address, "State");
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ready"),
        "{}",
        text(&o)
    );

    // The daemon kept serving after the refusals.
    served("edgellm-test-client", &["--json"]);
    assert!(daemon.0.try_wait().unwrap().is_none());
    drop(daemon);
    drop(bus);
}
