//! The SQL control plane against a real PostgreSQL: migrations, and the one
//! trigger every move of senders goes through, exercised with raw SQL the
//! way an SRE would run it.

use georelay_store::drain::DeadLetterReason;
use georelay_testkit::{georelay_command, TestDb};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use std::time::Duration;

const TABLES: [&str; 9] = [
    "namespaces",
    "routing_groups",
    "routing_trail",
    "instances",
    "instance_epochs",
    "failover_events",
    "devices",
    "telemetry",
    "dead_letters",
];

#[tokio::test]
async fn migrate_applies_on_an_empty_database_and_again_is_a_no_op() {
    let db = TestDb::empty().await.unwrap();
    let count_tables = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name = ANY($1)",
        )
        .bind(TABLES)
        .fetch_one(db.pool())
        .await
        .unwrap()
    };
    assert_eq!(count_tables().await, 0);
    for run in 1..=2 {
        let out = georelay_command(&db)
            .unwrap()
            .arg("migrate")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(count_tables().await, TABLES.len() as i64, "run {run}");
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(applied, georelay_store::MIGRATOR.iter().count() as i64);
}

/// Three namespaces in three regions and one group on the first, all by raw SQL.
async fn control_plane(pool: &PgPool) -> (i64, [i64; 3]) {
    let mut ids = [0; 3];
    for (i, (name, prio)) in [("eu-west", 10), ("eu-north", 20), ("us-east", 30)]
        .into_iter()
        .enumerate()
    {
        ids[i] = sqlx::query_scalar(
            "INSERT INTO namespaces (name, region, transport, endpoint, priority)
             VALUES ($1, $1, 'nats', 'nats://127.0.0.1:1', $2) RETURNING id",
        )
        .bind(name)
        .bind(prio)
        .fetch_one(pool)
        .await
        .unwrap();
    }
    let group = sqlx::query_scalar(
        "INSERT INTO routing_groups (name, queue, sender_namespace_id) VALUES ('g', 'q', $1) RETURNING id",
    )
    .bind(ids[0])
    .fetch_one(pool)
    .await
    .unwrap();
    (group, ids)
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    epoch: i64,
    sender: i64,
    drain: i64,
    trail: Vec<(i64, i64)>,
    moves: i64,
}

async fn snapshot(pool: &PgPool, group: i64) -> Snapshot {
    let g = sqlx::query(
        "SELECT epoch, sender_namespace_id, drain_namespace_id FROM routing_groups WHERE id = $1",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .unwrap();
    let trail = sqlx::query_as(
        "SELECT epoch, namespace_id FROM routing_trail WHERE group_id = $1 ORDER BY epoch",
    )
    .bind(group)
    .fetch_all(pool)
    .await
    .unwrap();
    let moves = sqlx::query_scalar(
        "SELECT count(*) FROM failover_events WHERE group_id = $1 AND kind = 'sender_moved'",
    )
    .bind(group)
    .fetch_one(pool)
    .await
    .unwrap();
    Snapshot {
        epoch: g.get(0),
        sender: g.get(1),
        drain: g.get(2),
        trail,
        moves,
    }
}

#[tokio::test]
async fn a_new_group_starts_at_epoch_one_with_its_trail_and_worker_on_the_sender_namespace() {
    let db = TestDb::migrated().await.unwrap();
    let (group, [a, ..]) = control_plane(db.pool()).await;
    assert_eq!(
        snapshot(db.pool(), group).await,
        Snapshot {
            epoch: 1,
            sender: a,
            drain: a,
            trail: vec![(1, a)],
            moves: 0
        }
    );
    let created: (String, Option<i64>, i64) = sqlx::query_as(
        "SELECT kind, from_namespace_id, to_namespace_id FROM failover_events WHERE group_id = $1",
    )
    .bind(group)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(created, ("group_created".to_owned(), None, a));
}

#[tokio::test]
async fn a_raw_update_of_the_sender_namespace_bumps_epoch_opens_trail_audits_and_notifies() {
    let db = TestDb::migrated().await.unwrap();
    let (group, [a, b, _]) = control_plane(db.pool()).await;
    let mut listener = PgListener::connect_with(db.pool()).await.unwrap();
    listener.listen("georelay").await.unwrap();

    // Exactly what an SRE types in psql, with the optional audit settings.
    let mut conn = db.pool().acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN;
         SET LOCAL georelay.actor = 'sre:alice';
         SET LOCAL georelay.reason = 'planned maintenance of eu-west';
         UPDATE routing_groups SET sender_namespace_id = {b} WHERE name = 'g';
         COMMIT;"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();

    let after = snapshot(db.pool(), group).await;
    assert_eq!(
        after,
        Snapshot {
            epoch: 2,
            sender: b,
            drain: a,
            trail: vec![(1, a), (2, b)],
            moves: 1
        }
    );
    let event: (Option<i64>, i64, i64, String, Option<String>) = sqlx::query_as(
        "SELECT from_namespace_id, to_namespace_id, epoch, actor, reason FROM failover_events
         WHERE group_id = $1 AND kind = 'sender_moved'",
    )
    .bind(group)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        event,
        (
            Some(a),
            b,
            2,
            "sre:alice".to_owned(),
            Some("planned maintenance of eu-west".to_owned())
        )
    );

    let note = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .unwrap()
        .unwrap();
    let payload: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
    assert_eq!(payload["table"], "routing_groups");
    assert_eq!(payload["name"], "g");
    assert_eq!(payload["epoch"], 2);
    assert_eq!(payload["sender_namespace_id"], b);

    // Without the settings the actor is the database user.
    sqlx::query("UPDATE routing_groups SET sender_namespace_id = $1 WHERE id = $2")
        .bind(a)
        .bind(group)
        .execute(db.pool())
        .await
        .unwrap();
    let actor: String =
        sqlx::query_scalar("SELECT actor FROM failover_events WHERE group_id = $1 AND epoch = 3")
            .bind(group)
            .fetch_one(db.pool())
            .await
            .unwrap();
    let user: String = sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(actor, user);
    assert_eq!(
        snapshot(db.pool(), group).await.trail,
        vec![(1, a), (2, b), (3, a)],
        "failback opens a new epoch"
    );
}

