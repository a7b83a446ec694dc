#!/usr/bin/env bash
# Counts the aarch64 instructions each int4/int8 dot-product kernel spends per 32-value sub-block
# (issue 16 §2: speed on real ARM hardware cannot be measured here, so count what can be
# counted). Compiles a probe crate calling edgellm_kernels::row_dot for each kernel and layout
# (and rows_dot_2x2 for neon-i8mm, whose loop makes four products: two activation rows by two
# weight rows) with --emit asm in the Debian chroot of scripts/build-aarch64.sh (which must have
# made it; the edgellm-kernels rlib is built here, seconds), finds each function's innermost loop (the instructions between
# a label and the backward branch to it) and prints its length, its NEON share and its length per
# product.
#
# Usage: sudo scripts/aarch64-kernel-insns.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
suite=${EDGELLM_DEBIAN_SUITE:-trixie}
root=$(realpath -m "${EDGELLM_DEBIAN_CHROOT:-target/debian-$suite-chroot}")
deps=target/aarch64-unknown-linux-gnu/release/deps
fail() { echo "aarch64-kernel-insns: $*" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || fail "needs root (chroot)"
work=target/aarch64-kernel-insns
mkdir -p "$work"
{
    echo '#![allow(non_snake_case)]'
    echo 'use edgellm_kernels::{Kernel, QuantRow, row_dot, rows_dot_2x2};'
    for bits in 4 8; do
        for b16 in false true; do
            for k in Portable Neon NeonDot; do
                echo "#[unsafe(no_mangle)]
pub fn k${bits}_${k}_b16_${b16}(w: &[u8], x: &QuantRow, ws: &[f32], subs: usize) -> f32 {
    row_dot::<${bits}, ${b16}>(Kernel::${k}, w, x, ws, 0, subs)
}"
            done
            # i8mm: two activation rows by two weight rows, four products per loop iteration.
            echo "#[unsafe(no_mangle)]
pub fn k${bits}_NeonI8mm_2x2_b16_${b16}(
    w: [&[u8]; 2], x: [&QuantRow; 2], ws: [&[f32]; 2], subs: usize,
) -> [f32; 4] {
    rows_dot_2x2::<${bits}, ${b16}>(Kernel::NeonI8mm, w, x, ws, 0, subs)
}"
        done
    done
} >"$work/probe.rs"

mounted=()
cleanup() { for m in "${mounted[@]}"; do umount "$m" || true; done; }
trap cleanup EXIT
mkdir -p "$root/src"
mountpoint -q "$root/src" || { mount --bind "$PWD" "$root/src"; mounted+=("$root/src"); }
mkdir -p "$root/root/.cargo/registry"
mountpoint -q "$root/root/.cargo/registry" ||
    { mount --bind "${CARGO_HOME:-$HOME/.cargo}/registry" "$root/root/.cargo/registry"; mounted+=("$root/root/.cargo/registry"); }
[[ -x "$root/usr/bin/cargo" ]] || fail "no chroot at $root: run sudo scripts/build-aarch64.sh first"
# The kernels' rlib from this checkout's source (no C, no build script: the cross linker and
# sysroot of build-aarch64.sh are not needed).
rlib=$(chroot "$root" bash -c "cd /src && cargo build --offline --release --locked \
    --target aarch64-unknown-linux-gnu -p edgellm-kernels --message-format=json" |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "edgellm_kernels":
        print(next(f for f in m["filenames"] if f.endswith(".rlib")))')
[[ -n "$rlib" ]] || fail "cargo build -p edgellm-kernels named no rlib"
rlib=${rlib#/src/}
chroot "$root" rustc --edition 2024 -C opt-level=3 --target aarch64-unknown-linux-gnu \
    --crate-type lib --emit asm -o "/src/$work/probe.s" \
    --extern "edgellm_kernels=/src/$rlib" -L "dependency=/src/$deps" "/src/$work/probe.rs"

python3 - "$work/probe.s" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
# Every function of the file, by symbol: its instructions and the positions of its labels.
funcs, cur = {}, None
for l in lines:
    m = re.match(r'^([A-Za-z_]\w*):$', l)
    if m:
        cur = m.group(1); funcs[cur] = ({}, []); continue
    if cur and l.strip().startswith('.cfi_endproc'):
        cur = None; continue
    if cur is None:
        continue
    labels, insns = funcs[cur]
    s = l.strip()
    m = re.match(r'^(\.LBB\w+):', s)
    if m:
        labels[m.group(1)] = len(insns)
    elif s and not s.startswith(('.', '//', '@')):
        insns.append(s)

def innermost_loop(name, depth=0):
    """The shortest backward branch's loop; where the probe has none, the loop of a function of
    this file it calls (LLVM may keep a kernel out of line)."""
    labels, insns = funcs[name]
    best = None
    for i, s in enumerate(insns):
        m = re.match(r'^b(?:\.\w+)?\s+(\.LBB\w+)$|^(?:cbn?z|tbn?z)\s+.*,\s*(\.LBB\w+)$', s)
        if not m:
            continue
        t = labels.get(m.group(1) or m.group(2))
        if t is not None and t <= i and (best is None or i - t < best[1] - best[0]):
            best = (t, i)
    if best is not None:
        return insns[best[0]:best[1] + 1]
    for s in insns:
        m = re.match(r'^bl?\s+(\w+)$', s)
        if m and m.group(1) in funcs and depth < 2:
            return innermost_loop(m.group(1), depth + 1)
    return None

print(f"{'kernel':<28} {'loop insns':>10} {'SIMD/FP':>7} {'per product':>11}  (one loop: a 32-value sub-block)")
for name in funcs:
    if not re.match(r'^k\d_', name):
        continue
    loop = innermost_loop(name)
    if loop is None:
        print(f"{name:<28} {'(no loop)':>10}")
        continue
    neon = sum(1 for s in loop if re.search(r'\bv\d+\.|\bq\d+\b|\bd\d+\b|\bs\d+\b', s))
    products = 4 if '_2x2_' in name else 1
    print(f"{name:<28} {len(loop):>10} {neon:>7} {len(loop) / products:>11.2f}")
PY
