//! Forgets the kernel's connection-tracking entries of addresses that go back to the pool.
//!
//! With `--nat`, or any stateful firewall on the host, the kernel keeps an entry per flow, and an
//! established TCP entry lives for five days (`nf_conntrack_tcp_timeout_established`). A client
//! killed in the middle of a connection leaves its entries behind: the table fills over a long
//! churn, and a later session that gets the same address would inherit the old flows (a server's
//! retransmissions translated to it). So when an address returns to the pool its entries are
//! deleted with `conntrack -D` (conntrack-tools), in both directions. Not while the address is
//! parked for resumption: then its flows must live on.
//!
//! Deletions are batched: one worker takes every address released meanwhile, lists the table
//! once per family (`conntrack -L`), and runs `conntrack -D` only for addresses with established
//! TCP entries (the five-day ones; closing TCP states and UDP entries expire within minutes on
//! their own and are left alone). Listing per address instead cost about 28 ms per `conntrack` run with 2,000
//! entries, four runs per session, and under churn the backlog held enough addresses out of the
//! pool to exhaust it. The address goes back to the pool when its batch is done; a host without
//! the tool (or without conntrack) is told once at startup and relies on the kernel's timeouts.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

/// Deletes conntrack entries of released addresses.
#[derive(Debug, Clone)]
pub struct ConntrackCleaner {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    requests: mpsc::UnboundedSender<Request>,
    counters: Arc<ConntrackCounters>,
}

/// Addresses to clean, and who to tell when done.
type Request = (Vec<IpAddr>, oneshot::Sender<()>);

/// What the cleaner did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConntrackCounters {
    /// Entries deleted.
    pub deleted: AtomicU64,
    /// `conntrack` runs that failed (could not start, or an error other than "nothing found").
    pub failures: AtomicU64,
    /// Addresses waiting for their deletion to finish.
    pub pending: AtomicU64,
}

impl ConntrackCleaner {
    /// A cleaner if the `conntrack` tool works here (`conntrack -C` counts the table), else one
    /// that does nothing. Call inside the runtime: it starts the worker.
    pub fn detect(counters: Arc<ConntrackCounters>) -> Self {
        let works = std::process::Command::new("conntrack")
            .arg("-C")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if works && tokio::runtime::Handle::try_current().is_ok() {
            tracing::info!("conntrack entries of released addresses will be deleted");
            let (requests, queue) = mpsc::unbounded_channel();
            tokio::spawn(work(queue, Arc::clone(&counters)));
            Self {
                inner: Some(Arc::new(Inner { requests, counters })),
            }
        } else {
            tracing::info!(
                "`conntrack -C` does not work here (conntrack-tools missing?): flows of ended \
                 sessions stay in the kernel's table until its timeouts"
            );
            Self::disabled()
        }
    }

    /// A cleaner that does nothing.
    pub const fn disabled() -> Self {
        Self { inner: None }
    }

    /// Deletes every live entry whose original source or destination is one of `addresses`;
    /// returns when done. The caller returns the addresses to the pool only then: an address
    /// handed out again while its deletion is still queued would lose the new session's live
    /// flows (a masqueraded reply without its entry is answered by the host with a reset).
    pub async fn forget(&self, addresses: &[IpAddr]) {
        let Some(inner) = &self.inner else {
            return;
        };
        if addresses.is_empty() {
            return;
        }
        inner
            .counters
            .pending
            .fetch_add(addresses.len() as u64, Ordering::Relaxed);
        let (done, finished) = oneshot::channel();
        if inner.requests.send((addresses.to_vec(), done)).is_ok() {
            // Err: the worker is gone (runtime shutting down); nothing more to wait for.
            let _ = finished.await;
        }
    }
}

/// The worker: takes every queued request, cleans their addresses in one batch, answers them.
async fn work(mut queue: mpsc::UnboundedReceiver<Request>, counters: Arc<ConntrackCounters>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        let addresses: HashSet<IpAddr> =
            batch.iter().flat_map(|(a, _)| a.iter().copied()).collect();
        clean(&addresses, &counters).await;
        for (addresses, done) in batch {
            counters
                .pending
                .fetch_sub(addresses.len() as u64, Ordering::Relaxed);
            let _ = done.send(());
        }
    }
}

