# shellcheck shell=bash
# Shared by the tools/suites scripts: start a release chatloop on a free loopback port and
# stop it again. Source it, then:
#   start_chatloop LOGFILE [flags...]   sets SERVER_PID and PORT, or returns 1 (log on stderr)
#   stop_chatloop                       SIGTERM, then SIGKILL after 5 s; only the pid started here
# Every wait is bounded.

SERVER_PID=""
PORT=""

start_chatloop() {
  local log=$1
  shift
  "${CHATLOOP_BIN:-$ROOT/target/release/chatloop}" --host 127.0.0.1 --port 0 "$@" 2>"$log" >/dev/null &
  SERVER_PID=$!
  PORT=""
  for _ in $(seq 1 150); do
    PORT=$(sed -n 's#.*listening on http://127\.0\.0\.1:\([0-9][0-9]*\).*#\1#p' "$log" | head -n 1)
    [ -n "$PORT" ] && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "chatloop did not start; its log:" >&2
  cat "$log" >&2
  return 1
}

stop_chatloop() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
}
