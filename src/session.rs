//! Opening a session: WebTransport connect, the control-stream handshake, and the [`Client`].

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use webnic_stack::protocol::{CapsuleDecoder, CloseCode, ControlMessage, PROTOCOL_VERSION};
use webnic_stack::{DnsError, DnsKind, StackConfig, TcpError, TcpOptions, UdpOptions};
use wtransport::{ClientConfig, Endpoint};

use crate::driver::{self, Core, Interest};
use crate::sockets::{TcpListener, TcpStream, UdpSocket};

/// How long the gateway has to complete the control handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ConnectOptions::reconnect_for`].
pub(crate) const DEFAULT_RECONNECT_FOR: Duration = Duration::from_secs(60);
/// One resumption attempt gives up after this (the path may still be down).
const RESUME_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a session could not be opened, or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The certificate hash is not 64 hex digits.
    #[error("invalid certificate hash: {0}")]
    InvalidCertHash(String),
    /// The QUIC/WebTransport connection could not be set up.
    #[error("cannot reach the gateway: {0}")]
    Connect(String),
    /// The gateway answered the WebTransport request with an error status: wrong path, or an
    /// `Origin` it does not allow (403).
    #[error("the gateway rejected the session request (wrong path or origin not allowed)")]
    Rejected,
    /// The gateway broke the protocol or did not finish the handshake.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The gateway refused or ended the session with a reason code.
    #[error("gateway closed the session: {code} ({reason})")]
    Closed {
        /// The reason code.
        code: CloseCode,
        /// The gateway's detail.
        reason: String,
    },
    /// The connection was lost.
    #[error("session lost: {0}")]
    Lost(String),
    /// [`Client::close`] was called.
    #[error("session closed by the client")]
    ClosedLocally,
}

impl SessionError {
    /// Whether a session that ended this way may come back on a new connection with its ticket:
    /// the connection was lost, or the gateway shut down (a restart gives the addresses back).
    fn is_resumable(&self) -> bool {
        matches!(
            self,
            Self::Lost(_)
                | Self::Closed {
                    code: CloseCode::GatewayShutdown,
                    ..
                }
        )
    }

    pub(crate) fn to_io(&self) -> io::Error {
        let kind = match self {
            Self::InvalidCertHash(_) => io::ErrorKind::InvalidInput,
            Self::Connect(_) | Self::Rejected => io::ErrorKind::ConnectionRefused,
            Self::Protocol(_) => io::ErrorKind::InvalidData,
            Self::Closed { .. } | Self::Lost(_) => io::ErrorKind::ConnectionAborted,
            Self::ClosedLocally => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, self.clone())
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The gateway's WebTransport URL, e.g. `https://host:4433/webnic`.
    pub url: String,
    /// SHA-256 of the gateway's self-signed certificate, as 64 hex digits. Without it the
    /// system's root certificates are used.
    pub cert_hash: Option<String>,
    /// A session token from `webnic-gateway token`, for gateways that require one; sent as the
    /// URL's `token` query parameter.
    pub token: Option<String>,
    /// How long to keep trying to resume the session on a new connection after losing one
    /// (idle timeout, network change, gateway restart); zero: never [default: 60 s, the
    /// gateway's default grace period].
    pub reconnect_for: Duration,
    /// Ask the gateway for link repair: it numbers its datagrams and resends the ones this
    /// client reports missing, so loss on the QUIC hop reaches the TCP inside as a short delay
    /// instead of a loss (PROTOCOL.md §3.1) [default: on].
    pub link_repair: bool,
    /// Ask the gateway for the stream link: its packets arrive on a QUIC stream, which QUIC
    /// makes reliable, and TCP bursts may arrive coalesced into packets of up to 64 KiB
    /// (PROTOCOL.md §3.2). Asked for before link repair: a gateway grants one of the two, so
    /// link repair is what a gateway run with `--no-link-stream` grants [default: on].
    pub link_stream: bool,
}

impl ConnectOptions {
    /// Options for `url` with system root certificates.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cert_hash: None,
            token: None,
            reconnect_for: DEFAULT_RECONNECT_FOR,
            link_repair: true,
            link_stream: true,
        }
    }

    /// Whether to ask for the stream link ([`ConnectOptions::link_stream`]).
    #[must_use]
    pub fn link_stream(mut self, on: bool) -> Self {
        self.link_stream = on;
        self
    }

    /// Whether to ask for link repair ([`ConnectOptions::link_repair`]).
    #[must_use]
    pub fn link_repair(mut self, on: bool) -> Self {
        self.link_repair = on;
        self
    }

    /// How long to try resuming a lost session ([`ConnectOptions::reconnect_for`]).
    #[must_use]
    pub fn reconnect_for(mut self, limit: Duration) -> Self {
        self.reconnect_for = limit;
        self
    }

    /// Sends `token` with the session request.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The URL to request: `url` with `token=` and, when resuming, `resume=` added to its query.
    fn request_url(&self, resume: Option<&[u8]>) -> String {
        let mut url = self.url.clone();
        let mut add = |name: &str, value: &str| {
            let separator = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{separator}{name}={value}");
        };
        if let Some(token) = &self.token {
            add("token", token);
        }
        if let Some(ticket) = resume {
            let hex: String = ticket.iter().map(|b| format!("{b:02x}")).collect();
            add("resume", &hex);
        }
        url
    }

    /// Pins the gateway's certificate by its SHA-256 (hex), as pages do with
    /// `serverCertificateHashes`.
    #[must_use]
    pub fn cert_hash(mut self, hex: impl Into<String>) -> Self {
        self.cert_hash = Some(hex.into());
        self
    }
}

