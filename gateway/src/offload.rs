//! The TUN device's offloads (the virtio-net header), sans-IO.
//!
//! With `IFF_VNET_HDR` and `TUNSETOFFLOAD`, the kernel hands the gateway TCP packets as it has
//! them: a server's TSO burst or a NIC's GRO aggregate arrives as one *coalesced* TCP packet of up
//! to 64 KiB (described by a 10-byte header: segment size, where the checksum goes), instead of
//! being cut into MTU-sized packets that each cost a read. Its checksum is only partial
//! (`NEEDS_CSUM`). The gateway then either
//!
//! - sends it whole to a client that accepts large packets (the stream link, PROTOCOL.md §3.2):
//!   [`finish_coalesced`] writes the real checksums; or
//! - cuts it into the segments the kernel would have produced: [`segment_tcp`].
//!
//! Everything here works on byte slices and never panics on any input: the metadata comes from
//! the kernel, but the packet bytes come from the network.

use std::fmt;

use bytes::{Bytes, BytesMut};

/// Length of the virtio-net header in front of every packet read from or written to the TUN
/// (`struct virtio_net_hdr`, no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is partial.
const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`: the ECN bit of the GSO type.
const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;

/// What the kernel did not do to a packet it read from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gso {
    /// A packet of normal size.
    None,
    /// A coalesced IPv4 TCP packet.
    TcpV4,
    /// A coalesced IPv6 TCP packet.
    TcpV6,
    /// A GSO type the gateway did not ask for (UDP): never offered, so never expected.
    Other(u8),
}

/// The virtio-net header of one packet read from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHeader {
    /// The checksum at `csum_start + csum_offset` still has to be completed.
    pub needs_csum: bool,
    /// Whether (and how) the packet is coalesced.
    pub gso: Gso,
    /// Payload bytes per segment of a coalesced packet.
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Parses the header (little-endian: the TUN's default on the little-endian machines the
    /// gateway runs on).
    pub fn parse(bytes: &[u8; VNET_HDR_LEN]) -> Self {
        let le = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let gso = match bytes[1] & !GSO_ECN {
            0 => Gso::None,
            1 => Gso::TcpV4,
            4 => Gso::TcpV6,
            other => Gso::Other(other),
        };
        Self {
            needs_csum: bytes[0] & F_NEEDS_CSUM != 0,
            gso,
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }
}

/// Why a packet's offload could not be applied; the packet is dropped and counted
/// (`DropReason::Offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// The checksum position lies outside the packet.
    ChecksumOutside,
    /// A coalesced packet that is not a well-formed TCP packet directly after the IP header.
    NotTcp,
    /// A coalesced packet with a segment size of 0.
    ZeroSegmentSize,
    /// A GSO type the gateway never asked for.
    UnexpectedGso(u8),
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ChecksumOutside => f.write_str("partial checksum position outside the packet"),
            Self::NotTcp => f.write_str("coalesced packet is not plain TCP"),
            Self::ZeroSegmentSize => f.write_str("coalesced packet with segment size 0"),
            Self::UnexpectedGso(kind) => write!(f, "unexpected GSO type {kind}"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// Completes a partial checksum in place: the field at `start + offset` holds the
/// pseudo-header's sum, and the checksum covers everything from `start` to the end.
///
/// # Errors
/// [`OffloadError::ChecksumOutside`].
pub fn complete_checksum(packet: &mut [u8], start: u16, offset: u16) -> Result<(), OffloadError> {
    let start = usize::from(start);
    let field = start + usize::from(offset);
    if field + 2 > packet.len() {
        return Err(OffloadError::ChecksumOutside);
    }
    // 0 becomes 0xffff (the same value in one's complement), as the kernel does: a UDP checksum
    // of 0 means "none", which IPv6 forbids.
    let checksum = match !fold(sum(&packet[start..], 0)) {
        0 => 0xffff,
        checksum => checksum,
    };
    packet[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    Ok(())
}

/// The headers of a TCP packet: where TCP starts and where its payload starts.
#[derive(Debug, Clone, Copy)]
struct TcpLayout {
    ipv6: bool,
    tcp: usize,
    payload: usize,
}

fn tcp_layout(packet: &[u8]) -> Result<TcpLayout, OffloadError> {
    let (ipv6, tcp) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 && packet[9] == PROTO_TCP => {
            (false, usize::from(packet[0] & 0x0f) * 4)
        }
        Some(6) if packet.len() >= 40 && packet[6] == PROTO_TCP => (true, 40),
        _ => return Err(OffloadError::NotTcp),
    };
    if tcp < 20 || packet.len() < tcp + 20 {
        return Err(OffloadError::NotTcp);
    }
    let payload = tcp + usize::from(packet[tcp + 12] >> 4) * 4;
    if payload < tcp + 20 || payload > packet.len() {
        return Err(OffloadError::NotTcp);
    }
    Ok(TcpLayout { ipv6, tcp, payload })
}

/// Makes a coalesced TCP packet a normal (large) one: IP length fields from its real length, a
/// fresh IPv4 header checksum and a full TCP checksum.
///
/// # Errors
/// [`OffloadError::NotTcp`]; a packet longer than an IP length field can say.
pub fn finish_coalesced(packet: &mut [u8]) -> Result<(), OffloadError> {
    let layout = tcp_layout(packet)?;
    set_ip_length(packet, layout)?;
    write_tcp_checksum(packet, layout);
    Ok(())
}

/// Cuts a coalesced TCP packet into segments of at most `mss` payload bytes and `max_len` bytes
/// in all, as the kernel's segmentation would: each gets the headers with its own IP length, IPv4
/// identification (incremented per segment), sequence number and checksums; FIN and PSH stay on
/// the last segment only, CWR on the first only. Each segment is built once, with `prefix` in
/// front of it, in its own buffer handed to `emit`. Returns the number of segments.
///
/// # Errors
/// [`OffloadError::NotTcp`], [`OffloadError::ZeroSegmentSize`]; nothing is emitted then.
pub fn segment_tcp(
    packet: &[u8],
    mss: u16,
    max_len: usize,
    prefix: &[u8],
    mut emit: impl FnMut(Bytes),
) -> Result<usize, OffloadError> {
    const FIN: u8 = 0x01;
    const PSH: u8 = 0x08;
    const CWR: u8 = 0x80;
    let layout = tcp_layout(packet)?;
    let mss = usize::from(mss).min(max_len.saturating_sub(layout.payload));
    if mss == 0 {
        return Err(OffloadError::ZeroSegmentSize);
    }
    let headers = &packet[..layout.payload];
    let payload = &packet[layout.payload..];
    // Every segment's length must fit the IP length field (checked once, so an error emits
    // nothing).
    if layout.payload + payload.len().min(mss) > usize::from(u16::MAX) {
        return Err(OffloadError::NotTcp);
    }
    let seq = u32::from_be_bytes([
        packet[layout.tcp + 4],
        packet[layout.tcp + 5],
        packet[layout.tcp + 6],
        packet[layout.tcp + 7],
    ]);
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let flags = packet[layout.tcp + 13];
    // A packet with no payload (a coalesced pure ACK cannot exist, but the header may say so)
    // still goes out once.
    let count = payload.len().div_ceil(mss).max(1);
    let mut chunks = payload.chunks(mss);
    for i in 0..count {
        let chunk = chunks.next().unwrap_or(&[]);
        let mut datagram = BytesMut::with_capacity(prefix.len() + headers.len() + chunk.len());
        datagram.extend_from_slice(prefix);
        datagram.extend_from_slice(headers);
        datagram.extend_from_slice(chunk);
        let segment = &mut datagram[prefix.len()..];
        if !layout.ipv6 {
            segment[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        }
        // Cannot fail: the segment is no longer than the length checked above.
        set_ip_length(segment, layout)?;
        let offset = (i * mss) as u32;
        segment[layout.tcp + 4..layout.tcp + 8]
            .copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        let mut segment_flags = flags;
        if i + 1 < count {
            segment_flags &= !(FIN | PSH);
        }
        if i > 0 {
            segment_flags &= !CWR;
        }
        segment[layout.tcp + 13] = segment_flags;
        write_tcp_checksum(segment, layout);
        emit(datagram.freeze());
    }
    Ok(count)
}

/// Sets the IP length field from the packet's real length, and the IPv4 header checksum.
fn set_ip_length(packet: &mut [u8], layout: TcpLayout) -> Result<(), OffloadError> {
    if layout.ipv6 {
        let payload_len = u16::try_from(packet.len() - 40).map_err(|_| OffloadError::NotTcp)?;
        packet[4..6].copy_from_slice(&payload_len.to_be_bytes());
    } else {
        let total = u16::try_from(packet.len()).map_err(|_| OffloadError::NotTcp)?;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[10..12].copy_from_slice(&[0, 0]);
        let checksum = !fold(sum(&packet[..layout.tcp], 0));
        packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    }
    Ok(())
}

/// Writes the full TCP checksum, pseudo-header included.
fn write_tcp_checksum(packet: &mut [u8], layout: TcpLayout) {
    let tcp_len = (packet.len() - layout.tcp) as u64;
    let addresses = if layout.ipv6 {
        &packet[8..40]
    } else {
        &packet[12..20]
    };
    let pseudo = sum(addresses, u64::from(PROTO_TCP) + tcp_len);
    packet[layout.tcp + 16..layout.tcp + 18].copy_from_slice(&[0, 0]);
    let checksum = !fold(sum(&packet[layout.tcp..], pseudo));
    packet[layout.tcp + 16..layout.tcp + 18].copy_from_slice(&checksum.to_be_bytes());
}

/// The one's-complement sum of `data` as 16-bit big-endian words, added to `acc`, unfolded.
/// Summing 32-bit words is the same modulo 0xffff (2^16 ≡ 1) and halves the additions; a
/// 64 KiB packet cannot overflow the accumulator.
pub(crate) fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        acc += u64::from(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    let rest = words.remainder();
    let mut last = [0u8; 4];
    last[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(last))
}

/// Folds a [`sum`] to 16 bits (end-around carry).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{internet_checksum, transport_checksum};
    use std::net::IpAddr;

    /// A coalesced TCP packet as the kernel hands it over: the IP header of the whole, the TCP
    /// checksum field holding only the pseudo-header sum.
    fn coalesced(ipv6: bool, payload: &[u8], flags: u8) -> Vec<u8> {
        let ip_len = if ipv6 { 40 } else { 20 };
        let mut p = vec![0u8; ip_len + 20 + payload.len()];
        if ipv6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            p[6] = PROTO_TCP;
            p[7] = 64;
            p[8..24].copy_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
            p[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        } else {
            p[0] = 0x45;
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = PROTO_TCP;
            p[12..16].copy_from_slice(&[10, 0, 0, 1]);
            p[16..20].copy_from_slice(&[10, 77, 0, 2]);
            let c = internet_checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&80u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&0xffff_f000u32.to_be_bytes());
        p[t + 8..t + 12].copy_from_slice(&7u32.to_be_bytes());
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        p[t + 14..t + 16].copy_from_slice(&1000u16.to_be_bytes());
        p[t + 17] = 0x55; // garbage where the partial checksum sits
        p[t + 20..].copy_from_slice(payload);
        p
    }

    fn addresses(p: &[u8]) -> (IpAddr, IpAddr, usize) {
        if p[0] >> 4 == 6 {
            let s: [u8; 16] = p[8..24].try_into().unwrap();
            let d: [u8; 16] = p[24..40].try_into().unwrap();
            (s.into(), d.into(), 40)
        } else {
            let s: [u8; 4] = p[12..16].try_into().unwrap();
            let d: [u8; 4] = p[16..20].try_into().unwrap();
            (s.into(), d.into(), 20)
        }
    }

    fn payload_of(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn header_parses() {
        let h = VnetHeader::parse(&[1, 0x81, 0x36, 0, 0x58, 0x04, 20, 0, 16, 0]);
        assert!(h.needs_csum);
        assert_eq!(h.gso, Gso::TcpV4);
        assert_eq!(h.gso_size, 1112);
        assert_eq!((h.csum_start, h.csum_offset), (20, 16));
        assert_eq!(VnetHeader::parse(&[0; 10]).gso, Gso::None);
        assert_eq!(
            VnetHeader::parse(&[0, 4, 0, 0, 0, 0, 0, 0, 0, 0]).gso,
            Gso::TcpV6
        );
        assert_eq!(
            VnetHeader::parse(&[0, 5, 0, 0, 0, 0, 0, 0, 0, 0]).gso,
            Gso::Other(5)
        );
    }

    #[test]
    fn segments_carry_the_payload_in_order_with_valid_checksums() {
        for ipv6 in [false, true] {
            for len in [1, 1111, 1112, 1113, 40_000, 65_000 - 60] {
                let payload = payload_of(len);
                let packet = coalesced(ipv6, &payload, 0x18 | 0x01 | 0x80); // PSH ACK FIN CWR
                let mut segments = Vec::new();
                let n = segment_tcp(&packet, 1112, 1500, &[0xaa, 0xbb], |s| {
                    segments.push(s);
                })
                .unwrap();
                assert_eq!(n, len.div_ceil(1112));
                assert_eq!(segments.len(), n);
                let mut joined = Vec::new();
                let mut seq = 0xffff_f000u32;
                for (i, s) in segments.iter().enumerate() {
                    assert_eq!(&s[..2], &[0xaa, 0xbb]);
                    let s = &s[2..];
                    let (src, dst, t) = addresses(s);
                    if ipv6 {
                        assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
                    } else {
                        assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                        assert_eq!(internet_checksum(&s[..20]), 0);
                        let id = u16::from_be_bytes([s[4], s[5]]);
                        assert_eq!(id, 0xfffeu16.wrapping_add(i as u16));
                    }
                    assert_eq!(transport_checksum(src, dst, PROTO_TCP, &s[t..]), 0);
                    assert!(s.len() - t - 20 <= 1112);
                    assert_eq!(u32::from_be_bytes(s[t + 4..t + 8].try_into().unwrap()), seq);
                    let last = i + 1 == n;
                    assert_eq!(s[t + 13] & 0x09 != 0, last, "FIN/PSH only on the last");
                    assert_eq!(s[t + 13] & 0x80 != 0, i == 0, "CWR only on the first");
                    assert_eq!(s[t + 13] & 0x10, 0x10, "ACK on all");
                    seq = seq.wrapping_add((s.len() - t - 20) as u32);
                    joined.extend_from_slice(&s[t + 20..]);
                }
                assert_eq!(joined, payload, "ipv6 {ipv6} len {len}");
            }
        }
    }

    #[test]
    fn segments_respect_the_link_mtu_below_the_segment_size() {
        let packet = coalesced(false, &payload_of(10_000), 0x10);
        let mut lens = Vec::new();
        let n = segment_tcp(&packet, 1448, 1152, &[], |s| {
            lens.push(s.len());
        })
        .unwrap();
        assert_eq!(n, 10_000usize.div_ceil(1112));
        assert!(lens.iter().all(|&len| len <= 1152));
        assert_eq!(lens.iter().map(|len| len - 40).sum::<usize>(), 10_000);
    }

    #[test]
    fn a_finished_coalesced_packet_is_a_valid_large_packet() {
        for ipv6 in [false, true] {
            let payload = payload_of(60_001);
            let mut packet = coalesced(ipv6, &payload, 0x18);
            finish_coalesced(&mut packet).unwrap();
            let (src, dst, t) = addresses(&packet);
            if !ipv6 {
                assert_eq!(internet_checksum(&packet[..20]), 0);
            }
            assert_eq!(transport_checksum(src, dst, PROTO_TCP, &packet[t..]), 0);
            assert_eq!(&packet[t + 20..], &payload[..]);
        }
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        // A UDP datagram whose checksum field holds the pseudo-header sum, as the kernel leaves
        // it for CHECKSUM_PARTIAL.
        let mut p = vec![0u8; 20 + 8 + 333];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
        p[24..26].copy_from_slice(&(8u16 + 333).to_be_bytes());
        for (i, b) in p[28..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let pseudo = fold(sum(&p[12..20], 17 + 8 + 333));
        p[26..28].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut p, 20, 6).unwrap();
        let (src, dst, _) = addresses(&p);
        assert_eq!(transport_checksum(src, dst, 17, &p[20..]), 0);
        assert_eq!(
            complete_checksum(&mut p, 20, 400),
            Err(OffloadError::ChecksumOutside)
        );
    }

    #[test]
    fn malformed_coalesced_packets_are_refused_without_output() {
        let mut emitted = 0;
        let good = coalesced(false, &payload_of(3000), 0x10);
        for bad in [
            vec![],
            vec![0x45; 19],
            good[..30].to_vec(),
            {
                let mut udp = good.clone();
                udp[9] = 17;
                udp
            },
            {
                let mut short_offset = good.clone();
                short_offset[20 + 12] = 2 << 4;
                short_offset
            },
            {
                let mut long_offset = good[..50].to_vec();
                long_offset[20 + 12] = 15 << 4;
                long_offset
            },
        ] {
            assert_eq!(
                segment_tcp(&bad, 1112, 1152, &[], |_| emitted += 1),
                Err(OffloadError::NotTcp)
            );
            let mut bad = bad;
            assert_eq!(finish_coalesced(&mut bad), Err(OffloadError::NotTcp));
        }
        assert_eq!(
            segment_tcp(&good, 0, 1152, &[], |_| emitted += 1),
            Err(OffloadError::ZeroSegmentSize)
        );
        assert_eq!(
            segment_tcp(&good, 1112, 40, &[], |_| emitted += 1),
            Err(OffloadError::ZeroSegmentSize)
        );
        assert_eq!(emitted, 0);
    }

    #[test]
    fn the_wide_sum_equals_the_rfc1071_sum() {
        // RFC 1071 word by word, as a reference independent of the 32-bit sum above.
        fn reference(data: &[u8]) -> u16 {
            let mut sum = 0u32;
            for pair in data.chunks(2) {
                sum += u32::from(pair[0]) << 8 | u32::from(pair.get(1).copied().unwrap_or(0));
                sum = (sum & 0xffff) + (sum >> 16);
            }
            !(sum as u16)
        }
        for len in 0..70 {
            let data = payload_of(len);
            assert_eq!(!fold(sum(&data, 0)), reference(&data), "len {len}");
        }
        let ones = [0xffu8; 1000];
        assert_eq!(!fold(sum(&ones, 0)), reference(&ones));
    }
}
