//! Azure Service Bus over its REST API, through `azure_messaging_servicebus`
//! 0.21 and an HTTP client of our own.
//!
//! - The namespace is `namespaces.endpoint` (`https://NAME.servicebus.windows.net`
//!   or `NAME`); SAS auth with the policy `key_name` and its key.
//! - **Our own HTTP client** ([`SbHttp`]): a pooled `reqwest` client with
//!   connect and request timeouts (the crate's default has neither a timeout
//!   nor connection reuse), at most `max_in_flight` requests at once per
//!   namespace, and every call bounded again by our own deadline.
//! - Bodies are text: the binary payload travels base64-encoded.
//!   `MessageId` = the record's message id (its digest when longer than 128); queues are created with duplicate
//!   detection (two-minute window).
//! - **Receive** is a long-polling peek-lock for the first message, then up
//!   to [`RECEIVE_CONCURRENCY`] peek-locks at once that do not wait, their
//!   answers put back in order by the broker's `SequenceNumber`: not one
//!   round trip a message. Complete (`ack`) after the database commit, many
//!   at once.
//! - **This reader remembers every lock it holds** (per queue, by sequence
//!   number) until it completes or unlocks it. A `nack` unlocks *all* of a
//!   queue's held messages, also those the caller dropped, before it
//!   returns: the next receive starts at the oldest, never behind a message
//!   still locked to nobody. Held locks are renewed in the background while
//!   a batch takes long (a slow database).
//! - **A lost answer taints the queue.** A peek-lock whose answer was lost
//!   (timeout, reset) may have locked a message that nobody knows of; what
//!   came with it is unlocked and the queue is not read again until that
//!   lock has expired, since reading past it would reorder. A connection
//!   that was never made sent nothing and taints nothing.
//! - **Crate bug worked around:** `BrokerProperties.enqueued_sequence_number`
//!   is an `i32` in the crate; partitioned entities return larger values and
//!   `peek_lock_message2` would then fail after the message is already locked.
//!   [`SbHttp`] keeps the original header as `x-georelay-brokerproperties`,
//!   parsed here with 64-bit numbers, and hands the crate a copy without that
//!   field.
//! - **A new reader waits out old locks.** Messages a previous reader (a
//!   crashed worker) locked come back only when their lock expires; reading
//!   newer ones first would reorder. So a fresh [`ServiceBusNamespace`]
//!   receives nothing until one lock duration after it was created (a
//!   receive meanwhile returns nothing after its `wait`, as if the queue
//!   were empty, so a worker keeps renewing its lease).
//! - Management calls the crate lacks (create queue, depth, probe) are signed
//!   here the same way the crate signs (SAS over the URL-encoded resource).

use async_trait::async_trait;
use azure_core::headers::{HeaderName, Headers};
use azure_core::{HttpClient, Method, Request, Response, StatusCode, Url};
use azure_messaging_servicebus::service_bus::{PeekLockResponse, QueueClient};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::join_all;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::{Delivery, ErrorKind, Handle, Limits, TransportError};

const BROKER_PROPERTIES: HeaderName = HeaderName::from_static("brokerproperties");
/// The custom property the service gives a dead-lettered message.
const DEAD_LETTER_REASON: HeaderName = HeaderName::from_static("deadletterreason");
/// The broker's original `BrokerProperties` header, kept by [`SbHttp`].
pub const ORIGINAL_BROKER_PROPERTIES: HeaderName =
    HeaderName::from_static("x-georelay-brokerproperties");
const API_VERSION: &str = "2017-04";
/// The management API's body type.
const ATOM: &str = "application/atom+xml;type=entry;charset=utf-8";
/// The REST API's batch send body type.
const BATCH: &str = "application/vnd.microsoft.servicebus.json";
const SAS_TTL: Duration = Duration::from_secs(3600);

/// Where and how to reach one Service Bus namespace.
#[derive(Debug, Clone)]
pub struct ServiceBusConfig {
    /// `https://NAME.servicebus.windows.net` or `NAME`
    pub endpoint: String,
    /// SAS policy name
    pub key_name: String,
    /// SAS key (opened from `namespaces.key_sealed` by the caller)
    pub key: Zeroizing<String>,
    /// Peek-lock duration of queues this adapter creates, and how long a new
    /// reader waits before its first receive. Service Bus allows 5 s to 5 min.
    pub lock_duration: Duration,
    /// Most HTTP requests in flight at once to this namespace.
    pub max_in_flight: usize,
    /// Send every request to this base URL instead of the namespace's host:
    /// set from a local endpoint (`http://127.0.0.1:PORT/NAME`, see
    /// [`ServiceBusConfig::new`]), for a contract double or an emulator.
    pub rewrite_to: Option<Url>,
}

