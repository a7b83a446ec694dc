#!/usr/bin/env bash
# Benchmark (not a test): the tract fallback against ONNX Runtime, on the same package in one run.
#
#   scripts/bench-backends.sh [SHAPE]        (default qwen2.5-0.5b)
#
# Exports a random-init SHAPE package, int4 with int4 embeddings (the demo's package, cached in
# target/demo/), then runs `edgellm bench --backend ort` and `edgellm bench --backend tract` on it,
# each in its own process (so each peak RSS is that backend's), BENCH_ROUNDS times alternating the
# order, with the same synthetic prompt, greedy, BENCH_PROMPT prompt tokens and BENCH_GEN new
# tokens, BENCH_RUNS measured runs per process after a warm-up (medians inside `edgellm bench`).
# Reports prefill and decode tokens/s, time to first token and peak RSS per backend (median over
# rounds) and tract's ratios to ONNX Runtime. Aims (issue 5): tract decode >= 0.5x ONNX
# Runtime's, tract peak RSS <= 1.2x.
#
# Environment: BENCH_PROMPT (128), BENCH_GEN (64), BENCH_RUNS (3), BENCH_ROUNDS (2),
# BENCH_THREADS (2), EDGELLM_MAX_LENGTH (1024), EDGELLM / EDGELLM_EXPORT (binaries; else release
# builds), ORT_DYLIB_PATH (else scripts/fetch-onnxruntime.sh). Settings, validation, build and
# the ONNX Runtime library come from scripts/bench-lib.sh.
set -euo pipefail
name=bench-backends
bench_python=0
: "${BENCH_GEN:=64}" "${BENCH_RUNS:=3}" "${EDGELLM_MAX_LENGTH:=1024}"
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
rounds="${BENCH_ROUNDS:-2}"
[[ $rounds =~ ^[0-9]+$ ]] && ((rounds > 0)) || die "BENCH_ROUNDS must be a positive integer (got '$rounds')"

package="$root/target/demo/$shape-random"
if [[ -f "$package/genai_config.json" && -f "$package/SHA256SUMS" ]]; then
    say "reusing $package"
else
    mkdir -p "$(dirname "$package")"
    "$exporter" --random-init "$shape" --embeddings int4 --max-length "$max_length" \
        --out "$package" --force >&2 || die "export failed"
fi

bench="$(mktemp -d)"
trap 'rm -rf "$bench"' EXIT
for ((r = 0; r < rounds; r++)); do
    order=(ort tract)
    ((r % 2)) && order=(tract ort)
    for backend in "${order[@]}"; do
        say "round $((r + 1))/$rounds"
        out="$backend.$r" run_edgellm_bench "$package" --backend "$backend"
    done
done

python3 - "$bench" "$rounds" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
keys = ["prefill_tok_s", "decode_tok_s", "ttft_ms", "peak_rss_mib"]
res = {}
for b in ["ort", "tract"]:
    rows = [json.load(open(f"{out}/{b}.{r}.json")) for r in range(rounds)]
    res[b] = {k: statistics.median(row[k] for row in rows) for k in keys}
print("| backend | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB |")
print("|---|---|---|---|---|")
for b in ["ort", "tract"]:
    r = res[b]
    print(f"| {b} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {r['ttft_ms']:.1f} | {r['peak_rss_mib']:.0f} |")
o, t = res["ort"], res["tract"]
print(f"| tract / ort | {t['prefill_tok_s'] / o['prefill_tok_s']:.3f} | {t['decode_tok_s'] / o['decode_tok_s']:.3f} | {t['ttft_ms'] / o['ttft_ms']:.3f} | {t['peak_rss_mib'] / o['peak_rss_mib']:.3f} |")
print()
dec = t["decode_tok_s"] / o["decode_tok_s"]
rss = t["peak_rss_mib"] / o["peak_rss_mib"]
print(f"aim: tract decode >= 0.5x ONNX Runtime: {dec:.3f} ({'met' if dec >= 0.5 else 'NOT met'})")
print(f"aim: tract peak RSS <= 1.2x ONNX Runtime: {rss:.3f} ({'met' if rss <= 1.2 else 'NOT met'})")
EOF
