//! The impairment model of one direction of a link, sans-IO: packets are offered with the current
//! time, and come out of [`Link::poll_transmit`] when they are due. Every decision is drawn from a
//! seeded generator, so a run with the same seed, the same packets and the same clock is the same run.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::Impairment;

/// What happened to the packets offered to a [`Link`]. Every offered packet is counted exactly once
/// in `delivered_original` or in one of the `dropped_*` fields; duplicates are counted on their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets offered to the link.
    pub offered: u64,
    /// Offered packets that came out (not counting duplicates).
    pub delivered_original: u64,
    /// Extra copies that came out.
    pub delivered_duplicates: u64,
    /// Dropped by the random loss.
    pub dropped_loss: u64,
    /// Dropped because the link was blacked out.
    pub dropped_blackout: u64,
    /// Dropped because the rate limiter's queue was full.
    pub dropped_queue: u64,
    /// Packets held back so that later ones overtake them.
    pub reordered: u64,
    /// Packets still in flight inside the link (offered, not yet out or dropped).
    pub in_flight: u64,
}

impl LinkStats {
    /// Offered packets the link dropped, for any reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_blackout + self.dropped_queue
    }
}

/// SplitMix64: small, fast and good enough to draw loss and jitter decisions reproducibly.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: f64) -> bool {
        percent > 0.0 && self.next_f64() * 100.0 < percent
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Scheduled {
    due: Instant,
    /// Breaks ties in offer order, so equal due times keep FIFO order.
    seq: u64,
    duplicate: bool,
    packet: Vec<u8>,
}

/// One direction of an impaired link.
#[derive(Debug)]
pub struct Link {
    impairment: Impairment,
    rng: SplitMix64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    /// When the rate limiter's serializer is free again.
    serializer_free_at: Option<Instant>,
    blackout_until: Option<Instant>,
    /// Due time of the last in-order packet: jitter varies the delay without reordering.
    last_due: Option<Instant>,
    stats: LinkStats,
}

impl Link {
    pub fn new(impairment: Impairment, seed: u64) -> Self {
        Self {
            impairment,
            rng: SplitMix64::new(seed),
            queue: BinaryHeap::new(),
            next_seq: 0,
            serializer_free_at: None,
            blackout_until: None,
            last_due: None,
            stats: LinkStats::default(),
        }
    }

    pub fn impairment(&self) -> &Impairment {
        &self.impairment
    }

    /// Replaces the impairment from now on; packets already in flight keep their schedule.
    pub fn set_impairment(&mut self, impairment: Impairment) {
        self.impairment = impairment;
    }

    /// Drops everything offered before `until` (a path that died: Wi-Fi gone, cable pulled).
    pub fn black_out_until(&mut self, until: Instant) {
        self.blackout_until = Some(until);
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats {
            in_flight: self.queue.len() as u64,
            ..self.stats
        }
    }

    /// Takes one packet into the link at `now`.
    pub fn offer(&mut self, now: Instant, packet: Vec<u8>) {
        self.stats.offered += 1;
        if self.blackout_until.is_some_and(|until| now < until) {
            self.stats.dropped_blackout += 1;
            return;
        }
        if self.rng.chance(self.impairment.loss_percent) {
            self.stats.dropped_loss += 1;
            return;
        }
        let Some(departure) = self.serialize(now, packet.len()) else {
            self.stats.dropped_queue += 1;
            return;
        };
        let mut due = departure + self.impairment.delay + self.jitter();
        // Jitter changes the delay but keeps the order (a real queue does not reorder); reordering
        // is its own knob, so a cell measures one thing at a time.
        due = self.last_due.map_or(due, |last| due.max(last));
        self.last_due = Some(due);
        if self.rng.chance(self.impairment.reorder_percent) {
            self.stats.reordered += 1;
            due += self.impairment.reorder_delay;
        }
        if self.rng.chance(self.impairment.duplicate_percent) {
            let copy_due = due + self.jitter();
            self.push(copy_due, true, packet.clone());
        }
        self.push(due, false, packet);
    }

