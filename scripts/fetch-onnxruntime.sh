#!/usr/bin/env bash
# Fetch the ONNX Runtime shared library that `ort` 2.0.0-rc.15 (load-dynamic) targets.
#
# Downloads the official `onnxruntime` wheel for this machine's architecture (x86_64 or aarch64)
# from the Python package index with `pip download --no-deps` (nothing is installed into any
# Python environment), unpacks `onnxruntime/capi/libonnxruntime.so.*` into
# .onnxruntime/<version>/ at the repository root, and prints the library's path.
# Idempotent: a second run finds the library and prints its path without network access.
#
# Usage: scripts/fetch-onnxruntime.sh [VERSION]   (default 1.31.1; env ORT_VERSION also works)
# Env ORT_ARCH=aarch64 fetches another architecture's library (for qemu-user runs,
# scripts/test-aarch64-qemu.sh) into .onnxruntime/<version>-<arch>/.
set -euo pipefail

version="${1:-${ORT_VERSION:-1.31.1}}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
arch="${ORT_ARCH:-$(uname -m)}"
case "$arch" in
    x86_64 | amd64) plat=manylinux_2_27_x86_64 arch=x86_64 ;;
    aarch64 | arm64) plat=manylinux_2_27_aarch64 arch=aarch64 ;;
    *) echo "fetch-onnxruntime: unsupported architecture $arch" >&2; exit 1 ;;
esac
dest="$root/.onnxruntime/$version"
[[ "$arch" == "$(uname -m)" ]] || dest="$dest-$arch"
lib="$dest/libonnxruntime.so"

if [[ -e "$lib" ]]; then
    echo "$lib"
    exit 0
fi

python=python3
command -v "$python" >/dev/null || { echo "fetch-onnxruntime: python3 (with pip) is required" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --platform/--python-version pick the wheel without looking at the local interpreter's tags;
# any CPython 3.11 wheel carries the same libonnxruntime.
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform "$plat" --platform manylinux_2_28_"${plat##*_2_27_}" --python-version 3.11 \
    --dest "$tmp" "onnxruntime==$version" >&2

wheel="$(ls "$tmp"/onnxruntime-*.whl | head -n 1)"
"$python" - "$wheel" "$tmp/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/libonnxruntime.so"):
            z.extract(n, sys.argv[2])
PY

so="$(ls "$tmp"/unpacked/onnxruntime/capi/libonnxruntime.so.* | head -n 1)"
[[ -f "$so" ]] || { echo "fetch-onnxruntime: no libonnxruntime.so.* in $wheel" >&2; exit 1; }
mkdir -p "$dest"
cp "$so" "$dest/"
ln -sf "$(basename "$so")" "$lib"
echo "$lib"
