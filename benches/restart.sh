#!/usr/bin/env bash
# Restart at scale: 10,000 courses and 1,000,000 enrollments in MariaDB; measures the time
# from `enrolld serve` to /readyz 200 and the peak RSS (VmHWM) once loaded.
# Usage: benches/restart.sh [courses=10000] [enrollments=1000000]
set -euo pipefail
cd "$(dirname "$0")/.."
courses=${1:-10000}
enrollments=${2:-1000000}
per_course=$(( (enrollments + courses - 1) / courses ))
out=target/bench
mkdir -p "$out"
scripts/services.sh
cargo build --release --quiet
bin=target/release/enrolld
db=enrolld_restart
sql() { mariadb -h127.0.0.1 -uenrolld -penrolld -N -B "$@"; }
sql -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
url="mysql://enrolld:enrolld@127.0.0.1:3306/$db"
port=18410
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null || true' EXIT

start() {
  "$bin" serve --listen 127.0.0.1:$port --store "$url" --jwt-secret x 2> "$out/restart.log" &
  pid=$!
}
# First start creates the schema.
start
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
kill "$pid"; wait "$pid" || true

echo "filling: $courses courses, $enrollments enrollments" >&2
sql $db -e "INSERT INTO courses (id, title, capacity, enrolled, version)
  SELECT CONCAT('C', seq), 'Course', $per_course, 0, 1 FROM seq_0_to_$((courses - 1));
  INSERT INTO enrollments (course_id, student_id, enrolled_at_ms)
  SELECT CONCAT('C', seq MOD $courses), CONCAT('s', seq DIV $courses), 0 FROM seq_0_to_$((enrollments - 1));
  UPDATE courses c SET enrolled = (SELECT COUNT(*) FROM enrollments e WHERE e.course_id = c.id);"

t0=$(date +%s.%N)
start
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.02; done
t1=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
loaded=$(grep -o 'seats=[0-9]*' "$out/restart.log" | head -1 || true)
kill "$pid"; wait "$pid" || true
pid=
sql -e "DROP DATABASE $db"
{
  echo "| figure | value |"
  echo "|---|---|"
  echo "| courses / enrollments | $courses / $enrollments ($loaded) |"
  echo "| start to /readyz 200 | $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f s", b - a}') |"
  echo "| peak RSS (VmHWM) once ready | $((hwm / 1024)) MB (RSS now $((rss / 1024)) MB) |"
  echo
  echo "$(date -u +%F) on $(nproc) cores, MariaDB $(sql -e 'SELECT VERSION()'), enrolld --shards $(nproc)."
} | tee "$out/restart.md"
