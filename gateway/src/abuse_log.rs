//! The abuse log: a JSON-lines file mapping session → client address → token subject → flows,
//! so an abuse report ("your gateway scanned us from 10.77.0.5 at 14:02") can be traced to a
//! client and a token.
//!
//! One object per line, each with `ts` (Unix seconds, fractional) and `event`:
//!
//! - `session_start`: `session`, `client` (IP:port), `sub` (token subject or null), `addresses`;
//! - `flow`: `session`, `client`, `sub`, `proto` (`tcp`/`udp`), `src`, `sport`, `dst`, `dport` —
//!   every new flow the quota admitted;
//! - `session_end`: `session`, `client`, `sub`, `duration_s`, `end`;
//! - `refused`: `client`, `sub`, `reason` (the refusal's metric label).
//!
//! Lines are written by a dedicated thread (the data path only queues them; if the queue is
//! full the line is dropped and counted). Lines older than the retention are pruned at start
//! and every hour by rewriting the file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::packet::PROTO_TCP;
use crate::quota::FlowKey;

/// Default retention of abuse-log entries.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Lines queued for the writer thread at most.
const QUEUE: usize = 65_536;
/// How often old lines are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Handle to the abuse log; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AbuseLog {
    tx: SyncSender<Value>,
    dropped: Arc<AtomicU64>,
}

impl AbuseLog {
    /// Opens (creates) `path` for appending, prunes entries older than `retention`, and starts
    /// the writer thread.
    ///
    /// # Errors
    /// The I/O error if the file cannot be opened or pruned.
    pub fn open(path: &Path, retention: Duration) -> io::Result<Self> {
        prune_file(path, retention)?;
        let file = open_append(path)?;
        let (tx, rx) = sync_channel(QUEUE);
        let path = path.to_owned();
        std::thread::Builder::new()
            .name("abuse-log".into())
            .spawn(move || writer(rx, &path, file, retention))?;
        Ok(Self {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The dropped-lines counter, for the metrics.
    pub fn drop_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped)
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A session was admitted.
    pub fn session_started(
        &self,
        session: u64,
        client: SocketAddr,
        subject: Option<&str>,
        addresses: &[IpAddr],
    ) {
        self.send(json!({
            "ts": unix_now(),
            "event": "session_start",
            "session": session,
            "client": client.to_string(),
            "sub": subject,
            "addresses": addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
        }));
    }

    /// A session opened a new flow.
    pub fn flow(&self, session: u64, client: SocketAddr, subject: Option<&str>, flow: &FlowKey) {
        self.send(json!({
            "ts": unix_now(),
            "event": "flow",
            "session": session,
            "client": client.to_string(),
            "sub": subject,
            "proto": if flow.protocol == PROTO_TCP { "tcp" } else { "udp" },
            "src": flow.source.to_string(),
            "sport": flow.source_port,
            "dst": flow.destination.to_string(),
            "dport": flow.destination_port,
        }));
    }

    /// A session ended.
    pub fn session_ended(
        &self,
        session: u64,
        client: SocketAddr,
        subject: Option<&str>,
        duration: Duration,
        end: &str,
    ) {
        self.send(json!({
            "ts": unix_now(),
            "event": "session_end",
            "session": session,
            "client": client.to_string(),
            "sub": subject,
            "duration_s": duration.as_secs_f64(),
            "end": end,
        }));
    }

    /// A session was refused.
    pub fn refused(&self, client: SocketAddr, subject: Option<&str>, reason: &str) {
        self.send(json!({
            "ts": unix_now(),
            "event": "refused",
            "client": client.to_string(),
            "sub": subject,
            "reason": reason,
        }));
    }

    fn send(&self, line: Value) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Writes queued lines until every [`AbuseLog`] handle is gone; prunes every hour.
fn writer(rx: Receiver<Value>, path: &Path, file: File, retention: Duration) {
    let mut out = BufWriter::new(file);
    let mut next_prune = std::time::Instant::now() + PRUNE_INTERVAL;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                let _ = writeln!(out, "{line}");
                // Drain what else is queued, then flush once.
                while let Ok(line) = rx.try_recv() {
                    let _ = writeln!(out, "{line}");
                }
                if let Err(error) = out.flush() {
                    tracing::warn!(%error, path = %path.display(), "cannot write the abuse log");
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let _ = out.flush();
                return;
            }
        }
        if std::time::Instant::now() >= next_prune {
            next_prune += PRUNE_INTERVAL;
            let _ = out.flush();
            match prune_file(path, retention).and_then(|()| open_append(path)) {
                Ok(file) => out = BufWriter::new(file),
                Err(error) => {
                    tracing::warn!(%error, path = %path.display(), "cannot prune the abuse log");
                }
            }
        }
    }
}

/// Rewrites `path` without the lines older than `retention` (atomically: temporary file and
/// rename). A missing file is fine.
fn prune_file(path: &Path, retention: Duration) -> io::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let kept = prune(&text, unix_now() - retention.as_secs_f64());
    if kept.len() == text.len() {
        return Ok(());
    }
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, kept)?;
    std::fs::rename(&temporary, path)
}

