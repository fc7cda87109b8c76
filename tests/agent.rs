//! The plug computer agent end to end: the real `georelay agent run` binary
//! against a real ingest and drain (real PostgreSQL and nats-server). No
//! reading is lost through a backend outage, a kill -9 of the agent, a
//! refused record or a full buffer; seqs are contiguous and never reused.

use georelay_testkit::{
    georelay_command, wait_until, Service, Stack, TestDevice, DRAIN_TEST_ARGS, INGEST_TEST_ARGS,
};
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Agent {
    /// `georelay agent run --stdin` with `extra` flags.
    fn start(stack: &Stack, device: &TestDevice, url: &str, state: &Path, extra: &[&str]) -> Self {
        Self::start_with(stack, device, url, state, &[&["--stdin"], extra].concat())
    }

    fn start_with(
        stack: &Stack,
        device: &TestDevice,
        url: &str,
        state: &Path,
        extra: &[&str],
    ) -> Self {
        let mut child = georelay_command(&stack.db)
            .unwrap()
            .env("GEORELAY_DEVICE_KEY", device.key.to_base64().as_str())
            .env("RUST_LOG", "warn")
            .args(["agent", "run", "--device", device.id.as_str(), "--url", url])
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Self { child, stdin }
    }

    fn send(&mut self, from: u64, to: u64) {
        let stdin = self.stdin.as_mut().unwrap();
        for n in from..=to {
            writeln!(stdin, "{}", serde_json::json!({"n": n})).unwrap();
        }
        stdin.flush().unwrap();
    }

    fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin: the agent delivers what is left and exits.
    fn finish(mut self) -> bool {
        drop(self.stdin.take());
        self.child.wait().unwrap().success()
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(seq, payload.n)` stored for `device`, in store order.
async fn stored(stack: &Stack, device: &str) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT seq, (payload->>'n')::bigint FROM telemetry WHERE device_id = $1 ORDER BY store_order")
        .bind(device)
        .fetch_all(stack.db.pool())
        .await
        .unwrap()
}

async fn wait_rows(stack: &Stack, device: &str, n: usize) -> Vec<(i64, i64)> {
    let ok = wait_until(Duration::from_secs(60), || async {
        stored(stack, device).await.len() >= n
    })
    .await;
    let rows = stored(stack, device).await;
    assert!(ok, "{} of {n} rows", rows.len());
    rows
}

fn up(stack: &Stack) -> (Service, Service) {
    (
        stack.ingest(INGEST_TEST_ARGS).unwrap(),
        stack.drain(DRAIN_TEST_ARGS).unwrap(),
    )
}

#[tokio::test]
async fn readings_arrive_in_order_and_survive_a_backend_outage() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("outage");
    let (mut ingest, _drain) = up(&stack);
    let mut agent = Agent::start(&stack, &device, &ingest.url(), &state, &[]);
    agent.send(1, 20);
    wait_rows(&stack, "plug-1", 20).await;
    // The backend goes away; readings keep coming and are buffered.
    ingest.kill();
    agent.send(21, 60);
    let db = state.join("plug-1.db");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            buffered(&db).await == 40
        })
        .await,
        "the 40 new readings wait in the buffer"
    );
    assert_eq!(stored(&stack, "plug-1").await.len(), 20);
    // It comes back on the same address: everything is delivered, in order.
    let _ingest = Service::start_at(
        &stack.db,
        "ingest",
        &ingest.addr().to_string(),
        INGEST_TEST_ARGS,
    )
    .unwrap();
    let rows = wait_rows(&stack, "plug-1", 60).await;
    assert_eq!(
        rows,
        (1..=60).map(|n| (n, n)).collect::<Vec<_>>(),
        "seq = reading, in order"
    );
    assert!(agent.finish());
}

/// A 202 means "queued", not "stored": the agent keeps each record, marked
/// sent, until ingest's progress answer says it is stored, then lets it go.
/// (Sending again what an abandoned epoch held: the region-lost drills.)
#[tokio::test]
async fn records_are_kept_after_their_202_until_they_are_stored() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("kept");
    let ingest = stack.ingest(INGEST_TEST_ARGS).unwrap();
    let mut agent = Agent::start(
        &stack,
        &device,
        &ingest.url(),
        &state,
        &["--confirm-after", "500ms"],
    );
    agent.send(1, 10);
    let db = state.join("plug-1.db");
    let sent = "SELECT count(*), 0 FROM outbox WHERE sent_epoch IS NOT NULL";
    assert!(
        wait_until(Duration::from_secs(10), || async {
            sqlite_rows(&db, sent).await.first().map(|r| r.0) == Some(10)
        })
        .await,
        "all ten sent and kept: no worker stores them yet"
    );
    // The agent asks twice more which are stored, and keeps them all.
    let before = progress_asked(&ingest).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            progress_asked(&ingest).await >= before + 2
        })
        .await,
        "the agent asks ingest which records are stored"
    );
    assert_eq!(
        sqlite_rows(&db, sent).await[0].0,
        10,
        "still kept: not stored"
    );
    let _drain = stack.drain(DRAIN_TEST_ARGS).unwrap();
    wait_rows(&stack, "plug-1", 10).await;
    assert!(
        outbox_empties(&db, Duration::from_secs(10)).await,
        "stored, so let go"
    );
    assert!(agent.finish());
}

/// Whether the agent's buffer `db` holds no record within `within`.
async fn outbox_empties(db: &Path, within: Duration) -> bool {
    wait_until(within, || async {
        sqlite_rows(db, "SELECT count(*), 0 FROM outbox")
            .await
            .first()
            .map(|r| r.0)
            == Some(0)
    })
    .await
}

/// Progress questions ingest answered.
async fn progress_asked(ingest: &Service) -> u64 {
    let text = ingest.metrics().await.unwrap();
    text.lines()
        .find(|l| l.starts_with(r#"georelay_ingest_requests_total{route="progress",status="200"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Each progress question costs ingest a request and PostgreSQL two reads:
/// a device that keeps sending asks once its oldest sent record has waited
/// `--confirm-after`, not every second (a reading a second would have
/// doubled ingest's requests), then lets the stored ones go.
#[tokio::test]
async fn a_sending_device_asks_which_records_are_stored_only_once_they_have_waited() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("confirm-after");
    let (ingest, _drain) = up(&stack);
    let mut agent = Agent::start(
        &stack,
        &device,
        &ingest.url(),
        &state,
        &["--confirm-after", "6s"],
    );
    // A reading every 250 ms for 3 s: stored as they come.
    for n in 1..=12 {
        agent.send(n, n);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_rows(&stack, "plug-1", 12).await;
    assert_eq!(
        progress_asked(&ingest).await,
        0,
        "no question while the oldest sent record has waited less than 6 s"
    );
    let db = state.join("plug-1.db");
    assert!(
        outbox_empties(&db, Duration::from_secs(15)).await,
        "asked, and the stored records let go"
    );
    assert!(progress_asked(&ingest).await >= 1);
    assert!(agent.finish());
}

#[tokio::test]
async fn kill_9_mid_backlog_loses_nothing_and_reuses_no_seq() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("kill");
    // No backend yet: a backlog builds up in the buffer.
    let mut agent = Agent::start(&stack, &device, "http://127.0.0.1:9", &state, &[]);
    agent.send(1, 300);
    let db = state.join("plug-1.db");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            buffered(&db).await >= 300
        })
        .await
    );
    agent.kill();
    // Restart against a live backend, with more readings.
    let (ingest, _drain) = up(&stack);
    let mut agent = Agent::start(&stack, &device, &ingest.url(), &state, &[]);
    agent.send(301, 400);
    assert!(agent.finish());
    let rows = wait_rows(&stack, "plug-1", 400).await;
    assert_eq!(rows, (1..=400).map(|n| (n, n)).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_refused_record_is_kept_aside_and_does_not_block_the_rest() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("refused");
    let (ingest, _drain) = up(&stack);
    let mut agent = Agent::start(&stack, &device, &ingest.url(), &state, &[]);
    agent.send(1, 5);
    // A JSON object the server refuses (400: U+0000 cannot be stored).
    agent.send_line(r#"{"n": 6, "bad": "\u0000"}"#);
    agent.send(7, 10);
    assert!(agent.finish());
    let rows = wait_rows(&stack, "plug-1", 9).await;
    assert_eq!(
        rows.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 7, 8, 9, 10]
    );
    let rejected = sqlite_rows(&state.join("plug-1.db"), "SELECT seq, status FROM rejected").await;
    assert_eq!(rejected, vec![(6, 400)]);
    // `agent requeue` puts it back in line under its own seq.
    let out = georelay_command(&stack.db)
        .unwrap()
        .args(["agent", "requeue", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "plug-1: 1 set-aside records back in line\n"
    );
    let db = state.join("plug-1.db");
    assert_eq!(
        sqlite_rows(&db, "SELECT seq, 0 FROM outbox WHERE sent_epoch IS NULL").await,
        vec![(6, 0)]
    );
    assert!(sqlite_rows(&db, "SELECT seq, status FROM rejected")
        .await
        .is_empty());
}

/// A 4xx that is not about the record — here 401 while the device is
/// disabled for a while — used to move records aside for good. They are
/// kept and retried, and delivered once the device is enabled again.
#[tokio::test]
async fn a_refusal_that_is_not_about_the_record_is_retried_not_set_aside() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("disabled");
    let (ingest, _drain) = up(&stack);
    georelay_store::control::set_device_enabled(stack.db.pool(), "plug-1", false)
        .await
        .unwrap();
    let mut agent = Agent::start(&stack, &device, &ingest.url(), &state, &[]);
    agent.send(1, 3);
    // Refused (401) twice: a first answer, and a retry after it.
    let refused = wait_until(Duration::from_secs(10), || async {
        refusals(&ingest).await >= 2.0
    })
    .await;
    assert!(refused, "ingest answered 401");
    let db = state.join("plug-1.db");
    assert!(sqlite_rows(&db, "SELECT seq, status FROM rejected")
        .await
        .is_empty());
    georelay_store::control::set_device_enabled(stack.db.pool(), "plug-1", true)
        .await
        .unwrap();
    let rows = wait_rows(&stack, "plug-1", 3).await;
    assert_eq!(rows, vec![(1, 1), (2, 2), (3, 3)]);
    assert!(agent.finish());
}

/// A line that is not UTF-8 used to end the input (the agent exited 0 with
/// the rest unread), and a line without an end grew memory without bound.
/// Both are skipped with a warning; the input goes on.
#[tokio::test]
async fn bad_bytes_and_endless_lines_on_stdin_are_skipped_not_fatal() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("bad-bytes");
    let (ingest, _drain) = up(&stack);
    let mut agent = Agent::start(&stack, &device, &ingest.url(), &state, &[]);
    agent.send(1, 2);
    {
        let stdin = agent.stdin.as_mut().unwrap();
        stdin.write_all(b"{\"n\": \"caf\xe9\"}\n").unwrap();
        let long = format!("{{\"n\": 0, \"pad\": \"{}\"}}\n", "x".repeat(1024 * 1024));
        stdin.write_all(long.as_bytes()).unwrap();
    }
    agent.send(3, 4);
    assert!(agent.finish(), "the agent ends well once stdin is closed");
    let rows = wait_rows(&stack, "plug-1", 4).await;
    assert_eq!(rows, vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
}

/// An input that fails (here standard input that cannot be read) used to end
/// quietly with exit 0; it stops the agent with a non-zero exit naming it.
#[tokio::test]
async fn an_input_that_fails_stops_the_agent_with_an_error() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("input-fails");
    // A directory as standard input: every read fails (EISDIR).
    let out = georelay_command(&stack.db)
        .unwrap()
        .env("GEORELAY_DEVICE_KEY", device.key.to_base64().as_str())
        .args([
            "agent",
            "run",
            "--stdin",
            "--device",
            "plug-1",
            "--url",
            "http://127.0.0.1:9",
        ])
        .arg("--state-dir")
        .arg(&state)
        .stdin(std::fs::File::open(&state).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read standard input"), "{stderr}");
}

#[tokio::test]
async fn a_full_buffer_pauses_the_input_and_loses_nothing() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("full");
    // The backend's address, with nothing listening there for now.
    let (mut ingest, _drain) = up(&stack);
    let addr = ingest.addr().to_string();
    ingest.kill();
    let mut agent = Agent::start(
        &stack,
        &device,
        &format!("http://{addr}"),
        &state,
        &["--max-buffer", "5"],
    );
    agent.send(1, 12);
    let db = state.join("plug-1.db");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            buffered(&db).await == 5
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        buffered(&db).await,
        5,
        "the buffer holds its cap and no more"
    );
    // Back-pressure, not dropping: once the backend is back, the agent
    // delivers, takes the rest of its input and delivers that too.
    let _ingest = Service::start_at(&stack.db, "ingest", &addr, INGEST_TEST_ARGS).unwrap();
    assert!(agent.finish());
    let rows = wait_rows(&stack, "plug-1", 12).await;
    assert_eq!(rows, (1..=12).map(|n| (n, n)).collect::<Vec<_>>());
}

#[tokio::test]
async fn dropped_files_are_taken_once_even_across_a_restart() {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-1").await.unwrap();
    let state = tempdir("watch-state");
    let inbox = tempdir("watch-inbox");
    let (ingest, _drain) = up(&stack);
    let watch = ["--watch", inbox.to_str().unwrap()];
    let agent = Agent::start_with(&stack, &device, &ingest.url(), &state, &watch);
    std::fs::write(inbox.join("a.json"), "{\"n\": 1}\nnot json\n{\"n\": 2}\n").unwrap();
    // A writer's temporary file is left alone until renamed.
    std::fs::write(inbox.join("b.json.tmp"), "{\"n\": 3}\n").unwrap();
    wait_rows(&stack, "plug-1", 2).await;
    agent.kill();
    std::fs::rename(inbox.join("b.json.tmp"), inbox.join("b.json")).unwrap();
    let _agent = Agent::start_with(&stack, &device, &ingest.url(), &state, &watch);
    let rows = wait_rows(&stack, "plug-1", 3).await;
    assert_eq!(
        rows,
        vec![(1, 1), (2, 2), (3, 3)],
        "a.json was not taken again"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            inbox.join("done/b.json").exists()
        })
        .await
    );
    assert!(inbox.join("done/a.json").exists());
    // A new file under a used name is a new file: taken, and kept beside
    // the first in done/. A line of it that is not UTF-8 is skipped; the
    // file is read (it used to be retried, unread, every 500 ms).
    std::fs::write(
        inbox.join("a.json"),
        b"{\"n\": 4}\n{\"n\": \"\xff\"}\n{\"n\": 5}\n",
    )
    .unwrap();
    let rows = wait_rows(&stack, "plug-1", 5).await;
    assert_eq!(rows, vec![(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            inbox.join("done/a.json.1").exists()
        })
        .await
    );
    assert_eq!(
        std::fs::read_to_string(inbox.join("done/a.json")).unwrap(),
        "{\"n\": 1}\nnot json\n{\"n\": 2}\n",
        "the first file is kept"
    );
}

/// Records requests ingest answered with 401, from its metrics.
async fn refusals(ingest: &Service) -> f64 {
    let text = ingest.metrics().await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("georelay_ingest_requests_total{") && l.contains("status=\"401\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("georelay-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Records waiting in the agent's buffer to be sent (read beside the
/// running agent; sent ones stay until stored, not counted here).
async fn buffered(db: &Path) -> i64 {
    sqlite_rows(
        db,
        "SELECT count(*), 0 FROM outbox WHERE sent_epoch IS NULL",
    )
    .await
    .first()
    .map_or(0, |r| r.0)
}

async fn sqlite_rows(db: &Path, sql: &str) -> Vec<(i64, i64)> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true);
    let Ok(mut conn) = sqlx::ConnectOptions::connect(&options).await else {
        return Vec::new();
    };
    sqlx::query_as(sql)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default()
}

/// A simulated scale on the LAN: lines in, the gateway's answers out.
struct Scale {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Scale {
    async fn connect(addr: &str) -> Self {
        let mut last = None;
        for _ in 0..100 {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => {
                    let (r, w) = stream.into_split();
                    return Self {
                        reader: tokio::io::BufReader::new(r),
                        writer: w,
                    };
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the line gateway never listened on {addr}: {last:?}");
    }

    /// Sends `line` and returns the answer (without `\r\n`).
    async fn say(&mut self, line: &str) -> String {
        use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer.trim_end().to_owned()
    }
}

#[tokio::test]
async fn a_scale_on_the_lan_gets_ok_only_once_buffered_a_kill_9_after_it_loses_nothing_and_its_weights_are_rolled_up(
) {
    let stack = Stack::start(&["eu-west"]).await.unwrap();
    let device = stack.device("plug-lan").await.unwrap();
    let (ingest, _drain) = up(&stack);
    let state = tempdir("lines");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let lines = ["--listen-lines", addr.as_str()];
    let agent = Agent::start_with(&stack, &device, &ingest.url(), &state, &lines);
    let mut scale = Scale::connect(&addr).await;
    assert_eq!(scale.say("Weight:12.3,Scale.Arduino").await, "OK 1");
    assert_eq!(
        scale.say("Weight:heavy,Scale.Arduino").await,
        "ERR pair 1: the value is not a finite number"
    );
    // The connection stays open after an ERR.
    assert_eq!(scale.say("Weight:12.5").await, "OK 2");
    assert_eq!(scale.say("Temp:21.5;Humidity:40,room-3").await, "OK 4");
    // Killed right after an OK: the reading was already in the buffer.
    assert_eq!(scale.say("Weight:13.0,Scale.Arduino").await, "OK 5");
    agent.kill();
    let _agent = Agent::start_with(&stack, &device, &ingest.url(), &state, &lines);
    let mut scale = Scale::connect(&addr).await;
    assert_eq!(scale.say("Weight:13.5,Scale.Arduino").await, "OK 6");

    let ok = wait_until(Duration::from_secs(60), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM telemetry WHERE device_id = 'plug-lan'")
            .fetch_one(stack.db.pool())
            .await
            .unwrap()
            >= 6
    })
    .await;
    assert!(ok, "not every OK'd reading was stored");
    let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(
        "SELECT seq, payload FROM telemetry WHERE device_id = 'plug-lan' ORDER BY store_order",
    )
    .fetch_all(stack.db.pool())
    .await
    .unwrap();
    let seen: Vec<(i64, &str, f64, Option<&str>)> = rows
        .iter()
        .map(|(seq, p)| {
            (
                *seq,
                p["type"].as_str().unwrap(),
                p["value"].as_f64().unwrap(),
                p["sensor"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (1, "Weight", 12.3, Some("Scale.Arduino")),
            (2, "Weight", 12.5, None),
            (3, "Temp", 21.5, Some("room-3")),
            (4, "Humidity", 40.0, Some("room-3")),
            (5, "Weight", 13.0, Some("Scale.Arduino")),
            (6, "Weight", 13.5, Some("Scale.Arduino")),
        ]
    );
    for (_, p) in &rows {
        assert_eq!(p["gateway"], "plug-lan");
        let at = p["captured_at"].as_str().unwrap();
        assert!(at.starts_with("20") && at.ends_with('Z'), "{at}");
    }

    // And on into the windows: the scale's weights per sensor and type.
    let _rollup = Service::start(&stack.db, "rollup", &["--poll-interval", "100ms"]).unwrap();
    let weights = || async {
        sqlx::query_as::<_, (Option<i64>, Option<f64>, Option<f64>, Option<f64>)>(
            "SELECT sum(count)::bigint, sum(sum), min(min), max(max) FROM telemetry_rollups
             WHERE device_id = 'plug-lan' AND sensor = 'Scale.Arduino' AND field = 'Weight'
               AND window_seconds = 180",
        )
        .fetch_one(stack.db.pool())
        .await
        .unwrap()
    };
    let rolled = wait_until(Duration::from_secs(30), || async {
        weights().await.0 == Some(3)
    })
    .await;
    assert!(rolled, "{:?}", weights().await);
    let (_, sum, min, max) = weights().await;
    assert!((sum.unwrap() - 38.8).abs() < 1e-9, "{sum:?}");
    assert_eq!((min, max), (Some(12.3), Some(13.5)));
}
