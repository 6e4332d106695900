//! Signed, expiring session tokens (sans-IO: the clock is an argument).
//!
//! A page cannot send credentials with a WebTransport request, so whoever serves the page mints
//! a short-lived token with the gateway's key and the page puts it in the session URL's query
//! (`/webnic?token=…`). The format is compact and JWT-like, without JWT's algorithm agility:
//!
//! ```text
//! base64url(payload JSON) "." base64url(HMAC-SHA256(key, base64url(payload JSON)))
//! ```
//!
//! The payload carries `sub` (who the sessions count against), `nbf` and `exp` (Unix seconds)
//! and an optional scope that only ever narrows what the gateway allows: `dst` (destinations,
//! `CIDR[:PORTS]`), `max_sessions` and `rate` (bytes per second, each direction).

use std::fmt;
use std::net::IpAddr;

use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::policy::{DestRule, RuleError};

/// Longest token accepted, in bytes: bounds the work an unauthenticated request can cause.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Longest subject, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;

/// The signed claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Subject: the user or tenant the sessions count against.
    pub sub: String,
    /// Not before, Unix seconds.
    pub nbf: u64,
    /// Expires at, Unix seconds (exclusive).
    pub exp: u64,
    /// Allowed destinations, `CIDR[:PORTS]`; empty: whatever the gateway's policy allows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst: Vec<String>,
    /// Most concurrent sessions of this subject (narrows the gateway's per-subject cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<u32>,
    /// Bandwidth per session and direction, bytes per second (narrows the gateway's quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
}

/// A verified token: its claims, with the destination scope parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The claims.
    pub claims: Claims,
    /// The parsed destination scope (empty: no narrowing).
    pub scope: Vec<DestRule>,
}

impl Token {
    /// Whether the token's scope lets a packet to `destination`/`port` through (`port` is
    /// `None` for ICMP, which only a rule without ports allows).
    pub fn allows(&self, destination: IpAddr, port: Option<u16>) -> bool {
        self.scope.is_empty()
            || self.scope.iter().any(|rule| {
                rule.cidr.contains(destination)
                    && (rule.ports.is_empty()
                        || port.is_some_and(|p| rule.ports.iter().any(|r| r.contains(&p))))
            })
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `payload.mac`, bad base64url, too long, or claims that do not parse.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The MAC does not verify with the gateway's key.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp`.
        exp: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// `nbf` is in the future.
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: u64,
        /// The verifier's clock.
        now: u64,
    },
}

/// Why a key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token key has {0} bytes, at least {MIN_KEY_LEN} needed")]
pub struct KeyTooShort(pub usize);

/// Why claims cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// A `dst` entry does not parse.
    #[error("destination {0:?}: {1}")]
    Destination(String, RuleError),
    /// `sub` is empty or too long.
    #[error("subject must be 1-{MAX_SUBJECT_LEN} bytes")]
    Subject,
    /// `exp` is not after `nbf`.
    #[error("exp must be after nbf")]
    Window,
}

