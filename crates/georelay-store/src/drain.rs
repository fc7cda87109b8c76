//! The drain worker's queries: its lease per group (with a fencing token,
//! checked inside every transaction that writes), where it is on the trail,
//! the seal barrier, storing a batch, and following the trail.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row as _, Transaction};
use std::borrow::Borrow;
use std::time::Duration;
use uuid::Uuid;

use crate::control::{set_actor, Actor};
use crate::StoreError;

/// A held lease: only writes that present it (and find it still valid) commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseToken {
    pub group_id: i64,
    pub instance: Uuid,
    pub token: i64,
}

/// Takes the group's lease if it is free, has lapsed, or names no running
/// drain process (a row written by hand, or its process's own lease lapsed:
/// the fencing token keeps a holder that was only slow from committing).
/// `None`: another worker holds it.
pub async fn acquire_lease(
    pool: &PgPool,
    group_id: i64,
    instance: Uuid,
    lease: Duration,
) -> Result<Option<LeaseToken>, StoreError> {
    let token: Option<i64> = sqlx::query_scalar(
        "INSERT INTO drain_leases (group_id, instance_id, token, lease_until)
         VALUES ($1, $2, 1, clock_timestamp() + make_interval(secs => $3))
         ON CONFLICT (group_id) DO UPDATE
             SET instance_id = EXCLUDED.instance_id, token = drain_leases.token + 1,
                 acquired_at = clock_timestamp(), lease_until = EXCLUDED.lease_until,
                 blocked_since = NULL, blocked_on = NULL
             WHERE drain_leases.lease_until < clock_timestamp()
                OR NOT EXISTS (SELECT 1 FROM instances i
                               WHERE i.id = drain_leases.instance_id AND i.role = 'drain'
                                 AND i.lease_until > clock_timestamp())
         RETURNING token",
    )
    .bind(group_id)
    .bind(instance)
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(token.map(|token| LeaseToken {
        group_id,
        instance,
        token,
    }))
}

/// Renews the lease; false if it was lost (lapsed, or taken over).
pub async fn renew_lease(
    pool: &PgPool,
    lease: &LeaseToken,
    length: Duration,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let held = check_lease(&mut tx, lease, length).await?;
    tx.commit().await?;
    Ok(held)
}

/// Inside a writing transaction: locks the lease row, checks that `lease` is
/// still the valid holder, and extends it.
pub(crate) async fn check_lease(
    tx: &mut Transaction<'_, Postgres>,
    lease: &LeaseToken,
    length: Duration,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE drain_leases SET lease_until = clock_timestamp() + make_interval(secs => $4)
         WHERE group_id = $1 AND instance_id = $2 AND token = $3 AND lease_until > clock_timestamp()",
    )
    .bind(lease.group_id)
    .bind(lease.instance)
    .bind(lease.token)
    .bind(length.as_secs_f64())
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Lets a standby take over at once (clean shutdown).
pub async fn release_lease(pool: &PgPool, lease: &LeaseToken) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE drain_leases SET lease_until = clock_timestamp() - interval '1 millisecond'
         WHERE group_id = $1 AND instance_id = $2 AND token = $3",
    )
    .bind(lease.group_id)
    .bind(lease.instance)
    .bind(lease.token)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records on the lease row that the holder cannot read the epoch it drains
/// (`Some(why)`, from when it first failed) or can again (`None`), for the
/// console and `admin status`. Nothing when the lease is no longer held.
pub async fn report_blocked(
    pool: &PgPool,
    lease: &LeaseToken,
    blocked: Option<(DateTime<Utc>, &str)>,
) -> Result<(), StoreError> {
    let (since, why) = blocked.unzip();
    sqlx::query(
        "UPDATE drain_leases SET blocked_since = $4, blocked_on = left($5, 1024)
         WHERE group_id = $1 AND instance_id = $2 AND token = $3",
    )
    .bind(lease.group_id)
    .bind(lease.instance)
    .bind(lease.token)
    .bind(since)
    .bind(why)
    .execute(pool)
    .await?;
    Ok(())
}

