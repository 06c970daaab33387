#!/usr/bin/env bash
# What a hop between shards costs, and what routing each course to its owner shard saves.
# One enrolld (2 shards, --shard-listen), full courses (capacity 0, so every POST is a 409
# answered from memory), split by owner. The same load runs two ways, interleaved ROUNDS
# times, each with one wrk per shard (-t1, half the connections each):
#   owner:  each wrk sends its shard's courses to that shard's own port (what nginx does
#           with `hash $course_key` over the shard ports, deploy/nginx/enrolld.conf);
#   shared: each wrk sends the same courses to the shared SO_REUSEPORT port, where the
#           kernel picks the shard and about half the requests hop to the owner.
# Prints req/s per round, the medians and the hops counted by enrolld_shard_hops_total.
# Usage: [ROUNDS=3] benches/hops.sh [seconds=8] [connections=64]. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
conns=${2:-64}
rounds=${ROUNDS:-3}
shards=2
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release --quiet
bin=target/release/enrolld
work=target/bench/hops
mkdir -p "$work"
secret="hops-$RANDOM$RANDOM"
rm -f "$work"/hops.db*
NO_COLOR=1 "$bin" serve --listen 127.0.0.1:0 --shards $shards --shard-listen 127.0.0.1:0 \
  --store "sqlite://$PWD/$work/hops.db" --jwt-secret "$secret" --limits-enabled false \
  2> "$work/enrolld.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
line=
for _ in $(seq 1 100); do line=$(grep -m1 'ready listen=' "$work/enrolld.log" || true); [ -n "$line" ] && break; sleep 0.1; done
[ -n "$line" ] || { cat "$work/enrolld.log" >&2; exit 1; }
shared=$(sed 's/.*ready listen=\([0-9.:]*\).*/\1/' <<< "$line")
IFS=, read -r -a own <<< "$(sed 's/.*shard_listen=\([0-9.:,]*\).*/\1/' <<< "$line")"
admin=$("$bin" token --sub hops-admin --role admin --jwt-secret "$secret")
late=$("$bin" token --sub latecomer --ttl 7200 --jwt-secret "$secret")
# 64 full courses, split by owner (`enrolld shard-of`: nginx's hash, bits 16-30 of the CRC-32,
# modulo the shards).
declare -a mine0 mine1
for i in $(seq 0 63); do
  c="FULL-$i"
  curl -sf -X PUT -H "Authorization: Bearer $admin" "http://$shared/v1/admin/courses/$c" \
    -d '{"title":"full","capacity":0}' >/dev/null
done
while read -r c owner; do
  if [ "$owner" = 0 ]; then mine0+=("$c"); else mine1+=("$c"); fi
done < <("$bin" shard-of --shards "$shards" $(seq -f 'FULL-%g' 0 63))
hops() { curl -sf "http://$shared/metrics" | awk '$1 ~ /^enrolld_shard_hops_total/ {s += $2} END {print s + 0}'; }
run() { # $1 = address for shard 0's courses, $2 = for shard 1's; prints the summed req/s
  wrk -t1 -c$((conns / 2)) -d${secs}s -s benches/wrk/post_many.lua -H "Authorization: Bearer $late" \
    "http://$1" -- "${mine0[@]}" > "$work/w0.txt" &
  local w0=$!
  wrk -t1 -c$((conns / 2)) -d${secs}s -s benches/wrk/post_many.lua -H "Authorization: Bearer $late" \
    "http://$2" -- "${mine1[@]}" > "$work/w1.txt"
  wait $w0
  awk '/^Requests\/sec/ {s += $2} END {print int(s)}' "$work/w0.txt" "$work/w1.txt"
}
owner_rates=(); shared_rates=()
for r in $(seq 1 "$rounds"); do
  h0=$(hops); o=$(run "${own[0]}" "${own[1]}"); h1=$(hops); s=$(run "$shared" "$shared"); h2=$(hops)
  echo "round $r: owner ports $o req/s ($((h1 - h0)) hops); shared port $s req/s ($((h2 - h1)) hops)"
  owner_rates+=("$o"); shared_rates+=("$s")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
mo=$(median "${owner_rates[@]}"); ms=$(median "${shared_rates[@]}")
echo "median: owner ports $mo req/s, shared port $ms req/s, ratio $(awk -v a="$mo" -v b="$ms" 'BEGIN {printf "%.3f", a / b}')"
echo "($(date -u +%F), $(nproc) cores, ${#mine0[@]}+${#mine1[@]} courses by owner, wrk 2x -t1 -c$((conns / 2)) -d${secs}s)"
