#!/usr/bin/env bash
# The core full-stack benchmark, all in ONE run on this machine so the figures compare:
#   1. nginx answering a constant (`return 200`, one worker per shard): the reference;
#   then, for each enrolld variant (plain: no limits, no metrics; +metrics; +limits, with
#   rates too high to refuse anything, so it measures what checking costs):
#   2. the 409 path: POSTs for a full course (answered from memory);
#   3. the 201 path: durable enrollments, every request a new (student, course) pair,
#      group-committed to MariaDB; the rate is the rows in MariaDB divided by the time.
# Usage: [ROUNDS=n] benches/full_stack.sh [seconds=10] [connections=64]
# With ROUNDS > 1 the variants run interleaved n times and each figure is the median.
# Writes target/bench/full_stack.md and prints it. Load goes to loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
shards=${SHARDS:-$(nproc)}
threads=2
out=target/bench
mkdir -p "$out"

scripts/services.sh
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet
bin=target/release/enrolld

port_nginx=18401
port_enrolld=18400
secret="bench-secret-$RANDOM$RANDOM"
db=enrolld_bench
sql() { mariadb -h127.0.0.1 -uenrolld -penrolld -N -B "$@"; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# --- nginx reference ---
ngx="$out/nginx"
mkdir -p "$ngx"
cat > "$ngx/nginx.conf" <<NGX
worker_processes $shards;
pid $PWD/$ngx/nginx.pid;
error_log $PWD/$ngx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$port_nginx reuseport;
    location / { default_type application/json; return 200 '{"status":"ok"}'; }
  }
}
NGX
nginx -c "$PWD/$ngx/nginx.conf" -g 'daemon off;' &
pids+=($!)


courses=50
students=40000
"$bin" token --sub bench --count $students --ttl 7200 --jwt-secret "$secret" > "$out/tokens.txt"
admin=$("$bin" token --sub bench-admin --role admin --jwt-secret "$secret")
holder=$("$bin" token --sub holder --jwt-secret "$secret")
late=$("$bin" token --sub latecomer --jwt-secret "$secret")
rate() { awk '/Requests\/sec/ {print int($2)}' "$1"; }
p99() { awk '/ 99%/ {print $2}' "$1"; }

wrk -t$threads -c$conns -d${secs}s --latency "http://127.0.0.1:$port_nginx/" > "$out/nginx.txt"
nginx_rps=$(rate "$out/nginx.txt")

rows=()
run_variant() {
  local name=$1; shift
  sql -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
  "$bin" serve --listen 127.0.0.1:$port_enrolld --store "mysql://enrolld:enrolld@127.0.0.1:3306/$db" \
    --jwt-secret "$secret" --shards "$shards" "$@" 2> "$out/enrolld-$name.log" &
  local pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port_enrolld/readyz" >/dev/null && break; sleep 0.1; done
  put() { curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port_enrolld/v1/admin/courses/$1" \
    -d "{\"title\":\"bench\",\"capacity\":$2}" >/dev/null; }
  put FULL-0 1
  curl -sf -X POST -H "Authorization: Bearer $holder" "http://127.0.0.1:$port_enrolld/v1/courses/FULL-0/enrollment" >/dev/null
  for i in $(seq 0 $((courses - 1))); do put "BIG-$i" 100000; done

  wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/post.lua -H "Authorization: Bearer $late" \
    "http://127.0.0.1:$port_enrolld/v1/courses/FULL-0/enrollment" > "$out/full-$name.txt"
  local before after start end
  before=$(sql $db -e "SELECT COUNT(*) FROM enrollments")
  start=$(date +%s.%N)
  wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/enroll.lua "http://127.0.0.1:$port_enrolld" \
    -- $threads "$out/tokens.txt" $(seq -f 'BIG-%g' 0 $((courses - 1))) > "$out/enroll-$name.txt"
  end=$(date +%s.%N)
  after=$(sql $db -e "SELECT COUNT(*) FROM enrollments")
  local over durable non409
  over=$(sql $db -e "SELECT COUNT(*) FROM courses WHERE enrolled > capacity")
  [ "$over" = 0 ] || { echo "OVERSOLD in variant $name"; exit 1; }
  durable=$(awk -v n=$((after - before)) -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')
  non409=$(curl -s "http://127.0.0.1:$port_enrolld/metrics" | awk '/^enrolld_enroll_attempts_total/ && !/"full"|"enrolled"/ {s+=$2} END {print s+0}')
  kill "$pid"; wait "$pid" || true
  rows+=("$name|$(rate "$out/full-$name.txt")|$(p99 "$out/full-$name.txt")|$durable|$(p99 "$out/enroll-$name.txt")|$non409")
}

rounds=${ROUNDS:-1}
for _ in $(seq 1 "$rounds"); do
  run_variant plain --limits-enabled false --metrics-enabled false
  run_variant metrics --limits-enabled false
  run_variant limits --config benches/limits-unrefusing.toml
done
# Median per variant and column over the rounds (rows are name|full|fp99|dur|dp99|non409).
median_rows=()
for name in plain metrics limits; do
  line=$(printf '%s\n' "${rows[@]}" | awk -F'|' -v n="$name" '
    $1 == n { k++; f[k] = $2; fp[k] = $3; d[k] = $4; dp[k] = $5; x[k] = $6 }
    function med(a, m,   i, j, t) { for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }; return a[int((m + 1) / 2)] }
    END { printf "%s|%s|%s|%s|%s|%s", n, med(f, k), fp[int((k + 1) / 2)], med(d, k), dp[int((k + 1) / 2)], x[1] }')
  median_rows+=("$line")
done
rows=("${median_rows[@]}")

{
  echo "Median of $rounds interleaved round(s)."
  echo
  echo "| variant | 409 path req/s | 409 p99 | durable 201/s | 201 p99 | 409 ÷ nginx |"
  echo "|---|---|---|---|---|---|"
  echo "| nginx \`return 200\` ($shards workers) | $nginx_rps | $(p99 "$out/nginx.txt") | | | 1.00 |"
  base_full=""; base_dur=""
  for r in "${rows[@]}"; do
    IFS='|' read -r name full fp99 dur dp99 _ <<< "$r"
    echo "| enrolld $name | $full | $fp99 | $dur | $dp99 | $(awk -v a="$full" -v b="$nginx_rps" 'BEGIN {printf "%.2f", a / b}') |"
  done
  echo
  IFS='|' read -r _ pf _ pd _ _ <<< "${rows[0]}"
  IFS='|' read -r _ mf _ md _ _ <<< "${rows[1]}"
  IFS='|' read -r _ lf _ ld _ _ <<< "${rows[2]}"
  awk -v pf="$pf" -v pd="$pd" -v mf="$mf" -v md="$md" -v lf="$lf" -v ld="$ld" 'BEGIN {
    printf "metrics on ÷ off: 409 path %.2f, 201 path %.2f. limits on ÷ off (metrics on both): 409 path %.2f, 201 path %.2f.\n", mf/pf, md/pd, lf/mf, ld/md }'
  echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), wrk -t$threads -c$conns -d${secs}s, enrolld --shards $shards, MariaDB $(sql -e 'SELECT VERSION()'), load generator on the same cores."
} | tee "$out/full_stack.md"
