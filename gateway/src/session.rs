//! One WebTransport session: admission, the control stream, and the two datagram directions.
//!
//! The session task admits the request (path, origin), reads the client's hello on the first
//! bidirectional stream, checks the token (from the URL's `token` query parameter, when the
//! gateway requires tokens) and the admission caps, allocates addresses, registers its queue in
//! the route table and sends its configuration. It then runs three loops until one ends:
//!
//! - client → TUN: `receive_datagram`, classify (drop malformed/spoofed), egress policy, token
//!   scope, quotas (flows, rates), clamp MSS, write to the TUN;
//! - TUN → client: pop the session queue (filled by the TUN reader), `send_datagram_wait` on the
//!   QUIC connection so a slow client pushes back into the queue instead of QUIC silently
//!   dropping datagrams;
//! - control: the client's capsules (a `Close`, or the stream ending, ends the session);
//!
//! plus the gateway's shutdown signal and the maximum session lifetime. At the end it removes its
//! routes, returns its addresses and its admission ticket.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use webnic_stack::protocol::{
    AssignedAddress, CapsuleDecoder, CloseCode, ControlMessage, PROTOCOL_VERSION, RouteRange,
    SESSION_PATH, datagram_header,
};
use wtransport::endpoint::IncomingSession;
use wtransport::error::ConnectionError;
use wtransport::{Connection, RecvStream, SendStream, VarInt};

use crate::abuse_log::AbuseLog;
use crate::admission::{Admission, AdmissionRefusal, Ticket};
use crate::lease::{self, Leases};
use crate::metrics::{Direction, Family, Metrics, RefusalReason};
use crate::origin::OriginPolicy;
use crate::packet::{
    DropReason, clamp_tcp_mss, classify_from_client, icmp_prohibited, max_mss_for_mtu,
    mss_clamp_needed,
};
use crate::policy::{EgressPolicy, TokenBucket};
use crate::pool::AddressPool;
use crate::queue::{Next, RouteTable, SessionQueue};
use crate::quota::{Bucket, QuotaDrop, QuotaLimits, SessionQuota};
use crate::token::{Token, TokenError, TokenKey, token_from_path};
use crate::tun_device::TunIo;
use webnic_stack::link_repair::{
    FRAME_GONE, FRAME_NACK, FRAME_SEQUENCED, MAX_NACK_RANGES, SEQUENCED_OVERHEAD, parse_nack,
    put_ranges,
};
use webnic_stack::link_stream::{Deframer, put_frame};

/// How long a client has to open the control stream and send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway waits, after a final `Close` capsule, for the client to read it and
/// close the connection itself before the gateway closes it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Most control-stream bytes taken from quinn at once.
const CONTROL_CHUNK: usize = 1024;

/// The client address pools.
#[derive(Debug)]
pub struct Pools {
    /// IPv4 pool.
    pub v4: AddressPool,
    /// IPv6 pool, if IPv6 is on.
    pub v6: Option<AddressPool>,
}

impl Pools {
    /// One address per configured family, or `None` (nothing allocated) if any pool is empty.
    pub fn allocate(&mut self) -> Option<Vec<IpAddr>> {
        let v4 = self.v4.allocate()?;
        let mut addresses = vec![v4];
        if let Some(v6_pool) = &mut self.v6 {
            let Some(v6) = v6_pool.allocate() else {
                self.v4.release(v4);
                return None;
            };
            addresses.push(v6);
        }
        Some(addresses)
    }

    /// Returns `addresses` to their pools.
    pub fn release(&mut self, addresses: &[IpAddr]) {
        for address in addresses {
            match (address, &mut self.v6) {
                (IpAddr::V4(_), _) => self.v4.release(*address),
                (IpAddr::V6(_), Some(v6)) => v6.release(*address),
                (IpAddr::V6(_), None) => false,
            };
        }
    }

    /// Publishes the pool gauges.
    pub fn update_metrics(&self, metrics: &Metrics) {
        metrics.set_pool(Family::V4, self.v4.in_use(), self.v4.free());
        if let Some(v6) = &self.v6 {
            metrics.set_pool(Family::V6, v6.in_use(), v6.free());
        }
    }
}

/// State shared by the accept loop, the TUN reader and every session.
#[derive(Debug)]
pub struct Shared {
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Address pools.
    pub pools: Mutex<Pools>,
    /// Client address → session queue.
    pub routes: RouteTable,
    /// The TUN device.
    pub tun: TunIo,
    /// Allowed origins.
    pub origins: OriginPolicy,
    /// Link MTU.
    pub link_mtu: u16,
    /// DNS resolvers announced to clients.
    pub dns: Vec<IpAddr>,
    /// Capacity of each session queue.
    pub queue_capacity: usize,
    /// Becomes `true` when the gateway shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// `Some(seconds)` once the gateway drains: no new sessions; existing ones are told they
    /// will be closed within that many seconds.
    pub draining: watch::Receiver<Option<u32>>,
    /// Session numbering for logs.
    pub next_session: AtomicU64,
    /// Which destinations client packets may reach.
    pub policy: EgressPolicy,
    /// The gateway's addresses on the client link (the pools' first addresses): the source of
    /// the ICMP errors it sends to clients. IPv4 first, then IPv6 if on.
    pub link_addresses: Vec<IpAddr>,
    /// The token key; `None`: no token needed.
    pub token_key: Option<Arc<TokenKey>>,
    /// Session caps.
    pub admission: Mutex<Admission>,
    /// Maximum session lifetime.
    pub max_lifetime: Option<Duration>,
    /// Whether clients may have link repair (`--no-link-repair` turns it off).
    pub link_repair: bool,
    /// Whether clients may have the stream link (`--no-link-stream` turns it off).
    pub link_stream: bool,
    /// Per-session quotas (a token may narrow the bandwidth).
    pub quota: QuotaLimits,
    /// The abuse log.
    pub abuse_log: Option<AbuseLog>,
    /// Session leases for resumption; `None` when resumption is off.
    pub leases: Option<Mutex<Leases>>,
    /// Deletes the kernel's flow entries of addresses returned to the pool.
    pub conntrack: crate::conntrack::ConntrackCleaner,
    /// Set when the lease table changed since it was last written to the lease file.
    pub leases_dirty: std::sync::atomic::AtomicBool,
}

