//! Standard Webhooks signatures for outbound deliveries (and for
//! `pushgate listen --forward-to`).
//!
//! A secret is `whsec_` + base64 of random bytes; the HMAC-SHA256 key is the
//! decoded bytes. Each request carries `webhook-id` (stable across retries of
//! one message), `webhook-timestamp` (unix seconds, fresh per attempt) and
//! `webhook-signature`: space-separated `v1,<base64 HMAC of "{id}.{ts}.{body}">`,
//! one per valid secret, so receivers keep verifying during a rotation.
//! Invariant: verification compares in constant time and accepts any listed
//! signature made with any of the receiver's secrets.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const SECRET_PREFIX: &str = "whsec_";
/// Bytes of randomness in a generated secret (the spec recommends 24–64).
const SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("a secret is `whsec_` followed by base64 of 24 to 64 bytes")]
    BadSecret,
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    #[error("`webhook-timestamp` is not a unix time in seconds")]
    BadTimestamp,
    #[error("the timestamp is outside the tolerance")]
    TimestampOutOfTolerance,
    #[error("no signature matches")]
    NoMatch,
}

/// A new random `whsec_…` secret.
pub fn generate_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", B64.encode(bytes))
}

/// The HMAC key of a `whsec_…` secret. Secrets written without the prefix
/// are accepted too (the reference libraries do the same).
pub fn secret_key(secret: &str) -> Result<Vec<u8>, SignError> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    let key = B64.decode(encoded).map_err(|_| SignError::BadSecret)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SignError::BadSecret);
    }
    Ok(key)
}

/// `v1,<base64>` for one key.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", B64.encode(mac(key, msg_id, timestamp, body)))
}

fn mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg_id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// The `webhook-signature` value: one `v1,…` per key, space-separated.
pub fn signature_header(keys: &[Vec<u8>], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| sign(k, msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The three headers of one signed request, in order.
pub fn headers(
    keys: &[Vec<u8>],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        ("webhook-id", msg_id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            signature_header(keys, msg_id, timestamp, body),
        ),
    ]
}

/// Verifies a request the way a receiver should: the timestamp within
/// `tolerance_secs` of `now`, and any `v1` signature made with any of `keys`.
pub fn verify(
    keys: &[Vec<u8>],
    msg_id: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignError> {
    let msg_id = msg_id.ok_or(SignError::MissingHeader("webhook-id"))?;
    let ts_text = timestamp.ok_or(SignError::MissingHeader("webhook-timestamp"))?;
    let signature = signature.ok_or(SignError::MissingHeader("webhook-signature"))?;
    let ts: i64 = ts_text
        .trim()
        .parse()
        .map_err(|_| SignError::BadTimestamp)?;
    if (now_secs - ts).abs() > tolerance_secs {
        return Err(SignError::TimestampOutOfTolerance);
    }
    let expected: Vec<[u8; 32]> = keys.iter().map(|k| mac(k, msg_id, ts, body)).collect();
    let mut matched = subtle::Choice::from(0);
    for candidate in signature.split(' ') {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            continue;
        };
        let Ok(given) = B64.decode(encoded) else {
            continue;
        };
        for e in &expected {
            matched |= e.as_slice().ct_eq(&given);
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(SignError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks specification's reference tests.
    #[test]
    fn matches_the_reference_vector() {
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn generated_secrets_round_trip_and_verify() {
        let s = generate_secret();
        assert!(s.starts_with("whsec_"));
        let key = secret_key(&s).unwrap();
        assert_eq!(key.len(), SECRET_BYTES);
        let other = secret_key(&generate_secret()).unwrap();
        let body = b"{\"a\":1}";
        let [_, (_, ts), (_, sig)] = headers(&[other.clone(), key.clone()], "msg_1", 1000, body);
        assert_eq!(sig.split(' ').count(), 2, "one signature per key");
        let check = |keys: &[Vec<u8>], body: &[u8], now| {
            verify(keys, Some("msg_1"), Some(&ts), Some(&sig), body, now, 300)
        };
        assert_eq!(check(std::slice::from_ref(&key), body, 1000), Ok(()));
        assert_eq!(check(std::slice::from_ref(&other), body, 1100), Ok(()));
        assert_eq!(
            check(std::slice::from_ref(&key), b"{\"a\":2}", 1000),
            Err(SignError::NoMatch)
        );
        assert_eq!(
            check(std::slice::from_ref(&key), body, 1301),
            Err(SignError::TimestampOutOfTolerance)
        );
        let stranger = secret_key(&generate_secret()).unwrap();
        assert_eq!(check(&[stranger], body, 1000), Err(SignError::NoMatch));
    }

    #[test]
    fn bad_secrets_and_headers_are_named() {
        assert_eq!(secret_key("whsec_!!"), Err(SignError::BadSecret));
        assert_eq!(secret_key("whsec_c2hvcnQ="), Err(SignError::BadSecret));
        let key = secret_key(&generate_secret()).unwrap();
        let keys = [key];
        assert_eq!(
            verify(&keys, None, Some("1"), Some("v1,x"), b"", 1, 300),
            Err(SignError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            verify(&keys, Some("m"), Some("soon"), Some("v1,x"), b"", 1, 300),
            Err(SignError::BadTimestamp)
        );
        assert_eq!(
            verify(
                &keys,
                Some("m"),
                Some("1"),
                Some("v2,abc v1,@@"),
                b"",
                1,
                300
            ),
            Err(SignError::NoMatch)
        );
    }
}
