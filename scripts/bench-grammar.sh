#!/usr/bin/env bash
# Benchmark (not a test): what structured output costs (issue 14 §4), in one run.
#
#   scripts/bench-grammar.sh
#
# For each vocabulary: the real model (SmolLM2-135M-Instruct, 49k tokens: scripts/fetch-model.sh)
# and the random-init demo Qwen2.5-0.5B (151k tokens, target/demo/), and with BENCH_GPTOSS=1 a
# random-init gpt-oss-20b (201k tokens; its export writes ~13 GB and takes long on a small
# machine), `edgellm bench --json-schema S --grammar-text T` measures, in the same process:
#   decode step   the median unconstrained decode step (BENCH_RUNS runs of BENCH_GEN tokens);
#   mask          llguidance's token mask, computed at every step of a walk that writes T (a JSON
#                 text valid against S, in the daemon's layout) as a model would, taking the
#                 longest allowed token each step and the tokens the grammar forces as they come
#                 (so the walk needs no trained weights): mean, p99 and max microseconds, and
#                 the mean as a share of the decode step (aim: under 5% on the real model);
#   forced        tokens forced by the grammar, and their share of the answer's tokens.
# On the real model also a real constrained generation (`edgellm run --json-schema`, greedy)
# against the same request free, alternating BENCH_ROUNDS times: constrained and free decode
# tok/s, the mask time per token the engine reports (usage.grammar_ms / completion tokens) and
# the forced tokens.
#
# Environment: BENCH_GEN (64), BENCH_RUNS (3), BENCH_ROUNDS (3), BENCH_THREADS (2),
# BENCH_GPTOSS (0), EDGELLM / EDGELLM_EXPORT (binaries; else release builds), ORT_DYLIB_PATH
# (else scripts/fetch-onnxruntime.sh).
set -euo pipefail
name=bench-grammar
bench_python=0
: "${BENCH_GEN:=64}" "${BENCH_RUNS:=3}" "${BENCH_PROMPT:=32}" "${EDGELLM_MAX_LENGTH:=512}"
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh" qwen2.5-0.5b
rounds="${BENCH_ROUNDS:-3}"
[[ $rounds =~ ^[0-9]+$ ]] && ((rounds > 0)) || die "BENCH_ROUNDS must be a positive integer (got '$rounds')"

bench="$(mktemp -d)"
trap 'rm -rf "$bench"' EXIT

# The sensor-gateway answer of issue 14: a verdict with a bounded number, an enum, a nested
# object and an array.
cat >"$bench/schema.json" <<'EOF'
{"type": "object", "properties": {
  "abnormal": {"type": "boolean"},
  "confidence": {"type": "number", "minimum": 0, "maximum": 1},
  "severity": {"enum": ["low", "medium", "high"]},
  "reading": {"type": "object", "properties": {
    "value": {"type": "number"}, "unit": {"type": "string", "maxLength": 10}},
    "required": ["value", "unit"], "additionalProperties": false},
  "actions": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 3}},
 "required": ["abnormal", "confidence", "severity", "reading", "actions"],
 "additionalProperties": false}
EOF
text='{"abnormal": true, "confidence": 0.82, "severity": "high", "reading": {"value": 9.7, "unit": "mm/s"}, "actions": ["stop the spindle", "inspect the bearing"]}'
prompt_text="A vibration sensor on a milling machine read 9.7 mm/s, four times its usual level. Is this abnormal? Reply with JSON."

packages=()
say "real model: scripts/fetch-model.sh smollm2-135m-instruct"
smol="$("$root/scripts/fetch-model.sh" smollm2-135m-instruct)" || die "fetch-model.sh failed"
packages+=("smollm2-135m-instruct:$smol")
qwen="$root/target/demo/qwen2.5-0.5b-random"
if [[ ! -f "$qwen/genai_config.json" ]]; then
    mkdir -p "$(dirname "$qwen")"
    "$exporter" --random-init qwen2.5-0.5b --embeddings int4 --max-length 1024 --out "$qwen" --force >&2 \
        || die "export of the Qwen2.5-0.5B random-init package failed"
