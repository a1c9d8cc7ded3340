#!/usr/bin/env bash
# Makes sure the services the test suite uses answer on loopback:
#   PostgreSQL 127.0.0.1:5432 (database `test`, trust auth for user postgres)
#   Redis      127.0.0.1:6379
# Uses running ones as they are; otherwise starts the Debian packages, installing them
# first if needed. `stop` stops only what this script started.
set -euo pipefail
STATE=${DICOMCLOUD_SERVICES_STATE:-/tmp/dicomcloud-services}
mkdir -p "$STATE"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
say() { echo "[services] $*" >&2; }

apt_install() {
  say "installing $* from Debian packages"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

start_postgres() {
  if command -v pg_isready >/dev/null && pg_up; then return 0; fi
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  local version; version=$(ls /etc/postgresql | sort -V | tail -1)
  local hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! $SUDO grep -q "dicomcloud-test" "$hba"; then
    say "allowing trust auth for user postgres on 127.0.0.1 (test machine only)"
    printf 'host all postgres 127.0.0.1/32 trust # dicomcloud-test\nhost all postgres ::1/128 trust # dicomcloud-test\n' \
      | $SUDO tee /tmp/dicomcloud-hba >/dev/null
    $SUDO sh -c "cat '$hba' >> /tmp/dicomcloud-hba && cp /tmp/dicomcloud-hba '$hba'"
  fi
  say "starting PostgreSQL $version"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || \
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  echo "$version" > "$STATE/postgres"
  for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
  pg_up || { say "PostgreSQL did not come up"; exit 1; }
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 ||
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
}

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

start_redis() {
  if command -v redis-cli >/dev/null && redis_up; then return 0; fi
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis"
  $SUDO mkdir -p /var/lib/redis /var/log/redis
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  touch "$STATE/redis"
  for _ in $(seq 1 40); do redis_up && break; sleep 0.25; done
  redis_up || { say "Redis did not come up"; exit 1; }
}

case ${1:-start} in
  start)
    start_postgres
    start_redis
    say "PostgreSQL and Redis answer on 127.0.0.1"
    ;;
  stop)
    if [ -f "$STATE/redis" ]; then redis-cli -h 127.0.0.1 shutdown nosave || true; rm -f "$STATE/redis"; fi
    if [ -f "$STATE/postgres" ]; then
      $SUDO pg_ctlcluster --skip-systemctl-redirect "$(cat "$STATE/postgres")" main stop || true
      rm -f "$STATE/postgres"
    fi
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
