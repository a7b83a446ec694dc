#!/usr/bin/env python3
"""Concurrent clients for scripts/bench-concurrency.sh (stdlib only).

One wave: N clients start together, each sends one request (its own prompt: "[wave-client] " +
the base prompt, so no two requests share a cached prefix) and waits for the whole answer,
streamed. Per client it records, from the moment its request was sent:
  ttft_ms    until the first piece of answer text arrived,
  total_ms   until the final reply,
  tokens     completion tokens (what the server reports),
  per_token_ms  (total_ms - ttft_ms) / (tokens - 1): the latency of each later token.
The wave's aggregate decode rate is sum(tokens - 1) / (last final reply - first request sent):
what the server delivered to all its clients together per second of the wave.

Servers:
  edgellmd      `edgellm ask --mqtt URL --node NODE --raw --prompt P --max-tokens G
                 --temperature 0 --stream --json` as one process per client; its `client`
                 timings (first_token_ms, total_ms: measured by ask from its request on, so
                 process start and MQTT connect are not counted) and `usage.completion_tokens`.
  llama-server  POST /completion {"prompt", "n_predict": G, "temperature": 0, "stream": true,
                 "cache_prompt": true} over HTTP/1.1 (llama.cpp's native API), read as
                 server-sent events; the final event's `tokens_predicted`.

Usage: concurrency-clients.py edgellmd ASK_BIN MQTT_URL NODE | llama-server URL
       with --clients N --waves W --gen G --prompt TEXT; prints one JSON object:
       {"clients", "waves": [{"aggregate_tok_s", "clients": [...]}], "median": {...}}.
"""

import argparse
import http.client
import json
import statistics
import subprocess
import threading
import time
import urllib.parse


def ask_edgellmd(args, prompt):
    cmd = [args.target[0], "ask", "--mqtt", args.target[1], "--node", args.target[2], "--raw",
           "--prompt", prompt, "--max-tokens", str(args.gen), "--temperature", "0", "--stream",
           "--json", "--timeout", "600"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"edgellm ask failed ({out.returncode}): {out.stderr.strip()}")
    last = [line for line in out.stdout.splitlines() if line.startswith("{")][-1]
    j = json.loads(last)
    return j["client"]["first_token_ms"], j["client"]["total_ms"], j["usage"]["completion_tokens"]


def ask_llama_server(args, prompt):
    url = urllib.parse.urlparse(args.target[0])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    body = json.dumps({"prompt": prompt, "n_predict": args.gen, "temperature": 0.0,
                       "stream": True, "cache_prompt": True})
    sent = time.perf_counter()
    conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:200]!r}")
    first, tokens = None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if first is None and event.get("content"):
            first = time.perf_counter()
        if event.get("stop"):
            tokens = event.get("tokens_predicted")
            break
    done = time.perf_counter()
    conn.close()
    if tokens is None:
        raise RuntimeError("llama-server's stream ended without a final event")
    first = first or done
    return (first - sent) * 1e3, (done - sent) * 1e3, tokens


def wave(args, w, ask):
    results = [None] * args.clients
    errors = []
    start_gate = threading.Barrier(args.clients)

    def client(k):
        prompt = f"[{w}-{k}] {args.prompt}"
        try:
            start_gate.wait()
            sent = time.perf_counter()
            ttft, total, tokens = ask(args, prompt)
            results[k] = {"ttft_ms": ttft, "total_ms": total, "tokens": tokens, "sent": sent,
                          "done": sent + total / 1e3}
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"wave {w}: {errors[0]}")
    begin = min(r["sent"] for r in results)
    end = max(r["done"] for r in results)
    for r in results:
        r["per_token_ms"] = ((r["total_ms"] - r["ttft_ms"]) / (r["tokens"] - 1)
                             if r["tokens"] > 1 else 0.0)
        del r["sent"], r["done"]
    decoded = sum(max(r["tokens"] - 1, 0) for r in results)
    return {"aggregate_tok_s": decoded / max(end - begin, 1e-9), "clients": results}


def pct(values, p):
    values = sorted(values)
    return values[round((len(values) - 1) * p)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("server", choices=["edgellmd", "llama-server"])
    ap.add_argument("target", nargs="+")
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--waves", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt", required=True)
    args = ap.parse_args()
    ask = ask_edgellmd if args.server == "edgellmd" else ask_llama_server
    wave(args, "warm", ask)  # first-run costs, not measured
    waves = [wave(args, w, ask) for w in range(args.waves)]
    every = [c for w in waves for c in w["clients"]]
    print(json.dumps({
        "clients": args.clients,
        "waves": waves,
        "median": {
            "aggregate_tok_s": statistics.median(w["aggregate_tok_s"] for w in waves),
            "ttft_p50_ms": pct([c["ttft_ms"] for c in every], 0.5),
            "ttft_p95_ms": pct([c["ttft_ms"] for c in every], 0.95),
            "per_token_p50_ms": pct([c["per_token_ms"] for c in every], 0.5),
            "per_token_p95_ms": pct([c["per_token_ms"] for c in every], 0.95),
            "tokens_min": min(c["tokens"] for c in every),
        },
    }))


if __name__ == "__main__":
    main()
