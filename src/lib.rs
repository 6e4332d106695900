//! webnic native client: a [`webnic_stack::Stack`] driven by tokio over a WebTransport session.
//!
//! [`Client::connect`] opens a session to a webnic gateway, learns its address, MTU and
//! resolvers from the control stream, and starts three tasks: a datagram reader that feeds the
//! stack, a driver that polls it and sends its packets as datagrams (waiting for QUIC's send
//! buffer, so TCP sees backpressure rather than loss), and a control-stream reader. Sockets
//! ([`TcpStream`], [`TcpListener`], [`UdpSocket`]) share the stack behind a mutex and are woken by
//! the stack's events.
//!
//! [`RawSession`] is the same session without the stack: the caller's own TCP/IP stack sends and
//! receives the IP packets, e.g. a guest behind a TAP device ([`tap`], Linux) through
//! webnic-stack's Ethernet adapter.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! let options = webnic::ConnectOptions::new("https://gateway.example:4433/webnic");
//! let client = webnic::Client::connect(options).await?;
//! let mut stream = client.tcp_connect_host("example.com", 80).await?;
//! stream.write_all(b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n").await?;
//! let mut reply = Vec::new();
//! stream.read_to_end(&mut reply).await?;
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod driver;
mod raw;
mod session;
mod sockets;
pub mod socks5;
#[cfg(target_os = "linux")]
pub mod tap;

pub use raw::RawSession;
pub use session::{Client, ClientStats, ConnectOptions, QuicPathStats, SessionError};
pub use sockets::{TcpListener, TcpStream, UdpSocket};
pub use webnic_stack::{DnsKind, TcpOptions};
