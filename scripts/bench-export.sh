#!/usr/bin/env bash
# Benchmark edgellm-export against the onnxruntime-genai model builder on the same checkpoint.
#
#   1. writes a deterministic random-weight Hugging Face checkpoint of a real shape
#      (`edgellm-export --random-init-hf SHAPE`, default qwen2.5-0.5b),
#   2. times `edgellm-export --hf CKPT --out OUT1` (int4, defaults),
#   3. times `python -m onnxruntime_genai.models.builder -i CKPT -o OUT2 -p int4 -e cpu -c CACHE`,
#   measuring wall time and peak RSS of each with GNU time (`/usr/bin/time -v`), then prints a table
#   with the ratios (genai/edgellm wall time, edgellm/genai peak RSS) against the targets
#   (edgellm >= 5x faster, <= 1/4 of the builder's peak memory), and a structural comparison of
#   the two packages (op types and counts, graph I/O, initializers, genai_config.json).
#
# Usage: scripts/bench-export.sh [SHAPE]
# Environment:
#   BENCH_DIR     work folder (default /tmp/edgellm-bench): checkpoint, both packages, builder cache,
#                 GNU time logs
#   BENCH_PYTHON  python with onnxruntime-genai + torch + transformers + onnx + onnx-ir
#                 (default <repo>/.venv-bench/bin/python; create it with scripts/setup-bench-venv.sh)
#   EDGELLM_ARGS  extra edgellm-export flags, word-split (e.g. "--embeddings int4")
#   BENCH_RUNS    runs of each exporter, alternating (default 3); median wall time, max peak RSS
#   EDGELLM_EXPORT  the exporter binary (default <repo>/target/release/edgellm-export; built with
#                 `cargo build --release -p edgellm-export` when missing)
# Exit status: 0 when both exports succeeded (whether or not the targets are met), 1 otherwise.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shape="${1:-qwen2.5-0.5b}"
bench="${BENCH_DIR:-/tmp/edgellm-bench}"
py="${BENCH_PYTHON:-$root/.venv-bench/bin/python}"
exe="${EDGELLM_EXPORT:-$root/target/release/edgellm-export}"

die() { echo "bench-export: $*" >&2; exit 1; }
say() { echo "bench-export: $*" >&2; }

# --- prerequisites --------------------------------------------------------------------------------
gnu_time=/usr/bin/time
if ! [[ -x $gnu_time ]] || ! "$gnu_time" -v true >/dev/null 2>&1; then
    die "GNU time is required at /usr/bin/time (with -v). Install it: apt-get update && apt-get install -y time"
fi
[[ -x $py ]] || die "no Python at $py; run scripts/setup-bench-venv.sh (or set BENCH_PYTHON=/path/to/python)"
"$py" -c 'import onnxruntime_genai.models.builder, onnx, torch, transformers' 2>/dev/null \
    || die "$py lacks onnxruntime-genai/onnx/torch/transformers; run scripts/setup-bench-venv.sh"
if [[ ! -x $exe ]]; then
    [[ -z ${EDGELLM_EXPORT:-} ]] || die "EDGELLM_EXPORT=$exe is not an executable"
    command -v cargo >/dev/null || die "$exe is missing and cargo is not on PATH"
    say "building the release exporter: cargo build --release -p edgellm-export"
    (cd "$root" && cargo build --release -p edgellm-export) || die "cargo build failed"
fi

ckpt="$bench/checkpoint-$shape"
out1="$bench/edgellm-$shape"
out2="$bench/genai-$shape"
cache="$bench/genai-cache"
mkdir -p "$bench"
rm -rf "$ckpt" "$out1" "$out2" "$cache"

# Runs a command under GNU time; LOG gets time's report, OUT.log the command's output.
timed() {
    local name="$1"; shift
    # Flush earlier steps' dirty pages first, so no run pays for another's writeback.
    sync
    say "running: $*"
    if ! "$gnu_time" -v -o "$bench/$name.time" "$@" >"$bench/$name.log" 2>&1; then
        tail -n 30 "$bench/$name.log" >&2
        die "$name failed (full output: $bench/$name.log)"
    fi
}
wall_s() {  # "Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02.34" -> seconds
    awk -F': ' '/Elapsed \(wall clock\)/ { n = split($2, p, ":"); s = 0;
        for (i = 1; i <= n; i++) s = s * 60 + p[i]; printf "%.2f", s }' "$bench/$1.time"
}
rss_mib() {
    awk -F': ' '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$bench/$1.time"
}
size_mib() { du -sb "$1" | awk '{ printf "%.1f", $1 / 1048576 }'; }

# --- 1. checkpoint --------------------------------------------------------------------------------
timed random-init "$exe" --random-init-hf "$shape" --out "$ckpt"
say "checkpoint: $ckpt ($(size_mib "$ckpt") MiB, written in $(wall_s random-init) s)"

