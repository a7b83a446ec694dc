#!/usr/bin/env bash
# Cross-builds edgellm for aarch64-unknown-linux-gnu (release: edgellmd, edgellm,
# edgellm-export) and its arm64 Debian package (issue 16 §1), using only the package
# registries.
#
# rustup cannot fetch an aarch64 standard library here, but Debian carries rustc, cargo and the
# arm64 standard library of one version, and gcc-aarch64-linux-gnu to link: Debian 13 (trixie,
# stable) as rustc-web/cargo-web/libstd-rust-web-dev 1.96, sid as rustc/cargo/libstd-rust-dev
# (1.97 today). So: a Debian chroot ($EDGELLM_DEBIAN_SUITE, default trixie: a stable release
# does not break CI the way sid's migrations can; debootstrap, made once in
# $EDGELLM_DEBIAN_CHROOT, default target/debian-<suite>-chroot), this checkout bind-mounted at
# /src and the host's cargo registry at /root/.cargo/registry (the crates are fetched on the
# host, `cargo fetch --locked`, and the chroot builds --offline; its TLS cannot reach the
# registry proxy).
# The binaries land where cargo puts them: target/aarch64-unknown-linux-gnu/release/.
#
# glibc: the binaries must load on a 64-bit Raspberry Pi OS (bookworm, glibc 2.36) and JetPack 6
# (Ubuntu 22.04, glibc 2.35). The script lists the glibc symbol versions the binaries need and
# fails if any is newer than $EDGELLM_MAX_GLIBC (default 2.35), naming the symbols.
#
# Usage: sudo scripts/build-aarch64.sh [--no-deb] [--unit-tests] [--kernels-only]
#   --unit-tests: also the unit tests of the edgellm library and of edgellm-kernels
#   (target/aarch64-unknown-linux-gnu/release/edgellm-unit-tests, edgellm-kernels-tests), which
#   scripts/test-aarch64-qemu.sh runs on each CPU model.
#   --kernels-only: only edgellm-kernels' unit tests (seconds to build; what CI runs).
# Needs: root (chroot, mount), debootstrap (apt-get install debootstrap). Prints the .deb's path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

triple=aarch64-unknown-linux-gnu
suite=${EDGELLM_DEBIAN_SUITE:-trixie}
root=$(realpath -m "${EDGELLM_DEBIAN_CHROOT:-target/debian-$suite-chroot}")
max_glibc=${EDGELLM_MAX_GLIBC:-2.35}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
fail() { echo "build-aarch64: $*" >&2; exit 1; }
deb=1 unit_tests=0 kernels_only=0
for arg in "$@"; do
    case "$arg" in
        --no-deb) deb=0 ;;
        --unit-tests) unit_tests=1 ;;
        --kernels-only) kernels_only=1 ;;
        *) fail "unknown argument $arg (usage: build-aarch64.sh [--no-deb] [--unit-tests] [--kernels-only])" ;;
    esac
done
[[ "$(id -u)" == 0 ]] || fail "needs root (chroot and bind mounts)"
command -v debootstrap >/dev/null || fail "apt-get install debootstrap"

case "$suite" in
    trixie) rust=(rustc-web cargo-web libstd-rust-web-dev:arm64) ;;
    sid | unstable) rust=(rustc cargo libstd-rust-dev:arm64) ;;
    *) fail "EDGELLM_DEBIAN_SUITE=$suite: trixie or sid (the suites with Rust >= 1.92 for arm64)" ;;
esac
# sid's Release files can be older than apt's validity window on a registry mirror.
apt_opts=(-o Acquire::Check-Valid-Until=false -q)
if [[ ! -x "$root/usr/bin/aarch64-linux-gnu-gcc" ]]; then
    [[ -e "$root/etc/os-release" ]] ||
        debootstrap --variant=minbase --include=ca-certificates "$suite" "$root" "$mirror" >&2
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" dpkg --add-architecture arm64
    chroot "$root" apt-get "${apt_opts[@]}" update >&2
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y \
        --no-install-recommends "${rust[@]}" gcc gcc-aarch64-linux-gnu \
        libc6-dev-arm64-cross binutils-aarch64-linux-gnu >&2
fi
echo "build-aarch64: $(chroot "$root" rustc --version), $(chroot "$root" aarch64-linux-gnu-gcc --version | head -n 1)" >&2

mounted=()
bind() { # HOST_DIR CHROOT_DIR
    mkdir -p "$root$2"
    mountpoint -q "$root$2" || { mount --bind "$1" "$root$2"; mounted+=("$root$2"); }
}
cleanup() { for m in "${mounted[@]}"; do umount "$m" || true; done; }
trap cleanup EXIT
cargo fetch --locked >&2
bind "$PWD" /src
bind "${CARGO_HOME:-$HOME/.cargo}/registry" /root/.cargo/registry
mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; mounted+=("$root/proc"); }

