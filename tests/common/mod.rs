//! End-to-end topology harness: network namespaces, veth pairs, a real gateway and real servers.
//!
//! ```text
//!  root namespace (this test process, `webnic` CLI, curl, ssh)
//!     wn{n}a 10.200.n.2/24
//!        │ veth
//!     wn{n}b 10.200.n.1/24            ── namespace wn{n}g: webnic-gateway (QUIC on 10.200.n.1:4433, TUN wntun0,
//!     wn{n}c 10.201.n.1/24, fd00:201:n::1/64    client pool 10.77.0.0/24 + fd00:77::/112, metrics 127.0.0.1:9100)
//!        │ veth
//!     wn{n}d 10.201.n.2/24, fd00:201:n::2/64  ── namespace wn{n}s: nginx, socat echo, dnsmasq, sshd
//!                                              (default routes via the gateway namespace, no NAT)
//! ```
//!
//! Every resource is owned by a guard: [`Topology`] deletes its namespaces (and with them the veth pairs),
//! every process is started in its own process group and killed by that id on drop. The drops also run
//! when a test panics, and then print the logs of the processes involved.
//!
//! Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Port the gateway listens on (namespace-private address, so a fixed port is fine).
pub(crate) const GATEWAY_PORT: u16 = 4433;
/// Port of the TCP echo server that tests start by default.
pub(crate) const TCP_ECHO_PORT: u16 = 7001;
/// Port of the UDP echo server, inetd's built-in datagram echo (RFC 862),
/// [`Topology::serve_udp_echo`].
pub(crate) const UDP_ECHO_PORT: u16 = 7;

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

static COUNTER: AtomicU64 = AtomicU64::new(0);

// ------------------------------------------------------------------------------------------------
// Prerequisites

/// Commands the end-to-end tests run.
const REQUIRED_COMMANDS: &[&str] = &[
    "ip",
    "ss",
    "nginx",
    "socat",
    "dnsmasq",
    "sshd",
    "ssh",
    "ssh-keygen",
    "curl",
    "nc",
    "nft",
    "sysctl",
    "inetd",
    "openssl",
    "conntrack",
];

/// Panics, naming everything that is missing, unless the machine can run the end-to-end tests.
///
/// Missing prerequisites are a failure, never a skip: `sudo scripts/test.sh` installs them.
pub(crate) fn require_prerequisites() {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root privileges (run `sudo scripts/test.sh`)".to_owned());
    }
    for cmd in REQUIRED_COMMANDS {
        if find_command(cmd).is_none() {
            missing.push(format!("command `{cmd}`"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_owned());
    }
    assert!(
        missing.is_empty(),
        "end-to-end test prerequisites missing: {}. `sudo scripts/test.sh` installs the packages \
         (nginx-light dnsmasq-base socat openssh-server openssh-client netcat-openbsd nftables iproute2 \
         curl procps).",
        missing.join(", ")
    );
}

/// Looks `name` up in `$PATH` and the sbin directories (which a non-login root shell may lack).
pub(crate) fn find_command(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
}

fn command_path(name: &str) -> PathBuf {
    find_command(name)
        .unwrap_or_else(|| panic!("command `{name}` not found (run `sudo scripts/test.sh`)"))
}

// ------------------------------------------------------------------------------------------------
// Small helpers: temp dirs, data, ports, commands

/// A directory under the system temp dir, removed with everything in it on drop.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "webnic-e2e-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `len` pseudo-random bytes (splitmix64, seeded from the clock and a counter: different per call).
pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed =
        nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed);
    seeded_bytes(seed, len)
}

/// `len` bytes from splitmix64 seeded with `seed` (deterministic).
pub(crate) fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Lower-case hex SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A currently free TCP port on 127.0.0.1 (bound, read and released; fine for tests).
pub(crate) fn free_local_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// Waits (bounded) until `addr` accepts TCP connections; panics after `timeout`.
pub(crate) fn wait_tcp_accepting(addr: SocketAddr, timeout: Duration, what: &Process) {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Some(status) = what.exit_status() {
            panic!(
                "{} exited ({status}) before {addr} accepted connections\n{}",
                what.name(),
                what.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{addr} did not accept connections within {timeout:?}\n{}",
            what.logs()
        );
        thread::sleep(POLL);
    }
}

/// Runs a command to completion with a time limit; kills it (by PID) when the limit passes.
pub(crate) fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_with_stdin(cmd, Stdio::null(), timeout)
}