/// Where a group's worker stands.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Position {
    pub group_id: i64,
    pub group: String,
    pub queue: String,
    /// The senders' epoch and namespace.
    pub epoch: i64,
    pub sender_namespace_id: i64,
    /// The oldest undrained trail epoch and its namespace.
    pub drain_epoch: i64,
    pub drain_namespace_id: i64,
    /// Devices' gaps still open (records stranded in an abandoned epoch).
    pub open_gaps: i64,
    /// Some device of the group has a gap, open or released: batches are
    /// checked against them ([`Source::gaps`]).
    pub gaps: bool,
    /// Give up on an old epoch that cannot be read for this long (the
    /// group's `abandon_after_s`; `None`: never by itself).
    pub abandon_after_s: Option<f64>,
}

pub async fn position(pool: &PgPool, group_id: i64) -> Result<Option<Position>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT g.id AS group_id, g.name AS \"group\", g.queue, g.epoch, g.sender_namespace_id,
                t.epoch AS drain_epoch, t.namespace_id AS drain_namespace_id,
                (SELECT count(*) FROM device_gaps d
                 WHERE d.group_id = g.id AND d.closed_at IS NULL) AS open_gaps,
                EXISTS (SELECT 1 FROM device_gaps d
                        WHERE d.group_id = g.id
                          AND (d.closed_at IS NULL OR d.closed_how = 'released')) AS gaps,
                g.abandon_after_s
         FROM routing_groups g
         JOIN LATERAL (SELECT epoch, namespace_id FROM routing_trail
                       WHERE group_id = g.id AND drained_at IS NULL
                       ORDER BY epoch LIMIT 1) t ON true
         WHERE g.id = $1",
    )
    .bind(group_id)
    .fetch_optional(pool)
    .await?)
}

/// Whether `epoch` of the group is drained (or given up).
pub async fn epoch_drained(pool: &PgPool, group_id: i64, epoch: i64) -> Result<bool, StoreError> {
    let drained: Option<bool> = sqlx::query_scalar(
        "SELECT drained_at IS NOT NULL FROM routing_trail WHERE group_id = $1 AND epoch = $2",
    )
    .bind(group_id)
    .bind(epoch)
    .fetch_optional(pool)
    .await?;
    Ok(drained.unwrap_or(false))
}

/// The namespace the group's trail puts `epoch` on; `None` if the trail
/// has no such epoch. Ingest publishes under an epoch only after its trail
/// row committed, so for a message already received the answer is final.
pub async fn epoch_namespace(
    pool: &PgPool,
    group_id: i64,
    epoch: i64,
) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT namespace_id FROM routing_trail WHERE group_id = $1 AND epoch = $2",
    )
    .bind(group_id)
    .bind(epoch)
    .fetch_optional(pool)
    .await?)
}

/// The seal barrier (docs/DESIGN.md "Worker", step 3): epoch `epoch` of the group
/// is sealed when the senders are past it, `grace` has passed since they
/// moved on, and no ingest instance that may still be publishing (lease not
/// lapsed by more than `publish_deadline`) acknowledges `epoch` or older — an
/// instance with no acknowledgement for the group counts as older; a row
/// whose lease runs more than an hour past its heartbeat is no ingest
/// process (their `--lease` is at most 1 h) and does not hold it. When
/// sealed, `sealed_at` is set (once).
pub async fn seal_if_ready(
    pool: &PgPool,
    group_id: i64,
    epoch: i64,
    grace: Duration,
    publish_deadline: Duration,
) -> Result<Seal, StoreError> {
    let state: Option<(bool, bool, i64)> = sqlx::query_as(
        "SELECT g.epoch > $2,
                now() >= (SELECT opened_at FROM routing_trail WHERE group_id = $1 AND epoch = $2 + 1)
                         + make_interval(secs => $3),
                (SELECT count(*) FROM instances i
                 LEFT JOIN instance_epochs e ON e.instance_id = i.id AND e.group_id = $1
                 WHERE i.role = 'ingest'
                   AND i.lease_until + make_interval(secs => $4) > now()
                   -- no ingest process holds a lease over an hour (--lease
                   -- is at most 1h): a row that does was written by hand
                   AND i.lease_until <= i.heartbeat_at + interval '1 hour 1 minute'
                   AND coalesce(e.epoch, 0) <= $2)
         FROM routing_groups g WHERE g.id = $1",
    )
    .bind(group_id)
    .bind(epoch)
    .bind(grace.as_secs_f64())
    .bind(publish_deadline.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    let (moved_on, past_grace, holders) = state.unwrap_or((false, false, 0));
    let seal = Seal {
        sealed: moved_on && past_grace && holders == 0,
        held_by_ingest: if moved_on && past_grace { holders } else { 0 },
    };
    if seal.sealed {
        sqlx::query(
            "UPDATE routing_trail SET sealed_at = now()
             WHERE group_id = $1 AND epoch = $2 AND sealed_at IS NULL",
        )
        .bind(group_id)
        .bind(epoch)
        .execute(pool)
        .await?;
    }
    Ok(seal)
}

/// What [`seal_if_ready`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub sealed: bool,
    /// Ingest instances still acknowledging the epoch (or older) after the
    /// grace has passed: they alone hold the seal (a stuck instance, or one
    /// whose database connection fails).
    pub held_by_ingest: i64,
}

