//! The relays users run today, as baselines for webnic: websockify (PyPI) and the Wisp server of
//! `@mercuryworkshop/wisp-js` (npm), both installed by `scripts/bench-relays-install.sh` and run
//! in the gateway's namespace (where webnic's gateway runs), both over TLS (websockify's
//! `--cert`/`--key`; wisp-js through `wisp-tls-server.mjs`, node's HTTPS server around wisp-js's
//! own request router). Their clients run natively in the bench process, like webnic's client:
//! a WebSocket (fastwebsockets) for websockify, the `wisp-mux` crate for Wisp.
//!
//! Every download is checked: its length and the sha256 of what arrived against the same prefix
//! of the served bytes. A download may be cut at a deadline (a cell of `benches/impaired.rs`
//! is bounded in time); then the prefix that arrived must still be byte-exact.
// Each bench includes this file and uses only part of it.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use fastwebsockets::{FragmentCollector, FragmentCollectorRead, OpCode, Role, WebSocket};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;
use wisp_mux::{ClientMux, StreamType};

use crate::common::{Process, Topology, find_command, in_netns};

/// Where `scripts/bench-relays-install.sh` put the relays: `$WEBNIC_RELAYS_DIR`, else
/// `target/bench-relays` of this checkout. Panics with how to install them when missing.
fn install_dir() -> PathBuf {
    let dir = std::env::var_os("WEBNIC_RELAYS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-relays"),
        PathBuf::from,
    );
    assert!(
        dir.join("venv/bin/websockify").is_file()
            && dir
                .join("node_modules/@mercuryworkshop/wisp-js/package.json")
                .is_file(),
        "the relays are not installed in {}: run scripts/bench-relays-install.sh \
         (scripts/bench.sh does)",
        dir.display()
    );
    dir
}

/// A TLS or plain TCP stream to a relay.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What one download delivered: bytes, and the sha256 of those bytes when asked for.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    pub(crate) len: usize,
    pub(crate) sha256: Option<String>,
}

impl Received {
    /// Panics unless this is byte-exact `data` (or, when `partial_ok`, a byte-exact prefix of
    /// it: a download cut at its deadline).
    #[track_caller]
    pub(crate) fn check(&self, data: &[u8], partial_ok: bool, what: &str) {
        if partial_ok {
            assert!(
                self.len <= data.len(),
                "{what}: {} bytes, more than sent",
                self.len
            );
        } else {
            assert_eq!(self.len, data.len(), "{what}: length differs");
        }
        let expected = hex(&Sha256::digest(&data[..self.len]));
        assert_eq!(
            self.sha256.as_deref(),
            Some(expected.as_str()),
            "{what}: sha256 of {} bytes differs",
            self.len
        );
    }
}

/// Counts (and when asked, hashes) a download's bytes.
#[derive(Debug)]
struct Counter {
    len: usize,
    hasher: Option<Sha256>,
}

impl Counter {
    fn new(hash: bool) -> Self {
        Self {
            len: 0,
            hasher: hash.then(Sha256::new),
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        if let Some(hasher) = &mut self.hasher {
            hasher.update(bytes);
        }
    }

    fn finish(self) -> Received {
        Received {
            len: self.len,
            sha256: self.hasher.map(|h| hex(&h.finalize())),
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `stream` to its end (or to `deadline`) through `counter`.
pub(crate) async fn read_all<S: AsyncRead + Unpin>(
    mut stream: S,
    hash: bool,
    deadline: Option<Instant>,
) -> Received {
    let mut counter = Counter::new(hash);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let read = stream.read(&mut buf);
        let n = match deadline {
            Some(deadline) => {
                match tokio::time::timeout_at(deadline.into(), read).await {
                    Ok(n) => n,
                    // Cut at the deadline: what arrived so far is the figure.
                    Err(_) => break,
                }
            }
            None => read.await,
        }
        .expect("download read");
        if n == 0 {
            break;
        }
        counter.take(&buf[..n]);
    }
    counter.finish()
}

/// A thread per connection in the server namespace, each writing `data` then, when
/// `half_close`, half-closing, and draining until the peer closes.
///
/// Wisp downloads need `half_close` false: wisp-mux 5.1.0's `MuxStream::read` returns `None` as
/// soon as the server's CLOSE packet has been processed, dropping data still queued for the
/// stream (seen here: 128 KiB short of 16 MiB). So the Wisp client reads the known length and
/// then closes, and the server must not close first.
pub(crate) fn serve_download(topology: &Topology, port: u16, data: Arc<Vec<u8>>, half_close: bool) {
    let listener = in_netns(&topology.srv_ns(), move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind the download server in the server ns")
    });
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let data = Arc::clone(&data);
            thread::spawn(move || {
                // A client cut at its deadline resets the connection: not an error here.
                if stream.write_all(&data).is_ok() {
                    if half_close {
                        let _ = stream.shutdown(std::net::Shutdown::Write);
                    }
                    let mut buf = [0u8; 4096];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                }
            });
        }
    });
}

