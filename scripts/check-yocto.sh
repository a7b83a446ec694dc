#!/usr/bin/env bash
# Offline checks of yocto/ (CI runs them; nothing here needs bitbake or the network beyond
# PyPI for the tools):
#  1. edgellm-crates.inc is in sync with Cargo.lock (scripts/yocto-crates.py --check);
#  2. oelint-adv (PyPI) on every recipe, bbappend and inc, once per release series that
#     conf/layer.conf declares: no errors (warnings are printed);
#  3. the kas files validate against kas's own configuration schema.
# The tools go into .venv-yocto/ (ignored by git), pinned.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

oelint_version=9.11.2
kas_version=5.5
venv=.venv-yocto
if [[ ! -x "$venv/bin/oelint-adv" ]] || ! "$venv/bin/oelint-adv" --version | grep -q "$oelint_version" \
    || ! "$venv/bin/python" -c "import kas, sys; sys.exit(kas.__version__ != '$kas_version')" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "oelint_adv==$oelint_version" "kas==$kas_version" jsonschema
fi

scripts/yocto-crates.py --check

layer=yocto/meta-edgellm
mapfile -t files < <(find "$layer" \( -name '*.bb' -o -name '*.bbappend' -o -name '*.inc' \) | sort)
series=$(sed -n 's/^LAYERSERIES_COMPAT_edgellm = "\(.*\)"/\1/p' "$layer/conf/layer.conf")
[[ -n "$series" ]] || { echo "check-yocto: no LAYERSERIES_COMPAT_edgellm in layer.conf" >&2; exit 1; }
errors=0
for release in $series; do
    # homepageping makes HTTP requests; the rest is offline.
    out=$("$venv/bin/oelint-adv" --quiet --release "$release" --suppress oelint.vars.homepageping \
        --hide info --mode all --exit-zero "${files[@]}" 2>&1)
    n=$(grep -c ':error:' <<<"$out" || true)
    echo "check-yocto: oelint-adv --release $release on ${#files[@]} files: $n errors, $(grep -c ':warning:' <<<"$out" || true) warnings"
    [[ -z "$out" ]] || sed 's/^/  /' <<<"$out"
    errors=$((errors + n))
done
((errors == 0)) || { echo "check-yocto: oelint-adv found $errors errors" >&2; exit 1; }

"$venv/bin/python" - yocto/kas/*.yml <<'PY'
import sys, yaml, jsonschema
from kas.configschema import CONFIGSCHEMA
for path in sys.argv[1:]:
    with open(path) as f:
        jsonschema.validate(yaml.safe_load(f), CONFIGSCHEMA)
    print(f"check-yocto: {path}: valid kas configuration")
PY
