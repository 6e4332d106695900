//! The demo site: a small static HTTP/1.1 server (on by default, bound to localhost) that
//! serves the browser package (`js/`, `pkg/`, `demo/` of `wasm-client/`) and a `config.json`
//! telling the demo page this gateway's URL and current certificate hash, so a new user opens
//! `http://127.0.0.1:4480/` and is connected.
//!
//! Layers: [`Request::parse`] and [`Site::route`] are pure (unit-tested on bytes); [`serve`] is
//! the tokio accept loop around them. Only `GET`/`HEAD` of regular files under the three
//! package directories are answered: no directory listings, no `..`, no symlinks out.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::token::{Claims, TokenKey};

/// How long a token in `config.json` is valid (the page connects right after loading it).
const DEMO_TOKEN_SECS: u64 = 3600;

/// The subject of demo tokens (what per-subject caps and the abuse log see).
pub const DEMO_TOKEN_SUBJECT: &str = "demo";

/// Where the demo listens unless told otherwise: localhost only (the page gets sockets into
/// the tunnel, so it must not be reachable from elsewhere by default).
pub const DEFAULT_DEMO_LISTEN: &str = "127.0.0.1:4480";

/// The package directory when `--demo-dir` is not given: `wasm-client/` of the source tree
/// this binary was built from (where `scripts/build-wasm.sh` puts `pkg/`).
pub const DEFAULT_DEMO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../wasm-client");

/// The largest request head read (request line and headers).
const MAX_HEAD: usize = 8 * 1024;

/// How long one connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The directories under the package root that are served, each as `/<dir>/...`.
const SERVED_DIRS: [&str; 3] = ["js", "pkg", "demo"];

/// A parsed request head: only what routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// `GET`, `HEAD`, ...
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
}

/// Why a request head could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The head is not complete yet (no blank line).
    #[error("incomplete request head")]
    Incomplete,
    /// The request line is not `METHOD PATH HTTP/1.x`.
    #[error("malformed request line")]
    Malformed,
}

impl<'a> Request<'a> {
    /// Parses the head at the start of `bytes` (which must contain the blank line that ends it).
    ///
    /// # Errors
    /// [`RequestError::Incomplete`] before the blank line, [`RequestError::Malformed`] for a
    /// request line that is not HTTP/1.x.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, RequestError> {
        let end = find(bytes, b"\r\n\r\n")
            .or_else(|| find(bytes, b"\n\n"))
            .ok_or(RequestError::Incomplete)?;
        let head = std::str::from_utf8(&bytes[..end]).map_err(|_| RequestError::Malformed)?;
        let line = head.lines().next().ok_or(RequestError::Malformed)?;
        let mut parts = line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RequestError::Malformed);
        };
        if !version.starts_with("HTTP/1.") || !target.starts_with('/') || method.is_empty() {
            return Err(RequestError::Malformed);
        }
        let path = target.split(['?', '#']).next().unwrap_or(target);
        Ok(Self { method, path })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What a request resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A file of the package, with its content type.
    File(PathBuf, &'static str),
    /// The generated `config.json`.
    Config,
    /// Nothing here.
    NotFound,
    /// Not `GET`/`HEAD`.
    MethodNotAllowed,
}

/// The served site: the package root and what `config.json` says.
#[derive(Debug, Clone)]
pub struct Site {
    /// The package root (`wasm-client/`).
    pub dir: PathBuf,
    /// The gateway's WebTransport listen address (its IP is the URL's host unless unspecified).
    pub gateway: SocketAddr,
    /// The certificate's SHA-256, lower-case hex.
    pub cert_hash: String,
    /// With `--token-key-file`: the key `config.json` mints a one-hour demo token with, so the
    /// page can connect. Only set when the demo listens on loopback (see [`Site::new`]).
    pub token_key: Option<Arc<TokenKey>>,
}

impl Site {
    /// The site for a demo listening on `listen`. A token key is kept only for a loopback
    /// listener: anyone who can load `config.json` gets a session token.
    pub fn new(
        dir: PathBuf,
        gateway: SocketAddr,
        cert_hash: String,
        listen: SocketAddr,
        token_key: Option<Arc<TokenKey>>,
    ) -> Self {
        Self {
            dir,
            gateway,
            cert_hash,
            token_key: token_key.filter(|_| listen.ip().is_loopback()),
        }
    }

    /// Maps a request to what answers it (without touching the file system).
    pub fn route(&self, request: &Request<'_>) -> Route {
        if request.method != "GET" && request.method != "HEAD" {
            return Route::MethodNotAllowed;
        }
        match request.path {
            "/" | "/index.html" => {
                return Route::File(self.dir.join("demo/index.html"), content_type("html"));
            }
            "/config.json" => return Route::Config,
            _ => {}
        }
        let mut segments = request.path[1..].split('/');
        let Some(top) = segments.next() else {
            return Route::NotFound;
        };
        if !SERVED_DIRS.contains(&top) {
            return Route::NotFound;
        }
        let mut file = self.dir.join(top);
        for segment in segments {
            // No parent, hidden or empty segments: nothing outside the three directories.
            if segment.is_empty() || segment.starts_with('.') || segment.contains('\\') {
                return Route::NotFound;
            }
            file.push(segment);
        }
        let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("");
        let kind = content_type(extension);
        Route::File(file, kind)
    }

