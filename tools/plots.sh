#!/usr/bin/env bash
# Regenerates the latency-by-percentile plots in docs/bench/ with one command:
#
#   tools/plots.sh            # runs the fan-out scenarios, then draws docs/bench/*.svg
#   PLOTS_NO_RUN=1 tools/plots.sh   # only redraws from the last run's JSON (target/plots)
#
# Runs `tools/bench.sh fanout10x50 floor10x50 relay10x50 fanout1k floor1k relay1k` (chatloop,
# the write floor and the relay floor of each shape, in the same run; BENCH_* settings apply,
# BENCH_DURATION defaults to 10s here) with its JSON in PLOTS_OUT (target/plots), then
# tools/latplot.py draws one SVG per shape: docs/bench/fanout10x50.svg, docs/bench/fanout1k.svg.
# Then PLOTS_ROUNDS (3) rounds of `fanout10x50 relay10x50` (10 s each) go into one plot,
# docs/bench/tail10x50-rounds.svg: the tail from round to round (PLOTS_ROUNDS=0: skipped).
# Needs python3 (standard library only).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${PLOTS_OUT:-$ROOT/target/plots}
DOCS=$ROOT/docs/bench
mkdir -p "$OUT" "$DOCS"
if [ -z "${PLOTS_NO_RUN:-}" ]; then
    # What the titles say: the commit, the time and the 1-minute load when the run began.
    echo "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +'%Y-%m-%d %H:%M UTC'), load $(cut -d' ' -f1 /proc/loadavg)" >"$OUT/meta"
    BENCH_OUT=$OUT BENCH_DURATION=${BENCH_DURATION:-10s} "$ROOT/tools/bench.sh" \
        fanout10x50 floor10x50 relay10x50 fanout1k floor1k relay1k | tee "$OUT/summary.txt"
    for r in $(seq 1 "${PLOTS_ROUNDS:-3}"); do
        BENCH_OUT=$OUT/round$r BENCH_DURATION=${BENCH_DURATION:-10s} "$ROOT/tools/bench.sh" \
            fanout10x50 relay10x50 | tee -a "$OUT/summary.txt"
    done
    sed -i "s/\$/ to $(cut -d' ' -f1 /proc/loadavg)/" "$OUT/meta" # the load at the end too
fi
meta=$(cat "$OUT/meta" 2>/dev/null || echo "unknown run")
for shape in 10x50 1k; do
    name=$shape
    [ "$shape" = 1k ] && name=1x1000
    python3 "$ROOT/tools/latplot.py" "$DOCS/fanout$shape.svg" \
        "fan-out $name: chatloop and the floors ($meta)" \
        "chatloop=$OUT/fanout$shape.json" "relay floor=$OUT/relay$shape.json" \
        "write floor=$OUT/floor$shape.json"
done
rounds=()
for r in $(seq 1 "${PLOTS_ROUNDS:-3}"); do
    [ -e "$OUT/round$r/fanout10x50.json" ] || continue
    rounds+=("chatloop round $r=$OUT/round$r/fanout10x50.json" "relay floor round $r=$OUT/round$r/relay10x50.json")
done
if [ ${#rounds[@]} -gt 0 ]; then
    python3 "$ROOT/tools/latplot.py" "$DOCS/tail10x50-rounds.svg" \
        "fan-out 10x50, round by round: chatloop and the relay floor ($meta)" "${rounds[@]}"
fi
