//! A real i386 Linux guest in v86, in headless Chromium, whose NIC is a webnic session.
//!
//! The guest is assembled here from Debian packages that `tests/browser/v86-assets.sh` downloads
//! (run by `scripts/test.sh`): Debian's 686 kernel as the bzImage, and an initramfs this test
//! writes (cpio newc) with busybox-static, the kernel's own `8390.ko` and `ne2k-pci.ko`, and an
//! init script. v86 comes from npm, SeaBIOS from Debian. The page (`tests/browser/v86.html`)
//! boots it with `js/v86.js` attached to v86's bus; the guest runs `udhcpc`, resolves a name via
//! dnsmasq and fetches a file from nginx with busybox `wget`, then the same file over IPv6 from
//! the address SLAAC made out of the adapter's router advertisement, and prints the sha256s on
//! the serial console, which the page returns.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::{Topology, find_command, require_prerequisites, seeded_bytes, sha256_hex, wait_exit};

/// The file the guest fetches; v86's emulated ne2k moves a few MB/s at best.
const FILE_LEN: usize = 1024 * 1024;
/// Boot (≈ 50 s on two shared cores) plus DHCP, DNS and the fetch.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `tests/browser/v86-assets.sh` put v86 and the unpacked Debian packages.
fn assets() -> PathBuf {
    std::env::var_os("WEBNIC_V86_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/v86-guest"))
}

/// The guest's files, each checked to exist (missing is a failure, never a skip).
struct GuestFiles {
    kernel: PathBuf,
    busybox: PathBuf,
    modules: [PathBuf; 2],
    bios: PathBuf,
    vga_bios: PathBuf,
}

fn guest_files() -> GuestFiles {
    let root = assets().join("root");
    let kernel = fs::read_dir(root.join("boot"))
        .ok()
        .and_then(|dir| {
            dir.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
        })
        .unwrap_or_else(|| root.join("boot/vmlinuz-(missing)"));
    let version = kernel
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_owned()
        })
        .unwrap_or_default();
    let net = root.join(format!(
        "lib/modules/{version}/kernel/drivers/net/ethernet/8390"
    ));
    let files = GuestFiles {
        kernel,
        busybox: root.join("bin/busybox"),
        modules: [net.join("8390.ko"), net.join("ne2k-pci.ko")],
        bios: root.join("usr/share/seabios/bios.bin"),
        vga_bios: root.join("usr/share/seabios/vgabios-stdvga.bin"),
    };
    let mut needed = vec![
        files.kernel.clone(),
        files.busybox.clone(),
        files.bios.clone(),
        files.vga_bios.clone(),
        assets().join("package/build/libv86.mjs"),
        assets().join("package/build/v86.wasm"),
        repo().join("wasm-client/pkg/webnic_wasm_bg.wasm"),
        repo().join("wasm-client/node_modules/playwright-core/package.json"),
        PathBuf::from("/usr/bin/chromium"),
    ];
    needed.extend(files.modules.iter().cloned());
    let missing: Vec<String> = needed
        .iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        missing.is_empty() && find_command("node").is_some(),
        "v86 guest test prerequisites missing: {missing:?} (node: {:?}). `sudo scripts/test.sh` \
         runs tests/browser/v86-assets.sh and scripts/build-wasm.sh",
        find_command("node")
    );
    files
}

// ------------------------------------------------------------------------------ initramfs

/// A cpio archive in the kernel's "newc" format.
struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn new() -> Self {
        Self {
            out: Vec::new(),
            inode: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name_len = name.len() + 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name_len as u32,
            0,
        ];
        self.inode += 1;
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, (0, 0), data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// PID 1 of the guest: loads the NIC driver, runs udhcpc, resolves and fetches, reports on the
/// serial console (every line the test checks starts with WEBNIC_GUEST_).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for kv in $(cat /proc/cmdline); do
    case "$kv" in webnic_*=*) export "$kv" ;; esac
