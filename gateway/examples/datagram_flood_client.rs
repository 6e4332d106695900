//! A native receiver for `datagram_echo`'s `FLOOD`: how fast the echo server's datagram flood
//! arrives without a browser, to tell a sender limit from a Chromium limit in the browser
//! benchmark's raw datagram download figure (`scripts/bench-browser.sh`).
//!
//! `cargo run --release -p webnic-gateway --example datagram_flood_client -- \
//!   https://127.0.0.1:4434/echo HASH_FILE [COUNT] [SIZE]` prints datagrams/s (first to last)
//! and how many of COUNT (default 20000) arrived.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Endpoint};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let usage = "usage: datagram_flood_client URL HASH_FILE [COUNT] [SIZE]";
    let mut args = std::env::args().skip(1);
    let url = args.next().context(usage)?;
    let hex = std::fs::read_to_string(args.next().context(usage)?)?;
    let count: u32 = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let size: usize = args.next().map_or(Ok(1100), |a| a.parse())?;
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex.trim()[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()?;
    let digest = Sha256Digest::new(bytes.try_into().expect("32 bytes"));
    let config = ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([digest])
        .build();
    let connection = Endpoint::client(config)?.connect(&url).await?;
    connection.send_datagram(format!("FLOOD {count} {size}").into_bytes())?;
    let mut received = 0u32;
    let mut first = None;
    let mut last = Instant::now();
    while received < count {
        match tokio::time::timeout(Duration::from_secs(1), connection.receive_datagram()).await {
            Ok(Ok(_)) => {
                last = Instant::now();
                first.get_or_insert(last);
                received += 1;
            }
            Ok(Err(error)) => {
                println!("connection: {error}");
                break;
            }
            Err(_) => break,
        }
    }
    let seconds = first.map_or(0.0, |f| (last - f).as_secs_f64());
    let rate = if seconds > 0.0 {
        f64::from(received - 1) / seconds
    } else {
        0.0
    };
    println!(
        "received {received} of {count} datagrams of {size} bytes: {rate:.0}/s ({:.1} MB/s)",
        rate * size as f64 / 1e6
    );
    Ok(())
}
