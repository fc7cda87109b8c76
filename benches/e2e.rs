//! End-to-end benchmark: the fleet simulator → ingest → region → drain →
//! PostgreSQL, every part a real process of the release binary (and a real
//! `nats-server` and PostgreSQL), all on this machine.
//!
//!     cargo build --release --bins && cargo bench --bench e2e
//!     BENCH_RATES=1000,2000,4000 BENCH_STEP_SECONDS=10 BENCH_DEVICES=50 \
//!       BENCH_AGENT_BUFFERED=1000000 cargo bench --bench e2e
//!     BENCH_DEVICES=500 BENCH_RATES=500 BENCH_CONFIRM_AFTER=1s cargo bench --bench e2e
//!       # the fleet's `agent simulate --confirm-after` (default: the agent's)
//!
//! Steps the fleet's total reading rate up through BENCH_RATES (readings per
//! second across BENCH_DEVICES simulated plug computers, each with its own
//! buffer and sender, as `./dev up` runs them) for BENCH_STEP_SECONDS each.
//! Per step it prints the readings produced and stored, the lag from a
//! reading's creation in the agent (`at_ms`) to its row's `stored_at` (p50,
//! p99, max), and CPU milliseconds per 1,000 stored records of each process:
//! ingest, drain, the fleet (one process for every device), nats-server and
//! PostgreSQL (all its processes). The highest step where every reading was
//! stored and lag p99 < 250 ms is the sustained rate. Then peak RSS (VmHWM)
//! of ingest and drain, and of one `georelay agent run` delivering a backlog
//! of BENCH_AGENT_BUFFERED buffered records (with how fast it delivered it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{env_num, status_mib};
use georelay_agent::buffer::Buffer;
use georelay_testkit::{cpu_seconds, Georelay, Service, Stack};
use std::io::Read as _;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LAG_P99_LIMIT_MS: f64 = 250.0;

fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// CPU seconds of every process whose command is `comm`.
fn cpu_seconds_of_all(comm: &str) -> f64 {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter_map(cpu_seconds)
        .sum()
}

