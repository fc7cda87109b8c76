//! A local HTTP double of the Azure Service Bus REST API: the subset georelay
//! uses (create queue, queue description, send, peek-lock, complete, unlock,
//! renew), checked the way the service checks it.
//!
//! - Every request must carry a SAS token for the namespace's policy: the
//!   signature is HMAC-SHA256 under the key over `"{url-encoded sr}\n{se}"`,
//!   the policy name must match, the token must not be expired, and `sr` must
//!   be a prefix of the requested `https://NAME.servicebus.windows.net/…` URL.
//!   Refusals are 401 and counted ([`ServiceBusDouble::auth_failures`]).
//! - `MaxDeliveryCount` (10 unless the queue was created or updated with
//!   another; `PUT` with `If-Match: *` updates): a message delivered that
//!   many times moves, at its next delivery, to the queue's dead-letter
//!   sub-queue, readable (peek-lock, complete) at `{queue}/$DeadLetterQueue`.
//!   The description's `MessageCount` counts both; `CountDetails` splits
//!   them (`ActiveMessageCount`, `DeadLetterMessageCount`).
//! - Queues keep messages in sequence order; duplicate detection by
//!   `MessageId` when the queue was created with it (at most 128 characters,
//!   else 400); peek-lock hands out the
//!   oldest unlocked message, locks expire after the queue's `LockDuration`.
//! - Sequence numbers are those of a partitioned entity: `SequenceNumber` and
//!   `EnqueuedSequenceNumber` do not fit in an `i32`.
//! - A message moved to the dead-letter sub-queue carries the service's
//!   `DeadLetterReason` (`MaxDeliveryCountExceeded`) as a custom property
//!   (a response header).
//! - Faults: [`kill`](ServiceBusDouble::kill) drops the server and every
//!   connection (refused from then on) and [`restart`](ServiceBusDouble::restart)
//!   serves the same namespace again on the same port, its queues kept;
//!   [`pause`](ServiceBusDouble::pause) accepts requests and answers none
//!   until [`resume`](ServiceBusDouble::resume).
//! - [`set_latency`](ServiceBusDouble::set_latency) adds a round trip to
//!   every request, so figures resemble a real namespace's.
//!
//! The server runs on a runtime of its own, so killing it closes its sockets
//! whatever the test's runtime is doing.

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::Sha256;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// First sequence numbers handed out: beyond `i32`, as partitioned entities do.
const SEQUENCE_BASE: i64 = 1 << 40;
const ENQUEUED_SEQUENCE_BASE: i64 = 3_000_000_000;
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct ServiceBusDouble {
    namespace: String,
    addr: SocketAddr,
    state: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

#[derive(Debug)]
struct Shared {
    namespace: String,
    key_name: String,
    /// The SAS key; [`ServiceBusDouble::rotate_key`] replaces it, as
    /// regenerating a policy's key does on the service.
    key: Mutex<String>,
    queues: Mutex<HashMap<String, Queue>>,
    paused: watch::Sender<bool>,
    auth_failures: AtomicUsize,
    /// Send requests (one message or one batch each).
    sends: AtomicUsize,
    /// Added to every request's answer.
    latency: Mutex<Duration>,
}

#[derive(Debug)]
struct Queue {
    messages: BTreeMap<i64, Message>,
    seen: HashMap<String, Instant>,
    duplicate_detection: bool,
    lock_duration: Duration,
    max_delivery_count: u32,
    /// Bytes the queue holds at most (the service's `MaxSizeInMegabytes`);
    /// past it a send is refused with 403, as the service answers.
    max_size: Option<usize>,
    next: i64,
}

/// The service's default `MaxDeliveryCount`.
const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;

/// The dead-letter sub-queue of `queue`, as its path names it.
fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}/$DeadLetterQueue")
}

#[derive(Debug)]
struct Message {
    id: Option<String>,
    body: Bytes,
    enqueued_at: SystemTime,
    delivery_count: u32,
    lock: Option<(String, Instant)>,
    /// Why the service moved it to the dead-letter sub-queue.
    dead_letter_reason: Option<&'static str>,
}

