//! Download goodput under random packet loss: webnic against the relays users run today, under
//! the same loss. The native client (root namespace) reaches the gateway namespace over a
//! 1500-byte veth with segmentation offloads off (TSO, GSO, UDP segmentation, GSO lists and GRO,
//! both ends), so every packet
//! on it is wire-sized: on loopback or with offloads on, the kernel moves TCP in 30–100 KB
//! chunks and dropping one would be a different experiment. nft drops N% of the packets at
//! random (`numgen random mod 100 < N`) in each direction of that veth, where they are received
//! (see `Loss`), so webnic's QUIC datagrams and the relays' TCP segments are dropped alike. Behind
//! it, the webnic gateway and the relays (websockify and a Wisp server, over TLS:
//! `benches/relays/`) run side by side and reach the same download server.
//!
//! webnic is measured three ways, with one client each: on the stream link (the client's
//! default, QUIC repairs the loss: the `vs_websockify`/`vs_wisp` rows), on datagrams with link
//! repair, and on datagrams without it.
//!
//! Cells: loss 0% (for reference), 1% and 5%; one flow of `TRANSFER` bytes and `FLOWS` flows of
//! `TRANSFER / FLOWS` (through one webnic session; `FLOWS` websockify connections; `FLOWS` Wisp
//! streams on one Wisp connection); each bounded by `LIMIT`, after which the goodput is what
//! arrived so far. Every flow is sha256-checked against what the server sent (the prefix that
//! arrived, when cut), or the bench fails.
//!
//! Needs root, `target/release/webnic-gateway` and the relays and ethtool
//! (`scripts/bench-relays-install.sh`); `scripts/bench.sh` does all of it.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/raw_quic.rs"]
mod raw_quic;
#[path = "relays/mod.rs"]
mod relays;
#[path = "support/mod.rs"]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    Topology, connect_client, connect_client_with, find_command, nft_packets, run, seeded_bytes,
    try_run,
};
use raw_quic::{RAW_PORT, measure_raw, start_raw_server};
use relays::{Received, Relay, Relays, read_all, serve_download};
use support::report;

/// One flow's download; the parallel flows move the same total.
const TRANSFER: usize = 16 << 20;
const FLOWS: usize = 8;
/// The bound of one cell: at 5% loss the relays move a few MB/s at best.
const LIMIT: Duration = Duration::from_secs(10);
/// Percent of packets dropped in each direction.
const LOSSES: [u8; 3] = [0, 1, 5];
const DOWNLOAD_PORT: u16 = 9201;
const DOWNLOAD_PART_PORT: u16 = 9202;
/// The same bytes without closing first, for Wisp (see `relays::serve_download`).
const OPEN_DOWNLOAD_PORT: u16 = 9203;
const OPEN_DOWNLOAD_PART_PORT: u16 = 9204;
const WEBSOCKIFY_PORT: u16 = 6080;
const WEBSOCKIFY_PART_PORT: u16 = 6081;
const WISP_PORT: u16 = 6001;
const SEED: u64 = 0x1055;
/// The loss rules: one nftables table per direction, each dropping on the *receiving* end of the
/// veth. On the sending end (postrouting, or the netdev egress hook) the kernel still holds
/// GSO super-packets (TCP always builds them, quinn sends UDP GSO batches), segmented only at
/// transmit; a drop there takes out tens of wire packets at once. On the receiving end, with
/// TSO/GSO off at the sender and GRO off at the receiver, every packet is one wire packet (the
/// counters below confirm it: ≥ 1 packet per 1,500 bytes moved).
#[derive(Debug)]
struct Loss<'a> {
    topology: &'a Topology,
    /// In the root namespace (the client's end): gateway side → client.
    root_table: String,
    root_device: String,
    /// In the gateway namespace: client → gateway side.
    gw_device: String,
}

impl<'a> Loss<'a> {
    /// The gateway namespace's table goes with the namespace; the root one is removed on drop
    /// (also when the bench panics).
    const GW_TABLE: &'static str = "wnbench_loss";

