#!/usr/bin/env bash
# Build the Debian package (cargo-deb) for this machine's architecture, or for
# `--target TRIPLE` (e.g. aarch64-unknown-linux-gnu, with a cross toolchain set up as
# cargo-deb's README describes), and print its path.
#
#   scripts/build-deb.sh [--target TRIPLE] [--profile PROFILE] [--no-build] [--variant NAME]
#
# `--variant NAME`: a [package.metadata.deb.variants.NAME] of daemon/Cargo.toml (cross-arm64:
# the dependencies of the cross-built arm64 package).
#
# `--no-build` packages binaries already built (scripts/build-aarch64.sh cross-builds them in a
# Debian chroot, since rustup cannot fetch an aarch64 standard library here).
#
# `--profile dev` packages the binaries `cargo test` already built (target/debug): CI uses it to
# check the packaging (contents, maintainer scripts, install and purge) without a second
# 14-minute build of the whole dependency tree; what users install is the default, release.
# (cargo-deb 3.8 warns that it may refuse dev profiles one day: it is pinned, see below.)
#
# Installs cargo-deb (pinned, from crates.io) when it is missing. The package holds edgellmd,
# edgellm and edgellm-export (release, stripped) and systemd/ verbatim; its metadata is
# [package.metadata.deb] in daemon/Cargo.toml.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo_deb_version=3.8.0
target_args=()
profile=release
build=1
variant_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --target) target_args=(--target "${2:?--target needs a triple}"); shift 2 ;;
    --profile) profile="${2:?--profile needs a name}"; shift 2 ;;
    --no-build) build=0; shift ;;
    --variant) variant_args=(--variant "${2:?--variant needs a name}"); shift 2 ;;
    *) echo "usage: scripts/build-deb.sh [--target TRIPLE] [--profile PROFILE] [--no-build] [--variant NAME]" >&2; exit 2 ;;
    esac
done

if ! cargo deb --version 2>/dev/null | grep -q "$cargo_deb_version"; then
    cargo install cargo-deb --locked --version "$cargo_deb_version" >&2
fi

# The package's three binaries come from two crates: build both, then package without a rebuild.
((build == 0)) || cargo build --profile "$profile" --locked "${target_args[@]}" -p edgellm -p edgellm-export >&2
cargo deb -p edgellm --no-build --profile "$profile" --strip --no-separate-debug-symbols \
    "${target_args[@]}" "${variant_args[@]}" \
    | tail -n 1
