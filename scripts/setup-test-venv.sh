#!/usr/bin/env bash
# Create the Python venv the HTTP tests drive edgellmd with: the official `openai` and `ollama`
# clients and `prometheus_client` (its OpenMetrics parser reads /metrics), and the reference
# validators the structured-output tests check answers with (`jsonschema`, `lark`), pinned. The tests
# find it through EDGELLM_TEST_PYTHON, which scripts/test.sh sets from this script's output.
#
# Usage: scripts/setup-test-venv.sh
# Environment:
#   TEST_VENV   venv folder (default: <repo>/.venv-test, gitignored by /.venv*)
#   PYTHON      interpreter to create it with (default: python3)
#
# Idempotent: when the venv already has exactly these versions it prints its python and exits
# without touching the network. Prints the venv's python path on stdout (everything else: stderr).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TEST_VENV:-$root/.venv-test}"
python="${PYTHON:-python3}"

case "${1:-}" in
    -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "setup-test-venv: unknown argument: $1" >&2; exit 2 ;;
esac

pins=(
    "openai==3.57.0"
    "ollama==0.6.3"
    "prometheus-client==0.26.0"
    "jsonschema==4.26.0"
    "lark==1.3.1"
    # scripts/soak.sh: its MQTT clients and its RSS plot.
    "paho-mqtt==2.2.0"
    "matplotlib==3.10.9"
)

log() { echo "setup-test-venv: $*" >&2; }

# shellcheck source=scripts/venv-lib.sh
source "$root/scripts/venv-lib.sh"

if pins_satisfied; then
    echo "$venv/bin/python"
    exit 0
fi
command -v "$python" >/dev/null || { log "'$python' not found (set PYTHON=/path/to/python3)"; exit 1; }
install_pins ""
"$venv/bin/python" -c 'import openai, ollama, prometheus_client, jsonschema, lark, paho.mqtt, matplotlib' || { log "import check failed"; exit 1; }
log "ready: $venv"
echo "$venv/bin/python"
