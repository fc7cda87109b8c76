//! One conformance suite for every transport: the same tests, written once as
//! generic functions over a [`Fixture`], instantiated per broker by
//! `conformance_suite!`. NATS runs against real `nats-server` processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use futures_util::future::join_all;
use georelay_testkit::{wait_until, NatsRegion, ServiceBusDouble};
use georelay_transport::nats::NatsNamespace;
use georelay_transport::servicebus::{ServiceBusConfig, ServiceBusNamespace};
use georelay_transport::{Delivery, ErrorKind, Limits, Namespace};
use std::time::{Duration, Instant};

const PUBLISH_DEADLINE: Duration = Duration::from_millis(500);
const REQUEST_DEADLINE: Duration = Duration::from_secs(1);

fn limits() -> Limits {
    Limits {
        publish_deadline: PUBLISH_DEADLINE,
        request_deadline: REQUEST_DEADLINE,
        ..Limits::default()
    }
}

/// A broker a test can start, connect to, kill, freeze and thaw.
trait Fixture: Sized {
    async fn start() -> Self;
    /// A new connection, as a new process would make.
    async fn connect(&self) -> Namespace;
    fn kill(&mut self);
    fn pause(&mut self);
    fn resume(&mut self);
}

struct Nats {
    region: NatsRegion,
}

impl Fixture for Nats {
    async fn start() -> Self {
        Self {
            region: NatsRegion::start("conformance").unwrap(),
        }
    }
    async fn connect(&self) -> Namespace {
        let ns = NatsNamespace::connect(&self.region.url(), limits())
            .await
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || async { ns.is_connected() }).await,
            "connects"
        );
        Namespace::Nats(ns)
    }
    fn kill(&mut self) {
        self.region.kill();
    }
    fn pause(&mut self) {
        self.region.pause().unwrap();
    }
    fn resume(&mut self) {
        self.region.resume().unwrap();
    }
}

const SB_POLICY: &str = "RootManageSharedAccessKey";
const SB_KEY: &str = "c2VjcmV0LXNhcy1rZXktZm9yLXRoZS1kb3VibGU=";

/// Service Bus through the real crate and adapter, against the local double.
struct ServiceBus {
    double: ServiceBusDouble,
}

impl ServiceBus {
    fn config(&self, key: &str) -> ServiceBusConfig {
        let mut config =
            ServiceBusConfig::new(&self.double.endpoint(), SB_POLICY, key.to_owned().into());
        config.lock_duration = Duration::from_secs(5);
        config.rewrite_to = Some(self.double.base_url().unwrap());
        config
    }
}

impl Fixture for ServiceBus {
    async fn start() -> Self {
        Self {
            double: ServiceBusDouble::start("georelay-conformance", SB_POLICY, SB_KEY).unwrap(),
        }
    }
    /// Ready to read: a fresh reader reads nothing until an earlier
    /// reader's locks have expired (one lock duration).
    async fn connect(&self) -> Namespace {
        let ns =
            Namespace::ServiceBus(ServiceBusNamespace::new(self.config(SB_KEY), limits()).unwrap());
        tokio::time::sleep(Duration::from_secs(5)).await;
        ns
    }
    fn kill(&mut self) {
        self.double.kill();
    }
    fn pause(&mut self) {
        self.double.pause();
    }
    fn resume(&mut self) {
        self.double.resume();
    }
}

const Q: &str = "conformance";

fn id(n: usize) -> String {
    format!("dev-1/{n}")
}

fn body(n: usize) -> Bytes {
    Bytes::from(format!("payload {n}"))
}

async fn publish_range(ns: &Namespace, range: std::ops::RangeInclusive<usize>) {
    for n in range {
        ns.publish(Q, &id(n), body(n)).await.unwrap();
    }
}

/// Receives until `count` messages came or the queue stays empty.
async fn receive_n(ns: &Namespace, count: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    while out.len() < count {
        let batch = ns
            .receive(Q, count - out.len(), Duration::from_millis(500))
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        out.extend(batch);
    }
    out
}

fn ids(batch: &[Delivery]) -> Vec<String> {
    batch.iter().map(|d| d.id.clone().unwrap()).collect()
}

fn expected(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(id).collect()
}

