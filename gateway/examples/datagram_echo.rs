//! A raw WebTransport datagram echo server: the browser benchmark's ceiling
//! (`scripts/bench-browser.sh`). A page's datagrams come straight back, with the same
//! wtransport/quinn layers and datagram buffer sizes as the gateway but no TUN, no stack and no
//! policy, so the page's echo rate here is what any WebTransport tunnel can reach in this browser.
//!
//! `cargo run --release -p webnic-gateway --example datagram_echo -- 10.200.1.1:4434 HASH_FILE`
//! listens, writes the self-signed certificate's sha256 (hex) to `HASH_FILE` once ready, and echoes
//! every datagram of every session on any path. A datagram `FLOOD <count> <size>` instead starts
//! a one-way flood of `count` datagrams of `size` bytes to that session (the download ceiling),
//! paced by QUIC's datagram send buffer so none is dropped here; `STREAM <bytes>` writes that
//! many bytes on a unidirectional stream to the session (the stream link's ceiling).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use wtransport::{Endpoint, Identity, ServerConfig};

/// Datagram buffers as the gateway's (`server.rs`).
const DATAGRAM_BUFFER: usize = 1 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: datagram_echo LISTEN_ADDR HASH_FILE";
    let listen: SocketAddr = args.next().context(usage)?.parse()?;
    let hash_file = args.next().context(usage)?;
    let identity = Identity::self_signed([
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        listen.ip().to_string(),
    ])?;
    let hash = identity.certificate_chain().as_slice()[0].hash();
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut transport = wtransport::quinn::TransportConfig::default();
    transport
        .datagram_receive_buffer_size(Some(DATAGRAM_BUFFER))
        .datagram_send_buffer_size(DATAGRAM_BUFFER);
    let config = ServerConfig::builder()
        .with_bind_address(listen)
        .with_custom_transport(identity, transport)
        .build();
    let endpoint = Endpoint::server(config)?;
    std::fs::write(&hash_file, &hex)?;
    println!("datagram echo on {listen}, certificate sha256 {hex}");
    loop {
        let incoming = endpoint.accept().await;
        tokio::spawn(async move {
            let Ok(request) = incoming.await else { return };
            let Ok(connection) = request.accept().await else {
                return;
            };
            // One reader per session (wtransport's receive path is a capacity-1 channel).
            while let Ok(datagram) = connection.receive_datagram().await {
                if let Some(bytes) = stream_request(&datagram.payload()) {
                    let connection = connection.clone();
                    tokio::spawn(async move { stream(&connection, bytes).await });
                    continue;
                }
                if let Some((count, size)) = flood_request(&datagram.payload()) {
                    let connection = connection.clone();
                    tokio::spawn(async move { flood(&connection, count, size).await });
                    continue;
                }
                // send_datagram copies and drops the oldest queued ones when the buffer is full:
                // an echo may lose datagrams, which the page counts.
                if connection.send_datagram(datagram.payload()).is_err() {
                    break;
                }
            }
        });
    }
}

/// `FLOOD <count> <size>` → (count, size), size capped at 1200 bytes.
fn flood_request(payload: &[u8]) -> Option<(u32, usize)> {
    let text = std::str::from_utf8(payload).ok()?.strip_prefix("FLOOD ")?;
    let mut words = text.split_whitespace();
    let count = words.next()?.parse().ok()?;
    let size: usize = words.next()?.parse().ok()?;
    Some((count, size.clamp(4, 1200)))
}

/// Sends `count` datagrams of `size` bytes (a big-endian sequence number first), waiting while
/// QUIC's datagram send buffer is nearly full: `send_datagram` would drop the oldest instead.
async fn flood(connection: &wtransport::Connection, count: u32, size: usize) {
    let mut payload = vec![0u8; size];
    for seq in 0..count {
        while connection.quic_connection().datagram_send_buffer_space() < 4 * size {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        if connection.send_datagram(&payload[..]).is_err() {
            return;
        }
    }
}

/// `STREAM <bytes>` → bytes, at most 1 GiB.
fn stream_request(payload: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(payload).ok()?.strip_prefix("STREAM ")?;
    text.trim().parse().ok().filter(|&n| n <= 1 << 30)
}

/// Writes `bytes` on a new unidirectional stream, 64 KiB per write, then finishes it.
async fn stream(connection: &wtransport::Connection, bytes: usize) {
    let Ok(opening) = connection.open_uni().await else {
        return;
    };
    let Ok(mut stream) = opening.await else {
        return;
    };
    let chunk = vec![0x5a; 64 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        if stream.write_all(&chunk[..n]).await.is_err() {
            return;
        }
        left -= n;
    }
    let _ = stream.finish().await;
}
