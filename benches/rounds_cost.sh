#!/usr/bin/env bash
# What an entry in a draw costs against a durable enrollment, in ONE run on this machine:
# for each round, one enrolld on a fresh MariaDB database gets 50 courses of capacity
# 100,000 (the 201 path: every request a new (student, course) pair, group-committed) and
# 50 courses whose draw is a day away (the 202 path: every request a new entry, group-
# committed the same way), and wrk drives each path for the same time, alternating which
# goes first. Rates are rows in the store per second; CPU is enrolld's plus mariadbd's,
# per row. The issue's bound: entries cost no more than enrollments. Last, one course takes
# 50,000 entries and draws: the owner shard's time (the log's `shuffled_us`) and the
# draw's commit (`enrolld_rounds_draw_seconds`).
# Usage: [ROUNDS=n] benches/rounds_cost.sh [seconds=10] [connections=64]
# Writes target/bench/rounds_cost.md and prints it. Load goes to loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
port=18430
db=enrolld_bench_rounds
courses=50
students=50000
. benches/lib/rows.sh

rows=()
run_path() { # name table prefix: drives one path, appends "name|rows/s|cpu|enrolld|mariadbd|p99"
  rows+=("$1|$(drive "rounds-$1" "$2" "$3")")
}

rounds=${ROUNDS:-2}
for r in $(seq 1 "$rounds"); do
  start_enrolld "$out/enrolld-rounds.log"
  draw_at=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
  for i in $(seq 0 $((courses - 1))); do
    put_course "BIG-$i" '{"title":"bench","capacity":100000}'
    put_course "DRAW-$i" "{\"title\":\"bench\",\"capacity\":100000,\"draw_at\":\"$draw_at\"}"
  done
  if [ $((r % 2)) = 1 ]; then
    run_path enroll enrollments BIG; run_path entry places DRAW
  else
    run_path entry places DRAW; run_path enroll enrollments BIG
  fi
  if [ "$r" = "$rounds" ]; then
    # One draw over 50,000 entries.
    put_course DRAW-BIG "{\"title\":\"bench\",\"capacity\":300,\"draw_at\":\"$draw_at\",\"waitlist_max\":1000}"
    for _ in 1 2 3 4 5 6; do
      n=$(sql $db -e "SELECT COUNT(*) FROM places WHERE course_id = 'DRAW-BIG'")
      [ "$n" -ge $students ] && break
      wrk -t$threads -c$conns -d${secs}s -s benches/wrk/enroll.lua "http://127.0.0.1:$port" \
        -- $threads "$out/tokens.txt" DRAW-BIG > /dev/null
    done
    soon=$(date -u -d '+2 seconds' +%Y-%m-%dT%H:%M:%SZ)
    put_course DRAW-BIG "{\"title\":\"bench\",\"capacity\":300,\"draw_at\":\"$soon\",\"waitlist_max\":1000}"
    for _ in $(seq 1 300); do
      curl -sf -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/DRAW-BIG/draw" >/dev/null && break
      sleep 0.1
    done
    draw_line=$(grep 'draw committed' "$out/enrolld-rounds.log" | grep DRAW-BIG | tail -1)
    draw_commit=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^enrolld_rounds_draw_seconds_sum/ {print $2}')
  fi
  stop_enrolld
done

{
  echo "| round | path | rows/s | CPU µs/row (enrolld + mariadbd) | enrolld | mariadbd | p99 |"
  echo "|---|---|---|---|---|---|---|"
  i=0
  for row in "${rows[@]}"; do
    IFS='|' read -r name rate cpu ecpu mcpu p99 <<< "$row"
    echo "| $((i / 2 + 1)) | $name | $rate | $cpu | $ecpu | $mcpu | $p99 |"
    i=$((i + 1))
  done
  echo
  printf '%s\n' "${rows[@]}" | awk -F'|' '{ r[$1] += $2; c[$1] += $3; k[$1]++ }
    END { printf "entry ÷ enrollment over %d rounds: rows/s %.2f, CPU per row %.2f\n", k["entry"], (r["entry"]/k["entry"]) / (r["enroll"]/k["enroll"]), (c["entry"]/k["entry"]) / (c["enroll"]/k["enroll"]) }'
  echo "One draw: $(echo "$draw_line" | grep -o 'entries=[0-9]*') $(echo "$draw_line" | grep -o 'shuffled_us=[0-9]*') (the owner shard's time), commit ${draw_commit:-?} s."
  machine_line
} | tee "$out/rounds_cost.md"
sql -e "DROP DATABASE IF EXISTS $db"
