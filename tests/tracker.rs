//! The tracker front door end to end: Teltonika packets built from the
//! specification, over TCP into `georelay ingest --listen-teltonika`, through
//! a real region and the drain into `telemetry`.

use georelay_ingest::tracker::teltonika::device::{packet, Avl, Codec, Tracker};
use georelay_testkit::{
    metrics_text, wait_until, Service, Stack, DRAIN_TEST_ARGS, INGEST_TEST_ARGS,
};
use std::net::TcpListener;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const IMEI: &str = "356307042441013";
/// 2026-11-30 00:00:00 UTC in ms: the tests' readings start here.
const T0: u64 = 1_795_996_800_000;

/// Ingest with the Teltonika listener on a free port; its address.
fn ingest_with_trackers(stack: &Stack) -> (Service, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = INGEST_TEST_ARGS.to_vec();
    args.extend(["--listen-teltonika", addr.as_str()]);
    let ingest = stack.ingest(&args).unwrap();
    (ingest, addr)
}

async fn stored(stack: &Stack) -> Vec<(i64, serde_json::Value)> {
    sqlx::query_as("SELECT seq, payload FROM telemetry WHERE device_id = $1 ORDER BY seq")
        .bind(IMEI)
        .fetch_all(stack.db.pool())
        .await
        .unwrap()
}

async fn wait_stored(stack: &Stack, n: usize) -> Vec<(i64, serde_json::Value)> {
    let ok = wait_until(Duration::from_secs(60), || async {
        stored(stack).await.len() >= n
    })
    .await;
    let rows = stored(stack).await;
    assert!(ok, "{} of {n} records stored", rows.len());
    rows
}

