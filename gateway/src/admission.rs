//! Session admission caps (sans-IO: `now` is an argument).
//!
//! Before a session gets an address it must pass, in this order: the new-session rate limit of
//! its client address (a token bucket per address, IPv6 grouped by /64 since one host holds a
//! whole /64), the cap on concurrent sessions per client address, per token subject (the
//! gateway's cap, narrowed by the token's `max_sessions`), and in total. An admitted session
//! holds a [`Ticket`] that must be returned with [`Admission::release`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use webnic_stack::protocol::CloseCode;

use crate::quota::Bucket;

/// The caps. A cap of 0, or a rate of 0, turns that check off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionLimits {
    /// Concurrent sessions per client address (IPv6: per /64).
    pub per_address: u32,
    /// Concurrent sessions per token subject.
    pub per_subject: u32,
    /// Concurrent sessions in total.
    pub total: u32,
    /// New sessions per second per client address.
    pub rate: f64,
    /// Burst of new sessions per client address.
    pub burst: f64,
}

impl AdmissionLimits {
    /// Defaults: room for a user with many tabs and for the test suite, which opens a dozen
    /// sessions from one address in a second; far below what exhausts a /16 pool.
    pub const DEFAULT: Self = Self {
        per_address: 64,
        per_subject: 64,
        total: 10_000,
        rate: 10.0,
        burst: 30.0,
    };
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionRefusal {
    /// New sessions from this address arrive too fast.
    #[error("new sessions from this address exceed {0}/s")]
    RateLimited(u32),
    /// The address holds `0` sessions already.
    #[error("this address already has {0} sessions")]
    PerAddress(u32),
    /// The subject holds `0` sessions already.
    #[error("this token's subject already has {0} sessions")]
    PerSubject(u32),
    /// The gateway holds `0` sessions already.
    #[error("the gateway already has {0} sessions")]
    Total(u32),
}

impl AdmissionRefusal {
    /// The close code that tells the client.
    pub fn close_code(self) -> CloseCode {
        match self {
            Self::RateLimited(_) => CloseCode::RateLimited,
            Self::PerAddress(_) => CloseCode::TooManySessionsPerAddress,
            Self::PerSubject(_) => CloseCode::TooManySessionsPerSubject,
            Self::Total(_) => CloseCode::TooManySessions,
        }
    }
}

/// An admitted session's place in the counts.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "return it with Admission::release"]
pub struct Ticket {
    address: IpAddr,
    subject: Option<String>,
}

/// The admission state of the gateway.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    total: u32,
    per_address: HashMap<IpAddr, u32>,
    per_subject: HashMap<String, u32>,
    buckets: HashMap<IpAddr, Bucket>,
}

/// Above this many rate buckets, full ones (idle addresses) are forgotten.
const MAX_IDLE_BUCKETS: usize = 4096;

impl Admission {
    /// No sessions yet.
    pub fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits,
            total: 0,
            per_address: HashMap::new(),
            per_subject: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// The caps.
    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    /// Sessions currently admitted.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Admits a session from `address` with an optional token `subject` (and the token's own
    /// `max_sessions`).
    ///
    /// # Errors
    /// [`AdmissionRefusal`]: nothing was counted.
    pub fn admit(
        &mut self,
        now: Instant,
        address: IpAddr,
        subject: Option<&str>,
        token_max_sessions: Option<u32>,
    ) -> Result<Ticket, AdmissionRefusal> {
        let address = group(address);
        let limits = self.limits;
        if limits.rate > 0.0 {
            if self.buckets.len() > MAX_IDLE_BUCKETS {
                self.buckets.retain(|_, bucket| !bucket.is_full(now));
            }
            let bucket = self
                .buckets
                .entry(address)
                .or_insert_with(|| Bucket::new(limits.rate, limits.burst.max(1.0), now));
            if !bucket.try_take(now, 1.0) {
                return Err(AdmissionRefusal::RateLimited(limits.rate.ceil() as u32));
            }
        }
        let held = |map: &HashMap<_, u32>, key| map.get(key).copied().unwrap_or(0);
        if limits.per_address > 0 && held(&self.per_address, &address) >= limits.per_address {
            return Err(AdmissionRefusal::PerAddress(limits.per_address));
        }
        if let Some(subject) = subject {
            let cap = match (limits.per_subject, token_max_sessions) {
                (0, None) => u32::MAX,
                (0, Some(token)) => token,
                (gateway, None) => gateway,
                (gateway, Some(token)) => gateway.min(token),
            };
            let current = self.per_subject.get(subject).copied().unwrap_or(0);
            if current >= cap {
                return Err(AdmissionRefusal::PerSubject(cap));
            }
        }
        if limits.total > 0 && self.total >= limits.total {
            return Err(AdmissionRefusal::Total(limits.total));
        }
        self.total += 1;
        *self.per_address.entry(address).or_default() += 1;
        if let Some(subject) = subject {
            *self.per_subject.entry(subject.to_owned()).or_default() += 1;
        }
        Ok(Ticket {
            address,
            subject: subject.map(str::to_owned),
        })
    }

