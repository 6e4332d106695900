//! The TUN device: creation, addressing, routes and IP forwarding.
//!
//! Offloads: the device is opened with a virtio-net header (`IFF_VNET_HDR`) and TCP
//! segmentation offload (`TUNSETOFFLOAD`), so the kernel hands over a server's TSO burst (or a
//! NIC's GRO aggregate) as one coalesced packet of up to 64 KiB instead of one read per segment;
//! [`crate::offload`] finishes or cuts it. `--no-tun-offload` turns this off.
//!
//! MTU handling: Linux disables IPv6 on a device whose MTU is below 1280, so the device MTU is
//! `max(link MTU, 1280)`. For IPv4 the route to the client pool carries the link MTU
//! (`ip route replace <pool> dev <tun> mtu <link MTU>`), so the kernel itself fragments
//! forwarded packets or answers with ICMP "fragmentation needed". IPv6 has no such route MTU
//! below 1280, so the gateway relies on TCP MSS clamping; non-TCP IPv6 packets above the link
//! MTU are dropped and counted (`oversize`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

use crate::offload::{Gso, VNET_HDR_LEN, VnetHeader};
use crate::pool::Cidr;
use crate::sys::{self, CommandError, SysctlError, SysctlGuard};

/// Why the TUN device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// No CAP_NET_ADMIN.
    #[error(
        "webnic-gateway needs CAP_NET_ADMIN (run as root) to create the TUN device {name}: {source}"
    )]
    Permission {
        /// The device name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tun crate failed.
    #[error("cannot create the TUN device {name}: {source}")]
    Create {
        /// The device name.
        name: String,
        /// The error.
        source: tun::Error,
    },
    /// An `ip` command failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// A sysctl could not be set.
    #[error(transparent)]
    Sysctl(#[from] SysctlError),
}

/// What the TUN device needs to know.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Device name.
    pub name: String,
    /// IPv4 pool (the device gets its first host address).
    pub pool_v4: Cidr,
    /// IPv6 pool, if any.
    pub pool_v6: Option<Cidr>,
    /// Link MTU of the sessions.
    pub link_mtu: u16,
    /// Whether to ask the kernel for coalesced TCP packets (see the module documentation).
    pub offload: bool,
}

/// Packets the kernel may queue for the gateway to read (the device's `txqueuelen`).
///
/// The default, 500, is about 5 ms of a 1 Gbit/s download: with 1,000 busy sessions on 2
/// cores the gateway's reader is off the CPU longer than that, and every overflow (the device's
/// TX `dropped`) is a lost packet that the server's TCP recovers by timeout. 4,096 packets are
/// at most 5 MB of queue.
pub const TX_QUEUE_LEN: u32 = 4096;

/// The TUN device plus what the gateway changed in the system for it.
///
/// Dropping it closes the device (which removes it and its routes) and restores the
/// forwarding sysctls.
#[derive(Debug)]
pub struct TunDevice {
    device: TunIo,
    name: String,
    sysctls: SysctlGuard,
}

