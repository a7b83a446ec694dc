#!/usr/bin/env bash
# Benchmark `edgellm bench` against onnxruntime-genai's Python API on the same int4 package.
#
#   1. exports a deterministic random-weight int4 package of a real shape
#      (`edgellm-export --random-init SHAPE`, default qwen2.5-0.5b),
#   2. runs `edgellm bench --model PKG --threads T --prompt-tokens P --gen-tokens G --runs R
#      --max-length P+G --json` (one warm-up run, then medians of R runs),
#   3. drives onnxruntime-genai (og) on the same package from Python: og.Config with
#      clear_providers() (CPU) and an overlay setting decoder.session_options
#      intra_op_num_threads=T, inter_op_num_threads=1; GeneratorParams(max_length=P+G,
#      do_sample=False); the same prompt ids as edgellm bench; one warm-up run, then R runs,
#   and prints both, the ratios edgellm/og (prefill, decode) against the target (decode >= 1.5x og)
#   and edgellm's decode_overhead_pct.
#
# The measures are defined as edgellm bench defines them (daemon/src/engine/mod.rs):
#   TTFT          start of prefill -> first sampled token. og: append_tokens(prompt) (runs the
#                 prefill forward and computes the logits) + the first generate_next_token()
#                 (which only picks the argmax of those logits) + get_next_tokens().
#   prefill tok/s P / TTFT.
#   decode tok/s  (G - 1) / (time from the first sampled token to the last one). og: the G - 1
#                 further generate_next_token() calls (forward of one token + argmax each), each
#                 followed by get_next_tokens() as a streaming client would.
#   Generator creation (KV buffer allocation) is outside the timed span for og, as edgellm's
#   backend reset is. Both use a KV capacity of P + G tokens (og: max_length; edgellm:
#   --max-length; EDGELLM_MAX_LENGTH overrides edgellm's).
# The prompt ids are edgellm bench's: ((i * 7919 + 101) % vocab) for i in 0..P, an id equal to an
# EOS id (genai_config model.eos_token_id) replaced by (id + 1) % vocab. End-of-sequence is ignored
# by both (og: min_length = max_length; the random weights rarely produce EOS anyway, and the
# helper fails if og stops early).
#
# Usage: scripts/bench-vs-genai.sh [SHAPE]
# Environment:
#   BENCH_DIR      work folder (default /tmp/edgellm-bench); the package goes to
#                  BENCH_DIR/vs-genai/edgellm-SHAPE, results to BENCH_DIR/vs-genai/*.json
#   BENCH_PYTHON   python with onnxruntime-genai + numpy (default <repo>/.venv-bench/bin/python;
#                  create it with scripts/setup-bench-venv.sh)
#   BENCH_THREADS  intra-op threads for both (default 2)
#   BENCH_PROMPT   prompt tokens (default 128)
#   BENCH_GEN      generated tokens (default 128)
#   BENCH_RUNS     timed runs after one warm-up, medians reported (default 5)
#   EDGELLM_ARGS   extra edgellm-export flags, word-split (e.g. "--embeddings int4")
#   EDGELLM_MAX_LENGTH  edgellm bench --max-length (default BENCH_PROMPT + BENCH_GEN)
#   EDGELLM, EDGELLM_EXPORT  the binaries (default <repo>/target/release/{edgellm,edgellm-export};
#                  built with `cargo build --release -p edgellm -p edgellm-export` when missing)
#   ORT_DYLIB_PATH the ONNX Runtime library edgellm loads (default: scripts/fetch-onnxruntime.sh)
# Exit status: 0 when both benchmarks ran (whether or not the target is met), 1 otherwise.
set -euo pipefail

name=bench-vs-genai
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
bench="${BENCH_DIR:-/tmp/edgellm-bench}/vs-genai"
"$py" -c 'import onnxruntime_genai, numpy' 2>/dev/null \
    || die "$py lacks onnxruntime-genai/numpy; run scripts/setup-bench-venv.sh"

pkg="$bench/edgellm-$shape"
mkdir -p "$bench"

# --- 1. package -----------------------------------------------------------------------------------
read -r -a extra_args <<<"${EDGELLM_ARGS:-}"
export_cmd=("$exporter" --random-init "$shape" --out "$pkg" --force ${extra_args[@]+"${extra_args[@]}"})
say "exporting: ${export_cmd[*]}"
"${export_cmd[@]}" >"$bench/export.log" 2>&1 || { cat "$bench/export.log" >&2; die "export failed"; }
sync

# --- 2. edgellm bench -----------------------------------------------------------------------------
run_edgellm_bench "$pkg"

# --- 3. onnxruntime-genai -------------------------------------------------------------------------
og_cmd=("$py" - "$pkg" "$threads" "$prompt" "$gen" "$runs")
say "running: onnxruntime-genai on $pkg (threads $threads, $prompt + $gen tokens, 1 + $runs runs)"
if ! "${og_cmd[@]}" >"$bench/genai.json" 2>"$bench/genai.err" <<'EOF'
import json, statistics, sys, time

import numpy as np
import onnxruntime_genai as og

