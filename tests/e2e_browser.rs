//! End-to-end in a real browser: headless Chromium (Debian's `chromium`, driven by playwright-core)
//! loads `tests/browser/page.html`, which uses the wasm client (`wasm-client/pkg`, built by
//! `scripts/build-wasm.sh`) to reach servers in the server namespace through the gateway.
//!
//! The page is served from 127.0.0.1 by a small static server in this test: that origin is a
//! secure context (WebTransport, `crypto.subtle`) and the gateway's default origin policy allows it.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    TCP_ECHO_PORT, Topology, find_command, nft_packets, random_bytes, require_prerequisites,
    sha256_hex, wait_exit,
};

/// What the page may take for one test function (session, transfer, hashing).
const PAGE_TIMEOUT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Panics, naming what is missing, unless Chromium, Node, playwright-core and the built package
/// are there: `sudo scripts/test.sh` installs and builds them.
fn require_browser() {
    let mut missing = Vec::new();
    if !Path::new("/usr/bin/chromium").exists() {
        missing.push("/usr/bin/chromium (apt package `chromium`)".to_owned());
    }
    if find_command("node").is_none() {
        missing.push("command `node`".to_owned());
    }
    for path in [
        "wasm-client/node_modules/playwright-core/package.json",
        "wasm-client/pkg/webnic_wasm.js",
        "wasm-client/pkg/webnic_wasm_bg.wasm",
    ] {
        if !repo().join(path).exists() {
            missing.push(path.to_owned());
        }
    }
    assert!(
        missing.is_empty(),
        "browser test prerequisites missing: {} (run `sudo scripts/test.sh`, which installs \
         chromium and the npm packages and runs scripts/build-wasm.sh)",
        missing.join(", ")
    );
}

/// A static file server on 127.0.0.1 for the test page, `wasm-client/js` and `wasm-client/pkg`;
/// it stops when dropped.
struct PageServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PageServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        // One short-lived thread per connection: Chromium opens several at once.
                        thread::spawn(move || serve_one(stream));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers the requests of one connection (keep-alive) until the client closes it or idles.
fn serve_one(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    for _ in 0..100 {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let path = path.split('?').next().unwrap_or(path);
        let (status, content_type, body) = match resolve(path) {
            Some(file) => match fs::read(&file) {
                Ok(body) => ("200 OK", content_type(&file), body),
                Err(_) => ("404 Not Found", "text/plain", b"not found".to_vec()),
            },
            None => ("404 Not Found", "text/plain", b"not found".to_vec()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\n\r\n",
            body.len()
        );
        if writer.write_all(head.as_bytes()).is_err() || writer.write_all(&body).is_err() {
            return;
        }
    }
}

/// Maps a URL path to a file, only inside the three served directories.
fn resolve(path: &str) -> Option<PathBuf> {
    if path.contains("..") {
        return None;
    }
    if path == "/page.html" {
        return Some(repo().join("tests/browser/page.html"));
    }
    // The benchmark's wisp-js client (scripts/bench-browser.sh installs it).
    if let (Some(rest), Some(bench)) = (
        path.strip_prefix("/bench/wisp/"),
        std::env::var_os("WEBNIC_BENCH_DIR"),
    ) {
        return Some(
            PathBuf::from(bench)
                .join("node_modules/@mercuryworkshop/wisp-js")
                .join(rest),
        );
    }
    for prefix in ["/js/", "/pkg/", "/demo/"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            return Some(repo().join("wasm-client").join(&prefix[1..]).join(rest));
        }
    }
    None
}

fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript",
        Some("wasm") => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// Runs page function `name` with `arg` (JSON) in headless Chromium; returns its JSON result.
/// Panics with the page's console when it fails.
fn run_in_page(topology: &Topology, server: &PageServer, name: &str, arg: &str) -> String {
    run_in_page_for(topology, server, name, arg, PAGE_TIMEOUT)
}

/// [`run_in_page`] with its own time limit.
fn run_in_page_for(
    topology: &Topology,
    server: &PageServer,
    name: &str,
    arg: &str,
    timeout: Duration,
) -> String {
    run_in_page_with_flags(topology, server, name, arg, timeout, &[])
}

/// [`run_in_page_for`] in a Chromium started with extra `flags`.
fn run_in_page_with_flags(
    topology: &Topology,
    server: &PageServer,
    name: &str,
    arg: &str,
    timeout: Duration,
    flags: &[String],
) -> String {
    let (page, out_path) = spawn_page_with_flags(topology, server, name, arg, timeout, flags);
    page_result_for(&page, &out_path, timeout)
}

/// Starts page function `name` in the background (for tests that act while it runs); returns
/// the process and the file its stdout goes to.
fn spawn_page(
    topology: &Topology,
    server: &PageServer,
    name: &str,
    arg: &str,
) -> (common::Process, PathBuf) {
    spawn_page_with_flags(topology, server, name, arg, PAGE_TIMEOUT, &[])
}

/// [`spawn_page`] with its own time limit (run.mjs enforces it and closes Chromium), in a
/// Chromium started with extra `flags` (run.mjs reads them as a JSON array from
/// `WEBNIC_CHROMIUM_ARGS`).
fn spawn_page_with_flags(
    topology: &Topology,
    server: &PageServer,
    name: &str,
    arg: &str,
    timeout: Duration,
    flags: &[String],
) -> (common::Process, PathBuf) {
    let mut cmd = Command::new(find_command("node").expect("node"));
    cmd.arg(repo().join("tests/browser/run.mjs"))
        .arg(server.url("/page.html"))
        .arg(name)
        .arg(arg)
        .arg(timeout.as_millis().to_string());
    if !flags.is_empty() {
        assert!(
            flags.iter().all(|f| !f.contains(['"', '\\'])),
            "flags are passed as a JSON array without escaping: {flags:?}"
        );
        let json = flags
            .iter()
            .map(|f| format!("\"{f}\""))
            .collect::<Vec<_>>()
            .join(",");
        cmd.env("WEBNIC_CHROMIUM_ARGS", format!("[{json}]"));
    }
    let page = topology.spawn_root(&format!("browser-{name}"), &mut cmd);
    (page, topology.tmp().join(format!("browser-{name}.out")))
}

/// base64(sha256(SubjectPublicKeyInfo)) of the PEM certificate at `cert`, the form Chromium's
/// `--ignore-certificate-errors-spki-list` takes (computed with openssl, as Chromium documents).
fn spki_sha256_base64(cert: &Path) -> String {
    let pipeline = format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der \
         | openssl dgst -sha256 -binary | base64",
        cert.display()
    );
    let output = Command::new("bash")
        .args(["-o", "pipefail", "-c", &pipeline])
        .output()
        .expect("run openssl");
    let spki = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    assert!(
        output.status.success() && spki.len() == 44,
        "openssl gave no SPKI hash for {}: {spki:?} {}",
        cert.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    spki
}

/// Waits (at most 60 s) for the page's first `WEBNIC_READY <detail>` line; returns the detail.
fn wait_page_ready(page: &common::Process, out_path: &Path, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = fs::read_to_string(out_path).unwrap_or_default();
        if let Some(line) = out.lines().find_map(|l| l.strip_prefix("WEBNIC_READY ")) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline && page.exit_status().is_none(),
            "the page never reported {what}\n{}",
            page.logs()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a page started by [`spawn_page`] to finish; returns its result.
fn page_result(page: &common::Process, out_path: &Path) -> String {
    page_result_for(page, out_path, PAGE_TIMEOUT)
}

/// [`page_result`] for a page started with its own time limit.
fn page_result_for(page: &common::Process, out_path: &Path, timeout: Duration) -> String {
    // run.mjs enforces the timeout itself and closes Chromium; this bound is the backstop.
    let status = wait_exit(page, timeout + Duration::from_secs(30));
    let stdout = fs::read_to_string(out_path).unwrap_or_default();
    // The page's console (and the profile with WEBNIC_PROFILE=1), shown with --nocapture.
    eprintln!("{}", page.stderr());
    let result = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .map(str::to_owned);
    match result {
        Some(json) if status == "exit code 0" => json,
        _ => panic!("page function failed ({status})\n{}", page.logs()),
    }
}

/// The value of `"key":` in a flat JSON object, as its raw text (strings without quotes).
fn json_field<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &json[start..];
    if let Some(string) = rest.strip_prefix('"') {
        return string.split('"').next();
    }
    rest.split([',', '}']).next()
}

/// nginx in the server namespace serving `size` random bytes as `/name`; returns the bytes.
fn serve_random_file(topology: &Topology, name: &str, size: usize) -> (Vec<u8>, common::Process) {
    let www = topology.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let data = random_bytes(size);
    fs::write(www.join(name), &data).expect("write the served file");
    let nginx = topology.serve_nginx(&www);
    (data, nginx)
}

