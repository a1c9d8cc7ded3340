#!/usr/bin/env bash
# `make bench`: the shared DICOM benchmark (../shared/bench) against dicomcloud on embedded
# defaults. PAIR=1 runs it side by side with Orthanc (pair.sh) and prints ratios.
# SMALL=1 uses the 31-instance smoke dataset. Extra bench.py options: BENCH_ARGS="...".
# Then (not with PAIR=1 or SMALL=1; LARGE=0 skips it) the large-study case of
# scripts/bench_large_study.py: one study of 3,000 instances, metadata latency, peak memory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH_DIR:-$ROOT/../shared/bench}
[ -d "$BENCH" ] || { echo "no benchmark harness at $BENCH" >&2; exit 1; }
export BENCH_WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/dicom-bench}
SERVER="$ROOT/scripts/bench-server.sh"
HTTP_PORT=${BENCH_HTTP_PORT:-18080}
DIMSE_PORT=${BENCH_DIMSE_PORT:-11118}
small=(); [ -n "${SMALL:-}" ] && small=(--small)
bash "$BENCH/setup.sh" "${small[@]}" >&2
trap '"$SERVER" stop' EXIT
"$SERVER" reset
read -r -a extra <<<"${BENCH_ARGS:-}"
if [ -n "${PAIR:-}" ]; then
  "$BENCH/pair.sh" "${small[@]}" --label dicomcloud --url "http://127.0.0.1:$HTTP_PORT/dicomweb" \
    --dimse-port "$DIMSE_PORT" --aet DICOMCLOUD --pid-file "$("$SERVER" pidfile)" \
    --reset-cmd "$SERVER reset" ${extra[@]+-- "${extra[@]}"}
else
  manifest=$BENCH_WORK/data/manifest.json
  [ -n "${SMALL:-}" ] && manifest=$BENCH_WORK/data-small/manifest.json
  "$BENCH/bench.sh" --label dicomcloud --manifest "$manifest" \
    --dicomweb-url "http://127.0.0.1:$HTTP_PORT/dicomweb" --dimse-host 127.0.0.1 \
    --dimse-port "$DIMSE_PORT" --aet DICOMCLOUD --server-pid-file "$("$SERVER" pidfile)" \
    --reset-cmd "$SERVER reset" --cstore-assocs 1,4 --stow-clients 1,4 ${extra[@]+"${extra[@]}"}
fi
if [ -z "${PAIR:-}" ] && [ -z "${SMALL:-}" ] && [ "${LARGE:-1}" != 0 ]; then
  "$ROOT/.venv/bin/python" "$ROOT/scripts/bench_large_study.py"
fi
