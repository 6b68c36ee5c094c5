#!/usr/bin/env bash
# REST cost per request, measured two ways: the project's `loadgen rest` and `wrk` (a load
# generator nobody here wrote), each against chatloop and against `loadgen httpfloor` (a
# minimal keep-alive HTTP server answering with a canned response of chatloop's size), in the
# same run.
#
#   tools/restcpu.sh              # REST_REPEAT rounds of the four combinations
#
# Each combination: a fresh server pinned to CPU 0, the client pinned to CPU 1, REST_CLIENTS
# (16) keep-alive connections doing `POST /sessions` back to back for REST_DURATION (5s).
# Server CPU: exact run time from /proc/PID/schedstat around the client's run (set-up
# included: 16 connects), the tick-sampled user/sys split from /proc/PID/stat, and (with
# perf, on by default) the user-space share of `perf record -F 4999` samples taken over the
# middle of the run, which gives user-space CPU per request without the tick sampling.
# wrk is installed from the Debian package `wrk` when missing (apt-get, as root).
#
# With REST_PING (1), each round also runs chatloop under `loadgen rest --path /ping`: a
# stateless GET through the same HTTP parsing, routing, headers and write, so its user-space
# figure beside the minimal server's is the HTTP path alone, and the difference to `POST
# /sessions` is what creating and keeping a session costs.
# Environment: REST_DURATION (5s), REST_CLIENTS (16), REST_REPEAT (1), REST_OUT
# (target/restcpu), REST_PERF (1; 0 = no perf), REST_PING (1; 0 = skip the /ping run),
# BENCH_NO_BUILD=1 (skip the release builds).
# Only processes started here are stopped; every wait is bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DUR=${REST_DURATION:-5s}
CLIENTS=${REST_CLIENTS:-16}
REPEAT=${REST_REPEAT:-1}
OUT=${REST_OUT:-$ROOT/target/restcpu}
PERF=${REST_PERF:-1}
PING=${REST_PING:-1}
mkdir -p "$OUT"
SECS=${DUR%s}

if ! command -v wrk >/dev/null; then
    echo "== installing wrk (Debian package)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; }
    else sudo apt-get install -y wrk >&2; fi
fi
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null; then
    echo "== no perf: user-space share from the tick-sampled /proc split only" >&2
    PERF=0
