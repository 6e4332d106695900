//! Packet handling on the forwarding path, sans-IO: classification of client packets, TCP MSS
//! clamping and the ICMP "fragmentation needed" builder.
//!
//! Everything here works on byte slices and is unit-tested on byte arrays. Client packets are
//! peer-controlled, so nothing here panics on any input.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why the gateway dropped a packet. Each reason has its own counter in
/// [`crate::metrics::Metrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed IPv4/IPv6 packet (bad version, lengths or header checksum).
    Malformed,
    /// A client packet whose source address is not one of the session's addresses.
    Spoofed,
    /// A packet from the TUN for an address no session holds.
    NoRoute,
    /// A packet from the TUN larger than the link MTU.
    Oversize,
    /// The session's queue was full; the oldest queued packet was dropped.
    QueueFull,
    /// Writing to the TUN device failed.
    TunWrite,
    /// The packet plus datagram header exceeded the QUIC connection's current datagram size.
    TxOversize,
    /// QUIC refused the datagram (connection lost, datagrams unsupported).
    SendFailed,
    /// IPv4 with options (IHL > 5): options such as source routing are never needed by a
    /// client and have a history of abuse.
    IpOptions,
    /// An IPv4 fragment (MF set or offset != 0): fragments hide the transport header from the
    /// policy check.
    Fragment,
    /// IPv6 with an extension header (hop-by-hop, routing, fragment, destination options...):
    /// only TCP, UDP and ICMPv6 directly after the fixed header are forwarded.
    ExtensionHeader,
    /// A transport protocol other than TCP, UDP, ICMP/ICMPv6.
    Protocol,
    /// A TCP/UDP/ICMP packet too short for its own header.
    TransportTruncated,
    /// The source is the unspecified address or an IPv4-mapped IPv6 address.
    BadSource,
    /// The egress policy refused the destination (see [`crate::policy`]).
    Policy,
    /// A packet from the TUN whose offload (partial checksum, coalescing) could not be
    /// applied (see [`crate::offload::OffloadError`]).
    Offload,
}

impl DropReason {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [Self; 16] = [
        Self::Malformed,
        Self::Spoofed,
        Self::NoRoute,
        Self::Oversize,
        Self::QueueFull,
        Self::TunWrite,
        Self::TxOversize,
        Self::SendFailed,
        Self::IpOptions,
        Self::Fragment,
        Self::ExtensionHeader,
        Self::Protocol,
        Self::TransportTruncated,
        Self::BadSource,
        Self::Policy,
        Self::Offload,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Spoofed => "spoofed",
            Self::NoRoute => "no_route",
            Self::Oversize => "oversize",
            Self::QueueFull => "queue_full",
            Self::TunWrite => "tun_write",
            Self::TxOversize => "tx_oversize",
            Self::SendFailed => "send_failed",
            Self::IpOptions => "ip_options",
            Self::Fragment => "fragment",
            Self::ExtensionHeader => "extension_header",
            Self::Protocol => "protocol",
            Self::TransportTruncated => "transport_truncated",
            Self::BadSource => "bad_source",
            Self::Policy => "policy",
            Self::Offload => "offload",
        }
    }

    /// Index into counter arrays (position in [`DropReason::ALL`]).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Malformed => "malformed packet",
            Self::Spoofed => "spoofed source address",
            Self::NoRoute => "no session for destination",
            Self::Oversize => "larger than the link MTU",
            Self::QueueFull => "session queue full",
            Self::TunWrite => "TUN write failed",
            Self::TxOversize => "larger than the QUIC datagram limit",
            Self::SendFailed => "QUIC datagram send failed",
            Self::IpOptions => "IPv4 options",
            Self::Fragment => "IPv4 fragment",
            Self::ExtensionHeader => "IPv6 extension header",
            Self::Protocol => "transport protocol not TCP, UDP or ICMP",
            Self::TransportTruncated => "transport header truncated",
            Self::BadSource => "unspecified or IPv4-mapped source",
            Self::Policy => "refused by the egress policy",
            Self::Offload => "TUN offload could not be applied",
        })
    }
}

/// A client packet that passed classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classified {
    /// Source address (one of the session's addresses).
    pub source: IpAddr,
    /// Destination address.
    pub destination: IpAddr,
    /// Transport protocol: [`PROTO_TCP`], [`PROTO_UDP`], [`PROTO_ICMP`] or [`PROTO_ICMPV6`].
    pub protocol: u8,
    /// Destination port for TCP and UDP; `None` for ICMP.
    pub destination_port: Option<u16>,
}

const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IPv6 next-header value of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
const TCP_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const ICMP_HEADER_LEN: usize = 8;

