#!/usr/bin/env bash
# enrolld against the tools it is built from, in ONE run on this machine so the figures
# compare (the same cores, the same moment, the load generator on the same cores):
#   1. nginx answering a constant (`return 200`, one worker per shard, no access log);
#   2. enrolld's 409 path: POSTs by another student for a course of capacity 1 already
#      taken (answered from memory);
#   3. enrolld's 201 path: durable enrollments, every request a new (student, course) pair;
#      the rate is the rows that reached MariaDB divided by the wall time. Twice: on the
#      shared port (the kernel picks the shard, about half the requests hop to the owner)
#      and on the shards' own ports, one wrk per shard sending only that shard's courses
#      (what the shipped nginx config does: no hops);
#   4. Redis running a seat-reserve Lua script with EVALSHA (what a Redis-centred
#      flash-sale design pays per seat), on a key of our own prefix;
#   5. MariaDB's own rate for 1000-row batched INSERTs, autocommit, one connection (the
#      ceiling of a group-committing writer such as enrolld's persist thread).
# Prints the ratios and writes target/rush/compare.md. All traffic goes to 127.0.0.1.
# Beside each rate it reports the CPU each operation cost every process involved (server,
# store, load generator; from /proc and getrusage), and how busy that kept the machine:
# the profile that says whether a run was bound by the cores or by waiting.
#
# Usage: benches/compare.sh [seconds=10] [connections=64]
# Environment: ENROLLD_BIN (the enrolld binary to measure; default: build this tree),
# SHARDS (default nproc), LIMITS=on to keep enrolld's rate limits on (off by
# default: wrk sends everything from one IP segment, and the 409 run from one student, which
# the limits exist to refuse).
# Never: FLUSHALL or touch another key of the shared Redis (only enrolld:bench:*), or leave a
# database, nginx or enrolld behind.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
shards=${SHARDS:-$(nproc)}
threads=2
out=target/rush
work=target/rush/compare
mkdir -p "$out" "$work"
log() { echo "compare: $*" >&2; }

scripts/services.sh
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# ENROLLD_BIN: measure another build (say, the commit before a change) in the same run.
if [ -n "${ENROLLD_BIN:-}" ]; then
  bin=$ENROLLD_BIN
else
  cargo build --release --quiet
  bin=target/release/enrolld
fi

export MYSQL_PWD=enrolld
sql() { mariadb -h127.0.0.1 -P3306 -uenrolld -N -B "$@"; }
tag=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
db_srv=enrolld_cmpsrv_$tag
db_ins=enrolld_cmp_$tag
redis_key=enrolld:bench:stock
rcli() { redis-cli -h 127.0.0.1 -p 6379 "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rcli DEL "$redis_key" >/dev/null 2>&1 || true
  sql -e "DROP DATABASE IF EXISTS $db_srv; DROP DATABASE IF EXISTS $db_ins" 2>/dev/null || true
}
trap cleanup EXIT

# Sum of a metric over its label sets, from a /metrics scrape.
metric() { awk -v m="$2" '$1 == m || index($1, m "{") == 1 {s += $NF} END {printf "%.6f", s}' "$1"; }
rate() { awk '/^Requests\/sec/ {print int($2)}' "$1"; }
p99() { awk '$1 == "99%" {print $2}' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }

# CPU accounting. `ticks PID...`: user + system clock ticks used so far by those processes
# (all their threads). `timed CPUFILE CMD...`: runs CMD and writes the CPU seconds it and its
# children used to CPUFILE (getrusage, so it works after CMD has exited).
hz=$(getconf CLK_TCK)
ticks() { local t=0 p f; for p in "$@"; do f=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) && t=$((t + f)); done; echo "$t"; }
timed() {
  local cpu_file=$1; shift
  python3 -c 'import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%.4f\n" % (r.ru_utime + r.ru_stime))
sys.exit(code)' "$cpu_file" "$@"
}
# cpu_row NAME OPS SERVER_TICKS STORE_TICKS LOADGEN_SECONDS WALL_SECONDS: one row of the CPU table.
cpu_rows=()
cpu_row() {
  cpu_rows+=("$(awk -v name="$1" -v ops="$2" -v srv="$3" -v sto="$4" -v gen="$5" -v wall="$6" -v hz="$hz" -v cores="$(nproc)" 'BEGIN {
    n = ops * wall; if (n <= 0) { print "| " name " | | | | | |"; exit }
    s = srv / hz * 1e6 / n; d = sto / hz * 1e6 / n; g = gen * 1e6 / n; t = s + d + g
    printf "| %s | %.1f | %s | %.1f | **%.1f** | %.0f%% |", name, s, (sto == "" ? "" : sprintf("%.1f", d)), g, t, 100 * t * ops / (cores * 1e6) }')")
}
wrk_secs() { awk '/requests in/ { v = $4; sub(/,$/, "", v); u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
  print (u == "m") ? v * 60 : (u == "ms") ? v / 1000 : v }' "$1"; }

