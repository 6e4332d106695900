//! The wasm-bindgen exports: [`connect`] and the handle-based calls of [`Nic`] that
//! `js/webnic.js` wraps into Direct Sockets-shaped objects.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::task::Poll;

use js_sys::{Array, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{future_to_promise, spawn_local};
use webnic_stack::{
    DnsKind, Duration, ListenError, ListenerHandle, Stack, StackConfig, TcpError, TcpHandle,
    TcpOptions, UdpError, UdpHandle, UdpOptions,
};

use crate::driver::{self, Core, Interest};
use crate::session::{self, SessionError};

/// Link MTU when the gateway announces none (the protocol's default).
const DEFAULT_MTU: u16 = 1152;

/// The largest datagram Chromium sends: bigger ones vanish without an error (see FACTS).
const BROWSER_MAX_DATAGRAM: u16 = 1211;

/// Largest `sendBufferSize`/`receiveBufferSize` honoured (the spec lets implementations clamp):
/// 16 MiB is a 128 Mbit/s × 1 s window, and a page cannot make the wasm heap grow by gigabytes.
const MAX_SOCKET_BUFFER: usize = 16 << 20;

/// Default receive buffer (and so largest window) of a page's connection: 1 MiB, not the
/// stack's 256 KiB. A bulk download fills the queues between the server and the page (quinn's
/// datagram send buffer, Chromium's datagram pipeline), so the round trip grows to tens of ms
/// and a 256 KiB window capped the GET. Measured (browser_window_vs_worker, 8 MiB GET, 2 runs
/// twice, load avg ~6): Worker 5.5–8.4 → 12.4–14.3 MB/s, Window 4.3–5.8 → 7.4–10.4; 4 MiB
/// gave no more (7.0–11.3, more retransmissions). The buffer is allocated per connection in
/// the wasm heap: pages with many sockets can lower it with `receiveBufferSize`.
const DEFAULT_RECEIVE_BUFFER: usize = 1 << 20;

/// Unanswered keep-alive probes after which a connection is given up (Linux's default).
const KEEP_ALIVE_PROBES: u32 = 9;

/// Opens a session with the gateway at `url` (`https://host:port/webnic`).
///
/// `server_certificate_hashes` goes to `new WebTransport` unchanged (`undefined` for a
/// certificate the browser trusts). When the connection is lost (network change, idle timeout,
/// gateway restart) the session resumes on a new one with the gateway's ticket, trying for
/// `reconnect_for_ms` (0: never), and its TCP connections carry on. `link_repair` asks the
/// gateway to sequence its datagrams and resend the ones the stack reports missing
/// (PROTOCOL.md §3.1); `link_stream` instead asks it to send our packets on a stream (§3.2).
///
/// # Errors
/// The session's error, as a JS `Error` whose message names the cause.
#[wasm_bindgen]
pub async fn connect(
    url: String,
    server_certificate_hashes: JsValue,
    reconnect_for_ms: f64,
    link_repair: bool,
    link_stream: bool,
) -> Result<Nic, JsError> {
    let downlink = match (link_stream, link_repair) {
        (true, _) => session::Downlink::Stream,
        (false, true) => session::Downlink::Repaired,
        (false, false) => session::Downlink::Datagrams,
    };
    let opened = session::open(&url, &server_certificate_hashes, downlink)
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
    let nic = Nic {
        core: core.clone(),
        address: address.map(|a| a.to_string()).unwrap_or_default(),
        address_v6: announced.ipv6.map(|a| a.to_string()),
        mtu,
        handles: Rc::new(Handles::default()),
    };
    spawn_local(driver::supervise(
        core.clone(),
        opened,
        url,
        server_certificate_hashes,
        reconnect_for_ms,
        downlink,
    ));
    spawn_local(driver::drive(core));
    Ok(nic)
}

/// Socket handles as the page sees them (small integers, one sequence for every kind), mapped
/// to the stack's.
#[derive(Debug, Default)]
struct Handles {
    next: Cell<u32>,
    tcp: std::cell::RefCell<HashMap<u32, TcpHandle>>,
    udp: std::cell::RefCell<HashMap<u32, UdpHandle>>,
    listeners: std::cell::RefCell<HashMap<u32, ListenerHandle>>,
}

impl Handles {
    fn next_id(&self) -> u32 {
        let id = self.next.get() + 1;
        self.next.set(id);
        id
    }

    fn insert(&self, handle: TcpHandle) -> u32 {
        let id = self.next_id();
        self.tcp.borrow_mut().insert(id, handle);
        id
    }

    fn udp(&self, id: u32) -> Result<UdpHandle, JsError> {
        self.udp
            .borrow()
            .get(&id)
            .copied()
            .ok_or_else(|| JsError::new("InvalidStateError: the socket is closed"))
    }

    fn listener(&self, id: u32) -> Result<ListenerHandle, JsError> {
        self.listeners
            .borrow()
            .get(&id)
            .copied()
            .ok_or_else(|| JsError::new("InvalidStateError: the server socket is closed"))
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

fn udp_error(error: &UdpError) -> JsValue {
    let name = match error {
        UdpError::AddrInUse(_) | UdpError::NoFreePort | UdpError::Unaddressable(_) => {
            "NetworkError"
        }
        UdpError::TooLarge(_) | UdpError::Truncated { .. } => "DataError",
        UdpError::WouldBlock | UdpError::InvalidHandle | UdpError::NotConnected => {
            "InvalidStateError"
        }
    };
    JsError::new(&format!("{name}: {error}")).into()
}

fn listen_error(error: &ListenError) -> JsValue {
    JsError::new(&format!("NetworkError: {error}")).into()
}

/// The stack's [`TcpOptions`] and lookup type from js/webnic.js's checked options object.
fn tcp_options(js: &JsValue) -> (TcpOptions, Option<DnsKind>) {
    let field = |name: &str| Reflect::get(js, &JsValue::from_str(name)).unwrap_or_default();
    let number = |name: &str| field(name).as_f64().unwrap_or(0.0);
    // A page's window stays fixed: 1 MiB measured as fast as 4 MiB in the browser bench
    // (docs/PERFORMANCE.md), and a size the page asks for is kept, as SO_RCVBUF stops Linux's
    // autotuning.
    let mut options = TcpOptions {
        no_delay: field("noDelay").as_bool().unwrap_or(true),
        recv_buffer: DEFAULT_RECEIVE_BUFFER,
        recv_buffer_max: DEFAULT_RECEIVE_BUFFER,
        ..TcpOptions::default()
    };
    let (send_buffer, receive_buffer) = (number("sendBufferSize"), number("receiveBufferSize"));
    if send_buffer >= 1.0 {
        options.send_buffer = (send_buffer as usize).min(MAX_SOCKET_BUFFER);
    }
    if receive_buffer >= 1.0 {
        options.recv_buffer = (receive_buffer as usize).min(MAX_SOCKET_BUFFER);
        options.recv_buffer_max = options.recv_buffer;
    }
    let keep_alive_ms = number("keepAliveDelay");
    if keep_alive_ms >= 1.0 {
        // Capped at 49 days (u32 ms) so that the timeout below cannot overflow.
        let delay = Duration::from_millis(keep_alive_ms.min(f64::from(u32::MAX)) as u64);
        options.keep_alive = Some(delay);
        // Like an OS keep-alive (Linux: 9 unanswered probes), give up on a peer that stays
        // silent through KEEP_ALIVE_PROBES probes instead of probing forever.
        options.timeout = Some(delay * KEEP_ALIVE_PROBES);
    }
    let only = match field("dnsQueryType").as_string().as_deref() {
        Some("ipv4") => Some(DnsKind::A),
        Some("ipv6") => Some(DnsKind::Aaaa),
        _ => None,
    };
    (options, only)
}

/// An address literal (UDP and listeners take no names: there is nothing to resolve locally).
fn parse_address(address: &str) -> Result<IpAddr, JsError> {
    address
        .parse()
        .map_err(|_| JsError::new(&format!("DataError: {address:?} is not an IP address")))
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

    /// Traffic counters: `{ packetsSent, packetsReceived, bytesSent, bytesReceived, drops,
    /// reconnects, linkSequenced, linkRepaired, linkGaveUp, linkNacked, linkStreamPackets }`
    /// (`reconnects`: connections the session resumed on after losing one; `link*`: link
    /// repair's datagrams sequenced by the gateway, packets repaired by a resend, packets given
    /// up on, sequence numbers asked for; packets that came on the stream link).
    pub fn stats(&self) -> Object {
        let (stats, link) = {
            let shared = self.core.shared.borrow();
            (shared.stack.stats(), shared.stack.link_stats())
        };
        let out = Object::new();
        for (key, value) in [
            ("packetsSent", stats.packets_sent),
            ("packetsReceived", stats.packets_received),
            ("bytesSent", stats.bytes_sent),
            ("bytesReceived", stats.bytes_received),
            ("drops", stats.dropped_queue_full),
            ("reconnects", u64::from(self.core.reconnects.get())),
            ("linkSequenced", link.sequenced),
            ("linkRepaired", link.repaired),
            ("linkGaveUp", link.gave_up),
            ("linkNacked", link.nacked),
            ("linkStreamPackets", stats.link_stream_packets),
        ] {
            let _ = Reflect::set(&out, &key.into(), &JsValue::from_f64(value as f64));
        }
        out
    }

    /// Connects to `host:port` (an address literal, or a name resolved through the tunnel's
    /// DNS). Resolves to a socket id once established.
    ///
    /// `options` is the object js/webnic.js built from `TCPSocketOptions` after checking them
    /// as the spec asks: `{ noDelay, sendBufferSize, receiveBufferSize, keepAliveDelay,
    /// dnsQueryType }`, where 0 keeps the stack's default size or sends no keep-alives, and
    /// `dnsQueryType` is `"ipv4"` (A only), `"ipv6"` (AAAA only) or empty (A, then AAAA).
    #[wasm_bindgen(js_name = tcpConnect)]
    pub fn tcp_connect(&self, host: String, port: u16, options: &JsValue) -> Promise {
        let core = self.core.clone();
        let handles = self.handles.clone();
        let (options, only) = tcp_options(options);
        future_to_promise(async move {
            core.check_open().map_err(|e| session_error(&e))?;
            let handle = core
                .shared
                .borrow_mut()
                .stack
                .tcp_connect_host_as(&host, port, options, only)
                .map_err(|e| tcp_error(&TcpError::Connect(e)))?;
            core.poke();
            let connected = poll_fn(|cx| {
                let mut shared = core.shared.borrow_mut();
                if let Some(result) = shared.waiters.take_connect_result(handle) {
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

    /// Opens a UDP socket on `port` (0 picks one) of the session's addresses; returns its id.
    /// `local_address` must be empty, unspecified, or one of the session's addresses.
    #[wasm_bindgen(js_name = udpBind)]
    pub fn udp_bind(&self, local_address: String, port: u16) -> Result<u32, JsValue> {
        self.check_local_address(&local_address)?;
        self.core.check_open().map_err(|e| session_error(&e))?;
        let handle = self
            .core
            .shared
            .borrow_mut()
            .stack
            .udp_bind(port, UdpOptions::default())
            .map_err(|e| udp_error(&e))?;
        let id = self.handles.next_id();
        self.handles.udp.borrow_mut().insert(id, handle);
        Ok(id)
    }

    /// Opens a UDP socket on an ephemeral port whose peer is fixed to `remote:port`: sends go
    /// there and datagrams from anyone else are dropped. Returns its id.
    #[wasm_bindgen(js_name = udpConnect)]
    pub fn udp_connect(&self, remote: String, port: u16) -> Result<u32, JsValue> {
        let remote = SocketAddr::new(parse_address(&remote)?, port);
        let id = self.udp_bind(String::new(), 0)?;
        let handle = self.handles.udp(id)?;
        let connected = self
            .core
            .shared
            .borrow_mut()
            .stack
            .udp_connect(handle, remote);
        if let Err(error) = connected {
            self.udp_close(id);
            return Err(udp_error(&error));
        }
        Ok(id)
    }

    /// `[localAddress, localPort]` of UDP socket `id`.
    #[wasm_bindgen(js_name = udpEndpoint)]
    pub fn udp_endpoint(&self, id: u32) -> Result<Array, JsValue> {
        let handle = self.handles.udp(id)?;
        let port = self
            .core
            .shared
            .borrow()
            .stack
            .udp_port(handle)
            .ok_or_else(|| JsError::new("InvalidStateError: the socket is closed"))?;
        Ok(Array::of2(
            &self.address.clone().into(),
            &JsValue::from(port),
        ))
    }

    /// Sends `data` as one datagram: to `remote:port` when given, else to the connected peer.
    /// Resolves once the stack queued it (waiting while the send queue is full).
    #[wasm_bindgen(js_name = udpSend)]
    pub fn udp_send(
        &self,
        id: u32,
        data: Uint8Array,
        remote: Option<String>,
        port: Option<u16>,
    ) -> Promise {
        let core = self.core.clone();
        let handle = self.handles.udp(id);
        let destination = match (remote, port) {
            (Some(remote), Some(port)) => {
                parse_address(&remote).map(|ip| Some(SocketAddr::new(ip, port)))
            }
            (None, None) => Ok(None),
            _ => Err(JsError::new(
                "TypeError: remoteAddress and remotePort go together",
            )),
        };
        future_to_promise(async move {
            let handle = handle?;
            let destination = destination?;
            let data = data.to_vec();
            poll_fn(|cx| {
                let mut shared = core.shared.borrow_mut();
                let sent = match destination {
                    Some(remote) => shared.stack.udp_send_to(handle, &data, remote),
                    None => shared.stack.udp_send(handle, &data),
                };
                match sent {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(UdpError::WouldBlock) => {
                        if let Some(error) = &shared.closed {
                            return Poll::Ready(Err(session_error(error)));
                        }
                        shared.park(Interest::UdpWrite(handle), cx.waker());
                        Poll::Pending
                    }
                    Err(error) => Poll::Ready(Err(udp_error(&error))),
                }
            })
            .await?;
            core.poke();
            Ok(JsValue::UNDEFINED)
        })
    }

    /// Resolves to the next datagram of UDP socket `id`: `[data, remoteAddress, remotePort]`.
    #[wasm_bindgen(js_name = udpRecv)]
    pub fn udp_recv(&self, id: u32) -> Promise {
        let core = self.core.clone();
        let handle = self.handles.udp(id);
        future_to_promise(async move {
            let handle = handle?;
            // The largest UDP payload: one read always fits.
            let mut buf = vec![0u8; 65_535];
            let (n, from) = poll_fn(|cx| {
                let mut shared = core.shared.borrow_mut();
                match shared.stack.udp_recv_from(handle, &mut buf) {
                    Ok(got) => Poll::Ready(Ok(got)),
                    Err(UdpError::WouldBlock) => {
                        if let Some(error) = &shared.closed {
                            return Poll::Ready(Err(session_error(error)));
                        }
                        shared.park(Interest::UdpRead(handle), cx.waker());
                        Poll::Pending
                    }
                    Err(error) => Poll::Ready(Err(udp_error(&error))),
                }
            })
            .await?;
            Ok(Array::of3(
                &Uint8Array::from(&buf[..n]),
                &from.ip().to_string().into(),
                &JsValue::from(from.port()),
            )
            .into())
        })
    }

    /// Closes UDP socket `id`; its pending reads and sends fail.
    #[wasm_bindgen(js_name = udpClose)]
    pub fn udp_close(&self, id: u32) {
        let Some(handle) = self.handles.udp.borrow_mut().remove(&id) else {
            return;
        };
        let mut shared = self.core.shared.borrow_mut();
        // Wake the parked futures: they see the invalid handle and fail.
        shared.wake(Interest::UdpRead(handle));
        shared.wake(Interest::UdpWrite(handle));
        shared.stack.udp_close(handle);
    }

    /// Opens a TCP listener on `port` (0 picks one) of the session's addresses, with up to
    /// `backlog` connections waiting to be accepted; returns its id.
    #[wasm_bindgen(js_name = tcpListen)]
    pub fn tcp_listen(
        &self,
        local_address: String,
        port: u16,
        backlog: u32,
    ) -> Result<u32, JsValue> {
        self.check_local_address(&local_address)?;
        self.core.check_open().map_err(|e| session_error(&e))?;
        let backlog = if backlog == 0 { 128 } else { backlog as usize };
        let options = TcpOptions {
            no_delay: true,
            ..TcpOptions::default()
        };
        let listener = self
            .core
            .shared
            .borrow_mut()
            .stack
            .tcp_listen(port, backlog, options)
            .map_err(|e| listen_error(&e))?;
        self.core.poke();
        let id = self.handles.next_id();
        self.handles.listeners.borrow_mut().insert(id, listener);
        Ok(id)
    }

    /// The port listener `id` is bound to.
    #[wasm_bindgen(js_name = tcpListenerPort)]
    pub fn tcp_listener_port(&self, id: u32) -> Result<u16, JsValue> {
        let listener = self.handles.listener(id)?;
        Ok(self
            .core
            .shared
            .borrow()
            .stack
            .listener_port(listener)
            .ok_or_else(|| JsError::new("InvalidStateError: the server socket is closed"))?)
    }

    /// Resolves to the id of the next established connection of listener `id` (a TCP socket
    /// id for `tcpRead`/`tcpWrite`/`tcpEndpoints`).
    #[wasm_bindgen(js_name = tcpAccept)]
    pub fn tcp_accept(&self, id: u32) -> Promise {
        let core = self.core.clone();
        let handles = self.handles.clone();
        let listener = self.handles.listener(id);
        future_to_promise(async move {
            let listener = listener?;
            let handle = poll_fn(|cx| {
                let mut shared = core.shared.borrow_mut();
                if let Some((handle, _)) = shared.stack.tcp_accept(listener) {
                    return Poll::Ready(Ok(handle));
                }
                if let Some(error) = &shared.closed {
                    return Poll::Ready(Err(session_error(error)));
                }
                if !handles.listeners.borrow().contains_key(&id) {
                    return Poll::Ready(Err(JsError::new(
                        "InvalidStateError: the server socket is closed",
                    )
                    .into()));
                }
                shared.park(Interest::Accept(listener), cx.waker());
                Poll::Pending
            })
            .await?;
            // Accepting freed a place in the listener's backlog: let the driver see it.
            core.poke();
            Ok(JsValue::from(handles.insert(handle)))
        })
    }

    /// Closes listener `id`: no new connections; accepted ones stay open.
    #[wasm_bindgen(js_name = tcpListenerClose)]
    pub fn tcp_listener_close(&self, id: u32) {
        let Some(listener) = self.handles.listeners.borrow_mut().remove(&id) else {
            return;
        };
        {
            let mut shared = self.core.shared.borrow_mut();
            shared.wake(Interest::Accept(listener));
            shared.stack.tcp_close_listener(listener);
        }
        self.core.poke();
    }

    fn check_local_address(&self, local_address: &str) -> Result<(), JsValue> {
        if local_address.is_empty() {
            return Ok(());
        }
        let ip = parse_address(local_address)?;
        let ours = ip.is_unspecified()
            || ip.to_string() == self.address
            || self.address_v6.as_deref() == Some(ip.to_string().as_str());
        if ours {
            Ok(())
        } else {
            Err(JsError::new(&format!(
                "NetworkError: {local_address} is not an address of this session"
            ))
            .into())
        }
    }

    /// Ends the session: the gateway frees the address and every socket fails.
    pub fn close(&self) {
        self.core
            .shared
            .borrow_mut()
            .close(SessionError::ClosedLocally);
        self.core.transport().close();
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
