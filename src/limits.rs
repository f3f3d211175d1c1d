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
//!   genuine deliveries out). Webhooks are not subject to `publish_per_key`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::api::error::ApiError;
use crate::auth::Publisher;
use crate::config::LimitsConfig;

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
    pub fn check_publish(&self, who: &Publisher, events: usize) -> Result<(), ApiError> {
        let Some(l) = &self.publish else {
            return Ok(());
        };
        let n = NonZeroU32::new(events.min(u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        match l.check_key_n(who, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(ApiError::too_many_requests(
                "rate_limited",
                retry_after(not_until.wait_time_from(DefaultClock::default().now())),
            )),
            // Waiting would never help: say so instead of inviting retries.
            Err(_) => Err(ApiError::bad_request(
                "batch_too_large",
                format!(
                    "this batch has {events} events, more than the {} events/s one publisher may send (limits.publish_per_key); split it",
                    self.publish_per_second
                ),
            )),
        }
    }

    /// Counts a failed signature, key or token check from `client`. Past
    /// the budget the caller answers 429 instead of the check's own error;
    /// requests that pass their checks are never counted.
    pub fn record_invalid(&self, client: IpAddr) -> Result<(), ApiError> {
        let Some(l) = &self.invalid else {
            return Ok(());
        };
        l.check_key(&client_key(client)).map_err(|not_until| {
            ApiError::too_many_requests(
                "rate_limited",
                retry_after(not_until.wait_time_from(DefaultClock::default().now())),
            )
        })
    }

    /// For requests nobody can verify (a webhook source of kind `none`):
    /// each one counts against the client's `invalid_per_client` budget,
    /// before it is accepted.
    pub fn check_unverified(&self, client: IpAddr) -> Result<(), ApiError> {
        self.record_invalid(client)
    }

    /// Takes one stream slot (SSE, WebSocket, long-poll) for `client`; the
    /// guard gives it back. Past `limits.streams_per_client`: 429.
    pub fn open_stream(&self, client: IpAddr) -> Result<StreamSlot, ApiError> {
        let client = client_key(client);
        let mut open = self.open_streams.lock().expect("streams lock");
        let n = open.entry(client).or_insert(0);
        if self.streams_per_client > 0 && *n >= self.streams_per_client {
            let mut e = ApiError::too_many_requests("too_many_streams", STREAM_RETRY_AFTER_SECS);
            e.message = format!(
                "this address already has {n} open streams (limits.streams_per_client); close one first"
            );
            return Err(e);
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
        assert_eq!(e.status, 429);
        assert!(e.retry_after.is_some());
        assert!(l.open_stream("10.0.0.2".parse().unwrap()).is_ok());
        drop(s1);
        assert_eq!(l.open_streams_of(ip), 1);
        assert!(l.open_stream(ip).is_ok());
    }

    #[test]
    fn a_batch_over_the_whole_budget_is_not_a_429() {
        let l = limits(5, 0, 0);
        let e = l.check_publish(&Publisher::Key(0), 6).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(l.check_publish(&Publisher::Key(0), 5).is_ok());
        let e = l.check_publish(&Publisher::Key(0), 1).unwrap_err();
        assert_eq!(e.status, 429);
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
