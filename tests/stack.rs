//! Ingest and drain together, meeting only through SQL and the queues: an
//! SRE's planned failover and failback by raw SQL while devices send. Every
//! accepted record is stored once, in per-device order, and the worker
//! follows the senders A → B → A.

use georelay_core::TransportKind;
use georelay_testkit::{wait_until, Stack, TestDevice, DRAIN_TEST_ARGS, INGEST_TEST_ARGS};
use std::time::{Duration, Instant};

const RECORDS: u64 = 60;

/// Sends `seqs`, each until it gets a 202; returns the epochs seen.
async fn send(device: TestDevice, base: String, seqs: std::ops::RangeInclusive<u64>) -> Vec<i64> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let give_up = Instant::now() + Duration::from_secs(90);
    let mut epochs = Vec::new();
    for seq in seqs {
        loop {
            assert!(Instant::now() < give_up, "{} seq {seq}: no 202", device.id);
            match device.post(&http, &base, seq).await {
                Ok((202, body)) => {
                    epochs.push(body["epoch"].as_i64().unwrap());
                    break;
                }
                Ok((503, _)) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok((status, body)) => panic!("{} seq {seq}: {status} {body}", device.id),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    epochs
}

#[tokio::test]
async fn planned_failover_and_failback_by_raw_sql_under_load_drain_in_order() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    failover_and_failback_under_load(stack).await;
}

/// The same across brokers: Service Bus primary, NATS secondary, and back.
#[tokio::test]
async fn a_trail_from_service_bus_to_nats_and_back_drains_in_order() {
    let regions = [
        (TransportKind::ServiceBus, "sb-west"),
        (TransportKind::Nats, "eu-north"),
    ];
    let stack = Stack::start_mixed(&regions, |r| Ok(r.url())).await.unwrap();
    failover_and_failback_under_load(stack).await;
}

async fn failover_and_failback_under_load(stack: Stack) {
    let ingest = stack.ingest(INGEST_TEST_ARGS).unwrap();
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();
    let mut devices = Vec::new();
    for i in 0..4 {
        devices.push(stack.device(&format!("plug-{i}")).await.unwrap());
    }
    // Three phases of 20 records per device: on eu-west, after a planned
    // failover to eu-north, after the failback to eu-west. The worker drains
    // meanwhile and must follow A -> B -> A.
    let phase = |seqs: std::ops::RangeInclusive<u64>| {
        let tasks: Vec<_> = devices
            .iter()
            .map(|d| tokio::spawn(send(d.clone(), ingest.url(), seqs.clone())))
            .collect();
        async move {
            let mut epochs = Vec::new();
            for t in tasks {
                epochs.extend(t.await.unwrap());
            }
            epochs.sort_unstable();
            epochs.dedup();
            epochs
        }
    };
    assert_eq!(phase(1..=20).await, vec![1]);
    stack.move_senders(1).await.unwrap();
    let epochs = phase(21..=40).await;
    assert!(epochs.contains(&2), "{epochs:?}");
    stack.move_senders(0).await.unwrap();
    let epochs = phase(41..=RECORDS).await;
    assert!(epochs.contains(&3), "{epochs:?}");
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM telemetry")
            .fetch_one(stack.db.pool())
            .await
            .unwrap()
    };
    let total = 4 * RECORDS as i64;
    assert!(
        wait_until(Duration::from_secs(60), || async { count().await == total }).await,
        "stored {} of {total}",
        count().await
    );
    let reordered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT seq, lag(seq) OVER (PARTITION BY device_id ORDER BY store_order) AS prev
                               FROM telemetry) t WHERE prev IS NOT NULL AND seq <> prev + 1",
    )
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(reordered, 0, "per-device store order follows seq");
    let trail_done = || async {
        sqlx::query_scalar::<_, Vec<i64>>(
            "SELECT coalesce(array_agg(epoch ORDER BY epoch), '{}') FROM routing_trail WHERE drained_at IS NULL",
        )
        .fetch_one(stack.db.pool())
        .await
        .unwrap()
            == vec![3]
    };
    assert!(
        wait_until(Duration::from_secs(30), trail_done).await,
        "epochs 1 and 2 drained, the worker followed back to eu-west"
    );
    let per_epoch: Vec<(i64, i64)> =
        sqlx::query_as("SELECT epoch, namespace_id FROM telemetry GROUP BY 1, 2 ORDER BY 1")
            .fetch_all(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        per_epoch,
        vec![
            (1, stack.namespace_ids[0]),
            (2, stack.namespace_ids[1]),
            (3, stack.namespace_ids[0])
        ]
    );
}

/// A device that re-sends a seq with other content within the broker's
/// duplicate window (it lost its state, or was cloned) gets a 202: the
/// record must reach `dead_letters` as a `seq_conflict`, not vanish at the
/// broker (whose duplicate id used to be `"{device}/{seq}"` alone). The
/// identical re-send is still stored once.
#[tokio::test]
async fn a_reused_seq_sent_through_ingest_is_reported_not_dropped_by_the_broker() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let ingest = stack.ingest(INGEST_TEST_ARGS).unwrap();
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let http = reqwest::Client::new();
    let other = device
        .seal(1, &serde_json::json!({"other": true}))
        .to_body();
    let bodies = [
        device.body(1),
        device.body(1),
        serde_json::json!({"seq": 1, "nonce": other.nonce, "ciphertext": other.ciphertext}),
        device.body(2),
    ];
    for body in bodies {
        let response = http
            .post(device.url(&ingest.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    let pool = stack.db.pool();
    let counts = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT (SELECT count(*) FROM telemetry), (SELECT count(*) FROM dead_letters)",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let done = wait_until(Duration::from_secs(30), || async {
        counts().await == (2, 1)
    })
    .await;
    assert!(
        done,
        "(stored, dead letters) = {:?}, want (2, 1)",
        counts().await
    );
    let (reason, seq): (String, i64) = sqlx::query_as("SELECT reason, seq FROM dead_letters")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!((reason.as_str(), seq), ("seq_conflict", 1));
}

