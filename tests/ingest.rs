//! The ingest service end to end: the real `georelay ingest` binary against a
//! real PostgreSQL and real `nats-server` regions. Every error of the HTTP
//! contract, the envelope on the queue, failover on kill and on SIGSTOP, the
//! failover bit, exhaustion, raw SQL moves, and two instances on one group.

use base64::Engine as _;
use georelay_core::{envelope, Envelope};
use georelay_testkit::{wait_until, Stack, TestDevice, QUEUE};
use georelay_transport::{Limits, Namespace, Triplet};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Short deadlines so faults show quickly.
/// [`INGEST_ARGS`] for an ingest service run in this process: the HTTP
/// contract and routing cases need no process boundary (kill -9 and SIGSTOP
/// of a region under load, and SIGTERM of ingest, keep real processes).
fn settings() -> georelay_ingest::Settings {
    georelay_ingest::Settings {
        publish_deadline: Duration::from_secs(1),
        request_deadline: Duration::from_secs(8),
        failover_cooldown: Duration::from_secs(1),
        lease: Duration::from_secs(2),
        poll_interval: Duration::from_millis(500),
        ..georelay_ingest::Settings::default()
    }
}

const INGEST_ARGS: &[&str] = &[
    "--publish-deadline",
    "1s",
    "--request-deadline",
    "8s",
    "--failover-cooldown",
    "1s",
    "--lease",
    "2s",
    "--poll-interval",
    "500ms",
];

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

async fn post_raw(
    http: &reqwest::Client,
    url: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value, Option<String>) {
    let mut req = http.post(url).body(body);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let response = req.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, retry_after)
}

fn assert_error(got: &(u16, Value, Option<String>), status: u16, code: &str, case: &str) {
    assert_eq!(got.0, status, "{case}: {:?}", got.1);
    assert_eq!(got.1["error"]["code"], code, "{case}: {:?}", got.1);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{case}: a message is given: {:?}",
        got.1
    );
}

async fn queue_reader(url: &str) -> Namespace {
    let ns = Namespace::connect(&Triplet::nats(url), Limits::default())
        .await
        .unwrap();
    assert!(ns.wait_connected(Duration::from_secs(5)).await);
    ns
}

/// Reads up to `n` envelopes from a region's queue (acking them), those of
/// bundles one by one.
async fn drain_queue(url: &str, n: usize) -> Vec<Envelope> {
    let ns = queue_reader(url).await;
    let mut out = Vec::new();
    while out.len() < n {
        let batch = ns
            .receive(QUEUE, n, Duration::from_millis(500))
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        for d in &batch {
            for e in envelope::unbundle(&d.payload).unwrap() {
                out.push(Envelope::decode(&e).unwrap());
            }
        }
        ns.ack(batch).await.unwrap();
    }
    out
}