/// [`run_with_timeout`] with the given stdin (e.g. a `File`).
pub(crate) fn run_with_stdin(
    cmd: &mut Command,
    stdin: impl Into<Stdio>,
    timeout: Duration,
) -> Output {
    let described = format!("{cmd:?}");
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {described}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = out_reader.join().unwrap_or_default();
            let err = err_reader.join().unwrap_or_default();
            panic!(
                "{described} did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Runs `args` (program first) with a 30 s limit; panics with its output unless it succeeds.
pub(crate) fn run(args: &[&str]) -> String {
    let output = run_with_timeout(
        Command::new(args[0]).args(&args[1..]),
        Duration::from_secs(30),
    );
    assert!(
        output.status.success(),
        "`{}` failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `args` (program first) with a 30 s limit and returns its output, whatever the exit status.
pub(crate) fn try_run(args: &[&str]) -> Output {
    run_with_timeout(
        Command::new(args[0]).args(&args[1..]),
        Duration::from_secs(30),
    )
}

/// Runs `f` on a fresh thread that has joined network namespace `ns` (sockets it creates stay there).
pub(crate) fn in_netns<T, F>(ns: &str, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let handle = thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: the fd is a valid, open namespace file for the duration of the call; setns only
        // changes this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", io::Error::last_os_error());
        f()
    });
    match handle.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

// ------------------------------------------------------------------------------------------------
// Processes

/// A process this harness started, in its own process group; killed by that id on drop.
#[derive(Debug)]
pub(crate) struct Process {
    inner: Arc<ProcessSlot>,
}

#[derive(Debug)]
struct ProcessSlot {
    name: String,
    pid: u32,
    child: Mutex<Option<Child>>,
    exit: Mutex<Option<String>>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    extra_logs: Vec<PathBuf>,
}

impl Process {
    /// Spawns `cmd` with stdin closed, stdout/stderr into `<log_dir>/<name>.{out,err}`, in a new
    /// process group.
    pub(crate) fn spawn(
        name: &str,
        cmd: &mut Command,
        log_dir: &Path,
        extra_logs: Vec<PathBuf>,
    ) -> Self {
        let stdout_path = log_dir.join(format!("{name}.out"));
        let stderr_path = log_dir.join(format!("{name}.err"));
        let stdout = fs::File::create(&stdout_path).expect("create stdout log");
        let stderr = fs::File::create(&stderr_path).expect("create stderr log");
        let described = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({described}): {e}"));
        Self {
            inner: Arc::new(ProcessSlot {
                name: name.to_owned(),
                pid: child.id(),
                child: Mutex::new(Some(child)),
                exit: Mutex::new(None),
                stdout_path,
                stderr_path,
                extra_logs,
            }),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// `Some(description)` once the process has exited (it is left unreaped so its id stays ours).
    pub(crate) fn exit_status(&self) -> Option<String> {
        self.inner.exit_status()
    }

    /// Its stdout, stderr and extra log files (the last 8 KiB of each).
    pub(crate) fn logs(&self) -> String {
        self.inner.logs()
    }

    pub(crate) fn stderr(&self) -> String {
        fs::read_to_string(&self.inner.stderr_path).unwrap_or_default()
    }

    /// Kills the process group (SIGTERM, up to 5 s, then SIGKILL) and reaps the process.
    pub(crate) fn kill(&self) {
        self.inner.kill();
    }

    fn slot(&self) -> Arc<ProcessSlot> {
        Arc::clone(&self.inner)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "---- {} (pid {}) ----\n{}",
                self.inner.name,
                self.inner.pid,
                self.inner.logs()
            );
        }
        self.inner.kill();
    }
}

impl ProcessSlot {
    fn exit_status(&self) -> Option<String> {
        if let Some(done) = self.exit.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(done);
        }
        if self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            return Some("killed".to_owned());
        }
        // WNOWAIT: observe the exit without reaping, so the pid (and group id) cannot be reused
        // before kill() has swept the group.
        // SAFETY: an all-zero siginfo_t is valid; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own unreaped child; `info` is a valid out pointer.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid,
                &raw mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid/si_status are valid to read after waitid filled a SIGCHLD-style siginfo.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if rc != 0 || pid == 0 {
            return None;
        }
        let text = match info.si_code {
            libc::CLD_EXITED => format!("exit code {status}"),
            _ => format!("killed by signal {status}"),
        };
        *self.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(text.clone());
        Some(text)
    }

    fn kill(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut child) = guard.take() else {
            return;
        };
        let pgid = self.pid as libc::pid_t;
        // The leader is not reaped yet, so the group id is still ours.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        drop(guard);
        while self.exit_status_unlocked().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        // Sweep the group (forked children of servers) while the leader is still unreaped.
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let status = child.wait();
        let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if exit.is_none() {
            *exit = Some(status.map_or_else(|e| format!("wait failed: {e}"), |s| s.to_string()));
        }
    }

    /// Like `exit_status` but for use while the child was already taken out of its slot.
    fn exit_status_unlocked(&self) -> Option<()> {
        // SAFETY: see exit_status.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: see exit_status.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid,
                &raw mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: see exit_status.
        let pid = unsafe { info.si_pid() };
        (rc == 0 && pid != 0).then_some(())
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for path in [&self.stdout_path, &self.stderr_path]
            .into_iter()
            .chain(&self.extra_logs)
        {
            let content = fs::read(path).unwrap_or_default();
            let tail = &content[content.len().saturating_sub(8192)..];
            let _ = writeln!(
                text,
                "[{}]\n{}",
                path.display(),
                String::from_utf8_lossy(tail)
            );
        }
        text
    }
}

