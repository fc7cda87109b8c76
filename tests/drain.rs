//! The drain worker end to end: the real `georelay drain` binary against a
//! real PostgreSQL and real `nats-server` regions. Backlogs are published
//! straight to the regions' queues (as ingest would), so each test controls
//! exactly what is where.

use bytes::Bytes;
use georelay_core::envelope;
use georelay_testkit::{wait_until, Service, Stack, TestDevice, QUEUE};
use georelay_transport::{Limits, Namespace, Triplet};
use std::time::Duration;

/// The Service Bus group's queue (the stack's group has [`QUEUE`]).
const SB_QUEUE: &str = "sb-telemetry";

/// Short grace so epochs seal quickly when no ingest instance is running;
/// the shortest Service Bus lock the service allows, so a fresh reader
/// waits 5 s, not 30.
const DRAIN_ARGS: &[&str] = &[
    "--publish-deadline",
    "200ms",
    "--ingest-lease",
    "300ms",
    "--lease",
    "2s",
    "--servicebus-lock-duration",
    "5s",
];

async fn connect(url: &str) -> Namespace {
    let ns = Namespace::connect(&Triplet::nats(url), Limits::default())
        .await
        .unwrap();
    assert!(ns.wait_connected(Duration::from_secs(5)).await);
    ns.ensure_queue(QUEUE).await.unwrap();
    ns
}

/// The instance id tests publish under, as ingest would.
const INGEST: uuid::Uuid = uuid::Uuid::from_u128(0x1a6e57);

/// Records, as ingest does before its first publish to an epoch, that
/// `epoch` was published to: the worker follows past an epoch nobody
/// published to without reading it.
async fn as_ingest(stack: &Stack, epoch: i64) {
    georelay_store::routing::record_publishing(stack.db.pool(), stack.group_id, epoch, INGEST)
        .await
        .unwrap();
}

/// Publishes `seqs` of each device to region `region`'s queue under
/// `epoch`, in seq order per device, devices interleaved, as ingest would.
async fn publish(
    stack: &Stack,
    region: usize,
    devices: &[TestDevice],
    seqs: std::ops::RangeInclusive<u64>,
    epoch: u64,
) {
    as_ingest(stack, epoch as i64).await;
    let ns = connect(&stack.regions[region].url()).await;
    let mut items: Vec<(String, Bytes)> = Vec::new();
    for seq in seqs {
        for d in devices {
            items.push((d.id.record_id(seq), d.envelope(seq, epoch).encode()));
        }
    }
    for chunk in items.chunks(1000) {
        ns.publish_batch(QUEUE, chunk).await.unwrap();
    }
}

async fn devices(stack: &Stack, n: usize) -> Vec<TestDevice> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(stack.device(&format!("plug-{i:03}")).await.unwrap());
    }
    out
}

async fn stored(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(stack.db.pool())
        .await
        .unwrap()
}

async fn wait_stored(stack: &Stack, n: i64, timeout: Duration) {
    let ok = wait_until(timeout, || async { stored(stack).await >= n }).await;
    assert!(
        ok,
        "only {} of {n} rows stored within {timeout:?}",
        stored(stack).await
    );
    assert_eq!(stored(stack).await, n, "more rows than records");
}

/// Per device, store order follows seq, and seqs are exactly 1..=n.
async fn assert_in_order(stack: &Stack, per_device: i64) {
    let bad: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT device_id, seq, store_order FROM (
             SELECT device_id, seq, store_order,
                    lag(seq) OVER (PARTITION BY device_id ORDER BY store_order) AS prev
             FROM telemetry) t
         WHERE prev IS NOT NULL AND seq <> prev + 1
         LIMIT 5",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    assert!(bad.is_empty(), "store order does not follow seq: {bad:?}");
    let wrong: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT device_id, min(seq), max(seq) FROM telemetry GROUP BY device_id
         HAVING min(seq) <> 1 OR max(seq) <> $1 OR count(*) <> $1",
    )
    .bind(per_device)
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    assert!(wrong.is_empty(), "missing or extra seqs: {wrong:?}");
}

async fn undrained(stack: &Stack) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT epoch FROM routing_trail WHERE group_id = $1 AND drained_at IS NULL ORDER BY epoch",
    )
    .bind(stack.group_id)
    .fetch_all(stack.db.pool())
    .await
    .unwrap()
}

/// `georelay admin ARGS` against the stack's database, with its master key.
fn admin(stack: &Stack, args: &[&str]) -> std::process::Output {
    georelay_testkit::georelay_command(&stack.db)
        .unwrap()
        .env("GEORELAY_MASTER_KEY", georelay_testkit::master_key_b64())
        .arg("admin")
        .args(args)
        .output()
        .unwrap()
}

async fn metric(service: &Service, name: &str) -> f64 {
    let text = service.metrics().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_backlog_in_a_is_stored_before_anything_from_b_in_per_device_order() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let devices = devices(&stack, 20).await;
    publish(&stack, 0, &devices, 1..=150, 1).await;
    stack.move_senders(1).await.unwrap();
    publish(&stack, 1, &devices, 151..=200, 2).await;
    let worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 4000, Duration::from_secs(60)).await;
    assert_in_order(&stack, 200).await;
    let (a_last, b_first): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT max(store_order) FROM telemetry WHERE epoch = 1),
                (SELECT min(store_order) FROM telemetry WHERE epoch = 2)",
    )
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert!(a_last < b_first, "all of A before any of B");
    let by_namespace: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT namespace_id, epoch, count(*) FROM telemetry GROUP BY 1, 2 ORDER BY 2",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(
        by_namespace,
        vec![
            (stack.namespace_ids[0], 1, 3000),
            (stack.namespace_ids[1], 2, 1000)
        ]
    );
    assert_eq!(
        undrained(&stack).await,
        vec![2],
        "the trail ends drained up to B"
    );
    let (drain_ns, followed): (i64, i64) = sqlx::query_as(
        "SELECT drain_namespace_id, (SELECT count(*) FROM failover_events
                                      WHERE kind = 'drain_followed' AND actor LIKE 'drain:%')
         FROM routing_groups WHERE id = $1",
    )
    .bind(stack.group_id)
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!((drain_ns, followed), (stack.namespace_ids[1], 1));
    assert_eq!(
        metric(&worker, "georelay_drain_rows_stored_total").await,
        4000.0
    );
    assert_eq!(
        connect(&stack.regions[0].url())
            .await
            .depth(QUEUE)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn a_dead_old_region_blocks_the_drain_until_it_returns() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let devices = devices(&stack, 5).await;
    publish(&stack, 0, &devices, 1..=100, 1).await;
    stack.move_senders(1).await.unwrap();
    publish(&stack, 1, &devices, 101..=120, 2).await;
    stack.regions[0].kill();
    let worker = stack.drain(DRAIN_ARGS).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || async {
            metric(&worker, "georelay_drain_blocked_seconds").await >= 2.0
        })
        .await,
        "the worker reports how long it is blocked"
    );
    assert_eq!(stored(&stack).await, 0, "B's records wait for A's");
    stack.regions[0].restart().unwrap();
    wait_stored(&stack, 600, Duration::from_secs(60)).await;
    assert_in_order(&stack, 120).await;
    assert_eq!(undrained(&stack).await, vec![2]);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            metric(&worker, "georelay_drain_blocked_seconds").await == 0.0
        })
        .await
    );
}

