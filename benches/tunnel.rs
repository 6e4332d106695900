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
#[path = "support/raw_quic.rs"]
mod raw_quic;
#[path = "relays/mod.rs"]
mod relays;
#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Topology, connect_client, in_netns, run, seeded_bytes, sha256_hex, within};
use raw_quic::{RAW_PORT, measure_raw, percentile, start_raw_server};
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
        .block_on(measure_raw(raw_server, raw_hash, TRANSFER, RUNS));
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
