#!/usr/bin/env bash
# What the lease fence costs the 201 path: benches/compare.sh run alternately on this tree
# and on the same tree built with `--features unfenced` (commits skip the lease proof;
# measurement builds only), ROUNDS times each, in one run of this script, so both see the
# same machine at the same time. Prints, per build, the durable 201 rate on the shared port
# and on the owner ports and the CPU per durable row, then the ratios fenced ÷ unfenced.
# The issue's target: the fenced 201 path costs at most 5% more (rate ratio >= 0.95, CPU
# ratio <= 1.05). Writes target/rush/fence_cost.md.
#
# Usage: benches/fence_cost.sh [seconds=10] [connections=64]; ROUNDS (default 2).
# Never: leave a database or process behind (compare.sh cleans up after each run).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
rounds=${ROUNDS:-2}
out=target/rush
mkdir -p "$out"
log() { echo "fence_cost: $*" >&2; }

cargo build --release --quiet
cargo build --release --quiet --features unfenced --target-dir target/unfenced
fenced=$PWD/target/release/enrolld
unfenced=$PWD/target/unfenced/release/enrolld

# From compare.md: the shared-port and owner-port durable rates, and the owner-port CPU
# per durable row (server + store).
rate_of() { sed -n "s/^| enrolld 201 path$1 | \([0-9]*\) rows\/s.*/\1/p" "$out/compare.md" | head -1; }
cpu_of() { awk -F'|' -v row="$1" 'index($2, row) { gsub(/ /, "", $3); gsub(/ /, "", $4); print $3 + $4; exit }' "$out/compare.md"; }

results=()
for r in $(seq 1 "$rounds"); do
  for build in fenced unfenced; do
    bin=$fenced
    [ "$build" = unfenced ] && bin=$unfenced
    log "round $r: $build"
    ENROLLD_BIN=$bin benches/compare.sh "$secs" "$conns" > "$out/fence_cost.$build.$r.log" 2>&1
    shared=$(rate_of " (durable enrollments in MariaDB), shared port")
    own=$(rate_of ", each course on its owner shard's port")
    cpu=$(cpu_of "enrolld 201 path, owner ports")
    busy=$(awk -F'|' 'index($2, "enrolld 201 path, owner ports") { gsub(/ /, "", $7); print $7; exit }' "$out/compare.md")
    results+=("$build $r $shared $own $cpu $busy")
    log "  shared $shared rows/s, owner ports $own rows/s, $cpu µs per row (server + store), cores busy $busy"
  done
done

{
  echo "# The lease fence's cost on the 201 path (one run of benches/fence_cost.sh)"
  echo
  echo "| build | round | shared port rows/s | owner ports rows/s | µs per row (enrolld + mariadbd, owner ports) | cores busy |"
  echo "|---|---|---|---|---|---|"
  for line in "${results[@]}"; do
    read -r b r s o c u <<< "$line"
    echo "| $b | $r | $s | $o | $c | $u |"
  done
  echo
  printf '%s\n' "${results[@]}" | awk '
    { n[$1]++; s[$1] += $3; o[$1] += $4; c[$1] += $5 }
    END {
      printf "Means: fenced %.0f / %.0f rows/s, %.1f µs; unfenced %.0f / %.0f rows/s, %.1f µs.\n",
        s["fenced"]/n["fenced"], o["fenced"]/n["fenced"], c["fenced"]/n["fenced"],
        s["unfenced"]/n["unfenced"], o["unfenced"]/n["unfenced"], c["unfenced"]/n["unfenced"]
      printf "Fenced ÷ unfenced: rate %.3f (shared port), %.3f (owner ports); CPU per row %.3f.\n",
        s["fenced"]/s["unfenced"], o["fenced"]/o["unfenced"], c["fenced"]/c["unfenced"]
    }'
  echo
  echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); compare.sh $secs $conns, $rounds rounds, builds alternating."
} | tee "$out/fence_cost.md"
