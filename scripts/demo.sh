#!/usr/bin/env bash
# The demo: edgellmd up, one question answered over D-Bus and one over MQTT.
#
# 1. builds edgellm, edgellmd and edgellm-export (dev profile);
# 2. fetches the ONNX Runtime library (scripts/fetch-onnxruntime.sh);
# 3. exports a random-init Qwen2.5-0.5B int4 package into target/demo/ (reused afterwards):
#    its weights are random, so its answers are noise; the demo shows the plumbing;
# 4. starts a private mosquitto on a free 127.0.0.1 port and a private dbus-daemon on a unix
#    socket, both in a temporary folder (nothing touches the system bus or port 1883);
# 5. writes an edgellmd configuration, checks it, starts edgellmd and waits until it answers;
# 6. asks over D-Bus and over MQTT (streamed), and once with --json (usage figures);
# 7. stops edgellmd with SIGTERM (it drains and exits 0), then the broker and the bus.
#
# Missing packages are installed with apt-get (through sudo when not root): mosquitto, dbus,
# and, only where absent, gcc (Rust build scripts) and python3-pip (the ONNX Runtime fetch).
# A Rust toolchain (rustup) must already be installed.
#
# Usage: scripts/demo.sh        (EDGELLM_LOG, edgellmd's log filter, is passed through)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

shape=qwen2.5-0.5b
max_length=1024
node=demo
ready_timeout_s=60
target_dir="${CARGO_TARGET_DIR:-target}"
bin="$target_dir/debug"
package="$target_dir/demo/$shape-random"

step() { printf '\n==> %s\n' "$*"; }
die() {
    echo "demo: $*" >&2
    exit 1
}

# Runs a command as root: directly when we are root, else through sudo.
as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root to run '$*' (no sudo): install it yourself and run the demo again"
    fi
}

# Finds a program on $PATH, then in the system folders (Debian puts mosquitto in /usr/sbin,
# which a non-root $PATH often lacks). Prints its path; fails when it is nowhere.
find_program() {
    local dir
    if command -v "$1" 2>/dev/null; then
        return 0
    fi
    for dir in /usr/sbin /usr/bin /sbin /bin /usr/local/sbin /usr/local/bin; do
        if [[ -x "$dir/$1" ]]; then
            echo "$dir/$1"
            return 0
        fi
    done
    return 1
}

# Whether something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A TOML basic string holding $1.
toml_str() {
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}

# ---------------------------------------------------------------------------------------------
# Background processes and the temporary folder, cleaned up on any exit.

tmp=""
dbus_pid=""
mosquitto_pid=""
edgellmd_pid=""