/// Sets `devices.last_seen_at` forward to `seen` (device, when its newest
/// stored record was received), one statement for many devices.
pub async fn mark_seen(pool: &PgPool, seen: &[(String, DateTime<Utc>)]) -> Result<(), StoreError> {
    let (devices, at): (Vec<&str>, Vec<DateTime<Utc>>) =
        seen.iter().map(|(d, t)| (d.as_str(), *t)).unzip();
    sqlx::query(
        "UPDATE devices SET last_seen_at = u.r
         FROM unnest($1::text[], $2::timestamptz[]) AS u(d, r)
         WHERE devices.id = u.d AND (devices.last_seen_at IS NULL OR devices.last_seen_at < u.r)",
    )
    .bind(&devices)
    .bind(&at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Per group: enabled devices that were seen (a record of theirs stored)
/// but not within `silent_after`. Every group is listed, with 0 if none.
pub async fn silent_devices(
    pool: &PgPool,
    silent_after: Duration,
) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT g.name, count(d.id) FROM routing_groups g
         LEFT JOIN devices d ON d.group_id = g.id AND d.enabled
              AND d.last_seen_at < now() - make_interval(secs => $1)
         GROUP BY g.name ORDER BY g.name",
    )
    .bind(silent_after.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Whether `epoch` of the group is known never to have been published to:
/// its publishes are recorded (it opened after they were), no ingest
/// instance recorded one, and no ingest process that does not record them
/// (an older version) held a lease since it opened. Such an epoch, once
/// sealed, is drained without reading its queue (which may be unreachable:
/// a mistyped endpoint).
pub async fn never_published(pool: &PgPool, group_id: i64, epoch: i64) -> Result<bool, StoreError> {
    let never: Option<bool> = sqlx::query_scalar(
        "SELECT t.publishes_recorded
                AND NOT EXISTS (SELECT 1 FROM epoch_publishes p
                                WHERE p.group_id = t.group_id AND p.epoch = t.epoch)
                AND NOT EXISTS (SELECT 1 FROM instances i
                                WHERE i.role = 'ingest' AND NOT i.records_publishes
                                  AND i.lease_until >= t.opened_at)
         FROM routing_trail t WHERE t.group_id = $1 AND t.epoch = $2",
    )
    .bind(group_id)
    .bind(epoch)
    .fetch_optional(pool)
    .await?;
    Ok(never.unwrap_or(false))
}

/// One decrypted record to store.
#[derive(Debug, Clone)]
pub struct Row {
    pub device_id: String,
    pub seq: i64,
    /// The epoch it was published under (from its envelope)
    pub epoch: i64,
    /// The JSON object, as text
    pub payload: String,
    pub received_at: DateTime<Utc>,
    /// The queue message, still sealed: kept as a dead letter if the seq
    /// turns out to be taken by a different payload (the delivery's own
    /// bytes, not a copy).
    pub raw: Bytes,
}

/// Why a queue message can never be stored: the `dead_letters.reason`
/// column, whose CHECK lists exactly these (a test compares the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Not an envelope this version can read.
    Undecodable,
    /// The device is not in `devices`.
    UnknownDevice,
    /// The record does not authenticate under the device's key.
    BadTag,
    /// It opens, but the plaintext is not a JSON object.
    NotJsonObject,
    /// The device reused a seq (and so a nonce) for a different payload.
    SeqConflict,
    /// The envelope names an epoch the trail does not put on the namespace
    /// it was read from: no ingest instance could have published it there.
    WrongEpoch,
    /// The device's sealed key does not open (tampered, or sealed under
    /// another master key).
    KeyUnopenable,
    /// PostgreSQL refused this one record; the rest of its batch is stored.
    RefusedByDatabase,
    /// The broker message itself could not be read as usual (NATS headers
    /// the client cannot parse).
    Unreadable,
    /// Read from the broker's own dead-letter sub-queue (Service Bus); the
    /// detail names the broker's reason.
    BrokerDeadLettered,
    /// Its seq is in a gap an SRE released (given up) and it came back
    /// after all: newer records of the device are stored.
    GapReleased,
}

impl DeadLetterReason {
    pub const ALL: [Self; 11] = [
        Self::Undecodable,
        Self::UnknownDevice,
        Self::BadTag,
        Self::NotJsonObject,
        Self::SeqConflict,
        Self::WrongEpoch,
        Self::KeyUnopenable,
        Self::RefusedByDatabase,
        Self::Unreadable,
        Self::BrokerDeadLettered,
        Self::GapReleased,
    ];

    /// The reason stored as `s`, if there is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The value stored in `dead_letters.reason` (and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undecodable => "undecodable",
            Self::UnknownDevice => "unknown_device",
            Self::BadTag => "bad_tag",
            Self::NotJsonObject => "not_json_object",
            Self::SeqConflict => "seq_conflict",
            Self::WrongEpoch => "wrong_epoch",
            Self::KeyUnopenable => "key_unopenable",
            Self::RefusedByDatabase => "refused_by_database",
            Self::Unreadable => "unreadable",
            Self::BrokerDeadLettered => "broker_dead_lettered",
            Self::GapReleased => "gap_released",
        }
    }
}

