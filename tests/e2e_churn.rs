//! Churn: sessions opened and ended over and over, three ways — a graceful close, a client that
//! drops its session without closing it, and a `webnic` process killed with SIGKILL (its session
//! ends by the gateway's idle timeout). Afterwards every object the gateway created is gone: the
//! address pool is full again, no session is active, the gateway's file descriptors are back to
//! their count before the churn, the QUIC endpoint holds no connection, and its live heap and
//! resident memory, measured when it is quiet after the first half (warm-up) and again after the
//! second, stayed flat.
//!
//! CI runs 4,000 cycles. The long run (docs/RELIABILITY.md) sets `WEBNIC_CHURN_CYCLES=100000`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TCP_ECHO_PORT, Topology, connect_client, tcp_exchange, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Parallel workers; each runs its share of the cycles one after another.
const WORKERS: u64 = 8;
/// One cycle in this many kills a `webnic` process with SIGKILL.
const KILL_EVERY: u64 = 50;
/// Idle timeout of the test's gateway: a killed client's session ends after this.
const IDLE_TIMEOUT_SECS: u64 = 2;
/// Grace period of a lost session's addresses (then they return to the pool).
const RESUME_GRACE_SECS: u64 = 3;

fn cycles() -> u64 {
    std::env::var("WEBNIC_CHURN_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the gateway's /proc/PID/fd")
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_sessions_return_every_resource() {
    let total = cycles();
    let topology = Arc::new(Topology::new());
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = Arc::new(
        // All cycles come from one address: lift the per-address admission limits (the churn is
        // the point here; tests/e2e_admission.rs covers the limits).
        topology.start_gateway(&[
            "--idle-timeout",
            &IDLE_TIMEOUT_SECS.to_string(),
            "--session-rate",
            "0",
            "--max-sessions-per-address",
            "0",
            // A killed client's lease is parked for resumption this long after its idle timeout.
            "--resume-grace",
            &RESUME_GRACE_SECS.to_string(),
            // Masquerading makes the kernel track every flow of the pool: the table must not keep
            // the flows of sessions that are gone.
            "--nat",
        ]),
    );
    let pid = gateway.process.pid();
    let pool_free =
        |g: &common::GatewayProcess| g.metric("webnic_pool_addresses_free{family=\"ipv4\"}");
    let free_at_start = pool_free(&gateway);
    let fds_at_start = fd_count(pid);
    let tasks_at_start = gateway.metric("webnic_runtime_tasks_alive");
    let established_at_start = established_pool_flows(&topology);
    let conntrack_at_start = conntrack_count(&topology);
    let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);

    let done = Arc::new(AtomicU64::new(0));
    let killed = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let failed_connects = Arc::new(AtomicU64::new(0));
    // RSS at every tenth of the run (for the report: while sessions are open it counts them and
    // the ones waiting out their idle timeout, so it depends on the rate), and the figures the
    // test asserts on: RSS when the gateway is quiet again after the first half (warm-up) and
    // after the second.
    let rss_samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut rss_quiet = Vec::new();
    // The live heap at the same points (the allocator's count of bytes in live allocations):
    // what a leak grows, whatever the allocator keeps resident besides.
    let mut heap_quiet = Vec::new();
    let started = Instant::now();
    let limit = Duration::from_secs(120 + total / 20);
    for phase in [0..total / 2, total / 2..total] {
        within(limit, "churn", async {
            let mut workers = Vec::new();
            for worker in 0..WORKERS {
                let (topology, gateway, phase) =
                    (Arc::clone(&topology), Arc::clone(&gateway), phase.clone());
                let failed_connects = Arc::clone(&failed_connects);
                let (done, killed, dropped, rss) = (
                    Arc::clone(&done),
                    Arc::clone(&killed),
                    Arc::clone(&dropped),
                    Arc::clone(&rss_samples),
                );
                workers.push(tokio::spawn(async move {
                    let mut cycle = phase.start + worker;
                    while cycle < phase.end {
                        if cycle % KILL_EVERY == KILL_EVERY - 1 {
                            kill_a_cli_session(&topology, &gateway, remote).await;
                            killed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let client = match webnic::Client::connect(
                                webnic::ConnectOptions::new(gateway.url())
                                    .cert_hash(gateway.cert_hash()),
                            )
                            .await
                            {
                                Ok(client) => client,
                                Err(first) => {
                                    // Once 1 in 500-2,000 handshakes under load was closed by the
                                    // gateway's HTTP/3 layer (261/263, vendor/wtransport patch 1).
                                    // Retried so the run goes on and reports them all; none may
                                    // happen.
                                    eprintln!(
                                        "cycle {cycle}: connect failed, retrying once: {first}"
                                    );
                                    failed_connects.fetch_add(1, Ordering::Relaxed);
                                    connect_client(&gateway).await
                                }
                            };
                            if cycle % 10 == 0 {
                                let data = vec![cycle as u8; 64];
                                let echoed = tcp_exchange(&client, remote, data.clone())
                                    .await
                                    .unwrap_or_else(|e| panic!("echo in cycle {cycle}: {e}"));
                                assert_eq!(echoed, data, "echo in cycle {cycle}");
                            }
                            if cycle % 2 == 0 {
                                client.close().await;
                            } else {
                                // Gone without a close: the gateway must notice on its own.
                                drop(client);
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if n % (total / 10).max(1) == 0 {
                            rss.lock().unwrap().push((n, rss_kib(pid)));
                        }
                        cycle += WORKERS;
                    }
                }));
            }
            for worker in workers {
                worker.await.expect("churn worker");
            }
        })
        .await;
        // Every session ends: the dropped ones and the killed ones by the idle timeout at the
        // latest, and their addresses return after the grace period.
        let deadline =
            Instant::now() + Duration::from_secs((IDLE_TIMEOUT_SECS + RESUME_GRACE_SECS) * 3 + 10);
        while (gateway.metric("webnic_sessions_active") > 0.0
            || pool_free(&gateway) < free_at_start)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        // The gateway hands free memory back to the kernel once a second after sessions end.
        std::thread::sleep(Duration::from_millis(2_500));
        rss_quiet.push(rss_kib(pid));
        heap_quiet.push(gateway.metric("webnic_heap_in_use_bytes"));
    }
    let churn_time = started.elapsed();

    let samples = rss_samples.lock().unwrap().clone();
    let (rss_warm, rss_end) = (rss_quiet[0], rss_quiet[1]);
    let (heap_warm, heap_end) = (heap_quiet[0], heap_quiet[1]);
    // The gateway deletes ended sessions' conntrack entries in the background (child processes,
    // which hold file descriptors while they run).
    let settle = Instant::now() + Duration::from_secs(60);
    while gateway.metric("webnic_conntrack_deletions_pending") > 0.0 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(200));
    }
    let conntrack_pending = gateway.metric("webnic_conntrack_deletions_pending");
    // The metrics requests above are served on their own connections, closed a moment later.
    let settle = Instant::now() + Duration::from_secs(3);
    let mut fds_end = fd_count(pid);
    while fds_end != fds_at_start && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
        fds_end = fd_count(pid);
    }
    let established_end = established_pool_flows(&topology);
    let mut tasks_end = gateway.metric("webnic_runtime_tasks_alive");
    let settle = Instant::now() + Duration::from_secs(5);
    while tasks_end != tasks_at_start && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(100));
        tasks_end = gateway.metric("webnic_runtime_tasks_alive");
    }
    // Closed connections wait out their draining period (3 PTOs, milliseconds on this path); the
    // gauge is sampled once a second.
    let mut quic_end = gateway.metric("webnic_quic_connections");
    let settle = Instant::now() + Duration::from_secs(5);
    while quic_end != 0.0 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(200));
        quic_end = gateway.metric("webnic_quic_connections");
    }
    let conntrack_end = conntrack_count(&topology);
    let conntrack_deleted = gateway.metric("webnic_conntrack_entries_deleted_total");
    let report = format!(
        "{total} cycles in {:.1} s ({} graceful, {} dropped without close, {} SIGKILLed): \
         pool free {} → {}, sessions active {}, fds {fds_at_start} → {fds_end}, runtime tasks \
         {tasks_at_start} → {tasks_end}, QUIC connections held {quic_end}, RSS after warm-up \
         {rss_warm} KiB → {rss_end} KiB (while running: {samples:?}), live heap after warm-up \
         {heap_warm} → {heap_end} bytes; connects that failed and \
         were retried: {}; conntrack: established pool flows {established_at_start} → \
         {established_end}, all entries {conntrack_at_start} → {conntrack_end} (closed flows \
         wait out TIME_WAIT), deleted by the gateway {conntrack_deleted}, deletions pending \
         {conntrack_pending}",
        churn_time.as_secs_f64(),
        total - killed.load(Ordering::Relaxed) - dropped.load(Ordering::Relaxed),
        dropped.load(Ordering::Relaxed),
        killed.load(Ordering::Relaxed),
        free_at_start,
        pool_free(&gateway),
        gateway.metric("webnic_sessions_active"),
        failed_connects.load(Ordering::Relaxed),
    );
    println!("{report}");
    assert_eq!(gateway.metric("webnic_sessions_active"), 0.0, "{report}");
    assert!(
        failed_connects.load(Ordering::Relaxed) == 0,
        "connects failed: {report}"
    );
    assert_eq!(pool_free(&gateway), free_at_start, "{report}");
    assert_eq!(fds_end, fds_at_start, "{report}");
    assert!(tasks_at_start > 0.0, "{report}");
    assert_eq!(tasks_end, tasks_at_start, "{report}");
    assert_eq!(quic_end, 0.0, "{report}");
    // Every killed client left one established flow; the gateway deleted them all.
    assert_eq!(established_end, established_at_start, "{report}");
    assert!(
        conntrack_deleted >= killed.load(Ordering::Relaxed) as f64,
        "{report}"
    );
    assert_eq!(
        gateway.metric("webnic_conntrack_delete_failures_total"),
        0.0,
        "{report}"
    );
    assert!(rss_warm > 0 && heap_warm > 0.0, "{report}");
    // A leaked session holds its QUIC connection's state, tens of KiB. The live heap may grow a
    // little for good reasons (the IPv6 pool's quarantine queue takes 16 bytes per released
    // address until its limit); 256 bytes per cycle would still catch one leaked session in 40.
    let heap_per_cycle = (heap_end - heap_warm) / (total - total / 2) as f64;
    assert!(
        heap_per_cycle <= 256.0,
        "the live heap grew {heap_per_cycle:.0} bytes per cycle after warm-up: {report}"
    );
    // RSS also holds what glibc's allocator keeps of the freed memory: measured at 4,000-12,000
    // cycles, the live heap stays within 0.15 MB while the allocator's free bytes grow 8.9 →
    // 10.2 MB (fragmented, so `malloc_trim` cannot return them) and RSS 0.3–0.6 KiB per cycle.
    // So RSS gets a looser bound in the short run, and ±5% in long runs (20,000 cycles and
    // more), where growth like that would show.
    let drift = rss_end as f64 / rss_warm as f64;
    let per_cycle_kib = rss_end.saturating_sub(rss_warm) as f64 / (total - total / 2) as f64;
    assert!(
        per_cycle_kib <= 1.0,
        "RSS grew {per_cycle_kib:.2} KiB per cycle after warm-up: {report}"
    );
    if total >= 20_000 {
        assert!(
            (0.95..=1.05).contains(&drift),
            "RSS moved {:+.1}% after warm-up: {report}",
            (drift - 1.0) * 100.0
        );
    }
    assert!(
        gateway.process.exit_status().is_none(),
        "the gateway died: {}",
        gateway.process.logs()
    );
}

