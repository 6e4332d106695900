//! Two stacks wired back to back in memory, with simulated time and seeded loss: the stack's
//! TCP, UDP and event contract tested without sockets or clocks.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use webnic_stack::link_repair::{
    FRAME_GONE, FRAME_NACK, ResendBuffer, SEQUENCED_OVERHEAD, parse_nack, put_ranges,
    put_sequenced_header,
};
use webnic_stack::link_stream::put_frame;
use webnic_stack::{
    Duration, Event, Instant, Stack, StackConfig, TcpError, TcpHandle, TcpOptions, UdpOptions,
};

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

struct Pair {
    a: Stack,
    b: Stack,
    now: Instant,
    /// Packets in flight: (deliver at, to b?, bytes).
    wire: VecDeque<(Instant, bool, Vec<u8>)>,
    latency: Duration,
    loss_percent: u64,
    rng: u64,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
    /// Link repair on A → B, A playing the gateway: what A sent, by sequence number.
    repair: Option<ResendBuffer<Vec<u8>>>,
    /// Stream link on A → B (A playing the gateway): each step's packets from A framed into one
    /// stream write, delivered to B in two chunks split inside a frame.
    stream: bool,
}

impl Pair {
    fn new(mtu: usize, latency_ms: u64, loss_percent: u64, seed: u64) -> Self {
        let now = Instant::from_millis(0);
        let mut ca = StackConfig::new(mtu, seed);
        ca.ipv4 = Some(A);
        let mut cb = StackConfig::new(mtu, seed ^ 0x5555);
        cb.ipv4 = Some(B);
        Self {
            a: Stack::new(ca, now),
            b: Stack::new(cb, now),
            now,
            wire: VecDeque::new(),
            latency: Duration::from_millis(latency_ms),
            loss_percent,
            rng: seed | 1,
            a_events: Vec::new(),
            b_events: Vec::new(),
            repair: None,
            stream: false,
        }
    }