    /// `config.json` for a page that reached this server at `local` (the host the page used,
    /// which is also how it reaches the gateway when the gateway listens on every address), at
    /// Unix time `now` (for the token, if the gateway requires them).
    pub fn config_json(&self, local: IpAddr, now: u64) -> String {
        let host = if self.gateway.ip().is_unspecified() {
            local
        } else {
            self.gateway.ip()
        };
        let host = match host {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        // Base64url and hex: nothing in the values needs JSON escaping.
        let token = self
            .token_key
            .as_ref()
            .and_then(|key| {
                key.mint(&Claims {
                    sub: DEMO_TOKEN_SUBJECT.to_owned(),
                    nbf: now.saturating_sub(60),
                    exp: now + DEMO_TOKEN_SECS,
                    dst: Vec::new(),
                    max_sessions: None,
                    rate: None,
                })
                .ok()
            })
            .map(|token| format!(",\"token\":\"{token}\""))
            .unwrap_or_default();
        format!(
            "{{\"gateway\":\"https://{host}:{}{}\",\"certHash\":\"{}\"{token}}}\n",
            self.gateway.port(),
            webnic_stack::protocol::SESSION_PATH,
            self.cert_hash
        )
    }
}

fn content_type(extension: &str) -> &'static str {
    match extension {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "json" => "application/json",
        "ts" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "css" => "text/css; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Binds the demo listener.
///
/// # Errors
/// The bind error.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Whether `dir` holds a built package (the wasm file `scripts/build-wasm.sh` writes).
pub fn package_built(dir: &Path) -> bool {
    dir.join("pkg/webnic_wasm_bg.wasm").is_file() && dir.join("js/webnic.js").is_file()
}

/// Answers requests on `listener` until the task is aborted; one task per connection.
pub async fn serve(listener: TcpListener, site: Arc<Site>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "demo accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let site = Arc::clone(&site);
        tokio::spawn(async move {
            if let Err(error) = answer(stream, &site).await {
                tracing::debug!(%peer, %error, "demo request failed");
            }
        });
    }
}

/// One connection: requests one after another (keep-alive) until the client closes or idles.
async fn answer(mut stream: TcpStream, site: &Site) -> std::io::Result<()> {
    let local = stream.local_addr()?.ip();
    let mut buffer = Vec::with_capacity(1024);
    loop {
        let head_len = loop {
            match Request::parse(&buffer) {
                Ok(_) => break head_end(&buffer),
                Err(RequestError::Malformed) => {
                    respond(
                        &mut stream,
                        "400 Bad Request",
                        "text/plain",
                        b"bad request",
                        false,
                    )
                    .await?;
                    return Ok(());
                }
                Err(RequestError::Incomplete) if buffer.len() > MAX_HEAD => {
                    respond(
                        &mut stream,
                        "431 Request Header Fields Too Large",
                        "text/plain",
                        b"",
                        false,
                    )
                    .await?;
                    return Ok(());
                }
                Err(RequestError::Incomplete) => {}
            }
            let mut chunk = [0u8; 2048];
            let n = match tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut chunk)).await {
                Ok(read) => read?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        // Parsed above; parsing again keeps the borrow of `buffer` short.
        let request = Request::parse(&buffer).map_err(std::io::Error::other)?;
        let head_only = request.method == "HEAD";
        match site.route(&request) {
            Route::Config => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let body = site.config_json(local, now);
                respond(
                    &mut stream,
                    "200 OK",
                    "application/json",
                    body.as_bytes(),
                    head_only,
                )
                .await?;
            }
            Route::File(path, kind) => match read_regular_file(&path).await {
                Some(body) => respond(&mut stream, "200 OK", kind, &body, head_only).await?,
                None => {
                    respond(
                        &mut stream,
                        "404 Not Found",
                        "text/plain",
                        b"not found",
                        head_only,
                    )
                    .await?;
                }
            },
            Route::NotFound => {
                respond(
                    &mut stream,
                    "404 Not Found",
                    "text/plain",
                    b"not found",
                    head_only,
                )
                .await?;
            }
            Route::MethodNotAllowed => {
                respond(
                    &mut stream,
                    "405 Method Not Allowed",
                    "text/plain",
                    b"",
                    false,
                )
                .await?;
                return Ok(());
            }
        }
        buffer.drain(..head_len);
    }
}

/// The length of the request head (with its blank line) at the start of `buffer`.
fn head_end(buffer: &[u8]) -> usize {
    match (find(buffer, b"\r\n\r\n"), find(buffer, b"\n\n")) {
        (Some(crlf), Some(lf)) if lf < crlf => lf + 2,
        (Some(crlf), _) => crlf + 4,
        (None, Some(lf)) => lf + 2,
        (None, None) => buffer.len(),
    }
}

