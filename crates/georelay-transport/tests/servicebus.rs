//! Service Bus specifics beyond the conformance suite: the crate bug the
//! adapter works around, and an end-to-end run against a real namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use azure_core::{HttpClient, Request, Response, Url};
use azure_messaging_servicebus::service_bus::QueueClient;
use bytes::Bytes;
use georelay_testkit::ServiceBusDouble;
use georelay_transport::servicebus::{sas_token, ServiceBusConfig, ServiceBusNamespace};
use georelay_transport::{Limits, Namespace};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const POLICY: &str = "RootManageSharedAccessKey";
const KEY: &str = "c2VjcmV0LXNhcy1rZXktZm9yLXRoZS1kb3VibGU=";

/// Only what a test needs to reach the double: the host rewrite, and nothing
/// of the adapter's broker-properties fix.
#[derive(Debug)]
struct RewriteOnly {
    client: reqwest::Client,
    base: Url,
}

#[async_trait]
impl HttpClient for RewriteOnly {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let mut request = request.clone();
        let url = request.url_mut();
        url.set_scheme(self.base.scheme()).unwrap();
        url.set_host(self.base.host_str()).unwrap();
        url.set_port(self.base.port()).unwrap();
        self.client.execute_request(&request).await
    }
}

/// The double returns `EnqueuedSequenceNumber`s above `i32::MAX`, as
/// partitioned entities do: the crate alone fails to read such a message
/// (after locking it); through the adapter the same message is received.
#[tokio::test]
async fn sequence_numbers_beyond_i32_break_the_crate_but_not_the_adapter() {
    let double = ServiceBusDouble::start("georelay-bigseq", POLICY, KEY).unwrap();
    let mut config = ServiceBusConfig::new(&double.endpoint(), POLICY, KEY.to_owned().into());
    config.rewrite_to = Some(double.base_url().unwrap());
    config.lock_duration = Duration::from_secs(5);
    let ns = Namespace::ServiceBus(ServiceBusNamespace::new(config, Limits::default()).unwrap());
    ns.ensure_queue("q").await.unwrap();
    ns.publish("q", "dev/1", Bytes::from_static(b"reading"))
        .await
        .unwrap();

    let plain = Arc::new(RewriteOnly {
        client: reqwest::Client::new(),
        base: double.base_url().unwrap(),
    });
    let crate_only = QueueClient::new(plain, "georelay-bigseq", "q", POLICY, KEY).unwrap();
    let Err(err) = crate_only.peek_lock_message2(Some(Duration::ZERO)).await else {
        panic!("the crate read a 64-bit EnqueuedSequenceNumber: the workaround may be dropped")
    };
    assert_eq!(
        err.kind(),
        &azure_core::error::ErrorKind::DataConversion,
        "{err}"
    );

    // The crate's failed read left the message locked; the adapter reads
    // nothing until one lock duration has passed, then gets it.
    let got = ns.receive("q", 10, Duration::from_secs(6)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id.as_deref(), Some("dev/1"));
    assert_eq!(got[0].payload, Bytes::from_static(b"reading"));
    ns.ack(got).await.unwrap();
    assert_eq!(ns.depth("q").await.unwrap(), 0);
}

