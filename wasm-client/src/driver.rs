//! The state shared by the page's socket calls and the tasks that drive the stack.
//!
//! The page is single-threaded: state lives in a `RefCell`, and no borrow is held across an
//! `await`. Wakers of wasm-bindgen-futures only queue their task, so waking under a borrow is
//! safe.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::task::{Poll, Waker};

use js_sys::Uint8Array;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStreamDefaultReader, WebTransport, WritableStreamDefaultWriter};
use webnic_stack::link_stream::put_frame;
use webnic_stack::protocol::ControlMessage;
use webnic_stack::waiters::Waiters;
use webnic_stack::{Instant, Stack};

use crate::session::{Downlink, Opened, SessionError, close_reason, read_chunk};

#[wasm_bindgen]
extern "C" {
    // Globals of both Window and WorkerGlobalScope, so the driver runs in either.
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    pub(crate) fn performance_now() -> f64;
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues)]
    fn get_random_values(buf: &mut [u8]);
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(callback: &js_sys::Function, ms: f64) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(id: &JsValue);
}

// A macrotask boundary without `setTimeout`'s clamping: a MessageChannel round trip.
#[wasm_bindgen(
    inline_js = "const channel = new MessageChannel(); const waiting = []; \
    channel.port1.onmessage = () => waiting.shift()(); \
    export function next_task() { return new Promise((resolve) => { waiting.push(resolve); channel.port2.postMessage(0); }); }"
)]
extern "C" {
    fn next_task() -> js_sys::Promise;
}

/// 64 random bits from `crypto.getRandomValues`.
pub(crate) fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    get_random_values(&mut bytes);
    u64::from_le_bytes(bytes)
}

pub(crate) use webnic_stack::waiters::Interest;

/// Everything behind the `RefCell`.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) stack: Stack,
    /// Parked futures and connection outcomes.
    pub(crate) waiters: Waiters,
    /// Set once the session is gone; every operation fails with it from then on.
    pub(crate) closed: Option<SessionError>,
    /// The driver task, parked until a poke or its timer.
    driver_waker: Option<Waker>,
    poked: bool,
    /// The pending `setTimeout` and the stack time it fires at.
    timer: Option<(JsValue, Instant)>,
}

impl Shared {
    pub(crate) fn park(&mut self, interest: Interest, waker: &Waker) {
        self.waiters.park(interest, waker);
    }

    pub(crate) fn forget(&mut self, interest: Interest) {
        self.waiters.forget(interest);
    }

    /// Wakes whoever waits for `interest` (an event, or its socket was just closed).
    pub(crate) fn wake(&mut self, interest: Interest) {
        self.waiters.wake(interest);
    }

    pub(crate) fn close(&mut self, error: SessionError) {
        if self.closed.is_none() {
            self.closed = Some(error);
        }
        self.waiters.wake_all();
        self.poked = true;
        if let Some(waker) = self.driver_waker.take() {
            waker.wake();
        }
    }
}

/// The part of the session every socket call holds.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) shared: RefCell<Shared>,
    /// The current WebTransport session and its datagram writer; both replaced when the session
    /// resumes on a new connection.
    transport: RefCell<WebTransport>,
    datagram_writer: RefCell<WritableStreamDefaultWriter>,
    /// The uplink stream's writer (PROTOCOL.md §3.2) and the resume count of the connection it
    /// belongs to.
    uplink_writer: RefCell<Option<(u32, WritableStreamDefaultWriter)>>,
    /// Connections the session resumed on after losing one.
    pub(crate) reconnects: std::cell::Cell<u32>,
    /// `performance.now()` at stack creation, in ms.
    epoch: f64,
    /// Fires the driver's timer; holds only a weak reference, so the session can be dropped.
    on_timer: Closure<dyn FnMut()>,
    /// Swallows the rejections of datagram writes nobody awaits (they reject once the session
    /// is gone, which the session already reports).
    ignore_rejection: Closure<dyn FnMut(JsValue)>,
}