# --- 1. nginx answering a constant -------------------------------------------------------
port_nginx=$(free_port)
ngx="$PWD/$work/nginx"
mkdir -p "$ngx"
cat > "$ngx/nginx.conf" <<NGX
worker_processes $shards;
pid $ngx/nginx.pid;
error_log $ngx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $ngx/tmp;
  proxy_temp_path $ngx/tmp;
  fastcgi_temp_path $ngx/tmp;
  uwsgi_temp_path $ngx/tmp;
  scgi_temp_path $ngx/tmp;
  server {
    listen 127.0.0.1:$port_nginx reuseport;
    location / { default_type application/json; return 200 '{"status":"ok"}'; }
  }
}
NGX
mkdir -p "$ngx/tmp"
nginx -c "$ngx/nginx.conf" -g 'daemon off;' &
pids+=($!)

# --- enrolld on a scratch MariaDB database -------------------------------------------------
sql -e "CREATE DATABASE $db_srv"
secret="cmp-$tag-$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')"
limits=false
[ "${LIMITS:-off}" = on ] && limits=true
NO_COLOR=1 RUST_LOG=info,sqlx=warn "$bin" serve --listen 127.0.0.1:0 --shards "$shards" --shard-listen 127.0.0.1:0 \
  --store "mysql://enrolld:enrolld@127.0.0.1:3306/$db_srv" --jwt-secret "$secret" \
  --limits-enabled "$limits" 2> "$work/enrolld.log" &
