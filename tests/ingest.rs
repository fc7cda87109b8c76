//! The ingest service end to end: the real `georelay ingest` binary against a
//! real PostgreSQL and real `nats-server` regions. Every error of the HTTP
//! contract, the envelope on the queue, failover on kill and on SIGSTOP, the
//! failover bit, exhaustion, raw SQL moves, and two instances on one group.

use base64::Engine as _;
use georelay_core::Envelope;
use georelay_testkit::{wait_until, Stack, TestDevice, QUEUE};
use georelay_transport::{Limits, Namespace};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Short deadlines so faults show quickly.
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
    let ns = Namespace::connect("nats", url, None, None, Limits::default())
        .await
        .unwrap();
    assert!(ns.wait_connected(Duration::from_secs(5)).await);
    ns
}

/// Reads up to `n` envelopes from a region's queue (acking them).
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
        out.extend(batch.iter().map(|d| Envelope::decode(&d.payload).unwrap()));
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
    let ingest = stack.ingest(INGEST_ARGS).unwrap();
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
    assert_eq!(plaintext["reading"], 0.1);

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
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
}
