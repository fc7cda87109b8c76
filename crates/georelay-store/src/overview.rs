//! What the console shows beyond `admin status`: the drain worker's progress
//! per group, the breakers ingest instances hold open, the audit timeline,
//! and device liveness per group. Read-only queries, each one round trip.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;

use crate::StoreError;

/// A group's drain worker as its lease row tells it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DrainProgress {
    pub group: String,
    /// `host pid N` of the holder; `None` when it is not registered.
    pub holder: Option<String>,
    /// Whether the lease is live now.
    pub live: bool,
    /// Rows handed to INSERT for the group so far, by every holder.
    pub stored_total: i64,
    pub last_batch_at: Option<DateTime<Utc>>,
    /// Seconds from receipt to storing, for the last batch.
    pub last_batch_lag: Option<f64>,
    pub blocked_since: Option<DateTime<Utc>>,
    pub blocked_on: Option<String>,
}

pub async fn drain_progress(pool: &PgPool) -> Result<Vec<DrainProgress>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT g.name AS \"group\",
                i.hostname || coalesce(' pid ' || i.pid, '') AS holder,
                l.lease_until > clock_timestamp() AS live,
                l.stored_total, l.last_batch_at, l.last_batch_lag, l.blocked_since, l.blocked_on
         FROM drain_leases l
         JOIN routing_groups g ON g.id = l.group_id
         LEFT JOIN instances i ON i.id = l.instance_id
         ORDER BY g.name",
    )
    .fetch_all(pool)
    .await?)
}

/// A breaker an ingest instance with a live lease holds open.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OpenBreaker {
    pub namespace: String,
    /// `host pid N` of the instance.
    pub instance: String,
}

/// How many ingest instances have a live lease, and the breakers they hold
/// open.
pub async fn breakers(pool: &PgPool) -> Result<(i64, Vec<OpenBreaker>), StoreError> {
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE role = 'ingest' AND lease_until > now()",
    )
    .fetch_one(pool)
    .await?;
    let open = sqlx::query_as(
        "SELECT b.namespace, i.hostname || coalesce(' pid ' || i.pid, '') AS instance
         FROM instances i, unnest(i.open_breakers) AS b(namespace)
         WHERE i.role = 'ingest' AND i.lease_until > now()
         ORDER BY b.namespace, i.hostname, i.pid",
    )
    .fetch_all(pool)
    .await?;
    Ok((live, open))
}

/// A row of `failover_events`, with names.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Event {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub group: String,
    pub kind: String,
    pub from_namespace: Option<String>,
    pub to_namespace: Option<String>,
    pub epoch: i64,
    pub actor: String,
    pub reason: Option<String>,
}

/// The newest `limit` audit events, newest first.
pub async fn recent_events(pool: &PgPool, limit: i64) -> Result<Vec<Event>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT e.id, e.at, g.name AS \"group\", e.kind, f.name AS from_namespace,
                t.name AS to_namespace, e.epoch, e.actor, e.reason
         FROM failover_events e
         JOIN routing_groups g ON g.id = e.group_id
         LEFT JOIN namespaces f ON f.id = e.from_namespace_id
         LEFT JOIN namespaces t ON t.id = e.to_namespace_id
         ORDER BY e.id DESC
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A group's fleet: how many devices, how many of the enabled ones went
/// silent (seen before, not within `silent_after`), how many were seen in
/// the last minute.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Fleet {
    pub group: String,
    pub devices: i64,
    pub enabled: i64,
    pub silent: i64,
    pub seen_last_minute: i64,
}

pub async fn fleets(pool: &PgPool, silent_after: Duration) -> Result<Vec<Fleet>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT g.name AS \"group\", count(d.id) AS devices,
                count(d.id) FILTER (WHERE d.enabled) AS enabled,
                count(d.id) FILTER (WHERE d.enabled
                    AND d.last_seen_at < now() - make_interval(secs => $1)) AS silent,
                count(d.id) FILTER (WHERE d.last_seen_at >= now() - interval '1 minute') AS seen_last_minute
         FROM routing_groups g LEFT JOIN devices d ON d.group_id = g.id
         GROUP BY g.name ORDER BY g.name",
    )
    .bind(silent_after.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// A device and when the worker last stored a record of it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Seen {
    pub id: String,
    pub group: String,
    pub enabled: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub silent: bool,
}

/// Up to `limit` devices: the silent ones first (longest silent first), then
/// the rest by id.
pub async fn devices(
    pool: &PgPool,
    silent_after: Duration,
    limit: i64,
) -> Result<Vec<Seen>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT d.id, g.name AS \"group\", d.enabled, d.last_seen_at,
                coalesce(d.enabled AND d.last_seen_at < now() - make_interval(secs => $1), false) AS silent
         FROM devices d JOIN routing_groups g ON g.id = d.group_id
         ORDER BY silent DESC, CASE WHEN d.enabled AND d.last_seen_at < now() - make_interval(secs => $1)
                                    THEN d.last_seen_at END ASC NULLS LAST, d.id
         LIMIT $2",
    )
    .bind(silent_after.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
