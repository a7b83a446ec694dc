#!/usr/bin/env python3
"""Greedy generation from an edgellm (or onnxruntime-genai built) package with onnxruntime-genai.

Checks that onnxruntime-genai itself accepts the package layout (genai_config.json, model.onnx,
tokenizer files) and runs it on the CPU execution provider, and optionally that the greedy tokens
equal the transformers goldens of a test fixture.

Usage:
  scripts/genai-generate.py PACKAGE_DIR [--prompt-ids 1,2,3 | --prompt TEXT]
                            [--max-new-tokens 24] [--golden tests/fixtures/NAME/golden.json]

Run it with the bench venv (scripts/setup-bench-venv.sh), e.g.
  .venv-bench/bin/python scripts/genai-generate.py out/qwen2 --golden tests/fixtures/qwen2/golden.json

With --golden the prompt is the golden's `prompt_ids` and the generated ids are compared with its
`greedy_ids` (float32 transformers, no EOS stop): prints MATCH or MISMATCH (with the first differing
position) and exits 0 on MATCH, 1 on MISMATCH. int4 packages are not expected to reproduce the
float32 goldens token for token (round-to-nearest int4 changes the argmax on random-weight
fixtures); a MISMATCH there says nothing on its own. Errors from onnxruntime-genai (config parse,
graph or op errors) are printed verbatim and exit with status 2.
"""
import argparse
import json
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package", help="package folder (genai_config.json, model.onnx, tokenizer.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt-ids", help="comma-separated prompt token ids (used as is)")
    src.add_argument("--prompt", help="prompt text, encoded with the package tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--golden", help="fixture golden.json: use its prompt_ids, compare with greedy_ids")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="stop at an EOS token (default: off with --golden, whose goldens never stop)")
    return p.parse_args()


def sliding_window_min(cfg):
    """Smallest max_length og accepts for a package with sliding-window layers (0 if none).

    og sizes the windowed KV buffers as W + max(cache_slack or 16, chunk_size - 1) on CPU, clamped
    to max_length; GroupQueryAttention rejects a capacity below local_window_size (W), so
    max_length must be at least W.
    """
    sw = cfg.get("model", {}).get("decoder", {}).get("sliding_window")
    if not sw:
        return 0
    return int(sw.get("window_size", 0))


def main():
    args = parse_args()
    import numpy as np
    import onnxruntime_genai as og

    pkg = args.package
    cfg_path = os.path.join(pkg, "genai_config.json")
    if not os.path.isfile(cfg_path):
        print(f"genai-generate: {cfg_path} not found", file=sys.stderr)
        return 2
    with open(cfg_path) as f:
        genai_cfg = json.load(f)

    golden = None
    if args.golden:
        with open(args.golden) as f:
            golden = json.load(f)
        if args.prompt or args.prompt_ids:
            print("genai-generate: --golden supplies the prompt; --prompt/--prompt-ids ignored",
                  file=sys.stderr)

    stage = "load"
    try:
        config = og.Config(pkg)
        config.clear_providers()  # CPU execution provider
        model = og.Model(config)
        stage = "tokenizer"
        tokenizer = og.Tokenizer(model)

        if golden is not None:
            prompt = [int(t) for t in golden["prompt_ids"]]
            new_tokens = len(golden["greedy_ids"])
        elif args.prompt_ids:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
            new_tokens = args.max_new_tokens
        else:
            text = args.prompt if args.prompt is not None else "The quick brown fox"
            prompt = [int(t) for t in tokenizer.encode(text)]
            new_tokens = args.max_new_tokens
        if not prompt:
            print("genai-generate: empty prompt", file=sys.stderr)
            return 2

        total = len(prompt) + new_tokens
        max_length = max(total, sliding_window_min(genai_cfg))
        stage = "generator"
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        gen = og.Generator(model, params)

        stage = "prefill"
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32))
        t1 = time.perf_counter()
        stage = "decode"
        stop_at_eos = args.stop_at_eos or golden is None
        eos = set(int(e) for e in (tokenizer.eos_token_ids if hasattr(tokenizer, "eos_token_ids") else []))
        out = []
        while len(out) < new_tokens and not gen.is_done():
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            out.append(tok)
            if stop_at_eos and tok in eos:
                break
        t2 = time.perf_counter()
        text = tokenizer.decode(np.asarray(out, dtype=np.int32))
    except Exception as e:  # og raises RuntimeError / OrtException with the runtime's message
        print(f"ERROR during {stage}: {type(e).__name__}: {e}")
        return 2

    print(f"package:      {pkg}")
    print(f"model type:   {model.type}  device: {getattr(model, 'device_type', '?')}")
    print(f"prompt ids:   {prompt}")
    print(f"max_length:   {max_length}")
    print(f"generated:    {out}")
    print(f"text:         {text!r}")
    n = max(len(out), 1)
    print(f"timing:       prefill {1e3 * (t1 - t0):.1f} ms, {1e3 * (t2 - t1) / n:.2f} ms/token")

    if golden is not None:
        want = [int(t) for t in golden["greedy_ids"]]
        if out == want:
            print(f"MATCH ({len(want)}/{len(want)} tokens)")
            return 0
        first = next((i for i, (a, b) in enumerate(zip(out, want)) if a != b), min(len(out), len(want)))
        same = sum(a == b for a, b in zip(out, want))
        print(f"expected:     {want}")
        print(f"MISMATCH (first difference at new token {first}; {same}/{len(want)} positions equal)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
