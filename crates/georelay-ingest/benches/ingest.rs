//! Ingest benchmark: the real ingest service (in process, real PostgreSQL,
//! real `nats-server`) under a load generator on this machine, beside a bare
//! axum handler and raw JetStream publishes measured in the same run.
//!
//!     cargo bench -p georelay-ingest --bench ingest
//!     BENCH_RECORDS=40000 BENCH_CONCURRENCY=128 cargo bench -p georelay-ingest --bench ingest
//!
//! Prints records/s, p50/p99 latency and this process's CPU per request
//! (load clients and handlers alike: steadier than the rate when the
//! machine is busy) for: a bare axum handler (reads the
//! body, answers 202), the same handler publishing one envelope to JetStream
//! and answering once the broker acknowledged it (the floor of any ingest
//! that answers after the broker: one unpipelined publish a request),
//! single-record ingest, batch ingest (BENCH_BATCH records a request), and
//! raw async-nats publishes of envelopes of the same size (window of
//! BENCH_WINDOW in flight), one a message and in bundles of 64 (as ingest
//! packs a batch); then single/bare, single/(bare + publish), batch/raw
//! and batch/(raw bundles). Every publish has a message id of its own: a repeated id is a
//! duplicate JetStream drops without storing it, which would flatter the
//! raw figure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream::context::Publish;
use axum::routing::post;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use georelay_core::{envelope, Envelope, MasterKey};
use georelay_testkit::{master_key_b64, Stack};
use georelay_transport::nats::{subject, NatsNamespace};
use georelay_transport::Limits;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// CPU seconds this process has used so far.
fn cpu_seconds() -> f64 {
    georelay_testkit::cpu_seconds(std::process::id()).unwrap()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Figures {
    records: usize,
    seconds: f64,
    latencies: Vec<Duration>,
    /// CPU seconds this process (load clients and handlers alike) spent.
    cpu: f64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.records as f64 / self.seconds
    }
    fn pct(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let i =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i]
    }
    fn print(&mut self, what: &str) {
        let (p50, p99) = (self.pct(0.5), self.pct(0.99));
        println!(
            "{what:<28} {:>10.0} records/s   p50 {:>9.3} ms   p99 {:>9.3} ms   CPU {:>6.1} µs/request",
            self.rate(),
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            self.cpu * 1e6 / self.latencies.len() as f64
        );
    }
}

/// `concurrency` workers, each POSTing its own list of (url, body) in order.
async fn load(work: Vec<Vec<(String, String)>>, records_per_request: usize) -> Figures {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(work.len())
        .build()
        .unwrap();
    let cpu = cpu_seconds();
    let started = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|requests| {
            let http = http.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(requests.len());
                for (url, body) in requests {
                    let t = Instant::now();
                    let response = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(
                        response.status().as_u16(),
                        202,
                        "{}",
                        response.text().await.unwrap()
                    );
                    let _ = response.bytes().await;
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    Figures {
        records: latencies.len() * records_per_request,
        seconds,
        latencies,
        cpu: cpu_seconds() - cpu,
    }
}

async fn bare_handler() -> (String, CancellationToken) {
    let app = axum::Router::new().route(
        "/v1/devices/{id}/telemetry",
        post(|body: Bytes| async move {
            (
                axum::http::StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({"len": body.len()})),
            )
        }),
    );
    serve(app).await
}

async fn serve(app: axum::Router) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
    });
    (url, stop)
}

/// The bare handler plus one JetStream publish of `envelope`, answering
/// 202 once the broker acknowledged it.
async fn publishing_handler(
    client: async_nats::Client,
    envelope: Bytes,
) -> (String, CancellationToken) {
    let js = async_nats::jetstream::new(client);
    let published = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/v1/devices/{id}/telemetry",
        post(move |body: Bytes| async move {
            let i = published.fetch_add(1, Ordering::Relaxed);
            js.send_publish(
                subject("raw"),
                Publish::build()
                    .payload(envelope)
                    .message_id(format!("bare/{i}")),
            )
            .await
            .unwrap()
            .await
            .unwrap();
            (
                axum::http::StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({"len": body.len()})),
            )
        }),
    );
    serve(app).await
}

/// Publishes `messages`, each carrying `per_message` records.
async fn raw_publish(
    client: async_nats::Client,
    messages: &[Bytes],
    per_message: usize,
    window: usize,
    round: u64,
) -> Figures {
    let js = async_nats::jetstream::new(client);
    let subject = subject("raw");
    let cpu = cpu_seconds();
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(messages.len());
    for (i, payload) in messages.iter().enumerate() {
        if in_flight.len() >= window {
            latencies.push(in_flight.next().await.unwrap());
        }
        let t = Instant::now();
        let ack = js
            .send_publish(
                subject.clone(),
                Publish::build()
                    .payload(payload.clone())
                    .message_id(format!("raw/{per_message}/{round}/{i}")),
            )
            .await
            .unwrap();
        in_flight.push(async move {
            ack.await.unwrap();
            t.elapsed()
        });
    }
    while let Some(l) = in_flight.next().await {
        latencies.push(l);
    }
    Figures {
        records: messages.len() * per_message,
        seconds: started.elapsed().as_secs_f64(),
        latencies,
        cpu: cpu_seconds() - cpu,
    }
}

