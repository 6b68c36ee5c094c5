#!/usr/bin/env bash
# Autobahn|TestSuite (wstest fuzzingclient) against chatloop's conformance echo endpoint, over
# plain ws:// and over wss:// (TLS), and its permessage-deflate sections 12 and 13 over ws://.
#
# Builds the release server and starts two: one plain and one with `--tls-cert/--tls-key` (a
# self-signed P-256 certificate for 127.0.0.1 made here with `openssl`; wstest's TLS client,
# Twisted's ClientContextFactory, does not verify certificates), both with `--echo-path /echo`
# on free ports and deflate on (the default). Runs every case except 12.* and 13.* against both
# and the compression cases 12.* and 13.* against the plain one, all side by side: one wstest
# process each for ws and wss (mostly waiting on the cases' timers) and two for 12/13, which
# keep a core busy each (wstest is single-threaded PyPy and compresses, masks and hashes every
# message itself, one round trip at a time; the server uses a few seconds of CPU). Checks each
# report: each case's behavior must be OK, NON-STRICT or INFORMATIONAL and its behaviorClose OK
# (or INFORMATIONAL where wstest marks the whole case informational); a 12/13 case whose
# connection did not negotiate deflate is UNIMPLEMENTED, which fails too. Prints wall and CPU
# seconds per wstest process, which 12/13 cases ran, the counts per behavior for ws, wss and
# ws-deflate, and a last line `N passed, M failed` over all.
#
# Which 12/13 cases run (AUTOBAHN_DEFLATE):
#   ci (default)  171 of the 216: every section, every size up to 64 KiB, the 128 KiB messages
#                 in 12.1, 12.5 and 13.7 only (DEFLATE_CI below says why); about 2 x 135 s
#   full          all 216 (12.1-12.5: five data sets, 13.1-13.7: seven offers, 18 sizes
#                 each); about 2 x 275 s of wstest CPU, so about 5 min on two free cores
#   off           none
#   '["12.1.*"]'  a JSON list of case patterns; several lists separated by `;` run as
#                 processes of their own
#
# Installs wstest (with pyOpenSSL for wss) with tools/install-autobahn.sh (Debian and PyPI
# packages) when it is missing. Reports and server logs: artifacts/autobahn/ (HTML reports:
# artifacts/autobahn/report/index.html for ws, report-wss/ and report-deflate*/).
# Env: AUTOBAHN_CASES='["1.*","2.*"]' to run a subset of the non-compression cases (JSON list),
# AUTOBAHN_DEFLATE (above), AUTOBAHN_TIMEOUT (s per wstest process, 1200), AUTOBAHN_TLS=0 to
# skip the wss:// run, AUTOBAHN_SERVER_ARGS (extra flags for both servers, e.g.
# `--deflate false` to see the 12/13 check fail).
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

# shellcheck disable=SC2206 # AUTOBAHN_SERVER_ARGS: flags separated by spaces
ARGS=(--echo-path /echo --max-ws-message 16MiB --max-output-queue 64MiB
  --log-level "${AUTOBAHN_LOG_LEVEL:-info}" ${AUTOBAHN_SERVER_ARGS:-})
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

# ---- which cases: one wstest process per entry of RUNS ---------------------------------
# An entry: NAME URL SERVER_PID OUTDIR SERVER_LOG CASES EXCLUDED; the verdict merges the runs
# of one NAME into one line of counts.
CASES=${AUTOBAHN_CASES:-'["*"]'}
RUNS=()
for t in "${TARGETS[@]}"; do
  RUNS+=("$t $(tr -d ' ' <<<"$CASES") [\"12.*\",\"13.*\"]")
done

# 12/13 run on the plain server in two processes of about equal case time. The figures are
# seconds of case time from a run of all 216 in one process on a quiet machine (527 s in all,
# about as much wstest CPU): 12.1 30, 12.2 89, 12.3 103, 12.4 43, 12.5 70, 13.1-13.7 23-31 each.
DEFLATE_FULL=('["12.1.*","12.2.*","12.3.*","12.4.*"]' '["12.5.*","13.*"]') # 265 s, 283 s
# The CI subset. Sections 12.1-12.5 are five data sets (JSON and HTML as UTF-8 text, a bitmap,
# German prose and a PDF as binary) with the default offer; 13.1-13.7 are seven client offers
# (no_context_takeover and max_window_bits combinations, and a list of offers with fallbacks)
# on the JSON. Each has the same 18 cases: 1000 messages of 16 B to 128 KiB (1-10), then 8 KiB
# to 128 KiB auto-fragmented to 256 B (11-15), then 128 KiB fragmented to 1, 4 and 32 KiB
# (16-18). Every section runs cases 1-9 and 11-14: every size up to 64 KiB, below and above
# --deflate-min-bytes, whole and fragmented. The 128 KiB cases (10, 15-18) are two thirds of
# all the time (and 12.2/12.3's the most, their data compress worst); they run in three
# sections: 12.1 (text, compresses 20:1: 16 s), 12.5 (the PDF: compressed frames of 100 KB, the
# 64-bit length field) and 13.7 (whose first offer asks server_max_window_bits=9, so the server
# answers in plain 128 KiB frames). 171 cases, about 135 s + 131 s.
ci_cases() { # SECTION...: cases 1-9 and 11-14 of each
  local out="" s n
  for s in "$@"; do
    for n in 1 2 3 4 5 6 7 8 9 11 12 13 14; do out+="\"$s.$n\","; done
  done
  printf '%s' "$out"
}
DEFLATE_CI=(
  "[$(ci_cases 12.2 12.3 12.4 13.1 13.2 13.3)\"12.1.*\"]"
  "[$(ci_cases 13.4 13.5 13.6)\"12.5.*\",\"13.7.*\"]"
)
DEFLATE=${AUTOBAHN_DEFLATE:-ci}
case "$DEFLATE" in
  ci)
    PARTS=("${DEFLATE_CI[@]}")
    WHICH="cases 1-9 and 11-14 of every section 12.1-12.5 and 13.1-13.7, all 18 of 12.1, 12.5 and 13.7"
    ;;
  full) PARTS=("${DEFLATE_FULL[@]}") WHICH="all of 12.* and 13.*" ;;
  off | 0 | false) PARTS=() WHICH="none" ;;
  '['*)
    IFS=';' read -r -a PARTS <<<"$(tr -d ' ' <<<"$DEFLATE")"
    WHICH="${PARTS[*]}"
    ;;
  *)
    echo "AUTOBAHN_DEFLATE: ci, full, off or a JSON list of cases, not $DEFLATE" >&2
    exit 2
    ;;
