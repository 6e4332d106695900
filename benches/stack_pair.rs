//! Two `webnic_stack::Stack`s wired back to back in memory, no I/O: TCP bulk goodput, 64-byte
//! request/response rate (also with 1,000 other connections open), and setup + teardown of
//! 1,000 concurrent connections, each next to a baseline measured in the same run.
//!
//! Baselines:
//! - bulk: the same bytes memcpy'd in MTU-sized chunks through two `VecDeque<Vec<u8>>` hops
//!   (sender → wire → receiver), the cost floor of moving the bytes at all;
//! - request/response: the same 64-byte exchange over a `UnixStream` pair driven from one
//!   thread. One thread, like the stack pair, so both figures count protocol work and not
//!   scheduler hand-offs: the kernel's socket path is the reference a userspace stack competes
//!   with, and a tokio duplex would mostly measure task wake-ups instead;
//! - request/response with 1,000 other connections open and idle: the same exchange without
//!   them, so the ratio is how much the per-packet cost grows with the number of connections;
//! - 1,000 connections: the kernel doing the same over loopback TCP (connect, accept, close).
//!
//! Run with `cargo bench --bench stack_pair`; `scripts/bench.sh` collects the `RESULT` lines.

#[path = "support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use support::{Samples, report};
use webnic_stack::{Instant, ListenerHandle, Stack, StackConfig, TcpError, TcpHandle, TcpOptions};

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The tunnel's link MTU (a 1200-byte QUIC datagram minus headers).
const MTU: usize = 1152;
const BULK_BYTES: usize = 16 << 20;
const MESSAGE: usize = 64;
const CONNECTIONS: usize = 1000;
/// Upper bound on pair steps for any one operation, so a stalled stack fails instead of hanging.
const MAX_STEPS: usize = 5_000_000;

/// Two stacks; every packet one emits is handed to the other in the same step.
struct Pair {
    a: Stack,
    b: Stack,
    now: Instant,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::from_millis(0);
        let mut ca = StackConfig::new(MTU, 1);
        ca.ipv4 = Some(A);
        let mut cb = StackConfig::new(MTU, 2);
        cb.ipv4 = Some(B);
        Self {
            a: Stack::new(ca, now),
            b: Stack::new(cb, now),
            now,
        }
    }

    /// Polls both stacks and moves their packets across. When nothing moved, simulated time
    /// jumps to the next timer, so timers fire without the bench sleeping.
    fn step(&mut self) {
        self.a.poll(self.now);
        self.b.poll(self.now);
        let mut moved = false;
        while let Some(packet) = self.a.poll_transmit() {
            // A full receive queue drops the packet, as a real link would; TCP recovers.
            let _ = self.b.handle_packet(self.now, &packet);
            self.a.recycle(packet);
            moved = true;
        }
        while let Some(packet) = self.b.poll_transmit() {
            let _ = self.a.handle_packet(self.now, &packet);
            self.b.recycle(packet);
            moved = true;
        }
        // Events only tell the caller when to retry; the bench retries every step.
        while self.a.poll_event().is_some() {}
        while self.b.poll_event().is_some() {}
        if !moved {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            self.now = match next {
                Some(at) if at > self.now => at,
                _ => self.now + webnic_stack::Duration::from_millis(1),
            };
        }
    }

    /// A connected client (on `a`) and server (on `b`) handle.
    fn connect(&mut self, options: TcpOptions) -> (TcpHandle, TcpHandle) {
        let listener = self.b.tcp_listen(80, 4, options).expect("listen");
        let client = self
            .a
            .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), options)
            .expect("connect");
        for _ in 0..MAX_STEPS {
            self.step();
            if let Some((server, _)) = self.b.tcp_accept(listener) {
                return (client, server);
            }
        }
        panic!("connection was not accepted");
    }
}

