//! End-to-end tests of session admission: a bad Origin gets 403; with `--token-key-file` a
//! session without a token, with an expired, not-yet-valid or wrongly signed token is refused
//! with its own close code; caps per address, per token subject (gateway cap and the token's
//! `max_sessions`) and in total refuse with theirs; the new-session rate limit refuses; the
//! maximum session lifetime closes a session; a token's destination scope narrows the egress
//! policy. Each refusal is counted in /metrics by reason. Tokens are minted with the real
//! `webnic-gateway token` command.

mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    GatewayProcess, TCP_ECHO_PORT, TEST_TIMEOUT, Topology, assert_same_bytes, connect_client,
    gateway_binary, nft_packets, random_bytes, run, tcp_exchange, within,
};
use webnic::SessionError;
use webnic_stack::protocol::CloseCode;

fn refused(reason: &str) -> String {
    format!("webnic_refused_sessions_total{{reason=\"{reason}\"}}")
}

/// A 32-byte hex key in the topology's temp dir.
fn write_key(topology: &Topology, name: &str) -> PathBuf {
    let path = topology.tmp().join(name);
    let key: String = random_bytes(32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(&path, format!("{key}\n")).expect("write key");
    path
}

/// Mints a token with `webnic-gateway token --key-file KEY --sub SUB ARGS...`.
fn mint(key: &Path, sub: &str, args: &[&str]) -> String {
    let binary = gateway_binary();
    let mut argv = vec![
        binary.to_str().expect("utf-8"),
        "token",
        "--key-file",
        key.to_str().expect("utf-8"),
        "--sub",
        sub,
    ];
    argv.extend_from_slice(args);
    let token = run(&argv).trim().to_owned();
    assert!(
        token.contains('.') && token.len() > 40,
        "not a token: {token:?}"
    );
    token
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn connect_with(gateway: &GatewayProcess, token: Option<&str>) -> io::Result<webnic::Client> {
    let mut options = webnic::ConnectOptions::new(gateway.url()).cert_hash(gateway.cert_hash());
    if let Some(token) = token {
        options = options.token(token);
    }
    within(
        Duration::from_secs(30),
        "Client::connect",
        webnic::Client::connect(options),
    )
    .await
}

/// Connects and expects a refusal with `expected`; returns the gateway's detail text.
async fn expect_refused(
    gateway: &GatewayProcess,
    token: Option<&str>,
    expected: CloseCode,
) -> String {
    match connect_with(gateway, token).await {
        Ok(client) => panic!(
            "session admitted (address {:?}) but {expected} was expected",
            client.ipv4()
        ),
        Err(error) => match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<SessionError>())
        {
            Some(SessionError::Closed { code, reason }) => {
                assert_eq!(*code, expected, "wrong close code ({reason})");
                reason.clone()
            }
            other => panic!(
                "expected a Closed({expected}) session error, got {error} ({other:?})\n{}",
                gateway.process.logs()
            ),
        },
    }
}

async fn connect_ok(gateway: &GatewayProcess, token: Option<&str>) -> webnic::Client {
    match connect_with(gateway, token).await {
        Ok(client) => client,
        Err(error) => panic!("session refused: {error}\n{}", gateway.process.logs()),
    }
}

async fn echo(client: &webnic::Client, topology: &Topology, what: &str) {
    let remote = SocketAddr::new(IpAddr::V4(topology.srv_ipv4()), TCP_ECHO_PORT);
    let data = random_bytes(64 << 10);
    let echoed = tcp_exchange(client, remote, data.clone())
        .await
        .unwrap_or_else(|e| panic!("{what}: echo failed: {e}"));
    assert_same_bytes(&echoed, &data, what);
}

/// A WebTransport request with an `Origin` header, straight through wtransport (the client
/// library sends none, as native clients do).
async fn connect_with_origin(
    gateway: &GatewayProcess,
    origin: &str,
) -> Result<wtransport::Connection, wtransport::error::ConnectingError> {
    let endpoint = common::wtransport_client(gateway);
    let options = wtransport::endpoint::ConnectOptions::builder(gateway.url())
        .add_header("origin", origin)
        .build();
    within(
        Duration::from_secs(30),
        "origin connect",
        endpoint.connect(options),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_origin_gets_403_and_allowed_origins_pass() {
    let topology = Topology::new();
    let gateway = topology.start_gateway(&["--allow-origin", "https://app.example"]);
    within(TEST_TIMEOUT, "origin", async {
        let evil = connect_with_origin(&gateway, "https://evil.example").await;
        assert!(
            matches!(
                evil,
                Err(wtransport::error::ConnectingError::SessionRejected)
            ),
            "a foreign origin was not rejected: {:?}",
            evil.map(|c| c.remote_address())
        );
        assert_eq!(gateway.metric(&refused("origin")), 1.0);
        for allowed in ["https://app.example", "http://localhost:8080"] {
            let connection = connect_with_origin(&gateway, allowed)
                .await
                .unwrap_or_else(|e| panic!("{allowed} refused: {e}"));
            connection.close(0u32.into(), b"");
        }
        assert_eq!(gateway.metric(&refused("origin")), 1.0);
        // The client library reports an HTTP-level rejection as its own error (here: a wrong
        // path, which gets 404 the same way a bad origin gets 403).
        let wrong_path = webnic::ConnectOptions::new(gateway.url().replace("/webnic", "/other"))
            .cert_hash(gateway.cert_hash());
        let error = webnic::Client::connect(wrong_path)
            .await
            .expect_err("a wrong path was admitted");
        assert_eq!(
            error
                .get_ref()
                .and_then(|e| e.downcast_ref::<SessionError>()),
            Some(&SessionError::Rejected),
            "{error}"
        );
        assert_eq!(gateway.metric(&refused("path")), 1.0);
    })
    .await;
}

/// `webnic --token T nc HOST PORT` works against a gateway that needs tokens; without the flag
/// the CLI fails and says why.
#[test]
fn cli_token_flag() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let key = write_key(&topology, "token.key");
    let key_arg = key.to_str().unwrap().to_owned();
    let gateway = topology.start_gateway(&["--token-key-file", &key_arg]);
    let token = mint(&key, "cli", &["--ttl", "5m"]);
    let data = random_bytes(128 << 10);
    let input = topology.tmp().join("nc-input.bin");
    std::fs::write(&input, &data).unwrap();
    let nc = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_webnic"));
        cmd.args([
            "--gateway",
            gateway.url(),
            "--cert-hash",
            gateway.cert_hash(),
        ]);
        if let Some(token) = token {
            cmd.args(["--token", token]);
        }
        cmd.args([
            "nc",
            &topology.srv_ipv4().to_string(),
            &TCP_ECHO_PORT.to_string(),
        ]);
        common::run_with_stdin(
            &mut cmd,
            std::fs::File::open(&input).unwrap(),
            Duration::from_secs(60),
        )
    };
    let output = nc(Some(&token));
    assert!(
        output.status.success(),
        "webnic --token nc failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_same_bytes(&output.stdout, &data, "webnic --token nc");
    let output = nc(None);
    assert!(!output.status.success(), "connected without a token");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("token required"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_missing_expired_early_or_forged_are_refused_with_their_codes() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let key = write_key(&topology, "token.key");
    let other_key = write_key(&topology, "other.key");
    let key_arg = key.to_str().unwrap().to_owned();
    let gateway = topology.start_gateway(&["--token-key-file", &key_arg]);
    let now = unix_now();
    let expired = mint(
        &key,
        "alice",
        &["--ttl", "1h", "--issued-at", &(now - 7200).to_string()],
    );
    let early = mint(
        &key,
        "alice",
        &["--ttl", "1h", "--issued-at", &(now + 3600).to_string()],
    );
    let forged = mint(&other_key, "alice", &["--ttl", "1h"]);
    let good = mint(&key, "alice", &["--ttl", "10m"]);
    // The good token's payload with the forged token's MAC.
    let spliced = format!(
        "{}.{}",
        good.split_once('.').unwrap().0,
        forged.split_once('.').unwrap().1
    );
    within(TEST_TIMEOUT, "tokens", async {
        let detail = expect_refused(&gateway, None, CloseCode::TokenMissing).await;
        assert!(detail.contains("token"), "{detail}");
        expect_refused(&gateway, Some(&expired), CloseCode::TokenExpired).await;
        expect_refused(&gateway, Some(&early), CloseCode::TokenNotYetValid).await;
        expect_refused(&gateway, Some(&forged), CloseCode::TokenInvalid).await;
        expect_refused(&gateway, Some(&spliced), CloseCode::TokenInvalid).await;
        expect_refused(&gateway, Some("garbage"), CloseCode::TokenInvalid).await;
        for (reason, count) in [
            ("token_missing", 1.0),
            ("token_expired", 1.0),
            ("token_not_yet_valid", 1.0),
            ("token_invalid", 3.0),
        ] {
            assert_eq!(gateway.metric(&refused(reason)), count, "{reason}");
        }
        assert_eq!(gateway.metric("webnic_sessions_total"), 0.0);

        let client = connect_ok(&gateway, Some(&good)).await;
        echo(&client, &topology, "session with a valid token").await;
        client.close().await;
        assert_eq!(gateway.metric("webnic_sessions_total"), 1.0);
    })
    .await;
    let logs = gateway.process.logs();
    assert!(
        logs.contains("refused session") && logs.contains("token_expired"),
        "refusals are logged with their reason:\n{logs}"
    );
}

/// Per-address and per-subject caps (the token's `max_sessions` narrowing the gateway's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_and_per_subject_caps() {
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let key = write_key(&topology, "token.key");
    let key_arg = key.to_str().unwrap().to_owned();
    let gateway = topology.start_gateway(&[
        "--token-key-file",
        &key_arg,
        "--max-sessions-per-address",
        "3",
        "--max-sessions-per-subject",
        "2",
    ]);
    let alice = mint(&key, "alice", &[]);
    let carol = mint(&key, "carol", &["--max-sessions", "1"]);
    let dave = mint(&key, "dave", &[]);
    within(TEST_TIMEOUT, "caps", async {
        let alice1 = connect_ok(&gateway, Some(&alice)).await;
        let alice2 = connect_ok(&gateway, Some(&alice)).await;
        expect_refused(&gateway, Some(&alice), CloseCode::TooManySessionsPerSubject).await;
        let carol1 = connect_ok(&gateway, Some(&carol)).await;
        // Three sessions from this address now.
        expect_refused(&gateway, Some(&dave), CloseCode::TooManySessionsPerAddress).await;
        // Existing sessions are unaffected.
        echo(&alice2, &topology, "alice's second session").await;
        // A freed place is reusable, but carol's token allows one session only.
        alice1.close().await;
        tokio::task::block_in_place(|| {
            gateway.wait_metric("webnic_sessions_active", Duration::from_secs(10), |v| {
                v == 2.0
            })
        });
        let detail =
            expect_refused(&gateway, Some(&carol), CloseCode::TooManySessionsPerSubject).await;
        assert!(detail.contains('1'), "{detail}");
        let dave1 = connect_ok(&gateway, Some(&dave)).await;
        echo(&dave1, &topology, "dave after a place was freed").await;
        assert_eq!(gateway.metric(&refused("per_subject")), 2.0);
        assert_eq!(gateway.metric(&refused("per_address")), 1.0);
        for client in [alice2, carol1, dave1] {
            client.close().await;
        }
    })
    .await;
}

/// The total cap, the new-session rate limit, and the maximum lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_cap_rate_limit_and_max_lifetime() {
    let topology = Topology::new();
    let gateway = topology.start_gateway(&[
        "--max-sessions",
        "2",
        "--session-rate",
        "0.05",
        "--session-burst",
        "4",
        "--max-lifetime",
        "8s",
    ]);
    within(TEST_TIMEOUT, "total, rate, lifetime", async {
        let started = std::time::Instant::now();
        let first = connect_ok(&gateway, None).await;
        let _second = connect_ok(&gateway, None).await;
        expect_refused(&gateway, None, CloseCode::TooManySessions).await;
        // The fourth attempt still has a token in the bucket (burst 4), the fifth does not.
        expect_refused(&gateway, None, CloseCode::TooManySessions).await;
        expect_refused(&gateway, None, CloseCode::RateLimited).await;
        assert_eq!(gateway.metric(&refused("total")), 2.0);
        assert_eq!(gateway.metric(&refused("rate_limited")), 1.0);
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "the refusals took too long to test the lifetime: {:?}",
            started.elapsed()
        );

        let ended = within(Duration::from_secs(20), "max lifetime", first.closed()).await;
        let lifetime = started.elapsed();
        match ended {
            SessionError::Closed { code, .. } => assert_eq!(code, CloseCode::MaxLifetime),
            other => panic!("session ended with {other:?}, not MaxLifetime"),
        }
        assert!(
            lifetime >= Duration::from_secs(7) && lifetime < Duration::from_secs(15),
            "closed after {lifetime:?}, lifetime 8 s"
        );
        tokio::task::block_in_place(|| {
            gateway.wait_metric(
                "webnic_sessions_max_lifetime_total",
                Duration::from_secs(10),
                |v| v == 2.0,
            )
        });
    })
    .await;
}

