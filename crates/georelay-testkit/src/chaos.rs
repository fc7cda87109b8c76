//! Chaos drills: a whole system on this machine — three regions behind fault
//! proxies, PostgreSQL behind one too, two ingest instances, two drain
//! workers (one standing by), a simulated fleet with a ledger — a fault
//! injected and healed on a schedule drawn from the seed, then the invariant
//! checker. The chaos tests and `georelay chaos drill` both run [`drill`].

use anyhow::{bail, Context as _};
use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::checker::{self, Report};
use crate::{
    Fault, FaultProxy, Georelay, Region, Service, Stack, DRAIN_TEST_ARGS, INGEST_TEST_ARGS, QUEUE,
};
use georelay_core::TransportKind;

/// A drill's fault. Its kebab-case name (`kill-primary`) is what
/// `georelay chaos drill --scenario` takes and the report prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Scenario {
    /// kill -9 the primary region
    KillPrimary,
    /// SIGSTOP the primary region (hung, not down)
    HangPrimary,
    /// add latency until the primary is degraded
    SlowPrimary,
    /// blackhole the primary (connections accepted, nothing answered)
    BlackholePrimary,
    /// the primary goes down, up, down, up
    FlapPrimary,
    /// kill the primary, then the secondary: one region left
    KillTwo,
    /// every region down for a while, then back (devices buffer)
    AllDown,
    /// kill -9 an ingest instance mid-request
    KillIngest,
    /// kill -9 the active drain worker mid-batch
    KillWorker,
    /// PostgreSQL unreachable (every connection reset) for a while
    DatabaseOutage,
    /// PostgreSQL hangs (a partition: nothing answers) for a while
    DatabaseHang,
    /// an SRE's planned failover and failback by raw SQL
    PlannedFailover,
    /// kill -9 the primary with records the worker had not read and delete
    /// its store: lost for good; an SRE abandons its epoch, the agents send
    /// those records again
    RegionLost,
    /// as region-lost, but its store survives: it comes back after its
    /// epoch was abandoned, with the old copies in its queue
    RegionReturns,
}

impl Scenario {
    /// The scenario's name, as `--scenario` takes it.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map_or_else(|| format!("{self:?}"), |v| v.get_name().to_owned())
    }

    /// Whether the senders are expected to leave the primary.
    fn moves_senders(self) -> bool {
        matches!(
            self,
            Self::KillPrimary
                | Self::HangPrimary
                | Self::SlowPrimary
                | Self::BlackholePrimary
                | Self::FlapPrimary
                | Self::KillTwo
                | Self::PlannedFailover
                | Self::RegionLost
                | Self::RegionReturns
        )
    }

    /// Whether an SRE gives up on the primary's epochs.
    fn abandons(self) -> bool {
        matches!(self, Self::RegionLost | Self::RegionReturns)
    }
}

#[derive(Debug, Clone)]
pub struct DrillConfig {
    pub scenario: Scenario,
    /// The broker every region runs: NATS, or Service Bus (the double).
    pub transport: TransportKind,
    pub seed: u64,
    /// How long the fleet sends; the fault falls inside it.
    pub duration: Duration,
    pub devices: usize,
    /// Readings per second per device.
    pub rate: f64,
    /// The binary whose processes the drill starts, and their log filter.
    pub georelay: Georelay,
}

/// One line of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at_ms: u64,
    pub what: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub scenario: Scenario,
    /// `nats` or `servicebus`.
    pub transport: String,
    pub seed: u64,
    pub timeline: Vec<Event>,
    pub produced: u64,
    pub checker: Report,
    /// Fault to the first 202 from another namespace.
    pub detection_ms: Option<u64>,
    /// Fault to the worker following the senders to their last namespace.
    pub drain_and_follow_ms: Option<u64>,
    /// Devices that had records stranded in an abandoned epoch.
    pub gaps: Vec<GapReport>,
    /// Drain lag (received to stored) of the devices with nothing stranded,
    /// for records received after the abandonment: `(p99 ms, max ms)`.
    pub unstranded_lag_ms: Option<(f64, f64)>,
    /// The most that lag may be ([`unstranded_lag_limit_ms`]).
    pub unstranded_lag_limit_ms: f64,
    pub pass: bool,
}

