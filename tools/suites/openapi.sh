#!/usr/bin/env bash
# OpenAPI conformance suite: the server against its own /openapi.json.
#
# Installs (pip, into a venv outside the repo: ${XDG_CACHE_HOME:-~/.cache}/chatloop/openapi-venv)
# openapi-spec-validator and schemathesis at pinned versions. Builds the release server, starts it
# on 127.0.0.1 with a free port, then:
#   1. validates /openapi.json, as served, as OpenAPI 3.1;
#   2. schemathesis, every operation but DELETE /sessions/me, with a live session and an existing
#      room fixed as {room_id} (so the 200 answers are reached and checked);
#   3. the same with generated room ids and session ids (the 404/403/422 answers);
#   4. DELETE /sessions/me alone, with a session of its own (it ends the session it is given);
#   5. GET /ws/{room_id}: the documented answers to good and bad upgrade requests
#      (tools/suites/ws_upgrade_probe.py), which schemathesis cannot check.
# Checks: see CHECKS below. A failure is a real mismatch between the server and the document:
# fix whichever of the two disagrees with docs/API.md.
# Reports: artifacts/openapi/. Ends with "N passed, M failed"; exits non-zero on any failure.
# Environment: OPENAPI_MAX_EXAMPLES (default 50), OPENAPI_SEED (default: random, printed).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT="$ROOT/artifacts/openapi"
mkdir -p "$OUT"
start_time=$SECONDS

SCHEMATHESIS_VERSION=4.32.5
VALIDATOR_VERSION=0.9.0
MAX_EXAMPLES=${OPENAPI_MAX_EXAMPLES:-50}
# not_a_server_error, status_code_conformance, content_type_conformance and
# response_schema_conformance compare every answer with the document; unsupported_method checks
# that a method the document does not list on a path is refused with 405.
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,unsupported_method

say() { printf '[openapi] %s\n' "$*"; }
passed=0
failed=0
fail_setup() {
  say "setup failed: $*"
  echo "$passed passed, $((failed + 1)) failed"
  exit 1
}

# ---------------------------------------------------------------- tools
VENV=${CHATLOOP_OPENAPI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/chatloop/openapi-venv}
PINS="schemathesis==$SCHEMATHESIS_VERSION openapi-spec-validator==$VALIDATOR_VERSION"
if [ ! -x "$VENV/bin/schemathesis" ] || [ "$(cat "$VENV/.chatloop-pins" 2>/dev/null)" != "$PINS" ]; then
  command -v python3 >/dev/null || fail_setup "python3 is missing"
  say "installing $PINS into $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV" || fail_setup "python3 -m venv"
  # shellcheck disable=SC2086
  timeout 600 "$VENV/bin/pip" install --quiet --disable-pip-version-check $PINS || fail_setup "pip install"
  echo "$PINS" >"$VENV/.chatloop-pins"
fi
PY="$VENV/bin/python"

# ---------------------------------------------------------------- server
say "cargo build --release"
cargo build --release --quiet || fail_setup "cargo build --release"
SERVER_LOG="$OUT/server.log"
# shellcheck source=tools/lib/server.sh
. "$ROOT/tools/lib/server.sh"
trap stop_chatloop EXIT
trap 'exit 130' INT TERM
# --room-ttl 1h: the room fixed as {room_id} must outlive the run although nobody connects to it.
# The budgets per address and per session are off: schemathesis sends thousands of requests
# from one address with one session, and should reach the answers behind the 429s.
# --room-list: the document describes GET /rooms/all, which is off (404 for every method) by
# default; schemathesis checks the documented API, so it runs with the list on.
start_chatloop "$SERVER_LOG" --room-ttl 1h --create-rate 0 --max-rooms-per-session 0 --room-list ||
  fail_setup "the server did not start"
BASE="http://127.0.0.1:$PORT"
say "server pid $SERVER_PID at $BASE"

