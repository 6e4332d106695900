//! The wasm-bindgen exports: [`connect`] and the handle-based calls of [`Nic`] that
//! `js/webnic.js` wraps into Direct Sockets-shaped objects.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::IpAddr;
use std::rc::Rc;
use std::task::Poll;

use js_sys::{Array, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{future_to_promise, spawn_local};
use webnic_stack::{Stack, StackConfig, TcpError, TcpHandle, TcpOptions};

use crate::driver::{self, Core, Interest};
use crate::session::{self, SessionError};

/// Link MTU when the gateway announces none (the protocol's default).
const DEFAULT_MTU: u16 = 1152;

/// The largest datagram Chromium sends: bigger ones vanish without an error (see FACTS).
const BROWSER_MAX_DATAGRAM: u16 = 1211;

/// Opens a session with the gateway at `url` (`https://host:port/webnic`).
///
/// `server_certificate_hashes` goes to `new WebTransport` unchanged (`undefined` for a
/// certificate the browser trusts).
///
/// # Errors
/// The session's error, as a JS `Error` whose message names the cause.
#[wasm_bindgen]
pub async fn connect(url: String, server_certificate_hashes: JsValue) -> Result<Nic, JsError> {
    let opened = session::open(&url, &server_certificate_hashes)
        .await
        .map_err(|e| JsError::new(&e.to_string()))?;
    let announced = &opened.announced;
    // The stack must never build a packet the browser would silently drop.
    let mtu = announced
        .mtu
        .unwrap_or(DEFAULT_MTU)
        .min(BROWSER_MAX_DATAGRAM - 8);
    let mut config = StackConfig::new(usize::from(mtu), driver::random_seed());
    config.ipv4 = announced.ipv4;
    config.ipv6 = announced.ipv6;
    config.dns_servers.clone_from(&announced.dns);
    let address = announced
        .ipv4
        .map(IpAddr::V4)
        .or(announced.ipv6.map(IpAddr::V6));
    let epoch = driver::performance_now();
    let stack = Stack::new(config, webnic_stack::Instant::from_micros(0));
    let core = Core::new(
        stack,
        opened.transport.clone(),
        opened.datagram_writer.clone(),
        epoch,
    );
    spawn_local(driver::read_datagrams(
        core.clone(),
        opened.datagram_reader.clone(),
    ));
    spawn_local(driver::read_control(
        core.clone(),
        opened.control_reader.clone(),
        opened.control_decoder,
        opened.control_writer.clone(),
    ));
    spawn_local(driver::drive(core.clone()));
    Ok(Nic {
        core,
        address: address.map(|a| a.to_string()).unwrap_or_default(),
        address_v6: announced.ipv6.map(|a| a.to_string()),
        mtu,
        handles: Rc::new(Handles::default()),
    })
}

/// TCP handles as the page sees them (small integers), mapped to the stack's.
#[derive(Debug, Default)]
struct Handles {
    next: Cell<u32>,
    tcp: std::cell::RefCell<HashMap<u32, TcpHandle>>,
}

impl Handles {
    fn insert(&self, handle: TcpHandle) -> u32 {
        let id = self.next.get() + 1;
        self.next.set(id);
        self.tcp.borrow_mut().insert(id, handle);
        id
    }

    fn get(&self, id: u32) -> Result<TcpHandle, JsError> {
        self.tcp
            .borrow()
            .get(&id)
            .copied()
            .ok_or_else(|| JsError::new("InvalidStateError: the socket is closed"))
    }
}

/// A session with a webnic gateway: the page's own network interface.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Nic {
    core: Rc<Core>,
    address: String,
    address_v6: Option<String>,
    mtu: u16,
    handles: Rc<Handles>,
}

fn session_error(error: &SessionError) -> JsValue {
    JsError::new(&format!("NetworkError: {error}")).into()
}

fn tcp_error(error: &TcpError) -> JsValue {
    // The names the Direct Sockets spec rejects with.
    let name = match error {
        TcpError::Connect(_) | TcpError::Reset => "NetworkError",
        TcpError::WouldBlock
        | TcpError::NotConnected
        | TcpError::InvalidHandle
        | TcpError::WriteClosed => "InvalidStateError",
    };
    JsError::new(&format!("{name}: {error}")).into()
}

