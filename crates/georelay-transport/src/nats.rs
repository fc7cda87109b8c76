//! NATS JetStream: one namespace is one `nats-server` (a region).
//!
//! - A queue is a stream named after it, subject `georelay.{queue}`, work-queue
//!   retention (an acked message is gone, so the stream's first message is the
//!   oldest unacked one), file storage, a two-minute duplicate window keyed by
//!   `Nats-Msg-Id`.
//! - The worker reads through one durable pull consumer per queue,
//!   [`CONSUMER`], with explicit acks: nats-server 2.9 refuses `AckPolicy::All`
//!   on a work-queue stream (error 10098). The last ack of a batch waits for
//!   the server's confirmation, so an acked batch is gone when `ack` returns.
//! - **Order across crashes and nacks.** A durable consumer redelivers an
//!   unacked message only after its ack wait, and meanwhile hands out newer
//!   ones: a reorder. So a process that starts reading a queue, and every
//!   [`nack`](NatsNamespace::nack), deletes the consumer and creates it afresh
//!   at the start of the stream. Only the drain worker holding the group's
//!   lease reads a queue, so nobody else's position is lost.
//! - One connection per namespace, shared by clones. Pings every second so a
//!   hung server is noticed; reconnects forever with capped back-off; a
//!   disconnected client fails publishes at once ([`ErrorKind::Unreachable`])
//!   instead of buffering them until the deadline. A consumer made before a
//!   disconnect is replaced before the next read: what the server sent on
//!   the lost connection would otherwise come back only after the ack wait,
//!   behind newer messages.
//! - **Poison the client cannot parse.** Anyone who can publish to a queue's
//!   subject can store a message whose headers async-nats refuses when it is
//!   delivered (not UTF-8, a line without `:`, a bad header name, a status
//!   line): the client drops the whole connection, reconnects, is sent the
//!   same message again, and every group read through that connection
//!   stalls. So a read during which the connection dropped (or that failed)
//!   marks the queue suspect, and the next read of a suspect queue does not
//!   go through the consumer: it reads the head of the stream by sequence
//!   number through the JetStream API (`STREAM.MSG.GET`, whose JSON answer
//!   carries the headers as base64, which no parser touches), up to the
//!   first message the client could not parse, marked
//!   [`Delivery::unreadable`](crate::Delivery). Acking those deletes them by
//!   sequence number. Each poison message costs one reconnect of the
//!   reader's connection, and the read after it makes progress.

use async_nats::connection::State;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::Publish;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions};
use bytes::Bytes;
use futures_util::StreamExt as _;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

use crate::{redacted_endpoint, Delivery, ErrorKind, Handle, Limits, TransportError};
use zeroize::Zeroizing;

/// How georelay authenticates to a NATS server, from a namespace's key
/// columns (sealed at rest like a Service Bus key).
#[derive(Clone)]
pub enum NatsAuth {
    /// Key name `user:NAME`, the password as the key.
    UserPassword {
        user: String,
        password: Zeroizing<String>,
    },
    /// Key name `token`, the token as the key.
    Token(Zeroizing<String>),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}, <redacted>)"),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

impl NatsAuth {
    /// The credentials a namespace's key name and key stand for; `None`
    /// without a key.
    pub fn from_key(
        key_name: Option<&str>,
        key: Option<&Zeroizing<String>>,
    ) -> Result<Option<Self>, TransportError> {
        match (key_name, key) {
            (None, None) => Ok(None),
            (Some("token"), Some(key)) => Ok(Some(Self::Token(key.clone()))),
            (Some(name), Some(key)) => match name.strip_prefix("user:") {
                Some(user) if !user.is_empty() => Ok(Some(Self::UserPassword {
                    user: user.to_owned(),
                    password: key.clone(),
                })),
                _ => Err(TransportError::new(
                    ErrorKind::Auth,
                    "a nats namespace's key name is user:NAME (the password as the key) or token",
                )),
            },
            _ => Err(TransportError::new(
                ErrorKind::Auth,
                "a nats namespace's key name and key go together",
            )),
        }
    }
}

/// The worker's durable consumer on every queue stream.
pub const CONSUMER: &str = "georelay-drain";

/// Broker-side duplicate detection window for `Nats-Msg-Id`.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long a delivered message may stay unacked before the server would
/// redeliver it to the same consumer. The worker commits a batch well within it.
const ACK_WAIT: Duration = Duration::from_secs(60);

