#!/usr/bin/env bash
# Soak test: a fresh release chatloop, `loadgen soak` against it (random chat, typing, drops and
# `since` reconnects, sessions leaving and being replaced; every delivery checked), and the
# server's memory and CPU before, during and after.
#
#   tools/soak.sh                                       # 200 clients, 10 rooms, 30 s
#   tools/soak.sh --clients 3000 --rooms 100 --duration 10m --seed 7
#
# Arguments are passed to `loadgen soak` (see tools/loadgen/README.md); --addr and --server-pid
# are added here. Environment: SOAK_OUT (target/soak), SOAK_ROOM_TTL (5s: short, so rooms expire
# right after the run and memory can be seen going back to the live state), SOAK_SERVER_ARGS
# (more chatloop flags), SOAK_PIN=1 (chatloop on CPU 0, loadgen on CPU 1; off by default: a soak
# is about correctness and memory, and pinning onto a core another job uses only hurts),
# SOAK_NO_BUILD=1 (skip both cargo builds), SOAK_SETTLE (5: seconds between the rooms' expiry and
# the "after TTL" sample), SOAK_SERVER_BIN (another chatloop binary, e.g. a copy
# that a concurrent build cannot replace during a long run), SOAK_HEAP=1 (with gdb: also read the
# server's live heap, glibc `malloc_stats()` "in use bytes", before the run and after the TTL, then
# `malloc_trim(0)` and RSS again: tells memory the allocator merely keeps from live objects).
#
# Figures: server RSS before the run, its peak (VmHWM), right after the clients are gone, and
# after the room TTL has passed (rooms and their histories deleted; sessions stay: they expire
# after 24 h); what is left over the start, per remaining session; server CPU over the run.
# Exit status: loadgen's (non-zero on any loss, duplicate, reordering or error). Only the server
# started here is stopped, on exit too. Every wait is bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${SOAK_OUT:-$ROOT/target/soak}
TTL=${SOAK_ROOM_TTL:-5s}
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--clients 200 --rooms 10 --duration 30s)
mkdir -p "$OUT"

# shellcheck source=tools/lib/server.sh
. "$ROOT/tools/lib/server.sh"
release_binaries "${SOAK_NO_BUILD:-}" "${SOAK_SERVER_BIN:-}"

SRV_PIN=() LG_PIN=()
if [ "${SOAK_PIN:-0}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    SRV_PIN=(taskset -c 0) LG_PIN=(taskset -c 1)
fi

SERVER_PREFIX=("${SRV_PIN[@]}")
CHATLOOP_BIN=$SERVER_BIN
trap stop_chatloop EXIT
trap 'exit 130' INT TERM

LOG=$OUT/server.log
# shellcheck disable=SC2086
# The soak's clients all come from loopback addresses and create sessions and rooms in bulk:
# chatloop's per-address and per-session budgets are off for it.
start_chatloop "$LOG" --room-ttl "$TTL" --create-rate 0 --max-connections-per-ip 0 \
    --max-rooms-per-session 0 ${SOAK_SERVER_ARGS:-} || exit 1
ADDR=127.0.0.1:$PORT
echo "== chatloop pid $SERVER_PID listening on $ADDR, --room-ttl $TTL (log: $LOG)" >&2

TICK_US=$((1000000 / $(getconf CLK_TCK)))
# "utime_us stime_us rss_kib hwm_kib" of the server.
sample() {
    local stat
    stat=$(cat "/proc/$SERVER_PID/stat") || { echo "chatloop (pid $SERVER_PID) is gone" >&2; exit 1; }
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat # $1 is field 3, so field N is $((N-2))
    echo "$((${12} * TICK_US)) $((${13} * TICK_US)) $(awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status") $(awk '/^VmHWM:/ {print $2}' "/proc/$SERVER_PID/status")"
}
# metric NAME: a gauge or counter from /metrics (empty if unavailable).
metric() { curl -s --max-time 5 "http://$ADDR/metrics" | awk -v m="$1" '$1 == m {print $2}' || true; }
# heap_in_use: glibc's "in use bytes" (all arenas and mmapped blocks) of the server, in KiB.
# malloc_stats() prints to the server's stderr, which is $LOG. Empty unless SOAK_HEAP=1 and gdb.
heap_in_use() {
    [ "${SOAK_HEAP:-0}" = 1 ] && command -v gdb >/dev/null || return 0
    timeout 60 gdb -p "$SERVER_PID" -batch -ex 'call (void)malloc_stats()' >/dev/null 2>&1 || return 0
    awk '/^Total \(incl. mmap\):/ {t = 1} t && /in use bytes/ {v = $5; t = 0} END {if (v != "") print int(v / 1024)}' "$LOG"
}
jget() { grep -o "\"$2\":[^,}]*" "$1" | head -n 1 | cut -d: -f2- | tr -d '"' || true; }
calc() { awk "BEGIN { printf \"%.1f\", $1 }"; }

