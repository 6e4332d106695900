//! The webnic wire protocol: control capsules and the datagram header.
//!
//! A webnic session is one WebTransport session on [`SESSION_PATH`]. IP packets travel as
//! WebTransport datagrams, one packet per datagram with no framing of webnic's own. Control
//! messages travel as capsules (RFC 9297 framing: type varint, length varint, value) on the first
//! bidirectional stream, which the client opens and starts with [`ControlMessage::ClientHello`].
//! `docs/PROTOCOL.md` is the normative description; this module is its codec.
//!
//! Where RFC 9484 (CONNECT-IP) already defines a capsule, webnic reuses its type and encoding:
//! `ADDRESS_ASSIGN` and `ROUTE_ADVERTISEMENT`. webnic's own capsules live in a private range
//! ([`capsule_type`]).
//!
//! Every parser here takes peer-controlled bytes: it returns [`ProtocolError`] instead of
//! panicking, and the fuzz target `fuzz/fuzz_targets/control.rs` holds it to that.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The HTTP path of the WebTransport session.
pub const SESSION_PATH: &str = "/webnic";

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Capsule type numbers.
pub mod capsule_type {
    /// RFC 9484 ADDRESS_ASSIGN.
    pub const ADDRESS_ASSIGN: u64 = 0x01;
    /// RFC 9484 ADDRESS_REQUEST (parsed and ignored: the gateway assigns addresses itself).
    pub const ADDRESS_REQUEST: u64 = 0x02;
    /// RFC 9484 ROUTE_ADVERTISEMENT.
    pub const ROUTE_ADVERTISEMENT: u64 = 0x03;
    /// webnic: client hello (protocol version).
    pub const CLIENT_HELLO: u64 = 0x1a77_6e00;
    /// webnic: server hello (protocol version).
    pub const SERVER_HELLO: u64 = 0x1a77_6e01;
    /// webnic: link MTU of the session.
    pub const LINK_MTU: u64 = 0x1a77_6e02;
    /// webnic: DNS resolvers reachable through the session.
    pub const DNS_SERVERS: u64 = 0x1a77_6e03;
    /// webnic: the reason the session is about to close.
    pub const CLOSE: u64 = 0x1a77_6e04;
    /// webnic: a session resumption ticket (gateway → client), sent before ADDRESS_ASSIGN.
    pub const SESSION_TICKET: u64 = 0x1a77_6e05;
    /// webnic: the gateway is draining; the session will be closed within a deadline.
    pub const DRAINING: u64 = 0x1a77_6e06;
    /// LINK_REPAIR: client → gateway asks for sequenced datagrams and resends (PROTOCOL.md §3.1).
    pub const LINK_REPAIR: u64 = 0x1a77_6e07;
    /// LINK_STREAM: client → gateway asks for its packets on a unidirectional stream
    /// (PROTOCOL.md §3.2).
    pub const LINK_STREAM: u64 = 0x1a77_6e08;
}

/// Bounds of a session ticket's length in bytes.
pub const SESSION_TICKET_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// The largest control capsule value either side accepts, so a peer cannot make us buffer
/// without bound.
pub const MAX_CAPSULE_VALUE: usize = 16 * 1024;

/// Why a control message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes ended inside a field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A capsule announced a value larger than [`MAX_CAPSULE_VALUE`].
    #[error("capsule of {0} bytes exceeds the limit")]
    CapsuleTooLarge(u64),
    /// A field held a value the protocol does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// A known capsule had bytes left over after its last field.
    #[error("trailing bytes in {0}")]
    Trailing(&'static str),
}

