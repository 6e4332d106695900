//! The whole tunnel: native client (this process, root namespace) → QUIC over a veth → the
//! release `webnic-gateway` in its namespace → TUN → a server in the server namespace. Single-flow
//! download and upload goodput, the same for 8 parallel flows through the one session, and 64-byte
//! echo RTT (p50, p99), each next to the same measurement over plain TCP along the same veth path
//! without the tunnel (root → gateway namespace routing → server), taken in the same run. The
//! downloads are also compared with the relays users run today (websockify and a Wisp server in
//! the gateway's namespace, over TLS: `benches/relays/`), one flow and 8 flows each. The client
//! takes the gateway's packets on the stream link (its default); the same client on datagrams
//! (with link repair) is measured too (`.stream_link_vs_datagrams`).
//!
//! Needs root, `target/release/webnic-gateway` (`cargo build --release --bins`) and the relays
//! (`scripts/bench-relays-install.sh`); `scripts/bench.sh` does all three. Transfers are seconds long, so this bench times them itself
//! (median of `RUNS`) instead of letting criterion repeat them hundreds of times.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "relays/mod.rs"]
mod relays;
#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Topology, connect_client, in_netns, run, seeded_bytes, sha256_hex, within};
use relays::{Relay, Relays};
use sha2::{Digest, Sha256};
use support::report;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const TRANSFER: usize = 64 << 20;
const RUNS: usize = 3;
const ECHO_WARMUP: usize = 100;
const ECHO_COUNT: usize = 2000;
const MESSAGE: usize = 64;
const DOWNLOAD_PORT: u16 = 9101;
const UPLOAD_PORT: u16 = 9102;
const UPLOAD_HASH_PORT: u16 = 9103;
const ECHO_PORT: u16 = 9104;
/// Serves the first `TRANSFER / FLOWS` bytes: one of the parallel flows' share.
const DOWNLOAD_PART_PORT: u16 = 9105;
/// Parallel flows of the multi-flow figures; together they move `TRANSFER` bytes, as one flow does.
const FLOWS: usize = 8;
const SEED: u64 = 0x7e57;
/// websockify's listening ports (gateway namespace) for `DOWNLOAD_PORT` and `DOWNLOAD_PART_PORT`.
const WEBSOCKIFY_PORT: u16 = 6080;
const WEBSOCKIFY_PART_PORT: u16 = 6081;
/// The Wisp server's port (gateway namespace).
const WISP_PORT: u16 = 6001;
/// `DOWNLOAD_PORT`'s and `DOWNLOAD_PART_PORT`'s bytes from a server that does not close first,
/// for Wisp (see `relays::serve_download`).
const OPEN_DOWNLOAD_PORT: u16 = 9106;
const OPEN_DOWNLOAD_PART_PORT: u16 = 9107;
/// Limit of one transfer: a stalled tunnel fails the bench instead of hanging it.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the servers in the server namespace: threads accepting on listeners created there
/// (a socket stays in the namespace it was created in).
fn start_servers(topology: &Topology) {
    let listeners: Vec<(u16, TcpListener)> = in_netns(&topology.srv_ns(), || {
        [
            DOWNLOAD_PORT,
            UPLOAD_PORT,
            UPLOAD_HASH_PORT,
            ECHO_PORT,
            DOWNLOAD_PART_PORT,
        ]
        .into_iter()
        .map(|port| {
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind in server ns");
            (port, listener)
        })
        .collect()
    });
    let data = std::sync::Arc::new(seeded_bytes(SEED, TRANSFER));
    for (port, listener) in listeners {
        let data = std::sync::Arc::clone(&data);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let data = std::sync::Arc::clone(&data);
                thread::spawn(move || {
                    // Errors end this connection only; the client side reports what it missed.
                    let _ = serve(port, &mut stream, &data);
                });
            }
        });
    }
}

fn serve(port: u16, stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    match port {
        DOWNLOAD_PORT | DOWNLOAD_PART_PORT => {
            let len = if port == DOWNLOAD_PORT {
                data.len()
            } else {
                data.len() / FLOWS
            };
            stream.write_all(&data[..len])?;
            stream.shutdown(std::net::Shutdown::Write)?;
            while stream.read(&mut buf)? > 0 {}
        }
        UPLOAD_PORT | UPLOAD_HASH_PORT => {
            // The hashing sink is used once to check the bytes; the timed sink only counts, so
            // hashing does not slow the flow it measures.
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if port == UPLOAD_HASH_PORT {
                    hasher.update(&buf[..n]);
                }
                total += n as u64;
            }
            stream.write_all(&total.to_be_bytes())?;
            stream.write_all(&hasher.finalize())?;
        }
        ECHO_PORT => {
            stream.set_nodelay(true)?;
            let mut message = [0u8; MESSAGE];
            loop {
                if let Err(e) = stream.read_exact(&mut message) {
                    return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Ok(())
                    } else {
                        Err(e)
                    };
                }
                stream.write_all(&message)?;
            }
        }
        _ => unreachable!("no server on port {port}"),
    }
    Ok(())
}

