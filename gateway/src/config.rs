//! Command line and configuration file.
//!
//! Every setting can come from the command line or from a TOML file (`--config`) with the same
//! names in snake_case; command-line values override the file's.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::admission::{AdmissionLimits, DEFAULT_MAX_LIFETIME};
use crate::policy::{DestRule, EgressPolicy, parse_ports};
use crate::pool::{Cidr, PoolError};
use crate::quota::QuotaLimits;
use crate::token::{TokenKey, parse_duration_secs};

/// Default UDP listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
/// Default IPv4 client pool.
pub const DEFAULT_POOL_V4: &str = "10.77.0.0/24";
/// Default TUN device name.
pub const DEFAULT_TUN: &str = "webnic0";
/// quinn's largest datagram payload on a path at QUIC's initial MTU (1200 minus QUIC overhead),
/// where every path starts and where black-hole detection returns it.
pub const QUIC_BASE_DATAGRAM: usize = 1162;

/// Default link MTU: the largest IP packet carried in one datagram.
///
/// 1152 fits both limits a session meets on a fresh path: quinn's initial maximum datagram
/// ([`QUIC_BASE_DATAGRAM`]) less the HTTP/3 datagram header, and
/// Chromium's 1211-byte browser→server datagram limit. PMTU discovery may raise quinn's limit
/// later, and black-hole detection can drop it back, so the link MTU stays at the floor.
pub const DEFAULT_MTU: u16 = 1152;
/// Default grace period of a lost session's addresses.
pub const DEFAULT_RESUME_GRACE_SECS: u64 = 60;

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
    /// The QUIC congestion controller of client connections [default: bbr]: `bbr` keeps its
    /// rate under random loss (the TCP inside each tunnel already backs off for congestion);
    /// `cubic` is quinn's default; `new-reno`. docs/PERFORMANCE.md has the measurements.
    #[arg(long, value_name = "NAME")]
    pub congestion: Option<Congestion>,
    /// How long a session whose connection was lost keeps its addresses for a client that
    /// reconnects with its ticket, in seconds; 0 turns resumption off [default: 60].
    #[arg(long, value_name = "SECS")]
    pub resume_grace: Option<u64>,
    /// Keep the session leases in this file, so clients resume across a gateway restart.
    #[arg(long, value_name = "PATH")]
    pub lease_file: Option<PathBuf>,
    /// On SIGTERM/SIGINT, drain first: refuse new sessions, tell clients, and keep serving the
    /// existing ones up to this many seconds before closing them; 0: close at once [default: 0].
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<u64>,
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
    /// Refuse clients' requests for link repair (sequenced datagrams, NACKs and resends that
    /// repair loss on the QUIC hop; PROTOCOL.md §3.1): their datagrams go unsequenced.
    #[arg(long)]
    pub no_link_repair: bool,
    /// Refuse clients' requests for the stream link (their packets on a QUIC stream instead of
    /// datagrams; PROTOCOL.md §3.2): they keep getting datagrams.
    #[arg(long)]
    pub no_link_stream: bool,
    /// Read the TUN one packet per read, as cut by the kernel, instead of taking coalesced TCP
    /// packets of up to 64 KiB (TUN offload: a server's TSO burst arrives in one read, and
    /// stream-link clients that accept large packets get it whole).
    #[arg(long)]
    pub no_tun_offload: bool,
    /// Require a session token signed with the key in this file (text: trailing whitespace
    /// ignored; at least 16 bytes). Mint tokens with `webnic-gateway token`.
    #[arg(long, value_name = "FILE")]
    pub token_key_file: Option<PathBuf>,
    /// Most concurrent sessions per client address, IPv6 per /64; 0: no cap [default: 64].
    #[arg(long, value_name = "N")]
    pub max_sessions_per_address: Option<u32>,
    /// Most concurrent sessions per token subject; 0: no cap [default: 64].
    #[arg(long, value_name = "N")]
    pub max_sessions_per_subject: Option<u32>,
    /// Most concurrent sessions in total; 0: no cap [default: 10000].
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<u32>,
    /// New sessions per second per client address; 0: no limit [default: 10].
    #[arg(long, value_name = "N")]
    pub session_rate: Option<f64>,
    /// Burst of new sessions per client address [default: 30].
    #[arg(long, value_name = "N")]
    pub session_burst: Option<f64>,
    /// Longest a session may last, e.g. `24h`, `90s`; 0: unlimited [default: 24h].
    #[arg(long, value_name = "DURATION")]
    pub max_lifetime: Option<String>,
    /// Most concurrent flows (TCP/UDP 5-tuples) per session; 0: no cap [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_flows: Option<usize>,
    /// New flows per second per session (burst: one second's worth); 0: no limit [default: 200].
    #[arg(long, value_name = "N")]
    pub new_flows_per_sec: Option<f64>,
    /// Client packets per second per session; 0: no limit [default: 200000].
    #[arg(long, value_name = "N")]
    pub packets_per_sec: Option<f64>,
    /// Bytes per second per session and direction; 0: no limit [default: 250000000].
    #[arg(long, value_name = "N")]
    pub bytes_per_sec: Option<f64>,
    /// ICMP echo requests per second per session; 0: no limit [default: 50].
    #[arg(long, value_name = "N")]
    pub icmp_echo_per_sec: Option<f64>,
    /// Append the abuse log (JSON lines: session, client address, token subject, new flows)
    /// to this file.
    #[arg(long, value_name = "PATH")]
    pub abuse_log: Option<PathBuf>,
    /// How long abuse-log entries are kept, e.g. `30d`, `12h` [default: 30d].
    #[arg(long, value_name = "DURATION")]
    pub abuse_log_retention: Option<String>,
    /// A subcommand instead of running the gateway.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands of `webnic-gateway`.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Mint a session token and print it.
    Token(TokenArgs),
}