/// `TCPSocket` GET of a 4 MiB random file from nginx in the server namespace: the sha256 the
/// page computes equals the file's.
#[test]
fn browser_tcp_get_4_mib_sha256() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let (data, _nginx) = serve_random_file(&topology, "random.bin", 4 << 20);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    let free_key = "webnic_pool_addresses_free{family=\"ipv4\"}";
    let free_before = gateway.metric(free_key);

    let started = Instant::now();
    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","host":"{}","port":80,"path":"/random.bin"}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topology.srv_ipv4()
    );
    let result = run_in_page(&topology, &server, "httpGetSha256", &arg);
    println!("page result after {:?}: {result}", started.elapsed());

    assert_eq!(
        json_field(&result, "status"),
        Some("HTTP/1.1 200 OK"),
        "{result}"
    );
    assert_eq!(
        json_field(&result, "bodyLength"),
        Some(data.len().to_string().as_str()),
        "{result}"
    );
    assert_eq!(
        json_field(&result, "sha256"),
        Some(sha256_hex(&data).as_str()),
        "the page received different bytes: {result}"
    );
    assert_eq!(
        json_field(&result, "remoteAddress"),
        Some(topology.srv_ipv4().to_string().as_str()),
        "{result}"
    );
    let address = json_field(&result, "address").unwrap_or_default();
    assert!(
        address.starts_with("10.77.0."),
        "the session's address {address:?} is not from the pool 10.77.0.0/24: {result}"
    );
    assert_eq!(
        json_field(&result, "localAddress"),
        Some(address),
        "{result}"
    );
    // The page called nic.close() and Chromium has exited: the session is gone and the gateway
    // took the address back.
    assert_eq!(
        gateway.metric("webnic_sessions_total"),
        1.0,
        "one page session"
    );
    gateway.wait_metric("webnic_sessions_active", Duration::from_secs(10), |n| {
        n == 0.0
    });
    gateway.wait_metric(free_key, Duration::from_secs(10), |free| {
        (free - free_before).abs() < 0.5
    });
}

/// The stream link (PROTOCOL.md §3.2): a page that asks for it gets its packets on a QUIC
/// stream; a 4 MiB GET is byte-exact in a Window and in a Worker, every packet of it came on the
/// stream (none as a sequenced datagram), and the gateway counted both sessions.
#[test]
fn browser_tcp_get_over_the_stream_link() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let (data, _nginx) = serve_random_file(&topology, "random.bin", 4 << 20);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    for worker in [false, true] {
        let arg = format!(
            r#"{{"gateway":"{}","certHash":"{}","host":"{}","port":80,"path":"/random.bin","worker":{worker},"linkStream":true}}"#,
            gateway.url(),
            gateway.cert_hash(),
            topology.srv_ipv4()
        );
        let result = run_in_page(&topology, &server, "httpGetSha256", &arg);
        println!("worker {worker}: {result}");
        assert_eq!(
            json_field(&result, "sha256"),
            Some(sha256_hex(&data).as_str()),
            "the page received different bytes (worker {worker}): {result}"
        );
        let number = |name: &str| -> f64 {
            json_field(&result, name)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0)
        };
        let on_stream = number("linkStreamPackets");
        assert!(
            on_stream > 0.0 && on_stream == number("packetsReceived"),
            "every packet must come on the stream link (worker {worker}): {result}"
        );
        // The gateway's TUN offload hands nginx's TSO bursts over whole and the page takes
        // them: 4 MiB cut at the link MTU (1152) would be over 3,600 packets.
        assert!(
            on_stream < 3600.0,
            "the page got {on_stream} packets: not coalesced (worker {worker}): {result}"
        );
        assert_eq!(
            json_field(&result, "linkSequenced"),
            Some("0"),
            "no link repair on the stream link: {result}"
        );
    }
    assert!(gateway.metric("webnic_coalesced_to_client_total") > 0.0);
    // The pages' own packets (the request, the ACKs) went on their uplink streams.
    assert!(gateway.metric("webnic_uplink_stream_packets_total") > 0.0);
    assert_eq!(gateway.metric("webnic_link_stream_sessions_total"), 2.0);
}

/// 16 MiB through the socat TCP echo, written and read concurrently by the page: byte-exact
/// (the sha256 of what the page sent equals that of what came back), after one-byte pings.
#[test]
fn browser_tcp_echo_16_mib() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();

    let bytes = 16 << 20;
    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","host":"{}","port":{TCP_ECHO_PORT},"bytes":{bytes},"pings":20}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topology.srv_ipv4()
    );
    let result = run_in_page(&topology, &server, "tcpEcho", &arg);
    println!("page result: {result}");
    assert_echo_byte_exact(&result, bytes, "");
}

/// Asserts that the `tcpEcho` page function got back all `bytes` it sent, byte-exact (the
/// sha256 of what it sent equals that of what came back); `context` goes into the failure.
fn assert_echo_byte_exact(result: &str, bytes: usize, context: &str) {
    assert_eq!(
        json_field(result, "receivedLength"),
        Some(bytes.to_string().as_str()),
        "{result}\n{context}"
    );
    let sent = json_field(result, "sentSha256").expect("sentSha256");
    assert_eq!(sent.len(), 64, "{result}");
    assert_eq!(
        json_field(result, "receivedSha256"),
        Some(sent),
        "the echo differs from what the page sent: {result}\n{context}"
    );
}

/// A page's TCP connection survives a gateway restart: the page echoes 8 MiB through socat; once
/// 1 MiB came back the gateway gets SIGTERM (it tells the page, parks the session's lease and
/// writes it to its lease file) and a new gateway process starts with the same certificate and
/// lease file. The page resumes its session with the gateway's ticket and the same address, and
/// the echo completes byte-exact. In both modes (the page's thread and a Worker).
#[test]
fn browser_tcp_survives_a_gateway_restart() {
    require_prerequisites();
    require_browser();
    for worker in [false, true] {
        tcp_survives_a_gateway_restart(worker);
    }
}

fn tcp_survives_a_gateway_restart(worker: bool) {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let (args, leases) = common::restartable_gateway_args(topology.tmp());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = topology.start_gateway(&args);
    let server = PageServer::start();
    let bytes = 8 << 20;
    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","host":"{}","port":{TCP_ECHO_PORT},"bytes":{bytes},"pings":0,"worker":{worker},"announceAfter":{}}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topology.srv_ipv4(),
        1 << 20
    );
    let (page, out_path) = spawn_page(&topology, &server, "tcpEcho", &arg);
    wait_page_ready(&page, &out_path, "its echo under way");

    gateway.process.kill();
    assert!(
        wait_exit(&gateway.process, Duration::from_secs(15)).contains("exit"),
        "{}",
        gateway.process.logs()
    );
    let saved = fs::read_to_string(&leases).expect("lease file written on shutdown");
    assert!(
        saved.contains("10.77.0."),
        "no lease in the lease file: {saved}"
    );
    let restarted = topology.start_gateway(&args);
    assert_eq!(
        restarted.cert_hash(),
        gateway.cert_hash(),
        "the certificate changed"
    );

    let result = page_result(&page, &out_path);
    println!("worker {worker}: page result: {result}");
    assert_eq!(
        json_field(&result, "worker"),
        Some(worker.to_string().as_str()),
        "{result}"
    );
    assert_echo_byte_exact(&result, bytes, &restarted.process.logs());
    assert_eq!(json_field(&result, "reconnects"), Some("1"), "{result}");
    assert!(
        restarted.process.logs().contains("restored session leases"),
        "{}",
        restarted.process.logs()
    );
}

/// The demo page, driven like a user: connect, speed-test a 4 MiB download from nginx; the page
/// reports the full size, and a screenshot is saved next to the test's output
/// (`target/browser-demo.png`).
#[test]
fn browser_demo_speed_test_screenshot() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let (_data, _nginx) = serve_random_file(&topology, "speed.bin", 4 << 20);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();

    let screenshot = repo().join("target/browser-demo.png");
    let _ = fs::remove_file(&screenshot);
    let mut cmd = Command::new(find_command("node").expect("node"));
    cmd.arg(repo().join("tests/browser/demo.mjs"))
        .arg(server.url(&format!(
            "/demo/index.html?gateway={}&hash={}",
            gateway.url(),
            gateway.cert_hash()
        )))
        .arg(format!("{}:80/speed.bin", topology.srv_ipv4()))
        .arg(&screenshot)
        .arg(PAGE_TIMEOUT.as_millis().to_string());
    let process = topology.spawn_root("browser-demo", &mut cmd);
    let status = wait_exit(&process, PAGE_TIMEOUT + Duration::from_secs(30));
    let stdout = fs::read_to_string(topology.tmp().join("browser-demo.out")).unwrap_or_default();
    eprintln!("{}", process.stderr());
    let result = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("the demo failed ({status})\n{}", process.logs()));
    println!("demo: {result}");
    assert!(result.starts_with("connected: 10.77.0."), "{result}");
    // The response is the 4 MiB body plus nginx's header (a few hundred bytes): "4.2 MB in".
    assert!(result.contains("| 4.2 MB in "), "{result}");
    let png = fs::read(&screenshot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
}

