//! Counters and the Prometheus text endpoint.
//!
//! Counters are relaxed atomics bumped on the data path; the HTTP endpoint is a few lines of
//! hand-written HTTP/1.0 on a [`TcpListener`]: any `GET` gets the whole text exposition.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::packet::DropReason;
use crate::policy::DenyClass;
use crate::quota::QuotaDrop;

/// Why the gateway refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The Origin header is not allowed.
    Origin,
    /// The path is not [`webnic_stack::protocol::SESSION_PATH`].
    Path,
    /// No free address.
    PoolExhausted,
    /// Unsupported protocol version.
    Version,
    /// The client broke the control protocol (no hello in time, bad capsule).
    Protocol,
    /// Tokens are required and the request carried none.
    TokenMissing,
    /// The token is malformed or its MAC does not verify.
    TokenInvalid,
    /// The token has expired.
    TokenExpired,
    /// The token is not valid yet.
    TokenNotYetValid,
    /// The client address holds its cap of sessions.
    PerAddress,
    /// The token subject holds its cap of sessions.
    PerSubject,
    /// The gateway holds its cap of sessions.
    Total,
    /// New sessions from the address arrive too fast.
    RateLimited,
    /// The gateway is draining: it admits no new sessions.
    Draining,
}

impl RefusalReason {
    /// Every reason, in metrics order.
    pub const ALL: [Self; 14] = [
        Self::Origin,
        Self::Path,
        Self::PoolExhausted,
        Self::Version,
        Self::Protocol,
        Self::TokenMissing,
        Self::TokenInvalid,
        Self::TokenExpired,
        Self::TokenNotYetValid,
        Self::PerAddress,
        Self::PerSubject,
        Self::Total,
        Self::RateLimited,
        Self::Draining,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::Path => "path",
            Self::PoolExhausted => "pool_exhausted",
            Self::Version => "version",
            Self::Protocol => "protocol",
            Self::TokenMissing => "token_missing",
            Self::TokenInvalid => "token_invalid",
            Self::TokenExpired => "token_expired",
            Self::TokenNotYetValid => "token_not_yet_valid",
            Self::PerAddress => "per_address",
            Self::PerSubject => "per_subject",
            Self::Total => "total",
            Self::RateLimited => "rate_limited",
            Self::Draining => "draining",
        }
    }
}

/// Direction of a packet counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → TUN: packets written to the TUN device.
    FromClient,
    /// TUN → client: datagrams handed to QUIC.
    ToClient,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Self::FromClient => "from_client",
            Self::ToClient => "to_client",
        }
    }
}

/// Address family of a pool gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// The gateway's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    sessions_active: AtomicU64,
    sessions_total: AtomicU64,
    packets: [AtomicU64; 2],
    bytes: [AtomicU64; 2],
    dropped: [AtomicU64; DropReason::ALL.len()],
    refused: [AtomicU64; RefusalReason::ALL.len()],
    policy_refused: [AtomicU64; DenyClass::ALL.len()],
    icmp_prohibited_sent: AtomicU64,
    quota_dropped: [AtomicU64; QuotaDrop::ALL.len()],
    sessions_max_lifetime: AtomicU64,
    pool_in_use: [AtomicU64; 2],
    pool_free: [AtomicU64; 2],
    pool_configured: [AtomicU64; 2],
    abuse_log_dropped: std::sync::OnceLock<Arc<AtomicU64>>,
    conntrack: std::sync::OnceLock<Arc<crate::conntrack::ConntrackCounters>>,
    quic_connections: AtomicU64,
    link_repair_sessions: AtomicU64,
    link_stream_sessions: AtomicU64,
    tun_coalesced: AtomicU64,
    uplink_stream_packets: AtomicU64,
    tun_segments: AtomicU64,
    coalesced_to_client: AtomicU64,
    link_resent: AtomicU64,
    link_resend_missed: AtomicU64,
    link_nack_malformed: AtomicU64,
    link_resend_limited: AtomicU64,
}

