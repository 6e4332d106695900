//! The per-session queue from the TUN reader to the session's sender, and the route table that
//! maps client addresses to those queues.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use webnic_stack::link_repair::{ResendBuffer, SEQUENCED_OVERHEAD, put_sequenced_header};

/// Default queue capacity in packets: about 1.2 MB of 1152-byte packets, a few milliseconds at
/// the rates one session reaches.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;

/// Bytes a queue holds at most, per packet of its capacity: a full-size datagram of the default
/// link MTU fits, so the byte bound only binds for a stream-link session that takes coalesced
/// packets of up to 64 KiB (which would otherwise queue 64 MiB).
const BYTES_PER_SLOT: usize = 1280;

/// Slots an emptied queue keeps allocated (32 bytes each); more are freed.
const SLOTS_KEPT: usize = 64;

/// Sent datagrams kept for resends at most: the client's reordering window.
const RESEND_CAPACITY: usize = 2048;

/// How often one datagram is resent at most (the client asks up to three times; a third copy
/// would rarely be the one that arrives).
pub const MAX_RESENDS: u8 = 2;

/// Numbers of one NACK looked at, at most (a NACK can name 64 × 255).
pub const MAX_NACKED_PER_NACK: usize = 2048;

/// Resend requests waiting for the sender, at most.
const MAX_PENDING_REQUESTS: usize = 4096;

/// A bounded queue of datagrams for one session; when full, the oldest is dropped.
///
/// Dropping the oldest (not the newest) keeps latency bounded: TCP retransmits what was lost
/// either way, and fresh packets are the ones worth delivering. One producer (the TUN reader)
/// and one consumer (the session's sender task) use it; the consumer sleeps on a [`Notify`].
#[derive(Debug)]
pub struct SessionQueue {
    packets: Mutex<VecDeque<Bytes>>,
    capacity: usize,
    /// Bytes queued (changed only under the `packets` lock), at most [`BYTES_PER_SLOT`] ×
    /// `capacity`.
    bytes: AtomicUsize,
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
    sent: Mutex<SentLog>,
    /// Whether `sent` holds resend requests (checked without the lock per packet).
    has_requests: AtomicBool,
    /// Whether the session asked for the stream link: the sender moves to a stream.
    stream_link: AtomicBool,
    /// The largest IP packet the client takes on the stream link (PROTOCOL.md §3.2); 0 until
    /// it said so: packets of the link MTU only.
    large_packets: AtomicU16,
}

/// What the sender should do next.
#[derive(Debug)]
pub enum Next {
    /// Resend what clients asked for ([`SessionQueue::take_requests`]).
    Resends,
    /// Send this datagram.
    Datagram(Bytes),
}

/// What became of one NACK's numbers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResendRequests {
    /// Queued for a resend.
    pub queued: u64,
    /// Kept, but resent as often as allowed already or queued already (or too many requests
    /// are pending).
    pub limited: u64,
    /// No longer kept: answered with GONE.
    pub gone: u64,
}

/// A sequenced datagram kept for resends.
#[derive(Debug)]
struct Kept {
    /// When it left the gateway.
    at: Instant,
    datagram: Bytes,
    resends: u8,
    /// Queued for a resend right now.
    requested: bool,
}

#[derive(Debug)]
enum Request {
    Resend(u32),
    Gone(u32),
}

