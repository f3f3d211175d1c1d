//! Row mapping shared by both backends: the tables have the same shape on
//! SQLite and PostgreSQL, so turning a row into an `Event`, `Endpoint`,
//! `InboundRecord` or `AttemptView` is written once, against `Columns`.
//!
//! Invariant: a value that does not decode (bad JSON in a JSON column, an
//! unknown status, a number out of range) is reported as corrupt data by
//! the backend's own error type, never papered over with a default.

use serde_json::value::RawValue;

use super::{
    AttemptStatus, AttemptView, BoxError, Endpoint, Event, InboundRecord, InboundStatus, Page, Seq,
};

/// Typed access to one row's columns, by position.
pub(super) trait Columns {
    type Error;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, Self::Error>;
    fn flag(&self, i: usize) -> Result<bool, Self::Error>;
    /// The error for column `i` holding a value the schema does not allow.
    fn corrupt(&self, i: usize, e: BoxError) -> Self::Error;

    fn json<T: serde::de::DeserializeOwned>(&self, i: usize) -> Result<T, Self::Error> {
        let text = self.text(i)?;
        serde_json::from_str(&text).map_err(|e| self.corrupt(i, e.into()))
    }

    fn narrow<T: TryFrom<i64>>(&self, i: usize, v: i64) -> Result<T, Self::Error>
    where
        T::Error: std::error::Error + Send + Sync + 'static,
    {
        T::try_from(v).map_err(|e| self.corrupt(i, e.into()))
    }
}

/// Columns `seq, channel, type, source, source_id, time_ms, data`.
pub(super) const EVENT_COLUMNS: &str = "seq, channel, type, source, source_id, time_ms, data";

pub(super) fn event<R: Columns>(r: &R) -> Result<Event, R::Error> {
    let data = r.text(6)?;
    Ok(Event {
        seq: r.int(0)?,
        channel: r.text(1)?,
        kind: r.text(2)?,
        source: r.text(3)?,
        source_id: r.opt_text(4)?,
        time_ms: r.int(5)?,
        data: RawValue::from_string(data).map_err(|e| r.corrupt(6, e.into()))?,
    })
}

/// A page of events read with the head from the same snapshot.
pub(super) fn page(events: Vec<Event>, after: Seq, limit: usize, head: Seq) -> Page {
    let scanned_to = if events.len() >= limit {
        events.last().map(|e| e.seq).unwrap_or(after)
    } else {
        head.max(after)
    };
    Page { events, scanned_to }
}

pub(super) const ENDPOINT_COLUMNS: &str = "id, url, channels, types, description, enabled, \
     disabled_reason, rate_limit, secrets, from_seq, failing_since_ms, created_ms, updated_ms";

pub(super) fn endpoint<R: Columns>(r: &R) -> Result<Endpoint, R::Error> {
    Ok(Endpoint {
        id: r.text(0)?,
        url: r.text(1)?,
        channels: r.json(2)?,
        types: r.json(3)?,
        description: r.text(4)?,
        enabled: r.flag(5)?,
        disabled_reason: r.opt_text(6)?,
        rate_limit: match r.opt_int(7)? {
            Some(v) => Some(r.narrow(7, v)?),
            None => None,
        },
        secrets: r.json(8)?,
        from_seq: r.int(9)?,
        failing_since_ms: r.opt_int(10)?,
        created_ms: r.int(11)?,
        updated_ms: r.int(12)?,
    })
}

/// The columns `inbound` reads, from table alias `i`; headers and body
/// (when selected) follow as columns 12 and 13.
pub(super) const INBOUND_COLUMNS: &str = "i.id, i.time_ms, i.source, i.status, i.duplicate, i.reason, i.detail, \
     i.source_id, i.type, i.channels, i.seqs, i.body_size";

/// A record without headers and body.
pub(super) fn inbound<R: Columns>(r: &R) -> Result<InboundRecord, R::Error> {
    let status = r.text(3)?;
    Ok(InboundRecord {
        id: r.int(0)?,
        time_ms: r.int(1)?,
        source: r.text(2)?,
        status: InboundStatus::parse(&status)
            .ok_or_else(|| r.corrupt(3, format!("unknown inbound status `{status}`").into()))?,
        duplicate: r.flag(4)?,
        reason: r.opt_text(5)?,
        detail: r.opt_text(6)?,
        source_id: r.opt_text(7)?,
        kind: r.opt_text(8)?,
        channels: r.json(9)?,
        seqs: r.json(10)?,
        body_size: r.int(11)?.max(0) as u64,
        headers: Vec::new(),
        body: None,
    })
}

/// Columns of a pending delivery shown as the next attempt.
pub(super) const PENDING_COLUMNS: &str = "id, event_id, msg_id, attempts, next_ms";

pub(super) fn pending<R: Columns>(r: &R) -> Result<AttemptView, R::Error> {
    let id = r.int(0)?;
    let attempts: u32 = r.narrow(3, r.int(3)?)?;
    Ok(AttemptView {
        id: format!("del_{id}"),
        delivery_id: id,
        event_id: r.text(1)?,
        msg_id: r.text(2)?,
        attempt: attempts + 1,
        status: AttemptStatus::Pending,
        response_status: None,
        response_body: None,
        error: None,
        duration_ms: None,
        at_ms: r.int(4)?,
    })
}

pub(super) const ATTEMPT_COLUMNS: &str = "id, delivery_id, event_id, msg_id, attempt, succeeded, \
     response_status, response_body, error, duration_ms, at_ms";

pub(super) fn attempt<R: Columns>(r: &R) -> Result<AttemptView, R::Error> {
    Ok(AttemptView {
        id: format!("att_{}", r.int(0)?),
        delivery_id: r.int(1)?,
        event_id: r.text(2)?,
        msg_id: r.text(3)?,
        attempt: r.narrow(4, r.int(4)?)?,
        status: if r.flag(5)? {
            AttemptStatus::Succeeded
        } else {
            AttemptStatus::Failed
        },
        response_status: match r.opt_int(6)? {
            Some(v) => Some(r.narrow(6, v)?),
            None => None,
        },
        response_body: r.opt_text(7)?,
        error: r.opt_text(8)?,
        duration_ms: Some(r.int(9)?),
        at_ms: r.int(10)?,
    })
}

/// JSON text for a JSON column.
pub(super) fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}
