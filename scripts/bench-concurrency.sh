#!/usr/bin/env bash
# Benchmark (not a test): continuous batching. edgellmd over MQTT against llama.cpp's llama-server
# (`-np N`, its continuous batching) on the same weights, with 1, 2, 4 and 8 concurrent clients.
#
# Weights, identical for both:
#   real     SmolLM2-135M-Instruct, llama.cpp's Q4_1 GGUF (scripts/fetch-model.sh), which
#            edgellm-export --gguf imports block for block;
#   random   a random-init Qwen2.5-0.5B (`edgellm-export --random-init-hf`), converted with
#            llama.cpp's convert_hf_to_gguf.py and `llama-quantize ... Q4_0`; edgellm imports that
#            same Q4_0 GGUF.
# For each model and each N in BENCH_CLIENTS: edgellmd with `[limits] parallel = N` (threads =
# BENCH_THREADS, D-Bus off, a private mosquitto), then llama-server with `-np N -c N*max_length`
# (threads the same), each serving BENCH_WAVES waves of N clients started together
# (scripts/concurrency-clients.py: one request each, its own prompt, BENCH_GEN tokens, greedy,
# streamed). Reported per server and N (medians over the waves; latencies over every request):
#   aggregate   sum of (completion tokens - 1) / wall time of the wave (first request sent to
#               last final reply): decode tok/s delivered to all clients together;
#   TTFT        request sent -> first piece of text, p50 and p95 (queueing and prefill included);
#   per-token   (total - TTFT) / (tokens - 1), p50 and p95: what a streaming client waits per token.
# Then the time to first token behind a shared 500-token system prompt, cold and warm:
# `edgellm bench --prompt-tokens 540 --cached-prefix 500` (the first 500 tokens kept computed, as
# `[model] system_prompts` does) against the same without --cached-prefix.
#
# Aims (issue 13): aggregate decode at 4 clients >= 2.5x one client and >= llama-server's at the
# same N; warm TTFT <= a tenth of cold; one client no slower than before batching.
#
# Usage: scripts/bench-concurrency.sh
# Environment:
#   BENCH_DIR      work folder (default /tmp/edgellm-bench); files under BENCH_DIR/concurrency, the
#                  llama.cpp sdist and build under BENCH_DIR/llama.cpp (scripts/llamacpp-lib.sh)
#   BENCH_PYTHON   python with torch + transformers + numpy + pyyaml + tqdm, for the converter
#                  (default <repo>/.venv-bench/bin/python: scripts/setup-bench-venv.sh)
#   BENCH_THREADS  threads for both servers (default 2)
#   BENCH_CLIENTS  the client counts (default "1 2 4 8")
#   BENCH_WAVES    measured waves per count (default 3; one warm-up wave before them)
#   BENCH_GEN      tokens per request (default 64)
#   BENCH_MODELS   which models (default "real random")
#   BENCH_BUILD    0: use target/release as it is (default: `cargo build --release` first)
#   LLAMA_NATIVE, LLAMA_CPP_PYTHON_VERSION  as for scripts/bench-vs-llamacpp.sh
# Needs mosquitto, cmake, a C/C++ compiler, python3; the edgellm binaries are built (release) when
# missing, ONNX Runtime comes from scripts/fetch-onnxruntime.sh.
set -euo pipefail
name="bench-concurrency"
if [[ ${BENCH_BUILD:-1} != 0 ]]; then
    # bench-lib.sh builds the binaries only when missing; a stale build would measure old code.
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && cargo build --locked --release -p edgellm -p edgellm-export)
fi
: "${BENCH_GEN:=64}"
: "${BENCH_PROMPT:=64}"
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
bench_root="${BENCH_DIR:-/tmp/edgellm-bench}"
bench="$bench_root/concurrency"
llroot="$bench_root/llama.cpp"
clients_list="${BENCH_CLIENTS:-1 2 4 8}"
waves="${BENCH_WAVES:-3}"
models="${BENCH_MODELS:-real random}"
max_length=512
# The packages hold more (the cold/warm TTFT runs 540 + 8 tokens); the servers use max_length.
package_max_length=1024
node=bench
text="Once upon a time, in a small workshop at the edge of a busy harbour town, an old clockmaker"
mkdir -p "$bench" "$llroot"

# shellcheck source=scripts/services-lib.sh
source "$root/scripts/services-lib.sh"
services_init
services_trap_exit

# shellcheck source=scripts/llamacpp-lib.sh
source "$root/scripts/llamacpp-lib.sh"
ll_py="$py"
ll_logs="$bench"
llamacpp_tools_check
llamacpp_fetch
llamacpp_build_default llama-server llama-quantize

# --- weights --------------------------------------------------------------------------------------
declare -A gguf pkg
for m in $models; do
    case $m in
        real)
            gguf[real]="$("$root/scripts/fetch-model.sh" smollm2-135m-instruct --gguf-only)"
            ;;
        random)
            ckpt="$bench/checkpoint-qwen2.5-0.5b"
            gguf[random]="$bench/qwen2.5-0.5b-q4_0.gguf"
            if [[ ! -s ${gguf[random]} ]]; then
                "$exporter" --random-init-hf qwen2.5-0.5b --out "$ckpt" --force >"$bench/random-init.log" 2>&1 \
                    || { cat "$bench/random-init.log" >&2; die "random-init checkpoint failed"; }
                llamacpp_convert_hf "$ckpt" "$bench/qwen2.5-0.5b-bf16.gguf" "$bench/convert.log"
                run_ll llama-quantize "$bench/qwen2.5-0.5b-bf16.gguf" "${gguf[random]}" Q4_0 "$(nproc)" \
                    >"$bench/quantize.log" 2>&1 || { tail -n 30 "$bench/quantize.log" >&2; die "llama-quantize failed"; }
                rm -f "$bench/qwen2.5-0.5b-bf16.gguf"
            fi
            ;;
        *) die "BENCH_MODELS: unknown model '$m' (real, random)" ;;
    esac
    pkg[$m]="$bench/edgellm-$m"
    say "importing ${gguf[$m]} -> ${pkg[$m]}"
    "$exporter" --gguf "${gguf[$m]}" --out "${pkg[$m]}" --max-length "$package_max_length" --force \
        >"$bench/import-$m.log" 2>&1 || { cat "$bench/import-$m.log" >&2; die "edgellm-export --gguf failed"; }
