//! Which web origins may open a session.
//!
//! Browsers always send an `Origin` header with a WebTransport request; native clients usually
//! send none. A request without the header is admitted (a native client could forge any
//! header anyway); a request with one must name an allowed origin, so that an arbitrary web page
//! a user visits cannot use the gateway through the user's browser.

/// The allow-list: loopback origins on any port, plus exact extra origins.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    extra: Vec<String>,
}

impl OriginPolicy {
    /// The default loopback origins plus `extra` (each `scheme://host[:port]`, matched exactly,
    /// ASCII case-insensitively; a trailing `/` is ignored).
    pub fn new<I, S>(extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            extra: extra
                .into_iter()
                .map(|s| s.as_ref().trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    /// Whether a request with this `Origin` header value may open a session.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        is_loopback_origin(&origin) || self.extra.contains(&origin)
    }
}

/// `http(s)://localhost`, `http(s)://127.0.0.1` or `http(s)://[::1]`, with an optional port.
fn is_loopback_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    let (host, port) = if let Some(after) = rest.strip_prefix("[::1]") {
        ("[::1]", after)
    } else if let Some(colon) = rest.find(':') {
        rest.split_at(colon)
    } else {
        (rest, "")
    };
    // No port, or ':' and 1–5 digits.
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    matches!(host, "localhost" | "127.0.0.1" | "[::1]") && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_origins_are_allowed() {
        let p = OriginPolicy::default();
        for ok in [
            "https://localhost",
            "http://localhost",
            "https://localhost:8443",
            "http://127.0.0.1:3000",
            "https://127.0.0.1",
            "http://[::1]:8080",
            "HTTPS://LOCALHOST",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "https://evil.example",
            "https://localhost.evil.example",
            "https://127.0.0.1.evil.example",
            "https://localhost:80/path",
            "https://localhost:",
            "https://localhost:abc",
            "ftp://localhost",
            "null",
            "",
            "https://evil.example#localhost",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
    }

    #[test]
    fn extra_origins_match_exactly() {
        let p = OriginPolicy::new(["https://app.example:8443/", "http://demo.example"]);
        assert!(p.allows("https://app.example:8443"));
        assert!(p.allows("http://demo.example"));
        assert!(!p.allows("https://app.example"));
        assert!(!p.allows("https://demo.example"));
        assert!(p.allows("https://localhost"));
    }
}