    /// The next packet due at or before `now`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.queue.peek().is_none_or(|Reverse(s)| s.due > now) {
            return None;
        }
        let Reverse(scheduled) = self.queue.pop()?;
        if scheduled.duplicate {
            self.stats.delivered_duplicates += 1;
        } else {
            self.stats.delivered_original += 1;
        }
        Some(scheduled.packet)
    }

    /// When the next packet is due, if any is in flight.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse(s)| s.due)
    }

    fn push(&mut self, due: Instant, duplicate: bool, packet: Vec<u8>) {
        self.queue.push(Reverse(Scheduled {
            due,
            seq: self.next_seq,
            duplicate,
            packet,
        }));
        self.next_seq += 1;
    }

    /// The time the packet leaves the rate limiter, or `None` when its queue is full.
    fn serialize(&mut self, now: Instant, len: usize) -> Option<Instant> {
        let Some(rate) = self.impairment.rate_bits_per_sec else {
            return Some(now);
        };
        let start = self.serializer_free_at.map_or(now, |free| free.max(now));
        if start.duration_since(now) > self.impairment.queue_delay_limit {
            return None;
        }
        let bits = (len as u64 + WIRE_OVERHEAD) * 8;
        let departure = start + Duration::from_nanos(bits.saturating_mul(1_000_000_000) / rate);
        self.serializer_free_at = Some(departure);
        Some(departure)
    }

    /// Uniform in [0, jitter]: added on top of the base delay, so it may reorder like netem's jitter.
    fn jitter(&mut self) -> Duration {
        let jitter = self.impairment.jitter;
        if jitter.is_zero() {
            return Duration::ZERO;
        }
        jitter.mul_f64(self.rng.next_f64())
    }
}

