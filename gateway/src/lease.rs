//! Address leases for session resumption, sans-IO.
//!
//! Every session gets a random ticket bound to its addresses. When its connection is lost (idle
//! timeout, network change, gateway restart) rather than closed, the lease is *parked*: the
//! addresses stay out of the pool for a grace period, and a new session presenting the ticket
//! gets them back, so the TCP connections in the client's stack carry on. A graceful close, or the
//! grace period running out, returns the addresses to the pool. The lease table can be written to
//! a file and read back, so leases outlive a gateway restart.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A session ticket: 32 random bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub [u8; 32]);

impl Ticket {
    /// Lowercase hex, as clients put it in `?resume=`.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Option<Self> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(bytes))
    }
}

/// Tickets are secrets: never print them whole.
impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// A live session holds the addresses.
    Live,
    /// No session: the addresses wait for a resumption until `until`.
    Parked { until: Instant },
}

#[derive(Debug, Clone)]
struct Lease {
    addresses: Vec<IpAddr>,
    state: State,
    /// Some session on these addresses carried packets, so the kernel may track flows of them.
    carried_traffic: bool,
}

/// Why a resumption was refused (the session then gets fresh addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// No lease has this ticket: never issued, already used, or expired and swept.
    #[error("unknown or expired session ticket")]
    Unknown,
    /// The ticket's session is still connected (a second connection with a copied ticket).
    #[error("the ticket's session is still live")]
    Live,
    /// The grace period is over (not yet swept).
    #[error("the session ticket expired")]
    Expired,
}

/// The addresses of leases whose grace period ran out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Expired {
    /// Every address, for the pool.
    pub addresses: Vec<IpAddr>,
    /// Those whose sessions carried packets: the kernel may still track flows of them.
    pub carried_traffic: Vec<IpAddr>,
}

/// Every lease of the gateway.
#[derive(Debug)]
pub struct Leases {
    grace: Duration,
    leases: HashMap<Ticket, Lease>,
}

