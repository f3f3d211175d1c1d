//! Rate limits and connection caps (contract section 5, `[limits]`).
//!
//! Invariants:
//! - a limit of 0 means unlimited; limiter state is bounded (keys that have
//!   gone quiet are forgotten by `retain_recent`, open-stream counts are
//!   removed when they reach zero);
//! - a client is its address, IPv4-mapped IPv6 folded to IPv4 and IPv6
//!   grouped by /64 (one host usually owns a whole /64);
//! - a request that passes its checks is never counted as failed, and the
//!   failed-check limit only ever turns a failure (401/403) into a 429: a
//!   webhook with a valid signature is never refused for rate, even when the
//!   same address also sends bad ones (a provider's shared egress addresses,
//!   or an attacker pointing another account at us, must not lock the
//!   genuine deliveries out). Webhooks are not subject to `publish_per_key`;
//!   deliveries to an unsigned (`kind = "none"`) source, which nobody can
//!   verify, each count against `invalid_per_client` (`check_unverified`).
//!
//! Refusals are a typed `LimitError`; `error.rs` decides how they read on
//! the wire (429 with `Retry-After`, or 400 for a batch no wait could fix).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::auth::Publisher;
use crate::config::LimitsConfig;

/// Why a limit refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Over a per-second budget; waiting `retry_after` seconds helps.
    #[error("too many requests; slow down")]
    RateLimited { retry_after: u64 },
    /// A publish batch larger than the whole per-second budget: no wait helps.
    #[error(
        "this batch has {events} events, more than the {per_second} events/s one publisher may send (limits.publish_per_key); split it"
    )]
    BatchTooLarge { events: usize, per_second: u32 },
    /// The client already holds `limits.streams_per_client` streams.
    #[error(
        "this address already has {open} open streams (limits.streams_per_client); close one first"
    )]
    TooManyStreams { open: u32, retry_after: u64 },
}

impl LimitError {
    /// Seconds the client should wait, when waiting helps.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            LimitError::RateLimited { retry_after }
            | LimitError::TooManyStreams { retry_after, .. } => Some(*retry_after),
            LimitError::BatchTooLarge { .. } => None,
        }
    }
}

/// Seconds a client at its stream cap is told to wait.
const STREAM_RETRY_AFTER_SECS: u64 = 5;

pub struct Limits {
    publish: Option<DefaultKeyedRateLimiter<Publisher>>,
    publish_per_second: u32,
    invalid: Option<DefaultKeyedRateLimiter<IpAddr>>,
    streams_per_client: u32,
    open_streams: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(per_second: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_second).map(|n| RateLimiter::keyed(Quota::per_second(n)))
}

