#!/usr/bin/env bash
# Benchmark `edgellm bench` (int4 ONNX package) against llama.cpp's llama-bench (Q4_0 GGUF) on the
# same random weights.
#
#   1. writes a deterministic random-weight Hugging Face checkpoint of a real shape
#      (`edgellm-export --random-init-hf SHAPE`, default qwen2.5-0.5b; bf16 safetensors) and
#      exports it to an edgellm int4 package (`edgellm-export --hf CKPT`),
#   2. builds llama.cpp's llama-quantize and llama-bench (Release, cmake) from the llama.cpp that
#      the `llama-cpp-python` source distribution on PyPI vendors (vendor/llama.cpp); the sdist and
#      the build are cached under BENCH_DIR, so reruns skip this step (scripts/llamacpp-lib.sh,
#      shared with scripts/bench-quality.sh),
#   3. converts the checkpoint with llama.cpp's convert_hf_to_gguf.py (--outtype bf16, lossless
#      for a bf16 checkpoint) and quantizes it with `llama-quantize ... Q4_0`,
#   4. runs `edgellm bench --threads T` on the package and
#      `llama-bench -m model-q4_0.gguf -p P -n G -t T -r R -o json` on the GGUF, and prints both and
#      the ratios edgellm/llama.cpp (prefill, decode) against the targets (both >= 1.0x).
#
# What each number is:
#   edgellm   medians of R runs after a warm-up: prefill = P / TTFT (prompt forward + first
#             argmax), decode = (G - 1) tokens after the first / time after the first token, the
#             decode running at context P .. P+G.
#   llama.cpp llama-bench's pp P (prompt processing of P tokens in one batch) and tg G (G one-token
#             decode steps from an empty context), each after llama-bench's own warm-up; the
#             median of the R samples (samples_ts; llama-bench's avg_ts, the mean, is shown too).
#             As tg starts at context 0, a second llama-bench run `-p 0 -n G -d P` (tg G after a
#             P-token context, the context edgellm's decode runs at) is reported as well
#             (LLAMA_DEPTH_RUN=0 skips it).
#
# The convert step needs the gguf package: the vendored gguf-py is put on PYTHONPATH. Two
# adaptations, made by a small wrapper around convert_hf_to_gguf.py (the files are not edited):
#   - Qwen2's set_vocab tries SentencePiece first and falls back to the GPT-2 BPE vocabulary on
#     FileNotFoundError (no tokenizer.model); without the sentencepiece module installed the
#     import fails first, so the wrapper raises FileNotFoundError when tokenizer.model is absent.
#   - the converter identifies the BPE pre-tokenizer by hashing the tokenization of a test string;
#     the random-init tokenizer (256 bytes + a few merges) matches no known hash, so when it is not
#     recognized the wrapper uses "qwen2" (Qwen2.5's). This only affects text tokenization, which
#     llama-bench does not use.
#
# Usage: scripts/bench-vs-llamacpp.sh [SHAPE]
# Environment:
#   BENCH_DIR      work folder (default /tmp/edgellm-bench); files under BENCH_DIR/vs-llamacpp,
#                  the llama.cpp sdist and build under BENCH_DIR/llama.cpp
#   BENCH_PYTHON   python with torch + transformers + numpy (the converter's needs; default
#                  <repo>/.venv-bench/bin/python, created by scripts/setup-bench-venv.sh)
#   BENCH_THREADS  threads for both (default 2)
#   BENCH_PROMPT   prompt tokens (default 128)
#   BENCH_GEN      generated tokens (default 128)
#   BENCH_RUNS     runs, medians reported (default 5)
#   EDGELLM_ARGS   extra edgellm-export flags, word-split (e.g. "--embeddings int4")
#   EDGELLM_MAX_LENGTH  edgellm bench --max-length (default BENCH_PROMPT + BENCH_GEN)
#   LLAMA_CPP_PYTHON_VERSION  the llama-cpp-python sdist version (default: the one already cached
#                  under BENCH_DIR/llama.cpp, else the newest on PyPI)
#   LLAMA_NATIVE   1 (default): -DGGML_NATIVE=ON, falling back to explicit flags if a binary dies
#                  with SIGILL; 0: -DGGML_NATIVE=OFF with explicit -DGGML_AVX2/FMA/F16C/... flags
#                  for the instruction sets /proc/cpuinfo lists
#   LLAMA_DEPTH_RUN  1 (default): also run tg at depth P (see above); 0: skip
#   EDGELLM, EDGELLM_EXPORT  the binaries (default <repo>/target/release/{edgellm,edgellm-export};
#                  built with `cargo build --release -p edgellm -p edgellm-export` when missing)
#   ORT_DYLIB_PATH the ONNX Runtime library edgellm loads (default: scripts/fetch-onnxruntime.sh)
# Needs cmake, a C/C++ compiler and pip (for `pip download`); installs Debian's cmake with apt-get
# when it is missing and apt-get is usable.
# Exit status: 0 when both benchmarks ran (whether or not the targets are met), 1 otherwise.
set -euo pipefail

