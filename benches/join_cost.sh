#!/usr/bin/env bash
# What joining a waitlist costs, this tree against another enrolld build (BASE_BIN), in ONE
# run on this machine: rounds alternate the two binaries, each on a fresh MariaDB database
# with a few hot courses (COURSES, default 2: a full course everyone rushes to) of
# capacity 0 and a waitlist of 100,000, and wrk sends every request as a new (student,
# course) pair, so every POST is a join. Rates are waitlist places in the
# store per second; CPU is enrolld's plus mariadbd's, per place; refused counts wrk's
# non-2xx answers (503 when a join could not get the course's lane in time).
# Usage: BASE_BIN=path [ROUNDS=n] [COURSES=n] benches/join_cost.sh [seconds=10] [connections=64]
# Writes target/bench/join_cost.md and prints it. Load goes to loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
port=18432
db=enrolld_bench_join
courses=${COURSES:-2}
students=80000
[ -n "${BASE_BIN:-}" ] || { echo "join_cost: set BASE_BIN to the enrolld binary to compare against" >&2; exit 2; }
. benches/lib/rows.sh
this=$bin

rows=()
run() { # name binary: one round
  local name=$1
  bin=$2
  start_enrolld "$out/enrolld-join.log"
  for i in $(seq 0 $((courses - 1))); do put_course "WAIT-$i" '{"title":"bench","capacity":0,"waitlist_max":100000}'; done
  local figures
  figures=$(drive "join-$name" places WAIT)
  rows+=("$name|$figures|$(awk '/Non-2xx/ {print $5}' "$out/join-$name.txt")")
  stop_enrolld
}

rounds=${ROUNDS:-2}
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run base "$BASE_BIN"; run this "$this"; else run this "$this"; run base "$BASE_BIN"; fi
done
report_rounds build place refused this base | tee "$out/join_cost.md"
sql -e "DROP DATABASE IF EXISTS $db"