impl TunDevice {
    /// Creates and configures the device and enables IP forwarding.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`TunError`]; [`TunError::Permission`] without CAP_NET_ADMIN.
    pub fn create(config: &TunConfig) -> Result<Self, TunError> {
        let name = config.name.clone();
        let IpAddr::V4(gateway_v4) = config.pool_v4.gateway_address() else {
            unreachable!("pool_v4 is validated as IPv4 by the configuration");
        };
        let device_mtu = if config.pool_v6.is_some() {
            config.link_mtu.max(1280)
        } else {
            config.link_mtu
        };
        let mut tun_config = tun::Configuration::default();
        tun_config
            .tun_name(&name)
            .layer(tun::Layer::L3)
            .address(gateway_v4)
            .netmask(prefix_mask_v4(config.pool_v4.prefix_len))
            .mtu(device_mtu);
        tun_config.platform_config(|platform| {
            platform.vnet_hdr(config.offload);
        });
        let device = tun::create(&tun_config).map_err(|source| match source {
            tun::Error::Io(io)
                if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) =>
            {
                TunError::Permission {
                    name: name.clone(),
                    source: io,
                }
            }
            source => TunError::Create {
                name: name.clone(),
                source,
            },
        })?;
        let offload = config.offload && enable_offload(&device, &name);
        device.set_nonblock().map_err(|source| TunError::Create {
            name: name.clone(),
            source: source.into(),
        })?;
        // SAFETY: the tun device owns its fd and closes it only when dropped, which happens
        // when (and only when) the AsyncFd is dropped.
        let device = unsafe { AsyncFd::register(device) }.map_err(|error| TunError::Create {
            name: name.clone(),
            source: std::io::Error::from(error).into(),
        })?;
        let mut this = Self {
            device: TunIo {
                device: Arc::new(device),
                vnet_hdr: config.offload,
                offload,
            },
            name,
            sysctls: SysctlGuard::new(),
        };
        this.configure(config, gateway_v4, device_mtu)?;
        Ok(this)
    }

    fn configure(
        &mut self,
        config: &TunConfig,
        gateway_v4: Ipv4Addr,
        device_mtu: u16,
    ) -> Result<(), TunError> {
        let name = self.name.clone();
        let disable_ipv6 = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"));
        match config.pool_v6 {
            None => {
                // No IPv6 on the device: stop the kernel's router solicitations and link-local
                // noise. A kernel without IPv6 has no such file, which is fine.
                if disable_ipv6.exists() {
                    sys::write_sysctl(&disable_ipv6, "1")?;
                }
            }
            Some(pool_v6) => {
                if disable_ipv6.exists() {
                    sys::write_sysctl(&disable_ipv6, "0")?;
                    // A point-to-point TUN has no routers to solicit and needs no link-local
                    // address; both would only send kernel noise into the tunnel (counted as
                    // `no_route`).
                    let conf = format!("/proc/sys/net/ipv6/conf/{name}");
                    sys::write_sysctl(Path::new(&format!("{conf}/router_solicitations")), "0")?;
                    sys::write_sysctl(Path::new(&format!("{conf}/addr_gen_mode")), "1")?;
                }
                let address = format!("{}/{}", pool_v6.gateway_address(), pool_v6.prefix_len);
                // The kernel adds the on-link route for the prefix with the address.
                // nodad: the address is ours alone; DAD would leave it tentative for a second.
                sys::run(
                    "ip",
                    &["-6", "addr", "replace", &address, "dev", &name, "nodad"],
                    None,
                )?;
            }
        }
        let queue = TX_QUEUE_LEN.to_string();
        sys::run(
            "ip",
            &["link", "set", "dev", &name, "txqueuelen", &queue, "up"],
            None,
        )?;
        let pool = config.pool_v4.to_string();
        let mtu = config.link_mtu.to_string();
        let src = gateway_v4.to_string();
        sys::run(
            "ip",
            &[
                "route", "replace", &pool, "dev", &name, "mtu", &mtu, "src", &src,
            ],
            None,
        )?;
        if self.sysctls.set("/proc/sys/net/ipv4/ip_forward", "1")? {
            tracing::info!("enabled IPv4 forwarding (net.ipv4.ip_forward=1); restored on exit");
        }
        if config.pool_v6.is_some()
            && self
                .sysctls
                .set("/proc/sys/net/ipv6/conf/all/forwarding", "1")?
        {
            tracing::info!(
                "enabled IPv6 forwarding (net.ipv6.conf.all.forwarding=1); restored on exit"
            );
        }
        tracing::info!(
            tun = %name,
            address = %gateway_v4,
            pool_v4 = %config.pool_v4,
            pool_v6 = ?config.pool_v6.map(|p| p.to_string()),
            device_mtu,
            link_mtu = config.link_mtu,
            "TUN device up"
        );
        Ok(())
    }

    /// The device, shareable: `recv` and `send` take `&self`, so one reader task and any
    /// number of writers can use it concurrently.
    pub fn device(&self) -> TunIo {
        self.device.clone()
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Restores the sysctls now (dropping the device also does).
    pub fn restore_sysctls(&mut self) {
        self.sysctls.restore();
    }
}