#[tokio::test]
async fn every_contract_error_and_a_valid_record_queued_sealed() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let disabled = stack.device("plug-off").await.unwrap();
    georelay_store::control::set_device_enabled(stack.db.pool(), "plug-off", false)
        .await
        .unwrap();
    let ingest = stack.ingest_in_process(settings()).await.unwrap();
    let base = ingest.url();
    let http = http();
    let url = device.url(&base);
    let batch_url = format!("{url}/batch");
    let json_ct = Some("application/json");
    let good = device.body(1);

    // A valid record: 202 with where it went, and on the queue the envelope
    // carries the record still sealed, which opens under the device key.
    let ok = post_raw(&http, &url, json_ct, good.to_string()).await;
    assert_eq!(ok.0, 202, "{:?}", ok.1);
    assert_eq!(
        ok.1,
        json!({"device_id": "plug-1", "seq": 1, "namespace": "eu-west", "region": "eu-west", "epoch": 1})
    );
    // Re-sending an accepted record is 202 again.
    assert_eq!(
        post_raw(&http, &url, json_ct, good.to_string()).await.0,
        202
    );
    let queued = drain_queue(&stack.regions[0].url(), 2).await;
    assert_eq!(queued.len(), 1, "the broker suppressed the re-send");
    let envelope = &queued[0];
    assert_eq!((envelope.epoch, envelope.device.as_str()), (1, "plug-1"));
    assert_eq!(
        envelope.record,
        device.seal(1, &json!({"seq": 1, "reading": 0.1}))
    );
    let plaintext = envelope
        .record
        .open_object(&device.key, &device.id)
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&plaintext).unwrap()["reading"],
        0.1
    );

    let with = |f: &dyn Fn(&mut Value)| {
        let mut b = device.body(2);
        f(&mut b);
        b.to_string()
    };
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("not json", "{not json".into(), 400, "malformed_json"),
        (
            "missing field",
            json!({"seq": 2}).to_string(),
            400,
            "malformed_json",
        ),
        (
            "negative seq",
            with(&|b| b["seq"] = json!(-1)),
            400,
            "malformed_json",
        ),
        (
            "seq 0",
            with(&|b| b["seq"] = json!(0)),
            400,
            "invalid_record",
        ),
        (
            "nonce not base64",
            with(&|b| b["nonce"] = json!("!!!")),
            400,
            "invalid_record",
        ),
        (
            "nonce 8 bytes",
            with(&|b| b["nonce"] = json!(b64(&[0; 8]))),
            400,
            "invalid_record",
        ),
        (
            "ciphertext shorter than the tag",
            with(&|b| b["ciphertext"] = json!(b64(&[0; 8]))),
            400,
            "invalid_record",
        ),
        (
            "tag fails",
            with(&|b| b["seq"] = json!(3)),
            401,
            "unauthorized",
        ),
    ];
    for (case, body, status, code) in &cases {
        let got = post_raw(&http, &url, json_ct, body.clone()).await;
        assert_error(&got, *status, code, case);
    }
    // The plaintext must be a JSON object.
    let array = device.seal(2, &json!([1, 2])).to_body();
    let got = post_raw(&http, &url, json_ct, serde_json::to_string(&array).unwrap()).await;
    assert_error(&got, 400, "not_json_object", "plaintext an array");
    // Unknown and disabled devices get the same answer as a failed tag.
    let stranger = TestDevice::new("plug-unknown".parse().unwrap(), device.key.clone());
    let got = post_raw(
        &http,
        &stranger.url(&base),
        json_ct,
        stranger.body(1).to_string(),
    )
    .await;
    assert_error(&got, 401, "unauthorized", "unknown device");
    let got = post_raw(
        &http,
        &disabled.url(&base),
        json_ct,
        disabled.body(1).to_string(),
    )
    .await;
    assert_error(&got, 401, "unauthorized", "disabled device");
    let got = post_raw(
        &http,
        &format!("{base}/v1/devices/a%2Fb/telemetry"),
        json_ct,
        good.to_string(),
    )
    .await;
    assert_error(&got, 400, "invalid_device_id", "device id with a slash");
    let got = post_raw(
        &http,
        &format!("{base}/v1/devices/plug%FF/telemetry"),
        json_ct,
        good.to_string(),
    )
    .await;
    assert_error(&got, 400, "invalid_device_id", "device id not UTF-8");
    // Content type and size.
    let got = post_raw(&http, &url, Some("text/plain"), good.to_string()).await;
    assert_error(&got, 415, "unsupported_media_type", "text/plain");
    let got = post_raw(&http, &url, None, good.to_string()).await;
    assert_error(&got, 415, "unsupported_media_type", "no content type");
    let huge = json!({"seq": 2, "nonce": "", "ciphertext": "A".repeat(200_000)}).to_string();
    let got = post_raw(&http, &url, json_ct, huge).await;
    assert_error(&got, 413, "too_large", "body over the limit");
    // Batches.
    let got = post_raw(
        &http,
        &batch_url,
        json_ct,
        json!({"records": []}).to_string(),
    )
    .await;
    assert_error(&got, 400, "bad_batch_size", "empty batch");
    let many: Vec<Value> = (1..=1001).map(|s| device.body(s)).collect();
    let got = post_raw(
        &http,
        &batch_url,
        json_ct,
        json!({"records": many}).to_string(),
    )
    .await;
    assert_error(&got, 400, "bad_batch_size", "1001 records");
    let dup = json!({"records": [device.body(5), device.body(5)]}).to_string();
    let got = post_raw(&http, &batch_url, json_ct, dup).await;
    assert_error(&got, 400, "duplicate_seq", "same seq twice");
    let tampered = json!({"records": [device.body(5), with(&|b| b["seq"] = json!(7)).parse::<Value>().unwrap()]});
    let got = post_raw(&http, &batch_url, json_ct, tampered.to_string()).await;
    assert_error(&got, 401, "unauthorized", "one bad record in a batch");
    // Routes and methods.
    let got = post_raw(&http, &format!("{base}/v1/nope"), json_ct, "{}").await;
    assert_error(&got, 404, "not_found", "unknown route");
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    // None of the refused records reached the queue; a good batch, sent out
    // of order, is queued in seq order.
    let batch = json!({"records": [device.body(4), device.body(2), device.body(3)]});
    let got = post_raw(&http, &batch_url, json_ct, batch.to_string()).await;
    assert_eq!(got.0, 202, "{:?}", got.1);
    assert_eq!(
        (
            got.1["count"].clone(),
            got.1["first_seq"].clone(),
            got.1["last_seq"].clone()
        ),
        (json!(3), json!(2), json!(4))
    );
    let queued = drain_queue(&stack.regions[0].url(), 10).await;
    assert_eq!(
        queued.iter().map(|e| e.record.seq).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );

    // Health, readiness, metrics.
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = georelay_testkit::metrics_text(&base).await.unwrap();
    for needle in [
        "georelay_ingest_records_accepted_total 5",
        "georelay_ingest_requests_total{route=\"telemetry\",status=\"401\"}",
        "georelay_ingest_publish_duration_seconds_bucket{namespace=\"eu-west\"",
        "georelay_ingest_group_epoch{group=\"g\"} 1",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }
    // A stop as on SIGTERM ends `run` without an error.
    ingest.stop().await.unwrap();
}

