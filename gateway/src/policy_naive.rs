// A deliberately naive reference for the egress policy's address classes: the IANA table as
// text, matched bit by bit as strings, most specific prefix first. Shared by the property test
// in policy.rs and the `policy` fuzz target (fuzz/fuzz_targets/policy.rs), both through
// `include!` into a module whose parent has `Cidr`, `DenyClass`, `IpAddr` and `Ipv4Addr` in
// scope.

use super::*;

const TABLE: &[(&str, DenyClass)] = &[
    ("169.254.169.254/32", DenyClass::Platform),
    ("100.100.100.200/32", DenyClass::Platform),
    ("168.63.129.16/32", DenyClass::Platform),
    ("fd00:ec2::254/128", DenyClass::Platform),
    ("255.255.255.255/32", DenyClass::Multicast),
    ("0.0.0.0/8", DenyClass::SpecialPurpose),
    ("10.0.0.0/8", DenyClass::Private),
    ("100.64.0.0/10", DenyClass::SharedAddressSpace),
    ("127.0.0.0/8", DenyClass::Loopback),
    ("169.254.0.0/16", DenyClass::LinkLocal),
    ("172.16.0.0/12", DenyClass::Private),
    ("192.0.0.0/24", DenyClass::SpecialPurpose),
    ("192.0.2.0/24", DenyClass::Documentation),
    ("192.31.196.0/24", DenyClass::SpecialPurpose),
    ("192.52.193.0/24", DenyClass::SpecialPurpose),
    ("192.88.99.0/24", DenyClass::SpecialPurpose),
    ("192.168.0.0/16", DenyClass::Private),
    ("192.175.48.0/24", DenyClass::SpecialPurpose),
    ("198.18.0.0/15", DenyClass::SpecialPurpose),
    ("198.51.100.0/24", DenyClass::Documentation),
    ("203.0.113.0/24", DenyClass::Documentation),
    ("224.0.0.0/4", DenyClass::Multicast),
    ("240.0.0.0/4", DenyClass::SpecialPurpose),
    ("::1/128", DenyClass::Loopback),
    ("::/8", DenyClass::SpecialPurpose),
    ("100::/64", DenyClass::SpecialPurpose),
    ("2001:db8::/32", DenyClass::Documentation),
    ("2001::/23", DenyClass::SpecialPurpose),
    ("3fff::/20", DenyClass::Documentation),
    ("5f00::/16", DenyClass::SpecialPurpose),
    ("fc00::/7", DenyClass::Private),
    ("fe80::/10", DenyClass::LinkLocal),
    ("ff00::/8", DenyClass::Multicast),
];

pub(super) fn prefixes() -> Vec<(Cidr, DenyClass)> {
    let mut all: Vec<(Cidr, DenyClass)> = TABLE
        .iter()
        .map(|(text, class)| (text.parse().unwrap(), *class))
        .collect();
    all.push(("64:ff9b::/96".parse().unwrap(), DenyClass::Private));
    all.push(("2002::/16".parse().unwrap(), DenyClass::Private));
    all.push(("2000::/3".parse().unwrap(), DenyClass::Private));
    all
}

fn bit_string(address: IpAddr) -> String {
    match address {
        IpAddr::V4(a) => format!("{:032b}", u32::from(a)),
        IpAddr::V6(a) => format!("{:0128b}", u128::from(a)),
    }
}

fn in_prefix(address: IpAddr, prefix: &str) -> bool {
    let cidr: Cidr = prefix.parse().unwrap();
    address.is_ipv4() == cidr.network.is_ipv4()
        && bit_string(address)[..usize::from(cidr.prefix_len)]
            == bit_string(cidr.network)[..usize::from(cidr.prefix_len)]
}

pub(super) fn class(address: IpAddr) -> Option<DenyClass> {
    let bits = bit_string(address);
    // Translation prefixes: judge the embedded IPv4 address.
    if in_prefix(address, "64:ff9b::/96") {
        return class(IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(&bits[96..], 2).unwrap(),
        )));
    }
    if in_prefix(address, "2002::/16") {
        return class(IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(&bits[16..48], 2).unwrap(),
        )));
    }
    // The table is ordered most specific first where prefixes nest.
    for (prefix, class) in TABLE {
        if in_prefix(address, prefix) {
            return Some(*class);
        }
    }
    if address.is_ipv4() {
        return None;
    }
    if in_prefix(address, "2000::/3") {
        None
    } else {
        Some(DenyClass::SpecialPurpose)
    }
}
