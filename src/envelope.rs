//! The envelope: how one committed event looks on the wire.
//!
//! Owns the contract's event JSON and its SSE and WebSocket framings.
//! Invariants:
//! - each event is encoded once (`EncodedEvent`) and the same bytes are
//!   shared by every subscriber and transport; the framings derived from it
//!   are built at most once, on first use;
//! - the envelope is one line: a payload stored pretty-printed is compacted
//!   without changing any value, so an SSE `data:` line is never split;
//! - nothing from a payload can break a framing (event types lose their line
//!   breaks in `event:` lines).

use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::store::{Event, Seq, format_cursor};

/// One event, encoded once for every transport.
#[derive(Debug)]
pub struct EncodedEvent {
    pub seq: Seq,
    pub kind: String,
    /// The envelope, as the contract shows it.
    pub json: Bytes,
    /// `id: <cursor>\ndata: <envelope>\n\n`
    pub sse: Bytes,
    sse_named: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    channel: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    source: &'a str,
    source_id: Option<&'a str>,
    time: &'a str,
    data: &'a RawValue,
}

impl EncodedEvent {
    pub fn encode(event: &Event, log_tag: &str) -> EncodedEvent {
        let cursor = format_cursor(event.seq, log_tag);
        let time = crate::clock::rfc3339(event.time_ms);
        let envelope = Envelope {
            id: &cursor,
            channel: &event.channel,
            kind: &event.kind,
            source: &event.source,
            source_id: event.source_id.as_deref(),
            time: &time,
            data: &one_line(&event.data),
        };
        let json = serde_json::to_vec(&envelope).expect("envelope serializes");
        let mut sse = BytesMut::with_capacity(json.len() + cursor.len() + 13);
        sse.put_slice(b"id: ");
        sse.put_slice(cursor.as_bytes());
        sse.put_slice(b"\ndata: ");
        sse.put_slice(&json);
        sse.put_slice(b"\n\n");
        EncodedEvent {
            seq: event.seq,
            kind: event.kind.clone(),
            json: json.into(),
            sse: sse.freeze(),
            sse_named: OnceLock::new(),
            ws: OnceLock::new(),
        }
    }

    /// SSE bytes with an `event: <type>` line (`?named=1`).
    pub fn sse_named(&self) -> &Bytes {
        self.sse_named.get_or_init(|| {
            let mut b = BytesMut::with_capacity(self.sse.len() + self.kind.len() + 8);
            b.put_slice(b"event: ");
            b.put_slice(sanitize_line(&self.kind).as_bytes());
            b.put_slice(b"\n");
            b.put_slice(&self.sse);
            b.freeze()
        })
    }

    /// The WebSocket text frame payload `{"op":"event","event":<envelope>}`.
    pub fn ws_text(&self) -> &Bytes {
        self.ws.get_or_init(|| {
            let mut b = BytesMut::with_capacity(self.json.len() + 24);
            b.put_slice(b"{\"op\":\"event\",\"event\":");
            b.put_slice(&self.json);
            b.put_slice(b"}");
            b.freeze()
        })
    }
}

/// The payload without line breaks, so the envelope is one SSE `data:` line.
/// Payloads are stored as they arrived, and providers send pretty-printed
/// JSON; outside strings (where valid JSON has no raw control characters)
/// whitespace means nothing, so dropping it changes no value, key order or
/// number as written. Payloads without line breaks are used as they are.
fn one_line(data: &RawValue) -> std::borrow::Cow<'_, RawValue> {
    let text = data.get();
    if !text.bytes().any(|b| b == b'\n' || b == b'\r') {
        return std::borrow::Cow::Borrowed(data);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    match RawValue::from_string(out) {
        Ok(compact) => std::borrow::Cow::Owned(compact),
        // Cannot happen for valid JSON; keep the original rather than lose it.
        Err(_) => std::borrow::Cow::Borrowed(data),
    }
}

/// Event types come from payloads; a newline in one must not break SSE framing.
fn sanitize_line(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['\n', '\r']) {
        s.replace(['\n', '\r'], " ").into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: Seq, channel: &str) -> Event {
        Event {
            seq,
            channel: channel.into(),
            kind: "t".into(),
            source: "publish".into(),
            source_id: None,
            time_ms: 1_764_406_800_123,
            data: RawValue::from_string("{\"a\":1}".into()).unwrap(),
        }
    }

    #[test]
    fn envelope_encoding() {
        let e = EncodedEvent::encode(&event(7, "user:1"), "abc");
        assert_eq!(
            std::str::from_utf8(&e.json).unwrap(),
            r#"{"id":"7-abc","channel":"user:1","type":"t","source":"publish","source_id":null,"time":"2025-11-29T09:00:00.123Z","data":{"a":1}}"#
        );
        assert!(e.sse.starts_with(b"id: 7-abc\ndata: {"));
        assert!(e.sse.ends_with(b"}\n\n"));
        assert!(e.sse_named().starts_with(b"event: t\nid: 7-abc\n"));
        assert!(
            e.ws_text()
                .starts_with(b"{\"op\":\"event\",\"event\":{\"id\":\"7-abc\"")
        );
    }

    #[test]
    fn multi_line_payloads_become_one_line_without_changing_a_value() {
        let mut e = event(1, "a");
        e.data = RawValue::from_string(
            "{\r\n  \"z\": \"a b\\\"\\n c\",\n  \"a\": [1.50, 12345678901234567890123],\n\t\"e\": {}\n}".into(),
        )
        .unwrap();
        let enc = EncodedEvent::encode(&e, "t");
        let json = std::str::from_utf8(&enc.json).unwrap();
        assert!(
            json.ends_with(
                r#""data":{"z":"a b\"\n c","a":[1.50,12345678901234567890123],"e":{}}}"#
            ),
            "{json}"
        );
        assert!(!enc.sse.contains(&b'\r'));
        assert_eq!(
            enc.sse.iter().filter(|b| **b == b'\n').count(),
            3,
            "id line, data line, blank line"
        );
    }
}