/// A record that can never be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub device_id: Option<String>,
    pub seq: Option<i64>,
    pub reason: DeadLetterReason,
    pub detail: String,
    pub raw: Bytes,
}

/// What storing a batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub inserted: u64,
    /// Rows held back in `parked_records`: their device waits for records
    /// stranded in an abandoned epoch ([`crate::gaps::release_gaps`]).
    pub parked: u64,
    pub duplicates: u64,
    /// `(device_id, seq)` of duplicates whose payload differs from the
    /// stored one (a reused seq), dead-lettered as `seq_conflict`.
    pub conflicts: Vec<(String, i64)>,
    /// Rows PostgreSQL refused one by one, dead-lettered as
    /// `refused_by_database` (the rest of the batch was stored).
    pub refused: Vec<DeadLetter>,
    /// `(device_id, seq)` of rows in a gap an SRE released, not stored:
    /// dead-lettered as `gap_released` (storing them would reorder).
    pub late: Vec<(String, i64)>,
}

/// Where a batch was read, and whether it must be checked against gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The namespace it was read from.
    pub namespace_id: i64,
    /// The epoch being drained (dead letters are filed under it).
    pub epoch: i64,
    /// Devices of the group have gaps, open or released
    /// ([`Position::gaps`]): rows are checked against them (parked, or
    /// kept as `gap_released`). Without, the insert is the plain one.
    pub gaps: bool,
}

/// Stores `rows` (in order: `store_order` follows it), received from
/// `source.namespace_id`, and `dead` (received while draining `source.epoch`), checking the
/// lease in the same transaction. `Ok(None)`: the lease is lost, nothing was
/// written. Rows already stored are skipped (`ON CONFLICT DO NOTHING` on
/// `(device_id, seq)`); a skipped row whose payload differs from the stored
/// one is kept as a `seq_conflict` dead letter.
///
/// The common batch (rows, no dead letters, nothing stored before) is one
/// statement and one round trip: the lease check and the insert together.
///
/// **One bad row never holds up a batch.** When PostgreSQL refuses the
/// batch's values ([`StoreError::refused_the_data`]: a value it cannot store
/// that got past every check before it), the batch is stored again row by
/// row, each under a savepoint, in the same order: a row it refuses becomes
/// a `refused_by_database` dead letter with PostgreSQL's message, and the rest
/// is stored. Any other error (an outage) is returned: retry the batch.
pub async fn store_batch(
    pool: &PgPool,
    lease: &LeaseToken,
    lease_length: Duration,
    source: Source,
    rows: &[Row],
    dead: &[DeadLetter],
) -> Result<Option<Stored>, StoreError> {
    match store_together(pool, lease, lease_length, source, rows, dead).await {
        Err(e) if e.refused_the_data() => {
            store_one_by_one(pool, lease, lease_length, source, rows, dead).await
        }
        other => other,
    }
}

