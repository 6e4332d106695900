#!/usr/bin/env bash
# The one benchmark command: builds release, runs every bench RUNS times (default 5), and writes
# its section of docs/PERFORMANCE.md (between `<!-- bench.sh begin -->` and `<!-- bench.sh end -->`;
# the rest of the file belongs to other scripts and people and is kept) from the `RESULT` lines the
# benches print. Each figure sits next to a baseline measured in the same run, because absolute
# numbers on shared machines drift.
#
#   sudo scripts/bench.sh              # all benches, 5 runs each
#   sudo RUNS=9 scripts/bench.sh       # more runs
#   sudo scripts/bench.sh stack_pair   # only the named benches
#
# Root because the tunnel bench builds network namespaces. Never run in CI (CI only compiles the
# benches, through `cargo clippy --all-targets`). criterion's HTML report stays in
# target/criterion/report/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" -ne 0 ]]; then
    echo "scripts/bench.sh must run as root (the tunnel bench creates network namespaces): sudo scripts/bench.sh" >&2
    exit 1
fi

RUNS="${RUNS:-5}"
ALL_BENCHES=(stack_pair gateway_forward tunnel sessions impaired)
if (($# > 0)); then
    BENCHES=("$@")
else
    BENCHES=()
    # Only the benches that exist in this checkout.
    for bench in "${ALL_BENCHES[@]}"; do
        [[ -f "benches/$bench.rs" ]] && BENCHES+=("$bench")
    done
fi

step() { printf '\n==> %s\n' "$*"; }

step "installing the relay baselines (websockify, wisp-js) and ethtool under target/bench-relays"
scripts/bench-relays-install.sh

step "building release binaries (the tunnel bench runs target/release/webnic-gateway)"
cargo build --release --workspace --bins

log_dir="target/bench-logs"
mkdir -p "$log_dir"
results="$log_dir/results.txt"
: >"$results"
notes="$log_dir/notes.txt"
: >"$notes"
for bench in "${BENCHES[@]}"; do
    for run in $(seq 1 "$RUNS"); do
        step "bench $bench, run $run of $RUNS"
        log="$log_dir/$bench-$run.log"
        cargo bench --bench "$bench" 2>&1 | tee "$log"
        if ! grep -q '^RESULT ' "$log"; then
            echo "bench $bench printed no RESULT line (see $log)" >&2
            exit 1
        fi
        grep '^RESULT ' "$log" >>"$results"
        # Figures that are not ratios (the raw QUIC baseline's loss, the RTT the tunnel adds).
        grep '^NOTE raw_quic_datagrams ' "$log" | sed "s/^NOTE /$bench run $run: /" >>"$notes" || true
        # The sessions bench: RSS before/after and the idle CPU of each server, per run.
        grep -E '^NOTE (bare_wtransport_server|gateway|sessions): ' "$log" | sed "s/^NOTE /$bench run $run: /" >>"$notes" || true
        # The impaired bench: packets seen and dropped per loss setting (the loss really applied).
        grep -E '^NOTE impaired (loss |raw QUIC)' "$log" | sed "s/^NOTE /$bench run $run: /" >>"$notes" || true
        # ... and what link repair did in each cell.
        grep -E '^NOTE impaired\.download_\S+ webnic with link repair: ' "$log" | sed "s/^NOTE /$bench run $run: /" >>"$notes" || true
    done
done

step "writing the bench.sh section of docs/PERFORMANCE.md"
cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
{
    echo "## Benchmarks (scripts/bench.sh)"
    echo
    echo "Written by \`scripts/bench.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC') (load average $(cut -d' ' -f1-3 /proc/loadavg));"
    echo "it rewrites only this section (between its markers); do not edit it by hand."
    echo
    echo "Every figure is measured next to a baseline in the same run, and the ratio (figure ÷"
    echo "baseline) is what to compare across machines: absolute numbers on shared machines drift."
    echo "For a rate, the ratio is the fraction of the baseline reached; for a time (ns, ms, µs), how"
    echo "many times slower than the baseline. Each row is the run whose ratio is the median of the"
    echo "$RUNS runs (its value, baseline value and ratio come from that run); the last column is the"
    echo "lowest and highest ratio over the runs."
    echo
    echo "| Figure | Value | Unit | Baseline | Baseline value | Median ratio | Ratio range |"
    echo "|---|---:|---|---|---:|---:|---:|"
    # Names in first-seen order; per name the median run by ratio (column 7).
    awk '{ print $2 }' "$results" | awk '!seen[$0]++' | while read -r name; do
        lines="$(awk -v n="$name" '$2 == n' "$results" | sort -g -k7,7)"
        count="$(printf '%s\n' "$lines" | wc -l)"
        range="$(printf '%s\n' "$lines" | awk 'NR == 1 { lo = $7 } { hi = $7 } END { print lo "–" hi }')"
        printf '%s\n' "$lines" | sed -n "$(((count + 1) / 2))p" |
            awk -v r="$range" '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $2, $3, $4, $5, $6, $7, r }'
    done
    echo
    echo "### What each baseline is"
    echo
    echo "- \`stack_pair\` (two webnic-stack instances wired in memory, no I/O): bulk goodput against a"
    echo "  memcpy of the same bytes through two \`VecDeque<Vec<u8>>\` hops of MTU-sized chunks; 64-byte"
    echo "  request/response against the same exchange over a \`UnixStream\` pair from one thread, and"
    echo "  with 1,000 and with 10,000 other connections open in both stacks, idle for 2 s (their"
    echo "  listener still open), against the same exchange without them (the ratio is what the"
    echo "  per-packet cost loses to the number of connections);"
    echo "  1,000 concurrent connections set up and torn down against the kernel over loopback TCP."
    echo "- \`gateway_forward\` (the gateway's per-packet code without the network, cycling over 1, 100"
    echo "  and 10,000 sessions): against a bare \`HashMap<IpAddr, VecDeque<Bytes>>\` lookup plus a push"
    echo "  and pop of a copy of the same packet."
    echo "- \`tunnel\` (native client → QUIC → gateway → TUN → server namespace): against plain TCP over"
    echo "  the same veth path, without the tunnel (\`plain_tcp_same_veths\`), and raw QUIC datagrams"
    echo "  between the client's and the gateway namespace's veth addresses through the same"
    echo "  WebTransport/quinn layers and buffer sizes (\`raw_quic_datagrams\`): the transport's ceiling."
    echo "  Its sender waits on QUIC's own backpressure (\`send_datagram_wait\`, with the HTTP/3"
    echo "  datagram header, as webnic's driver does) and on a credit window the receiver replenishes"
    echo "  over a QUIC stream (256 datagrams in flight, a credit every 32 received), because datagrams"
    echo "  have no flow control and an unpaced sender overflows the receiver's queue. Its figure is"
    echo "  payload delivered per second, first to last datagram; the loss it took is listed below."
    echo "- \`sessions\` (the release gateway holding 10,000 idle sessions, opened by \`webnic-load --mix"
    echo "  idle\` from 4 processes): RSS growth per session and CPU (user + system) per session per"
    echo "  minute of idling, against a bare wtransport server (the bench binary re-executed) holding as"
    echo "  many idle WebTransport sessions with the gateway's transport settings (datagram buffers,"
    echo "  keep-alive, idle timeout, stream limits) and the client's keep-alive: what any WebTransport tunnel pays per"
    echo "  session for its transport, so the ratio is what the gateway's own session state adds."
    echo "  Target: ≤ 32 KiB of gateway RSS per idle session."
    echo "- \`tunnel\` and \`impaired\` downloads \`.vs_websockify\` / \`.vs_wisp\`: the relays users run"
    echo "  today, from the registries (websockify 0.13.0 from PyPI; the Wisp server of"
    echo "  @mercuryworkshop/wisp-js 0.5.0 from npm, in node's HTTPS server), in the gateway's namespace"
    echo "  next to the webnic gateway, over TLS, reaching the same server; native clients in the bench"
    echo "  (fastwebsockets; the wisp-mux crate). 8 flows are 8 websockify connections, or 8 Wisp"
    echo "  streams on one Wisp connection. Every download is sha256-checked."
    echo "- \`impaired\`: client and gateway/relays on either side of a 1500-byte veth with TSO, GSO,"
    echo "  UDP segmentation and GRO off, N% of packets dropped at random each way by nft \`numgen\`"
    echo "  where they are received (webnic's QUIC datagrams and the relays' TCP alike); 16 MiB per"
    echo "  cell or 10 s, whichever comes first. Targets at 1% loss: one flow ≥ the best relay; 8 flows"
    echo "  ≥ 2 × the 8 Wisp streams (ratio ≥ 2 in \`download_8flows_loss1pct.vs_wisp\`)."
    echo "  webnic's rows are the client's default, the stream link (PROTOCOL.md §3.2: QUIC repairs"
    echo "  the loss). \`.stream_link_vs_link_repair\`: against a second client of the same gateway on"
    echo "  datagrams with link repair (§3.1), right after; \`.link_repair_vs_without\`: that client"
    echo "  against a third on datagrams without repair: what repair buys."
    echo "  \`.vs_quic_no_loss\`: against raw QUIC datagrams between the same two namespaces on the same"
    echo "  wire before any loss rule (the \`tunnel\` bench's ceiling, measured here): how close webnic"
    echo "  under each loss comes to the transport's clean ceiling."
    echo "- \`tunnel.*.stream_link_vs_datagrams\`: the tunnel figures on the stream link (the client's"
    echo "  default) against the same client on datagrams with link repair, in the same run."
    if [[ -s "$notes" ]]; then
        echo
        echo "#### Notes per run: raw QUIC baseline loss, the echo RTT the tunnel adds, idle-session RSS and CPU"
        echo
        sed 's/^/- /' "$notes"
    fi
    echo
    echo "### Machine"
    echo
    echo "- CPU: ${cpu_model:-unknown}, \`nproc\` = $(nproc)"
    echo "- Kernel: $(uname -sr)"
    echo "- Rust: $(rustc --version)"
    echo
    echo "### Reproduce"
    echo
    echo '```sh'
    echo "sudo scripts/bench.sh            # RUNS=9 for more runs (default 5); bench names to run only some"
    echo '```'
    echo
    echo "Raw logs: \`target/bench-logs/\`; criterion's HTML report: \`target/criterion/report/index.html\`."
} >"$log_dir/performance-section.md"
scripts/doc-section.py docs/PERFORMANCE.md bench.sh "$log_dir/performance-section.md"
cat "$log_dir/performance-section.md"