#[tokio::test]
async fn kill_9_mid_batch_then_restart_loses_nothing_and_duplicates_nothing() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let devices = devices(&stack, 10).await;
    publish(&stack, 0, &devices, 1..=2000, 1).await;
    let mut worker = stack
        .drain(&[DRAIN_ARGS, &["--batch-size", "200"]].concat())
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            stored(&stack).await > 2000
        })
        .await
    );
    worker.kill();
    let at_kill = stored(&stack).await;
    assert!(at_kill < 20_000, "killed mid-backlog ({at_kill})");
    let _again = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 20_000, Duration::from_secs(90)).await;
    assert_in_order(&stack, 2000).await;
}

#[tokio::test]
async fn a_standby_takes_over_when_the_active_worker_dies() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let devices = devices(&stack, 10).await;
    let mut first = stack.drain(DRAIN_ARGS).unwrap();
    let mut second = stack.drain(DRAIN_ARGS).unwrap();
    publish(&stack, 0, &devices, 1..=50, 1).await;
    wait_stored(&stack, 500, Duration::from_secs(30)).await;
    let holders = metric(&first, "georelay_drain_lease_held").await
        + metric(&second, "georelay_drain_lease_held").await;
    assert_eq!(holders, 1.0, "one active drainer");
    let (active, standby) = if metric(&first, "georelay_drain_lease_held").await == 1.0 {
        (&mut first, &second)
    } else {
        (&mut second, &first)
    };
    active.kill();
    publish(&stack, 0, &devices, 51..=100, 1).await;
    wait_stored(&stack, 1000, Duration::from_secs(30)).await;
    assert_eq!(metric(standby, "georelay_drain_lease_held").await, 1.0);
    assert_in_order(&stack, 100).await;
}

#[tokio::test]
async fn a_reading_is_stored_with_every_digit_it_was_sent_with() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-digits").await.unwrap();
    let ns = connect(&stack.regions[0].url()).await;
    // More digits than an f64 holds, in an integer and in a fraction.
    let text = r#"{"count": 123456789012345678901234567890, "ratio": 0.12345678901234567890123}"#;
    let mut envelope = device.envelope(1, 1);
    envelope.record = device.seal_text(1, text);
    ns.publish_batch(QUEUE, &[("plug-digits/1".into(), envelope.encode())])
        .await
        .unwrap();
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 1, Duration::from_secs(30)).await;
    let (count, ratio): (String, String) = sqlx::query_as(
        "SELECT payload->>'count', payload->>'ratio' FROM telemetry WHERE device_id = 'plug-digits'",
    )
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(count, "123456789012345678901234567890");
    assert_eq!(ratio, "0.12345678901234567890123");
}

#[tokio::test]
async fn poison_records_go_to_dead_letters_and_never_block_the_queue() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let good = stack.device("plug-good").await.unwrap();
    let ns = connect(&stack.regions[0].url()).await;
    let stranger = TestDevice::new("plug-nobody".parse().unwrap(), good.key.clone());
    let mut tampered = good.envelope(3, 1);
    tampered.record.ciphertext[0] ^= 1;
    let mut array = good.envelope(4, 1);
    array.record = good.seal(4, &serde_json::json!([1, 2]));
    let items: Vec<(String, Bytes)> = vec![
        ("plug-good/1".into(), good.envelope(1, 1).encode()),
        ("junk".into(), Bytes::from_static(b"\x01not an envelope")),
        ("plug-good/2".into(), good.envelope(2, 1).encode()),
        ("plug-good/3".into(), tampered.encode()),
        ("plug-good/4".into(), array.encode()),
        ("plug-nobody/1".into(), stranger.envelope(1, 1).encode()),
        ("plug-good/5".into(), good.envelope(5, 1).encode()),
    ];
    ns.publish_batch(QUEUE, &items).await.unwrap();
    let worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 3, Duration::from_secs(30)).await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM telemetry ORDER BY store_order")
        .fetch_all(stack.db.pool())
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 2, 5]);
    type Letter = (String, Option<String>, Option<i64>, Vec<u8>);
    let dead: Vec<Letter> =
        sqlx::query_as("SELECT reason, device_id, seq, raw FROM dead_letters ORDER BY id")
            .fetch_all(stack.db.pool())
            .await
            .unwrap();
    let reasons: Vec<(&str, Option<&str>, Option<i64>)> = dead
        .iter()
        .map(|(r, d, s, _)| (r.as_str(), d.as_deref(), *s))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("undecodable", None, None),
            ("bad_tag", Some("plug-good"), Some(3)),
            ("not_json_object", Some("plug-good"), Some(4)),
            ("unknown_device", Some("plug-nobody"), Some(1)),
        ]
    );
    assert_eq!(
        dead[0].3, b"\x01not an envelope",
        "raw bytes kept as received"
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            ns.depth(QUEUE).await.unwrap() == 0
        })
        .await
    );
    assert_eq!(
        metric(
            &worker,
            "georelay_drain_dead_letters_total{reason=\"bad_tag\"}"
        )
        .await,
        1.0
    );
}

/// Poison that used to stall the group for good (each was retried forever,
/// or given back and read again in a hot loop): every one becomes a dead
/// letter with its reason and raw bytes, and the records behind it flow.
#[tokio::test]
async fn poison_that_used_to_stall_the_group_is_dead_lettered_and_the_queue_flows_on() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let good = stack.device("plug-good").await.unwrap();
    let broken = stack.device("plug-broken").await.unwrap();
    // Its sealed key copied from another row: it no longer opens.
    sqlx::query("UPDATE devices SET key_sealed = (SELECT key_sealed FROM devices WHERE id = 'plug-good') WHERE id = 'plug-broken'")
        .execute(stack.db.pool())
        .await
        .unwrap();
    let ns = connect(&stack.regions[0].url()).await;
    // An authentic record re-wrapped under an epoch the trail does not have.
    let future = good.envelope(2, 7);
    // ... and with a received_at PostgreSQL cannot store (5000 BC).
    let mut ancient = good.envelope(3, 1);
    ancient.received_at_micros = -220_000_000_000_000_000;
    // An authentic JSON object PostgreSQL refuses: numeric holds at most
    // 16383 digits after the point.
    let mut tiny = good.envelope(4, 1);
    tiny.record = good.seal_text(4, r#"{"v": 1e-20000}"#);
    let items: Vec<(String, Bytes)> = vec![
        ("plug-good/1".into(), good.envelope(1, 1).encode()),
        ("plug-good/2".into(), future.encode()),
        ("plug-good/3".into(), ancient.encode()),
        ("nul\0id".into(), Bytes::from_static(b"\x01junk")),
        ("plug-good/4".into(), tiny.encode()),
        ("plug-broken/1".into(), broken.envelope(1, 1).encode()),
        ("plug-good/5".into(), good.envelope(5, 1).encode()),
        ("plug-good/6".into(), good.envelope(6, 1).encode()),
    ];
    ns.publish_batch(QUEUE, &items).await.unwrap();
    let worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 3, Duration::from_secs(30)).await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM telemetry ORDER BY store_order")
        .fetch_all(stack.db.pool())
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 5, 6]);
    type Letter = (String, Option<String>, Option<i64>, Option<String>, Vec<u8>);
    let dead: Vec<Letter> = sqlx::query_as(
        "SELECT reason, device_id, seq, message_id, raw FROM dead_letters ORDER BY reason, seq",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    let reasons: Vec<(&str, Option<&str>, Option<i64>)> = dead
        .iter()
        .map(|(r, d, s, _, _)| (r.as_str(), d.as_deref(), *s))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("key_unopenable", Some("plug-broken"), Some(1)),
            ("refused_by_database", Some("plug-good"), Some(4)),
            ("undecodable", None, None),
            ("undecodable", None, None),
            ("wrong_epoch", Some("plug-good"), Some(2)),
        ]
    );
    for (_, _, _, _, raw) in &dead {
        assert!(
            items
                .iter()
                .any(|(_, sent)| sent.as_ref() == raw.as_slice()),
            "raw bytes kept as queued"
        );
    }
    assert!(
        dead.iter().any(|l| l.3.as_deref() == Some("nul\u{FFFD}id")),
        "the NUL in the message id is replaced, not a reason to refuse the dead letter: {dead:?}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            ns.depth(QUEUE).await.unwrap() == 0
        })
        .await,
        "everything acked"
    );
    assert_eq!(
        metric(
            &worker,
            "georelay_drain_dead_letters_total{reason=\"refused_by_database\"}"
        )
        .await,
        1.0
    );
    // The group goes on.
    ns.publish(QUEUE, "plug-good/7", good.envelope(7, 1).encode())
        .await
        .unwrap();
    wait_stored(&stack, 4, Duration::from_secs(30)).await;
}