/// Checks a packet received from a client, in this order:
///
/// 1. exactly one well-formed IPv4 packet (version 4, IHL >= 5, total length equal to the
///    datagram length, valid header checksum) or IPv6 packet (payload length + 40 equal to the
///    datagram length) — else [`DropReason::Malformed`];
/// 2. a source that is neither unspecified nor IPv4-mapped ([`DropReason::BadSource`]) and is
///    one of `session_addrs` ([`DropReason::Spoofed`]);
/// 3. no IPv4 options ([`DropReason::IpOptions`]), no IPv4 fragment ([`DropReason::Fragment`]),
///    no IPv6 extension header ([`DropReason::ExtensionHeader`]);
/// 4. TCP, UDP or ICMP/ICMPv6 ([`DropReason::Protocol`]) with room for its header
///    ([`DropReason::TransportTruncated`]).
///
/// # Errors
/// The first [`DropReason`] that applies.
pub fn classify_from_client(
    packet: &[u8],
    session_addrs: &[IpAddr],
) -> Result<Classified, DropReason> {
    let (source, destination, header_len, protocol) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            if packet.len() < IPV4_HEADER_LEN {
                return Err(DropReason::Malformed);
            }
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if header_len < IPV4_HEADER_LEN
                || header_len > packet.len()
                || total_len != packet.len()
                || internet_checksum(&packet[..header_len]) != 0
            {
                return Err(DropReason::Malformed);
            }
            (
                ipv4_at(packet, 12),
                ipv4_at(packet, 16),
                header_len,
                packet[9],
            )
        }
        Some(6) => {
            if packet.len() < IPV6_HEADER_LEN {
                return Err(DropReason::Malformed);
            }
            let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if payload_len + IPV6_HEADER_LEN != packet.len() {
                return Err(DropReason::Malformed);
            }
            (
                ipv6_at(packet, 8),
                ipv6_at(packet, 24),
                IPV6_HEADER_LEN,
                packet[6],
            )
        }
        _ => return Err(DropReason::Malformed),
    };
    let bad_source = match source {
        IpAddr::V4(v4) => v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.to_ipv4_mapped().is_some(),
    };
    if bad_source {
        return Err(DropReason::BadSource);
    }
    if !session_addrs.contains(&source) {
        return Err(DropReason::Spoofed);
    }
    if source.is_ipv4() {
        if header_len > IPV4_HEADER_LEN {
            return Err(DropReason::IpOptions);
        }
        // MF (0x2000) or a non-zero offset (low 13 bits).
        if u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0 {
            return Err(DropReason::Fragment);
        }
    }
    let transport = &packet[header_len..];
    let destination_port = match (protocol, source) {
        (PROTO_TCP, _) => {
            let data_offset = transport.get(12).map(|b| usize::from(b >> 4) * 4);
            match data_offset {
                Some(offset) if offset >= TCP_HEADER_LEN && offset <= transport.len() => {}
                _ => return Err(DropReason::TransportTruncated),
            }
            Some(u16::from_be_bytes([transport[2], transport[3]]))
        }
        (PROTO_UDP, _) => {
            let Some(length) = transport.get(4..6) else {
                return Err(DropReason::TransportTruncated);
            };
            let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
            if length < UDP_HEADER_LEN || length > transport.len() {
                return Err(DropReason::TransportTruncated);
            }
            Some(u16::from_be_bytes([transport[2], transport[3]]))
        }
        (PROTO_ICMP, IpAddr::V4(_)) | (PROTO_ICMPV6, IpAddr::V6(_)) => {
            if transport.len() < ICMP_HEADER_LEN {
                return Err(DropReason::TransportTruncated);
            }
            None
        }
        // Every IPv6 extension header (hop-by-hop 0, routing 43, fragment 44, ESP 50, AH 51,
        // destination options 60, mobility 135, HIP 139, shim6 140, experimental 253/254) and
        // "no next header" 59.
        (0 | 43 | 44 | 50 | 51 | 59 | 60 | 135 | 139 | 140 | 253 | 254, IpAddr::V6(_)) => {
            return Err(DropReason::ExtensionHeader);
        }
        _ => return Err(DropReason::Protocol),
    };
    Ok(Classified {
        source,
        destination,
        protocol,
        destination_port,
    })
}

/// The destination of a packet read from the TUN device. The kernel wrote it, so only the
/// version and minimum length are checked.
///
/// # Errors
/// [`DropReason::Malformed`] when the packet is too short or not IPv4/IPv6.
pub fn destination(packet: &[u8]) -> Result<IpAddr, DropReason> {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= IPV4_HEADER_LEN => Ok(ipv4_at(packet, 16)),
        Some(6) if packet.len() >= IPV6_HEADER_LEN => Ok(ipv6_at(packet, 24)),
        _ => Err(DropReason::Malformed),
    }
}

/// Whether `packet` is IPv4 with the Don't Fragment bit set.
pub fn ipv4_dont_fragment(packet: &[u8]) -> bool {
    packet.len() >= IPV4_HEADER_LEN && packet[0] >> 4 == 4 && packet[6] & 0x40 != 0
}

fn ipv4_at(packet: &[u8], at: usize) -> IpAddr {
    let mut b = [0u8; 4];
    b.copy_from_slice(&packet[at..at + 4]);
    IpAddr::V4(Ipv4Addr::from(b))
}

fn ipv6_at(packet: &[u8], at: usize) -> IpAddr {
    let mut b = [0u8; 16];
    b.copy_from_slice(&packet[at..at + 16]);
    IpAddr::V6(Ipv6Addr::from(b))
}

