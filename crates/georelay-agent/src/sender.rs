//! Sending the buffer: in seq order, one record at a time when caught up,
//! the batch endpoint for a backlog. Retries back off exponentially with
//! jitter and honour `Retry-After`.
//!
//! A 202 means "queued in a region", not "stored": the record stays in the
//! buffer, marked sent, and the sender asks `GET /v1/devices/{id}/progress`
//! which are stored and deletes those — once the oldest sent record has
//! waited [`SenderConfig::confirm_after`] (10 s) or [`CONFIRM_BACKLOG`] are
//! waiting, and about once a second while it finishes ([`Until::Stored`]).
//! Each question costs ingest a request and PostgreSQL two reads: asked
//! every second, a device sending a reading a second would double the
//! requests ingest serves.
//! If the answer lists the epoch a record was queued under as abandoned
//! (its region lost for good), the record is sent again, in seq order,
//! ahead of anything newer: the worker holds the device's newer records
//! back until it has them, so nothing is lost and nothing reordered.
//!
//! Only a record the server proves bad is set aside: a 400 or 413 whose
//! error code is about the record or the request body ([`RECORD_CODES`]).
//! A refused batch is re-sent one by one to find which record, so it never
//! blocks the records behind it; set-aside records wait in the buffer's
//! `rejected` table for `georelay agent requeue`. Every other 4xx (401 for a
//! device disabled for a while or a wrong key, 403, 404 from a mistyped URL
//! behind a proxy) is a configuration or a passing state: retried with
//! back-off, with a warning each time, and nothing is dropped.

use georelay_core::SealedRecord;
use parking_lot::Mutex;
use rand::Rng as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Buffer, BufferError};

#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Ingest base URLs; the next is tried after a failure.
    pub urls: Vec<String>,
    /// Most records in one batch request (the server takes up to 1,000).
    pub batch_max: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub request_timeout: Duration,
    /// Least time between two questions which sent records are stored;
    /// how often they are asked while finishing ([`Until::Stored`]).
    pub confirm_every: Duration,
    /// While sending goes on, how long the oldest sent record waits before
    /// the sender asks (sooner when [`CONFIRM_BACKLOG`] are waiting).
    pub confirm_after: Duration,
}

/// Sent records waiting to be confirmed that make the sender ask without
/// waiting for [`SenderConfig::confirm_after`]: half of what one progress
/// answer covers, so the buffer never fills with stored records.
pub const CONFIRM_BACKLOG: u64 = 5_000;

/// When [`Sender::run`] returns by itself (besides `stop`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Never.
    Stopped,
    /// Nothing is left to send (sent records may not be stored yet).
    Sent,
    /// Everything sent is known to be stored.
    Stored,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            batch_max: 500,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(15),
            confirm_every: Duration::from_secs(1),
            confirm_after: Duration::from_secs(10),
        }
    }
}

/// Every 202, one JSON line each: `{"device", "seq", "at_ms", "namespace",
/// "epoch"}` — what the invariant checker reads.
#[derive(Debug)]
pub struct Ledger {
    file: Mutex<std::fs::File>,
}

impl Ledger {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    fn record(&self, device: &str, seqs: &[u64], namespace: &str, epoch: i64) {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut lines = String::new();
        for seq in seqs {
            lines.push_str(
                &serde_json::json!({"device": device, "seq": seq, "at_ms": at_ms as u64, "namespace": namespace, "epoch": epoch})
                    .to_string(),
            );
            lines.push('\n');
        }
        if let Err(e) = self.file.lock().write_all(lines.as_bytes()) {
            tracing::error!(error = %e, "cannot write the ledger");
        }
    }
}

/// Counters a progress display or a summary reads.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub retries: AtomicU64,
    pub rejected: AtomicU64,
    /// Records known stored (deleted from the buffer).
    pub confirmed: AtomicU64,
    /// Records sent again: they were queued in an abandoned epoch.
    pub resent: AtomicU64,
    /// Most records held sent-but-not-stored at once (the extra room the
    /// buffer needs for keeping records until they are stored).
    pub peak_unconfirmed: AtomicU64,
}

/// Error codes by which the server proves a record, or the request body
/// holding it, bad: sent again as is, it would be refused again.
pub const RECORD_CODES: [&str; 7] = [
    "malformed_json",
    "invalid_record",
    "not_json_object",
    "bad_batch_size",
    "duplicate_seq",
    "too_large",
    "record_too_large",
];