# Sends SIGTERM to background child $1, waits up to $2 seconds (then SIGKILL), prints nothing
# and returns the child's exit status.
stop_child() {
    local pid="$1" grace="$2" i rc=0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "demo: process $pid still runs ${grace} s after SIGTERM: killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

# Stops edgellmd (it finishes or cancels what runs, answers what waits, then exits 0).
stop_edgellmd() {
    local rc=0
    [[ -n "$edgellmd_pid" ]] || return 0
    stop_child "$edgellmd_pid" 30 || rc=$?
    edgellmd_pid=""
    if ((rc != 0)); then
        echo "demo: edgellmd exited with status $rc; its log:" >&2
        sed 's/^/    /' "$tmp/edgellmd.log" >&2 || true
        return 1
    fi
    echo "edgellmd exited 0"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((rc != 0)); then
        printf '\n==> Cleaning up after a failure\n' >&2
    fi
    if [[ -n "$edgellmd_pid" ]]; then
        stop_edgellmd || rc=1
    fi
    if [[ -n "$mosquitto_pid" ]]; then
        stop_child "$mosquitto_pid" 5 || true
    fi
    if [[ -n "$dbus_pid" ]]; then
        stop_child "$dbus_pid" 5 || true
    fi
    if [[ -n "$tmp" ]]; then
        rm -rf "$tmp"
    fi
    if ((rc != 0)); then
        echo "demo: FAILED (status $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
step "Checking the tools (Rust, mosquitto, dbus-daemon)"

if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null ||
    die "cargo not found: install Rust (https://rustup.rs), then run the demo again"

need_apt=()
find_program mosquitto >/dev/null || need_apt+=(mosquitto)
find_program dbus-daemon >/dev/null || need_apt+=(dbus)
command -v cc >/dev/null || need_apt+=(gcc)
if ! compgen -G ".onnxruntime/*/libonnxruntime.so" >/dev/null &&
    ! python3 -m pip --version >/dev/null 2>&1; then
    need_apt+=(python3-pip)
fi
if ((${#need_apt[@]})); then
    command -v apt-get >/dev/null || die "missing packages ${need_apt[*]} and no apt-get: install them"
    echo "installing with apt-get: ${need_apt[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}"
fi
mosquitto="$(find_program mosquitto)" || die "mosquitto not found after installing it"
dbus_daemon="$(find_program dbus-daemon)" || die "dbus-daemon not found after installing it"
echo "mosquitto: $mosquitto"
echo "dbus-daemon: $dbus_daemon"

# ---------------------------------------------------------------------------------------------
step "Building edgellm, edgellmd and edgellm-export (dev profile; the first build takes minutes)"
cargo build --locked -p edgellm -p edgellm-export
for exe in edgellm edgellmd edgellm-export; do
    [[ -x "$bin/$exe" ]] || die "$bin/$exe was not built"
done

# ---------------------------------------------------------------------------------------------
step "Fetching the ONNX Runtime library"
ort_lib="$(scripts/fetch-onnxruntime.sh)"
[[ -e "$ort_lib" ]] || die "scripts/fetch-onnxruntime.sh printed '$ort_lib', which does not exist"
echo "ONNX Runtime: $ort_lib"

# ---------------------------------------------------------------------------------------------
step "Model package: random-init $shape, int4 (RANDOM WEIGHTS: the answers below are noise)"
echo "The demo's model has the real shape of Qwen2.5-0.5B but deterministic random weights and a"
echo "small byte-level tokenizer: what it says means nothing. The point is the plumbing (daemon,"
echo "D-Bus, MQTT, streaming); the speed and memory are real. Use a real package for real answers."
if [[ -f "$package/genai_config.json" && -f "$package/SHA256SUMS" ]]; then
    echo "reusing $package"
else
    mkdir -p "$(dirname "$package")"
    "$bin/edgellm-export" --random-init "$shape" --embeddings int4 --max-length "$max_length" \
        --out "$package" --force
fi

# ---------------------------------------------------------------------------------------------
tmp="$(mktemp -d -t edgellm-demo.XXXXXX)"

step "Starting mosquitto on 127.0.0.1 (private configuration, anonymous, no persistence)"
start_mosquitto() {
    local attempt i
    for ((attempt = 0; attempt < 10; attempt++)); do
        port=$((20000 + RANDOM % 40000))
        port_open "$port" && continue
        {
            echo "listener $port 127.0.0.1"
            echo "allow_anonymous true"
            echo "persistence false"
            echo "log_dest file $tmp/mosquitto.log"
            # As root, mosquitto 2.x drops to user `mosquitto`, which cannot read our 0700
            # folder; `user root` keeps it root. Not root: it runs as us anyway.
            if ((EUID == 0)); then echo "user root"; fi
        } >"$tmp/mosquitto.conf"
        : >"$tmp/mosquitto.log"
        "$mosquitto" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.out" 2>&1 &
        mosquitto_pid=$!
        for ((i = 0; i < 100; i++)); do
            port_open "$port" && return 0
            kill -0 "$mosquitto_pid" 2>/dev/null || break
            sleep 0.1
        done
        stop_child "$mosquitto_pid" 2 || true
        mosquitto_pid=""
        # Someone took the port between our check and the bind: try another one.
        grep -q "Address already in use" "$tmp/mosquitto.log" "$tmp/mosquitto.out" && continue
        echo "demo: mosquitto did not start; its log:" >&2
        cat "$tmp/mosquitto.log" "$tmp/mosquitto.out" >&2
        return 1
    done
    echo "demo: found no free port for mosquitto" >&2
    return 1
}
start_mosquitto
mqtt_url="mqtt://127.0.0.1:$port"
echo "mosquitto (pid $mosquitto_pid) listens on $mqtt_url"

# ---------------------------------------------------------------------------------------------
step "Starting a private D-Bus session bus"
cat >"$tmp/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=$tmp/bus</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOF
: >"$tmp/bus.address"
"$dbus_daemon" --config-file="$tmp/bus.conf" --nofork --nopidfile --print-address=1 \
    >"$tmp/bus.address" 2>"$tmp/dbus-daemon.log" &
dbus_pid=$!
bus_address=""
for ((i = 0; i < 100; i++)); do
    # The address is complete once its line ends.
    if [[ -s "$tmp/bus.address" && -S "$tmp/bus" && "$(tail -c 1 "$tmp/bus.address")" == "" ]]; then
        bus_address="$(head -n 1 "$tmp/bus.address")"
        break
    fi
    kill -0 "$dbus_pid" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$bus_address" ]]; then
    echo "demo: dbus-daemon printed no address; its log:" >&2
    cat "$tmp/dbus-daemon.log" >&2
    exit 1
fi
echo "dbus-daemon (pid $dbus_pid) at $bus_address"

# ---------------------------------------------------------------------------------------------
step "Writing and checking the edgellmd configuration"
config="$tmp/edgellm.toml"
cat >"$config" <<EOF
# edgellmd configuration written by scripts/demo.sh (all keys: edgellmd --print-default-config)
[model]
path = $(toml_str "$root/$package")
max_length = $max_length

[onnxruntime]
library = $(toml_str "$ort_lib")

[dbus]
bus = "session"
address = $(toml_str "$bus_address")

[mqtt]
url = $(toml_str "$mqtt_url")
node_id = $(toml_str "$node")
EOF
sed 's/^/    /' "$config"
"$bin/edgellmd" --check-config "$config"

# ---------------------------------------------------------------------------------------------
step "Starting edgellmd (log: edgellmd.log in the temporary folder, shown on failure)"
# NO_COLOR: its log goes to a file (edgellmd colours its log even when not on a terminal).
NO_COLOR=1 env -u NOTIFY_SOCKET "$bin/edgellmd" --config "$config" >"$tmp/edgellmd.log" 2>&1 &
edgellmd_pid=$!
echo "edgellmd pid $edgellmd_pid; waiting until it answers over D-Bus and MQTT (at most ${ready_timeout_s} s)"

fail_start() {
    echo "demo: $1; edgellmd's log:" >&2
    sed 's/^/    /' "$tmp/edgellmd.log" >&2
    exit 1
}
ask=("$bin/edgellm" ask)
dbus_ask=("${ask[@]}" --dbus --address "$bus_address")
mqtt_ask=("${ask[@]}" --mqtt "$mqtt_url" --node "$node")
start=$SECONDS
for transport in D-Bus MQTT; do
    if [[ "$transport" == D-Bus ]]; then
        probe=("${dbus_ask[@]}")
    else
        probe=("${mqtt_ask[@]}")
    fi
    until "${probe[@]}" --prompt hi --max-tokens 1 --timeout 5 >"$tmp/probe.out" 2>&1; do
        if ! kill -0 "$edgellmd_pid" 2>/dev/null; then
            wait "$edgellmd_pid" || rc=$?
            edgellmd_pid=""
            fail_start "edgellmd exited (status ${rc:-0}) before it was ready"
        fi
        if ((SECONDS - start > ready_timeout_s)); then
            echo "demo: last $transport probe said:" >&2
            sed 's/^/    /' "$tmp/probe.out" >&2
            fail_start "edgellmd does not answer over $transport after ${ready_timeout_s} s"
        fi
        sleep 0.5
    done
    echo "$transport: answering after $((SECONDS - start)) s"
done

# ---------------------------------------------------------------------------------------------
q1="Why is the sky blue?"
q2="What is MQTT good for?"
q3="Say hello."

step "Asking over D-Bus: edgellm ask --dbus --address ADDRESS --prompt \"$q1\" --max-tokens 48 --stream"
echo "--- answer (random weights: noise) ---"
"${dbus_ask[@]}" --prompt "$q1" --max-tokens 48 --stream
echo "--- end ---"

step "Asking over MQTT: edgellm ask --mqtt $mqtt_url --node $node --prompt \"$q2\" --max-tokens 48 --stream"
echo "--- answer (random weights: noise) ---"
"${mqtt_ask[@]}" --prompt "$q2" --max-tokens 48 --stream
echo "--- end ---"

step "Asking over D-Bus with --json (one object at the end: text, finish_reason, usage)"
"${dbus_ask[@]}" --prompt "$q3" --max-tokens 16 --json

# ---------------------------------------------------------------------------------------------
step "Stopping edgellmd (SIGTERM: it drains, then exits 0), mosquitto and dbus-daemon"
stop_edgellmd
echo
echo "demo: done. The daemon answered over D-Bus and MQTT (with random weights: noise)."