async fn round_trip<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    publish_range(&ns, 1..=3).await;
    let got = receive_n(&ns, 3).await;
    assert_eq!(ids(&got), expected(1..=3));
    assert_eq!(
        got.iter().map(|d| d.payload.clone()).collect::<Vec<_>>(),
        (1..=3).map(body).collect::<Vec<_>>()
    );
    ns.ack(got).await.unwrap();
    assert_eq!(ns.depth(Q).await.unwrap(), 0);
    assert!(ns.probe().await.unwrap() < REQUEST_DEADLINE);
}

/// `wait` bounds the wait for the first message, not for a full batch: a
/// worker draining a quiet queue must not hold each record for `wait`.
async fn receive_returns_without_waiting_for_a_full_batch<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    // A first (empty) receive: a Service Bus reader's first one may wait.
    assert!(ns
        .receive(Q, 1, Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());
    publish_range(&ns, 1..=3).await;
    let started = std::time::Instant::now();
    let got = ns.receive(Q, 500, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ids(&got), expected(1..=3));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    ns.ack(got).await.unwrap();
    // Empty when the call starts: the first message to come is handed over.
    let late = ns.clone();
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        late.publish(Q, &id(4), body(4)).await.unwrap();
    });
    let started = std::time::Instant::now();
    let got = ns.receive(Q, 500, Duration::from_secs(5)).await.unwrap();
    publisher.await.unwrap();
    assert_eq!(ids(&got), expected(4..=4));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

async fn order_preserved_over_10_000<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    publish_range(&ns, 1..=10_000).await;
    let mut next = 1;
    while next <= 10_000 {
        let batch = ns.receive(Q, 500, Duration::from_secs(1)).await.unwrap();
        assert!(!batch.is_empty(), "queue ran dry at {next}");
        let want = expected(next..=next + batch.len() - 1);
        assert_eq!(ids(&batch), want);
        next += batch.len();
        ns.ack(batch).await.unwrap();
    }
    assert_eq!(ns.depth(Q).await.unwrap(), 0);
}

async fn batch_is_queued_in_order<F: Fixture>() {
    let mut f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    let items: Vec<(String, Bytes)> = (1..=300).map(|n| (id(n), body(n))).collect();
    ns.publish_batch(Q, &items).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 300 {
        let batch = ns.receive(Q, 300, Duration::from_secs(1)).await.unwrap();
        assert!(!batch.is_empty(), "queue ran dry at {}", got.len());
        got.extend(ids(&batch));
        ns.ack(batch).await.unwrap();
    }
    assert_eq!(got, expected(1..=300));
    f.kill();
    let started = Instant::now();
    let (failed_at, err) = ns.publish_batch(Q, &items[..3]).await.unwrap_err();
    assert_eq!(failed_at, 0, "{err}");
    assert!(
        started.elapsed() <= PUBLISH_DEADLINE + Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

async fn duplicate_id_is_suppressed<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    ns.publish(Q, &id(1), body(1)).await.unwrap();
    ns.publish(Q, &id(1), body(1)).await.unwrap();
    ns.publish(Q, &id(2), body(2)).await.unwrap();
    assert_eq!(ns.depth(Q).await.unwrap(), 2);
    assert_eq!(ids(&receive_n(&ns, 3).await), expected(1..=2));
}

async fn ack_removes_and_depth_counts<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    assert_eq!(ns.depth(Q).await.unwrap(), 0);
    publish_range(&ns, 1..=7).await;
    assert_eq!(ns.depth(Q).await.unwrap(), 7);
    let got = receive_n(&ns, 3).await;
    assert_eq!(
        ns.depth(Q).await.unwrap(),
        7,
        "received but unacked still counts"
    );
    ns.ack(got).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || async {
            ns.depth(Q).await.unwrap() == 4
        })
        .await
    );
    assert_eq!(
        ids(&receive_n(&ns, 10).await),
        expected(4..=7),
        "acked messages are gone"
    );
}