# The builder loads the tokenizer with transformers first: fail early if it cannot.
"$py" -c 'import sys; from tokenizers import Tokenizer; Tokenizer.from_file(sys.argv[1])' "$ckpt/tokenizer.json" \
    || die "the random-init tokenizer.json does not load in the tokenizers library"

# --- 2. edgellm-export ----------------------------------------------------------------------------
# EDGELLM_ARGS: extra exporter flags, e.g. "--embeddings int4" (word-split).
read -r -a extra_args <<<"${EDGELLM_ARGS:-}"
cmd1=("$exe" --hf "$ckpt" --out "$out1" ${extra_args[@]+"${extra_args[@]}"})
cmd2=("$py" -m onnxruntime_genai.models.builder -i "$ckpt" -o "$out2" -p int4 -e cpu -c "$cache")

# --- 2/3. both exporters, alternating, BENCH_RUNS times each --------------------------------------
# Median wall time and the largest peak RSS over the runs: single runs vary by +-30% here
# (page cache and writeback state), and alternating keeps both tools under the same conditions.
runs="${BENCH_RUNS:-3}"
for ((i = 1; i <= runs; i++)); do
    rm -rf "$out1" "$out2" "$cache"
    timed "edgellm-$i" "${cmd1[@]}"
    timed "genai-$i" "${cmd2[@]}"
done
median_wall() {  # median of wall_s over TOOL-1..TOOL-runs
    for ((i = 1; i <= runs; i++)); do wall_s "$1-$i"; echo; done | sort -n |
        awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
max_rss() {
    for ((i = 1; i <= runs; i++)); do rss_mib "$1-$i"; echo; done | sort -n | tail -n 1
}
all_walls() { for ((i = 1; i <= runs; i++)); do printf '%s ' "$(wall_s "$1-$i")"; done; }

# --- report ---------------------------------------------------------------------------------------
w1=$(median_wall edgellm); w2=$(median_wall genai)
r1=$(max_rss edgellm); r2=$(max_rss genai)
say "edgellm-export wall s per run: $(all_walls edgellm); genai builder: $(all_walls genai)"
s1=$(size_mib "$out1"); s2=$(size_mib "$out2")
speedup=$(awk -v a="$w2" -v b="$w1" 'BEGIN { printf "%.1f", (b > 0 ? a / b : 0) }')
memratio=$(awk -v a="$r1" -v b="$r2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')
ok_t=$(awk -v s="$speedup" 'BEGIN { print (s >= 5 ? "met" : "NOT met") }')
ok_m=$(awk -v m="$memratio" 'BEGIN { print (m <= 0.25 ? "met" : "NOT met") }')

echo
echo "Export benchmark: $shape random-init checkpoint ($(size_mib "$ckpt") MiB), $(nproc) cores, $(uname -m)"
echo "  edgellm: ${cmd1[*]}"
echo "  genai:   ${cmd2[*]}"
echo
printf '%-16s %10s %16s %14s\n' tool "wall s" "peak RSS MiB" "output MiB"
printf '%-16s %10s %16s %14s\n' edgellm-export "$w1" "$r1" "$s1"
printf '%-16s %10s %16s %14s\n' genai-builder "$w2" "$r2" "$s2"
echo
echo "time   genai/edgellm = ${speedup}x   (target >= 5x: $ok_t)"
echo "memory edgellm/genai = ${memratio}   (target <= 0.25: $ok_m)"
echo "GNU time reports: $bench/edgellm-*.time $bench/genai-*.time"

# --- structural comparison ------------------------------------------------------------------------
echo
echo "Structural comparison (edgellm vs genai builder)"
"$py" - "$out1" "$out2" <<'EOF'
import collections, json, os, sys
import onnx

a_dir, b_dir = sys.argv[1], sys.argv[2]
A, B = "edgellm", "genai"


def load(d):
    return onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)


def dims(vi):
    t = vi.type.tensor_type
    ds = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
          for d in t.shape.dim]
    return f"{onnx.TensorProto.DataType.Name(t.elem_type).lower()}{ds}"


def ops(m):
    c = collections.Counter()
    for n in m.graph.node:
        c[(n.domain or "ai.onnx") + "::" + n.op_type] += 1
    return c


def init_stats(m, d):
    by_type = collections.Counter()
    nbytes = collections.Counter()
    for t in m.graph.initializer:
        k = onnx.TensorProto.DataType.Name(t.data_type).lower()
        by_type[k] += 1
        n = 1
        for x in t.dims:
            n *= x
        bits = {"float": 32, "float16": 16, "bfloat16": 16, "int64": 64, "int32": 32, "uint8": 8,
                "int8": 8, "uint4": 4, "int4": 4}.get(k, 32)
        nbytes[k] += n * bits // 8
    return by_type, nbytes