/// One device's records stranded in an abandoned epoch.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct GapReport {
    pub device: String,
    pub epoch: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    /// `filled` (sent again and stored), `released`, or `open`.
    pub how: String,
    /// From the abandonment until it closed.
    pub filled_after_ms: Option<f64>,
}

/// The most drain lag devices with nothing stranded may see after an
/// abandonment: they are not held back at all — 1 s. On Service Bus the
/// worker, reading the senders' namespace for the first time, first waits
/// out the queue's lock duration (a crashed reader's locks would otherwise
/// let it read past messages: a reorder); that wait comes on top.
pub fn unstranded_lag_limit_ms(transport: TransportKind) -> f64 {
    let first_read = match transport {
        TransportKind::Nats => 0.0,
        TransportKind::ServiceBus => DRAIN_TEST_ARGS
            .windows(2)
            .find(|w| w[0] == "--servicebus-lock-duration")
            .and_then(|w| w[1].strip_suffix('s')?.parse::<f64>().ok())
            .map_or(30_000.0, |s| s * 1000.0),
    };
    1000.0 + first_read
}

impl DrillReport {
    /// The report a person reads at a glance.
    pub fn render(&self) -> String {
        let c = &self.checker;
        let mut out = format!(
            "drill {} on {} (seed {})\n\ntimeline\n",
            self.scenario.name(),
            self.transport,
            self.seed
        );
        for e in &self.timeline {
            out.push_str(&format!(
                "  {:>8.3} s  {}\n",
                e.at_ms as f64 / 1000.0,
                e.what
            ));
        }
        out.push_str(&format!(
            "\ncounts\n  produced {}  accepted {}  stored {}  lost {}  duplicated {}  reordered {}  stranded epochs {}  stranded messages {}\n",
            self.produced, c.accepted, c.stored, c.lost, c.duplicated, c.reordered, c.stranded_epochs, c.stranded_messages
        ));
        let ms =
            |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("{:.3} s", v as f64 / 1000.0));
        out.push_str(&format!(
            "\ntimes\n  detection (fault to first 202 elsewhere)  {}\n  drain and follow (fault to worker on the senders' namespace)  {}\n",
            ms(self.detection_ms),
            ms(self.drain_and_follow_ms)
        ));
        if self.scenario.abandons() {
            out.push_str("\nstranded in the abandoned epoch\n");
            if self.gaps.is_empty() {
                out.push_str("  (no device had records there the worker had not stored)\n");
            }
            for g in &self.gaps {
                out.push_str(&format!(
                    "  {}  epoch {}  seqs {}..={}  {}{}\n",
                    g.device,
                    g.epoch,
                    g.first_seq,
                    g.last_seq,
                    g.how,
                    g.filled_after_ms
                        .map_or(String::new(), |ms| format!(" after {:.3} s", ms / 1000.0))
                ));
            }
            out.push_str(&match self.unstranded_lag_ms {
                Some((p99, max)) => format!(
                    "  devices with nothing stranded, records received after the abandonment: drain lag p99 {p99:.0} ms, max {max:.0} ms (limit {:.0} ms)\n",
                    self.unstranded_lag_limit_ms
                ),
                None => "  devices with nothing stranded: no records received after the abandonment\n".to_owned(),
            });
        }
        for e in &c.examples {
            out.push_str(&format!("  ! {e}\n"));
        }
        out.push_str(if self.pass { "\nPASS\n" } else { "\nFAIL\n" });
        out
    }
}

/// Fields drop in order: the processes first, then the proxies, then the
/// regions and the database they were using.
struct System {
    ingest: Vec<Service>,
    drain: Vec<Service>,
    proxies: Vec<FaultProxy>,
    db_proxy: FaultProxy,
    db_url: String,
    stack: Stack,
    started: Instant,
    timeline: Vec<Event>,
    georelay: Georelay,
    /// Regions lost for good: their queues are not looked at.
    lost: Vec<usize>,
    /// The two simulator processes (half the devices each).
    fleet_pids: Vec<u32>,
    /// When an SRE abandoned the primary's epochs (unix ms).
    abandoned_at_ms: Option<u64>,
}