/// Room kept in `max_payload` for the headers: `NATS/1.0`, `Nats-Msg-Id`
/// and an id of up to 182 characters take 209 bytes.
const HEADER_ROOM: usize = 256;

/// The subject a queue's stream listens on.
pub fn subject(queue: &str) -> String {
    format!("georelay.{queue}")
}

#[derive(Debug, Clone)]
pub struct NatsNamespace {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    js: Context,
    limits: Limits,
    /// Per queue: the consumer and the connection generation it was made in.
    consumers: Mutex<HashMap<String, (PullConsumer, u64)>>,
    /// The server's `max_payload` (0 while not known): read from its INFO
    /// once per connection, not on every publish (the INFO is cloned).
    max_payload: Arc<AtomicUsize>,
    /// Set when the server refused our credentials, cleared on connecting:
    /// calls then fail as [`ErrorKind::Auth`], not as unreachable.
    auth_refused: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped on every disconnect: messages the server sent on a lost
    /// connection count as delivered and come back only after the ack wait,
    /// so a consumer from an older generation is replaced before the next
    /// read (which then starts at the oldest unacked message).
    generation: Arc<AtomicU64>,
    /// Queues whose last read failed or lost the connection: the next read
    /// looks for a message the client cannot parse (module docs).
    suspects: parking_lot::Mutex<HashSet<String>>,
}

impl NatsNamespace {
    /// Connects to `url` (`nats://host:port`). Returns at once even when the
    /// server is down: the client keeps connecting in the background, and
    /// calls fail as [`ErrorKind::Unreachable`] until it is up.
    pub async fn connect(url: &str, limits: Limits) -> Result<Self, TransportError> {
        Self::connect_with(url, None, limits).await
    }

