//! The per-session queue from the TUN reader to the session's sender, and the route table that
//! maps client addresses to those queues.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use webnic_stack::link_repair::{ResendBuffer, SEQUENCED_OVERHEAD, put_sequenced_header};

/// Default queue capacity in packets: about 1.2 MB of 1152-byte packets, a few milliseconds at
/// the rates one session reaches.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// Slots an emptied queue keeps allocated (32 bytes each); more are freed.
const SLOTS_KEPT: usize = 64;

/// Sent datagrams kept for resends at most: the client's reordering window.
const RESEND_CAPACITY: usize = 2048;

/// A bounded queue of datagrams for one session; when full, the oldest is dropped.
///
/// Dropping the oldest (not the newest) keeps latency bounded: TCP retransmits what was lost
/// either way, and fresh packets are the ones worth delivering. One producer (the TUN reader)
/// and one consumer (the session's sender task) use it; the consumer sleeps on a [`Notify`].
#[derive(Debug)]
pub struct SessionQueue {
    packets: Mutex<VecDeque<Bytes>>,
    capacity: usize,
    notify: Notify,
    /// The HTTP/3 datagram header, then room for a sequenced-frame header (link repair).
    header: [u8; 16],
    /// Length of the HTTP/3 datagram header.
    header_len: usize,
    /// Whether the session asked for link repair: datagrams then carry the sequenced-frame
    /// header too, whose sequence number the sender fills in.
    sequenced: AtomicBool,
    /// What the sender sent lately, by sequence number, to answer NACKs (link repair). Empty
    /// unless traffic flows.
    sent: Mutex<ResendBuffer<(Instant, Bytes)>>,
}

impl SessionQueue {
    /// An empty queue of `capacity` packets for a session whose datagrams start with `header`
    /// (the HTTP/3 datagram header, see [`webnic_stack::protocol::datagram_header`]).
    pub fn new(capacity: usize, (h3, header_len): ([u8; 8], usize)) -> Self {
        let mut header = [0u8; 16];
        header[..header_len].copy_from_slice(&h3[..header_len]);
        // A sequence number of 0 until the sender writes the real one.
        put_sequenced_header(&mut header[header_len..header_len + SEQUENCED_OVERHEAD], 0);
        Self {
            // Allocated by the first packet: most sessions idle most of the time.
            packets: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            notify: Notify::new(),
            header,
            header_len,
            sequenced: AtomicBool::new(false),
            sent: Mutex::new(ResendBuffer::new(RESEND_CAPACITY)),
        }
    }

    /// Gives a sequenced datagram (one queued with the sequenced-frame header) its sequence
    /// number and keeps it for resends; entries older than `keep` go. Returns what to send.
    pub fn sequence(&self, datagram: Bytes, now: Instant, keep: Duration) -> Bytes {
        let at = self.header_len;
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        sent.expire(|(when, _)| now.saturating_duration_since(*when) > keep);
        sent.push_with(|seq| {
            // The TUN reader's copy is not shared yet, so this normally takes it without copying.
            let mut datagram = datagram
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            put_sequenced_header(&mut datagram[at..at + SEQUENCED_OVERHEAD], seq);
            (now, datagram.freeze())
        })
        .1
    }

    /// The kept datagrams a NACK's `(first, count)` ranges ask for, at most `limit`, into
    /// `out`; the asked-for sequence numbers no longer kept into `gone`.
    pub fn resends(
        &self,
        ranges: impl Iterator<Item = (u32, u8)>,
        limit: usize,
        out: &mut Vec<Bytes>,
        gone: &mut Vec<u32>,
    ) {
        let sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        for (first, count) in ranges {
            for seq in (0..u32::from(count)).map(|i| first.wrapping_add(i)) {
                match sent.get(seq) {
                    Some((_, datagram)) if out.len() < limit => out.push(datagram.clone()),
                    Some(_) => return,
                    None => gone.push(seq),
                }
            }
        }
    }

