//! A real guest network stack behind the Ethernet adapter: `webnic tap` opens a TAP device, the
//! test moves it into a fresh namespace, and that namespace's kernel is the guest. It gets its
//! IPv4 address from the adapter's DHCP server (busybox `udhcpc`), its IPv6 address by SLAAC
//! from the adapter's router advertisement, resolves a name through dnsmasq in the server
//! namespace and fetches a 4 MiB file from nginx, byte-exact, over both families; iperf3
//! measures the guest's TCP throughput through the adapter and the tunnel.
//!
//! ```text
//!  wn{n}e (guest: kernel TCP/IP, udhcpc, curl, iperf3)
//!     wn{n}t TAP ── fd ── `webnic tap` (root namespace) ══ WebTransport ══ gateway wn{n}g ── server wn{n}s
//! ```
//!
//! Run with `--nocapture` to see the DHCP exchange as the adapter and the guest saw it, and the
//! throughput figures.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    GatewayProcess, Process, Topology, assert_same_bytes, find_command, free_local_port, run,
    run_with_timeout, seeded_bytes, sha256_hex, try_run, wait_tcp_accepting,
};

const FILE_LEN: usize = 4 * 1024 * 1024;
const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: &str = "5";

/// The guest's namespace; deleted on drop (the TAP goes with its fd, when `webnic tap` exits).
struct GuestNamespace(String);

impl GuestNamespace {
    fn new(name: String) -> Self {
        let _ = try_run(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name]);
        Self(name)
    }
}

impl Drop for GuestNamespace {
    fn drop(&mut self) {
        let _ = try_run(&["ip", "netns", "del", &self.0]);
    }
}

/// Busybox must be there: `scripts/test.sh` installs it. Missing is a failure, never a skip.
fn require_guest_tools() {
    let missing: Vec<&str> = ["busybox", "iperf3", "curl"]
        .into_iter()
        .filter(|cmd| find_command(cmd).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "e2e_tap needs {missing:?}: `sudo scripts/test.sh` installs them (apt: busybox iperf3 curl)"
    );
}

