//! End-to-end test of the gateway's source-address check: raw packets whose source is not the
//! session's address never leave the gateway, and are counted; the same packets with the real source
//! arrive.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{TEST_TIMEOUT, Topology, connect_client, nft_packets, within};

const FORGED_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 250);
const TARGET_PORT: u16 = 9999;
const SPOOFED: u64 = 100;
const GENUINE: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_source_addresses_are_dropped() {
    let topology = Topology::new();
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "spoofing", async {
        let client = connect_client(&gateway).await;
        let own = client.ipv4().expect("no IPv4 assigned");
        assert_ne!(
            own, FORGED_SOURCE,
            "the forged source must not be the client's own address"
        );

        // Count, in the server namespace, what arrives from either source.
        let srv = topology.srv_ipv4();
        topology.srv_run(&["nft", "add", "table", "inet", "wnspoof"]);
        topology.srv_run(&[
            "nft",
            "add",
            "chain",
            "inet",
            "wnspoof",
            "in",
            "{ type filter hook input priority 0; }",
        ]);
        for source in [FORGED_SOURCE, own] {
            let rule = format!("ip saddr {source} udp dport {TARGET_PORT} counter");
            let mut args = vec!["nft", "add", "rule", "inet", "wnspoof", "in"];
            args.extend(rule.split(' '));
            topology.srv_run(&args);
        }

        let forged = udp_packet(FORGED_SOURCE, srv, 40000, TARGET_PORT, b"forged source");
        let genuine = udp_packet(own, srv, 40000, TARGET_PORT, b"genuine source");
        for _ in 0..SPOOFED {
            client
                .send_raw_packet(&forged)
                .expect("send_raw_packet (forged)");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for _ in 0..GENUINE {
            client
                .send_raw_packet(&genuine)
                .expect("send_raw_packet (genuine)");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        // The genuine packets arrive (so the path works, and everything sent earlier had its chance).
        let deadline = Instant::now() + Duration::from_secs(15);
        let ruleset = loop {
            let ruleset = topology.srv_run(&["nft", "list", "table", "inet", "wnspoof"]);
            if nft_packets(&ruleset, &format!("ip saddr {own} ")) == Some(GENUINE) {
                break ruleset;
            }
            assert!(
                Instant::now() < deadline,
                "the {GENUINE} genuine packets did not all arrive:\n{ruleset}\n{}",
                gateway.process.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            nft_packets(&ruleset, &format!("ip saddr {FORGED_SOURCE} ")),
            Some(0),
            "forged packets reached the server:\n{ruleset}"
        );
        let dropped = tokio::task::block_in_place(|| {
            gateway.wait_metric(
                "webnic_dropped_packets_total{reason=\"spoofed\"}",
                Duration::from_secs(10),
                |v| v >= SPOOFED as f64,
            )
        });
        assert!(dropped >= SPOOFED as f64);
        client.close().await;
    })
    .await;
}

/// A complete IPv4/UDP packet with correct header and UDP checksums.
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0]); // id, DF, TTL, UDP, checksum
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let header_sum = checksum(&packet[..20], 0);
    packet[10..12].copy_from_slice(&header_sum.to_be_bytes());

    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let mut sum = checksum(&udp, sum_words(&pseudo));
    if sum == 0 {
        sum = 0xffff;
    }
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(&udp);
    packet
}

fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

/// The Internet checksum of `data`, starting from the partial sum `initial`.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial + sum_words(data);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn udp_packet_checksums_verify() {
    let packet = udp_packet(
        Ipv4Addr::new(10, 77, 0, 2),
        Ipv4Addr::new(10, 201, 1, 2),
        40000,
        9999,
        b"odd",
    );
    assert_eq!(packet.len(), 20 + 8 + 3);
    // A correct header sums to 0xffff, i.e. its checksum over itself is 0.
    assert_eq!(checksum(&packet[..20], 0), 0);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&packet[12..20]);
    pseudo.extend_from_slice(&[0, 17, 0, 11]);
    assert_eq!(checksum(&packet[20..], sum_words(&pseudo)), 0);
}
