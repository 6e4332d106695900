//! The egress policy, sans-IO: which destinations a client packet may reach.
//!
//! A gateway is a door from any web page into the network it sits on, so the default is to
//! refuse every destination that is not globally routable (loopback, RFC 1918, CGNAT,
//! link-local and cloud metadata, multicast, the IANA special-purpose blocks, IPv6 ULA and
//! link-local, IPv4 embedded in IPv6 translation prefixes), every address of the gateway host,
//! the client pools (client-to-client traffic) and TCP port 25. See `docs/SECURITY.md` for the
//! table.
//!
//! Order of [`EgressPolicy::check`]:
//! 1. `--deny-dest` rules and `--deny-port` ports: refused;
//! 2. the gateway host's own addresses: refused (no allow rule overrides this);
//! 3. the client pools: refused unless client-to-client traffic is on (then allowed, but for
//!    step 6);
//! 4. an `--allow-dest` rule matching the destination (and its ports, if it lists any):
//!    allowed, overriding the default classes (that is how a LAN service is published);
//! 5. a default-deny address class: refused;
//! 6. TCP port 25 unless `--allow-port 25`, or an allow rule listing 25: refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Instant;

use crate::packet::PROTO_TCP;
use crate::pool::{Cidr, PoolError};

/// Why a destination is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyClass {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16) and IPv6 unique-local fc00::/7.
    Private,
    /// Shared address space 100.64.0.0/10 (carrier-grade NAT).
    SharedAddressSpace,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// Multicast (224/4, ff00::/8) and the limited broadcast 255.255.255.255.
    Multicast,
    /// Documentation prefixes (192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32,
    /// 3fff::/20).
    Documentation,
    /// Other IANA special-purpose or reserved blocks (0/8, 192.0.0/24, 198.18/15, 240/4, ::,
    /// ::ffff:0:0/96, IPv6 outside 2000::/3, ...).
    SpecialPurpose,
    /// Cloud platform service addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200,
    /// 168.63.129.16).
    Platform,
    /// An address of the gateway host itself.
    GatewayHost,
    /// An address of the client pools (client-to-client traffic is off).
    ClientPool,
    /// A `--deny-dest` rule.
    DenyRule,
    /// A port denied by default (TCP 25) or by `--deny-port`.
    Port,
}

impl DenyClass {
    /// Every class, in metrics order.
    pub const ALL: [Self; 12] = [
        Self::Loopback,
        Self::Private,
        Self::SharedAddressSpace,
        Self::LinkLocal,
        Self::Multicast,
        Self::Documentation,
        Self::SpecialPurpose,
        Self::Platform,
        Self::GatewayHost,
        Self::ClientPool,
        Self::DenyRule,
        Self::Port,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedAddressSpace => "shared_address_space",
            Self::LinkLocal => "link_local",
            Self::Multicast => "multicast",
            Self::Documentation => "documentation",
            Self::SpecialPurpose => "special_purpose",
            Self::Platform => "platform",
            Self::GatewayHost => "gateway_host",
            Self::ClientPool => "client_pool",
            Self::DenyRule => "deny_rule",
            Self::Port => "port",
        }
    }

    /// Index into counter arrays (position in [`DenyClass::ALL`]).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A refused destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("destination refused by the egress policy: {}", .class.label())]
pub struct Refusal {
    /// Why.
    pub class: DenyClass,
}

/// A destination rule: a prefix and optionally the ports it covers (TCP and UDP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestRule {
    /// The prefix.
    pub cidr: Cidr,
    /// Port ranges; empty: every port and ICMP.
    pub ports: Vec<RangeInclusive<u16>>,
}

/// Why a rule or port list does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// The prefix is invalid.
    #[error("{0}")]
    Cidr(#[from] PoolError),
    /// A port or port range is invalid.
    #[error("invalid port list {0:?}: expected e.g. 25, 8000-8100 or 80,443")]
    Ports(String),
}

impl DestRule {
    fn matches(&self, destination: IpAddr, port: Option<u16>) -> bool {
        self.cidr.contains(destination)
            && (self.ports.is_empty() || port.is_some_and(|p| in_ranges(&self.ports, p)))
    }

