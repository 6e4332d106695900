//! The `webnic-gateway` binary: parses the command line and runs [`webnic_gateway::server`].

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use webnic_gateway::config::{Cli, Command, Config, TokenArgs};
use webnic_gateway::token::{Claims, TokenKey, parse_duration_secs};

fn main() -> ExitCode {
    webnic_gateway::sys::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Plain text when logs go to a file (tests read them).
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut cli = Cli::parse();
    let result = match cli.command.take() {
        Some(Command::Token(args)) => mint(&args),
        None => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Every error message here already includes its cause.
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `webnic-gateway token`: prints one token on stdout.
fn mint(args: &TokenArgs) -> anyhow::Result<()> {
    let content = std::fs::read(&args.key_file)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", args.key_file.display()))?;
    let key = TokenKey::from_file_content(&content)?;
    let ttl = parse_duration_secs(&args.ttl).map_err(anyhow::Error::msg)?;
    let now = match args.issued_at {
        Some(now) => now,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    };
    let token = key.mint(&Claims {
        sub: args.sub.clone(),
        nbf: now,
        exp: now.saturating_add(ttl),
        dst: args.allow_dest.clone(),
        max_sessions: args.max_sessions,
        rate: args.rate,
    })?;
    println!("{token}");
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli)?;
    if config.dns.is_empty() {
        // Boring default: the host's own resolvers, when clients can reach them.
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        config.dns = webnic_gateway::config::reachable_nameservers(&resolv);
        if config.dns.is_empty() {
            tracing::warn!(
                "no --dns given and /etc/resolv.conf has no resolver clients can reach; clients cannot resolve names"
            );
        } else {
            tracing::info!(dns = ?config.dns, "announcing the host's resolvers (override with --dns)");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(webnic_gateway::server::run(config))?;
    Ok(())
}
