//! Receive-window autotuning: a connection's receive window grows while it moves data, within a
//! budget that the stack's receiving connections share.
//!
//! A fixed window is either too small for one bulk flow on a path whose round trip includes
//! QUIC's loss repair (the flow stalls on the window), or, multiplied by many flows, more data
//! in flight than the gateway's per-session queue holds (whole coalesced packets overflow it and
//! the server falls back to its retransmission timer). Linux sizes each connection's buffer from
//! what it moved in the last round trip; the stack has no receiver-side RTT, so instead a
//! connection's window doubles after each full window of data it received, as slow start grows
//! a congestion window, up to its share of a stack-wide budget: one flow may take the whole
//! budget, eight flows an eighth each. QUIC does the same for its streams with a
//! connection-level window over per-stream windows.

use smoltcp::time::{Duration, Instant};

/// A connection counts as receiving for this long after it last received
/// [`ACTIVE_BYTES`] more.
pub(crate) const ACTIVE_FOR: Duration = Duration::from_millis(100);

/// What a connection must receive to count as receiving: a trickle (an idle SSH session, a
/// keep-alive) takes no share of the budget.
pub(crate) const ACTIVE_BYTES: u64 = 64 * 1024;

/// The autotuning state of one connection's receive window.
#[derive(Debug, Clone)]
pub(crate) struct RecvWindow {
    /// The window a connection starts with and falls back to when idle.
    floor: usize,
    /// The largest window it may grow to.
    max: usize,
    /// The window advertised now (at most; smoltcp never retracts one already advertised).
    limit: usize,
    /// Bytes received when `limit` last changed.
    changed_at: u64,
    /// Bytes received when the connection last counted as receiving.
    active_at: u64,
    /// Until when it counts as receiving.
    active_until: Option<Instant>,
}

impl RecvWindow {
    /// A connection's window between `floor` and `max` bytes; with `max <= floor` it stays fixed.
    pub(crate) fn new(floor: usize, max: usize) -> Self {
        Self {
            floor,
            max: max.max(floor),
            limit: floor,
            changed_at: 0,
            active_at: 0,
            active_until: None,
        }
    }

    /// Whether the window can grow at all.
    pub(crate) fn is_tuned(&self) -> bool {
        self.max > self.floor
    }