// ------------------------------------------------------------------------------------------------
// Topology

/// Two network namespaces (gateway, server) joined to the root namespace by veth pairs.
#[derive(Debug)]
pub(crate) struct Topology {
    n: u8,
    tmp: TempDir,
    processes: Mutex<Vec<Arc<ProcessSlot>>>,
    created_srv: bool,
}

impl Topology {
    /// Builds the namespaces and links. Panics (after cleaning up) if anything fails.
    pub(crate) fn new() -> Self {
        require_prerequisites();
        let seed = std::process::id() as u64 * 31
            + COUNTER.fetch_add(1, Ordering::Relaxed) * 7
            + SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as u64);
        let mut n = (seed % 250) as u8 + 1;
        let mut tries = 0;
        loop {
            let output = try_run(&["ip", "netns", "add", &format!("wn{n}g")]);
            if output.status.success() {
                break;
            }
            tries += 1;
            assert!(
                tries < 250,
                "no free namespace name wn1g..wn250g: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            n = n % 250 + 1;
        }
        // From here on, Drop cleans up whatever exists.
        let mut topology = Self {
            n,
            tmp: TempDir::new(&format!("wn{n}")),
            processes: Mutex::new(Vec::new()),
            created_srv: false,
        };
        topology.build();
        topology
    }

    fn build(&mut self) {
        let (g, s) = (self.gw_ns(), self.srv_ns());
        let n = self.n;
        let (a, b, c, d) = (
            self.link("a"),
            self.link("b"),
            self.link("c"),
            self.link("d"),
        );
        // wn{n}s is tied to wn{n}g (which we own): a leftover from a crashed run is stale.
        if !try_run(&["ip", "netns", "add", &s]).status.success() {
            let _ = try_run(&["ip", "netns", "del", &s]);
            run(&["ip", "netns", "add", &s]);
        }
        self.created_srv = true;
        if !try_run(&[
            "ip", "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &g,
        ])
        .status
        .success()
        {
            let _ = try_run(&["ip", "link", "del", &a]);
            run(&[
                "ip", "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &g,
            ]);
        }
        run(&[
            "ip", "-n", &g, "link", "add", &c, "type", "veth", "peer", "name", &d, "netns", &s,
        ]);

        let v6 = self.v6_prefix();
        let batch_root = [
            format!("addr add 10.200.{n}.2/24 dev {a}"),
            format!("link set {a} up"),
        ];
        let batch_gw = [
            "link set lo up".to_owned(),
            format!("addr add 10.200.{n}.1/24 dev {b}"),
            format!("link set {b} up"),
            format!("addr add 10.201.{n}.1/24 dev {c}"),
            format!("addr add {v6}::1/64 dev {c} nodad"),
            format!("link set {c} up"),
        ];
        let batch_srv = [
            "link set lo up".to_owned(),
            format!("addr add 10.201.{n}.2/24 dev {d}"),
            format!("addr add {v6}::2/64 dev {d} nodad"),
            format!("link set {d} up"),
            format!("route add default via 10.201.{n}.1 dev {d}"),
            format!("-6 route add default via {v6}::1 dev {d}"),
        ];
        for cmd in batch_root {
            run(&split(&format!("ip {cmd}")));
        }
        for cmd in batch_gw {
            run(&split(&format!("ip -n {g} {cmd}")));
        }
        for cmd in batch_srv {
            run(&split(&format!("ip -n {s} {cmd}")));
        }
        // The gateway namespace routes between its TUN and the server link.
        run(&[
            "ip",
            "netns",
            "exec",
            &g,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        run(&[
            "ip",
            "netns",
            "exec",
            &g,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ]);
    }

    /// The namespace index n (1..=250).
    pub(crate) fn n(&self) -> u8 {
        self.n
    }

    pub(crate) fn gw_ns(&self) -> String {
        format!("wn{}g", self.n)
    }

    pub(crate) fn srv_ns(&self) -> String {
        format!("wn{}s", self.n)
    }

    fn link(&self, suffix: &str) -> String {
        format!("wn{}{suffix}", self.n)
    }

    /// `fd00:201:<n hex>` — the /64 of the server link, without the trailing `::`.
    fn v6_prefix(&self) -> String {
        format!("fd00:201:{:x}", self.n)
    }

    /// The gateway's address on the root link (where its QUIC port is).
    pub(crate) fn gw_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.n, 1)
    }