    /// Whether datagrams are kept for resends.
    pub fn keeps_sent(&self) -> bool {
        !self
            .sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Frees the datagrams kept for resends (the session went quiet).
    pub fn forget_sent(&self) {
        self.sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The header every datagram queued from now on must start with: the HTTP/3 datagram
    /// header, followed by the sequenced-frame header once link repair is on.
    pub fn header(&self) -> &[u8] {
        let len = if self.sequenced.load(Ordering::Relaxed) {
            self.header_len + SEQUENCED_OVERHEAD
        } else {
            self.header_len
        };
        &self.header[..len]
    }

    /// Length of the HTTP/3 datagram header alone.
    pub fn h3_header_len(&self) -> usize {
        self.header_len
    }

    /// Turns link repair on: datagrams queued from now on carry a sequenced-frame header.
    /// Returns `false` if it was on already.
    pub fn enable_link_repair(&self) -> bool {
        !self.sequenced.swap(true, Ordering::Relaxed)
    }

    /// Whether link repair is on.
    pub fn link_repair(&self) -> bool {
        self.sequenced.load(Ordering::Relaxed)
    }

    /// Queues `datagram` and wakes the consumer. Returns `true` if the queue was full and the
    /// oldest datagram was dropped to make room.
    pub fn push(&self, datagram: Bytes) -> bool {
        let dropped = {
            let mut packets = self.packets.lock().unwrap_or_else(PoisonError::into_inner);
            let dropped = if packets.len() >= self.capacity {
                packets.pop_front().is_some()
            } else {
                false
            };
            packets.push_back(datagram);
            dropped
        };
        self.notify.notify_one();
        dropped
    }

    /// The oldest queued datagram, without waiting.
    pub fn try_pop(&self) -> Option<Bytes> {
        let mut packets = self.packets.lock().unwrap_or_else(PoisonError::into_inner);
        let datagram = packets.pop_front();
        // A burst's worth of slots (up to 32 KiB) is not kept for a session gone idle.
        if packets.is_empty() && packets.capacity() > SLOTS_KEPT {
            *packets = VecDeque::new();
        }
        datagram
    }

    /// The oldest queued datagram, waiting for one if the queue is empty.
    ///
    /// Cancel-safe. Only one task may wait at a time.
    pub async fn pop(&self) -> Bytes {
        loop {
            if let Some(datagram) = self.try_pop() {
                return datagram;
            }
            // notify_one stores a permit when nobody waits, so a push between try_pop and here
            // is not lost.
            self.notify.notified().await;
        }
    }

    /// Datagrams currently queued.
    pub fn len(&self) -> usize {
        self.packets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Client address → the queue of the session holding it.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<IpAddr, Arc<SessionQueue>>>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `address` to `queue`, replacing any previous route.
    pub fn insert(&self, address: IpAddr, queue: Arc<SessionQueue>) {
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(address, queue);
    }

    /// Removes the route for `address`.
    pub fn remove(&self, address: IpAddr) {
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&address);
    }

    /// The queue for `address`.
    pub fn lookup(&self, address: IpAddr) -> Option<Arc<SessionQueue>> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&address)
            .cloned()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_oldest_when_full() {
        let q = SessionQueue::new(3, ([0; 8], 1));
        for i in 0..3u8 {
            assert!(!q.push(Bytes::from(vec![i])));
        }
        assert!(q.push(Bytes::from(vec![3])));
        assert!(q.push(Bytes::from(vec![4])));
        assert_eq!(q.len(), 3);
        let got: Vec<u8> = std::iter::from_fn(|| q.try_pop()).map(|b| b[0]).collect();
        assert_eq!(got, [2, 3, 4]);
        assert!(q.is_empty());
    }

    #[test]
    fn an_emptied_queue_frees_a_burst() {
        let q = SessionQueue::new(1024, ([0; 8], 1));
        assert_eq!(
            q.packets.lock().unwrap().capacity(),
            0,
            "allocated before any packet"
        );
        for i in 0..1000u32 {
            q.push(Bytes::from(i.to_le_bytes().to_vec()));
        }
        assert!(q.packets.lock().unwrap().capacity() >= 1000);
        let mut popped = 0;
        while q.try_pop().is_some() {
            popped += 1;
        }
        assert_eq!(popped, 1000);
        assert!(q.packets.lock().unwrap().capacity() <= SLOTS_KEPT);
    }

    #[tokio::test]
    async fn pop_wakes_on_push() {
        let q = Arc::new(SessionQueue::new(4, ([0; 8], 1)));
        let consumer = {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.pop().await })
        };
        tokio::task::yield_now().await;
        q.push(Bytes::from_static(b"x"));
        assert_eq!(consumer.await.unwrap(), Bytes::from_static(b"x"));
    }

    #[test]
    fn routes() {
        let t = RouteTable::new();
        let a: IpAddr = "10.77.0.2".parse().unwrap();
        let q = Arc::new(SessionQueue::new(4, ([0; 8], 1)));
        t.insert(a, Arc::clone(&q));
        assert!(Arc::ptr_eq(&t.lookup(a).unwrap(), &q));
        assert!(t.lookup("10.77.0.3".parse().unwrap()).is_none());
        t.remove(a);
        assert!(t.is_empty());
    }
}
