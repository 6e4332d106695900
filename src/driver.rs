//! The state shared by the client's tasks and sockets, and the task that drives the stack.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::{BufMut, BytesMut};
use futures_util::FutureExt as _;
use tokio::sync::Notify;
use webnic_stack::link_stream::put_frame;
use webnic_stack::protocol::{datagram_header, get_varint};
use webnic_stack::waiters::Waiters;
use webnic_stack::{Instant, Stack};

use crate::session::SessionError;

pub(crate) use webnic_stack::waiters::Interest;

/// Everything behind the mutex.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) stack: Stack,
    /// Parked futures and connection outcomes.
    pub(crate) waiters: Waiters,
    /// Set once the session is gone; every operation fails with it from then on.
    pub(crate) closed: Option<SessionError>,
}

impl Shared {
    pub(crate) fn new(stack: Stack) -> Self {
        Self {
            stack,
            waiters: Waiters::new(),
            closed: None,
        }
    }

    pub(crate) fn park(&mut self, interest: Interest, waker: &Waker) {
        self.waiters.park(interest, waker);
    }

    pub(crate) fn forget(&mut self, interest: Interest) {
        self.waiters.forget(interest);
    }

    /// The error every operation returns once the session is closed.
    pub(crate) fn check_open(&self) -> io::Result<()> {
        match &self.closed {
            None => Ok(()),
            Some(error) => Err(error.to_io()),
        }
    }

    pub(crate) fn close(&mut self, error: SessionError) {
        if self.closed.is_none() {
            self.closed = Some(error);
        }
        self.waiters.wake_all();
    }

    /// Whether the session is over (not merely between two connections).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_some()
    }
}

