#!/usr/bin/env bash
# What the change feed costs the durable 201 path, in ONE run on this machine: rounds of
# the same enrolld build on a fresh MariaDB database each, alternating the feed on and off
# (`ENROLLD_EVENTS_ENABLED`), each driving 50 courses of capacity 100,000 with wrk
# (benches/wrk/enroll.lua: every request a new (student, course) pair). Rates are rows in
# the store per second; CPU is enrolld's plus mariadbd's, per row. The issue's target:
# the 201 path with events on within 15% of events off.
# Usage: [ROUNDS=n] benches/feed_cost.sh [seconds=10] [connections=64]
# Writes target/bench/feed_cost.md and prints it. Load goes to loopback only.
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
port=18431
secret="bench-secret-$RANDOM$RANDOM"
db=enrolld_bench_feed
sql() { mariadb -h127.0.0.1 -uenrolld -penrolld -N -B "$@"; }
courses=50
students=40000
"$bin" token --sub bench --count $students --ttl 7200 --jwt-secret "$secret" > "$out/tokens.txt"
admin=$("$bin" token --sub bench-admin --role admin --jwt-secret "$secret")
mariadb_pid=$(pidof mariadbd || pidof mysqld)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
pid=""
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

rows=()
run() { # events: one round with the feed on (true) or off (false)
  local events=$1
  sql -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
  ENROLLD_EVENTS_ENABLED=$events "$bin" serve --listen 127.0.0.1:$port \
    --store "mysql://enrolld:enrolld@127.0.0.1:3306/$db" --jwt-secret "$secret" --shards "$shards" \
    --limits-enabled false --metrics-enabled false 2> "$out/enrolld-feed.log" &
  pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
  for i in $(seq 0 $((courses - 1))); do
    curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/BIG-$i" \
      -d '{"title":"bench","capacity":100000}' >/dev/null
  done
  local start end e0 e1 m0 m1 n events_n
  e0=$(ticks "$pid"); m0=$(ticks "$mariadb_pid")
  start=$(date +%s.%N)
  wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/enroll.lua "http://127.0.0.1:$port" \
    -- $threads "$out/tokens.txt" $(seq -f 'BIG-%g' 0 $((courses - 1))) > "$out/feed-$events.txt"
  end=$(date +%s.%N)
  e1=$(ticks "$pid"); m1=$(ticks "$mariadb_pid")
  n=$(sql $db -e "SELECT COUNT(*) FROM enrollments")
  events_n=$(sql $db -e "SELECT COUNT(*) FROM events")
  kill "$pid"; wait "$pid" || true; pid=""
  local per='BEGIN {printf "%.1f", t / hz * 1e6 / n}' hz
  hz=$(getconf CLK_TCK)
  rows+=("$events|$(awk -v n=$n -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')|$(awk -v t=$(( (e1 - e0) + (m1 - m0) )) -v hz="$hz" -v n=$n "$per")|$(awk -v t=$((e1 - e0)) -v hz="$hz" -v n=$n "$per")|$(awk -v t=$((m1 - m0)) -v hz="$hz" -v n=$n "$per")|$(awk '/ 99%/ {print $2}' "$out/feed-$events.txt")|$events_n")
}

rounds=${ROUNDS:-2}
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) = 1 ]; then run false; run true; else run true; run false; fi
done
{
  echo "| feed | durable rows/s | CPU µs/row (enrolld + mariadbd) | enrolld | mariadbd | p99 | events written |"
  echo "|---|---|---|---|---|---|---|"
  for row in "${rows[@]}"; do
    IFS='|' read -r ev rate cpu ecpu mcpu p99 n <<< "$row"
    echo "| $([ "$ev" = true ] && echo on || echo off) | $rate | $cpu | $ecpu | $mcpu | $p99 | $n |"
  done
  echo
  printf '%s\n' "${rows[@]}" | awk -F'|' '{ r[$1] += $2; c[$1] += $3; k[$1]++ }
    END { printf "on ÷ off over %d rounds each: rows/s %.2f, CPU per row %.2f\n", k["true"], (r["true"]/k["true"]) / (r["false"]/k["false"]), (c["true"]/k["true"]) / (c["false"]/k["false"]) }'
  echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), wrk -t$threads -c$conns -d${secs}s, enrolld --shards $shards, MariaDB $(sql -e 'SELECT VERSION()'), load generator on the same cores."
} | tee "$out/feed_cost.md"
sql -e "DROP DATABASE IF EXISTS $db"