done

start_mosquitto >/dev/null
bin="$(dirname "$edgellm")"

run_edgellmd() {
    local m="$1" n="$2" i
    cat >"$bench/edgellmd.toml" <<EOF
[model]
path = $(toml_str "${pkg[$m]}")
max_length = $max_length
threads = $threads
[onnxruntime]
library = $(toml_str "$ORT_DYLIB_PATH")
[limits]
parallel = $n
queue_depth = $((n + 8))
[dbus]
enabled = false
[mqtt]
url = $(toml_str "$mqtt_url")
node_id = "$node"
EOF
    start_edgellmd "$bin" "$bench/edgellmd.toml" >/dev/null
    for ((i = 0; i < 240; i++)); do
        "$edgellm" ask --mqtt "$mqtt_url" --node "$node" --prompt hi --max-tokens 1 --timeout 5 \
            >/dev/null 2>&1 && break
        kill -0 "$edgellmd_pid" 2>/dev/null || { cat "$tmp/edgellmd.log" >&2; die "edgellmd exited"; }
        sleep 0.5
    done
    grep -q "parallel = $n not used" "$tmp/edgellmd.log" && die "edgellmd did not batch: $(grep 'not used' "$tmp/edgellmd.log")"
    "$py" "$root/scripts/concurrency-clients.py" edgellmd "$edgellm" "$mqtt_url" "$node" \
        --clients "$n" --waves "$waves" --gen "$gen" --prompt "$text" >"$bench/edgellmd-$m-$n.json"
    stop_edgellmd >/dev/null
}

run_llama_server() {
    local m="$1" n="$2" port i
    port=$((20000 + RANDOM % 40000))
    "$build_dir/bin/llama-server" -m "${gguf[$m]}" -t "$threads" -tb "$threads" -np "$n" \
        -c $((n * max_length)) --host 127.0.0.1 --port "$port" >"$bench/llama-server.log" 2>&1 &
    llama_pid=$!
    for ((i = 0; i < 240; i++)); do
        "$py" -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/health').status == 200 else 1)" \
            2>/dev/null && break
        kill -0 "$llama_pid" 2>/dev/null || { tail -n 30 "$bench/llama-server.log" >&2; die "llama-server exited"; }
        sleep 0.5
    done
    "$py" "$root/scripts/concurrency-clients.py" llama-server "http://127.0.0.1:$port" \
        --clients "$n" --waves "$waves" --gen "$gen" --prompt "$text" >"$bench/llama-server-$m-$n.json"
    stop_child "$llama_pid" 5 || true
    llama_pid=""
}

for m in $models; do
    for n in $clients_list; do
        say "$m: $n client(s): edgellmd (parallel = $n)"
        run_edgellmd "$m" "$n"
        say "$m: $n client(s): llama-server -np $n"
        run_llama_server "$m" "$n"
    done
    say "$m: TTFT behind a 500-token system prompt, cold and warm (edgellm bench)"
    for cached in 0 500; do
        "$edgellm" bench --model "${pkg[$m]}" --threads "$threads" --max-length "$package_max_length" \
            --prompt-tokens 540 --gen-tokens 8 --runs "$runs" --cached-prefix "$cached" --json \
            >"$bench/ttft-$m-$cached.json"
    done
done

# --- report ---------------------------------------------------------------------------------------
"$py" - "$bench" "$threads" "$gen" "$clients_list" "$models" "$(nproc)" <<'EOF'
import json, sys
bench, threads, gen, clients, models, cores = sys.argv[1:]
clients = clients.split()
for m in models.split():
    print(f"\n{m}: {gen} tokens per request, {threads} threads, {cores} cores")
    print(f"{'N':>2} {'server':<13} {'aggregate tok/s':>15} {'TTFT p50/p95 ms':>17} {'per-token p50/p95 ms':>21}")
    agg = {}
    for n in clients:
        for s in ("edgellmd", "llama-server"):
            r = json.load(open(f"{bench}/{s}-{m}-{n}.json"))["median"]
            agg[(s, n)] = r["aggregate_tok_s"]
            print(f"{n:>2} {s:<13} {r['aggregate_tok_s']:15.1f} {r['ttft_p50_ms']:8.0f}/{r['ttft_p95_ms']:<8.0f}"
                  f" {r['per_token_p50_ms']:10.1f}/{r['per_token_p95_ms']:<10.1f}")
    one = clients[0]
    for n in clients[1:]:
        print(f"edgellmd {n} clients / {one}: {agg[('edgellmd', n)] / agg[('edgellmd', one)]:.2f}x;"
              f" edgellmd / llama-server at {n}: {agg[('edgellmd', n)] / agg[('llama-server', n)]:.2f}x")
    cold = json.load(open(f"{bench}/ttft-{m}-0.json"))["ttft_ms"]
    warm = json.load(open(f"{bench}/ttft-{m}-500.json"))["ttft_ms"]
    print(f"TTFT of 540 prompt tokens, 500 of them a kept system prompt: cold {cold:.1f} ms, warm {warm:.1f} ms ({warm / cold:.3f}x)")
EOF
