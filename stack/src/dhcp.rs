//! The DHCPv4 server of the [Ethernet adapter](crate::ethernet): one client, one address.
//!
//! The guest behind the adapter gets exactly the session's IPv4 address. The server answers
//! DISCOVER with OFFER, REQUEST with ACK when the client asks for that address (selecting,
//! init-reboot, renewing or rebinding) and with NAK otherwise, INFORM with an ACK that carries
//! only options; RELEASE and DECLINE need no answer. It has no clock: a lease never expires on
//! this side, because the address belongs to the session, not to the lease.

use std::net::{IpAddr, Ipv4Addr};

use smoltcp::wire::{
    DhcpMessageType, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress, Ipv4Address,
};

/// DHCP option 6: domain name servers.
const OPT_DNS: u8 = 6;
/// DHCP option 26: interface MTU.
const OPT_INTERFACE_MTU: u8 = 26;
/// DHCP option 58 and 59: renewal (T1) and rebinding (T2) times.
const OPT_RENEWAL_TIME: u8 = 58;
const OPT_REBINDING_TIME: u8 = 59;
/// BOOTP's minimum message: some clients discard shorter replies (RFC 1542 §3.2.1).
const MIN_MESSAGE_LEN: usize = 300;
/// At most this many DNS servers go into option 6.
const MAX_DNS: usize = 4;

/// What the server hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The session's address.
    pub(crate) address: Ipv4Addr,
    /// The subnet mask the guest gets (its on-link prefix).
    pub(crate) netmask: Ipv4Addr,
    /// The virtual router: the server identifier and the default route.
    pub(crate) router: Ipv4Addr,
    /// IPv4 resolvers (option 6).
    pub(crate) dns_servers: Vec<Ipv4Addr>,
    /// Interface MTU (option 26).
    pub(crate) mtu: u16,
    /// Lease time in seconds (option 51; T1 and T2 follow from it).
    pub(crate) lease_secs: u32,
}

impl Lease {
    /// A lease of `address` on a /24 around it, with a router at `.1` (`.254` when the address
    /// itself is `.1`) and the IPv4 servers of `dns_servers`.
    pub(crate) fn around(
        address: Ipv4Addr,
        mtu: u16,
        dns_servers: &[IpAddr],
        lease_secs: u32,
    ) -> Self {
        let [a, b, c, d] = address.octets();
        let router = if d == 1 {
            Ipv4Addr::new(a, b, c, 254)
        } else {
            Ipv4Addr::new(a, b, c, 1)
        };
        Self {
            address,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router,
            dns_servers: dns_servers
                .iter()
                .filter_map(|s| match s {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
                .take(MAX_DNS)
                .collect(),
            mtu,
            lease_secs,
        }
    }
}

/// The kind of message a client sent, as far as the server cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpClientMessage {
    /// DHCPDISCOVER.
    Discover,
    /// DHCPREQUEST.
    Request,
    /// DHCPDECLINE.
    Decline,
    /// DHCPRELEASE.
    Release,
    /// DHCPINFORM.
    Inform,
}

/// The server's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpServerMessage {
    /// DHCPOFFER.
    Offer,
    /// DHCPACK.
    Ack,
    /// DHCPNAK.
    Nak,
}

/// One exchange as the adapter saw it: what came in and what went out (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpExchange {
    /// The client's transaction id.
    pub xid: u32,
    /// The client's hardware address.
    pub client: [u8; 6],
    /// What the client sent.
    pub received: DhcpClientMessage,
    /// The address the client asked for (option 50 or `ciaddr`), if any.
    pub requested: Option<Ipv4Addr>,
    /// What the server answered, if anything.
    pub sent: Option<DhcpServerMessage>,
    /// The address in the answer (`yiaddr`), if any.
    pub offered: Option<Ipv4Addr>,
}

impl std::fmt::Display for DhcpExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.client;
        write!(
            f,
            "DHCP {:?} xid {:#010x} from {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            self.received, self.xid, m[0], m[1], m[2], m[3], m[4], m[5]
        )?;
        if let Some(requested) = self.requested {
            write!(f, " asking for {requested}")?;
        }
        match (self.sent, self.offered) {
            (Some(sent), Some(offered)) => write!(f, " -> {sent:?} {offered}"),
            (Some(sent), None) => write!(f, " -> {sent:?}"),
            (None, _) => write!(f, " -> no reply"),
        }
    }
}

/// A reply to send: the DHCP message and where it goes.
#[derive(Debug)]
pub(crate) struct Reply {
    /// The BOOTP/DHCP message (UDP payload, server port 67 → client port 68).
    pub(crate) payload: Vec<u8>,
    /// IP destination: the client's `ciaddr` when it has one, else the limited broadcast.
    pub(crate) dst_ip: Ipv4Addr,
    /// Ethernet destination: the client's hardware address, or broadcast for a NAK.
    pub(crate) dst_mac: EthernetAddress,
}

