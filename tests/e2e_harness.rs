//! Self-tests of the end-to-end harness (`tests/common`): the topology, the servers in the server
//! namespace (reached from the gateway namespace, without any webnic code), the cleanup, the gateway
//! launcher and the metrics parser.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    GATEWAY_PORT, TCP_ECHO_PORT, Topology, UDP_ECHO_PORT, in_netns, random_bytes, sha256_hex,
};

#[test]
fn prometheus_parser_keeps_labels_in_the_key() {
    let text = "# HELP webnic_sessions_active Sessions.\n# TYPE webnic_sessions_active gauge\n\
                webnic_sessions_active 3\n\
                webnic_pool_addresses_free{family=\"ipv4\"} 250\n\
                webnic_dropped_packets_total{reason=\"spoofed\",note=\"a b\"} 1.5e2 1700000000\n\
                webnic_bucket{le=\"+Inf\"} +Inf\n\n";
    let metrics = common::parse_prometheus(text);
    assert_eq!(metrics.len(), 4, "{metrics:?}");
    assert_eq!(metrics["webnic_sessions_active"], 3.0);
    assert_eq!(
        metrics["webnic_pool_addresses_free{family=\"ipv4\"}"],
        250.0
    );
    assert_eq!(
        metrics["webnic_dropped_packets_total{reason=\"spoofed\",note=\"a b\"}"],
        150.0
    );
    assert!(metrics["webnic_bucket{le=\"+Inf\"}"].is_infinite());
}

#[test]
fn random_data_differs_and_hashes_are_hex() {
    let (a, b) = (random_bytes(4096), random_bytes(4096));
    assert_eq!(a.len(), 4096);
    assert_ne!(a, b);
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// Everything a test may use in the server namespace works, seen from the gateway namespace, and
/// nothing is left behind afterwards.
#[test]
fn servers_answer_from_the_gateway_namespace_and_cleanup_is_complete() {
    let topology = Topology::new();
    let (gw_ns, srv_ns, n) = (topology.gw_ns(), topology.srv_ns(), topology.n());
    let (v4, v6) = (topology.srv_ipv4(), topology.srv_ipv6());
    let pids;
    {
        // nginx
        let www = common::TempDir::new("www");
        let file = random_bytes(1 << 20);
        std::fs::write(www.join("file.bin"), &file).unwrap();
        let nginx = topology.serve_nginx(www.path());
        for url in [
            format!("http://{v4}/file.bin"),
            format!("http://[{v6}]/file.bin"),
        ] {
            let out = topology.tmp().join("curl.out");
            let output = topology.gw_exec(&[
                "curl",
                "-sS",
                "-g",
                "--fail",
                "-o",
                out.to_str().unwrap(),
                &url,
            ]);
            assert!(
                output.status.success(),
                "curl {url}: {output:?}\n{}",
                nginx.logs()
            );
            assert_eq!(
                sha256_hex(&std::fs::read(&out).unwrap()),
                sha256_hex(&file),
                "{url}"
            );
        }

        // TCP echo, both families, with a slow reader so the echo's tail outlives socat's EOF timer.
        let tcp_echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
        for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
            let addr = SocketAddr::new(ip, TCP_ECHO_PORT);
            let echoed = in_netns(&gw_ns, move || tcp_echo_roundtrip(addr, 4 << 20, true));
            assert!(echoed, "TCP echo via {addr} failed\n{}", tcp_echo.logs());
        }

        // UDP echo: exactly one reply per datagram, to the sender.
        let udp_echo = topology.serve_udp_echo();
        for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
            let addr = SocketAddr::new(ip, UDP_ECHO_PORT);
            let result = in_netns(&gw_ns, move || udp_echo_roundtrip(addr, 300));
            assert_eq!(result, Ok(300), "UDP echo via {addr}\n{}", udp_echo.logs());
        }

        // dnsmasq
        let dnsmasq = topology.serve_dnsmasq();
        let server = SocketAddr::new(IpAddr::V4(v4), 53);
        let (a, aaaa, missing) = in_netns(&gw_ns, move || {
            (
                dns_query(server, "web.test", 1),
                dns_query(server, "echo.test", 28),
                dns_query(server, "nope.test", 1),
            )
        });
        let logs = dnsmasq.logs();
        let (rcode, answers) = a.unwrap_or_else(|e| panic!("A web.test: {e}\n{logs}"));
        assert_eq!((rcode, answers), (0, vec![v4.octets().to_vec()]), "{logs}");
        let (rcode, answers) = aaaa.unwrap_or_else(|e| panic!("AAAA echo.test: {e}\n{logs}"));
        assert_eq!((rcode, answers), (0, vec![v6.octets().to_vec()]), "{logs}");
        let (rcode, answers) = missing.unwrap_or_else(|e| panic!("A nope.test: {e}\n{logs}"));
        assert_eq!(
            (rcode, answers.len()),
            (3, 0),
            "nope.test should be NXDOMAIN\n{logs}"
        );

        // sshd, from the gateway namespace directly.
        let sshd = topology.serve_sshd();
        let output = topology.gw_exec(&[
            "ssh",
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
            "ConnectTimeout=10",
            &format!("root@{v4}"),
            "echo",
            "ok",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "ok",
            "ssh: {output:?}\n{}",
            sshd.process.logs()
        );

        // srv_exec and nft work in the server namespace.
        topology.srv_run(&["nft", "add", "table", "inet", "wnselftest"]);
        assert!(
            topology
                .srv_run(&["nft", "list", "tables"])
                .contains("wnselftest")
        );

        pids = [
            nginx.pid(),
            tcp_echo.pid(),
            udp_echo.pid(),
            dnsmasq.pid(),
            sshd.process.pid(),
        ];
        // Guards drop here (reverse order), each killing its process group.
    }
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still running"
        );
    }
    drop(topology);

    let namespaces = common::run(&["ip", "netns", "list"]);
    for ns in [&gw_ns, &srv_ns] {
        assert!(
            !namespaces
                .split_whitespace()
                .any(|name| name == ns.as_str()),
            "{ns} left behind: {namespaces}"
        );
    }
    let links = common::run(&["ip", "-o", "link", "show"]);
    assert!(
        !links.contains(&format!("wn{n}a")),
        "veth wn{n}a left behind: {links}"
    );
}