/// The lines of `text` stamped at or after `cutoff` (Unix seconds); lines without a readable
/// `ts` are dropped with the old ones.
pub fn prune(text: &str, cutoff: f64) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let ts = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v.get("ts").and_then(Value::as_f64));
        if ts.is_some_and(|ts| ts >= cutoff) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_recent_lines_only() {
        let text = "{\"ts\":100.5,\"event\":\"flow\"}\n\
                    not json\n\
                    {\"ts\":200,\"event\":\"flow\"}\n\
                    {\"event\":\"no ts\"}\n\
                    {\"ts\":300,\"event\":\"session_end\"}\n";
        assert_eq!(
            prune(text, 200.0),
            "{\"ts\":200,\"event\":\"flow\"}\n{\"ts\":300,\"event\":\"session_end\"}\n"
        );
        assert_eq!(prune(text, 400.0), "");
    }

    #[test]
    fn writes_json_lines_and_prunes_on_open() {
        let dir = std::env::temp_dir().join(format!("webnic-abuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("abuse.jsonl");
        // One line from 40 days ago, which a 30-day retention prunes.
        let old = unix_now() - 40.0 * 86_400.0;
        std::fs::write(&path, format!("{{\"ts\":{old},\"event\":\"flow\"}}\n")).unwrap();
        let log = AbuseLog::open(&path, DEFAULT_RETENTION).unwrap();
        let client: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let address: IpAddr = "10.77.0.2".parse().unwrap();
        log.session_started(7, client, Some("al\"ice"), &[address]);
        log.flow(
            7,
            client,
            Some("al\"ice"),
            &FlowKey {
                protocol: PROTO_TCP,
                source: address,
                source_port: 40_000,
                destination: "198.51.100.1".parse().unwrap(),
                destination_port: 443,
            },
        );
        log.session_ended(7, client, None, Duration::from_secs(3), "client closed");
        drop(log);
        // The writer thread flushes when the last handle is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let lines: Vec<Value> = loop {
            let text = std::fs::read_to_string(&path).unwrap();
            let lines: Vec<Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= 3 || std::time::Instant::now() > deadline {
                break lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["event"], "session_start");
        assert_eq!(lines[0]["sub"], "al\"ice");
        assert_eq!(lines[0]["addresses"][0], "10.77.0.2");
        assert_eq!(lines[1]["event"], "flow");
        assert_eq!(lines[1]["dst"], "198.51.100.1");
        assert_eq!(lines[1]["dport"], 443);
        assert_eq!(lines[1]["proto"], "tcp");
        assert_eq!(lines[2]["event"], "session_end");
        assert_eq!(lines[2]["sub"], Value::Null);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