/// `UDPSocket`: the page builds an A query for `web.test`, sends it to dnsmasq on 10.201.n.2:53
/// and parses the answer itself, once in connected mode and once in bound mode (destination per
/// message); both addresses it found are the host record's.
#[test]
fn browser_udp_dns_query() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let dnsmasq = topology.serve_dnsmasq();
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();

    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","server":"{}","name":"web.test"}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topology.srv_ipv4()
    );
    let result = run_in_page(&topology, &server, "udpDnsQuery", &arg);
    println!("page result: {result}");
    let srv = topology.srv_ipv4().to_string();
    assert_eq!(json_field(&result, "rcode"), Some("0"), "{result}");
    assert_eq!(
        json_field(&result, "address"),
        Some(srv.as_str()),
        "the page parsed another address for web.test: {result}\n{}",
        dnsmasq.logs()
    );
    assert_eq!(
        json_field(&result, "from"),
        Some(format!("{srv}:53").as_str()),
        "{result}"
    );
    assert_eq!(
        json_field(&result, "localAddress"),
        json_field(&result, "sessionAddress"),
        "{result}"
    );
    let local_port: u16 = json_field(&result, "localPort")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no localPort: {result}"));
    assert_ne!(local_port, 0, "{result}");
    // Bound mode: the same query with the destination given per message.
    assert_eq!(
        json_field(&result, "boundAddress"),
        Some(srv.as_str()),
        "bound-mode answer: {result}"
    );
    assert_eq!(
        json_field(&result, "boundFrom"),
        Some(format!("{srv}:53").as_str()),
        "{result}"
    );
    assert_eq!(
        json_field(&result, "boundLocalPort"),
        Some("5353"),
        "{result}"
    );
    assert_eq!(
        json_field(&result, "boundLocalAddress"),
        json_field(&result, "sessionAddress"),
        "{result}"
    );
}

/// `TCPServerSocket`: the page listens; socat in the server namespace connects to the page's
/// session address and sends 1 MiB of random bytes; the page replies with the sha256 of what it
/// received, which equals the file's both in the page's result and in the reply socat wrote.
#[test]
fn browser_tcp_server_socket_1_mib() {
    const PORT: u16 = 7100;
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    let upload = random_bytes(1 << 20);
    let upload_path = topology.tmp().join("upload.bin");
    fs::write(&upload_path, &upload).expect("write upload.bin");
    let reply_path = topology.tmp().join("reply.txt");

    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","port":{PORT}}}"#,
        gateway.url(),
        gateway.cert_hash(),
    );
    let (page, out_path) = spawn_page(&topology, &server, "tcpServerSha256", &arg);
    // The page prints its listener once it is open.
    let ready = wait_page_ready(&page, &out_path, "its listener");
    let address = json_field(&ready, "address").expect("address").to_owned();
    assert!(address.starts_with("10.77.0."), "{ready}");
    assert_eq!(json_field(&ready, "localAddress"), Some(address.as_str()));
    assert_eq!(
        json_field(&ready, "localPort"),
        Some(PORT.to_string().as_str())
    );

    // socat's `!!` pairs a read address with a write address: it sends the file, half-closes,
    // and (for up to -t seconds) writes what comes back into reply.txt.
    let sender = topology.spawn_in(
        &topology.srv_ns(),
        "socat-upload",
        &[
            "socat",
            "-t",
            "30",
            &format!(
                "OPEN:{}!!CREATE:{}",
                upload_path.display(),
                reply_path.display()
            ),
            &format!("TCP:{address}:{PORT}"),
        ],
        Vec::new(),
    );
    let status = wait_exit(&sender, Duration::from_secs(60));
    assert_eq!(status, "exit code 0", "{}\n{}", sender.logs(), page.logs());
    let reply = fs::read_to_string(&reply_path).expect("socat wrote the reply");
    // A second connection tells the page that the reply arrived and it may end the session.
    let done = topology.spawn_in(
        &topology.srv_ns(),
        "socat-done",
        &[
            "socat",
            "-u",
            "OPEN:/dev/null",
            &format!("TCP:{address}:{PORT}"),
        ],
        Vec::new(),
    );
    let status = wait_exit(&done, Duration::from_secs(30));
    assert_eq!(status, "exit code 0", "{}", done.logs());

    let result = &page_result(&page, &out_path);
    println!("page result: {result}");
    assert_eq!(status, "exit code 0", "{}", page.logs());

    let expected = sha256_hex(&upload);
    assert_eq!(
        json_field(result, "receivedLength"),
        Some(upload.len().to_string().as_str()),
        "{result}"
    );
    assert_eq!(
        json_field(result, "sha256"),
        Some(expected.as_str()),
        "the page received different bytes: {result}"
    );
    assert_eq!(
        reply,
        format!("sha256 {expected}\n"),
        "the page's reply as socat received it"
    );
    let srv = topology.srv_ipv4().to_string();
    assert_eq!(json_field(result, "remoteAddress"), Some(srv.as_str()));
    assert_eq!(
        json_field(result, "secondRemoteAddress"),
        Some(srv.as_str())
    );
    assert_eq!(json_field(result, "localAddress"), Some(address.as_str()));
}

/// A socat TCP server on `port` of the server namespace that answers each connection with
/// the sha256 of everything it received (`sha256sum`'s line), once the client half-closes.
fn serve_sha256_sink(topology: &Topology, port: u16) -> common::Process {
    let listen = format!("TCP6-LISTEN:{port},ipv6only=0,fork,reuseaddr");
    let process = topology.spawn_in(
        &topology.srv_ns(),
        &format!("socat-sha256-{port}"),
        &["socat", "-t", "30", &listen, "EXEC:sha256sum"],
        Vec::new(),
    );
    topology.wait_listening(&topology.srv_ns(), "tcp", port, &process);
    process
}

/// Worker mode against Window mode in one Chromium: `runs` sessions each, alternating, each
/// doing a GET of 8 MiB from nginx (sha256 checked in the page), an upload of 8 MiB (the
/// server's sha256 checked in the page) and 50 one-byte echo round trips. Both modes must move
/// the bytes exactly; the medians are printed (docs/BROWSER.md records them).
#[test]
fn browser_window_vs_worker() {
    const SINK_PORT: u16 = 7200;
    require_prerequisites();
    require_browser();
    let runs: usize = std::env::var("WEBNIC_BROWSER_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let topology = Topology::new();
    let (data, _nginx) = serve_random_file(&topology, "random.bin", 8 << 20);
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let _sink = serve_sha256_sink(&topology, SINK_PORT);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();

    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","host":"{}","path":"/random.bin","expected":"{}","sinkPort":{SINK_PORT},"uploadBytes":{},"echoPort":{TCP_ECHO_PORT},"pings":50,"runs":{runs}}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topology.srv_ipv4(),
        sha256_hex(&data),
        8 << 20,
    );
    let result = run_in_page_for(&topology, &server, "compareModes", &arg, PAGE_TIMEOUT * 4);
    println!("page result: {result}");
    let figure = |key: &str| -> f64 {
        json_field(&result, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}: {result}"))
    };
    for key in [
        "windowGet",
        "workerGet",
        "windowUpload",
        "workerUpload",
        "windowRttMs",
        "workerRttMs",
    ] {
        let value = figure(key);
        assert!(
            value.is_finite() && value > 0.0,
            "{key} = {value}: {result}"
        );
    }
    println!(
        "median of {runs}: GET 8 MiB window {:.1} MB/s, worker {:.1} MB/s; upload 8 MiB window {:.1} MB/s, \
         worker {:.1} MB/s; echo RTT window {:.2} ms, worker {:.2} ms",
        figure("windowGet"),
        figure("workerGet"),
        figure("windowUpload"),
        figure("workerUpload"),
        figure("windowRttMs"),
        figure("workerRttMs"),
    );
    // Where segments were lost, as the servers' kernel saw it: upload segments arriving out of
    // order (a datagram lost on the way up) and the servers' retransmissions (lost on the way
    // down), over all runs.
    let nstat = topology.srv_exec(&["nstat", "-az", "TcpExtTCPOFOQueue", "TcpRetransSegs"]);
    println!(
        "server namespace: {}",
        String::from_utf8_lossy(&nstat.stdout).replace('\n', " ")
    );
}

