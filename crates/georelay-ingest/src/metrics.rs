//! The ingest service's Prometheus metrics, declared once. Labels are bounded:
//! routes and status codes are fixed sets; namespace and group names come
//! from the control plane, not from requests.

use axum::extract::MatchedPath;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub records_accepted: IntCounter,
    pub publish_seconds: HistogramVec,
    pub breaker_open: IntGaugeVec,
    pub failovers: IntCounterVec,
    pub group_epoch: IntGaugeVec,
    /// Request body bytes reserved from `--max-bytes-in-flight` (set when
    /// rendered, from the budget's free permits).
    pub body_bytes_in_flight: IntGauge,
    /// Control plane problems the watchdog found at its last run.
    pub control_plane_problems: IntGauge,
    /// 1 while `/readyz` would answer 200 (set when rendered).
    pub ready: IntGauge,
    /// Open tracker connections, per codec.
    pub tracker_connections: IntGaugeVec,
    /// Tracker packets by outcome: acked, bad_crc, bad_count, refused, not_queued.
    pub tracker_packets: IntCounterVec,
    /// Tracker connections ended, by reason.
    pub tracker_closed: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "georelay_ingest_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )?;
        let records_accepted = IntCounter::new(
            "georelay_ingest_records_accepted_total",
            "Records durably queued and answered 202",
        )?;
        let publish_seconds = HistogramVec::new(
            HistogramOpts::new(
                "georelay_ingest_publish_duration_seconds",
                "Time to a broker's durable ack, per namespace (one record or one batch)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["namespace"],
        )?;
        let breaker_open = IntGaugeVec::new(
            Opts::new(
                "georelay_ingest_breaker_open",
                "1 while this instance's breaker for the namespace is open",
            ),
            &["namespace"],
        )?;
        let failovers = IntCounterVec::new(
            Opts::new(
                "georelay_ingest_failovers_total",
                "Failover attempts by outcome: moved, adopted, disabled, cooling_down, exhausted",
            ),
            &["group", "outcome"],
        )?;
        let group_epoch = IntGaugeVec::new(
            Opts::new(
                "georelay_ingest_group_epoch",
                "The epoch this instance writes to, per group",
            ),
            &["group"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(records_accepted.clone()))?;
        registry.register(Box::new(publish_seconds.clone()))?;
        registry.register(Box::new(breaker_open.clone()))?;
        registry.register(Box::new(failovers.clone()))?;
        registry.register(Box::new(group_epoch.clone()))?;
        let body_bytes_in_flight = IntGauge::new(
            "georelay_ingest_body_bytes_in_flight",
            "Request body bytes reserved from --max-bytes-in-flight (bodies being read, and read ones until answered)",
        )?;
        registry.register(Box::new(body_bytes_in_flight.clone()))?;
        let control_plane_problems = IntGauge::new(
            "georelay_control_plane_problems",
            "Control plane problems found by the watchdog (georelay admin doctor lists them)",
        )?;
        registry.register(Box::new(control_plane_problems.clone()))?;
        let ready = IntGauge::new(
            "georelay_ingest_ready",
            "1 while /readyz answers 200: accepting, lease valid, some region writable",
        )?;
        registry.register(Box::new(ready.clone()))?;
        let tracker_connections = IntGaugeVec::new(
            Opts::new(
                "georelay_ingest_tracker_connections",
                "Open connections of trackers (binary protocols over TCP), per codec",
            ),
            &["codec"],
        )?;
        let tracker_packets = IntCounterVec::new(
            Opts::new(
                "georelay_ingest_tracker_packets_total",
                "Tracker packets by outcome: acked (every record queued), bad_crc, bad_count, refused (device disabled or key unreadable), not_queued (no region took them); all but acked are answered 0 and sent again",
            ),
            &["codec", "outcome"],
        )?;
        let tracker_closed = IntCounterVec::new(
            Opts::new(
                "georelay_ingest_tracker_connections_closed_total",
                "Tracker connections ended, by reason (unknown_device, garbage, idle, slow_packet, not_allowed, too_many_connections, ...)",
            ),
            &["codec", "reason"],
        )?;
        registry.register(Box::new(tracker_connections.clone()))?;
        registry.register(Box::new(tracker_packets.clone()))?;
        registry.register(Box::new(tracker_closed.clone()))?;
        Ok(Self {
            registry,
            requests,
            records_accepted,
            publish_seconds,
            breaker_open,
            failovers,
            group_epoch,
            body_bytes_in_flight,
            control_plane_problems,
            ready,
            tracker_connections,
            tracker_packets,
            tracker_closed,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        // Text encoding of well-formed metrics does not fail.
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// Counts every HTTP answer by route and status
/// (`georelay_ingest_requests_total`); a layer of the whole app, 404s
/// included. Its future wraps the route's own, so a request costs no
/// allocation here (axum's `from_fn` middleware boxes one future and
/// clones the inner service per request).
#[derive(Debug, Clone)]
pub struct CountRequests(pub IntCounterVec);

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counting<S>;
    fn layer(&self, inner: S) -> Counting<S> {
        Counting {
            inner,
            requests: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Counting<S> {
    inner: S,
    requests: IntCounterVec,
}

impl<S> tower::Service<axum::extract::Request> for Counting<S>
where
    S: tower::Service<axum::extract::Request, Response = axum::response::Response>,
{
    type Response = axum::response::Response;
    type Error = S::Error;
    type Future = Counted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        let route = route_label(request.extensions().get::<MatchedPath>());
        Counted {
            inner: self.inner.call(request),
            route,
            requests: self.requests.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A route's answer, counted when it is ready.
    pub struct Counted<F> {
        #[pin]
        inner: F,
        route: &'static str,
        requests: IntCounterVec,
    }
}

impl<F, E> Future for Counted<F>
where
    F: Future<Output = Result<axum::response::Response, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        if let Ok(response) = &answer {
            this.requests
                .with_label_values(&[this.route, response.status().as_str()])
                .inc();
        }
        Poll::Ready(answer)
    }
}

/// The `route` label: a fixed set, whatever the path asked for.
fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    matched.map_or("unmatched", |p| match p.as_str() {
        "/v1/devices/{device_id}/telemetry" => "telemetry",
        "/v1/devices/{device_id}/telemetry/batch" => "batch",
        "/v1/devices/{device_id}/progress" => "progress",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        _ => "other",
    })
}
