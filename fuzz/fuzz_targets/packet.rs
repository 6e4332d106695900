//! The gateway's per-packet path on arbitrary datagrams: classification, MSS clamping and the
//! ICMP Fragmentation Needed builder must never panic, and clamping must keep checksums valid.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use webnic_gateway::packet::{
    clamp_tcp_mss, classify_from_client, destination, icmp_frag_needed, internet_checksum,
};

fuzz_target!(|data: &[u8]| {
    let session: [IpAddr; 1] = [IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2))];
    let _ = classify_from_client(data, &session);
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