impl ServiceBusDouble {
    /// Serves namespace `namespace` with one SAS policy on 127.0.0.1.
    pub fn start(namespace: &str, key_name: &str, key: &str) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Shared {
            namespace: namespace.to_owned(),
            key_name: key_name.to_owned(),
            key: Mutex::new(key.to_owned()),
            queues: Mutex::new(HashMap::new()),
            paused: watch::channel(false).0,
            auth_failures: AtomicUsize::new(0),
            sends: AtomicUsize::new(0),
            latency: Mutex::new(Duration::ZERO),
        });
        let runtime = serve(state.clone(), listener)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            addr,
            state,
            runtime: Some(runtime),
        })
    }

    /// Serves again on the same port after [`kill`](Self::kill), with the
    /// queues and messages it had.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("cannot listen on {} again", self.addr))?;
        self.runtime = Some(serve(self.state.clone(), listener)?);
        Ok(())
    }

    /// The port it serves on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.namespace
    }

    /// Adds `latency` to every answer from now on (a round trip to a real
    /// namespace is a few milliseconds).
    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock() = latency;
    }

    /// Messages in `queue`'s dead-letter sub-queue.
    pub fn dead_lettered(&self, queue: &str) -> usize {
        with_queue(&self.state, &dead_letter_queue(queue), |q| q.messages.len()).unwrap_or(0)
    }

    /// `https://NAME.servicebus.windows.net`: what `namespaces.endpoint` holds.
    pub fn endpoint(&self) -> String {
        format!("https://{}.servicebus.windows.net", self.namespace)
    }

    /// `http://127.0.0.1:PORT/NAME`: the endpoint a namespace row holds so
    /// that georelay processes reach this double (signed as for
    /// [`endpoint`](Self::endpoint)).
    pub fn local_endpoint(&self) -> String {
        format!("http://{}/{}", self.addr, self.namespace)
    }

    /// Where requests for [`endpoint`](Self::endpoint) must be sent instead.
    pub fn base_url(&self) -> anyhow::Result<url::Url> {
        url::Url::parse(&format!("http://{}", self.addr)).context("double address")
    }

    /// Regenerates the policy's key: from now on only tokens signed with
    /// `key` are accepted.
    pub fn rotate_key(&self, key: &str) {
        *self.state.key.lock() = key.to_owned();
    }

    /// Requests refused for a missing or wrong SAS token so far.
    /// Creates `queue` as the portal would with its defaults (duplicate
    /// detection on, `MaxDeliveryCount` 10): a queue made before georelay.
    pub fn create_queue_with_defaults(&self, queue: &str) {
        create_queue(
            &self.state,
            queue,
            b"<RequiresDuplicateDetection>true</RequiresDuplicateDetection>",
            false,
        );
    }

    /// Sets `queue`'s `LockDuration`, as an operator would in the portal;
    /// locks already taken keep their expiry.
    pub fn set_lock_duration(&self, queue: &str, lock: Duration) {
        with_queue(&self.state, queue, |q| q.lock_duration = lock);
    }

    /// Caps what `queue` holds at `bytes` (the service's
    /// `MaxSizeInMegabytes`, whose smallest is 1 GiB, scaled for a test).
    pub fn set_max_size(&self, queue: &str, bytes: usize) {
        with_queue(&self.state, queue, |q| q.max_size = Some(bytes));
    }

    /// Send requests so far (a batch is one).
    pub fn sends(&self) -> usize {
        self.state.sends.load(Ordering::SeqCst)
    }

    pub fn auth_failures(&self) -> usize {
        self.state.auth_failures.load(Ordering::SeqCst)
    }

    /// Down: the server and all its connections are gone.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Lost for good: down, and every queue and message it had is gone.
    pub fn lose(&mut self) {
        self.kill();
        self.state.queues.lock().clear();
    }

    /// Hung: requests are accepted and not answered until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }
}

/// Serves the namespace `state` on `listener`, on a runtime of its own.
fn serve(
    state: Arc<Shared>,
    listener: std::net::TcpListener,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("servicebus-double")
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    let app = axum::Router::new().fallback(handle).with_state(state);
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    runtime.spawn(async move { axum::serve(listener, app).await });
    Ok(runtime)
}

impl Drop for ServiceBusDouble {
    fn drop(&mut self) {
        self.kill();
    }
}

fn status(code: StatusCode) -> Response {
    code.into_response()
}

/// Serves one request on a task of its own: as on the service, a request
/// takes effect once it arrived, whether or not its client still waits for
/// the answer (a peek-lock whose answer is lost still locks a message).
async fn handle(
    State(state): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    tokio::spawn(serve_request(state, method, uri, headers, body))
        .await
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
}