/// Only an authentic message of an epoch the trail puts on this namespace
/// ends the epoch being drained. Trail: 1 on A, 2 on B, 3 on A. A message
/// on A naming epoch 2 (B's) and a forged one naming epoch 3 used to end
/// epoch 1 early: the worker followed to B and stored A's later epoch-1
/// records after B's.
#[tokio::test]
async fn a_message_of_a_later_epoch_that_does_not_belong_here_does_not_end_the_epoch() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    stack.move_senders(1).await.unwrap();
    stack.move_senders(0).await.unwrap();
    assert_eq!(undrained(&stack).await, vec![1, 2, 3]);
    for epoch in 1..=3 {
        as_ingest(&stack, epoch).await;
    }
    let mut forged = device.envelope(99, 3);
    forged.record.ciphertext[0] ^= 1;
    let a = connect(&stack.regions[0].url()).await;
    let on_a: Vec<(String, Bytes)> = vec![
        ("plug-1/1".into(), device.envelope(1, 1).encode()),
        ("plug-1/98".into(), device.envelope(98, 2).encode()),
        ("plug-1/99".into(), forged.encode()),
        // A bundle is of one epoch: an envelope of a later one inside it
        // does not end epoch 1 (seq 2 would follow seq 3 from B).
        (
            "bundle-1".into(),
            envelope::bundle(&[
                device.envelope(2, 1).encode(),
                device.envelope(100, 3).encode(),
            ]),
        ),
        ("plug-1/4".into(), device.envelope(4, 3).encode()),
    ];
    a.publish_batch(QUEUE, &on_a).await.unwrap();
    let b = connect(&stack.regions[1].url()).await;
    b.publish(QUEUE, "plug-1/3", device.envelope(3, 2).encode())
        .await
        .unwrap();
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 4, Duration::from_secs(30)).await;
    assert_in_order(&stack, 4).await;
    let dead: Vec<(String, i64)> =
        sqlx::query_as("SELECT reason, seq FROM dead_letters ORDER BY seq")
            .fetch_all(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        dead,
        vec![
            ("wrong_epoch".into(), 98),
            ("bad_tag".into(), 99),
            ("wrong_epoch".into(), 100)
        ]
    );
}

/// A batch is about `--batch-size` records, bundled or not: the worker asks
/// for fewer messages when they carry bundles (it used to take 500
/// messages of 64 records, 32,000 records in one transaction).
#[tokio::test]
async fn a_backlog_of_bundles_is_stored_in_batches_of_about_the_batch_size() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let devices = devices(&stack, 4).await;
    let ns = connect(&stack.regions[0].url()).await;
    let mut items: Vec<(String, Bytes)> = Vec::new();
    for d in &devices {
        for first in (1..=640).step_by(64) {
            let envelopes: Vec<Bytes> = (first..first + 64)
                .map(|seq| d.envelope(seq, 1).encode())
                .collect();
            items.push((format!("{}/{first}", d.id), envelope::bundle(&envelopes)));
        }
    }
    ns.publish_batch(QUEUE, &items).await.unwrap();
    let worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 4 * 640, Duration::from_secs(60)).await;
    assert_in_order(&stack, 640).await;
    let batches = metric(&worker, "georelay_drain_batch_size_records_count").await;
    let within = metric(
        &worker,
        "georelay_drain_batch_size_records_bucket{le=\"500\"}",
    )
    .await;
    assert!(batches >= 6.0, "{batches} batches");
    assert_eq!(within, batches, "every batch holds at most 500 records");
}

/// Ingest joins concurrent records into bundles: the worker stores each
/// envelope of a bundle in order, and dead-letters a bad one alone (its own
/// bytes, the bundle's id and its place) while the rest flow.
#[tokio::test]
async fn a_bundles_envelopes_are_stored_and_dead_lettered_one_by_one() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let good = stack.device("plug-good").await.unwrap();
    let ns = connect(&stack.regions[0].url()).await;
    let mut tampered = good.envelope(4, 1);
    tampered.record.ciphertext[0] ^= 1;
    let junk = Bytes::from_static(b"\x01not an envelope");
    let cut_short = envelope::bundle(&[good.envelope(9, 1).encode()]).slice(..20);
    let items: Vec<(String, Bytes)> = vec![
        (
            "b1".into(),
            envelope::bundle(&[good.envelope(1, 1).encode(), good.envelope(2, 1).encode()]),
        ),
        (
            "b2".into(),
            envelope::bundle(&[
                good.envelope(3, 1).encode(),
                junk.clone(),
                tampered.encode(),
                good.envelope(5, 1).encode(),
            ]),
        ),
        ("b3".into(), cut_short.clone()),
        (
            "b4".into(),
            envelope::bundle(&[good.envelope(6, 1).encode()]),
        ),
    ];
    ns.publish_batch(QUEUE, &items).await.unwrap();
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 5, Duration::from_secs(30)).await;
    assert_eq!(
        seqs_in_store_order(&stack, "plug-good").await,
        vec![1, 2, 3, 5, 6]
    );
    type Letter = (String, Option<String>, Option<i64>, Vec<u8>);
    let dead: Vec<Letter> =
        sqlx::query_as("SELECT reason, message_id, seq, raw FROM dead_letters ORDER BY id")
            .fetch_all(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        dead,
        vec![
            (
                "undecodable".into(),
                Some("b2#2".into()),
                None,
                junk.to_vec()
            ),
            (
                "bad_tag".into(),
                Some("b2#3".into()),
                Some(4),
                tampered.encode().to_vec()
            ),
            (
                "undecodable".into(),
                Some("b3".into()),
                None,
                cut_short.to_vec()
            ),
        ]
    );
}

/// Publishes one message with raw `headers` to `queue`'s subject over a
/// plain TCP connection (no client library would send these), and waits
/// until the server has processed it.
fn publish_with_raw_headers(url: &str, headers: &[u8], payload: &[u8]) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut socket = std::net::TcpStream::connect(url.trim_start_matches("nats://")).unwrap();
    let mut reader = BufReader::new(socket.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("INFO"), "{line}");
    let subject = georelay_transport::nats::subject(QUEUE);
    let mut out = format!(
        "CONNECT {{\"verbose\":false,\"headers\":true,\"protocol\":1}}\r\nHPUB {subject} {} {}\r\n",
        headers.len(),
        headers.len() + payload.len()
    )
    .into_bytes();
    out.extend_from_slice(headers);
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\nPING\r\n");
    socket.write_all(&out).unwrap();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.starts_with("-ERR"), "{line}");
        if line.starts_with("PONG") {
            return;
        }
    }
}