async fn unacked_are_redelivered_in_order<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    publish_range(&ns, 1..=10).await;

    // Ack the first three of six, give the rest back.
    let mut got = receive_n(&ns, 6).await;
    let rest = got.split_off(3);
    ns.ack(got).await.unwrap();
    ns.nack(Q, rest).await.unwrap();
    let again = receive_n(&ns, 10).await;
    assert_eq!(
        ids(&again),
        expected(4..=10),
        "nacked first, in order, then the rest"
    );

    // A reader that dies without acking: a new connection (a new process)
    // starts again at the oldest unacked message.
    drop(again);
    drop(ns);
    let fresh = f.connect().await;
    assert_eq!(ids(&receive_n(&fresh, 10).await), expected(4..=10));
}

/// What a reader dropped without acking or nacking (a batch whose store
/// failed, a batch read ahead, a later epoch's messages) comes first again
/// once the queue is given back with an empty nack: nothing of it is left
/// locked to nobody while newer messages are read past it.
async fn dropped_deliveries_come_first_after_a_nack<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    publish_range(&ns, 1..=9).await;
    let first = receive_n(&ns, 3).await;
    let ahead = receive_n(&ns, 3).await;
    assert_eq!(ids(&first), expected(1..=3));
    assert_eq!(ids(&ahead), expected(4..=6));
    ns.ack(first).await.unwrap();
    drop(ahead);
    ns.nack(Q, Vec::new()).await.unwrap();
    assert_eq!(
        ids(&receive_n(&ns, 10).await),
        expected(4..=9),
        "the dropped messages first, in order"
    );
}

async fn publish_to_a_killed_server_fails_within_the_deadline<F: Fixture>() {
    let mut f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    f.kill();
    let started = Instant::now();
    let err = ns.publish(Q, &id(1), body(1)).await.unwrap_err();
    assert!(
        started.elapsed() <= PUBLISH_DEADLINE + Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err.kind(), ErrorKind::Unreachable | ErrorKind::Timeout),
        "{err}"
    );
    let err = ns.probe().await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Unreachable | ErrorKind::Timeout),
        "{err}"
    );
}

/// A frozen server: every publish returns (an error) within its deadline,
/// even with more publishes in flight than the client buffers (async-nats
/// blocks `publish()` itself at about 5,000 outstanding acks), and the
/// connection recovers after SIGCONT.
async fn publish_to_a_frozen_server_returns_within_the_deadline_and_recovers<F: Fixture>() {
    let mut f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    ns.publish(Q, &id(0), body(0)).await.unwrap();
    f.pause();
    let started = Instant::now();
    let publishes = join_all((1..=6_000).map(|n| {
        let ns = ns.clone();
        async move {
            let t = Instant::now();
            let r = ns.publish(Q, &id(n), body(n)).await;
            (r, t.elapsed())
        }
    }));
    // A hang fails the test instead of stalling it.
    let results = tokio::time::timeout(Duration::from_secs(10), publishes)
        .await
        .expect("publishes hung");
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap();
    assert!(
        slowest <= PUBLISH_DEADLINE + Duration::from_millis(500),
        "slowest publish took {slowest:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "all returned: {:?}",
        started.elapsed()
    );
    assert!(
        results.iter().all(|(r, _)| r.is_err()),
        "a frozen server acks nothing"
    );
    assert!(results
        .iter()
        .all(|(r, _)| r.as_ref().unwrap_err().kind() != ErrorKind::Rejected));
    let probe = ns.probe().await.unwrap_err();
    assert!(
        matches!(probe.kind(), ErrorKind::Timeout | ErrorKind::Unreachable),
        "{probe}"
    );

    f.resume();
    let recovered = wait_until(Duration::from_secs(15), || async {
        ns.publish(Q, &id(9_999), body(9_999)).await.is_ok()
    })
    .await;
    assert!(recovered, "publishes succeed again after SIGCONT");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            ns.probe().await.is_ok()
        })
        .await,
        "probes answer again"
    );
}

