//! Error types, one per operation.

use std::net::SocketAddr;

/// Why a packet handed to [`Stack::handle_packet`](crate::Stack::handle_packet) was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The receive queue is full; the packet was dropped and counted.
    #[error("receive queue full")]
    QueueFull,
    /// The packet is larger than the link MTU.
    #[error("packet of {len} bytes exceeds the link MTU of {mtu}")]
    TooLarge {
        /// Packet length.
        len: usize,
        /// The stack's MTU.
        mtu: usize,
    },
    /// Zero-length packet.
    #[error("empty packet")]
    Empty,
    /// A link-repair frame (PROTOCOL.md §3.1) that does not parse.
    #[error("bad link-repair frame: {0}")]
    Frame(#[from] crate::link_repair::FrameError),
}

/// Why a TCP connection could not be started or did not get established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The session has no address of the destination's family.
    #[error("no local address for {0}")]
    NoRoute(SocketAddr),
    /// The destination is not a unicast address, or the port is 0.
    #[error("invalid destination {0}")]
    InvalidDestination(SocketAddr),
    /// Every ephemeral port is in use.
    #[error("no free local port")]
    NoFreePort,
    /// The peer answered with a reset.
    #[error("connection refused")]
    Refused,
    /// No answer within the connection timeout.
    #[error("connection timed out")]
    TimedOut,
    /// The gateway (or a router) answered with ICMP "communication administratively
    /// prohibited": its egress policy refuses the destination.
    #[error("connection prohibited by the gateway's policy")]
    Prohibited,
    /// The host name could not be resolved.
    #[error("could not resolve {name}: {reason}")]
    Resolve {
        /// The name asked for.
        name: String,
        /// Why it failed.
        reason: DnsError,
    },
}

/// Why a listener could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    /// Another listener holds the port.
    #[error("port {0} already in use")]
    AddrInUse(u16),
    /// Every ephemeral port is in use.
    #[error("no free local port")]
    NoFreePort,
}

/// Errors of reads and writes on a TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    /// Nothing to read, or no room to write, right now; wait for the matching event.
    #[error("operation would block")]
    WouldBlock,
    /// The handle does not name a live connection.
    #[error("invalid handle")]
    InvalidHandle,
    /// The connection is not (yet, or any more) in a state that allows this.
    #[error("not connected")]
    NotConnected,
    /// The peer reset the connection.
    #[error("connection reset by peer")]
    Reset,
    /// This side already closed its sending half.
    #[error("sending half already closed")]
    WriteClosed,
    /// The connection failed to establish.
    #[error(transparent)]
    Connect(#[from] ConnectError),
}

/// Errors of UDP operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UdpError {
    /// The send buffer is full or nothing is queued to read; wait for the matching event.
    #[error("operation would block")]
    WouldBlock,
    /// The handle does not name a live socket.
    #[error("invalid handle")]
    InvalidHandle,
    /// Another socket holds the port.
    #[error("port {0} already in use")]
    AddrInUse(u16),
    /// Every ephemeral port is in use.
    #[error("no free local port")]
    NoFreePort,
    /// The session has no address of the destination's family, or the destination is invalid.
    #[error("cannot send to {0}")]
    Unaddressable(SocketAddr),
    /// The datagram does not fit the socket's buffer.
    #[error("datagram of {0} bytes is too large")]
    TooLarge(usize),
    /// The caller's buffer is smaller than the next datagram, which stays queued.
    #[error("datagram of {needed} bytes does not fit the buffer")]
    Truncated {
        /// Size of the queued datagram.
        needed: usize,
    },
    /// `send` on a socket that was never connected.
    #[error("socket not connected")]
    NotConnected,
}

/// Errors of DNS lookups.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The gateway announced no resolver.
    #[error("no DNS server configured")]
    NoServers,
    /// The name is not a valid DNS name.
    #[error("invalid name")]
    InvalidName,
    /// Too many lookups in flight.
    #[error("too many lookups in flight")]
    TooManyQueries,
    /// The resolver did not answer, or answered with no address.
    #[error("lookup failed")]
    Failed,
    /// The handle does not name a lookup.
    #[error("invalid handle")]
    InvalidHandle,
}
