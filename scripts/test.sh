#!/usr/bin/env bash
# The whole test suite: starts (or installs) MariaDB and Redis, then runs every test
# against the real server on real sockets. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/ops-tools.sh   # promtool, prometheus, nginx, openssl, systemd-analyze, faketime
if ! command -v python3 >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi
scripts/py-tools.sh    # schemathesis in target/py for tests/openapi.rs
export ENROLLD_TEST_MYSQL="${ENROLLD_TEST_MYSQL:-mysql://enrolld:enrolld@127.0.0.1:3306}"
cargo test --release --locked --all-targets