fi
packages+=("qwen2.5-0.5b-random:$qwen")
if [[ ${BENCH_GPTOSS:-0} == 1 ]]; then
    gptoss="$root/target/demo/gpt-oss-20b-random"
    if [[ ! -f "$gptoss/genai_config.json" ]]; then
        "$exporter" --random-init gpt-oss-20b --max-length 1024 --out "$gptoss" --force >&2 \
            || die "export of the gpt-oss-20b random-init package failed"
    fi
    packages+=("gpt-oss-20b-random:$gptoss")
fi

for entry in "${packages[@]}"; do
    label="${entry%%:*}" pkg="${entry#*:}"
    out="walk.$label" run_edgellm_bench "$pkg" --json-schema "$bench/schema.json" --grammar-text "$text"
done

say "constrained and free generation on the real model, $rounds rounds"
for ((r = 0; r < rounds; r++)); do
    for mode in constrained free; do
        extra=()
        [[ $mode == constrained ]] && extra=(--json-schema "$bench/schema.json")
        "$edgellm" run --model "$smol" --threads "$threads" --max-length "$max_length" \
            --temperature 0 --max-tokens 160 --json "${extra[@]}" --prompt "$prompt_text" \
            >"$bench/run.$mode.$r.json" 2>"$bench/run.err" || { cat "$bench/run.err" >&2; die "edgellm run failed"; }
    done
done

python3 - "$bench" "$rounds" "${packages[@]}" <<'EOF'
import json, statistics, sys
out, rounds, entries = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print("Structured output's cost: one JSON schema (an object with a bounded number, an enum, a")
print("nested object and an array), walked along one valid answer (the random-init vocabularies")
print("spell it mostly byte by byte, hence more tokens)")
print()
print("| vocabulary | tokens | decode step ms | mask us mean | p99 | max | mask / step | forced tokens |")
print("|---|---|---|---|---|---|---|---|")
for e in entries:
    label = e.split(":", 1)[0]
    r = json.load(open(f"{out}/walk.{label}.json"))
    g = r["grammar"]
    print(f"| {label} | {g['vocab']} | {g['decode_step_us'] / 1e3:.2f} | {g['mask_us_mean']:.1f} | "
          f"{g['mask_us_p99']:.1f} | {g['mask_us_max']:.1f} | {100 * g['mask_share_of_step']:.2f}% | "
          f"{g['forced_tokens']} of {g['forced_tokens'] + g['masked_steps']} ({100 * g['forced_share']:.0f}%) |")
print()
rows = {m: [json.load(open(f"{out}/run.{m}.{i}.json")) for i in range(rounds)] for m in ("constrained", "free")}
c = rows["constrained"][0]
print("Real model, greedy, the same prompt with and without the schema (medians of", rounds, "rounds):")
for m in ("free", "constrained"):
    u = [x["usage"] for x in rows[m]]
    dec = statistics.median(x["decode_tok_s"] for x in u)
    line = f"  {m:12s} decode {dec:.1f} tok/s, {u[0]['completion_tokens']} tokens, finish {rows[m][0]['finish_reason']}"
    if m == "constrained":
        per = statistics.median(x["grammar_ms"] / max(x["completion_tokens"], 1) for x in u)
        line += f", mask {1e3 * per:.1f} us/token (usage.grammar_ms), {u[0]['forced_tokens']} forced"
    print(line)
free_dec = statistics.median(x["usage"]["decode_tok_s"] for x in rows["free"])
con_dec = statistics.median(x["usage"]["decode_tok_s"] for x in rows["constrained"])
print(f"  constrained / free decode: {con_dec / free_dec:.3f}")
print(f"  answer: {c['text']}")
EOF
