//! The gateway's driver: sets up the TUN, NAT and QUIC endpoint, runs the accept loop and the
//! TUN reader, and tears everything down on SIGINT/SIGTERM.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::task::JoinSet;
use webnic_stack::protocol::SESSION_PATH;
use wtransport::{Endpoint, Identity, ServerConfig, VarInt};

use crate::config::{Config, Congestion};
use crate::lease::Leases;
use crate::metrics::{self, Metrics};
use crate::nat::Nat;
use crate::offload::{
    Gso, OffloadError, VNET_HDR_LEN, VnetHeader, complete_checksum, finish_coalesced, segment_tcp,
};
use crate::origin::OriginPolicy;
use crate::packet::{DropReason, clamp_tcp_mss, destination, icmp_frag_needed, ipv4_dont_fragment};
use crate::pool::{AddressPool, PoolError};
use crate::queue::{DEFAULT_QUEUE_CAPACITY, RouteTable, SessionQueue};
use crate::session::{self, Pools, Shared};
use crate::sys::CommandError;
use crate::tun_device::{TunConfig, TunDevice, TunError};

/// QUIC datagram receive buffer per connection: 1 MiB (≈ 900 packets of 1152 bytes), room for
/// a burst from a fast client. Allocated only as datagrams arrive.
const DATAGRAM_RECEIVE_BUFFER: usize = 1 << 20;