/// `webnic-gateway token`: the claims of a new token.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The key file the gateway's `--token-key-file` names.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// Subject: who the sessions count against.
    #[arg(long, value_name = "NAME")]
    pub sub: String,
    /// Validity, e.g. `1h`, `15m`, `3600`.
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub ttl: String,
    /// Mint as if the clock read this Unix time (pre-minting; tests).
    #[arg(long, value_name = "UNIX_SECS")]
    pub issued_at: Option<u64>,
    /// Restrict sessions to these destinations, `CIDR[:PORTS]` (repeatable).
    #[arg(long, value_name = "CIDR[:PORTS]")]
    pub allow_dest: Vec<String>,
    /// Most concurrent sessions of this subject.
    #[arg(long, value_name = "N")]
    pub max_sessions: Option<u32>,
    /// Bandwidth per session and direction, bytes per second.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub rate: Option<u64>,
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
    /// See [`Cli::congestion`].
    pub congestion: Option<Congestion>,
    /// See [`Cli::resume_grace`].
    pub resume_grace: Option<u64>,
    /// See [`Cli::lease_file`].
    pub lease_file: Option<PathBuf>,
    /// See [`Cli::drain_timeout`].
    pub drain_timeout: Option<u64>,
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
    /// See [`Cli::no_link_repair`].
    #[serde(default)]
    pub no_link_repair: bool,
    /// See [`Cli::no_link_stream`].
    #[serde(default)]
    pub no_link_stream: bool,
    /// See [`Cli::no_tun_offload`].
    #[serde(default)]
    pub no_tun_offload: bool,
    /// See [`Cli::token_key_file`].
    pub token_key_file: Option<PathBuf>,
    /// See [`Cli::max_sessions_per_address`].
    pub max_sessions_per_address: Option<u32>,
    /// See [`Cli::max_sessions_per_subject`].
    pub max_sessions_per_subject: Option<u32>,
    /// See [`Cli::max_sessions`].
    pub max_sessions: Option<u32>,
    /// See [`Cli::session_rate`].
    pub session_rate: Option<f64>,
    /// See [`Cli::session_burst`].
    pub session_burst: Option<f64>,
    /// See [`Cli::max_lifetime`].
    pub max_lifetime: Option<String>,
    /// See [`Cli::max_flows`].
    pub max_flows: Option<usize>,
    /// See [`Cli::new_flows_per_sec`].
    pub new_flows_per_sec: Option<f64>,
    /// See [`Cli::packets_per_sec`].
    pub packets_per_sec: Option<f64>,
    /// See [`Cli::bytes_per_sec`].
    pub bytes_per_sec: Option<f64>,
    /// See [`Cli::icmp_echo_per_sec`].
    pub icmp_echo_per_sec: Option<f64>,
    /// See [`Cli::abuse_log`].
    pub abuse_log: Option<PathBuf>,
    /// See [`Cli::abuse_log_retention`].
    pub abuse_log_retention: Option<String>,
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
    /// The QUIC congestion controller.
    pub congestion: Congestion,
    /// Grace period of a lost session's lease; zero: no resumption.
    pub resume_grace: Duration,
    /// Where leases persist across restarts.
    pub lease_file: Option<PathBuf>,
    /// How long a shutdown drains before closing sessions; zero: no drain.
    pub drain_timeout: Duration,
    /// The egress policy's rules (host addresses and pools are added at startup).
    pub policy: EgressPolicy,
    /// The demo site's listen address and package directory; `None` with `--no-demo`.
    pub demo: Option<(SocketAddr, PathBuf)>,
    /// The token key; `None`: sessions need no token.
    pub token_key: Option<Arc<TokenKey>>,
    /// Session admission caps.
    pub admission: AdmissionLimits,
    /// Maximum session lifetime; `None`: unlimited.
    pub max_lifetime: Option<Duration>,
    /// Whether clients may have link repair.
    pub link_repair: bool,
    /// Whether clients may have the stream link.
    pub link_stream: bool,
    /// Whether the TUN hands over coalesced TCP packets.
    pub tun_offload: bool,
    /// Per-session quotas.
    pub quota: QuotaLimits,
    /// The abuse log file.
    pub abuse_log: Option<PathBuf>,
    /// How long abuse-log entries are kept.
    pub abuse_log_retention: Duration,
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
        let token_key = match cli.token_key_file.or(file.token_key_file) {
            Some(path) => {
                let content = std::fs::read(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let key = TokenKey::from_file_content(&content).map_err(|error| {
                    ConfigError::Invalid(format!("token_key_file {}: {error}", path.display()))
                })?;
                Some(Arc::new(key))
            }
            None => None,
        };
        let defaults = AdmissionLimits::DEFAULT;
        let admission = AdmissionLimits {
            per_address: cli
                .max_sessions_per_address
                .or(file.max_sessions_per_address)
                .unwrap_or(defaults.per_address),
            per_subject: cli
                .max_sessions_per_subject
                .or(file.max_sessions_per_subject)
                .unwrap_or(defaults.per_subject),
            total: cli
                .max_sessions
                .or(file.max_sessions)
                .unwrap_or(defaults.total),
            rate: rate(
                cli.session_rate.or(file.session_rate),
                defaults.rate,
                "session_rate",
            )?,
            burst: rate(
                cli.session_burst.or(file.session_burst),
                defaults.burst,
                "session_burst",
            )?,
        };
        let duration = |text: Option<String>, default: Duration, option: &str| match text {
            Some(text) => parse_duration_secs(&text)
                .map(Duration::from_secs)
                .map_err(|error| ConfigError::Invalid(format!("{option}: {error}"))),
            None => Ok(default),
        };
        let max_lifetime = duration(
            cli.max_lifetime.or(file.max_lifetime),
            DEFAULT_MAX_LIFETIME,
            "max_lifetime",
        )?;
        let q = QuotaLimits::DEFAULT;
        let quota = QuotaLimits {
            max_flows: cli.max_flows.or(file.max_flows).unwrap_or(q.max_flows),
            new_flows_per_sec: rate(
                cli.new_flows_per_sec.or(file.new_flows_per_sec),
                q.new_flows_per_sec,
                "new_flows_per_sec",
            )?,
            packets_per_sec: rate(
                cli.packets_per_sec.or(file.packets_per_sec),
                q.packets_per_sec,
                "packets_per_sec",
            )?,
            bytes_per_sec: rate(
                cli.bytes_per_sec.or(file.bytes_per_sec),
                q.bytes_per_sec,
                "bytes_per_sec",
            )?,
            icmp_echo_per_sec: rate(
                cli.icmp_echo_per_sec.or(file.icmp_echo_per_sec),
                q.icmp_echo_per_sec,
                "icmp_echo_per_sec",
            )?,
        };
        let abuse_log_retention = duration(
            cli.abuse_log_retention.or(file.abuse_log_retention),
            crate::abuse_log::DEFAULT_RETENTION,
            "abuse_log_retention",
        )?;
        if abuse_log_retention.is_zero() {
            return Err(ConfigError::Invalid(
                "abuse_log_retention must be at least 1 second".to_owned(),
            ));
        }
        Ok(Self {
            demo,
            link_repair: !(cli.no_link_repair || file.no_link_repair),
            link_stream: !(cli.no_link_stream || file.no_link_stream),
            tun_offload: !(cli.no_tun_offload || file.no_tun_offload),
            token_key,
            admission,
            max_lifetime: (!max_lifetime.is_zero()).then_some(max_lifetime),
            quota,
            abuse_log: cli.abuse_log.or(file.abuse_log),
            abuse_log_retention,
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
            congestion: cli.congestion.or(file.congestion).unwrap_or_default(),
            resume_grace: Duration::from_secs(
                cli.resume_grace
                    .or(file.resume_grace)
                    .unwrap_or(DEFAULT_RESUME_GRACE_SECS),
            ),
            lease_file: cli.lease_file.or(file.lease_file),
            drain_timeout: Duration::from_secs(
                cli.drain_timeout.or(file.drain_timeout).unwrap_or(0),
            ),
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

/// A rate or burst: finite and not negative (0 turns the limit off).
fn rate(value: Option<f64>, default: f64, option: &str) -> Result<f64, ConfigError> {
    let value = value.unwrap_or(default);
    if !value.is_finite() || value < 0.0 {
        return Err(ConfigError::Invalid(format!(
            "{option} {value}: expected a number >= 0"
        )));
    }
    Ok(value)
}

/// A repeatable option: the command line's values if any were given, else the file's.
fn prefer_cli<T>(cli: Vec<T>, file: Vec<T>) -> Vec<T> {
    if cli.is_empty() { file } else { cli }
}

/// QUIC congestion controllers the gateway can run (`--congestion`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Congestion {
    /// quinn's BBR: paces at the measured bottleneck rate and does not halve it for a random
    /// loss. The default: a tunnel's datagrams carry TCP that reacts to congestion itself, and
    /// on a lossy last hop Cubic collapsed (docs/PERFORMANCE.md).
    #[default]
    Bbr,
    /// quinn's default, CUBIC (RFC 9438).
    Cubic,
    /// NewReno (RFC 9002 §7).
    NewReno,
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
        assert!(c.token_key.is_none());
        assert_eq!(c.admission, AdmissionLimits::DEFAULT);
        assert_eq!(c.max_lifetime, Some(Duration::from_secs(86_400)));
        assert_eq!(c.quota, QuotaLimits::DEFAULT);
        assert_eq!(c.abuse_log_retention, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn admission_quota_and_token_options() {
        let dir = std::env::temp_dir().join(format!("webnic-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
        let file = FileConfig::parse(&format!(
            r#"
            token_key_file = "{}"
            max_sessions_per_address = 4
            max_sessions = 100
            session_rate = 2.5
            max_lifetime = "2h"
            max_flows = 64
            icmp_echo_per_sec = 0
            abuse_log = "/var/log/webnic-abuse.jsonl"
            abuse_log_retention = "7d"
            "#,
            key.display()
        ))
        .unwrap();
        let cli = Cli::parse_from([
            "webnic-gateway",
            "--max-sessions-per-subject",
            "3",
            "--max-lifetime",
            "0",
            "--new-flows-per-sec",
            "20",
        ]);
        let c = Config::resolve(cli, file).unwrap();
        assert!(c.token_key.is_some());
        assert_eq!(c.admission.per_address, 4);
        assert_eq!(c.admission.per_subject, 3);
        assert_eq!(c.admission.total, 100);
        assert_eq!(c.admission.rate, 2.5);
        assert_eq!(c.max_lifetime, None);
        assert_eq!(c.quota.max_flows, 64);
        assert_eq!(c.quota.new_flows_per_sec, 20.0);
        assert_eq!(c.quota.icmp_echo_per_sec, 0.0);
        assert_eq!(
            c.quota.packets_per_sec,
            QuotaLimits::DEFAULT.packets_per_sec
        );
        assert_eq!(
            c.abuse_log.as_deref(),
            Some(Path::new("/var/log/webnic-abuse.jsonl"))
        );
        assert_eq!(c.abuse_log_retention, Duration::from_secs(7 * 86_400));
        let token = Cli::parse_from([
            "webnic-gateway",
            "token",
            "--key-file",
            "k",
            "--sub",
            "alice",
            "--allow-dest",
            "10.0.0.0/8:80",
            "--max-sessions",
            "2",
        ]);
        let Some(Command::Token(args)) = token.command else {
            panic!("token subcommand");
        };
        assert_eq!(args.sub, "alice");
        assert_eq!(args.ttl, "1h");
        assert_eq!(args.allow_dest, ["10.0.0.0/8:80"]);
        assert_eq!(args.max_sessions, Some(2));
        std::fs::remove_dir_all(&dir).unwrap();
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
        assert!(bad(&["--max-lifetime", "1w"]));
        assert!(bad(&["--new-flows-per-sec=-1"]));
        assert!(bad(&["--abuse-log-retention", "0"]));
        assert!(bad(&["--token-key-file", "/nonexistent/webnic-key"]));
        assert!(Cli::try_parse_from(["webnic-gateway", "--cert", "c.pem"]).is_err());
    }
}