/// Waits for a child, reading its CPU time and peak RSS until it exits.
/// Returns (cpu seconds, peak RSS MiB, stdout).
async fn watch(mut child: Child) -> (f64, f64, String) {
    let pid = child.id();
    let (mut cpu, mut rss) = (0.0, 0.0);
    while child.try_wait().unwrap().is_none() {
        cpu = cpu_seconds(pid).unwrap_or(cpu);
        rss = status_mib(pid, "VmHWM:").unwrap_or(rss);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (cpu, rss, out)
}

/// The number after `label` in the simulator's summary line.
fn summary_field(out: &str, label: &str) -> u64 {
    out.split_whitespace()
        .skip_while(|w| *w != label)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in the simulator's output: {out}"))
}

struct Cpu {
    ingest: f64,
    drain: f64,
    nats: f64,
    postgres: f64,
}

fn cpu_now(ingest: &Service, drain: &Service, stack: &Stack) -> Cpu {
    Cpu {
        ingest: cpu_seconds(ingest.pid().unwrap()).unwrap(),
        drain: cpu_seconds(drain.pid().unwrap()).unwrap(),
        nats: cpu_seconds(stack.regions[0].pid().unwrap()).unwrap(),
        postgres: cpu_seconds_of_all("postgres"),
    }
}

#[tokio::main]
async fn main() {
    let rates = env_list(
        "BENCH_RATES",
        &[1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000],
    );
    let seconds = env_num("BENCH_STEP_SECONDS", 10);
    let devices = env_num("BENCH_DEVICES", 50);
    let buffered = env_num("BENCH_AGENT_BUFFERED", 1_000_000);
    println!(
        "end-to-end benchmark: {devices} simulated devices, {seconds} s a step at {rates:?} readings/s; then one agent with {buffered} buffered"
    );

    let georelay = Georelay::for_tests().expect("cargo build --release --bins first");
    let stack = Stack::start(&["e2e"]).await.unwrap();
    let ingest = stack.ingest(&[]).unwrap();
    let drain = stack.drain(&[]).unwrap();
    let work = std::env::temp_dir().join(format!("georelay-e2e-{}", std::process::id()));
    let (keys, state) = (work.join("keys"), work.join("fleet"));
    std::fs::create_dir_all(&keys).unwrap();
    for i in 1..=devices {
        let device = stack.device(&format!("fleet-{i:04}")).await.unwrap();
        std::fs::write(
            keys.join(format!("{}.key", device.id)),
            device.key.to_base64().as_bytes(),
        )
        .unwrap();
    }

    let mut sustained = None;
    for rate in rates {
        let per_device = rate as f64 / devices as f64;
        let before = cpu_now(&ingest, &drain, &stack);
        let from_ms = now_ms();
        let fleet = georelay
            .command(&stack.db)
            .env("RUST_LOG", "warn")
            .args(["agent", "simulate", "--url", &ingest.url()])
            .arg("--keys-dir")
            .arg(&keys)
            .arg("--state-dir")
            .arg(&state)
            .args(["--rate", &per_device.to_string()])
            .args(["--duration", &format!("{seconds}s")])
            .args(["--settle", "30s", "--max-backoff", "1s"])
            .args(
                std::env::var("BENCH_CONFIRM_AFTER")
                    .map(|d| vec!["--confirm-after".to_owned(), d])
                    .unwrap_or_default(),
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (fleet_cpu, _, out) = watch(fleet).await;
        let (produced, accepted, left, held_sent) = (
            summary_field(&out, "produced"),
            summary_field(&out, "accepted"),
            summary_field(&out, "buffered"),
            summary_field(&out, "unconfirmed-peak"),
        );
        let stored_query = "SELECT count(*) FROM telemetry
             WHERE device_id LIKE 'fleet-%' AND (payload->>'at_ms')::bigint >= $1";
        let waited = Instant::now();
        let mut stored: i64 = 0;
        while waited.elapsed() < Duration::from_secs(60) {
            stored = sqlx::query_scalar(stored_query)
                .bind(from_ms)
                .fetch_one(stack.db.pool())
                .await
                .unwrap();
            if stored as u64 >= accepted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after = cpu_now(&ingest, &drain, &stack);
        let (p50, p99, max): (f64, f64, f64) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms)
             FROM (SELECT (extract(epoch FROM stored_at) * 1000 - (payload->>'at_ms')::bigint)::float8 AS ms
                   FROM telemetry WHERE device_id LIKE 'fleet-%' AND (payload->>'at_ms')::bigint >= $1) t",
        )
        .bind(from_ms)
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
        let achieved = produced as f64 / seconds as f64;
        let per_1000 = |cpu: f64| cpu / stored.max(1) as f64 * 1000.0 * 1000.0;
        println!(
            "-- {rate}/s: produced {produced} ({achieved:.0}/s), accepted {accepted}, stored {stored}, still buffered {left}; lag p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
        );
        println!(
            "   agent buffer: at most {held_sent} records of one device held sent but not yet stored (kept until the progress answer says stored)"
        );
        println!(
            "   CPU ms per 1,000 records: ingest {:.1}, drain {:.1}, fleet {:.1}, nats-server {:.1}, postgres {:.1}",
            per_1000(after.ingest - before.ingest),
            per_1000(after.drain - before.drain),
            per_1000(fleet_cpu),
            per_1000(after.nats - before.nats),
            per_1000(after.postgres - before.postgres),
        );
        // The fleet must have produced (nearly) the rate asked of it, and
        // everything it produced must be stored in time.
        let held = achieved >= 0.95 * rate as f64
            && accepted == produced
            && left == 0
            && stored as u64 == produced
            && p99 < LAG_P99_LIMIT_MS;
        if !held {
            println!("   not sustained; the fleet said: {}", out.trim());
            break;
        }
        sustained = Some(achieved);
    }
    match sustained {
        Some(rate) => println!(
            "highest sustained rate: {rate:.0} readings/s with every reading stored and lag p99 < {LAG_P99_LIMIT_MS} ms"
        ),
        None => println!("no step was sustained"),
    }

    // One agent with a backlog: fill its buffer, then let it deliver.
    let device = stack.device("backlog-1").await.unwrap();
    let dir = work.join("backlog");
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(&key_file, device.key.to_base64().as_bytes()).unwrap();
    let filled = Instant::now();
    fill(&dir, &device, buffered).await;
    println!(
        "buffered {buffered} readings for one agent in {:.1} s",
        filled.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let agent = georelay
        .command(&stack.db)
        .env("RUST_LOG", "warn")
        .args(["agent", "run", "--device", "backlog-1", "--stdin"])
        .arg("--key-file")
        .arg(&key_file)
        .arg("--state-dir")
        .arg(&dir)
        .args(["--url", &ingest.url()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (agent_cpu, agent_rss, _) = watch(agent).await;
    let delivered = started.elapsed().as_secs_f64();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM telemetry WHERE device_id = 'backlog-1'")
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(
        stored as u64, buffered,
        "the agent delivered its whole backlog"
    );
    println!(
        "agent with {buffered} buffered: peak RSS {agent_rss:.1} MiB; delivered all in {delivered:.1} s ({:.0} records/s, {:.1} CPU ms per 1,000)",
        buffered as f64 / delivered,
        agent_cpu / buffered as f64 * 1e6
    );
    println!(
        "peak RSS: ingest {:.1} MiB, drain {:.1} MiB",
        status_mib(ingest.pid().unwrap(), "VmHWM:").unwrap(),
        status_mib(drain.pid().unwrap(), "VmHWM:").unwrap()
    );
    drop((ingest, drain));
    let _ = std::fs::remove_dir_all(&work);
}

/// Seals and buffers `n` readings for `device` the way the agent does (its
/// own buffer, one transaction a reading, without fsync a commit).
async fn fill(dir: &Path, device: &georelay_testkit::TestDevice, n: u64) {
    let buffer = Buffer::open(
        &georelay_agent::buffer::path(dir, &device.id),
        device.id.clone(),
        device.key.clone(),
        n,
        false,
    )
    .await
    .unwrap();
    for i in 1..=n {
        buffer
            .push(&format!("{{\"n\":{i},\"temperature_c\":21.5}}"), None)
            .await
            .unwrap();
    }
}