#[tokio::test]
async fn an_update_that_keeps_the_namespace_changes_nothing() {
    let db = TestDb::migrated().await.unwrap();
    let (group, [a, ..]) = control_plane(db.pool()).await;
    let before = snapshot(db.pool(), group).await;
    let updated = sqlx::query("UPDATE routing_groups SET sender_namespace_id = $1 WHERE id = $2")
        .bind(a)
        .bind(group)
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(updated.rows_affected(), 1);
    assert_eq!(snapshot(db.pool(), group).await, before);
}

#[tokio::test]
async fn moves_to_a_disabled_or_unknown_namespace_are_refused_and_change_nothing() {
    let db = TestDb::migrated().await.unwrap();
    let (group, [_, b, _]) = control_plane(db.pool()).await;
    sqlx::query("UPDATE namespaces SET enabled = false WHERE id = $1")
        .bind(b)
        .execute(db.pool())
        .await
        .unwrap();
    let before = snapshot(db.pool(), group).await;

    let err = sqlx::query("UPDATE routing_groups SET sender_namespace_id = $1 WHERE id = $2")
        .bind(b)
        .bind(group)
        .execute(db.pool())
        .await
        .unwrap_err();
    let db_err = err.as_database_error().unwrap();
    assert_eq!(db_err.code().as_deref(), Some("GR001"));
    assert_eq!(
        db_err.message(),
        "cannot move group \"g\" to namespace \"eu-north\": it is disabled"
    );

    let err = sqlx::query("UPDATE routing_groups SET sender_namespace_id = 999 WHERE id = $1")
        .bind(group)
        .execute(db.pool())
        .await
        .unwrap_err();
    let db_err = err.as_database_error().unwrap();
    assert_eq!(db_err.code().as_deref(), Some("23503"));
    assert!(
        db_err.message().contains("no such namespace"),
        "{}",
        db_err.message()
    );

    assert_eq!(snapshot(db.pool(), group).await, before);
}

#[tokio::test]
async fn epoch_is_not_edited_by_hand_and_the_audit_is_append_only() {
    let db = TestDb::migrated().await.unwrap();
    let (group, _) = control_plane(db.pool()).await;
    let err = sqlx::query("UPDATE routing_groups SET epoch = 7 WHERE id = $1")
        .bind(group)
        .execute(db.pool())
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("GR002")
    );
    for stmt in [
        "UPDATE failover_events SET actor = 'mallory'",
        "DELETE FROM failover_events",
    ] {
        let err = sqlx::query(stmt).execute(db.pool()).await.unwrap_err();
        assert_eq!(
            err.as_database_error().unwrap().code().as_deref(),
            Some("GR003"),
            "{stmt}"
        );
    }
    assert_eq!(snapshot(db.pool(), group).await.epoch, 1);
}

