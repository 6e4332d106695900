//! webnic in the browser: the [`webnic_stack`] core compiled to wasm and driven over the page's
//! own WebTransport session to a webnic gateway.
//!
//! The layers, bottom up:
//! - the session (`session`): `new WebTransport(url)`, the control-stream handshake
//!   (`CLIENT_HELLO` → `ADDRESS_ASSIGN`), then datagrams carry one IP packet each;
//! - the driver (`driver`): a datagram reader that never stops, and one task that polls the
//!   stack, writes its packets as datagrams and sleeps until a packet, a socket call or the
//!   stack's `poll_timeout` (a `setTimeout`); time is `performance.now()`, the seed comes from
//!   `crypto.getRandomValues`;
//! - the exports (`Nic`): handle-based TCP calls that return Promises. The hand-written ESM
//!   wrapper `js/webnic.js` turns them into the Direct Sockets shape (`TCPSocket` with WHATWG
//!   streams).
//! - for emulators (`ethernet`): `connectRaw` opens a session in raw-packet mode (`RawNic`:
//!   the page sends and receives IP packets) and `EthernetAdapter` turns a guest's Ethernet
//!   frames into those packets and back; `js/v86.js` plugs both into v86.
//!
//! Everything is `wasm32`-only; on other targets this crate is empty so the native workspace
//! builds and tests without web-sys.
#![warn(missing_docs)]

#[cfg(target_arch = "wasm32")]
mod driver;
#[cfg(target_arch = "wasm32")]
mod ethernet;
#[cfg(target_arch = "wasm32")]
mod nic;
#[cfg(target_arch = "wasm32")]
mod session;

#[cfg(target_arch = "wasm32")]
pub use ethernet::{EthernetAdapter, RawNic, connect_raw};
#[cfg(target_arch = "wasm32")]
pub use nic::{Nic, connect};
#[cfg(target_arch = "wasm32")]
pub use session::SessionError;