/// Why a session ended, as carried in the WebTransport close code and the `CLOSE` capsule.
///
/// The numbers are part of the protocol: never renumber, only add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// Either side ended the session on purpose.
    Normal,
    /// The gateway is shutting down.
    GatewayShutdown,
    /// The gateway's address pool has no free address.
    PoolExhausted,
    /// The client speaks a protocol version the gateway does not.
    UnsupportedVersion,
    /// The peer broke the protocol (bad capsule, wrong order).
    ProtocolViolation,
    /// The session was idle for too long.
    IdleTimeout,
    /// The gateway refused the session by policy.
    Refused,
    /// The gateway requires a token and the request carried none.
    TokenMissing,
    /// The token is malformed, or its signature does not verify with the gateway's key.
    TokenInvalid,
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token's `nbf` is still in the future.
    TokenNotYetValid,
    /// The client's IP address already has as many sessions as the gateway allows.
    TooManySessionsPerAddress,
    /// The token's subject already has as many sessions as allowed (gateway cap or the token's
    /// own `max_sessions`).
    TooManySessionsPerSubject,
    /// The gateway has as many sessions as it allows in total.
    TooManySessions,
    /// New sessions arrive faster than the gateway's rate limit.
    RateLimited,
    /// The session reached the gateway's maximum session lifetime.
    MaxLifetime,
    /// A code this version does not know.
    Other(u32),
}

impl CloseCode {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            Self::Normal => 0,
            Self::GatewayShutdown => 1,
            Self::PoolExhausted => 2,
            Self::UnsupportedVersion => 3,
            Self::ProtocolViolation => 4,
            Self::IdleTimeout => 5,
            Self::Refused => 6,
            Self::TokenMissing => 7,
            Self::TokenInvalid => 8,
            Self::TokenExpired => 9,
            Self::TokenNotYetValid => 10,
            Self::TooManySessionsPerAddress => 11,
            Self::TooManySessionsPerSubject => 12,
            Self::TooManySessions => 13,
            Self::RateLimited => 14,
            Self::MaxLifetime => 15,
            Self::Other(code) => code,
        }
    }

    /// Decodes a wire value; unknown values are kept as [`CloseCode::Other`].
    pub fn from_u32(code: u32) -> Self {
        match code {
            0 => Self::Normal,
            1 => Self::GatewayShutdown,
            2 => Self::PoolExhausted,
            3 => Self::UnsupportedVersion,
            4 => Self::ProtocolViolation,
            5 => Self::IdleTimeout,
            6 => Self::Refused,
            7 => Self::TokenMissing,
            8 => Self::TokenInvalid,
            9 => Self::TokenExpired,
            10 => Self::TokenNotYetValid,
            11 => Self::TooManySessionsPerAddress,
            12 => Self::TooManySessionsPerSubject,
            13 => Self::TooManySessions,
            14 => Self::RateLimited,
            15 => Self::MaxLifetime,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Normal => f.write_str("normal close"),
            Self::GatewayShutdown => f.write_str("gateway shutting down"),
            Self::PoolExhausted => f.write_str("address pool exhausted"),
            Self::UnsupportedVersion => f.write_str("unsupported protocol version"),
            Self::ProtocolViolation => f.write_str("protocol violation"),
            Self::IdleTimeout => f.write_str("idle timeout"),
            Self::Refused => f.write_str("refused by policy"),
            Self::TokenMissing => f.write_str("token required"),
            Self::TokenInvalid => f.write_str("invalid token"),
            Self::TokenExpired => f.write_str("token expired"),
            Self::TokenNotYetValid => f.write_str("token not yet valid"),
            Self::TooManySessionsPerAddress => f.write_str("too many sessions from this address"),
            Self::TooManySessionsPerSubject => f.write_str("too many sessions for this token"),
            Self::TooManySessions => f.write_str("too many sessions on the gateway"),
            Self::RateLimited => f.write_str("new sessions rate-limited"),
            Self::MaxLifetime => f.write_str("maximum session lifetime reached"),
            Self::Other(code) => write!(f, "close code {code}"),
        }
    }
}

/// One address of RFC 9484 ADDRESS_ASSIGN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignedAddress {
    /// The ADDRESS_REQUEST this answers; 0 when unsolicited.
    pub request_id: u64,
    /// The address.
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// One range of RFC 9484 ROUTE_ADVERTISEMENT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRange {
    /// First address of the range.
    pub start: IpAddr,
    /// Last address of the range (same family as `start`).
    pub end: IpAddr,
    /// IP protocol number, 0 for all.
    pub protocol: u8,
}

