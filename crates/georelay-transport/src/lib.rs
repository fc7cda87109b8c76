//! georelay-transport: the queue contract, and the brokers behind it.
//!
//! One regional namespace is one [`Namespace`]: a NATS JetStream server or an
//! Azure Service Bus namespace. Senders and the worker use it through the same
//! handful of calls, at least once, in order:
//!
//! - [`Namespace::ensure_queue`] creates a queue if it is missing (senders do
//!   it in a region they fail over to). Idempotent.
//! - [`Namespace::publish`] returns `Ok` once the broker has the message
//!   durably. `id` (`"{device_id}/{seq}/{digest}"`, see
//!   `SealedRecord::message_id`) is the broker's duplicate-detection
//!   id, so a re-publish of the same record is stored once. **The whole call is
//!   bounded by the publish deadline**, including the client's own buffering: a
//!   hung server yields [`ErrorKind::Timeout`], never a hang. A timed-out
//!   publish may still land later; callers must treat that as possible.
//! - [`Namespace::receive`] returns up to `max` messages in queue order;
//!   [`Namespace::ack`] removes them, and is called only after the caller's
//!   database commit; [`Namespace::nack`] gives back what was not stored, to be
//!   received again, in the same order, before anything newer. A poison
//!   message is recorded by the caller (in `dead_letters`) and acked like the
//!   rest: it never blocks the queue.
//! - [`Namespace::depth`] counts what is in a queue and not yet acked;
//!   [`Namespace::probe`] is one cheap round trip, timed, for health.
//!
//! Errors carry an [`ErrorKind`], so a breaker can tell slow ([`ErrorKind::Timeout`])
//! from down ([`ErrorKind::Unreachable`]) from "my fault"
//! ([`ErrorKind::Rejected`], [`ErrorKind::Auth`]) without reading messages.
//!
//! Dispatch is an enum, not a trait object: there are exactly two brokers, the
//! calls are async (no boxed futures on the publish path), and a `match` keeps
//! every call site monomorphic and easy to read.

pub mod nats;
mod pool;
pub mod servicebus;

pub use georelay_core::{redacted_endpoint, TransportKind, Triplet};
pub use pool::{NamespacePool, Pooled};

use bytes::Bytes;
use std::fmt;
use std::time::Duration;

/// What went wrong, for decisions: retry, trip a breaker, fail over, or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer within the deadline: the broker may be slow or hung. The
    /// operation may still take effect later.
    Timeout,
    /// Cannot reach the broker: connection refused, reset or not established.
    Unreachable,
    /// The broker answered and refused the request (no such queue, message
    /// too large, bad request). Retrying the same request will not help.
    Rejected,
    /// The broker refused our credentials.
    Auth,
    /// The message is larger than the namespace carries; refused before it
    /// was sent. The sender's fault, never the namespace's health.
    TooLarge,
    /// The queue is full (Service Bus: quota exceeded): the namespace takes
    /// no records until its backlog drains. Not a credentials problem.
    Full,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
            Self::Rejected => "rejected",
            Self::Auth => "auth",
            Self::TooLarge => "too large",
            Self::Full => "queue full",
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct TransportError {
    kind: ErrorKind,
    message: String,
    /// For [`ErrorKind::TooLarge`]: the largest payload the namespace takes.
    limit: Option<usize>,
}

impl TransportError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            limit: None,
        }
    }

    /// A payload of `size` bytes where the namespace takes at most `limit`.
    pub fn too_large(size: usize, limit: usize) -> Self {
        Self {
            kind: ErrorKind::TooLarge,
            message: format!("a message of {size} bytes is over the namespace's limit of {limit}"),
            limit: Some(limit),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// For [`ErrorKind::TooLarge`]: the largest payload the namespace takes.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    pub(crate) fn timeout(what: &str, after: Duration) -> Self {
        Self::new(
            ErrorKind::Timeout,
            format!("{what}: no answer within {after:?}"),
        )
    }
}

/// How long [`Namespace::connect`] waits for a NATS server to answer.
pub const CONNECT_WAIT: Duration = Duration::from_secs(1);

/// Limits every broker call obeys.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bound on one publish, from the call to the broker's durable ack.
    pub publish_deadline: Duration,
    /// Bound on management calls (ensure queue, depth, probe, ack flush) and
    /// on the connect attempt.
    pub request_deadline: Duration,
    /// The largest message a Service Bus namespace takes, in bytes: 256 KiB
    /// on the standard tier, up to 100 MiB on premium. (NATS says its own.)
    pub servicebus_max_message: usize,
    /// The peek-lock duration of the Service Bus queues georelay creates
    /// (5 s to 5 min): how long a message a crashed reader held stays
    /// invisible, and so how long a fresh reader waits before its first
    /// receive.
    pub servicebus_lock_duration: Duration,
    /// PEM file of the CA that signs `tls://` NATS servers' certificates, if
    /// not one the system trusts (not a limit, but fixed for every
    /// connection the same way).
    pub nats_ca_file: Option<std::path::PathBuf>,
}

