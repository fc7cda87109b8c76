//! Records stranded in an abandoned epoch (a region lost for good), and the
//! device's newer records held back until they are back.
//!
//! - **Opening.** When an epoch is given up ([`crate::control::abandon_epoch`]),
//!   every device that ingest acknowledged records of there (`device_acks`)
//!   beyond what is stored gets a gap: the seqs `(after_seq, through_seq]`.
//!   Devices with nothing stranded get none and flow at once.
//! - **Parking.** While a device has an open gap, the worker stores its
//!   records in the gap as usual (sent again by the agent, which keeps every
//!   record until it is stored) and parks those above it in
//!   `parked_records`, in the same statement that stores the batch
//!   (`drain::store_batch`).
//! - **Closing.** A gap closes when its `through_seq` is stored: the agent
//!   sends again in seq order, so everything it had below is stored by then
//!   (a seq ingest refused with a 400 never comes; it is not waited for). Or
//!   when an SRE releases it ([`request_release`]: the device itself died).
//!   [`release_gaps`] closes them and moves the parked records to
//!   `telemetry` in seq order, in one transaction under the worker's lease.
//!   A device that does not send again (a tracker deletes what was
//!   acknowledged; `devices.sends_again`) has its gap released at once.
//!
//! Only the worker closes gaps and moves parked records (GR015 refuses
//! anyone else; the worker says `georelay.releasing` in its transaction).

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use std::time::Duration;

use crate::control::{set_actor, Actor};
use crate::drain::{check_lease, LeaseToken};
use crate::StoreError;

/// Opens a gap for every device with records acknowledged in `epoch` of
/// the group and not stored. Part of giving the epoch up. The gaps of
/// devices that do not send again (`devices.sends_again` false: trackers)
/// are released at once, audited like an SRE's release: nobody can fill
/// them. Returns `(gaps left to fill, gaps given up)`.
pub(crate) async fn open_gaps(
    tx: &mut Transaction<'_, Postgres>,
    group_id: i64,
    epoch: i64,
) -> Result<(u64, u64), StoreError> {
    let opened = sqlx::query(
        "INSERT INTO device_gaps (device_id, group_id, epoch, after_seq, through_seq)
         SELECT a.device_id, a.group_id, a.epoch, s.stored, a.acked_through
         FROM device_acks a
         CROSS JOIN LATERAL (SELECT coalesce(max(seq), 0) AS stored FROM telemetry
                             WHERE device_id = a.device_id) s
         WHERE a.group_id = $1 AND a.epoch = $2 AND a.acked_through > s.stored
         ON CONFLICT DO NOTHING",
    )
    .bind(group_id)
    .bind(epoch)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    // The trigger's gap_released event says why, then the reason is the
    // abandonment's again.
    let reason: Option<String> =
        sqlx::query_scalar("SELECT current_setting('georelay.reason', true)")
            .fetch_one(&mut **tx)
            .await?;
    sqlx::query("SELECT set_config('georelay.reason', $1, true)")
        .bind(DOES_NOT_SEND_AGAIN)
        .execute(&mut **tx)
        .await?;
    let given_up = sqlx::query(
        "UPDATE device_gaps g SET release_requested_at = now()
         FROM devices d
         WHERE d.id = g.device_id AND NOT d.sends_again
           AND g.group_id = $1 AND g.epoch = $2 AND g.closed_at IS NULL
           AND g.release_requested_at IS NULL",
    )
    .bind(group_id)
    .bind(epoch)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    sqlx::query("SELECT set_config('georelay.reason', $1, true)")
        .bind(reason.unwrap_or_default())
        .execute(&mut **tx)
        .await?;
    Ok((opened - given_up, given_up))
}

/// Why a tracker's gap is given up at once.
const DOES_NOT_SEND_AGAIN: &str =
    "the device does not send again what was acknowledged (a tracker): nobody can fill the gap";

/// Records that `device` does not send again what it got an
/// acknowledgement for (a tracker): its gaps are given up at once. A write
/// only the first time.
pub async fn mark_does_not_send_again(pool: &PgPool, device: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE devices SET sends_again = false WHERE id = $1 AND sends_again")
        .bind(device)
        .execute(pool)
        .await?;
    Ok(())
}

/// A gap's seqs as people read them: `first..=last`.
pub fn seqs(after_seq: i64, through_seq: i64) -> String {
    format!("{}..={}", after_seq + 1, through_seq)
}

/// A gap [`release_gaps`] closed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedGap {
    pub device_id: String,
    pub epoch: i64,
    pub after_seq: i64,
    pub through_seq: i64,
    /// `filled` (its last seq is stored) or `released` (an SRE let go).
    pub how: String,
    /// From the abandonment to now.
    pub open_for: Duration,
}

/// What [`release_gaps`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Released {
    pub closed: Vec<ClosedGap>,
    /// Parked records moved to `telemetry` (in seq order per device).
    pub stored: u64,
}