done
echo "WEBNIC_GUEST_BOOTED $(uname -r)"
insmod /lib/8390.ko && insmod /lib/ne2k-pci.ko
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -f -q -n -t 10 -T 3 -s /udhcpc.sh 2>&1 | sed 's/^/WEBNIC_GUEST_UDHCPC /'
echo "WEBNIC_GUEST_ADDR $(ip -4 -o addr show dev eth0 | tr -s ' ')"
echo "WEBNIC_GUEST_ROUTE $(ip route show default)"
dns=$(cat /tmp/dns 2>/dev/null)
echo "WEBNIC_GUEST_NSLOOKUP $(nslookup "$webnic_name" "$dns" 2>&1 | tr '\n' ' ')"
t0=$(cut -d' ' -f1 /proc/uptime)
if wget -q -O /tmp/fetched "$webnic_url"; then
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "WEBNIC_GUEST_FETCH_SECONDS $t0 $t1"
    echo "WEBNIC_GUEST_SHA256 $(sha256sum /tmp/fetched | cut -d' ' -f1) $(wc -c < /tmp/fetched)"
else
    echo "WEBNIC_GUEST_FETCH_FAILED $webnic_url"
fi
# IPv6: the address SLAAC made from the adapter's router advertisement, then the same file.
i=0
while [ $i -lt 20 ]; do
    a6=$(ip -6 -o addr show dev eth0 scope global | grep -v tentative | awk '{ print $4 }' | cut -d/ -f1)
    [ -n "$a6" ] && break
    sleep 1
    i=$((i + 1))
done
echo "WEBNIC_GUEST_IPV6 $a6"
if wget -q -O /tmp/fetched6 "http://[$webnic_v6]/guest.bin"; then
    echo "WEBNIC_GUEST_SHA256_V6 $(sha256sum /tmp/fetched6 | cut -d' ' -f1) $(wc -c < /tmp/fetched6)"
else
    echo "WEBNIC_GUEST_FETCH_V6_FAILED"
fi
echo WEBNIC_GUEST_DONE
poweroff -f
"#;

/// udhcpc's hook: reports what it was handed and configures eth0 with it.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
echo "WEBNIC_GUEST_DHCP $1 ip=$ip subnet=$subnet router=$router dns=$dns mtu=$mtu lease=$lease serverid=$serverid"
case "$1" in
bound|renew)
    ifconfig "$interface" "$ip" netmask "$subnet"
    [ -n "$mtu" ] && ifconfig "$interface" mtu "$mtu"
    route add default gw "$router" dev "$interface"
    echo "$dns" | cut -d' ' -f1 > /tmp/dns
    ;;
esac
exit 0
"#;

fn build_initramfs(files: &GuestFiles) -> Vec<u8> {
    let read = |path: &Path| fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut cpio = Cpio::new();
    for dir in ["bin", "dev", "lib", "proc", "sys", "tmp"] {
        cpio.dir(dir);
    }
    // The console device, so init's output reaches the serial port.
    cpio.entry("dev/console", 0o020_600, (5, 1), &[]);
    cpio.file("bin/busybox", 0o755, &read(&files.busybox));
    cpio.file("lib/8390.ko", 0o644, &read(&files.modules[0]));
    cpio.file("lib/ne2k-pci.ko", 0o644, &read(&files.modules[1]));
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("udhcpc.sh", 0o755, UDHCPC_SCRIPT.as_bytes());
    cpio.finish()
}

// ------------------------------------------------------------------------------ page server

