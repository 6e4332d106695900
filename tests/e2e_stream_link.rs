//! The stream link (docs/PROTOCOL.md §3.2) from a client written against the protocol alone
//! (wtransport, no webnic client library): after `LINK_STREAM` the gateway sends the client's
//! packets on a unidirectional stream, framed; a client that stops reading that stream has its
//! session closed as a protocol violation, and another session on the gateway carries on. The
//! client's own packets may go on an uplink stream the same way.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{TEST_TIMEOUT, Topology, UDP_ECHO_PORT, connect_client_with, udp_packet, within};
use webnic_stack::link_stream::Deframer;
use webnic_stack::protocol::{CapsuleDecoder, CloseCode, ControlMessage, PROTOCOL_VERSION};

const STREAM_SESSIONS: &str = "webnic_link_stream_sessions_total";
/// Our UDP port for the echoes.
const PORT: u16 = 40_000;

/// The gateway closed `connection` as a protocol violation (within 10 s).
async fn assert_closed_as_protocol_violation(connection: &wtransport::Connection) {
    let closed = within(
        Duration::from_secs(10),
        "session close",
        connection.closed(),
    )
    .await;
    match closed {
        wtransport::error::ConnectionError::ApplicationClosed(close) => assert_eq!(
            close.code().into_inner(),
            u64::from(CloseCode::ProtocolViolation.to_u32()),
            "{close:?}"
        ),
        other => panic!("the session ended otherwise: {other:?}"),
    }
}

/// Another session on the gateway is unaffected: its UDP echo comes back.
async fn assert_bystander_carries_on(bystander: webnic::Client, server: Ipv4Addr) {
    let socket = bystander.udp_bind(0).await.expect("bind");
    let remote = SocketAddr::new(IpAddr::V4(server), UDP_ECHO_PORT);
    socket.send_to(b"still here", remote).await.expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = within(
        Duration::from_secs(10),
        "bystander echo",
        socket.recv_from(&mut buf),
    )
    .await
    .expect("recv");
    assert_eq!((&buf[..n], from), (&b"still here"[..], remote));
    bystander.close().await;
}

/// A raw WebTransport session to the gateway.
async fn connect_raw(gateway: &common::GatewayProcess) -> wtransport::Connection {
    common::wtransport_client(gateway)
        .connect(gateway.url())
        .await
        .expect("WebTransport session")
}

/// Sends the hello with `LINK_STREAM` and reads the configuration: our IPv4 address.
async fn hello(
    connection: &wtransport::Connection,
) -> (wtransport::SendStream, wtransport::RecvStream, Ipv4Addr) {
    hello_asking(connection, true).await
}

/// [`hello`], asking for the stream link only if `link_stream`.
async fn hello_asking(
    connection: &wtransport::Connection,
    link_stream: bool,
) -> (wtransport::SendStream, wtransport::RecvStream, Ipv4Addr) {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .expect("open control stream")
        .await
        .expect("control stream");
    let mut capsules = Vec::new();
    ControlMessage::ClientHello {
        version: PROTOCOL_VERSION,
    }
    .emit(&mut capsules);
    if link_stream {
        ControlMessage::LinkStream { max_packet: 0 }.emit(&mut capsules);
    }
    send.write_all(&capsules).await.expect("write hello");
    let mut decoder = CapsuleDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(message) = decoder.next_message().expect("valid capsules") {
            if let ControlMessage::AddressAssign(addresses) = message {
                let v4 = addresses.iter().find_map(|a| match a.address {
                    IpAddr::V4(v4) => Some(v4),
                    IpAddr::V6(_) => None,
                });
                return (send, recv, v4.expect("an IPv4 address"));
            }
        }
        let n = recv
            .read(&mut buf)
            .await
            .expect("read configuration")
            .expect("configuration before the end of the stream");
        decoder.extend(&buf[..n]);
    }
}