/// A decoded control capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// First capsule from the client.
    ClientHello {
        /// The protocol version the client speaks.
        version: u32,
    },
    /// First capsule from the gateway.
    ServerHello {
        /// The protocol version the gateway chose.
        version: u32,
    },
    /// RFC 9484 ADDRESS_ASSIGN: the session's addresses. The gateway sends it last in its
    /// initial burst, so a client may treat it as "configuration complete".
    AddressAssign(Vec<AssignedAddress>),
    /// RFC 9484 ROUTE_ADVERTISEMENT: the destinations reachable through the session.
    RouteAdvertisement(Vec<RouteRange>),
    /// The link MTU: the largest IP packet either side may put in one datagram.
    LinkMtu(u16),
    /// DNS resolvers to use through the session.
    DnsServers(Vec<IpAddr>),
    /// A secret the client presents (`?resume=` + hex in the URL) when it reconnects after losing
    /// the connection, to get the same addresses back while the gateway still holds them.
    SessionTicket(Vec<u8>),
    /// The gateway is draining (it admits no new sessions and will close this one within
    /// `seconds`): a client should finish or move its work.
    Draining {
        /// Seconds until the gateway closes the session at the latest.
        seconds: u32,
    },
    /// Link repair (PROTOCOL.md §3.1), client → gateway: "sequence your datagrams to me and
    /// resend the ones I report missing".
    LinkRepair,
    /// Stream link (PROTOCOL.md §3.2), client → gateway: "send my packets on a unidirectional
    /// stream instead of datagrams".
    LinkStream {
        /// The largest IP packet the client takes on the stream; 0 (or absent on the wire):
        /// the link MTU. Larger lets the gateway pass coalesced TCP packets on whole.
        max_packet: u16,
    },
    /// Sent just before the session closes, saying why.
    Close {
        /// Why.
        code: CloseCode,
        /// Human-readable detail.
        reason: String,
    },
    /// A capsule type this version does not know; RFC 9297 says to skip it.
    Unknown {
        /// The capsule type.
        capsule_type: u64,
    },
}

impl ControlMessage {
    /// Decodes one capsule's value.
    ///
    /// # Errors
    /// [`ProtocolError`] when a known capsule's value is malformed.
    pub fn parse(capsule_type: u64, value: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(value);
        let message = match capsule_type {
            capsule_type::CLIENT_HELLO => Self::ClientHello {
                version: r.varint_u32("version")?,
            },
            capsule_type::SERVER_HELLO => Self::ServerHello {
                version: r.varint_u32("version")?,
            },
            capsule_type::ADDRESS_ASSIGN => {
                let mut addresses = Vec::new();
                while !r.is_empty() {
                    let request_id = r.varint("request id")?;
                    let address = r.ip_address()?;
                    let prefix_len = r.u8("prefix length")?;
                    if prefix_len > max_prefix(address) {
                        return Err(ProtocolError::Invalid("prefix length"));
                    }
                    addresses.push(AssignedAddress {
                        request_id,
                        address,
                        prefix_len,
                    });
                }
                Self::AddressAssign(addresses)
            }
            capsule_type::ROUTE_ADVERTISEMENT => {
                let mut ranges = Vec::new();
                while !r.is_empty() {
                    let version = r.u8("ip version")?;
                    let start = r.ip_of_version(version)?;
                    let end = r.ip_of_version(version)?;
                    let protocol = r.u8("ip protocol")?;
                    if start > end {
                        return Err(ProtocolError::Invalid("route range"));
                    }
                    ranges.push(RouteRange {
                        start,
                        end,
                        protocol,
                    });
                }
                Self::RouteAdvertisement(ranges)
            }
            capsule_type::LINK_MTU => {
                let mtu = r.varint("mtu")?;
                // 68 is the IPv4 minimum link MTU (RFC 791).
                let mtu = u16::try_from(mtu)
                    .ok()
                    .filter(|mtu| *mtu >= 68)
                    .ok_or(ProtocolError::Invalid("mtu"))?;
                Self::LinkMtu(mtu)
            }
            capsule_type::DNS_SERVERS => {
                let mut servers = Vec::new();
                while !r.is_empty() {
                    servers.push(r.ip_address()?);
                }
                Self::DnsServers(servers)
            }
            capsule_type::SESSION_TICKET => {
                let ticket = r.rest().to_vec();
                if !SESSION_TICKET_LEN.contains(&ticket.len()) {
                    return Err(ProtocolError::Invalid("session ticket length"));
                }
                Self::SessionTicket(ticket)
            }
            capsule_type::DRAINING => Self::Draining {
                seconds: r.varint_u32("drain seconds")?,
            },
            capsule_type::LINK_REPAIR => Self::LinkRepair,
            capsule_type::LINK_STREAM => Self::LinkStream {
                max_packet: if r.is_empty() {
                    0
                } else {
                    // A larger value than a frame can carry means "as large as frames go".
                    u16::try_from(r.varint("max packet")?).unwrap_or(u16::MAX)
                },
            },
            capsule_type::CLOSE => {
                let code = CloseCode::from_u32(r.varint_u32("close code")?);
                let reason = std::str::from_utf8(r.rest())
                    .map_err(|_| ProtocolError::Invalid("close reason"))?
                    .to_owned();
                Self::Close { code, reason }
            }
            other => {
                return Ok(Self::Unknown {
                    capsule_type: other,
                });
            }
        };
        if !r.is_empty() {
            return Err(ProtocolError::Trailing("capsule"));
        }
        Ok(message)
    }