/// The key a client address is limited under.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Whole seconds to wait, rounded up, at least 1.
fn retry_after(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1000) as u64).max(1)
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Limits {
        Limits {
            publish: limiter(config.publish_per_key),
            publish_per_second: config.publish_per_key,
            invalid: limiter(config.invalid_per_client),
            streams_per_client: config.streams_per_client,
            open_streams: Default::default(),
        }
    }

    /// Counts `events` against the publisher's per-second budget
    /// (`limits.publish_per_key`, per publish key or token subject).
    pub fn check_publish(&self, who: &Publisher, events: usize) -> Result<(), LimitError> {
        let Some(l) = &self.publish else {
            return Ok(());
        };
        let n = NonZeroU32::new(events.min(u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        match l.check_key_n(who, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(LimitError::RateLimited {
                retry_after: retry_after(not_until.wait_time_from(DefaultClock::default().now())),
            }),
            // Waiting would never help: say so instead of inviting retries.
            Err(_) => Err(LimitError::BatchTooLarge {
                events,
                per_second: self.publish_per_second,
            }),
        }
    }

    /// Counts a failed signature, key or token check from `client`. Past
    /// the budget the caller answers 429 instead of the check's own error;
    /// requests that pass their checks are never counted.
    pub fn record_invalid(&self, client: IpAddr) -> Result<(), LimitError> {
        let Some(l) = &self.invalid else {
            return Ok(());
        };
        l.check_key(&client_key(client))
            .map_err(|not_until| LimitError::RateLimited {
                retry_after: retry_after(not_until.wait_time_from(DefaultClock::default().now())),
            })
    }

    /// For requests nobody can verify (a webhook source of kind `none`):
    /// each one counts against the client's `invalid_per_client` budget,
    /// before it is accepted.
    pub fn check_unverified(&self, client: IpAddr) -> Result<(), LimitError> {
        self.record_invalid(client)
    }

    /// Takes one stream slot (SSE, WebSocket, long-poll) for `client`; the
    /// guard gives it back. Past `limits.streams_per_client`: 429.
    pub fn open_stream(&self, client: IpAddr) -> Result<StreamSlot, LimitError> {
        let client = client_key(client);
        let mut open = self.open_streams.lock().expect("streams lock");
        let n = open.entry(client).or_insert(0);
        if self.streams_per_client > 0 && *n >= self.streams_per_client {
            return Err(LimitError::TooManyStreams {
                open: *n,
                retry_after: STREAM_RETRY_AFTER_SECS,
            });
        }
        *n += 1;
        Ok(StreamSlot {
            client,
            open: self.open_streams.clone(),
        })
    }

    /// Open streams of one client (for tests and metrics).
    pub fn open_streams_of(&self, client: IpAddr) -> u32 {
        let open = self.open_streams.lock().expect("streams lock");
        open.get(&client_key(client)).copied().unwrap_or(0)
    }

    /// Forgets limiter keys that are back to full budget.
    pub fn retain_recent(&self) {
        if let Some(l) = &self.publish {
            l.retain_recent();
        }
        if let Some(l) = &self.invalid {
            l.retain_recent();
        }
    }
}

pub struct StreamSlot {
    client: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("streams lock");
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(publish: u32, invalid: u32, streams: u32) -> Limits {
        Limits::new(&LimitsConfig {
            publish_per_key: publish,
            invalid_per_client: invalid,
            streams_per_client: streams,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn clients_are_grouped_by_address() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn stream_slots_are_counted_and_returned() {
        let l = limits(0, 0, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = l.open_stream(ip).unwrap();
        let _s2 = l.open_stream(ip).unwrap();
        let e = l.open_stream(ip).err().unwrap();
        assert_eq!(
            e,
            LimitError::TooManyStreams {
                open: 2,
                retry_after: STREAM_RETRY_AFTER_SECS
            }
        );
        assert!(l.open_stream("10.0.0.2".parse().unwrap()).is_ok());
        drop(s1);
        assert_eq!(l.open_streams_of(ip), 1);
        assert!(l.open_stream(ip).is_ok());
    }

    #[test]
    fn a_batch_over_the_whole_budget_is_not_a_429() {
        let l = limits(5, 0, 0);
        let e = l.check_publish(&Publisher::Key(0), 6).unwrap_err();
        assert!(
            matches!(e, LimitError::BatchTooLarge { events: 6, .. }),
            "{e:?}"
        );
        assert_eq!(e.retry_after(), None, "no wait helps");
        assert!(l.check_publish(&Publisher::Key(0), 5).is_ok());
        let e = l.check_publish(&Publisher::Key(0), 1).unwrap_err();
        assert!(matches!(e, LimitError::RateLimited { .. }), "{e:?}");
        assert!(l.check_publish(&Publisher::Key(1), 1).is_ok(), "per key");
    }

    #[test]
    fn zero_means_unlimited() {
        let l = limits(0, 0, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..1000 {
            l.check_publish(&Publisher::Key(0), 100).unwrap();
            l.record_invalid(ip).unwrap();
        }
        let slots: Vec<_> = (0..1000).map(|_| l.open_stream(ip).unwrap()).collect();
        assert_eq!(l.open_streams_of(ip), 1000);
        drop(slots);
        assert_eq!(l.open_streams_of(ip), 0);
    }
}