/// IPv4 + UDP headers: the rate limit applies to what a wire would carry, not to the payload.
const WIRE_OVERHEAD: u64 = 28;

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(link: &mut Link, now: Instant) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| link.poll_transmit(now)).collect()
    }

    fn numbered(i: u32) -> Vec<u8> {
        i.to_be_bytes().to_vec()
    }

    #[test]
    fn clean_link_passes_everything_in_order_at_once() {
        let mut link = Link::new(Impairment::default(), 1);
        let t0 = Instant::now();
        for i in 0..100 {
            link.offer(t0, numbered(i));
        }
        let out = drain(&mut link, t0);
        assert_eq!(out, (0..100).map(numbered).collect::<Vec<_>>());
        let stats = link.stats();
        assert_eq!(stats.offered, 100);
        assert_eq!(stats.delivered_original, 100);
        assert_eq!(stats.dropped(), 0);
    }

    #[test]
    fn loss_rate_is_close_to_the_setting_and_seeded() {
        let impairment = Impairment {
            loss_percent: 5.0,
            ..Impairment::default()
        };
        let run = |seed| {
            let mut link = Link::new(impairment.clone(), seed);
            let t0 = Instant::now();
            for i in 0..100_000 {
                link.offer(t0, numbered(i));
            }
            (drain(&mut link, t0), link.stats())
        };
        let (out_a, stats_a) = run(7);
        let (out_b, stats_b) = run(7);
        assert_eq!(out_a, out_b, "same seed, same survivors");
        assert_eq!(stats_a, stats_b);
        assert!(
            (4_500..=5_500).contains(&stats_a.dropped_loss),
            "{stats_a:?}"
        );
        assert_eq!(
            stats_a.delivered_original + stats_a.dropped_loss,
            stats_a.offered
        );
        let (_, stats_c) = run(8);
        assert_ne!(stats_a.dropped_loss, stats_c.dropped_loss);
    }

    #[test]
    fn delay_holds_packets_until_due() {
        let impairment = Impairment {
            delay: Duration::from_millis(20),
            ..Impairment::default()
        };
        let mut link = Link::new(impairment, 1);
        let t0 = Instant::now();
        link.offer(t0, numbered(1));
        assert_eq!(link.poll_timeout(), Some(t0 + Duration::from_millis(20)));
        assert!(link.poll_transmit(t0 + Duration::from_millis(19)).is_none());
        assert_eq!(
            link.poll_transmit(t0 + Duration::from_millis(20)),
            Some(numbered(1))
        );
    }

    #[test]
    fn jitter_varies_delay_but_keeps_order() {
        let impairment = Impairment {
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(5),
            ..Impairment::default()
        };
        let mut link = Link::new(impairment, 9);
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut delays = Vec::new();
        for i in 0..500u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            link.offer(now, numbered(i));
            delays.push(link.poll_timeout().unwrap());
        }
        for step in 0..1_000u64 {
            out.extend(drain(&mut link, t0 + Duration::from_micros(step * 100)));
        }
        assert_eq!(out, (0..500).map(numbered).collect::<Vec<_>>());
        assert!(delays.iter().all(|&d| d >= t0 + Duration::from_millis(10)));
    }

    #[test]
    fn reordering_lets_later_packets_overtake() {
        let impairment = Impairment {
            reorder_percent: 10.0,
            reorder_delay: Duration::from_millis(5),
            ..Impairment::default()
        };
        let mut link = Link::new(impairment, 3);
        let t0 = Instant::now();
        let mut out = Vec::new();
        // One packet per millisecond: a held-back packet is overtaken by the next five.
        for i in 0..1_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            link.offer(now, numbered(i));
            out.extend(drain(&mut link, now));
        }
        out.extend(drain(&mut link, t0 + Duration::from_secs(2)));
        assert_eq!(out.len(), 1_000, "reordering loses nothing");
        let mut sorted = out.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1_000).map(numbered).collect::<Vec<_>>());
        let reordered = link.stats().reordered;
        assert!((50..=150).contains(&reordered), "{reordered}");
        let overtaken = out.windows(2).filter(|w| w[0] > w[1]).count() as u64;
        assert!(
            overtaken > 0 && overtaken <= reordered,
            "{overtaken} of {reordered}"
        );
    }

    #[test]
    fn duplicates_are_extra_copies() {
        let impairment = Impairment {
            duplicate_percent: 1.0,
            ..Impairment::default()
        };
        let mut link = Link::new(impairment, 5);
        let t0 = Instant::now();
        for i in 0..10_000 {
            link.offer(t0, numbered(i));
        }
        let out = drain(&mut link, t0);
        let stats = link.stats();
        assert!(
            (50..=150).contains(&stats.delivered_duplicates),
            "{stats:?}"
        );
        assert_eq!(out.len() as u64, 10_000 + stats.delivered_duplicates);
        assert_eq!(stats.delivered_original, 10_000);
    }

    #[test]
    fn rate_limit_spaces_packets_and_tail_drops_a_full_queue() {
        let impairment = Impairment {
            rate_bits_per_sec: Some(10_000_000),
            queue_delay_limit: Duration::from_millis(50),
            ..Impairment::default()
        };
        let mut link = Link::new(impairment, 1);
        let t0 = Instant::now();
        // 1000 × (1222 + 28) bytes = 10 Mbit: one second at 10 Mbit/s, far beyond a 50 ms queue.
        for i in 0..1_000u32 {
            let mut packet = vec![0; 1222];
            packet[..4].copy_from_slice(&i.to_be_bytes());
            link.offer(t0, packet);
        }
        let stats = link.stats();
        // 50 ms at 10 Mbit/s holds 62500 bytes: 50 packets plus the one being serialized.
        assert!((49..=52).contains(&stats.in_flight), "{stats:?}");
        assert_eq!(stats.dropped_queue + stats.in_flight, 1_000);
        // One packet takes exactly 1 ms on the wire.
        assert!(link.poll_transmit(t0).is_none());
        assert!(link.poll_transmit(t0 + Duration::from_millis(1)).is_some());
        assert!(link.poll_transmit(t0 + Duration::from_millis(1)).is_none());
    }

    #[test]
    fn blackout_drops_everything_until_it_ends() {
        let mut link = Link::new(Impairment::default(), 1);
        let t0 = Instant::now();
        link.black_out_until(t0 + Duration::from_secs(3));
        link.offer(t0, numbered(1));
        link.offer(t0 + Duration::from_millis(2_999), numbered(2));
        link.offer(t0 + Duration::from_secs(3), numbered(3));
        let out = drain(&mut link, t0 + Duration::from_secs(3));
        assert_eq!(out, vec![numbered(3)]);
        assert_eq!(link.stats().dropped_blackout, 2);
    }
}
