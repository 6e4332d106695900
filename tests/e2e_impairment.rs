//! The impairment matrix: the client reaches the gateway through `webnic-impair`, a seeded userspace
//! relay on the QUIC hop (this kernel has no `tc netem`), under loss, reordering, duplication, delay
//! with jitter and a rate limit. For each impairment:
//! - TCP echo transfers of seeded random sizes through the socat echo are byte-exact both ways;
//! - a sequence-numbered UDP echo accounts for every datagram hop by hop: nft counters in the server
//!   namespace say how many reached the server and left it, and every datagram missing on a hop is
//!   covered by a drop the relay or the gateway counted on that hop.
//!
//! CI runs one or two transfers of 256 KiB–1 MiB per impairment. The long run (documented in
//! docs/RELIABILITY.md) is `WEBNIC_IMPAIR_LONG=1 cargo test --release --test e2e_impairment`:
//! five transfers of 256 KiB–8 MiB each way per impairment.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    TCP_ECHO_PORT, Topology, UDP_ECHO_PORT, assert_same_bytes, nft_packets, seeded_bytes,
    start_relay, tcp_exchange, within,
};
use webnic_impair::{Impairment, Relay, RelayStats};

const DATAGRAMS: u32 = 200;
/// Large enough that two never share one QUIC packet, so one lost packet is one lost datagram.
const DATAGRAM_SIZE: usize = 800;

fn long_run() -> bool {
    std::env::var_os("WEBNIC_IMPAIR_LONG").is_some_and(|v| v != "0")
}

/// Transfer sizes for one impairment, drawn from `seed`: 256 KiB up to 1 MiB (CI) or 8 MiB (long).
fn transfer_sizes(seed: u64) -> Vec<usize> {
    let (count, max) = if long_run() {
        (5, 8 << 20)
    } else {
        (2, 1 << 20)
    };
    let min = 256 << 10;
    let noise = seeded_bytes(seed, count * 8);
    noise
        .chunks(8)
        .map(|c| min + (u64::from_le_bytes(c.try_into().unwrap()) % (max - min) as u64) as usize)
        .collect()
}

fn dropped_total(metrics: &std::collections::HashMap<String, f64>) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| k.starts_with("webnic_dropped_packets_total"))
        .map(|(_, v)| v)
        .sum()
}

/// How the client takes the gateway's packets in a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Downlink {
    /// Datagrams with link repair (PROTOCOL.md §3.1).
    Repaired,
    /// The stream link (§3.2), the client's default: QUIC repairs the loss.
    Stream,
}

/// Runs the whole matrix cell for `spec` (the same impairment both ways).
async fn impaired_cell(name: &str, spec: &str, seed: u64, time_limit: Duration) {
    impaired_cell_on(name, spec, seed, time_limit, Downlink::Repaired).await;
}

