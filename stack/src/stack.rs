//! [`Stack`]: smoltcp behind a quinn-proto-style polling contract.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::socket::{dns, tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    DnsQueryType, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint,
};

use crate::device::QueueDevice;
use crate::error::{ConnectError, DnsError, ListenError, PacketError, TcpError, UdpError};
use crate::link_repair::{self, Accepted, LinkReceiver, LinkStats};
use crate::link_stream::{self, Deframer, StreamFrameError};
use crate::recv_window::RecvWindow;

/// First port of the ephemeral range (RFC 6335).
const EPHEMERAL_FIRST: u16 = 49152;
/// How long a released connection may take to finish closing before it is aborted.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(60);
/// How many DNS lookups may be in flight at once.
const DNS_QUERY_SLOTS: usize = 32;

/// How a [`Stack`] is set up. Built from what the gateway announced on the control stream.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Link MTU: the largest IP packet sent or accepted. TCP's MSS follows from it.
    pub mtu: usize,
    /// The session's IPv4 address, if it has one.
    pub ipv4: Option<Ipv4Addr>,
    /// The session's IPv6 address, if it has one.
    pub ipv6: Option<Ipv6Addr>,
    /// Resolvers for [`Stack::dns_query`] and host-name connects.
    pub dns_servers: Vec<IpAddr>,
    /// Seed for initial sequence numbers, ports and DNS ids. Pass fresh randomness each session.
    pub seed: u64,
    /// Packets [`Stack::handle_packet`] may queue before dropping.
    pub rx_queue_len: usize,
    /// Packets a [`Stack::poll`] may emit before the caller must drain [`Stack::poll_transmit`].
    pub tx_queue_len: usize,
    /// Received packets one [`Stack::poll`] processes at most.
    pub ingress_budget: usize,
    /// Receive window, in bytes, that the connections receiving at the same time share: a
    /// connection whose [`TcpOptions::recv_buffer_max`] lets it grow does so up to this divided
    /// by their number (never below its [`TcpOptions::recv_buffer`]).
    pub tcp_recv_budget: usize,
}

impl StackConfig {
    /// A configuration with the given MTU and seed, no addresses, and default queue sizes.
    pub fn new(mtu: usize, seed: u64) -> Self {
        Self {
            mtu,
            ipv4: None,
            ipv6: None,
            dns_servers: Vec::new(),
            seed,
            rx_queue_len: 1024,
            tx_queue_len: 256,
            ingress_budget: 256,
            // Measured (docs/PERFORMANCE.md): one flow through the stream link under 1% loss
            // needs about 2 MiB of window; eight flows of 256 KiB each (the same 2 MiB in
            // flight) keep within the gateway's session queue, and more collapses them.
            tcp_recv_budget: 2 * 1024 * 1024,
        }
    }
}

/// Per-connection TCP settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// Send buffer in bytes.
    pub send_buffer: usize,
    /// Receive buffer in bytes: the window a connection starts with.
    pub recv_buffer: usize,
    /// The receive buffer's largest size: while the connection receives in bulk its window
    /// doubles after each full window of data, up to this and to its share of
    /// [`StackConfig::tcp_recv_budget`]. It sets the window-scale factor. At most
    /// `recv_buffer`, the window stays fixed.
    pub recv_buffer_max: usize,
    /// Disable Nagle's algorithm.
    pub no_delay: bool,
    /// Send keep-alive probes after this much idle time.
    pub keep_alive: Option<Duration>,
    /// Abort an established connection when nothing arrives from the peer for this long
    /// (smoltcp's idle timeout: pair it with `keep_alive`, or idle connections die).
    pub timeout: Option<Duration>,
    /// Give up on a connection attempt (SYN unanswered) after this long.
    pub connect_timeout: Duration,
    /// The congestion controller.
    pub congestion: Congestion,
}

/// TCP congestion control algorithm of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), as Linux uses.
    Cubic,
    /// NewReno (RFC 5681).
    Reno,
    /// No congestion window: only the peer's receive window limits the sender.
    None,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            // 256 KiB gives window scale 2 and covers 2 Gbit/s at 1 ms RTT.
            send_buffer: 256 * 1024,
            recv_buffer: 256 * 1024,
            recv_buffer_max: 2 * 1024 * 1024,
            // Tunnelled request/response traffic suffers most from Nagle meeting the peer's
            // delayed ACK; applications that want coalescing can turn it back on.
            no_delay: true,
            keep_alive: None,
            timeout: None,
            connect_timeout: Duration::from_secs(30),
            // Cubic, as Linux servers use: it regrows the window quickly after the losses a
            // tunnel sees. Measured through the tunnel, Reno and no controller at all gave the
            // same upload goodput, so the choice follows the servers we talk to.
            congestion: Congestion::Cubic,
        }
    }
}

/// Per-socket UDP settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpOptions {
    /// Datagrams the receive queue holds.
    pub recv_packets: usize,
    /// Payload bytes the receive queue holds.
    pub recv_buffer: usize,
    /// Datagrams the send queue holds.
    pub send_packets: usize,
    /// Payload bytes the send queue holds.
    pub send_buffer: usize,
}

impl Default for UdpOptions {
    fn default() -> Self {
        Self {
            recv_packets: 256,
            recv_buffer: 256 * 1024,
            send_packets: 256,
            send_buffer: 256 * 1024,
        }
    }
}

/// A TCP connection of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpHandle(u32);
/// A TCP listener of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerHandle(u32);
/// A UDP socket of the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpHandle(u32);
/// A DNS lookup in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsHandle(u32);

/// The DNS record type of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsKind {
    /// IPv4 addresses.
    A,
    /// IPv6 addresses.
    Aaaa,
}

/// Something that happened inside the stack, returned by [`Stack::poll_event`].
///
/// Readiness events are edge-triggered, like `EPOLLET`: `TcpReadable` is reported once, and again
/// only after a read returned [`TcpError::WouldBlock`]; the same holds for writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An outgoing connection was established.
    TcpConnected(TcpHandle),
    /// An outgoing connection failed (refused, timed out, name not resolved).
    TcpConnectFailed(TcpHandle, ConnectError),
    /// Data (or the peer's FIN, seen as a zero-length read) can be read.
    TcpReadable(TcpHandle),
    /// The send buffer has room.
    TcpWritable(TcpHandle),
    /// The peer reset an established connection.
    TcpReset(TcpHandle),
    /// The connection is fully closed; the handle can be released.
    TcpClosed(TcpHandle),
    /// A listener has a connection to accept.
    Accept(ListenerHandle),
    /// A UDP socket has a datagram to read.
    UdpReadable(UdpHandle),
    /// A UDP socket's send queue has room.
    UdpWritable(UdpHandle),
    /// A DNS lookup finished; fetch it with [`Stack::dns_result`].
    DnsDone(DnsHandle),
}

/// Counters of the stack, for statistics UIs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Packets accepted by `handle_packet`.
    pub packets_received: u64,
    /// Bytes accepted by `handle_packet`.
    pub bytes_received: u64,
    /// Packets handed out by `poll_transmit`.
    pub packets_sent: u64,
    /// Bytes handed out by `poll_transmit`.
    pub bytes_sent: u64,
    /// Packets dropped because the receive queue was full.
    pub dropped_queue_full: u64,
    /// Packets dropped for exceeding the MTU.
    pub dropped_too_large: u64,
    /// Datagrams dropped by a connected UDP socket because they came from another peer.
    pub udp_dropped_foreign: u64,
    /// SYNs dropped because the listener's backlog was full (the peer retries, as with Linux).
    pub syn_dropped_backlog: u64,
    /// Connects failed at once by an ICMP "administratively prohibited" for their SYN.
    pub connects_prohibited: u64,
    /// Packets that arrived on the stream link (PROTOCOL.md §3.2).
    pub link_stream_packets: u64,
}

#[derive(Debug)]
enum TcpPhase {
    /// Waiting for the resolver before connecting.
    Resolving {
        name: String,
        query: Query,
        kind: DnsKind,
        /// Whether an empty A answer falls back to AAAA (not when the page asked for A only).
        fallback: bool,
        port: u16,
    },
    /// A smoltcp socket exists.
    Socket(SocketHandle),
    /// Failed before a socket existed.
    Failed,
}

#[derive(Debug)]
struct TcpEntry {
    phase: TcpPhase,
    options: TcpOptions,
    /// When the connect timeout started: the first poll after the connection was created. Not
    /// the creation itself: socket calls take no clock, and the stack's last known time can be
    /// minutes old when an idle stack gets a connect (every connect then timed out at once).
    started: Option<Instant>,
    established: bool,
    fin_received: bool,
    closed_locally: bool,
    outcome: Option<TcpError>,
    readable_reported: bool,
    writable_reported: bool,
    closed_reported: bool,
    released: bool,
    connect_timed_out: bool,
    /// An ICMP "administratively prohibited" answered our SYN.
    connect_prohibited: bool,
    local_port: Option<u16>,
    /// Bytes the application has read.
    bytes_read: u64,
    recv_window: RecvWindow,
    /// Since when the connection has been quiet (see [`Parked`]).
    quiet_since: Option<Instant>,
    /// While parked: when its first timer (keep-alive, idle timeout) is due.
    parked_until: Option<Instant>,
}

