//! A listener allocates its connections' buffers as SYNs arrive, not for its whole backlog at
//! `tcp_listen`: in a page, wasm memory once grown is never given back, and a backlog of 128
//! with the default 256 KiB + 256 KiB buffers used to take 64 MiB at once.
//!
//! Its own test binary: the global allocator below counts every live byte of the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};

use webnic_stack::{Duration, Instant, Stack, StackConfig, TcpOptions};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const MIB: isize = 1 << 20;

#[test]
fn a_listener_allocates_buffers_per_connection_not_per_backlog_slot() {
    let now = Instant::from_millis(0);
    let config = |ip, seed| {
        let mut config = StackConfig::new(1152, seed);
        config.ipv4 = Some(ip);
        config
    };
    let mut client = Stack::new(config(A, 1), now);
    let mut server = Stack::new(config(B, 2), now);
    let options = TcpOptions::default();
    let per_connection = (options.recv_buffer + options.send_buffer) as isize;

    let before = LIVE.load(Ordering::Relaxed);
    let listener = server.tcp_listen(80, 128, options).unwrap();
    server.poll(now);
    let listening = LIVE.load(Ordering::Relaxed) - before;
    assert!(
        listening < MIB,
        "listen(backlog 128) took {listening} bytes (a connection's buffers are {per_connection})"
    );

    // Three connections: each costs its own buffers, once.
    let handles: Vec<_> = (0..3)
        .map(|_| {
            client
                .tcp_connect(SocketAddr::new(IpAddr::V4(B), 80), options)
                .unwrap()
        })
        .collect();
    let mut accepted = Vec::new();
    let mut t = now;
    for _ in 0..200 {
        t += Duration::from_millis(1);
        client.poll(t);
        while let Some(packet) = client.poll_transmit() {
            let _ = server.handle_packet(t, &packet);
        }
        server.poll(t);
        while let Some(packet) = server.poll_transmit() {
            let _ = client.handle_packet(t, &packet);
        }
        while let Some((connection, _)) = server.tcp_accept(listener) {
            accepted.push(connection);
        }
        if accepted.len() == handles.len() {
            break;
        }
    }
    assert_eq!(accepted.len(), 3, "the connections were not accepted");
    let grown = LIVE.load(Ordering::Relaxed) - before - listening;
    // The server's three sockets, each allocated when its SYN arrived, plus the client's three.
    assert!(
        grown >= 6 * per_connection && grown < 6 * per_connection + 4 * MIB,
        "three connections took {grown} bytes, {per_connection} each side expected"
    );
}
