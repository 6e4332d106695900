//! Address pools: which client addresses are free, sans-IO.
//!
//! A pool is built from a CIDR. Its first host address (`.1` / `::1`) belongs to the gateway
//! itself (it sits on the TUN device); the network address, and for IPv4 the broadcast address,
//! are never handed out. IPv6 prefixes can be huge, so a pool hands out addresses sequentially
//! from the start of the prefix up to a configurable limit, and keeps released addresses on a
//! free list instead of materialising every address.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a CIDR or a pool could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// The text is not `address/prefix`.
    #[error("invalid CIDR {0:?}: expected address/prefix-length")]
    Syntax(String),
    /// The prefix length is out of range for the family.
    #[error("invalid prefix length in {0:?}")]
    PrefixLength(String),
    /// Bits are set after the prefix (e.g. `10.77.0.5/24`).
    #[error("{0:?} has host bits set; did you mean the network address?")]
    HostBits(String),
    /// The prefix leaves no address for clients after the gateway's own.
    #[error("prefix {0} is too small: it needs room for the gateway and at least one client")]
    TooSmall(Cidr),
    /// The CIDR is of the other address family.
    #[error("{0} is not an {1} prefix")]
    WrongFamily(Cidr, &'static str),
}

/// An IP prefix: network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address (no host bits set).
    pub network: IpAddr,
    /// The prefix length.
    pub prefix_len: u8,
}

impl Cidr {
    /// Number of host bits.
    pub fn host_bits(&self) -> u32 {
        self.max_prefix() - u32::from(self.prefix_len)
    }

    fn max_prefix(&self) -> u32 {
        match self.network {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// Whether `address` lies inside the prefix.
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(self.host_bits()).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(self.host_bits()).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// The first host address (network + 1): the gateway's own address on the TUN.
    pub fn gateway_address(&self) -> IpAddr {
        match self.network {
            IpAddr::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n).wrapping_add(1))),
            IpAddr::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n).wrapping_add(1))),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| PoolError::Syntax(s.to_owned()))?;
        let network: IpAddr = address
            .parse()
            .map_err(|_| PoolError::Syntax(s.to_owned()))?;
        let prefix_len: u8 = prefix
            .parse()
            .map_err(|_| PoolError::PrefixLength(s.to_owned()))?;
        let cidr = Self {
            network,
            prefix_len,
        };
        if u32::from(prefix_len) > cidr.max_prefix() {
            return Err(PoolError::PrefixLength(s.to_owned()));
        }
        if !cidr.contains(network) || cidr.masked() != network {
            return Err(PoolError::HostBits(s.to_owned()));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn masked(&self) -> IpAddr {
        match self.network {
            IpAddr::V4(n) => {
                let mask = u32::MAX.checked_shl(self.host_bits()).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(n) & mask))
            }
            IpAddr::V6(n) => {
                let mask = u128::MAX.checked_shl(self.host_bits()).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(n) & mask))
            }
        }
    }
}

/// The free client addresses of one prefix.
///
/// Addresses are numbered by their offset from the network address. Offsets
/// `first..next` have been handed out at least once; those among them that were released sit in
/// `free` in the order they were released.
///
/// A released address is quarantined by rotation: never-used addresses go out first, then the
/// released ones oldest release first, so an address is handed out again only after every other
/// free address has been. Late packets for a closed session (a server's retransmissions, a
/// delayed reply) then find nobody, or the old address's route gone, rather than a new session
/// that happens to get the same address a moment later. Allocation stays deterministic.
#[derive(Debug, Clone)]
pub struct AddressPool {
    cidr: Cidr,
    /// Lowest client offset (2: 0 is the network, 1 the gateway).
    first: u128,
    /// One past the highest offset that may be handed out.
    end: u128,
    /// Next never-used offset.
    next: u128,
    free: VecDeque<u128>,
    in_use: HashSet<u128>,
}

impl AddressPool {
    /// A pool of client addresses in `cidr`, handing out at most `limit` addresses at once
    /// (`None`: every address of the prefix).
    ///
    /// # Errors
    /// [`PoolError::TooSmall`] if the prefix has no client address after the gateway's.
    pub fn new(cidr: Cidr, limit: Option<u128>) -> Result<Self, PoolError> {
        let size: u128 = 1u128.checked_shl(cidr.host_bits()).unwrap_or(u128::MAX);
        // IPv4 excludes the broadcast address (the last one); IPv6 has none, but keeping the
        // all-ones address out too costs one address and avoids surprises with anycast.
        let mut end = size.saturating_sub(1);
        let first = 2;
        if end <= first {
            return Err(PoolError::TooSmall(cidr));
        }
        if let Some(limit) = limit {
            end = end.min(first.saturating_add(limit));
        }
        Ok(Self {
            cidr,
            first,
            end,
            next: first,
            free: VecDeque::new(),
            in_use: HashSet::new(),
        })
    }

