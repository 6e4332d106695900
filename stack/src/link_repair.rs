//! Link repair: loss on the QUIC hop repaired on that hop, before the TCP inside sees it.
//!
//! A datagram lost between gateway and client is, without repair, a lost IP packet: the server's
//! TCP finds out after a round trip of duplicate ACKs (or an RTO) and halves its window. Wisp and
//! websockify keep their speed under loss because their relay's TCP repairs it on the lossy hop
//! alone. Link repair does the same for webnic's datagrams, in the gateway → client direction
//! where bulk data flows (PROTOCOL.md §3.1):
//!
//! - the gateway sends each datagram as `0x01 | sequence (u32) | IP packet` and keeps what it sent
//!   for a short while in a [`ResendBuffer`];
//! - the client's [`LinkReceiver`] hands packets on in sequence order. After a gap it holds what
//!   follows, reports the missing sequence numbers in a NACK datagram
//!   (`0x02 | { first (u32), count (u8) }...`), and delivers the held packets once the resent
//!   ones arrive — so the TCP inside sees a short delay instead of a loss. A gap that is not
//!   repaired within a few link round trips is given up on: what was held goes on, and TCP
//!   repairs the loss end to end as it would without link repair.
//!
//! Both halves are sans-IO: the caller passes the time in and sends what they return.

use std::collections::VecDeque;

use smoltcp::time::{Duration, Instant};

/// First byte of a sequenced datagram: `0x01 | sequence (u32, big-endian) | IP packet`. An IP
/// packet starts with its version nibble (4 or 6), so the two never collide.
pub const FRAME_SEQUENCED: u8 = 0x01;
/// First byte of a NACK datagram: `0x02 | { first (u32), count (u8, ≥ 1) }...`.
pub const FRAME_NACK: u8 = 0x02;
/// First byte of a GONE datagram, the gateway's answer to NACKed packets it no longer keeps:
/// `0x03 | { first (u32), count (u8, ≥ 1) }...`.
pub const FRAME_GONE: u8 = 0x03;
/// Bytes a sequenced datagram adds in front of its IP packet.
pub const SEQUENCED_OVERHEAD: usize = 5;
/// Ranges one NACK datagram carries at most (5 bytes each: 321 bytes, far below any MTU).
pub const MAX_NACK_RANGES: usize = 64;

/// Sequence numbers the receiver looks ahead of the first missing one. A packet further ahead
/// gives up on the oldest gaps to make room.
/// 2,048 packets are ~20 ms at 1 Gbit/s: a repair held that long still fits.
const WINDOW: usize = 2048;
/// How far back (in sequence numbers) the receiver remembers what it delivered, to drop
/// duplicates and the second copy of a packet that was resent although it only came late.
const HISTORY: u32 = 4096;
/// A jump larger than this (forwards or back) is a new sequence space (a gateway that restarted
/// its counter): the receiver starts over rather than waiting for four billion packets.
const RESYNC_DISTANCE: u32 = 1 << 20;
/// NACKs per missing packet before the receiver stops asking.
const MAX_NACKS: u8 = 3;
/// The NACK count of a missing packet the gateway said it no longer has.
const GONE: u8 = u8::MAX;
/// The link round trip assumed before the first repair measured one.
const INITIAL_RTT: Duration = Duration::from_millis(20);
/// The smallest round-trip sample taken.
const MIN_RTT_SAMPLE: Duration = Duration::from_micros(500);
/// The longest the receiver holds packets behind a gap. Well below the 200 ms minimum RTO of
/// Linux's TCP, so the sender never times out waiting for a repair.
const MAX_HOLD: Duration = Duration::from_millis(100);

/// Why a link-repair datagram was not understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its header (or a NACK without a range).
    #[error("truncated link-repair frame")]
    Truncated,
    /// A NACK range whose length is not a multiple of 5 bytes or whose count is 0.
    #[error("malformed NACK range")]
    BadRange,
    /// The first byte is neither an IP version nor a link-repair frame type.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
}

/// Writes the sequenced-frame header for `seq` into `header` (5 bytes).
pub fn put_sequenced_header(header: &mut [u8], seq: u32) {
    header[0] = FRAME_SEQUENCED;
    header[1..5].copy_from_slice(&seq.to_be_bytes());
}

/// Splits a sequenced frame into its sequence number and IP packet.
///
/// # Errors
/// [`FrameError`] when `frame` is not a sequenced frame with a non-empty packet.
pub fn parse_sequenced(frame: &[u8]) -> Result<(u32, &[u8]), FrameError> {
    match frame.first() {
        Some(&FRAME_SEQUENCED) => {}
        Some(&other) => return Err(FrameError::UnknownType(other)),
        None => return Err(FrameError::Truncated),
    }
    if frame.len() <= SEQUENCED_OVERHEAD {
        return Err(FrameError::Truncated);
    }
    let seq = u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]);
    Ok((seq, &frame[SEQUENCED_OVERHEAD..]))
}