/// Runs `args` in the guest namespace; panics with the output unless it succeeds.
fn guest_run(topo: &Topology, ns: &str, args: &[&str], timeout: Duration) -> String {
    let output = topo.netns_exec(ns, args, timeout);
    assert!(
        output.status.success(),
        "`{}` in the guest failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The udhcpc hook: logs every call with what the server handed out, and configures the link
/// like a distribution's script would (address, MTU, default route).
fn write_udhcpc_script(path: &Path, log: &Path) {
    let script = format!(
        "#!/bin/sh\n\
         echo \"$1 ip=$ip subnet=$subnet router=$router dns=$dns mtu=$mtu lease=$lease serverid=$serverid\" >> {log}\n\
         case \"$1\" in\n\
         bound|renew)\n\
         \tip -4 addr flush dev \"$interface\"\n\
         \tip addr add \"$ip/$subnet\" dev \"$interface\"\n\
         \t[ -n \"$mtu\" ] && ip link set dev \"$interface\" mtu \"$mtu\"\n\
         \tip route replace default via \"$router\" dev \"$interface\"\n\
         \t;;\n\
         esac\n\
         echo \"done $1\" >> {log}\n\
         exit 0\n",
        log = log.display()
    );
    fs::write(path, script).expect("write udhcpc script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod udhcpc script");
}

/// Starts `webnic tap --dev NAME` and waits until the TAP exists.
fn start_tap(topo: &Topology, gateway: &GatewayProcess, dev: &str) -> Process {
    let tap = spawn_webnic(topo, gateway, &["tap", "--dev", dev]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if try_run(&["ip", "link", "show", "dev", dev])
            .status
            .success()
        {
            return tap;
        }
        if let Some(status) = tap.exit_status() {
            panic!(
                "webnic tap exited ({status}) before creating {dev}\n{}",
                tap.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "webnic tap did not create {dev} within 20 s\n{}",
            tap.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until udhcpc's hook has logged `event`; returns the whole hook log.
fn wait_hook(log: &Path, event: &str, udhcpc: &Process, tap: &Process) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hooks = fs::read_to_string(log).unwrap_or_default();
        // The hook logs `done EVENT` once it has configured the link.
        if hooks.lines().any(|l| l == format!("done {event}")) {
            return hooks;
        }
        assert!(
            Instant::now() < deadline && udhcpc.exit_status().is_none(),
            "udhcpc did not report `{event}` within 30 s: {hooks}\n{}\n{}",
            udhcpc.logs(),
            tap.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `key=value` from the udhcpc hook's log line for `event`.
fn hook_value<'a>(log: &'a str, event: &str, key: &str) -> &'a str {
    let line = log
        .lines()
        .find(|l| l.starts_with(event))
        .unwrap_or_else(|| panic!("no `{event}` call of the udhcpc script in:\n{log}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in `{line}`"))
}

/// Waits for the guest's SLAAC address in the advertised prefix.
fn wait_slaac_address(topo: &Topology, ns: &str, dev: &str, tap: &Process) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = guest_run(
            topo,
            ns,
            &[
                "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "global",
            ],
            Duration::from_secs(10),
        );
        // Tentative addresses (still in DAD) cannot be used yet.
        if let Some(addr) = out
            .lines()
            .filter(|l| !l.contains("tentative"))
            .find_map(|l| l.split_whitespace().nth(3))
        {
            return addr.split('/').next().unwrap_or(addr).to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the guest got no IPv6 address from the router advertisement within 20 s: {out}\n{}",
            tap.logs()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Downloads `url` in the guest with curl and checks it byte for byte; returns the rate curl saw.
fn guest_fetch(topo: &Topology, ns: &str, url: &str, extra: &[&str], expected: &[u8]) -> f64 {
    let out_path = topo.tmp().join(format!("fetched-{}", expected.len()));
    let _ = fs::remove_file(&out_path);
    let out = out_path.to_str().expect("utf-8 path");
    let mut args = vec![
        "curl",
        "-sS",
        "--max-time",
        "120",
        "-o",
        out,
        "-w",
        "%{speed_download}",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    let speed = guest_run(topo, ns, &args, Duration::from_secs(130));
    let received = fs::read(&out_path).expect("curl wrote the file");
    assert_same_bytes(&received, expected, url);
    assert_eq!(sha256_hex(&received), sha256_hex(expected), "{url} sha256");
    speed.trim().parse::<f64>().unwrap_or(0.0)
}

/// Runs an iperf3 client (through `client`, which runs a command and returns its stdout) against
/// an iperf3 server in the server namespace; returns the receiver's Mbit/s.
fn iperf(
    topo: &Topology,
    client: impl Fn(&[&str]) -> String,
    server: &str,
    port: u16,
    reverse: bool,
) -> f64 {
    let srv = topo.spawn_in(
        &topo.srv_ns(),
        "iperf3-server",
        &["iperf3", "-s", "-1", "-p", &IPERF_PORT.to_string()],
        Vec::new(),
    );
    topo.wait_listening(&topo.srv_ns(), "tcp", IPERF_PORT, &srv);
    let port = port.to_string();
    let mut args = vec![
        "iperf3",
        "-c",
        server,
        "-p",
        &port,
        "-t",
        IPERF_SECONDS,
        "-J",
    ];
    if reverse {
        args.push("-R");
    }
    let json = client(&args);
    let received = json
        .split("\"sum_received\"")
        .nth(1)
        .unwrap_or_else(|| panic!("iperf3 JSON has sum_received: {json}"));
    let bps: f64 = received
        .split("\"bits_per_second\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|n| n.trim().parse().ok())
        .expect("iperf3 JSON has bits_per_second");
    bps / 1e6
}

/// Starts the `webnic` CLI: `$WEBNIC_CLI_BIN` when set (e.g. a release build, for figures),
/// else the one cargo built for this test.
fn spawn_webnic(topo: &Topology, gateway: &GatewayProcess, args: &[&str]) -> Process {
    let Some(binary) = std::env::var_os("WEBNIC_CLI_BIN") else {
        return topo.spawn_cli(gateway, args);
    };
    let mut cmd = Command::new(binary);
    cmd.args([
        "--gateway",
        gateway.url(),
        "--cert-hash",
        gateway.cert_hash(),
    ])
    .args(args)
    .env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    topo.spawn_root(&format!("webnic-{}", args[0]), &mut cmd)
}

#[test]
fn kernel_guest_on_a_tap_gets_dhcp_resolves_and_fetches_through_the_adapter() {
    require_guest_tools();
    let topo = Topology::new();
    let n = topo.n();
    let www = topo.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let file = seeded_bytes(0x7a9_0007, FILE_LEN);
    fs::write(www.join("guest.bin"), &file).expect("write the file");
    let _nginx = topo.serve_nginx(&www);
    let _dnsmasq = topo.serve_dnsmasq();
    let gateway = topo.start_gateway(&[]);

    let dev = format!("wn{n}t");
    let guest = GuestNamespace::new(format!("wn{n}e"));
    let ns = guest.0.as_str();
    let tap = start_tap(&topo, &gateway, &dev);
    run(&["ip", "link", "set", &dev, "netns", ns]);
    guest_run(
        &topo,
        ns,
        &["ip", "link", "set", "lo", "up"],
        Duration::from_secs(10),
    );
    guest_run(
        &topo,
        ns,
        &["ip", "link", "set", &dev, "up"],
        Duration::from_secs(10),
    );

    // ---- IPv4 by DHCP
    let script = topo.tmp().join("udhcpc.sh");
    let hook_log = topo.tmp().join("udhcpc.log");
    write_udhcpc_script(&script, &hook_log);
    // udhcpc stays in the foreground (no -q) so it can renew later, like a guest's client does.
    let udhcpc = topo.spawn_in(
        ns,
        "udhcpc",
        &[
            "busybox",
            "udhcpc",
            "-i",
            &dev,
            "-f",
            "-t",
            "5",
            "-T",
            "2",
            "-s",
            script.to_str().expect("utf-8 path"),
        ],
        Vec::new(),
    );
    let hooks = wait_hook(&hook_log, "bound", &udhcpc, &tap);
    println!("--- udhcpc script calls:\n{hooks}");
    let ip = hook_value(&hooks, "bound", "ip");
    assert!(
        ip.starts_with("10.77.0."),
        "address from the gateway's pool: {ip}"
    );
    assert_eq!(hook_value(&hooks, "bound", "subnet"), "255.255.255.0");
    assert_eq!(hook_value(&hooks, "bound", "router"), "10.77.0.1");
    assert_eq!(hook_value(&hooks, "bound", "serverid"), "10.77.0.1");
    assert_eq!(hook_value(&hooks, "bound", "lease"), "3600");
    let dns = hook_value(&hooks, "bound", "dns").to_owned();
    assert_eq!(dns, topo.srv_ipv4().to_string(), "the gateway's resolver");
    let mtu: u16 = hook_value(&hooks, "bound", "mtu")
        .parse()
        .expect("mtu option");
    // The session MTU (1152) raised to IPv6's minimum: the session has IPv6 too.
    assert!((1280..=1500).contains(&mtu), "link MTU {mtu}");

    // ---- a name through dnsmasq, over the tunnel
    let answer = guest_run(
        &topo,
        ns,
        &["busybox", "nslookup", "web.test", &dns],
        Duration::from_secs(20),
    );
    let srv_v4 = topo.srv_ipv4().to_string();
    // "Address: X" is an answer; the server's own line reads "Address:\tX:53".
    assert!(
        answer.contains(&format!("Address: {srv_v4}")),
        "web.test should resolve to {srv_v4}: {answer}"
    );
    println!("--- nslookup web.test in the guest:\n{answer}");

    // ---- 4 MiB from nginx, byte-exact
    let resolve = format!("web.test:80:{srv_v4}");
    let rate = guest_fetch(
        &topo,
        ns,
        "http://web.test/guest.bin",
        &["--resolve", &resolve],
        &file,
    );
    println!(
        "guest IPv4 fetch: 4 MiB byte-exact at {:.1} MB/s",
        rate / 1e6
    );

    // ---- a real renewal: SIGUSR1 makes udhcpc send a unicast REQUEST from its address
    // SAFETY: kill(2) on the pid of the udhcpc this test started (`ip netns exec` execs it).
    let signalled = unsafe { libc::kill(udhcpc.pid() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(signalled, 0, "signal udhcpc");
    let hooks = wait_hook(&hook_log, "renew", &udhcpc, &tap);
    assert_eq!(
        hook_value(&hooks, "renew", "ip"),
        ip,
        "same address renewed"
    );
    assert_eq!(hook_value(&hooks, "renew", "lease"), "3600");

    // ---- IPv6 by router advertisement (the gateway has a v6 pool)
    let v6 = wait_slaac_address(&topo, ns, &dev, &tap);
    assert!(
        v6.starts_with("fd00:77:"),
        "SLAAC address in the session's /64: {v6}"
    );
    let url6 = format!("http://[{}]/guest.bin", topo.srv_ipv6());
    let rate6 = guest_fetch(&topo, ns, &url6, &["-6"], &file);
    println!(
        "guest IPv6 ({v6}) fetch: 4 MiB byte-exact at {:.1} MB/s",
        rate6 / 1e6
    );

    // ---- guest TCP throughput through the adapter
    let in_guest = |args: &[&str]| guest_run(&topo, ns, args, Duration::from_secs(60));
    let up = iperf(&topo, in_guest, &srv_v4, IPERF_PORT, false);
    let down = iperf(&topo, in_guest, &srv_v4, IPERF_PORT, true);
    println!(
        "guest kernel TCP through the adapter (iperf3 -t {IPERF_SECONDS}): up {up:.0} Mbit/s, down {down:.0} Mbit/s"
    );
    assert!(
        up > 1.0 && down > 1.0,
        "iperf3 moved data: up {up} down {down}"
    );

    // The same transfer through the native client's own stack (smoltcp, like a page's), over a
    // second session of the same gateway: `webnic forward` to the iperf3 server.
    let local = free_local_port();
    let forward = spawn_webnic(
        &topo,
        &gateway,
        &[
            "forward",
            &format!("127.0.0.1:{local}={srv_v4}:{IPERF_PORT}"),
        ],
    );
    wait_tcp_accepting(
        SocketAddr::from(([127, 0, 0, 1], local)),
        Duration::from_secs(20),
        &forward,
    );
    let in_root = |args: &[&str]| {
        let output = run_with_timeout(
            Command::new(args[0]).args(&args[1..]),
            Duration::from_secs(60),
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let stack_up = iperf(&topo, in_root, "127.0.0.1", local, false);
    let stack_down = iperf(&topo, in_root, "127.0.0.1", local, true);
    println!(
        "same gateway, the client's own stack (webnic forward, iperf3 -t {IPERF_SECONDS}): up {stack_up:.0} Mbit/s, down {stack_down:.0} Mbit/s"
    );
    drop(forward);

    // ---- what the adapter saw
    let logs = tap.stderr();
    println!("--- webnic tap (adapter):\n{logs}");
    println!("--- udhcpc (guest):\n{}", udhcpc.logs());
    // One ACK selecting, at least one renewing: busybox sometimes binds its renewal socket only
    // after the (immediate) unicast ACK arrived, and then asks again by broadcast.
    assert!(
        logs.matches("-> Ack 10.77.0.").count() >= 2,
        "an ACK selecting and one renewing:\n{logs}"
    );
    for needle in [
        "DHCP Discover",
        "-> Offer 10.77.0.",
        "DHCP Request",
        "-> Ack 10.77.0.",
        "guest IPv6 address fd00:77:",
    ] {
        assert!(
            logs.contains(needle),
            "adapter log lacks {needle:?}:\n{logs}"
        );
    }
    drop(tap);
    drop(guest);
}