/// A token's `dst` scope: the allowed port works, another port of the same (gateway-allowed)
/// server is refused at once with ICMP prohibited, and never reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_scope_narrows_destinations() {
    const OUTSIDE_SCOPE: u16 = 7005;
    let topology = Topology::new();
    let _echo = topology.serve_tcp_echo(TCP_ECHO_PORT);
    let key = write_key(&topology, "token.key");
    let key_arg = key.to_str().unwrap().to_owned();
    let gateway = topology.start_gateway(&["--token-key-file", &key_arg]);
    let srv = topology.srv_ipv4();
    let scope = format!("{srv}/32:{TCP_ECHO_PORT}");
    let token = mint(&key, "scoped", &["--allow-dest", &scope]);
    topology.srv_run(&["nft", "add", "table", "inet", "wnscope"]);
    topology.srv_run(&[
        "nft",
        "add",
        "chain",
        "inet",
        "wnscope",
        "in",
        "{ type filter hook input priority 0; }",
    ]);
    let rule = format!("tcp dport {OUTSIDE_SCOPE} counter");
    let mut args = vec!["nft", "add", "rule", "inet", "wnscope", "in"];
    args.extend(rule.split(' '));
    topology.srv_run(&args);
    within(TEST_TIMEOUT, "token scope", async {
        let client = connect_ok(&gateway, Some(&token)).await;
        echo(&client, &topology, "inside the token's scope").await;
        let started = std::time::Instant::now();
        let outside = client
            .tcp_connect(SocketAddr::new(IpAddr::V4(srv), OUTSIDE_SCOPE))
            .await;
        let error = outside.expect_err("a port outside the token's scope connected");
        assert_eq!(
            error.kind(),
            io::ErrorKind::PermissionDenied,
            "refused by scope, not reset by the server: {error}"
        );
        // Refused by ICMP at once, not at the connect timeout (room for a loaded machine).
        assert!(started.elapsed() < Duration::from_secs(10));
        let ruleset = topology.srv_run(&["nft", "list", "table", "inet", "wnscope"]);
        assert_eq!(
            nft_packets(&ruleset, &format!("tcp dport {OUTSIDE_SCOPE}")),
            Some(0),
            "{ruleset}"
        );
        assert!(
            gateway.metric("webnic_quota_dropped_packets_total{reason=\"token_scope\"}") >= 1.0
        );
        client.close().await;
    })
    .await;
    // A session without a token's scope (another subject, no --allow-dest) reaches the port: the
    // refusal above came from the scope, not from the gateway's policy.
    let open = mint(&key, "open", &[]);
    within(TEST_TIMEOUT, "no scope", async {
        let client = connect_ok(&gateway, Some(&open)).await;
        let result = client
            .tcp_connect(SocketAddr::new(IpAddr::V4(srv), OUTSIDE_SCOPE))
            .await;
        let error = result.expect_err("nothing listens on the port");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused, "{error}");
        client.close().await;
    })
    .await;
    let ruleset = topology.srv_run(&["nft", "list", "table", "inet", "wnscope"]);
    assert!(
        nft_packets(&ruleset, &format!("tcp dport {OUTSIDE_SCOPE}")).unwrap_or(0) >= 1,
        "{ruleset}"
    );
}

/// The helper connects without a token when the gateway needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_needed_without_a_key() {
    let topology = Topology::new();
    let gateway = topology.start_gateway(&[]);
    within(TEST_TIMEOUT, "no key", async {
        let client = connect_client(&gateway).await;
        assert!(client.ipv4().is_some());
        // A token is ignored when the gateway has no key.
        let other = connect_ok(&gateway, Some("ignored.token")).await;
        other.close().await;
        client.close().await;
    })
    .await;
}
