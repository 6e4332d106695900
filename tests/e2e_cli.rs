//! End-to-end tests of the `webnic` CLI (root namespace) with ordinary clients: curl and ssh through
//! `webnic socks5`, a plain TCP client through `webnic forward`, and `webnic nc`.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::{
    GatewayProcess, Process, TCP_ECHO_PORT, TempDir, Topology, assert_same_bytes, free_local_port,
    random_bytes, run_with_stdin, run_with_timeout, sha256_hex, wait_tcp_accepting,
};

/// Starts `webnic <mode> 127.0.0.1:<free port>[...]` and waits until the port accepts connections.
fn start_cli_on_free_port(
    topology: &Topology,
    gateway: &GatewayProcess,
    mode: &str,
    arg: impl Fn(u16) -> String,
) -> (Process, u16) {
    let port = free_local_port();
    let cli = topology.spawn_cli(gateway, &[mode, &arg(port)]);
    wait_tcp_accepting(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(30),
        &cli,
    );
    (cli, port)
}

/// curl downloads a 4 MiB file from nginx through `webnic socks5`, by tunnel-resolved hostname and by
/// IPv6 literal; both byte-exact.
#[test]
fn socks5_curl_downloads_from_nginx() {
    let topology = Topology::new();
    let www = TempDir::new("www");
    let file = random_bytes(4 << 20);
    std::fs::write(www.join("file.bin"), &file).unwrap();
    let nginx = topology.serve_nginx(www.path());
    let _dns = topology.serve_dnsmasq();
    let gateway = topology.start_gateway(&[]);
    let (socks, port) =
        start_cli_on_free_port(&topology, &gateway, "socks5", |p| format!("127.0.0.1:{p}"));

    let urls = [
        "http://web.test/file.bin".to_owned(),
        format!("http://[{}]/file.bin", topology.srv_ipv6()),
    ];
    for (i, url) in urls.iter().enumerate() {
        let out = topology.tmp().join(format!("curl-{i}.bin"));
        let output = run_with_timeout(
            Command::new("curl").args([
                "-sS",
                "--fail",
                "-g",
                "--max-time",
                "90",
                "--socks5-hostname",
                &format!("127.0.0.1:{port}"),
                "-o",
                out.to_str().unwrap(),
                url,
            ]),
            Duration::from_secs(100),
        );
        assert!(
            output.status.success(),
            "curl {url} via socks5 failed: {}\n{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            socks.logs(),
            nginx.logs()
        );
        let downloaded = std::fs::read(&out).unwrap();
        assert_same_bytes(&downloaded, &file, url);
    }
}

/// OpenSSH reaches sshd through `webnic socks5` (nc -X 5 as ProxyCommand) and runs a command.
#[test]
fn socks5_ssh_runs_a_command() {
    let topology = Topology::new();
    let sshd = topology.serve_sshd();
    let gateway = topology.start_gateway(&[]);
    let (socks, port) =
        start_cli_on_free_port(&topology, &gateway, "socks5", |p| format!("127.0.0.1:{p}"));
    let output = run_with_timeout(
        Command::new("ssh").args([
            "-F",
            "/dev/null",
            "-i",
            sshd.client_key().to_str().unwrap(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
            "-o",
            &format!("ProxyCommand=nc -X 5 -x 127.0.0.1:{port} %h %p"),
            &format!("root@{}", topology.srv_ipv4()),
            "echo",
            "ok",
        ]),
        Duration::from_secs(60),
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "ok",
        "ssh through socks5 failed ({}): {}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        socks.logs(),
        sshd.process.logs()
    );
    assert!(output.status.success());
}

/// `webnic forward 127.0.0.1:L=10.201.n.2:7001` carries 1 MiB to the echo server and back, byte-exact.
#[test]
fn forward_carries_tcp_byte_exact() {
    let topology = Topology::new();
    let echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    let target = format!("{}:{TCP_ECHO_PORT}", topology.srv_ipv4());
    let (forward, port) = start_cli_on_free_port(&topology, &gateway, "forward", |p| {
        format!("127.0.0.1:{p}={target}")
    });

    let data = random_bytes(1 << 20);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the forward port");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&to_send)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut echoed = Vec::new();
    let read = stream.read_to_end(&mut echoed);
    let sent = sender.join().unwrap();
    assert!(
        read.is_ok() && sent.is_ok(),
        "forward: read {read:?}, write {sent:?}\n{}\n{}",
        forward.logs(),
        echo.logs()
    );
    assert_same_bytes(&echoed, &data, "1 MiB through webnic forward");
}

/// `webnic nc HOST PORT` pipes stdin to the echo server and the echo to stdout, then exits.
#[test]
fn nc_pipes_stdin_and_stdout() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gateway = topology.start_gateway(&[]);
    let data = random_bytes(256 << 10);
    let input = topology.tmp().join("nc-input.bin");
    std::fs::write(&input, &data).unwrap();
    let output = run_with_stdin(
        Command::new(env!("CARGO_BIN_EXE_webnic")).args([
            "--gateway",
            gateway.url(),
            "--cert-hash",
            gateway.cert_hash(),
            "nc",
            &topology.srv_ipv4().to_string(),
            &TCP_ECHO_PORT.to_string(),
        ]),
        File::open(&input).unwrap(),
        Duration::from_secs(60),
    );
    assert!(
        output.status.success(),
        "webnic nc failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        output.stdout.len(),
        data.len(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(sha256_hex(&output.stdout), sha256_hex(&data));
}