impl ServiceBusConfig {
    /// `endpoint` is `https://NAME.servicebus.windows.net`, `sb://…` or
    /// `NAME`; or, for a local contract double or emulator,
    /// `http://LOOPBACK:PORT/NAME`: requests go there over plain HTTP, signed
    /// for `https://NAME.servicebus.windows.net` as the service expects.
    /// Plain HTTP is taken only to a loopback address, so a SAS token never
    /// crosses a network in clear.
    pub fn new(endpoint: &str, key_name: &str, key: Zeroizing<String>) -> Self {
        let (endpoint, rewrite_to) = match local_endpoint(endpoint) {
            Some((name, base)) => (name, Some(base)),
            None => (endpoint.to_owned(), None),
        };
        Self {
            endpoint,
            key_name: key_name.to_owned(),
            key,
            lock_duration: crate::SERVICEBUS_LOCK_DURATION,
            max_in_flight: 256,
            rewrite_to,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServiceBusNamespace {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: Arc<dyn HttpClient>,
    namespace: String,
    key_name: String,
    key: Zeroizing<String>,
    limits: Limits,
    lock_duration: Duration,
    permits: Semaphore,
    queues: Mutex<HashMap<String, QueueClient>>,
    /// When this reader was made: it reads a queue only one lock duration
    /// later.
    created: Instant,
    /// The `LockDuration` of queues that existed before this reader ensured
    /// them, as their description said (it may differ from ours: a queue
    /// made by hand, or by a process with another setting).
    described_locks: Mutex<HashMap<String, Duration>>,
    /// Per queue: the messages this reader holds locked and has neither
    /// completed nor unlocked, by sequence number.
    held: Mutex<HashMap<String, BTreeMap<i64, Held>>>,
    /// Per queue: no receive before this instant (a lost answer may have
    /// left a message locked to nobody until then).
    tainted_until: Mutex<HashMap<String, Instant>>,
}

/// A lock this reader holds.
#[derive(Debug, Clone)]
struct Held {
    /// The lock's path under the namespace (`{queue}/messages/{seq}/{token}`).
    path: String,
    /// When it was taken or last renewed.
    since: Instant,
}

/// The handle of a Service Bus delivery: which lock settles it.
#[derive(Debug)]
pub(crate) struct Lock {
    queue: String,
    sequence: i64,
    path: String,
}

impl ServiceBusNamespace {
    pub fn new(config: ServiceBusConfig, limits: Limits) -> Result<Self, TransportError> {
        let namespace = namespace_name(&config.endpoint).ok_or_else(|| {
            TransportError::new(
                ErrorKind::Rejected,
                "endpoint must be https://NAME.servicebus.windows.net, NAME, or http://LOOPBACK:PORT/NAME for a local double",
            )
        })?;
        let client = reqwest::Client::builder()
            .connect_timeout(limits.request_deadline)
            .timeout(limits.request_deadline.max(limits.publish_deadline) + Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| {
                TransportError::new(
                    ErrorKind::Rejected,
                    format!("cannot build the HTTP client: {e}"),
                )
            })?;
        let http: Arc<dyn HttpClient> = Arc::new(SbHttp {
            client,
            rewrite_to: config.rewrite_to,
        });
        let lock_duration = config
            .lock_duration
            .clamp(MIN_LOCK_DURATION, MAX_LOCK_DURATION);
        let ns = Self {
            inner: Arc::new(Inner {
                http,
                namespace,
                key_name: config.key_name,
                key: config.key,
                limits,
                lock_duration,
                permits: Semaphore::new(config.max_in_flight.max(1)),
                queues: Mutex::new(HashMap::new()),
                created: Instant::now(),
                described_locks: Mutex::new(HashMap::new()),
                held: Mutex::new(HashMap::new()),
                tainted_until: Mutex::new(HashMap::new()),
            }),
        };
        ns.renew_in_background();
        Ok(ns)
    }

    /// Renews held locks at a third of the shortest lock duration the
    /// service allows, for as long as this namespace is in use (the task
    /// ends when the last clone is gone).
    fn renew_in_background(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = Arc::downgrade(&self.inner);
        let every = MIN_LOCK_DURATION / 3;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                ServiceBusNamespace { inner }.renew_held().await;
            }
        });
    }

    /// Renews every held lock taken or renewed half its queue's lock
    /// duration ago. A lock that cannot be renewed is left as it is: if it
    /// is lost, the message's complete fails and it comes again (the
    /// database's key drops it if it was stored).
    async fn renew_held(&self) {
        let held: Vec<(String, Vec<(i64, Held)>)> = self
            .inner
            .held
            .lock()
            .iter()
            .map(|(queue, held)| {
                (
                    queue.clone(),
                    held.iter().map(|(s, h)| (*s, h.clone())).collect(),
                )
            })
            .collect();
        let due: Vec<(String, i64, String)> = held
            .into_iter()
            .flat_map(|(queue, held)| {
                let half = self.shortest_lock(&queue) / 2;
                held.into_iter()
                    .filter(move |(_, h)| h.since.elapsed() >= half)
                    .map(move |(seq, h)| (queue.clone(), seq, h.path))
            })
            .collect();
        let renewed = join_all(
            due.iter()
                .map(|(_, _, path)| self.settle(Method::Post, path)),
        )
        .await;
        let mut held = self.inner.held.lock();
        for ((queue, seq, _), result) in due.iter().zip(renewed) {
            match result {
                Ok(()) => {
                    if let Some(h) = held.get_mut(queue).and_then(|q| q.get_mut(seq)) {
                        h.since = Instant::now();
                    }
                }
                Err(e) => tracing::debug!(queue, seq, error = %e, "could not renew a message lock"),
            }
        }
    }