/// Reads frames from the stream link until a whole packet is there.
async fn next_packet(stream: &mut wtransport::RecvStream, deframer: &mut Deframer) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(packet) = deframer.next_packet().expect("valid framing") {
            return packet.to_vec();
        }
        let n = within(
            Duration::from_secs(10),
            "stream link read",
            stream.read(&mut buf),
        )
        .await
        .expect("read stream link")
        .expect("the stream link ended");
        deframer.extend(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_link_carries_packets_and_a_stopped_stream_ends_only_its_session() {
    let topology = Topology::new();
    let _echo = topology.serve_udp_echo();
    let gateway = topology.start_gateway(&[]);
    let server = topology.srv_ipv4();
    within(TEST_TIMEOUT, "stream link", async {
        // A bystander on datagrams, to show the misbehaving session hurts no one else.
        let bystander = connect_client_with(&gateway, |options| options.link_stream(false)).await;

        let connection = connect_raw(&gateway).await;
        let (_send, _recv, address) = hello(&connection).await;
        let mut stream = None;
        let mut deframer = Deframer::new();
        for i in 0..20u8 {
            let payload = [i; 300];
            let packet = udp_packet(address, server, PORT, UDP_ECHO_PORT, &payload);
            connection.send_datagram(&packet).expect("send datagram");
            if stream.is_none() {
                // The gateway opens the stream at the first packet it has for us.
                stream = Some(
                    within(
                        Duration::from_secs(10),
                        "accept stream",
                        connection.accept_uni(),
                    )
                    .await
                    .expect("the gateway's stream link"),
                );
            }
            let reply = next_packet(stream.as_mut().expect("stream"), &mut deframer).await;
            assert_eq!(reply[0] >> 4, 4, "an IPv4 packet");
            assert_eq!(reply[9], 17, "UDP");
            assert_eq!(&reply[12..16], &server.octets(), "from the echo server");
            assert_eq!(&reply[16..20], &address.octets(), "to us");
            assert_eq!(&reply[28..], &payload[..], "echo {i} came back byte-exact");
        }
        assert_eq!(gateway.metric(STREAM_SESSIONS), 1.0);

        // Stop reading the stream: the gateway's next write fails, and it closes the session
        // as a protocol violation.
        stream.expect("stream").stop(0u32.into());
        let packet = udp_packet(address, server, PORT, UDP_ECHO_PORT, b"after stop");
        connection.send_datagram(&packet).expect("send datagram");
        assert_closed_as_protocol_violation(&connection).await;

        assert_bystander_carries_on(bystander, server).await;
    })
    .await;
}

/// The uplink: packets the client writes on its own unidirectional stream, framed, reach the
/// network like datagrams (the UDP echoes come back byte-exact, counted as uplink packets). A
/// frame of length 0 breaks the framing: the gateway closes that session as a protocol
/// violation, and a bystander session carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_stream_carries_packets_and_broken_framing_ends_only_its_session() {
    let topology = Topology::new();
    let _echo = topology.serve_udp_echo();
    let gateway = topology.start_gateway(&[]);
    let server = topology.srv_ipv4();
    within(TEST_TIMEOUT, "uplink stream", async {
        let bystander = connect_client_with(&gateway, |options| options.link_stream(false)).await;
        let connection = connect_raw(&gateway).await;
        let (_send, _recv, address) = hello(&connection).await;
        // The uplink follows the gateway's stream (PROTOCOL.md §3.2): one echo as a datagram
        // first, whose reply opens that stream.
        connection
            .send_datagram(udp_packet(address, server, PORT, UDP_ECHO_PORT, b"first"))
            .expect("send datagram");
        let mut downlink = within(
            Duration::from_secs(10),
            "accept stream",
            connection.accept_uni(),
        )
        .await
        .expect("the gateway's stream link");
        let mut deframer = Deframer::new();
        let reply = next_packet(&mut downlink, &mut deframer).await;
        assert_eq!(&reply[28..], b"first");
        let mut uplink = connection
            .open_uni()
            .await
            .expect("open the uplink stream")
            .await
            .expect("uplink stream");
        for i in 0..20u8 {
            let payload = [i; 700];
            let mut framed = Vec::new();
            webnic_stack::link_stream::put_frame(
                &mut framed,
                &udp_packet(address, server, PORT, UDP_ECHO_PORT, &payload),
            );
            // Written a byte at a time for the first: frames may be split anywhere.
            if i == 0 {
                for byte in &framed {
                    uplink.write_all(&[*byte]).await.expect("write uplink");
                }
            } else {
                uplink.write_all(&framed).await.expect("write uplink");
            }
            let reply = next_packet(&mut downlink, &mut deframer).await;
            assert_eq!(&reply[28..], &payload[..], "echo {i} came back byte-exact");
        }
        assert_eq!(gateway.metric("webnic_uplink_stream_packets_total"), 20.0);

        // A zero-length frame: the session is closed as a protocol violation.
        uplink.write_all(&[0, 0]).await.expect("write uplink");
        assert_closed_as_protocol_violation(&connection).await;
        assert!(gateway.metric("webnic_dropped_packets_total{reason=\"malformed\"}") >= 1.0);

        assert_bystander_carries_on(bystander, server).await;
    })
    .await;
}