fi
if [ -z "${BENCH_NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release 2>&1 | tail -n 1) >&2
    (cd "$ROOT/tools/loadgen" && cargo build --release 2>&1 | tail -n 1) >&2
fi
LG=$ROOT/tools/loadgen/target/release/loadgen
SRV_PIN=() CLI_PIN=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then SRV_PIN=(taskset -c 0) CLI_PIN=(taskset -c 1); fi

# shellcheck source=tools/lib/server.sh
. "$ROOT/tools/lib/server.sh"
PERF_PID=""
cleanup() {
    if [ -n "$PERF_PID" ] && kill -0 "$PERF_PID" 2>/dev/null; then kill -INT "$PERF_PID" 2>/dev/null || true; wait "$PERF_PID" 2>/dev/null || true; fi
    stop_chatloop
}
trap cleanup EXIT
trap 'exit 130' INT TERM

jget() { grep -o "\"$2\":[^,}]*" "$1" | head -n 1 | cut -d: -f2- | tr -d '"' || true; }
calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
# "run_ns utime_us stime_us" of the server.
sample() {
    local stat run
    run=$(cut -d' ' -f1 "/proc/$SERVER_PID/schedstat")
    stat=$(cat "/proc/$SERVER_PID/stat")
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo "$run $((${12} * TICK_US)) $((${13} * TICK_US))"
}

cat >"$OUT/post_sessions.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"username":"rest-bench"}'
wrk.headers["Content-Type"] = "application/json"
EOF

SUMMARY=()
say() { SUMMARY+=("$1"); echo "$1" >&2; }
REST_BYTES=243

# one SERVER CLIENT NAME
one() {
    local server=$1 client=$2 name=$3 log=$OUT/$3.server.log b a reqs rps share="" lat=""
    if [ "$server" = chatloop ]; then
        SERVER_PREFIX=("${SRV_PIN[@]}") SERVER_ARGS0=()
        CHATLOOP_BIN=$ROOT/target/release/chatloop start_chatloop "$log" \
            --create-rate 0 --max-connections-per-ip 0 --max-rooms-per-session 0 --upgrade-rate 0 || exit 1
    else
        SERVER_PREFIX=("${SRV_PIN[@]}") SERVER_ARGS0=(httpfloor --duration 600s --response-bytes "$REST_BYTES")
        CHATLOOP_BIN=$LG start_chatloop "$log" || exit 1
        SERVER_ARGS0=()
    fi
    b=$(sample)
    if [ "$PERF" = 1 ]; then
        # Samples over the middle of the run (1 s in, up to 1 s before the end).
        (sleep 1; exec perf record -q -F 4999 -p "$SERVER_PID" -o "$OUT/$name.perf.data" -- sleep "$(calc "$SECS - 2")") \
            >/dev/null 2>"$OUT/$name.perf.log" &
        PERF_PID=$!
    fi
    if [ "$client" = loadgen ] || [ "$client" = ping ]; then
        local path=()
        [ "$client" = ping ] && path=(--path /ping)
        "${CLI_PIN[@]}" "$LG" rest --addr "127.0.0.1:$PORT" --clients "$CLIENTS" --duration "$DUR" "${path[@]}" >"$OUT/$name.json" 2>"$OUT/$name.log"
        reqs=$(jget "$OUT/$name.json" requests) rps=$(jget "$OUT/$name.json" requests_per_s)
        lat="p50 $(jget "$OUT/$name.json" lat_p50_us)us p99 $(jget "$OUT/$name.json" lat_p99_us)us"
        [ "$server" = chatloop ] && [ "$client" = loadgen ] && REST_BYTES=$(jget "$OUT/$name.json" response_bytes)
    else
        "${CLI_PIN[@]}" wrk -t1 -c"$CLIENTS" -d"$DUR" --latency -s "$OUT/post_sessions.lua" "http://127.0.0.1:$PORT/sessions" >"$OUT/$name.txt" 2>&1
        reqs=$(awk '/requests in/ { print $1 }' "$OUT/$name.txt")
        rps=$(awk '/^Requests\/sec/ { print $2 }' "$OUT/$name.txt")
        lat="p50 $(awk '$1 == "50%" { print $2 }' "$OUT/$name.txt") p99 $(awk '$1 == "99%" { print $2 }' "$OUT/$name.txt")"
        grep -q "Non-2xx" "$OUT/$name.txt" && lat="$lat; $(grep Non-2xx "$OUT/$name.txt" | xargs)"
    fi
    a=$(sample)
    if [ -n "$PERF_PID" ]; then wait "$PERF_PID" 2>/dev/null || true; PERF_PID=""; fi
    stop_chatloop
    local bn bu bs an au as total user sys
    read -r bn bu bs <<<"$b"
    read -r an au as <<<"$a"
    total=$(calc "($an - $bn) / 1000 / $reqs")
    user=$(calc "($au - $bu) / $reqs") sys=$(calc "($as - $bs) / $reqs")
    local perfline=""
    if [ "$PERF" = 1 ] && [ -s "$OUT/$name.perf.data" ]; then
        # Share of samples outside the kernel (chatloop or loadgen, libc, vDSO).
        share=$(perf report -i "$OUT/$name.perf.data" --stdio --sort dso 2>/dev/null |
            awk '/^ *[0-9.]+%/ { p = $1; sub("%", "", p); if ($2 ~ /kernel/) k += p; else u += p }
                 END { if (k + u > 0) printf "%.4f", u / (k + u); else print "" }')
        [ -n "$share" ] && perfline="; perf: user space $(calc "$share * 100")% of samples => user $(calc "$share * $total") us, kernel $(calc "(1 - $share) * $total") us per request"
    fi
    eval "TOTAL_${server}_${client}=$total"
    local who=$client
    [ "$client" = ping ] && who="loadgen, GET /ping"
    say "$server <- $who: $reqs requests, $rps req/s, latency $lat; server CPU per request $total us (schedstat); ticks user $user + sys $sys us$perfline"
}

for rep in $(seq "$REPEAT"); do
    [ "$REPEAT" -gt 1 ] && say "-- round $rep of $REPEAT (load $(cut -d' ' -f1-3 /proc/loadavg))"
    TOTAL_chatloop_loadgen=0 TOTAL_floor_loadgen=0 TOTAL_chatloop_wrk=0 TOTAL_floor_wrk=0
    one chatloop loadgen "chatloop-loadgen-$rep"
    one floor loadgen "floor-loadgen-$rep"
    one chatloop wrk "chatloop-wrk-$rep"
    one floor wrk "floor-wrk-$rep"
    [ "$PING" = 1 ] && one chatloop ping "chatloop-ping-$rep"
    say "   ratio chatloop / minimal server: loadgen $(calc "$TOTAL_chatloop_loadgen / $TOTAL_floor_loadgen")x, wrk $(calc "$TOTAL_chatloop_wrk / $TOTAL_floor_wrk")x (goal <= 1.1x)"
done
echo >&2
echo "== summary (load at the end $(cut -d' ' -f1-3 /proc/loadavg); files in $OUT/)"
printf '%s\n' "${SUMMARY[@]}"
