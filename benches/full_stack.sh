#!/usr/bin/env bash
# First full-stack benchmark, all in ONE run on this machine so the figures compare:
#   1. nginx answering a constant (`return 200`, one worker per shard): the reference;
#   2. enrolld's 409 path: POSTs for a full course (answered from memory);
#   3. enrolld's 201 path: durable enrollments, every request a new (student, course) pair,
#      group-committed to MariaDB; the rate is the rows in MariaDB divided by the time.
# Usage: benches/full_stack.sh [seconds=10] [connections=64]
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
url="mysql://enrolld:enrolld@127.0.0.1:3306/$db"
mariadb -h127.0.0.1 -uenrolld -penrolld -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"

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

# --- enrolld on MariaDB ---
"$bin" serve --listen 127.0.0.1:$port_enrolld --store "$url" --jwt-secret "$secret" --shards "$shards" \
  2> "$out/enrolld.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port_enrolld/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port_nginx/" >/dev/null

admin=$("$bin" token --sub bench-admin --role admin --jwt-secret "$secret")
put() { curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port_enrolld/v1/admin/courses/$1" \
  -d "{\"title\":\"bench\",\"capacity\":$2}" >/dev/null; }
put FULL-0 1
holder=$("$bin" token --sub holder --jwt-secret "$secret")
curl -sf -X POST -H "Authorization: Bearer $holder" "http://127.0.0.1:$port_enrolld/v1/courses/FULL-0/enrollment" >/dev/null
courses=50
students=20000
for i in $(seq 0 $((courses - 1))); do put "BIG-$i" 100000; done
"$bin" token --sub bench --count $students --ttl 7200 --jwt-secret "$secret" > "$out/tokens.txt"
late=$("$bin" token --sub latecomer --jwt-secret "$secret")

rate() { awk '/Requests\/sec/ {print int($2)}' "$1"; }
p99() { awk '/ 99%/ {print $2}' "$1"; }

wrk -t$threads -c$conns -d${secs}s --latency "http://127.0.0.1:$port_nginx/" > "$out/nginx.txt"
wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/post.lua -H "Authorization: Bearer $late" \
  "http://127.0.0.1:$port_enrolld/v1/courses/FULL-0/enrollment" > "$out/full.txt"
before=$(mariadb -h127.0.0.1 -uenrolld -penrolld -N -B $db -e "SELECT COUNT(*) FROM enrollments")
start=$(date +%s.%N)
wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/enroll.lua "http://127.0.0.1:$port_enrolld" \
  -- $threads "$out/tokens.txt" $courses BIG- > "$out/enroll.txt"
end=$(date +%s.%N)
after=$(mariadb -h127.0.0.1 -uenrolld -penrolld -N -B $db -e "SELECT COUNT(*) FROM enrollments")
over=$(mariadb -h127.0.0.1 -uenrolld -penrolld -N -B $db -e "SELECT COUNT(*) FROM courses WHERE enrolled > capacity")
durable=$(awk -v n=$((after - before)) -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')
non2xx_full=$(awk '/Non-2xx/ {print $5}' "$out/full.txt")

nginx_rps=$(rate "$out/nginx.txt"); full_rps=$(rate "$out/full.txt"); enroll_rps=$(rate "$out/enroll.txt")
ratio=$(awk -v a="$full_rps" -v b="$nginx_rps" 'BEGIN {printf "%.2f", a / b}')
{
  echo "| figure | requests/s | p99 |"
  echo "|---|---|---|"
  echo "| nginx \`return 200\` ($shards workers) | $nginx_rps | $(p99 "$out/nginx.txt") |"
  echo "| enrolld 409 path (full course) | $full_rps | $(p99 "$out/full.txt") |"
  echo "| enrolld 201 path (durable enrollments in MariaDB) | $durable (answers: $enroll_rps/s) | $(p99 "$out/enroll.txt") |"
  echo
  echo "409 path ÷ nginx = $ratio. Non-2xx answers on the 409 run: ${non2xx_full:-0} (all should be 409)."
  echo "Rows committed in the 201 run: $((after - before)); courses over capacity: $over."
  echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), wrk -t$threads -c$conns -d${secs}s, enrolld --shards $shards, load generator on the same cores."
} | tee "$out/full_stack.md"
[ "$over" = 0 ] || { echo "OVERSOLD"; exit 1; }