/// The ranges `(first, count)` of a NACK frame.
///
/// # Errors
/// [`FrameError`] when `frame` is not a well-formed NACK frame.
pub fn parse_nack(frame: &[u8]) -> Result<impl Iterator<Item = (u32, u8)> + '_, FrameError> {
    parse_ranges(FRAME_NACK, frame)
}

/// The ranges `(first, count)` of a GONE frame.
///
/// # Errors
/// [`FrameError`] when `frame` is not a well-formed GONE frame.
pub fn parse_gone(frame: &[u8]) -> Result<impl Iterator<Item = (u32, u8)> + '_, FrameError> {
    parse_ranges(FRAME_GONE, frame)
}

/// Appends `seqs` (ascending) to `frame` as `(first, count)` ranges, at most
/// [`MAX_NACK_RANGES`]; returns how many sequence numbers went in.
pub fn put_ranges(frame: &mut Vec<u8>, seqs: &[u32]) -> usize {
    let mut ranges = 0;
    let mut i = 0;
    while i < seqs.len() && ranges < MAX_NACK_RANGES {
        let first = seqs[i];
        let mut count: u8 = 1;
        while i + usize::from(count) < seqs.len()
            && count < u8::MAX
            && seqs[i + usize::from(count)] == first.wrapping_add(u32::from(count))
        {
            count += 1;
        }
        frame.extend_from_slice(&first.to_be_bytes());
        frame.push(count);
        ranges += 1;
        i += usize::from(count);
    }
    i
}

fn parse_ranges(
    kind: u8,
    frame: &[u8],
) -> Result<impl Iterator<Item = (u32, u8)> + '_, FrameError> {
    match frame.first() {
        Some(&first) if first == kind => {}
        Some(&other) => return Err(FrameError::UnknownType(other)),
        None => return Err(FrameError::Truncated),
    }
    let ranges = &frame[1..];
    if ranges.is_empty() {
        return Err(FrameError::Truncated);
    }
    if !ranges.len().is_multiple_of(5) || ranges.chunks_exact(5).any(|r| r[4] == 0) {
        return Err(FrameError::BadRange);
    }
    Ok(ranges
        .chunks_exact(5)
        .map(|r| (u32::from_be_bytes([r[0], r[1], r[2], r[3]]), r[4])))
}

/// What [`LinkReceiver::accept`] decided about a sequenced packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Hand this packet on now (then whatever [`LinkReceiver::pop_ready`] returns).
    Deliver,
    /// Held behind a gap; it comes out of [`LinkReceiver::pop_ready`] later.
    Held,
    /// Already delivered or already held: drop it.
    Duplicate,
}

/// Counters of the receiving half.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Sequenced datagrams received.
    pub sequenced: u64,
    /// Packets that arrived after the receiver reported them missing (repaired on the link).
    pub repaired: u64,
    /// Missing packets given up on (TCP repairs them end to end).
    pub gave_up: u64,
    /// Sequence numbers asked for in NACKs (a packet asked for twice counts twice).
    pub nacked: u64,
    /// Copies dropped because the packet was already delivered or held.
    pub duplicates: u64,
    /// Packets held behind a gap.
    pub held: u64,
    /// Packets that arrived after they were given up on (delivered then, out of order).
    pub late: u64,
    /// Times the sequence jumped so far that the receiver started over.
    pub resyncs: u64,
}

#[derive(Debug)]
enum Slot {
    Missing {
        /// When the gap was seen.
        since: Instant,
        /// When it was last asked for, and how often (counted when the NACK is queued).
        nacked_at: Instant,
        nacks: u8,
        /// Whether a NACK for it actually went out (one queued may not have been sent before
        /// the packet arrived anyway, which says nothing about the link's round trip).
        sent: bool,
    },
    Held(Vec<u8>),
}

/// The client's half: puts sequenced datagrams back in order and asks for the missing ones.
///
/// Call [`accept`](Self::accept) per sequenced datagram, then drain
/// [`pop_ready`](Self::pop_ready); send what [`poll_nack`](Self::poll_nack) returns; call
/// [`poll`](Self::poll) when [`poll_timeout`](Self::poll_timeout) expires.
#[derive(Debug)]
pub struct LinkReceiver {
    /// The oldest sequence number not yet delivered or given up; `None` before the first frame.
    next: u32,
    /// `slots[i]` is sequence `next + i`; empty unless there is a gap (slot 0 is then missing).
    slots: VecDeque<Slot>,
    /// Packets released in order, waiting for the caller.
    ready: VecDeque<Vec<u8>>,
    /// Delivered-ness of the `HISTORY` sequence numbers before `next`, one bit each.
    delivered: Box<[u64; HISTORY as usize / 64]>,
    /// Sequence numbers to ask for in the next NACK, oldest first.
    to_nack: Vec<u32>,
    /// Smoothed link round trip, from NACK to repair.
    srtt: Duration,
    /// Whether `srtt` is measured rather than the initial guess.
    sampled: bool,
    /// The latest time the caller passed in.
    now: Instant,
    stats: LinkStats,
}

