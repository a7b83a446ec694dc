# shellcheck shell=bash disable=SC2154  # venv, python, pins and log come from the sourcing script
# Pinned Python venvs, shared by scripts/setup-bench-venv.sh and scripts/setup-ref-venv.sh
# (sourced, not run). The sourcing script sets `venv`, `python`, `pins` (an array of NAME==VERSION)
# and defines `log`.

# True when every pin is installed at exactly its version (local labels like +cpu are accepted).
pins_satisfied() {
    [[ -x "$venv/bin/python" ]] || return 1
    "$venv/bin/python" - "${pins[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != want:
        sys.exit(1)
PY
}

# install_pins INDEX_URL [--upgrade-pip]: creates $venv with $python when missing (and upgrades
# its pip with --upgrade-pip), then installs the pins (INDEX_URL, when not empty, is an extra
# package index for torch) and checks that they landed.
install_pins() {
    local index_url="$1" upgrade="${2:-}"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating $venv with $python"
        "$python" -m venv "$venv" || {
            log "'$python -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
            exit 1
        }
    fi
    local pip=("$venv/bin/python" -m pip --disable-pip-version-check) extra=()
    [[ "$upgrade" != --upgrade-pip ]] || "${pip[@]}" install --quiet --upgrade pip >&2
    [[ -z "$index_url" ]] || extra=(--extra-index-url "$index_url")
    log "installing ${pins[*]}"
    "${pip[@]}" install ${extra[@]+"${extra[@]}"} "${pins[@]}" >&2
    pins_satisfied || { log "installed versions do not match the pins (see pip output above)"; exit 1; }
}
