//! Who waits for what: routes the stack's [`Event`]s to parked async tasks.
//!
//! Both drivers (the tokio client and the browser client) park futures on a socket's readiness
//! and wake them when [`Stack::poll_event`](crate::Stack::poll_event) reports it. That mapping
//! is protocol logic, not I/O, so it lives here once; `std::task::Waker` works on wasm32 too.

use std::collections::HashMap;
use std::task::Waker;

use crate::{ConnectError, DnsHandle, Event, ListenerHandle, TcpHandle, UdpHandle};

/// What a parked future waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interest {
    /// An outgoing connection is established or failed.
    TcpConnect(TcpHandle),
    /// A connection has data, EOF, or an error to read.
    TcpRead(TcpHandle),
    /// A connection's send buffer has room (or the connection died).
    TcpWrite(TcpHandle),
    /// A listener's accept queue got a connection.
    Accept(ListenerHandle),
    /// A UDP socket has a datagram.
    UdpRead(UdpHandle),
    /// A UDP socket's send queue has room.
    UdpWrite(UdpHandle),
    /// A DNS lookup finished.
    Dns(DnsHandle),
    /// Only the session's end wakes it (see [`Waiters::wake_all`]).
    Closed,
}

/// Parked wakers by interest, and connection outcomes until their connecting future takes them.
#[derive(Debug, Default)]
pub struct Waiters {
    wakers: HashMap<Interest, Waker>,
    connect_results: HashMap<TcpHandle, Result<(), ConnectError>>,
}

impl Waiters {
    /// No one waiting.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parks `waker` until `interest` happens (replacing an earlier waker for it).
    pub fn park(&mut self, interest: Interest, waker: &Waker) {
        match self.wakers.get_mut(&interest) {
            Some(existing) => existing.clone_from(waker),
            None => {
                self.wakers.insert(interest, waker.clone());
            }
        }
    }

    /// Drops the waker parked for `interest`, if any.
    pub fn forget(&mut self, interest: Interest) {
        self.wakers.remove(&interest);
    }

    /// Wakes whoever waits for `interest`.
    pub fn wake(&mut self, interest: Interest) {
        if let Some(waker) = self.wakers.remove(&interest) {
            waker.wake();
        }
    }

    /// Wakes everyone: the session ended and every operation must now fail.
    pub fn wake_all(&mut self) {
        for (_, waker) in self.wakers.drain() {
            waker.wake();
        }
    }

    /// The outcome of a connection attempt, once; `None` while it is still pending.
    pub fn take_connect_result(&mut self, handle: TcpHandle) -> Option<Result<(), ConnectError>> {
        self.connect_results.remove(&handle)
    }

    /// Forgets everything about a connection whose handle is being released.
    pub fn forget_tcp(&mut self, handle: TcpHandle) {
        self.forget(Interest::TcpRead(handle));
        self.forget(Interest::TcpWrite(handle));
        self.forget(Interest::TcpConnect(handle));
        self.connect_results.remove(&handle);
    }

    /// Wakes the futures `event` concerns.
    pub fn dispatch(&mut self, event: Event) {
        match event {
            Event::TcpConnected(h) => {
                self.connect_results.insert(h, Ok(()));
                self.wake(Interest::TcpConnect(h));
            }
            Event::TcpConnectFailed(h, error) => {
                self.connect_results.insert(h, Err(error));
                self.wake_tcp(h);
            }
            Event::TcpReadable(h) => self.wake(Interest::TcpRead(h)),
            Event::TcpWritable(h) => self.wake(Interest::TcpWrite(h)),
            Event::TcpReset(h) | Event::TcpClosed(h) => self.wake_tcp(h),
            Event::Accept(l) => self.wake(Interest::Accept(l)),
            Event::UdpReadable(u) => self.wake(Interest::UdpRead(u)),
            Event::UdpWritable(u) => self.wake(Interest::UdpWrite(u)),
            Event::DnsDone(d) => self.wake(Interest::Dns(d)),
        }
    }

    fn wake_tcp(&mut self, handle: TcpHandle) {
        self.wake(Interest::TcpConnect(handle));
        self.wake(Interest::TcpRead(handle));
        self.wake(Interest::TcpWrite(handle));
    }
}