    /// The server's IPv4 address.
    pub(crate) fn srv_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.n, 2)
    }

    /// The server's IPv6 address.
    pub(crate) fn srv_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x201, u16::from(self.n), 0, 0, 0, 0, 2)
    }

    /// The server namespace's gateway-side IPv4 address (the gateway namespace on the server link).
    pub(crate) fn gw_srv_side_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, self.n, 1)
    }

    /// A scratch directory owned by this topology.
    pub(crate) fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// Runs `args` inside the server namespace (30 s limit) and returns its output.
    pub(crate) fn srv_exec(&self, args: &[&str]) -> Output {
        self.netns_exec(&self.srv_ns(), args, Duration::from_secs(30))
    }

    /// Runs `args` inside the gateway namespace (30 s limit) and returns its output.
    pub(crate) fn gw_exec(&self, args: &[&str]) -> Output {
        self.netns_exec(&self.gw_ns(), args, Duration::from_secs(30))
    }

    /// Runs `args` inside namespace `ns` with a time limit.
    pub(crate) fn netns_exec(&self, ns: &str, args: &[&str], timeout: Duration) -> Output {
        run_with_timeout(
            Command::new("ip").args(["netns", "exec", ns]).args(args),
            timeout,
        )
    }

    /// Like [`Self::srv_exec`] but panics with the output unless the command succeeds; returns stdout.
    pub(crate) fn srv_run(&self, args: &[&str]) -> String {
        let output = self.srv_exec(args);
        assert!(
            output.status.success(),
            "`{}` in {} failed ({}): {}{}",
            args.join(" "),
            self.srv_ns(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts `args` in namespace `ns` as a tracked process (killed on its drop and on ours).
    pub(crate) fn spawn_in(
        &self,
        ns: &str,
        name: &str,
        args: &[&str],
        extra_logs: Vec<PathBuf>,
    ) -> Process {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).args(args);
        let process = Process::spawn(name, &mut cmd, self.tmp(), extra_logs);
        self.track(&process);
        process
    }

    /// Starts a process in the root namespace, tracked like the others.
    pub(crate) fn spawn_root(&self, name: &str, cmd: &mut Command) -> Process {
        let process = Process::spawn(name, cmd, self.tmp(), Vec::new());
        self.track(&process);
        process
    }

    fn track(&self, process: &Process) {
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(process.slot());
    }

    /// Waits (bounded) until something in namespace `ns` listens on `port` (`tcp` or `udp`).
    pub(crate) fn wait_listening(&self, ns: &str, proto: &str, port: u16, process: &Process) {
        let flag = if proto == "udp" { "-Hlun" } else { "-Hltn" };
        let suffix = format!(":{port}");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let output = self.netns_exec(ns, &["ss", flag], Duration::from_secs(10));
            let listening = String::from_utf8_lossy(&output.stdout)
                .lines()
                .filter_map(|line| line.split_whitespace().nth(3))
                .any(|local| local.ends_with(&suffix));
            if listening {
                return;
            }
            if let Some(status) = process.exit_status() {
                panic!(
                    "{} exited ({status}) before listening on {proto} {port}\n{}",
                    process.name(),
                    process.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {proto} port {port} within {READY_TIMEOUT:?}\n{}",
                process.name(),
                process.logs()
            );
            thread::sleep(POLL);
        }
    }

    // -------------------------------------------------------------------------------- servers

    /// nginx serving `root` on port 80 of both server addresses.
    pub(crate) fn serve_nginx(&self, root: &Path) -> Process {
        let dir = self
            .tmp()
            .join(format!("nginx-{}", COUNTER.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).expect("nginx dir");
        let d = dir.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
             default_type application/octet-stream;\n  sendfile on;\n\
             server {{\n    listen {v4}:80;\n    listen [{v6}]:80;\n    root {root};\n  }}\n}}\n",
            v4 = self.srv_ipv4(),
            v6 = self.srv_ipv6(),
            root = root.display(),
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, config).expect("write nginx.conf");
        let nginx = command_path("nginx");
        let process = self.spawn_in(
            &self.srv_ns(),
            "nginx",
            &[
                nginx.to_str().expect("utf-8 path"),
                "-p",
                &format!("{d}/"),
                "-e",
                &format!("{d}/error.log"),
                "-c",
                conf_path.to_str().expect("utf-8 path"),
            ],
            vec![dir.join("error.log"), dir.join("access.log")],
        );
        self.wait_listening(&self.srv_ns(), "tcp", 80, &process);
        process
    }

    /// A socat TCP echo server on `port` (IPv4 and IPv6), one forked child per connection. After the
    /// client's FIN it sends the rest of the echo and then its own FIN.
    pub(crate) fn serve_tcp_echo(&self, port: u16) -> Process {
        let listen = format!("TCP6-LISTEN:{port},ipv6only=0,fork,reuseaddr,backlog=64");
        // -t 60: after one direction's EOF, keep echoing for up to 60 s (the default 0.5 s would cut
        // a slow tunnel's tail off). EXEC:cat, not PIPE: socat blocks writing a full buffer into its
        // own pipe, which only it drains (deadlock); EXEC talks to cat over a socketpair, which
        // select() reports writable only with far more room than one 16 KiB block.
        let process = self.spawn_in(
            &self.srv_ns(),
            &format!("socat-tcp-echo-{port}"),
            &["socat", "-b", "16384", "-t", "60", &listen, "EXEC:cat"],
            Vec::new(),
        );
        self.wait_listening(&self.srv_ns(), "tcp", port, &process);
        process
    }

    /// The UDP echo server: inetd's built-in datagram echo (Debian's openbsd-inetd) on
    /// [`UDP_ECHO_PORT`], IPv4 and IPv6, one long-lived process answering every datagram.
    /// Not socat's `UDP-RECVFROM,fork` echo: under CPU load its parent sometimes stops reading
    /// for good (no child left, the datagrams sitting in its socket's receive queue), which
    /// failed a CI run of the 1,000-datagram echo test although the tunnel had delivered them.
    pub(crate) fn serve_udp_echo(&self) -> Process {
        let config = self.tmp().join("inetd.conf");
        fs::write(
            &config,
            "echo\tdgram\tudp\twait\troot\tinternal\necho\tdgram\tudp6\twait\troot\tinternal\n",
        )
        .expect("write inetd.conf");
        let inetd = command_path("inetd");
        // -d: stay in the foreground; -R: lift the 256-per-minute invocation limit.
        let process = self.spawn_in(
            &self.srv_ns(),
            "inetd-echo",
            &[
                inetd.to_str().expect("utf-8 path"),
                "-d",
                "-R",
                "1000000",
                config.to_str().expect("utf-8 path"),
            ],
            Vec::new(),
        );
        self.wait_listening(&self.srv_ns(), "udp", UDP_ECHO_PORT, &process);
        process
    }

    /// dnsmasq on 10.201.n.2:53 (and the server's IPv6 address), authoritative for `.test`:
    /// `web.test` and `echo.test` → 10.201.n.2 / fd00:201:n::2; other `.test` names → NXDOMAIN.
    pub(crate) fn serve_dnsmasq(&self) -> Process {
        let dir = self.tmp().join(format!(
            "dnsmasq-{}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("dnsmasq dir");
        let (v4, v6) = (self.srv_ipv4(), self.srv_ipv6());
        let log = dir.join("dnsmasq.log");
        let dnsmasq = command_path("dnsmasq");
        let args = [
            dnsmasq.to_str().expect("utf-8 path").to_owned(),
            "--keep-in-foreground".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--bind-interfaces".to_owned(),
            format!("--listen-address={v4}"),
            format!("--listen-address={v6}"),
            "--port=53".to_owned(),
            "--user=root".to_owned(),
            format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            "--local=/test/".to_owned(),
            format!("--host-record=web.test,{v4},{v6}"),
            format!("--host-record=echo.test,{v4},{v6}"),
            "--log-queries".to_owned(),
            format!("--log-facility={}", log.display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = self.spawn_in(&self.srv_ns(), "dnsmasq", &args, vec![log]);
        self.wait_listening(&self.srv_ns(), "udp", 53, &process);
        process
    }

    /// sshd on 10.201.n.2:22 accepting root with a fresh client key (see [`Sshd::client_key`]).
    pub(crate) fn serve_sshd(&self) -> Sshd {
        let dir = self
            .tmp()
            .join(format!("sshd-{}", COUNTER.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).expect("sshd dir");
        let host_key = dir.join("host_ed25519");
        let client_key = dir.join("client_ed25519");
        for key in [&host_key, &client_key] {
            run(&[
                "ssh-keygen",
                "-q",
                "-N",
                "",
                "-t",
                "ed25519",
                "-C",
                "webnic-e2e",
                "-f",
                key.to_str().expect("utf-8"),
            ]);
        }
        let authorized = dir.join("authorized_keys");
        fs::copy(client_key.with_extension("pub"), &authorized).expect("authorized_keys");
        let config = format!(
            "ListenAddress {v4}\nPort 22\nHostKey {host}\nAuthorizedKeysFile {auth}\nPermitRootLogin yes\n\
             StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nUsePAM no\nPidFile {pid}\nLogLevel VERBOSE\n",
            v4 = self.srv_ipv4(),
            host = host_key.display(),
            auth = authorized.display(),
            pid = dir.join("sshd.pid").display(),
        );
        let config_path = dir.join("sshd_config");
        fs::write(&config_path, config).expect("write sshd_config");
        fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
        let sshd = command_path("sshd");
        let process = self.spawn_in(
            &self.srv_ns(),
            "sshd",
            &[
                sshd.to_str().expect("utf-8"),
                "-D",
                "-e",
                "-f",
                config_path.to_str().expect("utf-8"),
            ],
            Vec::new(),
        );
        self.wait_listening(&self.srv_ns(), "tcp", 22, &process);
        Sshd {
            process,
            client_key,
        }
    }

    // -------------------------------------------------------------------------------- gateway

    /// Starts `webnic-gateway` in the gateway namespace and waits until it is ready (it writes its
    /// certificate hash file once it listens and its TUN is up). An option in `extra_args` replaces
    /// its default (e.g. `&["--pool-v4", "10.77.0.0/29"]`); keep `--cert-hash-file`, it is how
    /// readiness is detected.
    pub(crate) fn start_gateway(&self, extra_args: &[&str]) -> GatewayProcess {
        let binary = gateway_binary();
        let dir = self.tmp().join(format!(
            "gateway-{}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("gateway dir");
        let hash_file = dir.join("hash");
        let listen = format!("{}:{GATEWAY_PORT}", self.gw_addr());
        let dns = self.srv_ipv4().to_string();
        let hash_path = hash_file.to_str().expect("utf-8 path");
        let defaults: [(&str, &str); 7] = [
            ("--listen", &listen),
            ("--pool-v4", "10.77.0.0/24"),
            ("--pool-v6", "fd00:77::/112"),
            ("--tun", "wntun0"),
            ("--dns", &dns),
            ("--cert-hash-file", hash_path),
            ("--metrics", "127.0.0.1:9100"),
        ];
        // An option given in `extra_args` replaces its default (clap refuses a repeated option).
        let overridden = |flag: &str| {
            extra_args
                .iter()
                .any(|arg| *arg == flag || arg.starts_with(&format!("{flag}=")))
        };
        let mut args = vec![binary.to_str().expect("utf-8 path")];
        for (flag, value) in defaults {
            if !overridden(flag) {
                args.extend([flag, value]);
            }
        }
        // The gateway's egress policy refuses private destinations by default: open the
        // server link, which is how every test reaches its servers.
        let allow_v4 = format!("10.201.{}.0/24", self.n);
        let allow_v6 = format!("{}::/64", self.v6_prefix());
        if !overridden("--allow-dest") {
            args.extend(["--allow-dest", &allow_v4, "--allow-dest", &allow_v6]);
        }
        args.extend_from_slice(extra_args);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.gw_ns()]);
        // A profiler around the gateway, e.g. `WEBNIC_GATEWAY_WRAPPER="heaptrack -o /tmp/gw"`.
        if let Ok(wrapper) = std::env::var("WEBNIC_GATEWAY_WRAPPER") {
            cmd.args(wrapper.split_whitespace());
        }
        cmd.args(&args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env("RUST_BACKTRACE", "1");
        let process = Process::spawn("webnic-gateway", &mut cmd, &dir, Vec::new());
        self.track(&process);

        let deadline = Instant::now() + READY_TIMEOUT;
        let cert_hash = loop {
            let content = fs::read_to_string(&hash_file).unwrap_or_default();
            let content = content.trim();
            if content.len() == 64 && content.bytes().all(|b| b.is_ascii_hexdigit()) {
                break content.to_ascii_lowercase();
            }
            if let Some(status) = process.exit_status() {
                panic!(
                    "webnic-gateway exited ({status}) before it was ready: {args:?}\n{}",
                    process.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "webnic-gateway did not write a certificate hash to {} within {READY_TIMEOUT:?}\n{}",
                hash_file.display(),
                process.logs()
            );
            thread::sleep(POLL);
        };
        GatewayProcess {
            process,
            url: format!("https://{listen}/webnic"),
            cert_hash,
            gw_ns: self.gw_ns(),
        }
    }

    /// Starts the `webnic` CLI (root namespace) against `gateway` with `args` after the global flags.
    pub(crate) fn spawn_cli(&self, gateway: &GatewayProcess, args: &[&str]) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_webnic"));
        cmd.args([
            "--gateway",
            gateway.url(),
            "--cert-hash",
            gateway.cert_hash(),
        ])
        .args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // A log file of its own per CLI process: concurrent CLIs of one kind sharing a file read
        // each other's output (the churn test once connected to another worker's `webnic
        // forward`, which was being killed).
        static SPAWNED: AtomicU64 = AtomicU64::new(0);
        let k = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let kind = args.first().copied().unwrap_or("cli");
        let name = if k == 0 {
            format!("webnic-{kind}")
        } else {
            format!("webnic-{kind}-{k}")
        };
        self.spawn_root(&name, &mut cmd)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let processes =
            std::mem::take(&mut *self.processes.lock().unwrap_or_else(|e| e.into_inner()));
        for process in processes {
            process.kill();
        }
        if self.created_srv {
            let _ = try_run(&["ip", "netns", "del", &self.srv_ns()]);
        }
        let _ = try_run(&["ip", "netns", "del", &self.gw_ns()]);
        // Deleting the namespaces destroys their veth ends and so the pairs; make sure of the root end.
        let root_link = self.link("a");
        if try_run(&["ip", "link", "show", &root_link])
            .status
            .success()
        {
            let _ = try_run(&["ip", "link", "del", &root_link]);
        }
    }
}

fn split(cmd: &str) -> Vec<&str> {
    cmd.split_whitespace().collect()
}

/// An sshd and the private key it accepts for root.
#[derive(Debug)]
pub(crate) struct Sshd {
    pub(crate) process: Process,
    client_key: PathBuf,
}

impl Sshd {
    pub(crate) fn client_key(&self) -> &Path {
        &self.client_key
    }
}

/// Path of the `webnic-gateway` binary: `$WEBNIC_GATEWAY_BIN`, or next to this test's profile dir.
pub(crate) fn gateway_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEBNIC_GATEWAY_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "WEBNIC_GATEWAY_BIN={} does not exist",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/webnic-gateway
    let profile_dir = exe
        .parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("test executable has a parent directory");
    let path = profile_dir.join("webnic-gateway");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A running gateway; killed on drop.
#[derive(Debug)]
pub(crate) struct GatewayProcess {
    pub(crate) process: Process,
    url: String,
    cert_hash: String,
    gw_ns: String,
}

impl GatewayProcess {
    /// The gateway's QUIC address (`10.200.n.1:4433`), e.g. for a relay's upstream.
    pub(crate) fn socket_addr(&self) -> SocketAddr {
        let authority = self
            .url
            .strip_prefix("https://")
            .and_then(|rest| rest.split('/').next())
            .expect("https URL");
        authority.parse().expect("gateway URL authority is ip:port")
    }

    /// `https://10.200.n.1:4433/webnic`
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Hex SHA-256 of the gateway's certificate.
    pub(crate) fn cert_hash(&self) -> &str {
        &self.cert_hash
    }

    /// The raw Prometheus text from the gateway's metrics endpoint.
    pub(crate) fn metrics_text(&self) -> String {
        let output = run_with_timeout(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.gw_ns,
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:9100/metrics",
            ]),
            Duration::from_secs(10),
        );
        assert!(
            output.status.success(),
            "fetching gateway metrics failed ({}): {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.process.logs()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// All samples, keyed by `name{labels}` exactly as exposed.
    pub(crate) fn metrics(&self) -> HashMap<String, f64> {
        parse_prometheus(&self.metrics_text())
    }

    /// One sample; panics (listing what exists) if the gateway does not expose it.
    pub(crate) fn metric(&self, key: &str) -> f64 {
        let metrics = self.metrics();
        match metrics.get(key) {
            Some(value) => *value,
            None => {
                let mut keys: Vec<_> = metrics.keys().collect();
                keys.sort();
                panic!("gateway metric `{key}` not exposed; have: {keys:?}")
            }
        }
    }

    /// Polls `key` (bounded by `timeout`) until `pred` holds; returns the last value, panics otherwise.
    pub(crate) fn wait_metric(
        &self,
        key: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metrics().get(key).copied();
            if let Some(value) = value.filter(|v| pred(*v)) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "gateway metric `{key}` = {value:?} did not reach the expected value within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Parses Prometheus text exposition: `name{labels} value [timestamp]`, comments skipped.
pub(crate) fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut metrics = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = match line.rfind('}') {
            Some(end) if line.contains('{') => (&line[..=end], &line[end + 1..]),
            _ => match line.split_once(char::is_whitespace) {
                Some(parts) => parts,
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => match other.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        metrics.insert(key.trim().to_owned(), value);
    }
    metrics
}

/// Polls (bounded) until `process` exits; returns its exit description ("exit code 0", ...).
pub(crate) fn wait_exit(process: &Process, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exit_status() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not exit within {timeout:?}\n{}",
            process.name(),
            process.logs()
        );
        thread::sleep(POLL);
    }
}

/// The packet count of the first nft rule line containing `needle` (`... counter packets N bytes M`).
pub(crate) fn nft_packets(ruleset: &str, needle: &str) -> Option<u64> {
    let line = ruleset.lines().find(|line| line.contains(needle))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "packets")?;
    words.next()?.parse().ok()
}

// ------------------------------------------------------------------------------------------------
// Client-side helpers (async)

/// Overall time limit of one end-to-end test.
pub(crate) const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Awaits `future`, panicking with `what` if it takes longer than `limit`.
pub(crate) async fn within<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: timed out after {limit:?}"),
    }
}

/// Connects a library client to `gateway` (30 s limit), panicking with the gateway's logs on error.
pub(crate) async fn connect_client(gateway: &GatewayProcess) -> webnic::Client {
    connect_client_with(gateway, |options| options).await
}

/// [`connect_client`] with options adjusted by `adjust` (e.g. link repair off).
#[allow(dead_code)]
pub(crate) async fn connect_client_with(
    gateway: &GatewayProcess,
    adjust: impl FnOnce(webnic::ConnectOptions) -> webnic::ConnectOptions,
) -> webnic::Client {
    let options = adjust(webnic::ConnectOptions::new(gateway.url()).cert_hash(gateway.cert_hash()));
    match within(
        Duration::from_secs(30),
        "Client::connect",
        webnic::Client::connect(options),
    )
    .await
    {
        Ok(client) => client,
        Err(e) => panic!(
            "Client::connect({}) failed: {e}\n{}",
            gateway.url(),
            gateway.process.logs()
        ),
    }
}

/// An impairment relay (`webnic-impair`) on 127.0.0.1 in front of `gateway`, applying `spec` both
/// ways with `seed`; returns it and the session URL that goes through it.
pub(crate) async fn start_relay(
    gateway: &GatewayProcess,
    spec: &str,
    seed: u64,
) -> (webnic_impair::Relay, String) {
    let impairment: webnic_impair::Impairment = spec.parse().expect("impairment spec");
    let relay = webnic_impair::Relay::start(
        "127.0.0.1:0".parse().expect("address"),
        gateway.socket_addr(),
        impairment.clone(),
        impairment,
        seed,
    )
    .await
    .expect("start the impairment relay");
    let url = format!("https://{}/webnic", relay.local_addr());
    (relay, url)
}

/// Opens a TCP connection through `client`, writes `data` (in a separate task) then half-closes,
/// and reads everything the peer sends until its FIN.
pub(crate) async fn tcp_exchange(
    client: &webnic::Client,
    remote: SocketAddr,
    data: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let stream = client.tcp_connect(remote).await?;
    stream_exchange(stream, data).await
}

/// Writes `data` to `stream` (in a separate task) then half-closes; reads until the peer's FIN.
pub(crate) async fn stream_exchange(
    stream: webnic::TcpStream,
    data: Vec<u8>,
) -> io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut reader, mut writer) = tokio::io::split(stream);
    let expected = data.len();
    let write = tokio::spawn(async move {
        writer.write_all(&data).await?;
        writer.shutdown().await?;
        Ok::<_, io::Error>(writer)
    });
    let mut received = Vec::with_capacity(expected);
    reader.read_to_end(&mut received).await?;
    let _writer = write.await.map_err(io::Error::other)??;
    Ok(received)
}

