//! Which of a device's records are stored: ranges of seqs above a point,
//! read from `telemetry`'s primary key (device, seq) — no write on the
//! drain's path — and which epochs of its group were given up.

use sqlx::PgPool;

use crate::StoreError;

/// Most seqs one answer covers.
pub const MAX_SEQS: i64 = 10_000;

/// The stored seqs of `device` above `after` as `(first, last)` ranges, in
/// order, over at most [`MAX_SEQS`] seqs; `complete` is false when there
/// may be more beyond the last range.
pub async fn stored_ranges(
    pool: &PgPool,
    device: &str,
    after: i64,
) -> Result<(Vec<(i64, i64)>, bool), StoreError> {
    let ranges: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT min(seq), max(seq), count(*) FROM (
             SELECT seq, seq - row_number() OVER (ORDER BY seq) AS island
             FROM (SELECT seq FROM telemetry WHERE device_id = $1 AND seq > $2
                   ORDER BY seq LIMIT $3) s
         ) t
         GROUP BY island ORDER BY 1",
    )
    .bind(device)
    .bind(after)
    .bind(MAX_SEQS)
    .fetch_all(pool)
    .await?;
    let seen: i64 = ranges.iter().map(|r| r.2).sum();
    Ok((
        ranges.into_iter().map(|(a, b, _)| (a, b)).collect(),
        seen < MAX_SEQS,
    ))
}

/// Most abandoned epochs one answer lists.
pub const MAX_ABANDONED: i64 = 64;

/// The newest abandoned epochs of `device`'s group (up to
/// [`MAX_ABANDONED`]), in order: an agent sends again every record it sent
/// into one of them that is not stored (`docs/architecture.md`, "A region
/// lost for good").
pub async fn abandoned_epochs(pool: &PgPool, device: &str) -> Result<Vec<i64>, StoreError> {
    let mut epochs: Vec<i64> = sqlx::query_scalar(
        "SELECT t.epoch FROM routing_trail t JOIN devices d ON d.group_id = t.group_id
         WHERE d.id = $1 AND t.abandoned_at IS NOT NULL
         ORDER BY t.epoch DESC LIMIT $2",
    )
    .bind(device)
    .bind(MAX_ABANDONED)
    .fetch_all(pool)
    .await?;
    epochs.reverse();
    Ok(epochs)
}