#[derive(Debug)]
struct ListenerEntry {
    port: u16,
    backlog: usize,
    options: TcpOptions,
    listening: Vec<SocketHandle>,
    embryonic: Vec<SocketHandle>,
    ready: VecDeque<SocketHandle>,
    accept_reported: bool,
}

#[derive(Debug)]
struct UdpEntry {
    socket: SocketHandle,
    port: u16,
    connected: Option<SocketAddr>,
    readable_reported: bool,
    writable_reported: bool,
}

#[derive(Debug)]
enum DnsEntry {
    Pending(Query),
    Done(Result<Vec<IpAddr>, DnsError>),
}

/// Packets link repair may hold ready beyond a full receive queue (what one repair releases at
/// most, twice over) before new ones are dropped.
const MAX_DEFERRED: usize = 4096;

/// A userspace TCP/IP stack with no I/O of its own.
///
/// # The polling contract
///
/// The caller owns time and I/O; the stack only reacts:
/// 1. [`handle_packet`](Self::handle_packet) for every IP packet received from the tunnel;
/// 2. after packets arrived, after any socket call, and when [`poll_timeout`](Self::poll_timeout)
///    expires: [`poll`](Self::poll);
/// 3. after every `poll`: drain [`poll_transmit`](Self::poll_transmit) until `None` (sending each
///    packet to the tunnel) and [`poll_event`](Self::poll_event) until `None`;
/// 4. then wait for the next packet, socket call or for `poll_timeout`.
///
/// Every call does a bounded amount of work: `poll` processes at most
/// [`StackConfig::ingress_budget`] received packets and emits at most
/// [`StackConfig::tx_queue_len`] packets; if more is pending, `poll_timeout` returns `now`.
pub struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    device: QueueDevice,
    config: StackConfig,
    now: Instant,
    dns_socket: SocketHandle,
    next_id: u32,
    next_ephemeral: u16,
    tcp: HashMap<u32, TcpEntry>,
    listeners: HashMap<u32, ListenerEntry>,
    udp: HashMap<u32, UdpEntry>,
    dns: HashMap<u32, DnsEntry>,
    tcp_ports: HashMap<u16, usize>,
    listen_ports: HashSet<u16>,
    udp_ports: HashSet<u16>,
    events: VecDeque<Event>,
    stats: StackStats,
    /// Puts the gateway's sequenced datagrams back in order (link repair).
    link: LinkReceiver,
    /// Splits the stream link's bytes into packets.
    link_stream: Deframer,
    /// Connections that counted as receiving in the last scan: they share
    /// [`StackConfig::tcp_recv_budget`].
    tcp_receiving: usize,
    /// Quiet connections, kept out of the socket set that every poll walks.
    parked: Parked,
}

/// Established connections with nothing to send, nothing buffered, no ACK owed and no timer due
/// within [`PARK_AFTER`], quiet for [`PARK_AFTER`]: smoltcp walks its whole socket set for every received packet and
/// every transmit pass, and the stack scans every connection on each poll, so without this a
/// thousand idle connections cost every packet of a busy one. A packet for a parked connection,
/// a socket call on it, or its timer coming due (a keep-alive probe to send, an idle timeout)
/// brings it back first.
struct Parked {
    sockets: SocketSet<'static>,
    entries: HashMap<u32, TcpEntry>,
    /// (local, remote) endpoints to the connection's id, to match arriving packets.
    by_endpoints: HashMap<EndpointKey, u32>,
    /// How many parked connections fall in each bucket of [`EndpointKey::bucket`]: most packets
    /// of active connections land in an empty bucket and skip the keyed hash of the map above,
    /// which would otherwise be the one per-packet cost the parked connections add.
    buckets: Vec<u32>,
    /// When each parked connection with a timer running must be back: (due, id).
    wakes: BTreeSet<(Instant, u32)>,
}

impl Parked {
    fn insert_endpoints(&mut self, key: EndpointKey, id: u32) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; PARKED_BUCKETS];
        }
        if self.by_endpoints.insert(key, id).is_none() {
            self.buckets[key.bucket()] += 1;
        }
    }

    fn remove_endpoints(&mut self, key: &EndpointKey) {
        if self.by_endpoints.remove(key).is_some() {
            self.buckets[key.bucket()] -= 1;
        }
    }

    fn find(&self, key: &EndpointKey) -> Option<u32> {
        if self
            .buckets
            .get(key.bucket())
            .is_none_or(|&count| count == 0)
        {
            return None;
        }
        self.by_endpoints.get(key).copied()
    }
}

const PARKED_BUCKETS: usize = 4096;

/// A connection's (local, remote) endpoints packed into one byte string (IPv4 as IPv4-mapped
/// IPv6), so that matching a received packet against the parked connections hashes one slice
/// instead of two socket addresses field by field. Still hashed with the std's keyed hasher:
/// remote endpoints are the peer's choice. An IPv6 packet from an IPv4-mapped address shares
/// the key of the IPv4 connection; at worst it unparks it, and smoltcp still tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EndpointKey([u8; 36]);

impl EndpointKey {
    fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        let mut key = [0; 36];
        for (at, endpoint) in [(0, local), (18, remote)] {
            let ip = match endpoint.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            key[at..at + 16].copy_from_slice(&ip.octets());
            key[at + 16..at + 18].copy_from_slice(&endpoint.port().to_be_bytes());
        }
        Self(key)
    }

    /// A bucket in 0..[`PARKED_BUCKETS`] from the ports and the low bytes of the addresses
    /// (where addresses in one network differ). Unkeyed, which is safe: a peer that aims at a
    /// full bucket only gets its packets looked up in the keyed map.
    fn bucket(&self) -> usize {
        let local = u32::from_be_bytes([self.0[14], self.0[15], self.0[16], self.0[17]]);
        let remote = u32::from_be_bytes([self.0[32], self.0[33], self.0[34], self.0[35]]);
        let mixed = (local.wrapping_mul(0x9e37_79b1) ^ remote).wrapping_mul(0x9e37_79b1);
        (mixed >> (32 - PARKED_BUCKETS.trailing_zeros())) as usize
    }
}

impl std::hash::Hash for EndpointKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.0);
    }
}

/// How long a connection stays quiet before it is parked: long enough that a request/response
/// connection between two exchanges is not moved back and forth.
const PARK_AFTER: Duration = Duration::from_secs(1);

impl Stack {
    /// Creates a stack with the addresses, MTU and resolvers of `config`.
    pub fn new(config: StackConfig, now: Instant) -> Self {
        let mut device = QueueDevice::new(config.mtu, config.rx_queue_len, config.tx_queue_len);
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = config.seed;
        let mut iface = Interface::new(iface_config, &mut device, now);
        iface.update_ip_addrs(|addrs| {
            if let Some(v4) = config.ipv4 {
                addrs
                    .push(IpCidr::new(IpAddress::Ipv4(v4), 32))
                    .expect("room for 2 addresses");
            }
            if let Some(v6) = config.ipv6 {
                addrs
                    .push(IpCidr::new(IpAddress::Ipv6(v6), 128))
                    .expect("room for 2 addresses");
            }
        });
        // On an IP-medium link the next hop is never resolved, so the route only has to exist:
        // everything not local goes to the tunnel.
        if let Some(v4) = config.ipv4 {
            iface
                .routes_mut()
                .add_default_ipv4_route(v4)
                .expect("room for 2 routes");
        }
        if let Some(v6) = config.ipv6 {
            iface
                .routes_mut()
                .add_default_ipv6_route(v6)
                .expect("room for 2 routes");
        }
        let mut sockets = SocketSet::new(Vec::new());
        let servers = dns_server_list(&config.dns_servers);
        let dns_socket = sockets.add(dns::Socket::new(
            &servers,
            (0..DNS_QUERY_SLOTS).map(|_| None).collect::<Vec<_>>(),
        ));
        let span = u64::from(u16::MAX - EPHEMERAL_FIRST) + 1;
        let next_ephemeral = EPHEMERAL_FIRST + (config.seed % span) as u16;
        Self {
            iface,
            sockets,
            device,
            config,
            now,
            dns_socket,
            next_id: 1,
            next_ephemeral,
            tcp: HashMap::new(),
            listeners: HashMap::new(),
            udp: HashMap::new(),
            dns: HashMap::new(),
            tcp_ports: HashMap::new(),
            listen_ports: HashSet::new(),
            udp_ports: HashSet::new(),
            events: VecDeque::new(),
            stats: StackStats::default(),
            link: LinkReceiver::new(),
            link_stream: Deframer::new(),
            tcp_receiving: 0,
            parked: Parked {
                sockets: SocketSet::new(Vec::new()),
                entries: HashMap::new(),
                by_endpoints: HashMap::new(),
                buckets: Vec::new(),
                wakes: BTreeSet::new(),
            },
        }
    }

    /// The configuration the stack was built with.
    pub fn config(&self) -> &StackConfig {
        &self.config
    }