/// ICMP administratively-prohibited replies per second per session (and burst): enough for a
/// client to learn quickly, too few to make the gateway a reflector.
pub const ICMP_PROHIBITED_RATE: f64 = 100.0;

impl Shared {
    /// Returns `addresses` to their pools and updates the pool gauges.
    pub fn release(&self, addresses: &[IpAddr]) {
        let mut pools = self.pools();
        pools.release(addresses);
        pools.update_metrics(&self.metrics);
    }

    /// The MSS limits for the link MTU: (IPv4, IPv6).
    pub fn max_mss(&self) -> (u16, u16) {
        max_mss_for_mtu(self.link_mtu)
    }

    fn leases(&self) -> Option<std::sync::MutexGuard<'_, Leases>> {
        let guard = self
            .leases
            .as_ref()?
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.leases_dirty.store(true, Ordering::Relaxed);
        Some(guard)
    }

    pub(crate) fn pools(&self) -> std::sync::MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Who a session is, for logs and the abuse log.
#[derive(Debug)]
struct Identity {
    id: u64,
    remote: std::net::SocketAddr,
    token: Option<Token>,
}

impl Identity {
    fn subject(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.claims.sub.as_str())
    }
}

/// Returns the admission ticket when the session ends, however it ends.
struct AdmissionGuard {
    shared: Arc<Shared>,
    ticket: Option<Ticket>,
}

impl std::fmt::Debug for AdmissionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionGuard")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.admission().release(ticket);
        }
    }
}

/// Why a token was refused, as a close code and a metrics reason.
fn token_refusal(error: &TokenError) -> (CloseCode, RefusalReason) {
    match error {
        TokenError::Malformed(_) | TokenError::BadSignature => {
            (CloseCode::TokenInvalid, RefusalReason::TokenInvalid)
        }
        TokenError::Expired { .. } => (CloseCode::TokenExpired, RefusalReason::TokenExpired),
        TokenError::NotYetValid { .. } => {
            (CloseCode::TokenNotYetValid, RefusalReason::TokenNotYetValid)
        }
    }
}

fn admission_reason(refusal: AdmissionRefusal) -> RefusalReason {
    match refusal {
        AdmissionRefusal::RateLimited(_) => RefusalReason::RateLimited,
        AdmissionRefusal::PerAddress(_) => RefusalReason::PerAddress,
        AdmissionRefusal::PerSubject(_) => RefusalReason::PerSubject,
        AdmissionRefusal::Total(_) => RefusalReason::Total,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Per-session counters for the end-of-session log.
#[derive(Debug, Default)]
struct SessionStats {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    spoofed: AtomicU64,
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    Connection(ConnectionError),
    ControlFinished,
    ControlError(String),
    ClientClose { code: CloseCode, reason: String },
    Shutdown,
    MaxLifetime,
}

/// Handles one incoming session from handshake to cleanup. Never fails: problems are logged
/// and counted.
///
/// Opening (handshake, hello, admission) and finishing run boxed, so the task of an idle
/// session holds only what serving needs: with them inline its future was 3.2 KB, held by every
/// idle session for its whole life.
pub fn handle(incoming: IncomingSession, shared: Arc<Shared>) -> impl Future<Output = ()> + Send {
    let open = Box::pin(open(incoming, shared));
    async move {
        let Some((mut session, early_end)) = open.await else {
            return;
        };
        let end = match early_end {
            Some(end) => end,
            None => {
                serve(
                    &session.connection,
                    &session.shared,
                    &session.identity,
                    &session.addresses,
                    &session.queue,
                    &session.stats,
                    (&mut session.send, &mut session.recv),
                    &mut session.decoder,
                )
                .await
            }
        };
        Box::pin(session.finish(end)).await;
    }
}

/// A session past its hello and admission: what serving it and cleaning up after need.
struct Running {
    id: u64,
    connection: Connection,
    shared: Arc<Shared>,
    send: SendStream,
    recv: RecvStream,
    decoder: CapsuleDecoder,
    identity: Arc<Identity>,
    addresses: Vec<IpAddr>,
    queue: Arc<SessionQueue>,
    stats: Arc<SessionStats>,
    ticket: lease::Ticket,
    /// Released when the session ends.
    admission: AdmissionGuard,
    started: Instant,
}

/// Accepts the WebTransport session and admits it. `None` if it was refused or failed (counted
/// and logged); else the session, and its end if sending the configuration already failed.
async fn open(incoming: IncomingSession, shared: Arc<Shared>) -> Option<(Running, Option<End>)> {
    let request = match tokio::time::timeout(HELLO_TIMEOUT, incoming.into_future()).await {
        Ok(Ok(request)) => request,
        Ok(Err(error)) => {
            tracing::debug!(%error, "session handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!("session handshake timed out");
            return None;
        }
    };
    let remote = request.remote_address();
    let path = request.path().split('?').next().unwrap_or_default();
    if path != SESSION_PATH {
        shared.metrics.refused(RefusalReason::Path);
        // The path without its query: a query may carry a token, which must not reach the logs.
        tracing::info!(%remote, path, "refused session: wrong path");
        request.not_found().await;
        return None;
    }
    if let Some(origin) = request.origin()
        && !shared.origins.allows(origin)
    {
        shared.metrics.refused(RefusalReason::Origin);
        tracing::warn!(%remote, origin, "refused session: origin not allowed");
        request.forbidden().await;
        return None;
    }
    // The token travels in the URL (browsers cannot add headers to a WebTransport request); it
    // is checked after the hello so that a refusal reaches the client as a close code.
    let token = token_from_path(request.path()).map(str::to_owned);
    // A client that lost its connection comes back with `?resume=<ticket>` to get its addresses
    // (and so its open TCP connections) back.
    let resume = query_param(request.path(), "resume").map(lease::Ticket::from_hex);
    let connection = match request.accept().await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%remote, %error, "session accept failed");
            return None;
        }
    };
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    run(id, connection, (token, resume), shared).await
}

/// The value of `name` in the URL's query, if present and non-empty.
fn query_param<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .filter(|value| !value.is_empty())
}

/// Fresh random session ticket.
fn new_ticket() -> lease::Ticket {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system RNG works");
    lease::Ticket(bytes)
}