/// The TCP echo neither stalls nor truncates: 32 MiB at full speed, and several slow readers at once.
#[test]
fn tcp_echo_handles_bulk_and_slow_readers() {
    let topology = Topology::new();
    let echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let gw_ns = topology.gw_ns();
    let v4 = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
    let v6 = SocketAddr::new(IpAddr::V6(topology.srv_ipv6()), TCP_ECHO_PORT);
    assert!(
        in_netns(&gw_ns, move || tcp_echo_roundtrip(v4, 32 << 20, false)),
        "32 MiB echo\n{}",
        echo.logs()
    );
    let slow: Vec<_> = [v4, v6, v4, v6]
        .into_iter()
        .map(|addr| {
            let ns = gw_ns.clone();
            thread::spawn(move || in_netns(&ns, move || tcp_echo_roundtrip(addr, 4 << 20, true)))
        })
        .collect();
    for handle in slow {
        assert!(handle.join().unwrap(), "slow reader echo\n{}", echo.logs());
    }
}

/// The topology is cleaned up when the test panics while servers run.
#[test]
fn cleanup_runs_on_panic() {
    let names = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topology = Topology::new();
        let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
        *names.lock().unwrap() = Some((topology.gw_ns(), topology.srv_ns(), topology.n()));
        panic!("deliberate panic inside a topology");
    }));
    assert!(result.is_err());
    let (gw_ns, srv_ns, n) = names.lock().unwrap().clone().expect("topology was built");
    let namespaces = common::run(&["ip", "netns", "list"]);
    assert!(
        !namespaces
            .split_whitespace()
            .any(|name| name == gw_ns || name == srv_ns),
        "namespaces left behind after panic: {namespaces}"
    );
    assert!(!common::run(&["ip", "-o", "link", "show"]).contains(&format!("wn{n}a")));
}

/// Parallel topologies get distinct names and do not interfere.
#[test]
fn parallel_topologies_are_isolated() {
    let handles: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(|| {
                let topology = Topology::new();
                let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
                let addr = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
                let ok = in_netns(&topology.gw_ns(), move || {
                    tcp_echo_roundtrip(addr, 64 << 10, false)
                });
                assert!(ok);
                topology.n()
            })
        })
        .collect();
    let mut ns: Vec<u8> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    ns.sort_unstable();
    ns.dedup();
    assert_eq!(ns.len(), 3);
}

/// The gateway starts, becomes ready (certificate hash written) and serves metrics.
#[test]
fn gateway_starts_and_serves_metrics() {
    let topology = Topology::new();
    let gateway = topology.start_gateway(&[]);
    assert_eq!(gateway.cert_hash().len(), 64);
    assert_eq!(
        gateway.url(),
        format!("https://{}:{GATEWAY_PORT}/webnic", topology.gw_addr())
    );
    let metrics = gateway.metrics();
    assert!(
        !metrics.is_empty(),
        "no metrics parsed from:\n{}",
        gateway.metrics_text()
    );
    assert_eq!(gateway.metric("webnic_sessions_active"), 0.0);
    assert_eq!(
        gateway.metric("webnic_pool_addresses_in_use{family=\"ipv4\"}"),
        0.0
    );
    assert!(gateway.metric("webnic_pool_addresses_free{family=\"ipv4\"}") >= 250.0);
    // The QUIC port is bound in the gateway namespace.
    let udp = String::from_utf8_lossy(&topology.gw_exec(&["ss", "-Hlun"]).stdout).into_owned();
    assert!(udp.contains(&format!(":{GATEWAY_PORT}")), "{udp}");
    // And the TUN exists there.
    let links = String::from_utf8_lossy(
        &topology
            .gw_exec(&["ip", "-o", "link", "show", "wntun0"])
            .stdout,
    )
    .into_owned();
    assert!(
        links.contains("wntun0"),
        "no wntun0 in the gateway namespace: {links}"
    );
}

