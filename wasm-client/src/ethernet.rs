//! The Ethernet adapter for emulators: webnic-stack's [`webnic_stack::ethernet`] exported to JS,
//! and [`RawNic`], a session whose IP packets go to the page instead of a stack.
//!
//! `js/v86.js` wires the two to v86's bus: frames from the guest's NIC (`net0-send`) go
//! through [`EthernetAdapter::handle_frame`] to [`RawNic::send`]; packets from
//! [`RawNic::recv`] go through [`EthernetAdapter::encapsulate`] to the guest (`net0-receive`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use js_sys::{Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{ReadableStreamDefaultReader, WebTransport, WritableStreamDefaultWriter};
use webnic_stack::ethernet::{self, DropReason, EthernetConfig};

use crate::session::{self, close_reason, js_message, read_chunk};

/// The largest datagram Chromium sends: bigger ones vanish without an error (see FACTS).
const BROWSER_MAX_DATAGRAM: u16 = 1211;
/// Link MTU when the gateway announces none (the protocol's default).
const DEFAULT_MTU: u16 = 1152;

/// Opens a session in raw-packet mode: no stack in the page; [`RawNic::recv`] and
/// [`RawNic::send`] carry the session's IP packets.
///
/// # Errors
/// The session's error, as a JS `Error` whose message names the cause.
#[wasm_bindgen(js_name = connectRaw)]
pub async fn connect_raw(
    url: String,
    server_certificate_hashes: JsValue,
) -> Result<RawNic, JsError> {
    let opened = session::open(
        &url,
        &server_certificate_hashes,
        session::Downlink::Datagrams,
    )
    .await
    .map_err(|e| JsError::new(&e.to_string()))?;
    let announced = &opened.announced;
    // Never announce a packet size the browser would silently drop.
    let mtu = announced
        .mtu
        .unwrap_or(DEFAULT_MTU)
        .min(BROWSER_MAX_DATAGRAM - 8);
    Ok(RawNic {
        ipv4: announced.ipv4,
        ipv6: announced.ipv6,
        mtu,
        dns_servers: announced.dns.clone(),
        transport: opened.transport,
        reader: opened.datagram_reader,
        writer: opened.datagram_writer,
        _control_reader: opened.control_reader,
        _control_writer: opened.control_writer,
        ignore_rejection: Closure::new(|_: JsValue| {}),
    })
}

/// A session whose IP packets the page exchanges itself (raw-packet mode).
#[wasm_bindgen]
#[derive(Debug)]
pub struct RawNic {
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
    mtu: u16,
    dns_servers: Vec<IpAddr>,
    transport: WebTransport,
    reader: ReadableStreamDefaultReader,
    writer: WritableStreamDefaultWriter,
    /// Kept so the control stream stays open for the session's life.
    _control_reader: ReadableStreamDefaultReader,
    _control_writer: WritableStreamDefaultWriter,
    /// Swallows the rejections of datagram writes nobody awaits.
    ignore_rejection: Closure<dyn FnMut(JsValue)>,
}

#[wasm_bindgen]
impl RawNic {
    /// The session's IPv4 address (the only IPv4 source the gateway accepts), or `undefined`.
    #[wasm_bindgen(getter)]
    pub fn ipv4(&self) -> Option<String> {
        self.ipv4.map(|a| a.to_string())
    }

    /// The session's IPv6 address, or `undefined`.
    #[wasm_bindgen(getter)]
    pub fn ipv6(&self) -> Option<String> {
        self.ipv6.map(|a| a.to_string())
    }

    /// The largest IP packet to send.
    #[wasm_bindgen(getter)]
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The resolvers the gateway announced.
    #[wasm_bindgen(getter, js_name = dnsServers)]
    pub fn dns_servers(&self) -> Vec<String> {
        self.dns_servers.iter().map(ToString::to_string).collect()
    }

    /// The next IP packet from the gateway; `undefined` once the session has ended. One
    /// reader at a time.
    ///
    /// # Errors
    /// The datagram stream's error.
    pub async fn recv(&self) -> Result<Option<Uint8Array>, JsError> {
        read_chunk(&self.reader)
            .await
            .map_err(|e| JsError::new(&js_message(&e)))
    }

