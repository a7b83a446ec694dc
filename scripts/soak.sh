#!/usr/bin/env bash
# Soak test: edgellmd on the real model (SmolLM2-135M-Instruct, fetched and packaged as the demo
# does; the qwen2 test fixture when it cannot be fetched) with D-Bus, MQTT and HTTP on, clients
# on every transport sending a mix for MINUTES (scripts/soak-clients.py: streamed and whole,
# cancelled, disconnecting, malformed, oversize, past the queue), the broker restarted every
# few minutes. Every 10 s it samples the daemon's RSS, open descriptors, threads and queue.
#
#   scripts/soak.sh [MINUTES]          (default 60; CI runs 2)
#
# Pass: every request ends with exactly one terminal message and no error but the intended
# ones (the clients check), nothing runs or waits at the end, edgellmd exits 0 on SIGTERM,
# RSS grows less than 1% over the last half (5% in runs under 10 minutes, still warming up),
# descriptors and threads do not grow over it.
# Writes samples.csv, clients.json, summary.md and rss.png to $SOAK_OUT (default target/soak).
set -euo pipefail
name=soak
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/services-lib.sh
source scripts/services-lib.sh

minutes="${1:-60}"
out="${SOAK_OUT:-$root/target/soak}"
mkdir -p "$out"
restart_every=$((minutes <= 5 ? 50 : 180))

python="$(scripts/setup-test-venv.sh)"
library="${ORT_DYLIB_PATH:-$(scripts/fetch-onnxruntime.sh)}"
cargo build --locked -p edgellm -p edgellm-export >&2
bin="$root/target/debug"

services_init
trap 'services_cleanup' EXIT
step "Model"
if package="$(EDGELLM_EXPORT="$bin/edgellm-export" scripts/fetch-model.sh smollm2-135m-instruct)"; then
    model=smollm2-135m-instruct
else
    echo "soak: the real model could not be fetched: the qwen2 test fixture instead" >&2
    package="$tmp/fixture"
    "$bin/edgellm-export" --hf tests/fixtures/qwen2/checkpoint --out "$package" >/dev/null
    model=qwen2-fixture
fi
echo "package: $package ($model)"

step "Services"
start_mosquitto "persistence true" "persistence_location $tmp/"
mosquitto="$(find_program mosquitto)"
mqtt_port="${mqtt_url##*:}"
start_dbus
node=soak
http_port=$((20000 + RANDOM % 40000))
while port_open "$http_port"; do http_port=$((20000 + RANDOM % 40000)); done
queue_depth=4
config="$tmp/edgellmd.toml"
write_edgellmd_config "$config" "$package" 1024 "$library"
cat >>"$config" <<EOF

[limits]
queue_depth = $queue_depth

[http]
enabled = true
listen = "127.0.0.1:$http_port"
EOF
start_edgellmd "$bin" "$config"
wait_edgellmd_ready 300 "$bin/edgellm" ask

metrics() {
    "$python" - "$http_port" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
vals = {}
for line in text.splitlines():
    for name in ("edgellm_queue_length", "edgellm_running_sequences"):
        if line.startswith(name + " ") or line.startswith(name + "{"):
            vals[name] = float(line.rsplit(" ", 1)[1])
print(int(vals.get("edgellm_queue_length", -1)), int(vals.get("edgellm_running_sequences", -1)))
EOF
}
sample() {
    local rss threads fds qr
    rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$edgellmd_pid/status")"
    threads="$(awk '/^Threads:/ { print $2 }' "/proc/$edgellmd_pid/status")"
    fds="$(find "/proc/$edgellmd_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)"
    qr="$(metrics || echo "-1 -1")"
    echo "$((SECONDS - t0)),$rss,$fds,$threads,${qr% *},${qr#* }" >>"$out/samples.csv"
}

step "Soak: $minutes min, broker restarted every $restart_every s"
echo "t_s,rss_kb,fds,threads,queue,running" >"$out/samples.csv"
: >"$out/restarts"
t0=$SECONDS
"$python" scripts/soak-clients.py --seconds "$((minutes * 60))" --http "127.0.0.1:$http_port" \
    --mqtt "127.0.0.1:$mqtt_port" --topic "edgellm/$node" --bus "$bus_address" \
    --ask "$bin/edgellm" --queue-depth "$queue_depth" --restarts "$out/restarts" \
    >"$out/clients.json" &
clients=$!
next_sample=0
next_restart=$restart_every
restarts=0
while kill -0 "$clients" 2>/dev/null; do
    kill -0 "$edgellmd_pid" 2>/dev/null || die "edgellmd died; its log: $tmp/edgellmd.log"
    if ((SECONDS - t0 >= next_sample)); then
        sample
        next_sample=$((next_sample + 10))
    fi
    if ((SECONDS - t0 >= next_restart && SECONDS - t0 < minutes * 60 - 20)); then
        echo "restarting the broker (t = $((SECONDS - t0)) s)"
        down="$(date +%s.%N)"
        stop_child "$mosquitto_pid" 5 || true
        "$mosquitto" -c "$tmp/mosquitto.conf" >>"$tmp/mosquitto.out" 2>&1 &
        mosquitto_pid=$!
        for _ in $(seq 100); do port_open "$mqtt_port" && break; sleep 0.1; done
        echo "$down $(date +%s.%N)" >>"$out/restarts"
        restarts=$((restarts + 1))
        next_restart=$((next_restart + restart_every))
    fi
    sleep 1