name="bench-vs-llamacpp"
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
bench_root="${BENCH_DIR:-/tmp/edgellm-bench}"
bench="$bench_root/vs-llamacpp"
llroot="$bench_root/llama.cpp"
depth_run="${LLAMA_DEPTH_RUN:-1}"
"$py" -c 'import torch, transformers, numpy, yaml, tqdm' 2>/dev/null \
    || die "$py lacks torch/transformers/numpy/pyyaml/tqdm (convert_hf_to_gguf.py needs them); run scripts/setup-bench-venv.sh"
# shellcheck source=scripts/llamacpp-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/llamacpp-lib.sh"
ll_py="$py"
ll_logs="$bench"
llamacpp_tools_check

mkdir -p "$bench" "$llroot"

# --- 2. llama.cpp source and build (cached; scripts/llamacpp-lib.sh) -----------------------------
llamacpp_fetch
[[ -f $llama/convert_hf_to_gguf.py ]] || die "$llama has no convert_hf_to_gguf.py (the sdist layout changed?)"
llamacpp_build_default llama-quantize llama-bench

# --- 1. checkpoint and edgellm package ------------------------------------------------------------
ckpt="$bench/checkpoint-$shape"
pkg="$bench/edgellm-$shape"
say "writing the random-init checkpoint: $exporter --random-init-hf $shape --out $ckpt --force"
"$exporter" --random-init-hf "$shape" --out "$ckpt" --force >"$bench/random-init.log" 2>&1 \
    || { cat "$bench/random-init.log" >&2; die "random-init checkpoint failed"; }
read -r -a extra_args <<<"${EDGELLM_ARGS:-}"
export_cmd=("$exporter" --hf "$ckpt" --out "$pkg" --force ${extra_args[@]+"${extra_args[@]}"})
say "exporting: ${export_cmd[*]}"
"${export_cmd[@]}" >"$bench/export.log" 2>&1 || { cat "$bench/export.log" >&2; die "export failed"; }

# --- 3. GGUF: convert and quantize ----------------------------------------------------------------
gguf_bf16="$bench/model-bf16.gguf"
gguf_q4="$bench/model-q4_0.gguf"
rm -f "$gguf_bf16" "$gguf_q4"
say "converting: convert_hf_to_gguf.py $ckpt --outtype bf16 --outfile $gguf_bf16"
llamacpp_convert_hf "$ckpt" "$gguf_bf16" "$bench/convert.log"
say "quantizing: llama-quantize $gguf_bf16 $gguf_q4 Q4_0 $(nproc)"
run_ll llama-quantize "$gguf_bf16" "$gguf_q4" Q4_0 "$(nproc)" >"$bench/quantize.log" 2>&1 \
    || { tail -n 30 "$bench/quantize.log" >&2; die "llama-quantize failed (log: $bench/quantize.log)"; }
rm -f "$gguf_bf16"
sync

# --- 4. benchmarks --------------------------------------------------------------------------------
run_edgellm_bench "$pkg"

ll_args=(-m "$gguf_q4" -p "$prompt" -n "$gen" -t "$threads" -r "$runs" -o json)
say "running: llama-bench ${ll_args[*]}"
run_ll llama-bench "${ll_args[@]}" >"$bench/llama-bench.json" 2>"$bench/llama-bench.err" \
    || { tail -n 30 "$bench/llama-bench.err" >&2; die "llama-bench failed (log: $bench/llama-bench.err)"; }
ll_depth_args=(-m "$gguf_q4" -p 0 -n "$gen" -d "$prompt" -t "$threads" -r "$runs" -o json)
if [[ $depth_run == 1 ]]; then
    say "running: llama-bench ${ll_depth_args[*]}"
    run_ll llama-bench "${ll_depth_args[@]}" >"$bench/llama-bench-depth.json" 2>"$bench/llama-bench-depth.err" \
        || { tail -n 30 "$bench/llama-bench-depth.err" >&2; die "llama-bench (depth) failed"; }
else
    echo "[]" >"$bench/llama-bench-depth.json"
fi

