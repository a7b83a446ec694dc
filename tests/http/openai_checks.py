#!/usr/bin/env python3
"""Drives a live edgellmd's HTTP API with the official `openai` and `ollama` clients (and, for
what they do not expose, plain httpx, which they ship with) for tests/tests/service_http.rs.
Each subcommand prints one JSON object on stdout; the Rust test asserts on it.

  basics BASE          chat and completions, streamed and not; models; usage
  auth BASE KEY        the right key, a wrong one, none; /health without a key
  busy BASE N          N long requests at once against a queue of one: statuses, Retry-After
  ollama BASE          the Ollama routes through the `ollama` client
  uds PATH             the API over a Unix socket (PATH instead of BASE)
  load BASE C N        C clients x N requests, some streams left midway: outcomes, streams that
                       did not end exactly once, idle afterwards, /metrics' HTTP request count
  abuse BASE           a body trickled byte by byte; 200 connections at once
  metrics BASE         /metrics (OpenMetrics parser) before and after an answered and a refused
                       request
  malformed BASE       bodies that are not JSON, not UTF-8, of wrong types, unknown fields, too
                       large; an unknown route: each status and error code
  disconnect BASE      a stream and a whole request the client abandons: seconds until idle
  structured BASE      response_format json_schema through the openai client (whole, and
                       streamed: the pieces joined), `format` through the ollama client, and
                       an invalid schema's error message
  tools BASE           tool calls through the openai client (a named function, whole and
                       streamed; the result sent back; an unknown tool_choice) and the ollama
                       client (tools and a history with a call and its result)
  shutdown BASE        a long stream and a request queued behind it; prints "streaming", waits
                       for a line on stdin (the test stops the daemon), then a new request:
                       the queued and the new request's statuses, the stream's finish reason
"""

import json
import sys
import threading
import time

import httpx
import openai


def client(base, key="none"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def chat_stream(c, **kw):
    pieces, finish, usage = [], None, None
    for ch in c.chat.completions.create(stream=True, **kw):
        if ch.choices:
            if ch.choices[0].delta.content:
                pieces.append(ch.choices[0].delta.content)
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage.model_dump()
    return {"pieces": pieces, "finish": finish, "usage": usage}


def basics(base):
    c = client(base)
    msgs = [{"role": "user", "content": "Tell me about the sea"}]
    r = c.chat.completions.create(model="any", messages=msgs, max_tokens=8, temperature=0)
    out = {
        "chat": {
            "text": r.choices[0].message.content,
            "role": r.choices[0].message.role,
            "finish": r.choices[0].finish_reason,
            "usage": r.usage.model_dump(),
            "object": r.object,
        }
    }
    out["chat_stream"] = chat_stream(
        c, model="any", messages=msgs, max_tokens=8, temperature=0,
        stream_options={"include_usage": True},
    )
    t = c.completions.create(model="any", prompt="The sea is", max_tokens=6, temperature=0)
    out["text"] = {"text": t.choices[0].text, "finish": t.choices[0].finish_reason,
                   "usage": t.usage.model_dump()}
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model="any", prompt="The sea is", max_tokens=6, temperature=0, stream=True) if ch.choices]
    out["text_stream"] = pieces
    out["models"] = [m.id for m in c.models.list()]
    try:
        c.chat.completions.create(model="any", messages=msgs, temperature=-1)
    except openai.BadRequestError as e:
        out["bad_request"] = {"status": e.status_code, "body": e.body}
    return out


def auth(base, key):
    out = {}
    r = client(base, key).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    out["right"] = r.choices[0].finish_reason
    try:
        client(base, key + "x").models.list()
        out["wrong"] = "accepted"
    except openai.AuthenticationError as e:
        out["wrong"] = {"status": e.status_code, "body": e.body}
    # The client insists on a key: without one, plain httpx. (Its bodies carry the error object
    # whole; the client's `body` is the object's inside.)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": []})
    out["none"] = {"status": r.status_code, "body": r.json()["error"]}
    out["health"] = httpx.get(base + "/health").status_code
    r = httpx.get(base + "/api/tags")
    out["ollama_none"] = {"status": r.status_code, "body": r.json()}
    import ollama
    out["ollama_right"] = [m.model for m in ollama.Client(
        host=base, headers={"Authorization": f"Bearer {key}"}).list().models]
    return out