/// Messages whose headers async-nats cannot parse when they are delivered
/// (not UTF-8; a status line) made the client drop the worker's connection
/// to the whole region and get the same message again after reconnecting:
/// the group stalled for good. Now each is an `unreadable` dead letter with
/// its payload, and what is behind it is stored in order.
#[tokio::test]
async fn a_message_whose_headers_the_client_cannot_parse_is_dead_lettered() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let url = stack.regions[0].url();
    let ns = connect(&url).await;
    ns.publish(QUEUE, "plug-1/1", device.envelope(1, 1).encode())
        .await
        .unwrap();
    let poison = device.envelope(2, 1).encode();
    publish_with_raw_headers(&url, b"NATS/1.0\r\nX-Note: caf\xe9\r\n\r\n", &poison);
    ns.publish(QUEUE, "plug-1/3", device.envelope(3, 1).encode())
        .await
        .unwrap();
    publish_with_raw_headers(&url, b"NATS/1.0 503\r\n\r\n", b"status");
    ns.publish(QUEUE, "plug-1/4", device.envelope(4, 1).encode())
        .await
        .unwrap();
    assert_eq!(ns.depth(QUEUE).await.unwrap(), 5);
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 3, Duration::from_secs(30)).await;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM telemetry ORDER BY store_order")
        .fetch_all(stack.db.pool())
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 3, 4]);
    let dead: Vec<(String, Option<i64>, Vec<u8>)> =
        sqlx::query_as("SELECT reason, seq, raw FROM dead_letters ORDER BY id")
            .fetch_all(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        dead,
        vec![
            ("unreadable".into(), Some(2), poison.to_vec()),
            ("unreadable".into(), None, b"status".to_vec()),
        ]
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            ns.depth(QUEUE).await.unwrap() == 0
        })
        .await,
        "everything acked"
    );
    // The group goes on through the consumer.
    ns.publish(QUEUE, "plug-1/5", device.envelope(5, 1).encode())
        .await
        .unwrap();
    wait_stored(&stack, 4, Duration::from_secs(30)).await;
}

#[tokio::test]
async fn the_seal_barrier_holds_while_an_ingest_instance_still_acknowledges_the_old_epoch() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let devices = devices(&stack, 2).await;
    // An ingest instance, alive, still on epoch 1.
    let pool = stack.db.pool();
    sqlx::query("INSERT INTO instances (id, role, hostname, lease_until) VALUES ('00000000-0000-0000-0000-000000000001', 'ingest', 'test', now() + interval '1 hour')")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO instance_epochs (instance_id, group_id, epoch) VALUES ('00000000-0000-0000-0000-000000000001', $1, 1)")
        .bind(stack.group_id)
        .execute(pool)
        .await
        .unwrap();
    publish(&stack, 0, &devices, 1..=10, 1).await;
    stack.move_senders(1).await.unwrap();
    publish(&stack, 1, &devices, 11..=20, 2).await;
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 20, Duration::from_secs(30)).await;
    // A's queue is empty, but epoch 1 is not sealed: B waits. A negative
    // check, so a bounded look: 2 s is four seal graces (200 ms + 300 ms);
    // without the barrier the worker would have followed to B by then.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored(&stack).await, 20, "only A's records");
    assert_eq!(undrained(&stack).await, vec![1, 2]);
    let sealed: bool = sqlx::query_scalar(
        "SELECT sealed_at IS NOT NULL FROM routing_trail WHERE group_id = $1 AND epoch = 1",
    )
    .bind(stack.group_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        !sealed,
        "epoch 1 is not sealed while an instance acknowledges it"
    );
    // The instance acknowledges epoch 2: the worker seals, drains, follows.
    sqlx::query("UPDATE instance_epochs SET epoch = 2")
        .execute(pool)
        .await
        .unwrap();
    wait_stored(&stack, 40, Duration::from_secs(30)).await;
    assert_in_order(&stack, 20).await;
    assert_eq!(undrained(&stack).await, vec![2]);
}

#[tokio::test]
async fn a_reused_seq_with_another_payload_is_kept_as_a_seq_conflict() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let ns = connect(&stack.regions[0].url()).await;
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    ns.publish(QUEUE, "plug-1/1", device.envelope(1, 1).encode())
        .await
        .unwrap();
    wait_stored(&stack, 1, Duration::from_secs(30)).await;
    // The device lost its state and seals seq 1 again, with another reading
    // (and so the same nonce). A redelivery of the first one is harmless.
    reuse_seq_then_check(&stack, &ns, &device, 1, 2).await;
}

/// Publishes `device`'s seq `seq` again (a redelivery) and sealed anew
/// with another reading (a reused seq, and so nonce), then seq `then`;
/// once both are stored, the first copy of `seq` is the one stored and the
/// reused one is the only dead letter: a `seq_conflict`, kept sealed as
/// queued.
async fn reuse_seq_then_check(
    stack: &Stack,
    ns: &Namespace,
    device: &TestDevice,
    seq: u64,
    then: u64,
) {
    let mut reused = device.envelope(seq, 1);
    reused.record = device.seal(seq, &serde_json::json!({"other": true}));
    let items: Vec<(String, Bytes)> = vec![
        (
            format!("{}-again", device.id.record_id(seq)),
            device.envelope(seq, 1).encode(),
        ),
        (
            format!("{}-reused", device.id.record_id(seq)),
            reused.encode(),
        ),
        (device.id.record_id(then), device.envelope(then, 1).encode()),
    ];
    ns.publish_batch(QUEUE, &items).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM telemetry WHERE device_id = $1 AND seq IN ($2, $3)",
            )
            .bind(device.id.as_str())
            .bind(seq as i64)
            .bind(then as i64)
            .fetch_one(stack.db.pool())
            .await
            .unwrap()
                == 2
        })
        .await,
        "seqs {seq} and {then} stored"
    );
    let first: serde_json::Value =
        sqlx::query_scalar("SELECT payload FROM telemetry WHERE device_id = $1 AND seq = $2")
            .bind(device.id.as_str())
            .bind(seq as i64)
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        first["reading"],
        seq as f64 / 10.0,
        "the first copy is stored"
    );
    let dead: Vec<(String, i64, Vec<u8>)> =
        sqlx::query_as("SELECT reason, seq, raw FROM dead_letters")
            .fetch_all(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        dead.len(),
        1,
        "only the different payload is a conflict: {dead:?}"
    );
    assert_eq!(
        (dead[0].0.as_str(), dead[0].1),
        ("seq_conflict", seq as i64)
    );
    assert_eq!(
        dead[0].2,
        reused.encode().to_vec(),
        "kept sealed, as queued"
    );
}

/// The same, while the first copy waits in `parked_records` (its device
/// waits for a record stranded in an abandoned epoch): the newcomer is
/// kept as a `seq_conflict` too, not dropped unseen, and the first copy is
/// the one stored once the gap fills.
#[tokio::test]
async fn a_reused_seq_whose_first_copy_is_parked_is_kept_as_a_seq_conflict() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    // Seq 1 was stranded in an abandoned epoch: newer seqs are parked.
    sqlx::query(
        "INSERT INTO device_gaps (device_id, group_id, epoch, after_seq, through_seq)
         VALUES ('plug-1', $1, 0, 0, 1)",
    )
    .bind(stack.group_id)
    .execute(stack.db.pool())
    .await
    .unwrap();
    let ns = connect(&stack.regions[0].url()).await;
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    ns.publish(QUEUE, "plug-1/2", device.envelope(2, 1).encode())
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            parked(&stack, "plug-1").await == vec![2]
        })
        .await,
        "seq 2 waits for the gap"
    );
    // Seq 1 comes last: it fills the gap, and the parked copy of 2 follows.
    reuse_seq_then_check(&stack, &ns, &device, 2, 1).await;
    assert!(parked(&stack, "plug-1").await.is_empty());
}

