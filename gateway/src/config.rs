//! Command line and configuration file.
//!
//! Every setting can come from the command line or from a TOML file (`--config`) with the same
//! names in snake_case; command-line values override the file's.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::policy::{DestRule, EgressPolicy, parse_ports};
use crate::pool::{Cidr, PoolError};

/// Default UDP listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default IPv4 client pool.
pub const DEFAULT_POOL_V4: &str = "10.77.0.0/24";
/// Default TUN device name.
pub const DEFAULT_TUN: &str = "webnic0";
/// Default link MTU: the largest IP packet carried in one datagram.
///
/// 1152 fits both limits a session meets on a fresh path: quinn's initial maximum datagram of
/// 1162 bytes (initial MTU 1200 minus QUIC overhead) less the HTTP/3 datagram header, and
/// Chromium's 1211-byte browser→server datagram limit. PMTU discovery may raise quinn's limit
/// later, and black-hole detection can drop it back, so the link MTU stays at the floor.
pub const DEFAULT_MTU: u16 = 1152;
/// Default QUIC idle timeout.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 30;
/// Default cap on IPv6 addresses handed out at once.
pub const DEFAULT_POOL_V6_LIMIT: u32 = 65_536;

/// webnic gateway: terminates WebTransport sessions on /webnic and forwards their IP packets
/// through a TUN device.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "webnic-gateway", version, about)]
pub struct Cli {
    /// TOML configuration file (keys as the long options, in snake_case).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UDP address to listen on [default: 0.0.0.0:4433]; `[::]:4433` for IPv6.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// IPv4 client address pool; its first host address is the gateway's [default: 10.77.0.0/24].
    #[arg(long, value_name = "CIDR")]
    pub pool_v4: Option<String>,
    /// IPv6 client address pool (IPv6 is off unless given), e.g. fd00:77::/112.
    #[arg(long, value_name = "CIDR")]
    pub pool_v6: Option<String>,
    /// Most IPv6 addresses handed out at once [default: 65536].
    #[arg(long, value_name = "N")]
    pub pool_v6_limit: Option<u32>,
    /// TUN device name [default: webnic0].
    #[arg(long, value_name = "NAME")]
    pub tun: Option<String>,
    /// Link MTU announced to clients [default: 1152, which fits quinn's 1162-byte datagrams on
    /// a fresh path and Chromium's 1211-byte browser→server limit].
    #[arg(long, value_name = "N")]
    pub mtu: Option<u16>,
    /// DNS resolver announced to clients (repeatable).
    #[arg(long, value_name = "IP")]
    pub dns: Vec<IpAddr>,
    /// Masquerade client traffic leaving through other interfaces (nftables).
    #[arg(long)]
    pub nat: bool,
    /// Certificate chain (PEM); default: a self-signed certificate valid 14 days.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Extra subject name for the self-signed certificate (repeatable).
    #[arg(long, value_name = "NAME")]
    pub hostname: Vec<String>,
    /// Extra allowed web origin, `scheme://host[:port]`, matched exactly (repeatable).
    #[arg(long, value_name = "ORIGIN")]
    pub allow_origin: Vec<String>,
    /// Serve Prometheus metrics over HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Write the certificate's SHA-256 (hex) here once the gateway is ready.
    #[arg(long, value_name = "PATH")]
    pub cert_hash_file: Option<PathBuf>,
    /// QUIC idle timeout in seconds [default: 30].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
    /// Allow destinations the default policy refuses: `CIDR[:PORTS]`, e.g. `10.1.2.0/24` or
    /// `fd00:1::/64:80,443` (repeatable). The gateway's own addresses stay refused.
    #[arg(long, value_name = "CIDR[:PORTS]")]
    pub allow_dest: Vec<String>,
    /// Refuse destinations, `CIDR[:PORTS]` (repeatable); wins over every allow rule.
    #[arg(long, value_name = "CIDR[:PORTS]")]
    pub deny_dest: Vec<String>,
    /// Allow TCP ports denied by default (25), e.g. `25` (repeatable).
    #[arg(long, value_name = "PORTS")]
    pub allow_port: Vec<String>,
    /// Refuse TCP/UDP destination ports everywhere, e.g. `6667` or `135-139` (repeatable).
    #[arg(long, value_name = "PORTS")]
    pub deny_port: Vec<String>,
    /// Let clients reach each other's pool addresses.
    #[arg(long)]
    pub allow_client_to_client: bool,
    /// Serve the demo page and the browser package over HTTP here (default 127.0.0.1:4480;
    /// keep it on localhost: the page gets sockets into the tunnel).
    #[arg(long, value_name = "ADDR")]
    pub demo_listen: Option<SocketAddr>,
    /// The browser package the demo serves (`js/`, `pkg/`, `demo/`; default: `wasm-client/` of
    /// the source tree the gateway was built from).
    #[arg(long, value_name = "DIR")]
    pub demo_dir: Option<PathBuf>,
    /// Do not serve the demo.
    #[arg(long)]
    pub no_demo: bool,
}

