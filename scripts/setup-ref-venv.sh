#!/usr/bin/env bash
# Create the Python venv that computes the reference data the Rust tests check against:
# tests/fixtures/make_fixtures.py, tests/fixtures/gguf/make_gguf_fixtures.py,
# tests/fixtures/smollm2/make_goldens.py and tests/fixtures/perplexity/make_reference.py.
# It has the exact versions of tests/fixtures/requirements.txt plus gguf (GGUF reader/writer and
# the block (de)quantizers), accelerate (transformers needs it to load a GGUF file) and Jinja2
# (chat templates) and sentencepiece (the SentencePiece vocabulary of the `spm_q8_0` GGUF
# fixture), all pinned.
#
# Usage: scripts/setup-ref-venv.sh
# Environment:
#   REF_VENV              venv folder (default: <repo>/.venv-ref, gitignored by /.venv*)
#   PYTHON                interpreter to create it with (default: python3; the fixtures were made
#                         with 3.11)
#   REF_TORCH_INDEX_URL   extra package index for torch, e.g. the CPU-only wheel index. Default: PyPI
#                         only, whose Linux x86_64 torch wheel depends on the CUDA runtime wheels
#                         (about 5 GB installed, ~40 s from a fast mirror). torch 2.15 does not
#                         import without them (libtorch_cuda.so links cudart/cublas/cudnn/nccl/...),
#                         so they cannot be left out; the references only ever run on the CPU.
#
# Idempotent: when the venv already has exactly these versions it prints its python and exits
# without touching the network. Prints the venv's python path on stdout (everything else: stderr).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REF_VENV:-$root/.venv-ref}"
python="${PYTHON:-python3}"

case "${1:-}" in
    -h | --help) sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "setup-ref-venv: unknown argument: $1" >&2; exit 2 ;;
esac

# tests/fixtures/requirements.txt (the versions every committed golden was made with) + the GGUF side.
pins=(
    "torch==2.15.0"
    "transformers==5.23.0"
    "tokenizers==0.23.3"
    "safetensors==0.8.0"
    "numpy==2.4.6"
    "gguf==0.19.0"
    "accelerate==1.15.0"
    "Jinja2==3.1.6"
    "sentencepiece==0.2.3"
)

log() { echo "setup-ref-venv: $*" >&2; }

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
    3.10 | 3.11 | 3.12 | 3.13 | 3.14) ;;
    *) log "warning: Python $pyver; the references were made with 3.11" ;;
esac

install_pins "${REF_TORCH_INDEX_URL:-}"
# `kernels` would make transformers keep GGUF blocks packed and run its own matmul kernels; the
# references want the plain dequantized float32 model (the scripts also ask for it explicitly).
if "$venv/bin/python" -c 'import kernels' 2>/dev/null; then
    log "warning: the 'kernels' package is installed in $venv; the reference scripts force dequantize=True"
fi
HF_HUB_OFFLINE=1 "$venv/bin/python" -c '
import torch, transformers, tokenizers, safetensors, numpy, gguf, accelerate, jinja2, sentencepiece
torch.set_num_threads(1)
assert float(torch.ones(2) @ torch.ones(2)) == 2.0
' || { log "import check failed"; exit 1; }
log "ready: $venv"
echo "$venv/bin/python"
