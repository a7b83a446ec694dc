#!/usr/bin/env bash
# Counts the aarch64 instructions each int4/int8 dot-product kernel spends per 32-value sub-block
# (issue 16 §2: speed on real ARM hardware cannot be measured here, so count what can be
# counted). Compiles a probe crate calling edgellm_kernels::row_dot for each kernel and layout
# with --emit asm in the Debian chroot of scripts/build-aarch64.sh (which must have built the
# aarch64 release once), finds each function's innermost loop (the instructions between a
# label and the backward branch to it) and prints its length and its NEON share.
#
# Usage: sudo scripts/aarch64-kernel-insns.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
suite=${EDGELLM_DEBIAN_SUITE:-trixie}
root=$(realpath -m "${EDGELLM_DEBIAN_CHROOT:-target/debian-$suite-chroot}")
deps=target/aarch64-unknown-linux-gnu/release/deps
fail() { echo "aarch64-kernel-insns: $*" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || fail "needs root (chroot)"
rlib=$(ls -t "$deps"/libedgellm_kernels-*.rlib 2>/dev/null | head -n 1)
[[ -n "$rlib" ]] || fail "no aarch64 edgellm_kernels rlib in $deps: run sudo scripts/build-aarch64.sh first"

work=target/aarch64-kernel-insns
mkdir -p "$work"
{
    echo '#![allow(non_snake_case)]'
    echo 'use edgellm_kernels::{Kernel, QuantRow, row_dot};'
    for k in Portable Neon NeonDot; do
        for bits in 4 8; do
            for b16 in false true; do
                echo "#[unsafe(no_mangle)]
pub fn k${bits}_${k}_b16_${b16}(w: &[u8], x: &QuantRow, ws: &[f32], subs: usize) -> f32 {
    row_dot::<${bits}, ${b16}>(Kernel::${k}, w, x, ws, 0, subs)
}"
            done
        done
    done
} >"$work/probe.rs"

mounted=()
cleanup() { for m in "${mounted[@]}"; do umount "$m" || true; done; }
trap cleanup EXIT
mkdir -p "$root/src"
mountpoint -q "$root/src" || { mount --bind "$PWD" "$root/src"; mounted+=("$root/src"); }
chroot "$root" rustc --edition 2024 -C opt-level=3 --target aarch64-unknown-linux-gnu \
    --crate-type lib --emit asm -o "/src/$work/probe.s" \
    --extern "edgellm_kernels=/src/$rlib" -L "dependency=/src/$deps" "/src/$work/probe.rs"

python3 - "$work/probe.s" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
funcs, cur = {}, None
for l in lines:
    m = re.match(r'^(k\d_\w+):$', l)
    if m:
        cur = m.group(1); funcs[cur] = []; continue
    if cur and l.strip().startswith('.cfi_endproc'):
        cur = None; continue
    if cur is not None:
        funcs[cur].append(l)
print(f"{'kernel':<28} {'loop insns':>10} {'SIMD/FP':>7}  (instructions per 32-value sub-block)")
for name, body in funcs.items():
    labels, insns = {}, []
    for l in body:
        s = l.strip()
        m = re.match(r'^(\.LBB\w+):', s)
        if m:
            labels[m.group(1)] = len(insns); continue
        if not s or s.startswith(('.', '//', '@')):
            continue
        insns.append(s)
    # Innermost loop: the shortest backward branch.
    best = None
    for i, s in enumerate(insns):
        m = re.match(r'^b(?:\.\w+)?\s+(\.LBB\w+)$|^(?:cbn?z|tbn?z)\s+.*,\s*(\.LBB\w+)$', s)
        if not m:
            continue
        t = labels.get(m.group(1) or m.group(2))
        if t is not None and t <= i and (best is None or i - t < best[1] - best[0]):
            best = (t, i)
    if best is None:
        print(f"{name:<28} {'(no loop)':>10}")
        continue
    loop = insns[best[0]:best[1] + 1]
    neon = sum(1 for s in loop if re.search(r'\bv\d+\.|\bq\d+\b|\bd\d+\b|\bs\d+\b', s))
    print(f"{name:<28} {len(loop):>10} {neon:>7}")
PY
