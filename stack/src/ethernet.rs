//! The Ethernet adapter: a session as seen by a guest that wants a network card.
//!
//! Emulators (v86, QEMU, a Linux TAP) run guests with their own TCP/IP stacks; they speak
//! Ethernet. A webnic session carries IP packets. [`EthernetAdapter`] sits between the two,
//! with no I/O and no clock:
//!
//! ```text
//!  guest NIC ── frame ──▶ handle_frame ──▶ IP packet ──▶ session (datagram)
//!            ◀─ frame ── poll_frame ◀── ARP / DHCP / RA / NA replies
//!            ◀─ frame ── encapsulate ◀── IP packet ◀── session
//! ```
//!
//! It plays the guest's whole link: a virtual router with its own MAC that answers ARP for
//! every address but the guest's (so whatever mask the guest uses, every destination goes
//! through the session), a DHCPv4 server handing out the session's IPv4 address (`dhcp`),
//! and, when the session has IPv6, router advertisements (the session address's /64, MTU,
//! RDNSS) and neighbour advertisements. IPv6 guests configure themselves by SLAAC, so their
//! address is not the session's: the adapter maps the guest's one global address to the
//! session's address and back (a stateless one-to-one translation that fixes the TCP, UDP and
//! ICMPv6 checksums). Anything else — other ethertypes, broadcasts and multicasts, packets
//! from addresses that are not the guest's, frames too large for the session's MTU — is
//! counted by [`DropReason`] and dropped, never forwarded.
//!
//! ```
//! use webnic_stack::ethernet::{EthernetAdapter, EthernetConfig};
//! let mut config = EthernetConfig::new(1280);
//! config.ipv4 = Some("10.77.0.2".parse().unwrap());
//! let mut adapter = EthernetAdapter::new(config);
//! // A frame from the guest: forward the packet it carries, if any, then send the replies.
//! let mut frame = vec![0u8; 60];
//! if let Some(packet) = adapter.handle_frame(&mut frame) {
//!     // session.send(packet)
//! }
//! while let Some(reply) = adapter.poll_frame() {
//!     // guest.receive(reply)
//! }
//! ```

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Duration;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscPrefixInfoFlags, NdiscPrefixInformation,
    NdiscRepr, NdiscRouterFlags, UdpPacket, UdpRepr,
};

use crate::dhcp::{self, Lease};
pub use crate::dhcp::{DhcpClientMessage, DhcpExchange, DhcpServerMessage};

/// The virtual router's MAC unless configured otherwise: locally administered, unicast.
pub const DEFAULT_GATEWAY_MAC: [u8; 6] = [0x02, 0x77, 0x6e, 0x69, 0x63, 0x01];
/// The lease time handed out unless configured otherwise (one hour; T1 30 min).
pub const DEFAULT_LEASE_SECS: u32 = 3600;
/// Ethernet header length.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// The shortest frame on the wire (without FCS); shorter replies are zero-padded.
const MIN_FRAME_LEN: usize = 60;
/// Router lifetime in advertisements (the maximum RFC 4861 allows).
const ROUTER_LIFETIME_SECS: u64 = 9000;
/// RDNSS option (RFC 8106).
const NDISC_OPT_RDNSS: u8 = 25;
/// IPv6's minimum link MTU (RFC 8200 §5).
const IPV6_MIN_MTU: u16 = 1280;
/// How many frames wait in the reply queue at most; beyond that replies are dropped.
const MAX_QUEUED_FRAMES: usize = 64;

/// What the adapter serves: the session's addresses and link parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthernetConfig {
    /// The session's IPv4 address, handed to the guest by DHCP.
    pub ipv4: Option<Ipv4Addr>,
    /// The session's IPv6 address; with it the adapter sends router advertisements.
    pub ipv6: Option<Ipv6Addr>,
    /// The session's link MTU: the largest IP packet the guest may send (DHCP option 26, RA
    /// MTU option).
    pub mtu: u16,
    /// Resolvers: IPv4 ones go into DHCP, IPv6 ones into the RA's RDNSS option.
    pub dns_servers: Vec<IpAddr>,
    /// The virtual router's MAC address.
    pub gateway_mac: [u8; 6],
    /// DHCP lease time in seconds.
    pub lease_secs: u32,
}

impl EthernetConfig {
    /// The MTU the guest is told (DHCP option 26, RA MTU option): the session MTU, raised to
    /// IPv6's minimum of 1280 when the session has IPv6 (a Linux guest turns IPv6 off on a
    /// smaller link). TCP still fits the session MTU because the adapter clamps the MSS of
    /// every SYN; larger IPv4 packets get "fragmentation needed", larger IPv6 ones are dropped.
    pub fn link_mtu(&self) -> u16 {
        if self.ipv6.is_some() {
            self.mtu.max(IPV6_MIN_MTU)
        } else {
            self.mtu
        }
    }

    /// A configuration for a link of `mtu` with no addresses yet.
    pub fn new(mtu: u16) -> Self {
        Self {
            ipv4: None,
            ipv6: None,
            mtu,
            dns_servers: Vec::new(),
            gateway_mac: DEFAULT_GATEWAY_MAC,
            lease_secs: DEFAULT_LEASE_SECS,
        }
    }
}

