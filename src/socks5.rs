//! Local front doors into the tunnel: a SOCKS5 server (CONNECT and UDP ASSOCIATE, RFC 1928)
//! and `ssh -L`-style port forwards, so unmodified tools (curl, ssh, git, mosquitto clients)
//! use webnic.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Client, UdpSocket};

/// A SOCKS5 destination: an address or a name to resolve through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An address literal.
    Addr(SocketAddr),
    /// A host name and port.
    Name(String, u16),
}

impl Destination {
    /// Parses `HOST:PORT` or `[V6]:PORT`.
    ///
    /// # Errors
    /// `InvalidInput` when there is no port.
    pub fn parse(text: &str) -> io::Result<Self> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self::Addr(addr));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "expected HOST:PORT"))?;
        let port = port
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad port"))?;
        Ok(Self::Name(host.to_owned(), port))
    }

    async fn connect(&self, client: &Client) -> io::Result<crate::TcpStream> {
        match self {
            Self::Addr(addr) => client.tcp_connect(*addr).await,
            Self::Name(host, port) => client.tcp_connect_host(host, *port).await,
        }
    }

    async fn resolve(&self, client: &Client) -> io::Result<SocketAddr> {
        match self {
            Self::Addr(addr) => Ok(*addr),
            Self::Name(host, port) => {
                let ip =
                    match client.resolve_ipv4(host).await {
                        Ok(v4) if !v4.is_empty() => IpAddr::V4(v4[0]),
                        _ => IpAddr::V6(*client.resolve_ipv6(host).await?.first().ok_or_else(
                            || io::Error::new(io::ErrorKind::NotFound, "no address"),
                        )?),
                    };
                Ok(SocketAddr::new(ip, *port))
            }
        }
    }
}

/// Forwards every connection accepted on `listener` to `target` through the tunnel.
///
/// # Errors
/// Only when accepting on the local listener fails; per-connection failures are logged.
pub async fn forward(client: Client, listener: TcpListener, target: Destination) -> io::Result<()> {
    let target = Arc::new(target);
    loop {
        let (mut local, from) = listener.accept().await?;
        let client = client.clone();
        let target = target.clone();
        tokio::spawn(async move {
            match target.connect(&client).await {
                Ok(mut remote) => {
                    if let Err(error) = tokio::io::copy_bidirectional(&mut local, &mut remote).await
                    {
                        tracing::debug!(%from, %error, "forwarded connection ended with an error");
                    }
                }
                Err(error) => {
                    tracing::warn!(%from, target = ?target, %error, "forward: connect failed");
                }
            }
        });
    }
}

/// Serves SOCKS5 on `listener` until it fails.
///
/// # Errors
/// Only when accepting on the local listener fails; per-connection failures are logged.
pub async fn serve(client: Client, listener: TcpListener) -> io::Result<()> {
    loop {
        let (stream, from) = listener.accept().await?;
        let client = client.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(client, stream).await {
                tracing::debug!(%from, %error, "socks5 session ended with an error");
            }
        });
    }
}

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const CMD_CONNECT: u8 = 1;
const CMD_UDP_ASSOCIATE: u8 = 3;
const ATYP_V4: u8 = 1;
const ATYP_NAME: u8 = 3;
const ATYP_V6: u8 = 4;
const REP_OK: u8 = 0;
const REP_FAILURE: u8 = 1;
const REP_NETWORK_UNREACHABLE: u8 = 3;
const REP_HOST_UNREACHABLE: u8 = 4;
const REP_REFUSED: u8 = 5;
const REP_TTL_EXPIRED: u8 = 6;
const REP_COMMAND_UNSUPPORTED: u8 = 7;

async fn handle(client: Client, mut stream: TcpStream) -> io::Result<()> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        stream.write_all(&[VERSION, 0xff]).await?;
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "client requires auth",
        ));
    }
    stream.write_all(&[VERSION, NO_AUTH]).await?;

    let mut request = [0u8; 4];
    stream.read_exact(&mut request).await?;
    let destination = read_address(&mut stream, request[3]).await?;
    match request[1] {
        CMD_CONNECT => match destination.connect(&client).await {
            Ok(mut remote) => {
                reply(&mut stream, REP_OK, remote.local_addr()).await?;
                tokio::io::copy_bidirectional(&mut stream, &mut remote).await?;
                Ok(())
            }
            Err(error) => {
                reply(&mut stream, reply_code(&error), unspecified()).await?;
                Err(error)
            }
        },
        CMD_UDP_ASSOCIATE => udp_associate(client, stream).await,
        _ => {
            reply(&mut stream, REP_COMMAND_UNSUPPORTED, unspecified()).await?;
            Ok(())
        }
    }
}