/// One accepted record, as the client saw it.
#[derive(Debug, Clone)]
struct Ack {
    seq: u64,
    namespace: String,
    epoch: i64,
    at: Instant,
}

/// What a device saw while sending: its 202s, and how long the slowest
/// single request took.
#[derive(Debug, Default)]
struct Sent {
    acks: Vec<Ack>,
    slowest: Duration,
    unavailable: usize,
}

/// Sends `seqs` one at a time, like a plug computer: each record until it
/// gets a 202, honouring Retry-After (capped at 500 ms to keep tests short).
async fn send_all(
    device: &TestDevice,
    base: &str,
    seqs: std::ops::RangeInclusive<u64>,
    give_up: Duration,
) -> Sent {
    let http = http();
    let mut sent = Sent::default();
    let stop = Instant::now() + give_up;
    for seq in seqs {
        loop {
            assert!(
                Instant::now() < stop,
                "{}: seq {seq} got no 202 within {give_up:?}",
                device.id
            );
            let started = Instant::now();
            let result = http
                .post(device.url(base))
                .json(&device.body(seq))
                .send()
                .await;
            sent.slowest = sent.slowest.max(started.elapsed());
            let Ok(response) = result else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            match status {
                202 => {
                    sent.acks.push(Ack {
                        seq,
                        namespace: body["namespace"].as_str().unwrap().to_owned(),
                        epoch: body["epoch"].as_i64().unwrap(),
                        at: Instant::now(),
                    });
                    break;
                }
                503 => {
                    assert!(retry_after.is_some(), "503 without Retry-After: {body}");
                    sent.unavailable += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => panic!("{}: seq {seq}: unexpected {other}: {body}", device.id),
            }
        }
    }
    sent
}

/// Seqs found in a region's queue, per device.
async fn queued_seqs(url: &str) -> std::collections::HashMap<String, Vec<u64>> {
    let mut out = std::collections::HashMap::<String, Vec<u64>>::new();
    for e in drain_queue(url, 100_000).await {
        out.entry(e.device.to_string())
            .or_default()
            .push(e.record.seq);
    }
    out
}

/// A fleet sends while region 0 suffers `fault`; returns what each device saw
/// and when the fault started.
async fn fleet_through_fault(
    stack: &mut Stack,
    base: &str,
    fault: impl FnOnce(&mut Stack),
) -> (Vec<(TestDevice, Sent)>, Instant) {
    const DEVICES: usize = 4;
    const RECORDS: u64 = 40;
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        devices.push(stack.device(&format!("plug-{i}")).await.unwrap());
    }
    let tasks: Vec<_> = devices
        .iter()
        .cloned()
        .map(|d| {
            let base = base.to_owned();
            tokio::spawn(async move {
                let sent = send_all(&d, &base, 1..=RECORDS, Duration::from_secs(90)).await;
                (d, sent)
            })
        })
        .collect();
    // Let the devices get some records into the primary first.
    let primary = queue_reader(&stack.regions[0].url()).await;
    primary.ensure_queue(QUEUE).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            primary.depth(QUEUE).await.unwrap_or(0) >= 2 * DEVICES as u64
        })
        .await
    );
    let fault_at = Instant::now();
    fault(stack);
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    (out, fault_at)
}

/// Every device got a 202 for every seq, in order; those after the fault went
/// to eu-north in epoch 2, and that queue holds them.
async fn assert_failed_over_to_eu_north(
    stack: &Stack,
    results: &[(TestDevice, Sent)],
    fault_at: Instant,
) -> Duration {
    let north = queued_seqs(&stack.regions[1].url()).await;
    let mut first_north = None::<Instant>;
    for (device, sent) in results {
        let seqs: Vec<u64> = sent.acks.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>(), "{}", device.id);
        let after: Vec<&Ack> = sent
            .acks
            .iter()
            .filter(|a| a.namespace == "eu-north")
            .collect();
        assert!(!after.is_empty(), "{} never reached eu-north", device.id);
        assert!(after.iter().all(|a| a.epoch == 2));
        let in_queue = north.get(device.id.as_str()).cloned().unwrap_or_default();
        for a in &after {
            assert!(
                in_queue.contains(&a.seq),
                "{} seq {} acked on eu-north but not in its queue",
                device.id,
                a.seq
            );
        }
        let first = after.iter().map(|a| a.at).min().unwrap();
        first_north = Some(first_north.map_or(first, |f| f.min(first)));
    }
    assert_eq!(stack.senders().await.unwrap(), (2, stack.namespace_ids[1]));
    let (kind, actor, reason): (String, String, Option<String>) = sqlx::query_as(
        "SELECT kind, actor, reason FROM failover_events WHERE group_id = $1 AND epoch = 2",
    )
    .bind(stack.group_id)
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(kind, "sender_moved");
    assert!(actor.starts_with("ingest:"), "{actor}");
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("eu-west")),
        "{reason:?}"
    );
    let health: String = sqlx::query_scalar("SELECT health FROM namespaces WHERE id = $1")
        .bind(stack.namespace_ids[0])
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
    assert_ne!(health, "healthy", "the troubled namespace is marked");
    first_north.unwrap() - fault_at
}

