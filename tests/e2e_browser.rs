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
    TCP_ECHO_PORT, Topology, find_command, random_bytes, require_prerequisites, sha256_hex,
    wait_exit,
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
    let mut cmd = Command::new(find_command("node").expect("node"));
    cmd.arg(repo().join("tests/browser/run.mjs"))
        .arg(server.url("/page.html"))
        .arg(name)
        .arg(arg)
        .arg(timeout.as_millis().to_string());
    let process = topology.spawn_root(&format!("browser-{name}"), &mut cmd);
    // run.mjs enforces the timeout itself and closes Chromium; this bound is the backstop.
    let status = wait_exit(&process, timeout + Duration::from_secs(30));
    let stdout =
        fs::read_to_string(topology.tmp().join(format!("browser-{name}.out"))).unwrap_or_default();
    // The page's console (and the profile with WEBNIC_PROFILE=1), shown with --nocapture.
    eprintln!("{}", process.stderr());
    let result = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .map(str::to_owned);
    match result {
        Some(json) if status == "exit code 0" => json,
        _ => panic!("page function {name} failed ({status})\n{}", process.logs()),
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

/// `TCPSocket` GET of a 4 MiB random file from nginx in the server namespace: the sha256 the
/// page computes equals the file's.
#[test]
fn browser_tcp_get_4_mib_sha256() {
    require_prerequisites();
    require_browser();
    let topology = Topology::new();
    let www = topology.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let data = random_bytes(4 << 20);
    fs::write(www.join("random.bin"), &data).expect("write random.bin");
    let _nginx = topology.serve_nginx(&www);
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

    assert_eq!(
        json_field(&result, "receivedLength"),
        Some(bytes.to_string().as_str()),
        "{result}"
    );
    let sent = json_field(&result, "sentSha256").expect("sentSha256");
    assert_eq!(sent.len(), 64, "{result}");
    assert_eq!(
        json_field(&result, "receivedSha256"),
        Some(sent),
        "the echo differs from what the page sent: {result}"
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
    let www = topology.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let data = random_bytes(4 << 20);
    fs::write(www.join("speed.bin"), &data).expect("write speed.bin");
    let _nginx = topology.serve_nginx(&www);
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
    let name = "tcpServerSha256";
    let mut cmd = Command::new(find_command("node").expect("node"));
    cmd.arg(repo().join("tests/browser/run.mjs"))
        .arg(server.url("/page.html"))
        .arg(name)
        .arg(&arg)
        .arg(PAGE_TIMEOUT.as_millis().to_string());
    let page = topology.spawn_root(&format!("browser-{name}"), &mut cmd);
    let out_path = topology.tmp().join(format!("browser-{name}.out"));

    // The page prints its listener once it is open.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let out = fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(line) = out
            .lines()
            .find_map(|l| l.strip_prefix("WEBNIC_READY "))
            .map(str::to_owned)
        {
            break line;
        }
        assert!(
            Instant::now() < deadline && page.exit_status().is_none(),
            "the page never reported its listener\n{}",
            page.logs()
        );
        thread::sleep(Duration::from_millis(50));
    };
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

    let status = wait_exit(&page, PAGE_TIMEOUT + Duration::from_secs(30));
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    eprintln!("{}", page.stderr());
    let result = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("page function {name} failed ({status})\n{}", page.logs()));
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
    let www = topology.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let data = random_bytes(8 << 20);
    fs::write(www.join("random.bin"), &data).expect("write random.bin");
    let _nginx = topology.serve_nginx(&www);
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
}
