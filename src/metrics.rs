//! Prometheus metrics, owned by one server instance (no global recorder, so
//! several servers can run in one test process).
//!
//! Owns the counters, gauges and histograms `/metrics` renders. Invariant:
//! every series is declared here with fixed labels; nothing a client sends
//! (a channel, a path, a source name) becomes a label, so the number of
//! series is bounded.

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub events_appended: Counter,
    pub deliveries_sse: Counter,
    pub deliveries_ws: Counter,
    pub deliveries_poll: Counter,
    pub append_seconds: Histogram,
    pub streams_sse: Gauge,
    pub streams_ws: Gauge,
    pub streams_poll: Gauge,
    pub lagged_subscribers: Counter,
    pub webhook_attempts_succeeded: Counter,
    pub webhook_attempts_failed: Counter,
    /// Inbound webhooks by outcome.
    pub webhooks_accepted: Counter,
    pub webhooks_duplicate: Counter,
    pub webhooks_rejected: Counter,
    /// Outbound deliveries pending, and how overdue the earliest is; set
    /// from the store when `/metrics` is read.
    pub webhook_queue_depth: Gauge,
    pub webhook_queue_oldest_due_seconds: Gauge,
}

const META: Metadata<'static> = Metadata::new("pushgate", metrics::Level::INFO, None);

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("pushgate_append_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )
            .expect("buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            let key = Key::from_parts(
                name,
                labels
                    .iter()
                    .map(|(k, v)| Label::new(*k, *v))
                    .collect::<Vec<_>>(),
            );
            recorder.register_counter(&key, &META)
        };
        let gauge = |name: &'static str, transport: &'static str| {
            let key = Key::from_parts(name, vec![Label::new("transport", transport)]);
            recorder.register_gauge(&key, &META)
        };
        Metrics {
            events_appended: counter("pushgate_events_appended_total", &[]),
            deliveries_sse: counter("pushgate_deliveries_total", &[("transport", "sse")]),
            deliveries_ws: counter("pushgate_deliveries_total", &[("transport", "ws")]),
            deliveries_poll: counter("pushgate_deliveries_total", &[("transport", "poll")]),
            lagged_subscribers: counter("pushgate_subscriber_lags_total", &[]),
            webhook_attempts_succeeded: counter(
                "pushgate_webhook_attempts_total",
                &[("result", "succeeded")],
            ),
            webhook_attempts_failed: counter(
                "pushgate_webhook_attempts_total",
                &[("result", "failed")],
            ),
            webhooks_accepted: counter("pushgate_webhooks_total", &[("result", "accepted")]),
            webhooks_duplicate: counter("pushgate_webhooks_total", &[("result", "duplicate")]),
            webhooks_rejected: counter("pushgate_webhooks_total", &[("result", "rejected")]),
            webhook_queue_depth: recorder
                .register_gauge(&Key::from_name("pushgate_webhook_queue_depth"), &META),
            webhook_queue_oldest_due_seconds: recorder.register_gauge(
                &Key::from_name("pushgate_webhook_queue_oldest_due_seconds"),
                &META,
            ),
            append_seconds: recorder
                .register_histogram(&Key::from_name("pushgate_append_seconds"), &META),
            streams_sse: gauge("pushgate_open_streams", "sse"),
            streams_ws: gauge("pushgate_open_streams", "ws"),
            streams_poll: gauge("pushgate_open_streams", "poll"),
            handle,
            recorder,
        }
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }

    pub fn recorder(&self) -> &PrometheusRecorder {
        &self.recorder
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Increments a gauge while alive: open streams are counted by their guards.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(g: &Gauge) -> GaugeGuard {
        g.increment(1.0);
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}
