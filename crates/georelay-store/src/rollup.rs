//! The rollup worker's queries: its lease, the safe end of `telemetry` to
//! read, the rows, and the upsert that advances the watermark in the same
//! transaction (migrations/0013).
//!
//! **Which rows are safe to read.** `store_order` values are taken when a
//! row is inserted, but transactions commit in any order: rows numbered
//! below the highest visible one may still be in flight. So the worker
//! reads the sequence's last value `M`, waits, takes a snapshot, and reads
//! `(watermark, M]` only once every transaction in progress at that snapshot
//! has finished ([`xmin`] ≥ that snapshot's [`xmax`]): every row numbered up
//! to `M` is then committed (or gone). Writers of `telemetry` lock their
//! group's `drain_leases` row first, so they hold a transaction id before
//! they take a `store_order`; the wait between reading `M` and the snapshot
//! covers one that does not.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

use crate::StoreError;

/// The rollup lease, with its fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupLease {
    pub instance: Uuid,
    pub token: i64,
}

/// Takes the lease if it is free, has lapsed or is ours already.
pub async fn acquire_lease(
    pool: &PgPool,
    instance: Uuid,
    lease: Duration,
) -> Result<Option<RollupLease>, StoreError> {
    let token: Option<i64> = sqlx::query_scalar(
        "UPDATE rollup_progress
         SET instance_id = $1, token = token + 1,
             lease_until = clock_timestamp() + make_interval(secs => $2)
         WHERE id = 1 AND (lease_until < clock_timestamp() OR instance_id IS NULL)
         RETURNING token",
    )
    .bind(instance)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(token.map(|token| RollupLease { instance, token }))
}

/// Renews the lease; false if another worker holds it now.
pub async fn renew_lease(
    pool: &PgPool,
    lease: &RollupLease,
    length: Duration,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE rollup_progress SET lease_until = clock_timestamp() + make_interval(secs => $3)
         WHERE id = 1 AND instance_id = $1 AND token = $2 AND lease_until > clock_timestamp()",
    )
    .bind(lease.instance)
    .bind(lease.token)
    .bind(length.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Lets a standby take over at once (clean shutdown).
pub async fn release_lease(pool: &PgPool, lease: &RollupLease) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE rollup_progress SET lease_until = '-infinity'
         WHERE id = 1 AND instance_id = $1 AND token = $2",
    )
    .bind(lease.instance)
    .bind(lease.token)
    .execute(pool)
    .await?;
    Ok(())
}

/// The highest `store_order` handed out so far (committed or not); 0 before
/// the first.
pub async fn last_store_order(pool: &PgPool) -> Result<i64, StoreError> {
    let last: Option<i64> = sqlx::query_scalar(
        "SELECT pg_sequence_last_value(pg_get_serial_sequence('telemetry', 'store_order')::regclass)",
    )
    .fetch_one(pool)
    .await?;
    Ok(last.unwrap_or(0))
}

/// The first transaction id not yet assigned, as of now.
pub async fn xmax(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
            .fetch_one(pool)
            .await?,
    )
}

/// The oldest transaction id still in progress (or [`xmax`] if none).
pub async fn xmin(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(pool)
            .await?,
    )
}

/// The rollup as `admin status` shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Progress {
    pub watermark: i64,
    /// `store_order` numbers handed out but not rolled up.
    pub behind: i64,
    pub updated_at: DateTime<Utc>,
    /// Whether a worker holds the lease now.
    pub held: bool,
}

pub async fn progress(pool: &PgPool) -> Result<Progress, StoreError> {
    Ok(sqlx::query_as(
        "SELECT store_order AS watermark,
                greatest(coalesce(pg_sequence_last_value(pg_get_serial_sequence('telemetry', 'store_order')::regclass), 0) - store_order, 0) AS behind,
                updated_at, lease_until > clock_timestamp() AS held
         FROM rollup_progress WHERE id = 1",
    )
    .fetch_one(pool)
    .await?)
}