/// Refuses a session after its hello: counts, logs, tells the client why and closes.
async fn refuse(
    shared: &Shared,
    connection: &Connection,
    send: &mut SendStream,
    who: (u64, Option<&str>),
    reason: RefusalReason,
    code: CloseCode,
    detail: &str,
) {
    let (id, subject) = who;
    let remote = connection.remote_address();
    shared.metrics.refused(reason);
    if let Some(log) = &shared.abuse_log {
        log.refused(remote, subject, reason.label());
    }
    tracing::warn!(session = id, %remote, subject, reason = reason.label(), detail, "refused session");
    close(connection, Some(send), code, detail).await;
}

/// After the WebTransport handshake: the hello, the token, admission, addresses and the
/// configuration sent to the client.
async fn run(
    id: u64,
    connection: Connection,
    (token, resume): (Option<String>, Option<Option<lease::Ticket>>),
    shared: Arc<Shared>,
) -> Option<(Running, Option<End>)> {
    let remote = connection.remote_address();
    let (mut send, recv, decoder) = match hello(&connection).await {
        Ok(Hello::Ok {
            send,
            recv,
            decoder,
        }) => (send, recv, decoder),
        Ok(Hello::Version { mut send, version }) => {
            shared.metrics.refused(RefusalReason::Version);
            tracing::info!(session = id, %remote, version, "refused session: unsupported version");
            close(
                &connection,
                Some(&mut send),
                CloseCode::UnsupportedVersion,
                &format!("protocol version {version} unsupported, speak {PROTOCOL_VERSION}"),
            )
            .await;
            return None;
        }
        Err(reason) => {
            shared.metrics.refused(RefusalReason::Protocol);
            tracing::info!(session = id, %remote, %reason, "refused session: no valid hello");
            close(&connection, None, CloseCode::ProtocolViolation, &reason).await;
            return None;
        }
    };

    let token = match (&shared.token_key, token) {
        (None, _) => None,
        (Some(_), None) => {
            let (reason, code) = (RefusalReason::TokenMissing, CloseCode::TokenMissing);
            let detail = "this gateway requires a token (?token= in the URL)";
            refuse(
                &shared,
                &connection,
                &mut send,
                (id, None),
                reason,
                code,
                detail,
            )
            .await;
            return None;
        }
        (Some(key), Some(text)) => match key.verify(&text, unix_now()) {
            Ok(token) => Some(token),
            Err(error) => {
                let (code, reason) = token_refusal(&error);
                let detail = error.to_string();
                refuse(
                    &shared,
                    &connection,
                    &mut send,
                    (id, None),
                    reason,
                    code,
                    &detail,
                )
                .await;
                return None;
            }
        },
    };
    if shared.draining.borrow().is_some() {
        let detail = "the gateway is draining; try another one or later";
        refuse(
            &shared,
            &connection,
            &mut send,
            (id, None),
            RefusalReason::Draining,
            CloseCode::GatewayShutdown,
            detail,
        )
        .await;
        return None;
    }
    let identity = Identity { id, remote, token };
    let admitted = shared.admission().admit(
        Instant::now(),
        remote.ip(),
        identity.subject(),
        identity.token.as_ref().and_then(|t| t.claims.max_sessions),
    );
    let admission = match admitted {
        Ok(ticket) => AdmissionGuard {
            shared: Arc::clone(&shared),
            ticket: Some(ticket),
        },
        Err(refusal) => {
            let who = (id, identity.subject());
            let (reason, code) = (admission_reason(refusal), refusal.close_code());
            let detail = refusal.to_string();
            refuse(&shared, &connection, &mut send, who, reason, code, &detail).await;
            return None;
        }
    };

    let ticket = new_ticket();
    let resumed = match (resume, shared.leases()) {
        (Some(Some(old)), Some(mut leases)) => match leases.resume(&old, ticket, Instant::now()) {
            Ok(addresses) => Some(addresses),
            Err(error) => {
                tracing::info!(session = id, %remote, %error, "resumption refused; fresh addresses");
                None
            }
        },
        (Some(None), _) => {
            tracing::info!(session = id, %remote, "malformed resume ticket; fresh addresses");
            None
        }
        _ => None,
    };
    let was_resumed = resumed.is_some();
    let addresses = resumed.or_else(|| {
        let mut pools = shared.pools();
        let addresses = pools.allocate();
        pools.update_metrics(&shared.metrics);
        addresses
    });
    let Some(addresses) = addresses else {
        shared.metrics.refused(RefusalReason::PoolExhausted);
        tracing::warn!(session = id, %remote, "refused session: address pool exhausted");
        close(
            &connection,
            Some(&mut send),
            CloseCode::PoolExhausted,
            "no free address",
        )
        .await;
        return None;
    };

    if !was_resumed && let Some(mut leases) = shared.leases() {
        leases.issue(ticket, addresses.clone());
    }
    let header = datagram_header(connection.session_id().into_u64());
    let queue = Arc::new(SessionQueue::new(shared.queue_capacity, header));
    for address in &addresses {
        shared.routes.insert(*address, Arc::clone(&queue));
    }
    shared.metrics.session_started();
    let started = Instant::now();
    tracing::info!(
        session = id,
        %remote,
        subject = identity.subject(),
        addresses = ?addresses,
        resumed = was_resumed,
        "session started"
    );
    if let Some(log) = &shared.abuse_log {
        log.session_started(id, remote, identity.subject(), &addresses);
    }
    let identity = Arc::new(identity);

    let stats = Arc::new(SessionStats::default());
    let ticket_to_send = shared.leases.is_some().then_some(ticket);
    let early_end = send
        .write_all(&configuration(&shared, &addresses, ticket_to_send))
        .await
        .err()
        .map(|error| End::ControlError(format!("sending configuration: {error}")));
    let session = Running {
        id,
        connection,
        shared,
        send,
        recv,
        decoder,
        identity,
        addresses,
        queue,
        stats,
        ticket,
        admission,
        started,
    };
    Some((session, early_end))
}