    fn lists_port(&self, port: u16) -> bool {
        in_ranges(&self.ports, port)
    }
}

impl FromStr for DestRule {
    type Err = RuleError;

    /// `CIDR[:PORTS]`, e.g. `10.201.3.0/24`, `fd00:201:3::/64:80,443`, `192.0.2.7` (a host).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // The port list follows the prefix length, so IPv6 colons cannot be mistaken for it.
        let (prefix, ports) = match text.split_once('/') {
            Some((address, rest)) => match rest.split_once(':') {
                Some((len, ports)) => (format!("{address}/{len}"), parse_ports(ports)?),
                None => (text.to_owned(), Vec::new()),
            },
            None => {
                let address: IpAddr = text.parse().map_err(|_| PoolError::Syntax(text.into()))?;
                let len = if address.is_ipv4() { 32 } else { 128 };
                (format!("{address}/{len}"), Vec::new())
            }
        };
        Ok(Self {
            cidr: prefix.parse()?,
            ports,
        })
    }
}

/// Parses `25`, `8000-8100`, `80,443,1000-2000`.
///
/// # Errors
/// [`RuleError::Ports`] on an empty list, a non-number, 0, or a reversed range.
pub fn parse_ports(text: &str) -> Result<Vec<RangeInclusive<u16>>, RuleError> {
    let bad = || RuleError::Ports(text.to_owned());
    text.split(',')
        .map(|part| {
            let (low, high) = part.split_once('-').unwrap_or((part, part));
            let low: u16 = low.trim().parse().map_err(|_| bad())?;
            let high: u16 = high.trim().parse().map_err(|_| bad())?;
            if low == 0 || low > high {
                return Err(bad());
            }
            Ok(low..=high)
        })
        .collect()
}

fn in_ranges(ranges: &[RangeInclusive<u16>], port: u16) -> bool {
    ranges.iter().any(|r| r.contains(&port))
}

/// TCP ports refused unless allowed explicitly: SMTP, the classic spam relay.
pub const DEFAULT_DENIED_TCP_PORTS: [u16; 1] = [25];

/// The egress policy. Build with [`EgressPolicy::new`], then add the host's addresses and pools.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    allow: Vec<DestRule>,
    deny: Vec<DestRule>,
    allow_ports: Vec<RangeInclusive<u16>>,
    deny_ports: Vec<RangeInclusive<u16>>,
    host_addresses: Vec<IpAddr>,
    pools: Vec<Cidr>,
    allow_client_to_client: bool,
}

impl EgressPolicy {
    /// A policy with the given rules; no host addresses or pools yet.
    pub fn new(
        allow: Vec<DestRule>,
        deny: Vec<DestRule>,
        allow_ports: Vec<RangeInclusive<u16>>,
        deny_ports: Vec<RangeInclusive<u16>>,
        allow_client_to_client: bool,
    ) -> Self {
        Self {
            allow,
            deny,
            allow_ports,
            deny_ports,
            host_addresses: Vec::new(),
            pools: Vec::new(),
            allow_client_to_client,
        }
    }

    /// Adds addresses of the gateway host (refused whatever the rules say).
    pub fn add_host_addresses(&mut self, addresses: impl IntoIterator<Item = IpAddr>) {
        for address in addresses {
            let address = canonical(address);
            if !self.host_addresses.contains(&address) {
                self.host_addresses.push(address);
            }
        }
    }

    /// Allows port 53 (TCP and UDP) on each resolver announced to clients: they are often
    /// private addresses, and a client must reach the resolvers it is told to use.
    pub fn allow_resolvers(&mut self, resolvers: &[IpAddr]) {
        for resolver in resolvers {
            let prefix_len = if resolver.is_ipv4() { 32 } else { 128 };
            self.allow.push(DestRule {
                cidr: Cidr {
                    network: *resolver,
                    prefix_len,
                },
                ports: vec![53..=53],
            });
        }
    }

    /// Adds a client pool (refused unless client-to-client traffic is on).
    pub fn add_pool(&mut self, pool: Cidr) {
        self.pools.push(pool);
    }