/// Streams the gateway does not read cannot make it buffer without bound: a client that opens
/// unidirectional streams beside its session and fills them is held by the connection's receive
/// window (4 MiB, all streams together) well before the ≈ 7 MiB quinn's per-stream windows
/// alone would let in, and its session still works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_client_streams_are_bounded_by_the_connection_window() {
    const CHUNK: usize = 64 << 10;
    let topology = Topology::new();
    let _echo = topology.serve_udp_echo();
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "unread streams", async {
        let connection = connect_raw(&gateway).await;
        // Without the stream link: no stream of the client's is the uplink, none is read.
        let (_send, _recv, address) = hello_asking(&connection, false).await;
        let chunk = vec![0xa5u8; CHUNK];
        let mut accepted = 0usize;
        let mut streams = Vec::new();
        // Four streams (the gateway allows eight, HTTP/3 and WebTransport take some), each written
        // until a chunk stays blocked for 500 ms (flow control): 5 MB by quinn's per-stream
        // windows alone.
        for _ in 0..4 {
            let mut stream = within(Duration::from_secs(10), "open a stream", async {
                connection
                    .open_uni()
                    .await
                    .expect("open a stream")
                    .await
                    .expect("stream")
            })
            .await;
            for _ in 0..(2 << 20) / CHUNK {
                match tokio::time::timeout(Duration::from_millis(500), stream.write_all(&chunk))
                    .await
                {
                    Ok(Ok(())) => accepted += CHUNK,
                    Ok(Err(error)) => panic!("the gateway refused a stream: {error}"),
                    Err(_) => break,
                }
            }
            streams.push(stream);
        }
        // quinn accepts a write only within the peer's flow-control credit.
        println!("{accepted} bytes written into unread streams");
        assert!(
            accepted <= (4 << 20) + CHUNK,
            "{accepted} bytes went into streams the gateway does not read"
        );
        assert!(
            accepted >= 1 << 20,
            "flow control stopped the client early: {accepted}"
        );
        // The session itself is unaffected: a UDP echo still comes back.
        let server = topology.srv_ipv4();
        let packet = udp_packet(address, server, PORT, UDP_ECHO_PORT, b"after");
        let mut echoed = false;
        // UDP may be lost on the way; a few tries, each waiting a second for the echo.
        for _ in 0..5 {
            connection.send_datagram(&packet).expect("send datagram");
            if let Ok(Ok(datagram)) =
                tokio::time::timeout(Duration::from_secs(1), connection.receive_datagram()).await
            {
                echoed = datagram.payload().ends_with(b"after");
                break;
            }
        }
        assert!(echoed, "the session stopped working");
        drop(streams);
    })
    .await;
}

/// A gateway run with `--no-link-stream` ignores the request: the client's packets keep coming as
/// datagrams, and no stream is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_the_stream_link_keeps_to_datagrams() {
    let topology = Topology::new();
    let _echo = topology.serve_udp_echo();
    let gateway = topology.start_gateway(&["--no-link-stream"]);
    let server = topology.srv_ipv4();
    within(TEST_TIMEOUT, "no stream link", async {
        let connection = connect_raw(&gateway).await;
        let (_send, _recv, address) = hello(&connection).await;
        let payload = [0x5a; 300];
        let packet = udp_packet(address, server, PORT, UDP_ECHO_PORT, &payload);
        let mut reply = None;
        // UDP may be lost on the way; a few tries, each waiting a second for the echo.
        for _ in 0..5 {
            connection.send_datagram(&packet).expect("send datagram");
            if let Ok(datagram) =
                tokio::time::timeout(Duration::from_secs(1), connection.receive_datagram()).await
            {
                reply = Some(datagram.expect("datagram").payload().to_vec());
                break;
            }
        }
        let reply = reply.expect("the echo came back as a datagram");
        assert_eq!(&reply[28..], &payload[..], "byte-exact echo");
        let stream =
            tokio::time::timeout(Duration::from_millis(500), connection.accept_uni()).await;
        assert!(stream.is_err(), "the gateway opened a stream anyway");
        assert_eq!(gateway.metric(STREAM_SESSIONS), 0.0);
    })
    .await;
}
