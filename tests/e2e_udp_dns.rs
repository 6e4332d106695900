//! End-to-end UDP and DNS through the client library: a windowed datagram echo (every datagram back
//! exactly once, intact) and name resolution through the DNS server the gateway announces.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{
    TCP_ECHO_PORT, TEST_TIMEOUT, Topology, UDP_ECHO_PORT, assert_same_bytes, connect_client,
    random_bytes, stream_exchange, within,
};

const DATAGRAMS: u32 = 1000;
const WINDOW: usize = 32;

/// 1,000 numbered datagrams of 16–1000 random bytes, at most 32 outstanding, no retransmission:
/// each sequence number must come back exactly once with its payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_1000_datagrams() {
    let topology = Topology::new();
    let _echo = topology.serve_udp_echo();
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "UDP echo", async {
        let client = connect_client(&gateway).await;
        let socket = client.udp_bind(0).await.expect("udp_bind(0)");
        assert_ne!(socket.local_addr().port(), 0, "udp_bind(0) picked no port");
        let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), UDP_ECHO_PORT);

        let sizes = random_bytes(DATAGRAMS as usize * 2);
        let payloads: Vec<Vec<u8>> = (0..DATAGRAMS)
            .map(|seq| {
                let size = 16 + usize::from(u16::from_le_bytes([sizes[seq as usize * 2], sizes[seq as usize * 2 + 1]])) % 985;
                let mut datagram = seq.to_be_bytes().to_vec();
                datagram.extend(random_bytes(size));
                datagram
            })
            .collect();

        let mut outstanding = BTreeSet::new();
        let mut received = vec![0u32; DATAGRAMS as usize];
        let mut next = 0u32;
        let mut done = 0u32;
        let mut buf = vec![0u8; 4096];
        while done < DATAGRAMS {
            while outstanding.len() < WINDOW && next < DATAGRAMS {
                socket.send_to(&payloads[next as usize], remote).await.expect("send_to");
                outstanding.insert(next);
                next += 1;
            }
            let (len, from) = match tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf)).await {
                Ok(result) => result.expect("recv_from"),
                Err(_) => {
                    let missing: Vec<_> = outstanding.iter().collect();
                    let metrics: String = gateway
                        .metrics_text()
                        .lines()
                        .filter(|line| !line.starts_with('#') && !line.ends_with(" 0"))
                        .map(|line| format!("{line}\n"))
                        .collect();
                    let sockets = topology.srv_exec(&["ss", "-uanpm"]);
                    // The servers this test started (not the whole host's process list).
                    let parent = std::process::id().to_string();
                    let processes = topology.srv_exec(&[
                        "ps", "-o", "pid,ppid,stat,etimes,args", "--ppid", &parent,
                    ]);
                    let nstat = topology.srv_exec(&["nstat", "-az", "Udp*"]);
                    panic!(
                        "no echo within 5 s after {done} datagrams; outstanding (lost, never retransmitted): \
                         {missing:?}\nclient stats: {:?}\ngateway metrics (non-zero):\n{metrics}\n\
                         server sockets:\n{}\nserver processes:\n{}\nserver UDP counters:\n{}\n{}",
                        client.stats(),
                        String::from_utf8_lossy(&sockets.stdout),
                        String::from_utf8_lossy(&processes.stdout),
                        String::from_utf8_lossy(&nstat.stdout),
                        gateway.process.logs()
                    );
                }
            };
            assert_eq!(from, remote, "datagram from an unexpected sender");
            assert!(len >= 4, "short datagram ({len} bytes)");
            let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
            assert!(seq < next, "echo of a sequence number never sent: {seq}");
            received[seq as usize] += 1;
            assert_eq!(received[seq as usize], 1, "sequence number {seq} came back twice");
            assert!(buf[..len] == payloads[seq as usize][..], "payload of {seq} differs ({len} bytes)");
            outstanding.remove(&seq);
            done += 1;
        }
        assert_eq!(received.iter().filter(|&&c| c == 1).count(), DATAGRAMS as usize);
        let stats = client.stats();
        assert!(stats.packets_sent >= u64::from(DATAGRAMS), "{stats:?}");
        assert!(stats.packets_received >= u64::from(DATAGRAMS), "{stats:?}");
        client.close().await;
    })
    .await;
}

/// The client learns the DNS server from the gateway and resolves A and AAAA records through it;
/// a name that does not exist is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_resolution_through_the_tunnel() {
    let topology = Topology::new();
    let dnsmasq = topology.serve_dnsmasq();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "DNS", async {
        let client = connect_client(&gateway).await;
        assert!(client.mtu() >= 576, "implausible MTU {}", client.mtu());
        let dns = client.dns_servers();
        assert!(
            dns.contains(&IpAddr::V4(topology.srv_ipv4())),
            "announced DNS servers {dns:?} lack {}",
            topology.srv_ipv4()
        );
        let v4 = client
            .resolve_ipv4("web.test")
            .await
            .unwrap_or_else(|e| panic!("resolve_ipv4(web.test): {e}\n{}", dnsmasq.logs()));
        assert_eq!(v4, vec![topology.srv_ipv4()]);
        let v6 = client
            .resolve_ipv6("web.test")
            .await
            .unwrap_or_else(|e| panic!("resolve_ipv6(web.test): {e}\n{}", dnsmasq.logs()));
        assert_eq!(v6, vec![topology.srv_ipv6()]);
        let echo = client
            .resolve_ipv4("echo.test")
            .await
            .expect("resolve_ipv4(echo.test)");
        assert_eq!(echo, vec![topology.srv_ipv4()]);
        let missing = within(
            Duration::from_secs(30),
            "resolving a missing name",
            client.resolve_ipv4("nope.test"),
        )
        .await;
        assert!(missing.is_err(), "nope.test resolved to {missing:?}");

        // Connecting by name resolves through the tunnel too.
        let stream = client
            .tcp_connect_host("echo.test", TCP_ECHO_PORT)
            .await
            .unwrap_or_else(|e| panic!("tcp_connect_host(echo.test): {e}\n{}", dnsmasq.logs()));
        assert_eq!(stream.peer_addr().ip(), IpAddr::V4(topology.srv_ipv4()));
        let data = random_bytes(64 << 10);
        let echoed = stream_exchange(stream, data.clone())
            .await
            .expect("echo via echo.test");
        assert_same_bytes(&echoed, &data, "echo via echo.test");
        client.close().await;
    })
    .await;
}