    /// The gateway host addresses known to the policy.
    pub fn host_addresses(&self) -> &[IpAddr] {
        &self.host_addresses
    }

    /// Whether a packet to `destination` with transport `protocol` (IP protocol number) and
    /// `port` (TCP/UDP destination port, `None` for ICMP) may leave.
    ///
    /// # Errors
    /// [`Refusal`] with the class that refused it.
    pub fn check(
        &self,
        destination: IpAddr,
        protocol: u8,
        port: Option<u16>,
    ) -> Result<(), Refusal> {
        let refuse = |class| Err(Refusal { class });
        if self.deny.iter().any(|r| r.matches(destination, port)) {
            return refuse(DenyClass::DenyRule);
        }
        if port.is_some_and(|p| in_ranges(&self.deny_ports, p)) {
            return refuse(DenyClass::Port);
        }
        // A mapped form of a host address is still the host (if the kernel ever routed it).
        if self.host_addresses.contains(&canonical(destination)) {
            return refuse(DenyClass::GatewayHost);
        }
        let in_pool = self.pools.iter().any(|p| p.contains(destination));
        if in_pool && !self.allow_client_to_client {
            return refuse(DenyClass::ClientPool);
        }
        let allow_rule = self.allow.iter().find(|r| r.matches(destination, port));
        // An enabled client pool is allowed although its prefix is usually private.
        if allow_rule.is_none()
            && !in_pool
            && let Some(class) = default_class(destination)
        {
            return refuse(class);
        }
        if let Some(port) = port
            && protocol == PROTO_TCP
            && DEFAULT_DENIED_TCP_PORTS.contains(&port)
            && !in_ranges(&self.allow_ports, port)
            && !allow_rule.is_some_and(|r| r.lists_port(port))
        {
            return refuse(DenyClass::Port);
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses are compared as the IPv4 address they map.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

/// The default-deny class of `destination`, `None` if it is globally routable.
pub fn default_class(destination: IpAddr) -> Option<DenyClass> {
    match destination {
        IpAddr::V4(v4) => ipv4_class(v4),
        IpAddr::V6(v6) => ipv6_class(v6),
    }
}

fn ipv4_class(address: Ipv4Addr) -> Option<DenyClass> {
    use DenyClass::*;
    const PLATFORM: [Ipv4Addr; 3] = [
        Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack metadata
        Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud metadata
        Ipv4Addr::new(168, 63, 129, 16),   // Azure wireserver
    ];
    if PLATFORM.contains(&address) {
        return Some(Platform);
    }
    let [a, b, c, _] = address.octets();
    Some(match (a, b, c) {
        (0, _, _) => SpecialPurpose,
        (10, _, _) => Private,
        (100, 64..=127, _) => SharedAddressSpace,
        (127, _, _) => Loopback,
        (169, 254, _) => LinkLocal,
        (172, 16..=31, _) => Private,
        (192, 0, 0) => SpecialPurpose,    // IETF protocol assignments
        (192, 0, 2) => Documentation,     // TEST-NET-1
        (192, 31, 196) => SpecialPurpose, // AS112-v4
        (192, 52, 193) => SpecialPurpose, // AMT
        (192, 88, 99) => SpecialPurpose,  // deprecated 6to4 relay anycast
        (192, 168, _) => Private,
        (192, 175, 48) => SpecialPurpose, // direct delegation AS112
        (198, 18..=19, _) => SpecialPurpose, // benchmarking
        (198, 51, 100) => Documentation,  // TEST-NET-2
        (203, 0, 113) => Documentation,   // TEST-NET-3
        (224..=239, _, _) => Multicast,
        (240..=255, _, _) if address == Ipv4Addr::BROADCAST => Multicast,
        (240..=255, _, _) => SpecialPurpose, // reserved
        _ => return None,
    })
}

fn ipv6_class(address: Ipv6Addr) -> Option<DenyClass> {
    use DenyClass::*;
    const PLATFORM: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)];
    if PLATFORM.contains(&address) {
        return Some(Platform);
    }
    if address == Ipv6Addr::LOCALHOST {
        return Some(Loopback);
    }
    let bits = u128::from(address);
    let segments = address.segments();
    let v4_at = |shift: u32| Ipv4Addr::from((bits >> shift) as u32);
    Some(match segments[0] {
        // 64:ff9b::/96 well-known NAT64: the verdict of the embedded IPv4.
        0x0064 if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 => {
            return ipv4_class(v4_at(0));
        }
        // ::/96 (incl. :: and the deprecated IPv4-compatible form), ::ffff:0:0/96 (mapped:
        // never on the wire) and everything else in ::/8.
        0x0000..=0x00ff => SpecialPurpose,
        0x0100 if bits >> 64 == 0x0100_0000_0000_0000 => SpecialPurpose, // discard-only
        // 2001::/23 IETF protocol assignments (Teredo, ORCHIDv2, ...), 2001:db8::/32.
        0x2001 if segments[1] == 0x0db8 => Documentation,
        0x2001 if segments[1] < 0x0200 => SpecialPurpose,
        // 2002::/16 6to4: the verdict of the embedded IPv4.
        0x2002 => return ipv4_class(v4_at(80)),
        0x3fff if segments[1] < 0x1000 => Documentation, // 3fff::/20
        0x2000..=0x3fff => return None,                  // global unicast
        0x5f00 => SpecialPurpose,                        // SRv6 SIDs
        0xfc00..=0xfdff => Private,
        0xfe80..=0xfebf => LinkLocal,
        0xff00..=0xffff => Multicast,
        // Everything else outside 2000::/3 is unassigned or deprecated (site-local fec0::/10).
        _ => SpecialPurpose,
    })
}

/// A token bucket: at most `burst` events at once, refilled at `rate` per second. Time is an
/// argument (sans-IO).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl fmt::Display for DenyClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::PROTO_UDP;
    use std::time::Duration;

