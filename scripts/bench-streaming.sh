#!/usr/bin/env bash
# Benchmark (not a test): what streaming an answer token by token costs decode, in edgellmd and in
# llama.cpp's llama-server, on the same real model and the same machine.
#
# Both servers load SmolLM2-135M-Instruct (scripts/fetch-model.sh: llama-server the Q4_1 GGUF
# itself, edgellmd the package `edgellm-export --gguf` makes of it, blocks kept exactly) with
# BENCH_THREADS threads (both spin between operators: ONNX Runtime's allow_spinning, ggml's
# polling), one sequence, a 1024-token context, and serve the OpenAI completions route on loopback
# TCP. One server runs at a time. A stdlib Python helper sends BENCH_PAIRS pairs of the same
# request (a story prompt, greedy, BENCH_GEN new tokens), one whole and one streamed (SSE) in a
# random order, each on a connection of its own (llama-server closes one after a streamed
# answer; setting up a connection is outside the decode timings), and takes within each pair
#   streamed decode tok/s / whole decode tok/s
# from the server's own timings (edgellmd: `timings.decode_tok_s`; llama-server:
# `timings.predicted_per_second`; in the final chunk when streamed). A whole answer does no
# per-token transport work, so the ratio is what the per-token chunk (format, socket write, the
# server's wake-up; the client's reading where it shares the cores) takes from decode. Reported:
# the median ratio and its bootstrap 95% interval; the CPU per token, whole and streamed, of the
# server's threads that do not decode (/proc/PID/task/*/schedstat; a decoding thread is one busy
# for at least a quarter of the whole answers' time): their difference is what a streamed token
# costs the server outside its decoding threads (work a server does per chunk on a decoding
# thread is not in it, only in the decode ratio); and the helper's own CPU per token.
#
# The helper reads streamed bytes as they come and parses them at the end (as
# scripts/bench-transports.sh does: parsing each chunk as it came would cost more CPU than the
# server's side). BENCH_CLIENT_IDLE=1 runs it under SCHED_IDLE (Linux), so it takes almost no
# core from the server (as a client on another machine).
#
# Usage: scripts/bench-streaming.sh
# Environment:
#   BENCH_PAIRS    pairs per server (default 40)
#   BENCH_GEN      new tokens per request (default 64; both servers must produce all of them)
#   BENCH_THREADS  threads for both servers (default 2)
#   BENCH_SERVERS  which servers, in order (default "edgellmd llama-server")
#   BENCH_CLIENT_IDLE  1: the client runs under SCHED_IDLE (default 0: it competes for the
#                  cores, as a local client does)
#   BENCH_STREAM_INTERVAL  edgellmd's `[limits] stream_interval`, 1 to 64 (default 1: a chunk per
#                  token, as llama-server sends; 2: text in pairs, the first piece at once)
#   BENCH_DIR      work folder (default /tmp/edgellm-bench); llama.cpp's sdist and build under
#                  BENCH_DIR/llama.cpp (scripts/llamacpp-lib.sh), shared with the other benches
#   BENCH_BUILD    0: use target/release as it is (default: `cargo build --release` first)
#   LLAMA_NATIVE, LLAMA_CPP_PYTHON_VERSION  as for scripts/bench-vs-llamacpp.sh
# Needs cmake (installed with apt-get when missing and run as root), a C/C++ compiler, python3
# with pip; ONNX Runtime comes from scripts/fetch-onnxruntime.sh.
set -euo pipefail
name="bench-streaming"
if [[ ${BENCH_BUILD:-1} != 0 ]]; then
    # bench-lib.sh builds the binaries only when missing; a stale build would measure old code.
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo build --locked --release -p edgellm -p edgellm-export)
fi
bench_python=0
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
pairs="${BENCH_PAIRS:-40}"
gen="${BENCH_GEN:-64}"
servers="${BENCH_SERVERS:-edgellmd llama-server}"
client_idle="${BENCH_CLIENT_IDLE:-0}"
stream_interval="${BENCH_STREAM_INTERVAL:-1}"
[[ $pairs =~ ^[0-9]+$ ]] && ((pairs >= 2)) || die "BENCH_PAIRS must be an integer >= 2 (got '$pairs')"
[[ $gen =~ ^[0-9]+$ ]] && ((gen >= 2)) || die "BENCH_GEN must be an integer >= 2 (got '$gen')"
[[ $client_idle =~ ^[01]$ ]] || die "BENCH_CLIENT_IDLE must be 0 or 1 (got '$client_idle')"
[[ $stream_interval =~ ^[0-9]+$ ]] && ((stream_interval >= 1 && stream_interval <= 64)) \
    || die "BENCH_STREAM_INTERVAL must be an integer from 1 to 64 (got '$stream_interval')"
for s in $servers; do
    [[ $s == edgellmd || $s == llama-server ]] || die "BENCH_SERVERS: unknown server '$s' (edgellmd, llama-server)"
done
bench_root="${BENCH_DIR:-/tmp/edgellm-bench}"
bench="$bench_root/streaming"
llroot="$bench_root/llama.cpp"
context=1024
mkdir -p "$bench" "$llroot"

