#!/usr/bin/env bash
# Autobahn|TestSuite (wstest fuzzingclient) against chatloop's conformance echo endpoint, over
# plain ws:// and over wss:// (TLS).
#
# Builds the release server and starts two: one plain and one with `--tls-cert/--tls-key` (a
# self-signed P-256 certificate for 127.0.0.1 made here with `openssl`; wstest's TLS client,
# Twisted's ClientContextFactory, does not verify certificates), both with `--echo-path /echo`
# on free ports. Runs every Autobahn case except 12.* and 13.* (permessage-deflate, which
# chatloop does not offer) against both at once (two wstest processes: each is mostly waiting
# on timers, so together they take about as long as one), and checks each report: each case's
# behavior must be OK, NON-STRICT or INFORMATIONAL and its behaviorClose OK (or INFORMATIONAL
# where wstest marks the whole case informational). Prints the counts per behavior for ws and
# for wss, and a last line `N passed, M failed` over both.
#
# Installs wstest (with pyOpenSSL for wss) with tools/install-autobahn.sh (Debian and PyPI
# packages) when it is missing. Reports and server logs: artifacts/autobahn/ (HTML reports:
# artifacts/autobahn/report/index.html for ws, artifacts/autobahn/report-wss/index.html).
# Env: AUTOBAHN_CASES='["1.*","2.*"]' to run a subset (JSON list), AUTOBAHN_TIMEOUT (s, 300),
# AUTOBAHN_TLS=0 to skip the wss:// run.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

T0=$SECONDS
lap() { printf '[autobahn] %s (%ds)\n' "$*" $((SECONDS - T0)); }

# ---- wstest --------------------------------------------------------------------------
TLS=${AUTOBAHN_TLS:-1}
WSTEST=$(command -v wstest || true)
if [ -z "$WSTEST" ] && [ -x "$HOME/.local/bin/wstest" ]; then WSTEST="$HOME/.local/bin/wstest"; fi
# wss needs pyOpenSSL in wstest's interpreter (the installer adds it to an older install too).
wstest_tls() { pypy -W ignore -c 'import OpenSSL.SSL, twisted.internet.ssl' >/dev/null 2>&1; }
if [ -z "$WSTEST" ] || ! "$WSTEST" --help >/dev/null 2>&1 || { [ "$TLS" = 1 ] && ! wstest_tls; }; then
  installer="$ROOT/tools/install-autobahn.sh"
  lap "installing Autobahn|TestSuite"
  WSTEST=$(bash "$installer" | tail -n 1)
fi
lap "wstest: $WSTEST"

# ---- server --------------------------------------------------------------------------
cargo build --release --quiet
lap "built target/release/chatloop"

OUT="$ROOT/artifacts/autobahn"
rm -rf "$OUT"
mkdir -p "$OUT"
LOG="$OUT/server.log"
SPEC_DIR=$(mktemp -d)
# shellcheck source=tools/lib/server.sh
. "$ROOT/tools/lib/server.sh"
WS_PID=""
cleanup() {
  stop_chatloop
  SERVER_PID=$WS_PID
  stop_chatloop
  rm -rf "$SPEC_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ARGS=(--echo-path /echo --max-ws-message 16MiB --max-output-queue 64MiB
  --log-level "${AUTOBAHN_LOG_LEVEL:-info}")
start_chatloop "$LOG" "${ARGS[@]}" || exit 1
WS_PID=$SERVER_PID WS_PORT=$PORT
lap "chatloop (pid $WS_PID) listening on port $WS_PORT (ws)"
TARGETS=("ws ws://127.0.0.1:$WS_PORT/echo $WS_PID report $LOG")
if [ "$TLS" = 1 ]; then
  if ! command -v openssl >/dev/null; then
    lap "installing openssl (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl >/dev/null
  fi
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$SPEC_DIR/key.pem" -out "$SPEC_DIR/cert.pem" 2>/dev/null
  # start_chatloop/stop_chatloop keep one pid: remember the plain server's and stop it ourselves.
  start_chatloop "$OUT/server-wss.log" "${ARGS[@]}" --tls-cert "$SPEC_DIR/cert.pem" \
    --tls-key "$SPEC_DIR/key.pem" || exit 1
  WSS_PID=$SERVER_PID
  lap "chatloop (pid $WSS_PID) listening on port $PORT (wss)"
  TARGETS+=("wss wss://127.0.0.1:$PORT/echo $WSS_PID report-wss $OUT/server-wss.log")