# --- report ---------------------------------------------------------------------------------------
# Tensor types in the Q4_0 file, from llama-quantize's per-tensor lines
# ("[  2/290] token_embd.weight - [...], type = bf16, converting to q8_0 .. size = ...").
types="$(awk '/^\[ *[0-9]+\/ *[0-9]+\]/ {
        t = ""
        if (match($0, /converting to +[a-z0-9_]+/)) { t = substr($0, RSTART, RLENGTH); sub(/converting to +/, "", t) }
        else if (match($0, /type = +[a-z0-9_]+/)) { t = substr($0, RSTART, RLENGTH); sub(/type = +/, "", t) }
        if (t != "") n[t]++
        if ($0 ~ /token_embd\.weight/) emb = t
    } END { for (k in n) printf "%s x%d\n", k, n[k]; if (emb != "") printf "token_embd (tied output) %s\n", emb }' \
    "$bench/quantize.log" | sort | paste -sd, | sed 's/,/, /g')"
"$py" - "$bench/edgellm.json" "$bench/llama-bench.json" "$bench/llama-bench-depth.json" <<EOF
import json, statistics, sys
e = json.load(open(sys.argv[1]))
ll = json.load(open(sys.argv[2]))
lld = json.load(open(sys.argv[3]))


def pick(entries, n_prompt, n_gen):
    for r in entries:
        if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen:
            return r
    sys.exit(f"no llama-bench result with n_prompt={n_prompt} n_gen={n_gen}")


pp, tg = pick(ll, $prompt, 0), pick(ll, 0, $gen)
med = lambda r: statistics.median(r["samples_ts"])
print()
print("Decode benchmark: $shape random-init weights, $threads threads, $prompt prompt + $gen generated tokens,"
      " $runs runs; $(nproc) cores, $(uname -m)")
print("  cpu:       $(lscpu | sed -n 's/^Model name: *//p' | head -n 1)")
print("  edgellm:   ${edgellm_cmd[*]}")
print("             package exported by: ${export_cmd[*]}")
import os
pj = json.load(open("$pkg/edgellm.json"))
print(f"             weights: {pj['precision']} block {pj['block_size']}, embeddings {pj['embeddings']} (tied: {pj.get('tied_embeddings')}), logits {pj['logits']}; model.onnx.data {os.path.getsize('$pkg/model.onnx.data') / 2**20:.1f} MiB")
print("  llama.cpp: llama-bench ${ll_args[*]}")
print(f"             build {pp.get('build_commit', '?')} ({pp.get('build_number', '?')}) from llama-cpp-python $llversion;"
      f" cmake ${build_flags[*]}; build time: ${build_s}$([[ $build_s == cached ]] || echo ' s')")
print(f"             {pp.get('model_type', '?')}, {pp.get('model_size', 0) / 2**20:.1f} MiB; cpu_info {pp.get('cpu_info', '?')!r};"
      f" backends {pp.get('backends', '?')}; flash_attn {pp.get('flash_attn', '?')}; n_batch {pp.get('n_batch', '?')},"
      f" n_ubatch {pp.get('n_ubatch', '?')}")
print("             quantized tensor types: ${types:-see $bench/quantize.log}")
print()
print(f"{'tool':28s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
print(f"{'edgellm (median)':28s} {e['prefill_tok_s']:14.1f} {e['decode_tok_s']:13.1f}"
      f"   (TTFT {e['ttft_ms']:.1f} ms, peak RSS {e['peak_rss_mib']:.0f} MiB)")
print(f"{'llama.cpp (median)':28s} {med(pp):14.1f} {med(tg):13.1f}   (pp$prompt / tg$gen)")
print(f"{'llama.cpp (mean +- sd)':28s} {pp['avg_ts']:8.1f} +- {pp['stddev_ts']:3.1f} {tg['avg_ts']:7.1f} +- {tg['stddev_ts']:3.1f}")
if lld:
    tgd = pick(lld, 0, $gen)
    print(f"{'llama.cpp tg$gen @ depth $prompt':28s} {'':14s} {med(tgd):13.1f}   (median; mean {tgd['avg_ts']:.1f} +- {tgd['stddev_ts']:.1f})")
pr = e["prefill_tok_s"] / med(pp)
dr = e["decode_tok_s"] / med(tg)
print()
print(f"prefill edgellm/llama.cpp = {pr:.2f}x   (target >= 1.0x: {'met' if pr >= 1.0 else 'NOT met'})")
print(f"decode  edgellm/llama.cpp = {dr:.2f}x   (target >= 1.0x: {'met' if dr >= 1.0 else 'NOT met'})")
if lld:
    print(f"decode  edgellm/llama.cpp at depth $prompt = {e['decode_tok_s'] / med(tgd):.2f}x")
print(f"edgellm decode_overhead_pct = {e['decode_overhead_pct']:.2f}%")
print(f"llama.cpp samples tok/s: pp {[round(x, 1) for x in pp['samples_ts']]}, tg {[round(x, 1) for x in tg['samples_ts']]}")
print("raw results: $bench/edgellm.json $bench/llama-bench.json $bench/llama-bench-depth.json")
EOF
