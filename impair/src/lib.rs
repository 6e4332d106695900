//! A seeded userspace UDP impairment relay: what `tc netem` would do on a link, for a kernel that has
//! no netem. It sits on the QUIC hop between a webnic client and its gateway (or any UDP pair) and
//! applies loss, delay with jitter, reordering, duplication, a rate limit with a bounded queue, and
//! blackouts (the path dying for a while).
//!
//! [`Link`] is the sans-IO model of one direction, deterministic for a given seed and clock;
//! [`Relay`] runs two of them per client on tokio UDP sockets. The `webnic-impair` binary is the
//! same relay on the command line.

mod link;
mod relay;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub use link::{Link, LinkStats};
pub use relay::{Relay, RelayStats};

/// How one direction of a link is impaired. The default passes everything at once, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// Random loss, percent of packets.
    pub loss_percent: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from [0, jitter] per packet. Unlike netem's, it keeps packets
    /// in order (a packet never leaves before the one offered before it): reordering is `reorder_*`.
    pub jitter: Duration,
    /// Percent of packets held back by `reorder_delay` so that later ones overtake them.
    pub reorder_percent: f64,
    pub reorder_delay: Duration,
    /// Percent of packets sent twice.
    pub duplicate_percent: f64,
    /// Serialization rate; `None` is unlimited.
    pub rate_bits_per_sec: Option<u64>,
    /// With a rate limit: packets that would wait longer than this in the queue are dropped (tail drop).
    pub queue_delay_limit: Duration,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            loss_percent: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder_percent: 0.0,
            reorder_delay: Duration::from_millis(5),
            duplicate_percent: 0.0,
            rate_bits_per_sec: None,
            queue_delay_limit: Duration::from_millis(100),
        }
    }
}

/// A malformed impairment specification.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("`{0}` is not `key=value`")]
    NotKeyValue(String),
    #[error(
        "unknown impairment `{0}` (known: loss, delay, jitter, reorder, reorder-delay, dup, rate, queue)"
    )]
    UnknownKey(String),
    #[error("`{value}` is not a valid {what}")]
    BadValue { value: String, what: &'static str },
}

impl FromStr for Impairment {
    type Err = SpecError;

    /// Parses `loss=1%,delay=20ms,jitter=5ms,reorder=1%,reorder-delay=5ms,dup=1%,rate=10mbit,queue=100ms`;
    /// every key is optional, and `none` (or an empty string) is a clean link.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut impairment = Self::default();
        let spec = spec.trim();
        if spec.is_empty() || spec == "none" {
            return Ok(impairment);
        }
        for item in spec.split(',') {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(item.to_owned()))?;
            let value = value.trim();
            match key.trim() {
                "loss" => impairment.loss_percent = parse_percent(value)?,
                "delay" => impairment.delay = parse_duration(value)?,
                "jitter" => impairment.jitter = parse_duration(value)?,
                "reorder" => impairment.reorder_percent = parse_percent(value)?,
                "reorder-delay" => impairment.reorder_delay = parse_duration(value)?,
                "dup" => impairment.duplicate_percent = parse_percent(value)?,
                "rate" => impairment.rate_bits_per_sec = Some(parse_rate(value)?),
                "queue" => impairment.queue_delay_limit = parse_duration(value)?,
                other => return Err(SpecError::UnknownKey(other.to_owned())),
            }
        }
        Ok(impairment)
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.loss_percent > 0.0 {
            parts.push(format!("loss={}%", self.loss_percent));
        }
        if !self.delay.is_zero() {
            parts.push(format!("delay={}ms", self.delay.as_millis()));
        }
        if !self.jitter.is_zero() {
            parts.push(format!("jitter={}ms", self.jitter.as_millis()));
        }
        if self.reorder_percent > 0.0 {
            parts.push(format!(
                "reorder={}%,reorder-delay={}ms",
                self.reorder_percent,
                self.reorder_delay.as_millis()
            ));
        }
        if self.duplicate_percent > 0.0 {
            parts.push(format!("dup={}%", self.duplicate_percent));
        }
        if let Some(rate) = self.rate_bits_per_sec {
            parts.push(format!(
                "rate={}kbit,queue={}ms",
                rate / 1000,
                self.queue_delay_limit.as_millis()
            ));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

fn bad(value: &str, what: &'static str) -> SpecError {
    SpecError::BadValue {
        value: value.to_owned(),
        what,
    }
}

fn parse_percent(value: &str) -> Result<f64, SpecError> {
    let number = value.strip_suffix('%').unwrap_or(value);
    match number.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(bad(value, "percentage (0–100)")),
    }
}

/// `20ms`, `1.5s`, `500us`.
pub fn parse_duration(value: &str) -> Result<Duration, SpecError> {
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| bad(value, "duration (e.g. 20ms)"))?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| bad(value, "duration (e.g. 20ms)"))?;
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "us" | "µs" => number / 1e6,
        _ => return Err(bad(value, "duration unit (s, ms, us)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad(value, "duration"))
}

/// `10mbit`, `500kbit`, `1gbit`, or plain bits per second.
fn parse_rate(value: &str) -> Result<u64, SpecError> {
    let lower = value.to_ascii_lowercase();
    let (number, scale) = if let Some(n) = lower.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = lower.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = lower.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        (lower.as_str(), 1.0)
    };
    match number.parse::<f64>() {
        Ok(n) if n > 0.0 => Ok((n * scale) as u64),
        _ => Err(bad(value, "rate (e.g. 10mbit)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips() {
        let spec = "loss=1%,delay=20ms,jitter=5ms,reorder=2%,reorder-delay=3ms,dup=1%,rate=10mbit,queue=50ms";
        let impairment: Impairment = spec.parse().unwrap();
        assert_eq!(impairment.loss_percent, 1.0);
        assert_eq!(impairment.delay, Duration::from_millis(20));
        assert_eq!(impairment.jitter, Duration::from_millis(5));
        assert_eq!(impairment.reorder_percent, 2.0);
        assert_eq!(impairment.reorder_delay, Duration::from_millis(3));
        assert_eq!(impairment.duplicate_percent, 1.0);
        assert_eq!(impairment.rate_bits_per_sec, Some(10_000_000));
        assert_eq!(impairment.queue_delay_limit, Duration::from_millis(50));
        let again: Impairment = impairment.to_string().parse().unwrap();
        assert_eq!(again, impairment);
        assert_eq!("none".parse::<Impairment>().unwrap(), Impairment::default());
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert_eq!(
            "loss".parse::<Impairment>(),
            Err(SpecError::NotKeyValue("loss".into()))
        );
        assert_eq!(
            "lose=1%".parse::<Impairment>(),
            Err(SpecError::UnknownKey("lose".into()))
        );
        assert!(matches!(
            "loss=150%".parse::<Impairment>(),
            Err(SpecError::BadValue { .. })
        ));
        assert!(matches!(
            "delay=20".parse::<Impairment>(),
            Err(SpecError::BadValue { .. })
        ));
        assert!(matches!(
            "rate=fast".parse::<Impairment>(),
            Err(SpecError::BadValue { .. })
        ));
    }
}
