//! Service Bus transport benchmark: the adapter against the contract double,
//! at 0 ms and at 5 ms injected round trip, beside a plain
//! one-request-per-message loop against the same double in the same run.
//!
//!     cargo bench -p georelay-transport --bench servicebus
//!     BENCH_MESSAGES=4000 BENCH_LATENCIES=0,5,20 cargo bench -p georelay-transport --bench servicebus
//!
//! Publish: `publish_batch` (the REST API's batch send, one request for as
//! many records as fit in one message) against one `publish` a record, one
//! after another. Consume+ack: `receive` of a batch (a long-polling
//! peek-lock, then rounds of concurrent ones put back in sequence order)
//! and `ack` of it, against one peek-lock and one complete a message. Each
//! figure is messages a second; the ratio is batch (or concurrent) to plain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use georelay_testkit::ServiceBusDouble;
use georelay_transport::servicebus::{ServiceBusConfig, ServiceBusNamespace};
use georelay_transport::{Limits, Namespace};
use std::time::{Duration, Instant};

const POLICY: &str = "RootManageSharedAccessKey";
const KEY: &str = "YmVuY2gtb25seS1zYXMta2V5LWZvci10aGUtZG91YmxlLXh4eA==";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn items(n: usize, tag: &str) -> Vec<(String, Bytes)> {
    (0..n)
        .map(|i| (format!("bench/{i}/{tag}"), Bytes::from(vec![b'x'; 200])))
        .collect()
}

/// Seconds to publish `items` one request each, in order.
async fn plain_publish(ns: &Namespace, q: &str, items: &[(String, Bytes)]) -> f64 {
    let started = Instant::now();
    for (id, payload) in items {
        ns.publish(q, id, payload.clone()).await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// Seconds to publish `items` in batches of `batch` (each split further at
/// the message size limit by the adapter).
async fn batch_publish(ns: &Namespace, q: &str, items: &[(String, Bytes)], batch: usize) -> f64 {
    let started = Instant::now();
    for chunk in items.chunks(batch) {
        ns.publish_batch(q, chunk).await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

/// Seconds to receive and ack `n` messages `max` at a time; checks that
/// they came in publish order.
async fn consume(ns: &Namespace, q: &str, n: usize, max: usize) -> f64 {
    let started = Instant::now();
    let mut got = 0;
    while got < n {
        let batch = ns.receive(q, max, Duration::from_secs(2)).await.unwrap();
        for d in &batch {
            let seq: usize =
                d.id.as_deref()
                    .unwrap()
                    .split('/')
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap();
            assert_eq!(seq, got, "out of order");
            got += 1;
        }
        ns.ack(batch).await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

fn main() {
    let n = env("BENCH_MESSAGES", 2000);
    let batch = env("BENCH_BATCH", 500);
    let latencies: Vec<u64> = std::env::var("BENCH_LATENCIES")
        .unwrap_or_else(|_| "0,5".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("Service Bus contract double · {n} messages of 200 bytes · batch {batch}");
        println!("round trip   publish msg/s plain / batch (ratio)   consume+ack msg/s plain / concurrent (ratio)");
        for ms in latencies {
            let double = ServiceBusDouble::start("georelay-bench", POLICY, KEY).unwrap();
            let mut config = ServiceBusConfig::new(&double.local_endpoint(), POLICY, KEY.to_owned().into());
            // The least the service allows: the fresh reader's wait.
            config.lock_duration = Duration::from_secs(5);
            let limits = Limits {
                publish_deadline: Duration::from_secs(30),
                request_deadline: Duration::from_secs(30),
                ..Limits::default()
            };
            let ns = Namespace::ServiceBus(ServiceBusNamespace::new(config, limits).unwrap());
            for q in ["plain", "batch"] {
                ns.ensure_queue(q).await.unwrap();
            }
            // Past the fresh reader's wait before anything is timed.
            tokio::time::sleep(Duration::from_secs(5)).await;
            double.set_latency(Duration::from_millis(ms));
            let plain_pub = n as f64 / plain_publish(&ns, "plain", &items(n, "p")).await;
            let batch_pub = n as f64 / batch_publish(&ns, "batch", &items(n, "b"), batch).await;
            let plain_con = n as f64 / consume(&ns, "plain", n, 1).await;
            let conc_con = n as f64 / consume(&ns, "batch", n, batch).await;
            println!(
                "{ms:>7} ms   {plain_pub:>8.0} / {batch_pub:>8.0} ({:.1}×)            {plain_con:>8.0} / {conc_con:>8.0} ({:.1}×)",
                batch_pub / plain_pub,
                conc_con / plain_con,
            );
        }
    });
}
