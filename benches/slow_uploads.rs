//! Ingest's memory under slow uploads, with the release binary and a real
//! PostgreSQL and `nats-server`:
//!
//!     cargo build --release --bins && cargo bench --bench slow_uploads
//!     BENCH_CLIENTS=200 BENCH_KIB_PER_SECOND=1024 cargo bench --bench slow_uploads
//!
//! BENCH_CLIENTS clients (200) each open a batch request declaring 8 MiB (the
//! batch limit) and send it at BENCH_KIB_PER_SECOND (1024) per client, so a
//! body takes 8 s, within the 10 s body read time. Two rounds against one
//! ingest process (`--max-bytes-in-flight` at its default, 256 MiB):
//!
//! 1. the clients use made-up device ids: refused before any body is read;
//! 2. they use registered devices, four per device (the per-device share):
//!    the bytes-in-flight budget admits 32 bodies of 8 MiB, the rest get 503.
//!
//! Per round: the answers by status, and ingest's RSS before, its highest
//! during the round (sampled every 100 ms) and its peak (VmHWM), against the
//! bound (RSS before + the budget). Before the budget, every body was read
//! in full before the device was looked at: 200 × 8 MiB = 1.6 GiB.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::env_num;
use georelay_testkit::{Georelay, Service, Stack};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BODY: usize = 8 * 1024 * 1024;
const BUDGET_MIB: f64 = 256.0;

/// One slow upload; returns the answer's status (0: no answer).
async fn upload(addr: String, device: String, kib_per_second: u64) -> u16 {
    let Ok(mut socket) = tokio::net::TcpStream::connect(&addr).await else {
        return 0;
    };
    let head = format!(
        "POST /v1/devices/{device}/telemetry/batch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n"
    );
    if socket.write_all(head.as_bytes()).await.is_err() {
        return 0;
    }
    let (mut read, mut write) = socket.into_split();
    let send = async move {
        // {"records": [ ... white space ... ]}: valid JSON, an empty batch.
        let (open, close) = (b"{\"records\": [".as_slice(), b"]}".as_slice());
        let chunk = vec![b' '; 4096];
        let started = tokio::time::Instant::now();
        let mut sent = 0;
        write.write_all(open).await.ok()?;
        sent += open.len();
        while sent + close.len() < BODY {
            let n = chunk.len().min(BODY - close.len() - sent);
            write.write_all(&chunk[..n]).await.ok()?;
            sent += n;
            // Paced by the clock, not by pauses: each sleep overshoots by up
            // to a millisecond, which made a body take over 10 s, not 8.
            let due = Duration::from_secs_f64(sent as f64 / 1024.0 / kib_per_second as f64);
            tokio::time::sleep_until(started + due).await;
        }
        write.write_all(close).await.ok()?;
        std::future::pending::<Option<()>>().await
    };
    let answer = async move {
        let mut buf = [0u8; 64];
        let n = read.read(&mut buf).await.unwrap_or(0);
        let line = String::from_utf8_lossy(&buf[..n]);
        line.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    tokio::pin!(answer);
    tokio::select! {
        status = &mut answer => status,
        // Refused early, ingest closes the connection: the body's write
        // fails, but the answer may be in already.
        _ = send => answer.await,
    }
}

/// Ingest's figure; it runs through the whole benchmark.
fn rss(pid: u32, field: &str) -> f64 {
    common::status_mib(pid, field).expect("ingest is running")
}

async fn round(name: &str, ingest: &Service, devices: Vec<String>, kib_per_second: u64) {
    let pid = ingest.pid().expect("ingest is running");
    let before = rss(pid, "VmRSS:");
    let addr = ingest.url().trim_start_matches("http://").to_owned();
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut highest: f64 = 0.0;
            while !done.load(Ordering::Relaxed) {
                highest = highest.max(rss(pid, "VmRSS:"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            highest
        })
    };
    let started = Instant::now();
    let clients: Vec<_> = devices
        .into_iter()
        .map(|d| tokio::spawn(upload(addr.clone(), d, kib_per_second)))
        .collect();
    let mut answers: BTreeMap<u16, usize> = BTreeMap::new();
    for c in clients {
        *answers.entry(c.await.unwrap()).or_default() += 1;
    }
    done.store(true, Ordering::Relaxed);
    let highest = sampler.await.unwrap();
    println!(
        "{name}: {:.1} s; answers {answers:?} (0 = none); ingest RSS before {before:.1} MiB, highest {highest:.1} MiB, peak (VmHWM) {:.1} MiB; bound on bodies {:.1} MiB (before + {BUDGET_MIB} MiB budget)",
        started.elapsed().as_secs_f64(),
        rss(pid, "VmHWM:"),
        before + BUDGET_MIB,
    );
}

#[tokio::main]
async fn main() {
    let clients = env_num("BENCH_CLIENTS", 200) as usize;
    let kib_per_second = env_num("BENCH_KIB_PER_SECOND", 1024).max(1);
    Georelay::for_tests().expect("cargo build --release --bins first");
    let stack = Stack::start(&["slow"]).await.unwrap();
    let ingest = stack.ingest(&[]).unwrap();
    println!(
        "{clients} clients, each one batch request declaring {} MiB sent at {kib_per_second} KiB/s",
        BODY / (1024 * 1024)
    );
    let strangers = (0..clients).map(|i| format!("nobody-{i}")).collect();
    round("made-up device ids", &ingest, strangers, kib_per_second).await;
    let mut registered = Vec::new();
    for i in 0..clients.div_ceil(4) {
        registered.push(stack.device(&format!("plug-{i:03}")).await.unwrap());
    }
    let devices = (0..clients)
        .map(|i| registered[i / 4].id.to_string())
        .collect();
    round(
        "registered devices, 4 each",
        &ingest,
        devices,
        kib_per_second,
    )
    .await;
}
