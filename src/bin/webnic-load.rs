//! `webnic-load`: a load generator for a webnic gateway.
//!
//! Opens `--sessions` sessions, waits until `--start-at` (so that several processes start their
//! traffic together), then runs a traffic mix in every session for `--secs` seconds:
//! - `bulk`: one TCP connection to an echo server, written and read as fast as the tunnel goes;
//!   every echoed byte is checked against the session's seeded pattern (byte-exact), and the
//!   goodput counts the bytes echoed back within the window;
//! - `rr`: small request/response exchanges (64 bytes) on a second TCP connection to the echo,
//!   one every `--rr-interval-ms`, each reply checked;
//! - `udp`: one sequence-numbered datagram every `--udp-interval-ms` to a UDP echo, replies
//!   counted (UDP may be lost under load: counted, not an error unless none comes back at all);
//! - `sink`: binds UDP `--sink-port` and counts what arrives (the target of a flood);
//! - `idle`: no traffic at all, the session only stays open (QUIC keep-alives) until the window
//!   ends (what `benches/sessions.rs` measures the gateway's memory and CPU with).
//!
//! At the end every connection is half-closed and drained to the echo's FIN (the totals must
//! match), and the session is closed. One JSON line per session goes to stdout; the process exits
//! with status 1 if any session saw an error or made no progress for `--stall-secs` (stuck).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use webnic::{Client, ConnectOptions, TcpOptions};

/// Length of a session's repeating bulk pattern: prime, so it never lines up with the chunk size.
const PATTERN_LEN: usize = 65_521;
/// Bytes per bulk write.
const CHUNK: usize = 16 * 1024;
/// Size of one request/response message.
const RR_SIZE: usize = 64;
/// How long draining the echo and closing may take once the window ends.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Open many webnic sessions and run a checked traffic mix in each.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The gateway's WebTransport URL.
    #[arg(long, env = "WEBNIC_GATEWAY")]
    gateway: String,
    /// SHA-256 of the gateway's certificate (hex).
    #[arg(long, env = "WEBNIC_CERT_HASH")]
    cert_hash: Option<String>,
    /// Sessions this process opens.
    #[arg(long, default_value_t = 25)]
    sessions: u32,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 30)]
    secs: u64,
    /// Start the traffic at this Unix time in milliseconds (default: once all sessions are up).
    #[arg(long)]
    start_at: Option<u64>,
    /// Traffic kinds, comma-separated: bulk, rr, udp, sink.
    #[arg(long, value_delimiter = ',', default_value = "bulk,rr,udp")]
    mix: Vec<Kind>,
    /// TCP echo server (for bulk and rr).
    #[arg(long)]
    tcp_echo: Option<SocketAddr>,
    /// UDP echo server (for udp).
    #[arg(long)]
    udp_echo: Option<SocketAddr>,
    /// UDP port each session binds for `sink`.
    #[arg(long, default_value_t = 9999)]
    sink_port: u16,
    /// Milliseconds between request/response exchanges.
    #[arg(long, default_value_t = 100)]
    rr_interval_ms: u64,
    /// Milliseconds between UDP echo datagrams.
    #[arg(long, default_value_t = 200)]
    udp_interval_ms: u64,
    /// A bulk or rr flow without progress for this long is stuck (the run fails).
    #[arg(long, default_value_t = 10)]
    stall_secs: u64,
    /// TCP send and receive buffer of each connection, in bytes (the stack's default is 256 KiB;
    /// 1,000 sessions want less).
    #[arg(long, default_value_t = 64 * 1024)]
    tcp_buffer: usize,
    /// Offset added to session numbers in the output (one range per process).
    #[arg(long, default_value_t = 0)]
    id_base: u32,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// At most this many sessions handshaking at once (0: all at once). Thousands of
    /// simultaneous handshakes overflow the gateway's UDP receive buffer.
    #[arg(long, default_value_t = 0)]
    connect_parallel: usize,
    /// Attempts per session before its connect failure fails the run.
    #[arg(long, default_value_t = 1)]
    connect_attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    Bulk,
    Rr,
    Udp,
    Sink,
    Idle,
}

