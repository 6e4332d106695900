//! End-to-end TCP through the client library: bulk echo over IPv4 and IPv6, and inbound connections
//! to a listener on the client's tunnel address.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{
    TCP_ECHO_PORT, TEST_TIMEOUT, Topology, assert_same_bytes, connect_client, connect_client_with,
    random_bytes, sha256_hex, stream_exchange, tcp_exchange, wait_exit, within,
};

/// 32 MiB each way through the socat echo: written by one task, read concurrently, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_32_mib_ipv4() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "32 MiB TCP echo", async {
        let client = connect_client(&gateway).await;
        assert!(
            client.ipv4().is_some(),
            "the gateway assigned no IPv4 address"
        );
        let data = random_bytes(32 << 20);
        let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
        let echoed = tcp_exchange(&client, remote, data.clone())
            .await
            .unwrap_or_else(|e| panic!("echo via {remote}: {e}\n{}", gateway.process.logs()));
        assert_same_bytes(&echoed, &data, "32 MiB echo");
        let stats = client.stats();
        assert!(stats.bytes_sent >= data.len() as u64, "{stats:?}");
        assert!(stats.bytes_received >= data.len() as u64, "{stats:?}");
        // The client's default downlink is the stream link, and the gateway's TUN offload
        // passed the echo server's TSO bursts on whole: fewer packets than 32 MiB cut at the
        // link MTU (1112 bytes of TCP payload each) would be.
        assert_eq!(
            stats.link_stream_packets, stats.packets_received,
            "{stats:?}"
        );
        assert!(
            stats.packets_received < (32 << 20) / 1112,
            "not coalesced: {stats:?}"
        );
        assert!(gateway.metric("webnic_coalesced_to_client_total") > 0.0);
        // And the client's own packets went on its uplink stream: 32 MiB is over 30,000
        // segments of 1112 bytes (a few packets go as datagrams before the stream opens).
        let uplink = gateway.metric("webnic_uplink_stream_packets_total");
        assert!(
            uplink > 0.95 * f64::from((32 << 20) / 1112),
            "only {uplink} packets came on the uplink stream: {stats:?}"
        );
        client.close().await;
    })
    .await;
}

/// 1 MiB echo to the server's IPv6 address, with the client on datagrams: the gateway cuts the
/// coalesced TCP packets its TUN hands over into link-MTU segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_1_mib_ipv6() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "IPv6 TCP echo", async {
        let client = connect_client_with(&gateway, |options| options.link_stream(false)).await;
        let local_v6 = client
            .ipv6()
            .expect("the gateway assigned no IPv6 address (pool fd00:77::/112)");
        let data = random_bytes(1 << 20);
        let remote = SocketAddr::new(IpAddr::V6(topology.srv_ipv6()), TCP_ECHO_PORT);
        let stream = client
            .tcp_connect(remote)
            .await
            .unwrap_or_else(|e| panic!("connect {remote}: {e}\n{}", gateway.process.logs()));
        assert_eq!(stream.peer_addr(), remote);
        assert_eq!(stream.local_addr().ip(), IpAddr::V6(local_v6));
        let echoed = stream_exchange(stream, data.clone())
            .await
            .expect("IPv6 echo");
        assert_same_bytes(&echoed, &data, "IPv6 echo");
        assert_eq!(client.stats().link_stream_packets, 0);
        assert_eq!(gateway.metric("webnic_uplink_stream_packets_total"), 0.0);
        assert!(
            gateway.metric("webnic_tun_segments_total")
                > gateway.metric("webnic_tun_coalesced_packets_total"),
            "no coalesced packet was cut into segments:\n{}",
            gateway.metrics_text()
        );
        client.close().await;
    })
    .await;
}

/// A TCP listener on the client: the server namespace connects to the client's pool address, sends
/// 1 MiB (client checks it), then a second connection receives 1 MiB from the client (server checks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_tcp_to_client_listener() {
    const PORT: u16 = 7000;
    let topology = Topology::new();
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "inbound TCP", async {
        let client = connect_client(&gateway).await;
        let client_ip = client.ipv4().expect("no IPv4 address assigned");
        let listener = client.tcp_listen(PORT).await.expect("tcp_listen");
        assert_eq!(listener.local_addr().port(), PORT);

        // Server → client.
        let upload = random_bytes(1 << 20);
        let upload_path = topology.tmp().join("upload.bin");
        std::fs::write(&upload_path, &upload).unwrap();
        let sender = topology.spawn_in(
            &topology.srv_ns(),
            "socat-upload",
            &[
                "socat",
                "-u",
                &format!("FILE:{}", upload_path.display()),
                &format!("TCP:{client_ip}:{PORT}"),
            ],
            Vec::new(),
        );
        let (stream, peer) = within(Duration::from_secs(30), "accept", listener.accept())
            .await
            .unwrap_or_else(|e| panic!("accept: {e}\n{}", sender.logs()));
        assert_eq!(peer.ip(), IpAddr::V4(topology.srv_ipv4()));
        let received = stream_exchange(stream, Vec::new())
            .await
            .expect("read inbound stream");
        assert_same_bytes(&received, &upload, "server → client");
        let status = tokio::task::block_in_place(|| wait_exit(&sender, Duration::from_secs(30)));
        assert_eq!(status, "exit code 0", "{}", sender.logs());

        // Client → server: socat connects, reads to EOF into a file.
        let download = random_bytes(1 << 20);
        let download_path = topology.tmp().join("download.bin");
        let receiver = topology.spawn_in(
            &topology.srv_ns(),
            "socat-download",
            &[
                "socat",
                "-u",
                &format!("TCP:{client_ip}:{PORT}"),
                &format!("CREATE:{}", download_path.display()),
            ],
            Vec::new(),
        );
        let (stream, _) = within(Duration::from_secs(30), "second accept", listener.accept())
            .await
            .unwrap_or_else(|e| panic!("accept: {e}\n{}", receiver.logs()));
        let echoed = stream_exchange(stream, download.clone())
            .await
            .expect("write to inbound stream");
        assert!(echoed.is_empty(), "socat -u sent data back");
        let status = tokio::task::block_in_place(|| wait_exit(&receiver, Duration::from_secs(30)));
        assert_eq!(status, "exit code 0", "{}", receiver.logs());
        let written = std::fs::read(&download_path).expect("socat output file");
        assert_eq!(
            sha256_hex(&written),
            sha256_hex(&download),
            "client → server"
        );
        client.close().await;
    })
    .await;
}
