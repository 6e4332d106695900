#!/usr/bin/env bash
# Builds the browser package: webnic-wasm for wasm32, wasm-bindgen --target web into
# wasm-client/pkg, then wasm-opt -Oz from npm's binaryen (Debian's binaryen 108 emits wasm that
# fails to load). Installs wasm-bindgen-cli (the version Cargo.lock pins) and the npm packages
# when they are missing or stale.
set -euo pipefail
cd "$(dirname "$0")/.."

pinned=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
if [[ -z "$pinned" ]]; then
    echo "wasm-bindgen is not in Cargo.lock" >&2
    exit 1
fi
if [[ "$(wasm-bindgen --version 2>/dev/null || true)" != "wasm-bindgen $pinned" ]]; then
    # Without --locked: with it, a pinned dependency is missing from the registry mirror.
    cargo install wasm-bindgen-cli --version "$pinned"
fi

# npm ci only when node_modules is missing or older than the lock file.
if [[ ! -x wasm-client/node_modules/.bin/wasm-opt \
    || wasm-client/package-lock.json -nt wasm-client/node_modules/.package-lock.json ]]; then
    (cd wasm-client && npm ci --no-audit --no-fund)
fi

cargo build -p webnic-wasm --target wasm32-unknown-unknown --release
wasm-bindgen --target web --out-dir wasm-client/pkg \
    target/wasm32-unknown-unknown/release/webnic_wasm.wasm
wasm-client/node_modules/.bin/wasm-opt -Oz --enable-bulk-memory --enable-nontrapping-float-to-int \
    --enable-sign-ext --enable-mutable-globals --enable-reference-types --enable-multivalue \
    wasm-client/pkg/webnic_wasm_bg.wasm -o wasm-client/pkg/webnic_wasm_bg.wasm
raw=$(stat -c %s wasm-client/pkg/webnic_wasm_bg.wasm)
gz=$(gzip -9 -c wasm-client/pkg/webnic_wasm_bg.wasm | wc -c)
echo "wasm-client/pkg/webnic_wasm_bg.wasm: $raw bytes, $gz gzipped"