/// Reads a whole download; returns its length and, when `hash`, its sha256.
async fn download<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    hash: bool,
) -> (usize, Option<String>) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut hasher = Sha256::new();
    let mut total = 0;
    loop {
        let n = stream.read(&mut buf).await.expect("download read");
        if n == 0 {
            break;
        }
        if hash {
            hasher.update(&buf[..n]);
        }
        total += n;
    }
    let _ = stream.shutdown().await;
    (total, hash.then(|| hex(&hasher.finalize())))
}

/// Writes `data`, half-closes, and returns what the sink reports: byte count and sha256 (of
/// nothing, unless it is the hashing sink).
async fn upload<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, data: &[u8]) -> (u64, String) {
    stream.write_all(data).await.expect("upload write");
    stream.shutdown().await.expect("upload shutdown");
    let mut reply = [0u8; 40];
    stream
        .read_exact(&mut reply)
        .await
        .expect("upload sink reply");
    let count = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
    (count, hex(&reply[8..]))
}

/// Round-trip times of `ECHO_COUNT` 64-byte exchanges, sorted.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> Vec<Duration> {
    let message: [u8; MESSAGE] = std::array::from_fn(|i| i as u8);
    let mut reply = [0u8; MESSAGE];
    let mut rtts = Vec::with_capacity(ECHO_COUNT);
    for i in 0..ECHO_WARMUP + ECHO_COUNT {
        let start = Instant::now();
        stream.write_all(&message).await.expect("echo write");
        stream.read_exact(&mut reply).await.expect("echo read");
        if i >= ECHO_WARMUP {
            rtts.push(start.elapsed());
        }
        assert_eq!(reply, message, "echo corrupted");
    }
    rtts.sort();
    rtts
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn mbit(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

/// Both ways of reaching the server: through the tunnel and over plain TCP.
#[derive(Clone, Copy, Debug)]
enum Path {
    Tunnel,
    Direct,
}

/// What one path measured: goodput in Mbit/s (medians of `RUNS`), echo RTT in µs.
#[derive(Clone, Copy, Debug)]
struct Figures {
    download: f64,
    upload: f64,
    rtt_p50: f64,
    rtt_p99: f64,
    download_flows: f64,
    upload_flows: f64,
}

struct Endpoints<'a> {
    client: &'a webnic::Client,
    server: IpAddr,
}

