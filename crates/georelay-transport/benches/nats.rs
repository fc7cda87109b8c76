//! NATS transport benchmark: the queue contract against raw async-nats, in
//! the same run, on a real `nats-server` started by the test kit.
//!
//!     cargo bench -p georelay-transport --bench nats
//!     BENCH_MESSAGES=100000 BENCH_WINDOW=512 cargo bench -p georelay-transport --bench nats
//!
//! Prints publish msgs/s with a window of in-flight publishes, p50/p99
//! publish latency, consume+ack msgs/s, each for raw async-nats and for the
//! contract, and the contract's ratio to raw.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::context::Publish;
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use georelay_testkit::NatsRegion;
use georelay_transport::nats::{subject, NatsNamespace};
use georelay_transport::{Limits, Namespace};
use std::time::{Duration, Instant};

struct Run {
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.seconds
    }
    fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort_unstable();
        let i =
            ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len()) - 1;
        self.latencies[i]
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn payload() -> Bytes {
    Bytes::from(vec![b'x'; 200])
}

async fn raw_publish(
    ns: &NatsNamespace,
    queue: &str,
    n: usize,
    window: usize,
    round: usize,
) -> Run {
    let js = async_nats::jetstream::new(ns.client().clone());
    let subject = subject(queue);
    let mut in_flight = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        if in_flight.len() >= window {
            latencies.push(in_flight.next().await.unwrap());
        }
        let (js, subject) = (&js, subject.clone());
        in_flight.push(async move {
            let t = Instant::now();
            let publish = Publish::build()
                .payload(payload())
                .message_id(format!("r{round}/{i}"));
            js.send_publish(subject, publish)
                .await
                .unwrap()
                .await
                .unwrap();
            t.elapsed()
        });
    }
    while let Some(l) = in_flight.next().await {
        latencies.push(l);
    }
    Run {
        seconds: started.elapsed().as_secs_f64(),
        latencies,
    }
}

async fn contract_publish(
    ns: &Namespace,
    queue: &str,
    n: usize,
    window: usize,
    round: usize,
) -> Run {
    let mut in_flight = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        if in_flight.len() >= window {
            latencies.push(in_flight.next().await.unwrap());
        }
        let id = format!("r{round}/{i}");
        in_flight.push(async move {
            let t = Instant::now();
            ns.publish(queue, &id, payload()).await.unwrap();
            t.elapsed()
        });
    }
    while let Some(l) = in_flight.next().await {
        latencies.push(l);
    }
    Run {
        seconds: started.elapsed().as_secs_f64(),
        latencies,
    }
}

async fn raw_consume(ns: &NatsNamespace, queue: &str, n: usize, batch: usize) -> f64 {
    let js = async_nats::jetstream::new(ns.client().clone());
    let stream = js.get_stream(queue).await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let started = Instant::now();
    let mut got = 0;
    while got < n {
        let mut messages = consumer
            .batch()
            .max_messages(batch)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let mut received = Vec::with_capacity(batch);
        while let Some(m) = messages.next().await {
            received.push(m.unwrap());
        }
        got += received.len();
        for m in received {
            m.ack().await.unwrap();
        }
        ns.client().flush().await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

async fn contract_consume(ns: &Namespace, queue: &str, n: usize, batch: usize) -> f64 {
    let started = Instant::now();
    let mut got = 0;
    while got < n {
        let received = ns
            .receive(queue, batch, Duration::from_secs(1))
            .await
            .unwrap();
        got += received.len();
        ns.ack(received).await.unwrap();
    }
    started.elapsed().as_secs_f64()
}

fn main() {
    let n = env("BENCH_MESSAGES", 50_000);
    let window = env("BENCH_WINDOW", 256);
    let batch = env("BENCH_BATCH", 500);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let region = NatsRegion::start("bench").unwrap();
        let limits = Limits { publish_deadline: Duration::from_secs(10), request_deadline: Duration::from_secs(10), ..Limits::default() };
        let nats = NatsNamespace::connect(&region.url(), limits).await.unwrap();
        while !nats.is_connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ns = Namespace::Nats(nats.clone());
        for q in ["warmup", "raw", "contract"] {
            ns.ensure_queue(q).await.unwrap();
        }
        contract_publish(&ns, "warmup", n / 10, window, 0).await;

        println!("nats-server {} · {n} messages of 200 bytes · window {window} · batch {batch}", region.url());
        println!("round  publish msg/s raw / contract (ratio)   p50 raw / contract   p99 raw / contract   consume+ack msg/s raw / contract (ratio)");
        let rounds = env("BENCH_ROUNDS", 3);
        let (mut publish_ratios, mut consume_ratios) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let mut raw = raw_publish(&nats, "raw", n, window, round).await;
            let mut contract = contract_publish(&ns, "contract", n, window, round).await;
            let raw_consume = n as f64 / raw_consume(&nats, "raw", n, batch).await;
            let contract_consume = n as f64 / contract_consume(&ns, "contract", n, batch).await;
            let publish_ratio = contract.rate(n) / raw.rate(n);
            let consume_ratio = contract_consume / raw_consume;
            println!(
                "{round:>5}  {:>8.0} / {:>8.0} ({publish_ratio:.3})      {:>7.2?} / {:>7.2?}   {:>7.2?} / {:>7.2?}   {raw_consume:>8.0} / {contract_consume:>8.0} ({consume_ratio:.3})",
                raw.rate(n),
                contract.rate(n),
                raw.percentile(0.50),
                contract.percentile(0.50),
                raw.percentile(0.99),
                contract.percentile(0.99),
            );
            publish_ratios.push(publish_ratio);
            consume_ratios.push(consume_ratio);
        }
        println!(
            "median ratio contract/raw: publish {:.3}, consume+ack {:.3}",
            median(&mut publish_ratios),
            median(&mut consume_ratios)
        );
    });
}