    /// Counters since creation.
    pub fn stats(&self) -> StackStats {
        self.stats
    }

    /// Counters of link repair (sequenced datagrams from the gateway).
    pub fn link_stats(&self) -> LinkStats {
        self.link.stats()
    }

    /// Forgets the link-repair sequence and any partial frame of the stream link: the session
    /// moved to a new connection, whose sequence and stream start afresh. Packets held behind a
    /// gap are handed on first.
    pub fn reset_link(&mut self) {
        self.link.reset();
        self.drain_link(self.now);
        self.link_stream = Deframer::new();
    }

    /// Replaces the resolvers (the gateway may announce new ones at any time).
    pub fn set_dns_servers(&mut self, servers: &[IpAddr]) {
        self.config.dns_servers = servers.to_vec();
        let list = dns_server_list(servers);
        self.sockets
            .get_mut::<dns::Socket>(self.dns_socket)
            .update_servers(&list);
    }

    // ----- the polling contract -----

    /// Queues one IP packet received from the tunnel. Call [`poll`](Self::poll) afterwards.
    ///
    /// # Errors
    /// The packet is dropped (and counted) when it is empty, larger than the MTU, or the receive
    /// queue is full.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) -> Result<(), PacketError> {
        self.queue_packet(now, packet, self.config.mtu)
    }

    /// [`handle_packet`](Self::handle_packet) for packets of up to `max_len` bytes.
    fn queue_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        max_len: usize,
    ) -> Result<(), PacketError> {
        self.now = now;
        if packet.is_empty() {
            return Err(PacketError::Empty);
        }
        if packet.len() > max_len {
            self.stats.dropped_too_large += 1;
            return Err(PacketError::TooLarge {
                len: packet.len(),
                mtu: max_len,
            });
        }
        if self.device.rx.len() >= self.device.rx_capacity {
            self.stats.dropped_queue_full += 1;
            return Err(PacketError::QueueFull);
        }
        self.stats.packets_received += 1;
        self.stats.bytes_received += packet.len() as u64;
        let buffer = self.device.rx_buffer(packet);
        self.device.rx.push_back(buffer);
        Ok(())
    }

    /// Queues what one datagram from the gateway carries: an IP packet, or a sequenced frame of
    /// link repair (PROTOCOL.md §3.1), which may release packets held behind a repaired gap.
    /// Call [`poll`](Self::poll) afterwards.
    ///
    /// # Errors
    /// As [`handle_packet`](Self::handle_packet), and [`PacketError::Frame`] for a malformed
    /// frame.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) -> Result<(), PacketError> {
        self.now = now;
        match datagram.first() {
            Some(&link_repair::FRAME_SEQUENCED) => {}
            Some(&link_repair::FRAME_GONE) => {
                self.link.gone(link_repair::parse_gone(datagram)?);
                self.drain_link(now);
                return Ok(());
            }
            _ => return self.handle_packet(now, datagram),
        }
        let (seq, packet) = link_repair::parse_sequenced(datagram)?;
        let result = match self.link.accept(now, seq, packet) {
            Accepted::Deliver if self.device.rx.len() < self.device.rx_capacity => {
                self.handle_packet(now, packet)
            }
            // A repair releases a burst: what does not fit the receive queue now waits in
            // order instead of being dropped.
            Accepted::Deliver if self.link.ready_len() < MAX_DEFERRED => {
                self.link.defer(packet);
                Ok(())
            }
            Accepted::Deliver => {
                // Fed faster than polled for that long: drop, as a full receive queue does.
                self.stats.dropped_queue_full += 1;
                Err(PacketError::QueueFull)
            }
            Accepted::Held | Accepted::Duplicate => Ok(()),
        };
        self.drain_link(now);
        result
    }

    /// Queues the packets in bytes read from the stream link (PROTOCOL.md §3.2), in whatever
    /// chunks they arrive. The link is reliable, so a full receive queue is not a reason to drop:
    /// the stack is polled to make room instead. Call [`poll`](Self::poll) afterwards.
    ///
    /// # Errors
    /// The stream's framing is broken: the stream link cannot continue.
    pub fn handle_link_stream(
        &mut self,
        now: Instant,
        bytes: &[u8],
    ) -> Result<(), StreamFrameError> {
        self.now = now;
        let mut deframer = std::mem::take(&mut self.link_stream);
        deframer.extend(bytes);
        let result = loop {
            let packet = match deframer.next_packet() {
                Ok(Some(packet)) => packet,
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            };
            if self.device.rx.len() >= self.device.rx_capacity {
                self.poll(now);
            }
            // The gateway may pass coalesced TCP packets on whole (up to a frame's 64 KiB) to
            // a client that announced it takes them (LINK_STREAM's max packet); smoltcp takes
            // a segment of any length that fits the window.
            if self
                .queue_packet(now, packet, usize::from(link_stream::MAX_PACKET))
                .is_ok()
            {
                self.stats.link_stream_packets += 1;
            }
        };
        self.link_stream = deframer;
        result
    }

    /// Queues the packets link repair released in order, as far as the receive queue has room
    /// (the rest stays in order for the next poll).
    fn drain_link(&mut self, now: Instant) {
        while self.device.rx.len() < self.device.rx_capacity {
            let Some(packet) = self.link.pop_ready() else {
                break;
            };
            let _ = self.handle_packet(now, &packet);
        }
    }

    /// Processes received packets and timers, emits packets, and updates events.
    ///
    /// Bounded: see the type's documentation.
    pub fn poll(&mut self, now: Instant) {
        self.now = now;
        self.link.poll(now);
        self.drain_link(now);
        self.unpark_due(now);
        for _ in 0..self.config.ingress_budget {
            // smoltcp ignores ICMP errors for TCP: act on "prohibited" for a pending connect
            // ourselves, so it fails at once instead of timing out. The packet still goes on to
            // smoltcp, which drops it.
            if let Some((local, remote)) = self.device.rx.front().and_then(|p| prohibited_syn(p)) {
                self.abort_prohibited_connect(local, remote);
            }
            if !self.parked.entries.is_empty()
                && let Some((local, remote)) = self.device.rx.front().and_then(|p| tcp_endpoints(p))
                && let Some(id) = self.parked.find(&EndpointKey::new(local, remote))
            {
                self.unpark(id);
            }
            if let Some(port) = self
                .device
                .rx
                .front()
                .and_then(|p| self.syn_for_listener(p))
                && !self.make_room_for_syn(port)
            {
                self.device.rx.pop_front();
                self.stats.syn_dropped_backlog += 1;
                continue;
            }
            match self
                .iface
                .poll_ingress_single(now, &mut self.device, &mut self.sockets)
            {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed
                | PollIngressSingleResult::SocketStateChanged => {}
            }
        }
        self.iface.poll_maintenance(now);
        self.drain_link(now);
        self.scan(now);
        // Each egress pass lets every socket emit one packet; repeat until quiet or the
        // transmit queue is full.
        for _ in 0..=self.config.tx_queue_len {
            if self.device.tx.len() >= self.device.tx_capacity {
                break;
            }
            if self
                .iface
                .poll_egress(now, &mut self.device, &mut self.sockets)
                == PollResult::None
            {
                break;
            }
        }
        self.scan(now);
    }

    /// The next datagram to send to the tunnel: a link-repair NACK, else the oldest IP packet.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if let Some(nack) = self.link.poll_nack() {
            return Some(nack);
        }
        let packet = self.device.tx.pop_front()?;
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += packet.len() as u64;
        Some(packet)
    }

    /// Returns a buffer obtained from [`poll_transmit`](Self::poll_transmit) for reuse, so a
    /// steady flow allocates nothing per packet. Optional.
    pub fn recycle(&mut self, buffer: Vec<u8>) {
        self.device.recycle(buffer);
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`poll`](Self::poll) must be called next at the latest, `None` if only a packet or a
    /// socket call can create work. A time at or before `now` means "poll again right away".
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if !self.device.rx.is_empty() || self.link.ready_len() > 0 {
            return Some(self.now);
        }
        // One pass over the connections for their own deadlines: a pending connect's timeout
        // (not started yet: the next poll starts the clock, and must come now), and the moment
        // a quiet connection has been quiet for a second, so that a stack with nothing else to
        // do still parks it.
        let connection_deadline = self
            .tcp
            .values()
            .filter_map(|e| {
                let connecting =
                    !e.established && matches!(e.phase, TcpPhase::Socket(_)) && !e.closed_reported;
                let connect = connecting.then(|| {
                    e.started
                        .map_or(self.now, |at| at + e.options.connect_timeout)
                });
                let park = e.quiet_since.map(|since| since + PARK_AFTER);
                connect.into_iter().chain(park).min()
            })
            .min();
        [
            self.iface.poll_at(self.now, &self.sockets),
            connection_deadline,
            self.link.poll_timeout(),
            self.parked.wakes.first().map(|&(due, _)| due),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- TCP -----

    /// Starts connecting to `remote`. [`Event::TcpConnected`] or [`Event::TcpConnectFailed`]
    /// follows.
    ///
    /// # Errors
    /// [`ConnectError`] when the connection cannot even be attempted.
    pub fn tcp_connect(
        &mut self,
        remote: SocketAddr,
        options: TcpOptions,
    ) -> Result<TcpHandle, ConnectError> {
        let (socket, port) = self.open_connection(remote, options)?;
        let id = self.alloc_id();
        self.tcp.insert(
            id,
            TcpEntry::new(TcpPhase::Socket(socket), options, Some(port)),
        );
        Ok(TcpHandle(id))
    }

    /// Connects to `host:port`, resolving `host` through the tunnel's DNS when it is not an
    /// address literal (A first when the session has IPv4, then AAAA when it has IPv6).
    ///
    /// # Errors
    /// As [`tcp_connect`](Self::tcp_connect), plus [`ConnectError::Resolve`] when no lookup can
    /// be started.
    pub fn tcp_connect_host(
        &mut self,
        host: &str,
        port: u16,
        options: TcpOptions,
    ) -> Result<TcpHandle, ConnectError> {
        self.tcp_connect_host_as(host, port, options, None)
    }

    /// As [`tcp_connect_host`](Self::tcp_connect_host), but `only` (when set) restricts the
    /// lookup to that record type, with no fallback to the other: Direct Sockets'
    /// `dnsQueryType` ("ipv4" → A, "ipv6" → AAAA). Address literals connect as they are.
    ///
    /// # Errors
    /// As [`tcp_connect_host`](Self::tcp_connect_host).
    pub fn tcp_connect_host_as(
        &mut self,
        host: &str,
        port: u16,
        options: TcpOptions,
        only: Option<DnsKind>,
    ) -> Result<TcpHandle, ConnectError> {
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return self.tcp_connect(SocketAddr::new(ip, port), options);
        }
        let kind = match only {
            Some(kind) => kind,
            None if self.config.ipv4.is_some() => DnsKind::A,
            None => DnsKind::Aaaa,
        };
        let query = self
            .start_dns(host, kind)
            .map_err(|reason| ConnectError::Resolve {
                name: host.to_owned(),
                reason,
            })?;
        let id = self.alloc_id();
        let phase = TcpPhase::Resolving {
            name: host.to_owned(),
            query,
            kind,
            fallback: only.is_none(),
            port,
        };
        self.tcp.insert(id, TcpEntry::new(phase, options, None));
        Ok(TcpHandle(id))
    }

    /// Opens a listener on `port` of every session address (0 picks a free port), holding up to
    /// `backlog` connections that are being set up or waiting for [`tcp_accept`](Self::tcp_accept).
    ///
    /// # Errors
    /// [`ListenError::AddrInUse`] when the port has a listener already.
    pub fn tcp_listen(
        &mut self,
        port: u16,
        backlog: usize,
        options: TcpOptions,
    ) -> Result<ListenerHandle, ListenError> {
        let port = if port == 0 {
            self.free_port(|stack, p| {
                !stack.listen_ports.contains(&p) && !stack.tcp_ports.contains_key(&p)
            })
            .ok_or(ListenError::NoFreePort)?
        } else {
            port
        };
        if self.listen_ports.contains(&port) {
            return Err(ListenError::AddrInUse(port));
        }
        self.listen_ports.insert(port);
        let entry = ListenerEntry {
            port,
            backlog: backlog.clamp(1, 1024),
            options,
            listening: Vec::new(),
            embryonic: Vec::new(),
            ready: VecDeque::new(),
            accept_reported: false,
        };
        let id = self.alloc_id();
        self.listeners.insert(id, entry);
        Ok(ListenerHandle(id))
    }

    /// The port a listener is bound to.
    pub fn listener_port(&self, listener: ListenerHandle) -> Option<u16> {
        self.listeners.get(&listener.0).map(|l| l.port)
    }

    /// Takes an established connection from a listener's queue, `None` if it is empty (an
    /// [`Event::Accept`] follows when one arrives).
    pub fn tcp_accept(&mut self, listener: ListenerHandle) -> Option<(TcpHandle, SocketAddr)> {
        let mut entry = self.listeners.remove(&listener.0)?;
        let socket = entry.ready.pop_front();
        if socket.is_none() {
            entry.accept_reported = false;
        }
        let options = entry.options;
        self.listeners.insert(listener.0, entry);
        let socket = socket?;
        let remote = self
            .sockets
            .get::<tcp::Socket>(socket)
            .remote_endpoint()
            .map(endpoint_to_socket_addr)
            .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        let mut tcp_entry = TcpEntry::new(TcpPhase::Socket(socket), options, None);
        tcp_entry.established = true;
        let id = self.alloc_id();
        self.tcp.insert(id, tcp_entry);
        Some((TcpHandle(id), remote))
    }

    /// Closes a listener; connections not yet accepted are reset.
    pub fn tcp_close_listener(&mut self, listener: ListenerHandle) {
        let Some(entry) = self.listeners.remove(&listener.0) else {
            return;
        };
        self.listen_ports.remove(&entry.port);
        for socket in entry
            .listening
            .into_iter()
            .chain(entry.embryonic)
            .chain(entry.ready)
        {
            self.sockets.get_mut::<tcp::Socket>(socket).abort();
            // Aborted sockets still owe an RST; give them to the orphan reaper.
            let id = self.alloc_id();
            let mut orphan = TcpEntry::new(TcpPhase::Socket(socket), entry.options, None);
            orphan.released = true;
            orphan.closed_locally = true;
            self.tcp.insert(id, orphan);
        }
    }

    /// Reads received bytes into `buf`. `Ok(0)` (with a non-empty `buf`) means the peer closed
    /// its sending half.
    ///
    /// # Errors
    /// [`TcpError::WouldBlock`] when nothing is buffered yet, [`TcpError::Reset`] and others when
    /// the connection is gone.
    pub fn tcp_recv(&mut self, handle: TcpHandle, buf: &mut [u8]) -> Result<usize, TcpError> {
        if let Some(entry) = self.parked.entries.get_mut(&handle.0) {
            // Parked: nothing is buffered and the peer has sent nothing since.
            entry.readable_reported = false;
            return Err(TcpError::WouldBlock);
        }
        let entry = self.tcp.get_mut(&handle.0).ok_or(TcpError::InvalidHandle)?;
        let socket = entry.socket()?;
        let socket = self.sockets.get_mut::<tcp::Socket>(socket);
        match socket.recv_slice(buf) {
            Ok(0) if !buf.is_empty() => {
                entry.readable_reported = false;
                Err(TcpError::WouldBlock)
            }
            Ok(n) => {
                entry.bytes_read += n as u64;
                if !socket.can_recv() {
                    entry.readable_reported = false;
                }
                Ok(n)
            }
            Err(tcp::RecvError::Finished) => Ok(0),
            Err(tcp::RecvError::InvalidState) => {
                entry.readable_reported = false;
                if let Some(outcome) = &entry.outcome {
                    return Err(outcome.clone());
                }
                match socket.state() {
                    tcp::State::SynSent | tcp::State::SynReceived => Err(TcpError::WouldBlock),
                    _ => Err(TcpError::NotConnected),
                }
            }
        }
    }

    /// Bytes buffered and ready to read.
    pub fn tcp_recv_queue(&self, handle: TcpHandle) -> usize {
        match self.tcp.get(&handle.0).map(|e| &e.phase) {
            Some(TcpPhase::Socket(s)) => self.sockets.get::<tcp::Socket>(*s).recv_queue(),
            _ => 0,
        }
    }

    /// Queues bytes for sending; returns how many fit.
    ///
    /// # Errors
    /// [`TcpError::WouldBlock`] when the send buffer is full or the connection is still being
    /// set up; [`TcpError::WriteClosed`] after [`tcp_shutdown`](Self::tcp_shutdown).
    pub fn tcp_send(&mut self, handle: TcpHandle, data: &[u8]) -> Result<usize, TcpError> {
        self.unpark(handle.0);
        let entry = self.tcp.get_mut(&handle.0).ok_or(TcpError::InvalidHandle)?;
        let socket = entry.socket()?;
        if entry.closed_locally {
            return Err(TcpError::WriteClosed);
        }
        let socket = self.sockets.get_mut::<tcp::Socket>(socket);
        if matches!(
            socket.state(),
            tcp::State::SynSent | tcp::State::SynReceived
        ) {
            entry.writable_reported = false;
            return Err(TcpError::WouldBlock);
        }
        match socket.send_slice(data) {
            Ok(0) if !data.is_empty() => {
                entry.writable_reported = false;
                Err(TcpError::WouldBlock)
            }
            Ok(n) => {
                if !socket.can_send() {
                    entry.writable_reported = false;
                }
                Ok(n)
            }
            Err(tcp::SendError::InvalidState) => {
                entry.writable_reported = false;
                Err(entry.outcome.clone().unwrap_or(TcpError::NotConnected))
            }
        }
    }

    /// Bytes queued for sending and not yet acknowledged.
    pub fn tcp_send_queue(&self, handle: TcpHandle) -> usize {
        match self.tcp.get(&handle.0).map(|e| &e.phase) {
            Some(TcpPhase::Socket(s)) => self.sockets.get::<tcp::Socket>(*s).send_queue(),
            _ => 0,
        }
    }

    /// Closes the sending half (sends FIN after queued data); reading goes on.
    ///
    /// # Errors
    /// [`TcpError::InvalidHandle`].
    pub fn tcp_shutdown(&mut self, handle: TcpHandle) -> Result<(), TcpError> {
        self.unpark(handle.0);
        let entry = self.tcp.get_mut(&handle.0).ok_or(TcpError::InvalidHandle)?;
        entry.closed_locally = true;
        match entry.phase {
            TcpPhase::Socket(socket) => self.sockets.get_mut::<tcp::Socket>(socket).close(),
            TcpPhase::Resolving { query, .. } => {
                self.sockets
                    .get_mut::<dns::Socket>(self.dns_socket)
                    .cancel_query(query.0);
                entry.phase = TcpPhase::Failed;
                entry.outcome = Some(TcpError::NotConnected);
            }
            TcpPhase::Failed => {}
        }
        Ok(())
    }

    /// Resets the connection (sends RST) and releases the handle.
    pub fn tcp_abort(&mut self, handle: TcpHandle) {
        self.unpark(handle.0);
        if let Some(entry) = self.tcp.get_mut(&handle.0) {
            if let TcpPhase::Socket(socket) = entry.phase {
                self.sockets.get_mut::<tcp::Socket>(socket).abort();
            }
            entry.closed_locally = true;
            entry.released = true;
            self.cancel_resolving(handle);
        }
    }

    /// Gives the handle back: the connection is closed gracefully (FIN) if still open, and its
    /// resources are freed once the close completes or times out.
    pub fn tcp_release(&mut self, handle: TcpHandle) {
        self.unpark(handle.0);
        if let Some(entry) = self.tcp.get_mut(&handle.0) {
            if let TcpPhase::Socket(socket) = entry.phase {
                let socket = self.sockets.get_mut::<tcp::Socket>(socket);
                socket.close();
                // Nobody is left to notice a peer that never finishes the close: bound it.
                socket.set_timeout(Some(ORPHAN_TIMEOUT));
            }
            entry.closed_locally = true;
            entry.released = true;
            self.cancel_resolving(handle);
        }
    }

    /// Local and remote address of a connection, once it has them.
    pub fn tcp_endpoints(&self, handle: TcpHandle) -> Option<(SocketAddr, SocketAddr)> {
        let (entry, sockets) = match self.tcp.get(&handle.0) {
            Some(entry) => (entry, &self.sockets),
            None => (self.parked.entries.get(&handle.0)?, &self.parked.sockets),
        };
        let TcpPhase::Socket(socket) = entry.phase else {
            return None;
        };
        let socket = sockets.get::<tcp::Socket>(socket);
        Some((
            endpoint_to_socket_addr(socket.local_endpoint()?),
            endpoint_to_socket_addr(socket.remote_endpoint()?),
        ))
    }

    /// Live TCP connections (including ones closing in the background).
    pub fn tcp_connection_count(&self) -> usize {
        self.tcp.len() + self.parked.entries.len()
    }

    /// Connections parked because they are quiet (counted in
    /// [`tcp_connection_count`](Self::tcp_connection_count) too).
    pub fn tcp_parked_count(&self) -> usize {
        self.parked.entries.len()
    }

    /// Brings a parked connection back into the polled socket set.
    fn unpark(&mut self, id: u32) {
        let Some(mut entry) = self.parked.entries.remove(&id) else {
            return;
        };
        let TcpPhase::Socket(handle) = entry.phase else {
            unreachable!("only connections with a socket are parked");
        };
        let socket = self.parked.sockets.remove(handle);
        if let smoltcp::socket::Socket::Tcp(tcp_socket) = &socket
            && let (Some(local), Some(remote)) =
                (tcp_socket.local_endpoint(), tcp_socket.remote_endpoint())
        {
            self.parked.remove_endpoints(&EndpointKey::new(
                endpoint_to_socket_addr(local),
                endpoint_to_socket_addr(remote),
            ));
        }
        if let Some(due) = entry.parked_until.take() {
            self.parked.wakes.remove(&(due, id));
        }
        entry.phase = TcpPhase::Socket(self.sockets.add(socket));
        entry.quiet_since = None;
        self.tcp.insert(id, entry);
    }

    /// Brings back the parked connections whose timer is due.
    fn unpark_due(&mut self, now: Instant) {
        while let Some(&(due, id)) = self.parked.wakes.first()
            && due <= now
        {
            self.unpark(id);
        }
    }

    /// Moves connections quiet for [`PARK_AFTER`] out of the polled socket set, each with the
    /// time its first timer is due, if one runs.
    fn park(&mut self, connections: Vec<(u32, Option<Instant>)>) {
        for (id, due) in connections {
            let Some(&TcpPhase::Socket(handle)) = self.tcp.get(&id).map(|entry| &entry.phase)
            else {
                continue;
            };
            let socket = self.sockets.get::<tcp::Socket>(handle);
            let (Some(local), Some(remote)) = (socket.local_endpoint(), socket.remote_endpoint())
            else {
                continue;
            };
            let mut entry = self.tcp.remove(&id).expect("looked up above");
            entry.phase = TcpPhase::Socket(self.parked.sockets.add(self.sockets.remove(handle)));
            self.parked.insert_endpoints(
                EndpointKey::new(
                    endpoint_to_socket_addr(local),
                    endpoint_to_socket_addr(remote),
                ),
                id,
            );
            if let Some(due) = due {
                self.parked.wakes.insert((due, id));
            }
            entry.parked_until = due;
            self.parked.entries.insert(id, entry);
        }
    }

    // ----- UDP -----

    /// Opens a UDP socket on `port` (0 picks an ephemeral port).
    ///
    /// # Errors
    /// [`UdpError::AddrInUse`] when another socket holds the port.
    pub fn udp_bind(&mut self, port: u16, options: UdpOptions) -> Result<UdpHandle, UdpError> {
        let port = if port == 0 {
            self.free_port(|stack, p| !stack.udp_ports.contains(&p))
                .ok_or(UdpError::NoFreePort)?
        } else {
            port
        };
        if self.udp_ports.contains(&port) {
            return Err(UdpError::AddrInUse(port));
        }
        let rx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; options.recv_packets],
            vec![0; options.recv_buffer],
        );
        let tx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; options.send_packets],
            vec![0; options.send_buffer],
        );
        let mut socket = udp::Socket::new(rx, tx);
        socket
            .bind(IpListenEndpoint { addr: None, port })
            .map_err(|_| UdpError::AddrInUse(port))?;
        let handle = self.sockets.add(socket);
        self.udp_ports.insert(port);
        let id = self.alloc_id();
        self.udp.insert(
            id,
            UdpEntry {
                socket: handle,
                port,
                connected: None,
                readable_reported: false,
                writable_reported: false,
            },
        );
        Ok(UdpHandle(id))
    }

    /// Fixes the peer: [`udp_send`](Self::udp_send) goes there and datagrams from anyone else
    /// are dropped (and counted).
    ///
    /// # Errors
    /// [`UdpError::InvalidHandle`].
    pub fn udp_connect(&mut self, handle: UdpHandle, remote: SocketAddr) -> Result<(), UdpError> {
        let entry = self.udp.get_mut(&handle.0).ok_or(UdpError::InvalidHandle)?;
        entry.connected = Some(remote);
        Ok(())
    }

    /// Sends to the connected peer.
    ///
    /// # Errors
    /// [`UdpError::NotConnected`] without [`udp_connect`](Self::udp_connect), else as
    /// [`udp_send_to`](Self::udp_send_to).
    pub fn udp_send(&mut self, handle: UdpHandle, data: &[u8]) -> Result<(), UdpError> {
        let remote = self
            .udp
            .get(&handle.0)
            .ok_or(UdpError::InvalidHandle)?
            .connected
            .ok_or(UdpError::NotConnected)?;
        self.udp_send_to(handle, data, remote)
    }

    /// Queues one datagram to `remote`.
    ///
    /// # Errors
    /// [`UdpError::WouldBlock`] when the send queue is full, [`UdpError::Unaddressable`] when
    /// the session cannot reach `remote`, [`UdpError::TooLarge`] when it can never fit.
    pub fn udp_send_to(
        &mut self,
        handle: UdpHandle,
        data: &[u8],
        remote: SocketAddr,
    ) -> Result<(), UdpError> {
        if !self.has_family(remote.ip()) || remote.port() == 0 || remote.ip().is_unspecified() {
            return Err(UdpError::Unaddressable(remote));
        }
        let entry = self.udp.get_mut(&handle.0).ok_or(UdpError::InvalidHandle)?;
        let socket = self.sockets.get_mut::<udp::Socket>(entry.socket);
        if data.len() > socket.payload_send_capacity() || data.len() > 65_507 {
            return Err(UdpError::TooLarge(data.len()));
        }
        match socket.send_slice(data, socket_addr_to_endpoint(remote)) {
            Ok(()) => Ok(()),
            Err(udp::SendError::BufferFull) => {
                entry.writable_reported = false;
                Err(UdpError::WouldBlock)
            }
            Err(udp::SendError::Unaddressable) => Err(UdpError::Unaddressable(remote)),
        }
    }

    /// Takes the next datagram: its length and sender.
    ///
    /// # Errors
    /// [`UdpError::WouldBlock`] when none is queued; [`UdpError::Truncated`] when `buf` is too
    /// small (the datagram stays queued).
    pub fn udp_recv_from(
        &mut self,
        handle: UdpHandle,
        buf: &mut [u8],
    ) -> Result<(usize, SocketAddr), UdpError> {
        let entry = self.udp.get_mut(&handle.0).ok_or(UdpError::InvalidHandle)?;
        let socket = self.sockets.get_mut::<udp::Socket>(entry.socket);
        loop {
            let Ok((payload, meta)) = socket.peek() else {
                entry.readable_reported = false;
                return Err(UdpError::WouldBlock);
            };
            let from = endpoint_to_socket_addr(meta.endpoint);
            if entry.connected.is_some_and(|peer| peer != from) {
                let _ = socket.recv();
                self.stats.udp_dropped_foreign += 1;
                continue;
            }
            if payload.len() > buf.len() {
                return Err(UdpError::Truncated {
                    needed: payload.len(),
                });
            }
            let (n, _) = socket.recv_slice(buf).map_err(|_| UdpError::WouldBlock)?;
            if !socket.can_recv() {
                entry.readable_reported = false;
            }
            return Ok((n, from));
        }
    }

    /// The port a UDP socket is bound to.
    pub fn udp_port(&self, handle: UdpHandle) -> Option<u16> {
        self.udp.get(&handle.0).map(|e| e.port)
    }

    /// Closes a UDP socket; queued datagrams not yet emitted are dropped.
    pub fn udp_close(&mut self, handle: UdpHandle) {
        if let Some(entry) = self.udp.remove(&handle.0) {
            self.sockets.remove(entry.socket);
            self.udp_ports.remove(&entry.port);
        }
    }

    // ----- DNS -----

    /// Starts a lookup through the announced resolvers; [`Event::DnsDone`] follows.
    ///
    /// # Errors
    /// [`DnsError`] when no lookup can be started.
    pub fn dns_query(&mut self, name: &str, kind: DnsKind) -> Result<DnsHandle, DnsError> {
        let query = self.start_dns(name, kind)?;
        let id = self.alloc_id();
        self.dns.insert(id, DnsEntry::Pending(query));
        Ok(DnsHandle(id))
    }

    /// The result of a finished lookup (which frees the handle), `None` while pending.
    pub fn dns_result(&mut self, handle: DnsHandle) -> Option<Result<Vec<IpAddr>, DnsError>> {
        match self.dns.get(&handle.0) {
            None => Some(Err(DnsError::InvalidHandle)),
            Some(DnsEntry::Pending(_)) => None,
            Some(DnsEntry::Done(_)) => match self.dns.remove(&handle.0) {
                Some(DnsEntry::Done(result)) => Some(result),
                _ => unreachable!("checked above"),
            },
        }
    }

    // ----- internals -----

    fn alloc_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    fn has_family(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(_) => self.config.ipv4.is_some(),
            IpAddr::V6(_) => self.config.ipv6.is_some(),
        }
    }

    fn free_port(&mut self, is_free: impl Fn(&Self, u16) -> bool) -> Option<u16> {
        let span = u32::from(u16::MAX - EPHEMERAL_FIRST) + 1;
        for _ in 0..span {
            let port = self.next_ephemeral;
            self.next_ephemeral = if port == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                port + 1
            };
            if is_free(self, port) {
                return Some(port);
            }
        }
        None
    }

    fn new_tcp_socket(options: &TcpOptions) -> tcp::Socket<'static> {
        let rx = tcp::SocketBuffer::new(vec![0; options.recv_buffer.max(1024)]);
        let tx = tcp::SocketBuffer::new(vec![0; options.send_buffer.max(1024)]);
        let mut socket = tcp::Socket::new(rx, tx);
        if options.recv_buffer_max > options.recv_buffer {
            socket.set_recv_capacity_max(options.recv_buffer_max.min(1 << 30));
            socket.set_recv_window_limit(Some(options.recv_buffer.max(1024)));
        }
        socket.set_congestion_control(match options.congestion {
            Congestion::Cubic => tcp::CongestionControl::Cubic,
            Congestion::Reno => tcp::CongestionControl::Reno,
            Congestion::None => tcp::CongestionControl::None,
        });
        // A delayed ACK stalls a sender whose window is full; ACK at once.
        socket.set_ack_delay(None);
        socket.set_nagle_enabled(!options.no_delay);
        socket.set_keep_alive(options.keep_alive);
        socket.set_timeout(options.timeout);
        socket
    }

    fn open_connection(
        &mut self,
        remote: SocketAddr,
        options: TcpOptions,
    ) -> Result<(SocketHandle, u16), ConnectError> {
        if remote.port() == 0 || remote.ip().is_unspecified() || remote.ip().is_multicast() {
            return Err(ConnectError::InvalidDestination(remote));
        }
        if !self.has_family(remote.ip()) {
            return Err(ConnectError::NoRoute(remote));
        }
        let port = self
            .free_port(|stack, p| {
                !stack.tcp_ports.contains_key(&p) && !stack.listen_ports.contains(&p)
            })
            .ok_or(ConnectError::NoFreePort)?;
        let mut socket = Self::new_tcp_socket(&options);
        socket
            .connect(self.iface.context(), socket_addr_to_endpoint(remote), port)
            .map_err(|_| ConnectError::InvalidDestination(remote))?;
        *self.tcp_ports.entry(port).or_default() += 1;
        Ok((self.sockets.add(socket), port))
    }

    fn start_dns(&mut self, name: &str, kind: DnsKind) -> Result<Query, DnsError> {
        if self.config.dns_servers.is_empty() {
            return Err(DnsError::NoServers);
        }
        let query_type = match kind {
            DnsKind::A => DnsQueryType::A,
            DnsKind::Aaaa => DnsQueryType::Aaaa,
        };
        let socket = self.sockets.get_mut::<dns::Socket>(self.dns_socket);
        socket
            .start_query(self.iface.context(), name, query_type)
            .map(Query)
            .map_err(|e| match e {
                dns::StartQueryError::NoFreeSlot => DnsError::TooManyQueries,
                dns::StartQueryError::InvalidName | dns::StartQueryError::NameTooLong => {
                    DnsError::InvalidName
                }
            })
    }

    fn cancel_resolving(&mut self, handle: TcpHandle) {
        if let Some(entry) = self.tcp.get_mut(&handle.0)
            && let TcpPhase::Resolving { query, .. } = entry.phase
        {
            self.sockets
                .get_mut::<dns::Socket>(self.dns_socket)
                .cancel_query(query.0);
            entry.phase = TcpPhase::Failed;
        }
    }

    /// Aborts the connection from `local` to `remote` if it is still waiting for its SYN-ACK.
    fn abort_prohibited_connect(&mut self, local: SocketAddr, remote: SocketAddr) {
        for entry in self.tcp.values_mut() {
            let TcpPhase::Socket(handle) = entry.phase else {
                continue;
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            if entry.established
                || socket.state() != tcp::State::SynSent
                || socket.local_endpoint().map(endpoint_to_socket_addr) != Some(local)
                || socket.remote_endpoint().map(endpoint_to_socket_addr) != Some(remote)
            {
                continue;
            }
            socket.abort();
            entry.connect_prohibited = true;
            self.stats.connects_prohibited += 1;
        }
    }

    /// The port of `packet` if it is a bare TCP SYN for a port we listen on.
    fn syn_for_listener(&self, packet: &[u8]) -> Option<u16> {
        let tcp_offset = match packet.first().map(|b| b >> 4) {
            Some(4) if packet.len() >= 20 && packet[9] == 6 => usize::from(packet[0] & 0x0f) * 4,
            Some(6) if packet.len() >= 40 && packet[6] == 6 => 40,
            _ => return None,
        };
        let tcp = packet.get(tcp_offset..tcp_offset + 14)?;
        let flags = tcp[13];
        if flags & 0x12 != 0x02 {
            return None; // not a bare SYN
        }
        let port = u16::from_be_bytes([tcp[2], tcp[3]]);
        self.listen_ports.contains(&port).then_some(port)
    }

    /// Gives a SYN for `port` a listening socket to land on. Listening sockets are made as SYNs
    /// arrive, up to the backlog, not all at `tcp_listen`: each holds its buffers (a page's
    /// default backlog of 128 took 64 MiB of memory that wasm never gives back), and smoltcp
    /// walks every one of them for each packet and each poll. Returns false if the listener
    /// is full: smoltcp would answer with RST; dropping the SYN instead lets the peer retry,
    /// as a full Linux backlog does.
    fn make_room_for_syn(&mut self, port: u16) -> bool {
        for entry in self.listeners.values_mut().filter(|l| l.port == port) {
            let free = entry
                .listening
                .iter()
                .any(|s| self.sockets.get::<tcp::Socket>(*s).state() == tcp::State::Listen);
            if free {
                return true;
            }
            if entry.listening.len() + entry.embryonic.len() + entry.ready.len() < entry.backlog {
                let mut socket = Self::new_tcp_socket(&entry.options);
                if socket.listen(port).is_ok() {
                    entry.listening.push(self.sockets.add(socket));
                    return true;
                }
            }
        }
        false
    }

    /// Turns smoltcp socket state into events; frees what was released and is done.
    fn scan(&mut self, now: Instant) {
        self.scan_dns();
        self.scan_listeners();
        self.scan_tcp(now);
        self.scan_udp();
    }

    fn scan_dns(&mut self) {
        let dns_socket = self.dns_socket;
        for (id, entry) in &mut self.dns {
            if let DnsEntry::Pending(query) = *entry {
                let socket = self.sockets.get_mut::<dns::Socket>(dns_socket);
                match socket.get_query_result(query.0) {
                    Err(dns::GetQueryResultError::Pending) => continue,
                    Ok(addrs) if !addrs.is_empty() => {
                        *entry = DnsEntry::Done(Ok(addrs.iter().map(|a| ip_from(*a)).collect()));
                    }
                    Ok(_) | Err(dns::GetQueryResultError::Failed) => {
                        *entry = DnsEntry::Done(Err(DnsError::Failed));
                    }
                }
                self.events.push_back(Event::DnsDone(DnsHandle(*id)));
            }
        }
    }

    fn scan_listeners(&mut self) {
        for (&id, entry) in &mut self.listeners {
            let mut i = 0;
            while i < entry.listening.len() {
                let state = self.sockets.get::<tcp::Socket>(entry.listening[i]).state();
                if state == tcp::State::Listen {
                    i += 1;
                } else {
                    entry.embryonic.push(entry.listening.swap_remove(i));
                }
            }
            let mut i = 0;
            while i < entry.embryonic.len() {
                let socket = entry.embryonic[i];
                match self.sockets.get::<tcp::Socket>(socket).state() {
                    tcp::State::SynReceived => i += 1,
                    tcp::State::Listen | tcp::State::Closed => {
                        // The handshake failed (RST or timeout); drop the half-open socket.
                        self.sockets.remove(entry.embryonic.swap_remove(i));
                    }
                    _ => entry.ready.push_back(entry.embryonic.swap_remove(i)),
                }
            }
            if !entry.ready.is_empty() && !entry.accept_reported {
                entry.accept_reported = true;
                self.events.push_back(Event::Accept(ListenerHandle(id)));
            }
        }
    }

    fn scan_tcp(&mut self, now: Instant) {
        let mut to_remove = Vec::new();
        let mut to_connect = Vec::new();
        let dns_socket = self.dns_socket;
        let share = self.config.tcp_recv_budget / self.tcp_receiving.max(1);
        let mut receiving = 0;
        let mut to_park = Vec::new();
        let cx = self.iface.context();
        for (&id, entry) in &mut self.tcp {
            let handle = TcpHandle(id);
            let started = *entry.started.get_or_insert(now);
            let socket_handle = match &entry.phase {
                TcpPhase::Failed => {
                    if entry.released {
                        to_remove.push(id);
                    }
                    continue;
                }
                TcpPhase::Resolving {
                    name,
                    query,
                    kind,
                    fallback,
                    port,
                } => {
                    let dns = self.sockets.get_mut::<dns::Socket>(dns_socket);
                    match dns.get_query_result(query.0) {
                        Err(dns::GetQueryResultError::Pending) => {}
                        Ok(addrs) if !addrs.is_empty() => {
                            to_connect.push((id, SocketAddr::new(ip_from(addrs[0]), *port)));
                        }
                        Ok(_) | Err(dns::GetQueryResultError::Failed) => {
                            if *fallback && *kind == DnsKind::A && self.config.ipv6.is_some() {
                                to_connect.push((
                                    id,
                                    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), *port),
                                ));
                            } else {
                                let error = ConnectError::Resolve {
                                    name: name.clone(),
                                    reason: DnsError::Failed,
                                };
                                entry.outcome = Some(TcpError::Connect(error.clone()));
                                entry.phase = TcpPhase::Failed;
                                self.events
                                    .push_back(Event::TcpConnectFailed(handle, error));
                            }
                        }
                    }
                    continue;
                }
                TcpPhase::Socket(socket) => *socket,
            };
            let socket = self.sockets.get_mut::<tcp::Socket>(socket_handle);
            if !entry.established
                && socket.state() == tcp::State::SynSent
                && now >= started + entry.options.connect_timeout
            {
                socket.abort();
                entry.connect_timed_out = true;
            }
            let state = socket.state();
            if matches!(
                state,
                tcp::State::CloseWait
                    | tcp::State::LastAck
                    | tcp::State::Closing
                    | tcp::State::TimeWait
            ) {
                entry.fin_received = true;
            }
            if !entry.established
                && !matches!(
                    state,
                    tcp::State::SynSent
                        | tcp::State::SynReceived
                        | tcp::State::Closed
                        | tcp::State::Listen
                )
            {
                entry.established = true;
                self.events.push_back(Event::TcpConnected(handle));
            }
            let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait);
            if finished && !entry.closed_reported {
                entry.closed_reported = true;
                if !entry.established {
                    if !entry.closed_locally {
                        let error = if entry.connect_prohibited {
                            ConnectError::Prohibited
                        } else if entry.connect_timed_out {
                            ConnectError::TimedOut
                        } else {
                            ConnectError::Refused
                        };
                        entry.outcome = Some(TcpError::Connect(error.clone()));
                        self.events
                            .push_back(Event::TcpConnectFailed(handle, error));
                    }
                } else if !entry.fin_received && !entry.closed_locally {
                    entry.outcome = Some(TcpError::Reset);
                    self.events.push_back(Event::TcpReset(handle));
                } else if !entry.fin_received {
                    // We sent FIN and the peer reset or timed out instead of closing: still a
                    // reset for a reader waiting on the receive half.
                    entry.outcome = Some(TcpError::Reset);
                }
                self.events.push_back(Event::TcpClosed(handle));
            }
            // An aborted socket is Closed but still owes its RST until it forgets the peer.
            let drained = state == tcp::State::TimeWait || socket.remote_endpoint().is_none();
            if entry.released && finished && drained {
                to_remove.push(id);
                continue;
            }
            // Without window scaling no window exceeds 64 KiB: growing the buffer would waste it.
            if entry.established && entry.recv_window.is_tuned() && socket.peer_scales_window() {
                let received = entry.bytes_read + socket.recv_queue() as u64;
                if entry.recv_window.update(now, received, share) {
                    receiving += 1;
                }
                let limit = entry.recv_window.limit();
                if limit > socket.recv_capacity() {
                    socket.grow_recv_buffer(vec![0; limit]);
                }
                socket.set_recv_window_limit(Some(limit));
            }
            let quiet = entry.established
                && !entry.released
                && !entry.closed_locally
                && state == tcp::State::Established
                && socket.recv_queue() == 0
                && socket.send_queue() == 0;
            // Nothing to do until a packet, a call or a timer at least a second away.
            let until = socket
                .quiet_until(cx)
                .filter(|due| due.is_none_or(|at| at >= now + PARK_AFTER));
            if let (true, Some(due)) = (quiet, until) {
                if now >= *entry.quiet_since.get_or_insert(now) + PARK_AFTER {
                    to_park.push((id, due));
                }
            } else {
                entry.quiet_since = None;
            }
            if entry.established {
                let readable = socket.can_recv() || !socket.may_recv() || finished;
                if readable && !entry.readable_reported {
                    entry.readable_reported = true;
                    self.events.push_back(Event::TcpReadable(handle));
                }
                let writable = socket.can_send() || finished;
                if writable && !entry.writable_reported && !entry.closed_locally {
                    entry.writable_reported = true;
                    self.events.push_back(Event::TcpWritable(handle));
                }
            }
        }
        self.tcp_receiving = receiving;
        let shrink = !to_park.is_empty() || !to_remove.is_empty();
        self.park(to_park);
        for (id, remote) in to_connect {
            self.finish_resolution(id, remote);
        }
        for id in to_remove {
            if let Some(entry) = self.tcp.remove(&id) {
                if let TcpPhase::Socket(socket) = entry.phase {
                    self.sockets.remove(socket);
                }
                if let Some(port) = entry.local_port
                    && let Some(count) = self.tcp_ports.get_mut(&port)
                {
                    *count -= 1;
                    if *count == 0 {
                        self.tcp_ports.remove(&port);
                    }
                }
            }
        }
        if shrink {
            self.shrink_tcp_map();
        }
    }

    /// Gives back the connection map's empty buckets once most connections have been parked or
    /// closed: a hash map never shrinks by itself, and every poll iterates over all its buckets,
    /// so a map that once held a thousand connections would cost every packet of the one left.
    fn shrink_tcp_map(&mut self) {
        let (len, capacity) = (self.tcp.len(), self.tcp.capacity());
        if capacity > 64 && len * 4 < capacity {
            self.tcp.shrink_to(len * 2);
        }
    }

    /// Connects a resolved host-name connection, or falls back from A to AAAA (signalled by an
    /// unspecified IPv6 `remote`).
    fn finish_resolution(&mut self, id: u32, remote: SocketAddr) {
        let Some(entry) = self.tcp.get(&id) else {
            return;
        };
        let options = entry.options;
        let TcpPhase::Resolving { name, port, .. } = &entry.phase else {
            return;
        };
        let (name, port) = (name.clone(), *port);
        let next = if remote.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
            self.start_dns(&name, DnsKind::Aaaa)
                .map(|query| TcpPhase::Resolving {
                    name: name.clone(),
                    query,
                    kind: DnsKind::Aaaa,
                    fallback: false,
                    port,
                })
                .map_err(|reason| ConnectError::Resolve { name, reason })
                .map(|phase| (phase, None))
        } else {
            self.open_connection(remote, options)
                .map(|(socket, local_port)| (TcpPhase::Socket(socket), Some(local_port)))
        };
        let entry = self.tcp.get_mut(&id).expect("checked above");
        match next {
            Ok((phase, local_port)) => {
                entry.phase = phase;
                entry.local_port = local_port;
            }
            Err(error) => {
                entry.outcome = Some(TcpError::Connect(error.clone()));
                entry.phase = TcpPhase::Failed;
                self.events
                    .push_back(Event::TcpConnectFailed(TcpHandle(id), error));
            }
        }
    }

    fn scan_udp(&mut self) {
        for (&id, entry) in &mut self.udp {
            let socket = self.sockets.get::<udp::Socket>(entry.socket);
            if socket.can_recv() && !entry.readable_reported {
                entry.readable_reported = true;
                self.events.push_back(Event::UdpReadable(UdpHandle(id)));
            }
            if socket.can_send() && !entry.writable_reported {
                entry.writable_reported = true;
                self.events.push_back(Event::UdpWritable(UdpHandle(id)));
            }
        }
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("config", &self.config)
            .field("tcp", &self.tcp.len())
            .field("listeners", &self.listeners.len())
            .field("udp", &self.udp.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// smoltcp's query handle, which has no `Debug`.
#[derive(Clone, Copy)]
struct Query(dns::QueryHandle);

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Query")
    }
}

