//! webnic-gateway: terminates webnic WebTransport sessions and forwards their IP packets
//! through a TUN device.
//!
//! # Layers
//!
//! - Sans-IO core, unit-tested on byte arrays: [`packet`] (classification of client packets,
//!   TCP MSS clamping, ICMP "fragmentation needed" and "administratively prohibited"), [`policy`]
//!   (the default-deny egress policy and the ICMP token bucket), [`pool`] (client addresses), [`queue`]
//!   (per-session drop-oldest queues and the route table), [`origin`] (the Origin allow-list),
//!   [`token`] (signed session tokens), [`admission`] (session caps and the new-session rate),
//!   [`quota`] (per-session flow, packet, byte and ICMP echo quotas), [`config`].
//! - System glue: [`tun_device`] (TUN, routes, forwarding sysctls), [`nat`] (nftables),
//!   [`sys`] (commands and sysctls), [`metrics`] (counters and the Prometheus endpoint),
//!   [`abuse_log`] (JSON lines: session → client → token subject → flows).
//! - Drivers: [`session`] (one task per WebTransport session) and [`server`] (setup, accept
//!   loop, TUN reader, shutdown).
//!
//! # Data path
//!
//! Client → Internet: WebTransport datagram → [`packet::classify_from_client`] (well-formed,
//! source is the session's address, no options/fragments/extension headers, TCP/UDP/ICMP only)
//! → [`policy::EgressPolicy::check`] (refused: ICMP "administratively prohibited" back to the
//! session's queue, rate-limited) → the token's scope ([`token::Token::allows`]) →
//! [`quota::SessionQuota::check`] (new flows go to the abuse log) → [`packet::clamp_tcp_mss`] →
//! TUN write → kernel routing (and NAT with `--nat`).
//!
//! Internet → client: TUN read → [`packet::clamp_tcp_mss`] → [`queue::RouteTable`] lookup by
//! destination → link-MTU check → [`queue::SessionQueue`] (drop-oldest) → the session's sender
//! (bytes-per-second quota) → `send_datagram_wait` (QUIC backpressure).
#![warn(missing_docs)]

pub mod abuse_log;
pub mod admission;
pub mod config;
pub mod congestion;
pub mod conntrack;
pub mod demo;
pub mod lease;
pub mod metrics;
pub mod nat;
pub mod offload;
pub mod origin;
pub mod packet;
pub mod policy;
pub mod pool;
pub mod queue;
pub mod quota;
pub mod server;
pub mod session;
pub mod sys;
pub mod token;
pub mod tun_device;
pub mod udp_socket;