/// Turns on checksum and TCP segmentation offload for the device; `false` (logged) if the
/// kernel refuses, in which case packets still carry the (then empty) virtio-net header.
fn enable_offload(device: &tun::Device, name: &str) -> bool {
    use std::os::fd::AsRawFd;
    let flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory of ours; the fd is
    // the open TUN device.
    let result = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    };
    if result < 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(tun = %name, %error, "TUN offload refused: one read per packet");
        return false;
    }
    true
}

/// A shared handle for reading and writing packets on the TUN device.
///
/// Reads and writes take `&self` and wait on separate readiness (readable/writable) of one
/// `AsyncFd`, so one reader task and any number of writer tasks can use clones of this handle
/// concurrently. The device closes when the last clone is dropped.
#[derive(Clone)]
pub struct TunIo {
    device: Arc<AsyncFd<tun::Device>>,
    /// Every packet carries a virtio-net header.
    vnet_hdr: bool,
    /// The kernel may hand over coalesced packets.
    offload: bool,
}

impl TunIo {
    /// Reads one packet into `buf` so that it starts at `buf[packet_at]` (the virtio-net header,
    /// if any, goes just before it), returning its header and length.
    ///
    /// # Panics
    /// If `packet_at < VNET_HDR_LEN`.
    ///
    /// # Errors
    /// The OS error.
    pub async fn recv(
        &self,
        buf: &mut [u8],
        packet_at: usize,
    ) -> std::io::Result<(VnetHeader, usize)> {
        let start = if self.vnet_hdr {
            packet_at - VNET_HDR_LEN
        } else {
            packet_at
        };
        loop {
            let mut guard = self.device.readable().await?;
            let n = match guard.try_io(|device| device.get_ref().recv(&mut buf[start..])) {
                Ok(result) => result?,
                Err(_would_block) => continue,
            };
            if !self.vnet_hdr {
                return Ok((PLAIN, n));
            }
            let Some(len) = n.checked_sub(VNET_HDR_LEN) else {
                return Err(std::io::Error::other("TUN read shorter than its header"));
            };
            let mut header = [0u8; VNET_HDR_LEN];
            header.copy_from_slice(&buf[start..packet_at]);
            return Ok((VnetHeader::parse(&header), len));
        }
    }

    /// Writes one packet (complete, with valid checksums).
    ///
    /// # Errors
    /// The OS error.
    pub async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.device.writable().await?;
            let result = guard.try_io(|device| {
                if self.vnet_hdr {
                    write_with_header(device.get_ref(), packet)
                } else {
                    device.get_ref().send(packet)
                }
            });
            match result {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Whether the kernel may hand over coalesced packets.
    pub fn offload(&self) -> bool {
        self.offload
    }
}

/// The header of a packet read without offloads.
const PLAIN: VnetHeader = VnetHeader {
    needs_csum: false,
    gso: Gso::None,
    gso_size: 0,
    csum_start: 0,
    csum_offset: 0,
};

/// Writes `packet` behind an all-zero virtio-net header (no offload asked), without copying it.
fn write_with_header(device: &tun::Device, packet: &[u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    static HEADER: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];
    let iov = [
        libc::iovec {
            iov_base: HEADER.as_ptr() as *mut libc::c_void,
            iov_len: VNET_HDR_LEN,
        },
        libc::iovec {
            iov_base: packet.as_ptr() as *mut libc::c_void,
            iov_len: packet.len(),
        },
    ];
    // SAFETY: both iovecs point to live buffers of the given lengths that the kernel only
    // reads (writev does not write through them despite the `*mut`); the fd is the open device.
    let n = unsafe { libc::writev(device.as_raw_fd(), iov.as_ptr(), 2) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((n as usize).saturating_sub(VNET_HDR_LEN))
}

impl std::fmt::Debug for TunIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunIo")
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

fn prefix_mask_v4(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_mask_v4(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_mask_v4(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(prefix_mask_v4(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