    /// Creates `queue` with an explicit [`MAX_DELIVERY_COUNT`]; a queue that
    /// exists with a lower one (the service's default is 10) is updated to
    /// it, so the service never dead-letters a record behind our back.
    pub async fn ensure_queue(&self, queue: &str) -> Result<(), TransportError> {
        let body = format!(
            r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml"><QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect" xmlns:i="http://www.w3.org/2001/XMLSchema-instance"><LockDuration>PT{}S</LockDuration><RequiresDuplicateDetection>true</RequiresDuplicateDetection><DuplicateDetectionHistoryTimeWindow>PT2M</DuplicateDetectionHistoryTimeWindow><MaxDeliveryCount>{MAX_DELIVERY_COUNT}</MaxDeliveryCount></QueueDescription></content></entry>"#,
            self.inner.lock_duration.as_secs()
        );
        let (status, _) = self
            .request(Method::Put, queue, Some((ATOM, body.clone())), false, None)
            .await?;
        if status.is_success() {
            return Ok(());
        }
        if status != StatusCode::Conflict {
            return Err(status_error("create queue", status));
        }
        let (status, description) = self.request(Method::Get, queue, None, false, None).await?;
        if !status.is_success() {
            return Err(status_error("queue description", status));
        }
        let description = String::from_utf8_lossy(&description);
        if let Some(lock) = xml_text(&description, "LockDuration").and_then(iso_duration) {
            self.inner
                .described_locks
                .lock()
                .insert(queue.to_owned(), lock);
        }
        let current = xml_number(&description, "MaxDeliveryCount");
        if current.is_some_and(|n| n >= u64::from(MAX_DELIVERY_COUNT)) {
            return Ok(());
        }
        tracing::warn!(queue, max_delivery_count = ?current,
            "queue dead-letters after too few deliveries (the worker's own redeliveries count): raising its MaxDeliveryCount");
        let (status, _) = self
            .request(Method::Put, queue, Some((ATOM, body)), true, None)
            .await?;
        match status {
            s if s.is_success() => Ok(()),
            s => Err(status_error("update queue", s)),
        }
    }

    /// The largest envelope a message carries: the body is base64 (4 bytes
    /// for 3) and the service counts its properties too.
    pub fn max_payload(&self) -> usize {
        self.inner
            .limits
            .servicebus_max_message
            .saturating_sub(PROPERTIES_ROOM)
            / 4
            * 3
    }

    /// One record: a batch of one (the batch send's answer keeps the body,
    /// which tells a full queue from refused credentials).
    pub async fn publish(
        &self,
        queue: &str,
        id: &str,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        self.publish_batch(queue, &[(id.to_owned(), payload)])
            .await
            .map_err(|(_, e)| e)
    }

    /// Sends `items` in order in as few requests as the message size limit
    /// allows: the REST API's batch send (one JSON array a request, queued
    /// in order). See [`crate::Namespace::publish_batch`]; each request is
    /// bounded by the publish deadline.
    pub async fn publish_batch(
        &self,
        queue: &str,
        items: &[(String, Bytes)],
    ) -> Result<(), (usize, TransportError)> {
        crate::check_sizes(items, Some(self.max_payload()))?;
        let limit = self
            .inner
            .limits
            .servicebus_max_message
            .saturating_sub(PROPERTIES_ROOM);
        let mut start = 0;
        while start < items.len() {
            let mut body = String::from("[");
            let mut end = start;
            while let Some((id, payload)) = items.get(end) {
                let entry = serde_json::json!({
                    "Body": B64.encode(payload),
                    "BrokerProperties": {"MessageId": message_id(id)},
                })
                .to_string();
                if end > start && body.len() + entry.len() + 1 > limit {
                    break;
                }
                if end > start {
                    body.push(',');
                }
                body.push_str(&entry);
                end += 1;
            }
            body.push(']');
            let path = format!("{queue}/messages");
            let deadline = Some(self.inner.limits.publish_deadline);
            let (status, answer) = self
                .request(Method::Post, &path, Some((BATCH, body)), false, deadline)
                .await
                .map_err(|e| (start, e))?;
            if !status.is_success() {
                return Err((start, send_error(status, &answer)));
            }
            start = end;
        }
        Ok(())
    }