/// Serves the page, `wasm-client/js` and `pkg`, v86's build and the guest's files on
/// 127.0.0.1 (a secure context for WebTransport); stops when dropped.
struct PageServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PageServer {
    fn start(guest_dir: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let guest_dir = guest_dir.clone();
                        thread::spawn(move || serve_one(stream, &guest_dir));
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
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_one(stream: TcpStream, guest_dir: &Path) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
    let mut writer = stream;
    loop {
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
        let file = resolve(path, guest_dir);
        let (status, body) = match file.as_deref().map(fs::read) {
            Some(Ok(body)) => ("200 OK", body),
            _ => ("404 Not Found", b"not found".to_vec()),
        };
        let content_type = match file
            .as_deref()
            .and_then(|f| f.extension())
            .and_then(|e| e.to_str())
        {
            Some("html") => "text/html; charset=utf-8",
            Some("js" | "mjs") => "text/javascript",
            Some("wasm") => "application/wasm",
            _ => "application/octet-stream",
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

fn resolve(path: &str, guest_dir: &Path) -> Option<PathBuf> {
    if path.contains("..") {
        return None;
    }
    if path == "/v86.html" {
        return Some(repo().join("tests/browser/v86.html"));
    }
    if let Some(rest) = path.strip_prefix("/v86/") {
        return Some(assets().join("package/build").join(rest));
    }
    if let Some(rest) = path.strip_prefix("/guest/") {
        return Some(guest_dir.join(rest));
    }
    for prefix in ["/js/", "/pkg/"] {
        if let Some(rest) = path.strip_prefix(prefix) {
            return Some(repo().join("wasm-client").join(&prefix[1..]).join(rest));
        }
    }
    None
}

/// What follows `marker` on the first serial line that has it (udhcpc's hook output arrives
/// behind udhcpc's own prefix).
fn serial_line<'a>(serial: &'a str, marker: &str) -> Option<&'a str> {
    serial
        .lines()
        .find_map(|l| l.find(marker).map(|at| &l[at + marker.len()..]))
}

#[test]
fn v86_linux_guest_in_chromium_gets_dhcp_and_fetches_through_the_adapter() {
    require_prerequisites();
    let files = guest_files();
    let topo = Topology::new();
    let www = topo.tmp().join("www");
    fs::create_dir_all(&www).expect("www dir");
    let data = seeded_bytes(0x86_0086, FILE_LEN);
    fs::write(www.join("guest.bin"), &data).expect("write guest.bin");
    let _nginx = topo.serve_nginx(&www);
    let _dnsmasq = topo.serve_dnsmasq();
    let gateway = topo.start_gateway(&[]);

    let guest_dir = topo.tmp().join("guest");
    fs::create_dir_all(&guest_dir).expect("guest dir");
    fs::copy(&files.kernel, guest_dir.join("bzImage")).expect("copy kernel");
    fs::copy(&files.bios, guest_dir.join("bios.bin")).expect("copy bios");
    fs::copy(&files.vga_bios, guest_dir.join("vgabios.bin")).expect("copy vga bios");
    fs::write(guest_dir.join("initrd.cpio"), build_initramfs(&files)).expect("write initramfs");
    let server = PageServer::start(guest_dir);

    let url = format!("http://{}/guest.bin", topo.srv_ipv4());
    let cmdline = format!(
        "console=ttyS0 quiet rdinit=/init webnic_url={url} webnic_name=web.test webnic_v6={}",
        topo.srv_ipv6()
    );
    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","cmdline":"{cmdline}","bootTimeoutMs":{}}}"#,
        gateway.url(),
        gateway.cert_hash(),
        GUEST_TIMEOUT.as_millis()
    );
    let mut cmd = Command::new(find_command("node").expect("node"));
    cmd.arg(repo().join("tests/browser/run.mjs"))
        .arg(format!("http://127.0.0.1:{}/v86.html", server.port))
        .arg("v86Guest")
        .arg(&arg)
        .arg(
            (GUEST_TIMEOUT + Duration::from_secs(60))
                .as_millis()
                .to_string(),
        );
    let process = topo.spawn_root("browser-v86", &mut cmd);
    let status = wait_exit(&process, GUEST_TIMEOUT + Duration::from_secs(90));
    let stdout = fs::read_to_string(topo.tmp().join("browser-v86.out")).unwrap_or_default();
    let Some(result) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!("the v86 page failed ({status})\n{}", process.logs());
    };
    // The result is JSON with the serial console as one string: undo its escapes for reading.
    let serial = result.replace("\\n", "\n").replace("\\\"", "\"");
    println!("--- v86 guest (serial console and adapter events):\n{serial}");
    assert!(
        result.contains("\"finished\":true"),
        "guest did not finish:\n{}",
        process.logs()
    );