/// `nic.installGlobals()` defines the three Direct Sockets classes on the global object, and a
/// function that knows only `new TCPSocket(...)` (tests/browser/page.html's classic script)
/// GETs a file from nginx by name: `web.test`, resolved through the tunnel's DNS (dnsmasq in
/// the server namespace). Also checks `nic.address`, `nic.addressV6`, `nic.mtu`, `nic.stats()`
/// (this page asks for datagrams, `linkStream: false`, so link repair, on by default for
/// datagrams, is covered: the gateway's datagrams arrived sequenced)
/// and `nic.closed`, in both Window and Worker mode.
#[test]
fn browser_globals_hostname_and_session_info() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let _dnsmasq = topology.serve_dnsmasq();
    let (data, _nginx) = serve_random_file(&topology, "named.bin", 1 << 20);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();

    for worker in [false, true] {
        let arg = format!(
            r#"{{"gateway":"{}","certHash":"{}","host":"web.test","port":80,"path":"/named.bin","worker":{worker}}}"#,
            gateway.url(),
            gateway.cert_hash(),
        );
        let result = run_in_page(&topology, &server, "globalsHostnameGet", &arg);
        println!("worker {worker}: {result}");
        // Chromium defines no Direct Sockets globals for ordinary pages: all three are new.
        assert_eq!(
            json_field(&result, "before"),
            Some("undefined,undefined,undefined")
        );
        assert_eq!(
            json_field(&result, "defined"),
            Some("TCPSocket,UDPSocket,TCPServerSocket")
        );
        assert_eq!(json_field(&result, "sameClass"), Some("true"), "{result}");
        assert_eq!(
            json_field(&result, "worker"),
            Some(worker.to_string().as_str())
        );
        assert_eq!(json_field(&result, "status"), Some("HTTP/1.1 200 OK"));
        assert_eq!(
            json_field(&result, "sha256"),
            Some(sha256_hex(&data).as_str()),
            "{result}"
        );
        let remote = json_field(&result, "remoteAddress").unwrap_or_default();
        assert!(
            remote == topology.srv_ipv4().to_string() || remote == topology.srv_ipv6().to_string(),
            "web.test resolved to {remote}: {result}"
        );
        assert!(
            json_field(&result, "address").is_some_and(|a| a.starts_with("10.77.0.")),
            "{result}"
        );
        assert!(
            json_field(&result, "addressV6").is_some_and(|a| a.starts_with("fd00:77::")),
            "{result}"
        );
        let number = |key: &str| -> f64 {
            json_field(&result, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key}: {result}"))
        };
        // Capped below the 1211-byte datagrams Chromium sends; the gateway's default is 1152.
        assert_eq!(number("mtu"), 1152.0, "{result}");
        assert!(number("bytesReceived") > data.len() as f64, "{result}");
        assert!(
            number("packetsReceived") > (data.len() / 1152) as f64,
            "{result}"
        );
        assert!(
            number("packetsSent") > 1.0 && number("bytesSent") > 0.0,
            "{result}"
        );
        assert_eq!(number("drops"), 0.0, "{result}");
        // On datagrams the page asks for link repair (the default) and the gateway sequenced
        // what it sent.
        assert!(number("linkSequenced") > 0.0, "{result}");
        assert_eq!(json_field(&result, "closedIsPromise"), Some("true"));
        assert!(
            json_field(&result, "reason").is_some_and(|r| !r.is_empty()),
            "{result}"
        );
        // A socket opened after close() fails with the spec's name for a dead network.
        assert_eq!(json_field(&result, "afterClose"), Some("NetworkError"));
    }
}

/// ngircd on 10.201.n.2:6667 with a config of its own (no PAM, ident or DNS lookups).
fn serve_ngircd(topology: &Topology) -> common::Process {
    let dir = topology.tmp().join("ngircd");
    fs::create_dir_all(&dir).expect("ngircd dir");
    let config = format!(
        "[Global]\n  Name = irc.webnic.test\n  Info = webnic browser test\n  Listen = {}\n  \
         Ports = 6667\n  MotdPhrase = webnic\n[Options]\n  PAM = no\n  Ident = no\n  DNS = no\n",
        topology.srv_ipv4()
    );
    let path = dir.join("ngircd.conf");
    fs::write(&path, config).expect("write ngircd.conf");
    let ngircd = find_command("ngircd").expect("ngircd (apt package `ngircd`)");
    let process = topology.spawn_in(
        &topology.srv_ns(),
        "ngircd",
        &[
            ngircd.to_str().expect("utf-8 path"),
            "-n",
            "-p",
            "-f",
            path.to_str().expect("utf-8 path"),
        ],
        Vec::new(),
    );
    topology.wait_listening(&topology.srv_ns(), "tcp", 6667, &process);
    process
}

/// IRC from the page: NICK/USER to ngircd in the server namespace, and the `001` welcome
/// comes back addressed to that nick, from the session's address.
#[test]
fn browser_irc_registers_with_ngircd() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let ngircd = serve_ngircd(&topology);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    let arg = format!(
        // ngircd refuses nicks longer than 9 characters (its default MaxNickLength).
        r#"{{"gateway":"{}","certHash":"{}","host":"{}","port":6667,"nick":"webnicpg"}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topology.srv_ipv4()
    );
    let result = run_in_page(&topology, &server, "ircWelcome", &arg);
    println!("page result: {result}");
    let welcome = json_field(&result, "welcome").unwrap_or_default();
    let address = json_field(&result, "address").unwrap_or_default();
    assert!(
        welcome.starts_with(":irc.webnic.test 001 webnicpg "),
        "no 001 welcome: {result}\n{}",
        ngircd.logs()
    );
    // ngircd names the user's host: the page's pool address, as the server saw it.
    assert!(
        address.starts_with("10.77.0.") && welcome.ends_with(&format!("@{address}")),
        "{result}"
    );
}

/// Two pages (two Chromium processes) at once: both sessions are active together, get
/// distinct pool addresses, and both GET the same 4 MiB byte-exactly; afterwards both
/// addresses are back in the pool.
#[test]
fn browser_two_pages_at_once() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let (data, _nginx) = serve_random_file(&topology, "random.bin", 4 << 20);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    let free_key = "webnic_pool_addresses_free{family=\"ipv4\"}";
    let free_before = gateway.metric(free_key);

    let results = thread::scope(|scope| {
        let pages: Vec<_> = [false, true]
            .into_iter()
            .map(|worker| {
                let (topology, server, gateway) = (&topology, &server, &gateway);
                scope.spawn(move || {
                    // Each page keeps its session 15 s after its GET, so the two overlap even
                    // when the second Chromium starts late on a loaded machine.
                    let arg = format!(
                        r#"{{"gateway":"{}","certHash":"{}","host":"{}","port":80,"path":"/random.bin","worker":{worker},"holdMs":15000}}"#,
                        gateway.url(),
                        gateway.cert_hash(),
                        topology.srv_ipv4()
                    );
                    let name = "httpGetSha256";
                    let mut cmd = Command::new(find_command("node").expect("node"));
                    cmd.arg(repo().join("tests/browser/run.mjs"))
                        .arg(server.url("/page.html"))
                        .arg(name)
                        .arg(&arg)
                        .arg(PAGE_TIMEOUT.as_millis().to_string());
                    let tag = format!("browser-page-{}", u8::from(worker));
                    let process = topology.spawn_root(&tag, &mut cmd);
                    let status = wait_exit(&process, PAGE_TIMEOUT + Duration::from_secs(30));
                    let stdout = fs::read_to_string(topology.tmp().join(format!("{tag}.out")))
                        .unwrap_or_default();
                    stdout
                        .lines()
                        .find_map(|line| line.strip_prefix("RESULT "))
                        .map(str::to_owned)
                        .unwrap_or_else(|| panic!("page {tag} failed ({status})\n{}", process.logs()))
                })
            })
            .collect();
        gateway.wait_metric("webnic_sessions_active", PAGE_TIMEOUT, |n| n == 2.0);
        pages
            .into_iter()
            .map(|page| page.join().expect("page thread"))
            .collect::<Vec<_>>()
    });
    let mut addresses = Vec::new();
    for result in &results {
        println!("page: {result}");
        assert_eq!(
            json_field(result, "sha256"),
            Some(sha256_hex(&data).as_str()),
            "{result}"
        );
        let address = json_field(result, "address").unwrap_or_default().to_owned();
        assert!(address.starts_with("10.77.0."), "{result}");
        assert_eq!(json_field(result, "localAddress"), Some(address.as_str()));
        addresses.push(address);
    }
    assert_ne!(addresses[0], addresses[1], "two pages got the same address");
    assert_eq!(gateway.metric("webnic_sessions_total"), 2.0);
    gateway.wait_metric("webnic_sessions_active", Duration::from_secs(10), |n| {
        n == 0.0
    });
    gateway.wait_metric(free_key, Duration::from_secs(10), |free| {
        (free - free_before).abs() < 0.5
    });
}