    /// Up to `max` messages in queue order: one long-polling peek-lock (up
    /// to `wait`) for the first, then rounds of up to
    /// [`RECEIVE_CONCURRENCY`] peek-locks that do not wait, sorted by
    /// sequence number. A round with a failed peek-lock is given back whole
    /// (a message it may have locked could sit between its others), and
    /// what came before it is returned.
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, TransportError> {
        // Old locks (a previous reader's, or one a lost answer took) expire
        // first: reading past them would reorder. Meanwhile nothing can be
        // read, and the caller gets its time back after `wait` (a worker
        // must renew its lease).
        let ready = self.ready(queue);
        if ready > Instant::now() {
            tokio::time::sleep_until(ready.min(Instant::now() + wait).into()).await;
            if ready > Instant::now() {
                return Ok(Vec::new());
            }
        }
        let client = self.queue_client(queue)?;
        let Some(first) = self.peek(&client, queue, wait).await? else {
            return Ok(Vec::new());
        };
        let mut out = vec![first];
        while out.len() < max {
            let n = (max - out.len()).min(RECEIVE_CONCURRENCY);
            let round = join_all((0..n).map(|_| self.peek(&client, queue, Duration::ZERO))).await;
            let emptied = round.iter().any(|r| matches!(r, Ok(None)));
            let failed = round.iter().any(Result::is_err);
            let got: Vec<Delivery> = round.into_iter().filter_map(|r| r.ok().flatten()).collect();
            if failed {
                let round: Vec<i64> = got.iter().filter_map(lock_of).map(|l| l.sequence).collect();
                self.give_back(queue, Some(&round)).await;
                break;
            }
            out.extend(got);
            if emptied {
                break;
            }
        }
        out.sort_by_key(|d| lock_of(d).map_or(i64::MAX, |l| l.sequence));
        Ok(out)
    }

    /// One peek-lock of `queue`, waiting up to `poll` for a message; the
    /// lock is held from here on. A request whose answer may have been lost
    /// taints the queue.
    async fn peek(
        &self,
        client: &QueueClient,
        queue: &str,
        poll: Duration,
    ) -> Result<Option<Delivery>, TransportError> {
        let deadline = poll + self.inner.limits.request_deadline;
        let response = match self
            .try_call("receive", deadline, client.peek_lock_message2(Some(poll)))
            .await
        {
            Ok(r) => r,
            Err(Failed { error, maybe_sent }) => {
                let lost = matches!(error.kind(), ErrorKind::Timeout | ErrorKind::Unreachable);
                if maybe_sent && lost {
                    self.taint(queue);
                }
                return Err(error);
            }
        };
        match *response.status() {
            StatusCode::NoContent => Ok(None),
            s if s.is_success() => match delivery(&self.inner.namespace, queue, response) {
                Ok(d) => {
                    if let Some(lock) = lock_of(&d) {
                        self.inner
                            .held
                            .lock()
                            .entry(queue.to_owned())
                            .or_default()
                            .insert(
                                lock.sequence,
                                Held {
                                    path: lock.path.clone(),
                                    since: Instant::now(),
                                },
                            );
                    }
                    Ok(Some(d))
                }
                Err(e) => {
                    // Locked, but not to anything this reader can settle.
                    self.taint(queue);
                    Err(e)
                }
            },
            s => Err(status_error("receive", s)),
        }
    }

    /// When `queue` may be read: after the previous reader's locks and any
    /// lock a lost answer may have taken have expired.
    fn ready(&self, queue: &str) -> Instant {
        let fresh = self.inner.created + self.longest_lock(queue);
        let tainted = self.inner.tainted_until.lock().get(queue).copied();
        tainted.map_or(fresh, |t| t.max(fresh))
    }

    /// The longest a lock on `queue` may last: ours, or what its
    /// description said before we ensured it, whichever is longer.
    fn longest_lock(&self, queue: &str) -> Duration {
        self.described_lock(queue)
            .map_or(self.inner.lock_duration, |d| {
                d.max(self.inner.lock_duration)
            })
    }

    /// The shortest a lock on `queue` may last, for renewing it in time.
    fn shortest_lock(&self, queue: &str) -> Duration {
        self.described_lock(queue)
            .map_or(self.inner.lock_duration, |d| {
                d.min(self.inner.lock_duration)
            })
    }

    /// `queue`'s described `LockDuration` (a dead-letter sub-queue has its
    /// queue's).
    fn described_lock(&self, queue: &str) -> Option<Duration> {
        let queue = queue
            .strip_suffix(DEAD_LETTER_SUFFIX)
            .and_then(|q| q.strip_suffix('/'))
            .unwrap_or(queue);
        self.inner.described_locks.lock().get(queue).copied()
    }

    fn taint(&self, queue: &str) {
        let until = Instant::now() + self.longest_lock(queue);
        tracing::debug!(
            queue,
            "a peek-lock's answer was lost: reading again once its lock has expired"
        );
        self.inner
            .tainted_until
            .lock()
            .insert(queue.to_owned(), until);
    }

    /// Completes every message of `batch`, many at once; the first error,
    /// if any (a lost lock: that message comes again).
    pub async fn ack(&self, batch: Vec<Delivery>) -> Result<(), TransportError> {
        let locks: Vec<Lock> = batch
            .into_iter()
            .map(|d| match d.handle {
                Handle::ServiceBus(lock) => Ok(lock),
                _ => Err(other_namespace()),
            })
            .collect::<Result<_, _>>()?;
        let done = join_all(locks.iter().map(|l| self.settle(Method::Delete, &l.path))).await;
        let mut held = self.inner.held.lock();
        for l in &locks {
            if let Some(q) = held.get_mut(&l.queue) {
                q.remove(&l.sequence);
            }
        }
        done.into_iter().collect()
    }