/// The part of a progress answer the sender reads.
#[derive(serde::Deserialize)]
struct Progress {
    stored: Vec<(u64, u64)>,
    #[serde(default)]
    abandoned: Vec<i64>,
}

enum Outcome {
    Accepted { namespace: String, epoch: i64 },
    Retry(Option<Duration>),
    Refused { status: u16, answer: String },
}

/// What a 4xx answer means for the records sent.
fn judge(status: u16, answer: &str, retry_after: Option<Duration>) -> Outcome {
    let code = serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
    match (status, code.as_deref()) {
        (400 | 413, Some(code)) if RECORD_CODES.contains(&code) => Outcome::Refused {
            status,
            answer: answer.to_owned(),
        },
        (408 | 429, _) => Outcome::Retry(retry_after),
        _ => {
            tracing::warn!(status, answer = %answer,
                "ingest refused the request, but not the records in it (a disabled device, a wrong key or URL?): keeping them and retrying");
            Outcome::Retry(retry_after)
        }
    }
}

#[derive(Debug)]
pub struct Sender {
    buffer: Buffer,
    http: reqwest::Client,
    config: SenderConfig,
    ledger: Option<Arc<Ledger>>,
    pub stats: Arc<Stats>,
    /// The last progress request failed (warned once).
    progress_failing: AtomicBool,
}