impl Default for LinkReceiver {
    fn default() -> Self {
        Self::new()
    }
}

impl LinkReceiver {
    /// A receiver that has seen nothing yet.
    pub fn new() -> Self {
        Self {
            // Every connection's sequence starts at 0, so a loss of the very first packet is
            // noticed too.
            next: 0,
            slots: VecDeque::new(),
            ready: VecDeque::new(),
            delivered: Box::new([0; HISTORY as usize / 64]),
            to_nack: Vec::new(),
            srtt: INITIAL_RTT,
            sampled: false,
            now: Instant::from_micros(0),
            stats: LinkStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// The smoothed link round trip (NACK to repair), or the initial guess.
    pub fn srtt(&self) -> Duration {
        self.srtt
    }

    /// Forgets the sequence space (the session moved to a new connection, whose gateway task
    /// counts from 0 again). Held packets are released in order first.
    pub fn reset(&mut self) {
        self.release_all();
        self.next = 0;
        self.to_nack.clear();
        *self.delivered = [0; HISTORY as usize / 64];
    }

    fn mark(&mut self, seq: u32, delivered: bool) {
        let bit = (seq % HISTORY) as usize;
        let word = &mut self.delivered[bit / 64];
        if delivered {
            *word |= 1 << (bit % 64);
        } else {
            *word &= !(1 << (bit % 64));
        }
    }

    fn was_delivered(&self, seq: u32) -> bool {
        let bit = (seq % HISTORY) as usize;
        self.delivered[bit / 64] & (1 << (bit % 64)) != 0
    }

    /// Takes sequenced packet `seq` (its IP packet is `packet`) received at `now`.
    pub fn accept(&mut self, now: Instant, seq: u32, packet: &[u8]) -> Accepted {
        self.stats.sequenced += 1;
        self.now = self.now.max(now);
        // Packets released earlier and not yet taken go first: queue this one behind them (and
        // ahead of what it releases itself).
        let pending = self.ready.len();
        let accepted = self.accept_sequenced(now, seq, packet);
        if accepted == Accepted::Deliver && pending > 0 {
            self.ready.insert(pending, packet.to_vec());
            return Accepted::Held;
        }
        accepted
    }

    fn accept_sequenced(&mut self, now: Instant, seq: u32, packet: &[u8]) -> Accepted {
        let next = self.next;
        let ahead = seq.wrapping_sub(next);
        let behind = next.wrapping_sub(seq);
        if ahead >= RESYNC_DISTANCE && behind >= RESYNC_DISTANCE {
            self.stats.resyncs += 1;
            self.reset();
            self.next = seq;
            return self.accept_in_order(now, seq);
        }
        if behind != 0 && behind < RESYNC_DISTANCE {
            // Before `next`: delivered already (a duplicate or a late copy of a repaired
            // packet), or given up on and now arriving late, which TCP still wants.
            if behind <= HISTORY && self.was_delivered(seq) {
                self.stats.duplicates += 1;
                return Accepted::Duplicate;
            }
            if behind <= HISTORY {
                self.mark(seq, true);
            }
            self.stats.late += 1;
            return Accepted::Deliver;
        }
        if ahead == 0 {
            return self.accept_in_order(now, seq);
        }
        // Ahead of a gap. Make room: a packet beyond the window gives up the oldest gaps.
        let mut ahead = ahead as usize;
        while ahead >= WINDOW && !self.slots.is_empty() {
            self.give_up_front();
            ahead = seq.wrapping_sub(self.next) as usize;
        }
        if ahead >= WINDOW {
            // Nothing held, and the packet is still too far ahead to wait for all in between
            // (a burst of loss longer than the window): give up on that stretch at once.
            for i in ahead.saturating_sub(HISTORY as usize)..ahead {
                self.mark(self.next.wrapping_add(i as u32), false);
            }
            self.stats.gave_up += ahead as u64;
            self.next = seq;
            ahead = 0;
        }
        if ahead == 0 {
            return self.accept_in_order(now, seq);
        }
        while self.slots.len() <= ahead {
            let missing = self.next.wrapping_add(self.slots.len() as u32);
            if missing != seq {
                self.to_nack.push(missing);
            }
            self.slots.push_back(Slot::Missing {
                since: now,
                nacked_at: now,
                nacks: u8::from(missing != seq),
                sent: false,
            });
        }
        match &self.slots[ahead] {
            Slot::Held(_) => {
                self.stats.duplicates += 1;
                Accepted::Duplicate
            }
            &Slot::Missing {
                nacks,
                nacked_at,
                sent,
                ..
            } => {
                self.filled(now, nacks, nacked_at, sent);
                self.slots[ahead] = Slot::Held(packet.to_vec());
                self.stats.held += 1;
                Accepted::Held
            }
        }
    }

    /// `seq` is `next`: deliver it, then release everything held behind it up to the next gap.
    fn accept_in_order(&mut self, now: Instant, seq: u32) -> Accepted {
        if let Some(Slot::Missing {
            nacks,
            nacked_at,
            sent,
            ..
        }) = self.slots.pop_front()
        {
            self.filled(now, nacks, nacked_at, sent);
        }
        self.mark(seq, true);
        self.next = seq.wrapping_add(1);
        self.release_held();
        Accepted::Deliver
    }

    /// A missing packet arrived: a repair if it was asked for, and a round-trip sample if its
    /// one NACK really went out.
    fn filled(&mut self, now: Instant, nacks: u8, nacked_at: Instant, sent: bool) {
        if nacks > 0 {
            self.stats.repaired += 1;
            if nacks == 1 && sent {
                self.sample_rtt(now - nacked_at);
            }
        }
    }

    fn sample_rtt(&mut self, sample: Duration) {
        // Below this a sample is scheduling noise, and an estimate near 0 would make every
        // later repair look late.
        let sample = sample.max(MIN_RTT_SAMPLE);
        if self.sampled {
            // 7/8 old + 1/8 new, as TCP's SRTT (RFC 6298).
            self.srtt = (self.srtt * 7 + sample) / 8;
        } else {
            self.sampled = true;
            self.srtt = sample;
        }
    }

    /// Moves the held packets at the front to `ready`, up to a gap still worth waiting for
    /// (gaps the gateway said it cannot repair are given up on the way).
    fn release_held(&mut self) {
        loop {
            let seq = self.next;
            match self.slots.front() {
                Some(Slot::Held(_)) => {
                    let Some(Slot::Held(packet)) = self.slots.pop_front() else {
                        unreachable!("front was held");
                    };
                    self.mark(seq, true);
                    self.ready.push_back(packet);
                }
                Some(Slot::Missing { nacks: GONE, .. }) => {
                    self.slots.pop_front();
                    self.stats.gave_up += 1;
                    self.mark(seq, false);
                }
                _ => return,
            }
            self.next = seq.wrapping_add(1);
        }
    }

    /// Takes the gateway's word that the packets of `ranges` (a GONE frame) will not be resent:
    /// stop waiting for them.
    pub fn gone(&mut self, ranges: impl Iterator<Item = (u32, u8)>) {
        let next = self.next;
        for (first, count) in ranges {
            for seq in (0..u32::from(count)).map(|i| first.wrapping_add(i)) {
                let index = seq.wrapping_sub(next) as usize;
                if let Some(Slot::Missing { nacks, .. }) = self.slots.get_mut(index) {
                    *nacks = GONE;
                }
            }
        }
        self.release_held();
    }

    /// Gives up on the first missing packet and releases what is held behind it (as if the
    /// gateway had said it is gone).
    fn give_up_front(&mut self) {
        if let Some(Slot::Missing { nacks, .. }) = self.slots.front_mut() {
            *nacks = GONE;
        }
        self.release_held();
    }

    fn release_all(&mut self) {
        while !self.slots.is_empty() {
            self.give_up_front();
        }
    }

    /// The next packet released in order, oldest first.
    pub fn pop_ready(&mut self) -> Option<Vec<u8>> {
        self.ready.pop_front()
    }

    /// Released packets waiting to be taken.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Puts back a packet [`accept`](Self::accept) said to deliver but the caller could not take
    /// yet: it goes out first, ahead of what its arrival released.
    pub fn defer(&mut self, packet: &[u8]) {
        self.ready.push_front(packet.to_vec());
    }

    /// Packets held behind gaps right now.
    pub fn held(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s, Slot::Held(_)))
            .count()
    }