    let dhcp = serial_line(&serial, "WEBNIC_GUEST_DHCP bound ")
        .unwrap_or_else(|| panic!("no DHCP lease in the guest:\n{serial}"));
    assert!(dhcp.contains("ip=10.77.0."), "{dhcp}");
    assert!(dhcp.contains("router=10.77.0.1"), "{dhcp}");
    assert!(dhcp.contains(&format!("dns={}", topo.srv_ipv4())), "{dhcp}");
    let lookup = serial_line(&serial, "WEBNIC_GUEST_NSLOOKUP ").unwrap_or_default();
    // "Address: X" is an answer; the server's own line reads "Address:\tX:53".
    assert!(
        lookup.contains(&format!("Address: {}", topo.srv_ipv4())),
        "web.test through the tunnel's DNS: {lookup}"
    );
    let fetched = serial_line(&serial, "WEBNIC_GUEST_SHA256 ")
        .unwrap_or_else(|| panic!("the guest's fetch failed:\n{serial}"));
    assert_eq!(
        fetched.trim(),
        format!("{} {FILE_LEN}", sha256_hex(&data)),
        "byte-exact through v86's ne2k, the adapter and the tunnel"
    );
    if let Some((t0, t1)) = serial_line(&serial, "WEBNIC_GUEST_FETCH_SECONDS ")
        .and_then(|t| t.trim().split_once(' '))
        .and_then(|(a, b)| Some((a.parse::<f64>().ok()?, b.parse::<f64>().ok()?)))
    {
        println!(
            "v86 guest fetch: {FILE_LEN} bytes in {:.2} s of guest time ({:.0} KB/s)",
            t1 - t0,
            FILE_LEN as f64 / 1000.0 / (t1 - t0).max(0.001)
        );
    }
    let v6 = serial_line(&serial, "WEBNIC_GUEST_IPV6 ").unwrap_or_default();
    assert!(v6.trim().starts_with("fd00:77:"), "SLAAC address: {v6:?}");
    let fetched6 = serial_line(&serial, "WEBNIC_GUEST_SHA256_V6 ")
        .unwrap_or_else(|| panic!("the guest's IPv6 fetch failed:\n{serial}"));
    assert_eq!(
        fetched6.trim(),
        format!("{} {FILE_LEN}", sha256_hex(&data)),
        "byte-exact over IPv6"
    );
    for needle in [
        "DHCP Discover",
        "-> Offer 10.77.0.",
        "-> Ack 10.77.0.",
        "guest IPv6 address fd00:77:",
    ] {
        assert!(
            result.contains(needle),
            "adapter events lack {needle:?}: {result}"
        );
    }
}

/// Raw-packet mode on its own (`js/packets.js`): the page writes a hand-made IPv4/UDP DNS query
/// to `packets.writable` and parses dnsmasq's answer from `packets.readable`.
#[test]
fn raw_packet_streams_carry_a_dns_query_from_the_page() {
    require_prerequisites();
    for path in [
        "wasm-client/pkg/webnic_wasm_bg.wasm",
        "wasm-client/node_modules/playwright-core/package.json",
    ] {
        assert!(
            repo().join(path).exists(),
            "{path} missing: `sudo scripts/test.sh` runs scripts/build-wasm.sh"
        );
    }
    let topo = Topology::new();
    let _dnsmasq = topo.serve_dnsmasq();
    let gateway = topo.start_gateway(&[]);
    let server = PageServer::start(topo.tmp().to_path_buf());
    let arg = format!(
        r#"{{"gateway":"{}","certHash":"{}","server":"{}","name":"web.test"}}"#,
        gateway.url(),
        gateway.cert_hash(),
        topo.srv_ipv4()
    );
    let mut cmd = Command::new(find_command("node").expect("node"));
    cmd.arg(repo().join("tests/browser/run.mjs"))
        .arg(format!("http://127.0.0.1:{}/v86.html", server.port))
        .arg("rawPacketsDns")
        .arg(&arg)
        .arg("60000");
    let process = topo.spawn_root("browser-raw", &mut cmd);
    let status = wait_exit(&process, Duration::from_secs(90));
    let stdout = fs::read_to_string(topo.tmp().join("browser-raw.out")).unwrap_or_default();
    let Some(result) = stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!("the raw-packet page failed ({status})\n{}", process.logs());
    };
    println!("page result: {result}");
    assert!(result.contains("\"answers\":1"), "{result}");
    assert!(
        result.contains(&format!("\"address\":\"{}\"", topo.srv_ipv4())),
        "web.test's A record through raw packets: {result}"
    );
}
