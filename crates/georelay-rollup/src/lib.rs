//! georelay-rollup (`georelay rollup`): tumbling-window aggregates of what
//! the drain stored, in `telemetry_rollups` (migrations/0013).
//!
//! - **Its own process, not a drain stage**: the drain's transaction is the
//!   hot path (a performance target of its own) and its correctness does not
//!   depend on aggregates; a rollup that fails or falls behind must never
//!   hold back storing. It reads `telemetry`, so it catches up after any
//!   pause, and it can be rebuilt from it.
//! - **What is aggregated**: per device, per numeric top-level field of the
//!   payload (time fields aside), per window size of the device's group
//!   (`routing_groups.rollup_windows`, 1 min, 3 min, 1 h by default), per
//!   window start by **reading time**: count, sum, min, max. A gateway
//!   reading (`{"type", "value", "sensor"}`) is one point of field `type`
//!   under its sensor. Reading time: `captured_at` (RFC 3339), else
//!   `timestamp` (ms since the epoch, or RFC 3339), else `time`/`ts`, else
//!   when ingest received the record.
//! - **Exactly once**: the watermark over `store_order` moves in the same
//!   transaction as the upserts, under a fenced lease; only rows that can no
//!   longer be joined by a lower, uncommitted one are read (see
//!   `georelay_store::rollup`). A row stored late (after an outage, or
//!   re-sent after a failover) has a new `store_order` and its own reading
//!   time: it updates its own window.
//! - **One active worker**: a standby takes over when the lease lapses.

use chrono::{DateTime, TimeZone as _, Utc};
use georelay_store::rollup::{self, Aggregate, RollupLease, StoredRow};
use georelay_store::{PgPool, StoreError};
use prometheus::{IntCounter, IntGauge, Registry, TextEncoder};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The worker's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often it looks for new rows.
    pub poll_interval: Duration,
    /// Lease length; a standby takes over this long after the holder died.
    pub lease: Duration,
    /// Most rows read and committed at once.
    pub batch_rows: i64,
    /// Wait between reading the last `store_order` and the snapshot whose
    /// transactions must finish before those rows are read.
    pub settle: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(10),
            batch_rows: 20_000,
            settle: Duration::from_secs(1),
        }
    }
}

/// Keys that hold a reading's time, not a measurement.
const TIME_KEYS: [&str; 4] = ["captured_at", "timestamp", "time", "ts"];

/// One measurement: `(sensor, field, value)` at a reading time.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub sensor: String,
    pub field: String,
    pub value: f64,
    pub at: DateTime<Utc>,
}

fn time_of(v: &serde_json::Value) -> Option<DateTime<Utc>> {
    match v {
        serde_json::Value::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        // Milliseconds since the epoch (trackers), within sane years.
        serde_json::Value::Number(n) => n
            .as_i64()
            .filter(|ms| (100_000_000_000..100_000_000_000_000).contains(ms))
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
        _ => None,
    }
}

/// The points of one stored payload.
pub fn points(payload: &str, received_at: DateTime<Utc>) -> Vec<Point> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(payload)
    else {
        return Vec::new();
    };
    let at = TIME_KEYS
        .iter()
        .find_map(|k| map.get(*k).and_then(time_of))
        .unwrap_or(received_at);
    if let (Some(serde_json::Value::String(kind)), Some(value)) = (
        map.get("type"),
        map.get("value").and_then(serde_json::Value::as_f64),
    ) {
        let sensor = map
            .get("sensor")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        return vec![Point {
            sensor: sensor.to_owned(),
            field: kind.clone(),
            value,
            at,
        }];
    }
    map.iter()
        .filter(|(k, _)| !TIME_KEYS.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            let value = v.as_f64().filter(|f| f.is_finite())?;
            Some(Point {
                sensor: String::new(),
                field: k.clone(),
                value,
                at,
            })
        })
        .collect()
}

