# shellcheck shell=bash
# Shared by scripts/demo.sh and scripts/bench-transports.sh: a private mosquitto on a free
# 127.0.0.1 port, a private dbus-daemon (scripts/private-bus.conf, the end-to-end tests' bus too)
# on a unix socket, both in a temporary folder, the random-init demo package, and edgellmd with
# a configuration pointing at them. Nothing touches the system bus or port 1883.
#
# The sourcing script sets `name` (for messages) and `root` (the repository), calls
# `services_init` once, and on exit `services_cleanup` (from its EXIT trap). After that:
#   $tmp                       the temporary folder (removed by services_cleanup)
#   start_mosquitto [LINE...]  -> $mosquitto_pid, $mqtt_url (LINEs: extra mosquitto.conf lines)
#   start_dbus                 -> $dbus_pid, $bus_address
#   export_demo_package BIN PACKAGE SHAPE MAX_LENGTH
#   write_edgellmd_config FILE PACKAGE MAX_LENGTH LIBRARY   (the private bus and broker above)
#   start_edgellmd BIN CONFIG  -> $edgellmd_pid (log: $tmp/edgellmd.log)
#   wait_edgellmd_ready TIMEOUT_S ASK_CMD...   (probes D-Bus, then MQTT, until both answer)
#   stop_edgellmd              SIGTERM, expects exit status 0

: "${name:?the sourcing script sets name}" "${root:?the sourcing script sets root}"

step() { printf '\n==> %s\n' "$*"; }
die() {
    echo "$name: $*" >&2
    exit 1
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
        echo "$name: process $pid still runs ${grace} s after SIGTERM: killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

services_init() {
    tmp="$(mktemp -d -t "edgellm-$name.XXXXXX")"
    dbus_pid=""
    mosquitto_pid=""
    edgellmd_pid=""
}

# Stops edgellmd (it finishes or cancels what runs, answers what waits, then exits 0).
stop_edgellmd() {
    local rc=0
    [[ -n "$edgellmd_pid" ]] || return 0
    stop_child "$edgellmd_pid" 30 || rc=$?
    edgellmd_pid=""
    if ((rc != 0)); then
        echo "$name: edgellmd exited with status $rc; its log:" >&2
        sed 's/^/    /' "$tmp/edgellmd.log" >&2 || true
        return 1
    fi
    echo "edgellmd exited 0"
}

# Traps the script's exit (and SIGINT/SIGTERM) to stop llama.cpp's server ($llama_pid, for the
# benchmarks that run one; empty until they do) and everything started here, then exit with the
# script's status (failed when edgellmd did not exit 0).
services_trap_exit() {
    llama_pid=""
    trap services_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
services_exit() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -z ${llama_pid:-} ]] || stop_child "$llama_pid" 5 || true
    services_cleanup || rc=1
    ((rc == 0)) || echo "$name: FAILED (status $rc)" >&2
    exit "$rc"
}

# Stops everything started here and removes $tmp; fails when edgellmd did not exit 0.
services_cleanup() {
    local rc=0
    if [[ -n "${edgellmd_pid:-}" ]]; then
        stop_edgellmd || rc=1
    fi
    if [[ -n "${mosquitto_pid:-}" ]]; then
        stop_child "$mosquitto_pid" 5 || true
    fi
    if [[ -n "${dbus_pid:-}" ]]; then
        stop_child "$dbus_pid" 5 || true
    fi
    if [[ -n "${tmp:-}" ]]; then
        rm -rf "$tmp"
    fi
    return "$rc"
}

start_mosquitto() {
    local mosquitto attempt i line port
    mosquitto="$(find_program mosquitto)" || die "mosquitto not found (apt-get install mosquitto)"
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
            for line in "$@"; do echo "$line"; done
        } >"$tmp/mosquitto.conf"
        : >"$tmp/mosquitto.log"
        "$mosquitto" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.out" 2>&1 &
        mosquitto_pid=$!
        for ((i = 0; i < 100; i++)); do
            if port_open "$port"; then
                mqtt_url="mqtt://127.0.0.1:$port"
                echo "mosquitto (pid $mosquitto_pid) listens on $mqtt_url"
                return 0
            fi
            kill -0 "$mosquitto_pid" 2>/dev/null || break
            sleep 0.1
        done
        stop_child "$mosquitto_pid" 2 || true
        mosquitto_pid=""
        # Someone took the port between our check and the bind: try another one.
        grep -q "Address already in use" "$tmp/mosquitto.log" "$tmp/mosquitto.out" && continue
        cat "$tmp/mosquitto.log" "$tmp/mosquitto.out" >&2
        die "mosquitto did not start"
    done
    die "found no free port for mosquitto"
}

