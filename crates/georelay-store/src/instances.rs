//! Process registration, leases and the epochs ingest instances acknowledge
//! (docs/DESIGN.md "Senders", step 5: fencing).
//!
//! Leases are in database time: `lease_until = now() + lease` at each
//! heartbeat. The worker's seal barrier reads `instance_epochs` joined to
//! `instances`, so an instance writes there only what it can stand behind: an
//! epoch it acknowledges has no publish to an older epoch still in flight.

use sqlx::PgPool;
use std::time::Duration;
use uuid::Uuid;

use crate::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Drain,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Drain => "drain",
        }
    }
}

/// What a heartbeat reports besides the lease.
#[derive(Debug, Clone, Copy, Default)]
pub struct Beat<'a> {
    /// `(group_id, epoch)` acknowledged (ingest).
    pub epochs: &'a [(i64, i64)],
    /// Names of the namespaces whose breaker is open here (ingest).
    pub open_breakers: &'a [String],
    /// `(group_id, epoch, device, highest seq)` acknowledged since the last
    /// heartbeat (ingest): written to `device_acks`.
    pub acks: &'a [(i64, i64, String, i64)],
    /// How long after a device is disabled this instance may still
    /// acknowledge a record of it (ingest; `instances.ack_horizon_s`).
    pub ack_horizon: Duration,
}

/// Renews (or, if an operator deleted it, re-creates) the instance row and
/// its lease, and records the epoch acknowledged for each `(group_id, epoch)`
/// and the open breakers, in one transaction.
pub async fn heartbeat(
    pool: &PgPool,
    id: Uuid,
    role: Role,
    lease: Duration,
    beat: Beat<'_>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO instances (id, role, hostname, pid, heartbeat_at, lease_until, records_publishes, open_breakers, ack_horizon_s)
         VALUES ($1, $2, $3, $4, now(), now() + make_interval(secs => $5), true, $6, $7)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), lease_until = EXCLUDED.lease_until,
                                        records_publishes = true, open_breakers = EXCLUDED.open_breakers,
                                        ack_horizon_s = EXCLUDED.ack_horizon_s",
    )
    .bind(id)
    .bind(role.as_str())
    .bind(hostname())
    .bind(i32::try_from(std::process::id()).ok())
    .bind(lease.as_secs_f64())
    .bind(beat.open_breakers)
    .bind(beat.ack_horizon.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    // Rows of processes that died without deregistering (kill -9), long
    // after their lease: nothing reads them any more.
    sqlx::query("DELETE FROM instances WHERE lease_until < now() - interval '1 hour'")
        .execute(&mut *tx)
        .await?;
    if !beat.epochs.is_empty() {
        let (groups, epochs): (Vec<i64>, Vec<i64>) = beat.epochs.iter().copied().unzip();
        sqlx::query(
            "INSERT INTO instance_epochs (instance_id, group_id, epoch)
             SELECT $1, g, e FROM unnest($2::bigint[], $3::bigint[]) AS u(g, e)
             WHERE EXISTS (SELECT 1 FROM routing_groups WHERE id = g)
             ON CONFLICT (instance_id, group_id) DO UPDATE
                 SET epoch = EXCLUDED.epoch, acked_at = now()
                 WHERE instance_epochs.epoch <> EXCLUDED.epoch",
        )
        .bind(id)
        .bind(&groups)
        .bind(&epochs)
        .execute(&mut *tx)
        .await?;
    }
    if !beat.acks.is_empty() {
        let groups: Vec<i64> = beat.acks.iter().map(|a| a.0).collect();
        let epochs: Vec<i64> = beat.acks.iter().map(|a| a.1).collect();
        let devices: Vec<&str> = beat.acks.iter().map(|a| a.2.as_str()).collect();
        let seqs: Vec<i64> = beat.acks.iter().map(|a| a.3).collect();
        sqlx::query(
            "INSERT INTO device_acks AS a (device_id, group_id, epoch, acked_through)
             SELECT d, g, e, s FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[]) AS u(g, e, d, s)
             WHERE EXISTS (SELECT 1 FROM devices WHERE id = d)
               AND EXISTS (SELECT 1 FROM routing_groups WHERE id = g)
             ON CONFLICT (device_id, group_id, epoch) DO UPDATE
                 SET acked_through = greatest(a.acked_through, EXCLUDED.acked_through), acked_at = now()",
        )
        .bind(&groups)
        .bind(&epochs)
        .bind(&devices)
        .bind(&seqs)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Removes the instance (and its acknowledged epochs) at a clean shutdown.
pub async fn deregister(pool: &PgPool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM instances WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// This machine's name, for operators reading `instances`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}