/// Why a frame or packet was dropped. Each has a counter in [`EthernetStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Truncated or malformed frame, ARP, IP, DHCP or NDISC message.
    Malformed,
    /// A unicast frame for a MAC that is not the router's.
    NotForRouter,
    /// An ethertype other than IPv4, ARP and IPv6.
    UnknownEthertype,
    /// The session has no address of the packet's family.
    NoAddress,
    /// Broadcast, multicast or link-local destination that the adapter does not serve.
    NotRoutable,
    /// The source address is not the guest's (e.g. traffic before DHCP finished).
    WrongSource,
    /// The IP packet exceeds the session MTU.
    TooLarge,
    /// An ARP, DHCP or ICMPv6 message the adapter does not answer.
    Unhandled,
    /// A packet from the session arrived before the guest's MAC (or IPv6 address) was known.
    GuestUnknown,
    /// A packet from the session for an address that is not the session's.
    NotForGuest,
    /// The reply queue was full.
    QueueFull,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [Self; 11] = [
        Self::Malformed,
        Self::NotForRouter,
        Self::UnknownEthertype,
        Self::NoAddress,
        Self::NotRoutable,
        Self::WrongSource,
        Self::TooLarge,
        Self::Unhandled,
        Self::GuestUnknown,
        Self::NotForGuest,
        Self::QueueFull,
    ];

    /// A short snake_case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotForRouter => "not_for_router",
            Self::UnknownEthertype => "unknown_ethertype",
            Self::NoAddress => "no_address",
            Self::NotRoutable => "not_routable",
            Self::WrongSource => "wrong_source",
            Self::TooLarge => "too_large",
            Self::Unhandled => "unhandled",
            Self::GuestUnknown => "guest_unknown",
            Self::NotForGuest => "not_for_guest",
            Self::QueueFull => "queue_full",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of an [`EthernetAdapter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EthernetStats {
    /// Frames received from the guest.
    pub frames_from_guest: u64,
    /// IP packets passed on to the session.
    pub packets_to_session: u64,
    /// IP packets from the session framed for the guest.
    pub packets_to_guest: u64,
    /// ARP replies sent.
    pub arp_replies: u64,
    /// DHCP replies sent.
    pub dhcp_replies: u64,
    /// Router and neighbour advertisements sent.
    pub ndisc_replies: u64,
    /// Drops, indexed like [`DropReason::ALL`].
    drops: [u64; DropReason::ALL.len()],
}

impl EthernetStats {
    /// How many frames or packets were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// All drops.
    pub fn dropped_total(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Something the adapter learned or did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EthernetEvent {
    /// The guest's MAC address, first seen or changed.
    GuestMac([u8; 6]),
    /// A DHCP exchange.
    Dhcp(DhcpExchange),
    /// The guest's global IPv6 address that is mapped to the session's, first seen or changed.
    GuestIpv6(Ipv6Addr),
}

impl std::fmt::Display for EthernetEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestMac(mac) => write!(f, "guest MAC {}", EthernetAddress(*mac)),
            Self::Dhcp(exchange) => exchange.fmt(f),
            Self::GuestIpv6(address) => write!(f, "guest IPv6 address {address}"),
        }
    }
}

/// The sans-IO Ethernet side of a session (see the [module docs](self)).
///
/// Call [`handle_frame`](Self::handle_frame) for every frame from the guest and send what it
/// returns to the session; call [`encapsulate`](Self::encapsulate) for every packet from the
/// session and give the frame to the guest; after either, drain
/// [`poll_frame`](Self::poll_frame) (replies for the guest) and, if you log,
/// [`poll_event`](Self::poll_event). Every call does a bounded amount of work.
#[derive(Debug)]
pub struct EthernetAdapter {
    config: EthernetConfig,
    router_mac: EthernetAddress,
    lease: Option<Lease>,
    guest_mac: Option<EthernetAddress>,
    guest_ipv6: Option<Ipv6Addr>,
    replies: VecDeque<Vec<u8>>,
    events: VecDeque<EthernetEvent>,
    stats: EthernetStats,
}

impl EthernetAdapter {
    /// An adapter serving `config`.
    pub fn new(config: EthernetConfig) -> Self {
        let lease = config
            .ipv4
            .map(|a| Lease::around(a, config.link_mtu(), &config.dns_servers, config.lease_secs));
        Self {
            router_mac: EthernetAddress(config.gateway_mac),
            lease,
            config,
            guest_mac: None,
            guest_ipv6: None,
            replies: VecDeque::new(),
            events: VecDeque::new(),
            stats: EthernetStats::default(),
        }
    }

    /// The configuration it serves.
    pub fn config(&self) -> &EthernetConfig {
        &self.config
    }

    /// The virtual router's IPv4 address (DHCP server identifier and default route), if the
    /// session has IPv4.
    pub fn router_ipv4(&self) -> Option<Ipv4Addr> {
        self.lease.as_ref().map(|l| l.router)
    }

    /// The virtual router's link-local IPv6 address (the guest's default route).
    pub fn router_ipv6(&self) -> Ipv6Addr {
        link_local(self.router_mac)
    }

    /// The guest's MAC, once it sent a frame.
    pub fn guest_mac(&self) -> Option<[u8; 6]> {
        self.guest_mac.map(|m| m.0)
    }

    /// The guest's global IPv6 address that stands for the session's, once it used one.
    pub fn guest_ipv6(&self) -> Option<Ipv6Addr> {
        self.guest_ipv6
    }

    /// Counters.
    pub fn stats(&self) -> EthernetStats {
        self.stats
    }

    /// Takes a frame from the guest.
    ///
    /// Returns the IP packet it carries when that goes to the session (a slice of `frame`,
    /// trimmed of Ethernet padding; IPv6 sources are rewritten in place). ARP, DHCP and NDISC
    /// are answered through [`poll_frame`](Self::poll_frame); anything else is counted and
    /// dropped.
    pub fn handle_frame<'a>(&mut self, frame: &'a mut [u8]) -> Option<&'a [u8]> {
        self.stats.frames_from_guest += 1;
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            return self.drop(DropReason::Malformed);
        };
        let (src, dst, ethertype) = (eth.src_addr(), eth.dst_addr(), eth.ethertype());
        if dst.is_unicast() && dst != self.router_mac {
            return self.drop(DropReason::NotForRouter);
        }
        if src.is_unicast() && self.guest_mac != Some(src) {
            self.guest_mac = Some(src);
            self.event(EthernetEvent::GuestMac(src.0));
        }
        let payload = &mut frame[ETHERNET_HEADER_LEN..];
        match ethertype {
            EthernetProtocol::Arp => {
                self.handle_arp(payload);
                None
            }
            EthernetProtocol::Ipv4 => self.handle_ipv4(src, payload),
            EthernetProtocol::Ipv6 => self.handle_ipv6(src, payload),
            EthernetProtocol::Unknown(_) => self.drop(DropReason::UnknownEthertype),
        }
    }

    /// Frames an IP packet from the session for the guest, into `out` (cleared first).
    ///
    /// Returns `false`, counting the reason, when the packet cannot go to the guest: not for
    /// the session's address, or the guest's MAC is not known yet.
    pub fn encapsulate(&mut self, packet: &[u8], out: &mut Vec<u8>) -> bool {
        out.clear();
        let Some(guest_mac) = self.guest_mac else {
            self.drop(DropReason::GuestUnknown);
            return false;
        };
        let ethertype = match packet.first().map(|b| b >> 4) {
            Some(4) => {
                let Ok(ip) = Ipv4Packet::new_checked(packet) else {
                    self.drop(DropReason::Malformed);
                    return false;
                };
                if Some(ip.dst_addr()) != self.config.ipv4 {
                    self.drop(DropReason::NotForGuest);
                    return false;
                }
                EthernetProtocol::Ipv4
            }
            Some(6) => {
                let Ok(ip) = Ipv6Packet::new_checked(packet) else {
                    self.drop(DropReason::Malformed);
                    return false;
                };
                if Some(ip.dst_addr()) != self.config.ipv6 {
                    self.drop(DropReason::NotForGuest);
                    return false;
                }
                if self.guest_ipv6.is_none() {
                    self.drop(DropReason::GuestUnknown);
                    return false;
                }
                EthernetProtocol::Ipv6
            }
            _ => {
                self.drop(DropReason::Malformed);
                return false;
            }
        };
        out.resize(ETHERNET_HEADER_LEN + packet.len(), 0);
        EthernetRepr {
            src_addr: self.router_mac,
            dst_addr: guest_mac,
            ethertype,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut out[..]));
        out[ETHERNET_HEADER_LEN..].copy_from_slice(packet);
        if let (EthernetProtocol::Ipv6, Some(session), Some(guest)) =
            (ethertype, self.config.ipv6, self.guest_ipv6)
        {
            rewrite_ipv6(
                &mut out[ETHERNET_HEADER_LEN..],
                Side::Destination,
                session,
                guest,
            );
        }
        // The guest's SYN-ACKs are clamped on the way out; servers' SYNs on the way in.
        clamp_mss(&mut out[ETHERNET_HEADER_LEN..], self.config.mtu);
        self.stats.packets_to_guest += 1;
        true
    }

    /// The next reply frame for the guest (ARP, DHCP, RA, NA), oldest first.
    pub fn poll_frame(&mut self) -> Option<Vec<u8>> {
        self.replies.pop_front()
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<EthernetEvent> {
        self.events.pop_front()
    }

    // ------------------------------------------------------------------------------ ARP

    fn handle_arp(&mut self, payload: &[u8]) {
        let Ok(packet) = ArpPacket::new_checked(payload) else {
            self.drop(DropReason::Malformed);
            return;
        };
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&packet)
        else {
            self.drop(DropReason::Malformed);
            return;
        };
        let Some(guest_ip) = self.config.ipv4 else {
            self.drop(DropReason::NoAddress);
            return;
        };
        // Replies (to nobody: the router never asks), gratuitous announcements and probes for
        // the guest's own address (duplicate address detection must find no one) stay unanswered.
        if operation != ArpOperation::Request
            || target_protocol_addr == guest_ip
            || target_protocol_addr == source_protocol_addr
        {
            self.drop(DropReason::Unhandled);
            return;
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: self.router_mac,
            source_protocol_addr: target_protocol_addr,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let mut frame = self.frame(
            source_hardware_addr,
            EthernetProtocol::Arp,
            reply.buffer_len(),
        );
        reply.emit(&mut ArpPacket::new_unchecked(
            &mut frame[ETHERNET_HEADER_LEN..],
        ));
        self.stats.arp_replies += 1;
        self.queue(frame);
    }

    // ------------------------------------------------------------------------------ IPv4

    fn handle_ipv4<'a>(
        &mut self,
        src_mac: EthernetAddress,
        payload: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        // smoltcp's `new_checked` checks lengths, not the version nibble.
        let Ok(ip) = Ipv4Packet::new_checked(&payload[..]).and_then(|ip| {
            if ip.version() == 4 {
                Ok(ip)
            } else {
                Err(smoltcp::wire::Error)
            }
        }) else {
            return self.drop(DropReason::Malformed);
        };
        let total = usize::from(ip.total_len());
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        if ip.next_header() == IpProtocol::Udp && !ip.more_frags() && ip.frag_offset() == 0 {
            let header = usize::from(ip.header_len());
            if let Ok(udp) = UdpPacket::new_checked(&payload[header..total])
                && udp.dst_port() == 67
            {
                self.handle_dhcp(src_mac, udp.payload());
                return None;
            }
        }
        let Some(guest_ip) = self.config.ipv4 else {
            return self.drop(DropReason::NoAddress);
        };
        if dst.is_broadcast()
            || dst.is_multicast()
            || dst.is_unspecified()
            || self
                .lease
                .as_ref()
                .is_some_and(|l| is_subnet_broadcast(dst, l))
        {
            return self.drop(DropReason::NotRoutable);
        }
        if src != guest_ip {
            return self.drop(DropReason::WrongSource);
        }
        if total > usize::from(self.config.mtu) {
            if ip.dont_frag() {
                self.send_fragmentation_needed(src_mac, &payload[..total]);
            }
            return self.drop(DropReason::TooLarge);
        }
        let packet = &mut payload[..total];
        clamp_mss(packet, self.config.mtu);
        self.stats.packets_to_session += 1;
        Some(packet)
    }

    /// ICMP "fragmentation needed" with the session MTU, so the guest's path MTU discovery
    /// shrinks its packets (RFC 1191).
    fn send_fragmentation_needed(&mut self, dst_mac: EthernetAddress, original: &[u8]) {
        let (Some(router), Some(guest)) = (self.router_ipv4(), self.config.ipv4) else {
            return;
        };
        let header_len = usize::from(original[0] & 0x0f) * 4;
        let quoted = &original[..(header_len + 8).min(original.len())];
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&self.config.mtu.to_be_bytes());
        icmp.extend_from_slice(quoted);
        let checksum = !smoltcp::wire::checksum::data(&icmp);
        icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
        let ip = Ipv4Repr {
            src_addr: router,
            dst_addr: guest,
            next_header: IpProtocol::Icmp,
            payload_len: icmp.len(),
            hop_limit: 64,
        };
        let mut frame = self.frame(
            dst_mac,
            EthernetProtocol::Ipv4,
            ip.buffer_len() + icmp.len(),
        );
        let mut packet = Ipv4Packet::new_unchecked(&mut frame[ETHERNET_HEADER_LEN..]);
        ip.emit(&mut packet, &ChecksumCapabilities::default());
        packet.payload_mut()[..icmp.len()].copy_from_slice(&icmp);
        self.queue(frame);
    }

    fn handle_dhcp(&mut self, src_mac: EthernetAddress, payload: &[u8]) {
        let Some(lease) = &self.lease else {
            self.drop(DropReason::NoAddress);
            return;
        };
        let Some((exchange, reply)) = dhcp::handle(lease, payload) else {
            self.drop(DropReason::Unhandled);
            return;
        };
        let router = lease.router;
        self.event(EthernetEvent::Dhcp(exchange));
        let Some(reply) = reply else {
            return;
        };
        let dst_mac = if reply.dst_mac.is_unicast() {
            reply.dst_mac
        } else if reply.dst_ip == Ipv4Addr::BROADCAST {
            EthernetAddress::BROADCAST
        } else {
            src_mac
        };
        let udp = UdpRepr {
            src_port: 67,
            dst_port: 68,
        };
        let ip = Ipv4Repr {
            src_addr: router,
            dst_addr: reply.dst_ip,
            next_header: IpProtocol::Udp,
            payload_len: udp.header_len() + reply.payload.len(),
            hop_limit: 64,
        };
        let mut frame = self.frame(
            dst_mac,
            EthernetProtocol::Ipv4,
            ip.buffer_len() + ip.payload_len,
        );
        let caps = ChecksumCapabilities::default();
        let mut packet = Ipv4Packet::new_unchecked(&mut frame[ETHERNET_HEADER_LEN..]);
        ip.emit(&mut packet, &caps);
        udp.emit(
            &mut UdpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv4(router),
            &IpAddress::Ipv4(reply.dst_ip),
            reply.payload.len(),
            |buf| buf.copy_from_slice(&reply.payload),
            &caps,
        );
        self.stats.dhcp_replies += 1;
        self.queue(frame);
    }

    // ------------------------------------------------------------------------------ IPv6

    fn handle_ipv6<'a>(
        &mut self,
        src_mac: EthernetAddress,
        payload: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        let Ok(ip) = Ipv6Packet::new_checked(&payload[..]).and_then(|ip| {
            if ip.version() == 6 {
                Ok(ip)
            } else {
                Err(smoltcp::wire::Error)
            }
        }) else {
            return self.drop(DropReason::Malformed);
        };
        let total = ip.total_len();
        let (src, dst) = (ip.src_addr(), ip.dst_addr());
        let Some(session) = self.config.ipv6 else {
            return self.drop(DropReason::NoAddress);
        };
        // NDISC messages are link-local business: hop limit 255 (RFC 4861 §6.1).
        if ip.next_header() == IpProtocol::Icmpv6
            && let Ok(icmp) = Icmpv6Packet::new_checked(&payload[40..total])
            && matches!(icmp.msg_type().into(), 133..=137)
        {
            if ip.hop_limit() == 255 {
                self.handle_ndisc(src_mac, src, dst, &payload[40..total]);
            } else {
                self.drop(DropReason::Malformed);
            }
            return None;
        }
        if dst.is_multicast() || dst.is_unicast_link_local() || dst.is_unspecified() {
            return self.drop(DropReason::NotRoutable);
        }
        if !same_64(src, session) || src.is_unspecified() {
            return self.drop(DropReason::WrongSource);
        }
        if total > usize::from(self.config.mtu) {
            return self.drop(DropReason::TooLarge);
        }
        if self.guest_ipv6 != Some(src) {
            self.guest_ipv6 = Some(src);
            self.event(EthernetEvent::GuestIpv6(src));
        }
        let packet = &mut payload[..total];
        rewrite_ipv6(packet, Side::Source, src, session);
        clamp_mss(packet, self.config.mtu);
        self.stats.packets_to_session += 1;
        Some(packet)
    }

    fn handle_ndisc(
        &mut self,
        src_mac: EthernetAddress,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        icmp: &[u8],
    ) {
        let caps = ChecksumCapabilities::default();
        let Ok(packet) = Icmpv6Packet::new_checked(icmp) else {
            self.drop(DropReason::Malformed);
            return;
        };
        let Ok(Icmpv6Repr::Ndisc(repr)) = Icmpv6Repr::parse(&src, &dst, &packet, &caps) else {
            self.drop(DropReason::Malformed);
            return;
        };
        match repr {
            NdiscRepr::RouterSolicit { .. } => self.send_router_advert(src_mac, src),
            NdiscRepr::NeighborSolicit { target_addr, .. } => {
                // DAD probes (from ::) must find no one; the guest's own addresses are its own.
                if src.is_unspecified()
                    || self.guest_ipv6 == Some(target_addr)
                    || target_addr == link_local(src_mac)
                    || target_addr.is_multicast()
                {
                    self.drop(DropReason::Unhandled);
                    return;
                }
                let advert = NdiscRepr::NeighborAdvert {
                    flags: NdiscNeighborFlags::ROUTER
                        | NdiscNeighborFlags::SOLICITED
                        | NdiscNeighborFlags::OVERRIDE,
                    target_addr,
                    lladdr: Some(self.router_mac.into()),
                };
                let from = if target_addr.is_unicast_link_local() {
                    target_addr
                } else {
                    self.router_ipv6()
                };
                self.send_icmpv6(src_mac, from, src, &Icmpv6Repr::Ndisc(advert), &[]);
            }
            _ => {
                self.drop(DropReason::Unhandled);
            }
        }
    }

    /// Answers a router solicitation from `mac`/`src` (RFC 4861 §6.2.6 allows unicast): some
    /// emulated NICs (v86's ne2k) filter multicast the guest never asked them to receive.
    fn send_router_advert(&mut self, mac: EthernetAddress, src: Ipv6Addr) {
        let Some(session) = self.config.ipv6 else {
            self.drop(DropReason::NoAddress);
            return;
        };
        let mut prefix = session.octets();
        prefix[8..].fill(0);
        let advert = NdiscRepr::RouterAdvert {
            hop_limit: 64,
            flags: NdiscRouterFlags::empty(),
            router_lifetime: Duration::from_secs(ROUTER_LIFETIME_SECS),
            reachable_time: Duration::from_millis(0),
            retrans_time: Duration::from_millis(0),
            lladdr: Some(self.router_mac.into()),
            mtu: Some(u32::from(self.config.link_mtu())),
            prefix_info: Some(NdiscPrefixInformation {
                prefix_len: 64,
                flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
                // The address lives as long as the session; "infinite" (RFC 4861 §4.6.2).
                valid_lifetime: Duration::from_secs(u64::from(u32::MAX)),
                preferred_lifetime: Duration::from_secs(u64::from(u32::MAX)),
                prefix: Ipv6Addr::from(prefix),
            }),
        };
        let servers: Vec<Ipv6Addr> = self
            .config
            .dns_servers
            .iter()
            .filter_map(|s| match s {
                IpAddr::V6(v6) => Some(*v6),
                IpAddr::V4(_) => None,
            })
            .collect();
        let mut rdnss = Vec::new();
        if !servers.is_empty() {
            // Type, length in 8-byte units, reserved, lifetime, then the addresses.
            let units = 1 + 2 * servers.len();
            rdnss.extend_from_slice(&[NDISC_OPT_RDNSS, units as u8, 0, 0]);
            rdnss.extend_from_slice(&(ROUTER_LIFETIME_SECS as u32).to_be_bytes());
            for server in servers {
                rdnss.extend_from_slice(&server.octets());
            }
        }
        // From :: (before its link-local address is ready) a solicitor gets it at all-nodes.
        let dst = if src.is_unspecified() {
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)
        } else {
            src
        };
        self.send_icmpv6(
            mac,
            self.router_ipv6(),
            dst,
            &Icmpv6Repr::Ndisc(advert),
            &rdnss,
        );
    }

    /// Queues an ICMPv6 message from the router, with `trailer` (extra NDISC options) after it.
    fn send_icmpv6(
        &mut self,
        dst_mac: EthernetAddress,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        repr: &Icmpv6Repr<'_>,
        trailer: &[u8],
    ) {
        let icmp_len = repr.buffer_len() + trailer.len();
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: icmp_len,
            hop_limit: 255,
        };
        let mut frame = self.frame(dst_mac, EthernetProtocol::Ipv6, ip.buffer_len() + icmp_len);
        let mut packet = Ipv6Packet::new_unchecked(&mut frame[ETHERNET_HEADER_LEN..]);
        ip.emit(&mut packet);
        let icmp_bytes = &mut packet.payload_mut()[..icmp_len];
        let caps = ChecksumCapabilities::default();
        repr.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(&mut icmp_bytes[..]),
            &caps,
        );
        icmp_bytes[repr.buffer_len()..].copy_from_slice(trailer);
        // The checksum covers the trailer too.
        Icmpv6Packet::new_unchecked(&mut icmp_bytes[..]).fill_checksum(&src, &dst);
        self.stats.ndisc_replies += 1;
        self.queue(frame);
    }

    // ------------------------------------------------------------------------------ helpers

    /// A zeroed frame from the router to `dst` with room for `payload_len` bytes (padded to the
    /// Ethernet minimum).
    fn frame(
        &self,
        dst: EthernetAddress,
        ethertype: EthernetProtocol,
        payload_len: usize,
    ) -> Vec<u8> {
        let mut frame = vec![0u8; (ETHERNET_HEADER_LEN + payload_len).max(MIN_FRAME_LEN)];
        EthernetRepr {
            src_addr: self.router_mac,
            dst_addr: dst,
            ethertype,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        frame
    }

    fn queue(&mut self, frame: Vec<u8>) {
        if self.replies.len() >= MAX_QUEUED_FRAMES {
            self.drop(DropReason::QueueFull);
            return;
        }
        self.replies.push_back(frame);
    }

    fn event(&mut self, event: EthernetEvent) {
        // Events are for logs: the oldest go when nobody reads them.
        if self.events.len() >= MAX_QUEUED_FRAMES {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    fn drop(&mut self, reason: DropReason) -> Option<&'static [u8]> {
        self.stats.drops[reason.index()] += 1;
        None
    }
}

/// The EUI-64 link-local address of `mac` (RFC 4291 appendix A).
fn link_local(mac: EthernetAddress) -> Ipv6Addr {
    let m = mac.0;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 0x02,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

fn same_64(a: Ipv6Addr, b: Ipv6Addr) -> bool {
    a.octets()[..8] == b.octets()[..8]
}

fn is_subnet_broadcast(dst: Ipv4Addr, lease: &Lease) -> bool {
    let mask = u32::from(lease.netmask);
    u32::from(dst) | mask == u32::MAX && u32::from(dst) & mask == u32::from(lease.address) & mask
}

/// Lowers the MSS option of a TCP SYN so that segments fit `mtu` (the session MTU may be below
/// what the guest's link says, e.g. 1152 against IPv6's 1280). Fixes the TCP checksum
/// incrementally. Packets that are not TCP SYNs, or whose TCP header follows IPv6 extension
/// headers, are left alone.
fn clamp_mss(packet: &mut [u8], mtu: u16) {
    let (tcp_at, overhead) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 && packet[9] == 6 => {
            // Fragments other than the first carry no TCP header.
            if u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0 {
                return;
            }
            (usize::from(packet[0] & 0x0f) * 4, 40)
        }
        Some(6) if packet.len() >= 40 && packet[6] == 6 => (40, 60),
        _ => return,
    };
    let Some(tcp) = packet.get_mut(tcp_at..) else {
        return;
    };
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return;
    }
    let limit = mtu.saturating_sub(overhead);
    let header_len = (usize::from(tcp[12] >> 4) * 4).min(tcp.len());
    let mut at = 20;
    while at < header_len {
        match tcp[at] {
            0 => return,
            1 => at += 1,
            kind => {
                let Some(&len) = tcp.get(at + 1) else { return };
                let len = usize::from(len);
                if len < 2 || at + len > header_len {
                    return;
                }
                if kind == 2 && len == 4 {
                    let mss = u16::from_be_bytes([tcp[at + 2], tcp[at + 3]]);
                    if mss > limit {
                        tcp[at + 2..at + 4].copy_from_slice(&limit.to_be_bytes());
                        let old = u16::from_be_bytes([tcp[16], tcp[17]]);
                        let sum = u32::from(!old) + u32::from(!mss) + u32::from(limit);
                        let sum = (sum & 0xffff) + (sum >> 16);
                        let sum = (sum & 0xffff) + (sum >> 16);
                        tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                    }
                    return;
                }
                at += len;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Replaces `from` by `to` as the source or destination of an IPv6 packet, and fixes the TCP,
/// UDP or ICMPv6 checksum when that header follows the IPv6 header directly (the checksum
/// covers the addresses through the pseudo-header). Incremental update per RFC 1624.
fn rewrite_ipv6(packet: &mut [u8], side: Side, from: Ipv6Addr, to: Ipv6Addr) {
    let offset = match side {
        Side::Source => 8,
        Side::Destination => 24,
    };
    packet[offset..offset + 16].copy_from_slice(&to.octets());
    let checksum_at = match packet[6] {
        6 => 40 + 16,
        17 => 40 + 6,
        58 => 40 + 2,
        _ => return,
    };
    if packet.len() < checksum_at + 2 {
        return;
    }
    let old = u16::from_be_bytes([packet[checksum_at], packet[checksum_at + 1]]);
    if packet[6] == 17 && old == 0 {
        return;
    }
    let mut sum = u32::from(!old);
    for (a, b) in from.octets().chunks(2).zip(to.octets().chunks(2)) {
        sum += u32::from(!u16::from_be_bytes([a[0], a[1]]));
        sum += u32::from(u16::from_be_bytes([b[0], b[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut new = !(sum as u16);
    if packet[6] == 17 && new == 0 {
        new = 0xffff;
    }
    packet[checksum_at..checksum_at + 2].copy_from_slice(&new.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr, NdiscOption, NdiscOptionRepr};

    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const SESSION_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 9);
    const SESSION_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 9);
    const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 7, 2);
    const DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 7, 0, 0, 0, 0, 2);
    const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 7, 0, 0, 0, 0, 2);

    /// A frame captured from a real guest (see testdata/guest_frames.txt for the origin).
    fn captured(name: &str) -> Vec<u8> {
        let line = include_str!("testdata/guest_frames.txt")
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no captured frame {name}"));
        (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn adapter() -> EthernetAdapter {
        let mut config = EthernetConfig::new(1280);
        config.ipv4 = Some(SESSION_V4);
        config.ipv6 = Some(SESSION_V6);
        config.dns_servers = vec![IpAddr::V4(DNS_V4), IpAddr::V6(DNS_V6)];
        EthernetAdapter::new(config)
    }

    fn only_reply(adapter: &mut EthernetAdapter) -> Vec<u8> {
        let reply = adapter.poll_frame().expect("a reply");
        assert!(adapter.poll_frame().is_none(), "exactly one reply");
        reply
    }

    /// Splits a reply frame into its IPv4 header and UDP payload, checking both checksums.
    fn dhcp_reply(frame: &[u8]) -> (EthernetAddress, Ipv4Repr, Vec<u8>) {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
        assert_eq!(eth.src_addr(), EthernetAddress(DEFAULT_GATEWAY_MAC));
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let caps = ChecksumCapabilities::default();
        let ip_repr = Ipv4Repr::parse(&ip, &caps).expect("valid IPv4 header checksum");
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        let udp_repr = UdpRepr::parse(
            &udp,
            &IpAddress::Ipv4(ip_repr.src_addr),
            &IpAddress::Ipv4(ip_repr.dst_addr),
            &caps,
        )
        .expect("valid UDP checksum");
        assert_eq!((udp_repr.src_port, udp_repr.dst_port), (67, 68));
        (eth.dst_addr(), ip_repr, udp.payload().to_vec())
    }

    /// Message type and `yiaddr` of a DHCP reply.
    struct Parsed {
        message_type: DhcpMessageType,
        your_ip: Ipv4Addr,
    }

    fn parse_dhcp(payload: &[u8]) -> Parsed {
        let packet = DhcpPacket::new_checked(payload).unwrap();
        let repr = DhcpRepr::parse(&packet).unwrap();
        Parsed {
            message_type: repr.message_type,
            your_ip: repr.your_ip,
        }
    }

    /// A DHCP client message like udhcpc's, for the exchanges after the captured DISCOVER.
    fn client_message(
        message_type: DhcpMessageType,
        ciaddr: Ipv4Addr,
        requested: Option<Ipv4Addr>,
        server: Option<Ipv4Addr>,
    ) -> Vec<u8> {
        let repr = DhcpRepr {
            message_type,
            transaction_id: 0x1234_5678,
            secs: 0,
            client_hardware_address: EthernetAddress(GUEST_MAC),
            client_ip: ciaddr,
            your_ip: Ipv4Addr::UNSPECIFIED,
            server_ip: Ipv4Addr::UNSPECIFIED,
            router: None,
            subnet_mask: None,
            relay_agent_ip: Ipv4Addr::UNSPECIFIED,
            broadcast: false,
            requested_ip: requested,
            client_identifier: Some(EthernetAddress(GUEST_MAC)),
            server_identifier: server,
            parameter_request_list: Some(&[1, 3, 6, 12, 15, 28, 42]),
            dns_servers: None,
            max_size: Some(576),
            lease_duration: None,
            renew_duration: None,
            rebind_duration: None,
            additional_options: &[],
        };
        let mut dhcp = vec![0u8; repr.buffer_len()];
        repr.emit(&mut DhcpPacket::new_unchecked(&mut dhcp[..]))
            .unwrap();
        let (src, dst) = if ciaddr.is_unspecified() {
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST)
        } else {
            (ciaddr, server.unwrap_or(Ipv4Addr::BROADCAST))
        };
        let udp = UdpRepr {
            src_port: 68,
            dst_port: 67,
        };
        let ip = Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Udp,
            payload_len: 8 + dhcp.len(),
            hop_limit: 64,
        };
        let mut frame = vec![0u8; 14 + 20 + 8 + dhcp.len()];
        EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        let caps = ChecksumCapabilities::default();
        let mut packet = Ipv4Packet::new_unchecked(&mut frame[14..]);
        ip.emit(&mut packet, &caps);
        udp.emit(
            &mut UdpPacket::new_unchecked(packet.payload_mut()),
            &IpAddress::Ipv4(src),
            &IpAddress::Ipv4(dst),
            dhcp.len(),
            |b| b.copy_from_slice(&dhcp),
            &caps,
        );
        frame
    }

    #[test]
    fn udhcpc_discover_gets_an_offer_with_every_option() {
        let mut adapter = adapter();
        let mut frame = captured("udhcpc_discover");
        assert!(adapter.handle_frame(&mut frame).is_none());
        let (dst_mac, ip, payload) = dhcp_reply(&only_reply(&mut adapter));
        assert_eq!(dst_mac, EthernetAddress(GUEST_MAC));
        assert_eq!(ip.src_addr, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(ip.dst_addr, Ipv4Addr::BROADCAST);
        assert!(payload.len() >= 300, "BOOTP minimum length");
        let packet = DhcpPacket::new_checked(&payload[..]).unwrap();
        let offer = DhcpRepr::parse(&packet).unwrap();
        assert_eq!(offer.message_type, DhcpMessageType::Offer);
        assert_eq!(
            offer.transaction_id, 0x737e_e34f,
            "xid of the captured DISCOVER"
        );
        assert_eq!(offer.your_ip, SESSION_V4);
        assert_eq!(offer.router, Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(offer.server_identifier, Some(Ipv4Addr::new(10, 77, 0, 1)));
        assert_eq!(offer.subnet_mask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(offer.lease_duration, Some(DEFAULT_LEASE_SECS));
        assert_eq!(offer.renew_duration, Some(DEFAULT_LEASE_SECS / 2));
        assert_eq!(
            offer.dns_servers.as_ref().map(|d| d.to_vec()),
            Some(vec![DNS_V4]),
            "IPv4 resolvers only"
        );
        let mtu = packet
            .options()
            .find(|o| o.kind == 26)
            .expect("interface MTU option");
        assert_eq!(mtu.data, 1280u16.to_be_bytes());
        assert_eq!(adapter.guest_mac(), Some(GUEST_MAC));
        assert_eq!(
            adapter.poll_event(),
            Some(EthernetEvent::GuestMac(GUEST_MAC))
        );
        let Some(EthernetEvent::Dhcp(exchange)) = adapter.poll_event() else {
            panic!("a DHCP event");
        };
        assert_eq!(exchange.received, DhcpClientMessage::Discover);
        assert_eq!(exchange.sent, Some(DhcpServerMessage::Offer));
        assert_eq!(exchange.offered, Some(SESSION_V4));
        assert_eq!(adapter.stats().dhcp_replies, 1);
        assert_eq!(adapter.stats().dropped_total(), 0);
    }

    #[test]
    fn request_for_the_session_address_is_acked_and_others_are_naked() {
        let mut adapter = adapter();
        let router = Ipv4Addr::new(10, 77, 0, 1);
        // Selecting: broadcast REQUEST naming this server and the offered address.
        let mut frame = client_message(
            DhcpMessageType::Request,
            Ipv4Addr::UNSPECIFIED,
            Some(SESSION_V4),
            Some(router),
        );
        assert!(adapter.handle_frame(&mut frame).is_none());
        let (_, ip, payload) = dhcp_reply(&only_reply(&mut adapter));
        assert_eq!(ip.dst_addr, Ipv4Addr::BROADCAST);
        let ack = parse_dhcp(&payload);
        assert_eq!(ack.message_type, DhcpMessageType::Ack);
        assert_eq!(ack.your_ip, SESSION_V4);

        // Renewing: unicast from the leased address; the ACK goes back by unicast.
        let mut frame = client_message(DhcpMessageType::Request, SESSION_V4, None, None);
        assert!(adapter.handle_frame(&mut frame).is_none());
        let (dst_mac, ip, payload) = dhcp_reply(&only_reply(&mut adapter));
        assert_eq!(
            (dst_mac, ip.dst_addr),
            (EthernetAddress(GUEST_MAC), SESSION_V4)
        );
        let ack = parse_dhcp(&payload);
        assert_eq!(ack.message_type, DhcpMessageType::Ack);

        // Init-reboot with an address from another network: NAK, broadcast.
        let mut frame = client_message(
            DhcpMessageType::Request,
            Ipv4Addr::UNSPECIFIED,
            Some(Ipv4Addr::new(192, 168, 1, 50)),
            None,
        );
        assert!(adapter.handle_frame(&mut frame).is_none());
        let (dst_mac, ip, payload) = dhcp_reply(&only_reply(&mut adapter));
        assert_eq!(
            (dst_mac, ip.dst_addr),
            (EthernetAddress::BROADCAST, Ipv4Addr::BROADCAST)
        );
        let nak = parse_dhcp(&payload);
        assert_eq!(nak.message_type, DhcpMessageType::Nak);
        assert_eq!(nak.your_ip, Ipv4Addr::UNSPECIFIED);

        // A REQUEST for another server's offer is not ours to answer.
        let mut frame = client_message(
            DhcpMessageType::Request,
            Ipv4Addr::UNSPECIFIED,
            Some(SESSION_V4),
            Some(Ipv4Addr::new(10, 0, 0, 99)),
        );
        assert!(adapter.handle_frame(&mut frame).is_none());
        assert!(adapter.poll_frame().is_none());
        assert_eq!(adapter.stats().dropped(DropReason::Unhandled), 1);

        // RELEASE: no answer, no drop.
        let mut frame = client_message(DhcpMessageType::Release, SESSION_V4, None, Some(router));
        assert!(adapter.handle_frame(&mut frame).is_none());
        assert!(adapter.poll_frame().is_none());
        assert_eq!(adapter.stats().dhcp_replies, 3);
    }

    #[test]
    fn arp_for_the_router_is_answered_and_probes_for_the_guest_are_not() {
        let mut adapter = adapter();
        let mut frame = captured("arp_request_router");
        assert!(adapter.handle_frame(&mut frame).is_none());
        let reply = only_reply(&mut adapter);
        assert_eq!(reply.len(), 60, "padded to the Ethernet minimum");
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
        let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).unwrap()).unwrap();
        assert_eq!(
            arp,
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(DEFAULT_GATEWAY_MAC),
                source_protocol_addr: Ipv4Addr::new(10, 77, 0, 1),
                target_hardware_addr: EthernetAddress(GUEST_MAC),
                target_protocol_addr: SESSION_V4,
            }
        );

        let mut frame = captured("arp_probe_own");
        assert!(adapter.handle_frame(&mut frame).is_none());
        assert!(
            adapter.poll_frame().is_none(),
            "duplicate address detection finds no one"
        );
        assert_eq!(adapter.stats().dropped(DropReason::Unhandled), 1);
        assert_eq!(adapter.stats().arp_replies, 1);
    }

    #[test]
    fn router_solicitation_gets_an_advertisement_with_prefix_mtu_and_rdnss() {
        let mut adapter = adapter();
        let mut frame = captured("router_solicit");
        assert!(adapter.handle_frame(&mut frame).is_none());
        let reply = only_reply(&mut adapter);
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(
            eth.dst_addr(),
            EthernetAddress(GUEST_MAC),
            "unicast to the solicitor"
        );
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let ip_repr = Ipv6Repr::parse(&ip).unwrap();
        assert_eq!(ip_repr.hop_limit, 255);
        assert_eq!(ip_repr.src_addr, adapter.router_ipv6());
        assert_eq!(
            ip_repr.dst_addr,
            link_local(EthernetAddress(GUEST_MAC)),
            "to the solicitor's link-local address"
        );
        assert!(ip_repr.src_addr.is_unicast_link_local());
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let caps = ChecksumCapabilities::default();
        let repr = Icmpv6Repr::parse(&ip_repr.src_addr, &ip_repr.dst_addr, &icmp, &caps)
            .expect("valid ICMPv6 checksum over the RDNSS option too");
        let Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
            router_lifetime,
            mtu,
            prefix_info: Some(prefix),
            lladdr: Some(lladdr),
            ..
        }) = repr
        else {
            panic!("a router advertisement with a prefix: {repr:?}");
        };
        assert_eq!(router_lifetime, Duration::from_secs(ROUTER_LIFETIME_SECS));
        assert_eq!(mtu, Some(1280));
        assert_eq!(lladdr.as_bytes(), DEFAULT_GATEWAY_MAC);
        assert_eq!(prefix.prefix_len, 64);
        assert_eq!(prefix.prefix, Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0));
        assert!(prefix.flags.contains(NdiscPrefixInfoFlags::ADDRCONF));
        // The RDNSS option sits after the options smoltcp knows.
        let mut options = icmp.payload();
        let mut rdnss = None;
        while !options.is_empty() {
            let option = NdiscOption::new_checked(options).unwrap();
            let len = usize::from(option.data_len()) * 8;
            if let Ok(NdiscOptionRepr::Unknown {
                type_: 25, data, ..
            }) = NdiscOptionRepr::parse(&option)
            {
                rdnss = Some(data.to_vec());
            }
            options = &options[len..];
        }
        let rdnss = rdnss.expect("an RDNSS option");
        assert_eq!(&rdnss[6..22], &DNS_V6.octets());
        assert_eq!(adapter.stats().ndisc_replies, 1);
    }

    #[test]
    fn dad_probes_and_mld_reports_are_dropped_and_counted() {
        let mut adapter = adapter();
        let mut frame = captured("ns_dad");
        assert!(adapter.handle_frame(&mut frame).is_none());
        let mut frame = captured("mld_report_unspecified");
        assert!(adapter.handle_frame(&mut frame).is_none());
        assert!(adapter.poll_frame().is_none());
        assert_eq!(adapter.stats().dropped(DropReason::Unhandled), 1);
        assert_eq!(adapter.stats().dropped(DropReason::NotRoutable), 1);
    }

    #[test]
    fn neighbour_solicitation_for_any_other_address_is_answered_by_the_router() {
        let mut adapter = adapter();
        let guest_ll = link_local(EthernetAddress(GUEST_MAC));
        let target = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
        let solicit = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr: Some(EthernetAddress(GUEST_MAC).into()),
        });
        let mut frame = ipv6_frame(
            guest_ll,
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 1),
            |src, dst, buf| {
                solicit.emit(
                    src,
                    dst,
                    &mut Icmpv6Packet::new_unchecked(buf),
                    &ChecksumCapabilities::default(),
                );
            },
            solicit.buffer_len(),
            IpProtocol::Icmpv6,
            255,
        );
        assert!(adapter.handle_frame(&mut frame).is_none());
        let reply = only_reply(&mut adapter);
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
        let ip = Ipv6Repr::parse(&Ipv6Packet::new_checked(eth.payload()).unwrap()).unwrap();
        assert_eq!(ip.dst_addr, guest_ll);
        let packet = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let icmp = Icmpv6Packet::new_checked(packet.payload()).unwrap();
        let repr = Icmpv6Repr::parse(
            &ip.src_addr,
            &ip.dst_addr,
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .unwrap();
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            target_addr,
            lladdr,
            flags,
        }) = repr
        else {
            panic!("a neighbour advertisement: {repr:?}");
        };
        assert_eq!(target_addr, target);
        assert_eq!(
            lladdr.map(|l| l.as_bytes().to_vec()),
            Some(DEFAULT_GATEWAY_MAC.to_vec())
        );
        assert!(flags.contains(NdiscNeighborFlags::ROUTER | NdiscNeighborFlags::SOLICITED));
    }

    /// An Ethernet frame from the guest with an IPv6 packet whose payload `fill` writes.
    fn ipv6_frame(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        fill: impl FnOnce(&Ipv6Addr, &Ipv6Addr, &mut [u8]),
        payload_len: usize,
        next_header: IpProtocol,
        hop_limit: u8,
    ) -> Vec<u8> {
        let mut frame = vec![0u8; 14 + 40 + payload_len];
        EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress(DEFAULT_GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv6,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header,
            payload_len,
            hop_limit,
        };
        let mut packet = Ipv6Packet::new_unchecked(&mut frame[14..]);
        ip.emit(&mut packet);
        fill(&src, &dst, packet.payload_mut());
        frame
    }

    fn udp_fill(payload: &'static [u8]) -> impl FnOnce(&Ipv6Addr, &Ipv6Addr, &mut [u8]) {
        move |src, dst, buf| {
            UdpRepr {
                src_port: 40000,
                dst_port: 53,
            }
            .emit(
                &mut UdpPacket::new_unchecked(buf),
                &IpAddress::Ipv6(*src),
                &IpAddress::Ipv6(*dst),
                payload.len(),
                |b| b.copy_from_slice(payload),
                &ChecksumCapabilities::default(),
            );
        }
    }

    #[test]
    fn ipv4_packets_pass_trimmed_and_wrong_ones_are_counted() {
        let mut adapter = adapter();
        let ip = Ipv4Repr {
            src_addr: SESSION_V4,
            dst_addr: DNS_V4,
            next_header: IpProtocol::Udp,
            payload_len: 8 + 4,
            hop_limit: 64,
        };
        let build = |ip: Ipv4Repr| {
            // 14 + 20 + 12 = 46 bytes: a NIC pads that to 60, the adapter must trim it.
            let mut frame = vec![0u8; 60];
            EthernetRepr {
                src_addr: EthernetAddress(GUEST_MAC),
                dst_addr: EthernetAddress(DEFAULT_GATEWAY_MAC),
                ethertype: EthernetProtocol::Ipv4,
            }
            .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
            let caps = ChecksumCapabilities::default();
            let mut packet = Ipv4Packet::new_unchecked(&mut frame[14..]);
            ip.emit(&mut packet, &caps);
            UdpRepr {
                src_port: 40000,
                dst_port: 53,
            }
            .emit(
                &mut UdpPacket::new_unchecked(packet.payload_mut()),
                &IpAddress::Ipv4(ip.src_addr),
                &IpAddress::Ipv4(ip.dst_addr),
                4,
                |b| b.copy_from_slice(b"ping"),
                &caps,
            );
            frame
        };
        let mut frame = build(ip);
        let expected = frame[14..46].to_vec();
        assert_eq!(adapter.handle_frame(&mut frame), Some(&expected[..]));

        let mut frame = build(Ipv4Repr {
            src_addr: Ipv4Addr::new(10, 77, 0, 200),
            ..ip
        });
        assert_eq!(adapter.handle_frame(&mut frame), None);
        let mut frame = build(Ipv4Repr {
            dst_addr: Ipv4Addr::new(10, 77, 0, 255),
            ..ip
        });
        assert_eq!(adapter.handle_frame(&mut frame), None);
        let mut frame = build(ip);
        frame[12..14].copy_from_slice(&[0x88, 0xcc]); // LLDP
        assert_eq!(adapter.handle_frame(&mut frame), None);
        let mut frame = build(ip);
        frame[0..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 1]); // another host's MAC
        assert_eq!(adapter.handle_frame(&mut frame), None);
        // An IPv4 ethertype whose packet says version 15 (found by the fuzz target); and an IPv6
        // ethertype carrying an IPv4 packet.
        let mut frame = build(ip);
        frame[14] = 0xf5;
        assert_eq!(adapter.handle_frame(&mut frame), None);
        let mut frame = build(ip);
        frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        frame.resize(14 + 40 + 12, 0);
        assert_eq!(adapter.handle_frame(&mut frame), None);

        let mut small = EthernetAdapter::new(EthernetConfig {
            mtu: 30,
            ..adapter.config().clone()
        });
        let mut frame = build(ip);
        assert_eq!(small.handle_frame(&mut frame), None);
        assert_eq!(small.stats().dropped(DropReason::TooLarge), 1);

        let stats = adapter.stats();
        assert_eq!(stats.packets_to_session, 1);
        assert_eq!(stats.dropped(DropReason::WrongSource), 1);
        assert_eq!(stats.dropped(DropReason::NotRoutable), 1);
        assert_eq!(stats.dropped(DropReason::UnknownEthertype), 1);
        assert_eq!(stats.dropped(DropReason::NotForRouter), 1);
        assert_eq!(stats.dropped(DropReason::Malformed), 2);
    }

    #[test]
    fn session_packets_are_framed_for_the_guest_once_its_mac_is_known() {
        let mut adapter = adapter();
        let packet = {
            let mut p = vec![0u8; 28];
            Ipv4Repr {
                src_addr: DNS_V4,
                dst_addr: SESSION_V4,
                next_header: IpProtocol::Udp,
                payload_len: 8,
                hop_limit: 64,
            }
            .emit(
                &mut Ipv4Packet::new_unchecked(&mut p[..]),
                &ChecksumCapabilities::default(),
            );
            p
        };
        let mut out = Vec::new();
        assert!(!adapter.encapsulate(&packet, &mut out));
        assert_eq!(adapter.stats().dropped(DropReason::GuestUnknown), 1);
        let mut frame = captured("arp_request_router");
        adapter.handle_frame(&mut frame);
        assert!(adapter.encapsulate(&packet, &mut out));
        assert_eq!(&out[..6], &GUEST_MAC);
        assert_eq!(&out[6..12], &DEFAULT_GATEWAY_MAC);
        assert_eq!(&out[12..14], &[0x08, 0x00]);
        assert_eq!(&out[14..], &packet[..]);
        let mut other = packet.clone();
        other[16..20].copy_from_slice(&[10, 77, 0, 10]);
        assert!(!adapter.encapsulate(&other, &mut out));
        assert_eq!(adapter.stats().dropped(DropReason::NotForGuest), 1);
    }

    #[test]
    fn ipv6_slaac_address_maps_to_the_session_address_with_valid_checksums() {
        let mut adapter = adapter();
        // The EUI-64 SLAAC address the guest derives from the advertised /64.
        let guest = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);
        let mut frame = ipv6_frame(
            guest,
            SERVER_V6,
            udp_fill(b"hello"),
            13,
            IpProtocol::Udp,
            64,
        );
        let packet = adapter
            .handle_frame(&mut frame)
            .expect("forwarded")
            .to_vec();
        let ip = Ipv6Packet::new_checked(&packet[..]).unwrap();
        assert_eq!(ip.src_addr(), SESSION_V6);
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&IpAddress::Ipv6(SESSION_V6), &IpAddress::Ipv6(SERVER_V6)));
        assert_eq!(adapter.guest_ipv6(), Some(guest));

        // The answer comes back to the session address and leaves for the guest's.
        let mut answer = packet.clone();
        answer[8..24].copy_from_slice(&SERVER_V6.octets());
        answer[24..40].copy_from_slice(&SESSION_V6.octets());
        let mut reply = Ipv6Packet::new_unchecked(&mut answer[..]);
        let mut udp = UdpPacket::new_unchecked(reply.payload_mut());
        udp.fill_checksum(&IpAddress::Ipv6(SERVER_V6), &IpAddress::Ipv6(SESSION_V6));
        let mut out = Vec::new();
        assert!(adapter.encapsulate(&answer, &mut out));
        let ip = Ipv6Packet::new_checked(&out[14..]).unwrap();
        assert_eq!(ip.dst_addr(), guest);
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&IpAddress::Ipv6(SERVER_V6), &IpAddress::Ipv6(guest)));
        assert_eq!(udp.payload(), b"hello");

        // A source outside the advertised prefix is not the guest's.
        let mut frame = ipv6_frame(
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            SERVER_V6,
            udp_fill(b"hello"),
            13,
            IpProtocol::Udp,
            64,
        );
        assert!(adapter.handle_frame(&mut frame).is_none());
        assert_eq!(adapter.stats().dropped(DropReason::WrongSource), 1);
    }

    #[test]
    fn ipv4_only_session_ignores_ipv6() {
        let mut config = EthernetConfig::new(1280);
        config.ipv4 = Some(SESSION_V4);
        let mut adapter = EthernetAdapter::new(config);
        let mut frame = captured("router_solicit");
        assert!(adapter.handle_frame(&mut frame).is_none());
        assert!(adapter.poll_frame().is_none());
        assert_eq!(adapter.stats().dropped(DropReason::NoAddress), 1);
    }

    /// A guest frame with an IPv4 TCP SYN carrying MSS 1460, padded with `extra` payload bytes.
    fn tcp_syn_frame(extra: usize) -> Vec<u8> {
        let tcp_len = 24 + extra;
        let mut frame = vec![0u8; 14 + 20 + tcp_len];
        EthernetRepr {
            src_addr: EthernetAddress(GUEST_MAC),
            dst_addr: EthernetAddress(DEFAULT_GATEWAY_MAC),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        let mut packet = Ipv4Packet::new_unchecked(&mut frame[14..]);
        Ipv4Repr {
            src_addr: SESSION_V4,
            dst_addr: DNS_V4,
            next_header: IpProtocol::Tcp,
            payload_len: tcp_len,
            hop_limit: 64,
        }
        .emit(&mut packet, &ChecksumCapabilities::default());
        packet.set_dont_frag(true);
        packet.fill_checksum();
        let tcp = packet.payload_mut();
        tcp[0..4].copy_from_slice(&[0x9c, 0x40, 0, 80]);
        tcp[12] = 6 << 4;
        tcp[13] = 0x02;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        smoltcp::wire::TcpPacket::new_unchecked(tcp)
            .fill_checksum(&IpAddress::Ipv4(SESSION_V4), &IpAddress::Ipv4(DNS_V4));
        frame
    }

    #[test]
    fn a_session_mtu_below_the_link_mtu_clamps_mss_and_reports_fragmentation_needed() {
        let mut config = EthernetConfig::new(1152);
        config.ipv4 = Some(SESSION_V4);
        assert_eq!(config.link_mtu(), 1152);
        config.ipv6 = Some(SESSION_V6);
        assert_eq!(config.link_mtu(), 1280, "IPv6 needs at least 1280");
        let mut adapter = EthernetAdapter::new(config);

        let mut frame = tcp_syn_frame(0);
        let packet = adapter
            .handle_frame(&mut frame)
            .expect("forwarded")
            .to_vec();
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(tcp.verify_checksum(&IpAddress::Ipv4(SESSION_V4), &IpAddress::Ipv4(DNS_V4)));
        assert_eq!(&tcp.options()[..4], &[2, 4, 0x04, 0x58], "MSS 1460 -> 1112");

        // 1200 bytes with DF: too large for the session, the guest learns the MTU.
        let mut frame = tcp_syn_frame(1200 - 44);
        assert!(adapter.handle_frame(&mut frame).is_none());
        assert_eq!(adapter.stats().dropped(DropReason::TooLarge), 1);
        let reply = only_reply(&mut adapter);
        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(
            (ip.src_addr(), ip.dst_addr()),
            (Ipv4Addr::new(10, 77, 0, 1), SESSION_V4)
        );
        let icmp = ip.payload();
        assert_eq!(
            &icmp[..2],
            &[3, 4],
            "destination unreachable, fragmentation needed"
        );
        assert_eq!(smoltcp::wire::checksum::data(&icmp[..28 + 8]), 0xffff);
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1152);
        assert_eq!(&icmp[8..28], &frame[14..34], "quotes the original header");
    }

    #[test]
    fn garbage_never_panics() {
        let mut adapter = adapter();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for len in 0..400 {
            let mut frame: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            // Give the interesting ethertypes a chance.
            if len > 14 {
                let kind: [u8; 2] = [[0x08, 0x00], [0x08, 0x06], [0x86, 0xdd]][len % 3];
                frame[12..14].copy_from_slice(&kind);
                frame[0] &= 0xfe;
                frame[..6].copy_from_slice(&DEFAULT_GATEWAY_MAC);
            }
            let _ = adapter.handle_frame(&mut frame);
            let mut out = Vec::new();
            let _ = adapter.encapsulate(&frame, &mut out);
        }
    }
}