    fn new(topology: &'a Topology, root_device: &str, gw_device: &str) -> Self {
        Self {
            topology,
            root_table: format!("wnbench_loss_{}", topology.n()),
            root_device: root_device.to_owned(),
            gw_device: gw_device.to_owned(),
        }
    }

    fn rules(table: &str, device: &str, percent: u8) -> String {
        format!(
            "table inet {table} {{\n\
             chain ingress {{ type filter hook prerouting priority -300; policy accept;\n\
             iifname \"{device}\" counter comment \"all\"\n\
             iifname \"{device}\" numgen random mod 100 < {percent} counter drop comment \"dropped\"\n\
             }}\n}}\n"
        )
    }

    /// Drops `percent`% of the packets each way from now on, replacing the previous rules (and
    /// so zeroing the counters).
    fn set(&self, percent: u8) {
        let _ = try_run(&["nft", "delete", "table", "inet", &self.root_table]);
        let _ = self
            .topology
            .gw_exec(&["nft", "delete", "table", "inet", Self::GW_TABLE]);
        let root = self.topology.tmp().join("loss-root.nft");
        let gw = self.topology.tmp().join("loss-gw.nft");
        std::fs::write(
            &root,
            Self::rules(&self.root_table, &self.root_device, percent),
        )
        .expect("write the loss rules");
        std::fs::write(&gw, Self::rules(Self::GW_TABLE, &self.gw_device, percent))
            .expect("write the loss rules");
        run(&["nft", "-f", root.to_str().expect("utf-8 path")]);
        let output = self
            .topology
            .gw_exec(&["nft", "-f", gw.to_str().expect("utf-8 path")]);
        assert!(
            output.status.success(),
            "nft loss rules in the gateway namespace: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Packets (seen, dropped) since `set`: gateway side → client, then client → gateway side.
    fn counters(&self) -> [(u64, u64); 2] {
        let count =
            |ruleset: &str, needle: &str| nft_packets(ruleset, needle).expect("nft counter");
        let root = run(&["nft", "list", "table", "inet", &self.root_table]);
        let output = self
            .topology
            .gw_exec(&["nft", "list", "table", "inet", Self::GW_TABLE]);
        let gw = String::from_utf8_lossy(&output.stdout);
        [
            (count(&root, "\"all\""), count(&root, "\"dropped\"")),
            (count(&gw, "\"all\""), count(&gw, "\"dropped\"")),
        ]
    }
}

impl Drop for Loss<'_> {
    fn drop(&mut self) {
        let _ = try_run(&["nft", "delete", "table", "inet", &self.root_table]);
    }
}

/// The TCP sender's loss-recovery counters (`nstat`) that say why a cell was slow: for webnic's
/// flows the sender is the server (its peer is the client's stack, through the tunnel); for the
/// relays it is the relay in the gateway namespace (its peer is the client's kernel).
const TCP_COUNTERS: [&str; 7] = [
    "TcpRetransSegs",
    "TcpExtTCPTimeouts",
    "TcpExtTCPSackRecovery",
    "TcpExtTCPRenoRecovery",
    "TcpExtTCPLossProbes",
    "TcpExtTCPSpuriousRTOs",
    "TcpExtTCPSACKReorder",
];

/// UDP socket buffer overflows: the QUIC sockets' losses on top of the wire's (the client's in
/// the root namespace, which other processes share, so an upper bound there).
const UDP_COUNTERS: [&str; 3] = ["UdpRcvbufErrors", "UdpSndbufErrors", "UdpInErrors"];

fn tcp_counters(topology: &Topology, ns: &str) -> Vec<u64> {
    nstat(topology, Some(ns), &TCP_COUNTERS)
}

/// Absolute `nstat` counters `names` of namespace `ns` (the root namespace for `None`).
fn nstat(topology: &Topology, ns: Option<&str>, names: &[&str]) -> Vec<u64> {
    let output = match ns {
        Some(ns) => topology.netns_exec(ns, &["nstat", "-asz"], Duration::from_secs(10)),
        None => common::run_with_timeout(
            std::process::Command::new("nstat").arg("-asz"),
            Duration::from_secs(10),
        ),
    };
    let text = String::from_utf8_lossy(&output.stdout);
    names
        .iter()
        .map(|name| {
            text.lines()
                .find_map(|line| {
                    let mut words = line.split_whitespace();
                    (words.next() == Some(name)).then(|| words.next()?.parse().ok())?
                })
                .unwrap_or(0)
        })
        .collect()
}

/// `name=delta` for each counter of `names` that moved between `before` and `after`.
fn counter_deltas(names: &[&str], before: &[u64], after: &[u64]) -> String {
    let moved: Vec<String> = names
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a > b)
        .map(|(name, (b, a))| {
            format!(
                "{}={}",
                name.trim_start_matches("TcpExt").trim_start_matches("Tcp"),
                a - b
            )
        })
        .collect();
    if moved.is_empty() {
        "none".to_owned()
    } else {
        moved.join(" ")
    }
}

