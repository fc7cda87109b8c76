//! A whole local system for end-to-end tests: a fresh database, regions
//! (real `nats-server`s, or Service Bus doubles) registered as namespaces, a
//! group, devices with their keys, and real `georelay` service processes.

use anyhow::{bail, Context as _};
use base64::Engine as _;
use georelay_core::{DeviceId, DeviceKey, Envelope, MasterKey, SealedRecord, NONCE_LEN};
use georelay_store::control::{self, Actor, NewNamespace, TransportKind};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{Georelay, Region, TestDb};

/// The master key every test stack uses (tests only).
pub const TEST_MASTER_KEY: [u8; 32] = [7; 32];

pub fn master_key_b64() -> String {
    base64::engine::general_purpose::STANDARD.encode(TEST_MASTER_KEY)
}

pub fn master_key() -> anyhow::Result<MasterKey> {
    Ok(MasterKey::from_base64(&master_key_b64())?)
}

/// Database, regions (one namespace each, in its own region, priorities 10,
/// 20, 30, …) and one group `g` with queue `telemetry` on the first.
#[derive(Debug)]
pub struct Stack {
    pub db: TestDb,
    pub regions: Vec<Region>,
    /// namespace ids, in region order
    pub namespace_ids: Vec<i64>,
    pub group_id: i64,
}

/// `georelay ingest` flags for tests: faults show within a second or two.
pub const INGEST_TEST_ARGS: &[&str] = &[
    "--publish-deadline",
    "1s",
    "--request-deadline",
    "6s",
    "--lease",
    "2s",
    "--failover-cooldown",
    "2s",
    "--poll-interval",
    "500ms",
    "--servicebus-lock-duration",
    "5s",
];

/// `georelay drain` flags matching [`INGEST_TEST_ARGS`].
pub const DRAIN_TEST_ARGS: &[&str] = &[
    "--publish-deadline",
    "1s",
    "--ingest-lease",
    "2s",
    "--lease",
    "2s",
    "--declare-trouble-after",
    "5s",
    "--failover-cooldown",
    "2s",
    "--servicebus-lock-duration",
    "5s",
];

pub const GROUP: &str = "g";
pub const QUEUE: &str = "telemetry";

impl Stack {
    /// NATS regions named `regions`.
    pub async fn start(regions: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(TransportKind::Nats, regions, |region| Ok(region.url())).await
    }

    /// Regions of `transport` named `regions`, each namespace's endpoint
    /// made by `endpoint` from its region (a fault proxy in front of it).
    /// Endpoints are set before the group exists: the database refuses to
    /// change the endpoint of a namespace that holds undrained epochs.
    pub async fn start_on(
        transport: TransportKind,
        regions: &[&str],
        endpoint: impl FnMut(&Region) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let regions: Vec<(TransportKind, &str)> = regions.iter().map(|r| (transport, *r)).collect();
        Self::start_mixed(&regions, endpoint).await
    }

    /// [`start_on`](Self::start_on) with a broker per region: a trail can
    /// cross from Service Bus to NATS and back.
    pub async fn start_mixed(
        regions: &[(TransportKind, &str)],
        mut endpoint: impl FnMut(&Region) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let db = TestDb::migrated().await?;
        let master = master_key()?;
        let mut started = Vec::new();
        let mut namespace_ids = Vec::new();
        for (i, &(transport, name)) in regions.iter().enumerate() {
            let region = Region::start(transport, name)?;
            let priority = i32::try_from(10 * (i + 1))?;
            let (key_name, key) = region.credentials();
            let id = control::add_namespace(
                db.pool(),
                &master,
                &NewNamespace {
                    name,
                    region: name,
                    transport,
                    endpoint: &endpoint(&region)?,
                    priority,
                    key_name,
                    key: key.map(str::as_bytes),
                },
            )
            .await?;
            started.push(region);
            namespace_ids.push(id);
        }
        let actor = Actor {
            actor: "test".to_owned(),
            reason: None,
        };
        let first = regions.first().context("a stack needs a region")?.1;
        let group_id = control::add_group(db.pool(), GROUP, QUEUE, first, &actor).await?;
        Ok(Self {
            db,
            regions: started,
            namespace_ids,
            group_id,
        })
    }

    /// Registers `id` in the group and returns a client for it.
    pub async fn device(&self, id: &str) -> anyhow::Result<TestDevice> {
        let device = DeviceId::parse(id)?;
        let key = control::add_device(self.db.pool(), &master_key()?, &device, GROUP).await?;
        Ok(TestDevice::new(device, key))
    }

    /// Starts `georelay ingest` on a free port with `args` added.
    pub fn ingest(&self, args: &[&str]) -> anyhow::Result<Service> {
        Service::start(&self.db, "ingest", args)
    }

    /// Starts `georelay drain` (health and metrics on a free port) with
    /// `args` added.
    pub fn drain(&self, args: &[&str]) -> anyhow::Result<Service> {
        Service::start(&self.db, "drain", args)
    }

    /// Runs the ingest service in this process (no binary, no process
    /// boundary) on a free port, for HTTP contract cases; real processes
    /// stay for kill -9 and SIGSTOP.
    pub async fn ingest_in_process(
        &self,
        settings: georelay_ingest::Settings,
    ) -> anyhow::Result<InProcessIngest> {
        let config = georelay_ingest::Config::new(settings)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(georelay_ingest::run(
            config,
            self.db.pool().clone(),
            master_key()?,
            listener,
            shutdown.clone(),
        ));
        Ok(InProcessIngest {
            addr,
            shutdown,
            task,
        })
    }