# glibc 2.36's arm64 cross files (Debian bookworm's libc6-dev-arm64-cross and friends) as the
# sysroot the binaries link against, not the chroot's own glibc (trixie 2.41, sid 2.43: glibc
# 2.43 re-versioned libm's asinf, acosf, coshf, sinhf, acoshf and log10f, and binaries linked
# against it need GLIBC_2.43). A wrapper named like the cross gcc, first in PATH, puts these
# files ahead of the chroot's: -B for the startup files, -L for libc and libm, -isystem for
# headers (tract-linalg's assembly kernels are the only C-compiler input; the check below would
# catch a newer symbol).
sysroot_rel=target/aarch64-glibc-${EDGELLM_SYSROOT_GLIBC:-2.36}
if [[ ! -e "$sysroot_rel/usr/aarch64-linux-gnu/lib/libc.so.6" ]]; then
    debs=$(mktemp -d)
    curl -fsSL "$mirror/dists/bookworm/main/binary-all/Packages.xz" | xz -d >"$debs/Packages" ||
        fail "cannot read bookworm's package index at $mirror"
    for p in libc6-arm64-cross libc6-dev-arm64-cross linux-libc-dev-arm64-cross libgcc-s1-arm64-cross \
        libstdc++6-arm64-cross; do
        url=$(awk -v p="$p" '$1 == "Package:" { hit = ($2 == p) } hit && $1 == "Filename:" { print $2; exit }' "$debs/Packages")
        [[ -n "$url" ]] || fail "$p is not in bookworm's binary-all index at $mirror"
        curl -fsSL -o "$debs/$p.deb" "$mirror/$url" || fail "cannot download $mirror/$url"
    done
    mkdir -p "$sysroot_rel"
    for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$sysroot_rel"; done
    rm -rf "$debs"
    # The same files as a root for `qemu-aarch64 -L` (its loader is /lib/ld-linux-aarch64.so.1;
    # libstdc++ is there for ONNX Runtime): scripts/test-aarch64-qemu.sh.
    ln -sfn usr/aarch64-linux-gnu/lib "$sysroot_rel/lib"
fi
lib=/src/$sysroot_rel/usr/aarch64-linux-gnu/lib
# libc.so is a linker script naming its libraries by absolute path: point it into the sysroot.
sed -i "s|\([ (]\)/usr/aarch64-linux-gnu/lib/|\1$lib/|g" "$sysroot_rel/usr/aarch64-linux-gnu/lib/libc.so"
mkdir -p "$sysroot_rel/bin"
cat >"$sysroot_rel/bin/aarch64-linux-gnu-gcc" <<WRAP
#!/bin/sh
exec /usr/bin/aarch64-linux-gnu-gcc -B$lib -L$lib -isystem /src/$sysroot_rel/usr/aarch64-linux-gnu/include "\$@"
WRAP
chmod +x "$sysroot_rel/bin/aarch64-linux-gnu-gcc"

in_chroot() { # COMMAND: run in /src of the chroot with the cross toolchain
    chroot "$root" env PATH="/src/$sysroot_rel/bin:/usr/local/bin:/usr/bin:/bin" \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
        bash -c "cd /src && $1"
}
# A test executable of package $1 (release, --lib), copied to target/$triple/release/$2.
build_tests() {
    local start exe
    start=$(date +%s)
    exe=$(in_chroot "cargo test --offline --release --locked --target $triple -p $1 --lib --no-run --message-format=json" |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
    [[ -n "$exe" ]] || fail "cargo test --no-run -p $1 named no test executable"
    cp "${exe/#\/src\//}" "target/$triple/release/$2"
    echo "build-aarch64: $1's unit tests built in $(($(date +%s) - start)) s: target/$triple/release/$2" >&2
}
mkdir -p "target/$triple/release"
if ((kernels_only)); then
    build_tests edgellm-kernels edgellm-kernels-tests
    exit 0
fi
start=$(date +%s)
in_chroot "cargo build --offline --release --locked --target $triple -p edgellm -p edgellm-export" >&2
echo "build-aarch64: built in $(($(date +%s) - start)) s: target/$triple/release/{edgellmd,edgellm,edgellm-export}" >&2
if ((unit_tests)); then
    # The edgellm library's unit tests (the tract backend among them), for qemu.
    build_tests edgellm edgellm-unit-tests
    build_tests edgellm-kernels edgellm-kernels-tests
fi

# The glibc symbol versions each binary needs.
worst=0
for bin in edgellmd edgellm edgellm-export; do
    f=target/$triple/release/$bin
    file "$f" | grep -q 'ARM aarch64' || fail "$f is not an aarch64 binary: $(file "$f")"
    versions=$(chroot "$root" aarch64-linux-gnu-objdump -T "/src/$f" | grep -o 'GLIBC_[0-9.]*' | sort -uV)
    newest=$(tail -n 1 <<<"$versions")
    list=$(tr '\n' ' ' <<<"$versions")
    echo "build-aarch64: $bin needs glibc ${newest#GLIBC_} (versions: $list)" >&2
    too_new=$(chroot "$root" aarch64-linux-gnu-objdump -T "/src/$f" | awk -v max="$max_glibc" '
        match($0, /GLIBC_[0-9.]+/) {
            v = substr($0, RSTART + 6, RLENGTH - 6); split(v, a, "."); split(max, m, ".")
            if (a[1] > m[1] || (a[1] == m[1] && a[2] + 0 > m[2] + 0)) print $NF "@GLIBC_" v
        }')
    [[ -z "$too_new" ]] || { echo "build-aarch64: $bin needs symbols newer than glibc $max_glibc: $too_new" >&2; worst=1; }
done
((worst == 0)) || fail "the binaries would not load on glibc $max_glibc"

((deb)) || exit 0
command -v aarch64-linux-gnu-strip >/dev/null ||
    fail "apt-get install binutils-aarch64-linux-gnu (cargo-deb strips with it)"
scripts/build-deb.sh --target "$triple" --no-build --variant cross-arm64