async fn store_together(
    pool: &PgPool,
    lease: &LeaseToken,
    lease_length: Duration,
    source: Source,
    rows: &[Row],
    dead: &[DeadLetter],
) -> Result<Option<Stored>, StoreError> {
    if dead.is_empty() && !rows.is_empty() {
        let Some(inserted) = insert_rows(pool, lease, lease_length, source, rows).await? else {
            return Ok(None);
        };
        if inserted.inserted + inserted.parked == rows.len() as u64 {
            return Ok(Some(Stored::new(
                rows.len(),
                inserted,
                Vec::new(),
                Vec::new(),
                Vec::new(),
            )));
        }
        // Committed already; the duplicates are looked at under the lease.
        // Lost in between: not acked, so the next holder reads them again
        // and looks.
        let mut tx = pool.begin().await?;
        if !check_lease(&mut tx, lease, lease_length).await? {
            return Ok(None);
        }
        let done = Done {
            lease,
            source,
            batch: rows,
            inserted,
        };
        return done.commit(tx, rows, &[], Vec::new()).await.map(Some);
    }
    let mut tx = pool.begin().await?;
    let inserted = if rows.is_empty() {
        if !check_lease(&mut tx, lease, lease_length).await? {
            return Ok(None);
        }
        Inserted::default()
    } else {
        match insert_rows(&mut *tx, lease, lease_length, source, rows).await? {
            Some(inserted) => inserted,
            None => return Ok(None),
        }
    };
    let done = Done {
        lease,
        source,
        batch: rows,
        inserted,
    };
    done.commit(tx, rows, dead, Vec::new()).await.map(Some)
}

