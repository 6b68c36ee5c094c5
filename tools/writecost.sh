#!/usr/bin/env bash
# What one write costs the fan-out, by system call: `send` against a one-slice `writev`.
#
#   tools/writecost.sh          # WRITECOST_PAIRS (8) pairs, then the median difference
#
# Each pair runs the relay floor (`loadgen floor --relay`, 1 room of 1 000 members at
# WRITECOST_RATE (150) msg/s, writer on CPU 0, readers on CPU 1) twice back to back: once
# writing every frame with `send` (the floor's default, std's socket write) and once with
# `--writev` (the same bytes as a one-slice `writev`, which is what chatloop used before it
# moved to `send`/`sendmsg`). The figure is the writer thread's exact CPU time per delivery
# (schedstat), so the pair differs only in the system call. Alternating the two within a pair
# keeps the shared machine's drift out of the difference; the median over pairs is the result.
# Environment: WRITECOST_PAIRS (8), WRITECOST_RATE (150), WRITECOST_DURATION (4s),
# BENCH_NO_BUILD=1 (skip the release build of tools/loadgen). Every run stops by itself.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PAIRS=${WRITECOST_PAIRS:-8}
RATE=${WRITECOST_RATE:-150}
DUR=${WRITECOST_DURATION:-4s}
OUT=${WRITECOST_OUT:-$ROOT/target/writecost}
mkdir -p "$OUT"
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    (cd "$ROOT/tools/loadgen" && cargo build --release 2>&1 | tail -n 1) >&2
fi
LG=$ROOT/tools/loadgen/target/release/loadgen
PIN=()
[ "$(nproc)" -ge 2 ] && PIN=(--writer-cpu 0 --reader-cpu 1)
ulimit -n "$(ulimit -Hn)"

jget() { grep -o "\"$2\":[^,}]*" "$1" | head -n 1 | cut -d: -f2- | tr -d '"' || true; }
echo "pair send_us writev_us difference (writer CPU per delivery; load $(cut -d' ' -f1 /proc/loadavg))"
diffs=()
for i in $(seq "$PAIRS"); do
    line="$i"
    for how in send writev; do
        flag=()
        [ "$how" = writev ] && flag=(--writev)
        "$LG" floor --relay --rooms 1 --members 1000 --rate "$RATE" --duration "$DUR" --warmup 1s \
            --frame-bytes 200 "${PIN[@]}" "${flag[@]}" >"$OUT/$how-$i.json" 2>"$OUT/$how-$i.log"
        line="$line $(jget "$OUT/$how-$i.json" writer_total_us_per_delivery)"
    done
    read -r _ s w <<<"$line"
    d=$(awk "BEGIN { printf \"%+.3f\", $w - $s }")
    diffs+=("$d")
    echo "$line $d"
done
printf '%s\n' "${diffs[@]}" | sort -g | awk -v n="$PAIRS" '
    { v[NR] = $1; if ($1 > 0) pos++ }
    END { m = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
          printf "median writev - send: %+.3f us per delivery; writev dearer in %d of %d pairs (load %s)\n", m, pos, n, load }' \
    load="$(cut -d' ' -f1 /proc/loadavg)"