/// The largest TCP MSS for a link MTU: MTU − 40 for IPv4 (20 IP + 20 TCP), MTU − 60 for IPv6.
pub fn max_mss_for_mtu(link_mtu: u16) -> (u16, u16) {
    (link_mtu.saturating_sub(40), link_mtu.saturating_sub(60))
}

/// Where the MSS value of a TCP SYN sits: (offset of the TCP header, offset of the MSS value),
/// if `packet` is a TCP SYN carrying an MSS option.
///
/// IPv6 extension headers are not walked: a SYN behind one is left alone (rare, and the peer's
/// PMTU discovery still applies).
fn syn_mss_offsets(packet: &[u8]) -> Option<(usize, usize)> {
    let tcp = match packet.first()? >> 4 {
        4 => {
            if packet.len() < IPV4_HEADER_LEN || packet[9] != PROTO_TCP {
                return None;
            }
            // Only the first fragment carries the TCP header.
            let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
            if fragment_offset != 0 {
                return None;
            }
            usize::from(packet[0] & 0x0f) * 4
        }
        6 => {
            if packet.len() < IPV6_HEADER_LEN || packet[6] != PROTO_TCP {
                return None;
            }
            IPV6_HEADER_LEN
        }
        _ => return None,
    };
    let header = packet.get(tcp..tcp + 20)?;
    if header[13] & 0x02 == 0 {
        return None; // not a SYN
    }
    let data_offset = usize::from(header[12] >> 4) * 4;
    let options = packet.get(tcp + 20..tcp + data_offset)?;
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*options.get(i + 1)?);
                if len < 2 || i + len > options.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some((tcp, tcp + 20 + i + 2));
                }
                i += len;
            }
        }
    }
    None
}