#[tokio::test]
async fn killing_the_primary_region_under_load_fails_over_to_the_next_region() {
    let mut stack = Stack::start(&["eu-west", "eu-north", "us-east"])
        .await
        .unwrap();
    let ingest = stack.ingest(INGEST_ARGS).unwrap();
    let (results, fault_at) =
        fleet_through_fault(&mut stack, &ingest.url(), |s| s.regions[0].kill()).await;
    let detection = assert_failed_over_to_eu_north(&stack, &results, fault_at).await;
    println!("kill -9: fault to first 202 from eu-north: {detection:?}");
    assert!(
        detection < Duration::from_secs(3),
        "connection refused trips fast: {detection:?}"
    );
}

#[tokio::test]
async fn a_hung_primary_region_fails_over_within_the_detection_time_and_no_request_hangs() {
    let mut stack = Stack::start(&["eu-west", "eu-north", "us-east"])
        .await
        .unwrap();
    let ingest = stack.ingest(INGEST_ARGS).unwrap();
    let (results, fault_at) =
        fleet_through_fault(&mut stack, &ingest.url(), |s| s.regions[0].pause().unwrap()).await;
    let detection = assert_failed_over_to_eu_north(&stack, &results, fault_at).await;
    let slowest = results.iter().map(|(_, s)| s.slowest).max().unwrap();
    println!(
        "SIGSTOP: fault to first 202 from eu-north: {detection:?}; slowest request {slowest:?}"
    );
    // Two publish deadlines (1 s each) trip the breaker; the request deadline is 8 s.
    assert!(detection < Duration::from_secs(5), "{detection:?}");
    assert!(
        slowest < Duration::from_secs(9),
        "a request outlived its deadline: {slowest:?}"
    );
}

