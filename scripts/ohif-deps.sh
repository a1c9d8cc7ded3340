#!/usr/bin/env bash
# Fetches what the OHIF viewer test needs into .cache/ohif (idempotent, a few seconds when
# present): the prebuilt OHIF viewer (npm @ohif/app, its dist/ only, without its build
# dependencies) and playwright-core, which drives the Debian chromium; then the OpenID
# provider the auth tests run (tests/oidc).
set -euo pipefail
cd "$(dirname "$0")/.."
OHIF_VERSION=3.13.2
PLAYWRIGHT_VERSION=1.65.1
CACHE=.cache/ohif
mkdir -p "$CACHE"
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
if [ ! -f "$CACHE/dist-$OHIF_VERSION/index.html" ]; then
  echo "fetching the OHIF viewer $OHIF_VERSION (npm @ohif/app, prebuilt)" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tar -xzf "$tmp"/ohif-app-*.tgz -C "$tmp" package/dist
  rm -rf "$CACHE/dist-$OHIF_VERSION"
  mv "$tmp/package/dist" "$CACHE/dist-$OHIF_VERSION"
  rm -rf "$tmp"
fi
if [ ! -f "$CACHE/node_modules/playwright-core/package.json" ] || \
   ! grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" "$CACHE/node_modules/playwright-core/package.json"; then
  echo "installing playwright-core $PLAYWRIGHT_VERSION" >&2
  (cd "$CACHE" && npm install --silent --no-save --prefix . "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
fi
# The OpenID provider of tests/test_auth.py (npm oidc-provider, from its lock file).
if [ ! -f tests/oidc/node_modules/oidc-provider/package.json ]; then
  echo "installing the test OpenID provider (npm oidc-provider)" >&2
  (cd tests/oidc && npm ci --silent >/dev/null)
fi