/// The two relays, running in the gateway's namespace, and what their clients need.
pub(crate) struct Relays {
    address: IpAddr,
    /// websockify's listening port per target port on the server.
    websockify: Vec<(u16, u16)>,
    wisp_port: u16,
    tls: tokio_rustls::TlsConnector,
    _processes: Vec<Process>,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relays")
            .field("address", &self.address)
            .field("websockify", &self.websockify)
            .field("wisp_port", &self.wisp_port)
            .finish_non_exhaustive()
    }
}

impl Relays {
    /// Starts one websockify per `(listen port, server port)` in `websockify` (websockify
    /// forwards each listener to one target) and one Wisp server on `wisp_port`, all on the
    /// gateway's veth address, with a fresh self-signed certificate for that address.
    pub(crate) fn start(topology: &Topology, websockify: &[(u16, u16)], wisp_port: u16) -> Self {
        let dir = install_dir();
        let address = IpAddr::V4(topology.gw_addr());
        let identity =
            wtransport::Identity::self_signed([address.to_string()]).expect("self-signed identity");
        let certificate = &identity.certificate_chain().as_slice()[0];
        let cert_path = topology.tmp().join("relay-cert.pem");
        let key_path = topology.tmp().join("relay-key.pem");
        std::fs::write(&cert_path, certificate.to_pem()).expect("write the relay certificate");
        std::fs::write(&key_path, identity.private_key().to_secret_pem())
            .expect("write the relay key");
        let (cert, key) = (
            cert_path.to_str().expect("utf-8 path"),
            key_path.to_str().expect("utf-8 path"),
        );

        let mut processes = Vec::new();
        let server = topology.srv_ipv4();
        let websockify_bin = dir.join("venv/bin/websockify");
        for &(listen, target) in websockify {
            let process = topology.spawn_in(
                &topology.gw_ns(),
                "websockify",
                &[
                    websockify_bin.to_str().expect("utf-8 path"),
                    "--cert",
                    cert,
                    "--key",
                    key,
                    "--ssl-only",
                    &format!("{address}:{listen}"),
                    &format!("{server}:{target}"),
                ],
                Vec::new(),
            );
            topology.wait_listening(&topology.gw_ns(), "tcp", listen, &process);
            processes.push(process);
        }
        // node resolves the wrapper's import from the wrapper's own directory: it must sit next
        // to the installed node_modules.
        let wrapper = dir.join("wisp-tls-server.mjs");
        std::fs::copy(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/relays/wisp-tls-server.mjs"),
            &wrapper,
        )
        .expect("copy wisp-tls-server.mjs next to node_modules");
        let node = find_command("node").expect("node (scripts/bench-relays-install.sh needs it)");
        let process = topology.spawn_in(
            &topology.gw_ns(),
            "wisp-js-server",
            &[
                node.to_str().expect("utf-8 path"),
                wrapper.to_str().expect("utf-8 path"),
                &address.to_string(),
                &wisp_port.to_string(),
                cert,
                key,
                r#"{"allow_private_ips":true}"#,
            ],
            Vec::new(),
        );
        topology.wait_listening(&topology.gw_ns(), "tcp", wisp_port, &process);
        processes.push(process);

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                certificate.der().to_vec(),
            ))
            .expect("relay certificate as a root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Self {
            address,
            websockify: websockify.to_vec(),
            wisp_port,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            _processes: processes,
        }
    }

    /// A TLS connection to `port` on the relays' address, upgraded to a WebSocket.
    async fn websocket(&self, port: u16) -> WebSocket<Box<dyn Stream>> {
        let tcp = tokio::net::TcpStream::connect(SocketAddr::new(self.address, port))
            .await
            .expect("connect to the relay");
        tcp.set_nodelay(true).expect("nodelay");
        let name = rustls::pki_types::ServerName::IpAddress(self.address.into());
        let mut stream: Box<dyn Stream> = Box::new(
            self.tls
                .connect(name, tcp)
                .await
                .expect("TLS handshake with the relay"),
        );
        // The HTTP/1.1 upgrade (RFC 6455 §4.1). Read byte by byte up to the blank line: the
        // server's first frame may follow in the same segment and must stay in the stream.
        let request = format!(
            "GET / HTTP/1.1\r\nHost: {}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.address
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("upgrade request");
        let mut response = Vec::new();
        while !response.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream
                .read_exact(&mut byte)
                .await
                .expect("upgrade response");
            response.push(byte[0]);
            assert!(response.len() < 8192, "upgrade response too long");
        }
        assert!(
            response.starts_with(b"HTTP/1.1 101"),
            "relay refused the WebSocket upgrade: {}",
            String::from_utf8_lossy(&response)
        );
        let mut ws = WebSocket::after_handshake(stream, Role::Client);
        ws.set_auto_pong(true);
        ws.set_auto_close(true);
        ws
    }

    /// One download through websockify from the server port it forwards to (`target`).
    pub(crate) async fn websockify_download(
        &self,
        target: u16,
        hash: bool,
        deadline: Option<Instant>,
    ) -> Received {
        let &(listen, _) = self
            .websockify
            .iter()
            .find(|(_, t)| *t == target)
            .expect("no websockify forwards to that port");
        let mut ws = FragmentCollector::new(self.websocket(listen).await);
        let mut counter = Counter::new(hash);
        loop {
            let read = ws.read_frame();
            let frame = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline.into(), read).await {
                    Ok(frame) => frame,
                    Err(_) => break,
                },
                None => read.await,
            }
            .expect("websockify frame");
            match frame.opcode {
                OpCode::Binary => counter.take(&frame.payload),
                // websockify closes the WebSocket once the server has closed its side.
                OpCode::Close => break,
                other => panic!("unexpected {other:?} frame from websockify"),
            }
        }
        counter.finish()
    }

    /// A Wisp (v1) connection to the Wisp server; its multiplexer runs in a task of its own.
    pub(crate) async fn wisp(&self) -> ClientMux {
        let ws = self.websocket(self.wisp_port).await;
        let (rx, tx) = ws.split(tokio::io::split);
        let (mux, driver) = ClientMux::create(FragmentCollectorRead::new(rx), tx, None)
            .await
            .expect("Wisp handshake")
            .with_no_required_extensions();
        tokio::spawn(driver);
        mux
    }

    /// One download of `len` bytes over a new stream of `mux` from `target` (a
    /// server that does not close first: see [`serve_download`]).
    pub(crate) async fn wisp_download(
        mux: &ClientMux,
        target: SocketAddr,
        len: usize,
        hash: bool,
        deadline: Option<Instant>,
    ) -> Received {
        let stream = mux
            .client_new_stream(StreamType::Tcp, target.ip().to_string(), target.port())
            .await
            .expect("Wisp stream");
        let mut counter = Counter::new(hash);
        while counter.len < len {
            let read = stream.read();
            let payload = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline.into(), read).await {
                    Ok(payload) => payload,
                    Err(_) => break,
                },
                None => read.await,
            };
            // `None`: the server closed the stream (the target closed its side).
            let Some(payload) = payload else { break };
            counter.take(&payload);
        }
        counter.finish()
    }
}

