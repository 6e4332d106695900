//! The transport's ceiling: raw QUIC datagrams between the client's namespace and the gateway
//! namespace's veth address, through the same WebTransport/quinn layers and buffer sizes as
//! webnic, with no tunnel. Shared by the `tunnel` and `impaired` benches (included with
//! `#[path]`, next to `common`).

use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{Topology, in_netns, within};

/// Limit of one transfer: a stalled transfer fails the bench instead of hanging it.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
/// Echo exchanges not counted, then counted.
const ECHO_WARMUP: usize = 100;
const ECHO_COUNT: usize = 2000;
/// Bytes of one echo message.
const MESSAGE: usize = 64;

/// The `p` quantile of `sorted`, in µs.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// The datagram server's port on the gateway namespace's veth address (next to the gateway's).
pub(crate) const RAW_PORT: u16 = 4434;
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
pub(crate) fn start_raw_server(topology: &Topology) -> wtransport::tls::Sha256Digest {
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

/// Raw datagram download and upload goodput (Mbit/s of payload delivered, median of `runs`
/// transfers of `transfer` bytes), echo RTT p50/p99 (µs), and the loss of the median-goodput
/// download and upload run (%).
pub(crate) async fn measure_raw(
    server: SocketAddr,
    hash: wtransport::tls::Sha256Digest,
    transfer: usize,
    runs: usize,
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
    let count = (transfer / size) as u64;
    let mut down = Vec::new();
    let mut up = Vec::new();
    for _ in 0..runs {
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
