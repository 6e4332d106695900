//! The whole tunnel: native client (this process, root namespace) → QUIC over a veth → the
//! release `webnic-gateway` in its namespace → TUN → a server in the server namespace. Single-flow
//! download and upload goodput and 64-byte echo RTT (p50, p99), each next to the same measurement
//! over plain TCP along the same veth path without the tunnel (root → gateway namespace routing
//! → server), taken in the same run.
//!
//! Needs root and `target/release/webnic-gateway` (`cargo build --release --bins`;
//! `scripts/bench.sh` does both). Transfers are seconds long, so this bench times them itself
//! (median of `RUNS`) instead of letting criterion repeat them hundreds of times.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::{Topology, connect_client, in_netns, run, seeded_bytes, sha256_hex, within};
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
const SEED: u64 = 0x7e57;
/// Limit of one transfer: a stalled tunnel fails the bench instead of hanging it.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the servers in the server namespace: threads accepting on listeners created there
/// (a socket stays in the namespace it was created in).
fn start_servers(topology: &Topology) {
    let listeners: Vec<(u16, TcpListener)> = in_netns(&topology.srv_ns(), || {
        [DOWNLOAD_PORT, UPLOAD_PORT, UPLOAD_HASH_PORT, ECHO_PORT]
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
        DOWNLOAD_PORT => {
            stream.write_all(data)?;
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

struct Endpoints<'a> {
    client: &'a webnic::Client,
    server: IpAddr,
}

impl Endpoints<'_> {
    async fn measure(&self, path: Path) -> (f64, f64, f64, f64) {
        let data = seeded_bytes(SEED, TRANSFER);
        let expected = sha256_hex(&data);
        let at = |port| SocketAddr::new(self.server, port);
        macro_rules! connect {
            ($port:expr) => {
                async {
                    match path {
                        Path::Tunnel => Box::new(
                            self.client
                                .tcp_connect(at($port))
                                .await
                                .expect("tunnel connect"),
                        ) as Box<dyn Stream>,
                        Path::Direct => {
                            let s = tokio::net::TcpStream::connect(at($port))
                                .await
                                .expect("direct connect");
                            s.set_nodelay(true).expect("nodelay");
                            Box::new(s) as Box<dyn Stream>
                        }
                    }
                }
            };
        }
        // Checked once, byte-exact, both ways.
        let (len, hash) = within(TRANSFER_TIMEOUT, "download check", async {
            download(connect!(DOWNLOAD_PORT).await, true).await
        })
        .await;
        assert_eq!(len, TRANSFER, "{path:?} download length");
        assert_eq!(
            hash.as_deref(),
            Some(expected.as_str()),
            "{path:?} download"
        );
        let (count, hash) = within(TRANSFER_TIMEOUT, "upload check", async {
            upload(connect!(UPLOAD_HASH_PORT).await, &data).await
        })
        .await;
        assert_eq!(count, TRANSFER as u64, "{path:?} upload length");
        assert_eq!(hash, expected, "{path:?} upload");

        let mut down = Vec::new();
        let mut up = Vec::new();
        for _ in 0..RUNS {
            let stream = connect!(DOWNLOAD_PORT).await;
            let start = Instant::now();
            let (len, _) = within(TRANSFER_TIMEOUT, "download", download(stream, false)).await;
            down.push(mbit(len, start.elapsed()));
            assert_eq!(len, TRANSFER);
            let stream = connect!(UPLOAD_PORT).await;
            let start = Instant::now();
            let (count, _) = within(TRANSFER_TIMEOUT, "upload", upload(stream, &data)).await;
            up.push(mbit(TRANSFER, start.elapsed()));
            assert_eq!(count, TRANSFER as u64);
        }
        let rtts = within(TRANSFER_TIMEOUT, "echo", echo(connect!(ECHO_PORT).await)).await;
        (
            median(down),
            median(up),
            percentile(&rtts, 0.5),
            percentile(&rtts, 0.99),
        )
    }
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let server = IpAddr::V4(topology.srv_ipv4());
    let (tunnel, direct) = runtime.block_on(async {
        let client = connect_client(&gateway).await;
        let endpoints = Endpoints {
            client: &client,
            server,
        };
        let tunnel = endpoints.measure(Path::Tunnel).await;
        let direct = endpoints.measure(Path::Direct).await;
        client.close().await;
        (tunnel, direct)
    });
    report(
        "tunnel.download_1flow",
        tunnel.0,
        "Mbit/s",
        "plain_tcp_same_veths",
        direct.0,
    );
    report(
        "tunnel.upload_1flow",
        tunnel.1,
        "Mbit/s",
        "plain_tcp_same_veths",
        direct.1,
    );
    report(
        "tunnel.echo_64B_rtt_p50",
        tunnel.2,
        "us",
        "plain_tcp_same_veths",
        direct.2,
    );
    report(
        "tunnel.echo_64B_rtt_p99",
        tunnel.3,
        "us",
        "plain_tcp_same_veths",
        direct.3,
    );
}
