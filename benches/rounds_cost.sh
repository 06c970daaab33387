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
shards=${SHARDS:-$(nproc)}
threads=2
out=target/bench
mkdir -p "$out"

scripts/services.sh >/dev/null
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
[ -n "${ENROLLD_BIN:-}" ] || cargo build --release --quiet
bin=${ENROLLD_BIN:-target/release/enrolld}
port=18430
secret="bench-secret-$RANDOM$RANDOM"
db=enrolld_bench_rounds
sql() { mariadb -h127.0.0.1 -uenrolld -penrolld -N -B "$@"; }
courses=50
students=50000
"$bin" token --sub bench --count $students --ttl 7200 --jwt-secret "$secret" > "$out/tokens.txt"
admin=$("$bin" token --sub bench-admin --role admin --jwt-secret "$secret")
mariadb_pid=$(pidof mariadbd || pidof mysqld)
ticks() { # pid: user+system CPU ticks so far
  awk '{print $14 + $15}' "/proc/$1/stat"
}
pid=""
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

rows=()
run_path() { # name table prefix: drives one path, appends "name|rows/s|cpu us/row|p99"
  local name=$1 table=$2 prefix=$3
  local before after start end e0 e1 m0 m1
  before=$(sql $db -e "SELECT COUNT(*) FROM $table")
  e0=$(ticks "$pid"); m0=$(ticks "$mariadb_pid")
  start=$(date +%s.%N)
  wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/enroll.lua "http://127.0.0.1:$port" \
    -- $threads "$out/tokens.txt" $(seq -f "$prefix-%g" 0 $((courses - 1))) > "$out/rounds-$name.txt"
  end=$(date +%s.%N)
  e1=$(ticks "$pid"); m1=$(ticks "$mariadb_pid")
  after=$(sql $db -e "SELECT COUNT(*) FROM $table")
  local hz n
  hz=$(getconf CLK_TCK)
  n=$((after - before))
  rows+=("$name|$(awk -v n=$n -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')|$(awk -v t=$(( (e1 - e0) + (m1 - m0) )) -v hz="$hz" -v n=$n 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')|$(awk '/ 99%/ {print $2}' "$out/rounds-$name.txt")")
}

rounds=${ROUNDS:-2}
for r in $(seq 1 "$rounds"); do
  sql -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
  "$bin" serve --listen 127.0.0.1:$port --store "mysql://enrolld:enrolld@127.0.0.1:3306/$db" \
    --jwt-secret "$secret" --shards "$shards" --limits-enabled false --metrics-enabled false 2> "$out/enrolld-rounds.log" &
  pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  draw_at=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
  for i in $(seq 0 $((courses - 1))); do
    curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/BIG-$i" \
      -d '{"title":"bench","capacity":100000}' >/dev/null
    curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/DRAW-$i" \
      -d "{\"title\":\"bench\",\"capacity\":100000,\"draw_at\":\"$draw_at\"}" >/dev/null
  done
  if [ $((r % 2)) = 1 ]; then
    run_path enroll enrollments BIG; run_path entry places DRAW
  else
    run_path entry places DRAW; run_path enroll enrollments BIG
  fi
  if [ "$r" = "$rounds" ]; then
    # One draw over 50,000 entries.
    curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/DRAW-BIG" \
      -d "{\"title\":\"bench\",\"capacity\":300,\"draw_at\":\"$draw_at\",\"waitlist_max\":1000}" >/dev/null
    for _ in 1 2 3 4 5 6; do
      n=$(sql $db -e "SELECT COUNT(*) FROM places WHERE course_id = 'DRAW-BIG'")
      [ "$n" -ge $students ] && break
      wrk -t$threads -c$conns -d${secs}s -s benches/wrk/enroll.lua "http://127.0.0.1:$port" \
        -- $threads "$out/tokens.txt" DRAW-BIG > /dev/null
    done
    soon=$(date -u -d '+2 seconds' +%Y-%m-%dT%H:%M:%SZ)
    curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/DRAW-BIG" \
      -d "{\"title\":\"bench\",\"capacity\":300,\"draw_at\":\"$soon\",\"waitlist_max\":1000}" >/dev/null
    for _ in $(seq 1 300); do
      curl -sf -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/DRAW-BIG/draw" >/dev/null && break
      sleep 0.1
    done
    draw_line=$(grep 'draw committed' "$out/enrolld-rounds.log" | grep DRAW-BIG | tail -1)
    draw_commit=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^enrolld_rounds_draw_seconds_sum/ {print $2}')
  fi
  kill "$pid"; wait "$pid" || true; pid=""
done

{
  echo "| round | path | rows/s | CPU µs/row (enrolld + mariadbd) | p99 |"
  echo "|---|---|---|---|---|"
  i=0
  for row in "${rows[@]}"; do
    IFS='|' read -r name rate cpu p99 <<< "$row"
    echo "| $((i / 2 + 1)) | $name | $rate | $cpu | $p99 |"
    i=$((i + 1))
  done
  echo
  printf '%s\n' "${rows[@]}" | awk -F'|' '{ r[$1] += $2; c[$1] += $3; k[$1]++ }
    END { printf "entry ÷ enrollment over %d rounds: rows/s %.2f, CPU per row %.2f\n", k["entry"], (r["entry"]/k["entry"]) / (r["enroll"]/k["enroll"]), (c["entry"]/k["entry"]) / (c["enroll"]/k["enroll"]) }'
  echo "One draw: $(echo "$draw_line" | grep -o 'entries=[0-9]*') $(echo "$draw_line" | grep -o 'shuffled_us=[0-9]*') (the owner shard's time), commit ${draw_commit:-?} s."
  echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), wrk -t$threads -c$conns -d${secs}s, enrolld --shards $shards, MariaDB $(sql -e 'SELECT VERSION()'), load generator on the same cores."
} | tee "$out/rounds_cost.md"
sql -e "DROP DATABASE IF EXISTS $db"
