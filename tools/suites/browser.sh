#!/usr/bin/env bash
# Browser suite: the demo chat page (/) and the API docs page (/docs) driven in a real browser.
#
# Installs what it needs when missing: Debian's chromium (apt-get), and playwright-core from
# tests/browser/package-lock.json (npm ci; it never downloads a browser of its own). Builds the
# release server, starts it on 127.0.0.1 with a free port (--typing-quiet 1s keeps the typing test
# short), runs tests/browser/*.test.mjs with node's test runner, and stops the server it started.
# Then the main chat test (chat.test.mjs) once more over https: a server with --tls-cert/--tls-key
# (a self-signed certificate for 127.0.0.1 made here with openssl) and Chromium with
# --ignore-certificate-errors; the page opens wss:// by itself (BROWSER_TLS=0 skips this run).
# Screenshots: artifacts/screenshots/ (https run: artifacts/screenshots/https/).
# UPDATE_DOCS_SCREENSHOT=1 also rewrites docs/screenshot.png (from the plain run).
# Ends with a line "N passed, M failed" over both runs; exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
ART="$ROOT/artifacts"
mkdir -p "$ART/screenshots"
export DEBIAN_FRONTEND=noninteractive
start_time=$SECONDS

say() { printf '[browser] %s\n' "$*"; }
fail_setup() {
  say "setup failed: $*"
  echo "0 passed, 1 failed"
  exit 1
}

# ---------------------------------------------------------------- tools
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    timeout 300 apt-get update -qq || fail_setup "apt-get update"
    apt_updated=1
  fi
  timeout 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null || fail_setup "apt-get install $*"
}

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  say "installing chromium (Debian package)"
  apt_install chromium fonts-liberation fonts-dejavu-core
fi
[ -x "$CHROMIUM" ] || fail_setup "no browser at $CHROMIUM"
export CHROMIUM

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  say "installing nodejs and npm (Debian packages)"
  apt_install nodejs npm
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
[ "$node_major" -ge 20 ] || fail_setup "node >= 20 needed (have $(node --version))"

BROWSER_DIR="$ROOT/tests/browser"
want=$(node -p 'require(process.argv[1]).packages["node_modules/playwright-core"].version' \
  "$BROWSER_DIR/package-lock.json")
have=$(node -p 'try { require(process.argv[1]).version } catch (_) { "" }' \
  "$BROWSER_DIR/node_modules/playwright-core/package.json")
if [ "$want" != "$have" ]; then
  say "npm ci (playwright-core $want)"
  (cd "$BROWSER_DIR" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 timeout 300 npm ci --no-audit --no-fund --loglevel=error) \
    || fail_setup "npm ci in tests/browser"
fi

# ---------------------------------------------------------------- server
say "cargo build --release"
cargo build --release --quiet || fail_setup "cargo build --release"
BIN="$ROOT/target/release/chatloop"
export CHATLOOP_BIN="$BIN"

SERVER_LOG="$ART/browser-server.log"
# shellcheck source=tools/lib/server.sh
. "$ROOT/tools/lib/server.sh"
trap stop_chatloop EXIT
trap 'exit 130' INT TERM
start_chatloop "$SERVER_LOG" --typing-quiet 1s || fail_setup "the server did not start"
export CHATLOOP_URL="http://127.0.0.1:$PORT"
say "server pid $SERVER_PID at $CHATLOOP_URL"

# ---------------------------------------------------------------- tests
# run_tests TAP FILES...: node's test runner; adds the TAP file's counts to passed/failed.
passed=0 failed=0
run_tests() {
  local tap=$1 rc p f c
  shift
  rm -f "$tap"
  set +e
  (cd "$BROWSER_DIR" && timeout 600 node --test --test-concurrency=1 \
    --test-reporter=spec --test-reporter-destination=stdout \
    --test-reporter=tap --test-reporter-destination="$tap" "$@")
  rc=$?
  set -e
  p=$(sed -n 's/^# pass \([0-9][0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -n1)
  f=$(sed -n 's/^# fail \([0-9][0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -n1)
  c=$(sed -n 's/^# cancelled \([0-9][0-9]*\)$/\1/p' "$tap" 2>/dev/null | tail -n1)
  f=$(( ${f:-0} + ${c:-0} ))
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    say "node --test exited with $rc"
    f=1
  fi
  passed=$(( passed + ${p:-0} ))
  failed=$(( failed + f ))
}

run_tests "$ART/browser.tap" chat.test.mjs docs.test.mjs e2e.test.mjs
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  say "the server died during the tests (log: $SERVER_LOG)"
  failed=$((failed + 1))
fi
stop_chatloop

# ---------------------------------------------------------------- the same chat over https
if [ "${BROWSER_TLS:-1}" != 0 ]; then
  if ! command -v openssl >/dev/null; then
    say "installing openssl (Debian package)"
    apt_install openssl
  fi
  TLS_DIR=$(mktemp -d)
  trap 'stop_chatloop; rm -rf "$TLS_DIR"' EXIT
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" 2>/dev/null || fail_setup "openssl req"
  # Servers the tests start themselves (e.g. --session-ttl 1s) read the same two variables.
  export CHATLOOP_TLS_CERT="$TLS_DIR/cert.pem" CHATLOOP_TLS_KEY="$TLS_DIR/key.pem"
  SERVER_LOG="$ART/browser-server-https.log"
  start_chatloop "$SERVER_LOG" --typing-quiet 1s || fail_setup "the https server did not start"
  export CHATLOOP_URL="https://127.0.0.1:$PORT"
  say "https server pid $SERVER_PID at $CHATLOOP_URL"
  mkdir -p "$ART/screenshots/https"
  SCREENSHOT_DIR="$ART/screenshots/https" UPDATE_DOCS_SCREENSHOT=0 \
    run_tests "$ART/browser-https.tap" chat.test.mjs
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    say "the https server died during the tests (log: $SERVER_LOG)"
    failed=$((failed + 1))
  fi
  unset CHATLOOP_TLS_CERT CHATLOOP_TLS_KEY
fi

say "screenshots in artifacts/screenshots/; took $((SECONDS - start_time)) s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