impl TcpEntry {
    /// The smoltcp socket, or why there is none to read or write yet (or any more).
    fn socket(&self) -> Result<SocketHandle, TcpError> {
        match self.phase {
            TcpPhase::Socket(socket) => Ok(socket),
            TcpPhase::Resolving { .. } => Err(TcpError::WouldBlock),
            TcpPhase::Failed => Err(self.outcome.clone().unwrap_or(TcpError::NotConnected)),
        }
    }

    fn new(phase: TcpPhase, options: TcpOptions, local_port: Option<u16>) -> Self {
        Self {
            phase,
            options,
            started: None,
            established: false,
            fin_received: false,
            closed_locally: false,
            outcome: None,
            readable_reported: false,
            writable_reported: false,
            closed_reported: false,
            released: false,
            connect_timed_out: false,
            connect_prohibited: false,
            local_port,
            bytes_read: 0,
            quiet_since: None,
            parked_until: None,
            recv_window: RecvWindow::new(
                options.recv_buffer.max(1024),
                options.recv_buffer_max.min(1 << 30),
            ),
        }
    }
}

fn dns_server_list(servers: &[IpAddr]) -> Vec<IpAddress> {
    // smoltcp is built with room for 4 resolvers.
    servers
        .iter()
        .take(4)
        .map(|ip| IpAddress::from(*ip))
        .collect()
}

