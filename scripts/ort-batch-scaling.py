#!/usr/bin/env python3
"""What ONNX Runtime alone pays for a decode step of B sequences against one: the ceiling of
what continuous batching can gain with a package on this machine, whatever the engine does.

Runs the package's graph directly in onnxruntime's Python API as edgellm's batched decode does
(I/O binding, past and present KV sharing one [B, kv_heads, L, head_dim] buffer per layer, one
token per sequence, `past` positions already cached), B = 1, 2, 4, 8, and prints the time per
step, the aggregate tok/s and the step's cost relative to B = 1. Aggregate decode at B
sequences can be at most B / (step cost ratio) times one sequence's.

Usage: scripts/ort-batch-scaling.py PACKAGE [--threads 2] [--past 128] [--buffer 512]
  (a Python with onnxruntime, e.g. .venv-bench from scripts/setup-bench-venv.sh)
"""

import argparse
import json
import pathlib
import time

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("package", type=pathlib.Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--buffer", type=int, default=512, help="KV rows per sequence (max_length)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--spin", type=int, default=1, help="intra-op spinning (edgellm's default: 1)")
    args = ap.parse_args()

    genai = json.loads((args.package / "genai_config.json").read_text())
    model = genai["model"]
    layers = model["decoder"]["num_hidden_layers"]
    kv_heads = model["decoder"]["num_key_value_heads"]
    head_dim = model["decoder"]["head_size"]
    names = model["decoder"]["inputs"]
    outputs = model["decoder"]["outputs"]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", str(args.spin))
    session = ort.InferenceSession(
        str(args.package / model["decoder"]["filename"]), opts, providers=["CPUExecutionProvider"]
    )

    def step_time(batch):
        io = session.io_binding()
        keep = []
        for i in range(layers):
            for past, present in (
                (names["past_key_names"], outputs["present_key_names"]),
                (names["past_value_names"], outputs["present_value_names"]),
            ):
                buf = ort.OrtValue.ortvalue_from_numpy(
                    np.zeros((batch, kv_heads, args.buffer, head_dim), np.float32)
                )
                io.bind_ortvalue_input(past % i, buf)
                io.bind_ortvalue_output(present % i, buf)
                keep.append(buf)
        io.bind_cpu_input(names["input_ids"], np.full((batch, 1), 42, np.int64))
        io.bind_cpu_input(names["attention_mask"], np.ones((batch, args.past + 1), np.int64))
        io.bind_output(outputs["logits"])
        for _ in range(3):
            session.run_with_iobinding(io)
        start = time.perf_counter()
        for _ in range(args.steps):
            session.run_with_iobinding(io)
        return (time.perf_counter() - start) / args.steps

    base = None
    for batch in (1, 2, 4, 8):
        t = step_time(batch)
        base = base or t
        print(
            f"B={batch}: {t * 1e3:6.2f} ms per step, {batch / t:6.1f} tok/s aggregate, "
            f"step cost x{t / base:.2f}, at most x{batch * base / t:.2f} one sequence's tok/s"
        )


if __name__ == "__main__":
    main()
