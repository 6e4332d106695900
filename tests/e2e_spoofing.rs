//! End-to-end test of the gateway's source-address check: raw packets whose source is not the
//! session's address never leave the gateway, and are counted; the same packets with the real source
//! arrive.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{
    TEST_TIMEOUT, Topology, checksum, connect_client, nft_packets, sum_words, udp_packet, within,
};

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
