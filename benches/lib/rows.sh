# Shared by the scripts that measure durable rows per second against MariaDB
# (benches/rounds_cost.sh, feed_cost.sh, join_cost.sh); sourced, not run. Before sourcing, set
# `port`, `db`, `courses`, `students`, `secs`, `conns`; it sets `bin`, `secret`, `admin`,
# `threads`, `shards`, `out` and gives `sql`, `ticks`, `start_enrolld`, `stop_enrolld`,
# `put_course`, `drive` and `report_rounds`. Load goes to loopback only.
threads=2
shards=${SHARDS:-$(nproc)}
out=target/bench
mkdir -p "$out"
scripts/services.sh >/dev/null
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
[ -n "${ENROLLD_BIN:-}" ] || cargo build --release --quiet
bin=${ENROLLD_BIN:-target/release/enrolld}
secret="bench-secret-$RANDOM$RANDOM"
sql() { mariadb -h127.0.0.1 -uenrolld -penrolld -N -B "$@"; }
"$bin" token --sub bench --count "$students" --ttl 7200 --jwt-secret "$secret" > "$out/tokens.txt"
admin=$("$bin" token --sub bench-admin --role admin --jwt-secret "$secret")
mariadb_pid=$(pidof mariadbd || pidof mysqld)
ticks() { # pid: user+system CPU ticks so far
  awk '{print $14 + $15}' "/proc/$1/stat"
}
pid=""
stop_enrolld() { [ -z "$pid" ] || { kill "$pid" 2>/dev/null || true; wait "$pid" || true; }; pid=""; }
trap stop_enrolld EXIT

start_enrolld() { # log [extra serve flags...]: enrolld on a fresh database, ready
  local log=$1; shift
  sql -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
  "$bin" serve --listen 127.0.0.1:$port --store "mysql://enrolld:enrolld@127.0.0.1:3306/$db" \
    --jwt-secret "$secret" --shards "$shards" --limits-enabled false --metrics-enabled false "$@" 2> "$log" &
  pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
}

put_course() { # id body
  curl -sf -X PUT -H "Authorization: Bearer $admin" "http://127.0.0.1:$port/v1/admin/courses/$1" -d "$2" >/dev/null
}

# drive name table prefix: wrk for `secs` on courses prefix-0..; prints
# "rows/s|CPU µs/row (enrolld + mariadbd)|enrolld|mariadbd|p99" for the rows `table` gained.
drive() {
  local name=$1 table=$2 prefix=$3
  local before after start end e0 e1 m0 m1 n hz
  local per='BEGIN {printf "%.1f", t / hz * 1e6 / n}'
  before=$(sql $db -e "SELECT COUNT(*) FROM $table")
  e0=$(ticks "$pid"); m0=$(ticks "$mariadb_pid")
  start=$(date +%s.%N)
  wrk -t$threads -c$conns -d${secs}s --latency -s benches/wrk/enroll.lua "http://127.0.0.1:$port" \
    -- $threads "$out/tokens.txt" $(seq -f "$prefix-%g" 0 $((courses - 1))) > "$out/$name.txt"
  end=$(date +%s.%N)
  e1=$(ticks "$pid"); m1=$(ticks "$mariadb_pid")
  after=$(sql $db -e "SELECT COUNT(*) FROM $table")
  hz=$(getconf CLK_TCK)
  n=$((after - before))
  echo "$(awk -v n=$n -v a="$start" -v b="$end" 'BEGIN {print int(n / (b - a))}')|$(awk -v t=$(( (e1 - e0) + (m1 - m0) )) -v hz="$hz" -v n=$n "$per")|$(awk -v t=$((e1 - e0)) -v hz="$hz" -v n=$n "$per")|$(awk -v t=$((m1 - m0)) -v hz="$hz" -v n=$n "$per")|$(awk '/ 99%/ {print $2}' "$out/$name.txt")"
}

# The last line of every report: the machine and the run.
machine_line() {
  echo "$(date -u +%F) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), wrk -t$threads -c$conns -d${secs}s, enrolld --shards $shards, MariaDB $(sql -e 'SELECT VERSION()'), load generator on the same cores."
}

# report_rounds title unit extra a b: the table of `rows` (each
# "name|rate|cpu|enrolld|mariadbd|p99|extra", as a round appends it after `drive`), then
# a ÷ b (names in the first field) averaged over their rounds, in rate and in CPU per unit.
report_rounds() {
  local title=$1 unit=$2 extra=$3 a=$4 b=$5 row name rate cpu ecpu mcpu p99 more
  echo "| $title | ${unit}s/s | CPU µs/$unit (enrolld + mariadbd) | enrolld | mariadbd | p99 | $extra |"
  echo "|---|---|---|---|---|---|---|"
  for row in "${rows[@]}"; do
    IFS='|' read -r name rate cpu ecpu mcpu p99 more <<< "$row"
    echo "| $name | $rate | $cpu | $ecpu | $mcpu | $p99 | ${more:-0} |"
  done
  echo
  printf '%s\n' "${rows[@]}" | awk -F'|' -v a="$a" -v b="$b" -v unit="$unit" '{ r[$1] += $2; c[$1] += $3; k[$1]++ }
    END { printf "%s ÷ %s over %d rounds each: %ss/s %.2f, CPU per %s %.2f\n", a, b, k[a], unit, (r[a]/k[a]) / (r[b]/k[b]), unit, (c[a]/k[a]) / (c[b]/k[b]) }'
  machine_line
}
