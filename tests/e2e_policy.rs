//! End-to-end test of the gateway's egress policy and strict classification: crafted packets to
//! every forbidden class of address (placed in the server namespace behind routes the gateway
//! host would use, and the gateway host's own addresses) never arrive; the gateway counts them
//! and answers the plain TCP/UDP/ICMP ones with ICMP "administratively prohibited", so a client
//! connect fails at once; spoofed sources reach nothing; port 25 is refused while 7001 works.

mod common;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    GatewayProcess, TCP_ECHO_PORT, TEST_TIMEOUT, Topology, assert_same_bytes, connect_client,
    nft_packets, seeded_bytes, tcp_exchange, within,
};

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const ROUTING_HEADER: u8 = 43;
/// Port of the spoofed packets: the server counts every packet to it, whatever its source.
const SPOOF_PORT: u16 = 9998;
/// Port of the control packet that must arrive (proving the path works).
const CONTROL_PORT: u16 = 9997;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_destinations_are_never_reached() {
    let topology = Topology::new();
    let n = topology.n();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);

    // Forbidden addresses in the server namespace, routed from the gateway host, so the gateway
    // would reach them if it forwarded.
    let lan_v4: Vec<Ipv4Addr> = vec![
        Ipv4Addr::new(10, 202, n, 2),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(100, 100, 100, 200),
        Ipv4Addr::new(168, 63, 129, 16),
        Ipv4Addr::new(100, 64, 0, 2),
    ];
    let lan_v6: Vec<Ipv6Addr> = vec![
        "fd00:ec2::254".parse().unwrap(),
        format!("fd00:202:{n:x}::2").parse().unwrap(),
    ];
    // The gateway host's own addresses (root link, server link, TUN, loopback).
    let host_v4: Vec<Ipv4Addr> = vec![
        topology.gw_addr(),
        topology.gw_srv_side_ipv4(),
        Ipv4Addr::new(10, 77, 0, 1),
        Ipv4Addr::LOCALHOST,
    ];
    let host_v6: Vec<Ipv6Addr> = vec![
        format!("fd00:201:{n:x}::1").parse().unwrap(),
        "fd00:77::1".parse().unwrap(),
        Ipv6Addr::LOCALHOST,
    ];
    let srv_v6 = topology.srv_ipv6();
    // On the server's loopback device (this kernel has no dummy module).
    topology.srv_run(&["ip", "link", "set", "lo", "up"]);
    for a in &lan_v4 {
        topology.srv_run(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
        gw_run(
            &topology,
            &[
                "ip",
                "route",
                "add",
                &format!("{a}/32"),
                "via",
                &topology.srv_ipv4().to_string(),
            ],
        );
    }
    for a in &lan_v6 {
        topology.srv_run(&[
            "ip",
            "addr",
            "add",
            &format!("{a}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        gw_run(
            &topology,
            &[
                "ip",
                "-6",
                "route",
                "add",
                &format!("{a}/128"),
                "via",
                &srv_v6.to_string(),
            ],
        );
    }
    // The routes work: the gateway host itself reaches the echo server on every LAN address.
    let lan_endpoints = lan_v4
        .iter()
        .map(|a| format!("TCP:{a}:{TCP_ECHO_PORT},connect-timeout=3"))
        .chain(
            lan_v6
                .iter()
                .map(|a| format!("TCP:[{a}]:{TCP_ECHO_PORT},connect-timeout=3")),
        );
    for endpoint in lan_endpoints {
        let reply = gw_run(
            &topology,
            &["sh", "-c", &format!("echo reach | socat -t 2 - {endpoint}")],
        );
        assert_eq!(
            reply.trim(),
            "reach",
            "{endpoint} unreachable from the gateway host"
        );
    }

    // Counters: per LAN address in the server namespace (traffic from the client pool only),
    // and on the gateway host's input from the client pool.
    nft_table(&topology.srv_ns(), &topology, "wnpol", "input");
    for a in &lan_v4 {
        nft_rule(
            &topology.srv_ns(),
            &topology,
            "wnpol",
            &format!("ip saddr 10.77.0.0/24 ip daddr {a} counter"),
        );
    }
    for a in &lan_v6 {
        nft_rule(
            &topology.srv_ns(),
            &topology,
            "wnpol",
            &format!("ip6 saddr fd00:77::/112 ip6 daddr {a} counter"),
        );
    }
    nft_rule(
        &topology.srv_ns(),
        &topology,
        "wnpol",
        &format!("udp dport {SPOOF_PORT} counter"),
    );
    nft_rule(
        &topology.srv_ns(),
        &topology,
        "wnpol",
        &format!("udp dport {CONTROL_PORT} counter"),
    );
    nft_table(&topology.gw_ns(), &topology, "wnpolgw", "input");
    nft_rule(
        &topology.gw_ns(),
        &topology,
        "wnpolgw",
        "ip saddr 10.77.0.0/24 counter",
    );
    nft_rule(
        &topology.gw_ns(),
        &topology,
        "wnpolgw",
        "ip6 saddr fd00:77::/112 counter",
    );

    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "policy matrix", async {
        let client = connect_client(&gateway).await;
        let own4 = client.ipv4().expect("no IPv4 assigned");
        let own6 = client.ipv6().expect("no IPv6 assigned");
        let before = gateway.metrics();

        // The matrix: every forbidden address × every kind of packet.
        let mut tried = 0u64;
        let (mut plain, mut fragments, mut options, mut routing) = (0u64, 0u64, 0u64, 0u64);
        for dst in lan_v4.iter().chain(&host_v4) {
            for packet in [
                ipv4(
                    own4,
                    *dst,
                    PROTO_TCP,
                    &tcp_syn(own4.into(), (*dst).into(), TCP_ECHO_PORT),
                    &[],
                    0x4000,
                ),
                ipv4(
                    own4,
                    *dst,
                    PROTO_UDP,
                    &udp(own4.into(), (*dst).into(), 7002, b"policy"),
                    &[],
                    0x4000,
                ),
                ipv4(own4, *dst, PROTO_ICMP, &echo_request(None), &[], 0x4000),
            ] {
                send(&client, &packet).await;
                plain += 1;
            }
            // A first fragment (MF set) and an IPv4 packet with options (4 NOPs).
            send(
                &client,
                &ipv4(
                    own4,
                    *dst,
                    PROTO_UDP,
                    &udp(own4.into(), (*dst).into(), 7002, b"frag"),
                    &[],
                    0x2000,
                ),
            )
            .await;
            fragments += 1;
            send(
                &client,
                &ipv4(
                    own4,
                    *dst,
                    PROTO_UDP,
                    &udp(own4.into(), (*dst).into(), 7002, b"opts"),
                    &[1, 1, 1, 1],
                    0x4000,
                ),
            )
            .await;
            options += 1;
        }
        for dst in lan_v6.iter().chain(&host_v6) {
            let (src, to) = (IpAddr::V6(own6), IpAddr::V6(*dst));
            for (next, payload) in [
                (PROTO_TCP, tcp_syn(src, to, TCP_ECHO_PORT)),
                (PROTO_UDP, udp(src, to, 7002, b"policy")),
                (PROTO_ICMPV6, echo_request(Some((own6, *dst)))),
            ] {
                send(&client, &ipv6(own6, *dst, next, &payload)).await;
                plain += 1;
            }
            // A routing header (type 0, segments left 0) in front of UDP.
            let mut with_rh = vec![PROTO_UDP, 0, 0, 0, 0, 0, 0, 0];
            with_rh.extend(udp(src, to, 7002, b"routing header"));
            send(&client, &ipv6(own6, *dst, ROUTING_HEADER, &with_rh)).await;
            routing += 1;
        }
        tried += plain + fragments + options + routing;

        // Spoofing: another session's addresses, a public address, 0.0.0.0, the gateway's
        // address, an IPv4-mapped IPv6 source.
        let other = connect_client(&gateway).await;
        let other4 = other.ipv4().expect("second session IPv4");
        let other6 = other.ipv6().expect("second session IPv6");
        let srv4 = topology.srv_ipv4();
        let mut spoofed = 0u64;
        for src in [
            other4,
            Ipv4Addr::new(8, 8, 8, 8),
            Ipv4Addr::new(10, 77, 0, 1),
            topology.gw_srv_side_ipv4(),
        ] {
            send(
                &client,
                &ipv4(
                    src,
                    srv4,
                    PROTO_UDP,
                    &udp(src.into(), srv4.into(), SPOOF_PORT, b"spoof"),
                    &[],
                    0x4000,
                ),
            )
            .await;
            spoofed += 1;
        }
        send(
            &client,
            &ipv6(
                other6,
                srv_v6,
                PROTO_UDP,
                &udp(other6.into(), srv_v6.into(), SPOOF_PORT, b"spoof"),
            ),
        )
        .await;
        spoofed += 1;
        let mut bad_source = 0u64;
        send(
            &client,
            &ipv4(
                Ipv4Addr::UNSPECIFIED,
                srv4,
                PROTO_UDP,
                &udp(
                    Ipv4Addr::UNSPECIFIED.into(),
                    srv4.into(),
                    SPOOF_PORT,
                    b"zero",
                ),
                &[],
                0x4000,
            ),
        )
        .await;
        bad_source += 1;
        let mapped = own4.to_ipv6_mapped();
        send(
            &client,
            &ipv6(
                mapped,
                srv_v6,
                PROTO_UDP,
                &udp(mapped.into(), srv_v6.into(), SPOOF_PORT, b"mapped"),
            ),
        )
        .await;
        bad_source += 1;
        let spoof_tried = spoofed + bad_source;

        // A control packet that must arrive: it went after everything else, on the same path.
        send(
            &client,
            &ipv4(
                own4,
                srv4,
                PROTO_UDP,
                &udp(own4.into(), srv4.into(), CONTROL_PORT, b"control"),
                &[],
                0x4000,
            ),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ruleset = topology.srv_run(&["nft", "list", "table", "inet", "wnpol"]);
            if nft_packets(&ruleset, &format!("dport {CONTROL_PORT} ")) == Some(1) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the control packet did not arrive:\n{ruleset}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The gateway counted every packet under its reason.
        let expect = [
            ("fragment", fragments),
            ("ip_options", options),
            ("extension_header", routing),
            ("spoofed", spoofed),
            ("bad_source", bad_source),
        ];
        for (reason, count) in expect {
            let key = format!("webnic_dropped_packets_total{{reason=\"{reason}\"}}");
            let base = before
                .get(&key)
                .copied()
                .unwrap_or_else(|| panic!("{key} not exposed"));
            let now = tokio::task::block_in_place(|| {
                gateway.wait_metric(&key, Duration::from_secs(10), |v| v >= base + count as f64)
            });
            assert_eq!(now - base, count as f64, "{reason}");
        }
        // Per class: the LAN addresses are private, platform or shared; the rest the host's.
        let class_delta = |class: &str| {
            let key = format!("webnic_policy_refused_packets_total{{class=\"{class}\"}}");
            gateway.metric(&key) - before.get(&key).copied().unwrap_or_else(|| panic!("{key}"))
        };
        let by_class: f64 = [
            "private",
            "platform",
            "shared_address_space",
            "gateway_host",
        ]
        .into_iter()
        .map(class_delta)
        .sum();
        assert_eq!(by_class, plain as f64, "policy refusals by class");
        assert_eq!(
            class_delta("gateway_host"),
            (3 * (host_v4.len() + host_v6.len())) as f64
        );
        assert_eq!(class_delta("platform"), 3.0 * 4.0);
        let icmp_key = "webnic_icmp_prohibited_sent_total";
        let icmp_sent = gateway.metric(icmp_key) - before[icmp_key];
        assert_eq!(
            icmp_sent, plain as f64,
            "one ICMP prohibited per plain TCP/UDP/echo packet"
        );

        // Nothing arrived anywhere.
        let srv_rules = topology.srv_run(&["nft", "list", "table", "inet", "wnpol"]);
        let mut reached = 0u64;
        for a in lan_v4
            .iter()
            .map(ToString::to_string)
            .chain(lan_v6.iter().map(ToString::to_string))
        {
            reached += nft_packets(&srv_rules, &format!("daddr {a} ")).expect("counter present");
        }
        let spoof_reached =
            nft_packets(&srv_rules, &format!("dport {SPOOF_PORT} ")).expect("counter");
        let gw_rules = gw_run(&topology, &["nft", "list", "table", "inet", "wnpolgw"]);
        reached += nft_packets(&gw_rules, "ip saddr 10.77.0.0/24 ").expect("counter");
        reached += nft_packets(&gw_rules, "ip6 saddr fd00:77::/112 ").expect("counter");
        println!("policy matrix: {tried} tried, {reached} reached");
        println!("spoofing: {spoof_tried} tried, {spoof_reached} reached");
        assert_eq!(
            reached, 0,
            "forbidden destinations reached:\n{srv_rules}\n{gw_rules}"
        );
        assert_eq!(
            spoof_reached, 0,
            "spoofed packets reached the server:\n{srv_rules}"
        );

        // A client connect to a forbidden address fails at once, not after the connect timeout.
        for remote in [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80),
            SocketAddr::new(IpAddr::V6(lan_v6[0]), 80),
            SocketAddr::new(IpAddr::V4(srv4), 25),
        ] {
            let started = Instant::now();
            let result = client.tcp_connect(remote).await;
            let elapsed = started.elapsed();
            let error = result
                .err()
                .unwrap_or_else(|| panic!("connect to {remote} succeeded"));
            assert_eq!(
                error.kind(),
                io::ErrorKind::PermissionDenied,
                "{remote}: {error}"
            );
            // At once rather than at the connect timeout; the bound leaves room for a loaded
            // machine (the error kind above already says the ICMP refusal ended it).
            assert!(
                elapsed < Duration::from_secs(10),
                "{remote}: refused after {elapsed:?}"
            );
            println!("connect {remote}: {error} after {elapsed:?}");
        }
        // ...while an allowed destination and port works, byte-exact.
        let data = seeded_bytes(5, 256 << 10);
        let echoed = tcp_exchange(
            &client,
            SocketAddr::new(IpAddr::V4(srv4), TCP_ECHO_PORT),
            data.clone(),
        )
        .await
        .expect("echo on the allowed port 7001");
        assert_same_bytes(&echoed, &data, "allowed echo");
        other.close().await;
        client.close().await;
    })
    .await;
    report_policy_metrics(&gateway);
}

fn report_policy_metrics(gateway: &GatewayProcess) {
    let metrics: HashMap<String, f64> = gateway.metrics();
    let mut lines: Vec<_> = metrics
        .iter()
        .filter(|(k, v)| k.starts_with("webnic_policy_refused_packets_total") && **v > 0.0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    lines.sort();
    println!("{}", lines.join("\n"));
}

async fn send(client: &webnic::Client, packet: &[u8]) {
    client.send_raw_packet(packet).expect("send_raw_packet");
    // Paced so the QUIC datagram queue never drops one (it drops the oldest when full).
    tokio::time::sleep(Duration::from_millis(2)).await;
}

fn gw_run(topology: &Topology, args: &[&str]) -> String {
    let output = topology.gw_exec(args);
    assert!(
        output.status.success(),
        "`{}` in the gateway namespace failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ns_run(topology: &Topology, ns: &str, args: &[&str]) {
    let output = topology.netns_exec(ns, args, Duration::from_secs(30));
    assert!(
        output.status.success(),
        "`{}` in {ns} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn nft_table(ns: &str, topology: &Topology, table: &str, hook: &str) {
    ns_run(topology, ns, &["nft", "add", "table", "inet", table]);
    let chain = format!("{{ type filter hook {hook} priority -300; }}");
    ns_run(
        topology,
        ns,
        &["nft", "add", "chain", "inet", table, "c", &chain],
    );
}

fn nft_rule(ns: &str, topology: &Topology, table: &str, rule: &str) {
    let mut args = vec!["nft", "add", "rule", "inet", table, "c"];
    args.extend(rule.split(' '));
    ns_run(topology, ns, &args);
}

// ----- packet construction (valid checksums) -----

fn sum_words(data: &[u8], mut sum: u32) -> u32 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u32 {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(len as u32).to_be_bytes()[2..]);
    sum_words(&pseudo, 0)
}

fn tcp_syn(src: IpAddr, dst: IpAddr, port: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40001u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&8192u16.to_be_bytes());
    let c = fold(sum_words(&tcp, pseudo_sum(src, dst, PROTO_TCP, tcp.len())));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    tcp
}

fn udp(src: IpAddr, dst: IpAddr, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0u8; 8];
    udp[0..2].copy_from_slice(&40002u16.to_be_bytes());
    udp[2..4].copy_from_slice(&port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(payload);
    let mut c = fold(sum_words(&udp, pseudo_sum(src, dst, PROTO_UDP, udp.len())));
    if c == 0 {
        c = 0xffff;
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    udp
}

/// An ICMP (v4 if `v6` is `None`) or ICMPv6 echo request.
fn echo_request(v6: Option<(Ipv6Addr, Ipv6Addr)>) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'];
    let c = match v6 {
        None => fold(sum_words(&icmp, 0)),
        Some((s, d)) => {
            icmp[0] = 128;
            fold(sum_words(
                &icmp,
                pseudo_sum(s.into(), d.into(), PROTO_ICMPV6, icmp.len()),
            ))
        }
    };
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    icmp
}

/// An IPv4 packet with `options` (a multiple of 4 bytes) and the flags/fragment-offset word.
fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload: &[u8],
    options: &[u8],
    flags: u16,
) -> Vec<u8> {
    let header_len = 20 + options.len();
    let total = header_len + payload.len();
    let mut p = vec![0u8; header_len];
    p[0] = 0x40 | (header_len / 4) as u8;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
    p[6..8].copy_from_slice(&flags.to_be_bytes());
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(options);
    let c = fold(sum_words(&p, 0));
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

#[test]
fn crafted_packets_have_valid_checksums() {
    let (s, d) = (
        Ipv4Addr::new(10, 77, 0, 2),
        Ipv4Addr::new(169, 254, 169, 254),
    );
    let p = ipv4(
        s,
        d,
        PROTO_UDP,
        &udp(s.into(), d.into(), 7002, b"odd"),
        &[1, 1, 1, 1],
        0x4000,
    );
    assert_eq!(fold(sum_words(&p[..24], 0)), 0, "IPv4 header with options");
    assert_eq!(
        fold(sum_words(
            &p[24..],
            pseudo_sum(s.into(), d.into(), PROTO_UDP, p.len() - 24)
        )),
        0
    );
    let syn = tcp_syn(s.into(), d.into(), 80);
    assert_eq!(
        fold(sum_words(
            &syn,
            pseudo_sum(s.into(), d.into(), PROTO_TCP, 20)
        )),
        0
    );
    assert_eq!(fold(sum_words(&echo_request(None), 0)), 0);
    let (s6, d6): (Ipv6Addr, Ipv6Addr) = ("fd00:77::2".parse().unwrap(), "::1".parse().unwrap());
    let e = echo_request(Some((s6, d6)));
    assert_eq!(
        fold(sum_words(
            &e,
            pseudo_sum(s6.into(), d6.into(), PROTO_ICMPV6, e.len())
        )),
        0
    );
}