/// If `packet` is an ICMP "communication administratively prohibited" (IPv4 Destination
/// Unreachable codes 9, 10, 13; ICMPv6 Destination Unreachable code 1) quoting a TCP segment:
/// the quoted segment's (source, destination), i.e. our (local, remote) endpoints.
///
/// The checksum is not verified: packets reach the stack only from the gateway, over the
/// session's authenticated QUIC connection, and a wrong match only fails a connect that had
/// not yet succeeded.
pub(crate) fn prohibited_syn(packet: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let quoted_at = match packet.first()? >> 4 {
        4 => {
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let icmp = packet.get(header_len..header_len + 2)?;
            if packet.get(9) != Some(&1) || icmp[0] != 3 || !matches!(icmp[1], 9 | 10 | 13) {
                return None;
            }
            header_len + 8
        }
        6 => {
            let icmp = packet.get(40..42)?;
            if packet[6] != 58 || icmp != [1, 1] {
                return None;
            }
            48
        }
        _ => return None,
    };
    tcp_source_destination(packet.get(quoted_at..)?)
}

/// The (local, remote) endpoints of a received TCP packet: its destination and source.
fn tcp_endpoints(packet: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (source, destination) = tcp_source_destination(packet)?;
    Some((destination, source))
}

/// Source and destination (address and port) of an IPv4 or IPv6 TCP packet. Only the IP
/// header and the ports need to be there: an ICMP error quotes no more.
fn tcp_source_destination(packet: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    const PROTO_TCP: u8 = 6;
    let (source, destination, tcp_at) = match packet.first()? >> 4 {
        6 => {
            if packet.len() < 40 || packet[6] != PROTO_TCP {
                return None;
            }
            let source: [u8; 16] = packet[8..24].try_into().ok()?;
            let destination: [u8; 16] = packet[24..40].try_into().ok()?;
            (IpAddr::from(source), IpAddr::from(destination), 40)
        }
        4 => {
            if packet.len() < 20 || packet[9] != PROTO_TCP {
                return None;
            }
            let source: [u8; 4] = packet[12..16].try_into().ok()?;
            let destination: [u8; 4] = packet[16..20].try_into().ok()?;
            (
                IpAddr::from(source),
                IpAddr::from(destination),
                usize::from(packet[0] & 0x0f) * 4,
            )
        }
        _ => return None,
    };
    let ports = packet.get(tcp_at..tcp_at + 4)?;
    Some((
        SocketAddr::new(source, u16::from_be_bytes([ports[0], ports[1]])),
        SocketAddr::new(destination, u16::from_be_bytes([ports[2], ports[3]])),
    ))
}