/// Posts seq until the answer's error code is `code` (or `deadline` passes);
/// returns that answer.
async fn post_until_code(
    device: &TestDevice,
    base: &str,
    seq: u64,
    code: &str,
    deadline: Duration,
) -> (u16, Value, Option<String>) {
    let http = http();
    let stop = Instant::now() + deadline;
    loop {
        let got = post_raw(
            &http,
            &device.url(base),
            Some("application/json"),
            device.body(seq).to_string(),
        )
        .await;
        if got.1["error"]["code"] == code || Instant::now() > stop {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn with_the_failover_bit_off_a_down_region_gets_503_and_nothing_moves() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    sqlx::query("UPDATE routing_groups SET failover_enabled = false WHERE id = $1")
        .bind(stack.group_id)
        .execute(stack.db.pool())
        .await
        .unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let ingest = stack.ingest_in_process(settings()).await.unwrap();
    assert_eq!(device.post(&http(), &ingest.url(), 1).await.unwrap().0, 202);
    stack.regions[0].kill();
    let got = post_until_code(
        &device,
        &ingest.url(),
        2,
        "failover_disabled",
        Duration::from_secs(10),
    )
    .await;
    assert_error(&got, 503, "failover_disabled", "failover bit off");
    assert_eq!(got.2.as_deref(), Some("5"), "Retry-After");
    assert_eq!(
        stack.senders().await.unwrap(),
        (1, stack.namespace_ids[0]),
        "nothing moved"
    );
    let moves: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM failover_events WHERE kind NOT IN ('group_created', 'failover_off')",
    )
    .fetch_one(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(moves, 0);
    // The region comes back: records flow again, where they were.
    stack.regions[0].restart().unwrap();
    let ok = post_until_code(&device, &ingest.url(), 2, "none", Duration::from_secs(15)).await;
    assert_eq!(ok.0, 202, "{:?}", ok.1);
    assert_eq!(ok.1["namespace"], "eu-west");
}

#[tokio::test]
async fn all_regions_down_is_503_and_one_exhausted_event() {
    let mut stack = Stack::start(&["eu-west", "eu-north", "us-east"])
        .await
        .unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let ingest = stack.ingest_in_process(settings()).await.unwrap();
    assert_eq!(device.post(&http(), &ingest.url(), 1).await.unwrap().0, 202);
    for r in &mut stack.regions {
        r.kill();
    }
    let got = post_until_code(
        &device,
        &ingest.url(),
        2,
        "no_region",
        Duration::from_secs(20),
    )
    .await;
    assert_error(&got, 503, "no_region", "all regions down");
    assert!(got.2.is_some(), "Retry-After");
    for _ in 0..5 {
        let again = post_raw(
            &http(),
            &device.url(&ingest.url()),
            Some("application/json"),
            device.body(2).to_string(),
        )
        .await;
        assert_eq!(again.0, 503, "{:?}", again.1);
    }
    let exhausted: Vec<(String, i64)> = sqlx::query_as(
        "SELECT actor, from_namespace_id FROM failover_events WHERE kind = 'exhausted'",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    assert_eq!(
        exhausted.len(),
        1,
        "one event per episode, not per request: {exhausted:?}"
    );
    assert!(exhausted[0].0.starts_with("ingest:"));
    let down: i64 = sqlx::query_scalar("SELECT count(*) FROM namespaces WHERE health = 'down'")
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
    assert_eq!(down, 3);
}

#[tokio::test]
async fn a_raw_sql_move_redirects_new_traffic_within_a_second() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let ingest = stack.ingest_in_process(settings()).await.unwrap();
    let http = http();
    assert_eq!(
        device.post(&http, &ingest.url(), 1).await.unwrap().1["namespace"],
        "eu-west"
    );
    sqlx::query("UPDATE routing_groups SET sender_namespace_id = $1 WHERE id = $2")
        .bind(stack.namespace_ids[1])
        .bind(stack.group_id)
        .execute(stack.db.pool())
        .await
        .unwrap();
    let moved_at = Instant::now();
    let mut seq = 2;
    loop {
        let (status, body) = device.post(&http, &ingest.url(), seq).await.unwrap();
        assert_eq!(status, 202, "{body}");
        seq += 1;
        if body["namespace"] == "eu-north" {
            assert_eq!(body["epoch"], 2);
            break;
        }
        assert!(
            moved_at.elapsed() < Duration::from_secs(1),
            "still on eu-west after {:?}",
            moved_at.elapsed()
        );
    }
    println!(
        "raw SQL move to first 202 from eu-north: {:?}",
        moved_at.elapsed()
    );
}

#[tokio::test]
async fn two_instances_follow_one_move_and_both_acknowledge_the_new_epoch() {
    let mut stack = Stack::start(&["eu-west", "eu-north", "us-east"])
        .await
        .unwrap();
    let a = stack.ingest(INGEST_ARGS).unwrap();
    let b = stack.ingest(INGEST_ARGS).unwrap();
    let dev_a = stack.device("plug-a").await.unwrap();
    let dev_b = stack.device("plug-b").await.unwrap();
    let acked = |epoch: i64| {
        let pool = stack.db.pool().clone();
        let group = stack.group_id;
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM instance_epochs e JOIN instances i ON i.id = e.instance_id
                 WHERE e.group_id = $1 AND e.epoch = $2 AND i.role = 'ingest' AND i.lease_until > now()",
            )
            .bind(group)
            .bind(epoch)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(wait_until(Duration::from_secs(5), || async { acked(1).await == 2 }).await);
    stack.regions[0].kill();
    let (url_a, url_b) = (a.url(), b.url());
    let (sa, sb) = tokio::join!(
        send_all(&dev_a, &url_a, 1..=10, Duration::from_secs(30)),
        send_all(&dev_b, &url_b, 1..=10, Duration::from_secs(30)),
    );
    for sent in [&sa, &sb] {
        assert_eq!(sent.acks.len(), 10);
        assert!(
            sent.acks
                .iter()
                .all(|a| a.namespace == "eu-north" && a.epoch == 2),
            "{:?}",
            sent.acks
        );
    }
    let moves: i64 =
        sqlx::query_scalar("SELECT count(*) FROM failover_events WHERE kind = 'sender_moved'")
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(moves, 1, "one move, the other instance adopted it");
    assert!(
        wait_until(Duration::from_secs(5), || async { acked(2).await == 2 }).await,
        "the barrier shows both instances on epoch 2"
    );
    // So does `georelay admin status`, for an SRE.
    let out = georelay_testkit::georelay_command(&stack.db)
        .unwrap()
        .env("GEORELAY_MASTER_KEY", georelay_testkit::master_key_b64())
        .args(["admin", "status"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    let processes: Vec<&str> = status
        .lines()
        .filter(|l| l.trim_start().starts_with("ingest "))
        .collect();
    assert_eq!(processes.len(), 2, "{status}");
    assert!(
        processes
            .iter()
            .all(|l| l.contains("live") && l.contains("g:2")),
        "{status}"
    );
    // A clean shutdown deregisters: the barrier no longer waits for it.
    let mut a = a;
    assert!(a.terminate().unwrap());
    let instances: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE role = 'ingest'")
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
    assert_eq!(instances, 1);
}

#[tokio::test]
async fn metrics_can_be_kept_off_the_devices_port() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let ingest = stack.ingest(&["--metrics-listen", &metrics_addr]).unwrap();
    // Not on the devices' port: the JSON 404 like any unknown route.
    let response = reqwest::get(format!("{}/metrics", ingest.url()))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
    let health = reqwest::get(format!("{}/healthz", ingest.url()))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // On its own address, with the group's name in it.
    let response = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let text = response.text().await.unwrap();
    assert!(
        text.contains("georelay_ingest_group_epoch{group=\"g\"}"),
        "{text}"
    );
}

/// A record larger than nats-server's `max_payload` (1 MiB by default) fits
/// in a batch body (8 MiB). Published unchecked, nats-server closed ingest's
/// connection: the breaker took that for the region going down and the
/// group failed over, and the device's retry did the same in the next
/// region. Now it is 413 `record_too_large` naming the limit, nothing of its
/// batch is queued, nothing fails over, and the next record goes through.
#[tokio::test]
async fn a_record_larger_than_the_broker_takes_is_413_and_fails_nothing_over() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let ingest = stack.ingest_in_process(settings()).await.unwrap();
    let http = http();
    let url = device.url(&ingest.url());
    let blob = "x".repeat(1024 * 1024 + 1);
    let big = device
        .seal_text(2, &json!({ "blob": blob }).to_string())
        .to_body();
    let batch = json!({"records": [device.body(1), {"seq": 2, "nonce": big.nonce, "ciphertext": big.ciphertext}]});
    let refused = post_raw(
        &http,
        &format!("{url}/batch"),
        Some("application/json"),
        batch.to_string(),
    )
    .await;
    assert_error(&refused, 413, "record_too_large", "record over max_payload");
    let message = refused.1["error"]["message"].as_str().unwrap();
    assert!(message.contains("seq 2"), "{message}");
    let limit = (1024 * 1024 - 256).to_string();
    assert!(message.contains(&limit), "the limit is named: {message}");
    assert!(refused.2.is_none(), "not worth a retry: no Retry-After");
    // The region is healthy: the next record is accepted there, under the
    // same epoch, and nothing moved.
    let ok = post_raw(
        &http,
        &url,
        Some("application/json"),
        device.body(3).to_string(),
    )
    .await;
    assert_eq!(ok.0, 202, "{:?}", ok.1);
    assert_eq!(
        (ok.1["namespace"].as_str(), ok.1["epoch"].as_i64()),
        (Some("eu-west"), Some(1))
    );
    let moves: i64 =
        sqlx::query_scalar("SELECT count(*) FROM failover_events WHERE kind = 'sender_moved'")
            .fetch_one(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(moves, 0, "nothing failed over");
    let queued = drain_queue(&stack.regions[0].url(), 2).await;
    let seqs: Vec<u64> = queued.iter().map(|e| e.record.seq).collect();
    assert_eq!(seqs, vec![3], "nothing of the refused batch was queued");
}

/// Opens a records request for `device` that declares `length` bytes of body
/// and sends only a few of them: a client on a very slow link, or one
/// holding the server's resources on purpose.
/// `length` `None`: a chunked body, whose length nobody knows beforehand.
async fn trickle(base: &str, device: &str, length: Option<usize>) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let addr = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (framing, start) = match length {
        Some(n) => (format!("Content-Length: {n}"), "{\"records\": [".to_owned()),
        None => (
            "Transfer-Encoding: chunked".to_owned(),
            "5\r\n{\"rec\r\n".to_owned(),
        ),
    };
    let head = format!(
        "POST /v1/devices/{device}/telemetry/batch HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n{start}"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
}

/// Slow bodies used to hold the concurrency slots (taken before the body
/// was read), so a handful of trickling clients made every device get 503
/// `overloaded`; and a body was read in full before the device was looked
/// at. Now the slots are taken once the body is in, and an unknown device is
/// refused before any of its body is read.
#[tokio::test]
async fn trickling_bodies_do_not_lock_out_other_devices() {
    use tokio::io::AsyncReadExt as _;
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let ingest = stack
        .ingest_in_process(georelay_ingest::Settings {
            max_concurrent_requests: 4,
            ..settings()
        })
        .await
        .unwrap();
    let base = ingest.url();
    let mut slow = Vec::new();
    for i in 0..8 {
        let d = stack.device(&format!("plug-slow-{i}")).await.unwrap();
        slow.push(trickle(&base, d.id.as_str(), Some(4096)).await);
    }
    let device = stack.device("plug-1").await.unwrap();
    let http = http();
    let url = device.url(&base);
    for seq in 1..=3 {
        let ok = post_raw(
            &http,
            &url,
            Some("application/json"),
            device.body(seq).to_string(),
        )
        .await;
        assert_eq!(ok.0, 202, "seq {seq} beside slow uploads: {:?}", ok.1);
    }
    // An unknown device is answered before its body has arrived.
    let mut stranger = trickle(&base, "plug-nobody", Some(8 * 1024 * 1024)).await;
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), stranger.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // A device has at most four bodies in flight: past them a request is
    // refused at once, before its body is read. plug-slow-0 holds one; each
    // further request is either refused (answered) or held (no answer).
    let mut held = 1;
    let refusal = loop {
        assert!(held <= 4, "more than four bodies of one device held");
        let mut probe = trickle(&base, "plug-slow-0", Some(4096)).await;
        let mut buf = vec![0u8; 512];
        match tokio::time::timeout(Duration::from_millis(500), probe.read(&mut buf)).await {
            Ok(n) => break String::from_utf8_lossy(&buf[..n.unwrap()]).into_owned(),
            Err(_) => {
                held += 1;
                slow.push(probe);
            }
        }
    };
    assert_eq!(held, 4, "refused once four were held");
    assert!(refusal.starts_with("HTTP/1.1 503"), "{refusal}");
    assert!(refusal.contains("overloaded"), "{refusal}");
    drop(slow);
}

/// Bodies reserve their bytes from `--max-bytes-in-flight` before they are
/// read (the declared length, else the limit): past it a request is refused
/// at once instead of buffered (bodies up to 8 MiB used to be buffered in
/// full, as many as came). `cargo bench --bench slow_uploads` measures RSS.
#[tokio::test]
async fn request_bodies_are_held_within_the_bytes_in_flight_budget() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let ingest = stack
        .ingest_in_process(georelay_ingest::Settings {
            max_bytes_in_flight: 8 * 1024 * 1024,
            ..settings()
        })
        .await
        .unwrap();
    let base = ingest.url();
    let hog = stack.device("plug-hog").await.unwrap();
    // Declares nothing: reserves the batch limit, the whole budget. Taken
    // in before anything else is sent (a request in flight beside it would
    // leave it too little room).
    let held = trickle(&base, hog.id.as_str(), None).await;
    let http = http();
    let reserved = || async {
        let text = georelay_testkit::metrics_text(&base).await.unwrap();
        text.contains("georelay_ingest_body_bytes_in_flight 8388608")
    };
    assert!(
        wait_until(Duration::from_secs(5), reserved).await,
        "the hog's body holds the whole budget"
    );
    let device = stack.device("plug-1").await.unwrap();
    let url = device.url(&base);
    let post = || {
        post_raw(
            &http,
            &url,
            Some("application/json"),
            device.body(1).to_string(),
        )
    };
    let answer = post().await;
    assert_error(&answer, 503, "overloaded", "budget spent");
    assert!(
        answer.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bytes in flight"),
        "{:?}",
        answer.1
    );
    // The hog gives up: its bytes come back.
    drop(held);
    let accepted = wait_until(Duration::from_secs(5), || async { post().await.0 == 202 }).await;
    assert!(accepted, "the budget is given back when the request ends");
}

/// One bad row must not take the fleet down. A device row holding a key
/// pasted in by hand (not sealed), and a namespace whose sealed key was
/// copied from another row: every new process used to refuse to start
/// (the master key check, the routing load), and the device got 503
/// forever. Now ingest starts, the device gets 401 (with an ERROR naming
/// it), the namespace is left out, and every other device is served.
#[tokio::test]
async fn a_bad_key_row_refuses_that_row_only() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let good = stack.device("plug-1").await.unwrap();
    let bad = stack.device("plug-bad").await.unwrap();
    let pool = stack.db.pool();
    sqlx::query("UPDATE devices SET key_sealed = $1 WHERE id = 'plug-bad'")
        .bind(vec![7u8; 32])
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO namespaces (name, region, transport, endpoint, priority, key_name, key_sealed)
         SELECT 'spare', 'spare', 'nats', 'nats://127.0.0.1:9', 99, 'token', key_sealed
         FROM devices WHERE id = 'plug-1'",
    )
    .execute(pool)
    .await
    .unwrap();
    let ingest = stack.ingest(INGEST_ARGS).unwrap();
    let http = http();
    let ok = good.post(&http, &ingest.url(), 1).await.unwrap();
    assert_eq!(ok.0, 202, "{:?}", ok.1);
    let refused = bad.post(&http, &ingest.url(), 1).await.unwrap();
    assert_eq!(refused.0, 401, "{:?}", refused.1);
    assert_eq!(refused.1["error"]["code"], "unauthorized");
}