/// Sends `data` from `a` to `b` over an established connection, reading it into `out`.
fn bulk(pair: &mut Pair, client: TcpHandle, server: TcpHandle, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut sent = 0;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_STEPS {
        while sent < data.len() {
            match pair.a.tcp_send(client, &data[sent..]) {
                Ok(n) => sent += n,
                Err(TcpError::WouldBlock) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        pair.step();
        loop {
            match pair.b.tcp_recv(server, &mut buf) {
                Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
                Ok(_) | Err(TcpError::WouldBlock) => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        if out.len() == data.len() {
            return;
        }
    }
    panic!("bulk transfer stalled at {} of {}", out.len(), data.len());
}

/// The bulk baseline: the bytes cross two queue hops in MTU-sized chunks, copied at each
/// (into the sender's packet, into the receiver's packet, into the application's buffer), with
/// the packet buffers recycled as the stack recycles its own.
fn bulk_baseline(data: &[u8], out: &mut Vec<u8>) {
    let mut hop1: VecDeque<Vec<u8>> = VecDeque::new();
    let mut hop2: VecDeque<Vec<u8>> = VecDeque::new();
    let mut free: Vec<Vec<u8>> = Vec::new();
    out.clear();
    for chunk in data.chunks(MTU - 40) {
        let mut packet = free.pop().unwrap_or_else(|| Vec::with_capacity(MTU));
        packet.clear();
        packet.extend_from_slice(chunk);
        hop1.push_back(packet);
        while let Some(packet) = hop1.pop_front() {
            let mut received = free.pop().unwrap_or_else(|| Vec::with_capacity(MTU));
            received.clear();
            received.extend_from_slice(&packet);
            free.push(packet);
            hop2.push_back(received);
        }
        while let Some(packet) = hop2.pop_front() {
            out.extend_from_slice(&packet);
            free.push(packet);
        }
    }
}

/// One 64-byte request and its 64-byte response through the pair.
fn exchange(pair: &mut Pair, client: TcpHandle, server: TcpHandle, message: &[u8; MESSAGE]) {
    let mut buf = [0u8; MESSAGE];
    assert_eq!(pair.a.tcp_send(client, message), Ok(MESSAGE));
    let mut got = 0;
    for _ in 0..MAX_STEPS {
        pair.step();
        match pair.b.tcp_recv(server, &mut buf[got..]) {
            Ok(n) => got += n,
            Err(TcpError::WouldBlock) => {}
            Err(e) => panic!("server recv: {e}"),
        }
        if got == MESSAGE {
            break;
        }
    }
    assert_eq!(&buf, message, "request corrupted");
    assert_eq!(pair.b.tcp_send(server, &buf), Ok(MESSAGE));
    got = 0;
    for _ in 0..MAX_STEPS {
        pair.step();
        match pair.a.tcp_recv(client, &mut buf[got..]) {
            Ok(n) => got += n,
            Err(TcpError::WouldBlock) => {}
            Err(e) => panic!("client recv: {e}"),
        }
        if got == MESSAGE {
            return;
        }
    }
    panic!("response not received");
}

fn exchange_baseline(a: &mut UnixStream, b: &mut UnixStream, message: &[u8; MESSAGE]) {
    let mut buf = [0u8; MESSAGE];
    a.write_all(message).expect("write request");
    b.read_exact(&mut buf).expect("read request");
    b.write_all(&buf).expect("write response");
    a.read_exact(&mut buf).expect("read response");
    assert_eq!(&buf, message, "echo corrupted");
}

/// Opens `CONNECTIONS` connections at once, then closes all of them and waits until both
/// stacks have freed every one.
fn connections() {
    let mut pair = Pair::new();
    let (_, clients, accepted) = open_connections(&mut pair, 80, CONNECTIONS);
    for h in clients {
        pair.a.tcp_release(h);
    }
    for h in accepted {
        pair.b.tcp_release(h);
    }
    for _ in 0..MAX_STEPS {
        pair.step();
        if pair.a.tcp_connection_count() == 0 && pair.b.tcp_connection_count() == 0 {
            return;
        }
    }
    panic!(
        "connections not torn down: {} and {} left",
        pair.a.tcp_connection_count(),
        pair.b.tcp_connection_count()
    );
}

/// Opens `count` connections from `a` to `b`'s `port` with small buffers; returns the
/// client and server handles.
fn open_connections(
    pair: &mut Pair,
    port: u16,
    count: usize,
) -> (ListenerHandle, Vec<TcpHandle>, Vec<TcpHandle>) {
    let small = TcpOptions {
        send_buffer: 4096,
        recv_buffer: 4096,
        ..TcpOptions::default()
    };
    let listener = pair.b.tcp_listen(port, 1024, small).expect("listen");
    let clients: Vec<_> = (0..count)
        .map(|_| {
            pair.a
                .tcp_connect(SocketAddr::new(IpAddr::V4(B), port), small)
                .expect("connect")
        })
        .collect();
    let mut accepted = Vec::with_capacity(count);
    for _ in 0..MAX_STEPS {
        pair.step();
        while let Some((h, _)) = pair.b.tcp_accept(listener) {
            accepted.push(h);
        }
        if accepted.len() == count {
            break;
        }
    }
    assert_eq!(accepted.len(), count, "not every connection was set up");
    (listener, clients, accepted)
}

/// A pair with one connection for the 64-byte exchange and `idle` other connections, open and
/// idle for 2 s: the stacks park connections quiet for a second.
struct Crowded {
    pair: Pair,
    client: TcpHandle,
    server: TcpHandle,
    _idle: (Vec<TcpHandle>, Vec<TcpHandle>),
}

impl Crowded {
    fn new(idle: usize) -> Self {
        let mut pair = Pair::new();
        let (client, server) = pair.connect(TcpOptions::default());
        // The listener that accepted them stays open too, as a server's would.
        let (_listener, idle_clients, idle_servers) = open_connections(&mut pair, 81, idle);
        let start = pair.now;
        for _ in 0..MAX_STEPS {
            pair.step();
            if pair.now >= start + webnic_stack::Duration::from_secs(2) {
                break;
            }
        }
        Self {
            pair,
            client,
            server,
            _idle: (idle_clients, idle_servers),
        }
    }

    fn exchange(&mut self, message: &[u8; MESSAGE]) {
        exchange(&mut self.pair, self.client, self.server, message);
    }
}

/// The kernel's loopback TCP doing the same: all connections open at once, then closed. A
/// fresh listener per run gives fresh 4-tuples, so the previous run's TIME_WAIT sockets do not
/// exhaust the ephemeral ports.
fn connections_baseline() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    let mut streams = Vec::with_capacity(2 * CONNECTIONS);
    for _ in 0..CONNECTIONS {
        streams.push(TcpStream::connect(address).expect("loopback connect"));
        streams.push(listener.accept().expect("loopback accept").0);
    }
    drop(black_box(streams));
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();

    // ----- bulk -----
    let data: Vec<u8> = (0..BULK_BYTES).map(|i| (i * 7 + i / 251) as u8).collect();
    let (stack_bulk, memcpy_bulk) = (Samples::new(), Samples::new());
    {
        let mut group = criterion.benchmark_group("stack_pair/bulk_16MiB");
        group.throughput(Throughput::Bytes(BULK_BYTES as u64));
        let mut out = Vec::with_capacity(BULK_BYTES);
        group.bench_function("stack", |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // A fresh connection per transfer (set up outside the timing): each
                    // transfer starts from slow start, as a real download would.
                    let mut pair = Pair::new();
                    let (client, server) = pair.connect(TcpOptions::default());
                    let start = std::time::Instant::now();
                    bulk(&mut pair, client, server, &data, &mut out);
                    total += start.elapsed();
                }
                assert!(out == data, "bulk payload differs");
                stack_bulk.record(iters, total);
                total
            });
        });
        group.bench_function("memcpy_two_hops", |b| {
            b.iter_custom(|iters| {
                let elapsed = memcpy_bulk.time(iters, || bulk_baseline(black_box(&data), &mut out));
                assert!(out == data, "baseline payload differs");
                elapsed
            });
        });
        group.finish();
    }

    // ----- request/response -----
    let message: [u8; MESSAGE] = std::array::from_fn(|i| i as u8);
    let (stack_rr, unix_rr) = (Samples::new(), Samples::new());
    let (crowded_rr, crowded10k_rr) = (Samples::new(), Samples::new());
    {
        let mut group = criterion.benchmark_group("stack_pair/request_response_64B");
        group.throughput(Throughput::Elements(1));
        let mut pair = Pair::new();
        let (client, server) = pair.connect(TcpOptions::default());
        group.bench_function("stack", |b| {
            b.iter_custom(|iters| {
                stack_rr.time(iters, || exchange(&mut pair, client, server, &message))
            });
        });
        // The same exchange with 1,000 and with 10,000 other connections open and idle in both
        // stacks: the per-packet cost must not grow with the number of connections.
        let mut crowded = Crowded::new(CONNECTIONS);
        group.bench_function("stack_with_1000_open", |b| {
            b.iter_custom(|iters| crowded_rr.time(iters, || crowded.exchange(&message)));
        });
        drop(crowded);
        let mut crowded = Crowded::new(10 * CONNECTIONS);
        group.bench_function("stack_with_10000_open", |b| {
            b.iter_custom(|iters| crowded10k_rr.time(iters, || crowded.exchange(&message)));
        });
        drop(crowded);
        let (mut ua, mut ub) = UnixStream::pair().expect("socketpair");
        group.bench_function("unix_stream", |b| {
            b.iter_custom(|iters| {
                unix_rr.time(iters, || exchange_baseline(&mut ua, &mut ub, &message))
            });
        });
        group.finish();
    }

    // ----- 1,000 concurrent connections -----
    let (stack_conns, kernel_conns) = (Samples::new(), Samples::new());
    {
        let mut group = criterion.benchmark_group("stack_pair/connections_1000");
        group.throughput(Throughput::Elements(CONNECTIONS as u64));
        group.bench_function("stack", |b| {
            b.iter_custom(|iters| stack_conns.time(iters, connections));
        });
        group.bench_function("kernel_loopback", |b| {
            b.iter_custom(|iters| kernel_conns.time(iters, connections_baseline));
        });
        group.finish();
    }

    criterion.final_summary();

    let mbytes = |secs: f64| BULK_BYTES as f64 / secs / 1e6;
    report(
        "stack_pair.bulk_goodput",
        mbytes(stack_bulk.median_secs()),
        "MB/s",
        "memcpy_two_hops",
        mbytes(memcpy_bulk.median_secs()),
    );
    let per_sec = |secs: f64| 1.0 / secs;
    report(
        "stack_pair.request_response_64B",
        per_sec(stack_rr.median_secs()),
        "exchanges/s",
        "unix_stream_pair",
        per_sec(unix_rr.median_secs()),
    );
    report(
        "stack_pair.request_response_64B_with_1000_open",
        per_sec(crowded_rr.median_secs()),
        "exchanges/s",
        "same_exchange_no_other_connections",
        per_sec(stack_rr.median_secs()),
    );
    report(
        "stack_pair.request_response_64B_with_10000_open",
        per_sec(crowded10k_rr.median_secs()),
        "exchanges/s",
        "same_exchange_no_other_connections",
        per_sec(stack_rr.median_secs()),
    );
    let ms = |secs: f64| secs * 1e3;
    report(
        "stack_pair.connections_1000_setup_teardown",
        ms(stack_conns.median_secs()),
        "ms",
        "kernel_loopback_tcp",
        ms(kernel_conns.median_secs()),
    );
}
