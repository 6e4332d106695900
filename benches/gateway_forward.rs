//! The gateway's per-packet work without the network, at 1, 100 and 10,000 sessions, in ns per
//! packet, each next to a baseline measured in the same run.
//!
//! - client → TUN: `classify_from_client` (well-formed, the session's own source) →
//!   `mss_clamp_needed` → the packet handed on as `Bytes` (a `VecDeque` stands in for the TUN
//!   write), as `session.rs` does per received datagram;
//! - TUN → session: `destination` → `clamp_tcp_mss` → `RouteTable::lookup` → datagram header +
//!   `Bytes::copy_from_slice` → `SessionQueue::push` → `try_pop` (the session's sender), as
//!   `server.rs`'s TUN reader does.
//!
//! Baseline, for both: a bare `HashMap<IpAddr, VecDeque<Bytes>>` lookup of the packet's address
//! plus a push and pop of a copy of the same packet: the least any router of these packets does
//! (find the session, move the bytes). Packets cycle over all sessions so the table's cache
//! footprint at 10,000 sessions counts.
//!
//! Run with `cargo bench --bench gateway_forward`; `scripts/bench.sh` collects the `RESULT` lines.

#[path = "support/mod.rs"]
mod support;

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use support::{Samples, report};
use webnic_gateway::packet::{
    clamp_tcp_mss, classify_from_client, destination, internet_checksum, max_mss_for_mtu,
    mss_clamp_needed,
};
use webnic_gateway::queue::{DEFAULT_QUEUE_CAPACITY, RouteTable, SessionQueue};
use webnic_stack::protocol::datagram_header;

const SESSION_COUNTS: [usize; 3] = [1, 100, 10_000];
/// A full-size tunnel packet: the link MTU of a 1200-byte QUIC datagram.
const PACKET_LEN: usize = 1152;
const LINK_MTU: u16 = 1152;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

fn session_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 2)) + index as u32)
}

/// An IPv4 TCP segment (ACK with payload, so no MSS clamping applies) with a valid header
/// checksum, `PACKET_LEN` bytes long.
fn tcp_packet(source: Ipv4Addr, destination: Ipv4Addr) -> Vec<u8> {
    let mut packet = vec![0u8; PACKET_LEN];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(PACKET_LEN as u16).to_be_bytes());
    packet[6] = 0x40; // Don't Fragment
    packet[8] = 64;
    packet[9] = 6;
    packet[12..16].copy_from_slice(&source.octets());
    packet[16..20].copy_from_slice(&destination.octets());
    let checksum = internet_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet[20..22].copy_from_slice(&443u16.to_be_bytes());
    packet[22..24].copy_from_slice(&50000u16.to_be_bytes());
    packet[32] = 5 << 4; // data offset: 20 bytes
    packet[33] = 0x10; // ACK
    for (i, byte) in packet[40..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    packet
}

struct Setup {
    /// Per session: its address list (what the session task holds) and a packet it sends.
    upstream: Vec<([IpAddr; 1], Vec<u8>)>,
    /// Per session: a packet the TUN delivers for it.
    downstream: Vec<Vec<u8>>,
    routes: RouteTable,
    queues: Vec<Arc<SessionQueue>>,
    bare: HashMap<IpAddr, VecDeque<Bytes>>,
}