    /// The capsule type this message is sent as.
    pub fn capsule_type(&self) -> u64 {
        match self {
            Self::ClientHello { .. } => capsule_type::CLIENT_HELLO,
            Self::ServerHello { .. } => capsule_type::SERVER_HELLO,
            Self::AddressAssign(_) => capsule_type::ADDRESS_ASSIGN,
            Self::RouteAdvertisement(_) => capsule_type::ROUTE_ADVERTISEMENT,
            Self::LinkMtu(_) => capsule_type::LINK_MTU,
            Self::DnsServers(_) => capsule_type::DNS_SERVERS,
            Self::Close { .. } => capsule_type::CLOSE,
            Self::SessionTicket(_) => capsule_type::SESSION_TICKET,
            Self::Draining { .. } => capsule_type::DRAINING,
            Self::LinkRepair => capsule_type::LINK_REPAIR,
            Self::LinkStream { .. } => capsule_type::LINK_STREAM,
            Self::Unknown { capsule_type } => *capsule_type,
        }
    }

    /// Appends the whole capsule (type, length, value) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let mut value = Vec::new();
        match self {
            Self::ClientHello { version } | Self::ServerHello { version } => {
                put_varint(&mut value, u64::from(*version));
            }
            Self::AddressAssign(addresses) => {
                for a in addresses {
                    put_varint(&mut value, a.request_id);
                    put_ip_with_version(&mut value, a.address);
                    value.push(a.prefix_len);
                }
            }
            Self::RouteAdvertisement(ranges) => {
                for range in ranges {
                    put_ip_with_version(&mut value, range.start);
                    put_ip(&mut value, range.end);
                    value.push(range.protocol);
                }
            }
            Self::LinkMtu(mtu) => put_varint(&mut value, u64::from(*mtu)),
            Self::DnsServers(servers) => {
                for server in servers {
                    put_ip_with_version(&mut value, *server);
                }
            }
            Self::Close { code, reason } => {
                put_varint(&mut value, u64::from(code.to_u32()));
                value.extend_from_slice(reason.as_bytes());
            }
            Self::SessionTicket(ticket) => value.extend_from_slice(ticket),
            Self::Draining { seconds } => put_varint(&mut value, u64::from(*seconds)),
            Self::LinkStream { max_packet } => {
                if *max_packet != 0 {
                    put_varint(&mut value, u64::from(*max_packet));
                }
            }
            Self::LinkRepair | Self::Unknown { .. } => {}
        }
        put_varint(out, self.capsule_type());
        put_varint(out, value.len() as u64);
        out.extend_from_slice(&value);
    }
}

