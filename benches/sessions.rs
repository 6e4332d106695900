//! Idle sessions: the gateway's memory (RSS) and CPU per idle session, with 10,000 sessions
//! (`WEBNIC_SESSIONS` to change it) opened by `webnic-load --mix idle` from several processes.
//!
//! Baseline in the same run: the same number of idle WebTransport sessions, with the same
//! wtransport/quinn layers, transport settings (datagram buffers, keep-alive, idle timeout,
//! stream limits) and client keep-alive, held by a bare WebTransport server that accepts
//! sessions and does nothing else (this binary re-executed as `__bare-server`, clients as
//! `__raw-clients`). That is what any WebTransport tunnel pays per session for its transport;
//! the ratio says how much the gateway's own per-session state (address lease, session task,
//! queues, control stream, NAT/policy entries) adds on top. Plain TCP connections to nginx
//! would mostly measure the kernel instead.
//!
//! Per session: (RSS with the sessions open − RSS before they opened) ÷ sessions, taken after a
//! settle time; CPU (user + system, from `/proc/<pid>/stat`) over an idle window, as CPU
//! seconds per session per minute. Each run prints `RESULT` lines for `scripts/bench.sh`.
//!
//! Needs root and `target/release/webnic-gateway` (`scripts/bench.sh` builds it).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Process, Topology};
use support::report;

/// Sessions opened by default (issue 4's figure).
const DEFAULT_SESSIONS: u64 = 10_000;
/// Load generator processes the sessions are spread over (each session has its own UDP socket,
/// so one process would need 10,000 descriptors and one tokio thread for all).
const CLIENT_PROCESSES: u64 = 4;
/// Handshakes in flight per client process: thousands at once overflow the server's UDP
/// receive buffer and handshakes time out.
const CONNECT_PARALLEL: &str = "8";
/// Attempts per session: on 2 busy cores a handshake now and then times out; the figure is the
/// idle footprint, not handshake robustness, so a timed-out one is retried.
const CONNECT_ATTEMPTS: &str = "4";
/// Port of the bare WebTransport server (the gateway listens on the harness's port).
const BARE_PORT: u16 = 4480;
/// After the last session connected: let handshake garbage, timers and allocator caches settle.
const SETTLE: Duration = Duration::from_secs(5);
/// Default idle window for the CPU figure.
const DEFAULT_IDLE_SECS: u64 = 30;
/// The gateway's default idle timeout; its transport settings for it come from
/// `webnic_gateway::server::transport_config`.
const SERVER_IDLE_TIMEOUT: Duration =
    Duration::from_secs(webnic_gateway::config::DEFAULT_IDLE_TIMEOUT_SECS);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident set size of `pid` in bytes (`VmRSS`).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

/// User + system CPU time of `pid` (all its threads) in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')').expect("comm in stat") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