/// Asserts `received` is byte-exact `sent`, reporting lengths and hashes (not megabytes of bytes).
#[track_caller]
pub(crate) fn assert_same_bytes(received: &[u8], sent: &[u8], what: &str) {
    assert_eq!(received.len(), sent.len(), "{what}: length differs");
    assert_eq!(
        sha256_hex(received),
        sha256_hex(sent),
        "{what}: sha256 differs"
    );
}

/// A P-256 certificate and key (what browsers accept for pinning), so a restarted gateway keeps
/// the certificate hash the client pinned (browsers pin certificates valid for at most 14 days).
pub(crate) fn p256_certificate(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "10"])
        .args(["-subj", "/CN=webnic-test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

/// Gateway arguments for a gateway that can be restarted under its clients: a P-256 certificate
/// (the same hash after the restart) and a lease file (the sessions' addresses survive it).
/// Returns the arguments and the lease file's path.
pub(crate) fn restartable_gateway_args(dir: &Path) -> (Vec<String>, PathBuf) {
    let (cert, key) = p256_certificate(dir);
    let leases = dir.join("leases.txt");
    let args = vec![
        "--cert".to_owned(),
        cert,
        "--key".to_owned(),
        key,
        "--lease-file".to_owned(),
        leases.to_str().expect("UTF-8 path").to_owned(),
    ];
    (args, leases)
}

/// A complete IPv4/UDP packet with correct header and UDP checksums.
pub(crate) fn udp_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 17, 0, 0]); // id, DF, TTL, UDP, checksum
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let header_sum = checksum(&packet[..20], 0);
    packet[10..12].copy_from_slice(&header_sum.to_be_bytes());

    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let mut sum = checksum(&udp, sum_words(&pseudo));
    if sum == 0 {
        sum = 0xffff;
    }
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(&udp);
    packet
}

pub(crate) fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

/// The Internet checksum of `data`, starting from the partial sum `initial`.
pub(crate) fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial + sum_words(data);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A wtransport client endpoint that trusts the gateway's self-signed certificate: for tests that
/// speak the protocol without the webnic client library.
pub(crate) fn wtransport_client(
    gateway: &GatewayProcess,
) -> wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client> {
    let hash = gateway.cert_hash();
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hash[2 * i..2 * i + 2], 16).expect("hex certificate hash");
    }
    let config = wtransport::ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([wtransport::tls::Sha256Digest::new(digest)])
        .build();
    wtransport::Endpoint::client(config).expect("client endpoint")
}