    /// How long a gap is waited for before it is given up on: long enough for the last NACK's
    /// answer to come back.
    fn hold_limit(&self) -> Duration {
        (self.renack_after() * u32::from(MAX_NACKS)).min(MAX_HOLD)
    }

    /// How long after a NACK the same packet is asked for again.
    fn renack_after(&self) -> Duration {
        // The floor covers a loaded machine's scheduling delays, which a fast link's few
        // samples do not show; giving up too early costs TCP a loss, waiting costs a few ms.
        self.srtt + self.srtt / 2 + Duration::from_millis(3)
    }

    /// Gives up on gaps older than the hold limit and schedules NACKs again for packets still
    /// missing after a round trip.
    pub fn poll(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let hold = self.hold_limit();
        let mut timed_out = false;
        while let Some(Slot::Missing { since, .. }) = self.slots.front() {
            if now < *since + hold {
                break;
            }
            self.give_up_front();
            timed_out = true;
        }
        if timed_out {
            // Repairs take longer than the estimate says (or the link is losing them): wait
            // longer next time, as TCP backs off its RTO. Repairs measured later bring it down.
            self.srtt = (self.srtt * 2).min(MAX_HOLD);
        }
        let renack = self.renack_after();
        let next = self.next;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Missing {
                nacked_at,
                nacks,
                sent: true,
                ..
            } = slot
                && *nacks > 0
                && *nacks < MAX_NACKS
                && now >= *nacked_at + renack
            {
                *nacked_at = now;
                *nacks += 1;
                self.to_nack.push(next.wrapping_add(i as u32));
            }
        }
    }

    /// When [`poll`](Self::poll) has work next: a gap's hold limit or a NACK to repeat.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hold = self.hold_limit();
        let renack = self.renack_after();
        let mut at: Option<Instant> = None;
        for slot in &self.slots {
            if let Slot::Missing {
                since,
                nacked_at,
                nacks,
                sent,
            } = slot
            {
                let mut t = *since + hold;
                // (A NACK queued but not sent yet goes out with the caller's next transmit.)
                if *sent && *nacks > 0 && *nacks < MAX_NACKS {
                    t = t.min(*nacked_at + renack);
                }
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        }
        at
    }

    /// The next NACK datagram to send, if packets are to be asked for.
    pub fn poll_nack(&mut self) -> Option<Vec<u8>> {
        let next = self.next;
        // Only what is still missing: a packet may have arrived (or been given up on) since
        // its NACK was queued.
        let slots = &self.slots;
        self.to_nack.retain(|seq| {
            matches!(
                slots.get(seq.wrapping_sub(next) as usize),
                Some(Slot::Missing { nacks, .. }) if *nacks != GONE
            )
        });
        if self.to_nack.is_empty() {
            return None;
        }
        self.to_nack
            .sort_unstable_by_key(|seq| seq.wrapping_sub(next));
        self.to_nack.dedup();
        let mut frame = vec![FRAME_NACK];
        let taken = put_ranges(&mut frame, &self.to_nack);
        for seq in self.to_nack.drain(..taken) {
            if let Some(Slot::Missing {
                nacked_at, sent, ..
            }) = self.slots.get_mut(seq.wrapping_sub(next) as usize)
            {
                *nacked_at = self.now;
                *sent = true;
            }
        }
        self.stats.nacked += taken as u64;
        Some(frame)
    }
}