impl System {
    fn mark(&mut self, what: impl Into<String>) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        self.timeline.push(Event {
            at_ms,
            what: what.into(),
        });
    }

    fn start_ingest(&self, listen: &str) -> anyhow::Result<Service> {
        Service::start_with(
            &self.georelay,
            &self.stack.db,
            "ingest",
            listen,
            INGEST_TEST_ARGS,
            &[("DATABASE_URL", &self.db_url)],
        )
    }

    fn start_drain(&self) -> anyhow::Result<Service> {
        Service::start_with(
            &self.georelay,
            &self.stack.db,
            "drain",
            "127.0.0.1:0",
            DRAIN_TEST_ARGS,
            &[("DATABASE_URL", &self.db_url)],
        )
    }
}

/// Runs one drill and checks the invariants.
pub async fn drill(config: &DrillConfig) -> anyhow::Result<DrillReport> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    // Namespaces point at proxies in front of the regions.
    let mut proxies = Vec::new();
    let regions = ["eu-west", "eu-north", "us-east"];
    let stack = Stack::start_on(config.transport, &regions, |region| {
        let proxy = FaultProxy::start(([127, 0, 0, 1], region.port()).into())?;
        let endpoint = region.url_via(proxy.addr());
        proxies.push(proxy);
        Ok(endpoint)
    })
    .await?;
    // The services reach PostgreSQL through a proxy too.
    let mut url = url::Url::parse(stack.db.url())?;
    let pg: std::net::SocketAddr = format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    )
    .parse()
    .context("the test database host must be an IP address")?;
    let db_proxy = FaultProxy::start(pg)?;
    url.set_port(Some(db_proxy.addr().port())).ok();
    let db_url = url.to_string();

    let keys = tempdir("keys")?;
    for i in 0..config.devices {
        let d = stack.device(&format!("chaos-{i:03}")).await?;
        std::fs::write(
            keys.join(format!("{}.key", d.id)),
            d.key.to_base64().as_bytes(),
        )?;
    }
    let mut sys = System {
        stack,
        proxies,
        db_proxy,
        db_url,
        ingest: Vec::new(),
        drain: Vec::new(),
        started: Instant::now(),
        timeline: Vec::new(),
        georelay: config.georelay.clone(),
        lost: Vec::new(),
        fleet_pids: Vec::new(),
        abandoned_at_ms: None,
    };
    for _ in 0..2 {
        let s = sys.start_ingest("127.0.0.1:0")?;
        sys.ingest.push(s);
        let d = sys.start_drain()?;
        sys.drain.push(d);
    }
    sys.started = Instant::now();
    sys.mark(format!(
        "fleet starts: {} devices at {}/s for {:?}",
        config.devices, config.rate, config.duration
    ));
    let ledger = keys.join("ledger.jsonl");
    let fleet = start_fleet(&sys, &keys, &ledger, config)?;
    sys.fleet_pids = fleet.iter().map(Child::id).collect();

    let d = config.duration.as_secs_f64();
    let fault_at = Duration::from_secs_f64(d * rng.gen_range(0.2..0.3));
    let heal_at = fault_at + Duration::from_secs_f64(d * rng.gen_range(0.3..0.4));
    tokio::time::sleep(fault_at).await;
    let mut fault_ms = sys.started.elapsed().as_millis() as u64;
    if let Some(at) = inject(&mut sys, config.scenario, heal_at - fault_at).await? {
        fault_ms = at;
    }
    let now = sys.started.elapsed();
    if now < heal_at {
        tokio::time::sleep(heal_at - now).await;
    }
    heal(&mut sys, config.scenario).await?;

    let mut produced = 0;
    for child in fleet {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output_text()).await??;
        produced += out
            .split_whitespace()
            .skip_while(|w| *w != "produced")
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    sys.mark("fleet done");

    // Wait for the drain: everything accepted stored, the trail drained up
    // to the senders, the queues empty.
    let accepted = checker::read_ledger(&ledger)?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let report = loop {
        let depths = depths(&sys.stack.regions, &sys.lost).await;
        let history = checker::gather(sys.stack.db.pool(), accepted.clone(), depths).await?;
        let report = checker::check(&history);
        let open_gaps: i64 =
            sqlx::query_scalar("SELECT count(*) FROM device_gaps WHERE closed_at IS NULL")
                .fetch_one(sys.stack.db.pool())
                .await?;
        if (report.ok() && open_gaps == 0) || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    sys.mark("drained; invariants checked");

    // Timeline from the audit trail, and the two times.
    // (at ms, kind, actor, from, to, epoch)
    type AuditRow = (f64, String, String, Option<String>, Option<String>, i64);
    let events: Vec<AuditRow> = sqlx::query_as(
        "SELECT extract(epoch FROM e.at)::float8 * 1000, e.kind, e.actor, f.name, t.name, e.epoch
         FROM failover_events e LEFT JOIN namespaces f ON f.id = e.from_namespace_id
         LEFT JOIN namespaces t ON t.id = e.to_namespace_id
         WHERE e.kind <> 'group_created' ORDER BY e.id",
    )
    .fetch_all(sys.stack.db.pool())
    .await?;
    let wall_start = now_ms().saturating_sub(sys.started.elapsed().as_millis() as u64);
    for (at, kind, actor, from, to, epoch) in &events {
        let at_ms = (*at as u64).saturating_sub(wall_start);
        let what = format!(
            "{kind}: {} -> {} (epoch {epoch}) by {actor}",
            from.as_deref().unwrap_or("-"),
            to.as_deref().unwrap_or("-")
        );
        sys.timeline.push(Event { at_ms, what });
    }
    sys.timeline.sort_by_key(|e| e.at_ms);
    let fault_wall = wall_start + fault_ms;
    let detection_ms = accepted
        .iter()
        .filter(|a| a.at_ms >= fault_wall && a.namespace != "eu-west")
        .map(|a| a.at_ms - fault_wall)
        .min();
    let drain_and_follow_ms = events
        .iter()
        .filter(|e| e.1 == "drain_followed")
        .map(|e| e.0 as u64)
        .max()
        .map(|at| at.saturating_sub(fault_wall));
    let mut pass = report.ok() && report.accepted > 0;
    if config.scenario.moves_senders() && detection_ms.is_none() {
        pass = false;
    }
    let (gaps, unstranded_lag_ms) = match sys.abandoned_at_ms {
        Some(at) => stranded(sys.stack.db.pool(), at).await?,
        None => (Vec::new(), None),
    };
    let unstranded_lag_limit_ms = unstranded_lag_limit_ms(config.transport);
    if config.scenario.abandons() {
        // Every stranded range came back (the agents had them), and the
        // devices with nothing stranded were not held back.
        pass &= sys.abandoned_at_ms.is_some()
            && gaps.iter().all(|g| g.how == "filled")
            && unstranded_lag_ms.is_some_and(|(_, max)| max < unstranded_lag_limit_ms);
    }
    let _ = std::fs::remove_dir_all(&keys);
    Ok(DrillReport {
        scenario: config.scenario,
        transport: config.transport.to_string(),
        seed: config.seed,
        timeline: sys.timeline,
        produced,
        checker: report,
        detection_ms: if config.scenario.moves_senders() {
            detection_ms
        } else {
            None
        },
        drain_and_follow_ms,
        gaps,
        unstranded_lag_ms,
        unstranded_lag_limit_ms,
        pass,
    })
}