/// The part of the client every socket holds.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) shared: Mutex<Shared>,
    /// Wakes the driver after a socket call changed the stack.
    pub(crate) poke: Notify,
    /// The current QUIC connection; replaced when the session resumes on a new one.
    connection: Mutex<wtransport::Connection>,
    /// Woken when the session ends for good.
    pub(crate) ended: Notify,
    /// Connections the session resumed on after losing one.
    pub(crate) reconnects: std::sync::atomic::AtomicU64,
    /// The gateway announced it is draining.
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// The uplink stream (PROTOCOL.md §3.2) opened on the connection of this resume count, for
    /// the driver to take.
    pub(crate) uplink: Mutex<Option<(u64, wtransport::SendStream)>>,
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
            connection: Mutex::new(connection),
            ended: Notify::new(),
            reconnects: std::sync::atomic::AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            uplink: Mutex::new(None),
            epoch,
        }
    }

    /// The current connection (a cheap handle).
    pub(crate) fn connection(&self) -> wtransport::Connection {
        self.connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Moves the session onto `connection` after a resumption.
    pub(crate) fn replace_connection(&self, connection: wtransport::Connection) {
        *self
            .connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = connection;
        // The new connection's gateway task numbers its datagrams afresh.
        self.lock().stack.reset_link();
        self.reconnects
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        self.poke.notify_one();
    }

    /// Ends the session for good with `error`, waking everything that waits on it.
    pub(crate) fn end(&self, error: SessionError) {
        self.lock().close(error);
        self.poke.notify_one();
        self.ended.notify_waiters();
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

/// Most datagrams queued into the stack under one lock before the driver polls it. Below the
/// stack's receive queue (1,024) and its ingress budget (256), so none is dropped for room.
const RX_BATCH: usize = 128;

/// Reads datagrams of `connection` into the stack until that connection ends (the session's
/// supervisor decides whether the session ends with it).
///
/// Datagrams are read from quinn's own queue rather than through wtransport's
/// `receive_datagram`: wtransport moves each datagram from its worker task to the reader through
/// a capacity-1 channel, a task switch per packet, and a burst arrives one datagram per wake-up.
/// Read directly, every datagram already queued is taken at once (`now_or_never`) under one lock,
/// so the stack runs once per burst and TCP acknowledges the burst with one ACK instead of one
/// per packet or two; the sockets waiting on the burst are woken from here. wtransport's worker
/// still reads quinn's queue too and may take a datagram now and then: its `receive_datagram` is
/// polled alongside, so none is lost.
pub(crate) async fn read_datagrams(core: Arc<Core>, connection: wtransport::Connection) {
    let quic = connection.quic_connection().clone();
    let quarter_id = connection.session_id().into_u64() / 4;
    loop {
        // wtransport's channel first: a datagram its worker took is older than what is still in
        // quinn's queue, and handing it over late would reorder the flow (the sender counts
        // reordering as loss: +14% retransmissions in a download when quinn's queue came first).
        let first = tokio::select! {
            biased;
            datagram = connection.receive_datagram() => match datagram {
                Ok(datagram) => Incoming::WebTransport(datagram),
                Err(_) => return,
            },
            datagram = quic.read_datagram() => match datagram {
                Ok(datagram) => Incoming::Quic(datagram),
                Err(_) => return,
            },
        };
        {
            let mut shared = core.lock();
            let now = core.now();
            deliver(&mut shared.stack, now, quarter_id, &first);
            for _ in 1..RX_BATCH {
                let next = match connection.receive_datagram().now_or_never() {
                    Some(Ok(datagram)) => Incoming::WebTransport(datagram),
                    Some(Err(_)) => break,
                    None => match quic.read_datagram().now_or_never() {
                        Some(Ok(datagram)) => Incoming::Quic(datagram),
                        _ => break,
                    },
                };
                deliver(&mut shared.stack, now, quarter_id, &next);
            }
            // Process the burst here and wake the sockets it completes, rather than waiting for
            // the driver task to be scheduled: a reply reaches its reader one task switch
            // sooner. What the stack wants to send (ACKs) stays queued for the driver.
            shared.stack.poll(now);
            while let Some(event) = shared.stack.poll_event() {
                shared.waiters.dispatch(event);
            }
        }
        core.poke.notify_one();
    }
}

/// Reads the stream link (PROTOCOL.md §3.2): waits for the gateway's stream, then hands what it
/// carries to the stack chunk by chunk until the connection ends. One read brings many packets
/// (or one coalesced TCP packet of up to 64 KiB), where datagrams take one read each.
pub(crate) async fn read_link_stream(core: Arc<Core>, connection: wtransport::Connection) {
    let Ok(mut stream) = connection.accept_uni().await else {
        return;
    };
    // A gateway that granted the stream link reads an uplink stream too: open it for the driver,
    // which moves the client's packets onto it.
    let generation = core.reconnects.load(std::sync::atomic::Ordering::Acquire);
    match connection.open_uni().await {
        Ok(opening) => match opening.await {
            Ok(uplink) => {
                *core
                    .uplink
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((generation, uplink));
                core.poke.notify_one();
            }
            Err(error) => tracing::debug!(%error, "no uplink stream; sending datagrams"),
        },
        Err(error) => tracing::debug!(%error, "no uplink stream; sending datagrams"),
    }
    // quinn's chunks as they are: no copy into a read buffer.
    while let Ok(Some(chunk)) = stream
        .quic_stream_mut()
        .read_chunk(LINK_STREAM_CHUNK, true)
        .await
    {
        {
            let mut shared = core.lock();
            let now = core.now();
            if let Err(error) = shared.stack.handle_link_stream(now, &chunk.bytes) {
                drop(shared);
                // No packet boundary to resynchronise on: the session cannot go on.
                core.end(SessionError::Protocol(format!("stream link: {error}")));
                return;
            }
            shared.stack.poll(now);
            while let Some(event) = shared.stack.poll_event() {
                shared.waiters.dispatch(event);
            }
        }
        core.poke.notify_one();
    }
}

/// The most the stream link's reader takes from quinn at once.
const LINK_STREAM_CHUNK: usize = 256 * 1024;

/// A datagram as read from quinn (with its HTTP/3 datagram header) or from wtransport (without).
enum Incoming {
    Quic(bytes::Bytes),
    WebTransport(wtransport::datagram::Datagram),
}

/// Queues the IP packet in `datagram` into the stack; datagrams of another session (none on a
/// webnic connection) or without a valid header are dropped.
fn deliver(stack: &mut Stack, now: Instant, quarter_id: u64, datagram: &Incoming) {
    let packet = match datagram {
        Incoming::WebTransport(datagram) => datagram.payload(),
        Incoming::Quic(bytes) => match get_varint(bytes) {
            Some((id, len)) if id == quarter_id => bytes.slice(len..),
            _ => {
                tracing::debug!(
                    len = bytes.len(),
                    "dropped a datagram without this session's header"
                );
                return;
            }
        },
    };
    if let Err(error) = stack.handle_datagram(now, &packet) {
        tracing::debug!(%error, "dropped a packet from the gateway");
    }
}

/// Polls the stack, sends its packets, and sleeps until the next packet, socket call or timer.
pub(crate) async fn drive(core: Arc<Core>) {
    let mut outgoing = Vec::new();
    let mut sent = Vec::new();
    // The connection and its datagram header change only when the session resumes on a new
    // connection; the resume count says when, without locking per round.
    let mut generation = u64::MAX;
    let mut cached_header = ([0u8; 8], 0);
    let mut quic = core.connection().quic_connection().clone();
    // The uplink stream of the current connection, once there is one, and its write buffer.
    let mut uplink: Option<wtransport::SendStream> = None;
    let mut framed = Vec::new();
    loop {
        let current = core.reconnects.load(std::sync::atomic::Ordering::Acquire);
        if current != generation {
            let connection = core.connection();
            cached_header = datagram_header(connection.session_id().into_u64());
            quic = connection.quic_connection().clone();
            generation = current;
            uplink = None;
        }
        if uplink.is_none() {
            let mut slot = core
                .uplink
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if slot.as_ref().is_some_and(|(at, _)| *at == generation) {
                uplink = slot.take().map(|(_, stream)| stream);
            }
        }
        let (header, header_len) = cached_header;
        let deadline = {
            let mut shared = core.lock();
            if shared.closed.is_some() {
                return;
            }
            // The buffers of the last burst go back under this lock, not one lock per packet.
            for packet in sent.drain(..) {
                shared.stack.recycle(packet);
            }
            let now = core.now();
            shared.stack.poll(now);
            while let Some(packet) = shared.stack.poll_transmit() {
                outgoing.push(packet);
            }
            while let Some(event) = shared.stack.poll_event() {
                shared.waiters.dispatch(event);
            }
            shared.stack.poll_timeout()
        };
        let sent_any = !outgoing.is_empty();
        if let Some(stream) = uplink.as_mut()
            && sent_any
        {
            // One write for the whole burst; waiting on it turns QUIC's flow control into TCP
            // backpressure, as waiting on the datagram queue does.
            for packet in outgoing.drain(..) {
                put_frame(&mut framed, &packet);
                sent.push(packet);
            }
            if let Err(error) = stream.write_all(&framed).await {
                // The connection is going away (the supervisor resumes or ends the session): the
                // burst is lost like on any broken link, and TCP resends it.
                tracing::debug!(%error, "uplink stream write failed; back to datagrams");
                uplink = None;
            }
            framed.clear();
            continue;
        }
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
                    // The connection is gone: the packet is lost like on any broken link (TCP
                    // resends it); the supervisor resumes the session or ends it.
                    other => {
                        tracing::debug!(error = %other, "connection gone; packet dropped");
                    }
                }
            }
            sent.push(packet);
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
