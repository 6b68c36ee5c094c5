#!/usr/bin/env bash
# Runs every test of chatloop: formatting, lints, unit and integration tests, and the
# system-level suites whose tools it installs itself when missing.
# Usage: tools/test.sh            (everything)
#        SKIP_SLOW=1 tools/test.sh (cargo checks and tests only)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

# The API documentation (every module's first doc comment, intra-doc links) builds clean.
step "cargo doc --no-deps (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps

# TLS (rustls) is the cargo feature `tls`, on by default: the plaintext binary without it must
# keep building and linting clean.
step "cargo clippy --no-default-features -- -D warnings; cargo build --profile fast --no-default-features"
cargo clippy --no-default-features -- -D warnings
cargo build --profile fast --no-default-features

# Debian packages the cargo tests need: redis-server (tests/cluster.rs starts its own
# instances) and redis-tools (redis-cli joins the Redis Clusters of tests/redis_cluster.rs;
# Redis 7 or newer for sharded pub/sub), strace (tests/memory_only.rs traces a whole scenario for file writes) and
# openssl (tests/tls.rs makes its test CA and certificates with it).
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]} (Debian packages) for the cargo tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  timeout 300 $SUDO apt-get update -qq
  timeout 600 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

step "cargo test (unit + integration; profile fast: release optimisations without fat LTO, debug assertions on)"
cargo test --profile fast

# The load generator is its own crate (tools/loadgen, own lock file and target dir).
step "tools/loadgen: cargo fmt --check, clippy -D warnings, test"
(cd tools/loadgen && cargo fmt -- --check && cargo clippy --all-targets -- -D warnings \
  && cargo test --release)

if [ "${SKIP_SLOW:-0}" = 1 ]; then
  echo "SKIP_SLOW=1: system-level suites skipped"
  exit 0
fi

for suite in tools/suites/*.sh; do
  [ -e "$suite" ] || continue
  step "$suite"
  bash "$suite"
done