    /// Puts `datagram` on the wire unless the link loses it.
    fn send(&mut self, to_b: bool, datagram: Vec<u8>) {
        if self.random() % 100 >= self.loss_percent {
            self.wire
                .push_back((self.now + self.latency, to_b, datagram));
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: deterministic loss pattern per seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// One step: poll both, move packets, advance time to the next deadline.
    fn step(&mut self) {
        self.a.poll(self.now);
        self.b.poll(self.now);
        if self.stream {
            let mut write = Vec::new();
            while let Some(p) = self.a.poll_transmit() {
                put_frame(&mut write, &p);
            }
            if !write.is_empty() {
                let split = write.len() / 2 + 1;
                let rest = write.split_off(split.min(write.len()));
                self.send(true, write);
                if !rest.is_empty() {
                    self.send(true, rest);
                }
            }
        }
        while let Some(p) = self.a.poll_transmit() {
            let p = match &mut self.repair {
                Some(sent) => sent
                    .push_with(|seq| {
                        let mut frame = vec![0; SEQUENCED_OVERHEAD];
                        put_sequenced_header(&mut frame, seq);
                        frame.extend_from_slice(&p);
                        frame
                    })
                    .1
                    .clone(),
                None => p,
            };
            self.send(true, p);
        }
        while let Some(p) = self.b.poll_transmit() {
            if p.first() == Some(&FRAME_NACK) {
                // The gateway's part: resend what is kept, say GONE for the rest.
                let sent = self.repair.as_ref().expect("NACK without link repair");
                let mut resends = Vec::new();
                let mut gone = Vec::new();
                for (first, count) in parse_nack(&p).expect("B's NACK parses") {
                    for seq in (0..u32::from(count)).map(|i| first + i) {
                        match sent.get(seq) {
                            Some(datagram) => resends.push(datagram.clone()),
                            None => gone.push(seq),
                        }
                    }
                }
                if !gone.is_empty() {
                    let mut frame = vec![FRAME_GONE];
                    put_ranges(&mut frame, &gone);
                    resends.push(frame);
                }
                for datagram in resends {
                    self.send(true, datagram);
                }
                continue;
            }
            self.send(false, p);
        }
        while let Some(e) = self.a.poll_event() {
            self.a_events.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            self.b_events.push(e);
        }
        let mut next = [self.a.poll_timeout(), self.b.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        if let Some((at, _, _)) = self.wire.front() {
            next = Some(next.map_or(*at, |n| n.min(*at)));
        }
        let next = next.unwrap_or(self.now + Duration::from_millis(100));
        if next > self.now {
            self.now = next;
        }
        while self.wire.front().is_some_and(|(at, _, _)| *at <= self.now) {
            let (_, to_b, p) = self.wire.pop_front().unwrap();
            if to_b && self.stream {
                self.b
                    .handle_link_stream(self.now, &p)
                    .expect("the stream's framing holds");
                continue;
            }
            let target = if to_b { &mut self.b } else { &mut self.a };
            let _ = target.handle_datagram(self.now, &p);
        }
    }
}

impl Pair {
    /// A connects to a listener on B port 80; returns both ends once B accepted.
    fn connect(&mut self) -> (TcpHandle, TcpHandle) {
        let listener = self.b.tcp_listen(80, 1, TcpOptions::default()).unwrap();
        let client = self
            .a
            .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), TcpOptions::default())
            .unwrap();
        for _ in 0..50 {
            self.step();
            if let Some((server, _)) = self.b.tcp_accept(listener) {
                return (client, server);
            }
        }
        panic!("B never accepted the connection");
    }
}

fn transfer(mtu: usize, latency_ms: u64, loss: u64, seed: u64, size: usize) -> (Duration, Pair) {
    transfer_with(Pair::new(mtu, latency_ms, loss, seed), size)
}

fn transfer_with(mut pair: Pair, size: usize) -> (Duration, Pair) {
    let listener = pair.b.tcp_listen(80, 4, TcpOptions::default()).unwrap();
    let client = pair
        .a
        .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), TcpOptions::default())
        .unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut sent = 0;
    let mut received = Vec::with_capacity(size);
    let mut server: Option<TcpHandle> = None;
    let mut buf = vec![0u8; 65536];
    let mut shut = false;
    for _ in 0..2_000_000 {
        pair.step();
        if server.is_none()
            && let Some((h, from)) = pair.b.tcp_accept(listener)
        {
            assert_eq!(from.ip(), IpAddr::V4(A));
            server = Some(h);
        }
        while sent < data.len() {
            match pair.a.tcp_send(client, &data[sent..]) {
                Ok(n) => sent += n,
                Err(TcpError::WouldBlock) => break,
                Err(e) => panic!("send: {e}"),
            }
        }
        if sent == data.len() && !shut {
            pair.a.tcp_shutdown(client).unwrap();
            shut = true;
        }
        if let Some(h) = server {
            loop {
                match pair.b.tcp_recv(h, &mut buf) {
                    Ok(0) => {
                        assert_eq!(received.len(), data.len());
                        assert!(received == data, "payload differs");
                        return (pair.now - Instant::from_millis(0), pair);
                    }
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(TcpError::WouldBlock) => break,
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
    }
    panic!(
        "transfer did not finish: {} of {} received",
        received.len(),
        size
    );
}

#[test]
fn bulk_transfer_is_byte_exact() {
    let (elapsed, pair) = transfer(1152, 1, 0, 1, 4 << 20);
    assert!(
        pair.a_events
            .contains(&Event::TcpConnected(TcpHandle::clone(
                match &pair.a_events[0] {
                    Event::TcpConnected(h) => h,
                    other => panic!("first event {other:?}"),
                }
            )))
    );
    // 4 MiB over a 1 ms link with a 256 KiB window takes tens of simulated ms, not seconds:
    // the delayed-ACK stall and a missing window scale would each show up here.
    assert!(elapsed < Duration::from_secs(1), "took {elapsed}");
}

#[test]
fn segments_respect_the_mtu() {
    let mut pair = Pair::new(1152, 1, 0, 2);
    let _listener = pair.b.tcp_listen(80, 1, TcpOptions::default()).unwrap();
    let client = pair
        .a
        .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), TcpOptions::default())
        .unwrap();
    for _ in 0..50 {
        pair.step();
    }
    pair.a.tcp_send(client, &[7u8; 100_000]).unwrap();
    for _ in 0..20 {
        pair.a.poll(pair.now);
        while let Some(p) = pair.a.poll_transmit() {
            assert!(p.len() <= 1152, "packet of {} bytes", p.len());
        }
    }
}