impl Sender {
    pub fn new(
        buffer: Buffer,
        config: SenderConfig,
        ledger: Option<Arc<Ledger>>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            buffer,
            http,
            config,
            ledger,
            stats: Arc::new(Stats::default()),
            progress_failing: AtomicBool::new(false),
        })
    }

    /// Sends until `stop`, or until `until` holds. `wake` is notified when
    /// new records are buffered.
    pub async fn run(
        &self,
        wake: &Notify,
        stop: &CancellationToken,
        until: Until,
    ) -> Result<(), BufferError> {
        let mut backoff = self.config.backoff_min;
        let mut url = 0usize;
        // While > 0: send one by one up to this seq (a refused batch).
        let mut single_until = 0u64;
        // Records sent and not known stored (from an earlier run too: asked
        // about at once), and since when the oldest of them waits.
        let mut waiting = self.buffer.unconfirmed().await?;
        let mut waiting_since: Option<Instant> = None;
        let mut confirmed_at: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            if waiting > 0
                && self.confirm_due(until == Until::Stored, confirmed_at, waiting_since, waiting)
            {
                confirmed_at = Some(Instant::now());
                let base = &self.config.urls[url % self.config.urls.len()];
                match self.confirm(base).await? {
                    Some(left) => {
                        waiting = left;
                        waiting_since = (left > 0).then(Instant::now);
                    }
                    None => url += 1,
                }
            }
            let pending = self.buffer.pending(self.config.batch_max).await?;
            if pending.is_empty() {
                match until {
                    Until::Sent => return Ok(()),
                    Until::Stored if waiting == 0 => return Ok(()),
                    _ => {}
                }
                let idle = if waiting > 0 {
                    self.config.confirm_every
                } else {
                    Duration::from_secs(1)
                };
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(idle) => {}
                }
                continue;
            }
            let base = &self.config.urls[url % self.config.urls.len()];
            let single = pending.len() == 1 || pending[0].seq <= single_until;
            let records = if single { &pending[..1] } else { &pending[..] };
            match self.post(base, records).await {
                Outcome::Accepted { namespace, epoch } => {
                    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
                    self.buffer.accepted(&seqs, epoch).await?;
                    if waiting == 0 {
                        // Stored within milliseconds, normally: ask soon.
                        confirmed_at = Some(Instant::now());
                    }
                    waiting += seqs.len() as u64;
                    waiting_since.get_or_insert_with(Instant::now);
                    self.stats
                        .accepted
                        .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                    if let Some(l) = &self.ledger {
                        l.record(self.buffer.device().as_str(), &seqs, &namespace, epoch);
                    }
                    backoff = self.config.backoff_min;
                }
                Outcome::Retry(after) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    url += 1;
                    let jitter = rand::thread_rng().gen_range(0.5..1.5);
                    let wait = after.unwrap_or(backoff).max(backoff.mul_f64(jitter));
                    backoff = (backoff * 2).min(self.config.backoff_max);
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait.min(self.config.backoff_max)) => {}
                    }
                }
                Outcome::Refused { status, .. } if !single => {
                    tracing::info!(
                        status,
                        "batch refused; sending its records one by one to find the bad one"
                    );
                    single_until = pending.last().map_or(0, |r| r.seq);
                }
                Outcome::Refused { status, answer } => {
                    let seq = records[0].seq;
                    tracing::warn!(device = %self.buffer.device(), seq, status, answer = %answer, "record refused for good; kept aside");
                    self.buffer.reject(seq, status, &answer).await?;
                    self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Whether to ask now which sent records are stored: never twice within
    /// `confirm_every`; then while finishing, or once the oldest has waited
    /// `confirm_after` (or was sent by an earlier run), or once
    /// [`CONFIRM_BACKLOG`] are waiting.
    fn confirm_due(
        &self,
        finishing: bool,
        asked_at: Option<Instant>,
        waiting_since: Option<Instant>,
        waiting: u64,
    ) -> bool {
        if asked_at.is_some_and(|at| at.elapsed() < self.config.confirm_every) {
            return false;
        }
        finishing
            || waiting >= CONFIRM_BACKLOG
            || waiting_since.is_none_or(|at| at.elapsed() >= self.config.confirm_after)
    }

    /// Asks which sent records are stored; deletes those, and marks for
    /// sending again those queued in an abandoned epoch. `Some(how many
    /// sent records are left)`, or `None` when the server did not answer
    /// (they are kept; asked again later).
    async fn confirm(&self, base: &str) -> Result<Option<u64>, BufferError> {
        let Some(oldest) = self.buffer.oldest_unconfirmed().await? else {
            return Ok(Some(0));
        };
        let device = self.buffer.device();
        let after = oldest - 1;
        let answer = self
            .http
            .get(format!("{base}/v1/devices/{device}/progress?after={after}"))
            .header(
                georelay_core::progress::HEADER,
                self.buffer.progress_auth(after),
            )
            .send()
            .await;
        let progress: Progress = match answer {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(p) => p,
                Err(e) => {
                    self.progress_failed(&format!("the answer cannot be read: {e}"));
                    return Ok(None);
                }
            },
            Ok(r) => {
                self.progress_failed(&format!("ingest answered {}", r.status().as_u16()));
                return Ok(None);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask ingest which records are stored");
                return Ok(None);
            }
        };
        if self.progress_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(device = %device, "ingest says which records are stored again");
        }
        let (deleted, again) = self
            .buffer
            .confirm(&progress.stored, &progress.abandoned)
            .await?;
        self.stats.confirmed.fetch_add(deleted, Ordering::Relaxed);
        if again > 0 {
            self.stats.resent.fetch_add(again, Ordering::Relaxed);
            tracing::warn!(device = %device, records = again, abandoned = ?progress.abandoned,
                "records queued in a region given up for good are not stored: sending them again");
        }
        let left = self.buffer.unconfirmed().await?;
        self.stats
            .peak_unconfirmed
            .fetch_max(left + deleted + again, Ordering::Relaxed);
        Ok(Some(left))
    }

    /// Warns once until the progress answer comes again: the sent records
    /// are kept (they take room in the buffer) until it does.
    fn progress_failed(&self, why: &str) {
        if !self.progress_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(device = %self.buffer.device(), why,
                "ingest does not say which records are stored: keeping the sent ones (they count against --max-buffer) until it does");
        }
    }

    async fn post(&self, base: &str, records: &[SealedRecord]) -> Outcome {
        let device = self.buffer.device();
        let (url, body) = if records.len() == 1 {
            (
                format!("{base}/v1/devices/{device}/telemetry"),
                serde_json::to_value(records[0].to_body()).unwrap_or_default(),
            )
        } else {
            let bodies: Vec<_> = records.iter().map(SealedRecord::to_body).collect();
            (
                format!("{base}/v1/devices/{device}/telemetry/batch"),
                serde_json::json!({ "records": bodies }),
            )
        };
        let response = match self.http.post(&url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot reach ingest");
                return Outcome::Retry(None);
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        match status {
            202 => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                Outcome::Accepted {
                    namespace: v["namespace"].as_str().unwrap_or_default().to_owned(),
                    epoch: v["epoch"].as_i64().unwrap_or(0),
                }
            }
            400..=499 => judge(status, &text, retry_after),
            _ => Outcome::Retry(retry_after),
        }
    }
}