/// A device moved to another group while records of it are still queued in
/// its old group would have them stored after its newer ones (issue 13).
/// The database refuses the move (GR014) while an ingest instance may still
/// report acknowledgements of it, and while what ingest acknowledged in the
/// old group is not stored; once it is, the move goes through.
#[tokio::test]
async fn a_disabled_device_changes_group_only_once_what_ingest_acknowledged_is_stored() {
    use sqlx::postgres::PgDatabaseError;
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let pool = stack.db.pool();
    georelay_store::control::add_group(
        pool,
        "g2",
        "telemetry2",
        "eu-west",
        &georelay_store::control::Actor {
            actor: "test".into(),
            reason: None,
        },
    )
    .await
    .unwrap();
    // Acknowledgements are complete 3 s after a disable: cache 1 s + deadline 2 s.
    let ingest = stack
        .ingest(&[
            "--publish-deadline",
            "1s",
            "--request-deadline",
            "2s",
            "--lease",
            "2s",
            "--device-cache-ttl",
            "1s",
        ])
        .unwrap();
    let device = stack.device("plug-mover").await.unwrap();
    // No worker yet: what ingest acknowledges stays queued.
    device
        .post_until_accepted(&ingest.url(), 1..=5)
        .await
        .unwrap();
    let at_once = sqlx::query(
        "UPDATE devices SET enabled = false, group_id = (SELECT id FROM routing_groups WHERE name = 'g2')
         WHERE id = 'plug-mover'",
    )
    .execute(pool)
    .await;
    let pg = at_once.unwrap_err();
    let code = pg
        .as_database_error()
        .and_then(|e| e.code())
        .unwrap_or_default();
    assert_eq!(code, "GR014", "disabled and moved in one statement: {pg}");
    georelay_store::control::set_device_enabled(pool, "plug-mover", false)
        .await
        .unwrap();
    let try_move = || async {
        sqlx::query(
            "UPDATE devices SET group_id = (SELECT id FROM routing_groups WHERE name = 'g2')
             WHERE id = 'plug-mover'",
        )
        .execute(pool)
        .await
    };
    let refusal = |e: sqlx::Error| {
        let pg = e
            .as_database_error()
            .and_then(|e| e.try_downcast_ref::<PgDatabaseError>())
            .map(|pg| {
                (
                    pg.code().to_owned(),
                    pg.message().to_owned(),
                    pg.hint().map(str::to_owned),
                )
            })
            .unwrap_or_else(|| panic!("{e}"));
        assert_eq!(pg.0, "GR014", "{pg:?}");
        assert!(pg.2.is_some_and(|h| !h.is_empty()), "a hint");
        pg.1
    };
    // At once: ingest may still acknowledge records it admitted before.
    let first = refusal(try_move().await.unwrap_err());
    assert!(first.contains("not reported"), "{first}");
    // Reported now (horizon 3 s), but queued: still refused, saying where.
    let reported = wait_until(Duration::from_secs(20), || async {
        match try_move().await {
            Err(e) => refusal(e).contains("still has records queued"),
            Ok(_) => panic!("moved while its records were queued"),
        }
    })
    .await;
    assert!(reported, "the acknowledgements were never reported");
    let message = refusal(try_move().await.unwrap_err());
    assert!(message.contains("up to seq 5"), "{message}");

    // The worker stores them: the move goes through.
    let _drain = stack.drain(georelay_testkit::DRAIN_TEST_ARGS).unwrap();
    let stored = wait_until(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM telemetry WHERE device_id = 'plug-mover'",
        )
        .fetch_one(pool)
        .await
        .unwrap()
            == 5
    })
    .await;
    assert!(stored);
    try_move().await.unwrap();
}

