//! Two stacks wired back to back in memory, with simulated time and seeded loss: the stack's
//! TCP, UDP and event contract tested without sockets or clocks.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use webnic_stack::link_repair::{
    FRAME_GONE, FRAME_NACK, ResendBuffer, SEQUENCED_OVERHEAD, parse_nack, put_ranges,
    put_sequenced_header,
};
use webnic_stack::link_stream::put_frame;
use webnic_stack::{
    Duration, Event, Instant, ListenerHandle, Stack, StackConfig, TcpError, TcpHandle, TcpOptions,
    UdpOptions,
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
    /// B's TCP packets to A, by A's port: the window scale B offered and the largest window
    /// (scaled, in bytes) B advertised.
    b_windows: HashMap<u16, (u8, usize)>,
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
            b_windows: HashMap::new(),
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
            self.observe_window(&p);
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
    /// Records the receive window of one of B's IPv4 TCP packets.
    fn observe_window(&mut self, packet: &[u8]) {
        if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
            return;
        }
        let tcp = &packet[usize::from(packet[0] & 0xf) * 4..];
        let to_port = u16::from_be_bytes([tcp[2], tcp[3]]);
        let window = usize::from(u16::from_be_bytes([tcp[14], tcp[15]]));
        let entry = self.b_windows.entry(to_port).or_insert((0, 0));
        if tcp[13] & 0x02 != 0 {
            // SYN: its window is unscaled; find the window-scale option (kind 3).
            let options = &tcp[20..usize::from(tcp[12] >> 4) * 4];
            let mut i = 0;
            while i < options.len() {
                match options[i] {
                    0 => break,
                    1 => i += 1,
                    kind => {
                        let len = usize::from(*options.get(i + 1).unwrap_or(&2)).max(2);
                        if kind == 3 {
                            entry.0 = options[i + 2];
                        }
                        i += len;
                    }
                }
            }
            entry.1 = entry.1.max(window);
        } else {
            entry.1 = entry.1.max(window << entry.0);
        }
    }

    /// Steps until `listener` has accepted `count` connections (or `max_steps` went by);
    /// returns those accepted.
    fn accept_all(
        &mut self,
        listener: ListenerHandle,
        count: usize,
        max_steps: usize,
    ) -> Vec<TcpHandle> {
        let mut servers = Vec::new();
        for _ in 0..max_steps {
            self.step();
            while let Some((server, _)) = self.b.tcp_accept(listener) {
                servers.push(server);
            }
            if servers.len() >= count {
                break;
            }
        }
        servers
    }

    /// Which of B's `servers` is the other end of A's `client` (accepted in the order the SYNs
    /// arrived, not the order of the connects).
    fn server_end(&self, servers: &[TcpHandle], client: TcpHandle) -> TcpHandle {
        let (local, _) = self.a.tcp_endpoints(client).unwrap();
        *servers
            .iter()
            .find(|&&s| self.b.tcp_endpoints(s).unwrap().1 == local)
            .expect("a server end for each client")
    }

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

/// `flows` connections from A to B, each sending `size` bytes at once; checks every byte and
/// returns the simulated time it took.
fn transfer_flows(pair: &mut Pair, flows: usize, size: usize, sender: TcpOptions) -> Duration {
    let start = pair.now;
    let listener = pair.b.tcp_listen(80, flows, TcpOptions::default()).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i * 13 + i / 241) as u8).collect();
    let clients: Vec<TcpHandle> = (0..flows)
        .map(|_| {
            pair.a
                .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), sender)
                .unwrap()
        })
        .collect();
    let mut sent = vec![0; flows];
    let mut servers = Vec::new();
    let mut received: Vec<Vec<u8>> = Vec::new();
    let mut finished = 0;
    let mut buf = vec![0u8; 65536];
    for _ in 0..2_000_000 {
        pair.step();
        while let Some((h, _)) = pair.b.tcp_accept(listener) {
            servers.push(Some(h));
            received.push(Vec::new());
        }
        for (client, sent) in clients.iter().zip(&mut sent) {
            if *sent == size {
                continue;
            }
            match pair.a.tcp_send(*client, &data[*sent..]) {
                Ok(n) => *sent += n,
                Err(TcpError::WouldBlock) => {}
                Err(e) => panic!("send: {e}"),
            }
            if *sent == size {
                pair.a.tcp_shutdown(*client).unwrap();
            }
        }
        for (server, received) in servers.iter_mut().zip(&mut received) {
            let Some(h) = *server else { continue };
            loop {
                match pair.b.tcp_recv(h, &mut buf) {
                    Ok(0) => {
                        assert!(*received == data, "payload differs");
                        *server = None;
                        finished += 1;
                        break;
                    }
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(TcpError::WouldBlock) => break,
                    Err(e) => panic!("recv: {e}"),
                }
            }
        }
        if finished == flows {
            return pair.now - start;
        }
    }
    panic!("{finished} of {flows} transfers finished");
}