/// The gaps an abandonment opened, and the drain lag of the devices that
/// had none, for records received after `abandoned_at_ms`.
async fn stranded(
    pool: &sqlx::PgPool,
    abandoned_at_ms: u64,
) -> anyhow::Result<(Vec<GapReport>, Option<(f64, f64)>)> {
    let gaps: Vec<GapReport> = sqlx::query_as(
        "SELECT device_id AS device, epoch, after_seq + 1 AS first_seq, through_seq AS last_seq,
                coalesce(closed_how, 'open') AS how,
                (extract(epoch FROM closed_at - opened_at) * 1000)::float8 AS filled_after_ms
         FROM device_gaps ORDER BY device_id, epoch",
    )
    .fetch_all(pool)
    .await?;
    let lag: (Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), max(ms) FROM (
             SELECT (extract(epoch FROM t.stored_at - t.received_at) * 1000)::float8 AS ms
             FROM telemetry t
             WHERE t.received_at >= to_timestamp($1::float8 / 1000)
               AND NOT EXISTS (SELECT 1 FROM device_gaps g WHERE g.device_id = t.device_id)) l",
    )
    .bind(abandoned_at_ms as f64)
    .fetch_one(pool)
    .await?;
    Ok((gaps, lag.0.zip(lag.1)))
}