/// The file's bytes if it is a regular file (not a directory, not a symlink elsewhere).
async fn read_regular_file(path: &Path) -> Option<Vec<u8>> {
    let metadata = tokio::fs::symlink_metadata(path).await.ok()?;
    if !metadata.is_file() {
        return None;
    }
    tokio::fs::read(path).await.ok()
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    // no-store: config.json changes with every start (a new self-signed certificate), and the
    // package with every build.
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(gateway: &str) -> Site {
        Site {
            dir: PathBuf::from("/pkg-root"),
            gateway: gateway.parse().expect("address"),
            cert_hash: "ab".repeat(32),
            token_key: None,
        }
    }

    fn route(site: &Site, head: &[u8]) -> Route {
        site.route(&Request::parse(head).expect("parses"))
    }

    #[test]
    fn parses_request_line_and_strips_query() {
        let request = Request::parse(b"GET /demo/index.html?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("parses");
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/demo/index.html");
        assert_eq!(
            Request::parse(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Err(RequestError::Incomplete)
        );
        assert_eq!(
            Request::parse(b"GET /\r\n\r\n"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            Request::parse(b"GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            Request::parse(b"GET / SPDY/3\r\n\r\n"),
            Err(RequestError::Malformed)
        );
    }

    #[test]
    fn routes_only_the_package_directories() {
        let site = site("0.0.0.0:4433");
        assert_eq!(
            route(&site, b"GET / HTTP/1.1\r\n\r\n"),
            Route::File(
                PathBuf::from("/pkg-root/demo/index.html"),
                "text/html; charset=utf-8"
            )
        );
        assert_eq!(
            route(&site, b"GET /pkg/webnic_wasm_bg.wasm HTTP/1.1\r\n\r\n"),
            Route::File(
                PathBuf::from("/pkg-root/pkg/webnic_wasm_bg.wasm"),
                "application/wasm"
            )
        );
        assert_eq!(
            route(&site, b"HEAD /js/webnic.js HTTP/1.0\r\n\r\n"),
            Route::File(
                PathBuf::from("/pkg-root/js/webnic.js"),
                "text/javascript; charset=utf-8"
            )
        );
        assert_eq!(
            route(&site, b"GET /config.json HTTP/1.1\r\n\r\n"),
            Route::Config
        );
        for refused in [
            &b"GET /js/../../etc/passwd HTTP/1.1\r\n\r\n"[..],
            b"GET /js/.hidden HTTP/1.1\r\n\r\n",
            b"GET /js//x HTTP/1.1\r\n\r\n",
            b"GET /node_modules/x.js HTTP/1.1\r\n\r\n",
            b"GET /Cargo.toml HTTP/1.1\r\n\r\n",
            b"GET /js\\..\\x HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                route(&site, refused),
                Route::NotFound,
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
        assert_eq!(
            route(&site, b"POST /config.json HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
    }

    #[test]
    fn config_names_the_gateway_the_page_can_reach() {
        let hash = "ab".repeat(32);
        // Listening everywhere: the host the page reached the demo at.
        assert_eq!(
            site("0.0.0.0:4433").config_json("127.0.0.1".parse().expect("ip"), 0),
            format!("{{\"gateway\":\"https://127.0.0.1:4433/webnic\",\"certHash\":\"{hash}\"}}\n")
        );
        assert_eq!(
            site("[::]:4433").config_json("::1".parse().expect("ip"), 0),
            format!("{{\"gateway\":\"https://[::1]:4433/webnic\",\"certHash\":\"{hash}\"}}\n")
        );
        // A specific address: that one.
        assert_eq!(
            site("10.200.1.1:4434").config_json("127.0.0.1".parse().expect("ip"), 0),
            format!("{{\"gateway\":\"https://10.200.1.1:4434/webnic\",\"certHash\":\"{hash}\"}}\n")
        );
    }

    #[test]
    fn config_carries_a_demo_token_only_on_loopback() {
        let key = Arc::new(TokenKey::new(b"0123456789abcdef0123").expect("key"));
        let gateway: SocketAddr = "10.200.1.1:4433".parse().expect("address");
        let now = 1_800_000_000;
        let local = Site::new(
            PathBuf::new(),
            gateway,
            "ab".repeat(32),
            "127.0.0.1:4480".parse().expect("address"),
            Some(key.clone()),
        );
        let json = local.config_json("127.0.0.1".parse().expect("ip"), now);
        let token = json
            .split("\"token\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a token in config.json");
        let verified = key.verify(token, now).expect("the token verifies");
        assert_eq!(verified.claims.sub, DEMO_TOKEN_SUBJECT);
        assert!(key.verify(token, now + DEMO_TOKEN_SECS).is_err(), "expires");
        // Listening beyond loopback: no token for whoever loads the page.
        let public = Site::new(
            PathBuf::new(),
            gateway,
            "ab".repeat(32),
            "0.0.0.0:4480".parse().expect("address"),
            Some(key),
        );
        assert!(
            !public
                .config_json("127.0.0.1".parse().expect("ip"), now)
                .contains("token")
        );
    }

    #[test]
    fn head_length_counts_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nGET"), 18);
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nGET"), 16);
    }
}
