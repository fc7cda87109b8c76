//! The durable offline buffer: one SQLite database per device, in the
//! agent's state directory.
//!
//! - **A seq is never reused.** Taking the next seq, sealing the reading with
//!   the nonce derived from it, storing the sealed record and advancing the
//!   counter happen in one SQLite transaction. A crash before the commit
//!   leaves neither the record nor the counter: that sealed record never left
//!   the process, so no two ciphertexts under one nonce can ever be seen.
//!   After the commit the seq is spent for good. Nothing is ever sealed twice.
//! - **Nonce** = 4 zero bytes ‖ seq (big-endian u64): unique per seq, and seq
//!   is unique per device key. (A device whose state directory is lost must
//!   be given a new key: `georelay admin device add` a new id.)
//! - **Encrypted at rest**: the buffer holds only sealed records.
//! - **Crash-safe**: WAL journal; `synchronous=FULL` for a plug computer
//!   (power cuts), `NORMAL` for simulated devices (process crashes only).
//! - **Full**: at `max_records` the buffer takes no new readings
//!   ([`BufferError::Full`]); the input waits (stdin is not read, dropped
//!   files stay in the folder) until sending frees room. Nothing sealed is
//!   ever dropped to make room.
//! - **Kept until stored**: a 202 marks a record sent (with the epoch it was
//!   queued under); it is deleted only when the server's progress answer
//!   says it is stored. One sent into an epoch given up (a region lost for
//!   good) is sent again. Sent records count against `max_records` too.
//! - Records the server proved bad (see `sender`) move to a `rejected` table
//!   with the answer, so they never block the records behind them; they stay
//!   there, sealed, until [`requeue`] puts them back in the outbox.

use georelay_core::{DeviceId, DeviceKey, RecordError, SealedRecord, NONCE_LEN};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("the offline buffer is full ({0} records)")]
    Full(u64),
    #[error("reading is not a JSON object")]
    NotAnObject,
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("offline buffer: {0}")]
    Db(#[from] sqlx::Error),
}

/// Where a device's buffer lives in a state directory.
pub fn path(state_dir: &Path, device: &DeviceId) -> std::path::PathBuf {
    state_dir.join(format!("{device}.db"))
}

/// The file extension of [`path`].
pub const EXTENSION: &str = "db";

/// The nonce for `seq`: 4 zero bytes, then seq big-endian.
pub fn nonce_for(seq: u64) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[4..].copy_from_slice(&seq.to_be_bytes());
    nonce
}

#[derive(Debug, Clone)]
pub struct Buffer {
    pool: SqlitePool,
    device: DeviceId,
    key: DeviceKey,
    max_records: u64,
}