impl Core {
    pub(crate) fn new(
        stack: Stack,
        transport: WebTransport,
        datagram_writer: WritableStreamDefaultWriter,
        epoch: f64,
    ) -> Rc<Self> {
        Rc::new_cyclic(|weak: &Weak<Self>| {
            let weak = weak.clone();
            Self {
                shared: RefCell::new(Shared {
                    stack,
                    waiters: Waiters::new(),
                    closed: None,
                    driver_waker: None,
                    poked: false,
                    timer: None,
                }),
                transport: RefCell::new(transport),
                datagram_writer: RefCell::new(datagram_writer),
                uplink_writer: RefCell::new(None),
                reconnects: std::cell::Cell::new(0),
                epoch,
                on_timer: Closure::new(move || {
                    if let Some(core) = weak.upgrade() {
                        core.shared.borrow_mut().timer = None;
                        core.poke();
                    }
                }),
                ignore_rejection: Closure::new(|_: JsValue| {}),
            }
        })
    }

    /// The current WebTransport session.
    pub(crate) fn transport(&self) -> WebTransport {
        self.transport.borrow().clone()
    }

    /// Moves the session onto a new WebTransport session after a resumption.
    fn replace_transport(&self, transport: WebTransport, writer: WritableStreamDefaultWriter) {
        *self.transport.borrow_mut() = transport;
        *self.datagram_writer.borrow_mut() = writer;
        // The new connection's gateway task numbers its datagrams afresh.
        self.shared.borrow_mut().stack.reset_link();
        self.reconnects.set(self.reconnects.get() + 1);
        self.poke();
    }

    /// Whether the session is over (not merely between two connections).
    fn is_closed(&self) -> bool {
        self.shared.borrow().closed.is_some()
    }

    /// Stack time: ms since the session started, from `performance.now()`.
    pub(crate) fn now(&self) -> Instant {
        Instant::from_micros(((performance_now() - self.epoch) * 1000.0) as i64)
    }

    /// Wakes the driver after a socket call changed the stack.
    pub(crate) fn poke(&self) {
        let mut shared = self.shared.borrow_mut();
        shared.poked = true;
        if let Some(waker) = shared.driver_waker.take() {
            waker.wake();
        }
    }

    /// The error every operation returns once the session is closed.
    pub(crate) fn check_open(&self) -> Result<(), SessionError> {
        match &self.shared.borrow().closed {
            None => Ok(()),
            Some(error) => Err(error.clone()),
        }
    }

    /// Arms the timer for `at` unless an earlier one is pending.
    fn arm_timer(&self, at: Instant) {
        let mut shared = self.shared.borrow_mut();
        if let Some((id, pending_at)) = &shared.timer {
            if *pending_at <= at {
                return;
            }
            clear_timeout(id);
        }
        let delay_ms = (at - self.now().min(at)).micros() as f64 / 1000.0;
        let id = set_timeout(self.on_timer.as_ref().unchecked_ref(), delay_ms);
        shared.timer = Some((id, at));
    }

    /// Waits for a poke (socket call, packet, timer).
    async fn parked(&self) {
        std::future::poll_fn(|cx| {
            let mut shared = self.shared.borrow_mut();
            if shared.poked {
                shared.poked = false;
                return Poll::Ready(());
            }
            shared.driver_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }
}

/// Feeds one connection's datagrams into the stack until that connection ends (the supervisor
/// decides whether the session ends with it). It never pauses for the page: a stalled reader
/// makes Chromium drop datagrams.
pub(crate) async fn read_datagrams(core: Rc<Core>, reader: ReadableStreamDefaultReader) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok(Some(chunk)) = read_chunk(&reader).await else {
            return;
        };
        let len = chunk.length() as usize;
        if len > buf.len() {
            continue;
        }
        chunk.copy_to(&mut buf[..len]);
        {
            let mut shared = core.shared.borrow_mut();
            let now = core.now();
            // A malformed or unroutable packet is the gateway's or the peer's problem, not the
            // session's: the stack counts it and we carry on.
            let _ = shared.stack.handle_datagram(now, &buf[..len]);
        }
        core.poke();
    }
}