/// QUIC datagram send buffer per connection: 128 KiB (≈ 110 packets, ~1 ms at 1 Gbit/s).
///
/// Whatever waits here waits in front of a link-repair resend (quinn's queue is first in,
/// first out), and in front of every interactive packet: with 1 MiB, resends under 1% loss
/// came too late to help and repair lost to no repair on 8 flows (0.55×); with 128 KiB it won
/// (2.0×). Clean-link goodput did not change (tunnel bench, 3 alternating runs each). The
/// session queue in front of it (1,024 packets) absorbs bursts instead.
const DATAGRAM_SEND_BUFFER: usize = 128 << 10;
/// Unacknowledged stream data quinn holds per connection (quinn's default is 10 MB): what a
/// stream-link session (PROTOCOL.md §3.2) may have in flight, so its memory stays bounded. At
/// the millisecond round trips of a tunnel to a browser it is far more than the path needs.
const STREAM_SEND_WINDOW: u64 = 1 << 20;
/// Stream data a client may have sent the gateway that it has not read yet, all streams of a
/// connection together (quinn's default is unlimited, with 1.25 MB per stream): without it a
/// client could park ≈ 15 MB per session in streams the gateway never reads (any beyond its
/// control stream and uplink stream). The uplink stream (PROTOCOL.md §3.2) is read as it
/// arrives, so this bounds memory, not its rate.
const CONNECTION_RECEIVE_WINDOW: u32 = 4 << 20;
/// Keep-alive interval, well below the idle timeout, so idle sessions survive NAT rebinding
/// timeouts and the idle timer.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Streams a client may have open at once, per direction. A session uses two bidirectional
/// streams (the HTTP/3 CONNECT stream and webnic's control stream, PROTOCOL.md §2) and three
/// unidirectional ones (HTTP/3 control and the two QPACK streams), plus one each way for the
/// stream link. quinn's default of 100 each allocates state for all of them in every connection
/// when it is accepted.
const MAX_CLIENT_BIDI_STREAMS: u32 = 4;
const MAX_CLIENT_UNI_STREAMS: u32 = 8;
/// How long shutdown waits for sessions to send their `Close` and end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TUN device.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// nftables.
    #[error("cannot install NAT: {0}")]
    Nat(#[from] CommandError),
    /// An address pool.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The certificate or key.
    #[error("cannot load certificate/key: {0}")]
    Identity(String),
    /// The UDP socket.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The metrics socket.
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        /// The address.
        address: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The certificate hash file.
    #[error("cannot write {path}: {source}")]
    HashFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Signal handlers.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// Listing the host's addresses for the egress policy.
    #[error("cannot list the host's addresses: {0}")]
    HostAddresses(std::io::Error),
    /// The abuse log file.
    #[error("cannot open the abuse log {path}: {source}")]
    AbuseLog {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Runs the gateway until SIGINT or SIGTERM, then shuts down cleanly.
///
/// # Errors
/// [`StartError`] if anything fails during setup; after that, failures are logged.
pub async fn run(config: Config) -> Result<(), StartError> {
    let identity = load_identity(&config).await?;
    let certificate = &identity.certificate_chain().as_slice()[0];
    let hash = certificate.hash();
    let hash_bytes: &[u8; 32] = hash.as_ref();

    let mut pools = Pools {
        v4: AddressPool::ipv4(config.pool_v4)?,
        v6: config
            .pool_v6
            .map(|cidr| AddressPool::ipv6(cidr, u128::from(config.pool_v6_limit)))
            .transpose()?,
    };
    let leases = (!config.resume_grace.is_zero()).then(|| {
        let mut leases = Leases::new(config.resume_grace);
        if let Some(path) = &config.lease_file {
            restore_leases(&mut leases, &mut pools, path);
        }
        leases
    });

    let mut signals = Signals::new().map_err(StartError::Signals)?;

    let mut tun = TunDevice::create(&TunConfig {
        name: config.tun.clone(),
        pool_v4: config.pool_v4,
        pool_v6: config.pool_v6,
        link_mtu: config.mtu,
        offload: config.tun_offload,
    })?;
    let mut nat = if config.nat {
        let mut prefixes = vec![config.pool_v4];
        prefixes.extend(config.pool_v6);
        Some(Nat::install(tun.name(), &prefixes)?)
    } else {
        None
    };

    let socket = crate::udp_socket::bind(config.listen).map_err(|source| StartError::Listen {
        address: config.listen,
        source,
    })?;
    let endpoint =
        Endpoint::server(server_config(&config, identity, socket)).map_err(|source| {
            StartError::Listen {
                address: config.listen,
                source,
            }
        })?;
    let local = endpoint.local_addr().map_err(|source| StartError::Listen {
        address: config.listen,
        source,
    })?;

    let metrics = Arc::new(Metrics::new());
    pools.update_metrics(&metrics);
    let metrics_task = match config.metrics {
        Some(address) => {
            let listener = metrics::bind(address)
                .await
                .map_err(|source| StartError::Metrics { address, source })?;
            tracing::info!(%address, "serving metrics");
            Some(tokio::spawn(metrics::serve(listener, Arc::clone(&metrics))))
        }
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (drain_tx, drain_rx) = watch::channel(None);
    // After the TUN is up, so its addresses are among the host's.
    let mut policy = config.policy.clone();
    policy.allow_resolvers(&config.dns);
    let mut link_addresses = vec![config.pool_v4.gateway_address()];
    link_addresses.extend(config.pool_v6.map(|pool| pool.gateway_address()));
    policy.add_pool(config.pool_v4);
    if let Some(pool_v6) = config.pool_v6 {
        policy.add_pool(pool_v6);
    }
    policy.add_host_addresses(crate::sys::local_addresses().map_err(StartError::HostAddresses)?);
    policy.add_host_addresses(link_addresses.iter().copied());
    // The loopback addresses even if `lo` is down in this namespace.
    policy.add_host_addresses([
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    ]);
    tracing::info!(host_addresses = ?policy.host_addresses(), "egress policy refuses the gateway's own addresses");
    let abuse_log = match &config.abuse_log {
        Some(path) => {
            let log = crate::abuse_log::AbuseLog::open(path, config.abuse_log_retention).map_err(
                |source| StartError::AbuseLog {
                    path: path.clone(),
                    source,
                },
            )?;
            tracing::info!(path = %path.display(), retention = ?config.abuse_log_retention, "writing the abuse log");
            metrics.watch_abuse_log(log.drop_counter());
            Some(log)
        }
        None => None,
    };
    if config.token_key.is_some() {
        tracing::info!("sessions need a token signed with --token-key-file");
    }
    tracing::info!(admission = ?config.admission, max_lifetime = ?config.max_lifetime, quota = ?config.quota, "session limits");
    let conntrack_counters = Arc::new(crate::conntrack::ConntrackCounters::default());
    metrics.watch_conntrack(Arc::clone(&conntrack_counters));
    let conntrack = crate::conntrack::ConntrackCleaner::detect(conntrack_counters);
    let shared = Arc::new(Shared {
        token_key: config.token_key.clone(),
        admission: Mutex::new(crate::admission::Admission::new(config.admission)),
        max_lifetime: config.max_lifetime,
        link_repair: config.link_repair,
        link_stream: config.link_stream,
        quota: config.quota,
        abuse_log,
        policy,
        link_addresses,
        metrics: Arc::clone(&metrics),
        pools: Mutex::new(pools),
        routes: RouteTable::new(),
        tun: tun.device(),
        origins: OriginPolicy::new(&config.allow_origin),
        link_mtu: config.mtu,
        dns: config.dns.clone(),
        queue_capacity: DEFAULT_QUEUE_CAPACITY,
        shutdown: shutdown_rx,
        next_session: AtomicU64::new(1),
        leases: leases.map(Mutex::new),
        conntrack,
        draining: drain_rx,
        leases_dirty: AtomicBool::new(false),
    });
    let lease_keeper = tokio::spawn(keep_leases(Arc::clone(&shared), config.lease_file.clone()));
    let IpAddr::V4(gateway_v4) = config.pool_v4.gateway_address() else {
        unreachable!("pool_v4 is IPv4");
    };
    let mut tun_reader = tokio::spawn(tun_reader(Arc::clone(&shared), gateway_v4));

    let hex: String = hash_bytes.iter().map(|b| format!("{b:02x}")).collect();
    println!("certificate sha256: {hex}");
    println!(
        "serverCertificateHashes: [{{ algorithm: \"sha-256\", value: Uint8Array.from(atob(\"{}\"), c => c.charCodeAt(0)) }}]",
        base64(hash_bytes)
    );
    println!("listening on {local} path {SESSION_PATH}");
    let _ = std::io::stdout().flush();
    if let Some(path) = &config.cert_hash_file {
        write_hash_file(path, &hex).map_err(|source| StartError::HashFile {
            path: path.clone(),
            source,
        })?;
    }
    let demo_task = start_demo(&config, local, &hex).await;
    tracing::info!(%local, tun = tun.name(), "gateway ready");

    let mut sessions = JoinSet::new();
    // While draining: new sessions are refused, existing ones run until they end or the deadline.
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    // Once a second: the QUIC connection gauge, and the allocator's free pages back to the
    // kernel if sessions came or went since the last time (see `release_free_memory`).
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut sessions_seen = (0, 0);
    loop {
        tokio::select! {
            _ = housekeeping.tick() => {
                metrics.set_quic_connections(endpoint.open_connections());
                let sessions = (metrics.sessions_total(), metrics.sessions_active());
                if sessions != sessions_seen {
                    sessions_seen = sessions;
                    // 0.4 ms typical, 0.9 ms at most in the churn test: off the async workers.
                    tokio::task::spawn_blocking(|| {
                        let started = Instant::now();
                        crate::sys::release_free_memory();
                        tracing::debug!(took = ?started.elapsed(), "returned free memory to the kernel");
                    });
                }
            }
            incoming = endpoint.accept() => {
                sessions.spawn(session::handle(incoming, Arc::clone(&shared)));
                while sessions.try_join_next().is_some() {}
            }
            signal = signals.recv() => {
                if drain_deadline.is_none() && !config.drain_timeout.is_zero() {
                    let seconds = u32::try_from(config.drain_timeout.as_secs()).unwrap_or(u32::MAX);
                    tracing::info!(signal, seconds, active = metrics.sessions_active(), "draining: refusing new sessions, telling clients");
                    drain_deadline = Some(tokio::time::Instant::now() + config.drain_timeout);
                    let _ = drain_tx.send(Some(seconds));
                    if sessions.is_empty() {
                        break;
                    }
                    continue;
                }
                tracing::info!(signal, "shutting down");
                break;
            }
            () = async {
                match drain_deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!(active = metrics.sessions_active(), "drain deadline reached; closing the remaining sessions");
                break;
            }
            Some(_) = sessions.join_next(), if drain_deadline.is_some() => {
                if metrics.sessions_active() == 0 && sessions.is_empty() {
                    tracing::info!("drained: every session ended");
                    break;
                }
            }
            result = &mut tun_reader => {
                tracing::error!(?result, "TUN reader stopped; shutting down");
                break;
            }
        }
    }

    // Tell every session to send Close{GatewayShutdown} and close with that code.
    let _ = shutdown_tx.send(true);
    let active = metrics.sessions_active();
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("sessions did not end in time; aborting them");
    }
    sessions.shutdown().await;
    // Sessions ended by the shutdown parked their leases: write them for the next start.
    lease_keeper.abort();
    let _ = lease_keeper.await;
    if let Some(leases) = &shared.leases {
        let mut leases = leases.lock().unwrap_or_else(PoisonError::into_inner);
        leases.park_all(Instant::now());
        if let Some(path) = &config.lease_file {
            write_leases(path, &leases.to_text());
        }
    }
    endpoint.close(
        VarInt::from_u32(webnic_stack::protocol::CloseCode::GatewayShutdown.to_u32()),
        b"gateway shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tun_reader.abort();
    let _ = tun_reader.await;
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = demo_task {
        task.abort();
    }
    drop(shared);
    drop(endpoint);
    if let Some(nat) = &mut nat {
        nat.remove();
    }
    tun.restore_sysctls();
    let name = tun.name().to_owned();
    drop(tun);
    tracing::info!(closed_sessions = active, tun = %name, "gateway stopped");
    Ok(())
}

/// Reads the lease file of a previous run: its leases are parked for the grace period from now,
/// and their addresses taken out of the pools so nobody else gets them meanwhile.
fn restore_leases(leases: &mut Leases, pools: &mut Pools, path: &Path) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the lease file; starting without leases");
            return;
        }
    };
    let skipped = leases.load(&text, Instant::now());
    let addresses: Vec<IpAddr> = leases.addresses().collect();
    let mut unclaimable = 0;
    for address in &addresses {
        let claimed = match address {
            IpAddr::V4(_) => pools.v4.claim(*address),
            IpAddr::V6(_) => pools.v6.as_mut().is_some_and(|pool| pool.claim(*address)),
        };
        if !claimed {
            unclaimable += 1;
        }
    }
    tracing::info!(
        path = %path.display(),
        leases = leases.parked(),
        addresses = addresses.len(),
        skipped_lines = skipped,
        unclaimable,
        grace = ?leases.grace(),
        "restored session leases"
    );
}