/// A Service Bus key regenerated on the service and set with `admin
/// namespace set-key` reaches a running worker without a restart: its
/// namespace pool reconnects when the namespace's triplet changes (it used
/// to reconnect only on an endpoint change, so it read with the old key
/// until restarted).
#[tokio::test]
async fn a_rotated_service_bus_key_reaches_a_running_worker() {
    use georelay_store::control::{self, Actor, NewNamespace, TransportKind};
    use georelay_testkit::{georelay_command, master_key, master_key_b64, ServiceBusDouble};
    use std::io::Write as _;

    const OLD_KEY: &str = "b2xkLWtleS1vbGQta2V5LW9sZA==";
    const NEW_KEY: &str = "bmV3LWtleS1uZXcta2V5LW5ldw==";
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let double = ServiceBusDouble::start("georelay-rotate", "drain", OLD_KEY).unwrap();
    let pool = stack.db.pool();
    let master = master_key().unwrap();
    control::add_namespace(
        pool,
        &master,
        &NewNamespace {
            name: "sb-west",
            region: "sb-west",
            transport: TransportKind::ServiceBus,
            endpoint: &double.local_endpoint(),
            priority: 50,
            key_name: Some("drain"),
            key: Some(OLD_KEY.as_bytes()),
        },
    )
    .await
    .unwrap();
    let actor = Actor {
        actor: "test".into(),
        reason: None,
    };
    // A queue of its own: two groups never share one.
    control::add_group(pool, "sb", SB_QUEUE, "sb-west", &actor)
        .await
        .unwrap();
    let id = georelay_core::DeviceId::parse("sb-plug").unwrap();
    let device = TestDevice::new(
        id.clone(),
        control::add_device(pool, &master, &id, "sb").await.unwrap(),
    );
    let publish_with = |key: &'static str, seqs: std::ops::RangeInclusive<u64>| {
        let triplet = Triplet {
            transport: TransportKind::ServiceBus,
            endpoint: double.local_endpoint(),
            key_name: Some("drain".into()),
            key: Some(zeroize::Zeroizing::new(key.into())),
        };
        let device = &device;
        async move {
            // The queue gets the 5 s lock the worker is started with (a
            // fresh reader waits out the queue's own lock duration).
            let limits = Limits {
                servicebus_lock_duration: Duration::from_secs(5),
                ..Limits::default()
            };
            let ns = Namespace::connect(&triplet, limits).await.unwrap();
            ns.ensure_queue(SB_QUEUE).await.unwrap();
            let items: Vec<(String, Bytes)> = seqs
                .map(|seq| (device.id.record_id(seq), device.envelope(seq, 1).encode()))
                .collect();
            ns.publish_batch(SB_QUEUE, &items).await.unwrap();
        }
    };

    publish_with(OLD_KEY, 1..=5).await;
    let _drain = stack.drain(DRAIN_ARGS).unwrap();
    // A fresh Service Bus reader waits out one lock duration first.
    wait_stored(&stack, 5, Duration::from_secs(30)).await;

    // The key is regenerated: the worker's connection is refused from now on.
    double.rotate_key(NEW_KEY);
    publish_with(NEW_KEY, 6..=10).await;
    let mut set_key = georelay_command(&stack.db)
        .unwrap()
        .env("GEORELAY_MASTER_KEY", master_key_b64())
        .args(["admin", "namespace", "set-key", "--name", "sb-west"])
        .args(["--key-name", "drain", "--key", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    set_key
        .stdin
        .take()
        .unwrap()
        .write_all(NEW_KEY.as_bytes())
        .unwrap();
    assert!(set_key.wait().unwrap().success());
    // The new connection waits out one lock duration again, then reads.
    wait_stored(&stack, 10, Duration::from_secs(30)).await;
    assert_in_order(&stack, 10).await;
}

/// The drain's watchdog counts control plane problems: here an ingest
/// instance row inserted by hand with a lease a day ahead, which holds back
/// every seal barrier (an ERROR names it and the fix).
#[tokio::test]
async fn the_watchdog_counts_a_hand_inserted_instance_holding_back_the_barrier() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    sqlx::query("INSERT INTO instances (id, role, hostname, lease_until) VALUES ('00000000-0000-0000-0000-00000000beef', 'ingest', 'ghost', now() + interval '1 day')")
        .execute(stack.db.pool())
        .await
        .unwrap();
    let worker = stack.drain(DRAIN_ARGS).unwrap();
    let counted = wait_until(Duration::from_secs(10), || async {
        metric(&worker, "georelay_control_plane_problems").await == 1.0
    })
    .await;
    assert!(counted, "georelay_control_plane_problems is 1");
}

/// The hard day: region A is gone for good with records on it. `admin trail
/// abandon` says what it would give up (A cannot even be counted), refuses
/// the current epoch, and with --yes lets the worker go on to B, recording
/// who gave up what.
#[tokio::test]
async fn abandoning_a_lost_region_lets_the_worker_go_on_and_is_recorded() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let devices = devices(&stack, 1).await;
    publish(&stack, 0, &devices, 1..=5, 1).await;
    stack.move_senders(1).await.unwrap();
    publish(&stack, 1, &devices, 6..=8, 2).await;
    stack.regions[0].kill();
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    let cli = |args: &[&str]| admin(&stack, args);
    let asked = cli(&["trail", "abandon", "--group", "g", "--epoch", "1"]);
    assert_eq!(asked.status.code(), Some(1));
    let said = String::from_utf8_lossy(&asked.stderr);
    assert!(
        said.contains("epoch 1 of group g is on eu-west")
            && said.contains("cannot reach it")
            && said.contains("--yes"),
        "{said}"
    );
    let current = cli(&["trail", "abandon", "--group", "g", "--epoch", "2", "--yes"]);
    assert_eq!(current.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&current.stderr).contains("move the senders first"),
        "{current:?}"
    );
    let done = cli(&[
        "trail",
        "abandon",
        "--group",
        "g",
        "--epoch",
        "1",
        "--reason",
        "eu-west lost",
        "--yes",
    ]);
    assert!(done.status.success(), "{done:?}");
    assert!(
        String::from_utf8_lossy(&done.stdout).contains("the worker drains eu-north now"),
        "{done:?}"
    );
    wait_stored(&stack, 3, Duration::from_secs(30)).await;
    let (kind, actor, reason): (String, String, Option<String>) =
        sqlx::query_as("SELECT kind, actor, reason FROM failover_events WHERE kind = 'abandoned'")
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), reason.as_deref()),
        ("abandoned", Some("eu-west lost"))
    );
    assert!(actor.starts_with("cli:"), "{actor}");
    // The other hard-day switches.
    let off = cli(&[
        "group",
        "set",
        "--name",
        "g",
        "--failover",
        "off",
        "--reason",
        "hands on",
    ]);
    assert!(off.status.success(), "{off:?}");
    let bit: bool = sqlx::query_scalar("SELECT failover_enabled FROM routing_groups")
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
    assert!(!bit);
    let (kind, actor, reason): (String, String, Option<String>) =
        sqlx::query_as("SELECT kind, actor, reason FROM failover_events ORDER BY id DESC LIMIT 1")
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        (kind.as_str(), reason.as_deref()),
        ("failover_off", Some("hands on"))
    );
    assert!(actor.starts_with("cli:"), "{actor}");
    georelay_store::control::set_device_enabled(stack.db.pool(), devices[0].id.as_str(), false)
        .await
        .unwrap();
    let on = cli(&["device", "enable", "--id", devices[0].id.as_str()]);
    assert_eq!(
        String::from_utf8_lossy(&on.stdout),
        format!("device {} enabled\n", devices[0].id)
    );
}