/// The default [`Limits::servicebus_lock_duration`].
pub const SERVICEBUS_LOCK_DURATION: Duration = Duration::from_secs(30);

/// Checks a `--servicebus-lock-duration` against the service's range.
pub fn check_servicebus_lock_duration(
    lock: Duration,
) -> Result<Duration, georelay_core::ConfigError> {
    georelay_core::check_range(
        "servicebus-lock-duration",
        lock,
        servicebus::MIN_LOCK_DURATION,
        servicebus::MAX_LOCK_DURATION,
    )
}

/// Service Bus standard tier's largest message.
pub const SERVICEBUS_STANDARD_MAX_MESSAGE: usize = 256 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            publish_deadline: Duration::from_secs(2),
            request_deadline: Duration::from_secs(5),
            servicebus_max_message: SERVICEBUS_STANDARD_MAX_MESSAGE,
            servicebus_lock_duration: SERVICEBUS_LOCK_DURATION,
            nats_ca_file: None,
        }
    }
}

/// One message received from a queue. Ack or nack it through the
/// [`Namespace`] it came from.
#[derive(Debug)]
pub struct Delivery {
    /// The publisher's id (`"{device_id}/{seq}/{digest}"`), if the message
    /// had one: anyone who can write to the queue chooses it, so nothing
    /// but diagnostics may rely on it.
    pub id: Option<String>,
    pub payload: Bytes,
    /// Why the broker message itself could not be read as usual (NATS
    /// headers the client cannot parse): the caller dead-letters it as
    /// `unreadable` and acks it like any other.
    pub unreadable: Option<String>,
    /// Read from a dead-letter sub-queue (Service Bus): why the broker put
    /// it there (its `DeadLetterReason`, e.g. `MaxDeliveryCountExceeded`).
    pub dead_lettered: Option<String>,
    handle: Handle,
}

enum Handle {
    Nats(Box<async_nats::jetstream::Message>),
    /// Read by sequence number from a NATS stream, not through the consumer
    /// (see `nats`, "Poison the client cannot parse"): acked by deleting it.
    NatsStored {
        queue: std::sync::Arc<str>,
        seq: u64,
    },
    ServiceBus(servicebus::Lock),
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nats(_) => "Handle::Nats",
            Self::NatsStored { .. } => "Handle::NatsStored",
            Self::ServiceBus(_) => "Handle::ServiceBus",
        })
    }
}

/// A connection to one regional namespace.
#[derive(Debug, Clone)]
pub enum Namespace {
    Nats(nats::NatsNamespace),
    ServiceBus(servicebus::ServiceBusNamespace),
}

impl Namespace {
    /// Connects to a namespace as the control plane describes it. Service
    /// Bus needs the SAS policy name and key; NATS takes a user and password
    /// (key name `user:NAME`, the password as the key) or a token (key name
    /// `token`), or none; a `tls://` endpoint requires TLS. NATS waits up to
    /// [`CONNECT_WAIT`] for the first connection, so the first calls do not
    /// fail while it is being set up; a server that is down does not fail
    /// this call (calls fail as [`ErrorKind::Unreachable`] until it is up,
    /// and the client keeps connecting in the background).
    pub async fn connect(triplet: &Triplet, limits: Limits) -> Result<Self, TransportError> {
        match (triplet.transport, &triplet.key_name, &triplet.key) {
            (TransportKind::Nats, key_name, key) => {
                let auth = nats::NatsAuth::from_key(key_name.as_deref(), key.as_ref())?;
                let endpoint = triplet.endpoint.as_str();
                let ns =
                    Self::Nats(nats::NatsNamespace::connect_with(endpoint, auth, limits).await?);
                if !ns.wait_connected(CONNECT_WAIT).await {
                    tracing::warn!(
                        endpoint = %redacted_endpoint(endpoint),
                        "namespace does not answer yet; connecting in the background"
                    );
                }
                Ok(ns)
            }
            (TransportKind::ServiceBus, Some(key_name), Some(key)) => {
                let mut config =
                    servicebus::ServiceBusConfig::new(&triplet.endpoint, key_name, key.clone());
                config.lock_duration = limits.servicebus_lock_duration;
                Ok(Self::ServiceBus(servicebus::ServiceBusNamespace::new(
                    config, limits,
                )?))
            }
            (TransportKind::ServiceBus, _, _) => Err(TransportError::new(
                ErrorKind::Auth,
                "a servicebus namespace needs its SAS key name and key",
            )),
        }
    }