/// Handles one DHCP message from the guest (the UDP payload to port 67).
///
/// Returns `None` for anything that is not a client message this server answers (malformed,
/// BOOTREPLY, or a REQUEST addressed to another server); the caller counts it.
pub(crate) fn handle(lease: &Lease, payload: &[u8]) -> Option<(DhcpExchange, Option<Reply>)> {
    let packet = DhcpPacket::new_checked(payload).ok()?;
    let request = DhcpRepr::parse(&packet).ok()?;
    let received = match request.message_type {
        DhcpMessageType::Discover => DhcpClientMessage::Discover,
        DhcpMessageType::Request => DhcpClientMessage::Request,
        DhcpMessageType::Decline => DhcpClientMessage::Decline,
        DhcpMessageType::Release => DhcpClientMessage::Release,
        DhcpMessageType::Inform => DhcpClientMessage::Inform,
        _ => return None,
    };
    let ciaddr = (!request.client_ip.is_unspecified()).then_some(request.client_ip);
    let requested = request.requested_ip.or(ciaddr);
    let mut exchange = DhcpExchange {
        xid: request.transaction_id,
        client: request.client_hardware_address.0,
        received,
        requested,
        sent: None,
        offered: None,
    };
    let answer = match received {
        DhcpClientMessage::Discover => Some(DhcpServerMessage::Offer),
        DhcpClientMessage::Request => {
            // A REQUEST naming another server is that server's business (RFC 2131 §4.3.2).
            if request
                .server_identifier
                .is_some_and(|server| server != lease.router)
            {
                return None;
            }
            if requested == Some(lease.address) {
                Some(DhcpServerMessage::Ack)
            } else {
                Some(DhcpServerMessage::Nak)
            }
        }
        DhcpClientMessage::Inform => Some(DhcpServerMessage::Ack),
        DhcpClientMessage::Decline | DhcpClientMessage::Release => None,
    };
    let Some(answer) = answer else {
        return Some((exchange, None));
    };
    let your_ip = match (answer, received) {
        (DhcpServerMessage::Nak, _) | (_, DhcpClientMessage::Inform) => Ipv4Address::UNSPECIFIED,
        _ => lease.address,
    };
    exchange.sent = Some(answer);
    exchange.offered = (!your_ip.is_unspecified()).then_some(your_ip);
    let reply = build_reply(lease, &request, answer, your_ip);
    // A client with an address (renewing, INFORM) takes unicast; one without takes broadcast,
    // which every client accepts whatever its broadcast flag says. A NAK is always broadcast.
    let (dst_ip, dst_mac) = match (answer, ciaddr) {
        (DhcpServerMessage::Nak, _) => (Ipv4Addr::BROADCAST, EthernetAddress::BROADCAST),
        (_, Some(ciaddr)) => (ciaddr, request.client_hardware_address),
        (_, None) => (Ipv4Addr::BROADCAST, request.client_hardware_address),
    };
    Some((
        exchange,
        Some(Reply {
            payload: reply,
            dst_ip,
            dst_mac,
        }),
    ))
}

fn build_reply(
    lease: &Lease,
    request: &DhcpRepr<'_>,
    answer: DhcpServerMessage,
    your_ip: Ipv4Addr,
) -> Vec<u8> {
    let message_type = match answer {
        DhcpServerMessage::Offer => DhcpMessageType::Offer,
        DhcpServerMessage::Ack => DhcpMessageType::Ack,
        DhcpServerMessage::Nak => DhcpMessageType::Nak,
    };
    let nak = answer == DhcpServerMessage::Nak;
    let dns: Vec<u8> = lease
        .dns_servers
        .iter()
        .flat_map(|server| server.octets())
        .collect();
    let mtu = lease.mtu.to_be_bytes();
    let t1 = (lease.lease_secs / 2).to_be_bytes();
    let t2 = (lease.lease_secs / 8 * 7).to_be_bytes();
    let mut extra = Vec::new();
    if !nak {
        if !dns.is_empty() {
            extra.push(DhcpOption {
                kind: OPT_DNS,
                data: &dns,
            });
        }
        extra.push(DhcpOption {
            kind: OPT_INTERFACE_MTU,
            data: &mtu,
        });
    }
    let inform = request.message_type == DhcpMessageType::Inform;
    if !nak && !inform {
        extra.push(DhcpOption {
            kind: OPT_RENEWAL_TIME,
            data: &t1,
        });
        extra.push(DhcpOption {
            kind: OPT_REBINDING_TIME,
            data: &t2,
        });
    }
    let repr = DhcpRepr {
        message_type,
        transaction_id: request.transaction_id,
        secs: 0,
        client_hardware_address: request.client_hardware_address,
        client_ip: if inform {
            request.client_ip
        } else {
            Ipv4Address::UNSPECIFIED
        },
        your_ip,
        server_ip: Ipv4Address::UNSPECIFIED,
        router: (!nak).then_some(lease.router),
        subnet_mask: (!nak).then_some(lease.netmask),
        relay_agent_ip: request.relay_agent_ip,
        broadcast: request.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(lease.router),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: (!nak && !inform).then_some(lease.lease_secs),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &extra,
    };
    let mut buffer = vec![0u8; repr.buffer_len().max(MIN_MESSAGE_LEN)];
    let mut packet = DhcpPacket::new_unchecked(&mut buffer[..]);
    // The buffer is sized by `buffer_len`, which counts every option emitted.
    repr.emit(&mut packet)
        .expect("buffer_len covers every option");
    buffer
}
