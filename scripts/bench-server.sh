#!/usr/bin/env bash
# Runs a dicomcloud archive for the benchmark: start | stop | reset (stop, wipe, start) | pidfile.
# Ports: HTTP ${BENCH_HTTP_PORT:-18080}, DIMSE ${BENCH_DIMSE_PORT:-11118}; data in
# $BENCH_WORK/dicomcloud-data; the process id in $BENCH_WORK/dicomcloud.pid.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH_WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/dicom-bench}
HTTP_PORT=${BENCH_HTTP_PORT:-18080}
DIMSE_PORT=${BENCH_DIMSE_PORT:-11118}
DATA=$BENCH_WORK/dicomcloud-data
PIDFILE=$BENCH_WORK/dicomcloud.pid
LOG=$BENCH_WORK/dicomcloud.log
mkdir -p "$BENCH_WORK"

running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  running && return 0
  nohup "$ROOT/.venv/bin/dicomcloud" run --data-dir "$DATA" --http-port "$HTTP_PORT" \
    --dimse-port "$DIMSE_PORT" --pid-file "$PIDFILE" >>"$LOG" 2>&1 &
  for _ in $(seq 1 200); do
    curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/readyz" && return 0
    sleep 0.1
  done
  echo "dicomcloud did not start, see $LOG" >&2; exit 1
}

stop() {
  running || return 0
  local pid; pid=$(cat "$PIDFILE")
  kill -TERM "$pid"
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  # sync: the previous benchmark run (another archive that does not fsync, say) may leave
  # gigabytes of dirty pages; flushing them here, untimed, keeps their writeback from
  # slowing this run's fsyncs.
  reset) stop; rm -rf "$DATA"; sync; start ;;
  pidfile) echo "$PIDFILE" ;;
  *) echo "usage: $0 start|stop|reset|pidfile" >&2; exit 2 ;;
esac
