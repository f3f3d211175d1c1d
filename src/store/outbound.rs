//! The data of outbound webhooks as the store keeps it: endpoints, the
//! delivery queue, attempts and the outbox cursor.
//!
//! The store only keeps and hands out rows; every decision (which events
//! match, when to retry, when to disable) is made by `deliver`. Invariants
//! each implementation keeps:
//! - the outbox cursor moves only together with the deliveries it created,
//!   in one transaction, and only from the position the caller read
//!   (compare-and-set), so a crash or a second node never loses or doubles
//!   the deliveries of an event;
//! - a delivery row holds the envelope bytes, so retention pruning the event
//!   does not lose a pending delivery;
//! - a claimed delivery is leased: `next_ms` is pushed to the lease's end,
//!   so the row comes back by itself if its worker dies; a result is
//!   recorded only by the claim that holds the row (same `attempt` number).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Seq;

/// One signing secret of an endpoint. The first one of the list is the
/// current one; others are previous ones still valid until `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSecret {
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

/// A registered receiver of outbound webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `ep_…`, chosen by the caller of `create_endpoint`.
    pub id: String,
    pub url: String,
    /// Channel patterns (`*` matches the rest of a name).
    pub channels: Vec<String>,
    /// Event type patterns; empty = every type.
    pub types: Vec<String>,
    pub description: String,
    pub enabled: bool,
    /// Why the endpoint was disabled (`410 Gone`, failing for too long, the API).
    pub disabled_reason: Option<String>,
    /// Deliveries per second at most; `None` = unlimited.
    pub rate_limit: Option<u32>,
    pub secrets: Vec<EndpointSecret>,
    /// The log's head when the endpoint was created: it receives the
    /// events after it (earlier ones only by replay).
    pub from_seq: Seq,
    /// Set by the first failed attempt after a success, cleared by a success.
    pub failing_since_ms: Option<i64>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// What `create_endpoint` stores; the store adds `from_seq` (its head,
/// read inside the write) and the timestamps.
#[derive(Debug, Clone)]
pub struct NewEndpoint {
    pub id: String,
    pub url: String,
    pub channels: Vec<String>,
    pub types: Vec<String>,
    pub description: String,
    pub enabled: bool,
    pub rate_limit: Option<u32>,
    pub secret: String,
}

/// A partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub channels: Option<Vec<String>>,
    pub types: Option<Vec<String>>,
    pub description: Option<String>,
    /// `Some(true)` also clears `disabled_reason` and `failing_since_ms`.
    pub enabled: Option<bool>,
    /// Stored as the reason when `enabled` is `Some(false)`.
    pub disabled_reason: Option<String>,
    pub rate_limit: Option<Option<u32>>,
    /// Replaces the secrets with `[new, previous current until previous_expires_ms]`.
    pub rotate: Option<SecretRotation>,
}

impl EndpointPatch {
    /// Applies the patch to an endpoint read in the same transaction; both
    /// stores use this, so PATCH means the same thing on each.
    pub fn apply_to(self, e: &mut Endpoint, now: i64) {
        if let Some(url) = self.url {
            e.url = url;
        }
        if let Some(channels) = self.channels {
            e.channels = channels;
        }
        if let Some(types) = self.types {
            e.types = types;
        }
        if let Some(description) = self.description {
            e.description = description;
        }
        if let Some(rate_limit) = self.rate_limit {
            e.rate_limit = rate_limit;
        }
        match self.enabled {
            Some(true) => {
                e.enabled = true;
                e.disabled_reason = None;
                e.failing_since_ms = None;
            }
            Some(false) if e.enabled => {
                e.enabled = false;
                e.disabled_reason = self.disabled_reason;
            }
            _ => {}
        }
        if let Some(rotation) = self.rotate {
            let previous = e.secrets.first().map(|s| EndpointSecret {
                secret: s.secret.clone(),
                expires_ms: Some(rotation.previous_expires_ms),
            });
            e.secrets = std::iter::once(EndpointSecret {
                secret: rotation.secret,
                expires_ms: None,
            })
            .chain(previous.filter(|p| p.expires_ms > Some(now)))
            .collect();
        }
        e.updated_ms = now;
    }
}

#[derive(Debug, Clone)]
pub struct SecretRotation {
    pub secret: String,
    pub previous_expires_ms: i64,
}

/// One message to deliver to one endpoint.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub endpoint_id: String,
    pub seq: Seq,
    /// The event's cursor.
    pub event_id: String,
    /// `webhook-id`: the same for every attempt of this message.
    pub msg_id: String,
    /// The envelope, as sent.
    pub payload: Bytes,
    /// When the first attempt is due.
    pub next_ms: i64,
}

/// Moves the outbox cursor from `from` to `to`; refused (nothing written)
/// unless the cursor is at `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxAdvance {
    pub from: Seq,
    pub to: Seq,
}

/// How many due deliveries of one endpoint a claim may take.
#[derive(Debug, Clone)]
pub struct ClaimWant {
    pub endpoint_id: String,
    pub max: usize,
}

/// A leased delivery, with what its worker needs of the endpoint as it is now.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    pub endpoint_id: String,
    pub seq: Seq,
    pub event_id: String,
    pub msg_id: String,
    pub payload: Bytes,
    /// The number of this attempt, 1-based; the lease's token.
    pub attempt: u32,
    pub url: String,
    pub secrets: Vec<EndpointSecret>,
    pub failing_since_ms: Option<i64>,
}

#[derive(Debug, Default)]
pub struct Claimed {
    pub deliveries: Vec<Delivery>,
    /// For each endpoint asked about: when its next pending delivery is due
    /// (leases included), `None` if it has none.
    pub next_due: Vec<(String, Option<i64>)>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    Succeeded,
    RetryAt(i64),
    /// The schedule is exhausted (or the endpoint is gone): failed for good,
    /// until replayed.
    GiveUp,
}

/// What an attempt says about its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Succeeded,
    /// Sets `failing_since_ms` if it is not set.
    Failed,
    /// Disables the endpoint with this reason.
    Disable(String),
}

/// The result of one attempt, recorded together with its consequences.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub delivery_id: i64,
    pub endpoint_id: String,
    pub event_id: String,
    pub msg_id: String,
    pub attempt: u32,
    pub succeeded: bool,
    pub response_status: Option<u16>,
    /// The first few KiB of the response body.
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub duration_ms: i64,
    pub at_ms: i64,
    pub next: NextStep,
    pub health: Health,
}

/// The delivery queue at a glance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Pending deliveries (due, leased or waiting for a retry).
    pub depth: u64,
    /// The earliest due time among them (a lease's end for a leased one).
    pub first_due_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptStatus {
    Succeeded,
    Failed,
    /// Not made yet: the delivery's next attempt (`at_ms` is when it is due).
    Pending,
}

impl AttemptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Succeeded => "succeeded",
            AttemptStatus::Failed => "failed",
            AttemptStatus::Pending => "pending",
        }
    }
}

/// A row of `GET /v1/endpoints/{id}/attempts`.
#[derive(Debug, Clone)]
pub struct AttemptView {
    /// `att_<n>` for a made attempt, `del_<n>` for a pending delivery.
    pub id: String,
    pub delivery_id: i64,
    pub event_id: String,
    pub msg_id: String,
    pub attempt: u32,
    pub status: AttemptStatus,
    pub response_status: Option<u16>,
    pub response_body: Option<String>,
    pub error: Option<String>,
    pub duration_ms: Option<i64>,
    pub at_ms: i64,
}