/// What one session did.
#[derive(Debug, Default)]
struct Report {
    id: u32,
    ipv4: String,
    bulk_bytes: u64,
    bulk_total: u64,
    rr_count: u64,
    rr_max_ms: f64,
    udp_sent: u64,
    udp_received: u64,
    sink_datagrams: u64,
    sink_bytes: u64,
    stuck: bool,
    clean: bool,
    errors: Vec<String>,
}

impl Report {
    fn json(&self, window: f64) -> String {
        let errors: Vec<String> = self.errors.iter().map(|e| json_string(e)).collect();
        format!(
            "{{\"session\":{},\"ipv4\":{},\"secs\":{window:.3},\"bulk_bytes\":{},\
             \"bulk_goodput_bps\":{:.0},\"bulk_total\":{},\"rr_count\":{},\"rr_max_ms\":{:.1},\
             \"udp_sent\":{},\"udp_received\":{},\"sink_datagrams\":{},\"sink_bytes\":{},\
             \"stuck\":{},\"clean\":{},\"errors\":[{}]}}",
            self.id,
            json_string(&self.ipv4),
            self.bulk_bytes,
            self.bulk_bytes as f64 * 8.0 / window.max(1e-9),
            self.bulk_total,
            self.rr_count,
            self.rr_max_ms,
            self.udp_sent,
            self.udp_received,
            self.sink_datagrams,
            self.sink_bytes,
            self.stuck,
            self.clean,
            errors.join(",")
        )
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The session's repeating bulk pattern (splitmix64 from its id).
fn pattern(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED;
    let mut out = Vec::with_capacity(PATTERN_LEN + 8);
    while out.len() < PATTERN_LEN {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(PATTERN_LEN);
    out
}

/// Progress of one flow, for the stall watchdog: milliseconds since `origin` of the last step.
#[derive(Debug)]
struct Progress {
    origin: Instant,
    last_ms: AtomicU64,
    /// The flow ended (either way): it can no longer be stuck, while the session's other flows
    /// may still drain.
    finished: AtomicBool,
}

impl Progress {
    fn new(origin: Instant) -> Arc<Self> {
        Arc::new(Self {
            origin,
            last_ms: AtomicU64::new(origin.elapsed().as_millis() as u64),
            finished: AtomicBool::new(false),
        })
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    fn tick(&self) {
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle(&self) -> Duration {
        if self.finished.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Bulk echo: returns (bytes echoed within the window, bytes echoed in total).
async fn bulk(
    client: &Client,
    echo: SocketAddr,
    options: TcpOptions,
    seed: u64,
    end: Instant,
    progress: Arc<Progress>,
) -> Result<(u64, u64)> {
    let stream = client
        .tcp_connect_with(echo, options)
        .await
        .context("bulk: connect")?;
    progress.tick();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let pattern = Arc::new(pattern(seed));
    let write_pattern = Arc::clone(&pattern);
    let write = tokio::spawn(async move {
        // Writes the pattern from offset 0 on until the window ends. `write` (not `write_all`)
        // inside the select: a cancelled `write` wrote nothing, so `written` stays exact.
        let mut written = 0u64;
        while Instant::now() < end {
            let at = (written % PATTERN_LEN as u64) as usize;
            let piece = &write_pattern[at..(at + CHUNK).min(PATTERN_LEN)];
            tokio::select! {
                result = writer.write(piece) => match result.context("bulk: write")? {
                    0 => bail!("bulk: the connection accepts no more data"),
                    n => written += n as u64,
                },
                () = tokio::time::sleep_until(end.into()) => break,
            }
        }
        writer.shutdown().await.context("bulk: shutdown")?;
        anyhow::Ok(written)
    });
    let mut buf = vec![0u8; 64 * 1024];
    let (mut total, mut in_window) = (0u64, 0u64);
    loop {
        let n = reader.read(&mut buf).await.context("bulk: read")?;
        if n == 0 {
            break;
        }
        // Compare slice by slice against the repeating pattern.
        let mut checked = 0usize;
        while checked < n {
            let at = ((total + checked as u64) % PATTERN_LEN as u64) as usize;
            let len = (PATTERN_LEN - at).min(n - checked);
            if buf[checked..checked + len] != pattern[at..at + len] {
                bail!(
                    "bulk: echoed bytes at {} differ from what was sent",
                    total + checked as u64
                );
            }
            checked += len;
        }
        total += n as u64;
        if Instant::now() <= end {
            in_window = total;
        }
        progress.tick();
    }
    let written = write.await.context("bulk: writer task")??;
    if written != total {
        bail!("bulk: wrote {written} bytes, the echo returned {total} before its FIN");
    }
    Ok((in_window, total))
}

/// Request/response: returns (exchanges, slowest exchange in ms).
async fn request_response(
    client: &Client,
    echo: SocketAddr,
    seed: u64,
    interval: Duration,
    end: Instant,
    progress: Arc<Progress>,
) -> Result<(u64, f64)> {
    let mut stream = client
        .tcp_connect_with(
            echo,
            TcpOptions {
                send_buffer: 4096,
                recv_buffer: 4096,
                recv_buffer_max: 4096,
                ..TcpOptions::default()
            },
        )
        .await
        .context("rr: connect")?;
    progress.tick();
    let (mut count, mut slowest) = (0u64, 0f64);
    let mut request = [0u8; RR_SIZE];
    let mut reply = [0u8; RR_SIZE];
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        ticker.tick().await;
        for (i, byte) in request.iter_mut().enumerate() {
            *byte = (seed as u8) ^ (count as u8).wrapping_add(i as u8);
        }
        let started = Instant::now();
        stream.write_all(&request).await.context("rr: write")?;
        stream.read_exact(&mut reply).await.context("rr: read")?;
        if reply != request {
            bail!("rr: reply {count} differs from its request");
        }
        slowest = slowest.max(started.elapsed().as_secs_f64() * 1000.0);
        count += 1;
        progress.tick();
    }
    stream.shutdown().await.context("rr: shutdown")?;
    let n = stream.read(&mut reply).await.context("rr: read FIN")?;
    if n != 0 {
        bail!("rr: {n} unexpected bytes before the echo's FIN");
    }
    Ok((count, slowest))
}

/// UDP echo: returns (sent, matching replies).
async fn udp_echo(
    client: &Client,
    echo: SocketAddr,
    seed: u64,
    interval: Duration,
    end: Instant,
) -> Result<(u64, u64)> {
    let socket = Arc::new(client.udp_bind(0).await.context("udp: bind")?);
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (socket, received) = (Arc::clone(&socket), Arc::clone(&received));
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                let (n, from) = socket.recv_from(&mut buf).await?;
                if from == echo && n == 16 && buf[..8] == seed.to_le_bytes() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            #[allow(unreachable_code)]
            std::io::Result::Ok(())
        })
    };
    let mut sent = 0u64;
    let mut ticker = tokio::time::interval(interval);
    while Instant::now() < end {
        ticker.tick().await;
        let mut datagram = [0u8; 16];
        datagram[..8].copy_from_slice(&seed.to_le_bytes());
        datagram[8..].copy_from_slice(&sent.to_le_bytes());
        socket.send_to(&datagram, echo).await.context("udp: send")?;
        sent += 1;
    }
    // The last replies are still on their way.
    tokio::time::sleep(Duration::from_secs(1)).await;
    reader.abort();
    let received = received.load(Ordering::Relaxed);
    if sent > 0 && received == 0 {
        bail!("udp: none of {sent} datagrams came back");
    }
    Ok((sent, received))
}

/// UDP sink: counts datagrams until `end`; returns (datagrams, bytes).
async fn sink(client: &Client, port: u16, end: Instant) -> Result<(u64, u64)> {
    let socket = client.udp_bind(port).await.context("sink: bind")?;
    let (mut datagrams, mut bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; 2048];
    loop {
        tokio::select! {
            result = socket.recv_from(&mut buf) => {
                let (n, _) = result.context("sink: recv")?;
                datagrams += 1;
                bytes += n as u64;
            }
            () = tokio::time::sleep_until(end.into()) => return Ok((datagrams, bytes)),
        }
    }
}

async fn run_session(
    client: Client,
    args: Arc<Args>,
    id: u32,
    start: Instant,
    end: Instant,
) -> Report {
    let mut report = Report {
        id,
        ipv4: client.ipv4().map(|a| a.to_string()).unwrap_or_default(),
        ..Report::default()
    };
    tokio::time::sleep_until(start.into()).await;
    let seed = u64::from(id) + 1;
    let has = |kind| args.mix.contains(&kind);
    let options = TcpOptions {
        send_buffer: args.tcp_buffer,
        recv_buffer: args.tcp_buffer,
        recv_buffer_max: args.tcp_buffer,
        ..TcpOptions::default()
    };
    let bulk_progress = Progress::new(start);
    let rr_progress = Progress::new(start);
    let flows = async {
        let bulk_flow = async {
            match (has(Kind::Bulk), args.tcp_echo) {
                (true, Some(echo)) => {
                    let result = bulk(
                        &client,
                        echo,
                        options,
                        seed,
                        end,
                        Arc::clone(&bulk_progress),
                    )
                    .await;
                    bulk_progress.finish();
                    Some(result)
                }
                _ => None,
            }
        };
        let rr_flow = async {
            match (has(Kind::Rr), args.tcp_echo) {
                (true, Some(echo)) => {
                    let result = request_response(
                        &client,
                        echo,
                        seed,
                        Duration::from_millis(args.rr_interval_ms),
                        end,
                        Arc::clone(&rr_progress),
                    )
                    .await;
                    // Done (its FIN came back): the bulk flow's drain may take longer, and this
                    // flow's last step must not then read as a stall.
                    rr_progress.finish();
                    Some(result)
                }
                _ => None,
            }
        };
        let udp_flow = async {
            match (has(Kind::Udp), args.udp_echo) {
                (true, Some(echo)) => Some(
                    udp_echo(
                        &client,
                        echo,
                        seed,
                        Duration::from_millis(args.udp_interval_ms),
                        end,
                    )
                    .await,
                ),
                _ => None,
            }
        };
        let sink_flow =
            async { has(Kind::Sink).then_some(sink(&client, args.sink_port, end).await) };
        let idle = async {
            if has(Kind::Idle) {
                tokio::time::sleep_until(end.into()).await;
            }
        };
        let (bulk, rr, udp, sink, ()) = tokio::join!(bulk_flow, rr_flow, udp_flow, sink_flow, idle);
        (bulk, rr, udp, sink)
    };
    // The watchdog: a flow whose last step is older than --stall-secs is stuck (the drain after
    // the window counts too: a connection that never delivers its FIN is stuck as well).
    let stall = Duration::from_secs(args.stall_secs);
    let watchdog = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            for (name, progress, on) in [
                ("bulk", &bulk_progress, has(Kind::Bulk)),
                ("rr", &rr_progress, has(Kind::Rr)),
            ] {
                if on && progress.idle() > stall {
                    return format!("{name}: no progress for {:?}", progress.idle());
                }
            }
        }
    };
    let limit = end.saturating_duration_since(Instant::now()) + DRAIN_LIMIT;
    let outcome = tokio::select! {
        flows = tokio::time::timeout(limit, flows) => flows.map_err(|_| "flows did not end".to_owned()),
        stuck = watchdog => Err(stuck),
    };
    match outcome {
        Ok((bulk_result, rr_result, udp_result, sink_result)) => {
            let errors = &mut report.errors;
            if let Some((window, total)) = outcome_of(bulk_result, errors) {
                (report.bulk_bytes, report.bulk_total) = (window, total);
            }
            if let Some((count, slowest)) = outcome_of(rr_result, errors) {
                (report.rr_count, report.rr_max_ms) = (count, slowest);
            }
            if let Some((sent, received)) = outcome_of(udp_result, errors) {
                (report.udp_sent, report.udp_received) = (sent, received);
            }
            if let Some((datagrams, bytes)) = outcome_of(sink_result, errors) {
                (report.sink_datagrams, report.sink_bytes) = (datagrams, bytes);
            }
        }
        Err(stuck) => {
            report.stuck = true;
            report.errors.push(stuck);
        }
    }
    client.close().await;
    report.clean = report.errors.is_empty();
    report
}

/// A flow's result: its figures, or its error appended to `errors`; `None` for a flow not run.
fn outcome_of<T>(result: Option<Result<T>>, errors: &mut Vec<String>) -> Option<T> {
    match result? {
        Ok(value) => Some(value),
        Err(error) => {
            errors.push(format!("{error:#}"));
            None
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    let args = Arc::new(args);
    let connect_started = Instant::now();
    let mut connecting = Vec::new();
    let permits = match args.connect_parallel {
        0 => tokio::sync::Semaphore::MAX_PERMITS,
        n => n,
    };
    let handshakes = Arc::new(tokio::sync::Semaphore::new(permits));
    for i in 0..args.sessions {
        let args = Arc::clone(&args);
        let handshakes = Arc::clone(&handshakes);
        connecting.push(tokio::spawn(async move {
            // Held until this session's handshake is done; the semaphore is never closed.
            let _permit = handshakes.acquire_owned().await;
            let mut attempt = 1;
            loop {
                let mut options = ConnectOptions::new(args.gateway.clone());
                if let Some(hash) = &args.cert_hash {
                    options = options.cert_hash(hash.clone());
                }
                match Client::connect(options).await {
                    Ok(client) => break Ok(client),
                    Err(_) if attempt < args.connect_attempts => attempt += 1,
                    Err(error) => {
                        break Err(error).with_context(|| {
                            format!("session {}: connect (attempt {attempt})", args.id_base + i)
                        });
                    }
                }
            }
        }));
    }
    let mut clients = Vec::with_capacity(connecting.len());
    for task in connecting {
        clients.push(task.await.context("connect task")??);
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    // Translate the wall-clock start into this process's monotonic clock.
    let now_ms = unix_ms();
    let start = match args.start_at {
        Some(at) if at < now_ms => bail!(
            "{} sessions took {connect_secs:.1} s to connect: past --start-at by {} ms",
            args.sessions,
            now_ms - at
        ),
        Some(at) => Instant::now() + Duration::from_millis(at - now_ms),
        None => Instant::now(),
    };
    println!(
        "{{\"event\":\"connected\",\"sessions\":{},\"connect_secs\":{connect_secs:.3},\"ipv4\":[{}]}}",
        clients.len(),
        clients
            .iter()
            .map(|c| json_string(&c.ipv4().map(|a| a.to_string()).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(",")
    );
    let end = start + Duration::from_secs(args.secs);
    let mut running = Vec::with_capacity(clients.len());
    for (i, client) in clients.into_iter().enumerate() {
        let id = args.id_base + i as u32;
        running.push(tokio::spawn(run_session(
            client,
            Arc::clone(&args),
            id,
            start,
            end,
        )));
    }
    let window = args.secs as f64;
    let mut all_ok = true;
    for task in running {
        let report = task.await.context("session task")?;
        all_ok &= report.clean && !report.stuck;
        println!("{}", report.json(window));
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("webnic-load: tokio runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("webnic-load: {error:#}");
            println!(
                "{{\"event\":\"failed\",\"error\":{}}}",
                json_string(&format!("{error:#}"))
            );
            ExitCode::from(1)
        }
    }
}