/// Waits until every client process printed its "connected" line; panics on a failure.
fn wait_connected(clients: &[(Process, std::path::PathBuf)], sessions: u64, what: &str) {
    let limit = Duration::from_secs(60 + sessions / 20);
    let deadline = Instant::now() + limit;
    loop {
        let mut done = 0;
        for (process, out) in clients {
            let text = std::fs::read_to_string(out).unwrap_or_default();
            if text.contains("\"event\":\"connected\"") {
                done += 1;
            } else if text.contains("\"event\":\"failed\"") || process.exit_status().is_some() {
                panic!(
                    "{what}: a client process failed before all {sessions} sessions connected:\n{text}\n{}",
                    process.logs()
                );
            }
        }
        if done == clients.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {sessions} sessions not connected within {limit:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Memory and CPU of the server process `pid` while `open_clients` holds `sessions` idle sessions.
struct Footprint {
    rss_per_session: f64,
    cpu_per_session_minute: f64,
}

fn measure(
    pid: u32,
    sessions: u64,
    idle: Duration,
    what: &str,
    open_clients: impl FnOnce() -> Vec<(Process, std::path::PathBuf)>,
) -> (Footprint, Vec<(Process, std::path::PathBuf)>) {
    thread::sleep(Duration::from_secs(1));
    let before = rss_bytes(pid);
    let started = Instant::now();
    let clients = open_clients();
    wait_connected(&clients, sessions, what);
    println!(
        "NOTE {what}: {sessions} sessions connected in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    thread::sleep(SETTLE);
    let after = rss_bytes(pid);
    let cpu_start = cpu_secs(pid);
    let window = Instant::now();
    thread::sleep(idle);
    let cpu = cpu_secs(pid) - cpu_start;
    let minutes = window.elapsed().as_secs_f64() / 60.0;
    let footprint = Footprint {
        rss_per_session: (after as f64 - before as f64) / sessions as f64,
        cpu_per_session_minute: cpu / sessions as f64 / minutes,
    };
    println!(
        "NOTE {what}: RSS {:.1} MiB before, {:.1} MiB with the sessions ({:.2} KiB/session); \
         {cpu:.2} CPU s in {:.0} s idle ({:.1} µs CPU per session per minute)",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        footprint.rss_per_session / 1024.0,
        minutes * 60.0,
        footprint.cpu_per_session_minute * 1e6,
    );
    (footprint, clients)
}

/// The gateway's heap: bytes in live allocations and bytes its allocator holds free.
fn gateway_heap(gateway: &common::GatewayProcess) -> (f64, f64) {
    (
        gateway.metric("webnic_heap_in_use_bytes"),
        gateway.metric("webnic_heap_free_bytes"),
    )
}

/// Splits `sessions` over the client processes: (count, first id) per process.
fn shares(sessions: u64) -> Vec<(u64, u64)> {
    let procs = CLIENT_PROCESSES.min(sessions.max(1));
    let mut base = 0;
    (0..procs)
        .map(|p| {
            let count = sessions / procs + u64::from(p < sessions % procs);
            let share = (count, base);
            base += count;
            share
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("__bare-server") => {
            let listen = args
                .next()
                .expect("listen address")
                .parse()
                .expect("address");
            let hash_file = args.next().expect("hash file");
            return bare_server(listen, Path::new(&hash_file));
        }
        Some("__raw-clients") => {
            let url = args.next().expect("url");
            let hash = args.next().expect("cert hash");
            let count = args.next().expect("count").parse().expect("count");
            return raw_clients(&url, &hash, count);
        }
        _ => {}
    }
    let sessions = env_u64("WEBNIC_SESSIONS", DEFAULT_SESSIONS);
    let idle = Duration::from_secs(env_u64("WEBNIC_SESSIONS_IDLE_SECS", DEFAULT_IDLE_SECS));
    raise_fd_limit(2 * sessions.div_ceil(CLIENT_PROCESSES) + 4096);
    let topology = Topology::new();
    let exe = std::env::current_exe().expect("current_exe");
    let exe = exe.to_str().expect("utf-8 path");

    // Baseline: a bare WebTransport server in the gateway's namespace.
    let hash_file = topology.tmp().join("bare-hash");
    let listen = SocketAddr::new(topology.gw_addr().into(), BARE_PORT);
    let bare = topology.spawn_in(
        &topology.gw_ns(),
        "bare-server",
        &[
            exe,
            "__bare-server",
            &listen.to_string(),
            hash_file.to_str().expect("utf-8 path"),
        ],
        Vec::new(),
    );
    let bare_hash = wait_hash(&hash_file, &bare);
    let url = format!("https://{listen}/");
    let (baseline, raw) = measure(bare.pid(), sessions, idle, "bare_wtransport_server", || {
        shares(sessions)
            .into_iter()
            .enumerate()
            .map(|(p, (count, _))| {
                let name = format!("raw-clients-{p}");
                let mut cmd = Command::new(exe);
                cmd.args(["__raw-clients", &url, &bare_hash, &count.to_string()]);
                let process = topology.spawn_root(&name, &mut cmd);
                (process, topology.tmp().join(format!("{name}.out")))
            })
            .collect()
    });
    for (process, _) in &raw {
        process.kill();
    }
    bare.kill();
    drop(raw);

    // The gateway, with admission limits lifted and a pool for every session.
    let gateway = topology.start_gateway(&[
        "--session-rate",
        "0",
        "--max-sessions-per-address",
        "0",
        "--max-sessions",
        "0",
        "--pool-v4",
        "10.77.0.0/17",
    ]);
    let heap_before = gateway_heap(&gateway);
    let (webnic, load) = measure(gateway.process.pid(), sessions, idle, "gateway", || {
        shares(sessions)
            .into_iter()
            .enumerate()
            .map(|(p, (count, base))| {
                let name = format!("webnic-load-{p}");
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_webnic-load"));
                cmd.args([
                    "--gateway",
                    gateway.url(),
                    "--cert-hash",
                    gateway.cert_hash(),
                    "--mix",
                    "idle",
                    "--secs",
                    "100000",
                    "--connect-parallel",
                    CONNECT_PARALLEL,
                    "--connect-attempts",
                    CONNECT_ATTEMPTS,
                    "--sessions",
                    &count.to_string(),
                    "--id-base",
                    &base.to_string(),
                ]);
                cmd.env("RUST_LOG", "warn");
                let process = topology.spawn_root(&name, &mut cmd);
                (process, topology.tmp().join(format!("{name}.out")))
            })
            .collect()
    });
    let heap_after = gateway_heap(&gateway);
    // What the RSS figure is made of: live allocations, and what the allocator holds free in
    // its arenas (fragmentation), per session.
    println!(
        "NOTE gateway: heap in use {:.2} KiB/session, allocator free {:.2} KiB/session",
        (heap_after.0 - heap_before.0) / sessions as f64 / 1024.0,
        (heap_after.1 - heap_before.1) / sessions as f64 / 1024.0,
    );
    // Every session must still be open at the end of the idle window (none timed out).
    let active = gateway.metric("webnic_sessions_active");
    assert_eq!(
        active as u64, sessions,
        "gateway reports {active} active sessions after the idle window, expected {sessions}"
    );
    for (process, _) in &load {
        process.kill();
    }

    report(
        "sessions.idle_rss_per_session",
        webnic.rss_per_session / 1024.0,
        "KiB",
        "bare_wtransport_server",
        baseline.rss_per_session / 1024.0,
    );
    report(
        "sessions.idle_cpu_per_session_minute",
        webnic.cpu_per_session_minute * 1e6,
        "us_cpu/min",
        "bare_wtransport_server",
        baseline.cpu_per_session_minute * 1e6,
    );
    println!("NOTE sessions: {sessions} idle sessions, target ≤ 32 KiB of gateway RSS per session");
}

/// Raises `RLIMIT_NOFILE` (inherited by the servers and clients this bench starts) towards
/// `wanted`: the hard limit too when allowed, else the soft limit up to the hard one. A client
/// process needs about two descriptors per session (its UDP socket, and tokio's).
fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur >= wanted {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max.max(wanted),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            limit.rlim_cur = limit.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
            println!(
                "NOTE sessions: open-file limit {} (wanted {wanted}; the hard limit cannot be raised here)",
                limit.rlim_cur
            );
        }
    }
}

fn wait_hash(path: &Path, process: &Process) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.trim().len() == 64 {
            return text.trim().to_owned();
        }
        assert!(
            process.exit_status().is_none() && Instant::now() < deadline,
            "bare server not ready:\n{}",
            process.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The baseline server: accepts every WebTransport session and holds it, nothing else.
fn bare_server(listen: SocketAddr, hash_file: &Path) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let identity =
            wtransport::Identity::self_signed([listen.ip().to_string()]).expect("identity");
        let hash = identity.certificate_chain().as_slice()[0].hash();
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let transport = webnic_gateway::server::transport_config(
            SERVER_IDLE_TIMEOUT,
            webnic_gateway::config::Congestion::default(),
        );
        let config = wtransport::ServerConfig::builder()
            .with_bind_address(listen)
            .with_custom_transport(identity, transport)
            .build();
        let endpoint = wtransport::Endpoint::server(config).expect("bind");
        std::fs::write(hash_file, hex).expect("hash file");
        loop {
            let incoming = endpoint.accept().await;
            tokio::spawn(async move {
                let Ok(request) = incoming.await else { return };
                let Ok(connection) = request.accept().await else {
                    return;
                };
                connection.closed().await;
            });
        }
    });
}

/// The baseline's clients: `count` idle WebTransport sessions with the native client's transport
/// settings (`src/session.rs`), each on its own endpoint and UDP socket as the client's are.
fn raw_clients(url: &str, hash: &str, count: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).expect("hex hash");
    }
    let digest = wtransport::tls::Sha256Digest::new(digest);
    runtime.block_on(async {
        let parallel = Arc::new(tokio::sync::Semaphore::new(
            CONNECT_PARALLEL.parse().expect("number"),
        ));
        let mut tasks = Vec::new();
        for _ in 0..count {
            let (url, digest, parallel) = (url.to_owned(), digest.clone(), Arc::clone(&parallel));
            tasks.push(tokio::spawn(async move {
                let _permit = parallel.acquire_owned().await;
                let mut config = wtransport::ClientConfig::builder()
                    .with_bind_default()
                    .with_server_certificate_hashes([digest])
                    .build();
                let mut transport = wtransport::quinn::TransportConfig::default();
                transport
                    .keep_alive_interval(Some(Duration::from_secs(5)))
                    .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("valid")))
                    .datagram_receive_buffer_size(Some(2 * 1024 * 1024))
                    .datagram_send_buffer_size(1024 * 1024);
                config
                    .quic_config_mut()
                    .transport_config(Arc::new(transport));
                let endpoint = wtransport::Endpoint::client(config).expect("client endpoint");
                let attempts: u32 = CONNECT_ATTEMPTS.parse().expect("number");
                for attempt in 1..=attempts {
                    match endpoint.connect(&url).await {
                        Ok(connection) => return (endpoint, connection),
                        Err(error) if attempt == attempts => panic!("raw session: {error}"),
                        Err(_) => {}
                    }
                }
                unreachable!("the last attempt returns or panics")
            }));
        }
        let mut held = Vec::with_capacity(tasks.len());
        for task in tasks {
            held.push(task.await.expect("connect task"));
        }
        println!("{{\"event\":\"connected\",\"sessions\":{}}}", held.len());
        std::future::pending::<()>().await;
    });
}
