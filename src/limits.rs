//! Rate limits and connection caps (contract section 5, `[limits]`).
//!
//! Invariants: a limit of 0 means unlimited; limiter state is bounded (keys
//! that have gone quiet are forgotten by `retain_recent`); a webhook with a
//! valid signature is never counted against anyone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::api::error::ApiError;
use crate::auth::Publisher;
use crate::config::LimitsConfig;

pub struct Limits {
    publish: Option<DefaultKeyedRateLimiter<Publisher>>,
    invalid: Option<DefaultKeyedRateLimiter<IpAddr>>,
    streams_per_client: u32,
    open_streams: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

fn limiter<K: std::hash::Hash + Eq + Clone>(per_second: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_second).map(|n| RateLimiter::keyed(Quota::per_second(n)))
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Limits {
        Limits {
            publish: limiter(config.publish_per_key),
            invalid: limiter(config.invalid_per_client),
            streams_per_client: config.streams_per_client,
            open_streams: Default::default(),
        }
    }

    /// Counts `events` against the publisher's per-second budget.
    pub fn check_publish(&self, who: &Publisher, events: usize) -> Result<(), ApiError> {
        let Some(l) = &self.publish else {
            return Ok(());
        };
        let n = NonZeroU32::new(events.min(u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
        match l.check_key_n(who, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                Err(ApiError::too_many_requests(
                    "rate_limited",
                    wait.as_secs() + 1,
                ))
            }
            Err(_) => Err(ApiError::too_many_requests("rate_limited", 1)),
        }
    }

    /// Counts a failed signature, key or token check from `client`. Past
    /// the budget the caller answers 429 instead of the check's own error;
    /// requests that pass their checks are never counted.
    pub fn record_invalid(&self, client: IpAddr) -> Result<(), ApiError> {
        let Some(l) = &self.invalid else {
            return Ok(());
        };
        l.check_key(&client)
            .map_err(|_| ApiError::too_many_requests("rate_limited", 1))
    }

    /// Takes one stream slot for `client`; the guard gives it back.
    pub fn open_stream(&self, client: IpAddr) -> Result<StreamSlot, ApiError> {
        let mut open = self.open_streams.lock().expect("streams lock");
        let n = open.entry(client).or_insert(0);
        if self.streams_per_client > 0 && *n >= self.streams_per_client {
            return Err(ApiError::too_many_requests("too_many_streams", 5));
        }
        *n += 1;
        Ok(StreamSlot {
            client,
            open: self.open_streams.clone(),
        })
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