esac
lap "permessage-deflate cases on ws:// (AUTOBAHN_DEFLATE=$DEFLATE): $WHICH"
for i in "${!PARTS[@]}"; do
  RUNS+=("ws-deflate ws://127.0.0.1:$WS_PORT/echo $WS_PID report-deflate$((i + 1)) $LOG ${PARTS[$i]} []")
done

# ---- wstest fuzzingclient, one process per run, all side by side --------------------------
PIDS=()
for i in "${!RUNS[@]}"; do
  read -r name url _ report _ cases excluded <<<"${RUNS[$i]}"
  dir="$SPEC_DIR/run$i"
  mkdir -p "$dir"
  cat >"$dir/fuzzingclient.json" <<EOF
{
  "outdir": "$OUT/$report",
  "servers": [{"agent": "chatloop", "url": "$url"}],
  "cases": $cases,
  "exclude-cases": $excluded,
  "exclude-agent-cases": {}
}
EOF
  lap "running wstest -m fuzzingclient against $url: $report (log: $OUT/wstest-$report.log)"
  # The subshell writes this wstest process's wall and CPU seconds (user + system) to cpu-*.
  (
    cd "$dir"
    t=$SECONDS rc=0
    timeout "${AUTOBAHN_TIMEOUT:-1200}" "$WSTEST" -m fuzzingclient -s "$dir/fuzzingclient.json" || rc=$?
    times >"$dir/times" # in this shell: a pipe would run it in a child, which has no children
    awk -v w=$((SECONDS - t)) 'NR == 2 {
      split($1, u, /[ms]/); split($2, s, /[ms]/)
      printf "%d %.0f\n", w, u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$dir/times" >"$OUT/cpu-$report"
    exit "$rc"
  ) >"$OUT/wstest-$report.log" 2>&1 &
  PIDS+=($!)
done
RCS=()
for i in "${!PIDS[@]}"; do
  rc=0
  wait "${PIDS[$i]}" || rc=$?
  RCS+=("$rc")
done
lap "wstest finished (exit ${RCS[*]})"
for r in "${RUNS[@]}"; do
  read -r _ _ _ report _ _ _ <<<"$r"
  wall=? cpu=?
  [ -s "$OUT/cpu-$report" ] && read -r wall cpu <"$OUT/cpu-$report"
  echo "[autobahn] wstest $report: $wall s wall, $cpu s CPU"
done
for pid in "$WS_PID" ${WSS_PID:+"$WSS_PID"}; do
  # The server's utime + stime in clock ticks (fields 14 and 15; its name has no spaces).
  if [ -r "/proc/$pid/stat" ]; then
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    echo "[autobahn] chatloop (pid $pid): $((ticks / $(getconf CLK_TCK))) s CPU"
  fi
done
setup_failed=0
for i in "${!RUNS[@]}"; do
  read -r name url pid report log _ _ <<<"${RUNS[$i]}"
  if [ "${RCS[$i]}" -ne 0 ] || [ ! -f "$OUT/$report/index.json" ]; then
    echo "autobahn ($report): wstest failed (exit ${RCS[$i]}); last lines of its log:" >&2
    tail -n 30 "$OUT/wstest-$report.log" >&2
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
echo "ws-deflate: AUTOBAHN_DEFLATE=$DEFLATE: $WHICH"

# ---- verdict -------------------------------------------------------------------------
REPORTS=()
for r in "${RUNS[@]}"; do
  read -r name _ _ report _ _ _ <<<"$r"
  REPORTS+=("$name=$OUT/$report/index.json")
done
python3 - "${REPORTS[@]}" <<'PY'
import json, sys
from collections import Counter

def case_key(c):
    return [int(p) if p.isdigit() else p for p in c.split(".")]

runs = {}  # name -> the results of all its reports, in the order given
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    results = runs.setdefault(name, {})
    for agent in json.load(open(path)).values():
        results.update(agent)

total = total_failed = 0
for name, results in runs.items():
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
    for case, b, bc, code in failed[:20]:
        print(f"{name}: FAILED {case}: behavior {b}, behaviorClose {bc}, remote close code {code}")
    if len(failed) > 20:
        print(f"{name}: ... and {len(failed) - 20} more FAILED (see the HTML reports)")
    print(f"{name}: {len(results) - len(failed)} passed, {len(failed)} failed")
    total += len(results)
    total_failed += len(failed)
print(f"{total - total_failed} passed, {total_failed} failed")
sys.exit(1 if total_failed or not total else 0)
PY