/// `admin dead-letters`: a record of a device that was not registered yet is
/// an `unknown_device` dead letter; once the device is (back) in `devices`,
/// `replay` verifies it again and stores it; `list` and `show` tell what is
/// there without revealing the record.
#[tokio::test]
async fn an_unknown_devices_record_is_replayed_once_the_device_is_registered() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let late = stack.device("plug-late").await.unwrap();
    let pool = stack.db.pool();
    let (group_id, sealed): (i64, Vec<u8>) =
        sqlx::query_as("SELECT group_id, key_sealed FROM devices WHERE id = 'plug-late'")
            .fetch_one(pool)
            .await
            .unwrap();
    sqlx::query("DELETE FROM devices WHERE id = 'plug-late'")
        .execute(pool)
        .await
        .unwrap();
    let ns = connect(&stack.regions[0].url()).await;
    ns.publish(QUEUE, "plug-late/1", late.envelope(1, 1).encode())
        .await
        .unwrap();
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    let dead = wait_until(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM dead_letters")
            .fetch_one(pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    assert!(dead, "dead-lettered as unknown_device");
    let cli = |args: &[&str]| {
        let out = admin(&stack, &[&["dead-letters"], args].concat());
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = cli(&["list", "--reason", "unknown_device", "--since", "1h"]);
    assert!(
        listed.contains("unknown_device") && listed.contains("plug-late"),
        "{listed}"
    );
    let id: i64 = sqlx::query_scalar("SELECT id FROM dead_letters")
        .fetch_one(pool)
        .await
        .unwrap();
    let shown = cli(&["show", "--id", &id.to_string()]);
    assert!(shown.contains("device plug-late, seq 1"), "{shown}");
    assert!(
        !shown.contains(late.key.to_base64().as_str()),
        "never the key"
    );
    // Still unknown: kept.
    assert!(cli(&["replay", "--id", &id.to_string()]).contains("0 stored, 1 kept"));
    sqlx::query("INSERT INTO devices (id, group_id, key_sealed) VALUES ('plug-late', $1, $2)")
        .bind(group_id)
        .bind(&sealed)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(
        cli(&["replay", "--reason", "unknown_device"]),
        "1 stored, 0 kept\n"
    );
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM telemetry WHERE device_id = 'plug-late'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);
}

/// Rows no georelay process wrote do not hold the drain back: a drain lease
/// naming no running drain process is taken over at once (it used to be
/// honoured until it expired, here an hour), and an ingest instance whose
/// lease runs a day past its heartbeat (no ingest takes over 1 h) does not
/// hold the seal barrier (it held every epoch forever).
#[tokio::test]
async fn rows_written_by_hand_do_not_hold_the_drain_back() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let devices = devices(&stack, 1).await;
    let pool = stack.db.pool();
    sqlx::query("INSERT INTO drain_leases (group_id, instance_id, token, lease_until) VALUES ($1, '00000000-0000-0000-0000-00000000dead', 5, now() + interval '1 hour')")
        .bind(stack.group_id)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO instances (id, role, hostname, lease_until) VALUES ('00000000-0000-0000-0000-00000000beef', 'ingest', 'ghost', now() + interval '1 day')")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO instance_epochs (instance_id, group_id, epoch) VALUES ('00000000-0000-0000-0000-00000000beef', $1, 1)")
        .bind(stack.group_id)
        .execute(pool)
        .await
        .unwrap();
    publish(&stack, 0, &devices, 1..=5, 1).await;
    stack.move_senders(1).await.unwrap();
    publish(&stack, 1, &devices, 6..=10, 2).await;
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    wait_stored(&stack, 10, Duration::from_secs(30)).await;
    assert_in_order(&stack, 10).await;
    let token: i64 = sqlx::query_scalar("SELECT token FROM drain_leases")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(token, 6, "taken over, with the next fencing token");
}

/// A record the broker itself dead-lettered (here: a queue made before
/// georelay, with the service's default MaxDeliveryCount of 10, whose
/// message was delivered ten times before the worker ever ran) is moved to
/// `dead_letters` as `broker_dead_lettered`, naming the broker's reason,
/// and the sub-queue is emptied: never lost there unseen.
#[tokio::test]
async fn what_the_broker_dead_lettered_ends_in_dead_letters() {
    use georelay_core::TransportKind;
    use georelay_testkit::Region;

    let stack = Stack::start_on(TransportKind::ServiceBus, &["sb-eu"], |r| Ok(r.url()))
        .await
        .unwrap();
    let Region::ServiceBus(double) = &stack.regions[0] else {
        unreachable!("a Service Bus stack")
    };
    double.create_queue_with_defaults(QUEUE);
    // The portal's lock is a minute; a fresh reader would wait it out.
    double.set_lock_duration(QUEUE, Duration::from_secs(5));
    let device = stack.device("plug-dlq").await.unwrap();
    let limits = Limits {
        servicebus_lock_duration: Duration::from_secs(5),
        ..Limits::default()
    };
    let ns = Namespace::connect(&stack.regions[0].triplet(), limits)
        .await
        .unwrap();
    ns.publish(
        QUEUE,
        &device.id.record_id(1),
        device.envelope(1, 1).encode(),
    )
    .await
    .unwrap();
    // Ten deliveries given back; at the eleventh the service dead-letters it.
    let mut deliveries = 0;
    loop {
        let got = ns.receive(QUEUE, 1, Duration::from_secs(6)).await.unwrap();
        if got.is_empty() {
            break;
        }
        deliveries += 1;
        ns.nack(QUEUE, got).await.unwrap();
    }
    assert_eq!(deliveries, 10);
    assert_eq!(double.dead_lettered(QUEUE), 1);

    let _drain = stack.drain(DRAIN_ARGS).unwrap();
    let moved = wait_until(Duration::from_secs(40), || async {
        double.dead_lettered(QUEUE) == 0
    })
    .await;
    assert!(moved, "the dead-letter sub-queue was never drained");
    let (reason, device_id, seq, detail): (String, Option<String>, Option<i64>, String) =
        sqlx::query_as("SELECT reason, device_id, seq, detail FROM dead_letters")
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(reason, "broker_dead_lettered");
    assert_eq!(device_id.as_deref(), Some("plug-dlq"));
    assert_eq!(seq, Some(1));
    assert!(detail.contains("MaxDeliveryCountExceeded"), "{detail}");
    let status = String::from_utf8(admin(&stack, &["status"]).stdout).unwrap();
    let line = status
        .lines()
        .find(|l| l.trim_start().starts_with("broker_dead_lettered"));
    assert!(
        line.is_some_and(|l| l.split_whitespace().nth(1) == Some("1")),
        "admin status counts it:\n{status}"
    );
}