/// Every second: returns the addresses of expired leases to the pools, and writes the lease
/// table when it changed.
async fn keep_leases(shared: Arc<Shared>, path: Option<PathBuf>) {
    let Some(leases) = &shared.leases else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let expired = leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expire(Instant::now());
        if !expired.addresses.is_empty() {
            tracing::info!(addresses = ?expired.addresses, "session leases expired");
            let (quiet, used): (Vec<IpAddr>, Vec<IpAddr>) = expired
                .addresses
                .iter()
                .partition(|a| !expired.carried_traffic.contains(a));
            shared.release(&quiet);
            if !used.is_empty() {
                // Back to the pool once the kernel forgot their flows.
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    shared.conntrack.forget(&used).await;
                    shared.release(&used);
                });
            }
            shared.leases_dirty.store(true, Ordering::Relaxed);
        }
        if let Some(path) = &path
            && shared.leases_dirty.swap(false, Ordering::Relaxed)
        {
            let text = leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .to_text();
            write_leases(path, &text);
        }
    }
}

/// Replaces the lease file atomically (write, then rename).
fn write_leases(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(error) = result {
        tracing::warn!(path = %path.display(), %error, "cannot write the lease file");
    }
}

/// Serves the demo site (see [`crate::demo`]) unless `--no-demo`; a demo that cannot bind is
/// logged and skipped, not fatal: the gateway's job is the tunnel.
async fn start_demo(
    config: &Config,
    gateway: std::net::SocketAddr,
    cert_hash: &str,
) -> Option<tokio::task::JoinHandle<()>> {
    let (address, dir) = config.demo.clone()?;
    let listener = match crate::demo::bind(address).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%address, %error, "demo page not served (--demo-listen, --no-demo)");
            return None;
        }
    };
    if !crate::demo::package_built(&dir) {
        tracing::warn!(dir = %dir.display(), "no browser package there: run scripts/build-wasm.sh or pass --demo-dir");
    }
    println!("demo page: http://{address}/");
    let _ = std::io::stdout().flush();
    let site = crate::demo::Site::new(
        dir,
        gateway,
        cert_hash.to_owned(),
        address,
        config.token_key.clone(),
    );
    Some(tokio::spawn(crate::demo::serve(listener, Arc::new(site))))
}

