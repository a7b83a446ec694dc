#!/usr/bin/env python3
"""The soak test's clients (scripts/soak.sh runs this with the test venv's python).

Until --seconds have passed, client threads on every transport send a mix of requests to one
edgellmd and check each answer's terminal guarantee:

  http   (http.client, OpenAI routes)  streamed (exactly one finish_reason chunk, then exactly one
         `data: [DONE]`), whole (one completion), disconnected after the first chunk, malformed
         JSON (400), an oversize body (413), a burst past the queue (200 or 429 each);
  mqtt   (paho-mqtt, MQTT 5, QoS 1, a persistent session: replies survive a broker restart)
         streamed and whole (exactly one terminal message per id: `done` or an error; a QoS 1
         redelivery of the same message is counted apart, a second different one is a failure),
         cancelled after the first piece (`cancelled` or already `done`), malformed and oversize
         payloads (an `invalid_request` error reply). edgellmd subscribes with a clean start,
         so a request that reaches a restarted broker before edgellmd has subscribed again is
         dropped by the broker, never accepted: a request sent from 1 s before a restart to
         20 s after it (--restarts, written by soak.sh) that gets no answer is counted as
         `lost_in_restart`, not as a failure;
  dbus   (busctl, `edgellm ask`)  Chat (one reply), an option of the wrong type (the named
         error), a streaming client killed mid-answer.

Prints one JSON object: per kind, counts of `ok`, intended errors and failures, plus the MQTT
requests still unanswered when the clients stopped (their id and age). Exit status 1 when any
failure was seen.
"""

import argparse
import http.client
import json
import random
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

lock = threading.Lock()
tally = defaultdict(Counter)
failures = []


def count(kind, outcome, detail=None):
    with lock:
        tally[kind][outcome] += 1
        # The first few of each kind: enough to see what went wrong.
        if outcome == "FAIL" and tally[kind]["FAIL"] <= 5:
            failures.append(f"{kind}: {detail}")


def chat_body(max_tokens, stream, text=None):
    """A chat request in the MQTT vocabulary (OpenAI's fields; HTTP adds `model`)."""
    text = text or random.choice(["Tell me about the sea.", "What is 2+2?", "Name three colours.",
                                  "Write a haiku about rain.", "Why is the sky blue?"])
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream, "temperature": random.choice([0, 0.7]),
            "seed": random.randint(0, 1000)}


# ---------------------------------------------------------------------------------------- HTTP
def http_conn(a):
    host, port = a.http.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=120)


def http_post(a, body, raw=None):
    c = http_conn(a)
    data = raw if raw is not None else json.dumps({"model": "default", **body}).encode()
    c.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    return c, c.getresponse()


def http_stream(a):
    c, r = http_post(a, chat_body(random.randint(8, 48), True))
    if r.status == 429:
        return count("http_stream", "busy")
    if r.status != 200:
        return count("http_stream", "FAIL", f"status {r.status}: {r.read()[:200]!r}")
    finishes = done = 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[6:]
        if payload == b"[DONE]":
            done += 1
            continue
        if done:
            return count("http_stream", "FAIL", "data after [DONE]")
        ch = json.loads(payload)
        if "error" in ch:
            return count("http_stream", "FAIL", f"error chunk {ch}")
        finishes += sum(1 for x in ch.get("choices", []) if x.get("finish_reason"))
    c.close()
    if finishes == 1 and done == 1:
        count("http_stream", "ok")
    else:
        count("http_stream", "FAIL", f"{finishes} finish chunks, {done} [DONE]")


def http_whole(a):
    c, r = http_post(a, chat_body(random.randint(4, 24), False))
    body = r.read()
    c.close()
    if r.status == 429:
        return count("http_whole", "busy")
    j = json.loads(body)
    if r.status == 200 and j["choices"][0]["finish_reason"] in ("stop", "length"):
        count("http_whole", "ok")
    else:
        count("http_whole", "FAIL", f"status {r.status}: {body[:200]!r}")


def http_disconnect(a):
    c, r = http_post(a, chat_body(200, True))
    if r.status == 200:
        r.readline()
        count("http_disconnect", "ok")
    elif r.status == 429:
        count("http_disconnect", "busy")
    else:
        count("http_disconnect", "FAIL", f"status {r.status}")
    c.close()


