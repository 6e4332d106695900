//! `webnic-impair`: the impairment relay on the command line.
//!
//! ```text
//! webnic-impair --listen 127.0.0.1:5000 --upstream 10.200.1.2:4443 \
//!     --up loss=1%,delay=20ms,jitter=5ms --down loss=1%,delay=20ms,jitter=5ms --seed 7
//! ```
//! Prints the counters of both directions every `--report` interval and on Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use webnic_impair::{Impairment, Relay, parse_duration};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Seeded userspace UDP impairment relay (netem for kernels without it)"
)]
struct Args {
    /// Address clients send to.
    #[arg(long)]
    listen: SocketAddr,
    /// Where packets go (e.g. the gateway's QUIC address).
    #[arg(long)]
    upstream: SocketAddr,
    /// Impairment of client → upstream packets, e.g. `loss=1%,delay=20ms,jitter=5ms,reorder=1%,dup=1%,rate=10mbit`.
    #[arg(long, default_value = "none")]
    up: Impairment,
    /// Impairment of upstream → client packets (same syntax).
    #[arg(long, default_value = "none")]
    down: Impairment,
    /// Seed of every random decision: the same seed and traffic give the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How often to print the counters.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    report: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let relay = Relay::start(
        args.listen,
        args.upstream,
        args.up.clone(),
        args.down.clone(),
        args.seed,
    )
    .await
    .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "relaying {} -> {} (up: {}; down: {}; seed {})",
        relay.local_addr(),
        args.upstream,
        args.up,
        args.down,
        args.seed
    );
    let mut ticker = tokio::time::interval(args.report);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => println!("{:?}", relay.stats()),
            _ = tokio::signal::ctrl_c() => {
                println!("{:?}", relay.stats());
                return Ok(());
            }
        }
    }
}