impl Setup {
    fn new(sessions: usize) -> Self {
        let routes = RouteTable::new();
        let mut queues = Vec::with_capacity(sessions);
        let mut bare = HashMap::new();
        let mut upstream = Vec::with_capacity(sessions);
        let mut downstream = Vec::with_capacity(sessions);
        for index in 0..sessions {
            let address = session_address(index);
            let ip = IpAddr::V4(address);
            let queue = Arc::new(SessionQueue::new(
                DEFAULT_QUEUE_CAPACITY,
                datagram_header(4 * index as u64),
            ));
            routes.insert(ip, Arc::clone(&queue));
            queues.push(queue);
            bare.insert(ip, VecDeque::with_capacity(64));
            upstream.push(([ip], tcp_packet(address, SERVER)));
            downstream.push(tcp_packet(SERVER, address));
        }
        assert_eq!(routes.len(), sessions);
        Self {
            upstream,
            downstream,
            routes,
            queues,
            bare,
        }
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    let (max_v4, max_v6) = max_mss_for_mtu(LINK_MTU);
    let mut results = Vec::new();

    for sessions in SESSION_COUNTS {
        let mut setup = Setup::new(sessions);
        let samples: [Samples; 4] = Default::default();
        let mut group = criterion.benchmark_group("gateway_forward");
        group.throughput(Throughput::Elements(1));

        // ----- client → TUN -----
        let mut tun_writes: VecDeque<Bytes> = VecDeque::with_capacity(64);
        let mut next = 0;
        group.bench_function(BenchmarkId::new("client_to_tun", sessions), |b| {
            b.iter_custom(|iters| {
                samples[0].time(iters, || {
                    let (addresses, packet) = &setup.upstream[next];
                    next = (next + 1) % sessions;
                    let classified =
                        classify_from_client(packet, addresses).expect("packet is well-formed");
                    assert!(!mss_clamp_needed(packet, max_v4, max_v6));
                    // The datagram arrives as `Bytes` from quinn: a copy of the packet here.
                    tun_writes.push_back(Bytes::copy_from_slice(packet));
                    black_box(classified);
                    black_box(tun_writes.pop_front());
                })
            });
        });
        let mut next = 0;
        group.bench_function(BenchmarkId::new("client_to_tun_baseline", sessions), |b| {
            b.iter_custom(|iters| {
                samples[1].time(iters, || {
                    let (addresses, packet) = &setup.upstream[next];
                    next = (next + 1) % sessions;
                    let queue = setup.bare.get_mut(&addresses[0]).expect("session known");
                    queue.push_back(Bytes::copy_from_slice(packet));
                    black_box(queue.pop_front());
                })
            });
        });

        // ----- TUN → session -----
        const HEADROOM: usize = 8;
        let mut buf = vec![0u8; HEADROOM + PACKET_LEN];
        let mut next = 0;
        group.bench_function(BenchmarkId::new("tun_to_session", sessions), |b| {
            b.iter_custom(|iters| {
                samples[2].time(iters, || {
                    // The TUN read: the kernel copies the packet into the reader's buffer.
                    buf[HEADROOM..].copy_from_slice(&setup.downstream[next]);
                    next = (next + 1) % sessions;
                    let packet = &mut buf[HEADROOM..];
                    let to = destination(packet).expect("IPv4 packet");
                    let queue = setup.routes.lookup(to).expect("session routed");
                    clamp_tcp_mss(packet, max_v4, max_v6);
                    let header = queue.header();
                    let start = HEADROOM - header.len();
                    buf[start..HEADROOM].copy_from_slice(header);
                    let dropped = queue.push(Bytes::copy_from_slice(&buf[start..]));
                    assert!(!dropped);
                    black_box(queue.try_pop().expect("queued"));
                })
            });
        });
        let mut next = 0;
        group.bench_function(BenchmarkId::new("tun_to_session_baseline", sessions), |b| {
            b.iter_custom(|iters| {
                samples[3].time(iters, || {
                    buf[HEADROOM..].copy_from_slice(&setup.downstream[next]);
                    next = (next + 1) % sessions;
                    let to = IpAddr::V4(Ipv4Addr::new(
                        buf[HEADROOM + 16],
                        buf[HEADROOM + 17],
                        buf[HEADROOM + 18],
                        buf[HEADROOM + 19],
                    ));
                    let queue = setup.bare.get_mut(&to).expect("session known");
                    queue.push_back(Bytes::copy_from_slice(&buf[HEADROOM..]));
                    black_box(queue.pop_front());
                })
            });
        });
        group.finish();
        assert!(setup.queues.iter().all(|q| q.is_empty()), "queues drained");
        setup.bare.clear();
        results.push((sessions, samples));
    }

    criterion.final_summary();
    let ns = |samples: &Samples| samples.median_secs() * 1e9;
    for (sessions, samples) in &results {
        report(
            &format!("gateway_forward.client_to_tun.sessions_{sessions}"),
            ns(&samples[0]),
            "ns/packet",
            "hashmap_vecdeque",
            ns(&samples[1]),
        );
        report(
            &format!("gateway_forward.tun_to_session.sessions_{sessions}"),
            ns(&samples[2]),
            "ns/packet",
            "hashmap_vecdeque",
            ns(&samples[3]),
        );
    }
}