impl Metrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A session was admitted.
    pub fn session_started(&self) {
        self.sessions_active.fetch_add(1, Ordering::Relaxed);
        self.sessions_total.fetch_add(1, Ordering::Relaxed);
    }

    /// An admitted session ended.
    pub fn session_ended(&self) {
        self.sessions_active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sessions admitted since start.
    pub fn sessions_total(&self) -> u64 {
        self.sessions_total.load(Ordering::Relaxed)
    }

    /// Sessions currently active.
    pub fn sessions_active(&self) -> u64 {
        self.sessions_active.load(Ordering::Relaxed)
    }

    /// One packet of `len` bytes forwarded in `direction`.
    pub fn forwarded(&self, direction: Direction, len: usize) {
        self.packets[direction as usize].fetch_add(1, Ordering::Relaxed);
        self.bytes[direction as usize].fetch_add(len as u64, Ordering::Relaxed);
    }

    /// One packet dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Packets dropped for `reason` so far.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()].load(Ordering::Relaxed)
    }

    /// One client packet refused by the egress policy for `class` (also counted as a
    /// [`DropReason::Policy`] drop).
    pub fn policy_refused(&self, class: DenyClass) {
        self.dropped(DropReason::Policy);
        self.policy_refused[class.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// A session asked for link repair.
    pub fn link_repair_enabled(&self) {
        self.link_repair_sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A session moved its packets to the stream link.
    pub fn link_stream_enabled(&self) {
        self.link_stream_sessions.fetch_add(1, Ordering::Relaxed);
    }

    /// A client packet came on its uplink stream (PROTOCOL.md §3.2).
    pub fn uplink_stream_packet(&self) {
        self.uplink_stream_packets.fetch_add(1, Ordering::Relaxed);
    }

    /// A coalesced TCP packet was read from the TUN; `segments`: what the gateway cut it into
    /// (0 when it went whole to a stream-link client).
    pub fn tun_coalesced(&self, segments: u64) {
        self.tun_coalesced.fetch_add(1, Ordering::Relaxed);
        if segments == 0 {
            self.coalesced_to_client.fetch_add(1, Ordering::Relaxed);
        } else {
            self.tun_segments.fetch_add(segments, Ordering::Relaxed);
        }
    }

    /// Packets resent for a NACK, and NACKed packets no longer kept (too old, or never sent).
    pub fn link_resent(&self, resent: u64, missed: u64) {
        self.link_resent.fetch_add(resent, Ordering::Relaxed);
        self.link_resend_missed.fetch_add(missed, Ordering::Relaxed);
    }

    /// NACKed packets not queued for a resend: resent as often as allowed already, queued
    /// already, or too many requests pending.
    pub fn link_resend_limited(&self, count: u64) {
        self.link_resend_limited.fetch_add(count, Ordering::Relaxed);
    }

    /// A NACK datagram that did not parse (it is dropped; the session goes on).
    pub fn link_nack_malformed(&self) {
        self.link_nack_malformed.fetch_add(1, Ordering::Relaxed);
    }

    /// One ICMP administratively-prohibited reply queued to a client.
    pub fn icmp_prohibited_sent(&self) {
        self.icmp_prohibited_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// One client packet (or, for [`QuotaDrop::BytesToClient`], one packet to the client)
    /// dropped by a session quota.
    pub fn quota_dropped(&self, reason: QuotaDrop) {
        self.quota_dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Packets dropped by quota `reason` so far.
    pub fn quota_dropped_count(&self, reason: QuotaDrop) -> u64 {
        self.quota_dropped[reason as usize].load(Ordering::Relaxed)
    }

    /// One session closed because it reached the maximum lifetime.
    pub fn session_max_lifetime(&self) {
        self.sessions_max_lifetime.fetch_add(1, Ordering::Relaxed);
    }

    /// One session refused for `reason`.
    pub fn refused(&self, reason: RefusalReason) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Exports the abuse log's dropped-lines counter.
    pub fn watch_abuse_log(&self, dropped: Arc<AtomicU64>) {
        let _ = self.abuse_log_dropped.set(dropped);
    }

    /// Exports the conntrack cleaner's counters.
    pub fn watch_conntrack(&self, counters: Arc<crate::conntrack::ConntrackCounters>) {
        let _ = self.conntrack.set(counters);
    }

    /// Sets the count of connections the QUIC endpoint holds.
    pub fn set_quic_connections(&self, count: usize) {
        self.quic_connections.store(count as u64, Ordering::Relaxed);
    }

    /// Sets the pool gauges of `family`.
    pub fn set_pool(&self, family: Family, in_use: usize, free: u128) {
        let i = family as usize;
        self.pool_configured[i].store(1, Ordering::Relaxed);
        self.pool_in_use[i].store(in_use as u64, Ordering::Relaxed);
        self.pool_free[i].store(u64::try_from(free).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP webnic_sessions_active Sessions currently established.\n\
             # TYPE webnic_sessions_active gauge\n\
             webnic_sessions_active {}",
            load(&self.sessions_active)
        );
        let _ = writeln!(
            out,
            "# HELP webnic_sessions_total Sessions established since start.\n\
             # TYPE webnic_sessions_total counter\n\
             webnic_sessions_total {}",
            load(&self.sessions_total)
        );
        for (name, help, values) in [
            (
                "webnic_pool_addresses_in_use",
                "Client addresses handed out.",
                &self.pool_in_use,
            ),
            (
                "webnic_pool_addresses_free",
                "Client addresses still available.",
                &self.pool_free,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (i, family) in ["ipv4", "ipv6"].iter().enumerate() {
                if load(&self.pool_configured[i]) == 1 {
                    let _ = writeln!(out, "{name}{{family=\"{family}\"}} {}", load(&values[i]));
                }
            }
        }
        for (name, help, values) in [
            (
                "webnic_packets_total",
                "IP packets forwarded (from_client: written to the TUN; to_client: sent as datagrams).",
                &self.packets,
            ),
            (
                "webnic_bytes_total",
                "IP bytes forwarded, datagram headers excluded.",
                &self.bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for direction in [Direction::FromClient, Direction::ToClient] {
                let _ = writeln!(
                    out,
                    "{name}{{direction=\"{}\"}} {}",
                    direction.label(),
                    load(&values[direction as usize])
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP webnic_dropped_packets_total Packets dropped, by reason.\n\
             # TYPE webnic_dropped_packets_total counter"
        );
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "webnic_dropped_packets_total{{reason=\"{}\"}} {}",
                reason.label(),
                load(&self.dropped[reason.index()])
            );
        }
        let _ = writeln!(
            out,
            "# HELP webnic_policy_refused_packets_total Client packets refused by the egress policy, by destination class.\n\
             # TYPE webnic_policy_refused_packets_total counter"
        );
        for class in DenyClass::ALL {
            let _ = writeln!(
                out,
                "webnic_policy_refused_packets_total{{class=\"{}\"}} {}",
                class.label(),
                load(&self.policy_refused[class.index()])
            );
        }
        let _ = writeln!(
            out,
            "# HELP webnic_icmp_prohibited_sent_total ICMP administratively-prohibited replies sent to clients (rate-limited per session).\n\
             # TYPE webnic_icmp_prohibited_sent_total counter\n\
             webnic_icmp_prohibited_sent_total {}",
            load(&self.icmp_prohibited_sent)
        );
        let _ = writeln!(
            out,
            "# HELP webnic_link_repair_sessions_total Sessions that asked for link repair (sequenced datagrams, NACKs, resends).\n\
             # TYPE webnic_link_repair_sessions_total counter\n\
             webnic_link_repair_sessions_total {}\n\
             # HELP webnic_link_resent_packets_total Packets resent to clients that reported them missing.\n\
             # TYPE webnic_link_resent_packets_total counter\n\
             webnic_link_resent_packets_total {}\n\
             # HELP webnic_link_resend_missed_total Packets clients reported missing that the gateway no longer kept.\n\
             # TYPE webnic_link_resend_missed_total counter\n\
             webnic_link_resend_missed_total {}\n\
             # HELP webnic_link_nack_malformed_total NACK datagrams from clients that did not parse (dropped).\n\
             # TYPE webnic_link_nack_malformed_total counter\n\
             webnic_link_nack_malformed_total {}\n\
             # HELP webnic_link_resend_limited_total Packets clients NACKed that were not resent again (each is resent at most twice).\n\
             # TYPE webnic_link_resend_limited_total counter\n\
             webnic_link_resend_limited_total {}",
            load(&self.link_repair_sessions),
            load(&self.link_resent),
            load(&self.link_resend_missed),
            load(&self.link_nack_malformed),
            load(&self.link_resend_limited),
        );
        let _ = writeln!(
            out,
            "# HELP webnic_link_stream_sessions_total Sessions that moved their packets to the stream link (PROTOCOL.md §3.2).\n\
             # TYPE webnic_link_stream_sessions_total counter\n\
             webnic_link_stream_sessions_total {}",
            load(&self.link_stream_sessions),
        );
        let _ = writeln!(
            out,
            "# HELP webnic_uplink_stream_packets_total Client packets that came on an uplink stream (PROTOCOL.md §3.2).\n\
             # TYPE webnic_uplink_stream_packets_total counter\n\
             webnic_uplink_stream_packets_total {}",
            load(&self.uplink_stream_packets),
        );
        let _ = writeln!(
            out,
            "# HELP webnic_tun_coalesced_packets_total Coalesced TCP packets (up to 64 KiB) read from the TUN (offload).
             # TYPE webnic_tun_coalesced_packets_total counter
             webnic_tun_coalesced_packets_total {}
             # HELP webnic_tun_segments_total Segments the gateway cut coalesced packets into for clients that take only the link MTU.
             # TYPE webnic_tun_segments_total counter
             webnic_tun_segments_total {}
             # HELP webnic_coalesced_to_client_total Coalesced packets sent whole on a stream link.
             # TYPE webnic_coalesced_to_client_total counter
             webnic_coalesced_to_client_total {}",
            load(&self.tun_coalesced),
            load(&self.tun_segments),
            load(&self.coalesced_to_client),
        );
        let _ = writeln!(
            out,
            "# HELP webnic_quota_dropped_packets_total Packets dropped by a session quota, by reason.\n\
             # TYPE webnic_quota_dropped_packets_total counter"
        );
        for reason in QuotaDrop::ALL {
            let _ = writeln!(
                out,
                "webnic_quota_dropped_packets_total{{reason=\"{}\"}} {}",
                reason.label(),
                load(&self.quota_dropped[reason as usize])
            );
        }
        let _ = writeln!(
            out,
            "# HELP webnic_sessions_max_lifetime_total Sessions closed at the maximum session lifetime.\n\
             # TYPE webnic_sessions_max_lifetime_total counter\n\
             webnic_sessions_max_lifetime_total {}",
            load(&self.sessions_max_lifetime)
        );
        let _ = writeln!(
            out,
            "# HELP webnic_refused_sessions_total Sessions refused, by reason.\n\
             # TYPE webnic_refused_sessions_total counter"
        );
        for reason in RefusalReason::ALL {
            let _ = writeln!(
                out,
                "webnic_refused_sessions_total{{reason=\"{}\"}} {}",
                reason.label(),
                load(&self.refused[reason as usize])
            );
        }
        if let Some(dropped) = self.abuse_log_dropped.get() {
            let _ = writeln!(
                out,
                "# HELP webnic_abuse_log_dropped_lines_total Abuse log lines dropped because its writer fell behind.\n\
                 # TYPE webnic_abuse_log_dropped_lines_total counter\n\
                 webnic_abuse_log_dropped_lines_total {}",
                load(dropped)
            );
        }
        if let Some(conntrack) = self.conntrack.get() {
            let _ = writeln!(
                out,
                "# HELP webnic_conntrack_entries_deleted_total Kernel connection-tracking entries deleted when their session's address returned to the pool.\n\
                 # TYPE webnic_conntrack_entries_deleted_total counter\n\
                 webnic_conntrack_entries_deleted_total {}\n\
                 # HELP webnic_conntrack_delete_failures_total conntrack deletions that failed.\n\
                 # TYPE webnic_conntrack_delete_failures_total counter\n\
                 webnic_conntrack_delete_failures_total {}\n\
                 # HELP webnic_conntrack_deletions_pending Released addresses whose conntrack entries are still being deleted.\n\
                 # TYPE webnic_conntrack_deletions_pending gauge\n\
                 webnic_conntrack_deletions_pending {}",
                load(&conntrack.deleted),
                load(&conntrack.failures),
                load(&conntrack.pending)
            );
        }
        // Every QUIC connection the endpoint still holds, including closed ones waiting out their
        // draining period: back to zero shortly after the last session, or connections leak.
        // (Sampled once a second.)
        let _ = writeln!(
            out,
            "# HELP webnic_quic_connections Connections the QUIC endpoint holds, including handshakes and closed connections draining.\n\
             # TYPE webnic_quic_connections gauge\n\
             webnic_quic_connections {}",
            load(&self.quic_connections)
        );
        // Live heap apart from what the allocator holds free: a leak grows the first; the
        // second (and RSS) also moves with fragmentation.
        if let Some((in_use, free)) = crate::sys::heap_usage() {
            let _ = writeln!(
                out,
                "# HELP webnic_heap_in_use_bytes Bytes in live heap allocations (glibc mallinfo2).\n\
                 # TYPE webnic_heap_in_use_bytes gauge\n\
                 webnic_heap_in_use_bytes {in_use}\n\
                 # HELP webnic_heap_free_bytes Bytes the allocator holds free in its arenas.\n\
                 # TYPE webnic_heap_free_bytes gauge\n\
                 webnic_heap_free_bytes {free}"
            );
        }
        // Tasks of the gateway's runtime (sessions, their loops, this scrape's own connection):
        // back to where they were once sessions are gone, or something leaks.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let _ = writeln!(
                out,
                "# HELP webnic_runtime_tasks_alive Tasks alive in the gateway's async runtime.\n\
                 # TYPE webnic_runtime_tasks_alive gauge\n\
                 webnic_runtime_tasks_alive {}",
                runtime.metrics().num_alive_tasks()
            );
        }
        // Drops before the gateway sees a datagram: the kernel's, when the QUIC socket's receive
        // buffer is full. Counted per network namespace (the gateway's), so they include other
        // UDP sockets there; on a dedicated host that is the gateway's socket.
        if let Some(udp) = std::fs::read_to_string("/proc/self/net/snmp")
            .ok()
            .and_then(|text| parse_udp_snmp(&text))
        {
            let _ = writeln!(
                out,
                "# HELP webnic_kernel_udp_receive_buffer_errors_total UDP datagrams the kernel dropped in the gateway's network namespace because a socket's receive buffer was full.\n\
                 # TYPE webnic_kernel_udp_receive_buffer_errors_total counter\n\
                 webnic_kernel_udp_receive_buffer_errors_total {}\n\
                 # HELP webnic_kernel_udp_send_buffer_errors_total UDP datagrams the kernel refused to send in the gateway's network namespace because a send buffer was full.\n\
                 # TYPE webnic_kernel_udp_send_buffer_errors_total counter\n\
                 webnic_kernel_udp_send_buffer_errors_total {}",
                udp.receive_buffer_errors, udp.send_buffer_errors
            );
        }
        out
    }
}

/// The kernel's UDP drop counters (`/proc/net/snmp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSnmp {
    /// `RcvbufErrors`.
    pub receive_buffer_errors: u64,
    /// `SndbufErrors`.
    pub send_buffer_errors: u64,
}

/// Reads the `Udp:` header and value lines of `/proc/net/snmp`.
pub fn parse_udp_snmp(text: &str) -> Option<UdpSnmp> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some(UdpSnmp {
        receive_buffer_errors: field("RcvbufErrors")?,
        send_buffer_errors: field("SndbufErrors")?,
    })
}

/// Serves [`Metrics::render`] over HTTP on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let result =
                tokio::time::timeout(Duration::from_secs(5), answer(stream, &metrics)).await;
            if !matches!(result, Ok(Ok(()))) {
                tracing::debug!(%peer, "metrics request failed or timed out");
            }
        });
    }
}

