//! Feeds arbitrary frames from the guest and packets from the session to the Ethernet adapter:
//! it must never panic, every packet it forwards must fit the session MTU and come from the
//! session's address (IPv4) or its /64 mapped to the session address (IPv6), and every reply
//! frame must come from the router's MAC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webnic_stack::ethernet::{DEFAULT_GATEWAY_MAC, EthernetAdapter, EthernetConfig};

const SESSION_V4: [u8; 4] = [10, 77, 0, 9];
const SESSION_V6: [u8; 16] = [0xfd, 0, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];

fuzz_target!(|data: &[u8]| {
    let mut config = EthernetConfig::new(1152);
    config.ipv4 = Some(SESSION_V4.into());
    config.ipv6 = Some(SESSION_V6.into());
    config.dns_servers = vec!["10.201.0.2".parse().unwrap(), "fd00::53".parse().unwrap()];
    let mut adapter = EthernetAdapter::new(config);
    let mut out = Vec::new();
    // Records: a length byte, a direction bit in its top bit, then that many bytes.
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f) * 12;
        let (record, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        if head & 0x80 == 0 {
            let mut frame = record.to_vec();
            if let Some(packet) = adapter.handle_frame(&mut frame) {
                assert!(packet.len() <= 1152);
                match packet[0] >> 4 {
                    4 => assert_eq!(packet[12..16], SESSION_V4),
                    6 => assert_eq!(packet[8..24], SESSION_V6),
                    v => panic!("forwarded a non-IP packet (version {v})"),
                }
            }
        } else if adapter.encapsulate(record, &mut out) {
            assert_eq!(out[6..12], DEFAULT_GATEWAY_MAC);
            assert_eq!(out.len(), record.len() + 14);
        }
        while let Some(reply) = adapter.poll_frame() {
            assert_eq!(reply[6..12], DEFAULT_GATEWAY_MAC);
        }
        while adapter.poll_event().is_some() {}
    }
});
