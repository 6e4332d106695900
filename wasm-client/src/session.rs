//! Opening a session: `new WebTransport(url)`, the control-stream handshake, and what the
//! gateway announced.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use js_sys::{Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    ReadableStreamDefaultReader, ReadableStreamReadResult, WebTransport,
    WebTransportBidirectionalStream, WebTransportOptions, WritableStreamDefaultWriter,
};
use webnic_stack::protocol::{CapsuleDecoder, CloseCode, ControlMessage, PROTOCOL_VERSION};

/// Datagrams the browser may queue each way. Chromium's default of 1 drops datagrams as soon as
/// the page falls one behind; 256 covers a full TCP window burst at the link MTU.
const DATAGRAM_HIGH_WATER_MARK: f64 = 256.0;

/// How long Chromium may hold an outgoing datagram before dropping it unsent (ms). Its default
/// is a small multiple of the QUIC path's minimum RTT (about a millisecond here), so a burst of
/// TCP segments that waits for QUIC's congestion window is partly dropped: each drop is a TCP
/// loss the stack recovers from slowly. Measured (browser_window_vs_worker, 2 runs, 8 MiB up
/// and down per mode): upload segments the server received out of order 835 → 84, upload
/// 4.0/2.6 → 5.9/3.4 MB/s (Window/Worker). The queue stays bounded by the high water mark.
const OUTGOING_MAX_AGE_MS: f64 = 1000.0;

/// Why a session could not be opened, or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The browser refused or failed the WebTransport session (bad certificate hash, gateway
    /// unreachable, origin refused).
    #[error("cannot open the WebTransport session: {0}")]
    Connect(String),
    /// The gateway broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The gateway refused or ended the session with a reason code. The message carries the
    /// number (`close code N`) so that js/webnic.js can name the error.
    #[error("gateway closed the session: {code} (close code {}) ({reason})", .code.to_u32())]
    Closed {
        /// The reason code.
        code: CloseCode,
        /// The gateway's detail.
        reason: String,
    },
    /// The session's streams or datagrams failed.
    #[error("session lost: {0}")]
    Lost(String),
    /// The page closed the session.
    #[error("session closed by the page")]
    ClosedLocally,
}

impl SessionError {
    /// Whether a session that ended this way may come back on a new connection with its ticket:
    /// the connection was lost, or the gateway shut down (a restart gives the addresses back).
    pub(crate) fn is_resumable(&self) -> bool {
        matches!(
            self,
            Self::Lost(_)
                | Self::Closed {
                    code: CloseCode::GatewayShutdown,
                    ..
                }
        )
    }
}

/// What the gateway announced on the control stream.
#[derive(Debug, Default)]
pub(crate) struct Announced {
    pub(crate) mtu: Option<u16>,
    pub(crate) dns: Vec<IpAddr>,
    pub(crate) ipv4: Option<Ipv4Addr>,
    pub(crate) ipv6: Option<Ipv6Addr>,
    /// The gateway's resumption ticket, if it offers resumption.
    pub(crate) ticket: Option<Vec<u8>>,
}

/// An open session, configured.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) transport: WebTransport,
    pub(crate) announced: Announced,
    pub(crate) control_reader: ReadableStreamDefaultReader,
    pub(crate) control_decoder: CapsuleDecoder,
    /// Kept so the control stream's sending half stays open for the session's life.
    pub(crate) control_writer: WritableStreamDefaultWriter,
    pub(crate) datagram_reader: ReadableStreamDefaultReader,
    pub(crate) datagram_writer: WritableStreamDefaultWriter,
    /// The gateway's incoming unidirectional streams, when the session asked for the stream
    /// link (PROTOCOL.md §3.2): the first one carries our packets.
    pub(crate) incoming_streams: Option<ReadableStreamDefaultReader>,
}

/// How the gateway sends us packets (PROTOCOL.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Downlink {
    /// Datagrams as they come.
    Datagrams,
    /// Sequenced datagrams, with loss repaired on the hop (§3.1).
    Repaired,
    /// A unidirectional stream (§3.2).
    Stream,
}

/// `String(error)` of a JS exception, for messages.
pub(crate) fn js_message(error: &JsValue) -> String {
    js_sys::JSON::stringify(error)
        .ok()
        .and_then(|s| s.as_string())
        .filter(|s| s != "{}")
        .or_else(|| {
            error
                .dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
        })
        .or_else(|| error.as_string())
        .unwrap_or_else(|| format!("{error:?}"))
}

/// `url` with `resume=<ticket in hex>` added to its query (the gateway gives a lost session's
/// addresses back to the holder of its ticket).
pub(crate) fn resume_url(url: &str, ticket: &[u8]) -> String {
    let hex: String = ticket.iter().map(|b| format!("{b:02x}")).collect();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}resume={hex}")
}