def http_bad(a):
    kind, raw, want = random.choice([
        ("http_malformed", b'{"messages": [', 400),
        ("http_malformed", b'{"messages": "hi", "max_tokens": -1}', 400),
        ("http_malformed", b"\xff\xfe not utf-8", 400),
        ("http_oversize", b'{"messages": "' + b"x" * (a.max_body + 10) + b'"}', 413),
    ])
    try:
        c, r = http_post(a, None, raw)
        r.read()
        c.close()
        count(kind, "refused" if r.status == want else "FAIL", f"status {r.status}, wanted {want}")
    except (ConnectionError, http.client.HTTPException) as e:
        # The server may close an oversize upload before reading it all.
        count(kind, "refused" if kind == "http_oversize" else "FAIL", repr(e))


def http_burst(a):
    def one():
        try:
            c, r = http_post(a, chat_body(4, False))
            r.read()
            c.close()
            count("http_burst", {200: "ok", 429: "busy"}.get(r.status, "FAIL"), f"status {r.status}")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            count("http_burst", "FAIL", repr(e))
    threads = [threading.Thread(target=one) for _ in range(a.queue_depth + 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# ---------------------------------------------------------------------------------------- MQTT
class Mqtt:
    """One persistent MQTT 5 session: requests with a response topic of our own, replies
    collected per id."""

    def __init__(self, a, name):
        self.a = a
        self.prefix = f"soak/{name}"
        self.replies = defaultdict(list)
        self.sent = {}
        self.wall = {}
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"soak-{name}",
                             protocol=mqtt.MQTTv5)
        self.c.on_message = self.on_message
        self.c.on_connect = self.on_connect
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        host, port = a.mqtt.rsplit(":", 1)
        self.c.reconnect_delay_set(0.2, 2)
        self.c.connect(host, int(port), keepalive=10, clean_start=False, properties=props)
        self.c.loop_start()

    def on_connect(self, client, _userdata, _flags, _rc, _props):
        client.subscribe(f"{self.prefix}/#", qos=1)

    def on_message(self, _client, _userdata, msg):
        try:
            j = json.loads(msg.payload)
        except ValueError:
            return
        rid = msg.topic.rsplit("/", 1)[-1]
        with self.cond:
            self.replies[rid].append(j)
            self.cond.notify_all()

    def request(self, payload):
        rid = uuid.uuid4().hex[:12]
        self.wall[rid] = time.time()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{self.prefix}/{rid}"
        if isinstance(payload, dict):
            payload = json.dumps({"id": rid, **payload})
        self.sent[rid] = time.monotonic()
        self.c.publish(f"{self.a.topic}/request", payload, qos=1, properties=props)
        return rid

    def terminal(self, rid, timeout):
        """The terminal messages of `rid` once one arrived (or [] after `timeout`)."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                t = [m for m in self.replies[rid] if m.get("done") or "error" in m]
                if t or time.monotonic() > end:
                    return t
                self.cond.wait(0.5)

    def first_piece(self, rid, timeout):
        end = time.monotonic() + timeout
        with self.cond:
            while not self.replies[rid] and time.monotonic() < end:
                self.cond.wait(0.2)

    def check(self, kind, rid, want=("done",)):
        t = self.terminal(rid, 60)
        if not t:
            self.sent.pop(rid, None)
            if in_restart(self.a, self.wall[rid]):
                return count(kind, "lost_in_restart")
            return count(kind, "FAIL", f"no terminal message for {rid} in 60 s")
        if len(t) > 1:
            # QoS 1 is at-least-once: an identical redelivery after a broker restart is not a
            # second answer; two different ones are.
            if all(m == t[0] for m in t):
                count(kind + "_redelivered", "ok")
            else:
                return count(kind, "FAIL", f"{len(t)} different terminal messages for {rid}: {t}")
        m = t[0]
        self.sent.pop(rid, None)
        if "error" in m:
            code = m["error"].get("code") if isinstance(m["error"], dict) else m["error"]
            if code == "busy":
                return count(kind, "busy")
            if "error" in want and code == "invalid_request":
                return count(kind, "refused")
            return count(kind, "FAIL", f"error {m['error']}")
        if "done" in want and m.get("finish_reason") in ("stop", "length", "cancelled"):
            return count(kind, "ok")
        count(kind, "FAIL", f"unexpected terminal {m}")


def in_restart(a, sent):
    """Whether a request sent at `sent` (Unix time) fell in a broker restart's window."""
    try:
        lines = open(a.restarts).read().split("\n")
    except OSError:
        return False
    for line in filter(None, lines):
        down, up = (float(x) for x in line.split())
        if down - 1 <= sent <= up + 20:
            return True
    return False


def mqtt_client(a, name, stop):
    m = Mqtt(a, name)
    while time.monotonic() < stop:
        pick = random.random()
        if pick < 0.35:
            rid = m.request({**chat_body(random.randint(8, 40), True), "stream": True})
            m.check("mqtt_stream", rid)
        elif pick < 0.65:
            rid = m.request({**chat_body(random.randint(4, 24), False), "stream": False})
            m.check("mqtt_whole", rid)
        elif pick < 0.85:
            rid = m.request({**chat_body(300, True), "stream": True})
            m.first_piece(rid, 60)
            m.c.publish(f"{a.topic}/cancel", json.dumps({"id": rid}), qos=1)
            m.check("mqtt_cancel", rid)
        else:
            bad = random.choice(['{"messages": [', '{"prompt": 5}',
                                 json.dumps({"prompt": "x" * (a.max_payload + 10)})])
            # Even a payload that is not JSON gets its error on the MQTT 5 response topic.
            rid = m.request(bad)
            m.check("mqtt_bad", rid, want=("error",))
        time.sleep(random.uniform(0, 0.3))
    m.c.loop_stop()
    return m


# ---------------------------------------------------------------------------------------- D-Bus
def busctl(a, *args):
    return subprocess.run(["busctl", f"--address={a.bus}", "--timeout=180", "call",
                           "org.edgellm.Inference1", "/org/edgellm/Inference1",
                           "org.edgellm.Inference1", *args],
                          capture_output=True, text=True, check=False)


def dbus_client(a, stop):
    while time.monotonic() < stop:
        pick = random.random()
        if pick < 0.5:
            r = busctl(a, "Chat", "a(ss)a{sv}", "1", "user", random.choice(["Hi", "Count to 5"]),
                       "1", "max_tokens", "u", str(random.randint(2, 20)))
            if r.returncode == 0:
                count("dbus_chat", "ok")
            elif "already waiting" in r.stderr:
                count("dbus_chat", "busy")
            else:
                count("dbus_chat", "FAIL", r.stderr.strip())
        elif pick < 0.7:
            r = busctl(a, "Chat", "a(ss)a{sv}", "1", "user", "Hi", "1", "max_tokens", "s", "ten")
            ok = r.returncode != 0 and "max_tokens" in r.stderr
            count("dbus_bad", "refused" if ok else "FAIL", r.stderr.strip() or r.stdout)
        else:
            p = subprocess.Popen([a.ask, "ask", "--dbus", "--address", a.bus, "--prompt",
                                  "Write a long story", "--max-tokens", "300", "--stream"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            time.sleep(random.uniform(0.3, 2))
            p.kill()
            p.wait()
            count("dbus_killed_client", "ok")
        time.sleep(random.uniform(0, 0.3))


def http_client(a, stop):
    kinds = [http_stream, http_stream, http_whole, http_whole, http_disconnect, http_bad,
             http_stream, http_whole, http_burst]
    while time.monotonic() < stop:
        f = random.choice(kinds)
        try:
            f(a)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            count(f.__name__, "FAIL", repr(e))
        time.sleep(random.uniform(0, 0.3))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--http", required=True, help="HOST:PORT")
    p.add_argument("--mqtt", required=True, help="HOST:PORT")
    p.add_argument("--topic", required=True, help="the node's topic prefix, edgellm/NODE")
    p.add_argument("--bus", required=True, help="D-Bus address")
    p.add_argument("--ask", required=True, help="the edgellm binary")
    p.add_argument("--queue-depth", type=int, default=2)
    p.add_argument("--max-body", type=int, default=1 << 20)
    p.add_argument("--max-payload", type=int, default=65536)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--restarts", default="", help="file of 'DOWN UP' Unix times, one restart a line")
    a = p.parse_args()
    random.seed(a.seed)
    stop = time.monotonic() + a.seconds
    mqtts = []
    threads = [threading.Thread(target=http_client, args=(a, stop)) for _ in range(2)]
    threads += [threading.Thread(target=lambda i=i: mqtts.append(mqtt_client(a, f"c{i}", stop)))
                for i in range(2)]
    threads += [threading.Thread(target=dbus_client, args=(a, stop))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    unanswered = [{"id": rid, "age_s": round(time.monotonic() - t0, 1)}
                  for m in mqtts for rid, t0 in m.sent.items()]
    out = {"kinds": {k: dict(v) for k, v in sorted(tally.items())},
           "failures": failures, "failure_count": sum(v["FAIL"] for v in tally.values()),
           "unanswered_mqtt": unanswered}
    print(json.dumps(out, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