/// Traffic counters of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// IP packets sent to the gateway.
    pub packets_sent: u64,
    /// IP packets received from the gateway.
    pub packets_received: u64,
    /// Bytes of IP packets sent.
    pub bytes_sent: u64,
    /// Bytes of IP packets received.
    pub bytes_received: u64,
    /// Packets the stack dropped (queue full, too large).
    pub packets_dropped: u64,
    /// Times the session resumed on a new connection after losing one.
    pub reconnects: u64,
    /// IP packets that came on the stream link (PROTOCOL.md §3.2).
    pub link_stream_packets: u64,
    /// The current QUIC connection's path: its smoothed round-trip time, packets sent and
    /// declared lost, and congestion events (what loss on the hop to the gateway costs).
    pub quic: QuicPathStats,
    /// Link repair: datagrams the gateway sequenced, packets repaired by a resend, packets
    /// given up on (TCP repaired those), and sequence numbers asked for.
    pub link: webnic_stack::link_repair::LinkStats,
}

/// The QUIC path of a session's current connection (see [`ClientStats::quic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuicPathStats {
    /// Smoothed round-trip time.
    pub rtt: Duration,
    /// UDP datagrams sent.
    pub sent_packets: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
    /// Times the congestion controller reacted to loss.
    pub congestion_events: u64,
}

/// A session with a webnic gateway: a virtual NIC with its own addresses.
///
/// Cloning is cheap; the session ends when [`Client::close`] is called or the gateway goes away.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) core: Arc<Core>,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    mtu: u16,
    dns_servers: Vec<IpAddr>,
    _tasks: Arc<Tasks>,
}

