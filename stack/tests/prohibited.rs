//! A connect answered by ICMP "administratively prohibited" fails at once with
//! [`ConnectError::Prohibited`], for IPv4 and IPv6; an ICMP error quoting another flow changes
//! nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use webnic_stack::{ConnectError, Event, Instant, Stack, StackConfig, TcpOptions};

const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);
const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);

fn stack(now: Instant) -> Stack {
    let mut config = StackConfig::new(1152, 7);
    config.ipv4 = Some(LOCAL_V4);
    config.ipv6 = Some(LOCAL_V6);
    Stack::new(config, now)
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP Destination Unreachable `code` from the gateway quoting `original` (IP header + 8).
fn icmpv4_unreachable(original: &[u8], code: u8) -> Vec<u8> {
    let quoted = &original[..28];
    let total = 20 + 8 + quoted.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&GATEWAY_V4.octets());
    p[16..20].copy_from_slice(&original[12..16]);
    let c = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 3;
    p[21] = code;
    p[28..].copy_from_slice(quoted);
    let c = checksum(&p[20..], 0);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    p
}

/// ICMPv6 Destination Unreachable code 1 from the gateway quoting all of `original`.
fn icmpv6_prohibited(original: &[u8]) -> Vec<u8> {
    let icmp_len = 8 + original.len();
    let mut p = vec![0u8; 40 + icmp_len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    p[6] = 58;
    p[7] = 64;
    p[8..24].copy_from_slice(&GATEWAY_V6.octets());
    p[24..40].copy_from_slice(&original[8..24]);
    p[40] = 1;
    p[41] = 1;
    p[48..].copy_from_slice(original);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&p[8..40]);
    pseudo.extend_from_slice(&(icmp_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    let mut sum = 0u32;
    for chunk in pseudo.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    let c = checksum(&p[40..], sum);
    p[42..44].copy_from_slice(&c.to_be_bytes());
    p
}

/// Connects, returns the handle and the SYN the stack sent.
fn connect(
    stack: &mut Stack,
    now: Instant,
    remote: SocketAddr,
) -> (webnic_stack::TcpHandle, Vec<u8>) {
    let handle = stack
        .tcp_connect(remote, TcpOptions::default())
        .expect("connect");
    stack.poll(now);
    let syn = stack.poll_transmit().expect("a SYN");
    (handle, syn)
}

fn events(stack: &mut Stack) -> Vec<Event> {
    std::iter::from_fn(|| stack.poll_event()).collect()
}

#[test]
fn prohibited_fails_the_connect_at_once() {
    let now = Instant::from_millis(1000);
    let mut s = stack(now);

    // IPv4: admin prohibited (code 13) for our SYN.
    let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);
    let (handle, syn) = connect(&mut s, now, remote);
    assert_eq!(syn[9], 6, "the first packet is TCP");
    s.handle_packet(now, &icmpv4_unreachable(&syn, 13)).unwrap();
    s.poll(now); // same instant: no timer can have fired
    let seen = events(&mut s);
    assert!(
        seen.contains(&Event::TcpConnectFailed(handle, ConnectError::Prohibited)),
        "{seen:?}"
    );
    assert_eq!(s.stats().connects_prohibited, 1);
    // The aborted connection's RST (smoltcp sends one on abort).
    while let Some(p) = s.poll_transmit() {
        assert_eq!(p[9], 6, "only TCP leaves");
    }

    // IPv6: ICMPv6 type 1 code 1.
    let remote6 = SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
        22,
    );
    let (handle6, syn6) = connect(&mut s, now, remote6);
    assert_eq!(syn6[0] >> 4, 6);
    s.handle_packet(now, &icmpv6_prohibited(&syn6)).unwrap();
    s.poll(now);
    let seen = events(&mut s);
    assert!(
        seen.contains(&Event::TcpConnectFailed(handle6, ConnectError::Prohibited)),
        "{seen:?}"
    );
    assert_eq!(s.stats().connects_prohibited, 2);
}

#[test]
fn other_flows_and_codes_are_ignored() {
    let now = Instant::from_millis(1000);
    let mut s = stack(now);
    let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)), 443);
    let (handle, syn) = connect(&mut s, now, remote);

    // The same error about another destination port.
    let mut other = syn.clone();
    other[20 + 3] ^= 1;
    s.handle_packet(now, &icmpv4_unreachable(&other, 13))
        .unwrap();
    // Port unreachable (code 3) is not a policy refusal.
    s.handle_packet(now, &icmpv4_unreachable(&syn, 3)).unwrap();
    s.poll(now);
    let seen = events(&mut s);
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::TcpConnectFailed(h, _) if *h == handle)),
        "{seen:?}"
    );
    assert_eq!(s.stats().connects_prohibited, 0);
}