done
clients_rc=0
wait "$clients" || clients_rc=$?
sleep 2
sample
end_state="$(metrics)"
step "Stop"
stop_edgellmd || die "edgellmd did not exit 0 on SIGTERM"

"$python" - "$out" "$minutes" "$model" "$restarts" "$clients_rc" "$end_state" <<'EOF'
import csv, json, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, minutes, model, restarts, clients_rc, end_state = sys.argv[1:]
every = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(f"{out}/samples.csv"))]
# The checks read the samples taken while the clients ran (the last one: after they ended).
rows = [r for r in every if r["t_s"] <= int(minutes) * 60] or every
clients = json.load(open(f"{out}/clients.json"))
half = [r for r in rows if r["t_s"] >= rows[-1]["t_s"] / 2]
rss_half = statistics.median(r["rss_kb"] for r in half[:3])
rss_end = statistics.median(r["rss_kb"] for r in half[-3:])
growth = (rss_end - rss_half) / rss_half * 100
quarter = [r for r in rows if r["t_s"] >= rows[-1]["t_s"] * 3 / 4]
first_half = [r for r in rows if r["t_s"] < rows[-1]["t_s"] / 2]
def grows(key, slack):
    return max(r[key] for r in quarter) > max(r[key] for r in first_half) + slack
queue, running = (int(x) for x in end_state.split())
rss_bound = 1.0 if int(minutes) >= 10 else 5.0
checks = {
    "every request one terminal message, no unintended error": clients_rc == "0",
    "nothing waiting or running at the end": queue == 0 and running == 0,
    # The 1% bound is for runs long enough to be past warm-up (allocator arenas, caches); a
    # run of a few minutes is still warming up in its second half (+0.8% seen in 2 minutes),
    # so short runs (CI's) hold it to 5%: a leak shows there too, a warm-up does not fail.
    f"RSS growth over the last half < {rss_bound:g}%": growth < rss_bound,
    "descriptors do not grow (last quarter <= first half's max + 4)": not grows("fds", 4),
    # tokio's blocking pool starts threads as load needs them and ends them after 10 s idle:
    # the count moves with the load; a leak grows past any such swing.
    "threads do not grow (last quarter <= first half's max + 4)": not grows("threads", 4),
}
total = {k: sum(v.values()) for k, v in clients["kinds"].items()}
lines = [f"# Soak: {minutes} min, {model}, broker restarted {restarts} times", "",
         "| kind | " + " | ".join(["requests", "outcomes"]) + " |", "|---|---|---|"]
for k, v in clients["kinds"].items():
    lines.append(f"| {k} | {total[k]} | " + ", ".join(f"{o} {n}" for o, n in sorted(v.items())) + " |")
lines += ["", f"RSS: {rows[0]['rss_kb']/1024:.1f} MiB at start, {rss_half/1024:.1f} MiB at half time, "
          f"{rss_end/1024:.1f} MiB at the end ({growth:+.2f}% over the last half); "
          f"descriptors {int(min(r['fds'] for r in rows))}-{int(max(r['fds'] for r in rows))}, "
          f"threads {int(min(r['threads'] for r in rows))}-{int(max(r['threads'] for r in rows))}; "
          f"{len(rows)} samples.", ""]
lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()]
if clients["failures"]:
    lines += ["", "Failures:"] + [f"- {f}" for f in clients["failures"]]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

fig, ax = plt.subplots(figsize=(8, 3.5))
t = [r["t_s"] / 60 for r in rows]
ax.plot(t, [r["rss_kb"] / 1024 for r in rows], label="RSS (MiB)")
ax.set_ylim(0, max(r["rss_kb"] for r in rows) / 1024 * 1.15)
ax.set_xlabel("minutes")
ax.set_ylabel("RSS (MiB)")
ax2 = ax.twinx()
ax2.set_ylim(0, max(max(r["fds"], r["threads"]) for r in rows) * 1.5)
ax2.plot(t, [r["fds"] for r in rows], color="tab:orange", alpha=0.6, label="open descriptors")
ax2.plot(t, [r["threads"] for r in rows], color="tab:green", alpha=0.6, label="threads")
ax2.set_ylabel("count")
ax.set_title(f"edgellmd soak: {model}, {minutes} min, all transports")
h1, l1 = ax.get_legend_handles_labels()
h2, l2 = ax2.get_legend_handles_labels()
ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
fig.tight_layout()
fig.savefig(f"{out}/rss.png", dpi=100)
sys.exit(0 if all(checks.values()) else 1)
EOF