# shellcheck source=scripts/services-lib.sh
source "$root/scripts/services-lib.sh"
services_init
services_trap_exit

if [[ " $servers " == *" llama-server "* ]]; then
    # shellcheck source=scripts/llamacpp-lib.sh
    source "$root/scripts/llamacpp-lib.sh"
    ll_py=python3
    ll_logs="$bench"
    llamacpp_tools_check
    llamacpp_fetch
    llamacpp_build_default llama-server
fi

gguf="$("$root/scripts/fetch-model.sh" smollm2-135m-instruct --gguf-only)"
package="$("$root/scripts/fetch-model.sh" smollm2-135m-instruct)"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until GET URL answers 200 while PID lives.
wait_http() {
    local url="$1" pid="$2" log="$3" i
    for ((i = 0; i < 240; i++)); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" \
            >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$log" >&2; die "the server exited before it answered $url"; }
        sleep 0.5
    done
    tail -n 30 "$log" >&2
    die "no answer from $url after 120 s"
}

measure() {
    B_SERVER="$1" B_URL="$2" B_PID="$3" B_PAIRS="$pairs" B_GEN="$gen" B_CLIENT_IDLE="$client_idle" \
        python3 - <<'PY'
import http.client, json, os, random, statistics, sys, time
E = os.environ
server, pid, pairs, gen = E["B_SERVER"], E["B_PID"], int(E["B_PAIRS"]), int(E["B_GEN"])
host, port = E["B_URL"].split(":")
idle = E["B_CLIENT_IDLE"] == "1"
prompt = ("Once upon a time, in a small workshop at the edge of a busy harbour town, an old "
          "clockmaker")


def thread_cpu():
    """The server's CPU seconds by thread id (/proc/PID/task/TID/schedstat's run time)."""
    out, base = {}, f"/proc/{pid}/task"
    for t in os.listdir(base):
        try:
            out[t] = int(open(f"{base}/{t}/schedstat").read().split()[0]) / 1e9
        except OSError:
            continue
    return out


def request(stream):
    # A connection per request: llama-server closes one after a streamed answer.
    conn = http.client.HTTPConnection(host, int(port))
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": gen, "temperature": 0,
                       "stream": stream,
                       "stream_options": {"include_usage": True} if stream else None}).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read() if not stream else b"".join(iter(lambda: r.read1(65536), b""))
    wall = time.perf_counter() - t0
    conn.close()
    if r.status != 200:
        sys.exit(f"bench-streaming: {server}: HTTP {r.status}: {data[:300]!r}")
    if stream:
        timing, text, chunks, n = None, "", 0, None
        for line in data.split(b"\n"):
            if line.startswith(b"data: {"):
                c = json.loads(line[6:])
                timing = c.get("timings", timing)
                if c.get("usage"):
                    n = c["usage"]["completion_tokens"]
                if c.get("choices") and c["choices"][0].get("text"):
                    text += c["choices"][0]["text"]
                    chunks += 1
    else:
        a = json.loads(data)
        timing, text, chunks = a.get("timings"), a["choices"][0]["text"], 0
        n = a["usage"]["completion_tokens"]
    if not timing:
        sys.exit(f"bench-streaming: {server}: no timings in the answer")
    rate = timing["decode_tok_s" if server == "edgellmd" else "predicted_per_second"]
    return {"rate": rate, "text": text, "n": n, "chunks": chunks, "wall": wall}


if idle:
    # For good: switching back to SCHED_OTHER would need root or RLIMIT_NICE.
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
rng = random.Random(20261202)
texts, chunk_counts = set(), []
request(False)  # pages in the weights
request(True)
ratios, rates = [], {"whole": [], "streamed": []}
cpu = {k: {} for k in rates}  # mode -> thread id -> CPU seconds
wall = {k: 0.0 for k in rates}
client = {k: 0.0 for k in rates}  # this helper's own CPU seconds
for i in range(pairs):
    got = {}
    for mode in rng.sample(["whole", "streamed"], 2):
        c0, p0 = thread_cpu(), time.process_time()
        r = request(mode == "streamed")
        c1, p1 = thread_cpu(), time.process_time()
        client[mode] += p1 - p0
        for t in c1:
            cpu[mode][t] = cpu[mode].get(t, 0.0) + c1[t] - c0.get(t, 0.0)
        wall[mode] += r["wall"]
        texts.add(r["text"])
        if mode == "streamed":
            chunk_counts.append(r["chunks"])
        if r["n"] != gen:
            sys.exit(f"bench-streaming: {server}: {r['n']} tokens, not {gen}")
        rates[mode].append(r["rate"])
        got[mode] = r["rate"]
    ratios.append(got["streamed"] / got["whole"])
    print(f"  {server} pair {i + 1}/{pairs}: whole {got['whole']:.1f} tok/s, streamed "
          f"{got['streamed']:.1f} tok/s, ratio {ratios[-1]:.4f}", flush=True)


