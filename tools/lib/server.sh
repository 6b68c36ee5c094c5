# shellcheck shell=bash
# Shared by tools/suites/*.sh, tools/bench.sh and tools/soak.sh: start a chatloop on a free
# loopback port and stop it again; the benchmarks also find (and build) their binaries here.
# Source it (with ROOT set to the clone), then:
#   release_binaries NO_BUILD [SERVER_BIN]
#                                       unless NO_BUILD is non-empty, builds chatloop and
#                                       tools/loadgen (release); sets SERVER_BIN (the given one, or
#                                       the release build) and LG (the loadgen), or exits 1; raises
#                                       the open-files limit to its hard limit
#   start_chatloop LOGFILE [flags...]   sets SERVER_PID and PORT, or returns 1 (log on stderr)
#   stop_chatloop                       SIGTERM, then SIGKILL after 5 s; only the pid started here
# CHATLOOP_BIN picks the binary (default: the release build); the array SERVER_PREFIX, if set,
# goes in front of it (e.g. `taskset -c 0`), and the array SERVER_ARGS0, if set, right after it
# (e.g. `httpfloor`, to start `loadgen httpfloor`). Every wait is bounded.

SERVER_PID=""
PORT=""

start_chatloop() {
  local log=$1
  shift
  ${SERVER_PREFIX[@]+"${SERVER_PREFIX[@]}"} "${CHATLOOP_BIN:-$ROOT/target/release/chatloop}" \
    ${SERVER_ARGS0[@]+"${SERVER_ARGS0[@]}"} --host 127.0.0.1 --port 0 "$@" 2>"$log" >/dev/null &
  SERVER_PID=$!
  PORT=""
  for _ in $(seq 1 300); do
    PORT=$(sed -n 's#.*listening on https\{0,1\}://127\.0\.0\.1:\([0-9][0-9]*\).*#\1#p' "$log" | head -n 1)
    [ -n "$PORT" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "chatloop did not log 'listening on http(s)://127.0.0.1:PORT' within 30 s; its log:" >&2
  cat "$log" >&2
  return 1
}

# shellcheck disable=SC2317 # called from EXIT traps
stop_chatloop() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}

release_binaries() {
  if [ -z "$1" ]; then
    echo "== building chatloop and loadgen (release)" >&2
    (cd "$ROOT" && cargo build --release 2>&1 | tail -n 3) >&2
    (cd "$ROOT/tools/loadgen" && cargo build --release 2>&1 | tail -n 3) >&2
  fi
  SERVER_BIN=${2:-$ROOT/target/release/chatloop}
  LG=$ROOT/tools/loadgen/target/release/loadgen
  [ -x "$SERVER_BIN" ] || { echo "no $SERVER_BIN: the chatloop build failed" >&2; exit 1; }
  [ -x "$LG" ] || { echo "no $LG: the loadgen build failed" >&2; exit 1; }
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
}