/// `GET /v1/devices/{id}/progress`: the stored seqs above `after`, as
/// ranges (a gap stays a gap), to the device alone (HMAC under its key,
/// within five minutes); anything else is the one 401 of the records routes.
#[tokio::test]
async fn a_device_learns_which_of_its_records_are_stored_and_nobody_else_does() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-progress").await.unwrap();
    let stranger = stack.device("plug-other").await.unwrap();
    let ingest = stack.ingest_in_process(settings()).await.unwrap();
    // Stored as the drain stores them: 1..=5 and 7..=8 (6 not yet).
    sqlx::query(
        "INSERT INTO telemetry (device_id, seq, payload, received_at, namespace_id, epoch)
         SELECT 'plug-progress', s, '{}', now(), $1, 1 FROM unnest('{1,2,3,4,5,7,8}'::bigint[]) s",
    )
    .bind(stack.namespace_ids[0])
    .execute(stack.db.pool())
    .await
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ask = |who: &TestDevice, key_of: &TestDevice, after: u64, t: i64, query: String| {
        let header = georelay_core::progress::header(&key_of.key, &who.id, after, t);
        let url = format!("{}/v1/devices/{}/progress{query}", ingest.url(), who.id);
        async move {
            let response = http()
                .get(url)
                .header(georelay_core::progress::HEADER, header)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap(), None)
        }
    };
    let all = ask(&device, &device, 0, now, String::new()).await;
    assert_eq!(all.0, 200, "{:?}", all.1);
    assert_eq!(all.1["stored"], json!([[1, 5], [7, 8]]));
    assert_eq!(all.1["complete"], true);
    let later = ask(&device, &device, 5, now, "?after=5".into()).await;
    assert_eq!(later.1["stored"], json!([[7, 8]]));
    // An epoch of its group given up (a region lost for good) is named:
    // what the device sent into it and is not stored, it sends again.
    assert_eq!(all.1["abandoned"], json!([]));
    sqlx::query("UPDATE routing_trail SET abandoned_at = now() WHERE group_id = $1 AND epoch = 1")
        .bind(stack.group_id)
        .execute(stack.db.pool())
        .await
        .unwrap();
    let abandoned = ask(&device, &device, 0, now, String::new()).await;
    assert_eq!(abandoned.1["abandoned"], json!([1]));

    // Signed with another device's key, for another `after`, too old, or
    // not at all: 401, the same answer as an unknown device.
    let forged = ask(&device, &stranger, 0, now, String::new()).await;
    assert_error(&forged, 401, "unauthorized", "another key");
    let replayed = ask(&device, &device, 0, now, "?after=5".into()).await;
    assert_error(&replayed, 401, "unauthorized", "signed for another after");
    let stale = ask(&device, &device, 0, now - 600_000, String::new()).await;
    assert_error(&stale, 401, "unauthorized", "ten minutes old");
    let bare = http()
        .get(format!(
            "{}/v1/devices/{}/progress",
            ingest.url(),
            device.id
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 401);
    let bad = ask(&device, &device, 0, now, "?after=-1".into()).await;
    assert_error(&bad, 400, "invalid_query", "a negative after");
    let other = ask(&device, &device, 0, now, "?from=1".into()).await;
    assert_error(&other, 400, "invalid_query", "an unknown parameter");
}