/// The gateway's half: what it sent lately, by sequence number, to answer NACKs.
///
/// Holds `T` (the sent datagram, cheap to clone) for at most `capacity` packets; the caller
/// also drops entries by age with [`expire`](Self::expire) and empties it when the session goes
/// quiet, so an idle session holds nothing.
#[derive(Debug)]
pub struct ResendBuffer<T> {
    /// Sequence number of `items[0]`.
    first: u32,
    /// The next sequence number to assign.
    next: u32,
    items: VecDeque<T>,
    capacity: usize,
}

impl<T> ResendBuffer<T> {
    /// An empty buffer keeping at most `capacity` packets.
    pub fn new(capacity: usize) -> Self {
        Self {
            first: 0,
            next: 0,
            items: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Assigns the next sequence number to the item `make` builds from it (which the caller
    /// then sends) and keeps it; returns the number and the kept item.
    pub fn push_with(&mut self, make: impl FnOnce(u32) -> T) -> (u32, &T) {
        let seq = self.next;
        self.next = seq.wrapping_add(1);
        if self.items.is_empty() {
            self.first = seq;
        }
        if self.items.len() >= self.capacity {
            self.items.pop_front();
            self.first = self.first.wrapping_add(1);
        }
        self.items.push_back(make(seq));
        (seq, self.items.back().expect("just pushed"))
    }

    /// The packet sent as `seq`, if still kept.
    pub fn get(&self, seq: u32) -> Option<&T> {
        let index = seq.wrapping_sub(self.first) as usize;
        self.items.get(index)
    }

    /// The packet sent as `seq`, if still kept, to update.
    pub fn get_mut(&mut self, seq: u32) -> Option<&mut T> {
        let index = seq.wrapping_sub(self.first) as usize;
        self.items.get_mut(index)
    }

    /// Drops the oldest entries while `stale` says so.
    pub fn expire(&mut self, mut stale: impl FnMut(&T) -> bool) {
        while self.items.front().is_some_and(&mut stale) {
            self.items.pop_front();
            self.first = self.first.wrapping_add(1);
        }
    }

    /// Drops every entry and frees their room (the sequence continues).
    pub fn clear(&mut self) {
        self.items = VecDeque::new();
        self.first = self.next;
    }

    /// Entries kept.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Instant {
        Instant::from_micros(ms * 1000)
    }

    /// Accepts `seq` carrying `[seq as u8]` and returns what the caller would hand on, in order.
    fn feed(rx: &mut LinkReceiver, now: Instant, seq: u32) -> Vec<u8> {
        let packet = [seq as u8];
        let mut out = Vec::new();
        if rx.accept(now, seq, &packet) == Accepted::Deliver {
            out.push(packet[0]);
        }
        while let Some(p) = rx.pop_ready() {
            out.push(p[0]);
        }
        out
    }

    fn nack_ranges(rx: &mut LinkReceiver) -> Vec<(u32, u8)> {
        rx.poll_nack()
            .map(|frame| parse_nack(&frame).expect("own NACK parses").collect())
            .unwrap_or_default()
    }

    #[test]
    fn in_order_packets_pass_straight_through() {
        let mut rx = LinkReceiver::new();
        for seq in 0..10 {
            assert_eq!(feed(&mut rx, at(0), seq), vec![seq as u8]);
        }
        assert_eq!(rx.poll_nack(), None);
        assert_eq!(rx.poll_timeout(), None);
        assert_eq!(rx.stats().sequenced, 10);
        assert_eq!(rx.held(), 0);
    }

    #[test]
    fn a_gap_is_nacked_held_behind_and_released_in_order_by_the_repair() {
        let mut rx = LinkReceiver::new();
        assert_eq!(feed(&mut rx, at(0), 0), vec![0]);
        assert_eq!(feed(&mut rx, at(0), 1), vec![1]);
        assert_eq!(feed(&mut rx, at(0), 4), Vec::<u8>::new());
        assert_eq!(feed(&mut rx, at(0), 5), Vec::<u8>::new());
        assert_eq!(rx.held(), 2);
        assert_eq!(nack_ranges(&mut rx), vec![(2, 2)]);
        assert!(rx.poll_timeout().is_some());
        // The repair of 3 first: still waiting for 2.
        assert_eq!(feed(&mut rx, at(1), 3), Vec::<u8>::new());
        assert_eq!(feed(&mut rx, at(1), 2), vec![2, 3, 4, 5]);
        assert_eq!(rx.held(), 0);
        assert_eq!(rx.poll_timeout(), None);
        let stats = rx.stats();
        assert_eq!((stats.repaired, stats.gave_up, stats.nacked), (2, 0, 2));
        // The first repair measured the link: 1 ms from NACK to resend.
        assert_eq!(rx.srtt(), Duration::from_millis(1));
    }

    #[test]
    fn duplicates_of_delivered_or_held_packets_are_dropped() {
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        feed(&mut rx, at(0), 2);
        assert_eq!(rx.accept(at(0), 0, &[0]), Accepted::Duplicate);
        assert_eq!(rx.accept(at(0), 2, &[2]), Accepted::Duplicate);
        assert_eq!(feed(&mut rx, at(0), 1), vec![1, 2]);
        assert_eq!(rx.accept(at(0), 1, &[1]), Accepted::Duplicate);
        assert_eq!(rx.accept(at(0), 2, &[2]), Accepted::Duplicate);
        assert_eq!(rx.stats().duplicates, 4);
    }

    #[test]
    fn an_unrepaired_gap_is_nacked_again_then_given_up_and_a_late_copy_still_delivered() {
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        feed(&mut rx, at(0), 2);
        assert_eq!(nack_ranges(&mut rx), vec![(1, 1)]);
        // Initial RTT guess 20 ms: ask again after 33 ms, give up after 99 ms.
        let renack = rx.poll_timeout().expect("a timer");
        assert_eq!(renack, at(33));
        rx.poll(at(32));
        assert_eq!(rx.poll_nack(), None);
        rx.poll(renack);
        assert_eq!(nack_ranges(&mut rx), vec![(1, 1)]);
        rx.poll(at(66));
        assert_eq!(nack_ranges(&mut rx), vec![(1, 1)], "third and last NACK");
        assert_eq!(
            rx.poll_timeout(),
            Some(at(99)),
            "only the hold limit is left"
        );
        rx.poll(at(98));
        assert_eq!(rx.pop_ready(), None);
        rx.poll(at(99));
        assert_eq!(rx.pop_ready(), Some(vec![2]));
        assert_eq!(rx.stats().gave_up, 1);
        assert_eq!(rx.poll_timeout(), None);
        // TCP still wants the packet if it turns up, once.
        assert_eq!(rx.accept(at(70), 1, &[1]), Accepted::Deliver);
        assert_eq!(rx.accept(at(70), 1, &[1]), Accepted::Duplicate);
        assert_eq!(feed(&mut rx, at(70), 3), vec![3]);
    }

    #[test]
    fn only_repairs_of_sent_nacks_measure_the_link_and_timeouts_back_off() {
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        feed(&mut rx, at(0), 2);
        // 1 was only reordered within a burst: it arrives before the NACK went out.
        assert_eq!(feed(&mut rx, at(0), 1), vec![1, 2]);
        assert_eq!(rx.poll_nack(), None, "nothing left to ask for");
        assert_eq!(rx.srtt(), INITIAL_RTT, "no sample from an unsent NACK");
        // A real repair 4 ms after its NACK went out.
        feed(&mut rx, at(10), 4);
        assert_eq!(nack_ranges(&mut rx), vec![(3, 1)]);
        assert_eq!(feed(&mut rx, at(14), 3), vec![3, 4]);
        assert_eq!(rx.srtt(), Duration::from_millis(4));
        // A gap given up on for time doubles the estimate.
        feed(&mut rx, at(20), 6);
        rx.poll_nack();
        rx.poll(at(1000));
        assert_eq!(rx.srtt(), Duration::from_millis(8));
    }

    #[test]
    fn gaps_the_gateway_calls_gone_are_given_up_at_once() {
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        feed(&mut rx, at(0), 2); // 1 missing
        feed(&mut rx, at(0), 4); // 3 missing
        assert_eq!(nack_ranges(&mut rx), vec![(1, 1), (3, 1)]);
        // 3 is gone; 1 may still come: nothing moves yet.
        let mut frame = vec![FRAME_GONE];
        assert_eq!(put_ranges(&mut frame, &[3]), 1);
        rx.gone(parse_gone(&frame).unwrap());
        assert_eq!(rx.pop_ready(), None);
        // 1 arrives: 2 follows, 3 is skipped, 4 follows.
        assert_eq!(feed(&mut rx, at(1), 1), vec![1, 2, 4]);
        assert_eq!(rx.stats().gave_up, 1);
        // A gone gap at the front releases at once, without waiting for the hold limit.
        feed(&mut rx, at(1), 6);
        rx.gone([(5, 1)].into_iter());
        assert_eq!(rx.pop_ready(), Some(vec![6]));
        assert_eq!(rx.poll_timeout(), None);
        assert!(matches!(
            parse_gone(&[FRAME_NACK, 0, 0, 0, 1, 1]),
            Err(FrameError::UnknownType(FRAME_NACK))
        ));
    }

    #[test]
    fn a_packet_beyond_the_window_gives_up_the_stretch_before_it() {
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        let far = WINDOW as u32 + 10;
        assert_eq!(feed(&mut rx, at(0), far), vec![far as u8]);
        assert_eq!(rx.stats().gave_up, u64::from(far - 1));
        // A packet from inside the stretch still arrives, once.
        assert_eq!(rx.accept(at(0), 5, &[5]), Accepted::Deliver);
        assert_eq!(rx.accept(at(0), 5, &[5]), Accepted::Duplicate);

        // With packets held: the oldest gaps are given up until the new one fits.
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        feed(&mut rx, at(0), 2);
        let out = feed(&mut rx, at(0), 2 + WINDOW as u32);
        assert_eq!(
            out,
            vec![2],
            "1 given up, 2 released, the rest still missing"
        );
        assert_eq!(rx.stats().gave_up, 1);
        assert_eq!(rx.held(), 1);
    }

    #[test]
    fn sequence_numbers_wrap_and_a_restarted_counter_resyncs() {
        let mut rx = LinkReceiver::new();
        rx.next = u32::MAX - 1;
        let start = u32::MAX - 1;
        assert_eq!(feed(&mut rx, at(0), start), vec![start as u8]);
        assert_eq!(feed(&mut rx, at(0), 1), Vec::<u8>::new());
        assert_eq!(nack_ranges(&mut rx), vec![(u32::MAX, 2)]);
        assert_eq!(feed(&mut rx, at(0), 0), Vec::<u8>::new());
        assert_eq!(feed(&mut rx, at(0), u32::MAX), vec![255, 0, 1]);
        // A new gateway task counts from a far-away number: start over there.
        assert_eq!(feed(&mut rx, at(0), 1 << 30), vec![0]);
        assert_eq!(rx.stats().resyncs, 1);
        assert_eq!(feed(&mut rx, at(0), (1 << 30) + 1), vec![1]);
    }

    #[test]
    fn nack_frames_coalesce_runs_and_reject_malformed_input() {
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        feed(&mut rx, at(0), 4); // 1..=3 missing
        feed(&mut rx, at(0), 6); // 5 missing
        let frame = rx.poll_nack().expect("a NACK");
        assert_eq!(frame[0], FRAME_NACK);
        assert_eq!(
            parse_nack(&frame).unwrap().collect::<Vec<_>>(),
            vec![(1, 3), (5, 1)]
        );
        assert_eq!(rx.stats().nacked, 4);
        assert!(matches!(parse_nack(&[]), Err(FrameError::Truncated)));
        assert!(matches!(
            parse_nack(&[FRAME_NACK]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            parse_nack(&[FRAME_NACK, 0, 0, 0, 1]),
            Err(FrameError::BadRange)
        ));
        assert!(matches!(
            parse_nack(&[FRAME_NACK, 0, 0, 0, 1, 0]),
            Err(FrameError::BadRange)
        ));
        assert!(matches!(
            parse_nack(&[0x45, 0, 0, 0, 1, 1]),
            Err(FrameError::UnknownType(0x45))
        ));
        assert!(matches!(
            parse_sequenced(&[FRAME_SEQUENCED, 0, 0, 0, 7]),
            Err(FrameError::Truncated)
        ));
        let mut header = [0u8; 5];
        put_sequenced_header(&mut header, 0x0102_0304);
        let mut frame = header.to_vec();
        frame.extend_from_slice(&[0x45, 9]);
        assert_eq!(parse_sequenced(&frame), Ok((0x0102_0304, &[0x45, 9][..])));
    }

    #[test]
    fn a_nack_datagram_never_exceeds_its_range_limit() {
        let mut rx = LinkReceiver::new();
        feed(&mut rx, at(0), 0);
        // Every other packet missing: 200 single-packet ranges.
        for seq in (2..=400).step_by(2) {
            feed(&mut rx, at(0), seq);
        }
        let first = rx.poll_nack().expect("a NACK");
        assert_eq!(first.len(), 1 + 5 * MAX_NACK_RANGES);
        let mut total = parse_nack(&first).unwrap().count();
        while let Some(frame) = rx.poll_nack() {
            total += parse_nack(&frame).unwrap().count();
        }
        assert_eq!(total, 200);
    }

    #[test]
    fn resend_buffer_keeps_recent_packets_by_sequence() {
        let mut buffer = ResendBuffer::new(3);
        let sent: Vec<u32> = (0..5).map(|_| *buffer.push_with(|seq| seq).1).collect();
        assert_eq!(sent, vec![0, 1, 2, 3, 4]);
        assert_eq!(buffer.len(), 3);
        assert_eq!(buffer.get(1), None, "evicted by capacity");
        assert_eq!(buffer.get(2), Some(&2));
        assert_eq!(buffer.get(4), Some(&4));
        assert_eq!(buffer.get(5), None, "not sent yet");
        buffer.expire(|&seq| seq < 3);
        assert_eq!(buffer.get(2), None);
        assert_eq!(buffer.get(3), Some(&3));
        buffer.clear();
        assert!(buffer.is_empty());
        assert_eq!(buffer.get(4), None);
        assert_eq!(
            buffer.push_with(|seq| seq),
            (5, &5),
            "the sequence continues"
        );
        assert_eq!(buffer.get(5), Some(&5));
    }

    /// A lossy, duplicating link in both directions, with the gateway answering NACKs from its
    /// buffer: every packet comes out exactly once and in order.
    #[test]
    fn random_loss_and_duplication_are_repaired_in_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % 1000
        };
        let mut gateway = ResendBuffer::new(1024);
        let mut rx = LinkReceiver::new();
        let mut delivered: Vec<u32> = Vec::new();
        let mut collect = |rx: &mut LinkReceiver, accepted: Accepted, seq: u32| {
            if accepted == Accepted::Deliver {
                delivered.push(seq);
            }
            while let Some(p) = rx.pop_ready() {
                delivered.push(u32::from_be_bytes(p[..4].try_into().unwrap()));
            }
        };
        const N: u32 = 20_000;
        let mut now = at(0);
        for _ in 0..N {
            now += Duration::from_micros(10);
            let (seq, packet) = gateway.push_with(|seq| seq.to_be_bytes().to_vec());
            let packet = packet.clone();
            let copies = match random() {
                0..50 => 0,  // 5% lost
                50..60 => 2, // 1% duplicated
                _ => 1,
            };
            for _ in 0..copies {
                let accepted = rx.accept(now, seq, &packet);
                collect(&mut rx, accepted, seq);
            }
            rx.poll(now);
            while let Some(nack) = rx.poll_nack() {
                if random() < 50 {
                    continue; // the NACK is lost too
                }
                for (first, count) in parse_nack(&nack).unwrap() {
                    for seq in (0..u32::from(count)).map(|i| first + i) {
                        if random() < 50 {
                            continue; // and so is the resend
                        }
                        let packet = gateway.get(seq).expect("within the buffer").clone();
                        let accepted = rx.accept(now, seq, &packet);
                        collect(&mut rx, accepted, seq);
                    }
                }
            }
        }
        // Drain: time passes until every gap is repaired or given up.
        for _ in 0..100 {
            now += Duration::from_millis(1);
            rx.poll(now);
            while let Some(nack) = rx.poll_nack() {
                for (first, count) in parse_nack(&nack).unwrap() {
                    for seq in (0..u32::from(count)).map(|i| first + i) {
                        let packet = gateway.get(seq).expect("within the buffer").clone();
                        let accepted = rx.accept(now, seq, &packet);
                        collect(&mut rx, accepted, seq);
                    }
                }
            }
        }
        // A gap whose three NACKs or resends were all lost (p ≈ 0.1%) is given up on: that
        // packet is TCP's to repair. Everything else came out once and in order.
        let stats = rx.stats();
        assert!(stats.gave_up <= 5, "{stats:?}");
        assert!(stats.repaired > 900, "{stats:?}");
        assert!(stats.duplicates > 100, "{stats:?}");
        let bad = delivered.windows(2).position(|w| w[0] >= w[1]);
        assert!(
            bad.is_none(),
            "in order, once: {:?} {stats:?}",
            bad.map(|i| &delivered[i.saturating_sub(3)..i + 3])
        );
        assert_eq!(
            delivered.len() as u64,
            u64::from(N) - stats.gave_up,
            "{stats:?}"
        );
    }
}