/// Splits a byte stream into capsules.
///
/// Feed it whatever the stream delivered with [`CapsuleDecoder::extend`], then take complete
/// messages with [`CapsuleDecoder::next_message`] until it returns `Ok(None)`.
#[derive(Debug, Default)]
pub struct CapsuleDecoder {
    buffer: Vec<u8>,
}

impl CapsuleDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the control stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a complete capsule.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// [`ProtocolError`] if the stream is malformed; the stream is then unusable.
    pub fn next_message(&mut self) -> Result<Option<ControlMessage>, ProtocolError> {
        let mut r = Reader::new(&self.buffer);
        let Ok(capsule_type) = r.varint("capsule type") else {
            return Ok(None);
        };
        let Ok(len) = r.varint("capsule length") else {
            return Ok(None);
        };
        if len > MAX_CAPSULE_VALUE as u64 {
            return Err(ProtocolError::CapsuleTooLarge(len));
        }
        let header = self.buffer.len() - r.rest_len();
        let end = header + len as usize;
        if self.buffer.len() < end {
            return Ok(None);
        }
        let message = ControlMessage::parse(capsule_type, &self.buffer[header..end]);
        self.buffer.drain(..end);
        message.map(Some)
    }
}

/// The HTTP/3 datagram header for a WebTransport session: the quarter stream ID (RFC 9297).
///
/// Returns the header bytes and their length. Drivers that send through quinn directly (to get
/// `send_datagram_wait` backpressure) prepend it to each IP packet.
pub fn datagram_header(session_stream_id: u64) -> ([u8; 8], usize) {
    let mut header = Vec::with_capacity(8);
    put_varint(&mut header, session_stream_id / 4);
    let mut out = [0u8; 8];
    out[..header.len()].copy_from_slice(&header);
    (out, header.len())
}

/// Appends a QUIC variable-length integer (RFC 9000 §16).
///
/// # Panics
/// If `value` is 2^62 or more, which no caller in this crate produces.
pub fn put_varint(out: &mut Vec<u8>, value: u64) {
    if value < 1 << 6 {
        out.push(value as u8);
    } else if value < 1 << 14 {
        out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes());
    } else if value < 1 << 30 {
        out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes());
    } else {
        assert!(value < 1 << 62, "varint out of range");
        out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// Reads a QUIC varint from the front of `bytes`: the value and how many bytes it took.
pub fn get_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let raw = bytes.get(..len)?;
    let mut value = u64::from(first & 0x3f);
    for byte in &raw[1..] {
        value = (value << 8) | u64::from(*byte);
    }
    Some((value, len))
}