/// A TCP connect to the server's IPv6 address from the page (the session has an address from
/// the gateway's IPv6 pool): 1 MiB GET from nginx over IPv6, sha256 checked in the page.
#[test]
fn browser_ipv6_get() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let www = topology.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let data = random_bytes(1 << 20);
    fs::write(www.join("v6.bin"), &data).expect("write v6.bin");
    let nginx = topology.serve_nginx(&www);
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    let srv6 = topology.srv_ipv6().to_string();
    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","host":"{srv6}","port":80,"path":"/v6.bin"}}"#,
        gateway.url(),
        gateway.cert_hash(),
    );
    let result = run_in_page(&topology, &server, "httpGetSha256", &arg);
    println!("page result: {result}");
    assert_eq!(
        json_field(&result, "status"),
        Some("HTTP/1.1 200 OK"),
        "{result}"
    );
    assert_eq!(
        json_field(&result, "sha256"),
        Some(sha256_hex(&data).as_str()),
        "{result}"
    );
    assert_eq!(json_field(&result, "remoteAddress"), Some(srv6.as_str()));
    let v6 = json_field(&result, "addressV6").unwrap_or_default();
    assert!(v6.starts_with("fd00:77::"), "{result}");
    assert_eq!(
        json_field(&result, "localAddress"),
        Some(v6),
        "the connection's source is the session's IPv6 address"
    );
    // nginx saw the request from that address.
    let access = nginx.logs();
    assert!(access.contains(v6), "nginx's log lacks {v6}:\n{access}");
}

/// Connects that must fail reject `opened` with the spec's DOMException name (`NetworkError`)
/// and a message naming the cause: a closed port (RST), a name dnsmasq does not know
/// (NXDOMAIN through the tunnel's DNS), and a destination the gateway's egress policy refuses
/// (ICMP administratively prohibited, so it fails at once instead of timing out). A UDPSocket
/// given a name (the API takes addresses only) fails with `DataError`.
#[test]
fn browser_connect_errors() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let _dnsmasq = topology.serve_dnsmasq();
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","refusedHost":"{}","refusedPort":9,"unknownHost":"nothing.test","deniedHost":"192.168.77.1","deniedPort":80}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topology.srv_ipv4()
    );
    let result = run_in_page(&topology, &server, "errorNames", &arg);
    println!("page result: {result}");
    for what in ["refused", "unknown", "denied"] {
        assert_eq!(
            json_field(&result, &format!("{what}Name")),
            Some("NetworkError"),
            "{what}: {result}"
        );
        assert_eq!(
            json_field(&result, &format!("{what}Dom")),
            Some("true"),
            "{what} is a DOMException: {result}"
        );
        let ms: f64 = json_field(&result, &format!("{what}Ms"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::MAX);
        assert!(ms < 10_000.0, "{what} took {ms} ms: {result}");
    }
    let message = |what: &str| json_field(&result, &format!("{what}Message")).unwrap_or_default();
    assert!(message("refused").contains("refused"), "{result}");
    assert!(message("unknown").contains("nothing.test"), "{result}");
    assert!(message("denied").contains("prohibited"), "{result}");
    assert_eq!(json_field(&result, "refusedClosed"), Some("NetworkError"));
    assert_eq!(json_field(&result, "udpNameName"), Some("DataError"));
}

/// `TCPSocketOptions` reach the stack, observed from the server's side: `dnsQueryType` "ipv6"
/// to a name with A and AAAA connects over IPv6 and dnsmasq saw only an AAAA query for it
/// ("ipv4": only A); `receiveBufferSize: 8192` is the window of that connection's SYN (nft
/// counter in the server namespace); `keepAliveDelay: 1000` makes a connection idle for 6 s
/// send keep-alive probes (1-byte segments below the acknowledged sequence: IPv4 length 41)
/// that the server's namespace counts — none arrive on the connections without it — and the
/// connection still echoes afterwards. Out-of-range values throw TypeError from the constructor.
/// In Window and Worker mode.
#[test]
fn browser_tcp_socket_options() {
    const KEEP_ALIVE_PORT: u16 = 7101;
    const PLAIN_PORT: u16 = 7102;
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let dnsmasq = topology.serve_dnsmasq();
    let _alive_echo = topology.serve_tcp_echo(KEEP_ALIVE_PORT);
    let _plain_echo = topology.serve_tcp_echo(PLAIN_PORT);
    let table = "wnopts";
    topology.srv_run(&["nft", "add", "table", "inet", table]);
    topology.srv_run(&[
        "nft",
        "add",
        "chain",
        "inet",
        table,
        "in",
        "{ type filter hook input priority 0; policy accept; }",
    ]);
    // One counter per rule; the comments name them for nft_packets.
    for (rule, name) in [
        (
            format!("tcp dport {KEEP_ALIVE_PORT} ip length 41"),
            "probes-alive",
        ),
        (
            format!("tcp dport {PLAIN_PORT} ip length 41"),
            "probes-plain",
        ),
        (
            format!("tcp dport {PLAIN_PORT} tcp flags syn tcp window 8192"),
            "syn-window-8192",
        ),
        (format!("tcp dport {PLAIN_PORT} tcp flags syn"), "syn-plain"),
    ] {
        let mut args = vec!["nft", "add", "rule", "inet", table, "in"];
        args.extend(rule.split_whitespace());
        args.extend(["counter", "comment"]);
        let comment = format!("\"{name}\"");
        args.push(&comment);
        topology.srv_run(&args);
    }
    let counters = || {
        let ruleset = topology.srv_run(&["nft", "list", "table", "inet", table]);
        let get = |name: &str| {
            nft_packets(&ruleset, &format!("\"{name}\""))
                .unwrap_or_else(|| panic!("no counter {name}:\n{ruleset}"))
        };
        [
            get("probes-alive"),
            get("probes-plain"),
            get("syn-window-8192"),
            get("syn-plain"),
        ]
    };
    let gateway = topology.start_gateway(&[]);
    let server = PageServer::start();
    let mut before = counters();
    for worker in [false, true] {
        let arg = format!(
            r#"{{"gateway":"{}","certHash":"{}","worker":{worker},"srv4":"{}","keepAlivePort":{KEEP_ALIVE_PORT},"plainPort":{PLAIN_PORT},"idleMs":6000}}"#,
            gateway.url(),
            gateway.cert_hash(),
            topology.srv_ipv4(),
        );
        let result = run_in_page(&topology, &server, "tcpSocketOptions", &arg);
        println!("worker {worker}: {result}");
        assert_eq!(
            json_field(&result, "worker"),
            Some(worker.to_string().as_str())
        );
        for bad in [
            "keepAlive999",
            "keepAliveNegative",
            "keepAliveNaN",
            "sendZero",
            "receiveTooBig",
            "dnsBad",
        ] {
            assert_eq!(
                json_field(&result, bad),
                Some("TypeError"),
                "{bad}: {result}"
            );
        }
        assert_eq!(
            json_field(&result, "v6Remote"),
            Some(topology.srv_ipv6().to_string().as_str()),
            "{result}"
        );
        assert_eq!(
            json_field(&result, "v4Remote"),
            Some(topology.srv_ipv4().to_string().as_str()),
            "{result}"
        );
        assert_eq!(
            json_field(&result, "echoed"),
            Some("still here"),
            "{result}"
        );
        let after = counters();
        let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        before = after;
        println!("worker {worker}: probes alive/plain, SYNs window 8192/all: {delta:?}");
        // 6 s idle at one probe per second after the first second: five; at least two even when
        // a loaded machine delays the page's timers (3.5 s once gave only one).
        assert!(delta[0] >= 2, "keep-alive probes: {delta:?}");
        assert_eq!(delta[1], 0, "probes without keepAliveDelay: {delta:?}");
        // Counted per SYN, not per connection: a SYN the page retransmits (its initial RTO is
        // 1 s, which a loaded CI machine can exceed) counts again, so these are lower bounds.
        // The receiveBufferSize socket's SYN carried window 8192, and the other socket's did not.
        assert!(delta[2] >= 1, "SYNs with window 8192: {delta:?}");
        assert!(
            delta[3] - delta[2] >= 1,
            "SYNs to the plain port without window 8192: {delta:?}"
        );
    }
    // dnsmasq answered web.test's AAAA and echo.test's A query, and never the other type.
    let log = dnsmasq.logs();
    assert!(log.contains("query[AAAA] web.test"), "{log}");
    assert!(!log.contains("query[A] web.test"), "{log}");
    assert!(log.contains("query[A] echo.test"), "{log}");
    assert!(!log.contains("query[AAAA] echo.test"), "{log}");
}

