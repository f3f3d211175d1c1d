//! Which defences a configuration has switched off, said out loud at
//! start-up.
//!
//! pushgate's defaults are meant for a server on the internet: every limit
//! that bounds what one client can make the server hold (bodies, connections,
//! streams, failed checks, WebSocket frames) is on. A limit set to 0 turns it
//! off; that may be right behind a load balancer that enforces the same
//! thing, so it is allowed — but never silently: [`warn_disabled`] logs one
//! warning per limit that is off, naming the key and what it defended.

use crate::config::Config;

/// One defence that is off: its configuration key and what it defends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disabled {
    pub key: &'static str,
    pub defends: &'static str,
}

/// Every limit `config` has turned off.
pub fn disabled(config: &Config) -> Vec<Disabled> {
    let l = &config.limits;
    let checks: [(bool, &'static str, &'static str); 9] = [
        (
            l.body_timeout.0.is_zero(),
            "limits.body_timeout",
            "a client may trickle a request body forever, holding its connection and memory",
        ),
        (
            l.bodies_in_flight == 0,
            "limits.bodies_in_flight",
            "any number of request bodies may be received at once",
        ),
        (
            l.body_bytes_in_flight.0 == 0,
            "limits.body_bytes_in_flight",
            "request bodies in flight may hold any amount of memory",
        ),
        (
            l.connections_per_client == 0,
            "limits.connections_per_client",
            "one address may open connections until file descriptors run out",
        ),
        (
            l.streams_per_client == 0,
            "limits.streams_per_client",
            "one address may hold any number of SSE, WebSocket and long-poll streams",
        ),
        (
            l.invalid_per_client == 0,
            "limits.invalid_per_client",
            "failed key, token and signature checks are not throttled (guessing is free)",
        ),
        (
            l.publish_per_key == 0,
            "limits.publish_per_key",
            "one publish key or token may append events as fast as the log takes them",
        ),
        (
            config.websocket.messages_per_second == 0,
            "websocket.messages_per_second",
            "a WebSocket client may send frames as fast as it likes",
        ),
        (
            l.channels_per_subscription == 0,
            "limits.channels_per_subscription",
            "one subscription may name any number of channels",
        ),
    ];
    checks
        .into_iter()
        .filter(|(off, _, _)| *off)
        .map(|(_, key, defends)| Disabled { key, defends })
        .collect()
}

/// Logs a warning for every limit that is off.
pub fn warn_disabled(config: &Config) {
    for d in disabled(config) {
        tracing::warn!(
            key = d.key,
            "limit off (0): {}; set it, or enforce the same in front of pushgate",
            d.defends
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_leave_only_the_documented_gaps() {
        let c = Config::load(None, Vec::new()).unwrap();
        let keys: Vec<_> = disabled(&c).into_iter().map(|d| d.key).collect();
        // Publish keys belong to the operator's own backends.
        assert_eq!(keys, ["limits.publish_per_key"]);
    }

    #[test]
    fn every_zero_is_reported() {
        let mut c = Config::load(None, Vec::new()).unwrap();
        c.limits.body_timeout = crate::config::Dur::secs(0);
        c.limits.bodies_in_flight = 0;
        c.limits.body_bytes_in_flight = crate::config::ByteSize(0);
        c.limits.connections_per_client = 0;
        c.limits.streams_per_client = 0;
        c.limits.invalid_per_client = 0;
        c.limits.publish_per_key = 0;
        c.limits.channels_per_subscription = 0;
        c.websocket.messages_per_second = 0;
        assert_eq!(disabled(&c).len(), 9);
        c.limits.publish_per_key = 10;
        assert!(
            !disabled(&c)
                .iter()
                .any(|d| d.key == "limits.publish_per_key")
        );
    }
}