    /// Returns an admitted session's place.
    pub fn release(&mut self, ticket: Ticket) {
        self.total = self.total.saturating_sub(1);
        decrement(&mut self.per_address, &ticket.address);
        if let Some(subject) = &ticket.subject {
            decrement(&mut self.per_subject, subject);
        }
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: &K) {
    if let Some(count) = map.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            map.remove(key);
        }
    }
}

/// The key an address is counted under: IPv4 as is (IPv4-mapped IPv6 as its IPv4), IPv6 by /64.
fn group(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// How long a session may last at most, whatever its traffic; 0 turns it off.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            per_address: 3,
            per_subject: 2,
            total: 5,
            rate: 0.0,
            burst: 0.0,
        }
    }

    #[test]
    fn per_address_cap_groups_ipv6_by_64() {
        let now = Instant::now();
        let mut a = Admission::new(limits());
        let t: Vec<Ticket> = (1..=3)
            .map(|i| {
                a.admit(now, ip(&format!("2001:db8::{i}")), None, None)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            a.admit(now, ip("2001:db8::ffff:1"), None, None),
            Err(AdmissionRefusal::PerAddress(3))
        );
        assert!(a.admit(now, ip("2001:db8:0:1::1"), None, None).is_ok());
        for ticket in t {
            a.release(ticket);
        }
        assert!(a.admit(now, ip("2001:db8::9"), None, None).is_ok());
        // IPv4-mapped counts as the IPv4 address.
        for _ in 0..3 {
            let _ = a.admit(now, ip("192.0.2.1"), None, None).unwrap();
        }
        assert_eq!(
            a.admit(now, ip("::ffff:192.0.2.1"), None, None),
            Err(AdmissionRefusal::PerAddress(3))
        );
    }

    #[test]
    fn per_subject_cap_narrowed_by_token() {
        let now = Instant::now();
        let mut a = Admission::new(limits());
        let first = a.admit(now, ip("192.0.2.1"), Some("alice"), None).unwrap();
        let _second = a.admit(now, ip("192.0.2.2"), Some("alice"), None).unwrap();
        assert_eq!(
            a.admit(now, ip("192.0.2.3"), Some("alice"), None),
            Err(AdmissionRefusal::PerSubject(2))
        );
        let _bob = a.admit(now, ip("192.0.2.3"), Some("bob"), Some(1)).unwrap();
        assert_eq!(
            a.admit(now, ip("192.0.2.4"), Some("bob"), Some(1)),
            Err(AdmissionRefusal::PerSubject(1)),
            "the token's max_sessions narrows the gateway's cap"
        );
        let _bob2 = a.admit(now, ip("192.0.2.4"), Some("bob"), Some(5)).unwrap();
        assert_eq!(
            a.admit(now, ip("192.0.2.5"), Some("bob"), Some(5)),
            Err(AdmissionRefusal::PerSubject(2)),
            "a token cannot widen the gateway's cap"
        );
        assert_eq!(
            a.admit(now, ip("192.0.2.4"), Some("carol"), Some(0)),
            Err(AdmissionRefusal::PerSubject(0))
        );
        a.release(first);
        assert!(a.admit(now, ip("192.0.2.3"), Some("alice"), None).is_ok());
        assert_eq!(a.total(), 4);
    }

    #[test]
    fn total_cap_and_refusals_count_nothing() {
        let now = Instant::now();
        let mut a = Admission::new(limits());
        let tickets: Vec<Ticket> = (1..=5)
            .map(|i| {
                a.admit(now, ip(&format!("192.0.2.{i}")), None, None)
                    .unwrap()
            })
            .collect();
        assert_eq!(
            a.admit(now, ip("192.0.2.9"), None, None),
            Err(AdmissionRefusal::Total(5))
        );
        assert_eq!(a.total(), 5);
        for ticket in tickets {
            a.release(ticket);
        }
        assert_eq!(a.total(), 0);
        assert!(a.per_address.is_empty() && a.per_subject.is_empty());
    }

    #[test]
    fn rate_limit_per_address() {
        let t0 = Instant::now();
        let mut a = Admission::new(AdmissionLimits {
            per_address: 0,
            per_subject: 0,
            total: 0,
            rate: 2.0,
            burst: 4.0,
        });
        let from = ip("192.0.2.1");
        let admitted = (0..10)
            .filter_map(|_| a.admit(t0, from, None, None).ok())
            .count();
        assert_eq!(admitted, 4);
        assert_eq!(
            a.admit(t0, from, None, None),
            Err(AdmissionRefusal::RateLimited(2))
        );
        // Another address has its own bucket.
        assert!(a.admit(t0, ip("192.0.2.2"), None, None).is_ok());
        // Half a second later: one more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(a.admit(t1, from, None, None).is_ok());
        assert!(a.admit(t1, from, None, None).is_err());
        assert_eq!(
            AdmissionRefusal::RateLimited(2).close_code(),
            CloseCode::RateLimited
        );
    }
}