/// The sent datagrams and the resends clients asked for.
#[derive(Debug)]
struct SentLog {
    kept: ResendBuffer<Kept>,
    requests: VecDeque<Request>,
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
            bytes: AtomicUsize::new(0),
            notify: Notify::new(),
            header,
            header_len,
            sequenced: AtomicBool::new(false),
            sent: Mutex::new(SentLog {
                kept: ResendBuffer::new(RESEND_CAPACITY),
                requests: VecDeque::new(),
            }),
            has_requests: AtomicBool::new(false),
            stream_link: AtomicBool::new(false),
            large_packets: AtomicU16::new(0),
        }
    }

    /// Gives a sequenced datagram (one queued with the sequenced-frame header) its sequence
    /// number and keeps it for resends; entries older than `keep` go. Returns the number and
    /// what to send.
    pub fn sequence(&self, datagram: Bytes, now: Instant, keep: Duration) -> (u32, Bytes) {
        let at = self.header_len;
        let mut log = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        log.kept
            .expire(|kept| now.saturating_duration_since(kept.at) > keep);
        let (seq, kept) = log.kept.push_with(|seq| {
            // The TUN reader's copy is not shared yet, so this normally takes it without copying.
            let mut datagram = datagram
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            put_sequenced_header(&mut datagram[at..at + SEQUENCED_OVERHEAD], seq);
            Kept {
                at: now,
                datagram: datagram.freeze(),
                resends: 0,
                requested: false,
            }
        });
        (seq, kept.datagram.clone())
    }

    /// Restarts the keep time of datagram `seq`: it left the gateway only now (sending waited
    /// for room in QUIC's buffer).
    pub fn mark_sent(&self, seq: u32, now: Instant) {
        let mut log = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(kept) = log.kept.get_mut(seq) {
            kept.at = now;
        }
    }

    /// Takes a client's NACK: queues the kept datagrams its `(first, count)` ranges ask for,
    /// for the sender to resend, and the numbers no longer kept, for a GONE. Each datagram is
    /// resent at most [`MAX_RESENDS`] times and queued once at a time, and one NACK is looked
    /// at for at most [`MAX_NACKED_PER_NACK`] numbers, so NACKs cannot make the gateway send
    /// more than a small multiple of what the session received anyway.
    pub fn request_resends(&self, ranges: impl Iterator<Item = (u32, u8)>) -> ResendRequests {
        let mut outcome = ResendRequests::default();
        {
            let mut log = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
            let seqs = ranges
                .flat_map(|(first, count)| {
                    (0..u32::from(count)).map(move |i| first.wrapping_add(i))
                })
                .take(MAX_NACKED_PER_NACK);
            for seq in seqs {
                if log.requests.len() >= MAX_PENDING_REQUESTS {
                    outcome.limited += 1;
                    continue;
                }
                match log.kept.get_mut(seq) {
                    Some(kept) if !kept.requested && kept.resends < MAX_RESENDS => {
                        kept.requested = true;
                        log.requests.push_back(Request::Resend(seq));
                        outcome.queued += 1;
                    }
                    Some(_) => outcome.limited += 1,
                    None => {
                        log.requests.push_back(Request::Gone(seq));
                        outcome.gone += 1;
                    }
                }
            }
            if log.requests.is_empty() {
                return outcome;
            }
            self.has_requests.store(true, Ordering::Release);
        }
        self.notify.notify_one();
        outcome
    }

    /// Moves the queued resend requests out: the datagrams to resend into `resends`, the
    /// numbers no longer kept into `gone`.
    pub fn take_requests(&self, resends: &mut Vec<Bytes>, gone: &mut Vec<u32>) {
        let mut log = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        self.has_requests.store(false, Ordering::Release);
        let SentLog { kept, requests } = &mut *log;
        for request in requests.drain(..) {
            match request {
                Request::Resend(seq) => match kept.get_mut(seq) {
                    Some(entry) => {
                        entry.requested = false;
                        entry.resends += 1;
                        resends.push(entry.datagram.clone());
                    }
                    // Expired since it was asked for.
                    None => gone.push(seq),
                },
                Request::Gone(seq) => gone.push(seq),
            }
        }
        if requests.capacity() > 64 {
            *requests = VecDeque::new();
        }
    }

    /// Whether datagrams are kept for resends.
    pub fn keeps_sent(&self) -> bool {
        !self
            .sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .kept
            .is_empty()
    }

    /// Frees the datagrams kept for resends (the session went quiet).
    pub fn forget_sent(&self) {
        let mut log = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        log.kept.clear();
        log.requests = VecDeque::new();
        self.has_requests.store(false, Ordering::Release);
    }

    /// What the sender should do next without waiting: resends first, then the oldest queued
    /// datagram.
    pub fn try_next(&self) -> Option<Next> {
        if self.has_requests.load(Ordering::Acquire) {
            return Some(Next::Resends);
        }
        self.try_pop().map(Next::Datagram)
    }

    /// [`try_next`](Self::try_next), waiting until there is something.
    ///
    /// Cancel-safe. Only one task may wait at a time.
    pub async fn next(&self) -> Next {
        loop {
            if let Some(next) = self.try_next() {
                return next;
            }
            // notify_one stores a permit when nobody waits, so a push between try_next and
            // here is not lost.
            self.notify.notified().await;
        }
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
        !self.stream_link() && !self.sequenced.swap(true, Ordering::Relaxed)
    }

    /// Whether link repair is on.
    pub fn link_repair(&self) -> bool {
        self.sequenced.load(Ordering::Relaxed)
    }

    /// Asks the sender to move to the stream link. Returns `false` if it was asked already, or
    /// if link repair is on (the two do not mix: a stream needs no repair).
    pub fn enable_stream_link(&self) -> bool {
        !self.link_repair() && !self.stream_link.swap(true, Ordering::Relaxed)
    }

    /// Whether the session asked for the stream link.
    pub fn stream_link(&self) -> bool {
        self.stream_link.load(Ordering::Relaxed)
    }

    /// The stream link could not be opened: the session stays on datagrams.
    pub fn stream_link_failed(&self) {
        self.stream_link.store(false, Ordering::Relaxed);
        self.large_packets.store(0, Ordering::Relaxed);
    }

    /// The client takes IP packets of up to `max` bytes on the stream link: coalesced TCP
    /// packets from the TUN may go to it whole. Only with the stream link on.
    pub fn accept_large_packets(&self, max: u16) {
        if self.stream_link() {
            self.large_packets.store(max, Ordering::Relaxed);
        }
    }

    /// The largest IP packet the client takes now, if larger than the link MTU.
    pub fn large_packets(&self) -> Option<usize> {
        match self.large_packets.load(Ordering::Relaxed) {
            0 => None,
            max => Some(usize::from(max)),
        }
    }

    /// Queues `datagram` and wakes the consumer. Returns `true` if the queue was full (in
    /// packets or bytes) and the oldest datagrams were dropped to make room.
    pub fn push(&self, datagram: Bytes) -> bool {
        let dropped = {
            let mut packets = self.packets.lock().unwrap_or_else(PoisonError::into_inner);
            let mut dropped = false;
            let mut bytes = self.bytes.load(Ordering::Relaxed);
            let byte_capacity = self.capacity * BYTES_PER_SLOT;
            while packets.len() >= self.capacity
                || (!packets.is_empty() && bytes + datagram.len() > byte_capacity)
            {
                let Some(old) = packets.pop_front() else {
                    break;
                };
                bytes -= old.len();
                dropped = true;
            }
            self.bytes.store(bytes + datagram.len(), Ordering::Relaxed);
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
        if let Some(datagram) = &datagram {
            self.bytes.fetch_sub(datagram.len(), Ordering::Relaxed);
        }
        // A burst's worth of slots (up to 32 KiB) is not kept for a session gone idle.
        if packets.is_empty() && packets.capacity() > SLOTS_KEPT {
            *packets = VecDeque::new();
        }
        datagram
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

    const FRAME_SEQUENCED_BYTE: u8 = webnic_stack::link_repair::FRAME_SEQUENCED;

    #[test]
    fn large_packets_are_bounded_in_bytes_too() {
        // 4 slots: 4 × 1280 bytes.
        let q = SessionQueue::new(4, ([0; 8], 1));
        assert!(!q.push(Bytes::from(vec![1; 2000])));
        assert!(!q.push(Bytes::from(vec![2; 2000])));
        assert!(
            q.push(Bytes::from(vec![3; 2000])),
            "6000 bytes do not fit 5120"
        );
        assert_eq!(q.len(), 2);
        // A packet larger than the whole bound is still queued, alone.
        assert!(q.push(Bytes::from(vec![4; 60_000])));
        assert_eq!(q.len(), 1);
        assert_eq!(q.try_pop().unwrap()[0], 4);
        assert!(q.is_empty());
        // Popping gave the bytes back: small packets fill all slots again.
        for i in 0..4 {
            assert!(!q.push(Bytes::from(vec![i; 1000])));
        }
        // Large packets only for a stream-link session that asked.
        assert_eq!(q.large_packets(), None);
        q.accept_large_packets(65_535);
        assert_eq!(q.large_packets(), None, "not without the stream link");
        assert!(q.enable_stream_link());
        q.accept_large_packets(65_535);
        assert_eq!(q.large_packets(), Some(65_535));
        q.stream_link_failed();
        assert_eq!(q.large_packets(), None);
    }

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
    async fn next_wakes_on_push() {
        let q = Arc::new(SessionQueue::new(4, ([0; 8], 1)));
        let consumer = {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                match q.next().await {
                    Next::Datagram(datagram) => datagram,
                    Next::Resends => panic!("no resend was asked for"),
                }
            })
        };
        tokio::task::yield_now().await;
        q.push(Bytes::from_static(b"x"));
        assert_eq!(consumer.await.unwrap(), Bytes::from_static(b"x"));
    }

    #[test]
    fn stream_link_and_link_repair_exclude_each_other() {
        let q = SessionQueue::new(16, ([0x07; 8], 1));
        assert!(q.enable_stream_link());
        assert!(!q.enable_stream_link(), "on once");
        assert!(!q.enable_link_repair(), "no repair on a stream");
        assert!(!q.link_repair() && q.stream_link());
        q.stream_link_failed();
        assert!(!q.stream_link());

        let q = SessionQueue::new(16, ([0x07; 8], 1));
        assert!(q.enable_link_repair());
        assert!(!q.enable_stream_link(), "repair came first");
        assert!(q.link_repair() && !q.stream_link());
    }

    /// A sequenced datagram as the TUN reader queues it once link repair is on.
    fn sequenced(q: &SessionQueue, byte: u8) -> Bytes {
        let mut datagram = q.header().to_vec();
        datagram.extend_from_slice(&[0x45, byte]);
        Bytes::from(datagram)
    }

    #[test]
    fn nacks_are_answered_at_most_twice_per_packet_and_gone_beyond_what_is_kept() {
        let q = SessionQueue::new(16, ([0x07; 8], 1));
        assert!(q.enable_link_repair());
        assert!(!q.enable_link_repair(), "on once");
        assert_eq!(q.header(), &[0x07, FRAME_SEQUENCED_BYTE, 0, 0, 0, 0]);
        let now = Instant::now();
        let keep = Duration::from_secs(1);
        for byte in 0..3 {
            let (seq, sent) = q.sequence(sequenced(&q, byte), now, keep);
            assert_eq!(seq, u32::from(byte));
            assert_eq!(&sent[1..6], &[FRAME_SEQUENCED_BYTE, 0, 0, 0, byte][..]);
        }
        assert!(q.try_next().is_none());
        // The same packet named 64 times in one NACK is queued once; 9 was never sent.
        let outcome = q.request_resends(std::iter::repeat_n((1, 1), 64).chain([(9, 1)]));
        assert_eq!(
            outcome,
            ResendRequests {
                queued: 1,
                limited: 63,
                gone: 1
            }
        );
        assert!(matches!(q.try_next(), Some(Next::Resends)));
        let (mut resends, mut gone) = (Vec::new(), Vec::new());
        q.take_requests(&mut resends, &mut gone);
        assert_eq!(resends.len(), 1);
        assert_eq!(resends[0][5], 1, "packet 1, unchanged");
        assert_eq!(gone, vec![9]);
        assert!(q.try_next().is_none());
        // A second resend is allowed, a third is not.
        assert_eq!(q.request_resends([(1, 1)].into_iter()).queued, 1);
        q.take_requests(&mut resends, &mut gone);
        assert_eq!(q.request_resends([(1, 1)].into_iter()).limited, 1);
        assert!(q.try_next().is_none());
        // A huge NACK is looked at only so far.
        let outcome = q.request_resends(std::iter::repeat_n((100, 255), 64));
        assert_eq!(
            outcome.queued + outcome.limited + outcome.gone,
            MAX_NACKED_PER_NACK as u64
        );
        // Quiet: everything kept is freed, requests too.
        q.forget_sent();
        assert!(!q.keeps_sent());
        assert!(q.try_next().is_none());
        assert_eq!(q.request_resends([(0, 1)].into_iter()).gone, 1);
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