const KIB: usize = 1024;

/// A sender whose send buffer does not limit it before the receiver's window does.
fn window_bound_sender() -> TcpOptions {
    TcpOptions {
        send_buffer: 4 << 20,
        ..TcpOptions::default()
    }
}

/// Receive-window autotuning: one bulk flow's window grows from the 256 KiB it starts with to
/// the stack's whole budget (2 MiB), and the transfer is byte-exact, also under loss, where the
/// buffer grows while it holds out-of-order data.
#[test]
fn a_lone_bulk_flow_grows_its_window_to_the_budget() {
    let budget = StackConfig::new(1152, 0).tcp_recv_budget;
    assert_eq!(TcpOptions::default().recv_buffer, 256 * KIB);
    // At 2% loss smoltcp's sender moves too little for the window to reach the budget: it
    // grows only while the flow moves a full window between doublings.
    for (loss, seed, least) in [
        (0, 31, budget * 3 / 4),
        (1, 32, budget * 3 / 4),
        (2, 33, budget / 2),
    ] {
        let mut pair = Pair::new(1152, 1, loss, seed);
        transfer_flows(&mut pair, 1, 8 << 20, window_bound_sender());
        let windows: Vec<_> = pair.b_windows.values().copied().collect();
        assert_eq!(windows.len(), 1, "{windows:?}");
        let (scale, largest) = windows[0];
        // The window scale is chosen for the largest buffer (2 MiB needs 6).
        assert_eq!(scale, 6, "{windows:?}");
        assert!(
            largest >= least && largest <= budget,
            "{loss}% loss: largest window {largest}"
        );
    }
}

/// With no budget to share, a connection keeps the window it started with.
#[test]
fn without_a_budget_the_window_stays_at_the_receive_buffer() {
    let mut pair = Pair::new(1152, 1, 0, 34);
    let mut config = StackConfig::new(1152, 34 ^ 0x5555);
    config.ipv4 = Some(B);
    config.tcp_recv_budget = 0;
    pair.b = Stack::new(config, pair.now);
    transfer_flows(&mut pair, 1, 8 << 20, window_bound_sender());
    let (_, largest) = pair.b_windows.values().next().copied().unwrap();
    assert!(
        largest > 200 * KIB && largest <= 256 * KIB,
        "largest window {largest}"
    );
}

/// Flows receiving at the same time share the budget: four flows stay near a quarter each, so
/// what they have in flight together stays near what one flow may have.
#[test]
fn concurrent_flows_share_the_budget() {
    let budget = StackConfig::new(1152, 0).tcp_recv_budget;
    let mut pair = Pair::new(1152, 5, 0, 35);
    transfer_flows(&mut pair, 4, 4 << 20, window_bound_sender());
    let windows: Vec<_> = pair.b_windows.values().copied().collect();
    assert_eq!(windows.len(), 4, "{windows:?}");
    let total: usize = windows.iter().map(|(_, largest)| largest).sum();
    assert!(
        windows.iter().all(|(_, largest)| *largest <= budget / 2),
        "{windows:?}"
    );
    assert!(total <= budget * 3 / 2, "{windows:?}");
}

