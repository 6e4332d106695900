//! webnic-stack: the sans-IO core of webnic.
//!
//! webnic gives a program (a web page, a worker, the native client) its own TCP/IP stack whose
//! IP packets travel as WebTransport datagrams to a gateway that puts them on a real network.
//! This crate is everything of that which needs no I/O, so the browser client (wasm32), the
//! native client and the gateway share it:
//!
//! - [`Stack`]: a TCP/UDP/DNS stack over smoltcp with a quinn-proto-style polling contract —
//!   the caller feeds packets and time in and takes packets and events out;
//! - [`protocol`]: the control-capsule codec and the datagram header of the webnic protocol;
//! - [`link_repair`]: sequence numbers, NACKs and resends that repair loss on the QUIC hop;
//! - [`ethernet`]: the Ethernet adapter that gives an emulated guest a NIC on a session (ARP,
//!   DHCPv4, IPv6 router advertisements).
//!
//! The data path: socket call → [`Stack::poll`] → [`Stack::poll_transmit`] → one datagram per IP
//! packet → gateway → TUN → server, and back through [`Stack::handle_packet`].
#![warn(missing_docs)]

mod device;
mod dhcp;
mod error;
pub mod ethernet;
pub mod link_repair;
pub mod link_stream;
pub mod protocol;
mod recv_window;
mod stack;
pub mod waiters;

pub use error::{ConnectError, DnsError, ListenError, PacketError, TcpError, UdpError};
pub use smoltcp::time::{Duration, Instant};
pub use stack::{
    Congestion, DnsHandle, DnsKind, Event, ListenerHandle, Stack, StackConfig, StackStats,
    TcpHandle, TcpOptions, UdpHandle, UdpOptions,
};
