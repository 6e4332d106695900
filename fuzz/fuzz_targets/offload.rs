//! The TUN offload path (`webnic_gateway::offload`) on arbitrary packets and virtio-net headers:
//! the header parser, checksum completion, finishing and segmenting a coalesced packet must never
//! panic; every segment fits the limit it was cut for and carries a valid TCP checksum; the
//! segments' payloads put back together are the original payload.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use webnic_gateway::offload::{
    VNET_HDR_LEN, VnetHeader, complete_checksum, finish_coalesced, segment_tcp,
};
use webnic_gateway::packet::transport_checksum;

fuzz_target!(|data: &[u8]| {
    let Some((header, packet)) = data.split_first_chunk::<VNET_HDR_LEN>() else {
        return;
    };
    let header = VnetHeader::parse(header);
    let mut partial = packet.to_vec();
    let _ = complete_checksum(&mut partial, header.csum_start, header.csum_offset);

    let max_len = 68 + usize::from(header.csum_offset % 1500);
    let mut payload = Vec::new();
    let mut headers_len = None;
    let result = segment_tcp(packet, header.gso_size, max_len, &[0x40], |segment| {
        assert_eq!(segment[0], 0x40, "the prefix comes first");
        let segment = &segment[1..];
        assert!(segment.len() <= max_len, "a segment above the limit");
        let (source, destination, tcp) = addresses(segment);
        assert_eq!(transport_checksum(source, destination, 6, &segment[tcp..]), 0);
        let offset = tcp + usize::from(segment[tcp + 12] >> 4) * 4;
        headers_len = Some(offset);
        payload.extend_from_slice(&segment[offset..]);
    });
    if let (Ok(_), Some(offset)) = (result, headers_len) {
        assert_eq!(payload, packet[offset..], "the segments carry the payload, in order");
    }

    let mut whole = packet.to_vec();
    if finish_coalesced(&mut whole).is_ok() {
        let (source, destination, tcp) = addresses(&whole);
        assert_eq!(transport_checksum(source, destination, 6, &whole[tcp..]), 0);
    }
});

/// Source, destination and TCP offset of a packet the offload code accepted as TCP.
fn addresses(packet: &[u8]) -> (IpAddr, IpAddr, usize) {
    if packet[0] >> 4 == 6 {
        let s: [u8; 16] = packet[8..24].try_into().unwrap();
        let d: [u8; 16] = packet[24..40].try_into().unwrap();
        (s.into(), d.into(), 40)
    } else {
        let s: [u8; 4] = packet[12..16].try_into().unwrap();
        let d: [u8; 4] = packet[16..20].try_into().unwrap();
        (s.into(), d.into(), usize::from(packet[0] & 0x0f) * 4)
    }
}
