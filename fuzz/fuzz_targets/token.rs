//! The session-token codec on arbitrary input: verification never panics and never accepts what
//! the key did not sign; base64url round-trips and rejects non-canonical text; a token minted
//! from verified claims verifies to the same claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use webnic_gateway::token::{TokenKey, base64url_decode, base64url_encode};

fuzz_target!(|data: &[u8]| {
    let key = TokenKey::new(b"fuzzing key, 32 bytes long......").expect("key");
    let text = String::from_utf8_lossy(data);
    // Arbitrary text never verifies (forging HMAC-SHA256 is out of a fuzzer's reach) and never
    // panics.
    assert!(key.verify(&text, 1_800_000_000).is_err());
    if let Some(decoded) = base64url_decode(&text) {
        assert_eq!(
            base64url_encode(&decoded),
            text,
            "only canonical base64url decodes"
        );
    }
    assert_eq!(
        base64url_decode(&base64url_encode(data)).as_deref(),
        Some(data)
    );
    // Signed arbitrary payloads: the claims parse or the token is refused, never a panic; what
    // verifies re-mints to a token that verifies the same.
    let payload = base64url_encode(data);
    if let Ok(token) = key.verify(&sign(&payload), 1_800_000_000) {
        let again = key.mint(&token.claims).expect("verified claims mint");
        assert_eq!(
            key.verify(&again, 1_800_000_000).map(|t| t.claims),
            Ok(token.claims)
        );
    }
});

/// A token over `payload` with the fuzzing key, built the way `TokenKey::mint` does.
fn sign(payload: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"fuzzing key, 32 bytes long......");
    let tag = ring::hmac::sign(&key, payload.as_bytes());
    format!("{payload}.{}", base64url_encode(tag.as_ref()))
}