/// Careless SQL on a live stack with a device sending: each statement that
/// used to stall the group or lose records is refused, and the records sent
/// after each are all stored, in order.
#[tokio::test]
async fn careless_sql_on_a_live_stack_is_refused_and_records_keep_flowing() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let ingest = stack.ingest(INGEST_TEST_ARGS).unwrap();
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let pool = stack.db.pool();
    sqlx::query("INSERT INTO routing_groups (name, queue, sender_namespace_id) SELECT 'other', 'q-other', id FROM namespaces WHERE name = 'eu-north'")
        .execute(pool)
        .await
        .unwrap();
    let statements = [
        "DELETE FROM routing_trail",
        "UPDATE routing_trail SET sealed_at = now(), drained_at = now()",
        "UPDATE routing_trail SET namespace_id = (SELECT id FROM namespaces WHERE name = 'eu-north')",
        "INSERT INTO routing_trail (group_id, epoch, namespace_id) SELECT id, epoch + 1, sender_namespace_id FROM routing_groups",
        "UPDATE routing_groups SET queue = 'renamed'",
        "UPDATE routing_groups SET moved_at = now() + interval '1 day'",
        "UPDATE namespaces SET endpoint = 'nats://127.0.0.1:1' WHERE name = 'eu-west'",
        "DELETE FROM routing_groups",
        "TRUNCATE failover_events",
        // ingest recorded its first publish to epoch 1 by now
        "DELETE FROM epoch_publishes",
        "TRUNCATE epoch_publishes",
        "UPDATE routing_trail SET publishes_recorded = NOT publishes_recorded",
        // a sending device moved: enabled (GR012), or disabled in the same breath (GR014)
        "UPDATE devices SET group_id = (SELECT id FROM routing_groups WHERE name = 'other')",
        "UPDATE devices SET enabled = false, group_id = (SELECT id FROM routing_groups WHERE name = 'other')",
    ];
    let mut sent = 0;
    for sql in statements {
        let refused = sqlx::query(sql).execute(pool).await;
        assert!(refused.is_err(), "{sql}: refused");
        send(device.clone(), ingest.url(), sent + 1..=sent + 3).await;
        sent += 3;
    }
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT seq FROM telemetry ORDER BY store_order")
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let all = wait_until(Duration::from_secs(30), || async {
        stored().await.len() as u64 == sent
    })
    .await;
    assert!(all, "{} of {sent} stored", stored().await.len());
    assert_eq!(
        stored().await,
        (1..=sent as i64).collect::<Vec<_>>(),
        "in order"
    );
}

/// Senders moved by raw SQL to a namespace whose endpoint was mistyped, and
/// straight back: nothing was ever published to that epoch, so once it is
/// sealed the worker follows past it without reading it (it cannot reach
/// it) and the records sent afterwards are stored. It used to wait on that
/// unreachable queue forever.
#[tokio::test]
async fn senders_moved_to_a_mistyped_endpoint_and_straight_back_do_not_stall_the_drain() {
    use georelay_store::control::{self, NewNamespace};
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let pool = stack.db.pool();
    let typo = control::add_namespace(
        pool,
        &georelay_testkit::master_key().unwrap(),
        &NewNamespace {
            name: "eu-typo",
            region: "eu-typo",
            transport: TransportKind::Nats,
            // nothing listens there
            endpoint: "nats://127.0.0.1:1",
            priority: 20,
            key_name: None,
            key: None,
        },
    )
    .await
    .unwrap();
    let ingest = stack.ingest(INGEST_TEST_ARGS).unwrap();
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();
    let device = stack.device("plug-typo").await.unwrap();
    assert_eq!(send(device.clone(), ingest.url(), 1..=5).await, vec![1; 5]);
    for to in [typo, stack.namespace_ids[0]] {
        sqlx::query("UPDATE routing_groups SET sender_namespace_id = $1 WHERE id = $2")
            .bind(to)
            .bind(stack.group_id)
            .execute(pool)
            .await
            .unwrap();
    }
    // Once ingest writes to epoch 3 (it may have loaded epoch 2 meanwhile;
    // nothing reached the mistyped namespace).
    let on_3 = wait_until(Duration::from_secs(10), || async {
        let metrics = ingest.metrics().await.unwrap();
        metrics.contains("georelay_ingest_group_epoch{group=\"g\"} 3")
    })
    .await;
    assert!(on_3, "ingest never wrote to epoch 3");
    assert_eq!(send(device, ingest.url(), 6..=10).await, vec![3; 5]);
    let stored = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM telemetry")
            .fetch_one(pool)
            .await
            .unwrap()
    };
    assert!(
        wait_until(Duration::from_secs(30), || async { stored().await == 10 }).await,
        "stored {} of 10: the worker waits on the epoch nobody published to",
        stored().await
    );
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM failover_events WHERE kind = 'drain_followed' AND epoch = 3",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(reason.contains("drained unread"), "{reason}");
}
