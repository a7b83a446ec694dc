#!/usr/bin/env bash
# Check the Debian package that scripts/build-deb.sh built: control fields, every file it must
# install (systemd/ byte for byte), conffiles, the generated maintainer scripts, and that the
# packaged binaries run. With --install (root; CI does it on its throwaway machine): install
# it with dpkg, check the user, groups, folders, config and unit on the real system, then
# remove and purge it.
#
#   scripts/check-deb.sh PACKAGE.deb [--install]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deb="${1:?usage: scripts/check-deb.sh PACKAGE.deb [--install]}"
install="${2:-}"
fail() { echo "check-deb: $*" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

field() { dpkg-deb -f "$deb" "$1"; }
[[ "$(field Package)" == edgellm ]] || fail "Package is $(field Package)"
arch="$(field Architecture)"
case "$arch" in amd64 | arm64) ;; *) fail "Architecture $arch: expected amd64 or arm64" ;; esac
[[ "$(field Depends)" == *libc6* && "$(field Depends)" == *systemd* ]] \
    || fail "Depends: $(field Depends)"
[[ "$(field Recommends)" == *dbus* ]] || fail "Recommends: $(field Recommends)"

dpkg-deb -x "$deb" "$tmp/root"
dpkg-deb -e "$deb" "$tmp/control"

# systemd/ verbatim, at the paths DESIGN.md and the unit name.
same() { cmp -s "systemd/$1" "$tmp/root/$2" || fail "$2 is not systemd/$1"; }
same edgellmd.service usr/lib/systemd/system/edgellmd.service
same edgellm.toml etc/edgellm/edgellm.toml
same dbus/org.edgellm.Inference1.conf usr/share/dbus-1/system.d/org.edgellm.Inference1.conf
same dbus/org.edgellm.Inference1.service usr/share/dbus-1/system-services/org.edgellm.Inference1.service
same edgellm.sysusers usr/lib/sysusers.d/edgellm.conf
same edgellmd.tmpfile usr/lib/tmpfiles.d/edgellmd.conf
same jetson-cuda.conf usr/share/doc/edgellm/examples/jetson-cuda.conf
for bin in edgellmd edgellm edgellm-export; do
    [[ -x "$tmp/root/usr/bin/$bin" ]] || fail "usr/bin/$bin missing or not executable"
done
[[ -f "$tmp/root/usr/share/doc/edgellm/copyright" ]] || fail "no copyright file"

# /etc/edgellm/edgellm.toml is a conffile (local edits survive upgrades), nothing else is.
[[ "$(cat "$tmp/control/conffiles")" == /etc/edgellm/edgellm.toml ]] \
    || fail "conffiles: $(cat "$tmp/control/conffiles")"
# postinst creates the user and groups from the installed sysusers.d file, then the folders.
grep -q 'systemd-sysusers .* edgellm.conf' "$tmp/control/postinst" || fail "postinst runs no sysusers"
grep -q 'systemd-tmpfiles --create edgellmd.conf' "$tmp/control/postinst" || fail "postinst runs no tmpfiles"
grep -q 'deb-systemd-helper' "$tmp/control/postinst" || fail "postinst does not register the unit"
grep -q 'deb-systemd-invoke stop' "$tmp/control/prerm" || fail "prerm does not stop the unit"
# Installed, not enabled or started (there is no model yet): postinst only re-enables a unit
# the admin had enabled before an upgrade, and starts nothing.
[[ "$(grep -c 'deb-systemd-helper enable' "$tmp/control/postinst")" == 1 ]] \
    && grep -q 'was-enabled' "$tmp/control/postinst" || fail "postinst enables the unit"
! grep -q 'deb-systemd-invoke start' "$tmp/control/postinst" || fail "postinst starts the unit"

# The packaged binaries run here when the package is for this machine.
if [[ "$arch" == "$(dpkg --print-architecture)" ]]; then
    "$tmp/root/usr/bin/edgellmd" --check-config "$tmp/root/etc/edgellm/edgellm.toml" >/dev/null
    "$tmp/root/usr/bin/edgellm" --version >/dev/null
    "$tmp/root/usr/bin/edgellm-export" --version >/dev/null
fi
echo "check-deb: $deb ($arch): contents ok"

[[ "$install" == --install ]] || exit 0
[[ "$(id -u)" == 0 ]] || fail "--install needs root"
if dpkg -s edgellm >/dev/null 2>&1; then
    fail "edgellm is already installed on this machine: not touching it"
fi
dpkg -i "$deb"
getent passwd edgellm >/dev/null || fail "no user edgellm after install"
getent group edgellm-clients >/dev/null || fail "no group edgellm-clients after install"
[[ "$(getent passwd edgellm | cut -d: -f6)" == /var/lib/edgellm ]] || fail "edgellm's home"
# At boot systemd-tmpfiles-setup creates the folders; without a running systemd, do it here.
systemd-tmpfiles --create edgellmd.conf
[[ "$(stat -c %U:%G:%a /var/lib/edgellm)" == edgellm:edgellm:750 ]] \
    || fail "/var/lib/edgellm: $(stat -c %U:%G:%a /var/lib/edgellm)"
/usr/bin/edgellmd --check-config /etc/edgellm/edgellm.toml
systemd-analyze verify --man=no /usr/lib/systemd/system/edgellmd.service
dpkg -r edgellm
[[ -f /etc/edgellm/edgellm.toml && ! -e /usr/bin/edgellmd ]] || fail "remove: conffile should stay, binaries go"
dpkg --purge edgellm
[[ ! -e /etc/edgellm/edgellm.toml ]] || fail "purge left /etc/edgellm/edgellm.toml"
echo "check-deb: installed, checked, removed and purged"