/// An SRE gives up on region `index` for good: `admin trail abandon` for
/// each of its epochs the senders left (waiting for them to leave, and for
/// ingest to report what it acknowledged there).
async fn abandon_region(sys: &mut System, index: usize) -> anyhow::Result<()> {
    let name = sys.stack.regions[index].name().to_owned();
    let pool = sys.stack.db.pool().clone();
    let actor = georelay_store::control::Actor {
        actor: "chaos:sre".to_owned(),
        reason: Some(format!("{name} lost for good")),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let epochs: Vec<(String, i64)> = sqlx::query_as(
            "SELECT g.name, t.epoch FROM routing_trail t
             JOIN namespaces n ON n.id = t.namespace_id JOIN routing_groups g ON g.id = t.group_id
             WHERE n.name = $1 AND t.drained_at IS NULL AND t.epoch < g.epoch
             ORDER BY t.epoch",
        )
        .bind(&name)
        .fetch_all(&pool)
        .await?;
        let current: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM routing_groups g JOIN namespaces n ON n.id = g.sender_namespace_id
                            WHERE n.name = $1)",
        )
        .bind(&name)
        .fetch_one(&pool)
        .await?;
        let mut waiting = current;
        for (group, epoch) in epochs {
            match georelay_store::control::abandon_epoch(&pool, &group, epoch, &actor).await {
                Ok(done) => {
                    sys.abandoned_at_ms.get_or_insert_with(now_ms);
                    sys.mark(format!(
                        "SRE: admin trail abandon --group {group} --epoch {epoch} ({name} lost for good): {} devices wait for records stranded there",
                        done.gaps
                    ));
                }
                Err(georelay_store::StoreError::NotYet(_)) => waiting = true,
                Err(e) => return Err(e.into()),
            }
        }
        if !waiting {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the senders did not leave {name}, or ingest kept acknowledging its epoch, for 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to 20 s) until the worker has stored a record received after
/// now: it reads the queue in order, so everything before it is stored.
async fn caught_up(sys: &System) -> anyhow::Result<()> {
    let pool = sys.stack.db.pool();
    let now: f64 = sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
        .fetch_one(pool)
        .await?;
    let ok = crate::wait_until(Duration::from_secs(20), || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT coalesce(max(received_at) > to_timestamp($1), false) FROM telemetry",
        )
        .bind(now)
        .fetch_one(pool)
        .await
        .unwrap_or(false)
    })
    .await;
    anyhow::ensure!(ok, "the worker did not catch up within 20 s");
    Ok(())
}

/// SIGSTOP (`true`) or SIGCONT processes.
fn freeze(pids: impl IntoIterator<Item = u32>, stop: bool) -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    let signal = if stop {
        Signal::SIGSTOP
    } else {
        Signal::SIGCONT
    };
    for pid in pids {
        kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)?;
    }
    Ok(())
}

