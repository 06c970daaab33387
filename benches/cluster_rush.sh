#!/usr/bin/env bash
# A rush through the shipped cluster front: NODES (default 3) enrolld nodes in cluster mode
# on one scratch MariaDB database and the shared Redis (keys under a prefix of our own),
# behind deploy/nginx/enrolld-cluster.conf (its upstream's example `server` lines replaced
# by the nodes' addresses, TLS replaced by a plain loopback listener, logs in the work
# directory; everything else as shipped). wrk sends durable enrollments (every request a
# new student and course pair, 50 courses) through nginx. Prints the durable rows/s, the
# answers' p99, the hops the nodes counted, the non-2xx answers, and checks that no course
# is oversold and every counter equals its rows. Writes target/rush/cluster_rush.md. All
# traffic stays on 127.0.0.1; every process runs on this machine's cores.
#
# Usage: benches/cluster_rush.sh [seconds=10] [connections=64]; NODES (default 3).
# Never: touch another Redis key than enrolld:bench-*, or leave a database, node or nginx
# behind.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
nodes=${NODES:-3}
out=target/rush
work=$PWD/target/rush/cluster
mkdir -p "$out" "$work"
log() { echo "cluster_rush: $*" >&2; }

scripts/services.sh
command -v wrk >/dev/null && command -v nginx >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light >/dev/null
}
cargo build --release --quiet
bin=$PWD/target/release/enrolld

export MYSQL_PWD=enrolld
sql() { mariadb -h127.0.0.1 -P3306 -uenrolld -N -B "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tag=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
db=enrolld_clrush_$tag
prefix="enrolld:bench-$tag:"
secret="clrush-$tag-$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  sql -e "DROP DATABASE IF EXISTS $db" 2>/dev/null || true
  redis-cli -h 127.0.0.1 --scan --pattern "${prefix}*" | xargs -r redis-cli -h 127.0.0.1 DEL >/dev/null 2>&1 || true
}
trap cleanup EXIT

sql -e "CREATE DATABASE $db"
# The first node alone (it migrates the new database), then the others.
addrs=()
for i in $(seq 1 "$nodes"); do
  port=$(free_port)
  addrs+=("127.0.0.1:$port")
  NO_COLOR=1 RUST_LOG=info,sqlx=warn "$bin" serve --node-id "n$i" --listen "127.0.0.1:$port" --shards 1 \
    --store "mysql://enrolld:enrolld@127.0.0.1:3306/$db" --jwt-secret "$secret" \
    --redis redis://127.0.0.1:6379 --redis-prefix "$prefix" --limits-enabled false 2> "$work/n$i.log" &
  pids+=($!)
  for _ in $(seq 1 300); do grep -q "enrolld ready" "$work/n$i.log" && break; sleep 0.1; done
  grep -q "enrolld ready" "$work/n$i.log" || { log "node n$i did not become ready"; cat "$work/n$i.log" >&2; exit 1; }
done

# nginx: the shipped cluster front with the nodes as its upstream.
port_nginx=$(free_port)
servers=$(printf '    server %s max_fails=3 fail_timeout=5s;\\n' "${addrs[@]}")
sed -e '/^ *server 10\.0\.0\.1[1-3]:8080/d' \
    -e "s|^\( *hash \$course_key consistent;\)|\1\n$servers|" \
    -e "s|listen 443 ssl;|listen 127.0.0.1:$port_nginx;|" \
    -e '/^ *ssl_/d' \
    -e "s|/var/log/nginx/|$work/|g" \
    deploy/nginx/enrolld-cluster.conf > "$work/enrolld-cluster.conf"
mkdir -p "$work/tmp"
cat > "$work/nginx.conf" <<NGX
worker_processes 2;
pid $work/nginx.pid;
error_log $work/nginx.error.log warn;
events { worker_connections 4096; }
http {
  client_body_temp_path $work/tmp;
  proxy_temp_path $work/tmp;
  fastcgi_temp_path $work/tmp;
  uwsgi_temp_path $work/tmp;
  scgi_temp_path $work/tmp;
  include $work/enrolld-cluster.conf;
}
NGX
nginx -t -c "$work/nginx.conf" 2> "$work/nginx.check" || { cat "$work/nginx.check" >&2; exit 1; }
nginx -c "$work/nginx.conf" -g 'daemon off;' &
pids+=($!)
url="http://127.0.0.1:$port_nginx"
for _ in $(seq 1 50); do curl -s -o /dev/null "$url/healthz" && break; sleep 0.1; done