/// [`impaired_cell`] with the client taking its packets as `downlink` says.
async fn impaired_cell_on(
    name: &str,
    spec: &str,
    seed: u64,
    time_limit: Duration,
    downlink: Downlink,
) {
    let impairment: Impairment = spec.parse().expect("impairment spec");
    let topology = Topology::new();
    let _tcp_echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let _udp_echo = topology.serve_udp_echo();
    count_udp_echo_in_server_namespace(&topology);
    let gateway = topology.start_gateway(&[]);
    let (relay, url) = start_relay(&gateway, spec, seed).await;
    println!("[{name}] impairment {impairment} (seed {seed}) via {url}");

    within(time_limit, name, async {
        let options = webnic::ConnectOptions::new(url.clone())
            .cert_hash(gateway.cert_hash())
            .link_stream(downlink == Downlink::Stream);
        let client = webnic::Client::connect(options).await.unwrap_or_else(|e| {
            panic!(
                "[{name}] connect through the relay: {e}\n{}",
                gateway.process.logs()
            )
        });

        // TCP: each transfer goes up and comes back through the echo, both ways at once.
        let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
        for (i, size) in transfer_sizes(seed).into_iter().enumerate() {
            let data = seeded_bytes(seed ^ (i as u64 + 1), size);
            let started = Instant::now();
            let echoed = tcp_exchange(&client, remote, data.clone())
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "[{name}] TCP transfer {i} ({size} B): {e}\nrelay {:?}\n{}",
                        relay.stats(),
                        gateway.process.logs()
                    )
                });
            assert_same_bytes(
                &echoed,
                &data,
                &format!("[{name}] TCP transfer {i} ({size} B)"),
            );
            println!(
                "[{name}] TCP {size} B each way byte-exact in {:.2} s",
                started.elapsed().as_secs_f64()
            );
        }

        let stats = client.stats();
        let link = stats.link;
        let resent = gateway
            .metrics()
            .get("webnic_link_resent_packets_total")
            .copied()
            .unwrap_or(0.0);
        println!("[{name}] {downlink:?}: {stats:?}, gateway resent {resent}");
        match downlink {
            // Loss on the way down was repaired on the QUIC hop, by the gateway's resends.
            Downlink::Repaired => {
                assert!(link.sequenced > 0, "[{name}] datagrams were not sequenced");
                assert_eq!(
                    stats.link_stream_packets, 0,
                    "[{name}] no stream link asked"
                );
                if impairment.loss_percent > 0.0 {
                    assert!(
                        link.repaired > 0 && resent > 0.0,
                        "[{name}] loss but no link repair: {link:?}, gateway resent {resent}"
                    );
                }
            }
            // Every packet came on the stream; QUIC resent what was lost; no datagram sequenced.
            Downlink::Stream => {
                assert!(
                    stats.link_stream_packets > 0
                        && stats.link_stream_packets == stats.packets_received,
                    "[{name}] not every packet came on the stream link: {stats:?}"
                );
                assert_eq!(link.sequenced, 0, "[{name}] link repair beside the stream");
            }
        }

        udp_accounting(name, &topology, &gateway, &relay, &client, &impairment).await;
        client.close().await;
    })
    .await;

    let stats = relay.stats();
    println!("[{name}] relay {stats:?}");
    assert_impairment_was_applied(name, &impairment, &stats);
}

/// The relay really did what the cell is about (a relay that passed everything would make the
/// cell meaningless).
fn assert_impairment_was_applied(name: &str, impairment: &Impairment, stats: &RelayStats) {
    assert!(
        stats.up.offered > 0 && stats.down.offered > 0,
        "[{name}] {stats:?}"
    );
    assert_eq!(
        stats.send_errors, 0,
        "[{name}] relay socket errors: {stats:?}"
    );
    if impairment.loss_percent > 0.0 {
        assert!(
            stats.up.dropped_loss > 0 && stats.down.dropped_loss > 0,
            "[{name}] {stats:?}"
        );
    } else {
        assert_eq!(
            stats.up.dropped_loss + stats.down.dropped_loss,
            0,
            "[{name}] {stats:?}"
        );
    }
    if impairment.reorder_percent > 0.0 {
        assert!(
            stats.up.reordered > 0 && stats.down.reordered > 0,
            "[{name}] {stats:?}"
        );
    }
    if impairment.duplicate_percent > 0.0 {
        assert!(
            stats.up.delivered_duplicates > 0 && stats.down.delivered_duplicates > 0,
            "[{name}] {stats:?}"
        );
    }
}

fn count_udp_echo_in_server_namespace(topology: &Topology) {
    let table = "wnimpair";
    topology.srv_run(&["nft", "add", "table", "inet", table]);
    for (chain, hook, rule) in [
        ("in", "input", format!("udp dport {UDP_ECHO_PORT} counter")),
        (
            "out",
            "output",
            format!("udp sport {UDP_ECHO_PORT} counter"),
        ),
    ] {
        topology.srv_run(&[
            "nft",
            "add",
            "chain",
            "inet",
            table,
            chain,
            &format!("{{ type filter hook {hook} priority 0; policy accept; }}"),
        ]);
        let mut args = vec!["nft", "add", "rule", "inet", table, chain];
        args.extend(rule.split_whitespace());
        topology.srv_run(&args);
    }
}