fn max_prefix(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn put_ip(out: &mut Vec<u8>, address: IpAddr) {
    match address {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn put_ip_with_version(out: &mut Vec<u8>, address: IpAddr) {
    out.push(if address.is_ipv4() { 4 } else { 6 });
    put_ip(out, address);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn rest_len(&self) -> usize {
        self.bytes.len()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.bytes.len() < n {
            return Err(ProtocolError::Truncated(what));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        let (value, len) = get_varint(self.bytes).ok_or(ProtocolError::Truncated(what))?;
        self.bytes = &self.bytes[len..];
        Ok(value)
    }

    fn varint_u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        u32::try_from(self.varint(what)?).map_err(|_| ProtocolError::Invalid(what))
    }

    fn ip_of_version(&mut self, version: u8) -> Result<IpAddr, ProtocolError> {
        match version {
            4 => {
                let b: [u8; 4] = self.take(4, "ipv4 address")?.try_into().expect("4 bytes");
                Ok(IpAddr::V4(Ipv4Addr::from(b)))
            }
            6 => {
                let b: [u8; 16] = self.take(16, "ipv6 address")?.try_into().expect("16 bytes");
                Ok(IpAddr::V6(Ipv6Addr::from(b)))
            }
            _ => Err(ProtocolError::Invalid("ip version")),
        }
    }

    fn ip_address(&mut self) -> Result<IpAddr, ProtocolError> {
        let version = self.u8("ip version")?;
        self.ip_of_version(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(message: ControlMessage) {
        let mut wire = Vec::new();
        message.emit(&mut wire);
        let mut decoder = CapsuleDecoder::new();
        // Feed byte by byte: a stream may split a capsule anywhere.
        for (i, byte) in wire.iter().enumerate() {
            decoder.extend(&[*byte]);
            let got = decoder.next_message().unwrap();
            if i + 1 < wire.len() {
                assert_eq!(got, None, "complete before byte {i}");
            } else {
                assert_eq!(got, Some(message.clone()));
            }
        }
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn session_tickets_have_bounded_length() {
        for len in [0, 15, 65] {
            let mut wire = Vec::new();
            put_varint(&mut wire, capsule_type::SESSION_TICKET);
            put_varint(&mut wire, len as u64);
            wire.resize(wire.len() + len, 7);
            let mut decoder = CapsuleDecoder::new();
            decoder.extend(&wire);
            assert_eq!(
                decoder.next_message(),
                Err(ProtocolError::Invalid("session ticket length")),
                "{len}-byte ticket"
            );
        }
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(ControlMessage::ClientHello { version: 1 });
        roundtrip(ControlMessage::ServerHello { version: 70_000 });
        roundtrip(ControlMessage::SessionTicket((0..32).collect()));
        roundtrip(ControlMessage::Draining { seconds: 30 });
        roundtrip(ControlMessage::LinkRepair);
        roundtrip(ControlMessage::LinkStream { max_packet: 0 });
        roundtrip(ControlMessage::LinkStream { max_packet: 65_535 });
        // The value is optional (session 8's clients send none); too large means the most.
        assert_eq!(
            ControlMessage::parse(capsule_type::LINK_STREAM, &[]).unwrap(),
            ControlMessage::LinkStream { max_packet: 0 }
        );
        assert_eq!(
            ControlMessage::parse(capsule_type::LINK_STREAM, &[0x80, 0x01, 0x00, 0x00]).unwrap(),
            ControlMessage::LinkStream { max_packet: 65_535 }
        );
        roundtrip(ControlMessage::AddressAssign(vec![
            AssignedAddress {
                request_id: 0,
                address: "10.77.0.2".parse().unwrap(),
                prefix_len: 32,
            },
            AssignedAddress {
                request_id: 7,
                address: "fd00:77::2".parse().unwrap(),
                prefix_len: 128,
            },
        ]));
        roundtrip(ControlMessage::RouteAdvertisement(vec![RouteRange {
            start: "0.0.0.0".parse().unwrap(),
            end: "255.255.255.255".parse().unwrap(),
            protocol: 0,
        }]));
        roundtrip(ControlMessage::LinkMtu(1152));
        roundtrip(ControlMessage::DnsServers(vec![
            "10.0.0.53".parse().unwrap(),
            "fd00::53".parse().unwrap(),
        ]));
        roundtrip(ControlMessage::Close {
            code: CloseCode::PoolExhausted,
            reason: "no free address".into(),
        });
    }

    #[test]
    fn address_assign_matches_rfc9484_bytes() {
        // Type 0x01, length 7, request id 0, version 4, 10.0.0.2, prefix 32.
        let mut wire = Vec::new();
        ControlMessage::AddressAssign(vec![AssignedAddress {
            request_id: 0,
            address: "10.0.0.2".parse().unwrap(),
            prefix_len: 32,
        }])
        .emit(&mut wire);
        assert_eq!(wire, [0x01, 7, 0, 4, 10, 0, 0, 2, 32]);
    }

    #[test]
    fn varints_match_rfc9000_examples() {
        for (value, bytes) in [
            (37u64, &[0x25u8][..]),
            (15_293, &[0x7b, 0xbd]),
            (494_878_333, &[0x9d, 0x7f, 0x3e, 0x7d]),
            (
                151_288_809_941_952_652,
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
            ),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, bytes);
            assert_eq!(get_varint(bytes), Some((value, bytes.len())));
        }
    }

    #[test]
    fn webnic_capsule_types_are_not_grease() {
        // RFC 9297 reserves 0x29 * N + 0x17 for greasing.
        for t in [
            capsule_type::CLIENT_HELLO,
            capsule_type::SERVER_HELLO,
            capsule_type::LINK_MTU,
            capsule_type::DNS_SERVERS,
            capsule_type::CLOSE,
            capsule_type::SESSION_TICKET,
            capsule_type::DRAINING,
            capsule_type::LINK_REPAIR,
            capsule_type::LINK_STREAM,
        ] {
            assert_ne!((t.wrapping_sub(0x17)) % 0x29, 0, "{t:#x} is a grease value");
        }
    }

    #[test]
    fn malformed_capsules_are_errors_not_panics() {
        let cases: &[(u64, &[u8])] = &[
            (capsule_type::ADDRESS_ASSIGN, &[0, 5, 1, 2]),
            (capsule_type::ADDRESS_ASSIGN, &[0, 4, 10, 0, 0, 2, 33]),
            (
                capsule_type::ROUTE_ADVERTISEMENT,
                &[4, 10, 0, 0, 9, 10, 0, 0, 1, 0],
            ),
            (capsule_type::LINK_MTU, &[10]),
            (capsule_type::CLIENT_HELLO, &[1, 2]),
            (capsule_type::CLOSE, &[0, 0xff]),
        ];
        for (t, value) in cases {
            assert!(
                ControlMessage::parse(*t, value).is_err(),
                "{t:#x} {value:?}"
            );
        }
    }

    #[test]
    fn unknown_capsules_are_skipped() {
        let mut wire = vec![0x21, 3, 9, 9, 9];
        ControlMessage::LinkMtu(1200).emit(&mut wire);
        let mut decoder = CapsuleDecoder::new();
        decoder.extend(&wire);
        assert_eq!(
            decoder.next_message().unwrap(),
            Some(ControlMessage::Unknown { capsule_type: 0x21 })
        );
        assert_eq!(
            decoder.next_message().unwrap(),
            Some(ControlMessage::LinkMtu(1200))
        );
    }

    #[test]
    fn oversized_capsule_is_refused_before_buffering() {
        let mut wire = Vec::new();
        put_varint(&mut wire, capsule_type::DNS_SERVERS);
        put_varint(&mut wire, 1 << 20);
        let mut decoder = CapsuleDecoder::new();
        decoder.extend(&wire);
        assert_eq!(
            decoder.next_message(),
            Err(ProtocolError::CapsuleTooLarge(1 << 20))
        );
    }

    /// The fuzz target's property on seeded random input, so CI (stable Rust, no libFuzzer)
    /// exercises it on every run: decode, re-encode, decode again, never panic.
    #[test]
    fn random_streams_decode_without_panicking() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let known = [0x01u8, 0x02, 0x03];
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias towards known capsule types with plausible lengths.
            if let Some(first) = bytes.first_mut() {
                *first = known[(next() % 3) as usize];
            }
            if bytes.len() > 1 {
                bytes[1] = (bytes.len() - 2) as u8 & 0x3f;
            }
            let mut decoder = CapsuleDecoder::new();
            decoder.extend(&bytes);
            while let Ok(Some(message)) = decoder.next_message() {
                let mut wire = Vec::new();
                message.emit(&mut wire);
                let mut again = CapsuleDecoder::new();
                again.extend(&wire);
                assert_eq!(again.next_message(), Ok(Some(message)));
            }
        }
    }

    #[test]
    fn datagram_header_is_quarter_stream_id() {
        assert_eq!(datagram_header(0), ([0; 8], 1));
        let (h, n) = datagram_header(4 * 100);
        assert_eq!(&h[..n], &[0x40, 100]);
    }

    #[test]
    fn close_codes_roundtrip_and_never_renumber() {
        for n in 0..=15 {
            let code = CloseCode::from_u32(n);
            assert!(!matches!(code, CloseCode::Other(_)), "{n} is known");
            assert_eq!(code.to_u32(), n);
        }
        assert_eq!(CloseCode::TokenExpired.to_u32(), 9);
        assert_eq!(CloseCode::MaxLifetime.to_u32(), 15);
        assert_eq!(CloseCode::from_u32(16), CloseCode::Other(16));
    }
}