async fn read_address(stream: &mut TcpStream, atyp: u8) -> io::Result<Destination> {
    match atyp {
        ATYP_V4 => {
            let mut b = [0u8; 6];
            stream.read_exact(&mut b).await?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Ok(Destination::Addr(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([b[4], b[5]]),
            )))
        }
        ATYP_V6 => {
            let mut b = [0u8; 18];
            stream.read_exact(&mut b).await?;
            let ip: [u8; 16] = b[..16].try_into().expect("16 bytes");
            Ok(Destination::Addr(SocketAddr::new(
                Ipv6Addr::from(ip).into(),
                u16::from_be_bytes([b[16], b[17]]),
            )))
        }
        ATYP_NAME => {
            let len = stream.read_u8().await?;
            let mut name = vec![0u8; usize::from(len) + 2];
            stream.read_exact(&mut name).await?;
            let port = u16::from_be_bytes([name[name.len() - 2], name[name.len() - 1]]);
            name.truncate(usize::from(len));
            let name = String::from_utf8(name)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "name is not UTF-8"))?;
            Ok(Destination::Name(name, port))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad address type",
        )),
    }
}

fn encode_address(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            out.push(ATYP_V4);
            out.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out.push(ATYP_V6);
            out.extend_from_slice(&v6.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

async fn reply(stream: &mut TcpStream, code: u8, bound: SocketAddr) -> io::Result<()> {
    let mut out = vec![VERSION, code, 0];
    encode_address(&mut out, bound);
    stream.write_all(&out).await
}

fn unspecified() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
}

fn reply_code(error: &io::Error) -> u8 {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => REP_REFUSED,
        io::ErrorKind::TimedOut => REP_TTL_EXPIRED,
        io::ErrorKind::NetworkUnreachable => REP_NETWORK_UNREACHABLE,
        io::ErrorKind::NotFound => REP_HOST_UNREACHABLE,
        _ => REP_FAILURE,
    }
}

/// UDP ASSOCIATE: a local UDP relay that lives as long as the control connection.
async fn udp_associate(client: Client, mut control: TcpStream) -> io::Result<()> {
    let local_ip = control.local_addr()?.ip();
    let relay = tokio::net::UdpSocket::bind(SocketAddr::new(local_ip, 0)).await?;
    let tunnel = client.udp_bind(0).await?;
    reply(&mut control, REP_OK, relay.local_addr()?).await?;
    let mut peer: Option<SocketAddr> = None;
    let mut from_app = vec![0u8; 65_536];
    let mut from_tunnel = vec![0u8; 65_536];
    let mut control_buf = [0u8; 64];
    loop {
        tokio::select! {
            received = relay.recv_from(&mut from_app) => {
                let (n, from) = received?;
                // The first sender owns the association (RFC 1928 §7 allows filtering).
                if peer.is_some_and(|p| p != from) {
                    continue;
                }
                peer = Some(from);
                if let Err(error) = relay_outbound(&client, &tunnel, &from_app[..n]).await {
                    tracing::debug!(%error, "socks5 udp: datagram not sent");
                }
            }
            received = tunnel.recv_from(&mut from_tunnel) => {
                let (n, from) = received?;
                if let Some(peer) = peer {
                    let mut out = vec![0, 0, 0];
                    encode_address(&mut out, from);
                    out.extend_from_slice(&from_tunnel[..n]);
                    relay.send_to(&out, peer).await?;
                }
            }
            read = control.read(&mut control_buf) => {
                if read? == 0 {
                    return Ok(());
                }
            }
        }
    }
}

async fn relay_outbound(client: &Client, tunnel: &UdpSocket, datagram: &[u8]) -> io::Result<()> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidData, "bad SOCKS5 UDP header");
    if datagram.len() < 4 || datagram[2] != 0 {
        // Fragmentation (FRAG != 0) is optional in RFC 1928; like most servers we drop it.
        return Err(invalid());
    }
    let (destination, payload) = match datagram[3] {
        ATYP_V4 if datagram.len() >= 10 => {
            let ip = Ipv4Addr::new(datagram[4], datagram[5], datagram[6], datagram[7]);
            let port = u16::from_be_bytes([datagram[8], datagram[9]]);
            (
                Destination::Addr(SocketAddr::new(ip.into(), port)),
                &datagram[10..],
            )
        }
        ATYP_V6 if datagram.len() >= 22 => {
            let ip: [u8; 16] = datagram[4..20].try_into().expect("16 bytes");
            let port = u16::from_be_bytes([datagram[20], datagram[21]]);
            (
                Destination::Addr(SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
                &datagram[22..],
            )
        }
        ATYP_NAME if datagram.len() >= 5 => {
            let len = usize::from(datagram[4]);
            let end = 5 + len;
            let name = datagram.get(5..end).ok_or_else(invalid)?;
            let port = datagram.get(end..end + 2).ok_or_else(invalid)?;
            let name = std::str::from_utf8(name).map_err(|_| invalid())?.to_owned();
            (
                Destination::Name(name, u16::from_be_bytes([port[0], port[1]])),
                &datagram[end + 2..],
            )
        }
        _ => return Err(invalid()),
    };
    let target = destination.resolve(client).await?;
    tunnel.send_to(payload, target).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse() {
        assert_eq!(
            Destination::parse("10.0.0.1:80").unwrap(),
            Destination::Addr("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            Destination::parse("[fd00::1]:22").unwrap(),
            Destination::Addr("[fd00::1]:22".parse().unwrap())
        );
        assert_eq!(
            Destination::parse("web.test:8080").unwrap(),
            Destination::Name("web.test".into(), 8080)
        );
        assert!(Destination::parse("web.test").is_err());
    }
}