async fn load_identity(config: &Config) -> Result<Identity, StartError> {
    match &config.cert_and_key {
        Some((cert, key)) => Identity::load_pemfiles(cert, key)
            .await
            .map_err(|error| StartError::Identity(error.to_string())),
        None => {
            let mut names = vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "::1".to_owned(),
            ];
            names.extend(config.hostnames.iter().cloned());
            Identity::self_signed(names).map_err(|error| StartError::Identity(error.to_string()))
        }
    }
}

/// The gateway's QUIC transport settings for sessions that idle out after `idle_timeout`:
/// datagram buffers, keep-alive, idle timeout and stream limits. Public so that the `sessions`
/// bench's bare WebTransport server uses exactly these.
pub fn transport_config(
    idle_timeout: Duration,
    congestion: Congestion,
) -> wtransport::quinn::TransportConfig {
    use wtransport::quinn::congestion::{CubicConfig, NewRenoConfig};
    let mut transport = wtransport::quinn::TransportConfig::default();
    transport
        .datagram_receive_buffer_size(Some(DATAGRAM_RECEIVE_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER)
        .send_window(STREAM_SEND_WINDOW)
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .max_idle_timeout(wtransport::quinn::IdleTimeout::try_from(idle_timeout).ok())
        .keep_alive_interval(Some(KEEP_ALIVE.min(idle_timeout / 2)))
        .max_concurrent_bidi_streams(MAX_CLIENT_BIDI_STREAMS.into())
        .max_concurrent_uni_streams(MAX_CLIENT_UNI_STREAMS.into());
    match congestion {
        Congestion::Bbr => transport.congestion_controller_factory(Arc::new(
            crate::congestion::FlooredBbrConfig::default(),
        )),
        Congestion::Cubic => {
            transport.congestion_controller_factory(Arc::new(CubicConfig::default()))
        }
        Congestion::NewReno => {
            transport.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
        }
    };
    transport
}

fn server_config(config: &Config, identity: Identity, socket: std::net::UdpSocket) -> ServerConfig {
    ServerConfig::builder()
        .with_bind_socket(socket)
        .with_custom_transport(
            identity,
            transport_config(config.idle_timeout, config.congestion),
        )
        .build()
}

/// Writes the readiness file atomically (temporary file + rename), so a reader never sees a
/// partial hash.
fn write_hash_file(path: &Path, hex: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, format!("{hex}\n"))?;
    std::fs::rename(&temporary, path)
}