impl Endpoints<'_> {
    async fn connect(&self, path: Path, port: u16) -> Box<dyn Stream> {
        let at = SocketAddr::new(self.server, port);
        match path {
            Path::Tunnel => Box::new(self.client.tcp_connect(at).await.expect("tunnel connect")),
            Path::Direct => {
                let s = tokio::net::TcpStream::connect(at)
                    .await
                    .expect("direct connect");
                s.set_nodelay(true).expect("nodelay");
                Box::new(s)
            }
        }
    }

    /// `FLOWS` concurrent downloads of `TRANSFER / FLOWS` bytes each, every flow in its own task. Returns the goodput of all bytes over the wall
    /// time, and each flow's sha256 when `hash`.
    async fn download_flows(&self, path: Path, hash: bool) -> (f64, Vec<Option<String>>) {
        // Timed from before the flows open, as the relays' parallel downloads are.
        let start = Instant::now();
        let mut streams = Vec::with_capacity(FLOWS);
        for _ in 0..FLOWS {
            streams.push(self.connect(path, DOWNLOAD_PART_PORT).await);
        }
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|stream| tokio::spawn(download(stream, hash)))
            .collect();
        let mut total = 0;
        let mut hashes = Vec::with_capacity(FLOWS);
        for task in tasks {
            let (len, hash) = task.await.expect("download flow");
            assert_eq!(len, TRANSFER / FLOWS, "{path:?} parallel download length");
            total += len;
            hashes.push(hash);
        }
        (mbit(total, start.elapsed()), hashes)
    }

    /// `FLOWS` concurrent uploads of `TRANSFER / FLOWS` bytes each to `port`; the goodput of all
    /// bytes over the wall time, and each sink's (count, sha256).
    async fn upload_flows(
        &self,
        path: Path,
        port: u16,
        data: &std::sync::Arc<Vec<u8>>,
    ) -> (f64, Vec<(u64, String)>) {
        let start = Instant::now();
        let mut streams = Vec::with_capacity(FLOWS);
        for _ in 0..FLOWS {
            streams.push(self.connect(path, port).await);
        }
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|stream| {
                let data = std::sync::Arc::clone(data);
                tokio::spawn(async move { upload(stream, &data[..TRANSFER / FLOWS]).await })
            })
            .collect();
        let mut replies = Vec::with_capacity(FLOWS);
        for task in tasks {
            replies.push(task.await.expect("upload flow"));
        }
        (mbit(TRANSFER, start.elapsed()), replies)
    }

    async fn measure(&self, path: Path) -> Figures {
        let data = seeded_bytes(SEED, TRANSFER);
        let expected = sha256_hex(&data);
        // Checked once, byte-exact, both ways.
        let (len, hash) = within(TRANSFER_TIMEOUT, "download check", async {
            download(self.connect(path, DOWNLOAD_PORT).await, true).await
        })
        .await;
        assert_eq!(len, TRANSFER, "{path:?} download length");
        assert_eq!(
            hash.as_deref(),
            Some(expected.as_str()),
            "{path:?} download"
        );
        let (count, hash) = within(TRANSFER_TIMEOUT, "upload check", async {
            upload(self.connect(path, UPLOAD_HASH_PORT).await, &data).await
        })
        .await;
        assert_eq!(count, TRANSFER as u64, "{path:?} upload length");
        assert_eq!(hash, expected, "{path:?} upload");

        let mut down = Vec::new();
        let mut up = Vec::new();
        for _ in 0..RUNS {
            let stream = self.connect(path, DOWNLOAD_PORT).await;
            let start = Instant::now();
            let (len, _) = within(TRANSFER_TIMEOUT, "download", download(stream, false)).await;
            down.push(mbit(len, start.elapsed()));
            assert_eq!(len, TRANSFER);
            let stream = self.connect(path, UPLOAD_PORT).await;
            let start = Instant::now();
            let (count, _) = within(TRANSFER_TIMEOUT, "upload", upload(stream, &data)).await;
            up.push(mbit(TRANSFER, start.elapsed()));
            assert_eq!(count, TRANSFER as u64);
        }
        let rtts = within(
            TRANSFER_TIMEOUT,
            "echo",
            echo(self.connect(path, ECHO_PORT).await),
        )
        .await;

        // Parallel flows: checked once byte-exact per flow, then timed without hashing.
        let part = sha256_hex(&data[..TRANSFER / FLOWS]);
        let data = std::sync::Arc::new(data);
        let (_, hashes) = within(
            TRANSFER_TIMEOUT,
            "parallel download check",
            self.download_flows(path, true),
        )
        .await;
        for hash in hashes {
            assert_eq!(
                hash.as_deref(),
                Some(part.as_str()),
                "{path:?} parallel download"
            );
        }
        let (_, replies) = within(
            TRANSFER_TIMEOUT,
            "parallel upload check",
            self.upload_flows(path, UPLOAD_HASH_PORT, &data),
        )
        .await;
        for (count, hash) in replies {
            assert_eq!(
                count,
                (TRANSFER / FLOWS) as u64,
                "{path:?} parallel upload length"
            );
            assert_eq!(hash, part, "{path:?} parallel upload");
        }
        let mut down_flows = Vec::new();
        let mut up_flows = Vec::new();
        for _ in 0..RUNS {
            let (goodput, _) = within(
                TRANSFER_TIMEOUT,
                "parallel download",
                self.download_flows(path, false),
            )
            .await;
            down_flows.push(goodput);
            let (goodput, replies) = within(
                TRANSFER_TIMEOUT,
                "parallel upload",
                self.upload_flows(path, UPLOAD_PORT, &data),
            )
            .await;
            for (count, _) in replies {
                assert_eq!(count, (TRANSFER / FLOWS) as u64, "{path:?} parallel upload");
            }
            up_flows.push(goodput);
        }
        Figures {
            download: median(down),
            upload: median(up),
            rtt_p50: percentile(&rtts, 0.5),
            rtt_p99: percentile(&rtts, 0.99),
            download_flows: median(down_flows),
            upload_flows: median(up_flows),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Baseline (a): raw QUIC datagrams between two endpoints on the same veth addresses, through the
// same WebTransport/quinn layers and buffer sizes webnic uses: the transport's ceiling.

/// The datagram server's port on the gateway namespace's veth address (next to the gateway's).
const RAW_PORT: u16 = 4434;
/// The QUIC datagram buffers webnic's client and gateway use, both directions.
const RAW_DATAGRAM_BUFFER: usize = 1 << 20;
/// UDP socket buffers, as webnic's client asks for (capped by `net.core.rmem_max`).
const RAW_SOCKET_BUFFER: usize = 8 * 1024 * 1024;
/// First byte of an echo request.
const ECHO_TAG: u8 = b'E';
/// Datagrams a sender may have in flight beyond what the receiver has reported taking in. The
/// receiver's quinn queue holds `RAW_DATAGRAM_BUFFER` bytes (~870 full datagrams) and drops the
/// oldest beyond that, so the window stays well under it; the bandwidth-delay product here
/// (~2.5 Gbit/s × ~150 µs ≈ 40 datagrams) is far smaller, so the window does not cap goodput.
const RAW_WINDOW: u64 = 256;
/// The receiver reports its cumulative count every this many datagrams.
const RAW_CREDIT_EVERY: u64 = 32;
/// A sender blocked this long on credit counts its unreported datagrams as lost and goes on, so
/// a lost datagram cannot stall the transfer (and shows up in the loss figure instead).
const RAW_CREDIT_STALL: Duration = Duration::from_millis(10);
/// How long a receiver waits for stragglers after the sender says it is done.
const RAW_TAIL: Duration = Duration::from_millis(100);
/// Receiver → sender messages on the command stream: a credit (cumulative datagrams received)
/// or the final result (bytes, nanoseconds first→last datagram, datagrams received).
const MSG_CREDIT: u8 = b'C';
const MSG_RESULT: u8 = b'R';

fn raw_socket(address: SocketAddr) -> std::net::UdpSocket {
    let socket = std::net::UdpSocket::bind(address).expect("bind UDP");
    let state = wtransport::quinn::udp::UdpSocketState::new((&socket).into()).expect("UDP state");
    // Best effort, as in webnic's client: the kernel caps it at rmem_max/wmem_max.
    let _ = state.set_recv_buffer_size((&socket).into(), RAW_SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), RAW_SOCKET_BUFFER);
    socket
}

fn raw_transport() -> wtransport::quinn::TransportConfig {
    let mut transport = wtransport::quinn::TransportConfig::default();
    transport
        .datagram_receive_buffer_size(Some(RAW_DATAGRAM_BUFFER))
        .datagram_send_buffer_size(RAW_DATAGRAM_BUFFER);
    transport
}

/// What one flow-controlled datagram transfer delivered, as the receiver counted it.
#[derive(Clone, Copy, Debug)]
struct RawTransfer {
    /// Payload bytes received.
    bytes: u64,
    /// From the first to the last datagram received.
    elapsed: Duration,
    received: u64,
    sent: u64,
}

impl RawTransfer {
    fn mbit(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }

    fn loss_percent(&self) -> f64 {
        (self.sent - self.received.min(self.sent)) as f64 * 100.0 / self.sent as f64
    }
}

/// Sends `count` datagrams of `size` payload bytes with QUIC backpressure (`send_datagram_wait`
/// with the HTTP/3 datagram header, as webnic's driver does) and the receiver's credit window on
/// top: datagrams have no flow control of their own, and without it the receiver's queue
/// overflows and most of a transfer is lost. Then tells the receiver how many it sent and returns
/// the receiver's result.
async fn raw_send(
    connection: &wtransport::Connection,
    mut control_tx: wtransport::SendStream,
    mut control_rx: wtransport::RecvStream,
    count: u64,
    size: usize,
) -> Result<RawTransfer, Box<dyn std::error::Error + Send + Sync>> {
    // A task owns the receiving half: reads are not cancel-safe, the watch and oneshot are.
    let (credit_tx, mut credit_rx) = tokio::sync::watch::channel(0u64);
    let (result_tx, result_rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut message = [0u8; 25];
        loop {
            control_rx.read_exact(&mut message[..1]).await?;
            match message[0] {
                MSG_CREDIT => {
                    control_rx.read_exact(&mut message[1..9]).await?;
                    let received = u64::from_be_bytes(message[1..9].try_into()?);
                    credit_tx.send_replace(received);
                }
                MSG_RESULT => {
                    control_rx.read_exact(&mut message[1..25]).await?;
                    let field = |i: usize| -> u64 {
                        u64::from_be_bytes(message[1 + 8 * i..9 + 8 * i].try_into().expect("8"))
                    };
                    let _ = result_tx.send((field(0), field(1), field(2)));
                    return Ok::<(), Box<dyn std::error::Error + Send + Sync>>(());
                }
                other => return Err(format!("unknown control message {other}").into()),
            }
        }
    });
    let (header, header_len) =
        webnic_stack::protocol::datagram_header(connection.session_id().into_u64());
    let mut datagram = vec![0x5a; header_len + size];
    datagram[..header_len].copy_from_slice(&header[..header_len]);
    let datagram = bytes::Bytes::from(datagram);
    let quic = connection.quic_connection().clone();
    // Datagrams written off as lost after a stall: they no longer hold window.
    let mut forgiven = 0u64;
    for sent in 0..count {
        loop {
            let received = *credit_rx.borrow_and_update();
            if sent < received + forgiven + RAW_WINDOW {
                break;
            }
            match tokio::time::timeout(RAW_CREDIT_STALL, credit_rx.changed()).await {
                Ok(changed) => changed?,
                Err(_) => forgiven = sent - received,
            }
        }
        quic.send_datagram_wait(datagram.clone()).await?;
    }
    control_tx.write_all(&count.to_be_bytes()).await?;
    let (bytes, nanos, received) = result_rx.await?;
    reader.await??;
    Ok(RawTransfer {
        bytes,
        elapsed: Duration::from_nanos(nanos),
        received,
        sent: count,
    })
}

