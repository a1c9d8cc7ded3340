#!/usr/bin/env bash
# Installs the system tools the test suite uses, if missing: DCMTK (the real DICOM peers),
# Chromium and Node.js/npm (the OHIF viewer test), nginx (the balancer of the distributed
# test; its packaged service is not started: the test runs its own nginx on loopback);
# then the viewer itself (ohif-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v chromium >/dev/null || need+=(chromium)
command -v npm >/dev/null || need+=(npm)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -eq 0 ]; then exec bash scripts/ohif-deps.sh; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${need[*]} from Debian packages" >&2
$SUDO apt-get update -qq
# policy-rc.d 101: packages install without starting their services (nginx would take
# port 80); restored afterwards.
policy=/usr/sbin/policy-rc.d
had_policy=0; [ -e "$policy" ] && had_policy=1
if [ "$had_policy" = 0 ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  trap '$SUDO rm -f "$policy"' EXIT  # also when interrupted
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null || status=$?
[ "$had_policy" = 1 ] || $SUDO rm -f "$policy"
[ "${status:-0}" = 0 ] || exit "$status"
exec bash scripts/ohif-deps.sh
