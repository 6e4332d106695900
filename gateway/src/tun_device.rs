//! The TUN device: creation, addressing, routes and IP forwarding.
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
        let device = tun::create_as_async(&tun_config).map_err(|source| match source {
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
        let mut this = Self {
            device: TunIo {
                device: Arc::new(device),
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

/// A shared handle for reading and writing packets on the TUN device.
///
/// tun 0.8's `AsyncDevice::recv`/`send` take `&self` and wait on separate readiness
/// (readable/writable) of one `AsyncFd`, so one reader task and any number of writer tasks can
/// use clones of this handle concurrently. The device closes when the last clone is dropped.
#[derive(Clone)]
pub struct TunIo {
    device: Arc<tun::AsyncDevice>,
}

impl TunIo {
    /// Reads one packet into `buf`, returning its length.
    ///
    /// # Errors
    /// The OS error.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.device.recv(buf).await
    }

    /// Writes one packet.
    ///
    /// # Errors
    /// The OS error.
    pub async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        self.device.send(packet).await
    }
}

impl std::fmt::Debug for TunIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunIo").finish_non_exhaustive()
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