/// [`store_batch`] for a batch PostgreSQL refused: one savepoint per row.
async fn store_one_by_one(
    pool: &PgPool,
    lease: &LeaseToken,
    lease_length: Duration,
    source: Source,
    rows: &[Row],
    dead: &[DeadLetter],
) -> Result<Option<Stored>, StoreError> {
    let mut tx = pool.begin().await?;
    if !check_lease(&mut tx, lease, lease_length).await? {
        return Ok(None);
    }
    let mut inserted = Inserted::default();
    let mut taken = Vec::with_capacity(rows.len());
    let mut refused = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        sqlx::query("SAVEPOINT one_row").execute(&mut *tx).await?;
        let one = std::slice::from_ref(row);
        match insert_rows(&mut *tx, lease, lease_length, source, one).await {
            Ok(Some(n)) => {
                inserted.inserted += n.inserted;
                inserted.parked += n.parked;
                if !n.late.is_empty() {
                    inserted.late.push(i);
                }
                taken.push(row);
                sqlx::query("RELEASE SAVEPOINT one_row")
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(None) => return Ok(None),
            Err(e) if e.refused_the_data() => {
                sqlx::query("ROLLBACK TO SAVEPOINT one_row")
                    .execute(&mut *tx)
                    .await?;
                refused.push(DeadLetter {
                    message_id: None,
                    device_id: Some(row.device_id.clone()),
                    seq: Some(row.seq),
                    reason: DeadLetterReason::RefusedByDatabase,
                    detail: format!("PostgreSQL refused the record: {e}"),
                    raw: row.raw.clone(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    let done = Done {
        lease,
        source,
        batch: rows,
        inserted,
    };
    done.commit(tx, &taken, dead, refused).await.map(Some)
}

/// The end of every storing transaction, once the rows are in.
struct Done<'a> {
    lease: &'a LeaseToken,
    source: Source,
    /// The batch's rows (`inserted.late` indexes them).
    batch: &'a [Row],
    /// Rows inserted and parked (the rest were there already, or refused).
    inserted: Inserted,
}

impl Done<'_> {
    /// Records which of `taken` (rows of the batch the database took,
    /// inserted or there already) conflict with what was stored, keeps the
    /// late ones (in a released gap) not stored as dead letters, inserts
    /// the dead letters and `refused`, and commits.
    async fn commit<R: Borrow<Row>>(
        self,
        mut tx: Transaction<'_, Postgres>,
        taken: &[R],
        dead: &[DeadLetter],
        refused: Vec<DeadLetter>,
    ) -> Result<Stored, StoreError> {
        let mut conflicts = Vec::new();
        if self.inserted.inserted + self.inserted.parked < taken.len() as u64 {
            conflicts =
                keep_aside(&mut tx, self.lease, self.source, taken, Aside::Conflict).await?;
        }
        let late: Vec<&Row> = self
            .inserted
            .late
            .iter()
            .filter_map(|&i| self.batch.get(i))
            .collect();
        let mut kept_late = Vec::new();
        if !late.is_empty() {
            kept_late = keep_aside(&mut tx, self.lease, self.source, &late, Aside::Late).await?;
        }
        for letters in [dead, &refused] {
            insert_dead_letters(&mut tx, self.lease, self.source, letters).await?;
        }
        tx.commit().await?;
        Ok(Stored::new(
            self.batch.len(),
            self.inserted,
            conflicts,
            refused,
            kept_late,
        ))
    }
}

async fn insert_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    lease: &LeaseToken,
    source: Source,
    dead: &[DeadLetter],
) -> Result<(), StoreError> {
    for d in dead {
        sqlx::query(
            "INSERT INTO dead_letters (group_id, namespace_id, epoch, message_id, device_id, seq, reason, detail, raw)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(lease.group_id)
        .bind(source.namespace_id)
        .bind(source.epoch)
        .bind(&d.message_id)
        .bind(&d.device_id)
        .bind(d.seq)
        .bind(d.reason.as_str())
        .bind(&d.detail)
        .bind(d.raw.as_ref())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl Stored {
    /// What a batch of `rows` did: the rows neither inserted, parked,
    /// conflicting, refused nor late are duplicates.
    fn new(
        rows: usize,
        inserted: Inserted,
        conflicts: Vec<(String, i64)>,
        refused: Vec<DeadLetter>,
        late: Vec<(String, i64)>,
    ) -> Self {
        let Inserted {
            inserted, parked, ..
        } = inserted;
        let set_aside = conflicts.len() + refused.len() + late.len();
        Self {
            inserted,
            parked,
            duplicates: (rows as u64).saturating_sub(inserted + parked + set_aside as u64),
            conflicts,
            refused,
            late,
        }
    }
}

/// The lease CTE both inserts start with: it extends the lease row
/// (locking it) and carries the worker's progress for the console.
macro_rules! lease_cte {
    () => {
        "WITH lease AS (
             UPDATE drain_leases SET lease_until = clock_timestamp() + make_interval(secs => $10),
                    stored_total = stored_total + cardinality($1::text[]),
                    last_batch_at = clock_timestamp(),
                    last_batch_lag = extract(epoch FROM clock_timestamp() - $11::timestamptz)
             WHERE group_id = $7 AND instance_id = $8 AND token = $9 AND lease_until > clock_timestamp()
             RETURNING 1
         )"
    };
}

/// The insert of a group none of whose devices has a gap: the rows go to
/// `telemetry` in order.
const INSERT: &str = concat!(
    lease_cte!(),
    ", stored AS (
         INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
         SELECT d, s, p::jsonb, r, $5, e
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::timestamptz[], $6::bigint[])
              WITH ORDINALITY AS u(d, s, p, r, e, n)
         WHERE EXISTS (SELECT 1 FROM lease)
         ORDER BY n
         ON CONFLICT (device_id, seq) DO NOTHING
         RETURNING 1
     )
     SELECT EXISTS (SELECT 1 FROM lease), (SELECT count(*) FROM stored), 0::bigint, '{}'::bigint[]"
);

/// The insert of a group with gaps: a row above an open gap of its device
/// is parked, one in a released gap is not stored (its index returned).
const INSERT_CHECKING_GAPS: &str = concat!(
    lease_cte!(),
    ", gaps AS (
             -- Devices waiting for records stranded in an abandoned epoch:
             -- what is newer than a gap waits in parked_records.
             SELECT device_id, min(through_seq) AS through FROM device_gaps
             WHERE group_id = $7 AND closed_at IS NULL AND EXISTS (SELECT 1 FROM lease)
             GROUP BY device_id
         ), released AS (
             -- Seqs an SRE gave up: one that comes back is not stored.
             SELECT device_id, after_seq, through_seq FROM device_gaps
             WHERE group_id = $7 AND closed_how = 'released' AND EXISTS (SELECT 1 FROM lease)
         ), input AS (
             SELECT u.d, u.s, u.p, u.r, u.e, u.n, coalesce(u.s > g.through, false) AS held,
                    EXISTS (SELECT 1 FROM released x
                            WHERE x.device_id = u.d AND u.s > x.after_seq AND u.s <= x.through_seq) AS late
             FROM unnest($1::text[], $2::bigint[], $3::text[], $4::timestamptz[], $6::bigint[])
                  WITH ORDINALITY AS u(d, s, p, r, e, n)
             LEFT JOIN gaps g ON g.device_id = u.d
             WHERE EXISTS (SELECT 1 FROM lease)
         ), parked AS (
             INSERT INTO parked_records (device_id, seq, group_id, payload, received_at, namespace_id, epoch)
             SELECT d, s, $7, p::jsonb, r, $5, e FROM input WHERE held AND NOT late
             ON CONFLICT (device_id, seq) DO NOTHING
             RETURNING 1
         ), stored AS (
             INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
             SELECT d, s, p::jsonb, r, $5, e FROM input WHERE NOT held AND NOT late
             ORDER BY n
             ON CONFLICT (device_id, seq) DO NOTHING
             RETURNING 1
         )
         SELECT EXISTS (SELECT 1 FROM lease), (SELECT count(*) FROM stored),
                (SELECT count(*) FROM parked),
                coalesce((SELECT array_agg(n - 1) FROM input WHERE late), '{}')"
);

/// Extends the lease and inserts `rows` in one statement; the rows go in
/// only if the lease is still held (its row is locked by the same
/// statement, so no one can take it over in between). `None`: lost.
///
/// A row of a device with an open gap (records stranded in an abandoned
/// epoch, not stored yet) whose seq is above the gap goes to
/// `parked_records` instead: `gaps::release_gaps` stores it once the gap
/// closes. Rows in the gap (sent again) are stored as usual. A row in a
/// gap an SRE released is not stored (`late`: the caller keeps it as a
/// dead letter unless it is a duplicate).
async fn insert_rows<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    lease: &LeaseToken,
    lease_length: Duration,
    source: Source,
    rows: &[Row],
) -> Result<Option<Inserted>, StoreError> {
    let devices: Vec<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
    let received: Vec<DateTime<Utc>> = rows.iter().map(|r| r.received_at).collect();
    let epochs: Vec<i64> = rows.iter().map(|r| r.epoch).collect();
    // A data-modifying WITH runs once and to completion; the insert reads
    // its result, so it runs after the lease row is locked and extended.
    let newest = received.iter().max().copied();
    // The lease row also carries the worker's progress for the console:
    // same row, same statement.
    let sql = if source.gaps {
        INSERT_CHECKING_GAPS
    } else {
        INSERT
    };
    let (leased, inserted, held, late): (bool, i64, i64, Vec<i64>) = sqlx::query_as(sql)
        .bind(&devices)
        .bind(&seqs)
        .bind(&payloads)
        .bind(&received)
        .bind(source.namespace_id)
        .bind(&epochs)
        .bind(lease.group_id)
        .bind(lease.instance)
        .bind(lease.token)
        .bind(lease_length.as_secs_f64())
        .bind(newest)
        .fetch_one(exec)
        .await?;
    Ok(leased.then_some(Inserted {
        inserted: inserted as u64,
        parked: held as u64,
        late: late.into_iter().map(|i| i as usize).collect(),
    }))
}

/// What one insert did with its rows.
#[derive(Debug, Clone, Default)]
struct Inserted {
    /// New rows in `telemetry`.
    inserted: u64,
    /// Rows newly held back in `parked_records` (their device waits for a
    /// gap); one parked already is a duplicate, or a conflict.
    parked: u64,
    /// Indexes of rows in a gap an SRE released: not stored.
    late: Vec<usize>,
}

/// Rows the database took but that are kept aside as dead letters, sealed.
#[derive(Debug, Clone, Copy)]
enum Aside {
    /// A duplicate is normally a redelivery (same payload). A different
    /// payload under a stored or parked `(device_id, seq)` means the device
    /// reused a seq: the newcomer is a `seq_conflict`.
    Conflict,
    /// A row in a gap an SRE released, not stored: the device's newer
    /// records are, so storing it would reorder (`gap_released`).
    Late,
}

impl Aside {
    fn reason(self) -> DeadLetterReason {
        match self {
            Self::Conflict => DeadLetterReason::SeqConflict,
            Self::Late => DeadLetterReason::GapReleased,
        }
    }

    /// The detail, and which of the rows (`u(d, s, p, w)`) it takes.
    fn sql(self) -> (&'static str, &'static str) {
        match self {
            Self::Conflict => (
                "seq already stored (or parked, waiting for a gap) with a different payload: the device reused a seq (and a nonce); re-key it",
                "EXISTS (SELECT 1 FROM telemetry t
                         WHERE t.device_id = u.d AND t.seq = u.s AND t.payload <> u.p::jsonb)
                 OR EXISTS (SELECT 1 FROM parked_records p
                            WHERE p.device_id = u.d AND p.seq = u.s AND p.payload <> u.p::jsonb)",
            ),
            Self::Late => (
                "its seq is in a gap an SRE released (georelay admin device release-gap), and newer records of the device are stored: storing it now would reorder them",
                "NOT EXISTS (SELECT 1 FROM telemetry t WHERE t.device_id = u.d AND t.seq = u.s)",
            ),
        }
    }
}