#[tokio::test]
async fn failover_bit_namespace_switch_and_health_changes_notify() {
    let db = TestDb::migrated().await.unwrap();
    let (group, [a, ..]) = control_plane(db.pool()).await;
    let mut listener = PgListener::connect_with(db.pool()).await.unwrap();
    listener.listen("georelay").await.unwrap();
    let changed_at = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT health_changed_at::text FROM namespaces WHERE id = $1",
        )
        .bind(a)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let health_before = changed_at(db.pool().clone()).await;

    let steps = [
        (
            format!("UPDATE routing_groups SET failover_enabled = false WHERE id = {group}"),
            "routing_groups",
            "failover_enabled",
            serde_json::json!(false),
        ),
        (
            format!("UPDATE namespaces SET enabled = false WHERE id = {a}"),
            "namespaces",
            "enabled",
            serde_json::json!(false),
        ),
        (
            format!("UPDATE namespaces SET health = 'down' WHERE id = {a}"),
            "namespaces",
            "health",
            serde_json::json!("down"),
        ),
    ];
    for (stmt, table, field, value) in steps {
        sqlx::query(&stmt).execute(db.pool()).await.unwrap();
        let note = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .unwrap()
            .unwrap();
        let payload: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
        assert_eq!(
            (payload["table"].as_str(), &payload[field]),
            (Some(table), &value),
            "{stmt}"
        );
    }
    assert_ne!(
        changed_at(db.pool().clone()).await,
        health_before,
        "health_changed_at follows health"
    );
}

#[tokio::test]
async fn dead_letter_reasons_are_exactly_those_the_database_check_allows() {
    let db = TestDb::migrated().await.unwrap();
    let check: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'dead_letters_reason_check'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    // e.g. CHECK ((reason = ANY (ARRAY['undecodable'::text, ...])))
    let mut allowed: Vec<&str> = check.split('\'').skip(1).step_by(2).collect();
    allowed.sort_unstable();
    let mut ours: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.as_str()).collect();
    ours.sort_unstable();
    assert_eq!(allowed, ours, "the enum and {check} disagree");
}

/// A flood of made-up device ids is a flood of cache misses. At most
/// `MAX_LOOKUPS` of them query the database at once (they used to take as
/// many connections as the pool had, which the lease heartbeat and failover
/// need too).
#[tokio::test]
async fn a_flood_of_unknown_device_ids_holds_only_a_few_database_connections() {
    use georelay_store::keys::{Devices, MAX_LOOKUPS};
    let db = TestDb::migrated().await.unwrap();
    let pool = georelay_store::connect(db.url(), 16).await.unwrap();
    let master = std::sync::Arc::new(georelay_testkit::master_key().unwrap());
    let devices = std::sync::Arc::new(Devices::new(pool, master));
    // Every look-up waits on this lock, so those running can be counted.
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let flood: Vec<_> = (0..50)
        .map(|i| {
            let devices = devices.clone();
            tokio::spawn(async move { devices.get(&format!("nobody-{i}")).await })
        })
        .collect();
    let running = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE 'SELECT group_id, enabled, key_sealed FROM devices%'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap()
    };
    let started =
        georelay_testkit::wait_until(Duration::from_secs(10), || async { running().await > 0 })
            .await;
    assert!(started, "look-ups reach the database");
    // Give the rest every chance to start too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(running().await, MAX_LOOKUPS as i64);
    blocker.rollback().await.unwrap();
    for lookup in flood {
        assert!(lookup.await.unwrap().unwrap().is_none(), "unknown");
    }
}