#[wasm_bindgen]
impl Nic {
    /// The session's address (IPv4 when it has one).
    #[wasm_bindgen(getter)]
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// The session's IPv6 address, if any.
    #[wasm_bindgen(getter, js_name = addressV6)]
    pub fn address_v6(&self) -> Option<String> {
        self.address_v6.clone()
    }

    /// The link MTU the stack uses.
    #[wasm_bindgen(getter)]
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Traffic counters: `{ packetsSent, packetsReceived, bytesSent, bytesReceived, drops }`.
    pub fn stats(&self) -> Object {
        let stats = self.core.shared.borrow().stack.stats();
        let out = Object::new();
        for (key, value) in [
            ("packetsSent", stats.packets_sent),
            ("packetsReceived", stats.packets_received),
            ("bytesSent", stats.bytes_sent),
            ("bytesReceived", stats.bytes_received),
            ("drops", stats.dropped_queue_full),
        ] {
            let _ = Reflect::set(&out, &key.into(), &JsValue::from_f64(value as f64));
        }
        out
    }

    /// Connects to `host:port` (an address literal, or a name resolved through the tunnel's
    /// DNS). Resolves to a socket id once established.
    #[wasm_bindgen(js_name = tcpConnect)]
    pub fn tcp_connect(
        &self,
        host: String,
        port: u16,
        no_delay: bool,
        send_buffer: u32,
        receive_buffer: u32,
    ) -> Promise {
        let core = self.core.clone();
        let handles = self.handles.clone();
        future_to_promise(async move {
            let mut options = TcpOptions {
                no_delay,
                ..TcpOptions::default()
            };
            if send_buffer > 0 {
                options.send_buffer = send_buffer as usize;
            }
            if receive_buffer > 0 {
                options.recv_buffer = receive_buffer as usize;
            }
            core.check_open().map_err(|e| session_error(&e))?;
            let handle = core
                .shared
                .borrow_mut()
                .stack
                .tcp_connect_host(&host, port, options)
                .map_err(|e| tcp_error(&TcpError::Connect(e)))?;
            core.poke();
            let connected = poll_fn(|cx| {
                let mut shared = core.shared.borrow_mut();
                if let Some(result) = shared.connect_results.remove(&handle) {
                    return Poll::Ready(result.map_err(|e| tcp_error(&TcpError::Connect(e))));
                }
                if let Some(error) = &shared.closed {
                    return Poll::Ready(Err(session_error(error)));
                }
                shared.park(Interest::TcpConnect(handle), cx.waker());
                Poll::Pending
            })
            .await;
            if let Err(error) = connected {
                core.shared.borrow_mut().stack.tcp_release(handle);
                return Err(error);
            }
            Ok(JsValue::from(handles.insert(handle)))
        })
    }

    /// `[remoteAddress, remotePort, localAddress, localPort]` of socket `id`.
    #[wasm_bindgen(js_name = tcpEndpoints)]
    pub fn tcp_endpoints(&self, id: u32) -> Result<Array, JsError> {
        let handle = self.handles.get(id)?;
        let (local, remote) = self
            .core
            .shared
            .borrow()
            .stack
            .tcp_endpoints(handle)
            .ok_or_else(|| JsError::new("InvalidStateError: not connected"))?;
        Ok(Array::of4(
            &remote.ip().to_string().into(),
            &JsValue::from(remote.port()),
            &local.ip().to_string().into(),
            &JsValue::from(local.port()),
        ))
    }

