#!/usr/bin/env bash
# Autobahn|TestSuite (wstest fuzzingclient) against chatloop's conformance echo endpoint.
#
# Builds the release server, starts it with `--echo-path /echo` on a free port, runs every
# Autobahn case except 12.* and 13.* (permessage-deflate, which chatloop does not offer) and
# checks the report: each case's behavior must be OK, NON-STRICT or INFORMATIONAL and its
# behaviorClose OK (or INFORMATIONAL where wstest marks the whole case informational). Prints the counts per behavior and a last line `N passed, M failed`.
#
# Installs wstest with tools/install-autobahn.sh (Debian and PyPI packages) when it is missing.
# Report and server log: artifacts/autobahn/ (HTML report: artifacts/autobahn/report/index.html).
# Env: AUTOBAHN_CASES='["1.*","2.*"]' to run a subset (JSON list), AUTOBAHN_TIMEOUT (s, 300).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

T0=$SECONDS
lap() { printf '[autobahn] %s (%ds)\n' "$*" $((SECONDS - T0)); }

# ---- wstest --------------------------------------------------------------------------
WSTEST=$(command -v wstest || true)
if [ -z "$WSTEST" ] && [ -x "$HOME/.local/bin/wstest" ]; then WSTEST="$HOME/.local/bin/wstest"; fi
if [ -z "$WSTEST" ] || ! "$WSTEST" --help >/dev/null 2>&1; then
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
cleanup() {
  stop_chatloop
  rm -rf "$SPEC_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_chatloop "$LOG" --echo-path /echo --max-ws-message 16MiB --max-output-queue 64MiB \
  --log-level "${AUTOBAHN_LOG_LEVEL:-info}" || exit 1
lap "chatloop (pid $SERVER_PID) listening on port $PORT"

# ---- wstest fuzzingclient ------------------------------------------------------------
CASES=${AUTOBAHN_CASES:-'["*"]'}
cat >"$SPEC_DIR/fuzzingclient.json" <<EOF
{
  "outdir": "$OUT/report",
  "servers": [{"agent": "chatloop", "url": "ws://127.0.0.1:$PORT/echo"}],
  "cases": $CASES,
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF

lap "running wstest -m fuzzingclient (output: $OUT/wstest.log)"
rc=0
(cd "$SPEC_DIR" && timeout "${AUTOBAHN_TIMEOUT:-300}" "$WSTEST" -m fuzzingclient \
  -s "$SPEC_DIR/fuzzingclient.json") >"$OUT/wstest.log" 2>&1 || rc=$?
lap "wstest finished (exit $rc)"
if [ "$rc" -ne 0 ] || [ ! -f "$OUT/report/index.json" ]; then
  echo "autobahn: wstest failed (exit $rc); last lines of its log:" >&2
  tail -n 30 "$OUT/wstest.log" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  echo "autobahn: the server died during the run; see $LOG" >&2
  echo "0 passed, 1 failed"
  exit 1
fi

# ---- verdict -------------------------------------------------------------------------
python3 - "$OUT/report/index.json" <<'PY'
import json, sys
from collections import Counter

def case_key(c):
    return [int(p) if p.isdigit() else p for p in c.split(".")]

index = json.load(open(sys.argv[1]))
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
print("behavior:      " + ", ".join(f"{k} {v}" for k, v in sorted(behaviors.items())))
print("behaviorClose: " + ", ".join(f"{k} {v}" for k, v in sorted(closes.items())))
for case, b, bc, code in failed:
    print(f"FAILED {case}: behavior {b}, behaviorClose {bc}, remote close code {code}")
print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed or not results else 0)
PY
