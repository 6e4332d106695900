//! The QUIC endpoint's UDP socket, with kernel buffers sized for a tunnel.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Kernel socket buffer asked for in each direction.
///
/// The default (`net.core.rmem_default`, ≈ 208 KiB) holds only ~160 small packets because the
/// kernel charges each one its full buffer size: a burst of client datagrams overflows it and
/// every drop is a lost IP packet inside the tunnel. Measured before this: `UdpRcvbufErrors`
/// rising and inner TCP retransmitting during uploads. 32 MiB rather than 8: with 1,000 busy
/// sessions (each QUIC connection keeps at least two packets in flight, and the kernel charges
/// a 1.2 KB datagram about 2.3 KB) 8 MiB overflowed whenever the gateway was off the CPU for a
/// moment (`UdpRcvbufErrors` 37,626 of 317,039 in 15 s; 0 with 32 MiB in the same run). Memory is
/// only taken while packets wait.
pub const SOCKET_BUFFER: usize = 32 * 1024 * 1024;

/// Binds `address` and enlarges its buffers: `SO_RCVBUFFORCE` when privileged (root may exceed
/// `net.core.rmem_max`), else `SO_RCVBUF` up to the system's cap.
///
/// # Errors
/// The bind error; buffer sizing is best effort and only logged.
pub fn bind(address: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(address)?;
    for (force, plain, name) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
    ] {
        if set_buffer(&socket, force).is_err() && set_buffer(&socket, plain).is_err() {
            tracing::warn!(direction = name, "could not enlarge the UDP socket buffer");
        }
    }
    Ok(socket)
}

fn set_buffer(socket: &UdpSocket, option: libc::c_int) -> std::io::Result<()> {
    let size = libc::c_int::try_from(SOCKET_BUFFER).expect("fits in c_int");
    // SAFETY: a valid fd, a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            std::ptr::from_ref(&size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