/// The README's new-user path: the gateway (default options) serves the demo on
/// 127.0.0.1:4480 of its host (here: its namespace, where Chromium runs too); the page reads
/// `config.json`, connects by itself, netcats a line through socat's TCP and UDP echo servers,
/// and its speed test downloads 8 MiB from nginx whose sha256 (computed in the page) is the
/// file's. The screenshot goes to `target/browser-demo-served.png`. With `--no-demo` nothing
/// listens on 4480.
#[test]
fn browser_gateway_served_demo() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let (data, _nginx) = serve_random_file(&topology, "speed.bin", 8 << 20);
    let _tcp_echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let _udp_echo = topology.serve_udp_echo();
    let gateway = topology.start_gateway(&[]);
    topology.wait_listening(&topology.gw_ns(), "tcp", DEMO_PORT, &gateway.process);

    // config.json names this gateway and its current certificate.
    let config = demo_config(&topology);
    assert_eq!(
        json_field(&config, "gateway"),
        Some(gateway.url()),
        "{config}"
    );
    assert_eq!(
        json_field(&config, "certHash"),
        Some(gateway.cert_hash()),
        "{config}"
    );
    // Nothing outside the package: the repository's files are not served.
    let outside = topology.gw_exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--path-as-is",
        &format!("http://127.0.0.1:{DEMO_PORT}/js/../../Cargo.toml"),
    ]);
    assert_eq!(String::from_utf8_lossy(&outside.stdout), "404");

    let screenshot = repo().join("target/browser-demo-served.png");
    let _ = fs::remove_file(&screenshot);
    let result = run_demo_user(&topology, &gateway, "browser-demo-served", &screenshot);
    let result = result.as_str();
    assert!(
        json_field(result, "status").is_some_and(|s| s.starts_with("connected: 10.77.0.")),
        "{result}"
    );
    assert_eq!(json_field(result, "gateway"), Some(gateway.url()));
    assert_eq!(json_field(result, "tcpEcho"), Some("true"), "{result}");
    assert_eq!(json_field(result, "udpEcho"), Some("true"), "{result}");
    assert_eq!(
        json_field(result, "bytes"),
        Some(data.len().to_string().as_str()),
        "{result}"
    );
    assert_eq!(
        json_field(result, "sha256"),
        Some(sha256_hex(&data).as_str()),
        "the speed test received different bytes: {result}"
    );
    let png = fs::read(&screenshot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    drop(gateway);

    // --no-demo: the gateway comes up without the demo listener.
    let quiet = Topology::new();
    let quiet_gateway = quiet.start_gateway(&["--no-demo"]);
    let listening = quiet.gw_exec(&["ss", "-Hltn"]);
    let listening = String::from_utf8_lossy(&listening.stdout).into_owned();
    assert!(
        !listening.contains(&format!(":{DEMO_PORT} ")),
        "something listens on {DEMO_PORT} with --no-demo:\n{listening}"
    );
    assert!(
        quiet_gateway.process.exit_status().is_none(),
        "{}",
        quiet_gateway.process.logs()
    );
}

/// Where the gateway serves its demo by default (`--demo-listen`).
const DEMO_PORT: u16 = 4480;

/// `config.json` of the demo the gateway serves on 127.0.0.1:4480 of its namespace.
fn demo_config(topology: &Topology) -> String {
    let config = topology.gw_exec(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{DEMO_PORT}/config.json"),
    ]);
    String::from_utf8_lossy(&config.stdout).into_owned()
}

/// A new user in headless Chromium (tests/browser/demo_user.mjs, in the gateway's namespace) on
/// the gateway-served demo: netcat through the socat TCP and UDP echo servers, then the speed test
/// of nginx's `speed.bin`, a screenshot to `screenshot`. Returns the page's `RESULT` JSON.
fn run_demo_user(
    topology: &Topology,
    gateway: &common::GatewayProcess,
    name: &str,
    screenshot: &Path,
) -> String {
    let srv = topology.srv_ipv4().to_string();
    let node = find_command("node").expect("node");
    let script = repo().join("tests/browser/demo_user.mjs");
    let page = topology.spawn_in(
        &topology.gw_ns(),
        name,
        &[
            node.to_str().expect("utf-8 path"),
            script.to_str().expect("utf-8 path"),
            &format!("http://127.0.0.1:{DEMO_PORT}/"),
            &srv,
            &TCP_ECHO_PORT.to_string(),
            &common::UDP_ECHO_PORT.to_string(),
            &format!("{srv}:80/speed.bin"),
            screenshot.to_str().expect("utf-8 path"),
            &PAGE_TIMEOUT.as_millis().to_string(),
        ],
        Vec::new(),
    );
    let status = wait_exit(&page, PAGE_TIMEOUT + Duration::from_secs(30));
    let stdout = fs::read_to_string(topology.tmp().join(format!("{name}.out"))).unwrap_or_default();
    let result = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .unwrap_or_else(|| {
            panic!(
                "the demo failed ({status})\n{}\n{}",
                page.logs(),
                gateway.process.logs()
            )
        })
        .to_owned();
    println!("demo: {result}");
    result
}

