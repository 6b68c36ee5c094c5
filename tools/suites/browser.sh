#!/usr/bin/env bash
# Browser suite: the demo chat page (/) and the API docs page (/docs) driven in a real browser.
#
# Installs what it needs when missing: Debian's chromium (apt-get), and playwright-core from
# tests/browser/package-lock.json (npm ci; it never downloads a browser of its own). Builds the
# release server, starts it on 127.0.0.1 with a free port (--typing-quiet 1s keeps the typing test
# short), runs tests/browser/*.test.mjs with node's test runner, and stops the server it started.
# Screenshots: artifacts/screenshots/. UPDATE_DOCS_SCREENSHOT=1 also rewrites docs/screenshot.png.
# Ends with a line "N passed, M failed"; exits non-zero on any failure.
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
TAP="$ART/browser.tap"
rm -f "$TAP"
set +e
(cd "$BROWSER_DIR" && timeout 600 node --test --test-concurrency=1 \
  --test-reporter=spec --test-reporter-destination=stdout \
  --test-reporter=tap --test-reporter-destination="$TAP" \
  chat.test.mjs docs.test.mjs e2e.test.mjs)
rc=$?
set -e

passed=$(sed -n 's/^# pass \([0-9][0-9]*\)$/\1/p' "$TAP" 2>/dev/null | tail -n1)
failed=$(sed -n 's/^# fail \([0-9][0-9]*\)$/\1/p' "$TAP" 2>/dev/null | tail -n1)
cancelled=$(sed -n 's/^# cancelled \([0-9][0-9]*\)$/\1/p' "$TAP" 2>/dev/null | tail -n1)
passed=${passed:-0}
failed=$(( ${failed:-0} + ${cancelled:-0} ))
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
  say "node --test exited with $rc"
  failed=1
fi
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  say "the server died during the tests (log: $SERVER_LOG)"
  failed=$((failed + 1))
fi
say "screenshots in artifacts/screenshots/; took $((SECONDS - start_time)) s"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