/// Opens the WebTransport session to `url` and runs the handshake up to `ADDRESS_ASSIGN`.
///
/// `certificate_hashes` is passed to the browser unchanged as `serverCertificateHashes`
/// (`[{ algorithm: "sha-256", value: BufferSource }]`), or ignored when `undefined`.
pub(crate) async fn open(
    url: &str,
    certificate_hashes: &JsValue,
    downlink: Downlink,
) -> Result<Opened, SessionError> {
    let connect = |e: JsValue| SessionError::Connect(js_message(&e));
    let options = WebTransportOptions::new();
    if !certificate_hashes.is_undefined() && !certificate_hashes.is_null() {
        Reflect::set(
            &options,
            &JsValue::from_str("serverCertificateHashes"),
            certificate_hashes,
        )
        .map_err(connect)?;
    }
    let transport = WebTransport::new_with_options(url, &options).map_err(connect)?;
    JsFuture::from(transport.ready()).await.map_err(connect)?;

    let datagrams = transport.datagrams();
    datagrams.set_incoming_high_water_mark(DATAGRAM_HIGH_WATER_MARK);
    datagrams.set_outgoing_high_water_mark(DATAGRAM_HIGH_WATER_MARK);
    datagrams.set_outgoing_max_age(OUTGOING_MAX_AGE_MS);
    let datagram_reader: ReadableStreamDefaultReader =
        datagrams.readable().get_reader().unchecked_into();
    let datagram_writer = datagrams.writable().get_writer().map_err(connect)?;

    let stream: WebTransportBidirectionalStream =
        JsFuture::from(transport.create_bidirectional_stream())
            .await
            .map_err(connect)?
            .unchecked_into();
    let control_writer = stream.writable().get_writer().map_err(connect)?;
    let control_reader: ReadableStreamDefaultReader =
        stream.readable().get_reader().unchecked_into();
    let mut hello = Vec::new();
    ControlMessage::ClientHello {
        version: PROTOCOL_VERSION,
    }
    .emit(&mut hello);
    match downlink {
        Downlink::Datagrams => {}
        Downlink::Repaired => ControlMessage::LinkRepair.emit(&mut hello),
        Downlink::Stream => ControlMessage::LinkStream {
            max_packet: webnic_stack::link_stream::MAX_PACKET,
        }
        .emit(&mut hello),
    }
    // Taken before the hello goes out, so the gateway's stream cannot be missed.
    let incoming_streams = (downlink == Downlink::Stream).then(|| {
        transport
            .incoming_unidirectional_streams()
            .get_reader()
            .unchecked_into::<ReadableStreamDefaultReader>()
    });
    JsFuture::from(control_writer.write_with_chunk(&Uint8Array::from(&hello[..])))
        .await
        .map_err(connect)?;

    let mut decoder = CapsuleDecoder::new();
    let announced = match read_configuration(&transport, &control_reader, &mut decoder).await {
        Ok(announced) => announced,
        Err(error) => {
            // The gateway waits for us to close before it closes, so that its reason is read
            // before the browser errors the stream holding it; closing now ends its wait.
            transport.close();
            return Err(error);
        }
    };
    Ok(Opened {
        transport,
        announced,
        control_reader,
        control_decoder: decoder,
        control_writer,
        datagram_reader,
        datagram_writer,
        incoming_streams,
    })
}

/// Reads one chunk of a byte stream; `None` at its end.
pub(crate) async fn read_chunk(
    reader: &ReadableStreamDefaultReader,
) -> Result<Option<Uint8Array>, JsValue> {
    let result: ReadableStreamReadResult = JsFuture::from(reader.read()).await?.unchecked_into();
    if result.get_done().unwrap_or(false) {
        return Ok(None);
    }
    Ok(Some(result.get_value().unchecked_into()))
}

/// The gateway's reason code from the session's close, if it gave one.
pub(crate) async fn close_reason(transport: &WebTransport) -> Option<SessionError> {
    let info: web_sys::WebTransportCloseInfo = JsFuture::from(transport.closed())
        .await
        .ok()?
        .unchecked_into();
    let code = Reflect::get(&info, &JsValue::from_str("closeCode"))
        .ok()?
        .as_f64()?;
    let reason = Reflect::get(&info, &JsValue::from_str("reason"))
        .ok()
        .and_then(|r| r.as_string())
        .unwrap_or_default();
    Some(SessionError::Closed {
        code: CloseCode::from_u32(code as u32),
        reason,
    })
}

async fn read_configuration(
    transport: &WebTransport,
    reader: &ReadableStreamDefaultReader,
    decoder: &mut CapsuleDecoder,
) -> Result<Announced, SessionError> {
    let mut announced = Announced::default();
    let mut hello_seen = false;
    loop {
        while let Some(message) = decoder
            .next_message()
            .map_err(|e| SessionError::Protocol(e.to_string()))?
        {
            match message {
                ControlMessage::ServerHello { version } => {
                    if version != PROTOCOL_VERSION {
                        return Err(SessionError::Protocol(format!(
                            "gateway speaks version {version}, we speak {PROTOCOL_VERSION}"
                        )));
                    }
                    hello_seen = true;
                }
                ControlMessage::LinkMtu(mtu) => announced.mtu = Some(mtu),
                ControlMessage::DnsServers(servers) => announced.dns = servers,
                ControlMessage::AddressAssign(addresses) => {
                    for a in addresses {
                        match a.address {
                            IpAddr::V4(v4) => announced.ipv4 = Some(v4),
                            IpAddr::V6(v6) => announced.ipv6 = Some(v6),
                        }
                    }
                    if !hello_seen {
                        return Err(SessionError::Protocol("ADDRESS_ASSIGN before hello".into()));
                    }
                    return Ok(announced);
                }
                ControlMessage::Close { code, reason } => {
                    return Err(SessionError::Closed { code, reason });
                }
                ControlMessage::SessionTicket(ticket) => announced.ticket = Some(ticket),
                ControlMessage::RouteAdvertisement(_)
                | ControlMessage::ClientHello { .. }
                | ControlMessage::LinkRepair
                | ControlMessage::LinkStream { .. }
                | ControlMessage::Draining { .. }
                | ControlMessage::Unknown { .. } => {}
            }
        }
        match read_chunk(reader).await {
            Ok(Some(chunk)) => decoder.extend(&chunk.to_vec()),
            Ok(None) | Err(_) => {
                // The gateway may have refused the session with a reason code instead.
                return Err(close_reason(transport).await.unwrap_or_else(|| {
                    SessionError::Protocol("control stream ended during the handshake".into())
                }));
            }
        }
    }
}