pkg, threads, n_prompt, n_gen, runs = sys.argv[1], *map(int, sys.argv[2:6])
cfg = json.load(open(f"{pkg}/genai_config.json"))["model"]
vocab = int(cfg["vocab_size"])
eos = cfg.get("eos_token_id", [])
eos = set(eos if isinstance(eos, list) else [eos])
# edgellm bench's prompt (daemon/src/bin/edgellm/bench.rs).
prompt = [(i * 7919 + 101) % vocab for i in range(n_prompt)]
prompt = np.asarray([(t + 1) % vocab if t in eos else t for t in prompt], dtype=np.int32)

config = og.Config(pkg)
config.clear_providers()  # CPU execution provider
config.overlay(json.dumps({"model": {"decoder": {"session_options": {
    "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
model = og.Model(config)
total = n_prompt + n_gen

ttft, append, first, decode, tokens = [], [], [], [], None
for run in range(runs + 1):
    params = og.GeneratorParams(model)
    # min_length = max_length: no EOS stop (edgellm bench ignores EOS too).
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)          # prefill forward, logits of the last position
    t1 = time.perf_counter()
    gen.generate_next_token()          # argmax of the prefill logits: the first token
    out = [int(gen.get_next_tokens()[0])]
    t2 = time.perf_counter()
    while len(out) < n_gen:
        gen.generate_next_token()      # one-token forward + argmax
        out.append(int(gen.get_next_tokens()[0]))
    t3 = time.perf_counter()
    if len(out) != n_gen:
        sys.exit(f"og produced {len(out)} tokens, expected {n_gen}")
    if run == 0:
        tokens = out
        continue  # warm-up
    if out != tokens:
        sys.exit("og is not deterministic across runs")
    append.append((t1 - t0) * 1e3)
    first.append((t2 - t1) * 1e3)
    ttft.append((t2 - t0) * 1e3)
    decode.append((n_gen - 1) / (t3 - t2))

med = statistics.median
peak = 0.0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak = int(line.split()[1]) / 1024
print(json.dumps({
    "og_version": og.__version__,
    "threads": threads, "prompt_tokens": n_prompt, "gen_tokens": n_gen, "runs": runs,
    "max_length": total,
    "prefill_tok_s": n_prompt / (med(ttft) / 1e3),
    "decode_tok_s": med(decode),
    "ttft_ms": med(ttft),
    "append_tokens_ms": med(append),
    "first_generate_next_token_ms": med(first),
    "peak_rss_mib": peak,
    "per_run": {"ttft_ms": ttft, "decode_tok_s": decode},
    "prompt_head": prompt[:6].tolist(),
    "tokens_head": tokens[:8],
}))
EOF
then
    cat "$bench/genai.err" >&2
    die "the onnxruntime-genai run failed"
fi

# --- report ---------------------------------------------------------------------------------------
"$py" - "$bench/edgellm.json" "$bench/genai.json" <<EOF
import json, sys
e = json.load(open(sys.argv[1]))
g = json.load(open(sys.argv[2]))
print()
print("Decode benchmark: $shape random-init int4 package, $threads threads, $prompt prompt + $gen generated"
      " tokens, median of $runs runs after a warm-up; $(nproc) cores, $(uname -m)")
print("  cpu:     $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)")
print("  package: $pkg (exported by: ${export_cmd[*]})")
print("  edgellm: ${edgellm_cmd[*]}")
import os
pj = json.load(open("$pkg/edgellm.json"))
print(f"  weights: {pj['precision']} block {pj['block_size']}, embeddings {pj['embeddings']} (tied: {pj.get('tied_embeddings')}), logits {pj['logits']}; model.onnx.data {os.path.getsize('$pkg/model.onnx.data') / 2**20:.1f} MiB")
print(f"  og:      onnxruntime-genai {g['og_version']} Python API, CPU provider, intra_op_num_threads=$threads,"
      f" max_length={g['max_length']}")
print()
print(f"{'tool':20s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'TTFT ms':>9s} {'peak RSS MiB':>13s}")
for name, r in (("edgellm", e), ("onnxruntime-genai", g)):
    print(f"{name:20s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} {r['ttft_ms']:9.1f} {r['peak_rss_mib']:13.0f}")
pr = e["prefill_tok_s"] / g["prefill_tok_s"]
dr = e["decode_tok_s"] / g["decode_tok_s"]
print()
print(f"prefill edgellm/og = {pr:.2f}x")
print(f"decode  edgellm/og = {dr:.2f}x   (target >= 1.5x: {'met' if dr >= 1.5 else 'NOT met'})")
print(f"edgellm decode_overhead_pct = {e['decode_overhead_pct']:.2f}% of each decode step outside the forward pass")
print(f"og: append_tokens {g['append_tokens_ms']:.1f} ms + first generate_next_token {g['first_generate_next_token_ms']:.2f} ms (medians);"
      f" per-run TTFT ms {[round(x, 1) for x in g['per_run']['ttft_ms']]},"
      f" decode tok/s {[round(x, 1) for x in g['per_run']['decode_tok_s']]}")
print(f"og prompt ids start {g['prompt_head']}; og greedy tokens start {g['tokens_head']}")
print("raw results: $bench/edgellm.json $bench/genai.json")
EOF
