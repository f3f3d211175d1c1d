//! What request bodies may cost: a whole-body deadline and a cap on bodies
//! in flight, by count and by bytes (`limits.body_timeout`,
//! `limits.bodies_in_flight`, `limits.body_bytes_in_flight`).
//!
//! Invariants:
//! - a request with a body takes one slot before its handler runs and gives
//!   it back when its response is ready (not when the body is read: the
//!   handler still holds the bytes while it works); past the count cap it is
//!   answered 503 `server_busy` with `Retry-After` without being read;
//! - bytes are counted as they arrive (not as declared, so a client cannot
//!   reserve what it never sends); a body that would take the total past the
//!   byte cap is cut off with 503 `server_busy`;
//! - a body still incomplete `body_timeout` after its head arrived is cut off
//!   with 408 `request_timeout` (hyper then closes the connection), however
//!   slowly it trickles — a byte every few seconds does not extend it.
//!
//! Readers see a cut-off as a body error carrying [`BodyCut`]; `RawBody`
//! turns it into the contract's JSON error with [`cut_off`].

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as _, Frame, SizeHint};

use super::error::ApiError;
use crate::config::LimitsConfig;

/// Seconds a client refused for load is told to wait.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// Why a body was cut off before it was complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyCut {
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("too many request bytes are in flight")]
    Busy,
}

impl From<BodyCut> for ApiError {
    fn from(cut: BodyCut) -> ApiError {
        match cut {
            BodyCut::Timeout(d) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {}s (limits.body_timeout)",
                    d.as_secs_f64()
                ),
            ),
            BodyCut::Busy => busy(),
        }
    }
}

fn busy() -> ApiError {
    ApiError {
        retry_after: Some(BUSY_RETRY_AFTER_SECS),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "the server is receiving too many request bodies; retry shortly",
        )
    }
}

/// The [`BodyCut`] behind a body-reading error, if that is what it was.
pub fn cut_off(e: &(dyn std::error::Error + 'static)) -> Option<BodyCut> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(cut) = err.downcast_ref::<BodyCut>() {
            return Some(*cut);
        }
        next = err.source();
    }
    None
}

/// The shared budget of bodies in flight.
pub struct BodyGate {
    timeout: Option<Duration>,
    max_count: usize,
    max_bytes: usize,
    count: AtomicUsize,
    bytes: AtomicUsize,
}

impl BodyGate {
    pub fn new(limits: &LimitsConfig) -> BodyGate {
        BodyGate {
            timeout: Some(limits.body_timeout.0).filter(|d| !d.is_zero()),
            max_count: limits.bodies_in_flight,
            max_bytes: limits.body_bytes_in_flight.0,
            count: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Bodies and bytes in flight now (for tests and metrics).
    pub fn in_flight(&self) -> (usize, usize) {
        (
            self.count.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    fn admit(self: &Arc<Self>) -> Option<Arc<Ticket>> {
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if self.max_count != 0 && n > self.max_count {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Arc::new(Ticket {
            gate: self.clone(),
            bytes: AtomicUsize::new(0),
        }))
    }
}

/// One request's share of the budget; returned when the handler's response
/// and the body are both gone.
struct Ticket {
    gate: Arc<BodyGate>,
    bytes: AtomicUsize,
}

impl Ticket {
    /// Counts `n` more bytes; false when that takes the total past the cap.
    fn take(&self, n: usize) -> bool {
        self.bytes.fetch_add(n, Ordering::AcqRel);
        let total = self.gate.bytes.fetch_add(n, Ordering::AcqRel) + n;
        self.gate.max_bytes == 0 || total <= self.gate.max_bytes
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate
            .bytes
            .fetch_sub(self.bytes.load(Ordering::Acquire), Ordering::AcqRel);
        self.gate.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Middleware: admits requests with a body against the gate and wraps the
/// body so the deadline and the byte cap apply while anyone reads it.
pub async fn guard_bodies(State(gate): State<Arc<BodyGate>>, req: Request, next: Next) -> Response {
    if req.body().size_hint().exact() == Some(0) {
        return next.run(req).await;
    }
    let Some(ticket) = gate.admit() else {
        return busy().into_response();
    };
    let deadline = gate.timeout.map(|d| (d, Box::pin(tokio::time::sleep(d))));
    let req = req.map(|inner| {
        Body::new(GuardedBody {
            inner,
            ticket: ticket.clone(),
            deadline,
            cut: false,
        })
    });
    let resp = next.run(req).await;
    drop(ticket);
    resp
}

struct GuardedBody {
    inner: Body,
    ticket: Arc<Ticket>,
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// A cut-off is reported once; after it the body is over.
    cut: bool,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if this.cut {
            return Poll::Ready(None);
        }
        if let Some((d, sleep)) = &mut this.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            this.cut = true;
            return Poll::Ready(Some(Err(axum::Error::new(BodyCut::Timeout(*d)))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                if !this.ticket.take(n) {
                    this.cut = true;
                    return Poll::Ready(Some(Err(axum::Error::new(BodyCut::Busy))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.cut || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ByteSize, Dur};

    fn gate(count: usize, bytes: usize) -> Arc<BodyGate> {
        Arc::new(BodyGate::new(&LimitsConfig {
            body_timeout: Dur::secs(0),
            bodies_in_flight: count,
            body_bytes_in_flight: ByteSize(bytes),
            ..LimitsConfig::default()
        }))
    }

    #[test]
    fn slots_and_bytes_come_back() {
        let g = gate(2, 100);
        let a = g.admit().unwrap();
        let b = g.admit().unwrap();
        assert!(g.admit().is_none(), "count cap");
        assert!(a.take(60));
        assert!(!b.take(50), "byte cap");
        assert_eq!(g.in_flight(), (2, 110));
        drop(a);
        drop(b);
        assert_eq!(g.in_flight(), (0, 0));
        let c = g.admit().unwrap();
        assert!(c.take(100));
    }

    #[test]
    fn zero_means_unlimited() {
        let g = gate(0, 0);
        let tickets: Vec<_> = (0..1000).map(|_| g.admit().unwrap()).collect();
        assert!(tickets[0].take(usize::MAX / 4));
    }

    #[test]
    fn cuts_are_found_through_wrapping_errors() {
        let inner = axum::Error::new(BodyCut::Busy);
        let outer = axum::Error::new(Box::new(inner) as Box<dyn std::error::Error + Send + Sync>);
        assert_eq!(cut_off(&outer), Some(BodyCut::Busy));
        let other = axum::Error::new(std::io::Error::other("reset"));
        assert_eq!(cut_off(&other), None);
        let e = ApiError::from(BodyCut::Timeout(Duration::from_secs(20)));
        assert_eq!((e.status.as_u16(), e.code), (408, "request_timeout"));
        let e = ApiError::from(BodyCut::Busy);
        assert_eq!((e.status.as_u16(), e.code), (503, "server_busy"));
        assert!(e.retry_after.is_some());
    }
}