/// Every hand edit that would stall a group or lose records is refused by
/// the database with its own SQLSTATE and a hint, and changes nothing. Trail:
/// epoch 1 on eu-west, 2 on eu-north (the current one); the group's worker
/// still on epoch 1.
#[tokio::test]
async fn hand_edits_that_would_stall_or_lose_are_refused_with_a_hint() {
    use sqlx::postgres::PgDatabaseError;
    let db = TestDb::migrated().await.unwrap();
    let pool = db.pool();
    let (group, ns) = control_plane(pool).await;
    sqlx::query("UPDATE routing_groups SET sender_namespace_id = $1 WHERE id = $2")
        .bind(ns[1])
        .bind(group)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE namespaces SET key_name = 'user:g', key_sealed = '\\x00' WHERE name = 'us-east'",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO routing_groups (name, queue, sender_namespace_id) SELECT 'other', 'q-other', id FROM namespaces WHERE name = 'us-east'")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO devices (id, group_id, key_sealed) VALUES ('plug-1', $1, '\\x00')")
        .bind(group)
        .execute(pool)
        .await
        .unwrap();
    let before = snapshot(pool, group).await;
    let cases: &[(&str, &str)] = &[
        ("DELETE FROM routing_trail", "GR004"),
        ("DELETE FROM routing_trail WHERE epoch = 1", "GR004"),
        ("UPDATE routing_trail SET namespace_id = (SELECT id FROM namespaces WHERE name = 'us-east') WHERE epoch = 1", "GR004"),
        ("UPDATE routing_trail SET epoch = 7 WHERE epoch = 2", "GR004"),
        ("INSERT INTO routing_trail (group_id, epoch, namespace_id) SELECT id, 3, sender_namespace_id FROM routing_groups", "GR004"),
        // The runbook's "mark drained", run on the current epoch.
        ("UPDATE routing_trail SET sealed_at = now(), drained_at = now() WHERE epoch = 2", "GR005"),
        ("DELETE FROM routing_groups", "GR006"),
        ("UPDATE routing_groups SET queue = 'q2'", "GR007"),
        ("UPDATE routing_groups SET moved_at = now() + interval '1 day'", "GR008"),
        ("INSERT INTO routing_groups (name, queue, sender_namespace_id) SELECT 'g2', 'q', id FROM namespaces WHERE name = 'us-east'", "GR009"),
        ("UPDATE namespaces SET endpoint = 'nats://10.9.9.9:4222' WHERE name = 'eu-west'", "GR010"),
        ("UPDATE namespaces SET name = 'us-east-2' WHERE name = 'us-east'", "GR011"),
        ("TRUNCATE failover_events", "GR003"),
        ("UPDATE devices SET group_id = (SELECT id FROM routing_groups WHERE name = 'other')", "GR012"),
    ];
    for (sql, code) in cases {
        let err = sqlx::query(sql).execute(pool).await.unwrap_err();
        let pg = err
            .as_database_error()
            .and_then(|e| e.try_downcast_ref::<PgDatabaseError>())
            .unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(pg.code(), *code, "{sql}: {}", pg.message());
        if *code != "GR003" {
            assert!(pg.hint().is_some_and(|h| !h.is_empty()), "{sql}: a hint");
        }
        assert_eq!(snapshot(pool, group).await, before, "{sql} changed nothing");
    }
    // What stays allowed: the runbook's mark-drained on an old epoch, a
    // drained row's deletion, an endpoint edit where nothing is undrained.
    sqlx::query("UPDATE routing_trail SET sealed_at = now(), drained_at = now() WHERE epoch = 1 AND group_id = $1")
        .bind(group)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE namespaces SET endpoint = 'nats://10.9.9.9:4222' WHERE name = 'eu-west'")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM routing_trail WHERE epoch = 1 AND group_id = $1")
        .bind(group)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE devices SET enabled = false, group_id = (SELECT id FROM routing_groups WHERE name = 'other')")
        .execute(pool)
        .await
        .unwrap();
}

/// The failover cool-down counts from the senders' last move; a group whose
/// senders never moved has none to wait out (it used to count from the
/// group's creation: a new group could not fail over for a while).
#[tokio::test]
async fn a_new_group_fails_over_at_once() {
    use georelay_store::control::Actor;
    use georelay_store::routing::{fail_over, Failover, Trouble};
    let db = TestDb::migrated().await.unwrap();
    let pool = db.pool();
    let (group, ns) = control_plane(pool).await;
    let actor = Actor {
        actor: "test".into(),
        reason: None,
    };
    let hour = Duration::from_secs(3600);
    let first = fail_over(pool, group, ns[0], Trouble::Down, &[], hour, &actor)
        .await
        .unwrap();
    assert!(
        matches!(first, Failover::Moved { epoch: 2, .. }),
        "{first:?}"
    );
    // Having moved, it waits out the cool-down before moving again.
    let second = fail_over(pool, group, ns[1], Trouble::Down, &[], hour, &actor)
        .await
        .unwrap();
    assert!(matches!(second, Failover::CoolingDown { .. }), "{second:?}");
}
