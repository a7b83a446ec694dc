#!/usr/bin/env bash
# bitbake parse check of meta-edgellm (issue 16 §3), no source downloads:
#  1. clones bitbake and openembedded-core at the series' branches (shallow, once, into
#     $YOCTO_PARSE_DIR, default target/yocto-parse);
#  2. makes a build folder with OE-core's meta and meta-edgellm, MACHINE qemuarm64, systemd,
#     BB_NO_NETWORK = "1", and the recipes pinned the way a distro pins them (this checkout as
#     EDGELLM_GIT_URI, SRCREV = its HEAD; a fixed revision for the model checkpoint);
#  3. `bitbake -p`: every recipe of both layers parses;
#  4. `bitbake -e edgellm`: the expanded recipe, from which it checks the values that matter
#     (the cargo class, the source folder the git fetcher unpacks into, the Rust OE-core brings
#     against edgellm's minimum, the unit and the runtime dependencies) and keeps the whole in
#     the build folder (edgellm.env; beside parse.log and graph.log);
#  5. `bitbake -g` for edgellm, edgellm-export-native and the image: every build and runtime
#     dependency resolves within OE-core alone (meta-networking's mosquitto-clients comes in
#     through a dynamic-layers bbappend only when that layer is there).
#
# Usage: scripts/check-yocto-parse.sh [SERIES] [--kas-layers]
#   SERIES: wrynose (default) | master
#   --kas-layers (wrynose): also the layers of yocto/kas/raspberrypi5.yml (meta-poky with
#     DISTRO poky, meta-oe, meta-python, meta-networking, meta-onnxruntime, meta-raspberrypi;
#     MACHINE raspberrypi5), so the dynamic-layers bbappends are parsed and applied too: the
#     expanded recipes must then show onnxruntime and mosquitto-clients.
# The public repositories by default; point OE_CORE_URL, BITBAKE_URL, META_YOCTO_URL,
# META_OE_URL, META_ONNXRUNTIME_URL, META_RASPBERRYPI_URL at mirrors (any git URL or path).
# Not in CI: CI reaches the package registries only, not the git servers.
# Needs OE-core's host tools (Debian: apt-get install build-essential chrpath cpio diffstat
# file gawk git locales lz4 python3 wget xz-utils zstd) and the en_US.UTF-8 locale; bitbake
# refuses root, so as root it runs as the user edgellm-yocto (created if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

series=${1:-wrynose}
kas=0
[[ "${2:-}" != --kas-layers ]] || kas=1
case "$series" in
    wrynose) bitbake_branch=2.18 ;;
    master) bitbake_branch=master ;;
    *) echo "check-yocto-parse: unknown series '$series' (wrynose | master)" >&2; exit 2 ;;