/// The oldest transaction with a transaction id still running anywhere on
/// the server, in words: what holds the rollup back when it waits.
pub async fn oldest_transaction(pool: &PgPool) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT format('pid %s on database %s (%s) open for %s s, last statement: %s',
                       pid, datname, state, round(extract(epoch FROM now() - xact_start)),
                       left(query, 120))
         FROM pg_stat_activity
         WHERE backend_xid IS NOT NULL AND xact_start IS NOT NULL
         ORDER BY xact_start LIMIT 1",
    )
    .fetch_optional(pool)
    .await?)
}

/// Where the rollup stands: every row with a lower or equal `store_order`
/// is counted.
pub async fn watermark(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT store_order FROM rollup_progress WHERE id = 1")
            .fetch_one(pool)
            .await?,
    )
}

/// A stored row as the rollup reads it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredRow {
    pub store_order: i64,
    pub device_id: String,
    /// The payload's JSON text.
    pub payload: String,
    pub received_at: DateTime<Utc>,
    /// The window sizes of the device's group, in seconds.
    pub windows: Vec<i32>,
}

/// Up to `limit` rows with `store_order` in `(after, through]`, in order.
pub async fn rows(
    pool: &PgPool,
    after: i64,
    through: i64,
    limit: i64,
) -> Result<Vec<StoredRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT t.store_order, t.device_id, t.payload::text AS payload, t.received_at,
                g.rollup_windows AS windows
         FROM telemetry t
         JOIN devices d ON d.id = t.device_id
         JOIN routing_groups g ON g.id = d.group_id
         WHERE t.store_order > $1 AND t.store_order <= $2
         ORDER BY t.store_order
         LIMIT $3",
    )
    .bind(after)
    .bind(through)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// One window's figures, to be added to what is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub device_id: String,
    pub sensor: String,
    pub field: String,
    pub window_seconds: i32,
    pub window_start: DateTime<Utc>,
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

/// Adds `aggregates` to their windows and moves the watermark from `from`
/// to `to`, in one transaction under the lease. False (nothing written) if
/// the lease is lost or the watermark is not `from` any more.
pub async fn commit(
    pool: &PgPool,
    lease: &RollupLease,
    length: Duration,
    from: i64,
    to: i64,
    aggregates: &[Aggregate],
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let held = sqlx::query(
        "UPDATE rollup_progress
         SET store_order = $4, updated_at = clock_timestamp(),
             lease_until = clock_timestamp() + make_interval(secs => $5)
         WHERE id = 1 AND instance_id = $1 AND token = $2 AND store_order = $3
           AND lease_until > clock_timestamp()",
    )
    .bind(lease.instance)
    .bind(lease.token)
    .bind(from)
    .bind(to)
    .bind(length.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    if held.rows_affected() != 1 {
        return Ok(false);
    }
    if !aggregates.is_empty() {
        let col = |f: fn(&Aggregate) -> String| aggregates.iter().map(f).collect::<Vec<_>>();
        let devices = col(|a| a.device_id.clone());
        let sensors = col(|a| a.sensor.clone());
        let fields = col(|a| a.field.clone());
        let windows: Vec<i32> = aggregates.iter().map(|a| a.window_seconds).collect();
        let starts: Vec<DateTime<Utc>> = aggregates.iter().map(|a| a.window_start).collect();
        let counts: Vec<i64> = aggregates.iter().map(|a| a.count).collect();
        let sums: Vec<f64> = aggregates.iter().map(|a| a.sum).collect();
        let mins: Vec<f64> = aggregates.iter().map(|a| a.min).collect();
        let maxs: Vec<f64> = aggregates.iter().map(|a| a.max).collect();
        sqlx::query(
            "INSERT INTO telemetry_rollups AS r
                 (device_id, sensor, field, window_seconds, window_start, count, sum, min, max)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[],
                                  $6::bigint[], $7::float8[], $8::float8[], $9::float8[])
             ON CONFLICT (device_id, sensor, field, window_seconds, window_start) DO UPDATE
                 SET count = r.count + EXCLUDED.count, sum = r.sum + EXCLUDED.sum,
                     min = least(r.min, EXCLUDED.min), max = greatest(r.max, EXCLUDED.max)",
        )
        .bind(&devices)
        .bind(&sensors)
        .bind(&fields)
        .bind(&windows)
        .bind(&starts)
        .bind(&counts)
        .bind(&sums)
        .bind(&mins)
        .bind(&maxs)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}