/// The HMAC-SHA256 key that signs and verifies tokens.
pub struct TokenKey(hmac::Key);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from raw bytes.
    ///
    /// # Errors
    /// [`KeyTooShort`] below [`MIN_KEY_LEN`] bytes.
    pub fn new(secret: &[u8]) -> Result<Self, KeyTooShort> {
        if secret.len() < MIN_KEY_LEN {
            return Err(KeyTooShort(secret.len()));
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// A key from a key file's content: text (e.g. `openssl rand -hex 32`) is used without its
    /// trailing whitespace, anything else byte for byte.
    ///
    /// # Errors
    /// [`KeyTooShort`].
    pub fn from_file_content(content: &[u8]) -> Result<Self, KeyTooShort> {
        match std::str::from_utf8(content) {
            Ok(text) => Self::new(text.trim_end().as_bytes()),
            Err(_) => Self::new(content),
        }
    }

    /// Signs `claims` into a token.
    ///
    /// # Errors
    /// [`MintError`] when the claims would never verify.
    pub fn mint(&self, claims: &Claims) -> Result<String, MintError> {
        validate_claims(claims)?;
        let json = serde_json::to_vec(claims).expect("claims serialize");
        let payload = base64url_encode(&json);
        let tag = hmac::sign(&self.0, payload.as_bytes());
        Ok(format!("{payload}.{}", base64url_encode(tag.as_ref())))
    }

    /// Verifies `token` at Unix time `now` (seconds): signature first (constant time), then the
    /// claims, then the validity window.
    ///
    /// # Errors
    /// [`TokenError`] saying why.
    pub fn verify(&self, token: &str, now: u64) -> Result<Token, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "{} bytes, at most {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        let (payload, mac) = token
            .split_once('.')
            .ok_or_else(|| TokenError::Malformed("no '.' between payload and MAC".into()))?;
        let mac = base64url_decode(mac)
            .ok_or_else(|| TokenError::Malformed("MAC is not base64url".into()))?;
        hmac::verify(&self.0, payload.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let json = base64url_decode(payload)
            .ok_or_else(|| TokenError::Malformed("payload is not base64url".into()))?;
        let claims: Claims = serde_json::from_slice(&json)
            .map_err(|error| TokenError::Malformed(format!("claims: {error}")))?;
        validate_claims(&claims).map_err(|error| TokenError::Malformed(error.to_string()))?;
        if now < claims.nbf {
            return Err(TokenError::NotYetValid {
                nbf: claims.nbf,
                now,
            });
        }
        if now >= claims.exp {
            return Err(TokenError::Expired {
                exp: claims.exp,
                now,
            });
        }
        let scope = parse_scope(&claims.dst).map_err(|e| TokenError::Malformed(e.to_string()))?;
        Ok(Token { claims, scope })
    }
}

fn validate_claims(claims: &Claims) -> Result<(), MintError> {
    if claims.sub.is_empty() || claims.sub.len() > MAX_SUBJECT_LEN {
        return Err(MintError::Subject);
    }
    if claims.exp <= claims.nbf {
        return Err(MintError::Window);
    }
    parse_scope(&claims.dst)?;
    Ok(())
}

fn parse_scope(dst: &[String]) -> Result<Vec<DestRule>, MintError> {
    dst.iter()
        .map(|text| {
            text.parse::<DestRule>()
                .map_err(|error| MintError::Destination(text.clone(), error))
        })
        .collect()
}

/// The `token` query parameter of a request path (`/webnic?a=b&token=…`), if any.
pub fn token_from_path(path: &str) -> Option<&str> {
    let (_, query) = path.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
        .filter(|token| !token.is_empty())
}

/// Parses a duration like `90`, `45s`, `30m`, `1h`, `7d` into seconds.
///
/// # Errors
/// A message when the text is not a number with an optional unit.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 90, 45s, 30m, 1h, 7d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration unit in {text:?}: s, m, h or d")),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("duration {text:?} too large"))
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 4648 §5), as in JWTs.
pub fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// Decodes base64url without padding; `None` on any other character, a dangling sixth bit
/// group, or non-zero unused bits (so every token has exactly one encoding).
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| ALPHABET.iter().position(|&a| a == c).map(|v| v as u32);
    let bytes = text.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        let all = n.to_be_bytes();
        // Bits beyond the produced bytes must be zero (canonical encoding).
        if all[1 + produced..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&all[1..=produced]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn key() -> TokenKey {
        TokenKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn claims() -> Claims {
        Claims {
            sub: "alice".into(),
            nbf: NOW - 10,
            exp: NOW + 3600,
            dst: vec!["10.1.0.0/16:80,443".into()],
            max_sessions: Some(2),
            rate: Some(1_000_000),
        }
    }

    #[test]
    fn good_token_verifies_with_its_scope() {
        let token = key().mint(&claims()).unwrap();
        let verified = key().verify(&token, NOW).unwrap();
        assert_eq!(verified.claims, claims());
        assert!(verified.allows("10.1.2.3".parse().unwrap(), Some(443)));
        assert!(!verified.allows("10.1.2.3".parse().unwrap(), Some(22)));
        assert!(!verified.allows("10.2.0.1".parse().unwrap(), Some(80)));
        assert!(!verified.allows("10.1.2.3".parse().unwrap(), None));
        let open = Claims {
            dst: Vec::new(),
            ..claims()
        };
        let verified = key().verify(&key().mint(&open).unwrap(), NOW).unwrap();
        assert!(verified.allows("192.0.2.1".parse().unwrap(), None));
    }

    #[test]
    fn expired_and_not_yet_valid() {
        let token = key().mint(&claims()).unwrap();
        assert_eq!(
            key().verify(&token, NOW + 3600),
            Err(TokenError::Expired {
                exp: NOW + 3600,
                now: NOW + 3600
            })
        );
        assert!(key().verify(&token, NOW + 3599).is_ok());
        assert_eq!(
            key().verify(&token, NOW - 11),
            Err(TokenError::NotYetValid {
                nbf: NOW - 10,
                now: NOW - 11
            })
        );
        assert!(key().verify(&token, NOW - 10).is_ok());
    }

    #[test]
    fn bad_mac_and_wrong_key() {
        let token = key().mint(&claims()).unwrap();
        let other = TokenKey::new(b"another key of 32 bytes........!").unwrap();
        assert_eq!(other.verify(&token, NOW), Err(TokenError::BadSignature));
        // A payload changed after signing (sub alice -> mallory).
        let (_, mac) = token.split_once('.').unwrap();
        let forged = Claims {
            sub: "mallory".into(),
            ..claims()
        };
        let forged_payload = base64url_encode(&serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            key().verify(&format!("{forged_payload}.{mac}"), NOW),
            Err(TokenError::BadSignature)
        );
        // One flipped character in the MAC.
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            key().verify(std::str::from_utf8(&bytes).unwrap(), NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens() {
        let k = key();
        for bad in [
            "",
            "nodot",
            "a.b.c",
            "!!!.AAAA",
            &"A".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(
                    k.verify(bad, NOW),
                    Err(TokenError::Malformed(_) | TokenError::BadSignature)
                ),
                "{bad:?}"
            );
        }
        // Validly signed garbage: the MAC holds but the claims do not parse.
        let sign = |payload: &[u8]| {
            let p = base64url_encode(payload);
            let tag = hmac::sign(&k.0, p.as_bytes());
            format!("{p}.{}", base64url_encode(tag.as_ref()))
        };
        for payload in [
            &b"not json"[..],
            br#"{"sub":"a","nbf":1,"exp":2,"extra":1}"#,
            br#"{"sub":"","nbf":1,"exp":2}"#,
            br#"{"sub":"a","nbf":5,"exp":5}"#,
            br#"{"sub":"a","nbf":1,"exp":2,"dst":["10.0.0.1/8"]}"#,
        ] {
            assert!(
                matches!(k.verify(&sign(payload), 1), Err(TokenError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        assert!(
            k.verify(&sign(br#"{"sub":"a","nbf":1,"exp":9}"#), 2)
                .is_ok()
        );
    }

    #[test]
    fn keys_and_minting_refuse_nonsense() {
        assert_eq!(TokenKey::new(b"short").unwrap_err(), KeyTooShort(5));
        assert!(TokenKey::from_file_content(b"0123456789abcdef\n").is_ok());
        assert!(TokenKey::from_file_content(b"0123456789abcde\n").is_err());
        assert_eq!(
            key().mint(&Claims {
                exp: NOW - 10,
                ..claims()
            }),
            Err(MintError::Window)
        );
        assert!(matches!(
            key().mint(&Claims {
                dst: vec!["nonsense".into()],
                ..claims()
            }),
            Err(MintError::Destination(..))
        ));
    }

    #[test]
    fn base64url_roundtrip_and_canonical() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64url_encode(&data);
            assert!(!text.contains(['=', '+', '/']));
            assert_eq!(base64url_decode(&text).unwrap(), data);
        }
        assert_eq!(base64url_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url_encode(b"fo"), "Zm8");
        assert_eq!(base64url_decode("Zm9"), None, "non-zero unused bits");
        assert_eq!(base64url_decode("Z"), None);
        assert_eq!(base64url_decode("Zm8="), None);
    }

    #[test]
    fn query_and_durations() {
        assert_eq!(token_from_path("/webnic?token=abc.def"), Some("abc.def"));
        assert_eq!(token_from_path("/webnic?x=1&token=t&y=2"), Some("t"));
        assert_eq!(token_from_path("/webnic?token="), None);
        assert_eq!(token_from_path("/webnic"), None);
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs("30m"), Ok(1800));
        assert_eq!(parse_duration_secs("7d"), Ok(604_800));
        assert!(parse_duration_secs("1w").is_err());
        assert!(parse_duration_secs("h").is_err());
    }
}