/// Two simulator processes, half the devices each, each preferring another
/// ingest instance.
fn start_fleet(
    sys: &System,
    keys: &std::path::Path,
    ledger: &std::path::Path,
    config: &DrillConfig,
) -> anyhow::Result<Vec<Child>> {
    let (a, b) = (sys.ingest[0].url(), sys.ingest[1].url());
    let mut children = Vec::new();
    let all: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(keys)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "key"))
            .collect();
        v.sort();
        v
    };
    for (half, urls) in [(0, format!("{a},{b}")), (1, format!("{b},{a}"))] {
        let dir = keys.join(format!("fleet-{half}"));
        std::fs::create_dir_all(&dir)?;
        for (i, k) in all.iter().enumerate() {
            if i % 2 == half {
                if let Some(name) = k.file_name() {
                    std::fs::copy(k, dir.join(name))?;
                }
            }
        }
        let child = std::process::Command::new(&config.georelay.bin)
            .env_remove("RUST_LOG")
            .env("RUST_LOG", "error")
            .args(["agent", "simulate", "--url", &urls])
            .arg("--keys-dir")
            .arg(&dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--ledger")
            .arg(ledger)
            .args(["--rate", &config.rate.to_string()])
            .args(["--duration", &format!("{}ms", config.duration.as_millis())])
            .args(["--settle", "60s", "--max-backoff", "2s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the simulated fleet")?;
        children.push(child);
    }
    Ok(children)
}

trait WaitText {
    fn wait_with_output_text(self) -> anyhow::Result<String>;
}

impl WaitText for Child {
    fn wait_with_output_text(self) -> anyhow::Result<String> {
        let out = self.wait_with_output()?;
        if !out.status.success() {
            bail!("the simulated fleet failed: {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Injects the fault; `Some(ms)`: it struck that long after the start, not
/// when `inject` was called (it set the scene first).
async fn inject(
    sys: &mut System,
    scenario: Scenario,
    window: Duration,
) -> anyhow::Result<Option<u64>> {
    match scenario {
        Scenario::KillPrimary => {
            sys.stack.regions[0].kill();
            sys.mark("fault: kill -9 eu-west");
        }
        Scenario::HangPrimary => {
            sys.stack.regions[0].pause()?;
            sys.mark("fault: SIGSTOP eu-west");
        }
        Scenario::SlowPrimary => {
            sys.proxies[0].set(Fault::Latency {
                latency: Duration::from_millis(800),
                jitter: Duration::from_millis(100),
            });
            sys.mark("fault: eu-west answers 800 ms ± 100 ms late");
        }
        Scenario::BlackholePrimary => {
            sys.proxies[0].set(Fault::Blackhole);
            sys.mark("fault: eu-west blackholed");
        }
        Scenario::FlapPrimary => {
            let step = window / 3;
            sys.stack.regions[0].kill();
            sys.mark("fault: kill -9 eu-west");
            tokio::time::sleep(step).await;
            sys.stack.regions[0].restart()?;
            sys.mark("eu-west back");
            tokio::time::sleep(step).await;
            sys.stack.regions[0].kill();
            sys.mark("fault: kill -9 eu-west again");
        }
        Scenario::KillTwo => {
            sys.stack.regions[0].kill();
            sys.mark("fault: kill -9 eu-west");
            tokio::time::sleep(window / 3).await;
            sys.stack.regions[1].kill();
            sys.mark("fault: kill -9 eu-north");
        }
        Scenario::AllDown => {
            for r in &mut sys.stack.regions {
                r.kill();
            }
            sys.mark("fault: kill -9 every region");
        }
        Scenario::KillIngest => {
            sys.ingest[0].kill();
            sys.mark("fault: kill -9 ingest #1");
        }
        Scenario::KillWorker => {
            let holder = active_worker(sys).await;
            sys.drain[holder].kill();
            sys.mark(format!(
                "fault: kill -9 the active drain worker (#{})",
                holder + 1
            ));
        }
        Scenario::DatabaseOutage => {
            sys.db_proxy.set(Fault::Reset);
            sys.mark("fault: PostgreSQL unreachable (connections reset)");
        }
        Scenario::DatabaseHang => {
            sys.db_proxy.set(Fault::Blackhole);
            sys.mark("fault: PostgreSQL hangs (nothing answers)");
        }
        Scenario::PlannedFailover => {
            sys.stack.move_senders(1).await?;
            sys.mark("SRE: UPDATE routing_groups SET sender_namespace_id = eu-north");
        }
        Scenario::RegionLost | Scenario::RegionReturns => {
            // Half the fleet is quiet when it happens (their records in
            // eu-west are stored); the workers are a moment behind, as under
            // any load: eu-west holds acknowledged records of the other half
            // they have not read when it goes.
            let quiet = sys.fleet_pids[1];
            let drains: Vec<u32> = sys.drain.iter().filter_map(Service::pid).collect();
            caught_up(sys).await?;
            freeze([quiet], true)?;
            sys.mark("half the fleet goes quiet (SIGSTOP)");
            caught_up(sys).await?;
            freeze(drains.iter().copied(), true)?;
            sys.mark("the drain workers fall behind (SIGSTOP)");
            tokio::time::sleep(Duration::from_millis(800)).await;
            let lost = if scenario == Scenario::RegionLost {
                sys.stack.regions[0].lose()?;
                "fault: kill -9 eu-west and delete its store (lost for good)"
            } else {
                sys.stack.regions[0].kill();
                "fault: kill -9 eu-west (its store survives)"
            };
            sys.mark(lost);
            let struck = sys.started.elapsed().as_millis() as u64;
            freeze(drains, false)?;
            freeze([quiet], false)?;
            sys.mark("the drain workers and the quiet half go on (SIGCONT)");
            return Ok(Some(struck));
        }
    }
    Ok(None)
}

async fn heal(sys: &mut System, scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::KillPrimary | Scenario::FlapPrimary => sys.stack.regions[0].restart()?,
        Scenario::HangPrimary => sys.stack.regions[0].resume()?,
        Scenario::SlowPrimary | Scenario::BlackholePrimary => sys.proxies[0].set(Fault::None),
        Scenario::KillTwo => {
            sys.stack.regions[0].restart()?;
            sys.stack.regions[1].restart()?;
        }
        Scenario::AllDown => {
            for r in &mut sys.stack.regions {
                r.restart()?;
            }
        }
        Scenario::KillIngest => {
            let addr = sys.ingest[0].addr().to_string();
            sys.ingest[0] = sys.start_ingest(&addr)?;
        }
        Scenario::KillWorker => {
            let again = sys.start_drain()?;
            sys.drain.push(again);
        }
        Scenario::DatabaseOutage | Scenario::DatabaseHang => sys.db_proxy.set(Fault::None),
        Scenario::PlannedFailover => {
            sys.stack.move_senders(0).await?;
            sys.mark("SRE: failback to eu-west");
            return Ok(());
        }
        Scenario::RegionLost => {
            abandon_region(sys, 0).await?;
            sys.lost.push(0);
            return Ok(());
        }
        Scenario::RegionReturns => {
            abandon_region(sys, 0).await?;
            sys.stack.regions[0].restart()?;
            sys.mark("eu-west back after its epoch was abandoned, its old queue with it");
            return Ok(());
        }
    }
    sys.mark("healed");
    Ok(())
}

/// Index of the drain worker holding the lease (the first if none says so).
async fn active_worker(sys: &System) -> usize {
    for (i, d) in sys.drain.iter().enumerate() {
        let Ok(text) = d.metrics().await else {
            continue;
        };
        if text
            .lines()
            .any(|l| l.starts_with("georelay_drain_lease_held") && l.ends_with(" 1"))
        {
            return i;
        }
    }
    0
}

/// What each region's queue still holds, and (Service Bus) what the broker
/// itself dead-lettered: both count as stranded. Regions in `lost` are gone
/// for good: nothing is asked of them.
async fn depths(regions: &[Region], lost: &[usize]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        if lost.contains(&i) {
            continue;
        }
        let dead = r.dead_lettered(QUEUE);
        if dead > 0 {
            out.push((format!("{} $DeadLetterQueue", r.name()), dead as u64));
        }
        let ns = georelay_transport::Namespace::connect(
            &r.triplet(),
            georelay_transport::Limits::default(),
        )
        .await;
        let depth = match ns {
            Ok(ns) if ns.wait_connected(Duration::from_secs(2)).await => {
                match ns.depth(QUEUE).await {
                    Ok(d) => d,
                    // No such queue: the region never got it.
                    Err(e) if e.kind() == georelay_transport::ErrorKind::Rejected => 0,
                    Err(_) => {
                        out.push((format!("{} (unreadable)", r.name()), 1));
                        continue;
                    }
                }
            }
            _ => {
                out.push((format!("{} (unreachable)", r.name()), 1));
                continue;
            }
        };
        out.push((r.name().to_owned(), depth));
    }
    out
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn tempdir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "georelay-chaos-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