impl Running {
    /// After serving: closes the connection the way `end` calls for, parks or ends the lease,
    /// frees the addresses and logs the session's end.
    async fn finish(self, end: End) {
        let Self {
            id,
            connection,
            shared,
            mut send,
            identity,
            addresses,
            stats,
            ticket,
            admission,
            started,
            ..
        } = self;
        let remote = identity.remote;
        // Decided before the closes below change the connection's state. A client that closed
        // its connection on purpose, even without a Close capsule, is gone; a control stream
        // that failed because the connection timed out or was reset is a lost connection.
        let lost = match &end {
            End::Shutdown => true,
            End::Connection(error) => !matches!(error, ConnectionError::ApplicationClosed(_)),
            End::ControlError(_) => {
                match tokio::time::timeout(Duration::from_millis(200), connection.closed()).await {
                    Ok(error) => !matches!(
                        error,
                        ConnectionError::ApplicationClosed(_) | ConnectionError::LocallyClosed
                    ),
                    // The connection is still up: the client broke the protocol.
                    Err(_) => false,
                }
            }
            _ => false,
        };
        match &end {
            End::Shutdown => {
                close(
                    &connection,
                    Some(&mut send),
                    CloseCode::GatewayShutdown,
                    "gateway shutting down",
                )
                .await;
            }
            End::ControlError(reason) => {
                close(
                    &connection,
                    Some(&mut send),
                    CloseCode::ProtocolViolation,
                    reason,
                )
                .await;
            }
            End::MaxLifetime => {
                shared.metrics.session_max_lifetime();
                close(
                    &connection,
                    Some(&mut send),
                    CloseCode::MaxLifetime,
                    "maximum session lifetime reached",
                )
                .await;
            }
            End::ClientClose { .. } | End::ControlFinished => {
                connection.close(VarInt::from_u32(CloseCode::Normal.to_u32()), b"");
            }
            End::Connection(_) => {}
        }

        for address in &addresses {
            shared.routes.remove(*address);
        }
        // A connection that was lost, or a gateway going down, parks the lease: the client may come
        // back with its ticket. Anything else ends it and the addresses go back to the pool.
        // A session that moved no packet left no flow in the kernel's conntrack table to delete.
        let carried_traffic = stats.rx_packets.load(Ordering::Relaxed) > 0
            || stats.tx_packets.load(Ordering::Relaxed) > 0;
        let parked = lost
            && shared
                .leases()
                .map(|mut leases| {
                    if carried_traffic {
                        leases.note_traffic(&ticket);
                    }
                    leases.park(&ticket, Instant::now());
                })
                .is_some();
        if !parked {
            if let Some(mut leases) = shared.leases() {
                leases.end(&ticket);
            }
            if carried_traffic {
                // Back to the pool once the kernel forgot the session's flows, off this task.
                let (shared, addresses) = (Arc::clone(&shared), addresses.clone());
                tokio::spawn(async move {
                    shared.conntrack.forget(&addresses).await;
                    shared.release(&addresses);
                });
            } else {
                shared.release(&addresses);
            }
        }
        shared.metrics.session_ended();
        if let Some(log) = &shared.abuse_log {
            log.session_ended(
                id,
                remote,
                identity.subject(),
                started.elapsed(),
                &describe(&end),
            );
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // The QUIC path as the connection saw it: what loss on the hop cost.
        let path = connection.quic_connection().stats().path;
        tracing::info!(
            session = id,
            %remote,
            addresses = ?addresses,
            duration = ?started.elapsed(),
            end = %describe(&end),
            rx_packets = load(&stats.rx_packets),
            rx_bytes = load(&stats.rx_bytes),
            tx_packets = load(&stats.tx_packets),
            tx_bytes = load(&stats.tx_bytes),
            spoofed = load(&stats.spoofed),
            quic_rtt = ?path.rtt,
            quic_sent_packets = path.sent_packets,
            quic_lost_packets = path.lost_packets,
            quic_congestion_events = path.congestion_events,
            "session ended"
        );
        // Admission is given back last, once everything above is done.
        drop(admission);
    }
}

fn describe(end: &End) -> String {
    match end {
        End::Connection(error) => format!("connection: {error}"),
        End::ControlFinished => "client finished the control stream".to_owned(),
        End::ControlError(reason) => format!("control stream: {reason}"),
        End::ClientClose { code, reason } => format!("client closed ({code}): {reason}"),
        End::Shutdown => "gateway shutdown".to_owned(),
        End::MaxLifetime => "maximum session lifetime".to_owned(),
    }
}

enum Hello {
    Ok {
        send: SendStream,
        recv: RecvStream,
        decoder: CapsuleDecoder,
    },
    Version {
        send: SendStream,
        version: u32,
    },
}

/// Waits (at most [`HELLO_TIMEOUT`]) for the control stream and the client's hello.
async fn hello(connection: &Connection) -> Result<Hello, String> {
    tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = connection
            .accept_bi()
            .await
            .map_err(|error| format!("no control stream: {error}"))?;
        let mut decoder = CapsuleDecoder::new();
        let mut buf = [0u8; 2048];
        loop {
            match decoder.next_message() {
                Ok(Some(ControlMessage::ClientHello { version })) => {
                    if version != PROTOCOL_VERSION {
                        return Ok(Hello::Version { send, version });
                    }
                    return Ok(Hello::Ok {
                        send,
                        recv,
                        decoder,
                    });
                }
                // RFC 9297: unknown capsules are skipped.
                Ok(Some(ControlMessage::Unknown { .. })) => continue,
                Ok(Some(other)) => return Err(format!("expected ClientHello, got {other:?}")),
                Ok(None) => {}
                Err(error) => return Err(format!("bad capsule: {error}")),
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.extend(&buf[..n]),
                Ok(None) => return Err("control stream ended before ClientHello".to_owned()),
                Err(error) => return Err(format!("reading control stream: {error}")),
            }
        }
    })
    .await
    .map_err(|_| format!("no ClientHello within {HELLO_TIMEOUT:?}"))?
}

/// The initial burst: ServerHello, LinkMtu, DnsServers, RouteAdvertisement, AddressAssign
/// (last, so the client may treat it as "configured").
fn configuration(shared: &Shared, addresses: &[IpAddr], ticket: Option<lease::Ticket>) -> Vec<u8> {
    let mut routes = vec![RouteRange {
        start: IpAddr::from([0u8; 4]),
        end: IpAddr::from([255u8; 4]),
        protocol: 0,
    }];
    if addresses.iter().any(IpAddr::is_ipv6) {
        routes.push(RouteRange {
            start: IpAddr::from([0u8; 16]),
            end: IpAddr::from([0xffu8; 16]),
            protocol: 0,
        });
    }
    let assigned = addresses
        .iter()
        .map(|address| AssignedAddress {
            request_id: 0,
            address: *address,
            prefix_len: if address.is_ipv4() { 32 } else { 128 },
        })
        .collect();
    let mut out = Vec::with_capacity(256);
    for message in [
        ControlMessage::ServerHello {
            version: PROTOCOL_VERSION,
        },
        ControlMessage::LinkMtu(shared.link_mtu),
        ControlMessage::DnsServers(shared.dns.clone()),
        ControlMessage::RouteAdvertisement(routes),
    ] {
        message.emit(&mut out);
    }
    if let Some(ticket) = ticket {
        ControlMessage::SessionTicket(ticket.0.to_vec()).emit(&mut out);
    }
    // Last: clients take ADDRESS_ASSIGN as "configuration complete".
    ControlMessage::AddressAssign(assigned).emit(&mut out);
    out
}