/// Which relay a download goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Relay {
    /// One WebSocket (over its own TLS connection) per flow.
    Websockify,
    /// One Wisp stream per flow, all multiplexed over one WebSocket over one TLS connection.
    Wisp,
}

impl Relay {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Websockify => "websockify",
            Self::Wisp => "wisp",
        }
    }
}

/// What `flows` concurrent downloads delivered.
#[derive(Clone, Debug)]
pub(crate) struct FlowsResult {
    /// Goodput of all flows together: bytes over the wall time from before the flows opened
    /// until the last one ended (or the limit).
    pub(crate) mbit: f64,
    pub(crate) flows: Vec<Received>,
    /// Whether the limit cut the transfer short.
    pub(crate) cut: bool,
}

impl Relays {
    /// `flows` concurrent downloads from `target` (a server address and port) through `relay`, each flow in its own
    /// task, bounded by `limit` when given. Wisp flows read `len` bytes from a server that does
    /// not close first ([`serve_download`]); websockify flows read until the server closes. The Wisp connection is set up before the clock
    /// starts (a page keeps one open); websockify's per-flow TLS connections are inside it,
    /// because that is what each new flow costs there.
    pub(crate) async fn download_flows(
        self: &Arc<Self>,
        relay: Relay,
        target: SocketAddr,
        flows: usize,
        len: usize,
        hash: bool,
        limit: Option<std::time::Duration>,
    ) -> FlowsResult {
        let mux = match relay {
            Relay::Wisp => Some(Arc::new(self.wisp().await)),
            Relay::Websockify => None,
        };
        let start = Instant::now();
        let deadline = limit.map(|limit| start + limit);
        let tasks: Vec<_> = (0..flows)
            .map(|_| {
                let relays = Arc::clone(self);
                let mux = mux.clone();
                tokio::spawn(async move {
                    match mux {
                        Some(mux) => Self::wisp_download(&mux, target, len, hash, deadline).await,
                        None => {
                            relays
                                .websockify_download(target.port(), hash, deadline)
                                .await
                        }
                    }
                })
            })
            .collect();
        let mut received = Vec::with_capacity(flows);
        for task in tasks {
            received.push(task.await.expect("relay download task"));
        }
        let elapsed = start.elapsed();
        if let Some(mux) = mux {
            // Best effort: the mux may already have ended with its streams.
            let _ = mux.close().await;
        }
        let total: usize = received.iter().map(|r| r.len).sum();
        FlowsResult {
            mbit: total as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
            flows: received,
            cut: deadline.is_some_and(|deadline| Instant::now() >= deadline),
        }
    }
}