    /// Waits up to `timeout` for a freshly made connection to be up, so the
    /// first calls do not fail as unreachable while it is being set up.
    /// Returns whether it is up (Service Bus has no standing connection).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let Self::Nats(n) = self else {
            return true;
        };
        let until = tokio::time::Instant::now() + timeout;
        while !n.is_connected() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Creates `queue` if it does not exist. Idempotent.
    pub async fn ensure_queue(&self, queue: &str) -> Result<(), TransportError> {
        match self {
            Self::Nats(n) => n.ensure_queue(queue).await,
            Self::ServiceBus(s) => s.ensure_queue(queue).await,
        }
    }

    /// The largest payload one message can carry here, with georelay's
    /// message id; `None` while not known (NATS says it when connected).
    /// A larger payload is refused as [`ErrorKind::TooLarge`] before it is
    /// sent: nats-server would answer it by closing the connection, which
    /// every sender on it would take for the region going down.
    pub fn max_payload(&self) -> Option<usize> {
        match self {
            Self::Nats(n) => n.max_payload(),
            Self::ServiceBus(s) => Some(s.max_payload()),
        }
    }

    /// Publishes `payload` under duplicate-detection `id`; `Ok` means durably
    /// queued. Bounded by [`Limits::publish_deadline`] as a whole.
    pub async fn publish(
        &self,
        queue: &str,
        id: &str,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        match self {
            Self::Nats(n) => n.publish(queue, id, payload).await,
            Self::ServiceBus(s) => s.publish(queue, id, payload).await,
        }
    }

    /// Publishes `items` (`(id, payload)`) so that they are queued in the
    /// given order. `Ok` means all are durably queued; `Err((i, e))` means
    /// `items[..i]` are queued and `items[i]` failed with `e` (items after it
    /// may or may not have landed, but never ahead of `items[i]` on NATS,
    /// whose publishes share one ordered connection). NATS pipelines the
    /// batch under one publish deadline; Service Bus sends the REST API's
    /// batches (as many records as fit in one message), each under its own. An item over [`max_payload`](Self::max_payload) is
    /// found before anything is sent: `Err((i, TooLarge))` and nothing of
    /// the batch is queued.
    pub async fn publish_batch(
        &self,
        queue: &str,
        items: &[(String, Bytes)],
    ) -> Result<(), (usize, TransportError)> {
        match self {
            Self::Nats(n) => n.publish_batch(queue, items).await,
            Self::ServiceBus(s) => s.publish_batch(queue, items).await,
        }
    }

    /// Up to `max` messages in queue order, waiting up to `wait` for the
    /// first. An empty batch means nothing could be read for `wait`: the
    /// queue had nothing, or (Service Bus) a fresh reader is still waiting
    /// out locks an earlier reader may hold ([`Namespace::depth`] tells).
    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, TransportError> {
        match self {
            Self::Nats(n) => n.receive(queue, max, wait).await,
            Self::ServiceBus(s) => s.receive(queue, max, wait).await,
        }
    }

    /// Removes `batch` from the queue, in order. Call only after the records
    /// are committed to the database: a failed or lost ack redelivers, which
    /// the database's `(device_id, seq)` key makes harmless.
    pub async fn ack(&self, batch: Vec<Delivery>) -> Result<(), TransportError> {
        match self {
            Self::Nats(n) => n.ack(batch).await,
            Self::ServiceBus(s) => s.ack(batch).await,
        }
    }

    /// Gives `batch` back unstored: the next [`receive`](Self::receive) of
    /// `queue` starts again at the oldest unacked message, in order.
    pub async fn nack(&self, queue: &str, batch: Vec<Delivery>) -> Result<(), TransportError> {
        match self {
            Self::Nats(n) => n.nack(queue, batch).await,
            Self::ServiceBus(s) => s.nack(queue, batch).await,
        }
    }

    /// Messages in `queue` not yet acked (exact on NATS).
    pub async fn depth(&self, queue: &str) -> Result<u64, TransportError> {
        match self {
            Self::Nats(n) => n.depth(queue).await,
            Self::ServiceBus(s) => s.depth(queue).await,
        }
    }

    /// Where the broker itself sets aside `queue`'s messages it gave up on
    /// (Service Bus: `{queue}/$DeadLetterQueue`, read with
    /// [`receive`](Self::receive)); NATS has no such place.
    pub fn dead_letter_queue(&self, queue: &str) -> Option<String> {
        match self {
            Self::Nats(_) => None,
            Self::ServiceBus(_) => Some(servicebus::dead_letter_queue(queue)),
        }
    }

    /// Messages in [`dead_letter_queue`](Self::dead_letter_queue) (0 on NATS).
    pub async fn dead_lettered(&self, queue: &str) -> Result<u64, TransportError> {
        match self {
            Self::Nats(_) => Ok(0),
            Self::ServiceBus(s) => s.dead_lettered(queue).await,
        }
    }

    /// One cheap round trip to the broker; returns how long it took.
    pub async fn probe(&self) -> Result<Duration, TransportError> {
        match self {
            Self::Nats(n) => n.probe().await,
            Self::ServiceBus(s) => s.probe().await,
        }
    }
}

/// The first item over `limit`, as the error [`Namespace::publish_batch`]
/// returns for it.
pub(crate) fn check_sizes(
    items: &[(String, Bytes)],
    limit: Option<usize>,
) -> Result<(), (usize, TransportError)> {
    let Some(limit) = limit else {
        return Ok(());
    };
    match items.iter().position(|(_, p)| p.len() > limit) {
        Some(i) => Err((i, TransportError::too_large(items[i].1.len(), limit))),
        None => Ok(()),
    }
}
