//! The one clock: wall time as Unix milliseconds or seconds, and the one
//! RFC 3339 formatter every JSON `time`/`*_at` field uses.
//!
//! Invariant: a clock before 1970 reads as 0 (never panics), and every
//! timestamp pushgate writes has the same shape: UTC, milliseconds, `Z`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (token expiry, signed webhook timestamps).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `2026-12-05T13:00:00.123Z` for Unix milliseconds (negative reads as 0).
pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shape_for_every_timestamp() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert!(now_ms() / 1000 - unix_now() as i64 <= 1);
    }
}