async fn serve_request(
    state: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut unpaused = state.paused.subscribe();
    if unpaused.wait_for(|paused| !*paused).await.is_err() {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let latency = *state.latency.lock();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if !authorized(&state, &uri, &headers) {
        state.auth_failures.fetch_add(1, Ordering::SeqCst);
        return status(StatusCode::UNAUTHORIZED);
    }
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["$Resources", "Queues"]) => (
            StatusCode::OK,
            "<feed xmlns=\"http://www.w3.org/2005/Atom\"/>",
        )
            .into_response(),
        (&Method::PUT, [queue]) => {
            let update = headers.get("if-match").is_some_and(|v| v == "*");
            create_queue(&state, queue, &body, update)
        }
        (&Method::GET, [queue]) => describe_queue(&state, queue),
        (&Method::POST, [queue, "messages"]) => send(&state, queue, &headers, body),
        (&Method::POST, [queue, "messages", "head"]) => peek_lock(&state, queue, &uri).await,
        (&Method::POST, [queue, "$DeadLetterQueue", "messages", "head"]) => {
            peek_lock(&state, &dead_letter_queue(queue), &uri).await
        }
        (m, [queue, "messages", seq, lock]) => settle(&state, m, queue, seq, lock),
        (m, [queue, "$DeadLetterQueue", "messages", seq, lock]) => {
            settle(&state, m, &dead_letter_queue(queue), seq, lock)
        }
        _ => status(StatusCode::NOT_FOUND),
    }
}

/// The SAS check Service Bus does.
fn authorized(state: &Shared, uri: &Uri, headers: &HeaderMap) -> bool {
    let Some(token) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(fields) = token.strip_prefix("SharedAccessSignature ") else {
        return false;
    };
    let field = |name: &str| {
        fields
            .split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let (Some(sr), Some(sig), Some(se), Some(skn)) =
        (field("sr"), field("sig"), field("se"), field("skn"))
    else {
        return false;
    };
    let Ok(expiry) = se.parse::<u64>() else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(u64::MAX);
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    let (Some(resource), Some(signature)) = (decode(sr), decode(sig)) else {
        return false;
    };
    let key = state.key.lock().clone();
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key.as_bytes()) else {
        return false;
    };
    mac.update(format!("{sr}\n{se}").as_bytes());
    let Ok(signature) = B64.decode(signature) else {
        return false;
    };
    let path_and_query = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let requested = format!(
        "https://{}.servicebus.windows.net{path_and_query}",
        state.namespace
    )
    .to_lowercase();
    skn == state.key_name
        && expiry > now
        && requested.starts_with(&resource.to_lowercase())
        && mac.verify_slice(&signature).is_ok()
}

fn with_queue<R>(state: &Shared, queue: &str, f: impl FnOnce(&mut Queue) -> R) -> Option<R> {
    let mut queues = state.queues.lock();
    queues.get_mut(queue).map(f)
}

fn create_queue(state: &Shared, queue: &str, body: &[u8], update: bool) -> Response {
    let text = String::from_utf8_lossy(body);
    let tag = |name: &str| {
        text.split_once(&format!("<{name}>"))
            .and_then(|(_, rest)| rest.split_once(&format!("</{name}>")))
            .map(|(v, _)| v.trim().to_owned())
    };
    let lock_duration = tag("LockDuration")
        .and_then(|v| {
            v.strip_prefix("PT")
                .and_then(|s| s.strip_suffix('S'))
                .and_then(|n| n.parse().ok())
        })
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    let max_delivery_count = tag("MaxDeliveryCount")
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|n| (1..=i32::MAX as u32).contains(n))
        .unwrap_or(DEFAULT_MAX_DELIVERY_COUNT);
    let mut queues = state.queues.lock();
    if let Some(q) = queues.get_mut(queue) {
        if !update {
            return status(StatusCode::CONFLICT);
        }
        q.lock_duration = lock_duration;
        q.max_delivery_count = max_delivery_count;
        return status(StatusCode::OK);
    }
    let duplicate_detection = tag("RequiresDuplicateDetection").as_deref() == Some("true");
    for (name, max) in [
        (queue.to_owned(), max_delivery_count),
        (dead_letter_queue(queue), u32::MAX),
    ] {
        queues.insert(
            name,
            Queue {
                messages: BTreeMap::new(),
                seen: HashMap::new(),
                duplicate_detection,
                lock_duration,
                max_delivery_count: max,
                max_size: None,
                next: 0,
            },
        );
    }
    status(StatusCode::CREATED)
}

