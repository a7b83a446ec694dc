"""Checks structured answers with the reference validators: `jsonschema` (JSON Schema
draft 2020-12, its own format checker off), `lark` (an Earley parser of the Lark grammar) and
Python's `re` (fullmatch).

Reads a JSON list on stdin: [{"kind": "json_schema" | "json_object" | "lark" | "regex",
"spec": schema object or grammar/regex text, "text": the answer, "label": "..."}]. Prints
one JSON object {"checked": N, "failures": [...]} and exits 1 if any answer fails.
Run by tests/tests/structured.rs with the venv of scripts/setup-test-venv.sh.
"""

import json
import re
import sys

import jsonschema
import lark


def check(item):
    kind, spec, text = item["kind"], item["spec"], item["text"]
    if kind in ("json_schema", "json_object"):
        value = json.loads(text)
        if kind == "json_object":
            if not isinstance(value, dict):
                raise ValueError(f"not a JSON object: {type(value).__name__}")
        else:
            jsonschema.validate(value, spec, cls=jsonschema.Draft202012Validator)
    elif kind == "lark":
        lark.Lark(spec, start="start", parser="earley").parse(text)
    elif kind == "regex":
        if re.fullmatch(spec, text) is None:
            raise ValueError(f"{text!r} does not match /{spec}/")
    else:
        raise ValueError(f"unknown kind {kind!r}")


def main():
    items = json.load(sys.stdin)
    failures = []
    for item in items:
        try:
            check(item)
        except Exception as e:  # the report names every failing answer
            failures.append({"label": item.get("label"), "text": item["text"], "error": f"{type(e).__name__}: {e}"})
    print(json.dumps({"checked": len(items), "failures": failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
