# shellcheck shell=bash
# Shared by tools/suites/*.sh, tools/bench.sh and tools/soak.sh: start a chatloop on a free
# loopback port and stop it again. Source it, then:
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