fn describe_queue(state: &Shared, queue: &str) -> Response {
    let described = with_queue(state, queue, |q| {
        (q.messages.len(), q.lock_duration, q.max_delivery_count)
    });
    let dead = with_queue(state, &dead_letter_queue(queue), |q| q.messages.len()).unwrap_or(0);
    match described {
        Some((active, lock, max)) => (
            StatusCode::OK,
            format!(
                "<entry xmlns=\"http://www.w3.org/2005/Atom\"><title>{queue}</title><content type=\"application/xml\"><QueueDescription xmlns=\"http://schemas.microsoft.com/netservices/2010/10/servicebus/connect\"><LockDuration>PT{}S</LockDuration><MaxDeliveryCount>{max}</MaxDeliveryCount><MessageCount>{}</MessageCount><CountDetails xmlns:d2p1=\"http://schemas.microsoft.com/netservices/2011/06/servicebus\"><d2p1:ActiveMessageCount>{active}</d2p1:ActiveMessageCount><d2p1:DeadLetterMessageCount>{dead}</d2p1:DeadLetterMessageCount><d2p1:ScheduledMessageCount>0</d2p1:ScheduledMessageCount><d2p1:TransferMessageCount>0</d2p1:TransferMessageCount><d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount></CountDetails></QueueDescription></content></entry>",
                lock.as_secs(),
                active + dead
            ),
        )
            .into_response(),
        None => status(StatusCode::NOT_FOUND),
    }
}

/// Moves every message of `queue` that is free to be delivered again but
/// has been delivered `MaxDeliveryCount` times to its dead-letter sub-queue,
/// as the service does at its next delivery.
fn dead_letter_exhausted(state: &Shared, queue: &str) {
    let mut queues = state.queues.lock();
    let now = Instant::now();
    let Some(q) = queues.get_mut(queue) else {
        return;
    };
    let max = q.max_delivery_count;
    let exhausted: Vec<i64> = q
        .messages
        .iter()
        .filter(|(_, m)| {
            m.delivery_count >= max && m.lock.as_ref().is_none_or(|(_, until)| *until <= now)
        })
        .map(|(seq, _)| *seq)
        .collect();
    let moved: Vec<Message> = exhausted
        .iter()
        .filter_map(|seq| q.messages.remove(seq))
        .collect();
    if let Some(dlq) = queues.get_mut(&dead_letter_queue(queue)) {
        for mut m in moved {
            m.lock = None;
            m.dead_letter_reason = Some("MaxDeliveryCountExceeded");
            dlq.next += 1;
            dlq.messages.insert(dlq.next, m);
        }
    }
}

/// One message in (`brokerproperties` header, raw body), or a batch: content
/// type `application/vnd.microsoft.servicebus.json`, a JSON array of
/// `{"Body": string, "BrokerProperties": {...}}`, queued in order, as the
/// REST API's batch send does.
fn send(state: &Shared, queue: &str, headers: &HeaderMap, body: Bytes) -> Response {
    state.sends.fetch_add(1, Ordering::SeqCst);
    let batch = headers.get("content-type").is_some_and(|v| {
        v.as_bytes()
            .starts_with(b"application/vnd.microsoft.servicebus.json")
    });
    let messages: Vec<(Option<String>, Bytes)> = if batch {
        let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(&body) else {
            return (StatusCode::BAD_REQUEST, "The batch is not a JSON array.").into_response();
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let Some(body) = item.get("Body").and_then(|b| b.as_str()) else {
                return (StatusCode::BAD_REQUEST, "A batch message has no Body.").into_response();
            };
            let id = item["BrokerProperties"]["MessageId"]
                .as_str()
                .map(str::to_owned);
            out.push((id, Bytes::from(body.to_owned())));
        }
        out
    } else {
        let id = headers
            .get("brokerproperties")
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(v.as_bytes()).ok())
            .and_then(|p| {
                p.get("MessageId")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            });
        vec![(id, body)]
    };
    // The service's limit on a MessageId.
    if messages
        .iter()
        .any(|(id, _)| id.as_ref().is_some_and(|id| id.chars().count() > 128))
    {
        return (
            StatusCode::BAD_REQUEST,
            "The value supplied for MessageId exceeds the max length of 128.",
        )
            .into_response();
    }
    let sent = with_queue(state, queue, |q| {
        let held: usize = q.messages.values().map(|m| m.body.len()).sum();
        let adding: usize = messages.iter().map(|(_, b)| b.len()).sum();
        if q.max_size.is_some_and(|max| held + adding > max) {
            return Err(held);
        }
        for (id, body) in messages {
            let now = Instant::now();
            if let (true, Some(id)) = (q.duplicate_detection, &id) {
                q.seen
                    .retain(|_, at| now.duration_since(*at) < DUPLICATE_WINDOW);
                if q.seen.insert(id.clone(), now).is_some() {
                    continue;
                }
            }
            q.next += 1;
            let message = Message {
                id,
                body,
                enqueued_at: SystemTime::now(),
                delivery_count: 0,
                lock: None,
                dead_letter_reason: None,
            };
            q.messages.insert(q.next, message);
        }
        Ok(())
    });
    match sent {
        Some(Ok(())) => status(StatusCode::CREATED),
        Some(Err(held)) => (
            StatusCode::FORBIDDEN,
            format!("<Error><Code>403</Code><Detail>The maximum entity size has been reached or exceeded for Queue: '{}:Queue:{queue}'. Size of entity in bytes:{held}. For more information please see https://aka.ms/ServiceBusExceptions . TrackingId:double</Detail></Error>", state.namespace),
        )
            .into_response(),
        None => status(StatusCode::NOT_FOUND),
    }
}