    /// [`connect`](Self::connect) with credentials. A `tls://` URL requires
    /// TLS, trusting the system's CAs and [`Limits::nats_ca_file`].
    pub async fn connect_with(
        url: &str,
        auth: Option<NatsAuth>,
        limits: Limits,
    ) -> Result<Self, TransportError> {
        // The client's own timeouts sit behind ours, so a slow server is
        // always reported by our deadline as a Timeout.
        let backstop =
            limits.request_deadline.max(limits.publish_deadline) + Duration::from_secs(1);
        let generation = Arc::new(AtomicU64::new(0));
        let bump = generation.clone();
        let auth_refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = auth_refused.clone();
        let max_payload = Arc::new(AtomicUsize::new(0));
        let forget_max = max_payload.clone();
        let shown = redacted_endpoint(url).into_owned();
        let mut options = match auth {
            None => ConnectOptions::new(),
            Some(NatsAuth::Token(token)) => ConnectOptions::with_token(token.to_string()),
            Some(NatsAuth::UserPassword { user, password }) => {
                ConnectOptions::with_user_and_password(user, password.to_string())
            }
        };
        if let Some(ca) = &limits.nats_ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        let client = options
            .event_callback(move |event| {
                let (bump, refused, shown) = (bump.clone(), refused.clone(), shown.clone());
                let forget_max = forget_max.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            bump.fetch_add(1, Ordering::SeqCst);
                        }
                        async_nats::Event::Connected => {
                            refused.store(false, Ordering::SeqCst);
                            // Perhaps another server, or another config.
                            forget_max.store(0, Ordering::SeqCst);
                        }
                        // Refused while connected, or at a (re)connect
                        // attempt (the connector reports its error kind).
                        async_nats::Event::ServerError(
                            async_nats::ServerError::AuthorizationViolation,
                        ) => refused_credentials(&refused, &shown),
                        async_nats::Event::ClientError(async_nats::ClientError::Other(e))
                            if e == async_nats::ConnectErrorKind::AuthorizationViolation
                                .to_string() =>
                        {
                            refused_credentials(&refused, &shown)
                        }
                        _ => {}
                    }
                }
            })
            .name("georelay")
            .ping_interval(Duration::from_secs(1))
            .connection_timeout(limits.request_deadline)
            .request_timeout(Some(backstop))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(50u64.saturating_mul(1 << attempts.min(6)))
                    .min(Duration::from_secs(2))
            })
            .connect(url)
            .await
            .map_err(|e| {
                TransportError::new(
                    ErrorKind::Unreachable,
                    format!("cannot connect to {}: {e}", redacted_endpoint(url)),
                )
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(backstop);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                js,
                limits,
                consumers: Mutex::new(HashMap::new()),
                max_payload,
                auth_refused,
                generation,
                suspects: parking_lot::Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Whether the connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// The underlying client, for benchmarks that compare against it.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub async fn ensure_queue(&self, queue: &str) -> Result<(), TransportError> {
        self.connected()?;
        let config = stream::Config {
            name: queue.to_owned(),
            subjects: vec![subject(queue)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        self.bounded("create stream", self.inner.js.get_or_create_stream(config))
            .await?
            .map(drop)
            .map_err(|e| self.classify("create stream", e))
    }

    /// The server's `max_payload` (from its INFO; headers count against it)
    /// less room for the message id header; `None` before the first
    /// connection.
    pub fn max_payload(&self) -> Option<usize> {
        let mut max = self.inner.max_payload.load(Ordering::Relaxed);
        if max == 0 {
            max = self.inner.client.server_info().max_payload;
            self.inner.max_payload.store(max, Ordering::Relaxed);
        }
        (max > 0).then(|| max.saturating_sub(HEADER_ROOM))
    }

    pub async fn publish(
        &self,
        queue: &str,
        id: &str,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        self.connected()?;
        if let Some(limit) = self.max_payload() {
            if payload.len() > limit {
                return Err(TransportError::too_large(payload.len(), limit));
            }
        }
        let deadline = self.inner.limits.publish_deadline;
        let publish = async {
            let ack = self
                .inner
                .js
                .send_publish(
                    subject(queue),
                    Publish::build().payload(payload).message_id(id),
                )
                .await?;
            ack.await
        };
        match tokio::time::timeout(deadline, publish).await {
            Err(_) => Err(TransportError::timeout("publish", deadline)),
            Ok(Ok(_ack)) => Ok(()),
            Ok(Err(e)) => Err(self.classify_publish(e)),
        }
    }

    /// Sends every item in order on the one connection, then waits for the
    /// acks, all within one publish deadline. See [`crate::Namespace::publish_batch`].
    pub async fn publish_batch(
        &self,
        queue: &str,
        items: &[(String, Bytes)],
    ) -> Result<(), (usize, TransportError)> {
        self.connected().map_err(|e| (0, e))?;
        crate::check_sizes(items, self.max_payload())?;
        let deadline = self.inner.limits.publish_deadline;
        let until = tokio::time::Instant::now() + deadline;
        let subject = subject(queue);
        let mut acks = Vec::with_capacity(items.len());
        for (i, (id, payload)) in items.iter().enumerate() {
            let send = self.inner.js.send_publish(
                subject.clone(),
                Publish::build().payload(payload.clone()).message_id(id),
            );
            match tokio::time::timeout_at(until, send).await {
                Err(_) => return Err((i, TransportError::timeout("publish", deadline))),
                Ok(Err(e)) => return Err((i, self.classify_publish(e))),
                Ok(Ok(ack)) => acks.push(ack),
            }
        }
        for (i, ack) in acks.into_iter().enumerate() {
            match tokio::time::timeout_at(until, ack).await {
                Err(_) => return Err((i, TransportError::timeout("publish", deadline))),
                Ok(Err(e)) => return Err((i, self.classify_publish(e))),
                Ok(Ok(_)) => {}
            }
        }
        Ok(())
    }

    pub async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, TransportError> {
        self.connected()?;
        if self.inner.suspects.lock().remove(queue) {
            match self.read_stored(queue, max).await {
                Ok(Some(batch)) => return Ok(batch),
                Ok(None) => {}
                Err(e) => {
                    self.inner.suspects.lock().insert(queue.to_owned());
                    return Err(e);
                }
            }
        }
        let generation = self.inner.generation.load(Ordering::SeqCst);
        let consumer = self.consumer(queue).await?;
        // A pull request for N messages is answered when N came or it
        // expired: asked for a whole batch with `wait`, a quiet queue would
        // hold every message for `wait`. So: what is there now (no wait);
        // if nothing, wait for one; then what came with it.
        let fetch = async {
            let mut out = self
                .collect(consumer.fetch().max_messages(max).messages())
                .await?;
            if out.is_empty() {
                let first = consumer.batch().max_messages(1).expires(wait).messages();
                out = self.collect(first).await?;
                if !out.is_empty() && max > 1 {
                    let rest = consumer.fetch().max_messages(max - 1).messages();
                    out.extend(self.collect(rest).await?);
                }
            }
            Ok(out)
        };
        let bound = wait + self.inner.limits.request_deadline;
        let result = match tokio::time::timeout(bound, fetch).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::timeout("receive", bound)),
        };
        if result.is_err() {
            // Messages of a failed fetch may have been sent and lost: the
            // next read starts over at the oldest unacked message.
            self.inner.consumers.lock().await.remove(queue);
        }
        if result.is_err() || self.inner.generation.load(Ordering::SeqCst) != generation {
            // Perhaps a message the client cannot parse (module docs).
            self.inner.suspects.lock().insert(queue.to_owned());
        }
        result
    }

    /// The head of `queue`'s stream read by sequence number, up to `max`
    /// messages and ending at the first one the client could not parse;
    /// `None` if the stream is empty. (Module docs: a suspect queue.)
    async fn read_stored(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Option<Vec<Delivery>>, TransportError> {
        let first = self
            .bounded("stream info", async {
                let mut stream = self
                    .inner
                    .js
                    .get_stream(queue)
                    .await
                    .map_err(|e| self.classify("get stream", e))?;
                let state = &stream
                    .info()
                    .await
                    .map_err(|e| self.classify("stream info", e))?
                    .state;
                Ok::<_, TransportError>((state.messages > 0).then_some(state.first_sequence))
            })
            .await??;
        let Some(first) = first else {
            return Ok(None);
        };
        let name: Arc<str> = queue.into();
        // The first message exists (acked ones are deleted from a
        // work-queue stream), so every read returns at least one.
        let mut reads = futures_util::stream::iter(first..first.saturating_add(max as u64))
            .map(|seq| self.stored_message(&name, seq))
            .buffered(64);
        let mut out = Vec::new();
        while let Some(read) = reads.next().await {
            let Some(delivery) = read? else {
                continue;
            };
            let poison = delivery.unreadable.is_some();
            out.push(delivery);
            if poison {
                break;
            }
        }
        Ok(Some(out))
    }

    /// Message `seq` of `queue`'s stream through `STREAM.MSG.GET`; `None`
    /// if there is none (acked, or never there).
    async fn stored_message(
        &self,
        queue: &Arc<str>,
        seq: u64,
    ) -> Result<Option<Delivery>, TransportError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        // 10037: no message found.
        let Some(answer) = self.by_sequence("GET", queue, seq, 10037).await? else {
            return Ok(None);
        };
        let message = &answer["message"];
        let bytes = |field: &str| {
            message[field]
                .as_str()
                .map(|s| b64.decode(s))
                .transpose()
                .map_err(|e| self.classify("get message", e))
        };
        let payload = Bytes::from(bytes("data")?.unwrap_or_default());
        let (id, unreadable) = match bytes("hdrs")? {
            None => (None, None),
            Some(headers) => match readable_headers(&headers) {
                Ok(id) => (id, None),
                Err(why) => (None, Some(why)),
            },
        };
        Ok(Some(Delivery {
            id,
            payload,
            unreadable,
            dead_lettered: None,
            handle: Handle::NatsStored {
                queue: queue.clone(),
                seq,
            },
        }))
    }

    /// The messages of one pull request, in order.
    async fn collect(
        &self,
        request: impl Future<Output = Result<pull::Batch, pull::BatchError>>,
    ) -> Result<Vec<Delivery>, TransportError> {
        let mut messages = request.await.map_err(|e| self.classify("fetch", e))?;
        let mut out = Vec::new();
        while let Some(message) = messages.next().await {
            out.push(delivery(message.map_err(|e| self.classify("fetch", e))?));
        }
        Ok(out)
    }

    /// Acks every message; the last one with the server's confirmation. The
    /// server handles one connection's acks in order, so when the last is
    /// confirmed every ack before it is done too: the batch is gone from
    /// the queue (and from `depth`) when this returns. One round trip a batch.
    pub async fn ack(&self, batch: Vec<Delivery>) -> Result<(), TransportError> {
        let mut messages = Vec::with_capacity(batch.len());
        let mut stored = Vec::new();
        for d in batch {
            match d.handle {
                Handle::Nats(message) => messages.push(message),
                Handle::NatsStored { queue, seq } => stored.push((queue, seq)),
                Handle::ServiceBus(_) => {
                    return Err(TransportError::new(
                        ErrorKind::Rejected,
                        "delivery came from another namespace",
                    ))
                }
            }
        }
        // Read by sequence number (a suspect queue): deleted, side by side
        // as they were read.
        let mut deletes = futures_util::stream::iter(stored)
            .map(|(queue, seq)| async move { self.delete(&queue, seq).await })
            .buffer_unordered(64);
        while let Some(deleted) = deletes.next().await {
            deleted?;
        }
        let Some(last) = messages.pop() else {
            return Ok(());
        };
        for message in messages {
            message.ack().await.map_err(|e| self.classify("ack", e))?;
        }
        self.bounded("ack", last.double_ack())
            .await?
            .map_err(|e| self.classify("ack", e))
    }

    /// Acks a message read by sequence number: deletes it from the stream.
    async fn delete(&self, queue: &str, seq: u64) -> Result<(), TransportError> {
        // 10057: gone already, and acked is acked.
        self.by_sequence("DELETE", queue, seq, 10057)
            .await
            .map(drop)
    }

    /// `$JS.API.STREAM.MSG.{op}.{queue}` for message `seq`: its answer, or
    /// `None` when the server answers error `absent` (no such message).
    async fn by_sequence(
        &self,
        op: &str,
        queue: &str,
        seq: u64,
        absent: u64,
    ) -> Result<Option<serde_json::Value>, TransportError> {
        let what = format!("stream message {op}");
        let answer: serde_json::Value = self
            .bounded(
                &what,
                self.inner.js.request(
                    format!("STREAM.MSG.{op}.{queue}"),
                    &serde_json::json!({ "seq": seq }),
                ),
            )
            .await?
            .map_err(|e| self.classify(&what, e))?;
        match answer.get("error") {
            None => Ok(Some(answer)),
            Some(error) if error["err_code"] == absent => Ok(None),
            Some(error) => Err(self.classify(&what, error)),
        }
    }

    pub async fn nack(&self, queue: &str, batch: Vec<Delivery>) -> Result<(), TransportError> {
        drop(batch);
        self.inner.consumers.lock().await.remove(queue);
        // The next receive recreates the consumer at the oldest unacked message.
        Ok(())
    }

    pub async fn depth(&self, queue: &str) -> Result<u64, TransportError> {
        self.connected()?;
        // Two round trips on purpose: the info that comes with `get_stream`
        // was seen still counting just-acked messages (conformance
        // `round_trip` fails with it); a fresh `info()` does not.
        let info = self
            .bounded("stream info", async {
                let mut stream = self
                    .inner
                    .js
                    .get_stream(queue)
                    .await
                    .map_err(|e| self.classify("get stream", e))?;
                stream
                    .info()
                    .await
                    .map(|i| i.state.messages)
                    .map_err(|e| self.classify("stream info", e))
            })
            .await??;
        Ok(info)
    }

    pub async fn probe(&self) -> Result<Duration, TransportError> {
        self.connected()?;
        let started = Instant::now();
        // A raw JetStream API request: any answer is a round trip through the
        // server's JetStream. (async-nats' typed `query_account` cannot parse
        // nats-server 2.9's reply.)
        self.bounded(
            "probe",
            self.inner.client.request("$JS.API.INFO", Bytes::new()),
        )
        .await?
        .map_err(|e| self.classify("probe", e))?;
        Ok(started.elapsed())
    }

    /// The consumer this process reads `queue` through. The first use in a
    /// process, and the first after a nack, replaces the durable consumer so
    /// delivery restarts at the oldest unacked message.
    async fn consumer(&self, queue: &str) -> Result<PullConsumer, TransportError> {
        let mut consumers = self.inner.consumers.lock().await;
        let generation = self.inner.generation.load(Ordering::SeqCst);
        if let Some((c, made_in)) = consumers.get(queue) {
            if *made_in == generation {
                return Ok(c.clone());
            }
        }
        let consumer = self
            .bounded("create consumer", async {
                let stream = self
                    .inner
                    .js
                    .get_stream(queue)
                    .await
                    .map_err(|e| self.classify("get stream", e))?;
                // Not found is fine: there was no consumer yet.
                let _ = stream.delete_consumer(CONSUMER).await;
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some(CONSUMER.to_owned()),
                        ack_policy: AckPolicy::Explicit,
                        deliver_policy: DeliverPolicy::All,
                        ack_wait: ACK_WAIT,
                        max_ack_pending: 20_000,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| self.classify("create consumer", e))
            })
            .await??;
        consumers.insert(queue.to_owned(), (consumer.clone(), generation));
        Ok(consumer)
    }

    fn connected(&self) -> Result<(), TransportError> {
        if self.is_connected() {
            Ok(())
        } else if self.inner.auth_refused.load(Ordering::SeqCst) {
            Err(TransportError::new(
                ErrorKind::Auth,
                "nats-server refused the credentials",
            ))
        } else {
            Err(TransportError::new(
                ErrorKind::Unreachable,
                "not connected to nats-server",
            ))
        }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl Future<Output = T>,
    ) -> Result<T, TransportError> {
        let deadline = self.inner.limits.request_deadline;
        tokio::time::timeout(deadline, f)
            .await
            .map_err(|_| TransportError::timeout(what, deadline))
    }

    /// An error from a call that reached the client: unreachable if the
    /// connection is down now, else the server refused it.
    fn classify(&self, what: &str, e: impl std::fmt::Display) -> TransportError {
        let kind = if self.is_connected() {
            ErrorKind::Rejected
        } else {
            ErrorKind::Unreachable
        };
        TransportError::new(kind, format!("{what}: {e}"))
    }

    fn classify_publish(&self, e: jetstream::context::PublishError) -> TransportError {
        use jetstream::context::PublishErrorKind as K;
        let kind = match e.kind() {
            K::TimedOut => ErrorKind::Timeout,
            K::BrokenPipe => ErrorKind::Unreachable,
            K::StreamNotFound => ErrorKind::Rejected,
            _ if !self.is_connected() => ErrorKind::Unreachable,
            _ => ErrorKind::Rejected,
        };
        TransportError::new(kind, format!("publish: {e}"))
    }
}

