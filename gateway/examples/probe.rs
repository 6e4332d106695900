//! A minimal native client for checking a running gateway by hand.
//!
//! `cargo run -p webnic-gateway --example probe -- https://127.0.0.1:4433/webnic <hash-file>
//! [origin]` connects (pinning the certificate hash from the gateway's `--cert-hash-file`),
//! prints the control capsules, pings the gateway's own address through the tunnel, sends one
//! spoofed packet, and closes with a `Close` capsule.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use webnic_gateway::packet::internet_checksum;
use webnic_stack::protocol::{CapsuleDecoder, CloseCode, ControlMessage, PROTOCOL_VERSION};
use wtransport::endpoint::ConnectOptions;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Endpoint};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context("usage: probe URL HASH_FILE [ORIGIN]")?;
    let hash_file = args.next().context("usage: probe URL HASH_FILE [ORIGIN]")?;
    let origin = args.next();
    let hex = std::fs::read_to_string(&hash_file)?;
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex.trim()[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()?;
    let digest = Sha256Digest::new(bytes.try_into().expect("32 bytes"));
    let config = ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([digest])
        .build();
    let mut options = ConnectOptions::builder(&url);
    if let Some(origin) = origin {
        options = options.add_header("origin", origin);
    }
    let connection = match Endpoint::client(config)?.connect(options.build()).await {
        Ok(connection) => connection,
        Err(error) => {
            println!("connect failed: {error}");
            return Ok(());
        }
    };
    let (mut send, mut recv) = connection.open_bi().await?.await?;
    let mut hello = Vec::new();
    let version = std::env::var("PROBE_VERSION")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PROTOCOL_VERSION);
    ControlMessage::ClientHello { version }.emit(&mut hello);
    send.write_all(&hello).await?;

    let mut decoder = CapsuleDecoder::new();
    let mut buf = [0u8; 4096];
    let mut address = None;
    while address.is_none() {
        while let Some(message) = decoder.next_message()? {
            println!("capsule: {message:?}");
            match message {
                ControlMessage::AddressAssign(list) => address = Some(list[0].address),
                ControlMessage::Close { .. } => {
                    println!("closed: {}", connection.closed().await);
                    return Ok(());
                }
                _ => {}
            }
        }
        if address.is_some() {
            break;
        }
        match recv.read(&mut buf).await? {
            Some(n) => decoder.extend(&buf[..n]),
            None => bail!("control stream ended"),
        }
    }
    let Some(IpAddr::V4(me)) = address else {
        bail!("no IPv4 address");
    };
    // The gateway holds the first host address of the pool (assumed to be a /24 or larger).
    let gateway = std::net::Ipv4Addr::from((u32::from(me) & 0xffff_ff00) | 1);
    connection.send_datagram(echo(me, gateway))?;
    let reply = tokio::time::timeout(Duration::from_secs(3), connection.receive_datagram())
        .await
        .context("no echo reply")??;
    println!(
        "reply: {} bytes from {}.{}.{}.{} icmp type {}",
        reply.len(),
        reply[12],
        reply[13],
        reply[14],
        reply[15],
        reply[20]
    );
    connection.send_datagram(echo(std::net::Ipv4Addr::new(10, 77, 0, 250), gateway))?;
    if let Some(hold) = std::env::var("PROBE_HOLD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        // Keep the session open, printing what the gateway says (e.g. a shutdown Close).
        let _ = tokio::time::timeout(Duration::from_secs(hold), async {
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                decoder.extend(&buf[..n]);
                while let Ok(Some(message)) = decoder.next_message() {
                    println!("capsule: {message:?}");
                }
            }
            println!("closed: {}", connection.closed().await);
        })
        .await;
    }
    let mut close = Vec::new();
    ControlMessage::Close {
        code: CloseCode::Normal,
        reason: "probe done".into(),
    }
    .emit(&mut close);
    let _ = send.write_all(&close).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
    println!("done");
    Ok(())
}

fn echo(source: std::net::Ipv4Addr, destination: std::net::Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 20 + 8 + 16];
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&source.octets());
    p[16..20].copy_from_slice(&destination.octets());
    let c = internet_checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&7u16.to_be_bytes());
    p[26..28].copy_from_slice(&1u16.to_be_bytes());
    let c = internet_checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    p
}
