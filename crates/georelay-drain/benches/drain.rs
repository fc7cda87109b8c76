//! Drain benchmark: the real worker (in process, real PostgreSQL, real
//! `nats-server`) storing a pre-filled queue, beside raw PostgreSQL inserts
//! of the same rows measured in the same run; then end-to-end lag under a
//! steady publish rate.
//!
//!     cargo bench -p georelay-drain --bench drain
//!     BENCH_RECORDS=200000 BENCH_RATE=20000 cargo bench -p georelay-drain --bench drain
//!     BENCH_GAPS=1 cargo bench -p georelay-drain --bench drain   # the gap-checking insert
//!     BENCH_BUNDLE=1 cargo bench -p georelay-drain --bench drain  # one message per record
//!
//! The queue holds what ingest makes of agents' batch requests: each
//! device's records in bundles of BENCH_BUNDLE (64; 1: one message each).
//!
//! Prints, for each of BENCH_ROUNDS rounds (3): raw multi-row INSERT rows/s (statements of the
//! worker's batch size into telemetry itself, emptied afterwards), drain rows/s from a full queue
//! of the same records and their ratio, and the worker's CPU per 1,000 records
//! (this process's, while it drains); the median ratio; then, with
//! records published at BENCH_RATE/s for BENCH_SECONDS, the queue depth each
//! second and the p50/p99 of stored_at - received_at.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use georelay_core::{envelope, MasterKey};
use georelay_testkit::{cpu_seconds, master_key_b64, Stack, TestDb, TestDevice, QUEUE};
use georelay_transport::{Limits, Namespace, Triplet};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn stored(db: &TestDb, device: &str, seq: i64) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM telemetry WHERE device_id = $1 AND seq = $2)")
        .bind(device)
        .bind(seq)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// The queue messages ingest makes of `seqs` of each device sent in
/// batches: per device, bundles of `bundle` consecutive records (devices
/// interleaved), or one message per record when `bundle` is 1.
fn messages(
    devices: &[TestDevice],
    seqs: std::ops::RangeInclusive<u64>,
    bundle: usize,
) -> Vec<(String, Bytes)> {
    let seqs: Vec<u64> = seqs.collect();
    let mut out = Vec::new();
    for chunk in seqs.chunks(bundle) {
        for d in devices {
            let records: Vec<(String, Bytes)> = chunk
                .iter()
                .map(|&s| (d.id.record_id(s), d.envelope(s, 1).encode()))
                .collect();
            match records.as_slice() {
                [one] => out.push(one.clone()),
                _ => {
                    let id = envelope::bundle_id(records.iter().map(|(id, _)| id.as_str()));
                    let envelopes: Vec<Bytes> = records.into_iter().map(|(_, e)| e).collect();
                    out.push((id, envelope::bundle(&envelopes)));
                }
            }
        }
    }
    out
}