/// Deletes the established entries of `addresses`.
async fn clean(addresses: &HashSet<IpAddr>, counters: &ConntrackCounters) {
    let mut targets: BTreeSet<(IpAddr, &'static str)> = BTreeSet::new();
    for (family, is_family) in [
        ("ipv4", IpAddr::is_ipv4 as fn(&IpAddr) -> bool),
        ("ipv6", IpAddr::is_ipv6),
    ] {
        if !addresses.iter().any(is_family) {
            continue;
        }
        match list(family).await {
            Ok(table) => {
                for (src, dst) in table.lines().filter_map(established_entry) {
                    if addresses.contains(&src) {
                        targets.insert((src, "-s"));
                    }
                    if addresses.contains(&dst) {
                        targets.insert((dst, "-d"));
                    }
                }
            }
            Err(error) => {
                // Without the listing, delete blindly.
                tracing::warn!(%error, "cannot list conntrack entries");
                counters.failures.fetch_add(1, Ordering::Relaxed);
                for &address in addresses.iter().filter(|a| is_family(a)) {
                    targets.insert((address, "-s"));
                    targets.insert((address, "-d"));
                }
            }
        }
    }
    for (address, direction) in targets {
        match delete(direction, address).await {
            Ok(deleted) => {
                tracing::debug!(%address, direction, deleted, "deleted conntrack entries");
                counters.deleted.fetch_add(deleted, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::warn!(%address, %error, "cannot delete conntrack entries");
                counters.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `conntrack -L -f <family>`: the table, one entry per line.
async fn list(family: &str) -> Result<String, String> {
    let output = tokio::process::Command::new("conntrack")
        .args(["-L", "-f", family])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| format!("cannot run conntrack: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "conntrack -L -f {family} ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The original source and destination of a `conntrack -L` line of an established TCP flow.
/// Only those need deleting: the kernel keeps them for five days, while closing TCP states
/// (FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE) and UDP/ICMP entries expire within minutes.
fn established_entry(line: &str) -> Option<(IpAddr, IpAddr)> {
    let mut tokens = line.split_whitespace();
    if tokens.next()? != "tcp" || !line.split_whitespace().any(|t| t == "ESTABLISHED") {
        return None;
    }
    let src = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("src="))?;
    let dst = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("dst="))?;
    Some((src.parse().ok()?, dst.parse().ok()?))
}

/// Runs `conntrack -D -f <family> <direction> <address>`; the number of entries deleted.
async fn delete(direction: &str, address: IpAddr) -> Result<u64, String> {
    let family = if address.is_ipv4() { "ipv4" } else { "ipv6" };
    let output = tokio::process::Command::new("conntrack")
        .args(["-D", "-f", family, direction, &address.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| format!("cannot run conntrack: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // conntrack exits 1 when nothing matched, and says so.
    deleted_count(&stderr).ok_or_else(|| {
        format!(
            "conntrack -D {direction} {address} ({}): {}",
            output.status,
            stderr.trim()
        )
    })
}

/// The count in conntrack's "N flow entries have been deleted." line.
fn deleted_count(stderr: &str) -> Option<u64> {
    let line = stderr
        .lines()
        .find(|line| line.contains("flow entries have been deleted"))?;
    let (_, after_colon) = line.rsplit_once(": ")?;
    after_colon.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_entries_are_told_from_short_lived_ones() {
        // As printed by `conntrack -L` (conntrack-tools 1.4.7).
        let established = "tcp      6 431998 ESTABLISHED src=10.77.0.5 dst=10.201.1.2 sport=50000 \
                           dport=7001 src=10.201.1.2 dst=10.200.1.1 sport=7001 dport=50000 \
                           [ASSURED] mark=0 use=1";
        let time_wait = "tcp      6 118 TIME_WAIT src=10.77.0.6 dst=10.201.1.2 sport=50001 \
                         dport=7001 src=10.201.1.2 dst=10.200.1.1 sport=7001 dport=50001 \
                         [ASSURED] mark=0 use=1";
        let udp = "udp      17 29 src=fd00:77::9 dst=fd00:201:1::2 sport=5353 dport=53 \
                   src=fd00:201:1::2 dst=fd00:77::9 sport=53 dport=5353 mark=0 use=1";
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            established_entry(established),
            Some((ip("10.77.0.5"), ip("10.201.1.2")))
        );
        assert_eq!(established_entry(time_wait), None);
        assert_eq!(established_entry(udp), None);
        assert_eq!(
            established_entry("conntrack v1.4.7 (conntrack-tools): 3 flow entries"),
            None
        );
    }

    #[test]
    fn deleted_count_reads_conntracks_summary() {
        // As printed by conntrack-tools 1.4.7 (Debian 12/13).
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
            ),
            Some(0)
        );
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 12 flow entries have been deleted.\n"
            ),
            Some(12)
        );
        assert_eq!(
            deleted_count("conntrack v1.4.7 (conntrack-tools): Operation not permitted\n"),
            None
        );
    }
}
