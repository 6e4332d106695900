#!/usr/bin/env bash
# The browser benchmark (not part of CI): in one headless Chromium, a 16 MiB GET from nginx in the
# server namespace, sha256 checked in the page, median of RUNS (default 3), through
#   - webnic with the stack in the page (Window) and in a Worker, on datagrams and on the stream
#     link (PROTOCOL.md §3.2),
#   - websockify (PyPI) with a page WebSocket,
#   - a Wisp server with the wisp-js client (npm @mercuryworkshop/wisp-js),
#   - both relays again over TLS (wss://, what an https page must use; Chromium trusts their
#     self-signed certificate by its SPKI hash),
#   - the page's own fetch() (no relay: the browser's network stack, routed to the namespace);
# the same GETs while the page's main thread is busy half the time (webnic in both modes,
# websockify); plus, for webnic, TCP upload goodput (16 MiB, checked by the server's sha256) and the UDPSocket
# datagram echo rate, next to the page's raw WebTransport datagram echo rate against
# gateway/examples/datagram_echo.rs (the ceiling: same wtransport/quinn layers, no stack, no TUN),
# and that server's raw stream download (the stream link's ceiling). Prints each figure and
# webnic's ratio to the best relay, writes them to
# target/browser-bench.md and replaces the browser section of docs/PERFORMANCE.md (between its markers).
#
#   sudo scripts/bench-browser.sh            # RUNS=5 scripts/bench-browser.sh for more runs
#
# Installs what it needs idempotently: websockify into a venv under target/bench-browser (Debian's
# pip refuses system installs), wisp-js into target/bench-browser/node_modules, and the browser
# package (scripts/build-wasm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" -ne 0 ]]; then
    echo "scripts/bench-browser.sh must run as root (network namespaces): sudo scripts/bench-browser.sh" >&2
    exit 1
fi

dir=target/bench-browser
# websockify and wisp-js, the same pinned versions the native benches use.
scripts/bench-relays-install.sh "$dir"

scripts/build-wasm.sh
cargo build --workspace --bins
cargo build -p webnic-gateway --example datagram_echo

export WEBNIC_BENCH_DIR="$PWD/$dir"
export WEBNIC_BROWSER_RUNS="${RUNS:-3}"
cargo test --test e2e_browser browser_bench_relays -- --ignored --nocapture --test-threads=1 \
    2>&1 | tee "$dir/run.log" | grep -E '^(BENCH|test )' || true
if ! grep -q '^BENCH ' "$dir/run.log"; then
    echo "the benchmark failed; its output is in $dir/run.log" >&2
    exit 1
fi
wasm=wasm-client/pkg/webnic_wasm_bg.wasm
{
    echo "## Browser: webnic against the relays pages use today"
    echo
    echo "Written by \`scripts/bench-browser.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') (load average $(cut -d' ' -f1-3 /proc/loadavg)); it"
    echo "replaces this section only (between its markers). Headless Chromium"
    echo "$(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'), one page; every GET is sha256-checked in the page. The relays run in the gateway's"
    echo "namespace and reach the same nginx; \`fetch()\` goes the same veth path with no relay. How each"
    echo "figure is measured: tests/e2e_browser.rs \`browser_bench_relays\` and tests/browser/page.html \`benchRelays\`."
    echo
    echo "| what (16 MiB GET unless said; median of $WEBNIC_BROWSER_RUNS runs) | figure |"
    echo "| --- | --- |"
    grep '^BENCH ' "$dir/run.log" | sed -E 's/^BENCH ([^:]+): (.*)$/| \1 | \2 |/'
    echo "| wasm after wasm-opt -Oz | $(stat -c %s "$wasm") bytes, $(gzip -9 -c "$wasm" | wc -c) gzipped |"
} > target/browser-bench.md
echo
cat target/browser-bench.md

# Replace the browser section of docs/PERFORMANCE.md (between its markers), keep the rest.
scripts/doc-section.py docs/PERFORMANCE.md bench-browser.sh target/browser-bench.md
echo "updated the browser section of docs/PERFORMANCE.md"
