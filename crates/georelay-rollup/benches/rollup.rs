//! Rollup throughput beside raw upserts, in one run: 100,000 stored rows of
//! 50 devices (four numeric fields each, the default three windows) rolled
//! up by the worker's own functions, against the same aggregates upserted
//! straight into `telemetry_rollups` (the database's limit for the writes
//! alone). The rollup must keep up with the drain benchmark's steady load
//! (15,000 records/s). Needs PostgreSQL (DATABASE_URL's server).
//!
//! `cargo bench -p georelay-rollup --bench rollup`

use georelay_store::rollup;
use georelay_testkit::Stack;
use std::time::{Duration, Instant};

const ROWS: i64 = 100_000;
const DEVICES: i64 = 50;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let stack = Stack::start(&["eu-west"]).await?;
    let pool = stack.db.pool().clone();
    for d in 0..DEVICES {
        stack.device(&format!("bench-{d:03}")).await?;
    }
    // Rows as the drain stores them: one reading a second per device.
    sqlx::query(
        "INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
         SELECT format('bench-%s', lpad((i % $2)::text, 3, '0')), i / $2 + 1,
                jsonb_build_object('captured_at', to_char(timestamptz '2026-11-30 00:00:00Z' + make_interval(secs => i / $2), 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                                   'temperature', 20 + (i % 17) * 0.5, 'humidity', 40 + i % 23,
                                   'voltage', 3.3 + (i % 5) * 0.01, 'count', i % 100),
                now(), $3, 1
         FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(ROWS)
    .bind(DEVICES)
    .bind(stack.namespace_ids[0])
    .execute(&pool)
    .await?;
    println!("rollup benchmark: {ROWS} stored rows from {DEVICES} devices, 4 numeric fields, windows 60/180/3600 s");

    let lease = rollup::acquire_lease(&pool, uuid::Uuid::new_v4(), Duration::from_secs(60))
        .await?
        .ok_or_else(|| anyhow::anyhow!("no rollup lease"))?;
    let through = rollup::last_store_order(&pool).await?;
    let started = Instant::now();
    let mut watermark = 0;
    let mut all = Vec::new();
    while watermark < through {
        let rows = rollup::rows(&pool, watermark, through, 20_000).await?;
        let to = rows.last().map_or(through, |r| r.store_order);
        let aggregates = georelay_rollup::aggregate(&rows);
        anyhow::ensure!(
            rollup::commit(
                &pool,
                &lease,
                Duration::from_secs(60),
                watermark,
                to,
                &aggregates
            )
            .await?,
            "lost the lease"
        );
        all.push(aggregates);
        watermark = to;
    }
    let rollup_rate = ROWS as f64 / started.elapsed().as_secs_f64();

    // The same aggregates upserted again, statement for statement: the
    // writes alone.
    let started = Instant::now();
    for chunk in &all {
        let w = rollup::watermark(&pool).await?;
        anyhow::ensure!(
            rollup::commit(&pool, &lease, Duration::from_secs(60), w, w, chunk).await?,
            "lost the lease"
        );
    }
    let raw_rate = ROWS as f64 / started.elapsed().as_secs_f64();
    println!("raw upserts of the same windows          {raw_rate:>8.0} rows/s equivalent");
    println!("rollup (read, aggregate, upsert, watermark) {rollup_rate:>8.0} rows/s");
    println!(
        "rollup / raw upserts = {:.3}; rollup / drain steady load (15000/s) = {:.2}",
        rollup_rate / raw_rate,
        rollup_rate / 15_000.0
    );
    Ok(())
}
