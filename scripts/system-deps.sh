#!/usr/bin/env bash
# Installs the system tools the test suite uses, if missing: DCMTK (the real DICOM peers),
# Chromium and Node.js/npm (the OHIF viewer test); then the viewer itself (ohif-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v chromium >/dev/null || need+=(chromium)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -eq 0 ]; then exec bash scripts/ohif-deps.sh; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${need[*]} from Debian packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
exec bash scripts/ohif-deps.sh
