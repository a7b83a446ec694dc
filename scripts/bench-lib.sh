# Shared by scripts/bench-vs-*.sh and bench-backends.sh (sourced, not run): the common settings, their validation,
# and the edgellm binaries and ONNX Runtime library both benchmarks need.
#
# Before sourcing, set `name` (for messages), and `bench_python=0` when the script needs no Python
# environment. Sets: root shape py edgellm exporter threads prompt
# gen runs max_length, functions die, say and run_edgellm_bench (needs $bench); exports ORT_DYLIB_PATH. See either script's header
# for the environment variables.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shape="${1:-qwen2.5-0.5b}"
py="${BENCH_PYTHON:-$root/.venv-bench/bin/python}"
edgellm="${EDGELLM:-$root/target/release/edgellm}"
exporter="${EDGELLM_EXPORT:-$root/target/release/edgellm-export}"
threads="${BENCH_THREADS:-2}"
prompt="${BENCH_PROMPT:-128}"
gen="${BENCH_GEN:-128}"
runs="${BENCH_RUNS:-5}"
max_length="${EDGELLM_MAX_LENGTH:-$((prompt + gen))}"

die() { echo "$name: $*" >&2; exit 1; }
say() { echo "$name: $*" >&2; }

for v in threads prompt gen runs max_length; do
    [[ ${!v} =~ ^[0-9]+$ ]] && ((${!v} > 0)) || die "$v must be a positive integer (got '${!v}')"
done
((gen >= 2)) || die "BENCH_GEN must be at least 2 (decode speed needs a second token)"

if [[ ${bench_python:-1} != 0 ]]; then
    [[ -x $py ]] || die "no Python at $py; run scripts/setup-bench-venv.sh (or set BENCH_PYTHON=/path/to/python)"
fi
if [[ ! -x $edgellm || ! -x $exporter ]]; then
    [[ -z ${EDGELLM:-} && -z ${EDGELLM_EXPORT:-} ]] \
        || die "EDGELLM=$edgellm or EDGELLM_EXPORT=$exporter is not an executable"
    command -v cargo >/dev/null || die "$edgellm or $exporter is missing and cargo is not on PATH"
    say "building: cargo build --release -p edgellm -p edgellm-export"
    (cd "$root" && cargo build --release -p edgellm -p edgellm-export) || die "cargo build failed"
fi
if [[ -z ${ORT_DYLIB_PATH:-} ]]; then
    ORT_DYLIB_PATH="$("$root/scripts/fetch-onnxruntime.sh")" || die "scripts/fetch-onnxruntime.sh failed"
fi
[[ -e $ORT_DYLIB_PATH ]] || die "ORT_DYLIB_PATH=$ORT_DYLIB_PATH does not exist"
export ORT_DYLIB_PATH

# Runs `edgellm bench` on package $1 with the shared settings and any further arguments; JSON
# to $bench/${out:-edgellm}.json. Sets edgellm_cmd (the command, for reports).
run_edgellm_bench() {
    local pkg="$1" file="$bench/${out:-edgellm}"
    shift
    edgellm_cmd=("$edgellm" bench --model "$pkg" --threads "$threads" --prompt-tokens "$prompt"
        --gen-tokens "$gen" --runs "$runs" --max-length "$max_length" --json "$@")
    say "running: ${edgellm_cmd[*]}"
    if ! "${edgellm_cmd[@]}" >"$file.json" 2>"$file.err"; then
        cat "$file.err" >&2
        die "edgellm bench failed (ORT_DYLIB_PATH=$ORT_DYLIB_PATH)"
    fi
}