#[tokio::main]
async fn main() {
    let records = env("BENCH_RECORDS", 100_000);
    let concurrency = env("BENCH_CONCURRENCY", 64);
    let batch = env("BENCH_BATCH", 100);
    let batch_concurrency = env("BENCH_BATCH_CONCURRENCY", 8);
    let window = env("BENCH_WINDOW", 256);
    println!(
        "ingest benchmark: {records} records, {concurrency} concurrent single-record clients, batches of {batch} x {batch_concurrency} concurrent; raw window {window}"
    );

    let stack = Stack::start(&["bench"]).await.unwrap();
    let (db, region) = (&stack.db, &stack.regions[0]);
    let mut devices = Vec::new();
    for i in 0..concurrency.max(batch_concurrency) {
        devices.push(stack.device(&format!("bench-{i}")).await.unwrap());
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ingest_url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let pool = georelay_store::connect(db.url(), 16).await.unwrap();
    let server = tokio::spawn(georelay_ingest::run(
        georelay_ingest::Config::default(),
        pool,
        MasterKey::from_base64(&master_key_b64()).unwrap(),
        listener,
        stop.clone(),
    ));
    let (bare_url, bare_stop) = bare_handler().await;

    // Pre-sealed bodies, so the client's crypto is not in the figures.
    let per = records / concurrency;
    let single = |base: &str, offset: u64| -> Vec<Vec<(String, String)>> {
        devices[..concurrency]
            .iter()
            .map(|d| {
                (1..=per as u64)
                    .map(|s| (d.url(base), d.body(offset + s).to_string()))
                    .collect()
            })
            .collect()
    };
    let per_batch_worker = records / batch / batch_concurrency;
    let batches = |base: &str, offset: u64| -> Vec<Vec<(String, String)>> {
        devices[..batch_concurrency]
            .iter()
            .map(|d| {
                (0..per_batch_worker as u64)
                    .map(|b| {
                        let recs: Vec<_> = (1..=batch as u64)
                            .map(|s| d.body(offset + b * batch as u64 + s))
                            .collect();
                        (
                            format!("{}/batch", d.url(base)),
                            serde_json::json!({ "records": recs }).to_string(),
                        )
                    })
                    .collect()
            })
            .collect()
    };
    // Envelopes as ingest publishes them, for the raw broker figure.
    let sample = devices[0].seal(1, &serde_json::json!({"seq": 1, "reading": 0.1}));
    let envelope = Envelope {
        epoch: 1,
        received_at_micros: 0,
        device: devices[0].id.clone(),
        record: sample,
    }
    .encode();
    let envelopes: Vec<Bytes> = (0..records).map(|_| envelope.clone()).collect();
    let bundle = envelope::bundle(&vec![envelope.clone(); envelope::MAX_BUNDLE]);
    let bundles: Vec<Bytes> = (0..records / envelope::MAX_BUNDLE)
        .map(|_| bundle.clone())
        .collect();
    let nats = NatsNamespace::connect(&region.url(), Limits::default())
        .await
        .unwrap();
    let raw_ns = georelay_transport::Namespace::Nats(nats.clone());
    assert!(raw_ns.wait_connected(Duration::from_secs(5)).await);
    raw_ns.ensure_queue("raw").await.unwrap();
    let (floor_url, floor_stop) = publishing_handler(nats.client().clone(), envelope.clone()).await;

    // Warm up: connections, caches, the stream.
    load(single(&ingest_url, 1_000_000), 1).await;
    load(single(&bare_url, 0), 1).await;
    load(single(&floor_url, 0), 1).await;

    let mut ratios_single = Vec::new();
    let mut ratios_floor = Vec::new();
    let mut ratios_batch = Vec::new();
    let mut ratios_bundles = Vec::new();
    for round in 0..3u64 {
        println!("-- round {}", round + 1);
        let mut bare = load(single(&bare_url, 0), 1).await;
        bare.print("bare axum handler");
        let mut floor = load(single(&floor_url, 0), 1).await;
        floor.print("bare + one publish");
        let mut one = load(single(&ingest_url, 2_000_000 * (round + 1)), 1).await;
        one.print("ingest, single record");
        let mut many = load(batches(&ingest_url, 10_000_000 * (round + 1)), batch).await;
        many.print(&format!("ingest, batches of {batch}"));
        let mut raw = raw_publish(nats.client().clone(), &envelopes, 1, window, round).await;
        raw.print("raw JetStream publish");
        let mut raw_bundles = raw_publish(
            nats.client().clone(),
            &bundles,
            envelope::MAX_BUNDLE,
            window,
            round,
        )
        .await;
        raw_bundles.print("raw publish, 64 a message");
        ratios_single.push(one.rate() / bare.rate());
        ratios_floor.push(one.rate() / floor.rate());
        ratios_batch.push(many.rate() / raw.rate());
        ratios_bundles.push(many.rate() / raw_bundles.rate());
        println!(
            "single / bare = {:.3}   single / (bare + one publish) = {:.3}   (bare + one publish) / bare = {:.3}   batch / raw publish = {:.3}   batch / raw bundles = {:.3}",
            one.rate() / bare.rate(),
            one.rate() / floor.rate(),
            floor.rate() / bare.rate(),
            many.rate() / raw.rate(),
            many.rate() / raw_bundles.rate()
        );
    }
    for r in [
        &mut ratios_single,
        &mut ratios_floor,
        &mut ratios_batch,
        &mut ratios_bundles,
    ] {
        r.sort_by(f64::total_cmp);
    }
    println!(
        "median over 3 rounds: single / bare = {:.3} (target >= 0.50)   single / (bare + one publish) = {:.3}   batch / raw publish = {:.3} (target >= 0.80)   batch / raw bundles = {:.3}",
        ratios_single[1], ratios_floor[1], ratios_batch[1], ratios_bundles[1]
    );
    floor_stop.cancel();
    bare_stop.cancel();
    stop.cancel();
    let _ = server.await;
}