/// Receives one transfer from `raw_send`: counts datagrams, grants credit every
/// `RAW_CREDIT_EVERY`, and once the sender has said how many it sent, waits for the rest (or
/// `RAW_TAIL` of silence), then reports the result on the control stream and returns it.
async fn raw_receive(
    connection: &wtransport::Connection,
    mut control_tx: wtransport::SendStream,
    mut control_rx: wtransport::RecvStream,
) -> Result<RawTransfer, Box<dyn std::error::Error + Send + Sync>> {
    let (sent_tx, mut sent_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut sent = [0u8; 8];
        if control_rx.read_exact(&mut sent).await.is_ok() {
            let _ = sent_tx.send(u64::from_be_bytes(sent));
        }
    });
    let mut bytes = 0u64;
    let mut received = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    let mut sent = None;
    loop {
        if sent.is_some_and(|sent| received >= sent) {
            break;
        }
        tokio::select! {
            datagram = connection.receive_datagram() => {
                let datagram = datagram?;
                last = Instant::now();
                first.get_or_insert(last);
                bytes += datagram.payload().len() as u64;
                received += 1;
                if received.is_multiple_of(RAW_CREDIT_EVERY) {
                    let mut credit = [MSG_CREDIT; 9];
                    credit[1..].copy_from_slice(&received.to_be_bytes());
                    control_tx.write_all(&credit).await?;
                }
            }
            count = &mut sent_rx, if sent.is_none() => sent = Some(count?),
            // Only once the sender is done: stragglers that do not come were lost.
            _ = tokio::time::sleep(RAW_TAIL), if sent.is_some() => break,
        }
    }
    let elapsed = last - first.ok_or("no datagram arrived")?;
    let sent = sent.ok_or("sender never finished")?;
    let mut result = vec![MSG_RESULT];
    for field in [bytes, elapsed.as_nanos() as u64, received] {
        result.extend_from_slice(&field.to_be_bytes());
    }
    control_tx.write_all(&result).await?;
    control_tx.finish().await?;
    Ok(RawTransfer {
        bytes,
        elapsed,
        received,
        sent,
    })
}

