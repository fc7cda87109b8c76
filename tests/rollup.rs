//! The rollup worker (`georelay rollup`, real processes, real PostgreSQL):
//! its windows equal a plain SQL `GROUP BY` over `telemetry` — with late
//! records, a transaction that holds a lower `store_order` and commits after
//! higher ones, and the worker killed -9 mid-way with a standby taking over.

use georelay_testkit::{wait_until, Service, Stack};
use std::time::Duration;

type Window = (String, String, String, i32, String, i64, f64, f64, f64);

/// What `telemetry_rollups` holds, in a fixed order.
async fn rolled_up(stack: &Stack) -> Vec<Window> {
    sqlx::query_as(
        "SELECT device_id, sensor, field, window_seconds, window_start::text, count, sum, min, max
         FROM telemetry_rollups ORDER BY 1, 2, 3, 4, 5",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap()
}

/// The same windows, computed by SQL from `telemetry` alone.
async fn by_group_by(stack: &Stack) -> Vec<Window> {
    sqlx::query_as(
        "SELECT t.device_id, '' AS sensor, kv.key AS field, w AS window_seconds,
                to_timestamp(floor(extract(epoch FROM (t.payload->>'captured_at')::timestamptz) / w) * w)::text,
                count(*), sum(kv.value::text::float8), min(kv.value::text::float8), max(kv.value::text::float8)
         FROM telemetry t, jsonb_each(t.payload) kv, unnest('{60,180,3600}'::int[]) w
         WHERE jsonb_typeof(kv.value) = 'number'
         GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap()
}

/// Stores readings `(device, seq, minute, second, value)` as the drain does.
async fn store<'e>(
    exec: impl sqlx::PgExecutor<'e>,
    stack: &Stack,
    rows: &[(&str, i64, i64, i64, f64)],
) {
    let devices: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let payloads: Vec<String> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "captured_at": format!("2026-11-30T10:{:02}:{:02}Z", r.2, r.3),
                "v": r.4,
                "label": "not a number",
            })
            .to_string()
        })
        .collect();
    sqlx::query(
        "INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
         SELECT d, s, p::jsonb, now(), $4, 1 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(d, s, p)",
    )
    .bind(&devices)
    .bind(&seqs)
    .bind(&payloads)
    .bind(stack.namespace_ids[0])
    .execute(exec)
    .await
    .unwrap();
}

async fn watermark(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT store_order FROM rollup_progress")
        .fetch_one(stack.db.pool())
        .await
        .unwrap()
}

/// `georelay_rollup_held_back_seconds` of a rollup worker.
async fn held_back(rollup: &Service) -> f64 {
    let metrics = georelay_testkit::metrics_text(&rollup.url()).await.unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("georelay_rollup_held_back_seconds "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no held-back gauge in\n{metrics}"))
}

/// Every stored row is rolled up.
async fn caught_up(stack: &Stack) -> bool {
    watermark(stack).await >= last_store_order(stack).await
}

async fn last_store_order(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT max(store_order) FROM telemetry")
        .fetch_one(stack.db.pool())
        .await
        .unwrap()
}

const ROLLUP_ARGS: &[&str] = &["--poll-interval", "100ms", "--lease", "2s"];

#[tokio::test]
async fn windows_equal_a_group_by_through_late_rows_a_slow_commit_and_a_kill_9() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    for d in ["a", "b"] {
        stack.device(d).await.unwrap();
    }
    let mut first = Service::start(&stack.db, "rollup", ROLLUP_ARGS).unwrap();
    store(
        stack.db.pool(),
        &stack,
        &[
            ("a", 1, 0, 10, 1.0),
            ("a", 2, 0, 50, 3.0),
            ("a", 3, 1, 5, -2.5),
            ("b", 1, 0, 10, 100.0),
            ("b", 2, 4, 0, 7.0),
        ],
    )
    .await;
    assert!(wait_until(Duration::from_secs(30), || caught_up(&stack)).await);

    // A transaction takes a store_order and commits only after later rows
    // are stored and committed: the rollup must wait for it, not pass it.
    let mut slow = stack.db.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM drain_leases FOR UPDATE")
        .execute(&mut *slow)
        .await
        .unwrap();
    store(&mut *slow, &stack, &[("a", 4, 2, 0, 10.0)]).await;
    let held: i64 = sqlx::query_scalar("SELECT max(store_order) FROM telemetry")
        .fetch_one(&mut *slow)
        .await
        .unwrap();
    store(stack.db.pool(), &stack, &[("b", 3, 4, 30, 1.5)]).await;
    // The worker has seen the rows and waits for the open transaction (it
    // says so); it must not have passed the uncommitted store_order.
    let waiting = wait_until(Duration::from_secs(10), || async {
        held_back(&first).await >= 1.0
    })
    .await;
    assert!(waiting, "never held back: {} s", held_back(&first).await);
    assert!(
        watermark(&stack).await < held,
        "the rollup passed a store_order whose transaction had not committed"
    );
    let status = georelay_testkit::admin_status(&stack.db).unwrap();
    assert!(
        status.contains("ROLLUP") && status.contains("behind"),
        "{status}"
    );
    slow.commit().await.unwrap();

    // Late rows: readings from minute 0, stored after that window was rolled up.
    store(
        stack.db.pool(),
        &stack,
        &[("a", 5, 0, 30, 4.0), ("b", 4, 0, 59, -1.0)],
    )
    .await;
    assert!(wait_until(Duration::from_secs(30), || caught_up(&stack)).await);
    assert_eq!(rolled_up(&stack).await, by_group_by(&stack).await);

    // kill -9 mid-stream; a standby takes over after the lease: still exact.
    let _standby = Service::start(&stack.db, "rollup", ROLLUP_ARGS).unwrap();
    for seq in 6..40 {
        store(
            stack.db.pool(),
            &stack,
            &[("a", seq, seq % 7, seq % 60, seq as f64 * 0.5)],
        )
        .await;
        if seq == 20 {
            first.kill();
        }
    }
    assert!(wait_until(Duration::from_secs(30), || caught_up(&stack)).await);
    assert_eq!(rolled_up(&stack).await, by_group_by(&stack).await);
    let minute0: (i64, f64, f64, f64) = sqlx::query_as(
        "SELECT count, sum, min, max FROM telemetry_rollups
         WHERE device_id = 'a' AND field = 'v' AND window_seconds = 60
           AND window_start = '2026-11-30T10:00:00Z'",
    )
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    // 1.0, 3.0 and the late 4.0, plus seqs 7, 14, 21, 28, 35 of the last run
    // (10:00:07 … 10:00:35; 3.5, 7, 10.5, 14, 17.5).
    assert_eq!(minute0, (8, 60.5, 1.0, 17.5));
}
