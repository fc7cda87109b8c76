//! The worker's Prometheus metrics, declared once; labels are group and
//! namespace names from the control plane and a fixed set of reasons.

use georelay_store::drain::DeadLetterReason;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub rows_stored: IntCounter,
    pub duplicates: IntCounter,
    pub dead_letters: IntCounterVec,
    pub batch_size: Histogram,
    pub lag_seconds: GaugeVec,
    pub drain_epoch: IntGaugeVec,
    pub blocked_seconds: GaugeVec,
    pub backlog: IntGaugeVec,
    pub lease_held: IntGaugeVec,
    /// Ingest instances that alone keep an old epoch from sealing, past the
    /// seal grace.
    pub seal_held_by_ingest: IntGaugeVec,
    /// Enabled devices that sent before and nothing stored within
    /// `--silent-after`.
    pub silent_devices: IntGaugeVec,
    /// What a broker's own dead-letter sub-queue held at the last sweep.
    pub broker_dead_lettered: IntGaugeVec,
    /// Control plane problems the watchdog found at its last run.
    pub control_plane_problems: IntGauge,
    /// Devices' open gaps (records stranded in an abandoned epoch), the
    /// records parked behind them, and how long the oldest has been open.
    pub open_gaps: IntGaugeVec,
    pub parked_records: IntGaugeVec,
    pub oldest_gap_seconds: GaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let rows_stored = IntCounter::new(
            "georelay_drain_rows_stored_total",
            "Telemetry rows inserted",
        )?;
        let duplicates = IntCounter::new(
            "georelay_drain_duplicates_dropped_total",
            "Records received again and dropped by the (device_id, seq) key",
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "georelay_drain_dead_letters_total",
                "Records sent to dead_letters, by reason",
            ),
            &["reason"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "georelay_drain_batch_size_records",
                "Records per stored batch",
            )
            .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0]),
        )?;
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "georelay_drain_lag_seconds",
                "Seconds from ingest's 202 to storage, for the last record stored",
            ),
            &["group"],
        )?;
        let drain_epoch = IntGaugeVec::new(
            Opts::new("georelay_drain_epoch", "The trail epoch being drained"),
            &["group"],
        )?;
        let blocked_seconds = GaugeVec::new(
            Opts::new(
                "georelay_drain_blocked_seconds",
                "How long draining has waited on an unreachable namespace (0 when not blocked)",
            ),
            &["group"],
        )?;
        let backlog = IntGaugeVec::new(
            Opts::new(
                "georelay_drain_undrained_depth",
                "Messages waiting in the queue of the epoch being drained",
            ),
            &["group", "namespace"],
        )?;
        let lease_held = IntGaugeVec::new(
            Opts::new(
                "georelay_drain_lease_held",
                "1 while this worker is the group's active drainer",
            ),
            &["group"],
        )?;
        let broker_dead_lettered = IntGaugeVec::new(
            Opts::new(
                "georelay_drain_broker_dead_lettered",
                "Messages the broker itself dead-lettered (Service Bus $DeadLetterQueue) at the last sweep; the worker moves them to dead_letters as broker_dead_lettered",
            ),
            &["group", "namespace"],
        )?;
        registry.register(Box::new(broker_dead_lettered.clone()))?;
        let seal_held_by_ingest = IntGaugeVec::new(
            Opts::new(
                "georelay_drain_seal_held_by_ingest",
                "Ingest instances still acknowledging the old epoch being drained past the seal grace (0 when none): they alone hold the seal",
            ),
            &["group"],
        )?;
        registry.register(Box::new(seal_held_by_ingest.clone()))?;
        let silent_devices = IntGaugeVec::new(
            Opts::new(
                "georelay_drain_silent_devices",
                "Enabled devices that sent before but have nothing stored within --silent-after",
            ),
            &["group"],
        )?;
        registry.register(Box::new(silent_devices.clone()))?;
        let open_gaps = IntGaugeVec::new(
            Opts::new(
                "georelay_drain_open_gaps",
                "Devices waiting for records stranded in an abandoned epoch (their agents send them again; georelay admin device release-gap gives up on them)",
            ),
            &["group"],
        )?;
        registry.register(Box::new(open_gaps.clone()))?;
        let parked_records = IntGaugeVec::new(
            Opts::new(
                "georelay_drain_parked_records",
                "Records held back in parked_records behind an open gap, stored in order once it closes",
            ),
            &["group"],
        )?;
        registry.register(Box::new(parked_records.clone()))?;
        let oldest_gap_seconds = GaugeVec::new(
            Opts::new(
                "georelay_drain_oldest_gap_seconds",
                "How long the group's oldest open gap has been open (0 when none)",
            ),
            &["group"],
        )?;
        registry.register(Box::new(oldest_gap_seconds.clone()))?;
        // Every reason from the start, so a rate sees the first one.
        for reason in DeadLetterReason::ALL {
            dead_letters.with_label_values(&[reason.as_str()]);
        }
        registry.register(Box::new(rows_stored.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(lag_seconds.clone()))?;
        registry.register(Box::new(drain_epoch.clone()))?;
        registry.register(Box::new(blocked_seconds.clone()))?;
        registry.register(Box::new(backlog.clone()))?;
        registry.register(Box::new(lease_held.clone()))?;
        let control_plane_problems = IntGauge::new(
            "georelay_control_plane_problems",
            "Control plane problems found by the watchdog (georelay admin doctor lists them)",
        )?;
        registry.register(Box::new(control_plane_problems.clone()))?;
        Ok(Self {
            registry,
            rows_stored,
            duplicates,
            dead_letters,
            batch_size,
            lag_seconds,
            drain_epoch,
            blocked_seconds,
            backlog,
            lease_held,
            broker_dead_lettered,
            seal_held_by_ingest,
            silent_devices,
            control_plane_problems,
            open_gaps,
            parked_records,
            oldest_gap_seconds,
        })
    }

    pub fn render(&self) -> String {
        // Text encoding of well-formed metrics does not fail.
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}