/// Reads the stream link (PROTOCOL.md §3.2): waits for the gateway's stream, then hands what it
/// carries to the stack chunk by chunk, until the connection ends. One read brings tens of
/// packets, where datagrams take one read each.
pub(crate) async fn read_link_stream(core: Rc<Core>, incoming: ReadableStreamDefaultReader) {
    let Ok(Some(stream)) = read_chunk(&incoming).await else {
        return;
    };
    let reader: ReadableStreamDefaultReader = stream
        .unchecked_into::<web_sys::ReadableStream>()
        .get_reader()
        .unchecked_into();
    // A gateway that granted the stream link reads an uplink stream too: open it for the
    // driver, which then writes the page's packets there instead of datagrams.
    let generation = core.reconnects.get();
    match JsFuture::from(core.transport().create_unidirectional_stream()).await {
        Ok(stream) => {
            let writer = stream
                .unchecked_into::<web_sys::WritableStream>()
                .get_writer();
            if let Ok(writer) = writer {
                *core.uplink_writer.borrow_mut() = Some((generation, writer));
                core.poke();
            }
        }
        Err(_) => {
            // Stay on datagrams.
        }
    }
    let mut buf = Vec::new();
    loop {
        let Ok(Some(chunk)) = read_chunk(&reader).await else {
            return;
        };
        buf.resize(chunk.length() as usize, 0);
        chunk.copy_to(&mut buf);
        let broken = {
            let mut shared = core.shared.borrow_mut();
            let now = core.now();
            shared.stack.handle_link_stream(now, &buf).err()
        };
        if let Some(error) = broken {
            // No packet boundary to resynchronise on: the session cannot go on.
            core.shared
                .borrow_mut()
                .close(SessionError::Protocol(format!("stream link: {error}")));
            core.poke();
            return;
        }
        core.poke();
    }
}

/// Follows one connection's control stream after the handshake (DNS updates, new tickets, the
/// close reason) until the connection ends; returns why it ended.
async fn read_control(core: &Core, opened: &mut Opened) -> SessionError {
    let mut closing = None;
    'stream: loop {
        loop {
            match opened.control_decoder.next_message() {
                Ok(Some(ControlMessage::DnsServers(servers))) => {
                    core.shared.borrow_mut().stack.set_dns_servers(&servers);
                }
                Ok(Some(ControlMessage::SessionTicket(ticket))) => {
                    opened.announced.ticket = Some(ticket);
                }
                Ok(Some(ControlMessage::Close { code, reason })) => {
                    closing = Some(SessionError::Closed { code, reason });
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
        match read_chunk(&opened.control_reader).await {
            Ok(Some(chunk)) => opened.control_decoder.extend(&chunk.to_vec()),
            Ok(None) | Err(_) => break,
        }
    }
    let reason = close_reason(&opened.transport).await;
    closing
        .or(reason)
        .unwrap_or_else(|| SessionError::Lost("the WebTransport session ended".into()))
}

/// Sleeps `ms` milliseconds (a `setTimeout` promise).
async fn sleep_ms(ms: f64) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        set_timeout(&resolve, ms);
    });
    let _ = JsFuture::from(promise).await;
}

/// Runs the session's connections one after another: reads each one's datagrams and control
/// stream, and when a connection is lost (not closed on purpose) resumes the session on a new
/// one with the gateway's ticket for up to `reconnect_for_ms`, so the stack — and every TCP
/// connection in it — carries on. Mirrors the native client's supervisor.
pub(crate) async fn supervise(
    core: Rc<Core>,
    mut current: Opened,
    url: String,
    certificate_hashes: JsValue,
    reconnect_for_ms: f64,
    downlink: Downlink,
) {
    let (ipv4, ipv6) = (current.announced.ipv4, current.announced.ipv6);
    loop {
        wasm_bindgen_futures::spawn_local(read_datagrams(
            core.clone(),
            current.datagram_reader.clone(),
        ));
        if let Some(incoming) = current.incoming_streams.clone() {
            wasm_bindgen_futures::spawn_local(read_link_stream(core.clone(), incoming));
        }
        let reason = read_control(&core, &mut current).await;
        if core.is_closed() {
            return;
        }
        let ticket = match current.announced.ticket.clone() {
            Some(ticket) if reason.is_resumable() && reconnect_for_ms > 0.0 => ticket,
            _ => {
                core.shared.borrow_mut().close(reason);
                return;
            }
        };
        match reconnect(
            &core,
            &url,
            &certificate_hashes,
            &ticket,
            reconnect_for_ms,
            downlink,
        )
        .await
        {
            Ok(next) if next.announced.ipv4 == ipv4 && next.announced.ipv6 == ipv6 => {
                core.replace_transport(next.transport.clone(), next.datagram_writer.clone());
                current = next;
            }
            Ok(next) => {
                // The gateway no longer held our addresses (grace period over, or it restarted
                // without its lease file): the stack's connections cannot continue.
                next.transport.close();
                core.shared.borrow_mut().close(SessionError::Lost(format!(
                    "the gateway resumed the session with other addresses ({:?}, {:?}); its \
                     lease had expired",
                    next.announced.ipv4, next.announced.ipv6
                )));
                return;
            }
            Err(error) => {
                core.shared.borrow_mut().close(error);
                return;
            }
        }
    }
}