/// Packets the gateway dropped (all reasons): the tunnel's own losses on top of the wire's.
fn gateway_drops(gateway: &common::GatewayProcess) -> f64 {
    gateway
        .metrics()
        .iter()
        .filter(|(key, _)| key.starts_with("webnic_dropped_packets_total"))
        .map(|(_, value)| value)
        .sum()
}

/// One of the gateway's metrics, 0 when absent.
fn gateway_metric(gateway: &common::GatewayProcess, name: &str) -> f64 {
    gateway.metrics().get(name).copied().unwrap_or(0.0)
}

/// How long into a transfer the sender's TCP state is sampled.
const SAMPLE_AFTER: Duration = Duration::from_millis(300);

/// The smoothed RTT (ms) and congestion window (segments) of each TCP socket with source port
/// `sport` in namespace `ns`, `SAMPLE_AFTER` into a transfer (`ss -tin`): the two things that
/// set a loss-limited TCP flow's rate (≈ MSS × cwnd / RTT).
async fn sample_sender(ns: String, sport: u16) -> String {
    tokio::time::sleep(SAMPLE_AFTER).await;
    let output = tokio::task::spawn_blocking(move || {
        common::run_with_timeout(
            std::process::Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                "ss",
                "-tinH",
                "state",
                "established",
                &format!("sport = :{sport}"),
            ]),
            Duration::from_secs(10),
        )
    })
    .await
    .expect("ss task");
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |word: &str, key: &str| word.strip_prefix(key).map(str::to_owned);
    let sockets: Vec<String> = text
        .split_whitespace()
        .filter_map(|word| {
            field(word, "rtt:")
                .map(|rtt| format!("rtt {}", rtt.split('/').next().unwrap_or("?")))
                .or_else(|| field(word, "cwnd:").map(|cwnd| format!("cwnd {cwnd};")))
        })
        .collect();
    if sockets.is_empty() {
        "no socket (transfer already over)".to_owned()
    } else {
        sockets.join(" ").trim_end_matches(';').to_owned()
    }
}

/// Packets the kernel dropped queueing toward the gateway's TUN (its reader fell behind).
fn tun_tx_dropped(topology: &Topology) -> u64 {
    let output = topology.gw_exec(&["cat", "/sys/class/net/wntun0/statistics/tx_dropped"]);
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// `flows` concurrent downloads through webnic's one session, timed from before the flows
/// open, bounded by `LIMIT`. Returns the goodput and each flow's bytes.
async fn webnic_download_flows(
    client: &webnic::Client,
    server: IpAddr,
    port: u16,
    flows: usize,
) -> (f64, Vec<Received>, bool) {
    let start = Instant::now();
    let deadline = start + LIMIT;
    let tasks: Vec<_> = (0..flows)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let connect = client.tcp_connect(SocketAddr::new(server, port));
                match tokio::time::timeout_at(deadline.into(), connect).await {
                    Ok(stream) => {
                        read_all(stream.expect("tunnel connect"), true, Some(deadline)).await
                    }
                    // Not even connected within the limit: nothing arrived.
                    Err(_) => read_all(tokio::io::empty(), true, None).await,
                }
            })
        })
        .collect();
    let mut received = Vec::with_capacity(flows);
    for task in tasks {
        received.push(task.await.expect("webnic download task"));
    }
    let elapsed = start.elapsed();
    let total: usize = received.iter().map(|r| r.len).sum();
    (
        total as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
        received,
        Instant::now() >= deadline,
    )
}