// ------------------------------------------------------------------------------------------------

/// Sends `len` random bytes, half-closes, reads the echo to EOF; true if byte-exact.
fn tcp_echo_roundtrip(addr: SocketAddr, len: usize, slow_reader: bool) -> bool {
    let data = random_bytes(len);
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let to_send = data.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::with_capacity(len);
    let mut buf = vec![0u8; 16 << 10];
    let started = Instant::now();
    loop {
        let read = stream.read(&mut buf).expect("read echo");
        if read == 0 {
            break;
        }
        echoed.extend_from_slice(&buf[..read]);
        // ~ 2 s for 4 MiB: long past socat's default 0.5 s EOF timeout.
        if slow_reader && echoed.len() % (256 << 10) < read {
            thread::sleep(Duration::from_millis(120));
        }
        assert!(started.elapsed() < Duration::from_secs(60), "echo too slow");
    }
    sender.join().unwrap();
    echoed.len() == data.len() && sha256_hex(&echoed) == sha256_hex(&data)
}

/// Sends `count` numbered datagrams (≤ 32 outstanding) and checks each comes back once, intact.
fn udp_echo_roundtrip(addr: SocketAddr, count: u32) -> Result<u32, String> {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let payloads: Vec<Vec<u8>> = (0..count)
        .map(|seq| {
            let mut p = seq.to_be_bytes().to_vec();
            p.extend(random_bytes(16 + (seq as usize * 37) % 985));
            p
        })
        .collect();
    let mut seen = vec![false; count as usize];
    let (mut next, mut received, mut outstanding) = (0u32, 0u32, 0u32);
    let mut buf = [0u8; 2048];
    while received < count {
        while outstanding < 32 && next < count {
            socket.send_to(&payloads[next as usize], addr).unwrap();
            next += 1;
            outstanding += 1;
        }
        let (len, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recv after {received}: {e}"))?;
        if from != addr {
            return Err(format!("reply from {from}"));
        }
        let seq = u32::from_be_bytes(buf[..4].try_into().unwrap());
        let Some(slot) = seen.get_mut(seq as usize) else {
            return Err(format!("unknown seq {seq}"));
        };
        if std::mem::replace(slot, true) {
            return Err(format!("duplicate seq {seq}"));
        }
        if buf[..len] != payloads[seq as usize][..] {
            return Err(format!("payload of seq {seq} differs"));
        }
        received += 1;
        outstanding -= 1;
    }
    Ok(received)
}

/// A minimal DNS query over UDP: returns (rcode, rdata of every answer of type `qtype`).
fn dns_query(server: SocketAddr, name: &str, qtype: u16) -> Result<(u8, Vec<Vec<u8>>), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.push(0);
    query.extend_from_slice(&qtype.to_be_bytes());
    query.extend_from_slice(&1u16.to_be_bytes());
    socket.send_to(&query, server).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let (len, _) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
    let msg = &buf[..len];
    if msg.len() < 12 || msg[..2] != [0x12, 0x34] {
        return Err(format!("bad reply {msg:?}"));
    }
    let rcode = msg[3] & 0x0f;
    let answers = u16::from_be_bytes([msg[6], msg[7]]);
    // Skip the question (the same bytes we sent).
    let mut pos = query.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // Name: a compression pointer (2 bytes) or labels.
        if msg.get(pos).ok_or("truncated")? & 0xc0 == 0xc0 {
            pos += 2;
        } else {
            while *msg.get(pos).ok_or("truncated")? != 0 {
                pos += 1 + msg[pos] as usize;
            }
            pos += 1;
        }
        let header = msg.get(pos..pos + 10).ok_or("truncated")?;
        let rtype = u16::from_be_bytes([header[0], header[1]]);
        let rdlen = u16::from_be_bytes([header[8], header[9]]) as usize;
        pos += 10;
        let rdata = msg.get(pos..pos + rdlen).ok_or("truncated")?;
        if rtype == qtype {
            out.push(rdata.to_vec());
        }
        pos += rdlen;
    }
    Ok((rcode, out))
}

/// An option passed to `start_gateway` replaces its default: a /29 pool leaves 5 client addresses.
#[test]
fn gateway_extra_args_override_defaults() {
    let topology = Topology::new();
    let gateway = topology.start_gateway(&["--pool-v4", "10.77.0.0/29"]);
    let text = gateway.metrics_text();
    eprintln!("{text}");
    assert_eq!(
        gateway.metric("webnic_pool_addresses_free{family=\"ipv4\"}"),
        5.0,
        "{text}"
    );
}