/// Sends a `Close` capsule (if there is a control stream), waits briefly for it to be
/// acknowledged, then closes the connection with the same code.
async fn close(
    connection: &Connection,
    send: Option<&mut SendStream>,
    code: CloseCode,
    reason: &str,
) {
    if let Some(send) = send {
        let mut capsule = Vec::new();
        ControlMessage::Close {
            code,
            reason: reason.to_owned(),
        }
        .emit(&mut capsule);
        // A browser errors a stream when its session closes, discarding data the page has not
        // read yet, so the capsule being acknowledged is not enough: wait (bounded) for the client
        // to read it and close.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            if send.write_all(&capsule).await.is_ok() {
                let _ = send.finish().await;
                connection.closed().await;
            }
        })
        .await;
    }
    connection.close(VarInt::from_u32(code.to_u32()), reason.as_bytes());
}

/// Runs the session's loops until one of them ends.
#[allow(clippy::too_many_arguments)]
async fn serve(
    connection: &Connection,
    shared: &Arc<Shared>,
    identity: &Arc<Identity>,
    addresses: &[IpAddr],
    queue: &Arc<SessionQueue>,
    stats: &Arc<SessionStats>,
    (send, recv): (&mut SendStream, &mut RecvStream),
    decoder: &mut CapsuleDecoder,
) -> End {
    // The datagram directions run as their own tasks so they can use both cores.
    let limits = shared
        .quota
        .narrowed_to_rate(identity.token.as_ref().and_then(|t| t.claims.rate));
    let path = Arc::new(ClientPath::new(
        Arc::clone(shared),
        Arc::clone(identity),
        limits,
        addresses.to_vec(),
        Arc::clone(queue),
        Arc::clone(stats),
    ));
    let mut rx = tokio::spawn(client_to_tun(connection.clone(), Arc::clone(&path)));
    let mut tx = tokio::spawn(tun_to_client(connection.clone(), path, limits));
    let mut shutdown = shared.shutdown.clone();
    let mut draining = shared.draining.clone();
    let mut told_draining = false;
    // Boxed, and only when there is a limit: a timer entry is a few hundred bytes.
    let mut lifetime = shared
        .max_lifetime
        .map(|limit| Box::pin(tokio::time::sleep(limit)));
    let end = loop {
        tokio::select! {
            () = async {
                match lifetime.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            } => break End::MaxLifetime,
            end = &mut rx => break end.unwrap_or_else(|error| End::ControlError(format!("receiver task: {error}"))),
            end = &mut tx => break end.unwrap_or_else(|error| End::ControlError(format!("sender task: {error}"))),
            end = control(recv, decoder, queue, shared) => break end,
            // (The watch guards are dropped inside these futures: they must not live across
            // the write below.)
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break End::Shutdown,
            seconds = async { draining.wait_for(Option::is_some).await.map(|s| s.unwrap_or(0)) },
                if !told_draining =>
            {
                told_draining = true;
                let seconds = seconds.unwrap_or(0);
                let mut capsule = Vec::new();
                ControlMessage::Draining { seconds }.emit(&mut capsule);
                if let Err(error) = send.write_all(&capsule).await {
                    tracing::debug!(%error, "could not tell the client the gateway drains");
                }
            }
        }
    };
    rx.abort();
    tx.abort();
    end
}

/// Aborts its task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the client's capsules after the hello.
async fn control(
    recv: &mut RecvStream,
    decoder: &mut CapsuleDecoder,
    queue: &SessionQueue,
    shared: &Shared,
) -> End {
    loop {
        loop {
            match decoder.next_message() {
                Ok(Some(ControlMessage::Close { code, reason })) => {
                    return End::ClientClose { code, reason };
                }
                Ok(Some(ControlMessage::LinkRepair)) if shared.link_repair => {
                    let frame =
                        usize::from(shared.link_mtu) + SEQUENCED_OVERHEAD + queue.h3_header_len();
                    if frame > crate::config::QUIC_BASE_DATAGRAM {
                        // A full-size packet would no longer fit a datagram on a path that has
                        // not grown its MTU: stay unsequenced rather than drop large packets.
                        tracing::debug!(
                            link_mtu = shared.link_mtu,
                            "link repair refused: the link MTU leaves no room for its 5 bytes"
                        );
                    } else if queue.enable_link_repair() {
                        shared.metrics.link_repair_enabled();
                        tracing::debug!("client asked for link repair: datagrams sequenced");
                    }
                }
                Ok(Some(ControlMessage::LinkStream { max_packet })) if shared.link_stream => {
                    if queue.enable_stream_link() {
                        shared.metrics.link_stream_enabled();
                        tracing::debug!(max_packet, "client asked for the stream link");
                    }
                    if max_packet > shared.link_mtu && shared.tun.offload() {
                        queue.accept_large_packets(max_packet);
                    }
                }
                Ok(Some(message)) => {
                    tracing::debug!(?message, "ignoring control message from client");
                }
                Ok(None) => break,
                Err(error) => return End::ControlError(format!("bad capsule: {error}")),
            }
        }
        // Chunks quinn already holds, not a read buffer that would live in every idle
        // session's task; capsules are short (a larger one takes several chunks).
        match recv.quic_stream_mut().read_chunk(CONTROL_CHUNK, true).await {
            Ok(Some(chunk)) => decoder.extend(&chunk.bytes),
            Ok(None) => return End::ControlFinished,
            Err(error) => return End::ControlError(format!("reading: {error}")),
        }
    }
}

