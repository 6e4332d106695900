//! The relay's I/O: one listening UDP socket for clients and, per client, one socket connected to the
//! upstream, so the upstream sees each client as its own 4-tuple (the gateway keys sessions by it).
//! One task owns every [`Link`]; per-client reader tasks feed it the upstream's replies.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::link::SplitMix64;
use crate::{Impairment, Link, LinkStats};

/// Clients beyond this many are ignored (counted), so a stray sender cannot grow the relay.
const MAX_CLIENTS: usize = 1024;
/// Larger than any QUIC datagram.
const MAX_PACKET: usize = 65_535;
/// Packets read per wake-up before the due ones are flushed.
const READ_BATCH: usize = 64;
const SOCKET_BUFFER: usize = 8 << 20;

/// Totals over every client of the relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub clients: u64,
    /// Client → upstream.
    pub up: LinkStats,
    /// Upstream → client.
    pub down: LinkStats,
    /// Packets a socket refused to send (its buffer full): lost outside the model, so counted.
    pub send_errors: u64,
    /// Packets from clients beyond `MAX_CLIENTS`.
    pub refused_clients: u64,
}

#[derive(Debug)]
struct Client {
    /// Sends go through the std handle of the non-blocking socket: tokio's `try_send` reports
    /// WouldBlock until epoll has first seen the socket writable, which loses a fresh client's first packet.
    upstream: std::net::UdpSocket,
    up: Link,
    down: Link,
    reader: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[derive(Debug)]
struct Shared {
    up: Impairment,
    down: Impairment,
    seeds: SplitMix64,
    blackout_until: Option<Instant>,
    clients: HashMap<SocketAddr, Client>,
    send_errors: u64,
    refused_clients: u64,
}

/// A running relay; dropping it stops it.
#[derive(Debug)]
pub struct Relay {
    local_addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut shared) = self.shared.lock() {
            shared.clients.clear();
        }
    }
}