    /// Gives back every message of `queue` this reader holds, `batch` and
    /// any delivery it dropped, and returns once they are unlocked: the
    /// next receive starts at the oldest.
    pub async fn nack(&self, queue: &str, batch: Vec<Delivery>) -> Result<(), TransportError> {
        drop(batch);
        self.give_back(queue, None).await;
        Ok(())
    }

    /// Unlocks the held messages of `queue` with these sequence numbers, or
    /// all of them. One that cannot be unlocked taints the queue until its
    /// lock has expired.
    async fn give_back(&self, queue: &str, only: Option<&[i64]>) {
        let locks: Vec<Held> = {
            let mut held = self.inner.held.lock();
            match (only, held.get_mut(queue)) {
                (_, None) => Vec::new(),
                (None, Some(_)) => held
                    .remove(queue)
                    .unwrap_or_default()
                    .into_values()
                    .collect(),
                (Some(seqs), Some(q)) => seqs.iter().filter_map(|s| q.remove(s)).collect(),
            }
        };
        let done = join_all(locks.iter().map(|h| self.settle(Method::Put, &h.path))).await;
        if done.iter().any(Result::is_err) {
            self.taint(queue);
        }
    }

    /// Completes (DELETE), unlocks (PUT) or renews (POST) the lock at `path`.
    async fn settle(&self, method: Method, path: &str) -> Result<(), TransportError> {
        let (status, _) = self.request(method, path, None, false, None).await?;
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::NotFound | StatusCode::Gone => Err(TransportError::new(
                ErrorKind::Rejected,
                "the message lock was lost (expired): the message comes again",
            )),
            s => Err(status_error("settle", s)),
        }
    }

    /// Active messages: `CountDetails`' `ActiveMessageCount` (the plain
    /// `MessageCount` counts the dead-letter sub-queue too, so an epoch with
    /// anything dead-lettered there would never count as empty).
    pub async fn depth(&self, queue: &str) -> Result<u64, TransportError> {
        self.count(queue, "ActiveMessageCount").await
    }

    /// Messages in `queue`'s dead-letter sub-queue: `CountDetails`'
    /// `DeadLetterMessageCount`.
    pub async fn dead_lettered(&self, queue: &str) -> Result<u64, TransportError> {
        self.count(queue, "DeadLetterMessageCount").await
    }

    /// One of the queue description's `CountDetails`.
    async fn count(&self, queue: &str, what: &str) -> Result<u64, TransportError> {
        let (status, body) = self.request(Method::Get, queue, None, false, None).await?;
        if !status.is_success() {
            return Err(status_error("queue description", status));
        }
        let text = String::from_utf8_lossy(&body);
        xml_number(&text, what).ok_or_else(|| {
            TransportError::new(
                ErrorKind::Rejected,
                format!("queue description has no CountDetails/{what}"),
            )
        })
    }

    pub async fn probe(&self) -> Result<Duration, TransportError> {
        let started = Instant::now();
        let (status, _) = self
            .request(Method::Get, "$Resources/Queues", None, false, None)
            .await?;
        if status.is_success() {
            Ok(started.elapsed())
        } else {
            Err(status_error("probe", status))
        }
    }

    fn queue_client(&self, queue: &str) -> Result<QueueClient, TransportError> {
        let mut queues = self.inner.queues.lock();
        if let Some(c) = queues.get(queue) {
            return Ok(c.clone());
        }
        let client = QueueClient::new(
            self.inner.http.clone(),
            self.inner.namespace.clone(),
            queue,
            self.inner.key_name.clone(),
            self.inner.key.as_str().to_owned(),
        )
        .map_err(|e| classify("queue client", &e))?;
        queues.insert(queue.to_owned(), client.clone());
        Ok(client)
    }

    /// One broker call: a permit (bounded in-flight requests), then the call,
    /// both within `deadline`.
    async fn call<T>(
        &self,
        what: &str,
        deadline: Duration,
        f: impl Future<Output = azure_core::Result<T>>,
    ) -> Result<T, TransportError> {
        self.try_call(what, deadline, f).await.map_err(|f| f.error)
    }

    /// [`call`](Self::call), telling whether a failed request may have
    /// reached the broker (it may not have, when it never got a permit or
    /// never got a connection).
    async fn try_call<T>(
        &self,
        what: &str,
        deadline: Duration,
        f: impl Future<Output = azure_core::Result<T>>,
    ) -> Result<T, Failed> {
        let until = tokio::time::Instant::now() + deadline;
        let unsent = || Failed {
            error: TransportError::timeout(what, deadline),
            maybe_sent: false,
        };
        let _permit = tokio::time::timeout_at(until, self.inner.permits.acquire())
            .await
            .map_err(|_| unsent())?;
        // A permit that came too late must not start a request: under a hung
        // broker thousands of callers would each start one and drop it at once.
        if tokio::time::Instant::now() >= until {
            return Err(unsent());
        }
        match tokio::time::timeout_at(until, f).await {
            Err(_) => Err(Failed {
                error: TransportError::timeout(what, deadline),
                maybe_sent: true,
            }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failed {
                error: classify(what, &e),
                maybe_sent: !never_connected(&e),
            }),
        }
    }

    /// A signed management request on `path` (a queue, or `$Resources/…`).
    /// One REST call on `path` with `body` of its content type; `update`
    /// sends `If-Match: *` (a PUT then updates an existing entity instead of
    /// answering 409). Bounded by `deadline`, else the request deadline.
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, String)>,
        update: bool,
        deadline: Option<Duration>,
    ) -> Result<(StatusCode, Bytes), TransportError> {
        let resource = format!(
            "https://{}.servicebus.windows.net/{path}",
            self.inner.namespace
        );
        let url = format!("{resource}?api-version={API_VERSION}");
        let parsed = Url::parse(&url)
            .map_err(|e| TransportError::new(ErrorKind::Rejected, format!("bad URL: {e}")))?;
        let mut request = Request::new(parsed, method);
        let sas = sas_token(
            &resource,
            &self.inner.key_name,
            self.inner.key.as_bytes(),
            SAS_TTL,
        );
        request.insert_header(azure_core::headers::AUTHORIZATION, sas);
        if update {
            request.insert_header(azure_core::headers::IF_MATCH, "*");
        }
        match body {
            Some((content_type, b)) => {
                request.insert_header(azure_core::headers::CONTENT_TYPE, content_type);
                request.set_body(b);
            }
            None => {
                request.insert_header(azure_core::headers::CONTENT_LENGTH, "0");
                request.set_body(azure_core::EMPTY_BODY);
            }
        }
        let http = self.inner.http.clone();
        self.call(
            "request",
            deadline.unwrap_or(self.inner.limits.request_deadline),
            async move {
                let (status, _, body) = http.execute_request(&request).await?.deconstruct();
                Ok((status, body.collect().await?))
            },
        )
        .await
    }
}