async fn peek_lock(state: &Shared, queue: &str, uri: &Uri) -> Response {
    let wait = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("timeout=")))
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    let started = Instant::now();
    loop {
        dead_letter_exhausted(state, queue);
        let locked = with_queue(state, queue, |q| {
            let now = Instant::now();
            let lock_duration = q.lock_duration;
            let (seq, m) = q
                .messages
                .iter_mut()
                .find(|(_, m)| m.lock.as_ref().is_none_or(|(_, until)| *until <= now))?;
            let token = uuid::Uuid::new_v4().to_string();
            m.lock = Some((token.clone(), now + lock_duration));
            m.delivery_count += 1;
            Some((
                *seq,
                token,
                m.id.clone(),
                m.body.clone(),
                m.enqueued_at,
                m.delivery_count,
                lock_duration,
                m.dead_letter_reason,
            ))
        });
        match locked {
            None => return status(StatusCode::NOT_FOUND),
            Some(Some((seq, token, id, body, enqueued_at, deliveries, lock_duration, reason))) => {
                let props = serde_json::json!({
                    "DeliveryCount": deliveries,
                    "EnqueuedSequenceNumber": ENQUEUED_SEQUENCE_BASE + seq,
                    "EnqueuedTimeUtc": httpdate::fmt_http_date(enqueued_at),
                    "LockToken": token,
                    "LockedUntilUtc": httpdate::fmt_http_date(SystemTime::now() + lock_duration),
                    "MessageId": id.unwrap_or_default(),
                    "SequenceNumber": SEQUENCE_BASE + seq,
                    "State": "Active",
                    "TimeToLive": 922_337_203_685.477_5,
                });
                let location = format!(
                    "https://{}.servicebus.windows.net/{queue}/messages/{}/{token}",
                    state.namespace,
                    SEQUENCE_BASE + seq
                );
                let mut response = (StatusCode::CREATED, body).into_response();
                let headers = response.headers_mut();
                let reason = reason.map(|r| ("deadletterreason", format!("\"{r}\"")));
                for (name, value) in [
                    ("brokerproperties", props.to_string()),
                    ("location", location),
                ]
                .into_iter()
                .chain(reason)
                {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(name, v);
                    }
                }
                return response;
            }
            Some(None) if started.elapsed() >= wait => return status(StatusCode::NO_CONTENT),
            Some(None) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// DELETE completes, PUT unlocks, POST renews the lock of one message.
fn settle(state: &Shared, method: &Method, queue: &str, seq: &str, token: &str) -> Response {
    let Ok(seq) = seq.parse::<i64>().map(|s| s - SEQUENCE_BASE) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let done = with_queue(state, queue, |q| {
        let now = Instant::now();
        let lock_duration = q.lock_duration;
        let held = q
            .messages
            .get(&seq)
            .and_then(|m| m.lock.as_ref())
            .is_some_and(|(t, until)| t == token && *until > now);
        if !held {
            return StatusCode::GONE;
        }
        match *method {
            Method::DELETE => {
                q.messages.remove(&seq);
            }
            Method::PUT => {
                if let Some(m) = q.messages.get_mut(&seq) {
                    m.lock = None;
                }
            }
            Method::POST => {
                if let Some(m) = q.messages.get_mut(&seq) {
                    m.lock = Some((token.to_owned(), now + lock_duration));
                }
            }
            _ => return StatusCode::METHOD_NOT_ALLOWED,
        }
        StatusCode::OK
    });
    status(done.unwrap_or(StatusCode::NOT_FOUND))
}
