//! Per-session quotas (sans-IO: every method takes `now`).
//!
//! One [`SessionQuota`] per session checks each client packet that passed classification and
//! the egress policy: packets per second, bytes per second, ICMP echo requests per second, and
//! flows — concurrent 5-tuples (tracked with expiry) and new flows per second. A port scan thus
//! costs one new-flow token per probe and stops at the flow cap, while established flows keep
//! working. All limits are token buckets; a limit of 0 turns it off.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::packet::{Classified, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// A TCP flow that has only sent SYNs is forgotten after this long without packets: a scan's
/// probes do not hold flow slots for long.
pub const HALF_OPEN_IDLE: Duration = Duration::from_secs(5);
/// A TCP flow after the client sent FIN or RST.
pub const CLOSING_IDLE: Duration = Duration::from_secs(5);
/// An established TCP flow (Linux conntrack keeps them far longer; the client's keep-alives or
/// traffic refresh it).
pub const TCP_IDLE: Duration = Duration::from_secs(300);
/// A UDP flow.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// How often expired flows are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The limits of one session. Rates are per second; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuotaLimits {
    /// Concurrent flows (TCP/UDP 5-tuples).
    pub max_flows: usize,
    /// New flows per second (burst: one second's worth).
    pub new_flows_per_sec: f64,
    /// Client packets per second (burst: a quarter second's worth).
    pub packets_per_sec: f64,
    /// Bytes per second in each direction (burst: a quarter second's worth, at least 64 KiB).
    pub bytes_per_sec: f64,
    /// ICMP/ICMPv6 echo requests per second (burst: one second's worth).
    pub icmp_echo_per_sec: f64,
}

impl QuotaLimits {
    /// Generous defaults: far above what the tests' 32 MiB transfers and 1,000-datagram UDP
    /// bursts need, far below what turns one session into a scanner or a flood.
    pub const DEFAULT: Self = Self {
        max_flows: 4096,
        new_flows_per_sec: 200.0,
        packets_per_sec: 200_000.0,
        bytes_per_sec: 250_000_000.0,
        icmp_echo_per_sec: 50.0,
    };

    /// These limits with the bandwidth narrowed to `rate` bytes/s (a token's scope).
    #[must_use]
    pub fn narrowed_to_rate(mut self, rate: Option<u64>) -> Self {
        if let Some(rate) = rate {
            let rate = rate as f64;
            if self.bytes_per_sec == 0.0 || rate < self.bytes_per_sec {
                self.bytes_per_sec = rate;
            }
        }
        self
    }

    /// The byte bucket for one direction (`None` when unlimited).
    pub fn byte_bucket(&self, now: Instant) -> Option<Bucket> {
        Bucket::with_rate(
            self.bytes_per_sec,
            (self.bytes_per_sec / 4.0).max(65_536.0),
            now,
        )
    }
}

impl Default for QuotaLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a packet was dropped by a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuotaDrop {
    /// The session has as many concurrent flows as allowed.
    Flows,
    /// New flows arrive faster than allowed.
    NewFlowRate,
    /// Packets per second.
    Packets,
    /// Bytes per second, client to gateway.
    Bytes,
    /// Bytes per second, gateway to client.
    BytesToClient,
    /// ICMP echo requests per second.
    IcmpEcho,
    /// Outside the destinations the session's token allows.
    TokenScope,
}

impl QuotaDrop {
    /// Every reason, in metrics order (the discriminant is the index).
    pub const ALL: [Self; 7] = [
        Self::Flows,
        Self::NewFlowRate,
        Self::Packets,
        Self::Bytes,
        Self::BytesToClient,
        Self::IcmpEcho,
        Self::TokenScope,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Flows => "flows",
            Self::NewFlowRate => "new_flow_rate",
            Self::Packets => "packets",
            Self::Bytes => "bytes",
            Self::BytesToClient => "bytes_to_client",
            Self::IcmpEcho => "icmp_echo",
            Self::TokenScope => "token_scope",
        }
    }
}

