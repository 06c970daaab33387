#!/usr/bin/env bash
# Makes sure MariaDB and Redis are installed and running on loopback, and that the
# `enrolld` user and database exist. Idempotent: on a machine where they already run it only
# checks; on a bare Debian machine it installs them with apt-get and starts them.
# It never stops or reconfigures a running server.
set -euo pipefail

log() { echo "services: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- MariaDB ---------------------------------------------------------------------------
if ! command -v mariadbd >/dev/null && ! [ -x /usr/sbin/mariadbd ]; then
  log "installing mariadb-server"
  apt_install mariadb-server mariadb-client
fi
mysql_ping() { mariadb-admin --connect-timeout=2 -h127.0.0.1 -P3306 -uroot ping >/dev/null 2>&1 \
  || mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1; }
if ! mysql_ping; then
  log "starting mariadbd"
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  if [ ! -d /var/lib/mysql/mysql ]; then
    as_root mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  fi
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  for _ in $(seq 1 60); do mysql_ping && break; sleep 0.5; done
  mysql_ping || { log "mariadbd did not come up"; exit 1; }
fi
root_sql() { as_root mariadb -uroot "$@" 2>/dev/null || mariadb -h127.0.0.1 -P3306 -uroot "$@"; }
root_sql <<'SQL'
CREATE DATABASE IF NOT EXISTS enrolld;
CREATE USER IF NOT EXISTS 'enrolld'@'localhost' IDENTIFIED BY 'enrolld';
CREATE USER IF NOT EXISTS 'enrolld'@'127.0.0.1' IDENTIFIED BY 'enrolld';
GRANT ALL PRIVILEGES ON `enrolld%`.* TO 'enrolld'@'localhost';
GRANT ALL PRIVILEGES ON `enrolld%`.* TO 'enrolld'@'127.0.0.1';
SQL
log "mariadb ok (mysql://enrolld:enrolld@127.0.0.1:3306/enrolld)"

# --- Redis -----------------------------------------------------------------------------
if ! command -v redis-server >/dev/null; then
  log "installing redis-server"
  apt_install redis-server
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis-server"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 40); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.25; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
log "redis ok (redis://127.0.0.1:6379)"