    /// Reads up to `max` bytes from socket `id`; resolves to a `Uint8Array`, empty once the
    /// peer has closed its side. Bytes stay in the stack (and the window closes) until read.
    #[wasm_bindgen(js_name = tcpRead)]
    pub fn tcp_read(&self, id: u32, max: u32) -> Promise {
        let core = self.core.clone();
        let handle = self.handles.get(id);
        future_to_promise(async move {
            let handle = handle?;
            let mut buf = Vec::new();
            let read = poll_fn(|cx| {
                let mut shared = core.shared.borrow_mut();
                // Size the buffer to what is queued (at least 1 byte, so an empty read means
                // end of stream): most reads carry one packet, not `max` bytes.
                let queued = shared.stack.tcp_recv_queue(handle);
                buf.resize(queued.clamp(1, max.max(1) as usize), 0);
                match shared.stack.tcp_recv(handle, &mut buf) {
                    Ok(n) => Poll::Ready(Ok(n)),
                    Err(TcpError::WouldBlock) => {
                        if let Some(error) = &shared.closed {
                            return Poll::Ready(Err(session_error(error)));
                        }
                        shared.park(Interest::TcpRead(handle), cx.waker());
                        Poll::Pending
                    }
                    Err(error) => Poll::Ready(Err(tcp_error(&error))),
                }
            })
            .await?;
            // Reading opened the window: let the driver tell the peer.
            core.poke();
            Ok(Uint8Array::from(&buf[..read]).into())
        })
    }

    /// Writes all of `data` to socket `id`; resolves once the stack has taken the last byte
    /// (so a slow network slows the writer down).
    #[wasm_bindgen(js_name = tcpWrite)]
    pub fn tcp_write(&self, id: u32, data: Uint8Array) -> Promise {
        let core = self.core.clone();
        let handle = self.handles.get(id);
        future_to_promise(async move {
            let handle = handle?;
            let data = data.to_vec();
            let mut written = 0;
            while written < data.len() {
                let n = poll_fn(|cx| {
                    let mut shared = core.shared.borrow_mut();
                    match shared.stack.tcp_send(handle, &data[written..]) {
                        Ok(n) => Poll::Ready(Ok(n)),
                        Err(TcpError::WouldBlock) => {
                            if let Some(error) = &shared.closed {
                                return Poll::Ready(Err(session_error(error)));
                            }
                            shared.park(Interest::TcpWrite(handle), cx.waker());
                            Poll::Pending
                        }
                        Err(error) => Poll::Ready(Err(tcp_error(&error))),
                    }
                })
                .await?;
                written += n;
                core.poke();
            }
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Closes the sending half of socket `id` (FIN after queued data); reading goes on.
    #[wasm_bindgen(js_name = tcpShutdown)]
    pub fn tcp_shutdown(&self, id: u32) -> Result<(), JsError> {
        let handle = self.handles.get(id)?;
        self.core
            .shared
            .borrow_mut()
            .stack
            .tcp_shutdown(handle)
            .map_err(|e| JsError::new(&e.to_string()))?;
        self.core.poke();
        Ok(())
    }

    /// Closes socket `id` gracefully and frees it; `abort` resets it instead.
    #[wasm_bindgen(js_name = tcpClose)]
    pub fn tcp_close(&self, id: u32, abort: bool) {
        let Some(handle) = self.handles.tcp.borrow_mut().remove(&id) else {
            return;
        };
        {
            let mut shared = self.core.shared.borrow_mut();
            shared.forget(Interest::TcpRead(handle));
            shared.forget(Interest::TcpWrite(handle));
            if abort {
                shared.stack.tcp_abort(handle);
            } else {
                shared.stack.tcp_release(handle);
            }
        }
        self.core.poke();
    }

    /// Ends the session: the gateway frees the address and every socket fails.
    pub fn close(&self) {
        self.core
            .shared
            .borrow_mut()
            .close(SessionError::ClosedLocally);
        self.core.transport.close();
    }

    /// Resolves with the reason once the session has ended.
    pub fn closed(&self) -> Promise {
        let core = self.core.clone();
        future_to_promise(async move {
            let reason = poll_fn(|cx| {
                let mut shared = core.shared.borrow_mut();
                if let Some(reason) = &shared.closed {
                    return Poll::Ready(reason.to_string());
                }
                // Reuses the session-wide close wake-up: `Shared::close` wakes every waker.
                shared.park(Interest::Closed, cx.waker());
                Poll::Pending
            })
            .await;
            Ok(JsValue::from(reason))
        })
    }
}
