#!/usr/bin/env bash
# A manual end-to-end check of the Debian package under a real systemd (not part of CI: it
# needs root, debootstrap, systemd-nspawn and Debian's mirror). It boots a Debian bookworm
# container with systemd as PID 1, installs the package built by scripts/build-deb.sh, and checks
# what the unit promises at run time, with its whole sandbox on:
#   - the daemon starts (Type=notify: READY after the model answered; STATUS=), on ONNX Runtime
#     and on tract, and answers on the system bus;
#   - the D-Bus policy: root and a member of edgellm-clients are served (streaming too), another
#     user is refused;
#   - SIGTERM (systemctl stop) in the middle of an answer: it ends `shutdown`, exit status 0;
#   - D-Bus activation: a call to the stopped service starts it and is answered;
#   - the Jetson drop-in (systemd/jetson-cuda.conf) still starts, with the groups video, render;
#   - `systemd-analyze security` of the loaded unit.
#
# Usage: sudo scripts/try-deb-in-container.sh [ROOTFS_DIR]   (default /var/tmp/edgellm-rootfs;
#        debootstrapped on first use, reused after; the package and the model are copied anew)
# Needs: debootstrap and systemd-container (apt-get install debootstrap systemd-container), the
# release build of scripts/build-deb.sh, and the demo package (scripts/demo.sh makes it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rootfs="${1:-/var/tmp/edgellm-rootfs}"
machine=edgellm-try
fail() { echo "try-deb-in-container: $*" >&2; exit 1; }
[[ "$(id -u)" == 0 ]] || fail "needs root"
command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null \
    || fail "apt-get install debootstrap systemd-container"

deb="$(scripts/build-deb.sh)"
package=target/demo/qwen2.5-0.5b-random
[[ -f "$package/genai_config.json" ]] || fail "no $package: run scripts/demo.sh once"
ort="$(scripts/fetch-onnxruntime.sh)"

if [[ ! -e "$rootfs/etc/os-release" ]]; then
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$rootfs" \
        http://deb.debian.org/debian
fi
echo "$machine" >"$rootfs/etc/hostname"
cp "$deb" "$rootfs/root/edgellm.deb"
rm -rf "$rootfs/var/lib/edgellm/models/qwen"
mkdir -p "$rootfs/var/lib/edgellm/models" "$rootfs/usr/local/lib/edgellm"
cp -r "$package" "$rootfs/var/lib/edgellm/models/qwen"
cp "$(readlink -f "$ort")" "$rootfs/usr/local/lib/edgellm/"
chmod -R a+rX "$rootfs/var/lib/edgellm/models" "$rootfs/usr/local/lib/edgellm"
ort_name="$(basename "$(readlink -f "$ort")")"

# No systemd on the host: no machined registration, no scope unit.
systemd-nspawn -D "$rootfs" -b --machine="$machine" --register=no --keep-unit \
    >"$rootfs.console.log" 2>&1 &
nspawn=$!
trap 'kill "$nspawn" 2>/dev/null || true' EXIT
inside() {
    local pid1
    pid1="$(pgrep -P "$nspawn" | head -n 1)"
    nsenter -t "$pid1" -m -u -i -n -p -C -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
for _ in $(seq 60); do
    state="$(inside systemctl is-system-running 2>/dev/null || true)"
    [[ "$state" == running || "$state" == degraded ]] && break
    sleep 1
done
echo "container: $state"

inside dpkg -i /root/edgellm.deb
cat >"$rootfs/etc/edgellm/edgellm.toml" <<EOF
[model]
path = "/var/lib/edgellm/models/qwen"
max_length = 1024
[onnxruntime]
library = "/usr/local/lib/edgellm/$ort_name"
[mqtt]
enabled = false
EOF
inside edgellmd --check-config /etc/edgellm/edgellm.toml
ask() { inside "$@" edgellm ask --dbus --system --prompt hi --max-tokens 4 --json --timeout 120; }
ready() {
    for _ in $(seq 120); do
        [[ "$(inside systemctl show -p StatusText --value edgellmd)" == ready* ]] && return 0
        sleep 1
    done
    fail "edgellmd did not become ready: $(inside systemctl status edgellmd --no-pager)"
}

inside systemctl enable --now edgellmd
ready
echo "status: $(inside systemctl show -p StatusText --value edgellmd)"
ask >/dev/null && echo "root: served"
inside id member >/dev/null 2>&1 || inside useradd -m -G edgellm-clients member
inside id outsider >/dev/null 2>&1 || inside useradd -m outsider
ask runuser -u member -- >/dev/null && echo "member of edgellm-clients: served"
inside runuser -u member -- edgellm ask --dbus --system --prompt hi --max-tokens 4 --stream \
    >/dev/null && echo "member: streamed"
if ask runuser -u outsider -- 2>/dev/null; then fail "outsider was served"; fi
echo "outsider: refused (AccessDenied)"

inside edgellm ask --dbus --system --prompt "tell me" --max-tokens 600 --json --timeout 120 \
    >"$rootfs.long.json" &
sleep 3
inside systemctl stop edgellmd
wait $!
grep -q '"finish_reason":"shutdown"' "$rootfs.long.json" || fail "stop: $(cat "$rootfs.long.json")"
[[ "$(inside systemctl show -p ExecMainStatus --value edgellmd)" == 0 ]] || fail "exit status"
echo "stop mid-answer: finish_reason shutdown, exit status 0"
ask >/dev/null && [[ "$(inside systemctl is-active edgellmd)" == active ]] \
    && echo "D-Bus activation: started by a call and answered"

sed -i 's/^max_length = 1024$/max_length = 1024\nbackend = "tract"/' "$rootfs/etc/edgellm/edgellm.toml"
inside systemctl restart edgellmd
ready
ask >/dev/null && echo "tract: $(inside systemctl show -p StatusText --value edgellmd)"

inside install -D -m 0644 /usr/share/doc/edgellm/examples/jetson-cuda.conf \
    /etc/systemd/system/edgellmd.service.d/jetson-cuda.conf
inside groupadd -f render
inside systemctl daemon-reload
inside systemctl restart edgellmd
ready
ask >/dev/null && echo "with the Jetson drop-in: served; $(inside systemd-analyze security edgellmd | tail -n 1)"
inside rm /etc/systemd/system/edgellmd.service.d/jetson-cuda.conf
inside systemctl daemon-reload
echo "unit as shipped: $(inside systemd-analyze security edgellmd | tail -n 1)"
inside systemctl poweroff || true
wait "$nspawn" || true
trap - EXIT
echo "try-deb-in-container: all checks passed"
