#!/usr/bin/env bash
# Runs the fuzz targets (fuzz/fuzz_targets/: libFuzzer through cargo-fuzz) for SECONDS each and
# prints, per target, the inputs executed and the coverage reached.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      (defaults: all, 60)
#
# The fuzzers are built with the stable toolchain, coverage instrumentation and debug
# assertions (integer overflow panics), without AddressSanitizer: that needs a nightly
# compiler, which the registries this project builds from do not give us, and the parsers are
# safe Rust (the few `unsafe` blocks map files). Each target checks invariants besides "no
# panic" (docs/fuzzing.md). Inputs found go to fuzz/corpus/TARGET (not committed, seeded from
# fuzz/seeds/TARGET); a failing input is saved under fuzz/artifacts/TARGET and the script fails:
# turn it into a regression test, fix, then run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target="${1:-all}"
seconds="${2:-60}"
cargo_fuzz_version=0.13.2
tools="$PWD/.tools"
export PATH="$tools/bin:$PATH"
if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    cargo install cargo-fuzz --locked --version "$cargo_fuzz_version" --root "$tools" >&2
fi

# The fuzz workspace's own Cargo.lock is committed: refuse to build with anything else.
cargo fetch --locked --manifest-path fuzz/Cargo.toml
# The same flags for build and run, so the run reuses the build.
flags=(--sanitizer none --debug-assertions)
cargo fuzz build "${flags[@]}" >&2
if [[ "$target" == all ]]; then
    mapfile -t targets < <(cargo fuzz list)
else
    targets=("$target")
fi

printf '%-16s %12s %10s %8s %8s\n' target executions "exec/s" cov features
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    # -rss_limit_mb / -malloc_limit_mb: a reader that asks for gigabytes fails here as a
    # crash, besides the targets' own proportional allocation checks.
    if ! cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -print_final_stats=1 -close_fd_mask=1 >"$log" 2>&1; then
        status=1
        echo "fuzz.sh: $t FAILED; the input is under fuzz/artifacts/$t (log: $log):" >&2
        grep -E "panicked|ERROR|Test unit written" "$log" | head -n 5 >&2 || tail -n 20 "$log" >&2
    fi
    stat() { sed -n "s/^stat::$1: *//p" "$log"; }
    execs="$(stat number_of_executed_units)"
    rate="$(stat average_exec_per_sec)"
    last="$(grep -E '^#[0-9]+' "$log" | tail -n 1)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
    printf '%-16s %12s %10s %8s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}"
done
exit "$status"
