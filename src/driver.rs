//! The state shared by the client's tasks and sockets, and the task that drives the stack.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::{BufMut, BytesMut};
use tokio::sync::Notify;
use webnic_stack::protocol::datagram_header;
use webnic_stack::{
    ConnectError, DnsHandle, Event, Instant, ListenerHandle, Stack, TcpHandle, UdpHandle,
};

use crate::session::SessionError;

/// What a parked future waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Interest {
    TcpConnect(TcpHandle),
    TcpRead(TcpHandle),
    TcpWrite(TcpHandle),
    Accept(ListenerHandle),
    UdpRead(UdpHandle),
    UdpWrite(UdpHandle),
    Dns(DnsHandle),
}

/// Everything behind the mutex.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) stack: Stack,
    wakers: HashMap<Interest, Waker>,
    /// Outcome of connection attempts, until the connecting future collects it.
    pub(crate) connect_results: HashMap<TcpHandle, Result<(), ConnectError>>,
    /// Set once the session is gone; every operation fails with it from then on.
    pub(crate) closed: Option<SessionError>,
}

impl Shared {
    pub(crate) fn new(stack: Stack) -> Self {
        Self {
            stack,
            wakers: HashMap::new(),
            connect_results: HashMap::new(),
            closed: None,
        }
    }

    pub(crate) fn park(&mut self, interest: Interest, waker: &Waker) {
        match self.wakers.get_mut(&interest) {
            Some(existing) if existing.will_wake(waker) => {}
            Some(existing) => existing.clone_from(waker),
            None => {
                self.wakers.insert(interest, waker.clone());
            }
        }
    }

    pub(crate) fn forget(&mut self, interest: Interest) {
        self.wakers.remove(&interest);
    }

    fn wake(&mut self, interest: Interest) {
        if let Some(waker) = self.wakers.remove(&interest) {
            waker.wake();
        }
    }

    /// The error every operation returns once the session is closed.
    pub(crate) fn check_open(&self) -> io::Result<()> {
        match &self.closed {
            None => Ok(()),
            Some(error) => Err(error.to_io()),
        }
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::TcpConnected(h) => {
                self.connect_results.insert(h, Ok(()));
                self.wake(Interest::TcpConnect(h));
            }
            Event::TcpConnectFailed(h, error) => {
                self.connect_results.insert(h, Err(error));
                self.wake(Interest::TcpConnect(h));
                self.wake(Interest::TcpRead(h));
                self.wake(Interest::TcpWrite(h));
            }
            Event::TcpReadable(h) => self.wake(Interest::TcpRead(h)),
            Event::TcpWritable(h) => self.wake(Interest::TcpWrite(h)),
            Event::TcpReset(h) | Event::TcpClosed(h) => {
                self.wake(Interest::TcpConnect(h));
                self.wake(Interest::TcpRead(h));
                self.wake(Interest::TcpWrite(h));
            }
            Event::Accept(l) => self.wake(Interest::Accept(l)),
            Event::UdpReadable(u) => self.wake(Interest::UdpRead(u)),
            Event::UdpWritable(u) => self.wake(Interest::UdpWrite(u)),
            Event::DnsDone(d) => self.wake(Interest::Dns(d)),
        }
    }

    pub(crate) fn close(&mut self, error: SessionError) {
        if self.closed.is_none() {
            self.closed = Some(error);
        }
        for (_, waker) in self.wakers.drain() {
            waker.wake();
        }
    }
}

/// The part of the client every socket holds.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) shared: Mutex<Shared>,
    /// Wakes the driver after a socket call changed the stack.
    pub(crate) poke: Notify,
    pub(crate) connection: wtransport::Connection,
    epoch: std::time::Instant,
}

impl Core {
    pub(crate) fn new(
        stack: Stack,
        connection: wtransport::Connection,
        epoch: std::time::Instant,
    ) -> Self {
        Self {
            shared: Mutex::new(Shared::new(stack)),
            poke: Notify::new(),
            connection,
            epoch,
        }
    }

    pub(crate) fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves the stack in an unknown state; propagating the
        // poison as a panic is the honest answer.
        self.shared.lock().expect("stack mutex poisoned")
    }
}

/// Reads datagrams into the stack until the session ends.
pub(crate) async fn read_datagrams(core: Arc<Core>) {
    loop {
        let datagram = match core.connection.receive_datagram().await {
            Ok(datagram) => datagram,
            Err(error) => {
                core.lock().close(SessionError::Lost(error.to_string()));
                core.poke.notify_one();
                return;
            }
        };
        {
            let mut shared = core.lock();
            let now = core.now();
            if let Err(error) = shared.stack.handle_packet(now, &datagram.payload()) {
                tracing::debug!(%error, "dropped a packet from the gateway");
            }
        }
        core.poke.notify_one();
    }
}

/// Polls the stack, sends its packets, and sleeps until the next packet, socket call or timer.
pub(crate) async fn drive(core: Arc<Core>) {
    let (header, header_len) = datagram_header(core.connection.session_id().into_u64());
    let quic = core.connection.quic_connection().clone();
    let mut outgoing = Vec::new();
    loop {
        let deadline = {
            let mut shared = core.lock();
            if shared.closed.is_some() {
                return;
            }
            let now = core.now();
            shared.stack.poll(now);
            while let Some(packet) = shared.stack.poll_transmit() {
                outgoing.push(packet);
            }
            while let Some(event) = shared.stack.poll_event() {
                shared.dispatch(event);
            }
            shared.stack.poll_timeout()
        };
        let sent_any = !outgoing.is_empty();
        for packet in outgoing.drain(..) {
            let mut datagram = BytesMut::with_capacity(header_len + packet.len());
            datagram.put_slice(&header[..header_len]);
            datagram.put_slice(&packet);
            // Waiting here (instead of wtransport's drop-oldest send) turns a full QUIC send
            // buffer into TCP backpressure.
            if let Err(error) = quic.send_datagram_wait(datagram.freeze()).await {
                match error {
                    wtransport::quinn::SendDatagramError::TooLarge => {
                        tracing::warn!(
                            len = packet.len(),
                            "packet larger than the path allows, dropped"
                        );
                    }
                    other => {
                        core.lock().close(SessionError::Lost(other.to_string()));
                        return;
                    }
                }
            }
            core.lock().stack.recycle(packet);
        }
        if sent_any {
            // Sending may have taken a while and the stack may have more to say.
            continue;
        }
        let sleep = async {
            match deadline {
                Some(at) => {
                    let now = core.now();
                    if at > now {
                        let wait = (at - now).micros();
                        tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = core.poke.notified() => {}
            () = sleep => {}
        }
    }
}