/// A packet, sent again until the server acknowledges all of it.
async fn send_until_acked(addr: &str, tracker: &mut Option<Tracker>, bytes: &[u8], records: u32) {
    for _ in 0..600 {
        if tracker.is_none() {
            if let Ok((t, 1)) = Tracker::connect(addr, IMEI).await {
                *tracker = Some(t);
            }
        }
        if let Some(t) = tracker.as_mut() {
            match t.send(bytes).await {
                Ok(n) if n == records => return,
                Ok(_) => {}
                Err(_) => *tracker = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the packet was never acknowledged");
}

#[tokio::test]
async fn tracker_packets_are_acknowledged_once_queued_and_stored_once_each() {
    let stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    stack.device(IMEI).await.unwrap();
    let (ingest, addr) = ingest_with_trackers(&stack);
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();

    let (mut tracker, accepted) = Tracker::connect(&addr, IMEI).await.unwrap();
    assert_eq!(accepted, 1, "a registered IMEI is accepted");
    // A tracker deletes what was acknowledged: if a region holding some of
    // it is ever given up, nothing waits for it to send that again.
    let sends_again: bool = sqlx::query_scalar("SELECT sends_again FROM devices WHERE id = $1")
        .bind(IMEI)
        .fetch_one(stack.db.pool())
        .await
        .unwrap();
    assert!(!sends_again);
    // Three records in one Codec 8 packet, two of them in the same ms.
    let first = packet(
        Codec::C8,
        &[Avl::at(T0), Avl::at(T0 + 1000), Avl::at(T0 + 1000)],
    );
    assert_eq!(tracker.send(&first).await.unwrap(), 3);
    // Codec 8 Extended with a variable-length IO element.
    let mut extended = Avl::at(T0 + 2000);
    extended.io2.push((300, 7));
    extended.iox.push((10_348, b"\x01\x02\xff".to_vec()));
    extended.latitude = -33.868_820_0;
    extended.longitude = -151.209_296_0;
    assert_eq!(
        tracker
            .send(&packet(Codec::C8E, &[extended]))
            .await
            .unwrap(),
        1
    );
    // The first packet again (its ack was lost, say): stored once.
    assert_eq!(tracker.send(&first).await.unwrap(), 3);
    // A last reading behind it: once it is stored, whatever the re-send put
    // on the queue ahead of it has been stored too (one queue, in order).
    assert_eq!(
        tracker
            .send(&packet(Codec::C8, &[Avl::at(T0 + 3000)]))
            .await
            .unwrap(),
        1
    );

    let rows = wait_stored(&stack, 5).await;
    let seqs: Vec<i64> = rows.iter().map(|(s, _)| *s).collect();
    let t0 = T0 as i64;
    assert_eq!(
        seqs,
        [t0, t0 + 1000, t0 + 1001, t0 + 2000, t0 + 3000],
        "the re-sent packet is stored once, under the same seqs"
    );
    // The bumped record keeps its own timestamp.
    assert_eq!(rows[2].1["timestamp"], T0 + 1000);
    let p = &rows[3].1;
    assert_eq!(p["codec"], "8E");
    assert_eq!(p["latitude"], -33.868_82);
    assert_eq!(p["longitude"], -151.209_296);
    assert_eq!(p["altitude"], 112);
    assert_eq!(p["satellites"], 9);
    assert_eq!(p["speed"], 42);
    assert_eq!(p["io"]["300"], 7);
    assert_eq!(p["io"]["10348"], "0102ff");
    assert_eq!(p["io"]["78"], 0x0102_0304_0506_0708u64);
    let metrics = metrics_text(&ingest.url()).await.unwrap();
    assert!(
        metrics.contains(
            "georelay_ingest_tracker_packets_total{codec=\"teltonika\",outcome=\"acked\"} 4"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_packets_are_not_acknowledged_and_garbage_or_strangers_are_shown_the_door() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    stack.device(IMEI).await.unwrap();
    let (ingest, addr) = ingest_with_trackers(&stack);
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();

    // An IMEI nobody registered: refused at the handshake, and closed.
    let (mut stranger, answer) = Tracker::connect(&addr, "490154203237518").await.unwrap();
    assert_eq!(answer, 0);
    assert!(stranger.closed(Duration::from_secs(5)).await);

    let (mut tracker, answer) = Tracker::connect(&addr, IMEI).await.unwrap();
    assert_eq!(answer, 1);
    // A bad CRC: answered 0, the connection stays for the re-send.
    let mut bad_crc = packet(Codec::C8, &[Avl::at(T0)]);
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x55;
    assert_eq!(tracker.send(&bad_crc).await.unwrap(), 0);
    // A count that does not match the records (CRC right): 0.
    let mut wrong_count = packet(Codec::C8, &[Avl::at(T0)]);
    wrong_count[9] = 2;
    let n = wrong_count.len();
    wrong_count[n - 5] = 2;
    let crc = georelay_ingest::tracker::teltonika::crc16_ibm(&wrong_count[8..n - 4]);
    wrong_count[n - 2..].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(tracker.send(&wrong_count).await.unwrap(), 0);
    // The re-send is good.
    assert_eq!(
        tracker
            .send(&packet(Codec::C8, &[Avl::at(T0)]))
            .await
            .unwrap(),
        1
    );

    // Dropped mid-packet: nothing of it is stored.
    let half = packet(Codec::C8, &[Avl::at(T0 + 5000)]);
    tracker
        .stream
        .write_all(&half[..half.len() / 2])
        .await
        .unwrap();
    drop(tracker);

    // Garbage after the handshake: closed.
    let (mut rude, answer) = Tracker::connect(&addr, IMEI).await.unwrap();
    assert_eq!(answer, 1);
    rude.stream
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert!(rude.closed(Duration::from_secs(5)).await);

    // One packet was acknowledged (and so queued): the good one.
    let rows = wait_stored(&stack, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let metrics = metrics_text(&ingest.url()).await.unwrap();
    for line in [
        "georelay_ingest_tracker_packets_total{codec=\"teltonika\",outcome=\"acked\"} 1",
        "georelay_ingest_tracker_packets_total{codec=\"teltonika\",outcome=\"bad_crc\"} 1",
        "georelay_ingest_tracker_packets_total{codec=\"teltonika\",outcome=\"bad_count\"} 1",
        "georelay_ingest_tracker_connections_closed_total{codec=\"teltonika\",reason=\"unknown_device\"} 1",
        "georelay_ingest_tracker_connections_closed_total{codec=\"teltonika\",reason=\"garbage\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}

#[tokio::test]
async fn a_region_killed_while_a_tracker_streams_loses_nothing_it_acknowledged() {
    let mut stack = Stack::start(&["eu-west", "eu-north"]).await.unwrap();
    stack.device(IMEI).await.unwrap();
    let (_ingest, addr) = ingest_with_trackers(&stack);
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();

    let mut tracker = None;
    let mut acked = 0usize;
    for i in 0..40u64 {
        if i == 15 {
            stack.regions[0].kill();
        }
        let records: Vec<Avl> = (0..3).map(|k| Avl::at(T0 + i * 1000 + k * 100)).collect();
        send_until_acked(&addr, &mut tracker, &packet(Codec::C8, &records), 3).await;
        acked += 3;
    }
    // The records acknowledged on the dead region come out when it returns.
    stack.regions[0].restart().unwrap();
    let rows = wait_stored(&stack, acked).await;
    let mut expected: Vec<i64> = (0..40i64)
        .flat_map(|i| (0..3).map(move |k| T0 as i64 + i * 1000 + k * 100))
        .collect();
    expected.sort_unstable();
    let seqs: Vec<i64> = rows.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, expected);
    // Stored in order, too.
    let order: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM telemetry WHERE device_id = $1 ORDER BY store_order")
            .bind(IMEI)
            .fetch_all(stack.db.pool())
            .await
            .unwrap();
    assert_eq!(order, expected);
}
