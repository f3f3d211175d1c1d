//! `AppState`: everything a request handler may touch, passed explicitly.
//!
//! Owns nothing but the wiring; invariant: there are no globals — the
//! store, the hub, auth, limits, metrics, outbound delivery and the inbound
//! sources a handler uses are the ones `serve` built for this server.

use std::sync::Arc;

use crate::auth::Auth;
use crate::config::Config;
use crate::deliver::Deliverer;
use crate::hub::Hub;
use crate::ingest::Sources;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::store::{Seq, Store, format_cursor};

/// Everything a handler may touch, passed explicitly; no globals.
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub auth: Auth,
    pub limits: Limits,
    pub metrics: Metrics,
    /// Outbound webhooks: the endpoints API wakes it and uses its SSRF policy.
    pub deliver: Arc<Deliverer>,
    /// Inbound webhook sources by name, built from `config.sources`.
    pub sources: Sources,
}

impl AppState {
    /// The client-facing cursor of `seq` in this server's log.
    pub fn cursor(&self, seq: Seq) -> String {
        format_cursor(seq, self.store.log_tag())
    }
}
