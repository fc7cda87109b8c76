//! Reading and replaying `dead_letters` (`georelay admin dead-letters`).
//! Nothing here reveals a device key: `show` decodes the envelope's own
//! fields, never the sealed record.

use chrono::{DateTime, Utc};
use georelay_core::{Envelope, MasterKey};
use sqlx::PgPool;

use crate::drain::DeadLetterReason;
use crate::routing::device_auth;
use crate::StoreError;

/// One dead letter, as listed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Letter {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub group: Option<String>,
    pub namespace: Option<String>,
    pub epoch: Option<i64>,
    pub message_id: Option<String>,
    pub device_id: Option<String>,
    pub seq: Option<i64>,
    pub reason: String,
    pub detail: Option<String>,
    pub raw: Vec<u8>,
}

/// Which dead letters.
#[derive(Debug, Clone, Default)]
pub struct Filter<'a> {
    pub id: Option<i64>,
    pub group: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub since: Option<DateTime<Utc>>,
    pub limit: i64,
}

/// Dead letters matching `filter`, newest first.
pub async fn list(pool: &PgPool, filter: &Filter<'_>) -> Result<Vec<Letter>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT d.id, d.at, g.name AS \"group\", n.name AS namespace, d.epoch, d.message_id,
                d.device_id, d.seq, d.reason, d.detail, d.raw
         FROM dead_letters d
         LEFT JOIN routing_groups g ON g.id = d.group_id
         LEFT JOIN namespaces n ON n.id = d.namespace_id
         WHERE ($1::bigint IS NULL OR d.id = $1)
           AND ($2::text IS NULL OR g.name = $2)
           AND ($3::text IS NULL OR d.reason = $3)
           AND ($4::timestamptz IS NULL OR d.at >= $4)
         ORDER BY d.id DESC LIMIT $5",
    )
    .bind(filter.id)
    .bind(filter.group)
    .bind(filter.reason)
    .bind(filter.since)
    .bind(filter.limit)
    .fetch_all(pool)
    .await?)
}

/// Dead letters of one reason: how many, how many in the last day, the newest.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ByReason {
    pub reason: String,
    pub total: i64,
    pub last_day: i64,
    pub newest: DateTime<Utc>,
}

/// Dead letters counted by reason, the most recent reason first.
pub async fn by_reason(pool: &PgPool) -> Result<Vec<ByReason>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT reason, count(*) AS total,
                count(*) FILTER (WHERE at > now() - interval '1 day') AS last_day,
                max(at) AS newest
         FROM dead_letters GROUP BY reason ORDER BY max(at) DESC",
    )
    .fetch_all(pool)
    .await?)
}

/// What replaying one dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Opened under the device's key and stored (or already stored).
    Stored,
    /// Still cannot be stored: kept, with this reason now.
    Kept {
        reason: DeadLetterReason,
        why: String,
    },
}

/// Replays one dead letter: re-verified under the device's key as it is now
/// (an `unknown_device` record once the device is registered). Stored only
/// if nothing later of that device is stored yet (in order), checked and
/// stored under the lock the drain worker stores the group's records under;
/// otherwise, or if it still does not open, kept with the reason it has now.
pub async fn replay(
    pool: &PgPool,
    master: &MasterKey,
    letter: &Letter,
) -> Result<Replayed, StoreError> {
    let kept = |reason: DeadLetterReason, why: String| async move {
        sqlx::query("UPDATE dead_letters SET reason = $2, detail = $3 WHERE id = $1")
            .bind(letter.id)
            .bind(reason.as_str())
            .bind(&why)
            .execute(pool)
            .await?;
        Ok::<_, StoreError>(Replayed::Kept { reason, why })
    };
    if letter.namespace.is_none() {
        let why = "no namespace recorded: it was not received from a queue".to_owned();
        let reason =
            DeadLetterReason::parse(&letter.reason).unwrap_or(DeadLetterReason::Undecodable);
        return kept(reason, why).await;
    }
    let envelope = match Envelope::decode(&letter.raw) {
        Ok(e) => e,
        Err(e) => return kept(DeadLetterReason::Undecodable, e.to_string()).await,
    };
    let device = envelope.device.to_string();
    let auth = match device_auth(pool, master, &device).await {
        Ok(Some(auth)) => auth,
        Ok(None) => return kept(DeadLetterReason::UnknownDevice, "no such device".into()).await,
        Err(StoreError::Secret(e)) => {
            return kept(DeadLetterReason::KeyUnopenable, e.to_string()).await
        }
        Err(e) => return Err(e),
    };
    let payload = match envelope.record.open_object(&auth.key, &envelope.device) {
        Ok(p) => p,
        Err(georelay_core::RecordError::Authentication) => {
            return kept(
                DeadLetterReason::BadTag,
                "record does not authenticate".into(),
            )
            .await
        }
        Err(e) => return kept(DeadLetterReason::NotJsonObject, e.to_string()).await,
    };
    let seq = i64::try_from(envelope.record.seq).unwrap_or(i64::MAX);
    let received_at =
        DateTime::from_timestamp_micros(envelope.received_at_micros).unwrap_or_else(Utc::now);
    let mut tx = pool.begin().await?;
    // The worker stores a group's records only while it holds this row
    // locked: with it locked here, no later record of the device can be
    // committed between the check below and the insert (which would put
    // the replayed record after it).
    sqlx::query(
        "SELECT 1 FROM drain_leases
         WHERE group_id = (SELECT group_id FROM devices WHERE id = $1) FOR UPDATE",
    )
    .bind(&device)
    .fetch_optional(&mut *tx)
    .await?;
    let later: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM telemetry WHERE device_id = $1 AND seq > $2)",
    )
    .bind(&device)
    .bind(seq)
    .fetch_one(&mut *tx)
    .await?;
    if later {
        drop(tx);
        return kept(
            DeadLetterReason::parse(&letter.reason).unwrap_or(DeadLetterReason::Undecodable),
            format!("opens now, but not replayed: {device} has later records stored, and storing seq {seq} now would put it out of order"),
        )
        .await;
    }
    let stored = sqlx::query(
        "INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
         SELECT $1, $2, $3::jsonb, $4, d.namespace_id, coalesce(d.epoch, $5)
         FROM dead_letters d WHERE d.id = $6 AND d.namespace_id IS NOT NULL
         ON CONFLICT (device_id, seq) DO NOTHING",
    )
    .bind(&device)
    .bind(seq)
    .bind(&payload)
    .bind(received_at)
    .bind(i64::try_from(envelope.epoch).unwrap_or(i64::MAX))
    .bind(letter.id)
    .execute(&mut *tx)
    .await;
    if let Err(e) = stored {
        drop(tx);
        let e = StoreError::from(e);
        if e.refused_the_data() {
            return kept(DeadLetterReason::RefusedByDatabase, e.to_string()).await;
        }
        return Err(e);
    }
    sqlx::query("DELETE FROM dead_letters WHERE id = $1")
        .bind(letter.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Replayed::Stored)
}