/// Closes the group's gaps that are filled or that an SRE released, and
/// stores their devices' parked records in seq order — up to the next gap
/// of the same device still open, if any — repeating while that fills
/// another. One transaction that checks the lease; `None`: lost.
pub async fn release_gaps(
    pool: &PgPool,
    lease: &LeaseToken,
    lease_length: Duration,
) -> Result<Option<Released>, StoreError> {
    let mut tx = pool.begin().await?;
    if !check_lease(&mut tx, lease, lease_length).await? {
        return Ok(None);
    }
    sqlx::query("SET LOCAL georelay.releasing = 'on'")
        .execute(&mut *tx)
        .await?;
    let mut released = Released::default();
    loop {
        let closed: Vec<(String, i64, i64, i64, String, f64)> = sqlx::query_as(
            "UPDATE device_gaps g SET closed_at = now(),
                    closed_how = CASE WHEN EXISTS (SELECT 1 FROM telemetry t
                                                   WHERE t.device_id = g.device_id AND t.seq >= g.through_seq)
                                      THEN 'filled' ELSE 'released' END
             WHERE g.group_id = $1 AND g.closed_at IS NULL
               AND (g.release_requested_at IS NOT NULL
                    OR EXISTS (SELECT 1 FROM telemetry t
                               WHERE t.device_id = g.device_id AND t.seq >= g.through_seq))
             RETURNING g.device_id, g.epoch, g.after_seq, g.through_seq, g.closed_how,
                       extract(epoch FROM now() - g.opened_at)::float8",
        )
        .bind(lease.group_id)
        .fetch_all(&mut *tx)
        .await?;
        if closed.is_empty() {
            break;
        }
        let devices: Vec<&str> = closed.iter().map(|c| c.0.as_str()).collect();
        let moved = sqlx::query(
            "WITH moved AS (
                 DELETE FROM parked_records p
                 WHERE p.group_id = $1 AND p.device_id = ANY($2)
                   AND p.seq <= coalesce((SELECT min(g.through_seq) FROM device_gaps g
                                          WHERE g.device_id = p.device_id AND g.group_id = $1
                                            AND g.closed_at IS NULL), 9223372036854775807)
                 RETURNING p.*
             )
             INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
             SELECT device_id, seq, payload, received_at, namespace_id, epoch FROM moved
             ORDER BY device_id, seq
             ON CONFLICT (device_id, seq) DO NOTHING",
        )
        .bind(lease.group_id)
        .bind(&devices)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        released.stored += moved;
        released.closed.extend(closed.into_iter().map(
            |(device_id, epoch, after_seq, through_seq, how, secs)| ClosedGap {
                device_id,
                epoch,
                after_seq,
                through_seq,
                how,
                open_for: Duration::from_secs_f64(secs.max(0.0)),
            },
        ));
    }
    tx.commit().await?;
    Ok(Some(released))
}

/// An open gap, as `admin status`, the console and the worker's gauges show it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OpenGap {
    pub group: String,
    pub device_id: String,
    pub epoch: i64,
    pub after_seq: i64,
    pub through_seq: i64,
    pub opened_at: DateTime<Utc>,
    pub release_requested_at: Option<DateTime<Utc>>,
    /// The device's records held back behind it.
    pub parked: i64,
}

/// Every open gap (of `group`, or of all groups), oldest first.
pub async fn open(pool: &PgPool, group: Option<&str>) -> Result<Vec<OpenGap>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT rg.name AS \"group\", g.device_id, g.epoch, g.after_seq, g.through_seq,
                g.opened_at, g.release_requested_at,
                (SELECT count(*) FROM parked_records p WHERE p.device_id = g.device_id) AS parked
         FROM device_gaps g JOIN routing_groups rg ON rg.id = g.group_id
         WHERE g.closed_at IS NULL AND ($1::text IS NULL OR rg.name = $1)
         ORDER BY g.opened_at, g.device_id, g.epoch",
    )
    .bind(group)
    .fetch_all(pool)
    .await?)
}

/// Gives up waiting for the records stranded in `device`'s open gaps (of
/// `epoch` only, if given): the device will never send them again (it
/// died, or it keeps nothing it got a 202 for). The worker then stores its
/// parked records in order, with those seqs missing for good. A trigger
/// records a `gap_released` event per gap (also for a raw SQL release). Returns the gaps, as `(epoch, after_seq,
/// through_seq)`; `NotFound` if there is none open.
pub async fn request_release(
    pool: &PgPool,
    device: &str,
    epoch: Option<i64>,
    actor: &Actor,
) -> Result<Vec<(i64, i64, i64)>, StoreError> {
    let mut tx = pool.begin().await?;
    set_actor(&mut tx, actor).await?;
    // A trigger records the gap_released event (migrations/0015).
    let gaps: Vec<(i64, i64, i64)> = sqlx::query_as(
        "UPDATE device_gaps SET release_requested_at = now()
         WHERE device_id = $1 AND closed_at IS NULL AND release_requested_at IS NULL
           AND ($2::bigint IS NULL OR epoch = $2)
         RETURNING epoch, after_seq, through_seq",
    )
    .bind(device)
    .bind(epoch)
    .fetch_all(&mut *tx)
    .await?;
    if gaps.is_empty() {
        return Err(StoreError::NotFound {
            what: "open gap of device",
            name: device.to_owned(),
        });
    }
    tx.commit().await?;
    Ok(gaps)
}
