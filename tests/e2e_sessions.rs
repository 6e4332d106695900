//! End-to-end tests of several sessions on one gateway: isolation of two clients, and the address
//! pool (exhaustion refuses new sessions, closing one returns its address).

mod common;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{
    TCP_ECHO_PORT, TEST_TIMEOUT, Topology, assert_same_bytes, connect_client, random_bytes,
    tcp_exchange, within,
};

const IN_USE_V4: &str = "webnic_pool_addresses_in_use{family=\"ipv4\"}";
const FREE_V4: &str = "webnic_pool_addresses_free{family=\"ipv4\"}";
const REFUSED_EXHAUSTED: &str = "webnic_refused_sessions_total{reason=\"pool_exhausted\"}";

/// Two clients get distinct addresses; traffic for one never reaches the other; both can transfer
/// at the same time, each byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_are_isolated_and_concurrent() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
    within(TEST_TIMEOUT, "two clients", async {
        let a = connect_client(&gateway).await;
        let b = connect_client(&gateway).await;
        let (a4, b4) = (
            a.ipv4().expect("A has no IPv4"),
            b.ipv4().expect("B has no IPv4"),
        );
        assert_ne!(a4, b4, "both clients got {a4}");
        if let (Some(a6), Some(b6)) = (a.ipv6(), b.ipv6()) {
            assert_ne!(a6, b6, "both clients got {a6}");
        }

        // B idles while A transfers: B receives nothing.
        let b_before = b.stats();
        let data = random_bytes(1 << 20);
        let echoed = tcp_exchange(&a, remote, data.clone())
            .await
            .expect("A's echo");
        assert_same_bytes(&echoed, &data, "A's echo");
        let b_after = b.stats();
        assert_eq!(
            b_after.packets_received, b_before.packets_received,
            "idle client B received packets during A's transfer: {b_before:?} → {b_after:?}"
        );

        // Both at once, distinct data.
        let (data_a, data_b) = (random_bytes(1 << 20), random_bytes(1 << 20));
        let (echo_a, echo_b) = tokio::join!(
            tcp_exchange(&a, remote, data_a.clone()),
            tcp_exchange(&b, remote, data_b.clone())
        );
        assert_same_bytes(
            &echo_a.expect("A's concurrent echo"),
            &data_a,
            "A concurrent",
        );
        assert_same_bytes(
            &echo_b.expect("B's concurrent echo"),
            &data_b,
            "B concurrent",
        );
        a.close().await;
        b.close().await;
    })
    .await;
}

/// A /29 pool has 5 client addresses: the sixth session is refused (and counted), the others keep
/// working, and closing one frees its address for a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_refuses_and_close_returns_the_address() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&["--pool-v4", "10.77.0.0/29"]);
    let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
    within(TEST_TIMEOUT, "pool exhaustion", async {
        let free = gateway.metric(FREE_V4);
        assert_eq!(
            free, 5.0,
            "a /29 minus network, broadcast and the gateway's .1 leaves 5"
        );
        assert_eq!(gateway.metric(IN_USE_V4), 0.0);

        let mut clients = Vec::new();
        for _ in 0..5 {
            clients.push(connect_client(&gateway).await);
        }
        let addresses: HashSet<_> = clients
            .iter()
            .map(|c| c.ipv4().expect("no IPv4 assigned"))
            .collect();
        assert_eq!(addresses.len(), 5, "addresses not distinct: {addresses:?}");
        tokio::task::block_in_place(|| {
            gateway.wait_metric(IN_USE_V4, Duration::from_secs(10), |v| v == 5.0)
        });
        assert_eq!(gateway.metric(FREE_V4), 0.0);

        let options = webnic::ConnectOptions::new(gateway.url()).cert_hash(gateway.cert_hash());
        let refused = within(
            Duration::from_secs(30),
            "connect to an exhausted pool",
            webnic::Client::connect(options),
        )
        .await;
        assert!(
            refused.is_err(),
            "a sixth session got an address from a /29: {:?}",
            refused.map(|c| c.ipv4())
        );
        tokio::task::block_in_place(|| {
            gateway.wait_metric(REFUSED_EXHAUSTED, Duration::from_secs(10), |v| v >= 1.0)
        });

        // Existing sessions are unaffected.
        let data = random_bytes(64 << 10);
        let echoed = tcp_exchange(&clients[0], remote, data.clone())
            .await
            .expect("echo on an existing session");
        assert_same_bytes(&echoed, &data, "existing session");

        // Closing one returns its address.
        let closed = clients.pop().unwrap();
        closed.close().await;
        tokio::task::block_in_place(|| {
            gateway.wait_metric(IN_USE_V4, Duration::from_secs(15), |v| v == 4.0)
        });
        let fresh = connect_client(&gateway).await;
        assert!(fresh.ipv4().is_some());
        let data = random_bytes(64 << 10);
        let echoed = tcp_exchange(&fresh, remote, data.clone())
            .await
            .expect("echo on the new session");
        assert_same_bytes(&echoed, &data, "new session");
        tokio::task::block_in_place(|| {
            gateway.wait_metric(IN_USE_V4, Duration::from_secs(10), |v| v == 5.0)
        });

        fresh.close().await;
        for client in clients {
            client.close().await;
        }
    })
    .await;
}
