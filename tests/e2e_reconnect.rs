//! TCP connections that survive losing the QUIC connection. The TCP state lives in the client's
//! stack and the address belongs to the session, so when the connection dies the client resumes
//! the session on a new one with the gateway's ticket, gets the same addresses back, and its
//! open TCP connections carry on. Two ways to lose the connection mid-transfer:
//! - the path goes dark for longer than the idle timeout (the impairment relay drops everything),
//!   so both ends declare the connection dead;
//! - the gateway process restarts (SIGTERM, then a new process with the same certificate and
//!   `--lease-file`).
//!
//! In both, an 8 MiB echo through socat completes byte-exact and the client counts one resume.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::{
    TCP_ECHO_PORT, Topology, assert_same_bytes, restartable_gateway_args, seeded_bytes,
    start_relay, tcp_exchange, wait_exit, within,
};
use webnic_impair::Relay;

/// Starts an echo of `len` seeded bytes through the socat echo in the background and returns once
/// `relay` has carried 200 packets of it to the client: the transfer is under way, not finished.
async fn echo_under_way(
    topology: &Topology,
    client: &webnic::Client,
    relay: &Relay,
    seed: u64,
    len: usize,
) -> (Vec<u8>, tokio::task::JoinHandle<std::io::Result<Vec<u8>>>) {
    let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
    let data = seeded_bytes(seed, len);
    let transfer = {
        let (client, data) = (client.clone(), data.clone());
        tokio::spawn(async move { tcp_exchange(&client, remote, data).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.stats().down.delivered_original < 200 {
        assert!(Instant::now() < deadline, "the transfer never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !transfer.is_finished(),
        "the transfer ended before the test acted"
    );
    (data, transfer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_survives_the_connection_timing_out() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&["--idle-timeout", "1"]);
    // 50 Mbit/s keeps the 8 MiB echo going for a few seconds.
    let (relay, url) = start_relay(&gateway, "rate=50mbit,queue=50ms", 21).await;
    within(Duration::from_secs(120), "resume after a timeout", async {
        let client = webnic::Client::connect(
            webnic::ConnectOptions::new(url).cert_hash(gateway.cert_hash()),
        )
        .await
        .expect("connect");
        let address = client.ipv4();
        let (data, transfer) = echo_under_way(&topology, &client, &relay, 21, 8 << 20).await;
        // Four seconds of nothing: both ends' 1 s idle timeout fires.
        relay.black_out(Duration::from_secs(4));
        let cut = Instant::now();
        let echoed = transfer.await.expect("task").unwrap_or_else(|e| {
            panic!(
                "transfer across a lost connection: {e}\nrelay {:?}\n{}",
                relay.stats(),
                gateway.process.logs()
            )
        });
        assert_same_bytes(&echoed, &data, "8 MiB echo across a lost connection");
        let stats = client.stats();
        println!(
            "8 MiB echo byte-exact; finished {:.1} s after the path died; reconnects {}; {:?}",
            cut.elapsed().as_secs_f64(),
            stats.reconnects,
            relay.stats()
        );
        // One reconnect for the blackout; a loaded machine may stall a 1 s idle timeout into
        // another, which must resume the same way: one gateway session per connection, and
        // the address kept throughout.
        assert!(stats.reconnects >= 1, "{}", gateway.process.logs());
        assert_eq!(client.ipv4(), address);
        assert_eq!(
            gateway.metric("webnic_sessions_total"),
            1.0 + stats.reconnects as f64
        );
        // The resumed session is a normal one: it closes and frees its address.
        client.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_survives_a_gateway_restart() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let (args, leases) = restartable_gateway_args(topology.tmp());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = topology.start_gateway(&args);
    let (relay, url) = start_relay(&gateway, "rate=50mbit,queue=50ms", 22).await;
    let hash = gateway.cert_hash().to_owned();
    within(Duration::from_secs(120), "resume after a restart", async {
        let client =
            webnic::Client::connect(webnic::ConnectOptions::new(url).cert_hash(hash.clone()))
                .await
                .expect("connect");
        let address = client.ipv4();
        let (data, transfer) = echo_under_way(&topology, &client, &relay, 22, 8 << 20).await;

        // SIGTERM: the gateway tells its sessions it is going down, parks their leases and
        // writes them to the lease file; a new process with the same certificate reads them.
        tokio::task::block_in_place(|| {
            gateway.process.kill();
            assert!(
                wait_exit(&gateway.process, Duration::from_secs(15)).contains("exit"),
                "{}",
                gateway.process.logs()
            );
        });
        let saved = std::fs::read_to_string(&leases).expect("lease file written on shutdown");
        let own = address.expect("IPv4 address").to_string();
        assert!(saved.contains(&own), "lease file lacks {own}: {saved}");
        let restarted = tokio::task::block_in_place(|| topology.start_gateway(&args));
        assert_eq!(restarted.cert_hash(), hash, "the certificate changed");
        let cut = Instant::now();

        let echoed = transfer.await.expect("task").unwrap_or_else(|e| {
            panic!(
                "transfer across a gateway restart: {e}\n{}",
                restarted.process.logs()
            )
        });
        assert_same_bytes(&echoed, &data, "8 MiB echo across a gateway restart");
        let stats = client.stats();
        println!(
            "8 MiB echo byte-exact across a gateway restart; finished {:.1} s after the new \
             gateway was ready; reconnects {}",
            cut.elapsed().as_secs_f64(),
            stats.reconnects
        );
        assert_eq!(stats.reconnects, 1, "{}", restarted.process.logs());
        assert_eq!(client.ipv4(), address);
        assert!(
            restarted.process.logs().contains("restored session leases"),
            "{}",
            restarted.process.logs()
        );
        client.close().await;
    })
    .await;
}

/// A gateway killed with SIGKILL leaves its nftables table behind and its clients without a
/// goodbye. A new gateway on the same host starts anyway (it replaces the stale table instead of
/// adding a second one), and a client of the killed one resumes on it with the lease from the
/// lease file and the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_sigkill_cleans_up_and_resumes() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let (mut args, leases) = restartable_gateway_args(topology.tmp());
    args.extend(["--nat", "--idle-timeout", "2"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = topology.start_gateway(&args);
    let hash = gateway.cert_hash().to_owned();
    let webnic_tables = |what: &str| {
        let tables = String::from_utf8_lossy(&topology.gw_exec(&["nft", "list", "tables"]).stdout)
            .into_owned();
        let count = tables.lines().filter(|l| l.contains("webnic_")).count();
        println!("{what}: {count} webnic tables\n{tables}");
        count
    };
    let installed = webnic_tables("running");
    assert!(installed >= 1, "--nat installed no table");
    within(Duration::from_secs(120), "restart after SIGKILL", async {
        let client = webnic::Client::connect(
            webnic::ConnectOptions::new(gateway.url()).cert_hash(hash.clone()),
        )
        .await
        .expect("connect");
        let address = client.ipv4();
        let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
        // Let the lease reach the file (written at most a second after it changes).
        let own = address.expect("IPv4").to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&leases).is_ok_and(|t| t.contains(&own)) {
            assert!(
                Instant::now() < deadline,
                "the lease never reached the file"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(gateway.process.pid() as libc::pid_t, libc::SIGKILL) };
        tokio::task::block_in_place(|| {
            let status = wait_exit(&gateway.process, Duration::from_secs(10));
            assert!(status.contains("signal 9"), "{status}");
        });
        assert_eq!(
            webnic_tables("after SIGKILL"),
            installed,
            "the stale table is gone?"
        );
        let restarted = tokio::task::block_in_place(|| topology.start_gateway(&args));
        assert_eq!(
            webnic_tables("restarted"),
            installed,
            "stale table duplicated"
        );

        // The old client notices the dead connection (2 s idle timeout), resumes, and works.
        let data = seeded_bytes(23, 1 << 20);
        let echoed = tcp_exchange(&client, remote, data.clone())
            .await
            .unwrap_or_else(|e| {
                panic!("echo after the restart: {e}\n{}", restarted.process.logs())
            });
        assert_same_bytes(&echoed, &data, "echo through the restarted gateway");
        assert_eq!(client.stats().reconnects, 1, "{}", restarted.process.logs());
        assert_eq!(client.ipv4(), address);
        client.close().await;
    })
    .await;
}

/// `--drain-timeout`: on SIGTERM the gateway refuses new sessions (code 1, counted as `draining`),
/// tells its clients, lets a transfer in progress finish byte-exact, and exits as soon as the last
/// session has ended — long before the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_sessions_and_lets_existing_ones_finish() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&["--drain-timeout", "30", "--resume-grace", "0"]);
    let (relay, url) = start_relay(&gateway, "rate=8mbit,queue=50ms", 24).await;
    within(Duration::from_secs(90), "drain", async {
        let options = webnic::ConnectOptions::new(url).cert_hash(gateway.cert_hash());
        let client = webnic::Client::connect(options.clone())
            .await
            .expect("connect");
        let (data, transfer) = echo_under_way(&topology, &client, &relay, 24, 4 << 20).await;
        let drain_started = Instant::now();
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(gateway.process.pid() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.gateway_draining() {
            assert!(Instant::now() < deadline, "the client was never told");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match webnic::Client::connect(options).await {
            Ok(_) => panic!("a draining gateway admitted a new session"),
            Err(error) => assert!(
                error.to_string().contains("shutting down"),
                "refusal should carry code 1 (shutdown): {error}"
            ),
        }
        assert!(
            !transfer.is_finished(),
            "the transfer ended before the drain was checked"
        );
        let echoed = transfer
            .await
            .expect("task")
            .expect("transfer during the drain");
        assert_same_bytes(&echoed, &data, "4 MiB echo finished during the drain");
        client.close().await;
        let status =
            tokio::task::block_in_place(|| wait_exit(&gateway.process, Duration::from_secs(15)));
        println!(
            "drained and exited ({status}) {:.1} s after SIGTERM (deadline 30 s)",
            drain_started.elapsed().as_secs_f64()
        );
        assert!(
            status.contains("exit"),
            "{status}\n{}",
            gateway.process.logs()
        );
        assert!(drain_started.elapsed() < Duration::from_secs(25));
        let logs = gateway.process.logs();
        assert!(logs.contains("reason=\"draining\""), "{logs}");
        assert!(logs.contains("drained: every session ended"), "{logs}");
    })
    .await;
}