/// nginx on port 8080 of the server's IPv4 address serving `root` with
/// `Access-Control-Allow-Origin: *`, so the page's own `fetch()` may read it (the benchmark's
/// no-relay figure).
fn serve_cors_nginx(topology: &Topology, root: &Path) -> common::Process {
    let dir = topology.tmp().join("nginx-cors");
    fs::create_dir_all(&dir).expect("nginx dir");
    let d = dir.display();
    let config = format!(
        "daemon off;\nmaster_process off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
         default_type application/octet-stream;\n  sendfile on;\n\
         server {{\n    listen {v4}:8080;\n    root {root};\n\
         add_header Access-Control-Allow-Origin \"*\";\n  }}\n}}\n",
        v4 = topology.srv_ipv4(),
        root = root.display(),
    );
    let conf = dir.join("nginx.conf");
    fs::write(&conf, config).expect("write nginx.conf");
    let nginx = find_command("nginx").expect("nginx");
    let process = topology.spawn_in(
        &topology.srv_ns(),
        "nginx-cors",
        &[
            nginx.to_str().expect("utf-8 path"),
            "-p",
            &format!("{d}/"),
            "-e",
            &format!("{d}/error.log"),
            "-c",
            conf.to_str().expect("utf-8 path"),
        ],
        vec![dir.join("error.log")],
    );
    topology.wait_listening(&topology.srv_ns(), "tcp", 8080, &process);
    process
}

/// The browser benchmark (`scripts/bench-browser.sh`, which installs websockify and wisp-js
/// and sets `WEBNIC_BENCH_DIR`; not part of CI): a 16 MiB GET from nginx through webnic
/// (Window and Worker), websockify and Wisp (plain and over TLS), and by the page's own
/// `fetch()`, each sha256-checked in the page, median of `WEBNIC_BROWSER_RUNS` (default 3); the
/// same GET while the page's main thread is busy half the time; webnic's upload goodput and
/// UDPSocket echo rate; the raw WebTransport ceilings (also in a Worker). Prints
/// `BENCH <what>: <figure>` lines (no colon in `<what>`: the script splits on the first).
#[test]
#[ignore = "benchmark: run scripts/bench-browser.sh"]
fn browser_bench_relays() {
    const SINK_PORT: u16 = 7200;
    const UDP_PORT: u16 = 7300;
    const WEBSOCKIFY_PORT: u16 = 6080;
    const WISP_PORT: u16 = 6001;
    const WEBSOCKIFY_TLS_PORT: u16 = 6443;
    const WISP_TLS_PORT: u16 = 6444;
    const ECHO_PORT: u16 = 4434;
    require_prerequisites();
    require_browser();
    let bench = PathBuf::from(
        std::env::var_os("WEBNIC_BENCH_DIR")
            .expect("WEBNIC_BENCH_DIR (run scripts/bench-browser.sh, which installs the relays)"),
    );
    let runs: usize = std::env::var("WEBNIC_BROWSER_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let topology = Topology::new();
    let www = topology.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let size = 16 << 20;
    let data = random_bytes(size);
    fs::write(www.join("random.bin"), &data).expect("write random.bin");
    let _nginx = topology.serve_nginx(&www);
    let _cors = serve_cors_nginx(&topology, &www);
    let _sink = serve_sha256_sink(&topology, SINK_PORT);
    let srv = topology.srv_ipv4().to_string();
    // A UDP echo that keeps up with tens of thousands of datagrams a second (socat forks per
    // datagram).
    let udp_echo_code = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)\ns.bind(('{srv}', {UDP_PORT}))\n\
         while True:\n    data, peer = s.recvfrom(65535)\n    s.sendto(data, peer)\n"
    );
    let udp_echo = topology.spawn_in(
        &topology.srv_ns(),
        "udp-echo-py",
        &["python3", "-c", &udp_echo_code],
        Vec::new(),
    );
    topology.wait_listening(&topology.srv_ns(), "udp", UDP_PORT, &udp_echo);
    let gateway = topology.start_gateway(&[]);
    let gw = topology.gw_addr().to_string();

    // The relays run where the gateway runs (its namespace), reached by the page on the same
    // address, and connect to the same nginx.
    let websockify = bench.join("venv/bin/websockify");
    let ws_listen = format!("{gw}:{WEBSOCKIFY_PORT}");
    let ws_target = format!("{srv}:80");
    let websockify = topology.spawn_in(
        &topology.gw_ns(),
        "websockify",
        &[
            websockify.to_str().expect("utf-8 path"),
            &ws_listen,
            &ws_target,
        ],
        Vec::new(),
    );
    topology.wait_listening(&topology.gw_ns(), "tcp", WEBSOCKIFY_PORT, &websockify);
    let node = find_command("node").expect("node");
    let wisp_bin = bench.join("node_modules/@mercuryworkshop/wisp-js/src/bin/server_cli.mjs");
    let wisp_port = WISP_PORT.to_string();
    let wisp = topology.spawn_in(
        &topology.gw_ns(),
        "wisp-js-server",
        &[
            node.to_str().expect("utf-8 path"),
            wisp_bin.to_str().expect("utf-8 path"),
            "-H",
            &gw,
            "-P",
            &wisp_port,
            "-L",
            "WARN",
            "-O",
            r#"{"allow_private_ips":true}"#,
        ],
        Vec::new(),
    );
    topology.wait_listening(&topology.gw_ns(), "tcp", WISP_PORT, &wisp);
    // The same two relays over TLS, as an https page must reach them (a secure page may not open
    // ws://): websockify's own --cert/--key, wisp-js inside node's HTTPS server
    // (benches/relays/wisp-tls-server.mjs, as the native benches run it). Chromium trusts the
    // self-signed certificate through --ignore-certificate-errors-spki-list.
    let identity =
        wtransport::Identity::self_signed([gw.as_str()]).expect("self-signed relay identity");
    let relay_cert = topology.tmp().join("relay-cert.pem");
    let relay_key = topology.tmp().join("relay-key.pem");
    fs::write(
        &relay_cert,
        identity.certificate_chain().as_slice()[0].to_pem(),
    )
    .expect("write the relay certificate");
    fs::write(&relay_key, identity.private_key().to_secret_pem()).expect("write the relay key");
    let (cert, key) = (
        relay_cert.to_str().expect("utf-8 path"),
        relay_key.to_str().expect("utf-8 path"),
    );
    let websockify_bin = bench.join("venv/bin/websockify");
    let websockify_tls = topology.spawn_in(
        &topology.gw_ns(),
        "websockify-tls",
        &[
            websockify_bin.to_str().expect("utf-8 path"),
            "--cert",
            cert,
            "--key",
            key,
            "--ssl-only",
            &format!("{gw}:{WEBSOCKIFY_TLS_PORT}"),
            &ws_target,
        ],
        Vec::new(),
    );
    topology.wait_listening(
        &topology.gw_ns(),
        "tcp",
        WEBSOCKIFY_TLS_PORT,
        &websockify_tls,
    );
    // node resolves the wrapper's import from its own directory: next to node_modules.
    let wisp_wrapper = bench.join("wisp-tls-server.mjs");
    fs::copy(
        repo().join("benches/relays/wisp-tls-server.mjs"),
        &wisp_wrapper,
    )
    .expect("copy wisp-tls-server.mjs next to node_modules");
    let wisp_tls = topology.spawn_in(
        &topology.gw_ns(),
        "wisp-js-tls-server",
        &[
            node.to_str().expect("utf-8 path"),
            wisp_wrapper.to_str().expect("utf-8 path"),
            &gw,
            &WISP_TLS_PORT.to_string(),
            cert,
            key,
            r#"{"allow_private_ips":true}"#,
        ],
        Vec::new(),
    );
    topology.wait_listening(&topology.gw_ns(), "tcp", WISP_TLS_PORT, &wisp_tls);
    let spki = spki_sha256_base64(&relay_cert);
    // The raw WebTransport datagram echo (gateway/examples/datagram_echo.rs), next to the gateway.
    let echo_bin = common::gateway_binary()
        .parent()
        .expect("profile dir")
        .join("examples/datagram_echo");
    assert!(
        echo_bin.is_file(),
        "{} missing: cargo build -p webnic-gateway --example datagram_echo",
        echo_bin.display()
    );
    let echo_hash_file = topology.tmp().join("echo-hash");
    let echo_listen = format!("{gw}:{ECHO_PORT}");
    let echo = topology.spawn_in(
        &topology.gw_ns(),
        "datagram-echo",
        &[
            echo_bin.to_str().expect("utf-8 path"),
            &echo_listen,
            echo_hash_file.to_str().expect("utf-8 path"),
        ],
        Vec::new(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let echo_hash = loop {
        let hash = fs::read_to_string(&echo_hash_file).unwrap_or_default();
        if hash.len() == 64 {
            break hash;
        }
        assert!(
            Instant::now() < deadline && echo.exit_status().is_none(),
            "the datagram echo did not start\n{}",
            echo.logs()
        );
        thread::sleep(Duration::from_millis(50));
    };
    // The page's fetch() goes from the root namespace to the server through the gateway
    // namespace (which forwards); the route goes away with the veth when the topology drops.
    let via = gw.clone();
    let net = format!("10.201.{}.0/24", topology.n());
    common::run(&["ip", "route", "replace", &net, "via", &via]);
    let server = PageServer::start();

    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","host":"{srv}","path":"/random.bin","expected":"{}","sinkPort":{SINK_PORT},"uploadBytes":{size},"udpPort":{UDP_PORT},"websockifyUrl":"ws://{gw}:{WEBSOCKIFY_PORT}/","wispUrl":"ws://{gw}:{WISP_PORT}/","websockifyTlsUrl":"wss://{gw}:{WEBSOCKIFY_TLS_PORT}/","wispTlsUrl":"wss://{gw}:{WISP_TLS_PORT}/","fetchUrl":"http://{srv}:8080/random.bin","echoUrl":"https://{echo_listen}/echo","echoHash":"{echo_hash}","runs":{runs}}}"#,
        gateway.url(),
        gateway.cert_hash(),
        sha256_hex(&data),
    );
    let result = run_in_page_with_flags(
        &topology,
        &server,
        "benchRelays",
        &arg,
        PAGE_TIMEOUT * 10,
        &[format!("--ignore-certificate-errors-spki-list={spki}")],
    );
    println!("page result: {result}");
    let figure = |key: &str| -> f64 {
        json_field(&result, key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}: {result}"))
    };
    let relays = figure("websockifyGet").max(figure("wispGet"));
    let relays_tls = figure("websockifyTlsGet").max(figure("wispTlsGet"));
    for (label, key) in [
        ("webnic GET, stack in the page (Window)", "webnicWindowGet"),
        ("webnic GET, stack in a Worker", "webnicWorkerGet"),
        (
            "webnic GET on the stream link, Window",
            "webnicWindowStreamGet",
        ),
        (
            "webnic GET on the stream link, Worker",
            "webnicWorkerStreamGet",
        ),
        ("websockify GET (page WebSocket)", "websockifyGet"),
        ("Wisp GET (wisp-js client and server)", "wispGet"),
        (
            "websockify GET over TLS (page WebSocket, wss)",
            "websockifyTlsGet",
        ),
        ("Wisp GET over TLS (wisp-js, wss)", "wispTlsGet"),
        (
            "webnic GET on the stream link, Window, main thread busy half the time",
            "webnicWindowBusyGet",
        ),
        (
            "webnic GET on the stream link, Worker, main thread busy half the time",
            "webnicWorkerBusyGet",
        ),
        (
            "websockify GET, main thread busy half the time",
            "websockifyBusyGet",
        ),
        ("page fetch() GET, no relay", "fetchGet"),
        ("webnic upload 16 MiB, Window", "webnicWindowUpload"),
        ("webnic upload 16 MiB, Worker", "webnicWorkerUpload"),
        (
            "webnic upload 16 MiB on the stream link (uplink stream), Window",
            "webnicWindowStreamUpload",
        ),
        (
            "webnic upload 16 MiB on the stream link (uplink stream), Worker",
            "webnicWorkerStreamUpload",
        ),
    ] {
        println!("BENCH {label}: {:.1} MB/s", figure(key));
    }
    for (label, key) in [
        (
            "webnic UDPSocket echo, 1000-byte datagrams, Window",
            "webnicWindowUdpPerSecond",
        ),
        (
            "webnic UDPSocket echo, 1000-byte datagrams, Worker",
            "webnicWorkerUdpPerSecond",
        ),
    ] {
        println!("BENCH {label}: {:.0} datagrams/s echoed", figure(key));
    }
    println!(
        "BENCH UDP datagrams unanswered (all runs): {} of {}",
        figure("udpLost"),
        figure("udpSent")
    );
    let raw = figure("rawDatagramPerSecond");
    println!(
        "BENCH raw WebTransport datagram echo, 1000 bytes, no stack (the ceiling): {raw:.0} datagrams/s echoed ({:.1} MB/s each way); unanswered {} of {}",
        raw * 1000.0 / 1e6,
        figure("rawLost"),
        figure("rawSent")
    );
    let ratios = |rows: &[(&str, &str)], baseline: f64| {
        for (label, key) in rows {
            println!("BENCH {label}: {:.2}", figure(key) / baseline);
        }
    };
    ratios(
        &[
            (
                "ratio webnic UDPSocket echo / raw datagram echo, Window",
                "webnicWindowUdpPerSecond",
            ),
            (
                "ratio webnic UDPSocket echo / raw datagram echo, Worker",
                "webnicWorkerUdpPerSecond",
            ),
        ],
        raw,
    );
    let down = figure("rawDownloadPerSecond");
    println!(
        "BENCH raw WebTransport datagram download, 1100 bytes, no stack (the ceiling): {down:.0} datagrams/s ({:.1} MB/s); received {} of {}",
        down * 1100.0 / 1e6,
        figure("rawDownloadReceived"),
        figure("rawDownloadSent")
    );
    // A GET's segments fill the 1152-byte link MTU: ≈ 1100 bytes of payload per datagram.
    ratios(
        &[
            (
                "ratio webnic Window GET / raw datagram download",
                "webnicWindowGet",
            ),
            (
                "ratio webnic Worker GET / raw datagram download",
                "webnicWorkerGet",
            ),
        ],
        down * 1100.0 / 1e6,
    );
    let stream = figure("rawStreamDownload");
    println!(
        "BENCH raw WebTransport stream download, 64 MiB, no stack (the stream link's ceiling): {stream:.1} MB/s"
    );
    ratios(
        &[
            (
                "ratio webnic stream-link Window GET / raw stream download",
                "webnicWindowStreamGet",
            ),
            (
                "ratio webnic stream-link Worker GET / raw stream download",
                "webnicWorkerStreamGet",
            ),
        ],
        stream,
    );
    let stream_worker = figure("rawStreamDownloadWorker");
    println!(
        "BENCH raw WebTransport stream download in a Worker, 64 MiB (the Worker's ceiling): {stream_worker:.1} MB/s"
    );
    ratios(
        &[(
            "ratio webnic stream-link Worker GET / raw stream download in a Worker",
            "webnicWorkerStreamGet",
        )],
        stream_worker,
    );
    ratios(
        &[
            (
                "ratio webnic Window GET / best relay over plain WebSocket (ws)",
                "webnicWindowGet",
            ),
            (
                "ratio webnic Worker GET / best relay over plain WebSocket (ws)",
                "webnicWorkerGet",
            ),
            (
                "ratio webnic stream-link Window GET / best relay over plain WebSocket (ws)",
                "webnicWindowStreamGet",
            ),
            (
                "ratio webnic stream-link Worker GET / best relay over plain WebSocket (ws)",
                "webnicWorkerStreamGet",
            ),
        ],
        relays,
    );
    // webnic is always encrypted (QUIC); a relay reached from an https page is too.
    ratios(
        &[
            (
                "ratio webnic stream-link Window GET / best relay over TLS",
                "webnicWindowStreamGet",
            ),
            (
                "ratio webnic stream-link Worker GET / best relay over TLS",
                "webnicWorkerStreamGet",
            ),
        ],
        relays_tls,
    );
}

/// With `--token-key-file` the gateway refuses sessions without a signed token; its demo (on
/// loopback) puts a one-hour token in `config.json`, so the new-user path still works: the
/// page connects by itself, netcats, and its speed test is byte-exact.
#[test]
fn browser_gateway_served_demo_with_token() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let (data, _nginx) = serve_random_file(&topology, "speed.bin", 1 << 20);
    let _tcp_echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let _udp_echo = topology.serve_udp_echo();
    let key = topology.tmp().join("token.key");
    fs::write(&key, sha256_hex(&random_bytes(32))).expect("write token key");
    let gateway = topology.start_gateway(&["--token-key-file", key.to_str().expect("utf-8")]);
    topology.wait_listening(&topology.gw_ns(), "tcp", DEMO_PORT, &gateway.process);
    let config = demo_config(&topology);
    assert!(
        json_field(&config, "token").is_some_and(|t| t.contains('.')),
        "no token in {config}"
    );

    let screenshot = topology.tmp().join("demo-token.png");
    let result = run_demo_user(&topology, &gateway, "browser-demo-token", &screenshot);
    let result = result.as_str();
    assert!(
        json_field(result, "status").is_some_and(|s| s.starts_with("connected: 10.77.0.")),
        "{result}"
    );
    assert_eq!(json_field(result, "tcpEcho"), Some("true"), "{result}");
    assert_eq!(json_field(result, "udpEcho"), Some("true"), "{result}");
    assert_eq!(
        json_field(result, "sha256"),
        Some(sha256_hex(&data).as_str()),
        "{result}"
    );
}

/// A refused session rejects `WebNic.connect` with an error named after the gateway's close code
/// (the spec has no names for these; webnic.js's `CLOSE_CODE_NAMES`), in Window and Worker mode:
/// no token → `TokenMissingError` (7), a malformed token → `TokenInvalidError` (8), an expired
/// one → `TokenExpiredError` (9); a valid token connects.
#[test]
fn browser_session_refusals_have_typed_names() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let key = topology.tmp().join("token.key");
    fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("write key");
    let key_arg = key.to_str().unwrap().to_owned();
    let gateway = topology.start_gateway(&["--token-key-file", &key_arg]);
    let mint = |args: &[&str]| {
        let binary = common::gateway_binary();
        let mut argv = vec![
            binary.to_str().unwrap(),
            "token",
            "--key-file",
            key_arg.as_str(),
            "--sub",
            "page",
        ];
        argv.extend_from_slice(args);
        common::run(&argv).trim().to_owned()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = mint(&["--ttl", "1h", "--issued-at", &(now - 7200).to_string()]);
    let valid = mint(&["--ttl", "10m"]);
    let server = PageServer::start();
    for worker in [false, true] {
        let arg = format!(
            r#"{{"gateway":"{}","certHash":"{}","worker":{worker},"expiredToken":"{expired}","validToken":"{valid}"}}"#,
            gateway.url(),
            gateway.cert_hash(),
        );
        let result = run_in_page(&topology, &server, "sessionRefusalNames", &arg);
        println!("worker={worker}: {result}");
        assert_eq!(
            json_field(&result, "missingName"),
            Some("TokenMissingError"),
            "{result}"
        );
        assert_eq!(json_field(&result, "missingCode"), Some("7"), "{result}");
        assert_eq!(
            json_field(&result, "invalidName"),
            Some("TokenInvalidError"),
            "{result}"
        );
        assert_eq!(json_field(&result, "invalidCode"), Some("8"), "{result}");
        assert_eq!(
            json_field(&result, "expiredName"),
            Some("TokenExpiredError"),
            "{result}"
        );
        assert_eq!(json_field(&result, "expiredCode"), Some("9"), "{result}");
        assert_eq!(
            json_field(&result, "validName"),
            Some("connected"),
            "{result}"
        );
        assert!(
            json_field(&result, "validAddress").is_some_and(|a| a.starts_with("10.77.0.")),
            "{result}"
        );
    }
    assert_eq!(
        gateway.metric("webnic_refused_sessions_total{reason=\"token_missing\"}"),
        2.0
    );
}