/// The client → TUN direction of one session: what every client packet passes on its way to the
/// TUN, whether it came as a datagram or on the uplink stream (PROTOCOL.md §3.2). Both readers
/// share it, so a session's quotas hold across both.
struct ClientPath {
    shared: Arc<Shared>,
    identity: Arc<Identity>,
    addresses: Vec<IpAddr>,
    queue: Arc<SessionQueue>,
    stats: Arc<SessionStats>,
    policing: Mutex<Policing>,
}

/// The per-session policing state of [`ClientPath`].
struct Policing {
    quota: SessionQuota,
    /// Each quota reason is logged at warn level once per session, then at debug.
    warned: [bool; QuotaDrop::ALL.len()],
    /// ICMP "administratively prohibited" replies, rate-limited.
    icmp_budget: TokenBucket,
}

impl ClientPath {
    fn new(
        shared: Arc<Shared>,
        identity: Arc<Identity>,
        limits: QuotaLimits,
        addresses: Vec<IpAddr>,
        queue: Arc<SessionQueue>,
        stats: Arc<SessionStats>,
    ) -> Self {
        Self {
            shared,
            identity,
            addresses,
            queue,
            stats,
            policing: Mutex::new(Policing {
                quota: SessionQuota::new(limits, Instant::now()),
                warned: [false; QuotaDrop::ALL.len()],
                icmp_budget: TokenBucket::new(ICMP_PROHIBITED_RATE, ICMP_PROHIBITED_RATE),
            }),
        }
    }