/// Tries to resume with `ticket`, backing off from 100 ms to 2 s between attempts, for
/// `reconnect_for_ms`.
async fn reconnect(
    core: &Core,
    url: &str,
    certificate_hashes: &JsValue,
    ticket: &[u8],
    reconnect_for_ms: f64,
    downlink: Downlink,
) -> Result<Opened, SessionError> {
    let deadline = performance_now() + reconnect_for_ms;
    let resume_url = crate::session::resume_url(url, ticket);
    let mut backoff_ms = 100.0;
    let mut last = SessionError::Lost("no resumption attempt finished".into());
    while performance_now() < deadline {
        if core.is_closed() {
            return Err(SessionError::ClosedLocally);
        }
        match crate::session::open(&resume_url, certificate_hashes, downlink).await {
            Ok(next) => return Ok(next),
            // A refusal with a reason (pool exhausted, token expired, ...) is final.
            Err(error @ SessionError::Closed { .. }) => return Err(error),
            Err(error) => last = error,
        }
        sleep_ms(backoff_ms).await;
        backoff_ms = (backoff_ms * 2.0).min(2000.0);
    }
    Err(last)
}

/// Polls the stack, writes its packets as datagrams, and sleeps until the next packet, socket
/// call or timer. Mirrors the native client's driver.
pub(crate) async fn drive(core: Rc<Core>) {
    let mut outgoing = Vec::new();
    loop {
        let deadline = {
            let mut shared = core.shared.borrow_mut();
            if shared.closed.is_some() {
                if let Some((id, _)) = shared.timer.take() {
                    clear_timeout(&id);
                }
                return;
            }
            shared.poked = false;
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
        let uplink = core
            .uplink_writer
            .borrow()
            .as_ref()
            .filter(|(at, _)| *at == core.reconnects.get())
            .map(|(_, writer)| writer.clone());
        if let Some(writer) = uplink
            && sent_any
        {
            // One write for the whole burst, framed; waiting for room turns the stream's flow
            // control into TCP backpressure. A failing writer belongs to a lost connection.
            let mut framed = Vec::new();
            {
                let mut shared = core.shared.borrow_mut();
                for packet in outgoing.drain(..) {
                    put_frame(&mut framed, &packet);
                    shared.stack.recycle(packet);
                }
            }
            if matches!(writer.desired_size(), Ok(Some(room)) if room <= 0.0)
                && JsFuture::from(writer.ready()).await.is_err()
            {
                *core.uplink_writer.borrow_mut() = None;
                continue;
            }
            let written = writer.write_with_chunk(&Uint8Array::from(&framed[..]));
            let _ = written.catch(&core.ignore_rejection);
            continue;
        }
        for packet in outgoing.drain(..) {
            let writer = core.datagram_writer.borrow().clone();
            // Waiting for room (instead of letting the browser drop datagrams past its high
            // water mark) turns a full datagram queue into TCP backpressure. A writer that fails
            // belongs to a lost connection: the packet is dropped (TCP resends it) and the
            // supervisor resumes the session or ends it.
            if matches!(writer.desired_size(), Ok(Some(room)) if room <= 0.0)
                && JsFuture::from(writer.ready()).await.is_err()
            {
                core.shared.borrow_mut().stack.recycle(packet);
                continue;
            }
            let written = writer.write_with_chunk(&Uint8Array::from(&packet[..]));
            let _ = written.catch(&core.ignore_rejection);
            core.shared.borrow_mut().stack.recycle(packet);
        }
        if sent_any {
            // Sending may have let acknowledgements in; the stack may have more to say.
            continue;
        }
        if let Some(at) = deadline {
            core.arm_timer(at);
        }
        core.parked().await;
        // Let the datagram reader drain everything already queued (its reads resolve as
        // microtasks) before polling: one poll then acknowledges a whole batch with one ACK
        // instead of one ACK datagram per packet, and datagram writes are the page's main cost.
        let _ = JsFuture::from(next_task()).await;
    }
}