def interval(xs, k=4000):
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(k))
    return meds[int(0.025 * k)], meds[int(0.975 * k) - 1]


m, (lo, hi) = statistics.median(ratios), interval(ratios)
step_ms = 1000 / statistics.median(rates["whole"])
# The compute threads (those that decode: each busy for at least a quarter of the whole answers'
# wall time) against the rest (HTTP, the event loop, the process's other threads): what the rest
# spends per token, whole and streamed.
compute = {t for t, s in cpu["whole"].items() if s >= 0.25 * wall["whole"]}
cpu_ms = {k: 1000 * sum(s for t, s in v.items() if t not in compute) / (pairs * gen)
          for k, v in cpu.items()}
compute_ms = {k: 1000 * sum(s for t, s in v.items() if t in compute) / (pairs * gen)
              for k, v in cpu.items()}
extra = cpu_ms["streamed"] - cpu_ms["whole"]
client_ms = {k: 1000 * v / (pairs * gen) for k, v in client.items()}
summary = {
    "server": server, "pairs": pairs, "gen": gen, "client_idle": idle,
    "whole_tok_s": statistics.median(rates["whole"]),
    "streamed_tok_s": statistics.median(rates["streamed"]),
    "ratio_median": m, "ratio_lo": lo, "ratio_hi": hi,
    "pairs_ge_1": sum(x >= 1 for x in ratios),
    "compute_threads": len(compute),
    "compute_cpu_ms_per_token_whole": compute_ms["whole"],
    "compute_cpu_ms_per_token_streamed": compute_ms["streamed"],
    "other_cpu_ms_per_token_whole": cpu_ms["whole"],
    "other_cpu_ms_per_token_streamed": cpu_ms["streamed"],
    "streaming_cpu_ms_per_token": extra, "step_ms": step_ms,
    "client_cpu_ms_per_token_whole": client_ms["whole"],
    "client_cpu_ms_per_token_streamed": client_ms["streamed"],
    "chunks_per_answer": statistics.median(chunk_counts), "distinct_texts": len(texts),
}
print(f"{server}: streamed/whole decode, median of {pairs} pair ratios {m:.4f} "
      f"(95% interval {lo:.4f}-{hi:.4f}; {summary['pairs_ge_1']}/{pairs} pairs >= 1): "
      f"{(m - 1) * 100:+.1f}%")
print(f"{server}: decode {summary['whole_tok_s']:.1f} tok/s whole, "
      f"{summary['streamed_tok_s']:.1f} streamed (medians; {step_ms:.2f} ms per token)")
print(f"{server}: CPU per token outside its {len(compute)} compute threads {cpu_ms['whole']:.3f} ms "
      f"whole, {cpu_ms['streamed']:.3f} ms streamed: streaming costs {extra:.3f} ms of CPU per "
      f"token ({extra / step_ms * 100:.1f}% of the step); the compute threads "
      f"{compute_ms['whole']:.2f} / {compute_ms['streamed']:.2f} ms; the client "
      f"{client_ms['whole']:.3f} / {client_ms['streamed']:.3f} ms")
print(f"{server}: {summary['chunks_per_answer']:.0f} chunks with text per streamed answer of {gen} tokens "
      f"(median); {len(texts)} distinct answer text(s) over the {2 * pairs} requests")
print("JSON " + json.dumps(summary), flush=True)
PY
}

for s in $servers; do
    port="$(free_port)"
    if [[ $s == edgellmd ]]; then
        cat >"$bench/edgellmd.toml" <<EOF
# written by scripts/$name.sh
[model]
path = $(toml_str "$package")
max_length = $context
threads = $threads
[onnxruntime]
library = $(toml_str "$ORT_DYLIB_PATH")
allow_spinning = true
[limits]
stream_interval = $stream_interval
[dbus]
enabled = false
[mqtt]
enabled = false
[http]
enabled = true
listen = "127.0.0.1:$port"
EOF
        start_edgellmd "$(dirname "$edgellm")" "$bench/edgellmd.toml" >/dev/null
        wait_http "http://127.0.0.1:$port/health" "$edgellmd_pid" "$tmp/edgellmd.log"
        say "edgellmd $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?'), ONNX Runtime $(basename "$(dirname "$ORT_DYLIB_PATH")"), $threads threads, stream_interval $stream_interval"
        measure edgellmd "127.0.0.1:$port" "$edgellmd_pid"
        stop_edgellmd >/dev/null
    else
        "$build_dir/bin/llama-server" -m "$gguf" -t "$threads" -tb "$threads" -np 1 -c "$context" \
            --host 127.0.0.1 --port "$port" >"$bench/llama-server.log" 2>&1 &
        llama_pid=$!
        wait_http "http://127.0.0.1:$port/health" "$llama_pid" "$bench/llama-server.log"
        say "llama-server (llama.cpp from llama-cpp-python $llversion, $ll_mode build), $threads threads"
        measure llama-server "127.0.0.1:$port" "$llama_pid"
        stop_child "$llama_pid" 5 || true
        llama_pid=""
    fi
done