/// A FIN sent into a full window (smoltcp, like other stacks, sends its FIN regardless of the
/// peer's window) lands exactly on the window's right edge; the receiver's window limit must
/// take it without tripping over the edge, and nothing is lost.
#[test]
fn a_fin_on_the_edge_of_a_full_window_is_taken() {
    // MTU 1128: segments of 1,088 bytes, a multiple of the window scale's 64-byte unit, so the
    // advertised edge is exactly 256 KiB past the start and not rounded short of it.
    let mut pair = Pair::new(1128, 1, 0, 41);
    let mut config = StackConfig::new(1128, 41 ^ 0x5555);
    config.ipv4 = Some(B);
    // No budget: the window stays at its 256 KiB floor, still through the window limit.
    config.tcp_recv_budget = 0;
    pair.b = Stack::new(config, pair.now);
    let (client, server) = pair.connect();
    let data: Vec<u8> = (0..256 * KIB).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    let mut shut = false;
    // B does not read: the data fills its window exactly, then the FIN arrives on the edge.
    for _ in 0..2_000 {
        pair.step();
        if sent < data.len() {
            match pair.a.tcp_send(client, &data[sent..]) {
                Ok(n) => sent += n,
                Err(TcpError::WouldBlock) => {}
                Err(e) => panic!("send: {e}"),
            }
        } else if !shut {
            pair.a.tcp_shutdown(client).unwrap();
            shut = true;
        }
    }
    assert!(shut, "only {sent} bytes sent");
    assert_eq!(pair.b.tcp_recv_queue(server), data.len());
    let mut received = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..1_000 {
        pair.step();
        match pair.b.tcp_recv(server, &mut buf) {
            Ok(0) => {
                assert!(received == data, "payload differs");
                return;
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(TcpError::WouldBlock) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    panic!("no end of stream after {} bytes", received.len());
}

/// Sends `data` from `from` (on A when `a_to_b`, else on B) to `to` on the other stack, stepping
/// until as much arrived or 2,000 steps passed; returns what arrived.
fn deliver(pair: &mut Pair, a_to_b: bool, from: TcpHandle, to: TcpHandle, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let mut sent = 0;
    let mut got = Vec::new();
    for _ in 0..2_000 {
        if sent < data.len() {
            let sender = if a_to_b { &mut pair.a } else { &mut pair.b };
            sent += sender.tcp_send(from, &data[sent..]).unwrap_or(0);
        }
        pair.step();
        let receiver = if a_to_b { &mut pair.b } else { &mut pair.a };
        while let Ok(n) = receiver.tcp_recv(to, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        if got.len() >= data.len() {
            break;
        }
    }
    got
}

/// Quiet connections leave the polled socket set after a second and come back for a packet or
/// a socket call: data both ways stays byte-exact, readable events still fire, and a parked
/// connection closes cleanly.
#[test]
fn quiet_connections_are_parked_and_come_back_for_a_packet_or_a_call() {
    let mut pair = Pair::new(1152, 1, 0, 51);
    let (client, server) = pair.connect();
    let idle = |pair: &mut Pair| {
        for _ in 0..30 {
            pair.step();
        }
    };
    idle(&mut pair);
    assert_eq!(
        (pair.a.tcp_parked_count(), pair.b.tcp_parked_count()),
        (1, 1)
    );
    assert_eq!(pair.a.tcp_connection_count(), 1);
    assert!(
        pair.a.tcp_endpoints(client).is_some(),
        "endpoints of a parked connection"
    );
    assert_eq!(
        pair.b.tcp_recv(server, &mut [0u8; 16]),
        Err(TcpError::WouldBlock)
    );

    for round in 0..3u8 {
        // A's call brings its side back; the packet brings B's.
        let request: Vec<u8> = (0..50_000u32).map(|i| (i as u8) ^ round).collect();
        pair.b_events.clear();
        let got = deliver(&mut pair, true, client, server, &request);
        assert!(got == request, "round {round}: request differs");
        assert!(
            pair.b_events.contains(&Event::TcpReadable(server)),
            "round {round}: no readable event"
        );
        // And the other way, from B's side after both parked again.
        idle(&mut pair);
        assert_eq!(
            (pair.a.tcp_parked_count(), pair.b.tcp_parked_count()),
            (1, 1)
        );
        let reply = vec![round; 30_000];
        let got = deliver(&mut pair, false, server, client, &reply);
        assert!(got == reply, "round {round}: reply differs");
        idle(&mut pair);
    }
    assert_eq!(
        (pair.a.tcp_parked_count(), pair.b.tcp_parked_count()),
        (1, 1)
    );
    pair.a.tcp_release(client);
    pair.b.tcp_release(server);
    for _ in 0..2_000 {
        pair.step();
        if pair.a.tcp_connection_count() == 0 && pair.b.tcp_connection_count() == 0 {
            return;
        }
    }
    panic!(
        "connections left: {} and {}",
        pair.a.tcp_connection_count(),
        pair.b.tcp_connection_count()
    );
}

/// A ring buffer grown while it holds data that wraps around its end, and out-of-order data
/// past the allocated part (webnic's smoltcp patch), keeps both in place.
#[test]
fn a_grown_ring_buffer_keeps_wrapped_and_out_of_order_data() {
    use smoltcp::storage::RingBuffer;
    let mut ring = RingBuffer::new(vec![0u8; 8]);
    assert_eq!(ring.enqueue_slice(b"abcdef"), 6);
    let mut out = [0u8; 4];
    assert_eq!(ring.dequeue_slice(&mut out), 4);
    // "ef" at 4..6, then "ghij" wrapping to 0..2; then "k" out of order, one byte past them.
    assert_eq!(ring.enqueue_slice(b"ghij"), 4);
    assert_eq!(ring.write_unallocated(1, b"k"), 1);
    ring.grow_into(vec![0u8; 32]);
    assert_eq!(ring.capacity(), 32);
    assert_eq!(ring.len(), 6);
    assert_eq!(ring.get_unallocated(1, 1), b"k");
    let mut all = [0u8; 6];
    assert_eq!(ring.dequeue_slice(&mut all), 6);
    assert_eq!(&all, b"efghij");
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

/// Among many parked connections, a packet brings back exactly the connection it belongs to
/// (matched by its endpoints, past the bucket filter in front of the map), and data stays
/// byte-exact on each one.
#[test]
fn a_packet_unparks_only_its_own_connection_among_hundreds() {
    const COUNT: usize = 300;
    let mut pair = Pair::new(1152, 1, 0, 52);
    let listener = pair.b.tcp_listen(80, 64, TcpOptions::default()).unwrap();
    let clients: Vec<TcpHandle> = (0..COUNT)
        .map(|_| {
            pair.a
                .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), TcpOptions::default())
                .unwrap()
        })
        .collect();
    let servers = pair.accept_all(listener, COUNT, 2_000);
    assert_eq!(servers.len(), COUNT, "not every connection was accepted");
    let park_all = |pair: &mut Pair, a: usize, b: usize| {
        for _ in 0..200 {
            pair.step();
            if pair.a.tcp_parked_count() == a && pair.b.tcp_parked_count() == b {
                return;
            }
        }
        panic!(
            "parked {} and {}, expected {a} and {b}",
            pair.a.tcp_parked_count(),
            pair.b.tcp_parked_count()
        );
    };
    park_all(&mut pair, COUNT, COUNT);

    for (round, &client) in clients.iter().step_by(37).enumerate() {
        let server = pair.server_end(&servers, client);
        // B's call brings its side back; only the packets bring A's.
        let reply: Vec<u8> = (0..20_000u32).map(|i| (i as u8) ^ (round as u8)).collect();
        let got = deliver(&mut pair, false, server, client, &reply);
        assert!(got == reply, "round {round}: reply differs");
        let request = vec![round as u8; 7_000];
        let got = deliver(&mut pair, true, client, server, &request);
        assert!(got == request, "round {round}: request differs");
        assert_eq!(
            (pair.a.tcp_parked_count(), pair.b.tcp_parked_count()),
            (COUNT - 1, COUNT - 1),
            "round {round}: only the connection in use is back"
        );
        park_all(&mut pair, COUNT, COUNT);
    }
    assert_eq!(pair.a.tcp_connection_count(), COUNT);
}

/// A connection with keep-alive parks between its probes and comes back for each: with the peer
/// there it stays open and usable; with the peer gone silent, its idle timeout still fires
/// while it spends its quiet time parked.
#[test]
fn keep_alive_connections_park_between_probes_and_still_time_out() {
    let mut pair = Pair::new(1152, 1, 0, 53);
    let options = TcpOptions {
        keep_alive: Some(Duration::from_secs(10)),
        timeout: Some(Duration::from_secs(30)),
        ..TcpOptions::default()
    };
    let listener = pair.b.tcp_listen(80, 1, TcpOptions::default()).unwrap();
    let client = pair
        .a
        .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), options)
        .unwrap();
    let mut server = None;
    for _ in 0..50 {
        pair.step();
        server = server.or_else(|| pair.b.tcp_accept(listener).map(|(s, _)| s));
    }
    let server = server.expect("B accepted");
    // Two minutes with the peer there: twelve probes, each answered, and the connection
    // parked in between.
    let mut parked_for = Duration::ZERO;
    let until = pair.now + Duration::from_secs(120);
    for _ in 0..100_000 {
        let (was_parked, then) = (pair.a.tcp_parked_count() == 1, pair.now);
        pair.step();
        if was_parked {
            parked_for += pair.now - then;
        }
        if pair.now >= until {
            break;
        }
    }
    assert!(pair.now >= until, "the clock stalled");
    assert!(
        parked_for > Duration::from_secs(90),
        "A was parked for only {parked_for} of 120 s"
    );
    assert!(
        !pair.a_events.contains(&Event::TcpClosed(client)),
        "the probes were not sent or not answered: A's connection timed out"
    );
    let request: Vec<u8> = (0..10_000u32).map(|i| (i * 31) as u8).collect();
    let got = deliver(&mut pair, true, client, server, &request);
    assert!(got == request, "request after two idle minutes differs");

    // The peer goes silent: the idle timeout fires within its 30 s, parked or not.
    pair.loss_percent = 100;
    let start = pair.now;
    for _ in 0..100_000 {
        pair.step();
        if pair.a_events.contains(&Event::TcpClosed(client))
            || pair.a.tcp_recv(client, &mut [0; 16]) != Err(TcpError::WouldBlock)
        {
            let waited = pair.now - start;
            assert!(
                waited <= Duration::from_secs(45),
                "timed out only after {waited}"
            );
            return;
        }
        if pair.now > start + Duration::from_secs(300) {
            break;
        }
    }
    panic!(
        "A never noticed its silent peer (parked: {})",
        pair.a.tcp_parked_count()
    );
}

/// A listener takes a burst of SYNs up to its backlog and drops the rest without an RST (the
/// peers retry, as with a full Linux backlog); once the application accepts, the retries get
/// in, and every connection carries its own bytes.
#[test]
fn a_listener_takes_a_burst_up_to_its_backlog_and_the_rest_retry() {
    const BACKLOG: usize = 8;
    const CLIENTS: usize = 20;
    let mut pair = Pair::new(1152, 1, 0, 54);
    let listener = pair
        .b
        .tcp_listen(80, BACKLOG, TcpOptions::default())
        .unwrap();
    let clients: Vec<TcpHandle> = (0..CLIENTS)
        .map(|_| {
            pair.a
                .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), TcpOptions::default())
                .unwrap()
        })
        .collect();
    // Before the first SYN retransmission (smoltcp's initial RTO is 1 s).
    let until = pair.now + Duration::from_millis(500);
    for _ in 0..1_000 {
        pair.step();
        if pair.now >= until {
            break;
        }
    }
    let connected = |pair: &Pair| {
        pair.a_events
            .iter()
            .filter(|e| matches!(e, Event::TcpConnected(_)))
            .count()
    };
    assert_eq!(connected(&pair), BACKLOG, "the backlog's worth connects");
    assert!(pair.b.stats().syn_dropped_backlog >= (CLIENTS - BACKLOG) as u64);
    assert!(
        !pair
            .a_events
            .iter()
            .any(|e| matches!(e, Event::TcpConnectFailed(..))),
        "a full backlog refused a connection: {:?}",
        pair.a_events
    );

    let servers = pair.accept_all(listener, CLIENTS, 5_000);
    assert_eq!(servers.len(), CLIENTS, "the retried SYNs were not accepted");
    assert_eq!(connected(&pair), CLIENTS);
    for (i, &client) in clients.iter().enumerate() {
        let server = pair.server_end(&servers, client);
        let data = vec![i as u8; 3_000 + i];
        assert!(deliver(&mut pair, true, client, server, &data) == data);
    }
}
