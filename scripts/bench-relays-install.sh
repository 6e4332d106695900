#!/usr/bin/env bash
# Installs the relays the benches compare webnic with, idempotently, under a directory of
# target/ (never globally): websockify from PyPI into a venv (Debian's pip refuses system
# installs) and the Wisp server @mercuryworkshop/wisp-js from npm into node_modules there.
# Also ethtool (Debian), which benches/impaired.rs uses to turn segmentation offloads off.
#
#   scripts/bench-relays-install.sh [DIR]     # default target/bench-relays
#
# benches/tunnel.rs and benches/impaired.rs look for the install in $WEBNIC_RELAYS_DIR, else
# target/bench-relays. Versions are pinned: they are what the published figures were taken with.
set -euo pipefail
cd "$(dirname "$0")/.."

WEBSOCKIFY_VERSION=0.13.0
WISP_JS_VERSION=0.5.0
dir="${1:-target/bench-relays}"
mkdir -p "$dir"

if [[ ! -x "$dir/venv/bin/websockify" ]] \
    || ! "$dir/venv/bin/pip" show websockify 2>/dev/null | grep -x "Version: $WEBSOCKIFY_VERSION" >/dev/null; then
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install --quiet "websockify==$WEBSOCKIFY_VERSION"
fi
if [[ ! -f "$dir/node_modules/@mercuryworkshop/wisp-js/package.json" ]] \
    || ! grep -q "\"version\": \"$WISP_JS_VERSION\"" "$dir/node_modules/@mercuryworkshop/wisp-js/package.json"; then
    (cd "$dir" && { [[ -f package.json ]] || echo '{"private": true}' >package.json; })
    (cd "$dir" && npm install --no-audit --no-fund --save-exact "@mercuryworkshop/wisp-js@$WISP_JS_VERSION")
fi
if ! command -v ethtool >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "ethtool is missing and installing it needs root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ethtool
fi
