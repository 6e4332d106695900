//! The `webnic-gateway` binary: parses the command line and runs [`webnic_gateway::server`].

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use webnic_gateway::config::{Cli, Config};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Plain text when logs go to a file (tests read them).
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Every error message here already includes its cause.
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
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
