#!/usr/bin/env bash
# Installs the system tools the test suite uses as real DICOM peers (DCMTK), if missing.
set -euo pipefail
need=()
command -v storescu >/dev/null || need+=(dcmtk)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing ${need[*]} from Debian packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
