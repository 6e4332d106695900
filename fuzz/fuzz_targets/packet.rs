//! The gateway's per-packet path on arbitrary datagrams: classification, the egress policy, MSS
//! clamping and the ICMP builders must never panic, clamping must keep checksums valid, and an
//! ICMP "prohibited" reply must be valid and never itself be answered.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use webnic_gateway::packet::{
    clamp_tcp_mss, classify_from_client, destination, icmp_frag_needed, icmp_prohibited,
    internet_checksum,
};
use webnic_gateway::policy::EgressPolicy;

fuzz_target!(|data: &[u8]| {
    let session: [IpAddr; 2] = [
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2)),
    ];
    if let Ok(c) = classify_from_client(data, &session) {
        let _ = EgressPolicy::default().check(c.destination, c.protocol, c.destination_port);
        let from = match c.source {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1)),
        };
        if let Some(reply) = icmp_prohibited(data, from, 1152) {
            assert!(reply.len() <= 1152.max(20 + 8 + 60 + 8));
            // The reply classifies as a valid packet from the gateway, and is never answered.
            assert!(classify_from_client(&reply, &[from]).is_ok());
            assert!(icmp_prohibited(&reply, from, 1152).is_none());
        }
    }
    let _ = destination(data);
    let _ = icmp_frag_needed(data, Ipv4Addr::new(10, 77, 0, 1), 1152);
    let mut packet = data.to_vec();
    let header_ok = packet.len() >= 20 && packet[0] >> 4 == 4 && {
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        ihl >= 20 && ihl <= packet.len() && internet_checksum(&packet[..ihl]) == 0
    };
    clamp_tcp_mss(&mut packet, 1112, 1092);
    if header_ok {
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        // Clamping touches only the TCP header, never the IP header checksum.
        assert_eq!(internet_checksum(&packet[..ihl]), 0);
    }
});
