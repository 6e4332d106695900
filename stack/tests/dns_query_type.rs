//! Host-name connects look up the record type they are told to (Direct Sockets' `dnsQueryType`):
//! `Some(Aaaa)` asks only for AAAA, `Some(A)` only for A and fails on an empty answer instead of
//! falling back, and the default asks A first and falls back to AAAA.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use webnic_stack::{ConnectError, DnsKind, Event, Instant, Stack, StackConfig, TcpOptions};

const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// DNS QTYPE numbers.
const QTYPE_A: u16 = 1;
const QTYPE_AAAA: u16 = 28;

fn stack() -> Stack {
    let mut config = StackConfig::new(1152, 11);
    config.ipv4 = Some(LOCAL_V4);
    config.ipv6 = Some(LOCAL_V6);
    config.dns_servers = vec![IpAddr::V4(RESOLVER)];
    Stack::new(config, Instant::from_millis(0))
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The DNS queries (IPv4/UDP to port 53) the stack sends after a poll at `now`.
fn dns_queries(stack: &mut Stack, now: Instant) -> Vec<Vec<u8>> {
    stack.poll(now);
    let mut queries = Vec::new();
    while let Some(packet) = stack.poll_transmit() {
        let is_dns = packet[0] >> 4 == 4 && packet[9] == 17 && packet[22..24] == [0, 53];
        if is_dns {
            queries.push(packet);
        }
    }
    queries
}

/// QTYPE of a single-question query (IPv4 header 20 + UDP 8 + DNS header 12, then the name).
fn qtype(query: &[u8]) -> u16 {
    let mut at = 40;
    while query[at] != 0 {
        at += 1 + usize::from(query[at]);
    }
    u16::from_be_bytes([query[at + 1], query[at + 2]])
}

/// A NOERROR answer without records to `query`, from the resolver.
fn empty_answer(query: &[u8]) -> Vec<u8> {
    let mut dns = query[28..].to_vec();
    dns[2] = 0x81; // QR, RD
    dns[3] = 0x80; // RA, NOERROR
    let udp_len = 8 + dns.len();
    let total = 20 + udp_len;
    let mut p = vec![0u8; 20 + 8];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&RESOLVER.octets());
    p[16..20].copy_from_slice(&LOCAL_V4.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&53u16.to_be_bytes());
    p[22..24].copy_from_slice(&query[20..22]);
    p[24..26].copy_from_slice(&(udp_len as u16).to_be_bytes());
    // UDP checksum 0: "none" over IPv4.
    p.extend_from_slice(&dns);
    p
}

/// Checks that the lookup's one query asks for A, answers it with no records, and returns the
/// queries the stack sends next.
fn queries_after_an_empty_a_answer(stack: &mut Stack) -> Vec<Vec<u8>> {
    let queries = dns_queries(stack, Instant::from_millis(1));
    assert_eq!(queries.len(), 1);
    assert_eq!(qtype(&queries[0]), QTYPE_A);
    stack
        .handle_packet(Instant::from_millis(2), &empty_answer(&queries[0]))
        .expect("answer accepted");
    dns_queries(stack, Instant::from_millis(3))
}

#[test]
fn aaaa_only_asks_for_aaaa() {
    let mut stack = stack();
    stack
        .tcp_connect_host_as("web.test", 80, TcpOptions::default(), Some(DnsKind::Aaaa))
        .expect("lookup starts");
    let queries = dns_queries(&mut stack, Instant::from_millis(1));
    let types: Vec<u16> = queries.iter().map(|q| qtype(q)).collect();
    assert_eq!(types, [QTYPE_AAAA]);
}

#[test]
fn a_only_fails_on_an_empty_answer_without_asking_for_aaaa() {
    let mut stack = stack();
    let handle = stack
        .tcp_connect_host_as("web.test", 80, TcpOptions::default(), Some(DnsKind::A))
        .expect("lookup starts");
    let again = queries_after_an_empty_a_answer(&mut stack);
    assert!(
        again.is_empty(),
        "asked again: {:?}",
        again.iter().map(|q| qtype(q)).collect::<Vec<_>>()
    );
    let mut failed = None;
    while let Some(event) = stack.poll_event() {
        if let Event::TcpConnectFailed(h, error) = event {
            assert_eq!(h, handle);
            failed = Some(error);
        }
    }
    assert!(
        matches!(failed, Some(ConnectError::Resolve { ref name, .. }) if name == "web.test"),
        "{failed:?}"
    );
}

#[test]
fn default_falls_back_from_a_to_aaaa() {
    let mut stack = stack();
    stack
        .tcp_connect_host("web.test", 80, TcpOptions::default())
        .expect("lookup starts");
    let again = queries_after_an_empty_a_answer(&mut stack);
    let types: Vec<u16> = again.iter().map(|q| qtype(q)).collect();
    assert_eq!(types, [QTYPE_AAAA]);
}
