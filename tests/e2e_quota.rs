//! End-to-end tests of per-session quotas: a 65,535-port SYN scan from one session (raw packets
//! through the client library) is held to the new-flow quota — the server's nft counter sees at
//! most the quota's worth of SYNs, the gateway counts the rest as drops, the abuse log lists
//! exactly the flows that got through, and the session stays usable afterwards; ICMP echo
//! requests are held to their rate.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    TCP_ECHO_PORT, TEST_TIMEOUT, Topology, assert_same_bytes, nft_packets, random_bytes,
    tcp_exchange, within,
};

const NEW_FLOWS_PER_SEC: f64 = 50.0;
const SCAN_SOURCE_PORT: u16 = 40_001;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_scan_is_held_to_the_flow_quota() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let abuse_log = topology.tmp().join("abuse.jsonl");
    let abuse_arg = abuse_log.to_str().unwrap().to_owned();
    let rate = NEW_FLOWS_PER_SEC.to_string();
    let gateway = topology.start_gateway(&[
        "--new-flows-per-sec",
        &rate,
        "--max-flows",
        "1000",
        "--abuse-log",
        &abuse_arg,
    ]);
    let srv = topology.srv_ipv4();
    within(TEST_TIMEOUT, "port scan", async {
        let client = common::connect_client(&gateway).await;
        let own = client.ipv4().expect("no IPv4 assigned");
        // Count, in the server namespace, the scan's SYNs (its fixed source port).
        topology.srv_run(&["nft", "add", "table", "inet", "wnscan"]);
        topology.srv_run(&[
            "nft",
            "add",
            "chain",
            "inet",
            "wnscan",
            "in",
            "{ type filter hook input priority -300; }",
        ]);
        let rule = format!(
            "ip saddr {own} tcp sport {SCAN_SOURCE_PORT} tcp flags & (syn|ack) == syn counter"
        );
        let mut args = vec!["nft", "add", "rule", "inet", "wnscan", "in"];
        args.extend(rule.split(' '));
        topology.srv_run(&args);

        let started = Instant::now();
        let mut sent = 0u32;
        for port in 1..=u16::MAX {
            client
                .send_raw_packet(&tcp_syn(own, srv, port))
                .expect("send_raw_packet");
            sent += 1;
            // Paced in small bursts so the client's QUIC datagram queue never overflows (it
            // drops the oldest datagrams silently).
            if port % 128 == 0 {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
        let scan_time = started.elapsed();
        // Every SYN has been seen by the gateway: forwarded (at most the quota) or dropped.
        let seen = |g: &common::GatewayProcess| {
            let m = g.metrics();
            m.get("webnic_quota_dropped_packets_total{reason=\"new_flow_rate\"}")
                .copied()
                .unwrap_or(0.0)
                + m.get("webnic_policy_refused_packets_total{class=\"port\"}")
                    .copied()
                    .unwrap_or(0.0)
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut dropped = seen(&gateway);
        while dropped < 60_000.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            dropped = seen(&gateway);
        }
        let elapsed = started.elapsed();
        let ruleset = topology.srv_run(&["nft", "list", "table", "inet", "wnscan"]);
        let reached = nft_packets(&ruleset, "counter").expect("scan counter");
        // Burst (one second's worth) plus the rate over the whole time the gateway may have
        // been receiving the scan, plus one for rounding.
        let bound = NEW_FLOWS_PER_SEC * (1.0 + elapsed.as_secs_f64()) + 1.0;
        println!(
            "port scan: {sent} SYNs sent in {scan_time:?}, {reached} reached the server \
             (quota bound {bound:.0} over {elapsed:?}), gateway dropped {dropped}"
        );
        assert!(reached >= 1, "no SYN reached the server at all:\n{ruleset}");
        assert!(
            (reached as f64) <= bound,
            "{reached} SYNs reached the server, above the quota's {bound:.0}"
        );
        let flow_drops =
            gateway.metric("webnic_quota_dropped_packets_total{reason=\"new_flow_rate\"}");
        assert!(
            flow_drops >= 60_000.0,
            "the gateway counted only {flow_drops} flow-quota drops"
        );
        assert!(
            f64::from(sent) - flow_drops - reached as f64 <= 1.0 + 500.0,
            "SYNs unaccounted for: sent {sent}, dropped {flow_drops}, reached {reached} \
             (port 25 goes to the policy)"
        );

        // The abuse log lists exactly the scan flows that got through, with the session.
        let deadline = Instant::now() + Duration::from_secs(10);
        let scan_flows = loop {
            let text = std::fs::read_to_string(&abuse_log).unwrap_or_default();
            let flows = text
                .lines()
                .filter(|l| {
                    l.contains("\"event\":\"flow\"")
                        && l.contains(&format!("\"sport\":{SCAN_SOURCE_PORT}"))
                        && l.contains(&format!("\"dst\":\"{srv}\""))
                })
                .count() as u64;
            if flows >= reached || Instant::now() > deadline {
                break flows;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            scan_flows, reached,
            "abuse-log flow lines vs SYNs that reached"
        );
        let log = std::fs::read_to_string(&abuse_log).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("\"event\":\"session_start\"")
                    && l.contains(&format!("\"{own}\""))),
            "no session_start for {own} in the abuse log"
        );
        // Exact flow lines above mean nothing was dropped; the gateway says so too.
        assert_eq!(gateway.metric("webnic_abuse_log_dropped_lines_total"), 0.0);

        // The session is still usable: a new connection (after the new-flow bucket refills).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let data = random_bytes(256 << 10);
        let echoed = tcp_exchange(
            &client,
            SocketAddr::new(IpAddr::V4(srv), TCP_ECHO_PORT),
            data.clone(),
        )
        .await
        .expect("echo after the scan");
        assert_same_bytes(&echoed, &data, "echo after the scan");
        client.close().await;
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&abuse_log).unwrap();
        if log.contains("\"event\":\"session_end\"") {
            break;
        }
        assert!(Instant::now() < deadline, "no session_end in the abuse log");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn icmp_echo_requests_are_rate_limited() {
    const ECHO_RATE: f64 = 5.0;
    const SENT: u32 = 200;
    let topology = Topology::new();
    let gateway = topology.start_gateway(&["--icmp-echo-per-sec", "5"]);
    let srv = topology.srv_ipv4();
    within(TEST_TIMEOUT, "echo rate", async {
        let client = common::connect_client(&gateway).await;
        let own = client.ipv4().expect("no IPv4 assigned");
        topology.srv_run(&["nft", "add", "table", "inet", "wnecho"]);
        topology.srv_run(&[
            "nft",
            "add",
            "chain",
            "inet",
            "wnecho",
            "in",
            "{ type filter hook input priority -300; }",
        ]);
        let rule = format!("ip saddr {own} icmp type echo-request counter");
        let mut args = vec!["nft", "add", "rule", "inet", "wnecho", "in"];
        args.extend(rule.split(' '));
        topology.srv_run(&args);
        let started = Instant::now();
        for sequence in 0..SENT {
            client
                .send_raw_packet(&echo_request(own, srv, sequence as u16))
                .expect("send_raw_packet");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // The quota lets at most a burst plus the rate over the sending time through; the rest
        // must be counted as dropped (the sending time grows on a loaded machine, and so does
        // what may pass).
        let sending = started.elapsed().as_secs_f64();
        let may_pass = ECHO_RATE * (2.0 + sending) + 1.0;
        tokio::task::block_in_place(|| {
            gateway.wait_metric(
                "webnic_quota_dropped_packets_total{reason=\"icmp_echo\"}",
                Duration::from_secs(10),
                |v| v >= f64::from(SENT) - may_pass,
            )
        });
        let elapsed = started.elapsed();
        let ruleset = topology.srv_run(&["nft", "list", "table", "inet", "wnecho"]);
        let reached = nft_packets(&ruleset, "counter").expect("echo counter");
        let bound = ECHO_RATE * (1.0 + elapsed.as_secs_f64()) + 1.0;
        println!("ICMP echo: {SENT} sent, {reached} reached (bound {bound:.0} over {elapsed:?})");
        assert!(reached >= ECHO_RATE as u64, "{ruleset}");
        assert!(
            (reached as f64) <= bound,
            "{reached} echoes reached, bound {bound:.0}"
        );
        client.close().await;
    })
    .await;
}

/// A token's `rate` narrows the session's bandwidth: an echo of 1 MiB through a 256 kB/s
/// session takes at least (size − burst) / rate, still arrives byte-exact, and the gateway counts
/// the policed packets; another session without the limit is not slowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rate_limits_session_bandwidth() {
    const RATE: u64 = 256_000;
    const SIZE: usize = 1 << 20;
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let key = topology.tmp().join("token.key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    let key_arg = key.to_str().unwrap().to_owned();
    let gateway = topology.start_gateway(&["--token-key-file", &key_arg]);
    let mint = |args: &[&str]| {
        let binary = common::gateway_binary();
        let mut argv = vec![binary.to_str().unwrap(), "token", "--key-file", &key_arg];
        argv.extend_from_slice(args);
        common::run(&argv).trim().to_owned()
    };
    let slow = mint(&["--sub", "slow", "--rate", &RATE.to_string()]);
    let fast = mint(&["--sub", "fast"]);
    let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
    within(TEST_TIMEOUT, "token rate", async {
        let connect = |token: String| {
            let options = webnic::ConnectOptions::new(gateway.url())
                .cert_hash(gateway.cert_hash())
                .token(token);
            webnic::Client::connect(options)
        };
        let client = connect(fast).await.expect("fast session");
        let data = random_bytes(SIZE);
        let started = Instant::now();
        let echoed = tcp_exchange(&client, remote, data.clone()).await.expect("fast echo");
        let fast_time = started.elapsed();
        assert_same_bytes(&echoed, &data, "unlimited session");
        client.close().await;

        let client = connect(slow).await.expect("slow session");
        let started = Instant::now();
        let echoed = tcp_exchange(&client, remote, data.clone()).await.expect("slow echo");
        let slow_time = started.elapsed();
        assert_same_bytes(&echoed, &data, "rate-limited session");
        // Each direction has a 64 KiB burst, then RATE bytes/s (IP bytes: headers count too).
        let floor = (SIZE - 65_536) as f64 / RATE as f64;
        println!(
            "token rate {RATE} B/s: 1 MiB echo {slow_time:?} (floor {floor:.1} s); unlimited {fast_time:?}"
        );
        assert!(
            slow_time.as_secs_f64() >= floor * 0.95,
            "a {RATE} B/s session echoed 1 MiB in {slow_time:?}, below the {floor:.1} s floor"
        );
        let policed = gateway.metric("webnic_quota_dropped_packets_total{reason=\"bytes\"}")
            + gateway.metric("webnic_quota_dropped_packets_total{reason=\"bytes_to_client\"}");
        assert!(policed > 0.0, "no packet was policed");
        client.close().await;
    })
    .await;
}

// ----- packet construction (valid checksums) -----

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p, 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&SCAN_SOURCE_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&8192u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let initial = pseudo
        .chunks(2)
        .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
        .sum();
    let c = checksum(&tcp, initial);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 6, &tcp)
}

fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, sequence: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x77, 0x77, 0, 0, b'q', b'u', b'o', b't', b'a'];
    icmp[6..8].copy_from_slice(&sequence.to_be_bytes());
    let c = checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(src, dst, 1, &icmp)
}