/// The session's tasks; dropping the last [`Client`] ends the session and fails its sockets.
#[derive(Debug)]
struct Tasks {
    handles: Vec<tokio::task::JoinHandle<()>>,
    core: Arc<Core>,
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.core.end(SessionError::ClosedLocally);
        self.core.connection().close(
            wtransport::VarInt::from_u32(CloseCode::Normal.to_u32()),
            b"client dropped",
        );
        for task in &self.handles {
            task.abort();
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Announced {
    version: Option<u32>,
    pub(crate) mtu: Option<u16>,
    pub(crate) dns: Vec<IpAddr>,
    pub(crate) ipv4: Option<Ipv4Addr>,
    pub(crate) ipv6: Option<Ipv6Addr>,
    /// The gateway's resumption ticket, if it offers resumption.
    pub(crate) ticket: Option<Vec<u8>>,
}

impl Client {
    /// Opens a session and configures the stack from what the gateway announces.
    ///
    /// # Errors
    /// An [`io::Error`] wrapping a [`SessionError`]: unreachable gateway, refused session (with
    /// the gateway's reason code, e.g. [`CloseCode::PoolExhausted`]), or a protocol error.
    pub async fn connect(options: ConnectOptions) -> io::Result<Self> {
        Self::open(options).await.map_err(|e| e.to_io())
    }

    async fn open(options: ConnectOptions) -> Result<Self, SessionError> {
        let Handshake {
            endpoint,
            connection,
            send,
            recv,
            decoder,
            announced,
        } = handshake(&options, None).await?;

        let mtu = announced.mtu.unwrap_or(1152);
        if let Some(max) = connection.max_datagram_size()
            && max < usize::from(mtu)
        {
            tracing::warn!(
                mtu,
                max,
                "path datagram size is below the link MTU; large packets will be dropped"
            );
        }
        let mut stack_config = StackConfig::new(usize::from(mtu), rand::random());
        stack_config.ipv4 = announced.ipv4;
        stack_config.ipv6 = announced.ipv6;
        stack_config.dns_servers.clone_from(&announced.dns);
        let epoch = std::time::Instant::now();
        let stack = webnic_stack::Stack::new(stack_config, webnic_stack::Instant::from_micros(0));
        let core = Arc::new(Core::new(stack, connection.clone(), epoch));
        tracing::info!(ipv4 = ?announced.ipv4, ipv6 = ?announced.ipv6, mtu, "session configured");

        let resume = Resumption {
            options,
            ticket: announced.ticket.clone(),
            ipv4: announced.ipv4,
            ipv6: announced.ipv6,
        };
        let tasks = vec![
            tokio::spawn(driver::drive(core.clone())),
            tokio::spawn(supervise(
                core.clone(),
                Handshake {
                    endpoint,
                    connection,
                    send,
                    recv,
                    decoder,
                    announced: Announced::default(),
                },
                resume,
            )),
        ];
        Ok(Self {
            core: core.clone(),
            ipv4: announced.ipv4,
            ipv6: announced.ipv6,
            mtu,
            dns_servers: announced.dns,
            _tasks: Arc::new(Tasks {
                handles: tasks,
                core: core.clone(),
            }),
        })
    }

    /// The session's IPv4 address.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ipv4
    }

    /// The session's IPv6 address, if the gateway offers IPv6.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ipv6
    }