# REST helper: method path [bearer] [json body] -> prints the JSON answer (fails on non-2xx)
api() {
  "$PY" - "$BASE" "$@" <<'EOF'
import json, sys, urllib.request
base, method, path = sys.argv[1:4]
sid = sys.argv[4] if len(sys.argv) > 4 else ""
body = sys.argv[5].encode() if len(sys.argv) > 5 else None
req = urllib.request.Request(base + path, data=body, method=method)
if sid:
    req.add_header("Authorization", "Bearer " + sid)
if body is not None:
    req.add_header("Content-Type", "application/json")
with urllib.request.urlopen(req, timeout=10) as r:
    print(r.read().decode())
EOF
}
json_field() { "$PY" -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
new_session() { api POST /sessions "" "{\"username\": \"$1\"}" | json_field session_id; }

# ---------------------------------------------------------------- 1. the document
if api GET /openapi.json >"$OUT/openapi.json" &&
  "$VENV/bin/openapi-spec-validator" --schema 3.1 --validation-errors all "$OUT/openapi.json"; then
  say "PASS /openapi.json is a valid OpenAPI 3.1 document"
  passed=$((passed + 1))
else
  say "FAIL /openapi.json is not a valid OpenAPI 3.1 document"
  failed=$((failed + 1))
fi

# ---------------------------------------------------------------- 2-4. schemathesis
SEED_ARGS=()
[ -n "${OPENAPI_SEED:-}" ] && SEED_ARGS=(--seed "$OPENAPI_SEED")

# run NAME SESSION_ID CONFIG [schemathesis args...]: one schemathesis run, counted per operation
run_st() {
  local name=$1 sid=$2 config=$3
  shift 3
  local junit="$OUT/$name.junit.xml"
  rm -f "$junit"
  say "schemathesis: $name"
  set +e
  (cd "$OUT" && timeout 600 "$VENV/bin/schemathesis" --config-file "$config" run "$BASE/openapi.json" \
    -H "Authorization: Bearer $sid" \
    --checks "$CHECKS" \
    --max-examples "$MAX_EXAMPLES" \
    --workers 1 \
    --request-timeout 10 \
    --report junit --report-junit-path "$junit" \
    --no-color \
    "${SEED_ARGS[@]}" "$@") >"$OUT/$name.log" 2>&1
  local rc=$?
  set -e
  sed -n '/^=* *\(FAILURES\|WARNINGS\|SUMMARY\) *=*$/,$p' "$OUT/$name.log"
  # per-operation results from the JUnit report
  local counts
  counts=$("$PY" - "$junit" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("0 0"); sys.exit()
ok = bad = 0
for tc in root.iter("testcase"):
    if tc.find("failure") is not None or tc.find("error") is not None:
        bad += 1
        print("  FAIL", tc.get("name"), file=sys.stderr)
    elif tc.find("skipped") is None:
        ok += 1
print(ok, bad)
EOF
  )
  local ok=${counts% *} bad=${counts#* }
  if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then
    say "schemathesis $name exited with $rc (log: artifacts/openapi/$name.log)"
    tail -n 20 "$OUT/$name.log"
    bad=1
  fi
  if [ "$ok" -eq 0 ] && [ "$bad" -eq 0 ]; then
    say "schemathesis $name tested nothing"
    bad=1
  fi
  say "$name: $ok operations passed, $bad failed"
  passed=$((passed + ok))
  failed=$((failed + bad))
}

SID_A=$(new_session fuzzer-a) || fail_setup "POST /sessions"
ROOM=$(api POST /rooms "$SID_A" | json_field room_id) || fail_setup "POST /rooms"
# GET /ws/{room_id} always gets a session_id that does not exist: an HTTP client cannot follow a
# 101 (it would reuse the upgraded connection for its next request), so schemathesis checks the
# refusals (400/426/403/404); step 5 and tests/*.rs check the upgrade itself.
NO_SESSION=00000000-0000-4000-8000-000000000000
cat >"$OUT/fixed.toml" <<EOF
# {room_id} is a room that exists.
[parameters]
"path.room_id" = "$ROOM"
"query.session_id" = "$NO_SESSION"
EOF
cat >"$OUT/generated.toml" <<EOF
[parameters]
"query.session_id" = "$NO_SESSION"
EOF

run_st fixed-room "$SID_A" "$OUT/fixed.toml" --exclude-operation-id endSession
SID_B=$(new_session fuzzer-b) || fail_setup "POST /sessions"
run_st generated-ids "$SID_B" "$OUT/generated.toml" --exclude-operation-id endSession
SID_C=$(new_session fuzzer-c) || fail_setup "POST /sessions"
run_st end-session "$SID_C" "$OUT/generated.toml" --include-operation-id endSession

# ---------------------------------------------------------------- 5. GET /ws/{room_id} answers
# The documented answers to upgrade requests, with a live session and room (API.md: "Not a valid
# upgrade request: 400 / 426"; RFC 6455 4.2.1), one raw request each.
say "GET /ws/{room_id}: answers to good and bad upgrade requests"
SID_D=$(new_session ws-probe) || fail_setup "POST /sessions"
ROOM_D=$(api POST /rooms "$SID_D" | json_field room_id) || fail_setup "POST /rooms"
ws_counts=$("$PY" "$ROOT/tools/suites/ws_upgrade_probe.py" "$PORT" "$ROOM_D" "$SID_D") || ws_counts="0 1"
passed=$((passed + ${ws_counts% *}))
failed=$((failed + ${ws_counts#* }))

if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  say "FAIL the server died during the run (log: artifacts/openapi/server.log)"
  failed=$((failed + 1))
fi
say "took $((SECONDS - start_time)) s; reports in artifacts/openapi/"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