/// Whether [`clamp_tcp_mss`] would change `packet` (lets callers holding shared bytes copy only
/// the rare packets that need it).
pub fn mss_clamp_needed(packet: &[u8], max_mss_v4: u16, max_mss_v6: u16) -> bool {
    let Some((_, at)) = syn_mss_offsets(packet) else {
        return false;
    };
    let mss = u16::from_be_bytes([packet[at], packet[at + 1]]);
    mss > if packet[0] >> 4 == 4 {
        max_mss_v4
    } else {
        max_mss_v6
    }
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to at most `max_mss_v4` / `max_mss_v6`,
/// fixing the TCP checksum incrementally (RFC 1624). Returns whether the packet changed.
pub fn clamp_tcp_mss(packet: &mut [u8], max_mss_v4: u16, max_mss_v6: u16) -> bool {
    let Some((tcp, at)) = syn_mss_offsets(packet) else {
        return false;
    };
    let max = if packet[0] >> 4 == 4 {
        max_mss_v4
    } else {
        max_mss_v6
    };
    let old = [packet[at], packet[at + 1]];
    if u16::from_be_bytes(old) <= max {
        return false;
    }
    let new = max.to_be_bytes();
    let mut checksum = u16::from_be_bytes([packet[tcp + 16], packet[tcp + 17]]);
    for (k, (o, n)) in old.iter().zip(new).enumerate() {
        // A byte at an even offset from the TCP header is the high half of its 16-bit word.
        let shift = if (at + k - tcp) % 2 == 0 { 8 } else { 0 };
        checksum = checksum_adjust(checksum, u16::from(*o) << shift, u16::from(n) << shift);
    }
    packet[at..at + 2].copy_from_slice(&new);
    packet[tcp + 16..tcp + 18].copy_from_slice(&checksum.to_be_bytes());
    true
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`.
fn checksum_adjust(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The Internet checksum (RFC 1071) of `data`; 0 when `data` includes a valid checksum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// `data`'s one's-complement sum added to `sum`, folded to 16 bits (in a `u32` for the callers'
/// additions).
fn sum_words(data: &[u8], sum: u32) -> u32 {
    u32::from(crate::offload::fold(crate::offload::sum(
        data,
        u64::from(sum),
    )))
}

fn fold(sum: u32) -> u16 {
    crate::offload::fold(u64::from(sum))
}

/// Builds an ICMPv4 Destination Unreachable / Fragmentation Needed (type 3 code 4) from
/// `gateway` to the sender of `original`, announcing `next_hop_mtu`.
///
/// Returns `None` where RFC 1122 §3.2.2 forbids an ICMP error: `original` is malformed, a
/// non-first fragment, or itself an ICMP error message.
pub fn icmp_frag_needed(original: &[u8], gateway: Ipv4Addr, next_hop_mtu: u16) -> Option<Vec<u8>> {
    if original.len() < IPV4_HEADER_LEN || original[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(original[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER_LEN || header_len > original.len() {
        return None;
    }
    if u16::from_be_bytes([original[6], original[7]]) & 0x1fff != 0 {
        return None;
    }
    if original[9] == PROTO_ICMP {
        // Only echo request/reply may trigger an error; everything else could be an error.
        match original.get(header_len) {
            Some(0 | 8) => {}
            _ => return None,
        }
    }
    let quoted = &original[..(header_len + 8).min(original.len())];
    let total = IPV4_HEADER_LEN + 8 + quoted.len();
    let mut out = vec![0u8; total];
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[8] = 64; // TTL
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&gateway.octets());
    out[16..20].copy_from_slice(&original[12..16]);
    let ip_checksum = internet_checksum(&out[..IPV4_HEADER_LEN]);
    out[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
    let icmp = &mut out[IPV4_HEADER_LEN..];
    icmp[0] = 3;
    icmp[1] = 4;
    icmp[6..8].copy_from_slice(&next_hop_mtu.to_be_bytes());
    icmp[8..].copy_from_slice(quoted);
    let icmp_checksum = internet_checksum(icmp);
    icmp[2..4].copy_from_slice(&icmp_checksum.to_be_bytes());
    Some(out)
}

/// ICMP "communication administratively prohibited": Destination Unreachable code 13 (RFC 1812
/// §5.2.7.1) for IPv4, Destination Unreachable code 1 (RFC 4443 §3.1) for IPv6.
///
/// Built from `from` (the gateway's address on the client link) to the source of `original`,
/// quoting `original` as RFC 792 (IP header + 8 bytes) and RFC 4443 (as much as fits in the
/// IPv6 minimum MTU of 1280) ask, with valid checksums. An IPv6 reply is also kept within
/// `max_len` (the client link MTU) so it fits a datagram.
///
/// Returns `None` where no ICMP error may be sent (RFC 1122 §3.2.2, RFC 4443 §2.4): `original`
/// is malformed, a non-first fragment, an ICMP error itself (only echo requests and other
/// informational messages are answered), or `from` is of the other family.
pub fn icmp_prohibited(original: &[u8], from: IpAddr, max_len: usize) -> Option<Vec<u8>> {
    match (original.first()? >> 4, from) {
        (4, IpAddr::V4(from)) => icmpv4_prohibited(original, from),
        (6, IpAddr::V6(from)) => icmpv6_prohibited(original, from, max_len),
        _ => None,
    }
}

fn icmpv4_prohibited(original: &[u8], from: Ipv4Addr) -> Option<Vec<u8>> {
    if original.len() < IPV4_HEADER_LEN {
        return None;
    }
    let header_len = usize::from(original[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER_LEN || header_len > original.len() {
        return None;
    }
    if u16::from_be_bytes([original[6], original[7]]) & 0x1fff != 0 {
        return None;
    }
    // Nor about a packet to a multicast or broadcast address (RFC 1122 §3.2.2).
    let IpAddr::V4(destination) = ipv4_at(original, 16) else {
        return None;
    };
    if destination.is_multicast() || destination.is_broadcast() {
        return None;
    }
    // Only an echo request (8) may be answered with an error; anything else could be one.
    if original[9] == PROTO_ICMP && original.get(header_len) != Some(&8) {
        return None;
    }
    let quoted = &original[..(header_len + 8).min(original.len())];
    let total = IPV4_HEADER_LEN + ICMP_HEADER_LEN + quoted.len();
    let mut out = vec![0u8; total];
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[8] = 64; // TTL
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&from.octets());
    out[16..20].copy_from_slice(&original[12..16]);
    let ip_checksum = internet_checksum(&out[..IPV4_HEADER_LEN]);
    out[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
    let icmp = &mut out[IPV4_HEADER_LEN..];
    icmp[0] = 3; // Destination Unreachable
    icmp[1] = 13; // Communication administratively prohibited
    icmp[8..].copy_from_slice(quoted);
    let icmp_checksum = internet_checksum(icmp);
    icmp[2..4].copy_from_slice(&icmp_checksum.to_be_bytes());
    Some(out)
}

fn icmpv6_prohibited(original: &[u8], from: Ipv6Addr, max_len: usize) -> Option<Vec<u8>> {
    /// The IPv6 minimum MTU: an ICMPv6 error must not exceed it (RFC 4443 §2.4 (c)).
    const MIN_MTU: usize = 1280;
    if original.len() < IPV6_HEADER_LEN {
        return None;
    }
    // Nor about a packet to a multicast address (RFC 4443 §2.4 (e)).
    if original[24] == 0xff {
        return None;
    }
    // Informational ICMPv6 messages have types >= 128; errors must not be answered.
    if original[6] == PROTO_ICMPV6
        && original
            .get(IPV6_HEADER_LEN)
            .is_none_or(|icmp_type| *icmp_type < 128)
    {
        return None;
    }
    let room = max_len
        .min(MIN_MTU)
        .checked_sub(IPV6_HEADER_LEN + ICMP_HEADER_LEN + IPV6_HEADER_LEN)?
        + IPV6_HEADER_LEN;
    let quoted = &original[..original.len().min(room)];
    let icmp_len = ICMP_HEADER_LEN + quoted.len();
    let mut out = vec![0u8; IPV6_HEADER_LEN + icmp_len];
    out[0] = 0x60;
    out[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    out[6] = PROTO_ICMPV6;
    out[7] = 64; // hop limit
    out[8..24].copy_from_slice(&from.octets());
    out[24..40].copy_from_slice(&original[8..24]);
    let destination = ipv6_at(original, 8);
    let icmp = &mut out[IPV6_HEADER_LEN..];
    icmp[0] = 1; // Destination Unreachable
    icmp[1] = 1; // Communication with destination administratively prohibited
    icmp[8..].copy_from_slice(quoted);
    let checksum = transport_checksum(IpAddr::V6(from), destination, PROTO_ICMPV6, icmp);
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    Some(out)
}

/// The TCP/UDP checksum over the pseudo-header and `segment`; 0 when `segment` carries a valid
/// checksum. Used by tests and available to benches.
pub fn transport_checksum(
    source: IpAddr,
    destination: IpAddr,
    protocol: u8,
    segment: &[u8],
) -> u16 {
    let mut sum = 0u32;
    match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            sum = sum_words(&s.octets(), sum);
            sum = sum_words(&d.octets(), sum);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            sum = sum_words(&s.octets(), sum);
            sum = sum_words(&d.octets(), sum);
        }
        _ => {}
    }
    sum += u32::from(protocol);
    sum += segment.len() as u32;
    !fold(sum_words(segment, fold(sum).into()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A valid IPv4 packet with `payload` and a correct header checksum.
    pub(crate) fn ipv4_packet(src: &str, dst: &str, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = protocol;
        let IpAddr::V4(s) = ip(src) else { panic!() };
        let IpAddr::V4(d) = ip(dst) else { panic!() };
        p[12..16].copy_from_slice(&s.octets());
        p[16..20].copy_from_slice(&d.octets());
        let c = internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..].copy_from_slice(payload);
        p
    }

    pub(crate) fn ipv6_packet(src: &str, dst: &str, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        let IpAddr::V6(s) = ip(src) else { panic!() };
        let IpAddr::V6(d) = ip(dst) else { panic!() };
        p[8..24].copy_from_slice(&s.octets());
        p[24..40].copy_from_slice(&d.octets());
        p[40..].copy_from_slice(payload);
        p
    }

    /// A TCP SYN with the given options (padded to 4 bytes) and a valid checksum.
    fn tcp_syn(src: &str, dst: &str, options: &[u8], v6: bool) -> Vec<u8> {
        let mut opts = options.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let mut tcp = vec![0u8; 20 + opts.len()];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&12345u32.to_be_bytes());
        tcp[12] = (((20 + opts.len()) / 4) << 4) as u8;
        tcp[13] = 0x02;
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        tcp[20..].copy_from_slice(&opts);
        let c = transport_checksum(ip(src), ip(dst), PROTO_TCP, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        if v6 {
            ipv6_packet(src, dst, PROTO_TCP, &tcp)
        } else {
            ipv4_packet(src, dst, PROTO_TCP, &tcp)
        }
    }

    fn tcp_checksum_ok(packet: &[u8]) -> bool {
        let c = classify_from_client(packet, &[destination_src(packet)]).unwrap();
        let start = if packet[0] >> 4 == 4 { 20 } else { 40 };
        transport_checksum(c.source, c.destination, PROTO_TCP, &packet[start..]) == 0
    }

    fn destination_src(packet: &[u8]) -> IpAddr {
        if packet[0] >> 4 == 4 {
            ipv4_at(packet, 12)
        } else {
            ipv6_at(packet, 8)
        }
    }

    #[test]
    fn drop_reason_indices_match_all() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
            assert!(!reason.to_string().is_empty());
        }
    }

    #[test]
    fn classifies_valid_packets() {
        let addrs = [ip("10.77.0.2"), ip("fd00:77::2")];
        let p = ipv4_packet("10.77.0.2", "1.1.1.1", 17, &udp_header(53, 12));
        assert_eq!(
            classify_from_client(&p, &addrs),
            Ok(Classified {
                source: ip("10.77.0.2"),
                destination: ip("1.1.1.1"),
                protocol: PROTO_UDP,
                destination_port: Some(53),
            })
        );
        let p = ipv6_packet("fd00:77::2", "2001:db8::1", 17, &udp_header(443, 12));
        let c = classify_from_client(&p, &addrs).unwrap();
        assert_eq!(c.destination, ip("2001:db8::1"));
        assert_eq!(c.destination_port, Some(443));
        let syn = tcp_syn("10.77.0.2", "1.1.1.1", &[], false);
        let c = classify_from_client(&syn, &addrs).unwrap();
        assert_eq!((c.protocol, c.destination_port), (PROTO_TCP, Some(80)));
        let echo = ipv4_packet(
            "10.77.0.2",
            "1.1.1.1",
            PROTO_ICMP,
            &[8, 0, 0, 0, 0, 1, 0, 1],
        );
        let c = classify_from_client(&echo, &addrs).unwrap();
        assert_eq!((c.protocol, c.destination_port), (PROTO_ICMP, None));
        let echo6 = ipv6_packet(
            "fd00:77::2",
            "2001:db8::1",
            PROTO_ICMPV6,
            &[128, 0, 0, 0, 0, 1, 0, 1],
        );
        assert!(classify_from_client(&echo6, &addrs).is_ok());
    }

    /// A UDP header for `port` with `payload_len` zero bytes after it (checksum 0: "none").
    fn udp_header(port: u16, payload_len: usize) -> Vec<u8> {
        let mut udp = vec![0u8; 8 + payload_len];
        udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&port.to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + payload_len) as u16).to_be_bytes());
        udp
    }

    /// `packet` with the IPv4 header checksum recomputed after an edit.
    fn fix_ipv4_checksum(mut packet: Vec<u8>) -> Vec<u8> {
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        packet[10..12].copy_from_slice(&[0, 0]);
        let c = internet_checksum(&packet[..header_len]);
        packet[10..12].copy_from_slice(&c.to_be_bytes());
        packet
    }

    #[test]
    fn strict_classification_reasons() {
        let addrs = [ip("10.77.0.2"), ip("fd00:77::2")];
        let check = |packet: &[u8], expected: DropReason, what: &str| {
            assert_eq!(
                classify_from_client(packet, &addrs),
                Err(expected),
                "{what}"
            );
        };
        // IPv4 with options: IHL 6 with a 4-byte NOP option (valid checksum).
        let plain = ipv4_packet("10.77.0.2", "1.1.1.1", 17, &udp_header(53, 4));
        let mut with_options = plain[..20].to_vec();
        with_options[0] = 0x46;
        with_options.extend_from_slice(&[1, 1, 1, 0]);
        with_options.extend_from_slice(&plain[20..]);
        let total = with_options.len() as u16;
        with_options[2..4].copy_from_slice(&total.to_be_bytes());
        check(
            &fix_ipv4_checksum(with_options),
            DropReason::IpOptions,
            "options",
        );
        // Fragments: MF set, and a non-zero offset.
        let mut first = plain.clone();
        first[6] = 0x20;
        check(&fix_ipv4_checksum(first), DropReason::Fragment, "MF");
        let mut later = plain.clone();
        later[6] = 0x00;
        later[7] = 0x10;
        check(&fix_ipv4_checksum(later), DropReason::Fragment, "offset");
        // IPv6 extension headers, each directly after the fixed header.
        for next in [0u8, 43, 44, 50, 51, 59, 60, 135, 139, 140, 253, 254] {
            let p = ipv6_packet(
                "fd00:77::2",
                "2001:db8::1",
                next,
                &[17, 0, 0, 0, 0, 0, 0, 0],
            );
            check(
                &p,
                DropReason::ExtensionHeader,
                &format!("next header {next}"),
            );
        }
        // Other protocols: GRE (47) over IPv4, SCTP (132) over IPv6, ICMPv6 inside IPv4.
        check(
            &ipv4_packet("10.77.0.2", "1.1.1.1", 47, &[0; 8]),
            DropReason::Protocol,
            "GRE",
        );
        check(
            &ipv6_packet("fd00:77::2", "2001:db8::1", 132, &[0; 12]),
            DropReason::Protocol,
            "SCTP",
        );
        check(
            &ipv4_packet("10.77.0.2", "1.1.1.1", PROTO_ICMPV6, &[0; 8]),
            DropReason::Protocol,
            "ICMPv6 over IPv4",
        );
        // Truncated transport headers.
        check(
            &ipv4_packet("10.77.0.2", "1.1.1.1", 6, &[0; 19]),
            DropReason::TransportTruncated,
            "TCP 19",
        );
        let mut bad_offset = tcp_syn("10.77.0.2", "1.1.1.1", &[], false);
        bad_offset[20 + 12] = 0xf0; // data offset 60 > 20 bytes present
        check(
            &bad_offset,
            DropReason::TransportTruncated,
            "TCP data offset",
        );
        let mut tiny_offset = tcp_syn("10.77.0.2", "1.1.1.1", &[], false);
        tiny_offset[20 + 12] = 0x40; // data offset 16 < 20
        check(
            &tiny_offset,
            DropReason::TransportTruncated,
            "TCP data offset < 5",
        );
        check(
            &ipv4_packet("10.77.0.2", "1.1.1.1", 17, &[0; 7]),
            DropReason::TransportTruncated,
            "UDP 7",
        );
        let mut long_udp = udp_header(53, 4);
        long_udp[4..6].copy_from_slice(&100u16.to_be_bytes());
        check(
            &ipv4_packet("10.77.0.2", "1.1.1.1", 17, &long_udp),
            DropReason::TransportTruncated,
            "UDP length",
        );
        check(
            &ipv4_packet("10.77.0.2", "1.1.1.1", 1, &[8, 0, 0]),
            DropReason::TransportTruncated,
            "ICMP 3",
        );
        check(
            &ipv6_packet("fd00:77::2", "2001:db8::1", 58, &[128]),
            DropReason::TransportTruncated,
            "ICMPv6 1",
        );
        // Bad sources, even if (misconfigured) listed as the session's.
        let odd = [ip("0.0.0.0"), ip("::"), ip("::ffff:10.77.0.2")];
        let p = ipv4_packet("0.0.0.0", "1.1.1.1", 17, &udp_header(53, 0));
        assert_eq!(classify_from_client(&p, &odd), Err(DropReason::BadSource));
        for src in ["::", "::ffff:10.77.0.2"] {
            let p = ipv6_packet(src, "2001:db8::1", 17, &udp_header(53, 0));
            assert_eq!(
                classify_from_client(&p, &odd),
                Err(DropReason::BadSource),
                "{src}"
            );
        }
    }

    #[test]
    fn prohibited_replies_are_well_formed() {
        // IPv4: a UDP packet; the reply quotes its header + 8 bytes.
        let original = ipv4_packet("10.77.0.2", "169.254.169.254", 17, &udp_header(80, 100));
        let reply = icmp_prohibited(&original, ip("10.77.0.1"), 1280).unwrap();
        assert_eq!(reply.len(), 20 + 8 + 28);
        assert_eq!(internet_checksum(&reply[..20]), 0, "IP header checksum");
        assert_eq!(internet_checksum(&reply[20..]), 0, "ICMP checksum");
        assert_eq!(&reply[12..16], &[10, 77, 0, 1]);
        assert_eq!(&reply[16..20], &[10, 77, 0, 2]);
        assert_eq!(&reply[20..22], &[3, 13]);
        assert_eq!(&reply[28..], &original[..28]);
        // No error about an ICMP error; an echo request gets one.
        assert!(icmp_prohibited(&reply, ip("10.77.0.1"), 1280).is_none());
        let echo = ipv4_packet("10.77.0.2", "127.0.0.1", 1, &[8, 0, 0, 0, 0, 1, 0, 1]);
        assert!(icmp_prohibited(&echo, ip("10.77.0.1"), 1280).is_some());
        let echo_reply = ipv4_packet("10.77.0.2", "127.0.0.1", 1, &[0, 0, 0, 0, 0, 1, 0, 1]);
        assert!(icmp_prohibited(&echo_reply, ip("10.77.0.1"), 1280).is_none());
        // Multicast and broadcast destinations get no error.
        for dst in ["224.0.0.1", "255.255.255.255"] {
            let p = ipv4_packet("10.77.0.2", dst, 17, &udp_header(80, 0));
            assert!(
                icmp_prohibited(&p, ip("10.77.0.1"), 1280).is_none(),
                "{dst}"
            );
        }
        let p = ipv6_packet("fd00:77::2", "ff02::16", 58, &[143, 0, 0, 0, 0, 0, 0, 0]);
        assert!(icmp_prohibited(&p, ip("fd00:77::1"), 1280).is_none());
        // Wrong family for `from`.
        assert!(icmp_prohibited(&original, ip("fd00:77::1"), 1280).is_none());

        // IPv6: quotes the whole (small) packet, checksum over the pseudo-header.
        let original = ipv6_packet("fd00:77::2", "::1", 17, &udp_header(22, 10));
        let reply = icmp_prohibited(&original, ip("fd00:77::1"), 1280).unwrap();
        assert_eq!(reply.len(), 40 + 8 + original.len());
        assert_eq!(&reply[40..42], &[1, 1]);
        assert_eq!(ipv6_at(&reply, 24), ip("fd00:77::2"));
        assert_eq!(
            transport_checksum(ip("fd00:77::1"), ip("fd00:77::2"), 58, &reply[40..]),
            0
        );
        assert_eq!(&reply[48..], &original[..]);
        assert!(classify_from_client(&reply, &[ip("fd00:77::1")]).is_ok());
        assert!(
            icmp_prohibited(&reply, ip("fd00:77::1"), 1280).is_none(),
            "no error about an error"
        );
        // A large packet is quoted only up to the IPv6 minimum MTU.
        let big = ipv6_packet("fd00:77::2", "::1", 17, &udp_header(22, 1400));
        assert_eq!(
            icmp_prohibited(&big, ip("fd00:77::1"), 1280).unwrap().len(),
            1280
        );
        assert_eq!(
            icmp_prohibited(&big, ip("fd00:77::1"), 1152).unwrap().len(),
            1152
        );
    }

    #[test]
    fn spoofed_sources_are_refused() {
        let addrs = [ip("10.77.0.2")];
        let p = ipv4_packet("10.77.0.3", "1.1.1.1", 17, &[0; 12]);
        assert_eq!(classify_from_client(&p, &addrs), Err(DropReason::Spoofed));
        let p = ipv6_packet("fd00:77::2", "2001:db8::1", 17, &[0; 12]);
        assert_eq!(classify_from_client(&p, &addrs), Err(DropReason::Spoofed));
    }

    #[test]
    fn malformed_packets_are_refused() {
        let addrs = [ip("10.77.0.2"), ip("fd00:77::2")];
        let good = ipv4_packet("10.77.0.2", "1.1.1.1", 17, &[0; 12]);
        // Truncated, padded, empty, wrong version.
        for bad in [
            &good[..good.len() - 1],
            &good[..10],
            &[][..],
            &[0x55; 40][..],
        ] {
            assert_eq!(
                classify_from_client(bad, &addrs),
                Err(DropReason::Malformed)
            );
        }
        let mut padded = good.clone();
        padded.push(0);
        assert_eq!(
            classify_from_client(&padded, &addrs),
            Err(DropReason::Malformed)
        );
        // Bad header checksum.
        let mut bad = good.clone();
        bad[8] = 63;
        assert_eq!(
            classify_from_client(&bad, &addrs),
            Err(DropReason::Malformed)
        );
        // IHL below 5, IHL beyond the packet.
        let mut bad = good.clone();
        bad[0] = 0x44;
        assert_eq!(
            classify_from_client(&bad, &addrs),
            Err(DropReason::Malformed)
        );
        let mut bad = good;
        bad[0] = 0x4f;
        assert_eq!(
            classify_from_client(&bad, &addrs),
            Err(DropReason::Malformed)
        );
        // IPv6 with a wrong payload length, and truncated.
        let mut v6 = ipv6_packet("fd00:77::2", "2001:db8::1", 17, &[0; 12]);
        assert_eq!(
            classify_from_client(&v6[..39], &addrs),
            Err(DropReason::Malformed)
        );
        v6[5] += 1;
        assert_eq!(
            classify_from_client(&v6, &addrs),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn tun_destination() {
        let p = ipv4_packet("1.1.1.1", "10.77.0.2", 17, &[]);
        assert_eq!(destination(&p), Ok(ip("10.77.0.2")));
        let p = ipv6_packet("2001:db8::1", "fd00:77::2", 17, &[]);
        assert_eq!(destination(&p), Ok(ip("fd00:77::2")));
        assert_eq!(destination(&p[..30]), Err(DropReason::Malformed));
        assert!(ipv4_dont_fragment(&ipv4_packet(
            "1.1.1.1",
            "10.77.0.2",
            17,
            &[]
        )));
    }

    #[test]
    fn mss_is_clamped_with_valid_checksum() {
        let (max4, max6) = max_mss_for_mtu(1152);
        assert_eq!((max4, max6), (1112, 1092));
        // MSS first, MSS after one NOP (odd offset), MSS after window scale.
        let option_sets: [&[u8]; 3] = [
            &[2, 4, 0x05, 0xb4, 1, 3, 3, 7],
            &[1, 2, 4, 0x05, 0xb4, 1, 1, 1],
            &[1, 3, 3, 7, 2, 4, 0xff, 0xd7],
        ];
        for v6 in [false, true] {
            for options in option_sets {
                let (src, dst) = if v6 {
                    ("fd00:77::2", "2001:db8::1")
                } else {
                    ("10.77.0.2", "1.1.1.1")
                };
                let mut p = tcp_syn(src, dst, options, v6);
                assert!(tcp_checksum_ok(&p));
                assert!(mss_clamp_needed(&p, max4, max6));
                assert!(clamp_tcp_mss(&mut p, max4, max6));
                assert!(
                    tcp_checksum_ok(&p),
                    "checksum after clamp {options:?} v6={v6}"
                );
                assert!(!mss_clamp_needed(&p, max4, max6));
                assert!(!clamp_tcp_mss(&mut p, max4, max6), "idempotent");
                let (_, at) = syn_mss_offsets(&p).unwrap();
                let mss = u16::from_be_bytes([p[at], p[at + 1]]);
                assert_eq!(mss, if v6 { max6 } else { max4 });
            }
        }
    }

    #[test]
    fn small_mss_and_non_syn_are_untouched() {
        let mut p = tcp_syn("10.77.0.2", "1.1.1.1", &[2, 4, 0x02, 0x00], false);
        let before = p.clone();
        assert!(!clamp_tcp_mss(&mut p, 1112, 1092));
        assert_eq!(p, before);
        let mut p = tcp_syn("10.77.0.2", "1.1.1.1", &[2, 4, 0x05, 0xb4], false);
        p[20 + 13] = 0x10; // ACK only
        assert!(!clamp_tcp_mss(&mut p, 1112, 1092));
        // Garbage options must not panic.
        let mut p = tcp_syn("10.77.0.2", "1.1.1.1", &[2, 40, 0x05, 0xb4], false);
        assert!(!clamp_tcp_mss(&mut p, 1112, 1092));
        let mut p = tcp_syn("10.77.0.2", "1.1.1.1", &[7, 0, 0, 0], false);
        assert!(!clamp_tcp_mss(&mut p, 1112, 1092));
    }

    #[test]
    fn frag_needed_is_well_formed() {
        let original = ipv4_packet("1.1.1.1", "10.77.0.2", 17, &[0xab; 1400]);
        let gw = Ipv4Addr::new(10, 77, 0, 1);
        let icmp = icmp_frag_needed(&original, gw, 1152).unwrap();
        assert_eq!(icmp.len(), 20 + 8 + 28);
        assert_eq!(internet_checksum(&icmp[..20]), 0, "IP header checksum");
        assert_eq!(internet_checksum(&icmp[20..]), 0, "ICMP checksum");
        assert_eq!(&icmp[12..16], &[10, 77, 0, 1]);
        assert_eq!(&icmp[16..20], &[1, 1, 1, 1]);
        assert_eq!(&icmp[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1152);
        assert_eq!(&icmp[28..56], &original[..28]);
        // The reply is itself a valid packet (as the client-side classifier sees it).
        assert!(classify_from_client(&icmp, &[ip("10.77.0.1")]).is_ok());

        // No error about an ICMP error, nor about a non-first fragment.
        assert!(icmp_frag_needed(&icmp, gw, 1152).is_none());
        let mut fragment = original;
        fragment[7] = 1;
        assert!(icmp_frag_needed(&fragment, gw, 1152).is_none());
    }
}