    /// The window limit now.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Updates the limit from `received`, the bytes the connection has received so far (read
    /// and still buffered), and `share`, this connection's share of the stack's budget. Returns
    /// whether the connection counts as receiving (for the next share).
    pub(crate) fn update(&mut self, now: Instant, received: u64, share: usize) -> bool {
        // A new connection counts at once: flows opened one after another (8 parallel
        // downloads) would otherwise let the first grow into the others' share before they
        // received anything, and its window, once advertised, is not taken back.
        if self.active_until.is_none() || received.saturating_sub(self.active_at) >= ACTIVE_BYTES {
            self.active_at = received;
            self.active_until = Some(now + ACTIVE_FOR);
        }
        let active = self.active_until.is_some_and(|until| now < until);
        let target = share.clamp(self.floor, self.max);
        let moved = received.saturating_sub(self.changed_at);
        // A connection that stops receiving keeps its window (a retransmission timeout stalls a
        // bulk flow for 200 ms or more) but takes no share: it shrinks when others receive.
        let limit = if self.limit > target {
            target
        } else if active && self.limit < target && moved >= self.limit as u64 {
            self.limit.saturating_mul(2).min(target)
        } else {
            self.limit
        };
        if limit != self.limit || !active {
            self.changed_at = received;
        }
        self.limit = limit;
        active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: usize = 1024;

    fn at(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn a_fixed_window_never_moves() {
        let mut window = RecvWindow::new(256 * KIB, 256 * KIB);
        assert!(!window.is_tuned());
        for step in 0..100u64 {
            window.update(at(step as i64), step * 1_000_000, usize::MAX);
            assert_eq!(window.limit(), 256 * KIB);
        }
    }

    #[test]
    fn a_new_connection_counts_as_receiving_before_it_received_anything() {
        let mut window = RecvWindow::new(256 * KIB, 2048 * KIB);
        assert!(window.update(at(0), 0, 2048 * KIB));
        assert!(window.update(at(99), 1000, 2048 * KIB));
        assert!(!window.update(at(100), 2000, 2048 * KIB));
    }

    #[test]
    fn a_lone_bulk_flow_doubles_after_each_full_window_up_to_the_budget() {
        let mut window = RecvWindow::new(256 * KIB, 4096 * KIB);
        let budget = 2048 * KIB;
        let mut received = 0u64;
        let mut limits = Vec::new();
        for step in 0..64 {
            received += 64 * KIB as u64;
            window.update(at(step), received, budget);
            if limits.last() != Some(&window.limit()) {
                limits.push(window.limit());
            }
        }
        assert_eq!(limits, [256 * KIB, 512 * KIB, 1024 * KIB, 2048 * KIB]);
    }

    #[test]
    fn growth_waits_for_a_full_window_of_data() {
        let mut window = RecvWindow::new(256 * KIB, 2048 * KIB);
        window.update(at(0), 64 * KIB as u64, usize::MAX);
        window.update(at(1), 255 * KIB as u64, usize::MAX);
        assert_eq!(window.limit(), 256 * KIB);
        window.update(at(2), 256 * KIB as u64, usize::MAX);
        assert_eq!(window.limit(), 512 * KIB);
        // The next doubling needs another full (512 KiB) window.
        window.update(at(3), (256 + 511) * KIB as u64, usize::MAX);
        assert_eq!(window.limit(), 512 * KIB);
        window.update(at(4), (256 + 512) * KIB as u64, usize::MAX);
        assert_eq!(window.limit(), 1024 * KIB);
    }

    #[test]
    fn a_smaller_share_lowers_a_grown_window_but_never_below_the_floor() {
        let mut window = RecvWindow::new(256 * KIB, 2048 * KIB);
        let mut received = 0u64;
        for step in 0..64 {
            received += 64 * KIB as u64;
            window.update(at(step), received, 2048 * KIB);
        }
        assert_eq!(window.limit(), 2048 * KIB);
        received += 64 * KIB as u64;
        window.update(at(64), received, 2048 * KIB / 2);
        assert_eq!(window.limit(), 1024 * KIB);
        received += 64 * KIB as u64;
        window.update(at(65), received, 2048 * KIB / 8);
        assert_eq!(window.limit(), 256 * KIB);
        received += 64 * KIB as u64;
        window.update(at(66), received, 2048 * KIB / 100);
        assert_eq!(window.limit(), 256 * KIB);
    }

    #[test]
    fn an_idle_connection_keeps_its_window_until_others_need_the_budget() {
        let mut window = RecvWindow::new(256 * KIB, 2048 * KIB);
        let mut received = 0u64;
        for step in 0..64 {
            received += 64 * KIB as u64;
            assert!(window.update(at(step), received, 2048 * KIB));
        }
        assert_eq!(window.limit(), 2048 * KIB);
        // Still receiving within ACTIVE_FOR of the last 64 KiB...
        assert!(window.update(at(63 + 99), received + 100, 2048 * KIB));
        // ...not after it, and a trickle below ACTIVE_BYTES does not revive it; alone, it
        // keeps its window (a bulk flow stalled by a retransmission timeout resumes at speed).
        assert!(!window.update(at(63 + 100), received + 200, 2048 * KIB));
        assert!(!window.update(at(400), received + 60 * KIB as u64, 2048 * KIB));
        assert_eq!(window.limit(), 2048 * KIB);
        // When eight others receive, it shrinks to their share; a trickle never grows it.
        assert!(!window.update(at(401), received + 63 * KIB as u64, 2048 * KIB / 8));
        assert_eq!(window.limit(), 256 * KIB);
        for ms in 402..10_000 {
            window.update(at(ms), received + 63 * KIB as u64 + 1, 2048 * KIB);
        }
        assert_eq!(window.limit(), 256 * KIB);
    }
}