/// The datagram server, in the gateway namespace: one session at a time. Commands arrive on a
/// bidirectional stream, which then carries the transfer's flow control: `D` + count + size
/// (send that many datagrams to the client), `U` (receive from the client), `E` (echo every
/// datagram until the stream ends).
fn start_raw_server(topology: &Topology) -> wtransport::tls::Sha256Digest {
    let address = SocketAddr::new(IpAddr::V4(topology.gw_addr()), RAW_PORT);
    let identity = wtransport::Identity::self_signed([topology.gw_addr().to_string()])
        .expect("self-signed identity");
    let hash = identity.certificate_chain().as_slice()[0].hash();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    in_netns(&topology.gw_ns(), move || {
        // Threads inherit their creator's namespace: this one serves from the gateway's.
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let config = wtransport::ServerConfig::builder()
                    .with_bind_socket(raw_socket(address))
                    .with_custom_transport(identity, raw_transport())
                    .build();
                let endpoint = wtransport::Endpoint::server(config).expect("raw server");
                ready_tx.send(()).expect("ready");
                loop {
                    let Ok(request) = endpoint.accept().await.await else {
                        continue;
                    };
                    let Ok(connection) = request.accept().await else {
                        continue;
                    };
                    // Errors end this session only; the client reports what it missed.
                    let _ = raw_session(connection).await;
                }
            });
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("raw datagram server did not start");
    hash
}

