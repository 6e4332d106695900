//! Raw-packet mode: a session whose IP packets go to and come from the caller, with no local
//! stack in between.
//!
//! A [`Client`](crate::Client) terminates TCP and UDP itself. An emulator, a TAP device or a
//! VPN-style program already has a TCP/IP stack and wants the session's packets as they are:
//! [`RawSession`] hands them over one per [`recv`](RawSession::recv) and takes them with
//! [`send`](RawSession::send). The gateway treats them like any other: the source must be the
//! session's address and the egress policy applies.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use webnic_stack::protocol::{CloseCode, ControlMessage, datagram_header};

use crate::session::{ConnectOptions, Handshake, SessionError, close_reason, handshake};

/// A session in raw-packet mode: the caller's own stack sends and receives IP packets.
///
/// Cloning is cheap; the session ends when [`RawSession::close`] is called, the gateway ends
/// it, or the last clone is dropped.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// let options = webnic::ConnectOptions::new("https://gateway.example:4433/webnic");
/// let session = webnic::RawSession::connect(options).await?;
/// println!("our address: {:?}", session.ipv4());
/// let packet = session.recv().await?; // an IPv4 or IPv6 packet for that address
/// session.send(&packet).await?; // e.g. a reply with the session's source address
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RawSession {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connection: wtransport::Connection,
    header: [u8; 8],
    header_len: usize,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    mtu: u16,
    dns_servers: Vec<IpAddr>,
    closed: Arc<Mutex<Option<SessionError>>>,
    control: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.connection.close(
            wtransport::VarInt::from_u32(CloseCode::Normal.to_u32()),
            b"client dropped",
        );
        self.control.abort();
    }
}

impl RawSession {
    /// Opens a session and returns once the gateway has assigned its addresses.
    ///
    /// Link repair (PROTOCOL.md §3.1) and the stream link (§3.2) are never asked for: repair's
    /// frames would reach the packet consumer (a TAP device, an emulator) as garbage, and this
    /// session reads datagrams only, so `options.link_repair` and `options.link_stream` are
    /// ignored.
    ///
    /// # Errors
    /// As [`Client::connect`](crate::Client::connect).
    pub async fn connect(options: ConnectOptions) -> io::Result<Self> {
        let options = options.link_repair(false).link_stream(false);
        let Handshake {
            endpoint,
            connection,
            send,
            recv,
            decoder,
            announced,
        } = handshake(&options, None).await.map_err(|e| e.to_io())?;
        let (header, header_len) = datagram_header(connection.session_id().into_u64());
        let closed = Arc::new(Mutex::new(None));
        let control = tokio::spawn(follow_control(
            connection.clone(),
            closed.clone(),
            recv,
            decoder,
            send,
            endpoint,
        ));
        tracing::info!(ipv4 = ?announced.ipv4, ipv6 = ?announced.ipv6, "raw session configured");
        Ok(Self {
            inner: Arc::new(Inner {
                connection,
                header,
                header_len,
                ipv4: announced.ipv4,
                ipv6: announced.ipv6,
                mtu: announced.mtu.unwrap_or(1152),
                dns_servers: announced.dns,
                closed,
                control,
            }),
        })
    }

    /// The session's IPv4 address: the only source the gateway accepts for IPv4.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.inner.ipv4
    }

    /// The session's IPv6 address, if the gateway offers IPv6.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.inner.ipv6
    }

    /// The link MTU the gateway announced: the largest packet to send.
    pub fn mtu(&self) -> u16 {
        self.inner.mtu
    }

    /// The resolvers the gateway announced.
    pub fn dns_servers(&self) -> &[IpAddr] {
        &self.inner.dns_servers
    }

    /// The largest datagram payload the QUIC path takes right now.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.inner.connection.max_datagram_size()
    }

    /// The next IP packet from the gateway. Call it from one task only (datagrams arrive
    /// through one queue).
    ///
    /// # Errors
    /// The session's error once it has ended.
    pub async fn recv(&self) -> io::Result<Bytes> {
        match self.inner.connection.receive_datagram().await {
            Ok(datagram) => Ok(datagram.payload()),
            Err(error) => Err(self.end(SessionError::Lost(error.to_string())).to_io()),
        }
    }

    /// Sends one IP packet, waiting while QUIC's send buffer is full (backpressure, not loss).
    ///
    /// # Errors
    /// `InvalidInput` when the packet is larger than the path allows (it is not sent), or the
    /// session's error once it has ended.
    pub async fn send(&self, packet: &[u8]) -> io::Result<()> {
        let inner = &self.inner;
        let mut datagram = BytesMut::with_capacity(inner.header_len + packet.len());
        datagram.put_slice(&inner.header[..inner.header_len]);
        datagram.put_slice(packet);
        let quic = inner.connection.quic_connection();
        match quic.send_datagram_wait(datagram.freeze()).await {
            Ok(()) => Ok(()),
            Err(wtransport::quinn::SendDatagramError::TooLarge) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "packet of {} bytes is larger than the path allows",
                    packet.len()
                ),
            )),
            Err(other) => Err(self.end(SessionError::Lost(other.to_string())).to_io()),
        }
    }

    /// Ends the session: the gateway frees the address.
    pub fn close(&self) {
        self.end(SessionError::ClosedLocally);
        self.inner.connection.close(
            wtransport::VarInt::from_u32(CloseCode::Normal.to_u32()),
            b"client closed",
        );
    }

    /// Waits until the session ends and says why.
    pub async fn closed(&self) -> SessionError {
        let error = self.inner.connection.closed().await;
        self.end(close_reason(&error).unwrap_or(SessionError::Lost(error.to_string())))
    }

    /// Records the first reason the session ended and returns the recorded one.
    fn end(&self, error: SessionError) -> SessionError {
        let mut closed = self.inner.closed.lock().unwrap_or_else(|e| e.into_inner());
        closed.get_or_insert(error).clone()
    }
}

/// Reads the control stream after the handshake, for the gateway's close reason; holds the
/// stream's send half and the endpoint, which must live as long as the session.
async fn follow_control(
    connection: wtransport::Connection,
    closed: Arc<Mutex<Option<SessionError>>>,
    mut recv: wtransport::RecvStream,
    mut decoder: webnic_stack::protocol::CapsuleDecoder,
    _send: wtransport::SendStream,
    _endpoint: wtransport::Endpoint<wtransport::endpoint::endpoint_side::Client>,
) {
    let mut buf = [0u8; 4096];
    loop {
        while let Ok(Some(message)) = decoder.next_message() {
            if let ControlMessage::Close { code, reason } = message {
                tracing::info!(%code, %reason, "gateway is closing the session");
                closed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(SessionError::Closed { code, reason });
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.extend(&buf[..n]),
            Ok(None) | Err(_) => break,
        }
    }
    let error = connection.closed().await;
    let reason = close_reason(&error).unwrap_or_else(|| SessionError::Lost(error.to_string()));
    closed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert(reason);
}
