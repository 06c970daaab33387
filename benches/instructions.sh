#!/usr/bin/env bash
# Instructions per request on the 409 path, counted by callgrind: repeatable on a shared
# machine where wall-clock rates move by ±10% between runs. Each variant runs twice, with
# N1 and N2 requests over one keep-alive connection; (I2 − I1) / (N2 − N1) cancels start-up.
# Then allocations per 409 request, counted the same way by valgrind's dhat on a build with
# the system allocator (`--features system-allocator`: dhat cannot see inside jemalloc; the
# code paths are the same). ALLOCS=off skips that part.
# Usage: [ENROLLD_BIN=path] [ALLOCS_BIN=path] benches/instructions.sh [N1=2000] [N2=7000]
set -euo pipefail
cd "$(dirname "$0")/.."
n1=${1:-2000}
n2=${2:-7000}
out=target/bench/instr
mkdir -p "$out"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
bin=${ENROLLD_BIN:-target/release/enrolld}
[ -n "${ENROLLD_BIN:-}" ] || cargo build --release --quiet
alloc_bin=${ALLOCS_BIN:-$out/enrolld-system-allocator}
if [ "${ALLOCS:-on}" != off ] && [ -z "${ALLOCS_BIN:-}" ]; then
  # The feature build replaces target/release/enrolld; the default build is put back after.
  cargo build --release --quiet --features system-allocator
  cp target/release/enrolld "$alloc_bin"
  cargo build --release --quiet
fi
secret=instr-secret
port=18420

count() { # variant-name n args...
  local name=$1 n=$2; shift 2
  rm -f "$out/$name.db"* "$out/cg.$name.$n"
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.$name.$n" "$bin" serve --listen 127.0.0.1:$port \
    --store "sqlite://$out/$name.db" --jwt-secret $secret --shards 1 "$@" 2>/dev/null &
  drive $! "$n"
  awk '/^summary:/ {print $2}' "$out/cg.$name.$n"
}

allocs() { # n: heap blocks allocated by a run of n 409s
  local n=$1
  rm -f "$out/allocs.db"* "$out/dhat.$n"*
  valgrind --tool=dhat --dhat-out-file="$out/dhat.$n.json" "$alloc_bin" serve --listen 127.0.0.1:$port \
    --store "sqlite://$out/allocs.db" --jwt-secret $secret --shards 1 --limits-enabled false \
    --metrics-enabled false 2> "$out/dhat.$n.log" &
  drive $! "$n"
  sed -n 's/.*Total: *[0-9,]* bytes in \([0-9,]*\) blocks.*/\1/p' "$out/dhat.$n.log" | tr -d ,
}

drive() { # pid n: waits for the server, sends n 409s, stops it
  local pid=$1 n=$2
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.2; done
  python3 - "$port" "$n" "$("$bin" token --sub admin --role admin --jwt-secret $secret)" \
    "$("$bin" token --sub holder --jwt-secret $secret)" "$("$bin" token --sub late --jwt-secret $secret)" <<'PY'
import http.client, sys
port, n, admin, holder, late = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
c = http.client.HTTPConnection("127.0.0.1", port)
def req(method, path, tok, body=None):
    c.request(method, path, body=body, headers={"Authorization": "Bearer " + tok})
    r = c.getresponse(); r.read(); return r.status
assert req("PUT", "/v1/admin/courses/FULL-0", admin, '{"title":"f","capacity":1}') == 201
assert req("POST", "/v1/courses/FULL-0/enrollment", holder) == 201
for _ in range(n):
    assert req("POST", "/v1/courses/FULL-0/enrollment", late) == 409
PY
  kill "$pid"; wait "$pid" || true
}

{
  echo "| variant | instructions per 409 request |"
  echo "|---|---|"
  for v in "plain --limits-enabled false --metrics-enabled false" "metrics --limits-enabled false" \
           "limits --config benches/limits-unrefusing.toml"; do
    set -- $v
    name=$1; shift
    i1=$(count "$name" "$n1" "$@")
    i2=$(count "$name" "$n2" "$@")
    echo "| $name | $(( (i2 - i1) / (n2 - n1) )) |"
  done
  if [ "${ALLOCS:-on}" != off ]; then
    a1=$(allocs "$n1")
    a2=$(allocs "$n2")
    echo
    echo "Heap allocations per 409 request (plain variant, dhat, system allocator): $(awk -v a="$a1" -v b="$a2" -v n=$((n2 - n1)) 'BEGIN {printf "%.2f", (b - a) / n}')"
  fi
  echo
  echo "$(date -u +%F), callgrind, enrolld --shards 1 on SQLite, one keep-alive connection, $n1 and $n2 requests."
} | tee "$out/instructions.md"
