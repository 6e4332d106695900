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
//! The deletions run as child processes off the session path, a few at a time, and the address
//! goes back to the pool when its deletion is done; a host without the tool (or without
//! conntrack) is told once at startup and relies on the kernel's timeouts.

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;

/// At most this many `conntrack` processes at once: a burst of ended sessions queues up instead
/// of forking hundreds of processes.
const CONCURRENT_DELETIONS: usize = 4;

/// Deletes conntrack entries of released addresses.
#[derive(Debug, Clone)]
pub struct ConntrackCleaner {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    permits: Semaphore,
    counters: Arc<ConntrackCounters>,
}

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
    /// that does nothing.
    pub fn detect(counters: Arc<ConntrackCounters>) -> Self {
        let works = std::process::Command::new("conntrack")
            .arg("-C")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if works {
            tracing::info!("conntrack entries of released addresses will be deleted");
            Self {
                inner: Some(Arc::new(Inner {
                    permits: Semaphore::new(CONCURRENT_DELETIONS),
                    counters,
                })),
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

    /// Deletes every entry whose original source or destination is one of `addresses`; returns
    /// when done. The caller returns the addresses to the pool only then: an address handed out
    /// again while its deletion is still queued would lose the new session's live flows (a
    /// masqueraded reply without its entry is answered by the host with a reset).
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
        let Ok(_permit) = inner.permits.acquire().await else {
            return;
        };
        for &address in addresses {
            for direction in ["-s", "-d"] {
                match delete(direction, address).await {
                    Ok(0) => {}
                    Ok(deleted) => {
                        tracing::debug!(%address, direction, deleted, "deleted conntrack entries");
                        inner.counters.deleted.fetch_add(deleted, Ordering::Relaxed);
                    }
                    Err(error) => {
                        tracing::warn!(%address, %error, "cannot delete conntrack entries");
                        inner.counters.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            inner.counters.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
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