fn udp_echo_counters(topology: &Topology) -> (u64, u64) {
    let ruleset = topology.srv_run(&["nft", "list", "table", "inet", "wnimpair"]);
    let arrived =
        nft_packets(&ruleset, &format!("udp dport {UDP_ECHO_PORT} ")).expect("input counter");
    let left =
        nft_packets(&ruleset, &format!("udp sport {UDP_ECHO_PORT} ")).expect("output counter");
    (arrived, left)
}

/// Sends `DATAGRAMS` numbered datagrams, paced, and accounts for each one per hop.
async fn udp_accounting(
    name: &str,
    topology: &Topology,
    gateway: &common::GatewayProcess,
    relay: &Relay,
    client: &webnic::Client,
    impairment: &Impairment,
) {
    let socket = client.udp_bind(0).await.expect("udp_bind(0)");
    let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), UDP_ECHO_PORT);
    let relay_before = relay.stats();
    let gateway_before = dropped_total(&gateway.metrics());
    let client_before = client.stats().packets_dropped;
    let (server_in_before, server_out_before) = udp_echo_counters(topology);

    let mut received = BTreeSet::new();
    let mut duplicates = 0u32;
    let mut buf = vec![0u8; 4096];
    let mut check = |len: usize, buf: &[u8], received: &mut BTreeSet<u32>| {
        assert_eq!(len, DATAGRAM_SIZE, "[{name}] echo of the wrong size");
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        assert!(
            seq < DATAGRAMS,
            "[{name}] echo of an unknown datagram {seq}"
        );
        assert_eq!(
            &buf[4..len],
            &seeded_bytes(u64::from(seq), DATAGRAM_SIZE - 4)[..],
            "[{name}] datagram {seq} came back altered"
        );
        if !received.insert(seq) {
            duplicates += 1;
        }
    };
    for seq in 0..DATAGRAMS {
        let mut datagram = seq.to_be_bytes().to_vec();
        datagram.extend(seeded_bytes(u64::from(seq), DATAGRAM_SIZE - 4));
        socket.send_to(&datagram, remote).await.expect("send_to");
        // Pace at 200/s and read what has come back meanwhile.
        let until = tokio::time::Instant::now() + Duration::from_millis(5);
        while let Ok(result) = tokio::time::timeout_at(until, socket.recv_from(&mut buf)).await {
            let (len, _) = result.expect("recv_from");
            check(len, &buf, &mut received);
        }
    }
    // Drain: the slowest datagram needs the link's delay, jitter and reordering both ways.
    let quiet = 2 * (impairment.delay + impairment.jitter + impairment.reorder_delay)
        + Duration::from_secs(2);
    while let Ok(result) = tokio::time::timeout(quiet, socket.recv_from(&mut buf)).await {
        let (len, _) = result.expect("recv_from");
        check(len, &buf, &mut received);
    }

    let relay_after = relay.stats();
    let (server_in, server_out) = udp_echo_counters(topology);
    let arrived = server_in - server_in_before;
    let echoed = server_out - server_out_before;
    let back = received.len() as u64;
    let sent = u64::from(DATAGRAMS);
    let relay_up_dropped = relay_after.up.dropped() - relay_before.up.dropped();
    let relay_down_dropped = relay_after.down.dropped() - relay_before.down.dropped();
    let gateway_dropped = (dropped_total(&gateway.metrics()) - gateway_before) as u64;
    let client_dropped = client.stats().packets_dropped - client_before;
    let report = format!(
        "[{name}] UDP: sent {sent}, reached the server {arrived}, echoed {echoed}, back {back} \
         (duplicates {duplicates}); drops counted: relay up {relay_up_dropped}, relay down \
         {relay_down_dropped}, gateway {gateway_dropped}, client {client_dropped}"
    );
    println!("{report}");
    assert_eq!(duplicates, 0, "{report}");
    assert!(
        arrived <= sent && echoed == arrived && back <= echoed,
        "{report}"
    );
    // Every datagram lost on a hop is covered by a drop counted on that hop (a counted drop may be
    // a QUIC ACK rather than a datagram, so the bound is one-sided; with no drops it is exact).
    let lost_up = sent - arrived;
    let lost_down = echoed - back;
    assert!(
        lost_up <= relay_up_dropped + gateway_dropped + client_dropped,
        "{report}: {lost_up} lost on the way up without a counted drop"
    );
    assert!(
        lost_down <= relay_down_dropped + gateway_dropped + client_dropped,
        "{report}: {lost_down} lost on the way down without a counted drop"
    );
    if impairment.loss_percent == 0.0 {
        assert_eq!(back, sent, "{report}: loss without any configured loss");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_clean_link() {
    impaired_cell("clean", "none", 1, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_loss_1_percent() {
    impaired_cell("loss 1%", "loss=1%", 2, Duration::from_secs(180)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_loss_5_percent() {
    impaired_cell("loss 5%", "loss=5%", 3, Duration::from_secs(240)).await;
}

/// The client's default downlink under loss: QUIC's own recovery on the stream link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_loss_5_percent_on_the_stream_link() {
    impaired_cell_on(
        "loss 5% stream link",
        "loss=5%",
        12,
        Duration::from_secs(240),
        Downlink::Stream,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_loss_10_percent() {
    impaired_cell("loss 10%", "loss=10%", 4, Duration::from_secs(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_reorder() {
    impaired_cell(
        "reorder",
        "reorder=5%,reorder-delay=3ms",
        5,
        Duration::from_secs(180),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_duplicate_1_percent() {
    impaired_cell("dup 1%", "dup=1%", 6, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_delay_20ms_jitter() {
    impaired_cell(
        "delay 20ms",
        "delay=20ms,jitter=5ms",
        7,
        Duration::from_secs(180),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_delay_100ms_jitter() {
    impaired_cell(
        "delay 100ms",
        "delay=100ms,jitter=20ms",
        8,
        Duration::from_secs(240),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impaired_rate_10_mbit() {
    impaired_cell(
        "rate 10 Mbit/s",
        "rate=10mbit,queue=50ms",
        9,
        Duration::from_secs(240),
    )
    .await;
}

/// The QUIC path dies for 3 s in the middle of an 8 MiB echo (the relay drops everything both
/// ways): the QUIC connection outlives the blackout, the stack's TCP retransmits, and the transfer
/// completes byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_survives_a_3_s_blackout() {
    let topology = Topology::new();
    let _tcp_echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    let (relay, url) = start_relay(&gateway, "none", 10).await;
    within(Duration::from_secs(120), "blackout", async {
        let options = webnic::ConnectOptions::new(url.clone()).cert_hash(gateway.cert_hash());
        let client = webnic::Client::connect(options)
            .await
            .unwrap_or_else(|e| panic!("connect through the relay: {e}"));
        let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
        let data = seeded_bytes(11, 8 << 20);
        let transfer = {
            let data = data.clone();
            let client = client.clone();
            tokio::spawn(async move { tcp_exchange(&client, remote, data).await })
        };
        // Let the transfer get going, then cut the path.
        let cut_at = Instant::now();
        let deadline = cut_at + Duration::from_secs(20);
        while relay.stats().down.delivered_original < 500 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!transfer.is_finished(), "the transfer ended before the blackout");
        relay.black_out(Duration::from_secs(3));
        let started = Instant::now();
        let echoed = transfer
            .await
            .expect("transfer task")
            .unwrap_or_else(|e| panic!("transfer across the blackout: {e}\n{:?}", relay.stats()));
        assert_same_bytes(&echoed, &data, "8 MiB echo across a 3 s blackout");
        let stats = relay.stats();
        println!(
            "8 MiB echo byte-exact across a 3 s blackout, finished {:.1} s after the cut; relay {stats:?}",
            started.elapsed().as_secs_f64()
        );
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "finished before the blackout ended: the cut did not hit the transfer"
        );
        assert!(stats.up.dropped_blackout + stats.down.dropped_blackout > 0, "{stats:?}");
        client.close().await;
    })
    .await;
}