#[test]
fn lossy_transfers_complete_byte_exact() {
    for (loss, seed) in [(1, 11), (5, 12), (10, 13)] {
        transfer(1152, 5, loss, seed, 512 * 1024);
    }
}

/// Link repair on the data direction (A → B, A as the gateway) under 5% loss both ways: the
/// transfer is byte-exact, B repaired losses on the link and dropped nothing for room, and the
/// same transfer (same seed, simulated time) finishes sooner than without repair.
#[test]
fn link_repair_hides_loss_from_tcp() {
    const SIZE: usize = 2 << 20;
    for seed in [21, 24, 26] {
        let (unrepaired, _) = transfer(1152, 2, 5, seed, SIZE);
        let mut pair = Pair::new(1152, 2, 5, seed);
        pair.repair = Some(ResendBuffer::new(2048));
        let (repaired, pair) = transfer_with(pair, SIZE);
        let link = pair.b.link_stats();
        println!("seed {seed}: {unrepaired} without, {repaired} with link repair; {link:?}");
        assert!(link.sequenced > 0 && link.repaired > 0, "{link:?}");
        assert_eq!(pair.b.stats().dropped_queue_full, 0);
        assert!(
            repaired < unrepaired,
            "{repaired} with vs {unrepaired} without"
        );
    }
}

/// The stream link (PROTOCOL.md §3.2): A's packets arrive framed in chunks of many packets,
/// split inside frames, at a receiver whose queue holds 4. The transfer is byte-exact and no
/// packet is dropped for room: the stack makes room by polling instead.
#[test]
fn stream_link_delivers_every_packet_through_a_small_queue() {
    const SIZE: usize = 2 << 20;
    let mut pair = Pair::new(1152, 2, 0, 7);
    let mut config = StackConfig::new(1152, 7 ^ 0x5555);
    config.ipv4 = Some(B);
    config.rx_queue_len = 4;
    pair.b = Stack::new(config, pair.now);
    pair.stream = true;
    let (_, pair) = transfer_with(pair, SIZE);
    let stats = pair.b.stats();
    assert_eq!(stats.dropped_queue_full, 0, "{stats:?}");
    assert!(stats.link_stream_packets > SIZE as u64 / 1152, "{stats:?}");
}

#[test]
fn connect_to_closed_port_is_refused() {
    let mut pair = Pair::new(1152, 1, 0, 3);
    let client = pair
        .a
        .tcp_connect(SocketAddr::new(IpAddr::V4(B), 81), TcpOptions::default())
        .unwrap();
    for _ in 0..50 {
        pair.step();
    }
    assert!(
        pair.a_events
            .iter()
            .any(|e| matches!(e, Event::TcpConnectFailed(h, _) if *h == client)),
        "{:?}",
        pair.a_events
    );
    let mut buf = [0u8; 10];
    assert!(matches!(
        pair.a.tcp_recv(client, &mut buf),
        Err(TcpError::Connect(_))
    ));
}

#[test]
fn peer_reset_is_reported() {
    let mut pair = Pair::new(1152, 1, 0, 4);
    let (client, server) = pair.connect();
    pair.b.tcp_abort(server);
    for _ in 0..50 {
        pair.step();
    }
    assert!(
        pair.a_events.contains(&Event::TcpReset(client)),
        "{:?}",
        pair.a_events
    );
    let mut buf = [0u8; 10];
    assert_eq!(pair.a.tcp_recv(client, &mut buf), Err(TcpError::Reset));
}

#[test]
fn half_close_keeps_the_other_direction_open() {
    let mut pair = Pair::new(1152, 1, 0, 5);
    let (client, server) = pair.connect();
    pair.a.tcp_shutdown(client).unwrap();
    for _ in 0..20 {
        pair.step();
    }
    let mut buf = [0u8; 10];
    assert_eq!(pair.b.tcp_recv(server, &mut buf), Ok(0), "server sees EOF");
    assert_eq!(pair.b.tcp_send(server, b"after fin"), Ok(9));
    for _ in 0..20 {
        pair.step();
    }
    assert_eq!(pair.a.tcp_recv(client, &mut buf), Ok(9));
    assert_eq!(&buf[..9], b"after fin");
}

