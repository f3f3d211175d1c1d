//! `limits.connections_per_client`: how many connections one client address
//! may hold open at once, counted in the accept loop before a byte is read.
//!
//! Invariants: a client is its address as `limits::client_key` folds it
//! (IPv6 by /64); connections from `server.trusted_proxies` are not counted
//! (behind a proxy every client shares its address — cap clients at the
//! proxy); a refused connection is closed at once, unread, so it costs one
//! accept; the count map only holds addresses with open connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

use crate::limits::client_key;

/// Open connections per client key; addresses at zero are removed.
type OpenCounts = Arc<Mutex<HashMap<IpAddr, u32>>>;

pub struct ConnCap {
    per_client: u32,
    trusted: Arc<[IpNet]>,
    open: OpenCounts,
}

/// One admitted connection; dropping it gives the slot back.
pub struct ConnSlot {
    counted: Option<(IpAddr, OpenCounts)>,
}

impl ConnCap {
    pub fn new(per_client: u32, trusted: Arc<[IpNet]>) -> ConnCap {
        ConnCap {
            per_client,
            trusted,
            open: Default::default(),
        }
    }

    /// A slot for a connection from `peer`, or `None` when that address
    /// already holds `per_client` connections.
    pub fn admit(&self, peer: IpAddr) -> Option<ConnSlot> {
        let canonical = peer.to_canonical();
        if self.per_client == 0 || self.trusted.iter().any(|n| n.contains(&canonical)) {
            return Some(ConnSlot { counted: None });
        }
        let key = client_key(peer);
        let mut open = self.open.lock().expect("connections lock");
        let n = open.entry(key).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            counted: Some((key, self.open.clone())),
        })
    }

    /// Open connections counted for `peer`'s address.
    pub fn open_of(&self, peer: IpAddr) -> u32 {
        let open = self.open.lock().expect("connections lock");
        open.get(&client_key(peer)).copied().unwrap_or(0)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let Some((key, open)) = self.counted.take() else {
            return;
        };
        let mut open = open.lock().expect("connections lock");
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_and_gives_back() {
        let cap = ConnCap::new(2, Arc::from(vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let s1 = cap.admit(a).unwrap();
        let _s2 = cap.admit(a).unwrap();
        assert!(cap.admit(a).is_none());
        assert!(
            cap.admit("192.0.2.2".parse().unwrap()).is_some(),
            "per address"
        );
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(
            cap.admit(mapped).is_none(),
            "IPv4-mapped is the same client"
        );
        drop(s1);
        assert_eq!(cap.open_of(a), 1);
        assert!(cap.admit(a).is_some());
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let many: Vec<_> = (0..10).map(|_| cap.admit(proxy).unwrap()).collect();
        assert_eq!(cap.open_of(proxy), 0, "trusted proxies are not counted");
        drop(many);
    }

    #[test]
    fn zero_means_unlimited() {
        let cap = ConnCap::new(0, Arc::from(Vec::new()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<_> = (0..1000).map(|_| cap.admit(a).unwrap()).collect();
        drop(slots);
        assert_eq!(cap.open_of(a), 0);
    }
}