async fn count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(db.pool())
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let records = env("BENCH_RECORDS", 100_000);
    let devices_n = env("BENCH_DEVICES", 50);
    let rate = env("BENCH_RATE", 15_000);
    let seconds = env("BENCH_SECONDS", 10);
    let bundle = env("BENCH_BUNDLE", envelope::MAX_BUNDLE).clamp(1, envelope::MAX_BUNDLE);
    println!("drain benchmark: {records} records from {devices_n} devices, {bundle} a queue message; then {rate} records/s for {seconds} s");

    let stack = Stack::start(&["bench"]).await.unwrap();
    let (db, region, ns_id) = (&stack.db, &stack.regions[0], stack.namespace_ids[0]);
    let mut devices = Vec::new();
    for i in 0..devices_n {
        devices.push(stack.device(&format!("bench-{i}")).await.unwrap());
    }
    let per_device = (records / devices_n) as u64;
    let total = per_device as usize * devices_n;
    let batch = georelay_drain::Settings::default().batch_size;

    if env("BENCH_GAPS", 0) == 1 {
        // A released gap of another device of the group: the worker stores
        // with the insert that checks rows against gaps.
        let other = stack.device("bench-released").await.unwrap();
        sqlx::query(
            "INSERT INTO device_gaps (device_id, group_id, epoch, after_seq, through_seq, closed_at, closed_how)
             VALUES ($1, $2, 1, 0, 10, now(), 'released')",
        )
        .bind(other.id.as_str())
        .bind(stack.group_id)
        .execute(db.pool())
        .await
        .unwrap();
        println!("(a device of the group has a released gap: the gap-checking insert)");
    }
    let ns = Namespace::connect(&Triplet::nats(region.url()), Limits::default())
        .await
        .unwrap();
    assert!(ns.wait_connected(Duration::from_secs(5)).await);
    ns.ensure_queue(QUEUE).await.unwrap();
    let start_worker = || {
        let stop = CancellationToken::new();
        let stack_url = db.url().to_owned();
        let token = stop.clone();
        let worker = tokio::spawn(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let pool = georelay_store::connect(&stack_url, 8).await.unwrap();
            georelay_drain::run(
                georelay_drain::Config::default(),
                pool,
                MasterKey::from_base64(&master_key_b64()).unwrap(),
                listener,
                token,
            )
            .await
        });
        (stop, worker)
    };

    // Rounds of the same rows (new seqs each round, so no message id repeats
    // within the broker's duplicate window): raw inserts into an empty
    // telemetry, then the worker draining them from a full queue. The
    // machine's load drifts from minute to minute; the median of the
    // rounds' ratios is the figure.
    let rounds = env("BENCH_ROUNDS", 3).max(1);
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds as u64 {
        let seqs = round * per_device + 1..=(round + 1) * per_device;
        sqlx::query("TRUNCATE telemetry")
            .execute(db.pool())
            .await
            .unwrap();
        // Raw PostgreSQL: the same rows, as many a statement as the worker
        // stores in one batch, into telemetry itself (same keys, checks
        // and foreign keys), then emptied again.
        let rows: Vec<(String, i64, String)> = seqs
            .clone()
            .flat_map(|s| {
                devices.iter().map(move |d| {
                    (
                        d.id.to_string(),
                        s as i64,
                        serde_json::json!({"seq": s, "reading": s as f64 / 10.0}).to_string(),
                    )
                })
            })
            .collect();
        let started = Instant::now();
        for chunk in rows.chunks(batch) {
            let d: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
            let s: Vec<i64> = chunk.iter().map(|r| r.1).collect();
            let p: Vec<&str> = chunk.iter().map(|r| r.2.as_str()).collect();
            sqlx::query(
                "INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
                 SELECT d, s, p::jsonb, now(), $4, 1 FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(d, s, p)
                 ON CONFLICT (device_id, seq) DO NOTHING",
            )
            .bind(&d)
            .bind(&s)
            .bind(&p)
            .bind(ns_id)
            .execute(db.pool())
            .await
            .unwrap();
        }
        let raw_rate = total as f64 / started.elapsed().as_secs_f64();
        sqlx::query("TRUNCATE telemetry")
            .execute(db.pool())
            .await
            .unwrap();

        // Fill the queue, then drain it.
        let items = messages(&devices, seqs.clone(), bundle);
        for chunk in items.chunks(1000) {
            ns.publish_batch(QUEUE, chunk).await.unwrap();
        }
        let (stop, worker) = start_worker();
        // Done when the last record published is stored (the worker stores in
        // queue order): one index look-up every few milliseconds. Polling
        // count(*) instead scanned the growing table and took a third of the
        // database's CPU from the worker; polling the stream's depth slowed
        // nats-server.
        let last_device = devices.last().unwrap().id.to_string();
        let last_seq = *seqs.end() as i64;
        let started = Instant::now();
        // This process's CPU while the worker drains a full queue: the worker's.
        let cpu = || cpu_seconds(std::process::id()).expect("this process is running");
        let cpu_before = cpu();
        while !stored(db, &last_device, last_seq).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drain_rate = total as f64 / started.elapsed().as_secs_f64();
        let drain_cpu = (cpu() - cpu_before) * 1e6 / total as f64;
        stop.cancel();
        worker.await.unwrap().unwrap();
        assert_eq!(count(db).await, total as i64, "every record stored once");
        ratios.push(drain_rate / raw_rate);
        println!(
            "round {}: raw PostgreSQL insert ({batch}-row statements) {raw_rate:>8.0} rows/s   drain from a full queue {drain_rate:>8.0} rows/s   drain / raw = {:.3}   worker CPU {drain_cpu:.1} ms per 1,000 records",
            round + 1,
            drain_rate / raw_rate
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "median over {rounds} rounds: drain / raw insert = {:.3} (target >= 0.80)",
        ratios[rounds / 2]
    );

    // Steady publishing at `rate` while the worker drains.
    println!("-- steady: {rate} records/s for {seconds} s");
    let depth_ns = ns.clone();
    let sampler = tokio::spawn(async move {
        let mut depths = Vec::new();
        for _ in 0..=seconds {
            depths.push(depth_ns.depth(QUEUE).await.unwrap_or(0));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        depths
    });
    let tick = Duration::from_millis(100);
    let per_tick = (rate / 10).max(1);
    let (stop, worker) = start_worker();
    let steady_from = rounds as u64 * per_device;
    let mut seq = steady_from;
    let mut next = tokio::time::Instant::now();
    let end = Instant::now() + Duration::from_secs(seconds as u64);
    let mut published = 0usize;
    while Instant::now() < end {
        // Each device's records of this tick, in one request.
        let per_device = per_tick.div_ceil(devices.len()) as u64;
        let batch = messages(&devices, seq + 1..=seq + per_device, bundle);
        seq += per_device;
        published += per_device as usize * devices.len();
        for chunk in batch.chunks(1000) {
            ns.publish_batch(QUEUE, chunk).await.unwrap();
        }
        next += tick;
        tokio::time::sleep_until(next).await;
    }
    let depths = sampler.await.unwrap();
    println!(
        "published {published} ({:.0}/s); queue depth each second: {depths:?}",
        published as f64 / seconds as f64
    );
    let want = (total + published) as i64;
    let waited = Instant::now();
    while count(db).await < want && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (p50, p99): (f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
         FROM (SELECT extract(epoch FROM stored_at - received_at) * 1000 AS ms FROM telemetry WHERE seq > $1) t",
    )
    .bind(steady_from as i64)
    .fetch_one(db.pool())
    .await
    .unwrap();
    println!("end-to-end lag (received_at -> stored_at) p50 {p50:.1} ms, p99 {p99:.1} ms");
    stop.cancel();
    let _ = worker.await;
}