/// Binds the metrics listener.
///
/// # Errors
/// The bind error.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // Read until the end of the request head; bodies are not expected.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && !request.windows(2).any(|w| w == b"\n\n")
    {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > 16 * 1024 {
            break;
        }
    }
    let response = if request.starts_with(b"GET ") {
        let body = metrics.render();
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.0 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_owned()
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_udp_counters_parse() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
            Udp: 9427768 11284 15747 11550941 15740 3 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
            UdpLite: 0 0 0 0 0 0\n";
        assert_eq!(
            parse_udp_snmp(snmp),
            Some(UdpSnmp {
                receive_buffer_errors: 15740,
                send_buffer_errors: 3
            })
        );
        assert_eq!(parse_udp_snmp("Ip: a\nIp: 1\n"), None);
        assert!(
            Metrics::new()
                .render()
                .contains("webnic_kernel_udp_receive_buffer_errors_total ")
        );
    }

    #[test]
    fn renders_every_reason() {
        let m = Metrics::new();
        m.session_started();
        m.dropped(DropReason::Spoofed);
        m.refused(RefusalReason::Origin);
        m.forwarded(Direction::ToClient, 100);
        m.set_pool(Family::V4, 1, 252);
        let text = m.render();
        assert!(text.contains("webnic_sessions_active 1\n"));
        assert!(text.contains("webnic_sessions_total 1\n"));
        assert!(text.contains("webnic_dropped_packets_total{reason=\"spoofed\"} 1\n"));
        assert!(text.contains("webnic_dropped_packets_total{reason=\"no_route\"} 0\n"));
        assert!(text.contains("webnic_refused_sessions_total{reason=\"origin\"} 1\n"));
        assert!(text.contains("webnic_refused_sessions_total{reason=\"pool_exhausted\"} 0\n"));
        assert!(text.contains("webnic_bytes_total{direction=\"to_client\"} 100\n"));
        assert!(text.contains("webnic_pool_addresses_free{family=\"ipv4\"} 252\n"));
        assert!(!text.contains("family=\"ipv6\""));
        m.policy_refused(DenyClass::Platform);
        let text = m.render();
        assert!(text.contains("webnic_dropped_packets_total{reason=\"policy\"} 1\n"));
        assert!(text.contains("webnic_dropped_packets_total{reason=\"ip_options\"} 0\n"));
        assert!(text.contains("webnic_policy_refused_packets_total{class=\"platform\"} 1\n"));
        assert!(text.contains("webnic_policy_refused_packets_total{class=\"port\"} 0\n"));
        assert!(text.contains("webnic_icmp_prohibited_sent_total 0\n"));
        m.link_repair_enabled();
        m.link_stream_enabled();
        m.link_resent(3, 1);
        m.link_nack_malformed();
        let text = m.render();
        assert!(text.contains("webnic_link_repair_sessions_total 1\n"));
        assert!(text.contains("webnic_link_stream_sessions_total 1\n"));
        assert!(text.contains("webnic_link_resent_packets_total 3\n"));
        assert!(text.contains("webnic_link_resend_missed_total 1\n"));
        assert!(text.contains("webnic_link_nack_malformed_total 1\n"));
        m.quota_dropped(QuotaDrop::NewFlowRate);
        m.refused(RefusalReason::TokenExpired);
        m.refused(RefusalReason::RateLimited);
        m.session_max_lifetime();
        let text = m.render();
        assert!(text.contains("webnic_quota_dropped_packets_total{reason=\"new_flow_rate\"} 1\n"));
        assert!(text.contains("webnic_quota_dropped_packets_total{reason=\"flows\"} 0\n"));
        assert!(text.contains("webnic_refused_sessions_total{reason=\"token_expired\"} 1\n"));
        assert!(text.contains("webnic_refused_sessions_total{reason=\"rate_limited\"} 1\n"));
        assert!(text.contains("webnic_refused_sessions_total{reason=\"per_subject\"} 0\n"));
        assert!(text.contains("webnic_sessions_max_lifetime_total 1\n"));
        assert_eq!(m.quota_dropped_count(QuotaDrop::NewFlowRate), 1);
        for (i, reason) in RefusalReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "ALL is in declaration order");
        }
        for (i, reason) in QuotaDrop::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "ALL is in declaration order");
        }
    }

    #[tokio::test]
    async fn serves_http() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, Arc::new(Metrics::new())));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.0 200 OK\r\n"));
        assert!(response.contains("webnic_sessions_total 0\n"));
        task.abort();
    }
}