/// Segmentation offloads off on both ends of the client-side veth, and its MTU at 1500.
fn wire_sized(topology: &Topology, root_device: &str, gw_device: &str) {
    let ethtool = find_command("ethtool")
        .expect("ethtool (scripts/bench-relays-install.sh installs it)")
        .to_str()
        .expect("utf-8 path")
        .to_owned();
    // TCP and UDP segmentation offloads (quinn sends UDP GSO batches, which a veth would pass
    // on whole) and GRO.
    let offloads = [
        "tso",
        "off",
        "gso",
        "off",
        "gro",
        "off",
        "tx-udp-segmentation",
        "off",
        "tx-gso-list",
        "off",
    ];
    run(&["ip", "link", "set", "dev", root_device, "mtu", "1500"]);
    run(&[&[ethtool.as_str(), "-K", root_device][..], &offloads].concat());
    for args in [
        vec!["ip", "link", "set", "dev", gw_device, "mtu", "1500"],
        [&[ethtool.as_str(), "-K", gw_device][..], &offloads].concat(),
    ] {
        let output = topology.gw_exec(&args);
        assert!(
            output.status.success(),
            "{args:?} in the gateway namespace: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would run this without it and must
    // not build namespaces.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("impaired: run with `cargo bench --bench impaired` (as root)");
        return;
    }
    let topology = Topology::new();
    let n = topology.n();
    let (root_device, gw_device) = (format!("wn{n}a"), format!("wn{n}b"));
    wire_sized(&topology, &root_device, &gw_device);
    let data = Arc::new(seeded_bytes(SEED, TRANSFER));
    let part = Arc::new(data[..TRANSFER / FLOWS].to_vec());
    serve_download(&topology, DOWNLOAD_PORT, Arc::clone(&data), true);
    serve_download(&topology, DOWNLOAD_PART_PORT, Arc::clone(&part), true);
    serve_download(&topology, OPEN_DOWNLOAD_PORT, Arc::clone(&data), false);
    serve_download(&topology, OPEN_DOWNLOAD_PART_PORT, Arc::clone(&part), false);
    let gateway = topology.start_gateway(&[]);
    let relays = Arc::new(Relays::start(
        &topology,
        &[
            (WEBSOCKIFY_PORT, DOWNLOAD_PORT),
            (WEBSOCKIFY_PART_PORT, DOWNLOAD_PART_PORT),
        ],
        WISP_PORT,
    ));
    let server = IpAddr::V4(topology.srv_ipv4());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let loss_rules = Loss::new(&topology, &root_device, &gw_device);
    // The transport's ceiling on this wire, before any loss rule exists: raw QUIC datagrams
    // between the same two namespaces, on one thread as in the `tunnel` bench.
    let raw_hash = start_raw_server(&topology);
    let raw = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(measure_raw(
            SocketAddr::new(IpAddr::V4(topology.gw_addr()), RAW_PORT),
            raw_hash,
            TRANSFER,
            3,
        ));
    println!(
        "NOTE impaired raw QUIC datagrams on this wire, no loss: download {:.1} Mbit/s, \
         upload {:.1} Mbit/s (lost {:.2}% / {:.2}%)",
        raw.0, raw.1, raw.4, raw.5
    );
    runtime.block_on(async {
        // The client's default: the stream link, where QUIC repairs the loss.
        let client = connect_client(&gateway).await;
        // The same stack on datagrams with link repair, and without it, measured in the same
        // run: what each buys.
        let repaired = connect_client_with(&gateway, |options| options.link_stream(false)).await;
        let unrepaired = connect_client_with(&gateway, |options| {
            options.link_stream(false).link_repair(false)
        })
        .await;
        for loss in LOSSES {
            loss_rules.set(loss);
            for flows in [1, FLOWS] {
                let (port, open_port, expected) = if flows == 1 {
                    (DOWNLOAD_PORT, OPEN_DOWNLOAD_PORT, &data)
                } else {
                    (DOWNLOAD_PART_PORT, OPEN_DOWNLOAD_PART_PORT, &part)
                };
                let name = format!(
                    "impaired.download_{flows}flow{}_loss{loss}pct",
                    if flows == 1 { "" } else { "s" }
                );
                let tcp_before = tcp_counters(&topology, &topology.srv_ns());
                let drops_before = gateway_drops(&gateway);
                let client_drops_before = client.stats().packets_dropped;
                let quic_before = client.stats().quic;
                let link_before = repaired.stats().link;
                let resent_before = gateway_metric(&gateway, "webnic_link_resent_packets_total");
                let missed_before = gateway_metric(&gateway, "webnic_link_resend_missed_total");
                let tun_before = tun_tx_dropped(&topology);
                let udp_before = [
                    nstat(&topology, None, &UDP_COUNTERS),
                    nstat(&topology, Some(&topology.gw_ns()), &UDP_COUNTERS),
                ];
                let ((webnic_mbit, received, cut), sample) = tokio::join!(
                    webnic_download_flows(&client, server, port, flows),
                    sample_sender(topology.srv_ns(), port)
                );
                let tcp = counter_deltas(
                    &TCP_COUNTERS,
                    &tcp_before,
                    &tcp_counters(&topology, &topology.srv_ns()),
                );
                let drops = gateway_drops(&gateway) - drops_before;
                let client_drops = client.stats().packets_dropped - client_drops_before;
                let quic = client.stats().quic;
                let quic = format!(
                    "QUIC sent {}, lost {}, congestion events {}, RTT {:?}",
                    quic.sent_packets - quic_before.sent_packets,
                    quic.lost_packets - quic_before.lost_packets,
                    quic.congestion_events - quic_before.congestion_events,
                    quic.rtt
                );
                let tun_drops = tun_tx_dropped(&topology) - tun_before;
                let client_udp = counter_deltas(
                    &UDP_COUNTERS,
                    &udp_before[0],
                    &nstat(&topology, None, &UDP_COUNTERS),
                );
                let gateway_udp = counter_deltas(
                    &UDP_COUNTERS,
                    &udp_before[1],
                    &nstat(&topology, Some(&topology.gw_ns()), &UDP_COUNTERS),
                );
                for flow in &received {
                    flow.check(expected, cut, &format!("{name} webnic"));
                }
                let (repaired_mbit, repaired_received, repaired_cut) =
                    webnic_download_flows(&repaired, server, port, flows).await;
                for flow in &repaired_received {
                    flow.check(
                        expected,
                        repaired_cut,
                        &format!("{name} webnic with link repair"),
                    );
                }
                let link = repaired.stats().link;
                let resent =
                    gateway_metric(&gateway, "webnic_link_resent_packets_total") - resent_before;
                let missed =
                    gateway_metric(&gateway, "webnic_link_resend_missed_total") - missed_before;
                println!(
                    "NOTE {name} webnic with link repair: {repaired_mbit:.1} Mbit/s; sequenced {}, repaired {}, gave up {}, \
                     late {}, nacked {}, gateway resent {resent}, no longer kept {missed}",
                    link.sequenced - link_before.sequenced,
                    link.repaired - link_before.repaired,
                    link.gave_up - link_before.gave_up,
                    link.late - link_before.late,
                    link.nacked - link_before.nacked,
                );
                let tcp_before_unrepaired = tcp_counters(&topology, &topology.srv_ns());
                let (unrepaired_mbit, unrepaired_received, unrepaired_cut) =
                    webnic_download_flows(&unrepaired, server, port, flows).await;
                for flow in &unrepaired_received {
                    flow.check(
                        expected,
                        unrepaired_cut,
                        &format!("{name} webnic without link repair"),
                    );
                }
                println!(
                    "NOTE {name} webnic without link repair: {unrepaired_mbit:.1} Mbit/s; server TCP: {}",
                    counter_deltas(
                        &TCP_COUNTERS,
                        &tcp_before_unrepaired,
                        &tcp_counters(&topology, &topology.srv_ns()),
                    )
                );
                report(
                    &format!("{name}.vs_quic_no_loss"),
                    webnic_mbit,
                    "Mbit/s",
                    "raw_quic_datagrams_same_wire_no_loss",
                    raw.0,
                );
                report(
                    &format!("{name}.stream_link_vs_link_repair"),
                    webnic_mbit,
                    "Mbit/s",
                    "webnic_datagrams_link_repair",
                    repaired_mbit,
                );
                report(
                    &format!("{name}.link_repair_vs_without"),
                    repaired_mbit,
                    "Mbit/s",
                    "webnic_without_link_repair",
                    unrepaired_mbit,
                );
                println!(
                    "NOTE {name} webnic: {webnic_mbit:.1} Mbit/s, {} bytes{}; server TCP: {tcp}; \
                     gateway drops: {drops}; client stack drops: {client_drops}; TUN queue drops: {tun_drops}; \
                     client {quic}; \
                     server TCP at {SAMPLE_AFTER:?} (ms, segments): {sample}; \
                     UDP client side: {client_udp}, gateway side: {gateway_udp}",
                    received.iter().map(|r| r.len).sum::<usize>(),
                    if cut { ", cut at the limit" } else { "" }
                );
                for relay in [Relay::Websockify, Relay::Wisp] {
                    let port = if relay == Relay::Wisp {
                        open_port
                    } else {
                        port
                    };
                    let tcp_before = tcp_counters(&topology, &topology.gw_ns());
                    let relay_port = match relay {
                        Relay::Websockify if flows == 1 => WEBSOCKIFY_PORT,
                        Relay::Websockify => WEBSOCKIFY_PART_PORT,
                        Relay::Wisp => WISP_PORT,
                    };
                    let (result, sample) = tokio::join!(
                        relays.download_flows(
                            relay,
                            SocketAddr::new(server, port),
                            flows,
                            expected.len(),
                            true,
                            Some(LIMIT),
                        ),
                        sample_sender(topology.gw_ns(), relay_port)
                    );
                    for flow in &result.flows {
                        flow.check(expected, result.cut, &format!("{name} {}", relay.name()));
                    }
                    let tcp = counter_deltas(
                        &TCP_COUNTERS,
                        &tcp_before,
                        &tcp_counters(&topology, &topology.gw_ns()),
                    );
                    println!(
                        "NOTE {name} {}: {:.1} Mbit/s, {} bytes{}; relay TCP: {tcp}; \
                         relay TCP at {SAMPLE_AFTER:?} (ms, segments): {sample}",
                        relay.name(),
                        result.mbit,
                        result.flows.iter().map(|r| r.len).sum::<usize>(),
                        if result.cut { ", cut at the limit" } else { "" }
                    );
                    report(
                        &format!("{name}.vs_{}", relay.name()),
                        webnic_mbit,
                        "Mbit/s",
                        &format!("{}_tls_same_loss", relay.name()),
                        result.mbit,
                    );
                }
            }
            let [(down, down_dropped), (up, up_dropped)] = loss_rules.counters();
            println!(
                "NOTE impaired loss {loss}%: gateway side → client {down_dropped} of {down} \
                 packets dropped, client → gateway side {up_dropped} of {up}"
            );
            // At least six transfers of `TRANSFER` bytes came this way (ten, some cut at the
            // limit): at most 1,500 bytes a packet unless offloads merged them (then a drop would
            // not be a wire packet's).
            assert!(
                down as usize >= 6 * TRANSFER / 1500,
                "{down} packets for {} bytes: not wire-sized",
                6 * TRANSFER
            );
            if loss > 0 {
                assert!(
                    down_dropped > 0 && up_dropped > 0,
                    "the loss rules dropped nothing"
                );
            }
        }
        client.close().await;
        repaired.close().await;
        unrepaired.close().await;
    });
}