#[test]
fn udp_roundtrip_and_connected_filter() {
    let mut pair = Pair::new(1152, 1, 0, 6);
    let a = pair.a.udp_bind(0, UdpOptions::default()).unwrap();
    let b = pair.b.udp_bind(5353, UdpOptions::default()).unwrap();
    let to_b = SocketAddr::new(IpAddr::V4(B), 5353);
    // A datagram larger than the MTU goes out as IPv4 fragments and is reassembled.
    let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    pair.a.udp_send_to(a, &big, to_b).unwrap();
    pair.a.udp_send_to(a, b"small", to_b).unwrap();
    for _ in 0..20 {
        pair.step();
    }
    let mut buf = [0u8; 4000];
    let mut got = Vec::new();
    while let Ok((n, from)) = pair.b.udp_recv_from(b, &mut buf) {
        assert_eq!(from.ip(), IpAddr::V4(A));
        got.push(buf[..n].to_vec());
    }
    // Fragments of the big one go out over several polls, so the small one may overtake it.
    got.sort_by_key(Vec::len);
    assert_eq!(got.len(), 2);
    assert!(got[0] == b"small" && got[1] == big, "datagrams differ");
    // Connected to someone else: datagrams from A are dropped and counted.
    pair.b
        .udp_connect(b, SocketAddr::new(IpAddr::V4(A), 1))
        .unwrap();
    pair.a.udp_send_to(a, b"filtered", to_b).unwrap();
    for _ in 0..20 {
        pair.step();
    }
    assert!(pair.b.udp_recv_from(b, &mut buf).is_err());
    assert_eq!(pair.b.stats().udp_dropped_foreign, 1);
}

#[test]
fn oversize_and_overflowing_packets_are_counted() {
    let mut config = StackConfig::new(1152, 9);
    config.ipv4 = Some(A);
    config.rx_queue_len = 2;
    let mut stack = Stack::new(config, Instant::from_millis(0));
    let now = Instant::from_millis(0);
    assert!(stack.handle_packet(now, &[0u8; 1153]).is_err());
    assert!(stack.handle_packet(now, &[0x45u8; 20]).is_ok());
    assert!(stack.handle_packet(now, &[0x45u8; 20]).is_ok());
    assert!(stack.handle_packet(now, &[0x45u8; 20]).is_err());
    let stats = stack.stats();
    assert_eq!((stats.dropped_too_large, stats.dropped_queue_full), (1, 1));
    // Garbage is parsed and discarded by smoltcp without a panic.
    stack.poll(now);
    assert!(stack.poll_transmit().is_none());

    // The stream link takes packets above the MTU (a gateway's coalesced TCP packets), up to
    // what a frame carries.
    let mut framed = Vec::new();
    put_frame(&mut framed, &[0x45u8; 40_000]);
    stack.handle_link_stream(now, &framed).unwrap();
    let stats = stack.stats();
    assert_eq!(stats.link_stream_packets, 1);
    assert_eq!((stats.dropped_too_large, stats.dropped_queue_full), (1, 1));
    stack.poll(now);
}

#[test]
fn many_connections_open_and_close() {
    let mut pair = Pair::new(1152, 1, 0, 7);
    let small = TcpOptions {
        send_buffer: 4096,
        recv_buffer: 4096,
        ..TcpOptions::default()
    };
    let listener = pair.b.tcp_listen(80, 64, small).unwrap();
    let clients: Vec<_> = (0..200)
        .map(|_| {
            pair.a
                .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), small)
                .unwrap()
        })
        .collect();
    let mut accepted = Vec::new();
    for _ in 0..2000 {
        pair.step();
        while let Some((h, _)) = pair.b.tcp_accept(listener) {
            accepted.push(h);
        }
        if accepted.len() == clients.len() {
            break;
        }
    }
    assert_eq!(accepted.len(), clients.len());
    for h in clients {
        pair.a.tcp_release(h);
    }
    for h in accepted {
        pair.b.tcp_release(h);
    }
    for _ in 0..5000 {
        pair.step();
        if pair.a.tcp_connection_count() == 0 && pair.b.tcp_connection_count() == 0 {
            break;
        }
    }
    assert_eq!(pair.a.tcp_connection_count(), 0);
    assert_eq!(pair.b.tcp_connection_count(), 0);
}