    const PROTO_ICMP: u8 = 1;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_classes_table() {
        use DenyClass::*;
        let table: &[(&str, Option<DenyClass>)] = &[
            ("0.0.0.0", Some(SpecialPurpose)),
            ("0.1.2.3", Some(SpecialPurpose)),
            ("10.0.0.1", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("11.0.0.1", None),
            ("100.63.255.255", None),
            ("100.64.0.2", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("100.128.0.0", None),
            ("100.100.100.200", Some(Platform)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.1", Some(Loopback)),
            ("169.254.0.1", Some(LinkLocal)),
            ("169.254.169.254", Some(Platform)),
            ("168.63.129.16", Some(Platform)),
            ("168.63.129.17", None),
            ("172.15.255.255", None),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.0", None),
            ("192.0.0.8", Some(SpecialPurpose)),
            ("192.0.1.1", None),
            ("192.0.2.1", Some(Documentation)),
            ("192.88.99.1", Some(SpecialPurpose)),
            ("192.168.1.1", Some(Private)),
            ("198.17.255.255", None),
            ("198.18.0.1", Some(SpecialPurpose)),
            ("198.19.255.255", Some(SpecialPurpose)),
            ("198.20.0.0", None),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("240.0.0.1", Some(SpecialPurpose)),
            ("255.255.255.255", Some(Multicast)),
            ("1.1.1.1", None),
            ("8.8.8.8", None),
            ("::", Some(SpecialPurpose)),
            ("::1", Some(Loopback)),
            ("::ffff:8.8.8.8", Some(SpecialPurpose)),
            ("::ffff:127.0.0.1", Some(SpecialPurpose)),
            ("::8.8.8.8", Some(SpecialPurpose)),
            ("64:ff9b::8.8.8.8", None),
            ("64:ff9b::10.0.0.1", Some(Private)),
            ("64:ff9b::169.254.169.254", Some(Platform)),
            ("64:ff9b:1::1", Some(SpecialPurpose)),
            ("100::1", Some(SpecialPurpose)),
            ("2001::1", Some(SpecialPurpose)),
            ("2001:db8::1", Some(Documentation)),
            ("2001:4860:4860::8888", None),
            ("2002:0808:0808::1", None),
            ("2002:7f00:0001::1", Some(Loopback)),
            ("2002:a9fe:a9fe::1", Some(Platform)),
            ("2002:c0a8:0101::1", Some(Private)),
            ("2606:4700::1111", None),
            ("3fff::1", Some(Documentation)),
            ("3fff:1000::1", None),
            ("5f00::1", Some(SpecialPurpose)),
            ("fc00::1", Some(Private)),
            ("fd00:201:3::2", Some(Private)),
            ("fd00:ec2::254", Some(Platform)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fec0::1", Some(SpecialPurpose)),
            ("ff02::1", Some(Multicast)),
            ("4000::1", Some(SpecialPurpose)),
        ];
        for (address, expected) in table {
            assert_eq!(default_class(ip(address)), *expected, "{address}");
            assert_eq!(
                naive::class(ip(address)),
                *expected,
                "naive reference disagrees with the table on {address}"
            );
        }
    }

    fn policy() -> EgressPolicy {
        let mut p = EgressPolicy::new(
            vec![
                "10.201.3.0/24".parse().unwrap(),
                "fd00:201:3::/64".parse().unwrap(),
                "10.9.0.0/16:8000-8100,25".parse().unwrap(),
            ],
            vec![
                "10.201.3.66".parse().unwrap(),
                "1.2.3.0/24:53".parse().unwrap(),
            ],
            Vec::new(),
            vec![6667..=6667],
            false,
        );
        p.add_host_addresses([
            ip("10.201.3.1"),
            ip("10.77.0.1"),
            ip("127.0.0.1"),
            ip("::1"),
        ]);
        p.add_pool("10.77.0.0/24".parse().unwrap());
        p.add_pool("fd00:77::/112".parse().unwrap());
        p
    }

    #[test]
    fn rules_ports_host_and_pool() {
        use DenyClass::*;
        let p = policy();
        let check = |d: &str, proto: u8, port: Option<u16>| {
            p.check(ip(d), proto, port).map_err(|r| r.class)
        };
        // Allow rules open a default-deny class.
        assert_eq!(check("10.201.3.2", PROTO_TCP, Some(7001)), Ok(()));
        assert_eq!(check("fd00:201:3::2", PROTO_UDP, Some(53)), Ok(()));
        assert_eq!(check("10.201.3.2", PROTO_ICMP, None), Ok(()));
        assert_eq!(check("10.202.3.2", PROTO_TCP, Some(7001)), Err(Private));
        // ...but not the gateway's own addresses, nor a deny rule.
        assert_eq!(check("10.201.3.1", PROTO_TCP, Some(22)), Err(GatewayHost));
        assert_eq!(
            check("::ffff:10.201.3.1", PROTO_TCP, Some(22)),
            Err(GatewayHost)
        );
        assert_eq!(check("10.201.3.66", PROTO_UDP, Some(1)), Err(DenyRule));
        assert_eq!(check("127.0.0.1", PROTO_TCP, Some(80)), Err(GatewayHost));
        // A port-restricted allow rule.
        assert_eq!(check("10.9.1.1", PROTO_TCP, Some(8050)), Ok(()));
        assert_eq!(check("10.9.1.1", PROTO_TCP, Some(8101)), Err(Private));
        assert_eq!(check("10.9.1.1", PROTO_ICMP, None), Err(Private));
        // Port 25: denied by default, allowed by a rule that lists it, UDP unaffected.
        assert_eq!(check("8.8.8.8", PROTO_TCP, Some(25)), Err(Port));
        assert_eq!(check("8.8.8.8", PROTO_UDP, Some(25)), Ok(()));
        assert_eq!(check("10.201.3.2", PROTO_TCP, Some(25)), Err(Port));
        assert_eq!(check("10.9.1.1", PROTO_TCP, Some(25)), Ok(()));
        // --deny-port and a port-restricted deny rule.
        assert_eq!(check("8.8.8.8", PROTO_TCP, Some(6667)), Err(Port));
        assert_eq!(check("1.2.3.4", PROTO_UDP, Some(53)), Err(DenyRule));
        assert_eq!(check("1.2.3.4", PROTO_UDP, Some(54)), Ok(()));
        // Client-to-client.
        assert_eq!(check("10.77.0.5", PROTO_UDP, Some(9)), Err(ClientPool));
        assert_eq!(check("fd00:77::5", PROTO_UDP, Some(9)), Err(ClientPool));
        assert_eq!(check("10.77.0.1", PROTO_UDP, Some(9)), Err(GatewayHost));
        let mut open = policy();
        open.allow_client_to_client = true;
        assert_eq!(open.check(ip("10.77.0.5"), PROTO_UDP, Some(9)), Ok(()));
        // Announced resolvers: port 53 only.
        let mut dns = policy();
        dns.allow_resolvers(&[ip("10.0.0.2"), ip("fd00:5::53")]);
        assert_eq!(dns.check(ip("10.0.0.2"), PROTO_UDP, Some(53)), Ok(()));
        assert_eq!(dns.check(ip("fd00:5::53"), PROTO_TCP, Some(53)), Ok(()));
        assert_eq!(
            dns.check(ip("10.0.0.2"), PROTO_TCP, Some(22))
                .map_err(|r| r.class),
            Err(Private)
        );
        // --allow-port 25.
        let mut smtp = policy();
        smtp.allow_ports = parse_ports("25").unwrap();
        assert_eq!(smtp.check(ip("8.8.8.8"), PROTO_TCP, Some(25)), Ok(()));
    }

    #[test]
    fn rule_syntax() {
        let r: DestRule = "fd00:201:3::/64:80,443".parse().unwrap();
        assert_eq!(r.cidr.to_string(), "fd00:201:3::/64");
        assert_eq!(r.ports, vec![80..=80, 443..=443]);
        let r: DestRule = "192.0.2.7".parse().unwrap();
        assert_eq!(r.cidr.to_string(), "192.0.2.7/32");
        assert!(r.ports.is_empty());
        assert!("10.0.0.0/8:".parse::<DestRule>().is_err());
        assert!("10.0.0.0/8:0".parse::<DestRule>().is_err());
        assert!("10.0.0.0/8:9-8".parse::<DestRule>().is_err());
        assert!("10.0.0.1/8".parse::<DestRule>().is_err(), "host bits set");
        assert!("nonsense".parse::<DestRule>().is_err());
        assert_eq!(
            parse_ports("1-1024,8080").unwrap(),
            vec![1..=1024, 8080..=8080]
        );
    }

    #[test]
    fn token_bucket_limits_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100.0, 100.0);
        let burst = (0..1000).filter(|_| bucket.try_take(start)).count();
        assert_eq!(burst, 100);
        let later = start + Duration::from_millis(500);
        let refilled = (0..1000).filter(|_| bucket.try_take(later)).count();
        assert_eq!(refilled, 50);
    }

    /// Seeded random addresses: the fast classifier agrees with the naive reference. Half of
    /// the addresses start from a listed prefix so every class is exercised.
    #[test]
    fn property_matches_naive_reference() {
        let mut state = 0x5eed_cafe_f00d_u64;
        let mut next = move || {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let prefixes = naive::prefixes();
        let mut checked = 0;
        for i in 0..200_000 {
            let random = (u128::from(next()) << 64) | u128::from(next());
            let address = if i % 2 == 0 {
                let (cidr, _) = &prefixes[next() as usize % prefixes.len()];
                match cidr.network {
                    IpAddr::V4(n) => {
                        let mask = (1u64 << (32 - u32::from(cidr.prefix_len))) - 1;
                        IpAddr::V4(Ipv4Addr::from(u32::from(n) | (random as u64 & mask) as u32))
                    }
                    IpAddr::V6(n) => {
                        let mask = u128::MAX
                            .checked_shr(u32::from(cidr.prefix_len))
                            .unwrap_or(0);
                        IpAddr::V6(Ipv6Addr::from(u128::from(n) | (random & mask)))
                    }
                }
            } else if i % 4 == 1 {
                IpAddr::V4(Ipv4Addr::from(random as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(random))
            };
            assert_eq!(
                default_class(address),
                naive::class(address),
                "fast and naive classifiers disagree on {address}"
            );
            checked += 1;
        }
        assert_eq!(checked, 200_000);
    }

    /// A deliberately naive reference (also used by the `policy` fuzz target).
    mod naive {
        include!("policy_naive.rs");
    }
}
