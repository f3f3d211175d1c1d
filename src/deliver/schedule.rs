//! The worker pool's bookkeeping: which endpoints may get an attempt now.
//!
//! Pure state, no I/O, so fairness is decided in one place. Invariants: an
//! endpoint never has more than `per_endpoint` attempts in flight nor more
//! than its `rate_limit` per second; scarce workers rotate over endpoints;
//! an attempt's slot is an RAII `Slot`, released when the attempt's task
//! ends however it ends (returned, panicked, aborted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::store::{ClaimWant, Endpoint};

/// Attempts in flight per endpoint, shared with the slots that hold them.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<HashMap<String, usize>>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // A panic while holding this lock cannot leave a count half-updated
        // (each critical section is one increment or decrement): go on.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One attempt's hold on its endpoint's concurrency; dropping it gives the
/// slot back.
pub(super) struct Slot {
    endpoint_id: String,
    in_flight: InFlight,
}

impl Slot {
    pub(super) fn endpoint_id(&self) -> &str {
        &self.endpoint_id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock();
        if let Some(n) = map.get_mut(&self.endpoint_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.endpoint_id);
            }
        }
    }
}

/// The worker pool's bookkeeping: what is in flight per endpoint, when each
/// endpoint next has something due, and its rate-limit bucket. Pure state,
/// no I/O, so fairness is decided in one place.
pub(super) struct Scheduler {
    pub(super) workers: usize,
    per_endpoint: usize,
    /// Enabled endpoints in a stable order; claims start at `rotate` so that
    /// when workers are scarce every endpoint gets its turn.
    endpoints: Vec<(String, Option<u32>)>,
    rotate: usize,
    in_flight: InFlight,
    /// Earliest known due time; absent = unknown (probe it).
    next_due: HashMap<String, i64>,
    buckets: HashMap<String, Bucket>,
}

struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Scheduler {
    pub(super) fn new(workers: usize, per_endpoint: usize) -> Scheduler {
        Scheduler {
            workers,
            per_endpoint,
            endpoints: Vec::new(),
            rotate: 0,
            in_flight: InFlight::default(),
            next_due: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// A fresh list of endpoints: forget what we knew, probe every one again
    /// (another node, or a missed hint, may have queued something).
    pub(super) fn set_endpoints(&mut self, list: &[Endpoint]) {
        self.endpoints = list
            .iter()
            .filter(|e| e.enabled)
            .map(|e| (e.id.clone(), e.rate_limit))
            .collect();
        self.next_due.clear();
        let live: std::collections::HashSet<&str> =
            self.endpoints.iter().map(|(id, _)| id.as_str()).collect();
        self.buckets.retain(|id, _| live.contains(id.as_str()));
    }

    pub(super) fn hint(&mut self, id: &str, due: i64) {
        if let Some(known) = self.next_due.get_mut(id) {
            *known = (*known).min(due);
        }
    }

    pub(super) fn set_next_due(&mut self, id: &str, due: Option<i64>) {
        self.next_due
            .insert(id.to_string(), due.unwrap_or(i64::MAX));
    }

    /// An attempt of `id` starts: it holds the returned slot until it ends.
    pub(super) fn started(&mut self, id: &str) -> Slot {
        *self.in_flight.lock().entry(id.to_string()).or_default() += 1;
        if let Some(b) = self.buckets.get_mut(id) {
            b.tokens -= 1.0;
        }
        Slot {
            endpoint_id: id.to_string(),
            in_flight: self.in_flight.clone(),
        }
    }

    /// An attempt of `id` ended (its slot is already back).
    pub(super) fn finished(&mut self, id: &str, retry_at: Option<i64>) {
        if let Some(at) = retry_at {
            self.hint(id, at);
        }
    }

    /// Attempts of `id` in flight.
    pub(super) fn in_flight(&self, id: &str) -> usize {
        self.in_flight.lock().get(id).copied().unwrap_or(0)
    }

    /// Whole tokens available to a rate-limited endpoint now.
    fn tokens(&mut self, id: &str, rate: Option<u32>, now: i64) -> usize {
        let Some(rate) = rate.filter(|r| *r > 0) else {
            return usize::MAX;
        };
        let b = self.buckets.entry(id.to_string()).or_insert(Bucket {
            tokens: rate as f64,
            at_ms: now,
        });
        let elapsed = (now - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate as f64).min(rate as f64);
        b.at_ms = now;
        b.tokens.max(0.0) as usize
    }

    /// What to claim now: for each endpoint with a free slot, something
    /// (possibly) due and a token, up to its share of the free workers.
    pub(super) fn wants(&mut self, now: i64, running: usize) -> Vec<ClaimWant> {
        let mut budget = self.workers.saturating_sub(running);
        let mut wants = Vec::new();
        let n = self.endpoints.len();
        let mut visited = 0;
        while visited < n && budget > 0 {
            let (id, rate) = self.endpoints[(self.rotate + visited) % n].clone();
            visited += 1;
            if self.next_due.get(&id).is_some_and(|due| *due > now) {
                continue;
            }
            let free = self.per_endpoint.saturating_sub(self.in_flight(&id));
            let max = free.min(self.tokens(&id, rate, now)).min(budget);
            if max == 0 {
                continue;
            }
            budget -= max;
            // Asked now; the claim reports its real next due time.
            self.next_due.insert(id.clone(), i64::MAX);
            wants.push(ClaimWant {
                endpoint_id: id,
                max,
            });
        }
        if n > 0 {
            self.rotate = (self.rotate + visited) % n;
        }
        wants
    }

    /// Milliseconds until something could be claimed by an endpoint with a
    /// free slot; `None` if nothing is known to be due.
    pub(super) fn next_wake(&mut self, now: i64) -> Option<i64> {
        let mut soonest: Option<i64> = None;
        for i in 0..self.endpoints.len() {
            let (id, rate) = self.endpoints[i].clone();
            if self.in_flight(&id) >= self.per_endpoint {
                continue;
            }
            let Some(due) = self.next_due.get(&id).copied() else {
                return Some(0);
            };
            if due == i64::MAX {
                continue;
            }
            let mut at = due;
            if let Some(r) = rate.filter(|r| *r > 0)
                && self.tokens(&id, rate, now) == 0
            {
                let missing = 1.0 - self.buckets.get(&id).map(|b| b.tokens).unwrap_or(0.0);
                at = at.max(now + (missing * 1000.0 / r as f64).ceil() as i64);
            }
            soonest = Some(soonest.map_or(at, |s: i64| s.min(at)));
        }
        soonest.map(|at| at - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::tests::endpoint;

    #[test]
    fn a_saturated_endpoint_leaves_the_workers_to_the_others() {
        let mut s = Scheduler::new(4, 2);
        s.set_endpoints(&[endpoint("ep_dead", None), endpoint("ep_ok", None)]);
        let wants = s.wants(1000, 0);
        assert_eq!(wants.len(), 2);
        assert!(wants.iter().all(|w| w.max == 2), "{wants:?}");
        s.set_next_due("ep_dead", Some(0));
        s.set_next_due("ep_ok", Some(0));
        let _a = s.started("ep_dead");
        let _b = s.started("ep_dead");
        let wants = s.wants(1000, 2);
        assert_eq!(wants.len(), 1, "the dead endpoint is at its cap");
        assert_eq!(wants[0].endpoint_id, "ep_ok");
        assert_eq!(wants[0].max, 2);
    }

    #[test]
    fn scarce_workers_rotate_over_endpoints() {
        let mut s = Scheduler::new(1, 4);
        s.set_endpoints(&[
            endpoint("a", None),
            endpoint("b", None),
            endpoint("c", None),
        ]);
        let mut firsts = Vec::new();
        for _ in 0..3 {
            let w = s.wants(0, 0);
            assert_eq!(w.len(), 1);
            firsts.push(w[0].endpoint_id.clone());
            s.next_due.clear();
        }
        firsts.sort();
        assert_eq!(firsts, ["a", "b", "c"]);
    }

    #[test]
    fn rate_limits_hold_back_claims_until_a_token_is_back() {
        let mut s = Scheduler::new(10, 10);
        s.set_endpoints(&[endpoint("slow", Some(2))]);
        let w = s.wants(0, 0);
        assert_eq!(w[0].max, 2, "a full bucket is the burst");
        drop(s.started("slow"));
        drop(s.started("slow"));
        s.finished("slow", None);
        s.finished("slow", None);
        s.set_next_due("slow", Some(0));
        assert!(s.wants(100, 0).is_empty(), "no token yet");
        let wake = s.next_wake(100).unwrap();
        assert!((300..=500).contains(&wake), "{wake}");
        assert_eq!(s.wants(600, 0)[0].max, 1);
    }
}