/// A Service Bus SAS token for `resource`, as the service checks it:
/// HMAC-SHA256 under the key over `"{url-encoded resource}\n{expiry}"`.
pub fn sas_token(resource: &str, key_name: &str, key: &[u8], ttl: Duration) -> String {
    let sr: String = url::form_urlencoded::byte_serialize(resource.as_bytes()).collect();
    let se = (SystemTime::now() + ttl)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let sig = B64.encode(hmac_sha256(key, format!("{sr}\n{se}").as_bytes()));
    let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={key_name}")
}

/// HMAC-SHA256, as Service Bus signs SAS tokens.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        Err(_) => Vec::new(),
    }
}

/// `http://LOOPBACK[:PORT]/NAME` -> (`NAME`, `http://LOOPBACK[:PORT]`).
fn local_endpoint(endpoint: &str) -> Option<(String, Url)> {
    let url = Url::parse(endpoint.trim()).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    let loopback = match url.host()? {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    let name = url.path().trim_matches('/').to_owned();
    if !loopback || name.is_empty() {
        return None;
    }
    let mut base = url;
    base.set_path("");
    Some((name, base))
}

fn namespace_name(endpoint: &str) -> Option<String> {
    let host = endpoint
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("sb://")
        .trim_end_matches('/');
    let name = host.strip_suffix(".servicebus.windows.net").unwrap_or(host);
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    valid.then(|| name.to_owned())
}

/// The lock of a Service Bus delivery.
fn lock_of(d: &Delivery) -> Option<&Lock> {
    match &d.handle {
        Handle::ServiceBus(lock) => Some(lock),
        Handle::Nats(_) | Handle::NatsStored { .. } => None,
    }
}

fn other_namespace() -> TransportError {
    TransportError::new(ErrorKind::Rejected, "delivery came from another namespace")
}

/// What this adapter reads of a peek-locked message's headers: its broker
/// properties (with 64-bit sequence numbers) and where its lock is.
#[derive(Debug)]
struct Peeked {
    props: BrokerProperties,
    location: String,
    dead_letter_reason: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BrokerProperties {
    message_id: Option<String>,
    sequence_number: i64,
}

impl TryFrom<Headers> for Peeked {
    type Error = azure_core::Error;
    fn try_from(headers: Headers) -> Result<Self, Self::Error> {
        let raw = headers.get_str(&ORIGINAL_BROKER_PROPERTIES)?;
        Ok(Self {
            props: azure_core::from_json(raw.as_bytes())?,
            location: headers.get_str(&azure_core::headers::LOCATION)?.to_owned(),
            dead_letter_reason: headers.get_optional_string(&DEAD_LETTER_REASON),
        })
    }
}

/// The dead-letter sub-queue of `queue`, as the REST API names it.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}/{DEAD_LETTER_SUFFIX}")
}

const DEAD_LETTER_SUFFIX: &str = "$DeadLetterQueue";

/// The delivery of a peek-locked message of `queue` in `namespace`.
fn delivery(
    namespace: &str,
    queue: &str,
    response: PeekLockResponse,
) -> Result<Delivery, TransportError> {
    let peeked: Peeked = response
        .custom_properties()
        .map_err(|e| classify("broker properties", &e))?;
    let prefix = format!("https://{namespace}.servicebus.windows.net/");
    let path = peeked
        .location
        .split('?')
        .next()
        .and_then(|l| l.strip_prefix(&prefix))
        .ok_or_else(|| {
            TransportError::new(
                ErrorKind::Rejected,
                format!(
                    "lock location {:?} is not in the namespace",
                    peeked.location
                ),
            )
        })?
        .to_owned();
    // Read from a dead-letter sub-queue: the service's reason, a custom
    // property (a header holding a JSON string).
    let dead_lettered = queue.ends_with(DEAD_LETTER_SUFFIX).then(|| {
        peeked
            .dead_letter_reason
            .as_deref()
            .map_or("no DeadLetterReason given", |r| r.trim_matches('"'))
            .to_owned()
    });
    let body = response.body();
    // A body that is not our base64 is handed over as it came: the caller
    // dead-letters it as undecodable instead of blocking the queue.
    let payload = B64
        .decode(body.trim())
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from(body.into_bytes()));
    Ok(Delivery {
        id: peeked.props.message_id,
        payload,
        unreadable: None,
        dead_lettered,
        handle: Handle::ServiceBus(Lock {
            queue: queue.to_owned(),
            sequence: peeked.props.sequence_number,
            path,
        }),
    })
}