async fn raw_session(
    connection: wtransport::Connection,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    loop {
        let (mut send, mut recv) = connection.accept_bi().await?;
        let mut command = [0u8; 17];
        recv.read_exact(&mut command[..1]).await?;
        match command[0] {
            b'D' => {
                recv.read_exact(&mut command[1..17]).await?;
                let count = u64::from_be_bytes(command[1..9].try_into()?);
                let size = u64::from_be_bytes(command[9..17].try_into()?) as usize;
                raw_send(&connection, send, recv, count, size).await?;
            }
            b'U' => {
                raw_receive(&connection, send, recv).await?;
            }
            b'E' => {
                send.write_all(b"go").await?;
                let mut end = [0u8; 1];
                loop {
                    tokio::select! {
                        datagram = connection.receive_datagram() => {
                            let datagram = datagram?;
                            connection.send_datagram(datagram.payload())?;
                        }
                        // The client ends echo mode by closing its side of the stream.
                        _ = recv.read(&mut end) => break,
                    }
                }
                send.finish().await?;
            }
            other => return Err(format!("unknown command {other}").into()),
        }
    }
}

/// Raw datagram download and upload goodput (Mbit/s of payload delivered, median of `RUNS`),
/// echo RTT p50/p99 (µs), and the loss of the median-goodput download and upload run (%).
async fn measure_raw(
    server: SocketAddr,
    hash: wtransport::tls::Sha256Digest,
) -> (f64, f64, f64, f64, f64, f64) {
    let mut config = wtransport::ClientConfig::builder()
        .with_bind_socket(raw_socket(SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            0,
        )))
        .with_server_certificate_hashes([hash])
        .build();
    config
        .quic_config_mut()
        .transport_config(std::sync::Arc::new(raw_transport()));
    let endpoint = wtransport::Endpoint::client(config).expect("raw client");
    let connection = endpoint
        .connect(format!("https://{server}/raw"))
        .await
        .expect("raw connect");
    // Let PMTU discovery settle, as it has for the tunnel's long-lived session.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let size = connection.max_datagram_size().expect("datagrams enabled");
    let count = (TRANSFER / size) as u64;
    let mut down = Vec::new();
    let mut up = Vec::new();
    for _ in 0..RUNS {
        let (mut send, recv) = connection.open_bi().await.expect("open").await.expect("bi");
        let mut command = vec![b'D'];
        command.extend_from_slice(&count.to_be_bytes());
        command.extend_from_slice(&(size as u64).to_be_bytes());
        send.write_all(&command).await.expect("command");
        let transfer = within(
            TRANSFER_TIMEOUT,
            "raw download",
            raw_receive(&connection, send, recv),
        )
        .await
        .expect("raw download");
        print_raw("download", &transfer, size);
        down.push(transfer);

        let (mut send, recv) = connection.open_bi().await.expect("open").await.expect("bi");
        send.write_all(b"U").await.expect("command");
        let transfer = within(
            TRANSFER_TIMEOUT,
            "raw upload",
            raw_send(&connection, send, recv, count, size),
        )
        .await
        .expect("raw upload");
        print_raw("upload", &transfer, size);
        up.push(transfer);
    }
    let median_transfer = |mut transfers: Vec<RawTransfer>| {
        transfers.sort_by(|a, b| a.mbit().total_cmp(&b.mbit()));
        transfers[transfers.len() / 2]
    };
    let (down, up) = (median_transfer(down), median_transfer(up));

    let (mut send, mut recv) = connection.open_bi().await.expect("open").await.expect("bi");
    send.write_all(b"E").await.expect("command");
    let mut go = [0u8; 2];
    recv.read_exact(&mut go).await.expect("go");
    let mut message = [0u8; MESSAGE];
    message[0] = ECHO_TAG;
    let mut rtts = Vec::with_capacity(ECHO_COUNT);
    let mut lost = 0;
    for i in 0..ECHO_WARMUP + ECHO_COUNT {
        let start = Instant::now();
        connection
            .send_datagram(message)
            .expect("send echo datagram");
        match tokio::time::timeout(Duration::from_secs(1), connection.receive_datagram()).await {
            Ok(Ok(reply)) => {
                assert_eq!(&reply.payload()[..], &message[..], "echo corrupted");
                if i >= ECHO_WARMUP {
                    rtts.push(start.elapsed());
                }
            }
            _ => lost += 1,
        }
    }
    assert!(lost < ECHO_COUNT / 100, "{lost} raw echo datagrams lost");
    send.finish().await.expect("end echo");
    connection.close(0u32.into(), b"done");
    rtts.sort();
    (
        down.mbit(),
        up.mbit(),
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99),
        down.loss_percent(),
        up.loss_percent(),
    )
}