/// A replay checks that nothing later of the device is stored, then stores:
/// a worker committing a later record between the two would put the
/// replayed one after it. The replay takes the lock the worker stores under
/// (the group's lease row): here a "worker" holds it, commits seq 6, and
/// the replay of seq 5, waiting meanwhile, then keeps it instead.
#[tokio::test]
async fn a_replay_never_slips_in_behind_a_record_the_worker_is_storing() {
    use georelay_store::dead_letters::{self, Filter, Replayed};
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let pool = stack.db.pool();
    let device = stack.device("plug-race").await.unwrap();
    sqlx::query(
        "INSERT INTO dead_letters (group_id, namespace_id, epoch, device_id, seq, reason, detail, raw)
         VALUES ($1, $2, 1, 'plug-race', 5, 'unknown_device', 'test', $3)",
    )
    .bind(stack.group_id)
    .bind(stack.namespace_ids[0])
    .bind(device.envelope(5, 1).encode().to_vec())
    .execute(pool)
    .await
    .unwrap();
    georelay_store::drain::acquire_lease(
        pool,
        stack.group_id,
        uuid::Uuid::new_v4(),
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .unwrap();
    let mut worker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM drain_leases WHERE group_id = $1 FOR UPDATE")
        .bind(stack.group_id)
        .execute(&mut *worker)
        .await
        .unwrap();
    let letter = dead_letters::list(
        pool,
        &Filter {
            limit: 1,
            ..Filter::default()
        },
    )
    .await
    .unwrap()
    .remove(0);
    let replay = tokio::spawn({
        let pool = pool.clone();
        async move {
            let master = georelay_testkit::master_key().unwrap();
            dead_letters::replay(&pool, &master, &letter).await.unwrap()
        }
    });
    let replay_waits = wait_until(Duration::from_secs(5), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE datname = current_database() AND wait_event_type = 'Lock')",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    })
    .await;
    assert!(
        replay_waits,
        "the replay does not wait for the lock the worker stores under"
    );
    sqlx::query(
        "INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
         VALUES ('plug-race', 6, '{}', now(), $1, 1)",
    )
    .bind(stack.namespace_ids[0])
    .execute(&mut *worker)
    .await
    .unwrap();
    worker.commit().await.unwrap();
    let replayed = replay.await.unwrap();
    assert!(matches!(replayed, Replayed::Kept { .. }), "{replayed:?}");
}

/// Device liveness: the worker writes its devices' `last_seen_at` soon after
/// it stores their records (without notifying ingest, whose key cache only
/// the key, group and enabled columns concern); a device that sent and then went quiet for
/// `--silent-after` counts in `georelay_drain_silent_devices` and is listed
/// by `admin device list --silent-for`; one that never sent is not silent.
#[tokio::test]
async fn a_device_that_went_quiet_is_counted_and_listed_as_silent() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let pool = stack.db.pool();
    let talker = devices(&stack, 1).await;
    stack.device("plug-never").await.unwrap();
    let mut notified = sqlx::postgres::PgListener::connect_with(pool)
        .await
        .unwrap();
    notified.listen("georelay").await.unwrap();
    publish(&stack, 0, &talker, 1..=3, 1).await;
    let drain = stack
        .drain(&[DRAIN_ARGS, &["--silent-after", "10s"]].concat())
        .unwrap();
    wait_stored(&stack, 3, Duration::from_secs(30)).await;
    let seen = wait_until(Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT last_seen_at IS NOT NULL FROM devices WHERE id = 'plug-000'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    })
    .await;
    assert!(seen, "the stored records never set last_seen_at");
    // Notifications come in commit order: had the liveness write notified,
    // that would come before this one.
    sqlx::query("UPDATE devices SET enabled = false WHERE id = 'plug-never'")
        .execute(pool)
        .await
        .unwrap();
    let first = notified.recv().await.unwrap();
    assert!(
        first.payload().contains("plug-never"),
        "the liveness write notified ingest: {}",
        first.payload()
    );
    sqlx::query("UPDATE devices SET enabled = true WHERE id = 'plug-never'")
        .execute(pool)
        .await
        .unwrap();

    let silent = wait_until(Duration::from_secs(30), || async {
        metric(&drain, "georelay_drain_silent_devices").await == 1.0
    })
    .await;
    assert!(silent, "the quiet device is never counted as silent");
    let listed =
        String::from_utf8(admin(&stack, &["device", "list", "--silent-for", "5s"]).stdout).unwrap();
    assert!(listed.contains("plug-000"), "{listed}");
    assert!(
        !listed.contains("plug-never"),
        "never sent, so not silent: {listed}"
    );
}

/// Rows of `device` in store order, as seqs.
async fn seqs_in_store_order(stack: &Stack, device: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM telemetry WHERE device_id = $1 ORDER BY store_order")
        .bind(device)
        .fetch_all(stack.db.pool())
        .await
        .unwrap()
}

/// How `device`'s gap closed, and the reason of its `gap_released` event.
async fn gap_closed(stack: &Stack, device: &str) -> (String, Option<String>) {
    sqlx::query_as(
        "SELECT g.closed_how, e.reason FROM device_gaps g
         JOIN failover_events e ON e.kind = 'gap_released' AND e.reason LIKE 'device ' || g.device_id || ':%'
         WHERE g.device_id = $1",
    )
    .bind(device)
    .fetch_one(stack.db.pool())
    .await
    .unwrap()
}

async fn parked(stack: &Stack, device: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM parked_records WHERE device_id = $1 ORDER BY seq")
        .bind(device)
        .fetch_all(stack.db.pool())
        .await
        .unwrap()
}

