#!/usr/bin/env bash
# Create the Python venv used by the comparison/benchmark scripts (scripts/bench-export.sh,
# scripts/genai-generate.py): onnxruntime-genai (runtime + its model builder) and what the builder
# needs (torch, transformers, onnx, onnx-ir, safetensors), at the exact versions the reference
# environment and the test fixtures were made with (tests/fixtures/requirements.txt).
#
# Usage: scripts/setup-bench-venv.sh [--with-accelerate]
#   --with-accelerate   also install accelerate (only needed by transformers for some checkpoints,
#                       e.g. gpt-oss MXFP4; not for the qwen2.5 benchmark)
# Environment:
#   BENCH_VENV            venv folder (default: <repo>/.venv-bench, gitignored)
#   PYTHON                interpreter to create it with (default: python3; 3.11-3.14 have wheels)
#   BENCH_TORCH_INDEX_URL extra package index for torch, e.g. https://download.pytorch.org/whl/cpu
#                         for the CPU-only wheel (the PyPI default wheel pulls ~3 GB of CUDA libs)
#
# Idempotent: when the venv already has exactly these versions it prints its python and exits
# without touching the network. Prints the venv's python path on stdout (everything else: stderr).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BENCH_VENV:-$root/.venv-bench}"
python="${PYTHON:-python3}"

with_accelerate=0
for arg in "$@"; do
    case "$arg" in
        --with-accelerate) with_accelerate=1 ;;
        -h | --help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup-bench-venv: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

# The versions of /root/venvs/ref (fixtures and reference research were produced with these).
pins=(
    "torch==2.15.0"
    "transformers==5.23.0"
    "tokenizers==0.23.3"
    "onnxruntime==1.31.1"
    "onnxruntime-genai==0.18.0"
    "onnx==1.23.2"
    "onnx-ir==1.1.0"
    "numpy==2.4.6"
    "safetensors==0.8.0"
)
if [[ $with_accelerate == 1 ]]; then
    pins+=("accelerate==1.15.0")
fi

log() { echo "setup-bench-venv: $*" >&2; }

# shellcheck source=scripts/venv-lib.sh
source "$root/scripts/venv-lib.sh"

if pins_satisfied; then
    log "$venv is up to date"
    echo "$venv/bin/python"
    exit 0
fi

command -v "$python" >/dev/null || { log "'$python' not found (set PYTHON=/path/to/python3.11)"; exit 1; }
pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$pyver" in
    3.11 | 3.12 | 3.13 | 3.14) ;;
    *) log "warning: Python $pyver; onnxruntime-genai 0.18.0 ships wheels for 3.11-3.14 only" ;;
esac

install_pins "${BENCH_TORCH_INDEX_URL:-}" --upgrade-pip
"$venv/bin/python" -c 'import onnxruntime_genai, onnxruntime, onnx, onnx_ir, torch, transformers' \
    || { log "import check failed"; exit 1; }
log "ready: $venv"
echo "$venv/bin/python"