def busy(base, n):
    results = [None] * n
    c = client(base)

    def one(i):
        try:
            r = c.chat.completions.with_raw_response.create(
                model="any", messages=[{"role": "user", "content": f"story {i}"}],
                max_tokens=200, temperature=0)
            results[i] = {"status": r.status_code}
        except openai.RateLimitError as e:
            results[i] = {"status": e.status_code, "retry_after": e.response.headers.get("retry-after"),
                          "body": e.body}
        except openai.APIStatusError as e:
            results[i] = {"status": e.status_code, "body": e.body}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results}


def shutdown(base):
    c = client(base)
    stream = c.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "a long story"}], max_tokens=900,
        temperature=0, stream=True)
    it = iter(stream)
    first = next(it)
    out = {"first": first.choices[0].delta.content}

    def queued():
        try:
            client(base).chat.completions.create(
                model="any", messages=[{"role": "user", "content": "queued"}], max_tokens=2)
            out["queued"] = "accepted"
        except openai.APIStatusError as e:
            out["queued"] = {"status": e.status_code, "body": e.body}

    behind = threading.Thread(target=queued)
    behind.start()
    print("streaming", flush=True)
    sys.stdin.readline()
    try:
        client(base).chat.completions.create(
            model="any", messages=[{"role": "user", "content": "late"}], max_tokens=2)
        out["late"] = "accepted"
    except openai.APIStatusError as e:
        out["late"] = {"status": e.status_code, "body": e.body}
    except openai.APIConnectionError as e:
        out["late"] = {"connection_error": str(e)}
    behind.join()
    finish = None
    for ch in it:
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    out["finish"] = finish
    return out


def malformed(base):
    """Bodies the API must refuse with an error object: status and code of each."""
    url = base + "/v1/chat/completions"
    cases = {
        "not_json": b"{not json",
        "not_utf8": b'{"messages": "\xff"}',
        "wrong_type": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}',
        "unknown_field": b'{"messages": [{"role": "user", "content": "hi"}], "functions": []}',
        "twice": b'{"messages": [], "messages": []}',
        "too_large": b'{"messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}',
    }
    out = {}
    for name, body in cases.items():
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        out[name] = {"status": r.status_code, "code": r.json()["error"]["code"],
                     "message": r.json()["error"]["message"]}
    r = httpx.get(base + "/v2/nothing")
    out["no_route"] = {"status": r.status_code, "code": r.json()["error"]["code"]}
    return out


def ollama_checks(base):
    """The Ollama routes through the `ollama` client: chat and generate, streamed and not; the
    model listed by /api/tags and /api/ps; /api/version; a refused option."""
    import ollama

    c = ollama.Client(host=base)
    msgs = [{"role": "user", "content": "Tell me about the sea"}]
    opts = {"num_predict": 8, "temperature": 0}
    r = c.chat(model="any", messages=msgs, options=opts, stream=False)
    out = {"chat": {"content": r.message.content, "role": r.message.role, "done": r.done,
                    "done_reason": r.done_reason, "eval_count": r.eval_count,
                    "prompt_eval_count": r.prompt_eval_count}}
    pieces, final = [], None
    for part in c.chat(model="any", messages=msgs, options=opts, stream=True):
        if part.done:
            final = part
        else:
            pieces.append(part.message.content)
    out["chat_stream"] = {"pieces": pieces, "done_reason": final.done_reason,
                          "eval_count": final.eval_count}
    gopts = {"num_predict": 6, "temperature": 0}
    g = c.generate(model="any", prompt="The sea is", raw=True, options=gopts, stream=False)
    out["generate"] = {"response": g.response, "done_reason": g.done_reason,
                       "eval_count": g.eval_count}
    out["generate_stream"] = [p.response for p in c.generate(
        model="any", prompt="The sea is", raw=True, options=gopts, stream=True) if not p.done]
    out["tags"] = [m.model for m in c.list().models]
    out["ps"] = [m.model for m in c.ps().models]
    out["version"] = httpx.get(base + "/api/version").json()["version"]
    try:
        c.chat(model="any", messages=msgs, options={"mirostat": 2}, stream=False)
        out["bad"] = "accepted"
    except ollama.ResponseError as e:
        out["bad"] = {"status": e.status_code, "error": e.error}
    return out


def sse_terminals(base, body, leave_early):
    """A streamed chat read with httpx: ("left", None) when leaving after the first chunk, else
    (finish reason, number of finish chunks + [DONE] lines: 2 when exactly one end came)."""
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        if r.status_code != 200:
            return f"status {r.status_code}", None
        finish, ends = None, 0
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if leave_early:
                return "left", None
            data = line[len("data: "):]
            if data == "[DONE]":
                ends += 1
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                return "error " + chunk["error"]["code"], ends + 2
            if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                finish = chunk["choices"][0]["finish_reason"]
                ends += 1
        return finish, ends