/// Notes that the server refused our credentials (logged once per episode).
fn refused_credentials(refused: &std::sync::atomic::AtomicBool, endpoint: &str) {
    if !refused.swap(true, Ordering::SeqCst) {
        tracing::error!(endpoint,
            "nats-server refused georelay's credentials: set them with `georelay admin namespace set-key` (key name user:NAME or token)");
    }
}

fn delivery(message: jetstream::Message) -> Delivery {
    let id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_owned());
    Delivery {
        id,
        payload: message.payload.clone(),
        unreadable: None,
        dead_lettered: None,
        handle: Handle::Nats(Box::new(message)),
    }
}

/// Why async-nats would refuse these headers of a delivered message (and
/// drop the connection), by the rules its parser applies; else the message
/// id they carry. A stored message never has a status line (that would
/// make it a control message to the client).
fn readable_headers(bytes: &[u8]) -> Result<Option<String>, String> {
    use async_nats::header::{HeaderName, NATS_MESSAGE_ID};
    use std::str::FromStr as _;
    let text = std::str::from_utf8(bytes).map_err(|_| "headers are not UTF-8".to_owned())?;
    let mut lines = text.lines().peekable();
    let version = lines.next().ok_or("headers have no version line")?;
    let status = version
        .strip_prefix("NATS/1.0")
        .ok_or("headers do not begin with NATS/1.0")?
        .trim();
    if !status.is_empty() {
        return Err(format!("headers carry a status line ({status:?})"));
    }
    let mut id = None;
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?} has no ':'"))?;
        let name =
            HeaderName::from_str(name).map_err(|_| format!("header name {name:?} is not valid"))?;
        let mut value = value.trim_start().to_owned();
        while let Some(more) = lines.next_if(|s| s.starts_with(char::is_whitespace)) {
            value.push_str(more);
        }
        if name == NATS_MESSAGE_ID {
            id = Some(value.trim_end().to_owned());
        }
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_the_client_would_refuse_are_named() {
        assert_eq!(
            readable_headers(b"NATS/1.0\r\nNats-Msg-Id: plug-1/1/ab\r\n\r\n"),
            Ok(Some("plug-1/1/ab".to_owned()))
        );
        assert_eq!(readable_headers(b"NATS/1.0\r\n\r\n"), Ok(None));
        for bad in [
            &b"NATS/1.0\r\nX: \xff\r\n\r\n"[..],
            b"NATS/1.0\r\nno colon\r\n\r\n",
            b"NATS/1.0\r\nBad Name: v\r\n\r\n",
            b"NATS/1.0 503\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
            b"",
        ] {
            assert!(readable_headers(bad).is_err(), "{bad:?}");
        }
    }
}
