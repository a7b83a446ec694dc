#!/usr/bin/env python3
"""Write yocto/meta-edgellm/recipes-ai/edgellm/edgellm-crates.inc from Cargo.lock.

Every crates.io package of Cargo.lock becomes a `crate://` entry of SRC_URI with its sha256
checksum, as OE-core's cargo-update-recipe-crates class (`bitbake -c update_crates edgellm`)
writes it, so the recipe fetches exactly the locked crates and builds offline with --locked.
A dependency from any other source (git, path outside the workspace) is an error: the recipe
could not fetch it.

    scripts/yocto-crates.py           rewrite the .inc
    scripts/yocto-crates.py --check   exit 1 if the .inc is out of sync with Cargo.lock (CI)
"""

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "Cargo.lock"
INC = ROOT / "yocto/meta-edgellm/recipes-ai/edgellm/edgellm-crates.inc"
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"


def render() -> str:
    lock = tomllib.loads(LOCK.read_text())
    crates = []
    for pkg in lock["package"]:
        source = pkg.get("source")
        if source is None:
            continue  # a workspace member, built from the recipe's own source
        if source != CRATES_IO:
            sys.exit(f"yocto-crates: {pkg['name']} {pkg['version']} comes from {source}: "
                     "only crates.io packages can be fetched by the recipe")
        crates.append((pkg["name"], pkg["version"], pkg["checksum"]))
    crates.sort()
    out = [
        "# Generated from Cargo.lock by scripts/yocto-crates.py: do not edit.",
        "# CI fails when it is out of sync; run the script after changing Cargo.lock.",
        "",
    ]
    uris = [f"crate://crates.io/{n}/{v}" for n, v, _ in crates]
    out.append(f'SRC_URI += "{uris[0]} \\')
    out += [f"            {u} \\" for u in uris[1:]]
    out += ['"', ""]
    out += [f'SRC_URI[{n}-{v}.sha256sum] = "{c}"' for n, v, c in crates]
    return "\n".join(out) + "\n"


def main() -> None:
    text = render()
    if sys.argv[1:] == ["--check"]:
        if not INC.exists() or INC.read_text() != text:
            sys.exit(f"yocto-crates: {INC.relative_to(ROOT)} is out of sync with Cargo.lock: "
                     "run scripts/yocto-crates.py and commit the result")
        print(f"yocto-crates: {INC.relative_to(ROOT)} matches Cargo.lock")
        return
    if sys.argv[1:]:
        sys.exit(__doc__)
    INC.write_text(text)
    print(f"yocto-crates: wrote {INC.relative_to(ROOT)} ({text.count('crate://')} crates)")


if __name__ == "__main__":
    main()