fn status_error(what: &str, status: StatusCode) -> TransportError {
    let code = u16::from(status);
    let kind = match code {
        401 | 403 => ErrorKind::Auth,
        408 | 429 | 503 => ErrorKind::Timeout,
        500..=599 => ErrorKind::Unreachable,
        _ => ErrorKind::Rejected,
    };
    TransportError::new(kind, format!("{what}: HTTP {code}"))
}

/// A refused send: a 403 whose body says the queue is full (the service's
/// "maximum entity size has been reached", `QuotaExceeded`) is
/// [`ErrorKind::Full`], not refused credentials.
fn send_error(status: StatusCode, body: &[u8]) -> TransportError {
    let text = String::from_utf8_lossy(body).to_lowercase();
    let full = text.contains("maximum entity size") || text.contains("quotaexceeded");
    if u16::from(status) == 403 && full {
        return TransportError::new(
            ErrorKind::Full,
            "publish: HTTP 403: the queue is full (quota exceeded); it takes records again once drained",
        );
    }
    status_error("publish", status)
}

/// A failed broker call.
struct Failed {
    error: TransportError,
    /// Whether the request may have reached the broker (and so taken
    /// effect there, a lock say, with its answer lost).
    maybe_sent: bool,
}

/// Whether `e` is a connection that was never made (refused, no route, a
/// name that does not resolve): the request never left.
fn never_connected(e: &azure_core::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<reqwest::Error>() {
            return r.is_connect();
        }
        source = s.source();
    }
    false
}

fn classify(what: &str, e: &azure_core::Error) -> TransportError {
    match e.kind() {
        azure_core::error::ErrorKind::HttpResponse { status, .. } => status_error(what, *status),
        azure_core::error::ErrorKind::Io => {
            TransportError::new(ErrorKind::Unreachable, format!("{what}: {e}"))
        }
        _ => TransportError::new(ErrorKind::Rejected, format!("{what}: {e}")),
    }
}

/// The HTTP client handed to the Service Bus crate: pooled `reqwest` with
/// timeouts, an optional host rewrite (tests), and the broker-properties fix.
#[derive(Debug)]
pub struct SbHttp {
    client: reqwest::Client,
    rewrite_to: Option<Url>,
}

#[async_trait]
impl HttpClient for SbHttp {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let response = match &self.rewrite_to {
            Some(base) => {
                let mut request = request.clone();
                let url = request.url_mut();
                // Both are http(s) URLs, so these setters cannot fail.
                let _ = url.set_scheme(base.scheme());
                let _ = url.set_host(base.host_str());
                let _ = url.set_port(base.port());
                self.client.execute_request(&request).await?
            }
            None => self.client.execute_request(request).await?,
        };
        Ok(keep_broker_properties(response))
    }
}

/// Moves the broker's `BrokerProperties` to [`ORIGINAL_BROKER_PROPERTIES`] and
/// gives the crate a copy without `EnqueuedSequenceNumber` (an `i32` there).
fn keep_broker_properties(response: Response) -> Response {
    let (status, mut headers, body) = response.deconstruct();
    if let Some(raw) = headers.get_optional_string(&BROKER_PROPERTIES) {
        if let Ok(serde_json::Value::Object(mut props)) =
            serde_json::from_str::<serde_json::Value>(&raw)
        {
            props.remove("EnqueuedSequenceNumber");
            headers.insert(
                BROKER_PROPERTIES,
                serde_json::Value::Object(props).to_string(),
            );
        }
        headers.insert(ORIGINAL_BROKER_PROPERTIES, raw);
    }
    Response::new(status, headers, Box::pin(body))
}