fi

# ---- wstest fuzzingclient, one per target, side by side -----------------------------------
CASES=${AUTOBAHN_CASES:-'["*"]'}
PIDS=()
for t in "${TARGETS[@]}"; do
  read -r name url _ report _ <<<"$t"
  mkdir -p "$SPEC_DIR/$name"
  cat >"$SPEC_DIR/$name/fuzzingclient.json" <<EOF
{
  "outdir": "$OUT/$report",
  "servers": [{"agent": "chatloop", "url": "$url"}],
  "cases": $CASES,
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
  lap "running wstest -m fuzzingclient against $url (output: $OUT/wstest-$name.log)"
  (cd "$SPEC_DIR/$name" && exec timeout "${AUTOBAHN_TIMEOUT:-300}" "$WSTEST" -m fuzzingclient \
    -s "$SPEC_DIR/$name/fuzzingclient.json") >"$OUT/wstest-$name.log" 2>&1 &
  PIDS+=($!)
done
RCS=()
for i in "${!PIDS[@]}"; do
  rc=0
  wait "${PIDS[$i]}" || rc=$?
  RCS+=("$rc")
done
lap "wstest finished (exit ${RCS[*]})"
setup_failed=0
for i in "${!TARGETS[@]}"; do
  read -r name url pid report log <<<"${TARGETS[$i]}"
  if [ "${RCS[$i]}" -ne 0 ] || [ ! -f "$OUT/$report/index.json" ]; then
    echo "autobahn ($name): wstest failed (exit ${RCS[$i]}); last lines of its log:" >&2
    tail -n 30 "$OUT/wstest-$name.log" >&2
    setup_failed=1
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "autobahn ($name): the server died during the run; see $log" >&2
    setup_failed=1
  fi
done
if [ "$setup_failed" = 1 ]; then
  echo "0 passed, 1 failed"
  exit 1
fi

# ---- verdict -------------------------------------------------------------------------
REPORTS=()
for t in "${TARGETS[@]}"; do
  read -r name _ _ report _ <<<"$t"
  REPORTS+=("$name=$OUT/$report/index.json")
done
python3 - "${REPORTS[@]}" <<'PY'
import json, sys
from collections import Counter

def case_key(c):
    return [int(p) if p.isdigit() else p for p in c.split(".")]

total = total_failed = 0
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    index = json.load(open(path))
    results = {}
    for agent in index.values():
        results.update(agent)
    behaviors, closes = Counter(), Counter()
    failed = []
    for case in sorted(results, key=case_key):
        r = results[case]
        b, bc = r.get("behavior"), r.get("behaviorClose")
        behaviors[b] += 1
        closes[bc] += 1
        # behaviorClose must be OK, except that wstest itself hard-codes INFORMATIONAL for both
        # verdicts of the cases whose outcome the RFC leaves open (7.1.6, 7.13.1, 7.13.2).
        if b not in ("OK", "NON-STRICT", "INFORMATIONAL") or (
            bc != "OK" and not (b == bc == "INFORMATIONAL")
        ):
            failed.append((case, b, bc, r.get("remoteCloseCode")))
    if not results:
        failed.append(("(none)", "no case ran", None, None))
    print(f"{name}: behavior:      " + ", ".join(f"{k} {v}" for k, v in sorted(behaviors.items())))
    print(f"{name}: behaviorClose: " + ", ".join(f"{k} {v}" for k, v in sorted(closes.items())))
    for case, b, bc, code in failed:
        print(f"{name}: FAILED {case}: behavior {b}, behaviorClose {bc}, remote close code {code}")
    print(f"{name}: {len(results) - len(failed)} passed, {len(failed)} failed")
    total += len(results)
    total_failed += len(failed)
print(f"{total - total_failed} passed, {total_failed} failed")
sys.exit(1 if total_failed or not total else 0)
PY
