//! A Linux TAP device on a session: the kernel (or a VM attached to the TAP) is the guest.
//!
//! [`TapDevice`] opens `/dev/net/tun` in TAP mode (Ethernet frames, no packet-info header).
//! [`run`] pumps frames between it and a [`RawSession`] through webnic-stack's
//! [`EthernetAdapter`]: the guest gets its address by DHCP (or SLAAC for IPv6), its ARP and
//! neighbour solicitations are answered, and its IP packets travel as the session's.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let options = webnic::ConnectOptions::new("https://gateway.example:4433/webnic");
//! let session = webnic::RawSession::connect(options).await?;
//! let tap = webnic::tap::TapDevice::create("webnic0")?;
//! // Now: `ip link set webnic0 up; udhcpc -i webnic0` (or move it into a namespace or VM first).
//! webnic::tap::run(session, tap, |event| eprintln!("{event}")).await
//! # }
//! ```

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use webnic_stack::ethernet::{DropReason, EthernetAdapter, EthernetConfig, EthernetEvent};

use crate::RawSession;

/// `TUNSETIFF` from `<linux/if_tun.h>`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Read buffer: larger than any frame a guest with a sane MTU sends (jumbo frames included).
const FRAME_BUFFER: usize = 65_536;

/// A TAP device opened by this process; the kernel removes it when the fd closes.
#[derive(Debug)]
pub struct TapDevice {
    fd: AsyncFd<OwnedFd>,
    name: String,
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name and the flags, padded to its full size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl TapDevice {
    /// Creates (or attaches to) TAP device `name`. Needs `CAP_NET_ADMIN`. The device starts
    /// down; bring it up with `ip link set NAME up`, in this namespace or after moving it.
    ///
    /// # Errors
    /// The OS error of opening `/dev/net/tun` or of the ioctl; `InvalidInput` for a name that
    /// does not fit `IFNAMSIZ`.
    pub fn create(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        // SAFETY: a NUL-terminated path and valid flags; the result is checked.
        let raw = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out in full.
        let result = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut request) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = request
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(libc::IFNAMSIZ);
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it until it drops; nothing
        // else closes or replaces it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(io::Error::other)?;
        Ok(Self {
            fd,
            name: String::from_utf8_lossy(&request.name[..len]).into_owned(),
        })
    }

    /// The interface name the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`.
    ///
    /// # Errors
    /// The OS error of `read`.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: `buf` is valid for `buf.len()` writable bytes.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(result) = result {
                return result;
            }
        }
    }

    /// Writes one frame.
    ///
    /// # Errors
    /// The OS error of `write` (e.g. `EIO` while the device is down: the frame is lost).
    pub async fn write(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: `frame` is valid for `frame.len()` bytes.
                let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Ok(result) = result {
                return result;
            }
        }
    }
}

/// The adapter configuration for `session`: its addresses, MTU and resolvers.
pub fn adapter_config(session: &RawSession) -> EthernetConfig {
    let mut config = EthernetConfig::new(session.mtu());
    config.ipv4 = session.ipv4();
    config.ipv6 = session.ipv6();
    config.dns_servers = session.dns_servers().to_vec();
    config
}

/// Pumps frames between `tap` and `session` until either ends; `on_event` sees what the
/// adapter learns and answers (guest MAC, DHCP exchanges, the guest's IPv6 address).
///
/// # Errors
/// The session's error, or the TAP's I/O error.
pub async fn run(
    session: RawSession,
    tap: TapDevice,
    on_event: impl Fn(EthernetEvent) + Send + Sync + 'static,
) -> io::Result<()> {
    let adapter = Arc::new(Mutex::new(EthernetAdapter::new(adapter_config(&session))));
    let tap = Arc::new(tap);
    let on_event = Arc::new(on_event);
    let mut up = tokio::spawn(guest_to_session(
        session.clone(),
        tap.clone(),
        adapter.clone(),
        on_event.clone(),
    ));
    let mut down = tokio::spawn(session_to_guest(session, tap, adapter.clone()));
    let result = tokio::select! {
        result = &mut up => result,
        result = &mut down => result,
    };
    up.abort();
    down.abort();
    let stats = lock(&adapter).stats();
    let drops: Vec<String> = DropReason::ALL
        .iter()
        .filter(|r| stats.dropped(**r) > 0)
        .map(|r| format!("{}={}", r.name(), stats.dropped(*r)))
        .collect();
    tracing::info!(?stats, drops = %drops.join(" "), "tap stopped");
    result.map_err(io::Error::other)?
}

fn lock(adapter: &Mutex<EthernetAdapter>) -> std::sync::MutexGuard<'_, EthernetAdapter> {
    adapter.lock().unwrap_or_else(|e| e.into_inner())
}

async fn guest_to_session(
    session: RawSession,
    tap: Arc<TapDevice>,
    adapter: Arc<Mutex<EthernetAdapter>>,
    on_event: Arc<impl Fn(EthernetEvent) + Send + Sync + 'static>,
) -> io::Result<()> {
    let mut buf = vec![0u8; FRAME_BUFFER];
    let mut replies = Vec::new();
    loop {
        let n = tap.read(&mut buf).await?;
        let packet = {
            let mut adapter = lock(&adapter);
            let packet = adapter.handle_frame(&mut buf[..n]);
            while let Some(reply) = adapter.poll_frame() {
                replies.push(reply);
            }
            while let Some(event) = adapter.poll_event() {
                on_event(event);
            }
            packet
        };
        if let Some(packet) = packet
            && let Err(error) = session.send(packet).await
        {
            if error.kind() != io::ErrorKind::InvalidInput {
                return Err(error);
            }
            tracing::debug!(%error, "packet dropped");
        }
        for reply in replies.drain(..) {
            tap.write(&reply).await?;
        }
    }
}

async fn session_to_guest(
    session: RawSession,
    tap: Arc<TapDevice>,
    adapter: Arc<Mutex<EthernetAdapter>>,
) -> io::Result<()> {
    let mut frame = Vec::with_capacity(FRAME_BUFFER);
    loop {
        let packet = session.recv().await?;
        if lock(&adapter).encapsulate(&packet, &mut frame)
            && let Err(error) = tap.write(&frame).await
        {
            // EIO: the device is down (e.g. still being moved into its namespace).
            if error.raw_os_error() != Some(libc::EIO) {
                return Err(error);
            }
        }
    }
}