def load(base, clients, each):
    """`clients` threads x `each` requests (whole chats and completions, full streams, streams
    left after the first chunk): every request's outcome, any stream that did not end exactly
    once, seconds until idle afterwards, and the HTTP requests /metrics counted."""
    outcomes, violations, lock = {}, [], threading.Lock()

    def note(outcome):
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def worker(k):
        c = client(base)
        for i in range(each):
            body = {"model": "any", "messages": [{"role": "user", "content": f"client {k} asks {i}"}],
                    "max_tokens": 12 + (k + i) % 8, "temperature": 0.7, "seed": k * 100 + i}
            kind = (k + i) % 4
            try:
                if kind == 0:
                    r = c.chat.completions.create(**body)
                    note("whole " + r.choices[0].finish_reason)
                elif kind == 1:
                    finish, ends = sse_terminals(base, body, False)
                    if ends not in (2, None):
                        with lock:
                            violations.append({"client": k, "request": i, "ends": ends})
                    note("stream " + str(finish))
                elif kind == 2:
                    finish, _ = sse_terminals(base, body, True)
                    note("stream " + str(finish))
                else:
                    r = c.completions.create(model="any", prompt=f"client {k} text {i}",
                                             max_tokens=10, temperature=0)
                    note("text " + r.choices[0].finish_reason)
            except openai.APIStatusError as e:
                note(f"status {e.status_code}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    idle = wait_idle(base, 30)
    counted = sum(v for k, v in scrape(base).items()
                  if k.startswith("edgellm_requests_total{") and "transport=http" in k)
    return {"outcomes": outcomes, "violations": violations, "idle_after_s": idle,
            "metrics_http_requests": counted}


def abuse(base):
    """A body trickled byte by byte, and a flood of connections: each gets its answer."""
    import socket

    host, port = base[len("http://"):].split(":")
    body = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 3}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
    for b in body:
        s.sendall(bytes([b]))
        time.sleep(0.005)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    s.close()
    out = {"trickled": int(reply.split(b" ")[1])}
    # 200 connections at once, each asking /health and /v1/models.
    statuses, lock = [], threading.Lock()

    def one():
        with httpx.Client(timeout=60) as h:
            codes = [h.get(base + "/health").status_code, h.get(base + "/v1/models").status_code]
        with lock:
            statuses.extend(codes)

    threads = [threading.Thread(target=one) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["flood"] = {str(c): statuses.count(c) for c in set(statuses)}
    out["after"] = httpx.get(base + "/health").status_code
    return out


def uds(path):
    """The API over a Unix socket: /health, and a chat through the openai client."""
    transport = httpx.HTTPTransport(uds=path)
    out = {"health": httpx.Client(transport=transport).get("http://edgellm/health").status_code}
    c = openai.OpenAI(base_url="http://edgellm/v1", api_key="none", max_retries=0,
                      http_client=httpx.Client(transport=httpx.HTTPTransport(uds=path)))
    r = c.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=3)
    out["chat"] = r.choices[0].finish_reason
    return out


