#!/usr/bin/env bash
# What the change feed costs the durable 201 path, in ONE run on this machine: rounds of
# the same enrolld build on a fresh MariaDB database each, alternating the feed on and off
# (`ENROLLD_EVENTS_ENABLED`), each driving 50 courses of capacity 100,000 with wrk
# (benches/wrk/enroll.lua: every request a new (student, course) pair). Rates are rows in
# the store per second; CPU is enrolld's plus mariadbd's, per row. The issue's target:
# the 201 path with events on within 15% of events off.
# Usage: [ROUNDS=n] [ENROLLD_BIN=path] benches/feed_cost.sh [seconds=10] [connections=64]
# Writes target/bench/feed_cost.md and prints it. Load goes to loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
port=18431
db=enrolld_bench_feed
courses=50
students=40000
. benches/lib/rows.sh

rows=()
run() { # events: one round with the feed on (true) or off (false)
  local events=$1 figures
  ENROLLD_EVENTS_ENABLED=$events start_enrolld "$out/enrolld-feed.log"
  for i in $(seq 0 $((courses - 1))); do put_course "BIG-$i" '{"title":"bench","capacity":100000}'; done
  figures=$(drive "feed-$events" enrollments BIG)
  rows+=("$([ "$events" = true ] && echo on || echo off)|$figures|$(sql $db -e "SELECT seq FROM feed")")
  stop_enrolld
}

rounds=${ROUNDS:-2}
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run false; run true; else run true; run false; fi
done
report_rounds feed row "events written" on off | tee "$out/feed_cost.md"
sql -e "DROP DATABASE IF EXISTS $db"