    /// An IPv4 pool.
    ///
    /// # Errors
    /// [`PoolError::WrongFamily`] or [`PoolError::TooSmall`].
    pub fn ipv4(cidr: Cidr) -> Result<Self, PoolError> {
        if !cidr.network.is_ipv4() {
            return Err(PoolError::WrongFamily(cidr, "IPv4"));
        }
        Self::new(cidr, None)
    }

    /// An IPv6 pool handing out at most `limit` addresses at once.
    ///
    /// # Errors
    /// [`PoolError::WrongFamily`] or [`PoolError::TooSmall`].
    pub fn ipv6(cidr: Cidr, limit: u128) -> Result<Self, PoolError> {
        if !cidr.network.is_ipv6() {
            return Err(PoolError::WrongFamily(cidr, "IPv6"));
        }
        Self::new(cidr, Some(limit))
    }

    /// The prefix.
    pub fn cidr(&self) -> Cidr {
        self.cidr
    }

    /// The gateway's own address in this prefix.
    pub fn gateway_address(&self) -> IpAddr {
        self.cidr.gateway_address()
    }

    /// A free address, or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<IpAddr> {
        let offset = if self.next < self.end {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front()?
        };
        self.in_use.insert(offset);
        Some(self.address(offset))
    }

    /// Returns `address` to the pool. Addresses that are not in use are ignored (returns
    /// `false`), so a double release cannot hand one address to two sessions.
    pub fn release(&mut self, address: IpAddr) -> bool {
        let Some(offset) = self.offset(address) else {
            return false;
        };
        if !self.in_use.remove(&offset) {
            return false;
        }
        self.free.push_back(offset);
        true
    }

    /// Takes `address` out of the pool as if allocated (a lease restored after a restart).
    /// Returns `false` if it is outside the pool, beyond its limit, or already in use.
    pub fn claim(&mut self, address: IpAddr) -> bool {
        let Some(offset) = self.offset(address) else {
            return false;
        };
        if offset < self.first || offset >= self.end || self.in_use.contains(&offset) {
            return false;
        }
        if offset >= self.next {
            // The never-used addresses skipped over stay available, after the fresh ones.
            self.free.extend(self.next..offset);
            self.next = offset + 1;
        } else {
            self.free.retain(|&o| o != offset);
        }
        self.in_use.insert(offset);
        true
    }

    /// Addresses currently handed out.
    pub fn in_use(&self) -> usize {
        self.in_use.len()
    }

    /// Addresses that can still be handed out.
    pub fn free(&self) -> u128 {
        (self.end - self.first) - self.in_use.len() as u128
    }

    fn address(&self, offset: u128) -> IpAddr {
        match self.cidr.network {
            // Offsets stay below 2^32 for IPv4 prefixes, so the truncation is exact.
            IpAddr::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n) + offset as u32)),
            IpAddr::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n) + offset)),
        }
    }

    fn offset(&self, address: IpAddr) -> Option<u128> {
        if !self.cidr.contains(address) {
            return None;
        }
        let offset = match (self.cidr.network, address) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(u32::from(a) - u32::from(n)),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) - u128::from(n),
            _ => return None,
        };
        (self.first..self.end).contains(&offset).then_some(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_cidrs() {
        let c: Cidr = "10.77.0.0/24".parse().unwrap();
        assert_eq!(c.network, ip("10.77.0.0"));
        assert_eq!(c.prefix_len, 24);
        assert_eq!(c.gateway_address(), ip("10.77.0.1"));
        assert!(c.contains(ip("10.77.0.255")));
        assert!(!c.contains(ip("10.77.1.0")));
        assert!(!c.contains(ip("fd00::1")));
        let c6: Cidr = "fd00:77::/112".parse().unwrap();
        assert_eq!(c6.gateway_address(), ip("fd00:77::1"));
        assert!(matches!(
            "10.77.0.1/24".parse::<Cidr>(),
            Err(PoolError::HostBits(_))
        ));
        assert!(matches!(
            "10.77.0.0/33".parse::<Cidr>(),
            Err(PoolError::PrefixLength(_))
        ));
        assert!(matches!(
            "10.77.0.0".parse::<Cidr>(),
            Err(PoolError::Syntax(_))
        ));
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
    }

    #[test]
    fn ipv4_pool_exhausts_and_releases() {
        let mut pool = AddressPool::ipv4("10.77.0.0/29".parse().unwrap()).unwrap();
        // .0 network, .1 gateway, .7 broadcast: .2 to .6 for clients.
        assert_eq!(pool.free(), 5);
        let got: Vec<IpAddr> = (0..5).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(
            got,
            [
                "10.77.0.2",
                "10.77.0.3",
                "10.77.0.4",
                "10.77.0.5",
                "10.77.0.6"
            ]
            .map(ip)
            .to_vec()
        );
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.in_use(), 5);
        assert_eq!(pool.free(), 0);
        assert!(pool.release(ip("10.77.0.4")));
        assert!(!pool.release(ip("10.77.0.4")), "double release is ignored");
        assert!(
            !pool.release(ip("10.77.0.1")),
            "the gateway is never in use"
        );
        assert!(!pool.release(ip("10.78.0.4")));
        assert_eq!(pool.allocate(), Some(ip("10.77.0.4")));
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn released_addresses_are_reused_last_and_oldest_first() {
        let mut pool = AddressPool::ipv4("10.77.0.0/29".parse().unwrap()).unwrap();
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        assert!(pool.release(a));
        // Never-used addresses first: .4, .5, .6, not the just-released .2.
        let fresh: Vec<IpAddr> = (0..3).map(|_| pool.allocate().unwrap()).collect();
        assert_eq!(
            fresh,
            ["10.77.0.4", "10.77.0.5", "10.77.0.6"].map(ip).to_vec()
        );
        assert!(pool.release(b));
        // Then released ones, oldest release first.
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.allocate(), Some(b));
        assert_eq!(pool.allocate(), None);
    }

    #[test]
    fn claimed_addresses_are_never_handed_out() {
        let mut pool = AddressPool::ipv4("10.77.0.0/29".parse().unwrap()).unwrap();
        assert!(pool.claim(ip("10.77.0.4")));
        assert!(!pool.claim(ip("10.77.0.4")), "already in use");
        assert!(!pool.claim(ip("10.77.0.1")), "the gateway's own address");
        assert!(!pool.claim(ip("10.77.0.7")), "broadcast");
        assert!(!pool.claim(ip("10.78.0.2")), "outside the prefix");
        let mut got: Vec<IpAddr> = std::iter::from_fn(|| pool.allocate()).collect();
        got.sort();
        assert_eq!(
            got,
            ["10.77.0.2", "10.77.0.3", "10.77.0.5", "10.77.0.6"]
                .map(ip)
                .to_vec()
        );
        assert_eq!(pool.in_use(), 5);
    }

    #[test]
    fn no_double_allocation() {
        let mut pool = AddressPool::ipv4("10.77.0.0/24".parse().unwrap()).unwrap();
        let mut seen = HashSet::new();
        while let Some(a) = pool.allocate() {
            assert!(seen.insert(a), "{a} handed out twice");
            assert_ne!(a, ip("10.77.0.0"));
            assert_ne!(a, ip("10.77.0.1"));
            assert_ne!(a, ip("10.77.0.255"));
        }
        assert_eq!(seen.len(), 253);
    }

    #[test]
    fn tiny_prefixes_are_refused() {
        assert!(AddressPool::ipv4("10.0.0.0/31".parse().unwrap()).is_err());
        assert!(AddressPool::ipv4("10.0.0.0/32".parse().unwrap()).is_err());
        // .0 network, .1 gateway, .2 client, .3 broadcast.
        assert_eq!(
            AddressPool::ipv4("10.0.0.0/30".parse().unwrap())
                .unwrap()
                .free(),
            1
        );
        assert!(AddressPool::ipv4("fd00::/64".parse().unwrap()).is_err());
    }

    #[test]
    fn ipv6_pool_is_capped() {
        let mut pool = AddressPool::ipv6("fd00:77::/64".parse().unwrap(), 3).unwrap();
        assert_eq!(pool.free(), 3);
        assert_eq!(pool.allocate(), Some(ip("fd00:77::2")));
        assert_eq!(pool.allocate(), Some(ip("fd00:77::3")));
        assert_eq!(pool.allocate(), Some(ip("fd00:77::4")));
        assert_eq!(pool.allocate(), None);
        assert!(pool.release(ip("fd00:77::3")));
        assert_eq!(pool.allocate(), Some(ip("fd00:77::3")));
        let small = AddressPool::ipv6("fd00:77::/126".parse().unwrap(), 100).unwrap();
        assert_eq!(small.free(), 1);
    }
}
