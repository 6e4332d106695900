//! Socket types over the shared stack, woken by the stack's events.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use webnic_stack::{ListenerHandle, TcpError, TcpHandle, UdpError, UdpHandle};

use crate::driver::{Core, Interest};
use crate::session::connect_error_to_io;

/// A TCP connection through the tunnel. Reading and writing follow tokio's
/// [`AsyncRead`]/[`AsyncWrite`]; `shutdown` sends FIN and keeps the read half open. Dropping it
/// closes the connection gracefully.
#[derive(Debug)]
pub struct TcpStream {
    core: Arc<Core>,
    handle: TcpHandle,
}

impl TcpStream {
    pub(crate) fn new(core: Arc<Core>, handle: TcpHandle) -> Self {
        Self { core, handle }
    }

    fn endpoints(&self) -> (SocketAddr, SocketAddr) {
        let unknown = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        self.core
            .lock()
            .stack
            .tcp_endpoints(self.handle)
            .unwrap_or((unknown, unknown))
    }

    /// The local address (the session's address and an ephemeral port).
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoints().0
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.endpoints().1
    }

    /// Resets the connection (RST) instead of closing it gracefully.
    pub fn abort(self) {
        self.core.lock().stack.tcp_abort(self.handle);
        self.core.poke.notify_one();
        // Drop would release again; releasing an aborted handle is a no-op.
    }
}

impl AsyncRead for TcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut shared = self.core.lock();
        match shared
            .stack
            .tcp_recv(self.handle, buf.initialize_unfilled())
        {
            Ok(n) => {
                buf.advance(n);
                drop(shared);
                // Reading opened the window; the driver may need to announce it.
                self.core.poke.notify_one();
                Poll::Ready(Ok(()))
            }
            Err(TcpError::WouldBlock) => {
                if let Err(error) = shared.check_open() {
                    return Poll::Ready(Err(error));
                }
                shared.park(Interest::TcpRead(self.handle), cx.waker());
                Poll::Pending
            }
            Err(error) => Poll::Ready(Err(connect_error_to_io(&error))),
        }
    }
}

impl AsyncWrite for TcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = self.core.lock();
        if let Err(error) = shared.check_open() {
            return Poll::Ready(Err(error));
        }
        match shared.stack.tcp_send(self.handle, data) {
            Ok(n) => {
                drop(shared);
                self.core.poke.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(TcpError::WouldBlock) => {
                shared.park(Interest::TcpWrite(self.handle), cx.waker());
                Poll::Pending
            }
            Err(error) => Poll::Ready(Err(connect_error_to_io(&error))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Bytes written are in the stack's send buffer, which the driver empties on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = self.core.lock().stack.tcp_shutdown(self.handle);
        self.core.poke.notify_one();
        Poll::Ready(result.map_err(|e| connect_error_to_io(&e)))
    }
}

impl Drop for TcpStream {
    fn drop(&mut self) {
        let mut shared = self.core.lock();
        shared.waiters.forget_tcp(self.handle);
        shared.stack.tcp_release(self.handle);
        drop(shared);
        self.core.poke.notify_one();
    }
}

/// A TCP listener on the session's address.
#[derive(Debug)]
pub struct TcpListener {
    core: Arc<Core>,
    handle: ListenerHandle,
    local: SocketAddr,
}

impl TcpListener {
    pub(crate) fn new(core: Arc<Core>, handle: ListenerHandle, ip: IpAddr, port: u16) -> Self {
        Self {
            core,
            handle,
            local: SocketAddr::new(ip, port),
        }
    }

    /// Waits for the next established connection.
    ///
    /// # Errors
    /// The session's error once it is closed.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (handle, remote) = poll_fn(|cx| {
            let mut shared = self.core.lock();
            if let Some(accepted) = shared.stack.tcp_accept(self.handle) {
                return Poll::Ready(Ok(accepted));
            }
            if let Err(error) = shared.check_open() {
                return Poll::Ready(Err(error));
            }
            shared.park(Interest::Accept(self.handle), cx.waker());
            Poll::Pending
        })
        .await?;
        // Accepting frees a backlog slot: the driver re-arms a listening socket.
        self.core.poke.notify_one();
        Ok((TcpStream::new(self.core.clone(), handle), remote))
    }

    /// The address connections arrive at.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for TcpListener {
    fn drop(&mut self) {
        let mut shared = self.core.lock();
        shared.forget(Interest::Accept(self.handle));
        shared.stack.tcp_close_listener(self.handle);
        drop(shared);
        self.core.poke.notify_one();
    }
}

/// A UDP socket on the session's address.
#[derive(Debug)]
pub struct UdpSocket {
    core: Arc<Core>,
    handle: UdpHandle,
    local: SocketAddr,
}

impl UdpSocket {
    pub(crate) fn new(core: Arc<Core>, handle: UdpHandle, ip: IpAddr, port: u16) -> Self {
        Self {
            core,
            handle,
            local: SocketAddr::new(ip, port),
        }
    }

    /// Sends one datagram, waiting while the send queue is full.
    ///
    /// # Errors
    /// `InvalidInput` for a datagram that can never fit, `NetworkUnreachable` for a destination
    /// of a family the session lacks, or the session's error.
    pub async fn send_to(&self, data: &[u8], target: SocketAddr) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut shared = self.core.lock();
            shared.check_open()?;
            match shared.stack.udp_send_to(self.handle, data, target) {
                Ok(()) => Poll::Ready(Ok(data.len())),
                Err(UdpError::WouldBlock) => {
                    shared.park(Interest::UdpWrite(self.handle), cx.waker());
                    Poll::Pending
                }
                Err(error) => Poll::Ready(Err(udp_error_to_io(error))),
            }
        })
        .await
        .inspect(|_| self.core.poke.notify_one())
    }

    /// Receives one datagram: its length and sender.
    ///
    /// # Errors
    /// `InvalidInput` when `buf` is smaller than the datagram (which stays queued), or the
    /// session's error.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        poll_fn(|cx| {
            let mut shared = self.core.lock();
            match shared.stack.udp_recv_from(self.handle, buf) {
                Ok(received) => Poll::Ready(Ok(received)),
                Err(UdpError::WouldBlock) => {
                    shared.check_open()?;
                    shared.park(Interest::UdpRead(self.handle), cx.waker());
                    Poll::Pending
                }
                Err(error) => Poll::Ready(Err(udp_error_to_io(error))),
            }
        })
        .await
    }

    /// The local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for UdpSocket {
    fn drop(&mut self) {
        let mut shared = self.core.lock();
        shared.forget(Interest::UdpRead(self.handle));
        shared.forget(Interest::UdpWrite(self.handle));
        shared.stack.udp_close(self.handle);
    }
}

fn udp_error_to_io(error: UdpError) -> io::Error {
    let kind = match error {
        UdpError::WouldBlock => io::ErrorKind::WouldBlock,
        UdpError::InvalidHandle | UdpError::NotConnected => io::ErrorKind::NotConnected,
        UdpError::AddrInUse(_) => io::ErrorKind::AddrInUse,
        UdpError::NoFreePort => io::ErrorKind::AddrNotAvailable,
        UdpError::Unaddressable(_) => io::ErrorKind::NetworkUnreachable,
        UdpError::TooLarge(_) | UdpError::Truncated { .. } => io::ErrorKind::InvalidInput,
    };
    io::Error::new(kind, error)
}