    /// Sends one IP packet; resolves once the browser's datagram queue has room again, so a
    /// sender that awaits it gets backpressure instead of silent drops.
    ///
    /// # Errors
    /// The datagram stream's error (e.g. the session is closed).
    pub async fn send(&self, packet: &[u8]) -> Result<(), JsError> {
        if matches!(self.writer.desired_size(), Ok(Some(room)) if room <= 0.0) {
            JsFuture::from(self.writer.ready())
                .await
                .map_err(|e| JsError::new(&js_message(&e)))?;
        }
        let written = self.writer.write_with_chunk(&Uint8Array::from(packet));
        // The write's own promise only rejects once the session is gone, which `closed` says.
        let _ = written.catch(&self.ignore_rejection);
        Ok(())
    }

    /// Resolves with the reason once the session has ended.
    pub async fn closed(&self) -> String {
        match close_reason(&self.transport).await {
            Some(reason) => reason.to_string(),
            None => "session closed".to_owned(),
        }
    }

    /// Ends the session; the gateway frees the address.
    pub fn close(&self) {
        self.transport.close();
    }
}

/// The Ethernet side of a session for an emulated guest: ARP, DHCPv4, IPv6 router
/// advertisements, and frames ⇄ IP packets (see webnic-stack's `ethernet` module).
#[wasm_bindgen]
#[derive(Debug)]
pub struct EthernetAdapter {
    inner: ethernet::EthernetAdapter,
    /// Reused for every frame built from a session packet.
    frame: Vec<u8>,
}

#[wasm_bindgen]
impl EthernetAdapter {
    /// An adapter serving `nic`'s addresses, MTU and resolvers.
    #[wasm_bindgen(constructor)]
    pub fn new(nic: &RawNic) -> Self {
        let mut config = EthernetConfig::new(nic.mtu);
        config.ipv4 = nic.ipv4;
        config.ipv6 = nic.ipv6;
        config.dns_servers.clone_from(&nic.dns_servers);
        Self {
            inner: ethernet::EthernetAdapter::new(config),
            frame: Vec::new(),
        }
    }

    /// A frame from the guest: returns the IP packet to send to the session, or `undefined`
    /// (a reply for the guest may then wait in [`poll_frame`](Self::poll_frame)).
    ///
    /// Takes the frame by value: the adapter rewrites IPv6 sources in place, and the caller's
    /// buffer (e.g. v86's NIC memory) must not see that.
    #[wasm_bindgen(js_name = handleFrame)]
    pub fn handle_frame(&mut self, mut frame: Vec<u8>) -> Option<Uint8Array> {
        self.inner.handle_frame(&mut frame).map(Uint8Array::from)
    }

    /// A packet from the session: returns the frame for the guest, or `undefined` (counted).
    pub fn encapsulate(&mut self, packet: &[u8]) -> Option<Uint8Array> {
        self.inner
            .encapsulate(packet, &mut self.frame)
            .then(|| Uint8Array::from(&self.frame[..]))
    }

    /// The next reply frame for the guest (ARP, DHCP, RA, NA), or `undefined`.
    #[wasm_bindgen(js_name = pollFrame)]
    pub fn poll_frame(&mut self) -> Option<Uint8Array> {
        self.inner.poll_frame().map(|f| Uint8Array::from(&f[..]))
    }

    /// The next event as a log line (guest MAC learned, a DHCP exchange, the guest's IPv6
    /// address), or `undefined`.
    #[wasm_bindgen(js_name = pollEvent)]
    pub fn poll_event(&mut self) -> Option<String> {
        self.inner.poll_event().map(|e| e.to_string())
    }

    /// Counters: `{ framesFromGuest, packetsToSession, packetsToGuest, arpReplies,
    /// dhcpReplies, ndiscReplies, dropped: { reason: count } }`.
    pub fn stats(&self) -> Object {
        let stats = self.inner.stats();
        let object = Object::new();
        let set = |target: &Object, key: &str, value: u64| {
            let _ = Reflect::set(target, &key.into(), &JsValue::from_f64(value as f64));
        };
        set(&object, "framesFromGuest", stats.frames_from_guest);
        set(&object, "packetsToSession", stats.packets_to_session);
        set(&object, "packetsToGuest", stats.packets_to_guest);
        set(&object, "arpReplies", stats.arp_replies);
        set(&object, "dhcpReplies", stats.dhcp_replies);
        set(&object, "ndiscReplies", stats.ndisc_replies);
        let dropped = Object::new();
        for reason in DropReason::ALL {
            set(&dropped, reason.name(), stats.dropped(reason));
        }
        let _ = Reflect::set(&object, &"dropped".into(), &dropped);
        object
    }
}