/// A token bucket holding at most `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// A full bucket, or `None` when `rate` is 0 (unlimited).
    pub fn with_rate(rate: f64, burst: f64, now: Instant) -> Option<Self> {
        (rate > 0.0).then(|| Self::new(rate, burst.max(1.0), now))
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes `amount` tokens if the bucket holds them.
    pub fn try_take(&mut self, now: Instant, amount: f64) -> bool {
        self.refill(now);
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely (an idle entry that can be forgotten).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// A flow of the session: the 5-tuple minus the session's own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub protocol: u8,
    /// The session's address (source).
    pub source: IpAddr,
    /// The source port.
    pub source_port: u16,
    /// Destination address.
    pub destination: IpAddr,
    /// Destination port.
    pub destination_port: u16,
}

#[derive(Debug, Clone, Copy)]
struct FlowState {
    expires: Instant,
}

/// The quota state of one session.
#[derive(Debug, Clone)]
pub struct SessionQuota {
    limits: QuotaLimits,
    packets: Option<Bucket>,
    bytes: Option<Bucket>,
    icmp_echo: Option<Bucket>,
    new_flows: Option<Bucket>,
    flows: HashMap<FlowKey, FlowState>,
    next_sweep: Instant,
}

impl SessionQuota {
    /// Fresh quotas (full buckets, no flows).
    pub fn new(limits: QuotaLimits, now: Instant) -> Self {
        Self {
            limits,
            packets: Bucket::with_rate(limits.packets_per_sec, limits.packets_per_sec / 4.0, now),
            bytes: limits.byte_bucket(now),
            icmp_echo: Bucket::with_rate(limits.icmp_echo_per_sec, limits.icmp_echo_per_sec, now),
            new_flows: Bucket::with_rate(limits.new_flows_per_sec, limits.new_flows_per_sec, now),
            flows: HashMap::new(),
            next_sweep: now + SWEEP_INTERVAL,
        }
    }

    /// The limits.
    pub fn limits(&self) -> &QuotaLimits {
        &self.limits
    }

    /// Flows currently tracked (expired ones may linger until the next sweep).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Checks one client packet (`packet` is the whole IP packet, `classified` its
    /// classification). `Ok(Some(flow))` when it opens a new flow (for the abuse log).
    ///
    /// # Errors
    /// [`QuotaDrop`]: drop the packet and count it.
    pub fn check(
        &mut self,
        now: Instant,
        packet: &[u8],
        classified: &Classified,
    ) -> Result<Option<FlowKey>, QuotaDrop> {
        if let Some(bucket) = &mut self.packets
            && !bucket.try_take(now, 1.0)
        {
            return Err(QuotaDrop::Packets);
        }
        if let Some(bucket) = &mut self.bytes
            && !bucket.try_take(now, packet.len() as f64)
        {
            return Err(QuotaDrop::Bytes);
        }
        let transport = transport_offset(packet).and_then(|offset| packet.get(offset..));
        match classified.protocol {
            PROTO_ICMP | PROTO_ICMPV6 => {
                let echo = if classified.protocol == PROTO_ICMP {
                    8
                } else {
                    128
                };
                if transport.and_then(|t| t.first()) == Some(&echo)
                    && let Some(bucket) = &mut self.icmp_echo
                    && !bucket.try_take(now, 1.0)
                {
                    return Err(QuotaDrop::IcmpEcho);
                }
                Ok(None)
            }
            PROTO_TCP | PROTO_UDP => {
                let transport = transport.unwrap_or_default();
                let source_port = transport
                    .get(..2)
                    .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                let key = FlowKey {
                    protocol: classified.protocol,
                    source: classified.source,
                    source_port,
                    destination: classified.destination,
                    destination_port: classified.destination_port.unwrap_or(0),
                };
                let idle = if classified.protocol == PROTO_UDP {
                    UDP_IDLE
                } else {
                    let flags = transport.get(13).copied().unwrap_or(0);
                    let (fin, syn, rst, ack) = (
                        flags & 0x01 != 0,
                        flags & 0x02 != 0,
                        flags & 0x04 != 0,
                        flags & 0x10 != 0,
                    );
                    if fin || rst {
                        CLOSING_IDLE
                    } else if syn && !ack {
                        HALF_OPEN_IDLE
                    } else {
                        TCP_IDLE
                    }
                };
                self.track(now, key, idle)
            }
            _ => Ok(None),
        }
    }

    fn track(
        &mut self,
        now: Instant,
        key: FlowKey,
        idle: Duration,
    ) -> Result<Option<FlowKey>, QuotaDrop> {
        if now >= self.next_sweep {
            self.sweep(now);
        }
        if let Some(state) = self.flows.get_mut(&key)
            && state.expires > now
        {
            state.expires = now + idle;
            return Ok(None);
        }
        if self.limits.max_flows > 0 && self.flows.len() >= self.limits.max_flows {
            // Expired flows may free room before the periodic sweep.
            self.sweep(now);
            if self.flows.len() >= self.limits.max_flows {
                return Err(QuotaDrop::Flows);
            }
        }
        if let Some(bucket) = &mut self.new_flows
            && !bucket.try_take(now, 1.0)
        {
            return Err(QuotaDrop::NewFlowRate);
        }
        self.flows.insert(
            key,
            FlowState {
                expires: now + idle,
            },
        );
        Ok(Some(key))
    }

    fn sweep(&mut self, now: Instant) {
        self.flows.retain(|_, state| state.expires > now);
        self.next_sweep = now + SWEEP_INTERVAL;
    }
}

/// Where the transport header starts: classification admits no IPv4 options beyond the IHL
/// and no IPv6 extension headers, so it is right after the IP header.
fn transport_offset(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 => Some(usize::from(packet[0] & 0x0f) * 4),
        6 => Some(40),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::packet::classify_from_client;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

    /// An IPv4 packet from the client with a valid header checksum and a transport header of
    /// `transport` (checksums of the transport are not checked by classification).
    fn ipv4(protocol: u8, destination: Ipv4Addr, transport: &[u8]) -> Vec<u8> {
        let total = 20 + transport.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&CLIENT.octets());
        p[16..20].copy_from_slice(&destination.octets());
        let checksum = crate::packet::internet_checksum(&p);
        p[10..12].copy_from_slice(&checksum.to_be_bytes());
        p.extend_from_slice(transport);
        p
    }

    fn tcp(destination: Ipv4Addr, source_port: u16, port: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&source_port.to_be_bytes());
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[12] = 0x50;
        t[13] = flags;
        ipv4(PROTO_TCP, destination, &t)
    }

    fn check(q: &mut SessionQuota, now: Instant, p: &[u8]) -> Result<Option<FlowKey>, QuotaDrop> {
        let c = classify_from_client(p, &[IpAddr::V4(CLIENT)]).expect("valid test packet");
        q.check(now, p, &c)
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    fn limits() -> QuotaLimits {
        QuotaLimits {
            max_flows: 100,
            new_flows_per_sec: 10.0,
            packets_per_sec: 0.0,
            bytes_per_sec: 0.0,
            icmp_echo_per_sec: 5.0,
        }
    }

    #[test]
    fn port_scan_is_held_to_the_new_flow_rate() {
        let t0 = Instant::now();
        let mut q = SessionQuota::new(limits(), t0);
        let server = Ipv4Addr::new(192, 0, 2, 9);
        let mut admitted = 0;
        let mut rate_drops = 0;
        for port in 1..=65_535u16 {
            // The whole scan within 2 s of fake time.
            let now = t0 + Duration::from_micros(u64::from(port) * 30);
            match check(&mut q, now, &tcp(server, 40_000, port, SYN)) {
                Ok(Some(_)) => admitted += 1,
                Err(QuotaDrop::NewFlowRate) => rate_drops += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        // Burst of 10 plus 10/s over ≈ 1.97 s.
        assert!((29..=30).contains(&admitted), "{admitted}");
        assert_eq!(admitted + rate_drops, 65_535);
        // Half-open probes expire, so the session has room for real flows afterwards.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            check(&mut q, later, &tcp(server, 40_001, 443, SYN))
                .unwrap()
                .map(|f| f.destination_port),
            Some(443)
        );
        assert_eq!(q.flow_count(), 1);
    }

    #[test]
    fn concurrent_flow_cap_and_existing_flows() {
        let t0 = Instant::now();
        let mut q = SessionQuota::new(
            QuotaLimits {
                max_flows: 3,
                new_flows_per_sec: 0.0,
                ..limits()
            },
            t0,
        );
        let server = Ipv4Addr::new(192, 0, 2, 9);
        for port in 1..=3 {
            assert!(
                check(&mut q, t0, &tcp(server, 1000, port, SYN))
                    .unwrap()
                    .is_some()
            );
            // Established: the flow now lives for TCP_IDLE.
            assert_eq!(check(&mut q, t0, &tcp(server, 1000, port, ACK)), Ok(None));
        }
        assert_eq!(
            check(&mut q, t0, &tcp(server, 1000, 4, SYN)),
            Err(QuotaDrop::Flows)
        );
        // Known flows keep passing at the cap.
        assert_eq!(check(&mut q, t0, &tcp(server, 1000, 2, ACK)), Ok(None));
        // A flow closed by the client frees its slot after CLOSING_IDLE.
        assert_eq!(check(&mut q, t0, &tcp(server, 1000, 1, 0x04)), Ok(None));
        let later = t0 + CLOSING_IDLE + Duration::from_millis(1);
        assert!(
            check(&mut q, later, &tcp(server, 1000, 4, SYN))
                .unwrap()
                .is_some()
        );
        // UDP counts too, and expires after UDP_IDLE.
        let udp = ipv4(PROTO_UDP, server, &[0, 53, 0, 53, 0, 8, 0, 0]);
        assert_eq!(check(&mut q, later, &udp), Err(QuotaDrop::Flows));
    }

    #[test]
    fn packet_byte_and_echo_rates() {
        let t0 = Instant::now();
        let mut q = SessionQuota::new(
            QuotaLimits {
                max_flows: 0,
                new_flows_per_sec: 0.0,
                packets_per_sec: 400.0,
                bytes_per_sec: 0.0,
                icmp_echo_per_sec: 5.0,
            },
            t0,
        );
        let server = Ipv4Addr::new(192, 0, 2, 9);
        let echo = ipv4(PROTO_ICMP, server, &[8, 0, 0, 0, 0, 1, 0, 1]);
        let reply = ipv4(PROTO_ICMP, server, &[0, 0, 0, 0, 0, 1, 0, 1]);
        let echoes = (0..20).filter(|_| check(&mut q, t0, &echo).is_ok()).count();
        assert_eq!(echoes, 5);
        // Echo replies (answering the far side's pings) are not echo requests.
        assert_eq!(check(&mut q, t0, &reply), Ok(None));
        // Packets: burst of 100 (a quarter second); the 21 packets above took one each, dropped
        // echoes included.
        let passed = (0..1000)
            .filter(|_| check(&mut q, t0, &reply).is_ok())
            .count();
        assert_eq!(passed, 79);
        assert_eq!(check(&mut q, t0, &reply), Err(QuotaDrop::Packets));
        let t1 = t0 + Duration::from_millis(100);
        let passed = (0..1000)
            .filter(|_| check(&mut q, t1, &reply).is_ok())
            .count();
        assert_eq!(passed, 40);

        let mut q = SessionQuota::new(
            QuotaLimits {
                bytes_per_sec: 100_000.0,
                ..limits()
            }
            .narrowed_to_rate(Some(300_000)),
            t0,
        );
        assert_eq!(q.limits().bytes_per_sec, 100_000.0);
        // Burst 64 KiB: 65536 / 28 = 2340 echo replies of 28 bytes.
        let passed = (0..5000)
            .filter(|_| check(&mut q, t0, &reply).is_ok())
            .count();
        assert_eq!(passed, 2340);
        assert_eq!(check(&mut q, t0, &reply), Err(QuotaDrop::Bytes));
        let narrowed = QuotaLimits::DEFAULT.narrowed_to_rate(Some(1000));
        assert_eq!(narrowed.bytes_per_sec, 1000.0);
    }

    #[test]
    fn bucket_refills_and_reports_full() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 5.0, t0);
        assert!((0..5).all(|_| b.try_take(t0, 1.0)));
        assert!(!b.try_take(t0, 1.0));
        assert!(!b.is_full(t0 + Duration::from_millis(100)));
        assert!(b.is_full(t0 + Duration::from_millis(500)));
        // Time going backwards never adds tokens.
        assert!(b.try_take(t0, 5.0));
        assert!(!b.try_take(t0, 1.0));
        assert!(Bucket::with_rate(0.0, 1.0, t0).is_none());
    }
}