esac
oe_core_url=${OE_CORE_URL:-https://git.openembedded.org/openembedded-core}
bitbake_url=${BITBAKE_URL:-https://git.openembedded.org/bitbake}
work=$(realpath -m "${YOCTO_PARSE_DIR:-target/yocto-parse}")/$series
((kas == 0)) || [[ "$series" == wrynose ]] || { echo "check-yocto-parse: --kas-layers is for wrynose, the kas files' series" >&2; exit 2; }
user=edgellm-yocto

missing=()
for tool in chrpath cpio diffstat file gawk gcc g++ git lz4c make patch perl python3 rpcgen wget xz zstd pzstd; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
((${#missing[@]} == 0)) || {
    echo "check-yocto-parse: OE-core's host tools are missing: ${missing[*]}" >&2
    exit 1
}
locale -a | grep -qi '^en_US\.utf-\?8$' || {
    echo "check-yocto-parse: the en_US.UTF-8 locale is missing (Debian: enable it in /etc/locale.gen, run locale-gen)" >&2
    exit 1
}

mkdir -p "$work"
clone() { # URL BRANCH DIR
    if [[ ! -d "$3/.git" ]]; then
        git clone --quiet --depth 1 --single-branch --branch "$2" "$1" "$3.part"
        mv "$3.part" "$3"
    fi
    echo "check-yocto-parse: $(basename "$3") $2 at $(git -C "$3" log -1 --format='%h (%cs)')"
}
clone "$bitbake_url" "$bitbake_branch" "$work/bitbake"
clone "$oe_core_url" "$series" "$work/openembedded-core"
layers="$work/openembedded-core/meta $repo/yocto/meta-edgellm"
machine=qemuarm64
distro=nodistro
if ((kas)); then
    clone "${META_YOCTO_URL:-https://git.yoctoproject.org/meta-yocto}" wrynose "$work/meta-yocto"
    clone "${META_OE_URL:-https://git.openembedded.org/meta-openembedded}" wrynose "$work/meta-openembedded"
    clone "${META_ONNXRUNTIME_URL:-https://github.com/NobuoTsukamoto/meta-onnxruntime}" main "$work/meta-onnxruntime"
    clone "${META_RASPBERRYPI_URL:-https://git.yoctoproject.org/meta-raspberrypi}" wrynose "$work/meta-raspberrypi"
    layers+=" $work/meta-yocto/meta-poky $work/meta-openembedded/meta-oe $work/meta-openembedded/meta-python"
    layers+=" $work/meta-openembedded/meta-networking $work/meta-onnxruntime $work/meta-raspberrypi"
    machine=raspberrypi5
    distro=poky
fi

rev=$(git rev-parse HEAD)
branch=$(git rev-parse --abbrev-ref HEAD)
[[ "$branch" != HEAD ]] || branch=main
build=$work/build
((kas == 0)) || build+=-kas
rm -rf "$build"
mkdir -p "$build/conf"
cat >"$build/conf/bblayers.conf" <<EOF
LCONF_VERSION = "7"
BBPATH = "\${TOPDIR}"
BBFILES ?= ""
BBLAYERS = "$layers"
EOF
cat >"$build/conf/local.conf" <<EOF
CONF_VERSION = "2"
MACHINE = "$machine"
DISTRO = "$distro"
INIT_MANAGER = "systemd"
BB_NO_NETWORK = "1"
# Pinned as a distro pins them (AUTOREV needs the network at parse time).
EDGELLM_GIT_URI = "git://$repo;protocol=file;branch=$branch"
SRCREV:pn-edgellm = "$rev"
SRCREV:pn-edgellm-export = "$rev"
SRCREV:pn-edgellm-export-native = "$rev"
# Any fixed revision: the check fetches nothing.
SRCREV:pn-edgellm-model-qwen2.5-0.5b-instruct = "0000000000000000000000000000000000000000"
EOF
if ((kas)); then
    # The kas files' own local.conf lines (local_conf_header), read with kas's YAML library from
    # scripts/check-yocto.sh's virtual environment.
    [[ -x .venv-yocto/bin/python ]] || scripts/check-yocto.sh >/dev/null
    .venv-yocto/bin/python - yocto/kas/common.yml yocto/kas/raspberrypi5.yml >>"$build/conf/local.conf" <<'PY'
import sys, yaml
for path in sys.argv[1:]:
    for name, text in (yaml.safe_load(open(path)).get("local_conf_header") or {}).items():
        print(f"# {path}: {name}\n{text}")
PY
fi

bb() { # bitbake ARGS..., from the build folder, as an unprivileged user when root
    local cmd
    cmd="cd '$build' && export LANG=en_US.UTF-8 LC_ALL=en_US.UTF-8 \
        PATH='$work/bitbake/bin':\$PATH BBPATH='$build' && bitbake $*"
    if ((EUID == 0)); then
        id "$user" >/dev/null 2>&1 || useradd --system --create-home "$user"
        chown -R "$user:" "$build"
        runuser -u "$user" -- bash -c "$cmd"
    else
        bash -c "$cmd"
    fi
}

start=$(date +%s)
bb -p >"$build/parse.log" 2>&1 || { cat "$build/parse.log"; echo "check-yocto-parse: bitbake -p failed" >&2; exit 1; }
grep -E '^(Parsing of|NOTE: Resolving|ERROR|WARNING)' "$build/parse.log" | sed 's/^/  /' || true
echo "check-yocto-parse: bitbake -p ($series): every recipe parsed in $(($(date +%s) - start)) s"

bb -e edgellm >"$build/edgellm.env" 2>&1 || { tail -40 "$build/edgellm.env"; echo "check-yocto-parse: bitbake -e edgellm failed" >&2; exit 1; }
var() { sed -n "s/^$1=\"\(.*\)\"$/\1/p" "$build/edgellm.env" | tail -1; }
fail=0
expect() { # NAME VALUE CONDITION-TEXT OK
    printf '  %-34s %s\n' "$1" "$2"
    [[ "$4" == 1 ]] || { echo "check-yocto-parse: $1: expected $3" >&2; fail=1; }
}
pv=$(var PV); src=$(var S); unpack=$(var UNPACKDIR); bp=$(var BP)
rust=$(var RUSTVERSION); rust=${rust%\%}; min=$(var EDGELLM_MIN_RUST)
expect PV "$pv" "0.1.0+git..." "$([[ "$pv" == 0.1.0+git* ]] && echo 1)"
expect S "$src" "the git fetcher's destination, \${UNPACKDIR}/\${BP}" "$([[ "$src" == "$unpack/$bp" ]] && echo 1)"
expect RUSTVERSION "$rust" ">= EDGELLM_MIN_RUST ($min)" \
    "$([[ -n "$rust" && "$(printf '%s\n%s\n' "$min" "$rust" | sort -V | head -n 1)" == "$min" ]] && echo 1)"
expect 'SYSTEMD_SERVICE:edgellm' "$(var 'SYSTEMD_SERVICE:edgellm')" edgellmd.service \
    "$([[ "$(var 'SYSTEMD_SERVICE:edgellm')" == edgellmd.service ]] && echo 1)"
expect 'RDEPENDS:edgellm' "$(var 'RDEPENDS:edgellm' | xargs)" "dbus in it" \
    "$([[ " $(var 'RDEPENDS:edgellm') " == *" dbus "* ]] && echo 1)"
if ((kas)); then
    expect 'RDEPENDS:edgellm (kas)' "$(var 'RDEPENDS:edgellm' | xargs)" "onnxruntime in it (meta-onnxruntime's bbappend)" \
        "$([[ " $(var 'RDEPENDS:edgellm') " == *" onnxruntime "* ]] && echo 1)"
    bb -e packagegroup-edgellm >"$build/packagegroup.env" 2>&1 || { tail -40 "$build/packagegroup.env"; exit 1; }
    rrec=$(sed -n 's/^RRECOMMENDS:packagegroup-edgellm="\(.*\)"$/\1/p' "$build/packagegroup.env" | tail -1)
    expect 'RRECOMMENDS:packagegroup-edgellm' "$(xargs <<<"$rrec")" "mosquitto-clients in it (the networking-layer bbappend)" \
        "$([[ " $rrec " == *" mosquitto-clients "* ]] && echo 1)"
fi
expect CARGO_BUILD_FLAGS "$(var CARGO_BUILD_FLAGS | xargs)" "--locked" \
    "$([[ "$(var CARGO_BUILD_FLAGS)" == *--locked* ]] && echo 1)"
grep -q '^do_compile()' "$build/edgellm.env" && grep -q 'cargo_do_compile' "$build/edgellm.env" ||
    { echo "check-yocto-parse: the cargo class's do_compile is not in the expanded recipe" >&2; fail=1; }
((fail == 0)) || exit 1
echo "check-yocto-parse: bitbake -e edgellm: as expected (whole: $build/edgellm.env)"

bb -g edgellm edgellm-export-native edgellm-image >"$build/graph.log" 2>&1 ||
    { tail -40 "$build/graph.log"; echo "check-yocto-parse: bitbake -g failed" >&2; exit 1; }
echo "check-yocto-parse: bitbake -g edgellm edgellm-export-native edgellm-image:" \
    "$(wc -l <"$build/task-depends.dot") task-graph lines, every dependency resolved"