    /// The link MTU the gateway announced.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The largest datagram payload the QUIC path takes right now (it grows with path MTU
    /// discovery); `None` if the gateway does not do datagrams.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.core.connection().max_datagram_size()
    }

    /// The resolvers the gateway announced.
    pub fn dns_servers(&self) -> Vec<IpAddr> {
        self.dns_servers.clone()
    }

    /// Traffic counters.
    pub fn stats(&self) -> ClientStats {
        let (stats, link) = {
            let shared = self.core.lock();
            (shared.stack.stats(), shared.stack.link_stats())
        };
        ClientStats {
            link,
            packets_sent: stats.packets_sent,
            packets_received: stats.packets_received,
            bytes_sent: stats.bytes_sent,
            bytes_received: stats.bytes_received,
            packets_dropped: stats.dropped_queue_full + stats.dropped_too_large,
            link_stream_packets: stats.link_stream_packets,
            quic: {
                let path = self.core.connection().quic_connection().stats().path;
                QuicPathStats {
                    rtt: path.rtt,
                    sent_packets: path.sent_packets,
                    lost_packets: path.lost_packets,
                    congestion_events: path.congestion_events,
                }
            },
            reconnects: self
                .core
                .reconnects
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Connects to `remote` through the tunnel.
    ///
    /// # Errors
    /// `ConnectionRefused`, `TimedOut`, `NetworkUnreachable` (no address of that family), or the
    /// session's error.
    pub async fn tcp_connect(&self, remote: SocketAddr) -> io::Result<TcpStream> {
        self.tcp_connect_with(remote, TcpOptions::default()).await
    }

    /// [`tcp_connect`](Self::tcp_connect) with explicit buffer sizes, Nagle and keep-alive.
    ///
    /// # Errors
    /// As [`tcp_connect`](Self::tcp_connect).
    pub async fn tcp_connect_with(
        &self,
        remote: SocketAddr,
        options: TcpOptions,
    ) -> io::Result<TcpStream> {
        let handle = {
            let mut shared = self.core.lock();
            shared.check_open()?;
            shared
                .stack
                .tcp_connect(remote, options)
                .map_err(|e| connect_error_to_io(&TcpError::Connect(e)))?
        };
        self.finish_connect(handle).await
    }

    /// Connects to `host:port`, resolving `host` through the tunnel's DNS.
    ///
    /// # Errors
    /// As [`tcp_connect`](Self::tcp_connect), plus `NotFound` when the name does not resolve.
    pub async fn tcp_connect_host(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        self.tcp_connect_host_with(host, port, TcpOptions::default())
            .await
    }

    /// [`tcp_connect_host`](Self::tcp_connect_host) with explicit socket options.
    ///
    /// # Errors
    /// As [`tcp_connect_host`](Self::tcp_connect_host).
    pub async fn tcp_connect_host_with(
        &self,
        host: &str,
        port: u16,
        options: TcpOptions,
    ) -> io::Result<TcpStream> {
        let handle = {
            let mut shared = self.core.lock();
            shared.check_open()?;
            shared
                .stack
                .tcp_connect_host(host, port, options)
                .map_err(|e| connect_error_to_io(&TcpError::Connect(e)))?
        };
        self.finish_connect(handle).await
    }

    async fn finish_connect(&self, handle: webnic_stack::TcpHandle) -> io::Result<TcpStream> {
        self.core.poke.notify_one();
        let stream = TcpStream::new(self.core.clone(), handle);
        poll_fn(|cx| {
            let mut shared = self.core.lock();
            if let Some(result) = shared.waiters.take_connect_result(handle) {
                return Poll::Ready(result.map_err(|e| connect_error_to_io(&TcpError::Connect(e))));
            }
            if let Err(error) = shared.check_open() {
                return Poll::Ready(Err(error));
            }
            shared.park(Interest::TcpConnect(handle), cx.waker());
            Poll::Pending
        })
        .await?;
        Ok(stream)
    }

    /// Listens on `port` of the session's addresses (0 picks a free port): servers on the
    /// gateway's side connect to it.
    ///
    /// # Errors
    /// `AddrInUse`, or the session's error.
    pub async fn tcp_listen(&self, port: u16) -> io::Result<TcpListener> {
        let mut shared = self.core.lock();
        shared.check_open()?;
        let handle = shared
            .stack
            .tcp_listen(port, 16, TcpOptions::default())
            .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e))?;
        let port = shared.stack.listener_port(handle).unwrap_or(port);
        drop(shared);
        Ok(TcpListener::new(
            self.core.clone(),
            handle,
            self.local_ip(),
            port,
        ))
    }

    /// Opens a UDP socket on `port` (0 picks one).
    ///
    /// # Errors
    /// `AddrInUse`, or the session's error.
    pub async fn udp_bind(&self, port: u16) -> io::Result<UdpSocket> {
        let mut shared = self.core.lock();
        shared.check_open()?;
        let handle = shared
            .stack
            .udp_bind(port, UdpOptions::default())
            .map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e))?;
        let port = shared.stack.udp_port(handle).unwrap_or(port);
        drop(shared);
        Ok(UdpSocket::new(
            self.core.clone(),
            handle,
            self.local_ip(),
            port,
        ))
    }

    /// A records of `host`, looked up through the tunnel's DNS.
    ///
    /// # Errors
    /// `NotFound` when the name does not resolve.
    pub async fn resolve_ipv4(&self, host: &str) -> io::Result<Vec<Ipv4Addr>> {
        let addrs = self.resolve(host, DnsKind::A).await?;
        Ok(addrs
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    /// AAAA records of `host`, looked up through the tunnel's DNS.
    ///
    /// # Errors
    /// `NotFound` when the name does not resolve.
    pub async fn resolve_ipv6(&self, host: &str) -> io::Result<Vec<Ipv6Addr>> {
        let addrs = self.resolve(host, DnsKind::Aaaa).await?;
        Ok(addrs
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            })
            .collect())
    }

    /// Looks `host` up (A or AAAA) through the tunnel's DNS.
    ///
    /// # Errors
    /// `NotFound` when the name does not resolve.
    pub async fn resolve(&self, host: &str, kind: DnsKind) -> io::Result<Vec<IpAddr>> {
        let handle = {
            let mut shared = self.core.lock();
            shared.check_open()?;
            shared
                .stack
                .dns_query(host, kind)
                .map_err(dns_error_to_io)?
        };
        self.core.poke.notify_one();
        poll_fn(|cx| {
            let mut shared = self.core.lock();
            if let Some(result) = shared.stack.dns_result(handle) {
                return Poll::Ready(result.map_err(dns_error_to_io));
            }
            if let Err(error) = shared.check_open() {
                return Poll::Ready(Err(error));
            }
            shared.park(Interest::Dns(handle), cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Sends a raw IP packet into the tunnel, bypassing the stack. The gateway validates it like
    /// any other (source address, headers).
    ///
    /// # Errors
    /// `InvalidInput` when it exceeds the path's datagram size, or the session's error.
    pub fn send_raw_packet(&self, packet: &[u8]) -> io::Result<()> {
        self.core.lock().check_open()?;
        self.core
            .connection()
            .send_datagram(packet)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
    }

    /// Ends the session: the gateway frees the address, all sockets fail.
    pub async fn close(&self) {
        self.core.end(SessionError::ClosedLocally);
        self.core.connection().close(
            wtransport::VarInt::from_u32(CloseCode::Normal.to_u32()),
            b"client closed",
        );
    }

    /// Whether the gateway announced it is draining (it will close the session soon; new
    /// sessions to it are refused).
    pub fn gateway_draining(&self) -> bool {
        self.core
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until the session ends for good (not merely loses a connection it then resumes)
    /// and says why.
    pub async fn closed(&self) -> SessionError {
        loop {
            let ended = self.core.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if let Some(error) = self.core.lock().closed.clone() {
                return error;
            }
            ended.await;
        }
    }

    fn local_ip(&self) -> IpAddr {
        self.ipv4
            .map(IpAddr::V4)
            .or(self.ipv6.map(IpAddr::V6))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

/// A session after the control handshake, before any task runs: what [`Client`] and
/// [`RawSession`](crate::RawSession) are built from.
pub(crate) struct Handshake {
    pub(crate) endpoint: Endpoint<wtransport::endpoint::endpoint_side::Client>,
    pub(crate) connection: wtransport::Connection,
    pub(crate) send: wtransport::SendStream,
    pub(crate) recv: wtransport::RecvStream,
    pub(crate) decoder: CapsuleDecoder,
    pub(crate) announced: Announced,
}

/// Connects and runs the control handshake (`CLIENT_HELLO` → `ADDRESS_ASSIGN`).
pub(crate) async fn handshake(
    options: &ConnectOptions,
    resume: Option<&[u8]>,
) -> Result<Handshake, SessionError> {
    let config = client_config(options)?;
    let endpoint = Endpoint::client(config).map_err(|e| SessionError::Connect(e.to_string()))?;
    let connection = endpoint
        .connect(options.request_url(resume))
        .await
        .map_err(|e| match e {
            wtransport::error::ConnectingError::SessionRejected => SessionError::Rejected,
            other => SessionError::Connect(other.to_string()),
        })?;
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(|e| SessionError::Connect(e.to_string()))?
        .await
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    let mut hello = Vec::new();
    ControlMessage::ClientHello {
        version: PROTOCOL_VERSION,
    }
    .emit(&mut hello);
    // Both may be asked for: the gateway grants the first it allows and ignores the other.
    if options.link_stream {
        ControlMessage::LinkStream {
            max_packet: webnic_stack::link_stream::MAX_PACKET,
        }
        .emit(&mut hello);
    }
    if options.link_repair {
        ControlMessage::LinkRepair.emit(&mut hello);
    }
    send.write_all(&hello)
        .await
        .map_err(|e| SessionError::Connect(e.to_string()))?;

    let mut decoder = CapsuleDecoder::new();
    let announced = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_configuration(&connection, &mut recv, &mut decoder),
    )
    .await
    .map_err(|_| SessionError::Protocol("no configuration from the gateway".into()))??;
    Ok(Handshake {
        endpoint,
        connection,
        send,
        recv,
        decoder,
        announced,
    })
}

/// Kernel buffer asked for the client's UDP socket. The default (≈ 208 KiB) holds only ~160
/// small packets, and a burst of ACK-carrying datagrams from the gateway overflowed it during
/// uploads (`UdpRcvbufErrors`), stalling the tunnelled TCP. Capped by `net.core.rmem_max`.
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// A dual-stack UDP socket (IPv4-only where the host has no IPv6) with enlarged buffers.
fn bind_udp() -> Result<std::net::UdpSocket, SessionError> {
    let socket = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
        .or_else(|_| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
        .map_err(|e| SessionError::Connect(format!("cannot bind a UDP socket: {e}")))?;
    let state = wtransport::quinn::udp::UdpSocketState::new((&socket).into())
        .map_err(|e| SessionError::Connect(e.to_string()))?;
    for result in [
        state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER),
        state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER),
    ] {
        if let Err(error) = result {
            tracing::debug!(%error, "could not enlarge the UDP socket buffer");
        }
    }
    Ok(socket)
}

fn client_config(options: &ConnectOptions) -> Result<ClientConfig, SessionError> {
    let builder = ClientConfig::builder().with_bind_socket(bind_udp()?);
    let builder = match &options.cert_hash {
        Some(hex) => {
            let digest = parse_cert_hash(hex)?;
            builder.with_server_certificate_hashes([digest])
        }
        None => builder.with_native_certs(),
    };
    let mut config = builder
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| SessionError::Connect(e.to_string()))?
        .build();
    let mut transport = wtransport::quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(
            Duration::from_secs(30)
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ))
        // One session carries one NIC's traffic: room for a few ms of datagrams at Gbit/s.
        .datagram_receive_buffer_size(Some(2 * 1024 * 1024))
        .datagram_send_buffer_size(1024 * 1024);
    config
        .quic_config_mut()
        .transport_config(Arc::new(transport));
    Ok(config)
}

fn parse_cert_hash(hex: &str) -> Result<wtransport::tls::Sha256Digest, SessionError> {
    let clean: String = hex.chars().filter(|c| *c != ':').collect();
    if clean.len() != 64 {
        return Err(SessionError::InvalidCertHash(hex.to_owned()));
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&clean[2 * i..2 * i + 2], 16)
            .map_err(|_| SessionError::InvalidCertHash(hex.to_owned()))?;
    }
    Ok(wtransport::tls::Sha256Digest::new(bytes))
}

async fn read_configuration(
    connection: &wtransport::Connection,
    recv: &mut wtransport::RecvStream,
    decoder: &mut CapsuleDecoder,
) -> Result<Announced, SessionError> {
    let mut announced = Announced::default();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(message) = decoder
            .next_message()
            .map_err(|e| SessionError::Protocol(e.to_string()))?
        {
            match message {
                ControlMessage::ServerHello { version } => {
                    if version != PROTOCOL_VERSION {
                        return Err(SessionError::Protocol(format!(
                            "gateway speaks version {version}, we speak {PROTOCOL_VERSION}"
                        )));
                    }
                    announced.version = Some(version);
                }
                ControlMessage::LinkMtu(mtu) => announced.mtu = Some(mtu),
                ControlMessage::DnsServers(servers) => announced.dns = servers,
                ControlMessage::AddressAssign(addresses) => {
                    for a in addresses {
                        match a.address {
                            IpAddr::V4(v4) => announced.ipv4 = Some(v4),
                            IpAddr::V6(v6) => announced.ipv6 = Some(v6),
                        }
                    }
                    if announced.version.is_none() {
                        return Err(SessionError::Protocol("ADDRESS_ASSIGN before hello".into()));
                    }
                    return Ok(announced);
                }
                ControlMessage::Close { code, reason } => {
                    return Err(SessionError::Closed { code, reason });
                }
                ControlMessage::SessionTicket(ticket) => announced.ticket = Some(ticket),
                ControlMessage::RouteAdvertisement(_)
                | ControlMessage::ClientHello { .. }
                | ControlMessage::LinkRepair
                | ControlMessage::LinkStream { .. }
                | ControlMessage::Draining { .. }
                | ControlMessage::Unknown { .. } => {}
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.extend(&buf[..n]),
            Ok(None) | Err(_) => {
                // The gateway may have closed the session with a reason code instead.
                let error = connection.closed().await;
                return Err(close_reason(&error).unwrap_or_else(|| {
                    SessionError::Protocol(format!("control stream ended: {error}"))
                }));
            }
        }
    }
}

/// Extracts the gateway's reason code from a WebTransport/QUIC close.
pub(crate) fn close_reason(error: &wtransport::error::ConnectionError) -> Option<SessionError> {
    if let wtransport::error::ConnectionError::ApplicationClosed(close) = error {
        let code = u32::try_from(close.code().into_inner()).ok()?;
        return Some(SessionError::Closed {
            code: CloseCode::from_u32(code),
            reason: String::from_utf8_lossy(close.reason()).into_owned(),
        });
    }
    None
}

/// What a lost session needs to come back on a new connection.
#[derive(Debug)]
struct Resumption {
    options: ConnectOptions,
    /// The gateway's latest ticket; `None`: the gateway does not offer resumption.
    ticket: Option<Vec<u8>>,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
}

/// Runs the session's connections one after another: reads each one's datagrams and control
/// stream, and when a connection is lost (not closed on purpose) resumes the session on a new
/// one with the gateway's ticket, so the stack — and every TCP connection in it — carries on.
async fn supervise(core: Arc<Core>, mut current: Handshake, mut resume: Resumption) {
    loop {
        let datagrams = tokio::spawn(driver::read_datagrams(
            core.clone(),
            current.connection.clone(),
        ));
        let stream = resume.options.link_stream.then(|| {
            tokio::spawn(driver::read_link_stream(
                core.clone(),
                current.connection.clone(),
            ))
        });
        let reason = read_control(&core, &mut current).await;
        datagrams.abort();
        if let Some(stream) = stream {
            stream.abort();
        }
        if core.lock().is_closed() {
            return;
        }
        let Some(ticket) = resume.ticket.clone().filter(|_| reason.is_resumable()) else {
            core.end(reason);
            return;
        };
        if resume.options.reconnect_for.is_zero() {
            core.end(reason);
            return;
        }
        tracing::warn!(%reason, "connection to the gateway lost; resuming the session");
        match reconnect(&core, &resume, &ticket).await {
            Ok(next) => {
                resume.ticket = next.announced.ticket.clone();
                core.replace_connection(next.connection.clone());
                tracing::info!(
                    reconnects = core.reconnects.load(std::sync::atomic::Ordering::Relaxed),
                    "session resumed on a new connection"
                );
                current = next;
            }
            Err(error) => {
                tracing::warn!(%error, "could not resume the session");
                core.end(error);
                return;
            }
        }
    }
}

/// Tries to resume with `ticket`, backing off from 100 ms to 2 s between attempts, for
/// [`ConnectOptions::reconnect_for`].
async fn reconnect(
    core: &Core,
    resume: &Resumption,
    ticket: &[u8],
) -> Result<Handshake, SessionError> {
    let deadline = tokio::time::Instant::now() + resume.options.reconnect_for;
    let mut backoff = Duration::from_millis(100);
    let mut last = SessionError::Lost("no resumption attempt finished".into());
    while tokio::time::Instant::now() < deadline {
        if core.lock().is_closed() {
            return Err(SessionError::ClosedLocally);
        }
        match tokio::time::timeout(
            RESUME_ATTEMPT_TIMEOUT,
            handshake(&resume.options, Some(ticket)),
        )
        .await
        {
            Ok(Ok(next)) => {
                if next.announced.ipv4 == resume.ipv4 && next.announced.ipv6 == resume.ipv6 {
                    return Ok(next);
                }
                // The gateway no longer held our addresses (grace period over, or it restarted
                // without its lease file): the stack's connections cannot continue.
                next.connection.close(
                    wtransport::VarInt::from_u32(CloseCode::Normal.to_u32()),
                    b"resumed with other addresses",
                );
                return Err(SessionError::Lost(format!(
                    "the gateway resumed the session with other addresses ({:?}, {:?}); \
                     its lease had expired",
                    next.announced.ipv4, next.announced.ipv6
                )));
            }
            // A refusal with a reason (pool exhausted, token expired, ...) is final.
            Ok(Err(error @ (SessionError::Closed { .. } | SessionError::Rejected))) => {
                return Err(error);
            }
            Ok(Err(error)) => last = error,
            Err(_) => last = SessionError::Lost("resumption attempt timed out".into()),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    Err(last)
}

/// Reads the control stream of `current` until its connection ends; returns why it ended.
async fn read_control(core: &Core, current: &mut Handshake) -> SessionError {
    let mut buf = [0u8; 4096];
    let mut closing = None;
    loop {
        loop {
            match current.decoder.next_message() {
                Ok(Some(ControlMessage::DnsServers(servers))) => {
                    core.lock().stack.set_dns_servers(&servers);
                }
                Ok(Some(ControlMessage::SessionTicket(ticket))) => {
                    current.announced.ticket = Some(ticket);
                }
                Ok(Some(ControlMessage::Draining { seconds })) => {
                    tracing::warn!(seconds, "the gateway is draining; the session ends within");
                    core.draining
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Some(ControlMessage::Close { code, reason })) => {
                    tracing::info!(%code, %reason, "gateway is closing the session");
                    closing = Some(SessionError::Closed { code, reason });
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "bad control message from the gateway");
                    break;
                }
            }
        }
        match current.recv.read(&mut buf).await {
            Ok(Some(n)) => current.decoder.extend(&buf[..n]),
            Ok(None) | Err(_) => break,
        }
    }
    let error = current.connection.closed().await;
    closing
        .or_else(|| close_reason(&error))
        .unwrap_or_else(|| SessionError::Lost(error.to_string()))
}

pub(crate) fn connect_error_to_io(error: &TcpError) -> io::Error {
    use webnic_stack::ConnectError as C;
    let kind = match error {
        TcpError::Connect(C::Refused) => io::ErrorKind::ConnectionRefused,
        TcpError::Connect(C::TimedOut) => io::ErrorKind::TimedOut,
        TcpError::Connect(C::Prohibited) => io::ErrorKind::PermissionDenied,
        TcpError::Connect(C::NoRoute(_)) => io::ErrorKind::NetworkUnreachable,
        TcpError::Connect(C::InvalidDestination(_)) => io::ErrorKind::InvalidInput,
        TcpError::Connect(C::NoFreePort) => io::ErrorKind::AddrNotAvailable,
        TcpError::Connect(C::Resolve { .. }) => io::ErrorKind::NotFound,
        TcpError::Reset => io::ErrorKind::ConnectionReset,
        TcpError::WouldBlock => io::ErrorKind::WouldBlock,
        TcpError::NotConnected | TcpError::InvalidHandle => io::ErrorKind::NotConnected,
        TcpError::WriteClosed => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, error.clone())
}

fn dns_error_to_io(error: DnsError) -> io::Error {
    let kind = match error {
        DnsError::Failed => io::ErrorKind::NotFound,
        DnsError::InvalidName => io::ErrorKind::InvalidInput,
        DnsError::NoServers => io::ErrorKind::NotConnected,
        DnsError::TooManyQueries => io::ErrorKind::WouldBlock,
        DnsError::InvalidHandle => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_goes_in_the_query() {
        let plain = ConnectOptions::new("https://gw:4433/webnic");
        assert_eq!(plain.request_url(None), "https://gw:4433/webnic");
        let with = plain.clone().token("abc.def");
        assert_eq!(
            with.request_url(None),
            "https://gw:4433/webnic?token=abc.def"
        );
        let query = ConnectOptions::new("https://gw:4433/webnic?x=1").token("t");
        assert_eq!(
            query.request_url(None),
            "https://gw:4433/webnic?x=1&token=t"
        );
        assert_eq!(
            with.request_url(Some(&[0xab, 0x01])),
            "https://gw:4433/webnic?token=abc.def&resume=ab01"
        );
        assert_eq!(
            SessionError::Rejected.to_io().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }
}
