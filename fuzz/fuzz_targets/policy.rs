//! The egress policy against a deliberately naive reference (gateway/src/policy_naive.rs, the
//! same one the property test in policy.rs uses): for any address, protocol and port, the fast
//! classifier and the default policy's verdict must match the reference's class, and a policy
//! with allow and deny rules must follow them in the documented order.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use webnic_gateway::packet::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use webnic_gateway::policy::{DenyClass, DestRule, EgressPolicy, default_class};
use webnic_gateway::pool::Cidr;

mod naive {
    include!("../../gateway/src/policy_naive.rs");
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: family and protocol; 1-2: port; then the address (zero-padded).
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let port = u16::from_be_bytes([
        rest.first().copied().unwrap_or(0),
        rest.get(1).copied().unwrap_or(0),
    ]);
    let address_bytes = rest.get(2..).unwrap_or_default();
    let mut octets = [0u8; 16];
    for (slot, byte) in octets.iter_mut().zip(address_bytes) {
        *slot = *byte;
    }
    let random = if selector & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(octets))
    };
    // Bit 2: start from one of the reference's listed prefixes (chosen by the last address
    // byte), so every class and every prefix boundary is near.
    let address = if selector & 4 == 0 {
        random
    } else {
        let prefixes = naive::prefixes();
        let (cidr, _) = &prefixes[usize::from(octets[15]) % prefixes.len()];
        let host = match (cidr.network, random) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => IpAddr::V4(Ipv4Addr::from(
                v6.octets()[..4]
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(0),
            )),
            (IpAddr::V6(_), IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (_, same) => same,
        };
        or_host_bits(cidr.network, host, cidr.prefix_len)
    };
    let protocol = [PROTO_TCP, PROTO_UDP, PROTO_ICMP][usize::from(selector >> 1) % 3];
    let port = (protocol != PROTO_ICMP).then_some(port.max(1));

    // The classifier.
    let expected = naive::class(address);
    assert_eq!(default_class(address), expected, "class of {address}");

    // The default policy: the class refuses; else TCP port 25; else allowed.
    let verdict = EgressPolicy::default()
        .check(address, protocol, port)
        .map_err(|r| r.class);
    let naive_verdict = match expected {
        Some(class) => Err(class),
        None if protocol == PROTO_TCP && port == Some(25) => Err(DenyClass::Port),
        None => Ok(()),
    };
    assert_eq!(
        verdict, naive_verdict,
        "default policy on {address} {protocol} {port:?}"
    );

    // Rules: deny wins over allow, an allow rule opens its prefix (and port 25 if it lists it).
    let prefix_len = if address.is_ipv4() { 24 } else { 64 };
    let network = Cidr {
        network: mask(address, prefix_len),
        prefix_len,
    };
    let allow = DestRule {
        cidr: network,
        ports: Vec::new(),
    };
    let policy = EgressPolicy::new(
        vec![allow.clone()],
        Vec::new(),
        Vec::new(),
        Vec::new(),
        false,
    );
    let verdict = policy.check(address, protocol, port).map_err(|r| r.class);
    let naive_verdict = if protocol == PROTO_TCP && port == Some(25) {
        Err(DenyClass::Port)
    } else {
        Ok(())
    };
    assert_eq!(
        verdict, naive_verdict,
        "allowed {network}: {address} {protocol} {port:?}"
    );
    let policy = EgressPolicy::new(
        vec![allow.clone()],
        vec![allow],
        Vec::new(),
        Vec::new(),
        false,
    );
    assert_eq!(
        policy.check(address, protocol, port).map_err(|r| r.class),
        Err(DenyClass::DenyRule),
        "deny wins over allow"
    );
});

/// `address` with all but the first `len` bits cleared (naively, bit by bit).
fn mask(address: IpAddr, len: u8) -> IpAddr {
    match address {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let kept = (0..32)
                .filter(|i| *i < u32::from(len))
                .fold(0u32, |m, i| m | (1 << (31 - i)));
            IpAddr::V4(Ipv4Addr::from(bits & kept))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let kept = (0..128)
                .filter(|i| *i < u32::from(len))
                .fold(0u128, |m, i| m | (1 << (127 - i)));
            IpAddr::V6(Ipv6Addr::from(bits & kept))
        }
    }
}

/// `network` with the bits after `len` taken from `host` (same family).
fn or_host_bits(network: IpAddr, host: IpAddr, len: u8) -> IpAddr {
    match (network, mask(host, len), host) {
        (IpAddr::V4(n), IpAddr::V4(masked), IpAddr::V4(h)) => IpAddr::V4(Ipv4Addr::from(
            u32::from(n) | (u32::from(h) ^ u32::from(masked)),
        )),
        (IpAddr::V6(n), IpAddr::V6(masked), IpAddr::V6(h)) => IpAddr::V6(Ipv6Addr::from(
            u128::from(n) | (u128::from(h) ^ u128::from(masked)),
        )),
        _ => network,
    }
}