/// Standard base64 with padding (RFC 4648), for the JavaScript snippet.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads packets from the TUN and queues each for the session holding its destination.
///
/// Per packet: complete a partial checksum (offload), clamp the TCP MSS of SYNs, look up the
/// session, enforce the link MTU, then prepend the session's datagram header and queue (one
/// copy, into the queued `Bytes`). A coalesced TCP packet goes whole to a session that takes
/// large packets, and is cut into link-MTU segments for any other.
async fn tun_reader(shared: Arc<Shared>, gateway_v4: std::net::Ipv4Addr) {
    // The HTTP/3 datagram header (up to 8 bytes) and link repair's sequenced-frame header (5);
    // the virtio-net header (10) is read there too and parsed before they are written.
    const HEADROOM: usize = 16;
    const _: () = assert!(HEADROOM >= VNET_HDR_LEN);
    let (max_v4, max_v6) = shared.max_mss();
    let link_mtu = usize::from(shared.link_mtu);
    // A coalesced packet is at most 64 KiB plus its headers.
    let mut buf = vec![0u8; HEADROOM + 65_536 + 256];
    loop {
        let (offload, n) = match shared.tun.recv(&mut buf, HEADROOM).await {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(%error, "TUN read failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let packet = &mut buf[HEADROOM..HEADROOM + n];
        let destination = match destination(packet) {
            Ok(destination) => destination,
            Err(reason) => {
                shared.metrics.dropped(reason);
                continue;
            }
        };
        let Some(queue) = shared.routes.lookup(destination) else {
            shared.metrics.dropped(DropReason::NoRoute);
            tracing::trace!(%destination, "no session for destination");
            continue;
        };
        if offload.gso != Gso::None {
            if let Err(error) = queue_coalesced(&shared, &queue, offload, packet) {
                shared.metrics.dropped(DropReason::Offload);
                tracing::debug!(%error, %destination, "coalesced packet dropped");
            }
            continue;
        }
        if offload.needs_csum
            && let Err(error) = complete_checksum(packet, offload.csum_start, offload.csum_offset)
        {
            shared.metrics.dropped(DropReason::Offload);
            tracing::debug!(%error, %destination, "packet with a partial checksum dropped");
            continue;
        }
        clamp_tcp_mss(packet, max_v4, max_v6);
        if n > link_mtu {
            // IPv4 with DF: tell the sender the link MTU (the kernel normally does this itself
            // from the pool route's MTU; this covers packets that bypass it). IPv4 without DF
            // is fragmented by the kernel before it gets here, so what remains oversize, and
            // IPv6 (whose minimum MTU of 1280 forbids announcing a smaller one in a Packet Too
            // Big), is dropped and counted; TCP avoids it through MSS clamping.
            if ipv4_dont_fragment(packet)
                && let Some(reply) = icmp_frag_needed(packet, gateway_v4, shared.link_mtu)
                && let Err(error) = shared.tun.send(&reply).await
            {
                tracing::debug!(%error, "cannot send ICMP fragmentation needed");
            }
            shared.metrics.dropped(DropReason::Oversize);
            continue;
        }
        let header = queue.header();
        let start = HEADROOM - header.len();
        buf[start..HEADROOM].copy_from_slice(header);
        if queue.push(Bytes::copy_from_slice(&buf[start..HEADROOM + n])) {
            shared.metrics.dropped(DropReason::QueueFull);
        }
    }
}

/// Queues a coalesced TCP packet: whole (with its checksums written) for a session that takes
/// packets that large on its stream link, else cut into segments that fit the link MTU.
fn queue_coalesced(
    shared: &Shared,
    queue: &SessionQueue,
    offload: VnetHeader,
    packet: &mut [u8],
) -> Result<(), OffloadError> {
    if let Gso::Other(kind) = offload.gso {
        return Err(OffloadError::UnexpectedGso(kind));
    }
    let header = queue.header();
    if queue.large_packets().is_some_and(|max| packet.len() <= max) {
        finish_coalesced(packet)?;
        let mut datagram = BytesMut::with_capacity(header.len() + packet.len());
        datagram.extend_from_slice(header);
        datagram.extend_from_slice(packet);
        if queue.push(datagram.freeze()) {
            shared.metrics.dropped(DropReason::QueueFull);
        }
        shared.metrics.tun_coalesced(0);
        return Ok(());
    }
    let mut full = 0;
    let link_mtu = usize::from(shared.link_mtu);
    let segments = segment_tcp(packet, offload.gso_size, link_mtu, header, |datagram| {
        if queue.push(datagram) {
            full += 1;
        }
    })?;
    for _ in 0..full {
        shared.metrics.dropped(DropReason::QueueFull);
    }
    shared.metrics.tun_coalesced(segments as u64);
    Ok(())
}

/// SIGINT and SIGTERM.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signals")
    }
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output);
        }
    }
}