/// Against a real namespace, when `GEORELAY_SERVICEBUS_CONNECTION_STRING`
/// (`Endpoint=sb://NAME.servicebus.windows.net/;SharedAccessKeyName=K;SharedAccessKey=V`)
/// is set: `./dev test` then runs it. It uses (and creates) the queues
/// `georelay-e2e` (single and batch send, ordered concurrent receive,
/// duplicate detection) and `georelay-e2e-dlq` (made with
/// `MaxDeliveryCount` 1, so the service dead-letters at the second
/// delivery: the sub-queue is counted and read with the broker's reason).
#[tokio::test]
#[ignore = "needs GEORELAY_SERVICEBUS_CONNECTION_STRING (a real Service Bus namespace)"]
async fn real_namespace_round_trip() {
    let conn = std::env::var("GEORELAY_SERVICEBUS_CONNECTION_STRING")
        .expect("GEORELAY_SERVICEBUS_CONNECTION_STRING");
    let field = |name: &str| {
        conn.split(';')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("connection string lacks {name}"))
            .to_owned()
    };
    let (endpoint, key_name, key) = (
        field("Endpoint"),
        field("SharedAccessKeyName"),
        field("SharedAccessKey"),
    );
    let mut config = ServiceBusConfig::new(&endpoint, &key_name, key.clone().into());
    config.lock_duration = Duration::from_secs(5);
    let ns = Namespace::ServiceBus(ServiceBusNamespace::new(config, Limits::default()).unwrap());
    let queue = "georelay-e2e";
    ns.ensure_queue(queue).await.unwrap();
    ns.probe().await.unwrap();
    // Whatever an earlier run left, once its locks have expired.
    tokio::time::sleep(Duration::from_secs(6)).await;
    loop {
        let old = ns
            .receive(queue, 100, Duration::from_secs(1))
            .await
            .unwrap();
        if old.is_empty() {
            break;
        }
        ns.ack(old).await.unwrap();
    }
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let ids: Vec<String> = (1..=40).map(|n| format!("e2e-{run}/{n}")).collect();
    for id in &ids[..3] {
        ns.publish(queue, id, Bytes::from(id.clone()))
            .await
            .unwrap();
    }
    let batch: Vec<(String, Bytes)> = ids[3..]
        .iter()
        .map(|id| (id.clone(), Bytes::from(id.clone())))
        .collect();
    ns.publish_batch(queue, &batch).await.unwrap();
    ns.publish(queue, &ids[0], Bytes::from(ids[0].clone()))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let batch = ns.receive(queue, 50, Duration::from_secs(5)).await.unwrap();
        assert!(!batch.is_empty(), "messages arrive");
        got.extend(batch);
    }
    assert_eq!(
        got.iter()
            .map(|d| d.id.clone().unwrap())
            .collect::<Vec<_>>(),
        ids
    );
    ns.ack(got).await.unwrap();
    let extra = ns.receive(queue, 1, Duration::from_secs(2)).await.unwrap();
    assert!(extra.is_empty(), "the duplicate publish was suppressed");

    // A queue that dead-letters at the second delivery, made by hand.
    let dlq = "georelay-e2e-dlq";
    let name = endpoint
        .trim_start_matches("sb://")
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_owned();
    let resource = format!("https://{name}/{dlq}");
    let made = reqwest::Client::new()
        .put(format!("{resource}?api-version=2017-04"))
        .header("Authorization", sas_token(&resource, &key_name, key.as_bytes(), Duration::from_secs(600)))
        .header("Content-Type", "application/atom+xml;type=entry;charset=utf-8")
        .body(r#"<entry xmlns="http://www.w3.org/2005/Atom"><content type="application/xml"><QueueDescription xmlns="http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"><LockDuration>PT5S</LockDuration><MaxDeliveryCount>1</MaxDeliveryCount></QueueDescription></content></entry>"#)
        .send()
        .await
        .unwrap();
    assert!(
        made.status().is_success() || made.status() == 409,
        "{}",
        made.status()
    );
    let before = ns.dead_lettered(dlq).await.unwrap();
    let id = format!("e2e-{run}/dlq");
    ns.publish(dlq, &id, Bytes::from(id.clone())).await.unwrap();
    let once = ns.receive(dlq, 1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(once.len(), 1);
    ns.nack(dlq, once).await.unwrap();
    assert!(ns
        .receive(dlq, 1, Duration::from_secs(2))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(ns.dead_lettered(dlq).await.unwrap(), before + 1);
    let sub_queue = ns.dead_letter_queue(dlq).unwrap();
    let mut found = None;
    while found.is_none() {
        let got = ns
            .receive(&sub_queue, 10, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            !got.is_empty(),
            "the dead-lettered message is in {sub_queue}"
        );
        found = got
            .iter()
            .find(|d| d.id.as_deref() == Some(id.as_str()))
            .map(|d| d.dead_lettered.clone());
        ns.ack(got).await.unwrap();
    }
    assert_eq!(found.flatten().as_deref(), Some("MaxDeliveryCountExceeded"));
}

/// georelay's message ids run to 182 characters (a 128-character device id,
/// a seq and a content digest); the service takes 128. A longer id is sent
/// as its digest: accepted, and still deduplicated.
#[tokio::test]
async fn ids_longer_than_the_service_takes_are_accepted_and_deduplicated() {
    let double = ServiceBusDouble::start("georelay-longid", POLICY, KEY).unwrap();
    let mut config = ServiceBusConfig::new(&double.endpoint(), POLICY, KEY.to_owned().into());
    config.rewrite_to = Some(double.base_url().unwrap());
    let ns = Namespace::ServiceBus(ServiceBusNamespace::new(config, Limits::default()).unwrap());
    ns.ensure_queue("q").await.unwrap();
    let long = format!("{}/1/{}", "d".repeat(128), "f".repeat(32));
    for _ in 0..2 {
        ns.publish("q", &long, Bytes::from_static(b"reading"))
            .await
            .unwrap();
    }
    ns.publish(
        "q",
        &format!("{}/2/{}", "d".repeat(128), "f".repeat(32)),
        Bytes::from_static(b"next"),
    )
    .await
    .unwrap();
    assert_eq!(ns.depth("q").await.unwrap(), 2, "the re-send was dropped");
}

/// Reads `queue` (which holds a message) once the fresh reader may, and
/// gives back what came: from here on the reader reads at once.
async fn past_the_fresh_readers_wait(ns: &Namespace, queue: &str) {
    let first = ns.receive(queue, 1, Duration::from_secs(6)).await.unwrap();
    assert_eq!(first.len(), 1, "{queue} holds a message");
    ns.nack(queue, first).await.unwrap();
}

fn adapter(double: &ServiceBusDouble) -> Namespace {
    let mut config = ServiceBusConfig::new(&double.endpoint(), POLICY, KEY.to_owned().into());
    config.rewrite_to = Some(double.base_url().unwrap());
    config.lock_duration = Duration::from_secs(5);
    Namespace::ServiceBus(ServiceBusNamespace::new(config, Limits::default()).unwrap())
}

/// Every nack is a delivery to the service. At its default MaxDeliveryCount
/// (10) the eleventh moved the message to the dead-letter sub-queue, which
/// nothing reads: an accepted record gone, and (MessageCount counting it)
/// the queue never empty. Queues are made with the largest count, and one
/// that exists with the default is raised.
#[tokio::test]
async fn the_workers_own_redeliveries_never_dead_letter_a_message() {
    let double = ServiceBusDouble::start("georelay-mdc", POLICY, KEY).unwrap();
    double.create_queue_with_defaults("old");
    // The portal's lock is a minute; a fresh reader would wait it out.
    double.set_lock_duration("old", Duration::from_secs(5));
    let ns = adapter(&double);
    for queue in ["old", "new"] {
        ns.ensure_queue(queue).await.unwrap();
        ns.publish(queue, "dev/1/x", Bytes::from_static(b"reading"))
            .await
            .unwrap();
        for round in 0..15 {
            let got = ns.receive(queue, 10, Duration::from_secs(6)).await.unwrap();
            assert_eq!(got.len(), 1, "{queue}: delivery {round} still there");
            ns.nack(queue, got).await.unwrap();
        }
        assert_eq!(ns.depth(queue).await.unwrap(), 1, "{queue}");
    }
}

/// What the service dead-lettered is in `MessageCount` but not in the
/// queue: depth counts active messages (`CountDetails`), or an old epoch
/// holding a dead-lettered message would never count as empty.
#[tokio::test]
async fn depth_counts_active_messages_not_the_dead_letter_sub_queue() {
    let double = ServiceBusDouble::start("georelay-depth", POLICY, KEY).unwrap();
    // Made before georelay, with the default MaxDeliveryCount (10), and
    // not ensured: the service dead-letters at the eleventh delivery.
    double.create_queue_with_defaults("q");
    let ns = adapter(&double);
    ns.publish("q", "dev/1/x", Bytes::from_static(b"reading"))
        .await
        .unwrap();
    loop {
        let got = ns.receive("q", 10, Duration::from_secs(6)).await.unwrap();
        if got.is_empty() {
            break;
        }
        ns.nack("q", got).await.unwrap();
    }
    assert_eq!(ns.depth("q").await.unwrap(), 0);
}

/// A batch of records is one request (the REST API's batch send), not one
/// per record: the round trip was the ceiling on a real namespace. In order,
/// with their ids (duplicates dropped as for single sends).
#[tokio::test]
async fn a_batch_is_sent_in_one_request_in_order() {
    let double = ServiceBusDouble::start("georelay-batch", POLICY, KEY).unwrap();
    let ns = adapter(&double);
    ns.ensure_queue("q").await.unwrap();
    let items: Vec<(String, Bytes)> = (1..=50)
        .map(|n| (format!("dev/{n}/x"), Bytes::from(format!("reading {n}"))))
        .collect();
    let before = double.sends();
    ns.publish_batch("q", &items).await.unwrap();
    assert_eq!(double.sends() - before, 1, "one request");
    ns.publish_batch("q", &items[..2]).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 50 {
        let batch = ns.receive("q", 50, Duration::from_secs(6)).await.unwrap();
        assert!(!batch.is_empty(), "messages arrive");
        got.extend(batch);
    }
    let read: Vec<(String, Bytes)> = got
        .iter()
        .map(|d| (d.id.clone().unwrap(), d.payload.clone()))
        .collect();
    assert_eq!(
        read, items,
        "in order, the re-sent two dropped as duplicates"
    );
    assert_eq!(ns.depth("q").await.unwrap(), 50);
}

/// A full queue (the service's 403 "maximum entity size has been reached")
/// is reported as full — the namespace takes no records until it drains —
/// not as refused credentials (which the adapter reported, and logged).
#[tokio::test]
async fn a_full_queue_is_full_not_refused_credentials() {
    let double = ServiceBusDouble::start("georelay-full", POLICY, KEY).unwrap();
    let ns = adapter(&double);
    ns.ensure_queue("q").await.unwrap();
    double.set_max_size("q", 64);
    ns.publish("q", "dev/1/x", Bytes::from_static(b"one"))
        .await
        .unwrap();
    let err = ns
        .publish("q", "dev/2/x", Bytes::from(vec![b'x'; 100]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), georelay_transport::ErrorKind::Full, "{err}");
    let items = vec![("dev/3/x".to_owned(), Bytes::from(vec![b'x'; 100]))];
    let (at, err) = ns.publish_batch("q", &items).await.unwrap_err();
    assert_eq!((at, err.kind()), (0, georelay_transport::ErrorKind::Full));
    assert_eq!(double.auth_failures(), 0);
}

/// A batch held longer than the lock duration (a slow database) keeps its
/// locks: they are renewed, so the complete after the commit succeeds and
/// nothing comes again.
#[tokio::test]
async fn locks_are_renewed_while_a_batch_takes_long() {
    let double = ServiceBusDouble::start("georelay-renew", POLICY, KEY).unwrap();
    let ns = adapter(&double);
    ns.ensure_queue("q").await.unwrap();
    for n in 0..3 {
        ns.publish("q", &format!("dev/{n}/x"), Bytes::from_static(b"r"))
            .await
            .unwrap();
    }
    let got = ns.receive("q", 10, Duration::from_secs(6)).await.unwrap();
    assert_eq!(got.len(), 3);
    // Two lock durations (5 s each) pass while the batch is "stored".
    tokio::time::sleep(Duration::from_secs(11)).await;
    ns.ack(got).await.unwrap();
    assert_eq!(ns.depth("q").await.unwrap(), 0);
}

/// A peek-lock whose answer is lost (the namespace hung past the request
/// deadline, then took the request after all) leaves a message locked to
/// nobody. Reading on would return the message behind it first; the
/// adapter waits out that lock instead, and order holds.
#[tokio::test]
async fn a_lost_receive_answer_never_reorders() {
    let double = ServiceBusDouble::start("georelay-lost", POLICY, KEY).unwrap();
    let mut config = ServiceBusConfig::new(&double.endpoint(), POLICY, KEY.to_owned().into());
    config.rewrite_to = Some(double.base_url().unwrap());
    config.lock_duration = Duration::from_secs(5);
    let limits = Limits {
        request_deadline: Duration::from_millis(500),
        ..Limits::default()
    };
    let ns = Namespace::ServiceBus(ServiceBusNamespace::new(config, limits).unwrap());
    ns.ensure_queue("q").await.unwrap();
    for n in 1..=3 {
        ns.publish("q", &format!("dev/{n}/x"), Bytes::from_static(b"r"))
            .await
            .unwrap();
    }
    past_the_fresh_readers_wait(&ns, "q").await;
    // Hang the namespace under a receive.
    double.pause();
    let lost = ns.receive("q", 1, Duration::ZERO).await;
    assert!(lost.is_err(), "{lost:?}");
    // The hung request is served now: message 1 is locked to nobody.
    double.resume();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let got = ns.receive("q", 10, Duration::from_secs(1)).await.unwrap();
        ids.extend(got.iter().map(|d| d.id.clone().unwrap()));
        ns.ack(got).await.unwrap();
    }
    assert_eq!(ids, ["dev/1/x", "dev/2/x", "dev/3/x"]);
}

/// A queue made elsewhere with a longer lock than this reader's: a reader
/// that crashed holding a message leaves it locked for the queue's lock
/// duration, so a fresh reader waits out that one (read from the queue's
/// description), not its own, before it reads anything newer.
#[tokio::test]
async fn a_fresh_reader_waits_out_the_queues_own_lock_duration() {
    let double = ServiceBusDouble::start("georelay-longlock", POLICY, KEY).unwrap();
    double.create_queue_with_defaults("q");
    double.set_lock_duration("q", Duration::from_secs(12));
    let crashed = adapter(&double);
    for n in 1..=3 {
        crashed
            .publish("q", &format!("dev/{n}/x"), Bytes::from_static(b"r"))
            .await
            .unwrap();
    }
    let held = crashed
        .receive("q", 1, Duration::from_secs(6))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    drop((held, crashed));

    let fresh = adapter(&double);
    fresh.ensure_queue("q").await.unwrap();
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let got = fresh
            .receive("q", 10, Duration::from_secs(1))
            .await
            .unwrap();
        ids.extend(got.iter().map(|d| d.id.clone().unwrap()));
        fresh.ack(got).await.unwrap();
    }
    assert_eq!(ids, ["dev/1/x", "dev/2/x", "dev/3/x"]);
}

/// A namespace that refuses connections locked nothing. The first failed
/// read of an outage may have been taken (a pooled connection cut
/// mid-request), so the reader waits one lock duration after it; the reads
/// refused after that do not start the wait again, so a namespace down for
/// longer than a lock duration is read at once when it is back.
#[tokio::test]
async fn a_refused_connection_does_not_hold_the_reader_back() {
    let mut double = ServiceBusDouble::start("georelay-refused", POLICY, KEY).unwrap();
    let ns = adapter(&double);
    ns.ensure_queue("q").await.unwrap();
    ns.publish("q", "dev/1/x", Bytes::from_static(b"r"))
        .await
        .unwrap();
    past_the_fresh_readers_wait(&ns, "q").await;
    double.kill();
    // Down for longer than the lock duration (5 s), read all along.
    let down = std::time::Instant::now();
    while down.elapsed() < Duration::from_secs(6) {
        let read = ns.receive("q", 10, Duration::from_secs(1)).await;
        assert!(
            read.map_or(true, |d| d.is_empty()),
            "nothing read while down"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    double.restart().unwrap();
    let got = ns.receive("q", 10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.len(), 1, "read at once once the namespace is back");
}