pids+=($!)
addr=
for _ in $(seq 1 300); do
  addr=$(sed -n 's/.*ready listen=\([0-9.:]*\).*/\1/p' "$work/enrolld.log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { log "enrolld did not become ready:"; cat "$work/enrolld.log" >&2; exit 1; }
for _ in $(seq 1 50); do curl -sf "http://127.0.0.1:$port_nginx/" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port_nginx/" >/dev/null || { log "nginx did not answer"; cat "$ngx/error.log" >&2; exit 1; }
url="http://$addr"
IFS=, read -r -a shard_addrs <<< "$(sed -n 's/.*ready listen=.* shard_listen=\([0-9.:,]*\).*/\1/p' "$work/enrolld.log" | head -1)"
[ ${#shard_addrs[@]} = "$shards" ] || { log "enrolld did not list its shard ports"; exit 1; }

admin=$("$bin" token --sub cmp-admin --role admin --ttl 7200 --jwt-secret "$secret")
put() {
  curl -sf -X PUT -H "Authorization: Bearer $admin" "$url/v1/admin/courses/$1" \
    -d "{\"title\":\"compare\",\"capacity\":$2}" >/dev/null
}
put FULL-0 1
holder=$("$bin" token --sub holder --jwt-secret "$secret")
curl -sf -X POST -H "Authorization: Bearer $holder" "$url/v1/courses/FULL-0/enrollment" >/dev/null
late=$("$bin" token --sub latecomer --ttl 7200 --jwt-secret "$secret")
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $late" \
  "$url/v1/courses/FULL-0/enrollment")" = 409 ] || { log "the 409 path does not answer 409"; exit 1; }
courses=50
students=20000
for i in $(seq 0 $((courses - 1))); do put "BIG-$i" 100000; done
"$bin" token --sub cmp --count $students --ttl 7200 --jwt-secret "$secret" > "$work/tokens.txt"
# Other students for the owner-port run, so it never repeats a pair of the first run.
"$bin" token --sub own --count $students --ttl 7200 --jwt-secret "$secret" > "$work/tokens-own.txt"
declare -a owned=()
while read -r c o; do owned[$o]+=" $c"; done < <("$bin" shard-of --shards "$shards" $(seq -f 'BIG-%g' 0 $((courses - 1))))

# --- the wrk runs ------------------------------------------------------------------------
ngx_pids=("${pids[0]}" $(pgrep -P "${pids[0]}" || true))
srv_pid=${pids[1]}
mdb_pid=$(cat "$(sql -e 'SELECT @@pid_file')" 2>/dev/null || pgrep -o -x mariadbd || true)
log "nginx (${secs}s)"
t0=$(ticks "${ngx_pids[@]}")
timed "$work/nginx.cpu" wrk -t$threads -c$conns -d${secs}s --latency "http://127.0.0.1:$port_nginx/" > "$work/nginx.txt"
cpu_row "nginx \`return 200\`" "$(rate "$work/nginx.txt")" $(($(ticks "${ngx_pids[@]}") - t0)) "" "$(cat "$work/nginx.cpu")" "$(wrk_secs "$work/nginx.txt")"
log "enrolld 409 path (${secs}s)"
t0=$(ticks "$srv_pid")
timed "$work/full.cpu" wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/post.lua -H "Authorization: Bearer $late" \
  "$url/v1/courses/FULL-0/enrollment" > "$work/full.txt"
cpu_row "enrolld 409 path" "$(rate "$work/full.txt")" $(($(ticks "$srv_pid") - t0)) "" "$(cat "$work/full.cpu")" "$(wrk_secs "$work/full.txt")"
log "enrolld 201 path (${secs}s)"
curl -sf "$url/metrics" > "$work/metrics.before"
before=$(sql "$db_srv" -e "SELECT COUNT(*) FROM enrollments")
t0=$(ticks "$srv_pid"); m0=$(ticks "$mdb_pid")
start=$(date +%s.%N)
timed "$work/enroll.cpu" wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/enroll.lua "$url" \
  -- $threads "$work/tokens.txt" $(seq -f 'BIG-%g' 0 $((courses - 1))) > "$work/enroll.txt"
end=$(date +%s.%N)
t1=$(ticks "$srv_pid"); m1=$(ticks "$mdb_pid")
curl -sf "$url/metrics" > "$work/metrics.after"
after=$(sql "$db_srv" -e "SELECT COUNT(*) FROM enrollments")
over=$(sql "$db_srv" -e "SELECT COUNT(*) FROM courses WHERE enrolled > capacity")
mismatch=$(sql "$db_srv" -e "SELECT COUNT(*) FROM courses c WHERE enrolled <> (SELECT COUNT(*) FROM enrollments e WHERE e.course_id = c.id)")
rows=$((after - before))
durable=$(awk -v n=$rows -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')
cpu_row "enrolld 201 path, shared port (per durable row)" "$durable" $((t1 - t0)) $((m1 - m0)) "$(cat "$work/enroll.cpu")" \
  "$(awk -v a="$start" -v b="$end" 'BEGIN {print b - a}')"
delta() { awk -v a="$(metric "$work/metrics.after" "$1")" -v b="$(metric "$work/metrics.before" "$1")" 'BEGIN {print a - b}'; }
batches=$(delta enrolld_persist_batch_rows_count)
batch_rows=$(awk -v r="$(delta enrolld_persist_batch_rows_sum)" -v n="$batches" 'BEGIN { if (n > 0) printf "%.1f", r / n; else print "?" }')
commit_ms=$(awk -v s="$(delta enrolld_persist_commit_seconds_sum)" -v n="$(delta enrolld_persist_commit_seconds_count)" \
  'BEGIN { if (n > 0) printf "%.2f", 1000 * s / n; else print "?" }')
non2xx_full=$(awk '/Non-2xx/ {print $5}' "$work/full.txt")
non2xx_enroll=$(awk '/Non-2xx/ {print $5}' "$work/enroll.txt")
log "enrolld 201 path on the shard ports (${secs}s, one wrk per shard)"
before_own=$after
t0=$(ticks "$srv_pid"); m0=$(ticks "$mdb_pid")
start=$(date +%s.%N)
wpids=()
for i in $(seq 0 $((shards - 1))); do
  # shellcheck disable=SC2086 # the owned course list is meant to split into arguments
  timed "$work/enroll-own-$i.cpu" wrk -t1 -c$((conns / shards)) -d${secs}s --latency -s benches/wrk/enroll.lua "http://${shard_addrs[$i]}" \
    -- 1 "$work/tokens-own.txt" ${owned[$i]} > "$work/enroll-own-$i.txt" &
  wpids+=($!)
done
wait "${wpids[@]}"
end=$(date +%s.%N)
t1=$(ticks "$srv_pid"); m1=$(ticks "$mdb_pid")
curl -sf "$url/metrics" > "$work/metrics.own"
after_own=$(sql "$db_srv" -e "SELECT COUNT(*) FROM enrollments")
durable_own=$(awk -v n=$((after_own - before_own)) -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')
cpu_row "enrolld 201 path, owner ports (per durable row)" "$durable_own" $((t1 - t0)) $((m1 - m0)) \
  "$(cat "$work"/enroll-own-*.cpu | awk '{s += $1} END {print s}')" "$(awk -v a="$start" -v b="$end" 'BEGIN {print b - a}')"
# The worst shard's p99 (wrk prints it in us, ms or s).
p99_own=$(for f in "$work"/enroll-own-*.txt; do p99 "$f"; done | awk '
  { v = $1; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v); ms = (u == "us") ? v / 1000 : (u == "s") ? v * 1000 : v
    if (ms > m) { m = ms; w = $1 } } END { print w }')
non2xx_own=$(cat "$work"/enroll-own-*.txt | awk '/Non-2xx/ {s += $5} END {print s + 0}')
hops_own=$(awk -v a="$(metric "$work/metrics.own" enrolld_shard_hops_total)" -v b="$(metric "$work/metrics.after" enrolld_shard_hops_total)" 'BEGIN {print a - b}')
over=$(sql "$db_srv" -e "SELECT COUNT(*) FROM courses WHERE enrolled > capacity")
mismatch=$(sql "$db_srv" -e "SELECT COUNT(*) FROM courses c WHERE enrolled <> (SELECT COUNT(*) FROM enrollments e WHERE e.course_id = c.id)")
# enrolld is done: stop it (SIGTERM) so the next two figures do not share the cores with it.
kill -TERM "${pids[1]}" && wait "${pids[1]}" || true

# --- 4. Redis EVALSHA of a seat-reserve script ---------------------------------------------
log "redis EVALSHA (-c $conns -n 200000)"
script="local s = tonumber(redis.call('GET', KEYS[1]) or '0'); if s > 0 then redis.call('DECR', KEYS[1]); return 1 end; return 0"
sha=$(rcli SCRIPT LOAD "$script")
rcli SET "$redis_key" 1000000000 >/dev/null
redis_pid=$(rcli INFO server | tr -d '\r' | sed -n 's/^process_id://p')
t0=$(ticks "$redis_pid")
start=$(date +%s.%N)
timed "$work/redis.cpu" redis-benchmark -h 127.0.0.1 -p 6379 -c "$conns" -n 200000 -q EVALSHA "$sha" 1 "$redis_key" \
  | tr '\r' '\n' > "$work/redis.txt"
end=$(date +%s.%N)
t1=$(ticks "$redis_pid")
redis_ops=$(awk '/requests per second/ {for (i = 1; i <= NF; i++) if ($(i+1) ~ /^requests/) v = $i} END {print int(v)}' "$work/redis.txt")
redis_p50=$(sed -n 's/.*p50=\([0-9.]*\) msec.*/\1/p' "$work/redis.txt" | tail -1)
cpu_row "Redis EVALSHA" "$redis_ops" $((t1 - t0)) "" "$(cat "$work/redis.cpu")" "$(awk -v a="$start" -v b="$end" 'BEGIN {print b - a}')"
left=$(rcli GET "$redis_key")
rcli DEL "$redis_key" >/dev/null

# --- 5. MariaDB 1000-row batched INSERTs ------------------------------------------------------
log "mariadb 1000-row INSERTs (~${secs}s)"
sql -e "CREATE DATABASE $db_ins"
sql "$db_ins" -e "CREATE TABLE t (course_id VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
  student_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, enrolled_at_ms BIGINT NOT NULL,
  PRIMARY KEY (course_id, student_id)) ENGINE=InnoDB"
ins_start=$(date +%s.%N)
python3 - "$secs" <<'PY' | sql "$db_ins"
import sys, time
secs = float(sys.argv[1])
start, n = time.monotonic(), 0
while time.monotonic() - start < secs:
    rows = ",".join(f"('C{(n * 1000 + i) % 50}','s{n * 1000 + i}',1700000000000)" for i in range(1000))
    sys.stdout.write(f"INSERT INTO t VALUES {rows};\n")
    sys.stdout.flush()
    n += 1
PY
ins_end=$(date +%s.%N)
ins_rows=$(sql "$db_ins" -e "SELECT COUNT(*) FROM t")
mariadb_rows=$(awk -v n="$ins_rows" -v a="$ins_start" -v b="$ins_end" 'BEGIN {print int(n / (b - a))}')

# --- figures -------------------------------------------------------------------------------------
nginx_rps=$(rate "$work/nginx.txt"); full_rps=$(rate "$work/full.txt"); enroll_rps=$(rate "$work/enroll.txt")
r_409_nginx=$(ratio "$full_rps" "$nginx_rps")
r_201_redis=$(ratio "$durable" "$redis_ops")
r_201own_redis=$(ratio "$durable_own" "$redis_ops")
r_201_mariadb=$(ratio "$durable" "$mariadb_rows")
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
{
  echo "# enrolld compared with nginx, Redis and MariaDB (one run)"
  echo
  echo "| figure | rate | p99 |"
  echo "|---|---|---|"
  echo "| nginx \`return 200\` ($shards workers) | $nginx_rps req/s | $(p99 "$work/nginx.txt") |"
  echo "| enrolld 409 path (full course, from memory) | $full_rps req/s | $(p99 "$work/full.txt") |"
  echo "| enrolld 201 path (durable enrollments in MariaDB), shared port | $durable rows/s (answers: $enroll_rps/s) | $(p99 "$work/enroll.txt") |"
  echo "| enrolld 201 path, each course on its owner shard's port | $durable_own rows/s | $p99_own (worst shard) |"
  echo "| Redis EVALSHA seat-reserve script (redis-benchmark -c $conns -n 200000) | $redis_ops ops/s | p50 ${redis_p50:-?} ms |"
  echo "| MariaDB 1000-row INSERTs, autocommit, one connection | $mariadb_rows rows/s | |"
  echo
  echo "| ratio | value |"
  echo "|---|---|"
  echo "| 409 path ÷ nginx | $r_409_nginx |"
  echo "| durable 201/s ÷ Redis EVALSHA ops/s, shared port | $r_201_redis |"
  echo "| durable 201/s ÷ Redis EVALSHA ops/s, owner ports | $r_201own_redis |"
  echo "| durable 201/s ÷ MariaDB batched rows/s | $r_201_mariadb |"
  echo
  echo "CPU per operation, in µs, summed over all cores (/proc for the servers, getrusage for the load"
  echo "generators), and how busy that kept the machine's $(nproc) cores. A run near 100% is bound by the cores;"
  echo "the ratio of two such runs is the inverse ratio of their totals."
  echo
  echo "| run | server | store | load generator | total | cores busy |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${cpu_rows[@]}"
  echo
  echo "Checks: non-2xx answers on the 409 run ${non2xx_full:-0} (all should be 409); on the 201 runs ${non2xx_enroll:-0}"
  echo "and $non2xx_own (should be 0); rows committed in the 201 runs $rows and $((after_own - before_own)); hops between"
  echo "shards in the owner-port run $hops_own (should be 0); courses over capacity $over; courses whose counter"
  echo "differs from their rows $mismatch; Redis stock left $left of 1000000000."
  echo "The 201 run's group commits (enrolld /metrics): $batches batches, mean $batch_rows rows per batch,"
  echo "mean commit $commit_ms ms."
  echo
  echo "$(date -u +%F) on $(nproc) cores ($cpu). wrk -t$threads -c$conns -d${secs}s --latency; enrolld --shards $shards"
  echo "--limits-enabled $limits on MariaDB; the load generators run on the same cores as the servers."
} | tee "$out/compare.md"
echo
echo "ratios: 409/nginx = $r_409_nginx; durable 201/s / redis EVALSHA = $r_201_redis (owner ports: $r_201own_redis); durable 201/s / mariadb batched rows = $r_201_mariadb"
[ "$over" = 0 ] && [ "$mismatch" = 0 ] || { echo "compare: INVARIANT VIOLATED (oversold or counter mismatch)" >&2; exit 1; }