/// Keeps those of `rows` that are `aside` as dead letters; returns
/// `(device_id, seq)` of each.
async fn keep_aside<R: Borrow<Row>>(
    tx: &mut Transaction<'_, Postgres>,
    lease: &LeaseToken,
    source: Source,
    rows: &[R],
    aside: Aside,
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = rows.iter().map(Borrow::borrow);
    let devices: Vec<&str> = rows.clone().map(|r| r.device_id.as_str()).collect();
    let seqs: Vec<i64> = rows.clone().map(|r| r.seq).collect();
    let payloads: Vec<&str> = rows.clone().map(|r| r.payload.as_str()).collect();
    let raws: Vec<&[u8]> = rows.map(|r| r.raw.as_ref()).collect();
    let (detail, which) = aside.sql();
    let sql = format!(
        "INSERT INTO dead_letters (group_id, namespace_id, epoch, message_id, device_id, seq, reason, detail, raw)
         SELECT $5, $6, $7, u.d || '/' || u.s, u.d, u.s, $8, $9, u.w
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[]) AS u(d, s, p, w)
         WHERE {which}
         RETURNING device_id, seq"
    );
    Ok(sqlx::query(&sql)
        .bind(&devices)
        .bind(&seqs)
        .bind(&payloads)
        .bind(&raws)
        .bind(lease.group_id)
        .bind(source.namespace_id)
        .bind(source.epoch)
        .bind(aside.reason().as_str())
        .bind(detail)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Marks `epoch` drained and moves the worker to the next epoch's namespace,
/// with a `drain_followed` audit event, in one transaction that checks the
/// lease. Returns the next epoch's namespace, or `None` if the lease is lost.
pub async fn follow_trail(
    pool: &PgPool,
    lease: &LeaseToken,
    lease_length: Duration,
    epoch: i64,
    actor: &Actor,
) -> Result<Option<i64>, StoreError> {
    let mut tx = pool.begin().await?;
    if !check_lease(&mut tx, lease, lease_length).await? {
        return Ok(None);
    }
    set_actor(&mut tx, actor).await?;
    let group_id = lease.group_id;
    let from: i64 = sqlx::query_scalar(
        "UPDATE routing_trail SET sealed_at = coalesce(sealed_at, now()), drained_at = now()
         WHERE group_id = $1 AND epoch = $2 AND drained_at IS NULL RETURNING namespace_id",
    )
    .bind(group_id)
    .bind(epoch)
    .fetch_one(&mut *tx)
    .await?;
    let to: i64 = sqlx::query_scalar(
        "SELECT namespace_id FROM routing_trail WHERE group_id = $1 AND epoch = $2",
    )
    .bind(group_id)
    .bind(epoch + 1)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE routing_groups SET drain_namespace_id = $2 WHERE id = $1")
        .bind(group_id)
        .bind(to)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO failover_events (group_id, kind, from_namespace_id, to_namespace_id, epoch, actor, reason)
         VALUES ($1, 'drain_followed', $2, $3, $4, georelay_actor(), georelay_reason())",
    )
    .bind(group_id)
    .bind(from)
    .bind(to)
    .bind(epoch + 1)
    .execute(&mut *tx)
    .await?;
    // What ingest acknowledged in drained epochs is stored (or given up):
    // nothing reads those rows any more.
    sqlx::query("DELETE FROM device_acks WHERE group_id = $1 AND epoch <= $2")
        .bind(group_id)
        .bind(epoch)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(to))
}

/// Namespaces the group's trail has drained and no undrained epoch uses:
/// where leftovers (publishes that timed out but landed) may turn up.
pub async fn drained_namespaces(pool: &PgPool, group_id: i64) -> Result<Vec<i64>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT namespace_id FROM routing_trail
         WHERE group_id = $1 AND drained_at IS NOT NULL
           AND namespace_id NOT IN (SELECT namespace_id FROM routing_trail
                                    WHERE group_id = $1 AND drained_at IS NULL)",
    )
    .bind(group_id)
    .fetch_all(pool)
    .await?)
}