fn ip_from(address: IpAddress) -> IpAddr {
    match address {
        IpAddress::Ipv4(a) => IpAddr::V4(a),
        IpAddress::Ipv6(a) => IpAddr::V6(a),
    }
}

fn endpoint_to_socket_addr(endpoint: IpEndpoint) -> SocketAddr {
    SocketAddr::new(ip_from(endpoint.addr), endpoint.port)
}

fn socket_addr_to_endpoint(addr: SocketAddr) -> IpEndpoint {
    IpEndpoint::new(IpAddress::from(addr.ip()), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(remote_port: u16) -> EndpointKey {
        EndpointKey::new(
            SocketAddr::from(([10, 0, 0, 2], 80)),
            SocketAddr::from(([10, 0, 0, 1], remote_port)),
        )
    }

    /// Two parked connections in one bucket: each is found by its own endpoints, and a third
    /// key landing in their bucket finds nothing.
    #[test]
    fn parked_connections_sharing_a_bucket_are_told_apart() {
        let first = key(50_000);
        let mut same_bucket = (50_001..=u16::MAX)
            .map(key)
            .filter(|other| other.bucket() == first.bucket());
        let (second, third) = (same_bucket.next().unwrap(), same_bucket.next().unwrap());
        let mut parked = Parked {
            sockets: SocketSet::new(Vec::new()),
            entries: HashMap::new(),
            by_endpoints: HashMap::new(),
            buckets: Vec::new(),
            wakes: BTreeSet::new(),
        };
        assert_eq!(parked.find(&first), None, "nothing parked yet");
        parked.insert_endpoints(first, 1);
        parked.insert_endpoints(second, 2);
        assert_eq!(parked.buckets[first.bucket()], 2);
        assert_eq!(
            (
                parked.find(&first),
                parked.find(&second),
                parked.find(&third)
            ),
            (Some(1), Some(2), None)
        );
        parked.remove_endpoints(&first);
        parked.remove_endpoints(&third);
        assert_eq!((parked.find(&first), parked.find(&second)), (None, Some(2)));
        parked.remove_endpoints(&second);
        assert_eq!(parked.buckets[first.bucket()], 0);
        assert!(parked.buckets.iter().all(|&count| count == 0));
    }

    /// IPv4 and IPv6 endpoints and both directions make different keys.
    #[test]
    fn endpoint_keys_keep_family_and_direction() {
        let v4 = SocketAddr::from(([10, 0, 0, 2], 80));
        let v6 = SocketAddr::from(([0xfd00, 0, 0, 0, 0, 0, 0, 2], 80));
        let peer = SocketAddr::from(([10, 0, 0, 1], 40_000));
        assert_ne!(EndpointKey::new(v4, peer), EndpointKey::new(peer, v4));
        assert_ne!(EndpointKey::new(v4, peer), EndpointKey::new(v6, peer));
        assert_eq!(EndpointKey::new(v4, peer), EndpointKey::new(v4, peer));
    }
}