def attrs(m, op):
    seen = collections.Counter()
    for n in m.graph.node:
        if n.op_type == op:
            kv = tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute
                              if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT,
                                            onnx.AttributeProto.STRING)))
            seen[kv] += 1
    return seen


ma, mb = load(a_dir), load(b_dir)
print(f"  ir_version      {A}: {ma.ir_version}  {B}: {mb.ir_version}")
print(f"  opset_import    {A}: {sorted((o.domain or 'ai.onnx', o.version) for o in ma.opset_import)}"
      f"  {B}: {sorted((o.domain or 'ai.onnx', o.version) for o in mb.opset_import)}")
print(f"  producer        {A}: {ma.producer_name} {ma.producer_version}  {B}: {mb.producer_name} {mb.producer_version}")
print(f"  nodes           {A}: {len(ma.graph.node)}  {B}: {len(mb.graph.node)}")

ca, cb = ops(ma), ops(mb)
print("\n  op type counts (op: edgellm / genai)")
for k in sorted(set(ca) | set(cb)):
    mark = "" if ca[k] == cb[k] else "   <- differs"
    print(f"    {k:42s} {ca[k]:5d} / {cb[k]:<5d}{mark}")

for op in ("MatMulNBits", "GroupQueryAttention", "GatherBlockQuantized", "SkipSimplifiedLayerNormalization",
           "SimplifiedLayerNormalization", "RotaryEmbedding"):
    xa, xb = attrs(ma, op), attrs(mb, op)
    if not xa and not xb:
        continue
    if xa == xb:
        print(f"\n  {op} attributes: identical ({sum(xa.values())} nodes)")
        continue
    print(f"\n  {op} attributes (distinct sets, node count)")
    for tag, x in ((A, xa), (B, xb)):
        for kv, n in sorted(x.items(), key=lambda t: -t[1]):
            print(f"    {tag:8s} x{n:<3d} {dict(kv)}")


def io(m, which):
    return {v.name: dims(v) for v in getattr(m.graph, which)}


import re

for which in ("input", "output"):
    ia, ib = io(ma, which), io(mb, which)
    print(f"\n  graph {which}s ({len(ia)} / {len(ib)}; per-layer names folded to %d)")
    # Fold per-layer KV names (past_key_values.%d.key, present.%d.value) into one row each.
    rows = {}
    for name in list(dict.fromkeys(list(ia) + list(ib))):
        pat = re.sub(r"\.\d+\.", ".%d.", name)
        r = rows.setdefault(pat, {"n": 0, A: set(), B: set()})
        r["n"] += 1
        r[A].add(ia.get(name, "-"))
        r[B].add(ib.get(name, "-"))
    for pat, r in rows.items():
        va, vb = " | ".join(sorted(r[A])), " | ".join(sorted(r[B]))
        mark = "" if va == vb else "   <- differs"
        count = f" (x{r['n']})" if r["n"] > 1 else ""
        print(f"    {pat + count:32s} {A}: {va:44s} {B}: {vb}{mark}")

for tag, m, d in ((A, ma, a_dir), (B, mb, b_dir)):
    t, nb = init_stats(m, d)
    data = os.path.join(d, "model.onnx.data")
    size = os.path.getsize(data) if os.path.exists(data) else 0
    print(f"\n  initializers {tag}: {len(m.graph.initializer)}; "
          + ", ".join(f"{k} x{t[k]} ({nb[k] / 2**20:.1f} MiB)" for k in sorted(t))
          + f"; model.onnx {os.path.getsize(os.path.join(d, 'model.onnx')) / 1024:.0f} KiB,"
          f" model.onnx.data {size / 2**20:.1f} MiB")

fa, fb = set(os.listdir(a_dir)), set(os.listdir(b_dir))
print(f"\n  files only in {A}: {sorted(fa - fb)}")
print(f"  files only in {B}: {sorted(fb - fa)}")


def flat(x, p=""):
    if isinstance(x, dict):
        r = {}
        for k, v in x.items():
            r.update(flat(v, f"{p}.{k}" if p else k))
        return r
    return {p: x}


ga = flat(json.load(open(os.path.join(a_dir, "genai_config.json"))))
gb = flat(json.load(open(os.path.join(b_dir, "genai_config.json"))))
diff = [k for k in sorted(set(ga) | set(gb)) if ga.get(k, "<absent>") != gb.get(k, "<absent>")]
print(f"\n  genai_config.json: {len(diff)} differing keys" + (":" if diff else ""))
for k in diff:
    print(f"    {k:50s} {A}: {json.dumps(ga.get(k, '<absent>'))}  {B}: {json.dumps(gb.get(k, '<absent>'))}")
EOF