/// The `MaxDeliveryCount` georelay's queues are created with: the service's
/// largest. Every unlock (a nack: the worker gives back a batch it could not
/// store, and a later epoch's messages at each seal poll, 4 a second, while
/// an A → B → A trail waits for its seal), every lock expiry and every
/// crash counts as a delivery, and at the default of 10 the service moves
/// the message to the `$DeadLetterQueue` sub-queue, which nothing reads: an
/// accepted record lost. At 4 a second this takes 17 years.
pub const MAX_DELIVERY_COUNT: u32 = i32::MAX as u32;

/// The number in the first `<...name>N</...name>` element of an XML text
/// (with or without a namespace prefix).
fn xml_number(text: &str, name: &str) -> Option<u64> {
    xml_text(text, name)?.parse().ok()
}

/// The text of the first `<...name>…</...name>` element of an XML text.
fn xml_text<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("{name}>"))? + name.len() + 1;
    let rest = &text[start..];
    Some(rest[..rest.find('<')?].trim())
}

/// An ISO 8601 duration of hours, minutes and seconds, as the service
/// writes a `LockDuration` (`PT30S`, `PT1M`, `PT1M30.5S`).
fn iso_duration(text: &str) -> Option<Duration> {
    let mut rest = text.strip_prefix("PT")?;
    let mut total = 0.0;
    for (unit, seconds) in [('H', 3600.0), ('M', 60.0), ('S', 1.0)] {
        if let Some((n, tail)) = rest.split_once(unit) {
            total += n.parse::<f64>().ok()? * seconds;
            rest = tail;
        }
    }
    (rest.is_empty() && total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

/// The service's range of `LockDuration`.
pub const MIN_LOCK_DURATION: Duration = Duration::from_secs(5);
pub const MAX_LOCK_DURATION: Duration = Duration::from_secs(300);

/// Peek-locks a receive sends at once after its first message: a round
/// trip for up to this many messages instead of one each.
pub const RECEIVE_CONCURRENCY: usize = 32;

/// Room kept in a message's size for what the service counts besides the
/// body (broker properties, content type).
const PROPERTIES_ROOM: usize = 2048;

/// Service Bus refuses a `MessageId` longer than this (400).
pub const MAX_MESSAGE_ID: usize = 128;

/// `id` as a Service Bus `MessageId`: itself when it fits, else `sha256:`
/// and the hex SHA-256 of it (71 characters), which deduplicates exactly as
/// the id would. georelay's ids are `"{device}/{seq}/{digest}"`, up to 182
/// characters for a 128-character device id.
fn message_id(id: &str) -> String {
    use sha2::Digest as _;
    if id.len() <= MAX_MESSAGE_ID {
        return id.to_owned();
    }
    let mut out = String::from("sha256:");
    georelay_core::ids::push_hex(&mut out, &Sha256::digest(id.as_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_only_on_loopback() {
        let (name, base) = local_endpoint("http://127.0.0.1:4545/sb-eu").unwrap();
        assert_eq!(name, "sb-eu");
        assert_eq!(base.as_str(), "http://127.0.0.1:4545/");
        assert!(local_endpoint("http://localhost:1/x").is_some());
        assert!(local_endpoint("http://[::1]:1/x").is_some());
        // a network address, https, or no namespace name: not local
        assert!(local_endpoint("http://10.0.0.8:4545/sb-eu").is_none());
        assert!(local_endpoint("http://example.com/sb-eu").is_none());
        assert!(local_endpoint("https://127.0.0.1:4545/sb-eu").is_none());
        assert!(local_endpoint("http://127.0.0.1:4545/").is_none());
        assert_eq!(
            namespace_name("https://georelay-eu.servicebus.windows.net/").as_deref(),
            Some("georelay-eu")
        );
        // a non-local http endpoint is not a name either
        assert_eq!(namespace_name("http://10.0.0.8:4545/sb-eu"), None);
    }

    #[test]
    fn lock_durations_as_the_service_writes_them() {
        assert_eq!(iso_duration("PT30S"), Some(Duration::from_secs(30)));
        assert_eq!(iso_duration("PT1M"), Some(Duration::from_secs(60)));
        assert_eq!(
            iso_duration("PT1M30.5S"),
            Some(Duration::from_millis(90_500))
        );
        assert_eq!(iso_duration("PT1H"), Some(Duration::from_secs(3600)));
        assert_eq!(iso_duration("P1D"), None);
        assert_eq!(iso_duration("PT30X"), None);
        assert_eq!(iso_duration("30"), None);
    }

    #[test]
    fn message_ids_longer_than_the_service_takes_become_their_digest() {
        let short = "x".repeat(MAX_MESSAGE_ID);
        assert_eq!(message_id(&short), short);
        let long = "x".repeat(MAX_MESSAGE_ID + 1);
        let mapped = message_id(&long);
        assert!(
            mapped.starts_with("sha256:") && mapped.len() == 71,
            "{mapped}"
        );
        assert_eq!(message_id(&long), mapped);
        assert_ne!(message_id(&"y".repeat(MAX_MESSAGE_ID + 1)), mapped);
    }
}