/// Established TCP flows from the client pool in the gateway namespace's conntrack table.
fn established_pool_flows(topology: &Topology) -> usize {
    let out = topology.gw_exec(&["conntrack", "-L", "-p", "tcp"]);
    assert!(out.status.success(), "conntrack -L: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(" ESTABLISHED ") && l.contains("src=10.77."))
        .count()
}

/// Entries in the gateway namespace's conntrack table.
fn conntrack_count(topology: &Topology) -> u64 {
    let out = topology.gw_exec(&["conntrack", "-C"]);
    assert!(out.status.success(), "conntrack -C: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("conntrack -C prints a count")
}

/// Starts `webnic forward` to the echo server, opens a TCP connection through it and echoes 64
/// bytes, then kills the CLI with SIGKILL while that connection is open: no close reaches the
/// gateway, and the flow stays established in the gateway's conntrack table until the gateway
/// deletes it with the session's address.
async fn kill_a_cli_session(
    topology: &Topology,
    gateway: &common::GatewayProcess,
    remote: SocketAddr,
) {
    let rule = format!("127.0.0.1:0={remote}");
    let cli = topology.spawn_cli(gateway, &["forward", &rule]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let local = loop {
        if let Some(port) = cli
            .stderr()
            .lines()
            .find_map(|l| l.strip_prefix("webnic: forwarding 127.0.0.1:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u16>().ok())
        {
            break SocketAddr::from(([127, 0, 0, 1], port));
        }
        assert!(
            Instant::now() < deadline && cli.exit_status().is_none(),
            "webnic forward never came up: {}",
            cli.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let data = [0x5au8; 64];
    let mut echoed = [0u8; 64];
    let echo = async {
        let mut stream = tokio::net::TcpStream::connect(local).await?;
        stream.write_all(&data).await?;
        stream.read_exact(&mut echoed).await?;
        std::io::Result::Ok(stream)
    };
    let stream = match tokio::time::timeout(Duration::from_secs(30), echo).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => panic!(
            "echo through webnic forward on {local}: {e}: {}",
            cli.logs()
        ),
        Err(_) => panic!(
            "echo through webnic forward on {local} timed out: {}",
            cli.logs()
        ),
    };
    assert_eq!(echoed, data, "echo through the killed client's forward");
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(cli.pid() as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while cli.exit_status().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        cli.exit_status().is_some_and(|s| s.contains("signal 9")),
        "webnic forward did not die of SIGKILL: {:?}",
        cli.exit_status()
    );
    drop(stream);
}