/// The window of `size` seconds that `at` falls in.
pub fn window_start(at: DateTime<Utc>, size: i32) -> DateTime<Utc> {
    let size_ms = i64::from(size.max(1)) * 1000;
    let ms = at.timestamp_millis();
    Utc.timestamp_millis_opt(ms - ms.rem_euclid(size_ms))
        .single()
        .unwrap_or(at)
}

/// The rows' aggregates, one per (device, sensor, field, window size, start).
pub fn aggregate(rows: &[StoredRow]) -> Vec<Aggregate> {
    type Key = (String, String, String, i32, DateTime<Utc>);
    let mut out: HashMap<Key, Aggregate> = HashMap::new();
    for row in rows {
        for p in points(&row.payload, row.received_at) {
            for &w in &row.windows {
                let start = window_start(p.at, w);
                let key = (
                    row.device_id.clone(),
                    p.sensor.clone(),
                    p.field.clone(),
                    w,
                    start,
                );
                out.entry(key)
                    .and_modify(|a| {
                        a.count += 1;
                        a.sum += p.value;
                        a.min = a.min.min(p.value);
                        a.max = a.max.max(p.value);
                    })
                    .or_insert_with(|| Aggregate {
                        device_id: row.device_id.clone(),
                        sensor: p.sensor.clone(),
                        field: p.field.clone(),
                        window_seconds: w,
                        window_start: start,
                        count: 1,
                        sum: p.value,
                        min: p.value,
                        max: p.value,
                    });
            }
        }
    }
    out.into_values().collect()
}

#[derive(Debug, Clone)]
struct Metrics {
    registry: Registry,
    rows: IntCounter,
    behind: IntGauge,
    lease_held: IntGauge,
    held_back: IntGauge,
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let rows = IntCounter::new(
            "georelay_rollup_rows_total",
            "Stored telemetry rows rolled up into windows",
        )?;
        let behind = IntGauge::new(
            "georelay_rollup_behind_rows",
            "store_order numbers handed out but not yet rolled up (a bound on the rows behind)",
        )?;
        let lease_held = IntGauge::new(
            "georelay_rollup_lease_held",
            "1 while this worker holds the rollup lease",
        )?;
        registry.register(Box::new(rows.clone()))?;
        registry.register(Box::new(behind.clone()))?;
        registry.register(Box::new(lease_held.clone()))?;
        let held_back = IntGauge::new(
            "georelay_rollup_held_back_seconds",
            "How long the rollup has waited for a transaction that began before the rows it would read (0 when it is not waiting)",
        )?;
        registry.register(Box::new(held_back.clone()))?;
        Ok(Self {
            registry,
            rows,
            behind,
            lease_held,
            held_back,
        })
    }

    fn render(&self) -> String {
        // Text encoding of well-formed metrics does not fail.
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("serving health and metrics: {0}")]
    Serve(#[source] std::io::Error),
}

/// `store_order` values read but not yet safe: see `georelay_store::rollup`.
#[derive(Debug, Clone, Copy)]
struct Pending {
    through: i64,
    read_at: Instant,
    xmax: Option<i64>,
    /// When waiting for running transactions was last reported.
    warned: Option<Instant>,
}

/// Waiting this long for transactions to finish is reported (WARN, and
/// again each time as long).
const SLOW_TRANSACTION: Duration = Duration::from_secs(30);

/// Rolls up until `shutdown`; `/healthz` and `/metrics` on `listener`.
pub async fn run(
    config: Config,
    pool: PgPool,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RollupError> {
    let metrics = Metrics::new()?;
    let app = {
        let metrics = metrics.clone();
        axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move { metrics.render() }
                }),
            )
    };
    let server =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let worker = Worker {
        config,
        pool,
        instance: Uuid::new_v4(),
        lease: None,
        pending: None,
        metrics,
    };
    let (served, ()) = tokio::join!(server, worker.run(shutdown.clone()));
    served.map_err(RollupError::Serve)
}