impl Leases {
    /// Leases parked for `grace` after their connection is lost.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            leases: HashMap::new(),
        }
    }

    /// How long a lost session's addresses are held.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Binds `addresses` of a new live session to `ticket` (fresh random bytes from the caller).
    pub fn issue(&mut self, ticket: Ticket, addresses: Vec<IpAddr>) {
        self.leases.insert(
            ticket,
            Lease {
                addresses,
                state: State::Live,
                carried_traffic: false,
            },
        );
    }

    /// A new session presents `ticket`: on success the lease becomes live again under
    /// `new_ticket` (tickets are single-use) and its addresses are returned.
    ///
    /// # Errors
    /// [`ResumeError`]; the lease is left as it was.
    pub fn resume(
        &mut self,
        ticket: &Ticket,
        new_ticket: Ticket,
        now: Instant,
    ) -> Result<Vec<IpAddr>, ResumeError> {
        let lease = self.leases.get(ticket).ok_or(ResumeError::Unknown)?;
        match lease.state {
            State::Live => return Err(ResumeError::Live),
            State::Parked { until } if now >= until => return Err(ResumeError::Expired),
            State::Parked { .. } => {}
        }
        let mut lease = self.leases.remove(ticket).ok_or(ResumeError::Unknown)?;
        lease.state = State::Live;
        let addresses = lease.addresses.clone();
        self.leases.insert(new_ticket, lease);
        Ok(addresses)
    }

    /// The session's connection was lost: hold its addresses for the grace period.
    pub fn park(&mut self, ticket: &Ticket, now: Instant) {
        if let Some(lease) = self.leases.get_mut(ticket) {
            lease.state = State::Parked {
                until: now + self.grace,
            };
        }
    }

    /// The session ended for good: its addresses go back to the pool (returned).
    pub fn end(&mut self, ticket: &Ticket) -> Vec<IpAddr> {
        self.leases
            .remove(ticket)
            .map(|lease| lease.addresses)
            .unwrap_or_default()
    }

    /// Parks every live lease (the gateway is going down; its clients will come back).
    pub fn park_all(&mut self, now: Instant) {
        let until = now + self.grace;
        for lease in self.leases.values_mut() {
            if lease.state == State::Live {
                lease.state = State::Parked { until };
            }
        }
    }

    /// Records that the session holding `ticket` carried packets (see [`Expired::carried_traffic`]).
    pub fn note_traffic(&mut self, ticket: &Ticket) {
        if let Some(lease) = self.leases.get_mut(ticket) {
            lease.carried_traffic = true;
        }
    }

    /// Removes the parked leases whose grace period is over; their addresses go back to the pool.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut expired = Expired::default();
        self.leases.retain(|_, lease| match lease.state {
            State::Parked { until } if now >= until => {
                if lease.carried_traffic {
                    expired.carried_traffic.extend(&lease.addresses);
                }
                expired.addresses.append(&mut lease.addresses);
                false
            }
            _ => true,
        });
        expired
    }

    /// Parked leases (for the metrics).
    pub fn parked(&self) -> usize {
        self.leases
            .values()
            .filter(|l| matches!(l.state, State::Parked { .. }))
            .count()
    }

    /// The table as text, one lease per line: `ticket-hex address[,address…]`. Written on
    /// shutdown; every lease in it is treated as parked when read back.
    pub fn to_text(&self) -> String {
        let mut lines: Vec<String> = self
            .leases
            .iter()
            .map(|(ticket, lease)| {
                let addresses: Vec<String> =
                    lease.addresses.iter().map(ToString::to_string).collect();
                format!("{} {}\n", ticket.to_hex(), addresses.join(","))
            })
            .collect();
        lines.sort();
        lines.concat()
    }

    /// Reads a table written by [`to_text`](Self::to_text): every lease is parked for the grace
    /// period from `now`. Malformed lines are skipped and counted (returned).
    pub fn load(&mut self, text: &str, now: Instant) -> usize {
        let mut skipped = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let parsed = line.split_once(' ').and_then(|(ticket, addresses)| {
                let ticket = Ticket::from_hex(ticket.trim())?;
                let addresses: Option<Vec<IpAddr>> = addresses
                    .trim()
                    .split(',')
                    .map(|a| a.parse().ok())
                    .collect();
                Some((ticket, addresses?))
            });
            match parsed {
                Some((ticket, addresses)) if !addresses.is_empty() => {
                    self.leases.insert(
                        ticket,
                        Lease {
                            addresses,
                            state: State::Parked {
                                until: now + self.grace,
                            },
                            // Not recorded in the file: assume the worst.
                            carried_traffic: true,
                        },
                    );
                }
                _ => skipped += 1,
            }
        }
        skipped
    }

    /// Every address held by a lease, live or parked.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.leases
            .values()
            .flat_map(|l| l.addresses.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(n: u8) -> Ticket {
        Ticket([n; 32])
    }

    fn addrs() -> Vec<IpAddr> {
        vec!["10.77.0.2".parse().unwrap(), "fd00:77::2".parse().unwrap()]
    }

    #[test]
    fn lost_session_resumes_within_grace_with_a_new_ticket() {
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(60));
        leases.issue(ticket(1), addrs());
        assert_eq!(
            leases.resume(&ticket(1), ticket(2), t0),
            Err(ResumeError::Live),
            "a live session's ticket cannot be used twice"
        );
        leases.park(&ticket(1), t0);
        assert_eq!(leases.parked(), 1);
        assert_eq!(
            leases.resume(&ticket(1), ticket(2), t0 + Duration::from_secs(59)),
            Ok(addrs())
        );
        assert_eq!(
            leases.resume(&ticket(1), ticket(3), t0 + Duration::from_secs(59)),
            Err(ResumeError::Unknown),
            "tickets are single-use"
        );
        assert_eq!(leases.parked(), 0);
        assert_eq!(leases.end(&ticket(2)), addrs());
        assert_eq!(leases.addresses().count(), 0);
    }

    #[test]
    fn parked_leases_expire_and_release_their_addresses() {
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(10));
        leases.issue(ticket(1), addrs());
        leases.park(&ticket(1), t0);
        assert!(
            leases
                .expire(t0 + Duration::from_secs(9))
                .addresses
                .is_empty()
        );
        assert_eq!(
            leases.resume(&ticket(1), ticket(2), t0 + Duration::from_secs(10)),
            Err(ResumeError::Expired)
        );
        assert_eq!(
            leases.expire(t0 + Duration::from_secs(10)),
            Expired {
                addresses: addrs(),
                carried_traffic: Vec::new(),
            }
        );
        assert_eq!(
            leases.resume(&ticket(1), ticket(2), t0 + Duration::from_secs(10)),
            Err(ResumeError::Unknown)
        );
    }

    #[test]
    fn table_survives_a_restart_as_parked_leases() {
        let t0 = Instant::now();
        let mut leases = Leases::new(Duration::from_secs(30));
        leases.issue(ticket(1), addrs());
        leases.issue(ticket(9), vec!["10.77.0.3".parse().unwrap()]);
        leases.park_all(t0);
        let text = leases.to_text();
        let mut restarted = Leases::new(Duration::from_secs(30));
        let t1 = t0 + Duration::from_secs(100);
        assert_eq!(restarted.load(&(text + "garbage line\n"), t1), 1);
        assert_eq!(restarted.parked(), 2);
        assert_eq!(
            restarted.resume(&ticket(1), ticket(2), t1 + Duration::from_secs(29)),
            Ok(addrs())
        );
        let from_file = vec!["10.77.0.3".parse::<IpAddr>().unwrap()];
        assert_eq!(
            restarted.expire(t1 + Duration::from_secs(30)),
            Expired {
                addresses: from_file.clone(),
                carried_traffic: from_file,
            }
        );
    }

    #[test]
    fn tickets_parse_only_as_64_hex_digits_and_never_print_whole() {
        let t = Ticket([0xab; 32]);
        assert_eq!(Ticket::from_hex(&t.to_hex()), Some(t));
        assert_eq!(Ticket::from_hex("ab"), None);
        assert_eq!(Ticket::from_hex(&"zz".repeat(32)), None);
        assert_eq!(format!("{t:?}"), "Ticket(abab…)");
    }
}