/// A message over the namespace's limit is refused before it is sent, as
/// the sender's fault; the connection stays up for everyone else. (Sent to
/// nats-server, it closed the connection: every sender on it saw the region
/// as down.)
async fn a_message_over_the_limit_is_refused_and_the_connection_stays<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    ns.ensure_queue(Q).await.unwrap();
    let limit = ns.max_payload().expect("the limit is known once connected");
    let big = Bytes::from(vec![7u8; limit + 1]);
    let err = ns.publish(Q, &id(1), big.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert_eq!(err.limit(), Some(limit));
    let items = vec![(id(2), body(2)), (id(3), big)];
    let (at, err) = ns.publish_batch(Q, &items).await.unwrap_err();
    assert_eq!((at, err.kind()), (1, ErrorKind::TooLarge));
    assert_eq!(
        ns.depth(Q).await.unwrap(),
        0,
        "nothing of that batch is sent"
    );
    // At the limit it goes through, on the same connection, at once.
    ns.publish(Q, &id(4), Bytes::from(vec![7u8; limit]))
        .await
        .unwrap();
    ns.publish(Q, &id(5), body(5)).await.unwrap();
    assert_eq!(ns.depth(Q).await.unwrap(), 2);
}

async fn queue_is_created_on_demand<F: Fixture>() {
    let f = F::start().await;
    let ns = f.connect().await;
    let err = ns.publish("fresh", &id(1), body(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected, "{err}");
    ns.ensure_queue("fresh").await.unwrap();
    ns.ensure_queue("fresh").await.unwrap();
    ns.publish("fresh", &id(1), body(1)).await.unwrap();
    assert_eq!(ns.depth("fresh").await.unwrap(), 1);
}

macro_rules! conformance_suite {
    ($module:ident, $fixture:ty) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn round_trip() {
                super::round_trip::<$fixture>().await
            }
            #[tokio::test]
            async fn dropped_deliveries_come_first_after_a_nack() {
                super::dropped_deliveries_come_first_after_a_nack::<$fixture>().await
            }
            #[tokio::test]
            async fn receive_returns_without_waiting_for_a_full_batch() {
                super::receive_returns_without_waiting_for_a_full_batch::<$fixture>().await
            }
            #[tokio::test]
            async fn order_preserved_over_10_000() {
                super::order_preserved_over_10_000::<$fixture>().await
            }
            #[tokio::test]
            async fn batch_is_queued_in_order() {
                super::batch_is_queued_in_order::<$fixture>().await
            }
            #[tokio::test]
            async fn duplicate_id_is_suppressed() {
                super::duplicate_id_is_suppressed::<$fixture>().await
            }
            #[tokio::test]
            async fn ack_removes_and_depth_counts() {
                super::ack_removes_and_depth_counts::<$fixture>().await
            }
            #[tokio::test]
            async fn unacked_are_redelivered_in_order() {
                super::unacked_are_redelivered_in_order::<$fixture>().await
            }
            #[tokio::test]
            async fn publish_to_a_killed_server_fails_within_the_deadline() {
                super::publish_to_a_killed_server_fails_within_the_deadline::<$fixture>().await
            }
            #[tokio::test]
            async fn publish_to_a_frozen_server_returns_within_the_deadline_and_recovers() {
                super::publish_to_a_frozen_server_returns_within_the_deadline_and_recovers::<$fixture>().await
            }
            #[tokio::test]
            async fn a_message_over_the_limit_is_refused_and_the_connection_stays() {
                super::a_message_over_the_limit_is_refused_and_the_connection_stays::<$fixture>().await
            }
            #[tokio::test]
            async fn queue_is_created_on_demand() {
                super::queue_is_created_on_demand::<$fixture>().await
            }
        }
    };
}

conformance_suite!(nats, Nats);
conformance_suite!(servicebus, ServiceBus);

/// The double checks SAS signatures as Service Bus does: a wrong key is
/// refused as an auth error, and every call above passed the check.
#[tokio::test]
async fn servicebus_refuses_a_wrong_sas_key() {
    let f = ServiceBus::start().await;
    let good = f.connect().await;
    good.ensure_queue(Q).await.unwrap();
    good.publish(Q, &id(1), body(1)).await.unwrap();
    assert_eq!(f.double.auth_failures(), 0);
    let bad = Namespace::ServiceBus(
        ServiceBusNamespace::new(f.config("d3Jvbmcta2V5"), limits()).unwrap(),
    );
    let err = bad.publish(Q, &id(2), body(2)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert_eq!(bad.probe().await.unwrap_err().kind(), ErrorKind::Auth);
    assert_eq!(f.double.auth_failures(), 2);
    assert_eq!(good.depth(Q).await.unwrap(), 1);
}