struct Worker {
    config: Config,
    pool: PgPool,
    instance: Uuid,
    lease: Option<RollupLease>,
    pending: Option<Pending>,
    metrics: Metrics,
}

impl Worker {
    async fn run(mut self, stop: CancellationToken) {
        let mut failing = false;
        while !stop.is_cancelled() {
            let pause = match self.turn().await {
                Ok(more) => {
                    if failing {
                        tracing::info!("rollup: database answers again");
                        failing = false;
                    }
                    if more {
                        Duration::ZERO
                    } else {
                        self.config.poll_interval
                    }
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "rollup: database unavailable; retrying");
                        failing = true;
                    }
                    self.config.poll_interval * 2
                }
            };
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if let Some(lease) = self.lease.take() {
            if let Err(e) = rollup::release_lease(&self.pool, &lease).await {
                tracing::debug!(error = %e, "rollup: could not release the lease; it will lapse");
            }
        }
    }

    /// One turn; true if it rolled rows up (there may be more).
    async fn turn(&mut self) -> Result<bool, StoreError> {
        let Some(lease) = self.lease_or_standby().await? else {
            return Ok(false);
        };
        let config = self.config.clone();
        let watermark = rollup::watermark(&self.pool).await?;
        match self.pending {
            None => {
                let through = rollup::last_store_order(&self.pool).await?;
                self.metrics.behind.set(through - watermark);
                if through > watermark {
                    self.pending = Some(Pending {
                        through,
                        read_at: Instant::now(),
                        xmax: None,
                        warned: None,
                    });
                } else if !rollup::renew_lease(&self.pool, &lease, config.lease).await? {
                    self.lost_lease();
                }
                Ok(false)
            }
            Some(Pending {
                read_at,
                xmax: None,
                ..
            }) => {
                if read_at.elapsed() >= config.settle {
                    let xmax = rollup::xmax(&self.pool).await?;
                    if let Some(p) = self.pending.as_mut() {
                        p.xmax = Some(xmax);
                    }
                }
                if !rollup::renew_lease(&self.pool, &lease, config.lease).await? {
                    self.lost_lease();
                }
                Ok(false)
            }
            Some(Pending {
                through,
                xmax: Some(xmax),
                read_at,
                warned,
            }) => {
                if rollup::xmin(&self.pool).await? < xmax {
                    // A transaction that may hold a lower store_order runs.
                    self.metrics
                        .held_back
                        .set(read_at.elapsed().as_secs() as i64);
                    if warned.unwrap_or(read_at).elapsed() >= SLOW_TRANSACTION {
                        let holder = rollup::oldest_transaction(&self.pool).await?;
                        tracing::error!(waiting = ?read_at.elapsed(), transaction = holder.as_deref().unwrap_or("none found"),
                            "rollup held back: a transaction that began before the rows it would read is still open; it rolls up once that transaction ends (commit or roll it back, or end its session: pg_terminate_backend(pid))");
                        if let Some(p) = self.pending.as_mut() {
                            p.warned = Some(Instant::now());
                        }
                    }
                    if !rollup::renew_lease(&self.pool, &lease, config.lease).await? {
                        self.lost_lease();
                    }
                    return Ok(false);
                }
                self.metrics.held_back.set(0);
                let rows = rollup::rows(&self.pool, watermark, through, config.batch_rows).await?;
                let to = match rows.last() {
                    Some(last) if rows.len() as i64 == config.batch_rows => last.store_order,
                    _ => through,
                };
                let aggregates = aggregate(&rows);
                if !rollup::commit(&self.pool, &lease, config.lease, watermark, to, &aggregates)
                    .await?
                {
                    self.lost_lease();
                    return Ok(false);
                }
                self.metrics.rows.inc_by(rows.len() as u64);
                self.metrics.behind.set(through - to);
                if to >= through {
                    self.pending = None;
                }
                Ok(true)
            }
        }
    }

    async fn lease_or_standby(&mut self) -> Result<Option<RollupLease>, StoreError> {
        if let Some(lease) = self.lease {
            return Ok(Some(lease));
        }
        let taken = rollup::acquire_lease(&self.pool, self.instance, self.config.lease).await?;
        if let Some(lease) = taken {
            tracing::info!(token = lease.token, "rollup: took the lease");
            self.lease = Some(lease);
            self.pending = None;
            self.metrics.lease_held.set(1);
        }
        Ok(taken)
    }

    fn lost_lease(&mut self) {
        tracing::warn!("rollup: lost the lease (another worker took it): standing by");
        self.lease = None;
        self.pending = None;
        self.metrics.lease_held.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_gateway_reading_is_one_point_of_its_type_under_its_sensor() {
        let p = points(
            r#"{"captured_at":"2026-11-30T04:00:59.500Z","gateway":"plug-1","sensor":"Scale.Arduino","type":"Weight","value":12.3}"#,
            at("2026-11-30T05:00:00Z"),
        );
        assert_eq!(
            p,
            [Point {
                sensor: "Scale.Arduino".into(),
                field: "Weight".into(),
                value: 12.3,
                at: at("2026-11-30T04:00:59.500Z")
            }]
        );
    }

    #[test]
    fn other_payloads_give_each_numeric_field_at_their_reading_time() {
        let received = at("2026-11-30T05:00:00Z");
        let mut p = points(
            r#"{"timestamp":1795996800000,"speed":42,"latitude":54.5,"name":"x","io":{"1":1}}"#,
            received,
        );
        p.sort_by(|a, b| a.field.cmp(&b.field));
        let fields: Vec<(&str, f64)> = p.iter().map(|p| (p.field.as_str(), p.value)).collect();
        assert_eq!(fields, [("latitude", 54.5), ("speed", 42.0)]);
        assert!(p.iter().all(|p| p.at == at("2026-11-30T00:00:00Z")));
        // No time of its own: when ingest received it.
        assert_eq!(points(r#"{"n":1}"#, received)[0].at, received);
        // A time that does not parse is not a time.
        assert_eq!(
            points(r#"{"captured_at":"soon","n":1}"#, received)[0].at,
            received
        );
        assert!(points("[1,2]", received).is_empty());
    }

    #[test]
    fn windows_start_on_their_boundaries() {
        let t = at("2026-11-30T04:07:31.250Z");
        assert_eq!(window_start(t, 60), at("2026-11-30T04:07:00Z"));
        assert_eq!(window_start(t, 180), at("2026-11-30T04:06:00Z"));
        assert_eq!(window_start(t, 3600), at("2026-11-30T04:00:00Z"));
        let before_epoch = at("1969-12-31T23:59:30Z");
        assert_eq!(window_start(before_epoch, 60), at("1969-12-31T23:59:00Z"));
    }

    #[test]
    fn rows_fold_into_one_aggregate_per_window() {
        let row = |n: i64, v: f64, ts: &str| StoredRow {
            store_order: n,
            device_id: "d".into(),
            payload: format!(r#"{{"captured_at":"{ts}","v":{v}}}"#),
            received_at: at("2026-11-30T05:00:00Z"),
            windows: vec![60, 180],
        };
        let rows = [
            row(1, 1.0, "2026-11-30T04:00:10Z"),
            row(2, 3.0, "2026-11-30T04:00:50Z"),
            row(3, -2.0, "2026-11-30T04:01:10Z"),
        ];
        let mut a = aggregate(&rows);
        a.sort_by_key(|a| (a.window_seconds, a.window_start));
        let got: Vec<(i32, i64, f64, f64, f64)> = a
            .iter()
            .map(|a| (a.window_seconds, a.count, a.sum, a.min, a.max))
            .collect();
        assert_eq!(
            got,
            [
                (60, 2, 4.0, 1.0, 3.0),
                (60, 1, -2.0, -2.0, -2.0),
                (180, 3, 2.0, -2.0, 3.0)
            ]
        );
    }
}