impl Relay {
    /// Listens on `listen` and relays every client to `upstream`, impairing client → upstream
    /// packets with `up` and upstream → client packets with `down`. Must run inside a tokio runtime.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        up: Impairment,
        down: Impairment,
        seed: u64,
    ) -> io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind(listen).await?);
        enlarge_buffers(&socket);
        let local_addr = socket.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared {
            up,
            down,
            seeds: SplitMix64::new(seed),
            blackout_until: None,
            clients: HashMap::new(),
            send_errors: 0,
            refused_clients: 0,
        }));
        let wake = Arc::new(Notify::new());
        let sender = clone_std(&socket)?;
        let task = tokio::spawn(run(
            socket,
            sender,
            upstream,
            Arc::clone(&shared),
            Arc::clone(&wake),
        ));
        Ok(Self {
            local_addr,
            shared,
            wake,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Drops every packet, both ways, for `duration` from now: the path dies and comes back.
    pub fn black_out(&self, duration: Duration) {
        let until = Instant::now() + duration;
        let mut shared = self.lock();
        shared.blackout_until = Some(until);
        for client in shared.clients.values_mut() {
            client.up.black_out_until(until);
            client.down.black_out_until(until);
        }
    }

    /// Changes the impairment of both directions for every client, from now on.
    pub fn set_impairment(&self, up: Impairment, down: Impairment) {
        let mut shared = self.lock();
        for client in shared.clients.values_mut() {
            client.up.set_impairment(up.clone());
            client.down.set_impairment(down.clone());
        }
        shared.up = up;
        shared.down = down;
        drop(shared);
        self.wake.notify_one();
    }

    pub fn stats(&self) -> RelayStats {
        let shared = self.lock();
        let mut stats = RelayStats {
            clients: shared.clients.len() as u64,
            send_errors: shared.send_errors,
            refused_clients: shared.refused_clients,
            ..RelayStats::default()
        };
        for client in shared.clients.values() {
            add(&mut stats.up, &client.up.stats());
            add(&mut stats.down, &client.down.stats());
        }
        stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn add(total: &mut LinkStats, one: &LinkStats) {
    total.offered += one.offered;
    total.delivered_original += one.delivered_original;
    total.delivered_duplicates += one.delivered_duplicates;
    total.dropped_loss += one.dropped_loss;
    total.dropped_blackout += one.dropped_blackout;
    total.dropped_queue += one.dropped_queue;
    total.reordered += one.reordered;
    total.in_flight += one.in_flight;
}

async fn run(
    socket: Arc<UdpSocket>,
    sender: std::net::UdpSocket,
    upstream: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
) {
    let (reply_tx, mut reply_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(4096);
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let next_due = {
            let shared = shared.lock().unwrap_or_else(|e| e.into_inner());
            shared
                .clients
                .values()
                .flat_map(|c| [c.up.poll_timeout(), c.down.poll_timeout()])
                .flatten()
                .min()
        };
        let sleep = async {
            match next_due {
                Some(due) => tokio::time::sleep_until(due.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let Ok((len, from)) = received else { continue };
                let mut batch = vec![(from, buf[..len].to_vec())];
                while batch.len() < READ_BATCH {
                    match socket.try_recv_from(&mut buf) {
                        Ok((len, from)) => batch.push((from, buf[..len].to_vec())),
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
                for (from, packet) in batch {
                    if let Some(client) = client_for(&mut shared, from, upstream, &reply_tx) {
                        client.up.offer(now, packet);
                    }
                }
            }
            Some((client, packet)) = reply_rx.recv() => {
                let mut batch = vec![(client, packet)];
                while batch.len() < READ_BATCH {
                    match reply_rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
                for (addr, packet) in batch {
                    if let Some(client) = shared.clients.get_mut(&addr) {
                        client.down.offer(now, packet);
                    }
                }
            }
            () = sleep => {}
            () = wake.notified() => {}
        }
        flush(&sender, &shared);
    }
}

/// Sends every packet that is due, without waiting: a full socket buffer is a counted loss.
fn flush(socket: &std::net::UdpSocket, shared: &Mutex<Shared>) {
    let now = Instant::now();
    let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
    let mut errors = 0;
    for (addr, client) in &mut shared.clients {
        while let Some(packet) = client.up.poll_transmit(now) {
            if client.upstream.send(&packet).is_err() {
                errors += 1;
            }
        }
        while let Some(packet) = client.down.poll_transmit(now) {
            if socket.send_to(&packet, *addr).is_err() {
                errors += 1;
            }
        }
    }
    shared.send_errors += errors;
}

fn client_for<'a>(
    shared: &'a mut Shared,
    from: SocketAddr,
    upstream: SocketAddr,
    reply_tx: &mpsc::Sender<(SocketAddr, Vec<u8>)>,
) -> Option<&'a mut Client> {
    if !shared.clients.contains_key(&from) {
        if shared.clients.len() >= MAX_CLIENTS {
            shared.refused_clients += 1;
            return None;
        }
        let Ok(client) = new_client(shared, from, upstream, reply_tx.clone()) else {
            shared.send_errors += 1;
            return None;
        };
        shared.clients.insert(from, client);
    }
    shared.clients.get_mut(&from)
}

fn new_client(
    shared: &mut Shared,
    from: SocketAddr,
    upstream: SocketAddr,
    reply_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
) -> io::Result<Client> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let std_socket = std::net::UdpSocket::bind(bind)?;
    std_socket.connect(upstream)?;
    std_socket.set_nonblocking(true)?;
    let sender = std_socket.try_clone()?;
    let reader_socket = UdpSocket::from_std(std_socket)?;
    enlarge_buffers(&reader_socket);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_PACKET];
        while let Ok(len) = reader_socket.recv(&mut buf).await {
            if reply_tx.send((from, buf[..len].to_vec())).await.is_err() {
                break;
            }
        }
    });
    let mut up = Link::new(shared.up.clone(), shared.seeds.next_u64());
    let mut down = Link::new(shared.down.clone(), shared.seeds.next_u64());
    if let Some(until) = shared.blackout_until {
        up.black_out_until(until);
        down.black_out_until(until);
    }
    Ok(Client {
        upstream: sender,
        up,
        down,
        reader,
    })
}

/// A blocking-API handle on the same (non-blocking) socket, for sends that never wait on epoll.
fn clone_std(socket: &UdpSocket) -> io::Result<std::net::UdpSocket> {
    use std::os::fd::{AsFd, OwnedFd};
    let fd: OwnedFd = socket.as_fd().try_clone_to_owned()?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Large socket buffers, so bursts are shaped by the model and not lost in the kernel. Forcing
/// past `rmem_max` needs root; without it the kernel's cap applies, which is fine for tests.
fn enlarge_buffers(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: fd is a live socket owned by `socket`; the option value is a c_int of the given size.
        let forced = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                force,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    plain,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP echo through a relay that loses 20% each way: every datagram is delivered or counted.
    #[tokio::test]
    async fn relay_accounts_for_every_packet() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let echo_task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let (len, from) = echo.recv_from(&mut buf).await.unwrap();
                echo.send_to(&buf[..len], from).await.unwrap();
            }
        });
        let lossy: Impairment = "loss=20%,delay=1ms".parse().unwrap();
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo_addr,
            lossy.clone(),
            lossy,
            42,
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay.local_addr()).await.unwrap();
        const N: u32 = 500;
        for i in 0..N {
            client.send(&i.to_be_bytes()).await.unwrap();
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let mut received = std::collections::HashSet::new();
        let mut buf = [0u8; 16];
        while let Ok(Ok(len)) =
            tokio::time::timeout(Duration::from_millis(300), client.recv(&mut buf)).await
        {
            assert_eq!(len, 4);
            assert!(received.insert(u32::from_be_bytes(buf[..4].try_into().unwrap())));
        }
        let stats = relay.stats();
        echo_task.abort();
        assert_eq!(stats.clients, 1);
        assert_eq!(stats.send_errors, 0);
        assert_eq!(stats.up.offered, u64::from(N));
        assert_eq!(
            stats.up.delivered_original + stats.up.dropped(),
            stats.up.offered
        );
        assert_eq!(stats.down.offered, stats.up.delivered_original);
        assert_eq!(
            stats.down.delivered_original + stats.down.dropped(),
            stats.down.offered
        );
        assert_eq!(received.len() as u64, stats.down.delivered_original);
        assert!(
            stats.up.dropped_loss > 50 && stats.down.dropped_loss > 30,
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn blackout_stops_the_path_and_it_comes_back() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let echo_task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let (len, from) = echo.recv_from(&mut buf).await.unwrap();
                echo.send_to(&buf[..len], from).await.unwrap();
            }
        });
        let relay = Relay::start(
            "127.0.0.1:0".parse().unwrap(),
            echo_addr,
            Impairment::default(),
            Impairment::default(),
            1,
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay.local_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let mut ping = async |what: &str| {
            client.send(what.as_bytes()).await.unwrap();
            tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf))
                .await
                .is_ok()
        };
        let ok = ping("before").await;
        assert!(ok, "{:?}", relay.stats());
        relay.black_out(Duration::from_millis(300));
        assert!(!ping("during").await);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(ping("after").await);
        echo_task.abort();
        assert_eq!(relay.stats().up.dropped_blackout, 1);
    }
}