sleep 0.5
HEAP0=$(heap_in_use)
read -r U0 S0 RSS0 _ <<<"$(sample)"
echo "== before: RSS $RSS0 KiB${HEAP0:+, heap in use $HEAP0 KiB}, CPU user $((U0 / 1000)) ms sys $((S0 / 1000)) ms" >&2

JSON=$OUT/soak.json
T0=$(date +%s)
set +e
"${LG_PIN[@]}" "$LG" soak --addr "$ADDR" --server-pid "$SERVER_PID" "${ARGS[@]}" >"$JSON" 2> >(tee "$OUT/soak.log" >&2)
RC=$?
set -e
T1=$(date +%s)
kill -0 "$SERVER_PID" 2>/dev/null || { echo "chatloop died during the soak; see $LOG" >&2; exit 1; }

# Clients gone (loadgen closed every socket before exiting); rooms still live until the TTL.
sleep 1
read -r U1 S1 RSS1 HWM <<<"$(sample)"
WS1=$(metric chatloop_websockets)
ROOMS1=$(metric chatloop_rooms)
SESS1=$(metric chatloop_sessions)
MSGS=$(metric chatloop_messages_total)

# After the room TTL: rooms (and their histories) are deleted; sessions stay (24 h).
TTL_S=$(awk -v t="$TTL" 'BEGIN { if (t ~ /ms$/) print int(t / 1000) + 1; else if (t ~ /m$/) print int(t * 60) + 1; else print int(t) + 1 }')
for _ in $(seq $((TTL_S * 10 + 200))); do
    [ "$(metric chatloop_rooms)" = 0 ] && break
    sleep 0.1
done
sleep "${SOAK_SETTLE:-5}" # allocators that purge on a timer (jemalloc's decay) need a moment
read -r _ _ RSS2 _ <<<"$(sample)"
ROOMS2=$(metric chatloop_rooms)
SESS2=$(metric chatloop_sessions)
TIMERS2=$(metric chatloop_timers_armed)
HEAP2=$(heap_in_use)
RSS3=
if [ -n "$HEAP2" ]; then
    timeout 60 gdb -p "$SERVER_PID" -batch -ex 'call (int)malloc_trim(0)' >/dev/null 2>&1 || true
    read -r _ _ RSS3 _ <<<"$(sample)"
fi

CPU_MS=$(((U1 - U0 + S1 - S0) / 1000))
CHECKED=$(jget "$JSON" checked)
CHECKED=${CHECKED:-0}
RUN_S=$((T1 - T0))
{
    echo "soak: loadgen exit $RC, $(jget "$JSON" clients) clients / $(jget "$JSON" rooms) rooms, $(jget "$JSON" duration_s) s (+ set-up and drain: $RUN_S s wall)"
    echo "    integrity: lost $(jget "$JSON" lost), duplicates $(jget "$JSON" duplicates), reordered $(jget "$JSON" reordered), phantom $(jget "$JSON" phantom), truncated welcomes $(jget "$JSON" truncated), errors $(jget "$JSON" errors)"
    echo "    traffic: $(jget "$JSON" sessions_started) sessions, $(jget "$JSON" connects) connections ($(jget "$JSON" reconnects_since) with since), $(jget "$JSON" chats_sent) chats sent, $(jget "$JSON" room_messages) stored messages, $(jget "$JSON" checked) deliveries checked"
    echo "    server RSS: before $RSS0 KiB, peak $HWM KiB, clients gone $RSS1 KiB ($WS1 websockets, $ROOMS1 rooms, $SESS1 sessions), after room TTL $RSS2 KiB ($ROOMS2 rooms, $SESS2 sessions, $TIMERS2 timers)"
    if [ -n "$SESS2" ] && [ "$SESS2" -gt 0 ]; then
        echo "    RSS left over after TTL: $((RSS2 - RSS0)) KiB = $(calc "($RSS2 - $RSS0) * 1024 / $SESS2") bytes per remaining session"
        if [ -n "$HEAP0" ] && [ -n "$HEAP2" ]; then
            echo "    heap in use: before $HEAP0 KiB, after TTL $HEAP2 KiB: $((HEAP2 - HEAP0)) KiB = $(calc "($HEAP2 - $HEAP0) * 1024 / $SESS2") bytes per remaining session; RSS after malloc_trim(0) $RSS3 KiB"
        fi
    fi
    echo "    server CPU over the run: $CPU_MS ms (user $(((U1 - U0) / 1000)) ms, sys $(((S1 - S0) / 1000)) ms) = $(calc "$CPU_MS / ($RUN_S > 0 ? $RUN_S : 1) / 10")% of a core; $(calc "($U1 - $U0 + $S1 - $S0) / ($CHECKED > 0 ? $CHECKED : 1)") us per checked delivery (${MSGS:-?} stored messages)"
} | tee "$OUT/summary.txt" >&2
echo "== JSON: $JSON, log: $OUT/soak.log, summary: $OUT/summary.txt" >&2
exit "$RC"