/// The configuration file: the same settings as [`Cli`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Cli::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`Cli::pool_v4`].
    pub pool_v4: Option<String>,
    /// See [`Cli::pool_v6`].
    pub pool_v6: Option<String>,
    /// See [`Cli::pool_v6_limit`].
    pub pool_v6_limit: Option<u32>,
    /// See [`Cli::tun`].
    pub tun: Option<String>,
    /// See [`Cli::mtu`].
    pub mtu: Option<u16>,
    /// See [`Cli::dns`].
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// See [`Cli::nat`].
    #[serde(default)]
    pub nat: bool,
    /// See [`Cli::cert`].
    pub cert: Option<PathBuf>,
    /// See [`Cli::key`].
    pub key: Option<PathBuf>,
    /// See [`Cli::hostname`].
    #[serde(default)]
    pub hostname: Vec<String>,
    /// See [`Cli::allow_origin`].
    #[serde(default)]
    pub allow_origin: Vec<String>,
    /// See [`Cli::metrics`].
    pub metrics: Option<SocketAddr>,
    /// See [`Cli::cert_hash_file`].
    pub cert_hash_file: Option<PathBuf>,
    /// See [`Cli::idle_timeout`].
    pub idle_timeout: Option<u64>,
    /// See [`Cli::allow_dest`].
    #[serde(default)]
    pub allow_dest: Vec<String>,
    /// See [`Cli::deny_dest`].
    #[serde(default)]
    pub deny_dest: Vec<String>,
    /// See [`Cli::allow_port`].
    #[serde(default)]
    pub allow_port: Vec<String>,
    /// See [`Cli::deny_port`].
    #[serde(default)]
    pub deny_port: Vec<String>,
    /// See [`Cli::allow_client_to_client`].
    #[serde(default)]
    pub allow_client_to_client: bool,
    /// See [`Cli::demo_listen`].
    pub demo_listen: Option<SocketAddr>,
    /// See [`Cli::demo_dir`].
    pub demo_dir: Option<PathBuf>,
    /// See [`Cli::no_demo`].
    #[serde(default)]
    pub no_demo: bool,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error.
        source: Box<toml::de::Error>,
    },
    /// A pool prefix is invalid.
    #[error("{option}: {source}")]
    Pool {
        /// The option.
        option: &'static str,
        /// Why.
        source: PoolError,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP listen address.
    pub listen: SocketAddr,
    /// IPv4 pool.
    pub pool_v4: Cidr,
    /// IPv6 pool, if IPv6 is on.
    pub pool_v6: Option<Cidr>,
    /// Cap on IPv6 addresses handed out.
    pub pool_v6_limit: u32,
    /// TUN device name.
    pub tun: String,
    /// Link MTU.
    pub mtu: u16,
    /// DNS resolvers announced to clients.
    pub dns: Vec<IpAddr>,
    /// Install nftables masquerading.
    pub nat: bool,
    /// Certificate and key PEM files; `None`: self-signed.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
    /// Extra names for the self-signed certificate.
    pub hostnames: Vec<String>,
    /// Extra allowed origins.
    pub allow_origin: Vec<String>,
    /// Metrics listen address.
    pub metrics: Option<SocketAddr>,
    /// Readiness file for the certificate hash.
    pub cert_hash_file: Option<PathBuf>,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// The egress policy's rules (host addresses and pools are added at startup).
    pub policy: EgressPolicy,
    /// The demo site's listen address and package directory; `None` with `--no-demo`.
    pub demo: Option<(SocketAddr, PathBuf)>,
}

impl Config {
    /// Resolves `cli` over the file it names (if any) over the defaults.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read or a value is invalid.
    pub fn load(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        Self::resolve(cli, file)
    }

