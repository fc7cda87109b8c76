//! The ingest service's Prometheus metrics, declared once. Labels are bounded:
//! routes and status codes are fixed sets; namespace and group names come
//! from the control plane, not from requests.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