# The nodes share the partitions before the rush.
metric() { curl -s "http://$1/metrics" | awk -v m="$2" '$1 == m {print $2}'; }
for _ in $(seq 1 100); do
  held=0
  for a in "${addrs[@]}"; do held=$((held + $(metric "$a" enrolld_cluster_leases_held | cut -d. -f1))); done
  [ "$held" = 16384 ] && break
  sleep 0.1
done
log "the $nodes nodes hold $held of 16384 partitions"

admin=$("$bin" token --sub clrush-admin --role admin --ttl 7200 --jwt-secret "$secret")
courses=50
for i in $(seq 0 $((courses - 1))); do
  # 503 (nothing recorded) while the nodes still hand partitions to each other: retried.
  curl -sf --retry 5 --retry-delay 1 -X PUT -H "Authorization: Bearer $admin" "$url/v1/admin/courses/BIG-$i" \
    -d '{"title":"cluster rush","capacity":100000}' >/dev/null
done
"$bin" token --sub clr --count 20000 --ttl 7200 --jwt-secret "$secret" > "$work/tokens.txt"
hops_before=0
for a in "${addrs[@]}"; do hops_before=$(awk -v x="$hops_before" -v y="$(metric "$a" enrolld_cluster_hops_total)" 'BEGIN {print x + y}'); done

log "rush through nginx (${secs}s, $conns connections)"
before=$(sql "$db" -e "SELECT COUNT(*) FROM enrollments")
start=$(date +%s.%N)
wrk -t2 -c"$conns" -d"${secs}s" --latency -s benches/wrk/enroll.lua "$url" \
  -- 2 "$work/tokens.txt" $(seq -f 'BIG-%g' 0 $((courses - 1))) > "$work/wrk.txt"
end=$(date +%s.%N)
after=$(sql "$db" -e "SELECT COUNT(*) FROM enrollments")
hops=0
for a in "${addrs[@]}"; do hops=$(awk -v x="$hops" -v y="$(metric "$a" enrolld_cluster_hops_total)" 'BEGIN {print x + y}'); done
hops=$(awk -v a="$hops" -v b="$hops_before" 'BEGIN {print a - b}')
rows=$((after - before))
durable=$(awk -v n=$rows -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')
answers=$(awk '/^Requests\/sec/ {print int($2)}' "$work/wrk.txt")
p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $5}' "$work/wrk.txt")
over=$(sql "$db" -e "SELECT COUNT(*) FROM courses WHERE enrolled > capacity")
mismatch=$(sql "$db" -e "SELECT COUNT(*) FROM courses c WHERE enrolled <> (SELECT COUNT(*) FROM enrollments e WHERE e.course_id = c.id)")
per_node=$(sql "$db" -e "SELECT l.owner, COUNT(*) FROM enrollments e JOIN courses c ON c.id = e.course_id JOIN leases l ON l.part = c.part GROUP BY l.owner ORDER BY l.owner" | tr '\t\n' '= ' )
{
  echo "# $nodes enrolld nodes behind the shipped nginx cluster front (one run of benches/cluster_rush.sh)"
  echo
  echo "| figure | value |"
  echo "|---|---|"
  echo "| durable enrollments through nginx | $durable rows/s ($rows rows; answers $answers/s) |"
  echo "| p99 of the answers | $p99 |"
  echo "| hops between nodes | $hops of $rows requests answered 201 |"
  echo "| non-2xx answers | ${non2xx:-0} |"
  echo "| rows per owning node | $per_node |"
  echo "| courses over capacity; counters unlike their rows | $over; $mismatch |"
  echo
  echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); $nodes nodes with --shards 1,"
  echo "nginx with 2 workers, MariaDB, Redis and wrk -t2 -c$conns -d${secs}s all on the same cores; limits off."
} | tee "$out/cluster_rush.md"
[ "$over" = 0 ] && [ "$mismatch" = 0 ] || { echo "cluster_rush: INVARIANT VIOLATED (oversold or counter mismatch)" >&2; exit 1; }