    /// Merges `cli` over `file` over the defaults.
    ///
    /// # Errors
    /// [`ConfigError`] when a value is invalid.
    pub fn resolve(cli: Cli, file: FileConfig) -> Result<Self, ConfigError> {
        let listen = cli
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let pool_v4_text = cli
            .pool_v4
            .or(file.pool_v4)
            .unwrap_or_else(|| DEFAULT_POOL_V4.to_owned());
        let pool_v4: Cidr = pool_v4_text.parse().map_err(|source| ConfigError::Pool {
            option: "pool_v4",
            source,
        })?;
        if !pool_v4.network.is_ipv4() {
            return Err(ConfigError::Pool {
                option: "pool_v4",
                source: PoolError::WrongFamily(pool_v4, "IPv4"),
            });
        }
        let pool_v6 = match cli.pool_v6.or(file.pool_v6) {
            Some(text) => {
                let cidr: Cidr = text.parse().map_err(|source| ConfigError::Pool {
                    option: "pool_v6",
                    source,
                })?;
                if !cidr.network.is_ipv6() {
                    return Err(ConfigError::Pool {
                        option: "pool_v6",
                        source: PoolError::WrongFamily(cidr, "IPv6"),
                    });
                }
                Some(cidr)
            }
            None => None,
        };
        let mtu = cli.mtu.or(file.mtu).unwrap_or(DEFAULT_MTU);
        // 576: every IPv4 host must accept datagrams this large (RFC 791); below it MSS clamping
        // and the ICMP quote stop making sense.
        if !(576..=9000).contains(&mtu) {
            return Err(ConfigError::Invalid(format!(
                "mtu {mtu} out of range 576..=9000"
            )));
        }
        let tun = cli
            .tun
            .or(file.tun)
            .unwrap_or_else(|| DEFAULT_TUN.to_owned());
        // IFNAMSIZ is 16 including the NUL; the name also ends up in an nftables table name.
        if tun.is_empty()
            || tun.len() > 15
            || !tun
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ConfigError::Invalid(format!(
                "tun name {tun:?}: 1-15 characters of [A-Za-z0-9_-]"
            )));
        }
        let cert_and_key = match (cli.cert.or(file.cert), cli.key.or(file.key)) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "cert and key must be given together".to_owned(),
                ));
            }
        };
        let idle_timeout = cli
            .idle_timeout
            .or(file.idle_timeout)
            .unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS);
        if idle_timeout == 0 {
            return Err(ConfigError::Invalid(
                "idle_timeout must be at least 1 second".to_owned(),
            ));
        }
        let rules = |texts: Vec<String>, option: &str| {
            texts
                .iter()
                .map(|text| {
                    text.parse::<DestRule>()
                        .map_err(|error| ConfigError::Invalid(format!("{option} {text}: {error}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let ports = |texts: Vec<String>, option: &str| {
            let mut all = Vec::new();
            for text in texts {
                all.extend(
                    parse_ports(&text)
                        .map_err(|error| ConfigError::Invalid(format!("{option}: {error}")))?,
                );
            }
            Ok::<_, ConfigError>(all)
        };
        let policy = EgressPolicy::new(
            rules(prefer_cli(cli.allow_dest, file.allow_dest), "allow_dest")?,
            rules(prefer_cli(cli.deny_dest, file.deny_dest), "deny_dest")?,
            ports(prefer_cli(cli.allow_port, file.allow_port), "allow_port")?,
            ports(prefer_cli(cli.deny_port, file.deny_port), "deny_port")?,
            cli.allow_client_to_client || file.allow_client_to_client,
        );
        let demo = (!(cli.no_demo || file.no_demo)).then(|| {
            (
                cli.demo_listen.or(file.demo_listen).unwrap_or_else(|| {
                    crate::demo::DEFAULT_DEMO_LISTEN
                        .parse()
                        .expect("valid default")
                }),
                cli.demo_dir
                    .or(file.demo_dir)
                    .unwrap_or_else(|| PathBuf::from(crate::demo::DEFAULT_DEMO_DIR)),
            )
        });
        Ok(Self {
            demo,
            policy,
            listen,
            pool_v4,
            pool_v6,
            pool_v6_limit: cli
                .pool_v6_limit
                .or(file.pool_v6_limit)
                .unwrap_or(DEFAULT_POOL_V6_LIMIT),
            tun,
            mtu,
            dns: prefer_cli(cli.dns, file.dns),
            nat: cli.nat || file.nat,
            cert_and_key,
            hostnames: prefer_cli(cli.hostname, file.hostname),
            allow_origin: prefer_cli(cli.allow_origin, file.allow_origin),
            metrics: cli.metrics.or(file.metrics),
            cert_hash_file: cli.cert_hash_file.or(file.cert_hash_file),
            idle_timeout: Duration::from_secs(idle_timeout),
        })
    }
}

/// The nameservers of a resolv.conf that a client on the far side of the tunnel can reach:
/// loopback ones (systemd-resolved's 127.0.0.53, say) answer only on the gateway host itself.
pub fn reachable_nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            rest.split_whitespace()
                .next()?
                .split('%')
                .next()?
                .parse()
                .ok()
        })
        .filter(|ip: &IpAddr| !ip.is_loopback() && !ip.is_unspecified())
        .collect()
}