    /// Moves the senders by raw SQL, as an SRE would.
    pub async fn move_senders(&self, to_region: usize) -> anyhow::Result<()> {
        sqlx::query("UPDATE routing_groups SET sender_namespace_id = $1 WHERE id = $2")
            .bind(self.namespace_ids[to_region])
            .bind(self.group_id)
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    /// The group's current `(epoch, sender namespace id)`.
    pub async fn senders(&self) -> anyhow::Result<(i64, i64)> {
        Ok(
            sqlx::query_as("SELECT epoch, sender_namespace_id FROM routing_groups WHERE id = $1")
                .bind(self.group_id)
                .fetch_one(self.db.pool())
                .await?,
        )
    }
}

/// The ingest service running in this process; stopped on drop.
#[derive(Debug)]
pub struct InProcessIngest {
    addr: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), georelay_ingest::IngestError>>,
}

impl InProcessIngest {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it as SIGTERM would and returns how `run` ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        (&mut self.task).await??;
        Ok(())
    }
}

impl Drop for InProcessIngest {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A running `georelay` service process (ingest or drain), killed on drop.
#[derive(Debug)]
pub struct Service {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Service {
    /// Runs `georelay <command> --listen 127.0.0.1:0 <args>` and waits for its
    /// "listening on ADDR" line.
    pub fn start(db: &TestDb, command: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_at(db, command, "127.0.0.1:0", args)
    }

    /// [`start`](Self::start) on a given address (a restart on the same port).
    pub fn start_at(
        db: &TestDb,
        command: &str,
        listen: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_env(db, command, listen, args, &[])
    }

    /// [`start_at`](Self::start_at) with extra environment (`DATABASE_URL`
    /// through a fault proxy, say).
    pub fn start_env(
        db: &TestDb,
        command: &str,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_with(&Georelay::for_tests()?, db, command, listen, args, env)
    }

    /// [`start_env`](Self::start_env) with a given binary and log filter.
    pub fn start_with(
        georelay: &Georelay,
        db: &TestDb,
        command: &str,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = georelay
            .command(db)
            .env("GEORELAY_MASTER_KEY", master_key_b64())
            .env("RUST_LOG", &georelay.log)
            .envs(env.iter().copied())
            .args([command, "--listen", listen])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start georelay {command}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep reading so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                bail!("georelay {command} did not print its address within 30 s");
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("unexpected first line from georelay {command}: {line:?}"))?;
        Ok(Self {
            child: Some(child),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        metrics_text(&self.url()).await
    }

    /// The process id, while it runs (benchmarks read its CPU and memory).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for a clean exit; returns its success.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        let mut child = self.child.take().context("not running")?;
        kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGTERM)?;
        Ok(child.wait()?.success())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plug computer in a test: seals records under its key with a nonce
/// derived from the seq (never repeated) and posts them.
#[derive(Debug, Clone)]
pub struct TestDevice {
    pub id: DeviceId,
    pub key: DeviceKey,
}

impl TestDevice {
    pub fn new(id: DeviceId, key: DeviceKey) -> Self {
        Self { id, key }
    }

    /// The record for `seq` with plaintext `payload` (sealed fresh each call;
    /// the nonce is the seq, so sealing the same seq twice gives the same
    /// bytes).
    pub fn seal(&self, seq: u64, payload: &serde_json::Value) -> SealedRecord {
        self.seal_text(seq, &payload.to_string())
    }

    /// [`seal`](Self::seal) of a plaintext exactly as given.
    pub fn seal_text(&self, seq: u64, plaintext: &str) -> SealedRecord {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[4..].copy_from_slice(&seq.to_be_bytes());
        // seq comes from the test; a failure here is a bug in the test.
        SealedRecord::seal(&self.key, &self.id, seq, nonce, plaintext.as_bytes())
            .unwrap_or_else(|e| panic!("cannot seal seq {seq}: {e}"))
    }

    /// The queue envelope ingest would publish for `seq` under `epoch`.
    pub fn envelope(&self, seq: u64, epoch: u64) -> Envelope {
        Envelope {
            epoch,
            received_at_micros: now_micros(),
            device: self.id.clone(),
            record: self.seal(
                seq,
                &serde_json::json!({"seq": seq, "reading": seq as f64 / 10.0}),
            ),
        }
    }

    /// The JSON body for `seq`.
    pub fn body(&self, seq: u64) -> serde_json::Value {
        let body = self
            .seal(
                seq,
                &serde_json::json!({"seq": seq, "reading": seq as f64 / 10.0}),
            )
            .to_body();
        serde_json::json!({"seq": body.seq, "nonce": body.nonce, "ciphertext": body.ciphertext})
    }

    pub fn url(&self, base: &str) -> String {
        format!("{base}/v1/devices/{}/telemetry", self.id)
    }

    /// POSTs record `seq`; returns the status and the JSON answer.
    pub async fn post(
        &self,
        http: &reqwest::Client,
        base: &str,
        seq: u64,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = http
            .post(self.url(base))
            .json(&self.body(seq))
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// POSTs each record of `seqs` until it is accepted (202), retrying
    /// every 100 ms through a failover; an error if one never is (10 s).
    pub async fn post_until_accepted(
        &self,
        base: &str,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        for seq in seqs {
            let mut last = None;
            for _ in 0..100 {
                match self.post(&http, base, seq).await {
                    Ok((202, _)) => {
                        last = None;
                        break;
                    }
                    other => last = Some(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Some(last) = last {
                bail!("record {seq} of {} was never accepted: {last}", self.id);
            }
        }
        Ok(())
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The Prometheus text a service serves at `{base}/metrics`.
pub async fn metrics_text(base: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("{base}/metrics"))
        .await?
        .error_for_status()?
        .text()
        .await?)
}