start_dbus() {
    local dbus_daemon i
    dbus_daemon="$(find_program dbus-daemon)" || die "dbus-daemon not found (apt-get install dbus)"
    : >"$tmp/bus.address"
    "$dbus_daemon" --config-file="$root/scripts/private-bus.conf" --address="unix:path=$tmp/bus" \
        --nofork --nopidfile --print-address=1 >"$tmp/bus.address" 2>"$tmp/dbus-daemon.log" &
    dbus_pid=$!
    bus_address=""
    for ((i = 0; i < 100; i++)); do
        # The address is complete once its line ends.
        if [[ -s "$tmp/bus.address" && -S "$tmp/bus" && "$(tail -c 1 "$tmp/bus.address")" == "" ]]; then
            bus_address="$(head -n 1 "$tmp/bus.address")"
            echo "dbus-daemon (pid $dbus_pid) at $bus_address"
            return 0
        fi
        kill -0 "$dbus_pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$tmp/dbus-daemon.log" >&2
    die "dbus-daemon printed no address"
}

# The random-init package (real shape, random weights), exported once and reused.
export_demo_package() {
    local bin="$1" package="$2" shape="$3" max_length="$4"
    if [[ -f "$package/genai_config.json" && -f "$package/SHA256SUMS" ]]; then
        echo "reusing $package"
    else
        mkdir -p "$(dirname "$package")"
        "$bin/edgellm-export" --random-init "$shape" --embeddings int4 \
            --max-length "$max_length" --out "$package" --force
    fi
}

# Writes an edgellmd configuration for PACKAGE on the private bus ($bus_address) and broker
# ($mqtt_url) as node $node; every other key keeps its default (threads = all cores, ONNX
# Runtime thread spinning on).
write_edgellmd_config() {
    local file="$1" package="$2" max_length="$3" library="$4"
    cat >"$file" <<EOF
# edgellmd configuration written by scripts/$name.sh (all keys: edgellmd --print-default-config)
[model]
path = $(toml_str "$package")
max_length = $max_length

[onnxruntime]
library = $(toml_str "$library")

[dbus]
bus = "session"
address = $(toml_str "$bus_address")

[mqtt]
url = $(toml_str "$mqtt_url")
node_id = $(toml_str "$node")
EOF
}

start_edgellmd() {
    local bin="$1" config="$2"
    "$bin/edgellmd" --check-config "$config" >/dev/null
    env -u NOTIFY_SOCKET "$bin/edgellmd" --config "$config" >"$tmp/edgellmd.log" 2>&1 &
    edgellmd_pid=$!
    echo "edgellmd pid $edgellmd_pid ($bin/edgellmd, log: edgellmd.log in the temporary folder)"
}

# Retries a one-token request over D-Bus, then MQTT, until each answers. $2...: the
# `edgellm ask` command (its path and `ask`).
wait_edgellmd_ready() {
    local timeout_s="$1" start=$SECONDS transport rc=0
    shift
    local -a probe
    for transport in D-Bus MQTT; do
        if [[ $transport == D-Bus ]]; then
            probe=("$@" --dbus --address "$bus_address")
        else
            probe=("$@" --mqtt "$mqtt_url" --node "$node")
        fi
        until "${probe[@]}" --prompt hi --max-tokens 1 --timeout 5 >"$tmp/probe.out" 2>&1; do
            if ! kill -0 "$edgellmd_pid" 2>/dev/null; then
                wait "$edgellmd_pid" || rc=$?
                edgellmd_pid=""
                sed 's/^/    /' "$tmp/edgellmd.log" >&2
                die "edgellmd exited (status $rc) before it was ready; its log is above"
            fi
            if ((SECONDS - start > timeout_s)); then
                sed 's/^/    /' "$tmp/probe.out" "$tmp/edgellmd.log" >&2
                die "edgellmd does not answer over $transport after $timeout_s s (probe and log above)"
            fi
            sleep 0.5
        done
        echo "$transport: answering after $((SECONDS - start)) s"
    done
}