impl FileConfig {
    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses TOML text.
    ///
    /// # Errors
    /// The TOML error.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

/// A repeatable option: the command line's values if any were given, else the file's.
fn prefer_cli<T>(cli: Vec<T>, file: Vec<T>) -> Vec<T> {
    if cli.is_empty() { file } else { cli }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c =
            Config::resolve(Cli::parse_from(["webnic-gateway"]), FileConfig::default()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:4433".parse().unwrap());
        assert_eq!(c.pool_v4.to_string(), "10.77.0.0/24");
        assert_eq!(c.pool_v6, None);
        assert_eq!(c.tun, "webnic0");
        assert_eq!(c.mtu, 1152);
        assert!(!c.nat);
        assert!(c.cert_and_key.is_none());
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
    }

    #[test]
    fn file_then_cli() {
        let file = FileConfig::parse(
            r#"
            listen = "[::]:5000"
            pool_v4 = "10.9.0.0/16"
            pool_v6 = "fd00:77::/112"
            tun = "wn1"
            mtu = 1200
            dns = ["10.9.0.1"]
            nat = true
            allow_origin = ["https://app.example"]
            metrics = "127.0.0.1:9100"
            "#,
        )
        .unwrap();
        let cli = Cli::parse_from(["webnic-gateway", "--mtu", "1300", "--dns", "1.1.1.1"]);
        assert_eq!(
            reachable_nameservers(
                "# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\noptions edns0\n"
            ),
            [
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        let c = Config::resolve(cli, file).unwrap();
        assert_eq!(c.listen, "[::]:5000".parse().unwrap());
        assert_eq!(c.pool_v4.to_string(), "10.9.0.0/16");
        assert_eq!(c.pool_v6.unwrap().to_string(), "fd00:77::/112");
        assert_eq!(c.tun, "wn1");
        assert_eq!(c.mtu, 1300);
        assert_eq!(c.dns, ["1.1.1.1".parse::<IpAddr>().unwrap()]);
        assert!(c.nat);
        assert_eq!(c.allow_origin, ["https://app.example"]);
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    }

    #[test]
    fn policy_options() {
        let file = FileConfig::parse(
            r#"
            allow_dest = ["10.201.3.0/24", "fd00:201:3::/64:80,443"]
            deny_port = ["6667"]
            allow_client_to_client = true
            "#,
        )
        .unwrap();
        let c = Config::resolve(Cli::parse_from(["webnic-gateway"]), file).unwrap();
        let tcp = crate::packet::PROTO_TCP;
        assert!(
            c.policy
                .check("10.201.3.2".parse().unwrap(), tcp, Some(22))
                .is_ok()
        );
        assert!(
            c.policy
                .check("fd00:201:3::2".parse().unwrap(), tcp, Some(443))
                .is_ok()
        );
        assert!(
            c.policy
                .check("fd00:201:3::2".parse().unwrap(), tcp, Some(22))
                .is_err()
        );
        assert!(
            c.policy
                .check("1.1.1.1".parse().unwrap(), tcp, Some(6667))
                .is_err()
        );
        let cli = Cli::parse_from([
            "webnic-gateway",
            "--deny-dest",
            "1.1.1.0/24",
            "--allow-port",
            "25",
        ]);
        let c = Config::resolve(cli, FileConfig::default()).unwrap();
        assert!(
            c.policy
                .check("1.1.1.1".parse().unwrap(), tcp, Some(443))
                .is_err()
        );
        assert!(
            c.policy
                .check("8.8.8.8".parse().unwrap(), tcp, Some(25))
                .is_ok()
        );
        assert!(
            c.policy
                .check("10.0.0.1".parse().unwrap(), tcp, Some(443))
                .is_err()
        );
    }

    #[test]
    fn invalid_values() {
        assert!(FileConfig::parse("bogus = 1").is_err());
        let bad = |args: &[&str]| {
            let mut argv = vec!["webnic-gateway"];
            argv.extend_from_slice(args);
            Config::resolve(Cli::parse_from(argv), FileConfig::default()).is_err()
        };
        assert!(bad(&["--pool-v4", "fd00::/64"]));
        assert!(bad(&["--pool-v4", "10.77.0.1/24"]));
        assert!(bad(&["--pool-v6", "10.0.0.0/8"]));
        assert!(bad(&["--mtu", "100"]));
        assert!(bad(&["--tun", "a-very-long-device-name"]));
        assert!(bad(&["--tun", "bad name"]));
        assert!(bad(&["--idle-timeout", "0"]));
        assert!(bad(&["--allow-dest", "10.0.0.1/8"]));
        assert!(bad(&["--allow-dest", "10.0.0.0/8:0"]));
        assert!(bad(&["--deny-port", "x"]));
        assert!(Cli::try_parse_from(["webnic-gateway", "--cert", "c.pem"]).is_err());
    }
}