/// One line per raw transfer: what was delivered and lost, for the log and `scripts/bench.sh`.
fn print_raw(direction: &str, transfer: &RawTransfer, size: usize) {
    println!(
        "NOTE raw {direction}: {:.1} Mbit/s delivered, {} of {} datagrams of {size} B, loss {:.2}%",
        transfer.mbit(),
        transfer.received,
        transfer.sent,
        transfer.loss_percent()
    );
}

/// Download goodput through `relay` (Mbit/s, median of `RUNS`): one flow of `TRANSFER` bytes and
/// `FLOWS` concurrent flows of `TRANSFER / FLOWS`. Checked byte-exact once each, as webnic is.
async fn measure_relay(
    relays: &std::sync::Arc<Relays>,
    relay: Relay,
    server: IpAddr,
) -> (f64, f64) {
    let data = seeded_bytes(SEED, TRANSFER);
    let part = &data[..TRANSFER / FLOWS];
    let name = relay.name();
    let (port, part_port) = match relay {
        Relay::Websockify => (DOWNLOAD_PORT, DOWNLOAD_PART_PORT),
        Relay::Wisp => (OPEN_DOWNLOAD_PORT, OPEN_DOWNLOAD_PART_PORT),
    };
    let one = within(
        TRANSFER_TIMEOUT,
        "relay download check",
        relays.download_flows(
            relay,
            SocketAddr::new(server, port),
            1,
            TRANSFER,
            true,
            None,
        ),
    )
    .await;
    one.flows[0].check(&data, false, &format!("{name} download"));
    let many = within(
        TRANSFER_TIMEOUT,
        "relay parallel download check",
        relays.download_flows(
            relay,
            SocketAddr::new(server, part_port),
            FLOWS,
            part.len(),
            true,
            None,
        ),
    )
    .await;
    for flow in &many.flows {
        flow.check(part, false, &format!("{name} parallel download"));
    }
    let mut ones = Vec::new();
    let mut manys = Vec::new();
    for _ in 0..RUNS {
        let one = within(
            TRANSFER_TIMEOUT,
            "relay download",
            relays.download_flows(
                relay,
                SocketAddr::new(server, port),
                1,
                TRANSFER,
                false,
                None,
            ),
        )
        .await;
        assert_eq!(one.flows[0].len, TRANSFER, "{name} download length");
        ones.push(one.mbit);
        let many = within(
            TRANSFER_TIMEOUT,
            "relay parallel download",
            relays.download_flows(
                relay,
                SocketAddr::new(server, part_port),
                FLOWS,
                part.len(),
                false,
                None,
            ),
        )
        .await;
        for flow in &many.flows {
            assert_eq!(flow.len, part.len(), "{name} parallel download length");
        }
        manys.push(many.mbit);
    }
    (median(ones), median(manys))
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would run this without it and must
    // not build namespaces.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("tunnel: run with `cargo bench --bench tunnel` (as root)");
        return;
    }
    let topology = Topology::new();
    start_servers(&topology);
    let n = topology.n();
    // The plain-TCP baseline: from the root namespace through the gateway namespace's
    // forwarding to the server, the veths the tunnel crosses too. Removed with the veth.
    run(&[
        "ip",
        "route",
        "add",
        &format!("10.201.{n}.0/24"),
        "via",
        &format!("10.200.{n}.1"),
    ]);
    let gateway = topology.start_gateway(&[]);
    let raw_hash = start_raw_server(&topology);
    let data = std::sync::Arc::new(seeded_bytes(SEED, TRANSFER));
    let part = std::sync::Arc::new(data[..TRANSFER / FLOWS].to_vec());
    relays::serve_download(&topology, OPEN_DOWNLOAD_PORT, data, false);
    relays::serve_download(&topology, OPEN_DOWNLOAD_PART_PORT, part, false);
    let relays = std::sync::Arc::new(Relays::start(
        &topology,
        &[
            (WEBSOCKIFY_PORT, DOWNLOAD_PORT),
            (WEBSOCKIFY_PART_PORT, DOWNLOAD_PART_PORT),
        ],
        WISP_PORT,
    ));
    let raw_server = SocketAddr::new(IpAddr::V4(topology.gw_addr()), RAW_PORT);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = IpAddr::V4(topology.srv_ipv4());
    // The webnic client runs on one thread, as the raw QUIC baseline's client does (below) and
    // as the `webnic` CLI does: its tasks share one stack behind one lock, and a multi-threaded
    // runtime wakes a task on the other core for every packet.
    let tunnel = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(async {
            // The client's default: the stream link (PROTOCOL.md §3.2).
            let client = connect_client(&gateway).await;
            let endpoints = Endpoints {
                client: &client,
                server,
            };
            let tunnel = endpoints.measure(Path::Tunnel).await;
            client.close().await;
            // The same stack taking datagrams (with link repair), in the same run.
            let client =
                common::connect_client_with(&gateway, |options| options.link_stream(false)).await;
            let endpoints = Endpoints {
                client: &client,
                server,
            };
            let datagrams = endpoints.measure(Path::Tunnel).await;
            client.close().await;
            (tunnel, datagrams)
        });
    let (tunnel, datagrams) = tunnel;
    let (direct, websockify, wisp) = runtime.block_on(async {
        let client = connect_client(&gateway).await;
        let endpoints = Endpoints {
            client: &client,
            server,
        };
        let direct = endpoints.measure(Path::Direct).await;
        client.close().await;
        let websockify = measure_relay(&relays, Relay::Websockify, server).await;
        let wisp = measure_relay(&relays, Relay::Wisp, server).await;
        (direct, websockify, wisp)
    });
    // The ceiling's client runs on one thread, like its server: on a multi-threaded runtime,
    // waking a task on the other core for every datagram received halves what it takes in.
    let raw = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(measure_raw(raw_server, raw_hash));
    for (name, value, unit, baseline) in [
        ("download_1flow", tunnel.download, "Mbit/s", direct.download),
        ("upload_1flow", tunnel.upload, "Mbit/s", direct.upload),
        (
            "download_8flows",
            tunnel.download_flows,
            "Mbit/s",
            direct.download_flows,
        ),
        (
            "upload_8flows",
            tunnel.upload_flows,
            "Mbit/s",
            direct.upload_flows,
        ),
        ("echo_64B_rtt_p50", tunnel.rtt_p50, "us", direct.rtt_p50),
        ("echo_64B_rtt_p99", tunnel.rtt_p99, "us", direct.rtt_p99),
    ] {
        report(
            &format!("tunnel.{name}"),
            value,
            unit,
            "plain_tcp_same_veths",
            baseline,
        );
    }
    for (name, value, unit, baseline) in [
        (
            "download_1flow",
            tunnel.download,
            "Mbit/s",
            datagrams.download,
        ),
        ("upload_1flow", tunnel.upload, "Mbit/s", datagrams.upload),
        (
            "download_8flows",
            tunnel.download_flows,
            "Mbit/s",
            datagrams.download_flows,
        ),
        ("echo_64B_rtt_p50", tunnel.rtt_p50, "us", datagrams.rtt_p50),
    ] {
        report(
            &format!("tunnel.{name}.stream_link_vs_datagrams"),
            value,
            unit,
            "webnic_datagrams_link_repair",
            baseline,
        );
    }
    for (relay, (one, many)) in [("websockify", websockify), ("wisp", wisp)] {
        report(
            &format!("tunnel.download_1flow.vs_{relay}"),
            tunnel.download,
            "Mbit/s",
            &format!("{relay}_tls"),
            one,
        );
        report(
            &format!("tunnel.download_8flows.vs_{relay}"),
            tunnel.download_flows,
            "Mbit/s",
            &format!("{relay}_tls"),
            many,
        );
    }
    // Not a ratio, so not a RESULT line: how far the baseline is from lossless, and the echo RTT
    // the tunnel adds on top of the transport (the target is ≤ 100 µs).
    println!(
        "NOTE raw_quic_datagrams loss (median-goodput run): download {:.2}%, upload {:.2}%; \
         tunnel echo RTT p50 minus raw: {:.1} us",
        raw.4,
        raw.5,
        tunnel.rtt_p50 - raw.2
    );
    for (name, value, unit, baseline) in [
        ("download_1flow", tunnel.download, "Mbit/s", raw.0),
        ("upload_1flow", tunnel.upload, "Mbit/s", raw.1),
        ("echo_64B_rtt_p50", tunnel.rtt_p50, "us", raw.2),
        ("echo_64B_rtt_p99", tunnel.rtt_p99, "us", raw.3),
    ] {
        report(
            &format!("tunnel.{name}.vs_quic"),
            value,
            unit,
            "raw_quic_datagrams",
            baseline,
        );
    }
}