/// Region A is lost for good with records on it that ingest acknowledged.
/// Abandoning it: a device with nothing stranded flows at once; a device
/// whose records are stranded has its newer ones parked (in PostgreSQL)
/// until its agent sends the stranded ones again, then everything is stored
/// in seq order; a device that never sends them again (it died) keeps
/// parking what comes until an SRE releases its gap. Nobody can drop the
/// parked records by hand.
#[tokio::test]
async fn records_stranded_in_an_abandoned_region_hold_back_only_their_devices_and_fill_in_order() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let all = devices(&stack, 4).await;
    let (refills, clean, dead, tracker) = (&all[0], &all[1], &all[2], &all[3]);
    // A tracker deletes what was acknowledged (its front door says so).
    georelay_store::gaps::mark_does_not_send_again(stack.db.pool(), tracker.id.as_str())
        .await
        .unwrap();
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    publish(&stack, 0, &all[..2], 1..=2, 1).await;
    wait_stored(&stack, 4, Duration::from_secs(30)).await;
    // What ingest acknowledged in epoch 1, as its heartbeat reports it: the
    // refilling device got 202s up to 5 and the dead one up to 3, but the
    // region is lost before the worker reads those.
    for (device, through) in [(refills, 5), (clean, 2), (dead, 3), (tracker, 2)] {
        sqlx::query(
            "INSERT INTO device_acks (device_id, group_id, epoch, acked_through) VALUES ($1, $2, 1, $3)",
        )
        .bind(device.id.as_str())
        .bind(stack.group_id)
        .bind(through)
        .execute(stack.db.pool())
        .await
        .unwrap();
    }
    stack.regions[0].kill();
    stack.move_senders(1).await.unwrap();
    publish(&stack, 1, std::slice::from_ref(refills), 6..=8, 2).await;
    publish(&stack, 1, std::slice::from_ref(clean), 3..=5, 2).await;
    publish(&stack, 1, std::slice::from_ref(dead), 4..=5, 2).await;
    publish(&stack, 1, std::slice::from_ref(tracker), 3..=4, 2).await;
    // The worker has found epoch 1 unreadable (it says so on its lease row).
    assert!(
        wait_until(Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM drain_leases WHERE blocked_since IS NOT NULL)",
            )
            .fetch_one(stack.db.pool())
            .await
            .unwrap()
        })
        .await,
        "the worker reports itself blocked on epoch 1"
    );
    assert_eq!(
        stored(&stack).await,
        4,
        "strict order: nothing newer while A holds epoch 1"
    );

    let gave_up = admin(
        &stack,
        &["trail", "abandon", "--group", "g", "--epoch", "1", "--yes"],
    );
    assert!(gave_up.status.success(), "{gave_up:?}");
    let said = String::from_utf8_lossy(&gave_up.stdout);
    assert!(
        said.contains("2 devices wait for records stranded there")
            && said.contains("1 devices that do not send again"),
        "{gave_up:?}"
    );
    // The device with nothing stranded flows, and so does the tracker (its
    // 1..=2 are given up: nobody can send them again); the others' records
    // wait.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seqs_in_store_order(&stack, clean.id.as_str()).await.len() == 5
                && seqs_in_store_order(&stack, tracker.id.as_str()).await == vec![3, 4]
                && parked(&stack, refills.id.as_str()).await.len() == 3
                && parked(&stack, dead.id.as_str()).await.len() == 2
        })
        .await,
        "clean {:?}, parked {:?} and {:?}",
        seqs_in_store_order(&stack, clean.id.as_str()).await,
        parked(&stack, refills.id.as_str()).await,
        parked(&stack, dead.id.as_str()).await
    );
    assert_eq!(
        seqs_in_store_order(&stack, refills.id.as_str()).await,
        vec![1, 2]
    );
    let status = String::from_utf8_lossy(&admin(&stack, &["status"]).stdout).into_owned();
    assert!(
        status.contains("STRANDED")
            && status.contains(&format!("{}  1      3..=5", refills.id))
            && status.contains("release-gap"),
        "{status}"
    );
    let refused = sqlx::query("DELETE FROM parked_records")
        .execute(stack.db.pool())
        .await
        .unwrap_err();
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("GR015"),
        "{refused}"
    );
    // Nor can the waiting device move to another group (its parked records
    // are this group's worker's to release).
    let actor = georelay_store::control::Actor {
        actor: "test".into(),
        reason: None,
    };
    let other =
        georelay_store::control::add_group(stack.db.pool(), "h", "other", "eu-north", &actor)
            .await
            .unwrap();
    georelay_store::control::set_device_enabled(stack.db.pool(), refills.id.as_str(), false)
        .await
        .unwrap();
    let moved = sqlx::query("UPDATE devices SET group_id = $2 WHERE id = $1")
        .bind(refills.id.as_str())
        .bind(other)
        .execute(stack.db.pool())
        .await
        .unwrap_err();
    assert!(
        moved.as_database_error().and_then(|e| e.code()).as_deref() == Some("GR014")
            && moved.to_string().contains("waits for its records stranded"),
        "{moved}"
    );
    georelay_store::control::set_device_enabled(stack.db.pool(), refills.id.as_str(), true)
        .await
        .unwrap();

    // The agent sends its stranded records again (into the current epoch):
    // they fill the gap and the parked ones follow, in order; newer ones
    // flow as usual.
    publish(&stack, 1, std::slice::from_ref(refills), 3..=5, 2).await;
    publish(&stack, 1, std::slice::from_ref(refills), 9..=10, 2).await;
    // The dead device's newer records keep arriving: parked too.
    publish(&stack, 1, std::slice::from_ref(dead), 6..=7, 2).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seqs_in_store_order(&stack, refills.id.as_str()).await.len() == 10
                && parked(&stack, dead.id.as_str()).await.len() == 4
        })
        .await
    );
    assert_eq!(
        seqs_in_store_order(&stack, refills.id.as_str()).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert!(parked(&stack, refills.id.as_str()).await.is_empty());
    assert_eq!(
        seqs_in_store_order(&stack, dead.id.as_str()).await,
        Vec::<i64>::new()
    );

    // The dead device never sends 1..=3 again: an SRE gives them up.
    let released = admin(
        &stack,
        &[
            "device",
            "release-gap",
            "--device",
            dead.id.as_str(),
            "--reason",
            "unit scrapped",
        ],
    );
    assert!(released.status.success(), "{released:?}");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seqs_in_store_order(&stack, dead.id.as_str()).await.len() == 4
        })
        .await
    );
    assert_eq!(
        seqs_in_store_order(&stack, dead.id.as_str()).await,
        vec![4, 5, 6, 7]
    );
    let (how, reason) = gap_closed(&stack, dead.id.as_str()).await;
    assert_eq!(how, "released");
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("seqs 1 to 3") && r.contains("unit scrapped")),
        "{reason:?}"
    );
    let filled: String =
        sqlx::query_scalar("SELECT closed_how FROM device_gaps WHERE device_id = $1")
            .bind(refills.id.as_str())
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(filled, "filled");
    let (how, reason) = gap_closed(&stack, tracker.id.as_str()).await;
    assert_eq!(how, "released");
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("seqs 1 to 2") && r.contains("a tracker")),
        "{reason:?}"
    );

    // Given up is given up: if the released seqs come back after all (the
    // region returns, the device wakes up), storing them would put them
    // after 4..=7. They are kept as dead letters instead.
    publish(&stack, 1, std::slice::from_ref(dead), 1..=3, 2).await;
    publish(&stack, 1, std::slice::from_ref(dead), 8..=8, 2).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seqs_in_store_order(&stack, dead.id.as_str()).await.len() == 5
        })
        .await
    );
    assert_eq!(
        seqs_in_store_order(&stack, dead.id.as_str()).await,
        vec![4, 5, 6, 7, 8]
    );
    let kept: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM dead_letters WHERE device_id = $1 AND reason = 'gap_released' ORDER BY seq",
    )
    .bind(dead.id.as_str())
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(kept, vec![1, 2, 3]);
}

/// With the group's abandon_after set, the worker gives up on an epoch it
/// cannot read by itself, as `admin trail abandon` would: the device's
/// stranded records still come first once sent again.
#[tokio::test]
async fn the_worker_gives_up_on_an_unreadable_epoch_after_the_groups_abandon_after() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let all = devices(&stack, 1).await;
    let device = &all[0];
    publish(&stack, 0, &all, 1..=3, 1).await;
    sqlx::query(
        "INSERT INTO device_acks (device_id, group_id, epoch, acked_through) VALUES ($1, $2, 1, 3)",
    )
    .bind(device.id.as_str())
    .bind(stack.group_id)
    .execute(stack.db.pool())
    .await
    .unwrap();
    stack.regions[0].lose().unwrap();
    stack.move_senders(1).await.unwrap();
    publish(&stack, 1, &all, 4..=5, 2).await;
    let set = admin(
        &stack,
        &["group", "set", "--name", "g", "--abandon-after", "1s"],
    );
    assert!(set.status.success(), "{set:?}");
    let _worker = stack.drain(DRAIN_ARGS).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            parked(&stack, device.id.as_str()).await == vec![4, 5]
        })
        .await,
        "the worker gave up on epoch 1 and parked 4 and 5: {:?}",
        undrained(&stack).await
    );
    let actor: String =
        sqlx::query_scalar("SELECT actor FROM failover_events WHERE kind = 'abandoned'")
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert!(actor.starts_with("drain:"), "{actor}");
    publish(&stack, 1, &all, 1..=3, 2).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seqs_in_store_order(&stack, device.id.as_str()).await == vec![1, 2, 3, 4, 5]
        })
        .await,
        "{:?}",
        seqs_in_store_order(&stack, device.id.as_str()).await
    );
    let off = admin(
        &stack,
        &["group", "set", "--name", "g", "--abandon-after", "off"],
    );
    assert!(off.status.success(), "{off:?}");
    let after: Option<f64> = sqlx::query_scalar("SELECT abandon_after_s FROM routing_groups")
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
    assert_eq!(after, None);
}