    /// Classifies, polices and forwards one client packet to the TUN.
    async fn forward(&self, packet: Bytes) {
        let Some(packet) = self.admit(packet) else {
            return;
        };
        match self.shared.tun.send(&packet).await {
            Ok(_) => {
                self.shared
                    .metrics
                    .forwarded(Direction::FromClient, packet.len());
                self.stats.rx_packets.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .rx_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            Err(error) => {
                self.shared.metrics.dropped(DropReason::TunWrite);
                tracing::debug!(%error, "TUN write failed");
            }
        }
    }

    /// The packet as it may go to the TUN (its SYN's MSS clamped), or `None` when it is dropped
    /// (counted and logged here).
    fn admit(&self, packet: Bytes) -> Option<Bytes> {
        let shared = &self.shared;
        let identity = &self.identity;
        let classified = match classify_from_client(&packet, &self.addresses) {
            Ok(classified) => classified,
            Err(reason) => {
                shared.metrics.dropped(reason);
                if reason == DropReason::Spoofed {
                    let n = self.stats.spoofed.fetch_add(1, Ordering::Relaxed) + 1;
                    if n == 1 || n.is_multiple_of(1000) {
                        tracing::warn!(
                            remote = %identity.remote,
                            spoofed_so_far = n,
                            "dropping client packets with a source address not assigned to the session"
                        );
                    }
                } else {
                    tracing::debug!(%reason, len = packet.len(), "dropped client packet");
                }
                return None;
            }
        };
        let mut policing = self.policing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(refusal) = shared.policy.check(
            classified.destination,
            classified.protocol,
            classified.destination_port,
        ) {
            shared.metrics.policy_refused(refusal.class);
            tracing::debug!(
                destination = %classified.destination,
                protocol = classified.protocol,
                port = ?classified.destination_port,
                %refusal,
                "refused client packet"
            );
            self.prohibited(&packet, classified.source, &mut policing.icmp_budget);
            return None;
        }
        let scope_ok = identity
            .token
            .as_ref()
            .is_none_or(|token| token.allows(classified.destination, classified.destination_port));
        let verdict = if scope_ok {
            policing.quota.check(Instant::now(), &packet, &classified)
        } else {
            Err(QuotaDrop::TokenScope)
        };
        match verdict {
            Ok(None) => {}
            Ok(Some(flow)) => {
                if let Some(log) = &shared.abuse_log {
                    log.flow(identity.id, identity.remote, identity.subject(), &flow);
                }
            }
            Err(reason) => {
                shared.metrics.quota_dropped(reason);
                if policing.warned[reason as usize] {
                    tracing::debug!(session = identity.id, reason = reason.label(), destination = %classified.destination, "quota dropped client packet");
                } else {
                    policing.warned[reason as usize] = true;
                    tracing::warn!(
                        session = identity.id,
                        remote = %identity.remote,
                        subject = identity.subject(),
                        reason = reason.label(),
                        destination = %classified.destination,
                        "session quota dropping client packets"
                    );
                }
                if reason == QuotaDrop::TokenScope {
                    self.prohibited(&packet, classified.source, &mut policing.icmp_budget);
                }
                return None;
            }
        }
        drop(policing);
        let (max_v4, max_v6) = shared.max_mss();
        Some(if mss_clamp_needed(&packet, max_v4, max_v6) {
            let mut copy = packet.to_vec();
            clamp_tcp_mss(&mut copy, max_v4, max_v6);
            Bytes::from(copy)
        } else {
            packet
        })
    }

    /// Queues an ICMP "administratively prohibited" for a refused packet, within `budget`.
    fn prohibited(&self, packet: &[u8], source: IpAddr, budget: &mut TokenBucket) {
        let shared = &self.shared;
        let from = shared
            .link_addresses
            .iter()
            .find(|a| a.is_ipv4() == source.is_ipv4());
        if let Some(from) = from
            && let Some(reply) = icmp_prohibited(packet, *from, usize::from(shared.link_mtu))
            && budget.try_take(Instant::now())
        {
            let header = self.queue.header();
            let mut datagram = Vec::with_capacity(header.len() + reply.len());
            datagram.extend_from_slice(header);
            datagram.extend_from_slice(&reply);
            if self.queue.push(Bytes::from(datagram)) {
                shared.metrics.dropped(DropReason::QueueFull);
            }
            shared.metrics.icmp_prohibited_sent();
        }
    }
}

// Not an `async fn`: it would keep its by-value arguments twice in the future (argument and
// body binding), in every session's task; an async block uses its captures in place.
#[allow(clippy::manual_async_fn)]
fn client_to_tun(
    connection: Connection,
    path: Arc<ClientPath>,
) -> impl Future<Output = End> + Send {
    async move {
        // Datagrams are read from quinn's queue directly: wtransport's `receive_datagram` hands
        // each one from its worker task over a capacity-1 channel, a task switch per packet. Its
        // worker still reads quinn's queue too and may take one now and then, so its channel is
        // polled as well, first: what it holds is older than what is left in quinn's queue, and
        // taking it late would reorder the flow.
        let quic = connection.quic_connection().clone();
        let quarter_id = connection.session_id().into_u64() / 4;
        loop {
            let packet = tokio::select! {
                biased;
                datagram = connection.receive_datagram() => match datagram {
                    Ok(datagram) => datagram.payload(),
                    Err(error) => return End::Connection(error),
                },
                datagram = quic.read_datagram() => match datagram {
                    Ok(datagram) => match webnic_stack::protocol::get_varint(&datagram) {
                        Some((id, len)) if id == quarter_id => datagram.slice(len..),
                        _ => {
                            path.shared.metrics.dropped(DropReason::Malformed);
                            continue;
                        }
                    },
                    Err(error) => return End::Connection(error.into()),
                },
            };
            if packet.first() == Some(&FRAME_NACK) && path.queue.link_repair() {
                take_nack(&path.queue, &packet, &path.shared.metrics);
                continue;
            }
            path.forward(packet).await;
        }
    }
}

/// Most bytes taken from the uplink stream at once.
const UPLINK_CHUNK: usize = 64 << 10;

/// Reads the client's uplink stream (PROTOCOL.md §3.2): its first unidirectional stream, carrying
/// its packets framed as the stream link's. Each packet takes the datagrams' path. Broken framing
/// or a packet above the link MTU closes the connection as a protocol violation.
#[allow(clippy::manual_async_fn)]
fn read_uplink(connection: Connection, path: Arc<ClientPath>) -> impl Future<Output = ()> + Send {
    async move {
        let Ok(mut stream) = connection.accept_uni().await else {
            return;
        };
        let link_mtu = usize::from(path.shared.link_mtu);
        let mut deframer = Deframer::new();
        while let Ok(Some(chunk)) = stream
            .quic_stream_mut()
            .read_chunk(UPLINK_CHUNK, true)
            .await
        {
            deframer.extend(&chunk.bytes);
            loop {
                let reason = match deframer.next_packet() {
                    Ok(Some(packet)) if packet.len() <= link_mtu => {
                        path.shared.metrics.uplink_stream_packet();
                        path.forward(Bytes::copy_from_slice(packet)).await;
                        continue;
                    }
                    Ok(Some(packet)) => {
                        path.shared.metrics.dropped(DropReason::Oversize);
                        format!("uplink packet of {} bytes above the link MTU", packet.len())
                    }
                    Ok(None) => break,
                    Err(error) => {
                        path.shared.metrics.dropped(DropReason::Malformed);
                        format!("uplink stream: {error}")
                    }
                };
                tracing::warn!(session = path.identity.id, %reason, "closing the session");
                connection.close(
                    VarInt::from_u32(CloseCode::ProtocolViolation.to_u32()),
                    reason.as_bytes(),
                );
                return;
            }
        }
    }
}

/// Takes a client's NACK (link repair): the sender resends what is still kept and answers GONE
/// for the rest. A malformed NACK is counted and dropped.
fn take_nack(queue: &SessionQueue, nack: &[u8], metrics: &Metrics) {
    match parse_nack(nack) {
        Ok(ranges) => {
            let outcome = queue.request_resends(ranges);
            metrics.link_resend_limited(outcome.limited);
        }
        Err(error) => {
            metrics.link_nack_malformed();
            tracing::debug!(%error, len = nack.len(), "dropped a malformed NACK");
        }
    }
}

/// Most bytes of framed packets written to the stream link at once.
const STREAM_WRITE: usize = 64 << 10;

/// The sender of a session on the stream link (PROTOCOL.md §3.2): opens a unidirectional stream
/// to the client and writes every packet there, framed, as many as are queued per write (up to
/// [`STREAM_WRITE`] bytes), starting with `first`. Returns how the session ended, or `Err` if the
/// stream could not be opened.
async fn send_on_stream(
    connection: &Connection,
    path: &Arc<ClientPath>,
    mut bytes: Option<Bucket>,
    first: Bytes,
) -> Result<End, String> {
    let (shared, queue, stats) = (&path.shared, &path.queue, &path.stats);
    let opening = match connection.open_uni().await {
        Ok(opening) => opening,
        Err(error) => return Ok(End::Connection(error)),
    };
    let mut stream = opening.await.map_err(|error| error.to_string())?;
    // The client answers this stream with its uplink stream: read it from now on (not before,
    // so an idle session carries no reader), for as long as this sender runs.
    let _uplink = AbortOnDrop(tokio::spawn(read_uplink(
        connection.clone(),
        Arc::clone(path),
    )));
    let h3_len = queue.h3_header_len();
    let mut write = Vec::new();
    let mut pending = Some(first);
    loop {
        let datagram = match pending.take() {
            Some(datagram) => datagram,
            None => match queue.next().await {
                Next::Datagram(datagram) => datagram,
                // Only link repair asks for resends, and it is off on the stream link.
                Next::Resends => continue,
            },
        };
        let mut framed = 0;
        let mut next = Some(datagram);
        while let Some(datagram) = next.take() {
            let packet = &datagram[h3_len..];
            if let Some(bucket) = &mut bytes
                && !bucket.try_take(Instant::now(), packet.len() as f64)
            {
                shared.metrics.quota_dropped(QuotaDrop::BytesToClient);
            } else {
                put_frame(&mut write, packet);
                framed += 1;
                shared.metrics.forwarded(Direction::ToClient, packet.len());
                stats
                    .tx_bytes
                    .fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            if write.len() < STREAM_WRITE
                && let Some(Next::Datagram(datagram)) = queue.try_next()
            {
                next = Some(datagram);
            }
        }
        stats.tx_packets.fetch_add(framed, Ordering::Relaxed);
        if write.is_empty() {
            continue;
        }
        // Copied by quinn into its send buffer (a buffer handed over whole would be held, at
        // its full capacity, until acknowledged: 64 KiB for a write of one small packet).
        if let Err(error) = stream.write_all(&write).await {
            // The connection went away, or the client stopped the stream.
            let closed = tokio::time::timeout(Duration::from_millis(100), connection.closed());
            return Ok(match closed.await {
                Ok(error) => End::Connection(error),
                Err(_) => End::ControlError(format!("stream link: {error}")),
            });
        }
        write.clear();
    }
}

/// How long sent datagrams are kept for resends after they left the gateway: a few QUIC round
/// trips (the client gives up on a gap after about 4.5 link round trips) plus what may wait in
/// QUIC's send buffer, within these bounds.
fn resend_keep(rtt: Duration) -> Duration {
    (rtt * 5 + Duration::from_millis(50)).min(Duration::from_millis(250))
}

/// Sends what clients asked to have resent, then a GONE for what is no longer kept. Resends
/// pass the session's byte quota like any datagram. `Err` when the connection is gone.
async fn send_resends(
    quic: &wtransport::quinn::Connection,
    queue: &SessionQueue,
    bytes: &mut Option<Bucket>,
    metrics: &Metrics,
) -> Result<(), End> {
    let mut resends = Vec::new();
    let mut gone = Vec::new();
    queue.take_requests(&mut resends, &mut gone);
    let mut resent = 0;
    for datagram in resends {
        let ip_len = datagram.len() - queue.h3_header_len() - SEQUENCED_OVERHEAD;
        if let Some(bucket) = bytes
            && !bucket.try_take(Instant::now(), ip_len as f64)
        {
            metrics.quota_dropped(QuotaDrop::BytesToClient);
            continue;
        }
        match quic.send_datagram_wait(datagram).await {
            Ok(()) => resent += 1,
            Err(wtransport::quinn::SendDatagramError::ConnectionLost(error)) => {
                return Err(End::Connection(error.into()));
            }
            Err(error) => tracing::debug!(%error, "resend failed"),
        }
    }
    metrics.link_resent(resent, gone.len() as u64);
    // The client should stop waiting for what is no longer kept: TCP will repair it.
    gone.sort_unstable();
    gone.dedup();
    let mut rest = &gone[..];
    while !rest.is_empty() {
        let mut frame = Vec::with_capacity(16 + 5 * MAX_NACK_RANGES);
        frame.extend_from_slice(&queue.header()[..queue.h3_header_len()]);
        frame.push(FRAME_GONE);
        let taken = put_ranges(&mut frame, rest);
        rest = &rest[taken..];
        if let Err(wtransport::quinn::SendDatagramError::ConnectionLost(error)) =
            quic.send_datagram_wait(Bytes::from(frame)).await
        {
            return Err(End::Connection(error.into()));
        }
    }
    Ok(())
}

// Not an `async fn`, for the same reason as `client_to_tun`.
#[allow(clippy::manual_async_fn)]
fn tun_to_client(
    connection: Connection,
    path: Arc<ClientPath>,
    limits: QuotaLimits,
) -> impl Future<Output = End> + Send {
    async move {
        let (shared, queue, stats) = (&path.shared, &path.queue, &path.stats);
        let h3_len = queue.h3_header_len();
        let quic = connection.quic_connection();
        let mut bytes = limits.byte_bucket(Instant::now());
        let mut keep = resend_keep(quic.rtt());
        let mut until_rtt = 0u32;
        loop {
            let next = match queue.try_next() {
                Some(next) => next,
                // Quiet: what was kept for resends is freed once it is too old to be asked for,
                // so an idle session holds none of it.
                None if queue.keeps_sent() => {
                    match tokio::time::timeout(keep, queue.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            queue.forget_sent();
                            continue;
                        }
                    }
                }
                None => queue.next().await,
            };
            let datagram = match next {
                // Resends go first: the client holds everything behind them.
                // Boxed: resends are rare, and inline their state would size every idle
                // session's task.
                Next::Resends => {
                    let resends = send_resends(quic, queue, &mut bytes, &shared.metrics);
                    if let Err(end) = Box::pin(resends).await {
                        return end;
                    }
                    continue;
                }
                Next::Datagram(datagram) => datagram,
            };
            if queue.stream_link() {
                // From now on every packet goes on the stream link; boxed, as only sessions
                // that asked for it need its state.
                let sender = send_on_stream(&connection, &path, bytes.take(), datagram);
                match Box::pin(sender).await {
                    Ok(end) => return end,
                    Err(error) => {
                        // Datagrams still work: carry on with them (the packet in hand is
                        // lost, TCP resends it).
                        tracing::warn!(%error, "could not open the stream link; staying on datagrams");
                        queue.stream_link_failed();
                        bytes = limits.byte_bucket(Instant::now());
                        continue;
                    }
                }
            }
            let sequenced = datagram.get(h3_len) == Some(&FRAME_SEQUENCED);
            let header_len = h3_len + if sequenced { SEQUENCED_OVERHEAD } else { 0 };
            let ip_len = datagram.len() - header_len;
            if let Some(bucket) = &mut bytes
                && !bucket.try_take(Instant::now(), ip_len as f64)
            {
                shared.metrics.quota_dropped(QuotaDrop::BytesToClient);
                continue;
            }
            match quic.max_datagram_size() {
                Some(max) if datagram.len() <= max => {}
                Some(max) => {
                    shared.metrics.dropped(DropReason::TxOversize);
                    tracing::debug!(len = datagram.len(), max, "datagram exceeds the QUIC limit");
                    continue;
                }
                None => {
                    shared.metrics.dropped(DropReason::SendFailed);
                    continue;
                }
            }
            let (seq, datagram) = if sequenced {
                // The RTT takes quinn's connection lock: read it now and then, not per packet.
                if until_rtt == 0 {
                    keep = resend_keep(quic.rtt());
                    until_rtt = 256;
                }
                until_rtt -= 1;
                let (seq, datagram) = queue.sequence(datagram, Instant::now(), keep);
                (Some(seq), datagram)
            } else {
                (None, datagram)
            };
            match quic.send_datagram_wait(datagram).await {
                Ok(()) => {
                    if let Some(seq) = seq {
                        queue.mark_sent(seq, Instant::now());
                    }
                    shared.metrics.forwarded(Direction::ToClient, ip_len);
                    stats.tx_packets.fetch_add(1, Ordering::Relaxed);
                    stats.tx_bytes.fetch_add(ip_len as u64, Ordering::Relaxed);
                }
                Err(wtransport::quinn::SendDatagramError::TooLarge) => {
                    shared.metrics.dropped(DropReason::TxOversize);
                }
                Err(wtransport::quinn::SendDatagramError::ConnectionLost(error)) => {
                    shared.metrics.dropped(DropReason::SendFailed);
                    return End::Connection(error.into());
                }
                Err(error) => {
                    shared.metrics.dropped(DropReason::SendFailed);
                    tracing::debug!(%error, "datagram send failed");
                }
            }
        }
    }
}