impl Buffer {
    /// Opens (creating if needed) the buffer at `path`. `power_safe`: fsync
    /// every commit (a real plug computer); otherwise survive process crashes.
    pub async fn open(
        path: &Path,
        device: DeviceId,
        key: DeviceKey,
        max_records: u64,
        power_safe: bool,
    ) -> Result<Self, BufferError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if power_safe {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(std::time::Duration::from_secs(5));
        // One connection: every write is serialized anyway.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        for ddl in [
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL, sealed_at INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS rejected (seq INTEGER PRIMARY KEY, nonce BLOB NOT NULL, ciphertext BLOB NOT NULL, status INTEGER NOT NULL, answer TEXT NOT NULL, at INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, lines_done INTEGER NOT NULL, done INTEGER NOT NULL DEFAULT 0)",
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1)",
        ] {
            sqlx::query(ddl).execute(&pool).await?;
        }
        // Sent (a 202, under that epoch) but not known to be stored: kept
        // until the progress answer says it is. Buffers from before have
        // the column added.
        let has_sent: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pragma_table_info('outbox') WHERE name = 'sent_epoch'",
        )
        .fetch_one(&pool)
        .await?;
        if has_sent == 0 {
            sqlx::query("ALTER TABLE outbox ADD COLUMN sent_epoch INTEGER")
                .execute(&pool)
                .await?;
        }
        // Both kinds are looked up by seq; the sent ones are few (about a
        // second's worth) and counted every second: neither scans a backlog.
        for index in [
            "CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (seq) WHERE sent_epoch IS NULL",
            "CREATE INDEX IF NOT EXISTS outbox_sent ON outbox (seq) WHERE sent_epoch IS NOT NULL",
        ] {
            sqlx::query(index).execute(&pool).await?;
        }
        Ok(Self {
            pool,
            device,
            key,
            max_records,
        })
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// Seals `reading` (a JSON object) under the next seq and stores it, in
    /// one transaction. With `file`, also records that line `line` of that
    /// input file is done, in the same transaction. Returns the seq.
    pub async fn push(&self, reading: &str, file: Option<(&str, u64)>) -> Result<u64, BufferError> {
        let seqs = self.push_all(&[reading], file).await?;
        Ok(seqs[0])
    }

    /// [`push`](Self::push) for several readings at once: all of them under
    /// consecutive seqs, or none. Returns their seqs.
    pub async fn push_all(
        &self,
        readings: &[&str],
        file: Option<(&str, u64)>,
    ) -> Result<Vec<u64>, BufferError> {
        for reading in readings {
            match serde_json::from_str::<serde_json::Value>(reading) {
                Ok(serde_json::Value::Object(_)) => {}
                _ => return Err(BufferError::NotAnObject),
            }
        }
        let n = readings.len() as u64;
        let mut tx = self.pool.begin().await?;
        // Full? max(seq) - min(seq) + 1 bounds the count from above in two
        // index look-ups; the count itself (a scan of the whole backlog) is
        // taken only when that bound reaches the limit. Counting on every
        // reading made a long offline spell quadratic: at 1,000,000 waiting
        // each new reading read them all.
        let (lo, hi): (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT (SELECT min(seq) FROM outbox), (SELECT max(seq) FROM outbox)")
                .fetch_one(&mut *tx)
                .await?;
        let bound = lo.zip(hi).map_or(0, |(lo, hi)| (hi - lo + 1) as u64);
        if bound + n > self.max_records {
            let held: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                .fetch_one(&mut *tx)
                .await?;
            if held as u64 + n > self.max_records {
                return Err(BufferError::Full(self.max_records));
            }
        }
        let next: i64 = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'next_seq'")
            .fetch_one(&mut *tx)
            .await?;
        let mut seqs = Vec::with_capacity(readings.len());
        for (i, reading) in readings.iter().enumerate() {
            let seq = next as u64 + i as u64;
            let sealed = SealedRecord::seal(
                &self.key,
                &self.device,
                seq,
                nonce_for(seq),
                reading.as_bytes(),
            )?;
            sqlx::query("INSERT INTO outbox (seq, nonce, ciphertext, sealed_at) VALUES (?, ?, ?, strftime('%s','now'))")
                .bind(seq as i64)
                .bind(&sealed.nonce[..])
                .bind(&sealed.ciphertext)
                .execute(&mut *tx)
                .await?;
            seqs.push(seq);
        }
        sqlx::query("UPDATE meta SET value = ? WHERE key = 'next_seq'")
            .bind(next + n as i64)
            .execute(&mut *tx)
            .await?;
        if let Some((name, line)) = file {
            sqlx::query(
                "INSERT INTO files (name, lines_done) VALUES (?, ?)
                 ON CONFLICT (name) DO UPDATE SET lines_done = excluded.lines_done",
            )
            .bind(name)
            .bind(line as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(seqs)
    }

    /// The oldest `limit` records waiting to be sent, in seq order.
    pub async fn pending(&self, limit: usize) -> Result<Vec<SealedRecord>, BufferError> {
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT seq, nonce, ciphertext FROM outbox WHERE sent_epoch IS NULL ORDER BY seq LIMIT ?",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(seq, nonce, ciphertext)| {
                Some(SealedRecord {
                    seq: seq as u64,
                    nonce: nonce.try_into().ok()?,
                    ciphertext,
                })
            })
            .collect())
    }

    /// Records waiting to be sent.
    pub async fn waiting(&self) -> Result<u64, BufferError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_epoch IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// Records sent (a 202) and not known to be stored yet.
    pub async fn unconfirmed(&self) -> Result<u64, BufferError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_epoch IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// The lowest seq sent and not known to be stored.
    pub async fn oldest_unconfirmed(&self) -> Result<Option<u64>, BufferError> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT min(seq) FROM outbox WHERE sent_epoch IS NOT NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(seq.map(|s| s as u64))
    }

    /// Marks records the server accepted (a 202, queued under `epoch`) as
    /// sent: they stay until [`confirm`](Self::confirm) learns they are
    /// stored.
    pub async fn accepted(&self, seqs: &[u64], epoch: i64) -> Result<(), BufferError> {
        let mut tx = self.pool.begin().await?;
        for seq in seqs {
            sqlx::query("UPDATE outbox SET sent_epoch = ? WHERE seq = ?")
                .bind(epoch)
                .bind(*seq as i64)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// What a progress answer says: sent records in the `stored` ranges are
    /// deleted; those left that were sent into an `abandoned` epoch (a
    /// region lost for good) are marked unsent, so they go again, in seq
    /// order, before anything newer. Returns `(deleted, to send again)`.
    pub async fn confirm(
        &self,
        stored: &[(u64, u64)],
        abandoned: &[i64],
    ) -> Result<(u64, u64), BufferError> {
        let mut tx = self.pool.begin().await?;
        let mut deleted = 0;
        for (first, last) in stored {
            deleted += sqlx::query(
                "DELETE FROM outbox WHERE sent_epoch IS NOT NULL AND seq BETWEEN ? AND ?",
            )
            .bind(*first as i64)
            .bind(*last as i64)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        let mut again = 0;
        for epoch in abandoned {
            again += sqlx::query("UPDATE outbox SET sent_epoch = NULL WHERE sent_epoch = ?")
                .bind(epoch)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok((deleted, again))
    }

    /// The progress request's authentication header for `after`, made now.
    pub fn progress_auth(&self, after: u64) -> String {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        georelay_core::progress::header(&self.key, &self.device, after, now_ms)
    }

    /// Moves a record the server refused for good aside, with its answer.
    pub async fn reject(&self, seq: u64, status: u16, answer: &str) -> Result<(), BufferError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT OR REPLACE INTO rejected (seq, nonce, ciphertext, status, answer, at)
             SELECT seq, nonce, ciphertext, ?, ?, strftime('%s','now') FROM outbox WHERE seq = ?",
        )
        .bind(i64::from(status))
        .bind(answer)
        .bind(seq as i64)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM outbox WHERE seq = ?")
            .bind(seq as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records moved aside, as `(seq, status)`.
    pub async fn rejected(&self) -> Result<Vec<(u64, u16)>, BufferError> {
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT seq, status FROM rejected ORDER BY seq")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(s, st)| (s as u64, u16::try_from(st).unwrap_or(0)))
            .collect())
    }

    /// Lines of input file `name` already taken (0 if new), and whether the
    /// whole file is done.
    pub async fn file_progress(&self, name: &str) -> Result<(u64, bool), BufferError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT lines_done, done FROM files WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map_or((0, false), |(l, d)| (l as u64, d != 0)))
    }

    /// Marks input file `name` done (it had `lines` lines).
    pub async fn file_done(&self, name: &str, lines: u64) -> Result<(), BufferError> {
        sqlx::query(
            "INSERT INTO files (name, lines_done, done) VALUES (?, ?, 1)
             ON CONFLICT (name) DO UPDATE SET lines_done = excluded.lines_done, done = 1",
        )
        .bind(name)
        .bind(lines as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Puts every set-aside record of the buffer at `path` back in its outbox,
/// under the seq it was sealed with (so it goes before anything newer):
/// `georelay agent requeue`. Safe beside a running agent (SQLite locks).
/// Returns how many.
pub async fn requeue(path: &Path) -> Result<u64, BufferError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(std::time::Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let mut tx = pool.begin().await?;
    let moved = sqlx::query(
        "INSERT OR IGNORE INTO outbox (seq, nonce, ciphertext, sealed_at)
         SELECT seq, nonce, ciphertext, strftime('%s','now') FROM rejected",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM rejected")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    pool.close().await;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new buffer of `max_records` in a directory of its own (removed by
    /// the caller).
    async fn fresh(name: &str, max_records: u64) -> (std::path::PathBuf, Buffer) {
        let dir = std::env::temp_dir().join(format!("georelay-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.db"));
        let _ = std::fs::remove_file(&path);
        let device = DeviceId::parse(name).unwrap();
        let buffer = Buffer::open(&path, device, DeviceKey::generate(), max_records, false)
            .await
            .unwrap();
        (dir, buffer)
    }

    #[tokio::test]
    async fn full_counts_what_waits_not_the_span_of_seqs() {
        let (dir, buffer) = fresh("full", 3).await;
        for n in 1..=3 {
            assert_eq!(buffer.push("{\"n\":1}", None).await.unwrap(), n);
        }
        assert!(matches!(
            buffer.push("{\"n\":4}", None).await,
            Err(BufferError::Full(3))
        ));
        // A hole in the middle: seqs 1 and 3 wait, 1..=3 spans three.
        buffer.reject(2, 400, "bad").await.unwrap();
        assert_eq!(buffer.push("{\"n\":4}", None).await.unwrap(), 4);
        assert!(matches!(
            buffer.push("{\"n\":5}", None).await,
            Err(BufferError::Full(3))
        ));
        // Sent is not stored: it still takes room.
        buffer.accepted(&[1], 1).await.unwrap();
        assert!(matches!(
            buffer.push("{\"n\":5}", None).await,
            Err(BufferError::Full(3))
        ));
        assert_eq!(buffer.confirm(&[(1, 1)], &[]).await.unwrap(), (1, 0));
        assert_eq!(buffer.push("{\"n\":5}", None).await.unwrap(), 5);
        assert_eq!(buffer.waiting().await.unwrap(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Stored ones go; sent into an abandoned epoch and not stored go
    /// again, in seq order; sent into another epoch wait.
    #[tokio::test]
    async fn what_was_queued_in_an_abandoned_epoch_and_is_not_stored_is_sent_again() {
        let (dir, buffer) = fresh("confirm", 100).await;
        for _ in 1..=8 {
            buffer.push("{\"n\":1}", None).await.unwrap();
        }
        buffer.accepted(&[1, 2, 3, 4, 5], 1).await.unwrap();
        buffer.accepted(&[6, 7], 2).await.unwrap();
        let seqs = |v: Vec<SealedRecord>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(buffer.pending(10).await.unwrap()), vec![8]);
        assert_eq!(buffer.oldest_unconfirmed().await.unwrap(), Some(1));
        assert_eq!(buffer.confirm(&[(1, 2)], &[1]).await.unwrap(), (2, 3));
        assert_eq!(seqs(buffer.pending(10).await.unwrap()), vec![3, 4, 5, 8]);
        assert_eq!(buffer.unconfirmed().await.unwrap(), 2);
        assert_eq!(buffer.oldest_unconfirmed().await.unwrap(), Some(6));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