def scrape(base):
    """/metrics parsed by prometheus_client's OpenMetrics parser: {name{labels}: value}."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    r = httpx.get(base + "/metrics")
    assert r.headers["content-type"].startswith("application/openmetrics-text"), r.headers
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def metrics(base):
    """/metrics before and after one answered and one refused HTTP request."""
    before = scrape(base)
    c = client(base)
    c.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                              max_tokens=5, temperature=0)
    try:
        c.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                  top_p=7)
    except openai.BadRequestError:
        pass
    return {"before": before, "after": scrape(base)}


def wait_idle(base, within):
    """Seconds until /health shows nothing running or queued (None: not within `within`)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        h = httpx.get(base + "/health").json()
        if h["running"] == 0 and h["queue_length"] == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def disconnect(base):
    """A streamed and a whole request the client abandons: each must stop running."""
    body = {"messages": [{"role": "user", "content": "a long story"}], "max_tokens": 900,
            "temperature": 0}
    out = {}
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    out["stream_idle_after_s"] = wait_idle(base, 5)
    try:
        httpx.post(base + "/v1/chat/completions", json=body, timeout=2)
        out["whole"] = "answered"
    except httpx.TimeoutException:
        out["whole"] = "gave up"
    out["whole_idle_after_s"] = wait_idle(base, 5)
    return out


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def structured(base):
    """Structured output through the stock clients: the answers' text, and an invalid schema's
    error message."""
    import ollama

    c = client(base)
    msgs = [{"role": "user", "content": "Invent a person. Reply with JSON giving their name and age."}]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = c.chat.completions.create(model="any", messages=msgs, max_tokens=120, temperature=0, response_format=rf)
    streamed = chat_stream(c, model="any", messages=msgs, max_tokens=120, temperature=0, response_format=rf)
    if "".join(streamed["pieces"]) != r.choices[0].message.content or streamed["finish"] != "stop":
        raise SystemExit(f"streamed {streamed} differs from whole {r.choices[0].message.content!r}")
    try:
        bad = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strin"}}}
        c.chat.completions.create(model="any", messages=msgs, max_tokens=5, response_format=bad)
        invalid = None
    except openai.BadRequestError as e:
        invalid = e.body["message"] if isinstance(e.body, dict) else str(e)
    o = ollama.Client(host=base, timeout=120)
    g = o.chat(model="any", messages=msgs, format=PERSON, options={"temperature": 0, "num_predict": 120})
    return {
        "openai": r.choices[0].message.content,
        "finish": r.choices[0].finish_reason,
        "openai_invalid": invalid,
        "ollama": g.message.content,
    }


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def tools(base):
    """Tool calls through the stock clients: the calls' names and arguments (text), finish
    reasons, the answer after the result went back, and errors."""
    import ollama

    c = client(base)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="any", messages=msgs, tools=[WEATHER], tool_choice=named,
                                  max_tokens=100, temperature=0)
    m = r.choices[0].message
    calls = [{"id": t.id, "type": t.type, "name": t.function.name, "arguments": t.function.arguments}
             for t in m.tool_calls or []]
    # Streamed: the client's chunks carry the calls in delta.tool_calls.
    streamed, finish = {}, None
    for ch in c.chat.completions.create(model="any", messages=msgs, tools=[WEATHER], tool_choice=named,
                                        max_tokens=100, temperature=0, stream=True):
        if not ch.choices:
            continue
        for t in ch.choices[0].delta.tool_calls or []:
            e = streamed.setdefault(t.index, {"name": "", "arguments": ""})
            e["name"] += t.function.name or ""
            e["arguments"] += t.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    # The result goes back: the assistant's call and the tool's answer in the history.
    history = msgs + [m.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": '{"temp": 21}'}]
    after = c.chat.completions.create(model="any", messages=history, tools=[WEATHER],
                                      max_tokens=10, temperature=0)
    try:
        c.chat.completions.create(model="any", messages=msgs, tools=[WEATHER], max_tokens=5,
                                  tool_choice={"type": "function", "function": {"name": "launch"}})
        unknown = None
    except openai.BadRequestError as e:
        unknown = e.body["message"] if isinstance(e.body, dict) else str(e)
    o = ollama.Client(host=base, timeout=120)
    args = json.loads(calls[0]["arguments"])
    g = o.chat(model="any", tools=[WEATHER], options={"temperature": 0, "num_predict": 10}, messages=msgs + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_name": "get_weather", "content": '{"temp": 21}'},
    ])
    return {
        "calls": calls,
        "finish": r.choices[0].finish_reason,
        "content": m.content,
        "streamed": [streamed[i] for i in sorted(streamed)],
        "streamed_finish": finish,
        "after_finish": after.choices[0].finish_reason,
        "after_prompt_tokens": after.usage.prompt_tokens,
        "first_prompt_tokens": r.usage.prompt_tokens,
        "unknown": unknown,
        "ollama_done": g.done_reason,
        "ollama_prompt_tokens": g.prompt_eval_count,
    }


def main():
    cmd, base, *rest = sys.argv[1:]
    if cmd == "basics":
        out = basics(base)
    elif cmd == "auth":
        out = auth(base, rest[0])
    elif cmd == "busy":
        out = busy(base, int(rest[0]))
    elif cmd == "ollama":
        out = ollama_checks(base)
    elif cmd == "uds":
        out = uds(base)
    elif cmd == "load":
        out = load(base, int(rest[0]), int(rest[1]))
    elif cmd == "abuse":
        out = abuse(base)
    elif cmd == "metrics":
        out = metrics(base)
    elif cmd == "malformed":
        out = malformed(base)
    elif cmd == "disconnect":
        out = disconnect(base)
    elif cmd == "shutdown":
        out = shutdown(base)
    elif cmd == "structured":
        out = structured(base)
    elif cmd == "tools":
        out = tools(base)
    else:
        sys.exit(f"unknown subcommand {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
