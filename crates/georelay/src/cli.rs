//! The command line, as docs/DESIGN.md's external contract gives it.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "georelay",
    version,
    about = "Multi-region failover ingestion backend"
)]
#[command(
    after_help = "Environment: DATABASE_URL (postgres://…), GEORELAY_MASTER_KEY (base64 of 32 bytes), RUST_LOG"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply database migrations (safe to run again)
    Migrate,
    /// Manage namespaces, groups and devices; move senders; show status
    #[command(subcommand)]
    Admin(Admin),
    /// Serve the ingest HTTP API (records in, regional queues out)
    Ingest(IngestArgs),
    /// Run the drain worker (regional queues in, PostgreSQL out, in order)
    Drain(DrainArgs),
    /// Run the rollup worker: tumbling-window aggregates (count, sum, min,
    /// max) of stored telemetry in telemetry_rollups, exactly once
    Rollup(RollupArgs),
    /// Serve the SRE console: groups, namespaces, processes, events and
    /// devices, live in a browser; actions after signing in with
    /// GEORELAY_CONSOLE_TOKEN (read-only without it)
    Console(ConsoleArgs),
    /// The plug computer side: the agent, and a fleet simulator
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Chaos drills: prove the invariants hold through a region outage
    /// (built with the `chaos` feature, as `./dev` builds; not in the image)
    #[cfg(feature = "chaos")]
    #[command(subcommand)]
    Chaos(ChaosCmd),
}

#[cfg(feature = "chaos")]
#[derive(Debug, Subcommand)]
pub enum ChaosCmd {
    /// Run one drill on a throwaway system of its own (a fresh database on
    /// DATABASE_URL's server, three local regions, two ingest, two drain, a
    /// fleet); print the timeline, counts, times and PASS/FAIL
    Drill(DrillArgs),
}

#[cfg(feature = "chaos")]
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// The fault to inject
    #[arg(long, value_enum)]
    pub scenario: georelay_testkit::chaos::Scenario,
    /// The broker every region runs (servicebus: the local contract double)
    #[arg(long, value_enum, default_value = "nats")]
    pub transport: TransportArg,
    /// Reproduces the fault schedule (default: from the clock, printed)
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long the fleet sends; the fault falls inside it
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 8)]
    pub devices: usize,
    /// Readings per second per device
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// The report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Seal readings (JSON objects, one per line) from stdin and/or a watched
    /// folder, buffer them on disk, deliver them in order
    Run(AgentRunArgs),
    /// A fleet of simulated devices sending at a fixed rate, with a ledger of every 202
    Simulate(SimulateArgs),
    /// Put the records the server refused (set aside in the buffer) back in
    /// line, to be sent again under their own seqs: after fixing what made
    /// the server refuse them
    Requeue(AgentRequeueArgs),
    /// A simulated Teltonika tracker (Codec 8 over TCP): a reading at
    /// `--rate` a second, each packet sent again until acknowledged
    SimulateTracker(SimulateTrackerArgs),
}

#[derive(Debug, Args)]
pub struct SimulateTrackerArgs {
    /// The ingest's --listen-teltonika address (HOST:PORT)
    #[arg(long)]
    pub addr: String,
    /// The tracker's IMEI: a registered device id
    #[arg(long)]
    pub imei: String,
    /// Readings a second
    #[arg(long, default_value_t = 1.0, value_parser = rate)]
    pub rate: f64,
    /// Records per packet
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=50))]
    pub records_per_packet: u8,
    /// Stop after this long (default: until stopped)
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
}

/// An agent's state directory.
#[derive(Debug, Args)]
pub struct StateDirArg {
    /// Where the sequence counter and the offline buffer live
    #[arg(
        long,
        env = "GEORELAY_STATE_DIR",
        default_value = "/var/lib/georelay-agent"
    )]
    pub state_dir: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct AgentRequeueArgs {
    #[command(flatten)]
    pub state: StateDirArg,
    /// Only this device's buffer (default: every buffer in the directory)
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentRunArgs {
    /// This device's id
    #[arg(long, env = "GEORELAY_DEVICE_ID")]
    pub device: String,
    /// File holding the device key (base64). Or set GEORELAY_DEVICE_KEY; never on the command line
    #[arg(long, env = "GEORELAY_DEVICE_KEY_FILE")]
    pub key_file: Option<std::path::PathBuf>,
    /// Ingest base URL; repeat (or comma-separate) for fallbacks
    #[arg(
        long = "url",
        env = "GEORELAY_URL",
        value_delimiter = ',',
        required = true
    )]
    pub urls: Vec<String>,
    #[command(flatten)]
    pub state: StateDirArg,
    /// Read readings from standard input
    #[arg(long)]
    pub stdin: bool,
    /// Take readings from files dropped into this folder
    #[arg(long, env = "GEORELAY_WATCH_DIR")]
    pub watch: Option<std::path::PathBuf>,
    /// Accept local devices' lines (`Type:Value,SensorId`) over TCP on this
    /// address; each is answered `OK <seq>` once buffered (the address is printed)
    #[arg(long, env = "GEORELAY_LISTEN_LINES")]
    pub listen_lines: Option<String>,
    /// Most local devices connected at once
    #[arg(long, env = "GEORELAY_LINES_MAX_CONNECTIONS", default_value_t = 256)]
    pub lines_max_connections: usize,
    /// A local device's connection silent this long is closed
    #[arg(long, env = "GEORELAY_LINES_IDLE_TIMEOUT", default_value = "10m", value_parser = duration)]
    pub lines_idle_timeout: Duration,
    /// Most records kept in the buffer; when full, input waits
    #[arg(long, env = "GEORELAY_MAX_BUFFER", default_value_t = 1_000_000)]
    pub max_buffer: u64,
    /// How long a sent record waits before the agent asks whether it is
    /// stored (100ms to 1h; sooner once 5,000 wait)
    #[arg(long, env = "GEORELAY_CONFIRM_AFTER", default_value = "10s", value_parser = confirm_after)]
    pub confirm_after: Duration,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Ingest base URL; repeat (or comma-separate) for fallbacks
    #[arg(long = "url", value_delimiter = ',', required = true)]
    pub urls: Vec<String>,
    /// Device keys as ID.key (base64), as ./dev up writes them
    #[arg(long)]
    pub keys_dir: std::path::PathBuf,
    /// Create devices sim-0001… in this group first (needs DATABASE_URL and
    /// GEORELAY_MASTER_KEY) and write their keys into --keys-dir
    #[arg(long)]
    pub provision_group: Option<String>,
    /// How many devices (default: every key in --keys-dir)
    #[arg(long)]
    pub devices: Option<usize>,
    /// Readings per second per device (0.001 to 1000000)
    #[arg(long, default_value_t = 1.0, value_parser = rate)]
    pub rate: f64,
    /// Readings per device
    #[arg(long)]
    pub count: Option<u64>,
    /// How long to produce readings (0 or absent with no --count: until stopped)
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// Append a JSON line per 202 here: device, seq, at_ms, namespace, epoch
    #[arg(long)]
    pub ledger: Option<std::path::PathBuf>,
    /// Where the simulated devices keep their counters and buffers
    #[arg(long)]
    pub state_dir: std::path::PathBuf,
    /// After the readings stop, how long to keep delivering the backlog
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub settle: Duration,
    /// Longest pause between retries (back-off doubles from 200 ms up to this)
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub max_backoff: Duration,
    /// How long a sent record waits before its device asks whether it is
    /// stored while readings go on (100ms to 1h; every second once they stop)
    #[arg(long, default_value = "10s", value_parser = confirm_after)]
    pub confirm_after: Duration,
}

/// Rollup worker settings; every flag can also come from the environment.
#[derive(Debug, Args)]
pub struct RollupArgs {
    /// Address for /healthz and /metrics (port 0 picks a free one; the address is printed)
    #[arg(long, env = "GEORELAY_ROLLUP_LISTEN", default_value = "0.0.0.0:9091")]
    pub listen: String,
    /// How often it looks for newly stored rows
    #[arg(long, env = "GEORELAY_ROLLUP_POLL", default_value = "500ms", value_parser = duration)]
    pub poll_interval: Duration,
    /// Rollup lease length; a standby takes over this long after the holder died
    #[arg(long, env = "GEORELAY_ROLLUP_LEASE", default_value = "10s", value_parser = duration)]
    pub lease: Duration,
}

/// Console settings; every flag can also come from the environment. The
/// token that guards the actions is read from GEORELAY_CONSOLE_TOKEN only
/// (never a flag: flags show in `ps`).
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Address to listen on (port 0 picks a free one; the address is
    /// printed). Reading needs no sign-in: keep it on a private address
    #[arg(
        long,
        env = "GEORELAY_CONSOLE_LISTEN",
        default_value = "127.0.0.1:8070"
    )]
    pub listen: String,
    /// How often the control plane is read besides its notifications
    #[arg(long, env = "GEORELAY_CONSOLE_POLL", default_value = "2s", value_parser = duration)]
    pub poll_interval: Duration,
    /// How often the brokers are asked for queue depths
    #[arg(long, env = "GEORELAY_CONSOLE_DEPTH_INTERVAL", default_value = "5s", value_parser = duration)]
    pub depth_interval: Duration,
    /// A device not seen this long is silent (as the drain's --silent-after)
    #[arg(long, env = "GEORELAY_SILENT_AFTER", default_value = "10m", value_parser = duration)]
    pub silent_after: Duration,
}

/// Drain worker settings; every flag can also come from the environment.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// Address for /healthz and /metrics (port 0 picks a free one; the address is printed)
    #[arg(long, env = "GEORELAY_DRAIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub listen: String,
    /// About this many records stored in one transaction (reads ask for fewer messages when they carry bundles)
    #[arg(long, env = "GEORELAY_DRAIN_BATCH", default_value_t = 500)]
    pub batch_size: usize,
    /// Drain lease length; a standby takes over this long after the holder died
    #[arg(long, env = "GEORELAY_DRAIN_LEASE", default_value = "5s", value_parser = duration)]
    pub lease: Duration,
    /// The ingest instances' --publish-deadline
    #[arg(long, env = "GEORELAY_PUBLISH_DEADLINE", default_value = "2s", value_parser = duration)]
    pub publish_deadline: Duration,
    /// The ingest instances' --lease
    #[arg(long, env = "GEORELAY_LEASE", default_value = "5s", value_parser = duration)]
    pub ingest_lease: Duration,
    /// How long the senders' own namespace must be unreadable before the worker moves them
    #[arg(long, env = "GEORELAY_DECLARE_TROUBLE_AFTER", default_value = "10s", value_parser = duration)]
    pub declare_trouble_after: Duration,
    /// Least time between two automatic moves of one group (flapping guard)
    #[arg(long, env = "GEORELAY_FAILOVER_COOLDOWN", default_value = "10s", value_parser = duration)]
    pub failover_cooldown: Duration,
    /// Peek-lock duration of the Service Bus queues georelay creates (5s to
    /// 5m): how long a message a crashed reader held stays invisible
    #[arg(long, env = "GEORELAY_SERVICEBUS_LOCK_DURATION", default_value = "30s", value_parser = duration)]
    pub servicebus_lock_duration: Duration,
    /// A device that sent before and has nothing stored for this long is
    /// silent (the gauge georelay_drain_silent_devices; the alert)
    #[arg(long, env = "GEORELAY_SILENT_AFTER", default_value = "10m", value_parser = duration)]
    pub silent_after: Duration,
    /// A device whose records stranded in an abandoned epoch are not back
    /// this long is named at ERROR, with how to release it
    #[arg(long, env = "GEORELAY_GAP_WARN_AFTER", default_value = "1m", value_parser = duration)]
    pub gap_warn_after: Duration,
    /// PEM file of the CA that signs tls:// NATS servers' certificates (when
    /// the system does not trust it)
    #[arg(long, env = "GEORELAY_NATS_CA_FILE")]
    pub nats_ca_file: Option<std::path::PathBuf>,
}

/// Ingest settings; every flag can also come from the environment.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Address to listen on (port 0 picks a free one; the address is printed)
    #[arg(long, env = "GEORELAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Serve /metrics on this address instead of --listen (it names
    /// namespaces and groups: keep it off the devices' port)
    #[arg(long, env = "GEORELAY_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Bound on one publish to a broker
    #[arg(long, env = "GEORELAY_PUBLISH_DEADLINE", default_value = "2s", value_parser = duration)]
    pub publish_deadline: Duration,
    /// Bound on a whole records request, failovers included
    #[arg(long, env = "GEORELAY_REQUEST_DEADLINE", default_value = "10s", value_parser = duration)]
    pub request_deadline: Duration,
    /// A publish slower than this counts as slow for the breaker
    #[arg(long, env = "GEORELAY_BREAKER_SLOW", default_value = "500ms", value_parser = duration)]
    pub breaker_slow: Duration,
    /// Least time between two automatic moves of one group (flapping guard)
    #[arg(long, env = "GEORELAY_FAILOVER_COOLDOWN", default_value = "10s", value_parser = duration)]
    pub failover_cooldown: Duration,
    /// Lease length; the instance stops accepting when it could not renew it
    #[arg(long, env = "GEORELAY_LEASE", default_value = "5s", value_parser = duration)]
    pub lease: Duration,
    /// Routing is reloaded on NOTIFY and at least this often
    #[arg(long, env = "GEORELAY_POLL_INTERVAL", default_value = "2s", value_parser = duration)]
    pub poll_interval: Duration,
    /// Most records requests in progress at once; more are refused with 503
    #[arg(long, env = "GEORELAY_MAX_CONCURRENT_REQUESTS", default_value_t = 2048)]
    pub max_concurrent_requests: usize,
    /// Request body bytes held at once (a body reserves its declared
    /// length, else the limit); more are refused with 503
    #[arg(
        long,
        env = "GEORELAY_MAX_BYTES_IN_FLIGHT",
        default_value_t = 268_435_456
    )]
    pub max_bytes_in_flight: usize,
    /// Largest message the Service Bus namespaces take, in bytes (standard
    /// tier 262144, premium up to 104857600); larger records get 413
    #[arg(
        long,
        env = "GEORELAY_SERVICEBUS_MAX_MESSAGE",
        default_value_t = 262_144
    )]
    pub servicebus_max_message: usize,
    /// Peek-lock duration of the Service Bus queues georelay creates (5s to
    /// 5m): how long a message a crashed reader held stays invisible
    #[arg(long, env = "GEORELAY_SERVICEBUS_LOCK_DURATION", default_value = "30s", value_parser = duration)]
    pub servicebus_lock_duration: Duration,
    /// PEM file of the CA that signs tls:// NATS servers' certificates (when
    /// the system does not trust it)
    #[arg(long, env = "GEORELAY_NATS_CA_FILE")]
    pub nats_ca_file: Option<std::path::PathBuf>,
    /// How long a device's cached key and state are trusted without a
    /// database notification: at worst, how long a disabled device is still
    /// accepted (and how long a disabled device waits before it may change
    /// group)
    #[arg(long, env = "GEORELAY_DEVICE_CACHE_TTL", default_value = "60s", value_parser = duration)]
    pub device_cache_ttl: Duration,
    /// Also accept Teltonika trackers (Codec 8 and 8 Extended over TCP) on
    /// this address; each tracker is a registered device whose id is its IMEI
    #[arg(long, env = "GEORELAY_LISTEN_TELTONIKA")]
    pub listen_teltonika: Option<String>,
    /// Most tracker connections at once (more are closed on accept)
    #[arg(
        long,
        env = "GEORELAY_TELTONIKA_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub teltonika_max_connections: usize,
    /// Records a second one tracker may send (a burst of as many); beyond
    /// it a packet is answered 0 and the tracker sends it again later
    #[arg(
        long,
        env = "GEORELAY_TELTONIKA_MAX_RECORDS_PER_SECOND",
        default_value_t = 100
    )]
    pub teltonika_max_records_per_second: u32,
    /// A tracker connection silent this long between packets is closed
    #[arg(long, env = "GEORELAY_TELTONIKA_IDLE_TIMEOUT", default_value = "10m", value_parser = duration)]
    pub teltonika_idle_timeout: Duration,
    /// Source networks trackers may connect from (CIDR, comma-separated or
    /// repeated; default: any). An IMEI is not a secret: see
    /// docs/architecture.md, "Tracker front door"
    #[arg(long, env = "GEORELAY_TELTONIKA_ALLOW", value_delimiter = ',')]
    pub teltonika_allow: Vec<georelay_ingest::Network>,
}

/// A simulated device's readings a second, within `RATE_RANGE`.
fn rate(s: &str) -> Result<f64, String> {
    let range = georelay_agent::RATE_RANGE;
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|r| range.contains(r))
        .ok_or_else(|| {
            format!(
                "must be a number of readings a second from {} to {}",
                range.start(),
                range.end()
            )
        })
}

/// `--confirm-after`: a [`duration`] from 100 ms to an hour.
fn confirm_after(s: &str) -> Result<Duration, String> {
    let d = duration(s)?;
    if (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
        Ok(d)
    } else {
        Err(format!("{s:?} must be from 100ms to 1h"))
    }
}

/// "250ms", "2s", "1m", "1h" or plain seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 250ms, 2s or 1m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

#[derive(Debug, Subcommand)]
pub enum Admin {
    /// Regional queue namespaces (the "triplets")
    #[command(subcommand)]
    Namespace(NamespaceCmd),
    /// Routing groups: devices, senders, worker and queue
    #[command(subcommand)]
    Group(GroupCmd),
    /// Plug computer devices and their keys
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Move a group's senders to another namespace (planned failover or failback)
    Failover(FailoverArgs),
    /// Groups, their trail and namespaces at a glance (control plane
    /// problems first)
    Status,
    /// Check the control plane's invariants; print each problem with its fix
    /// and exit 1 if there is any
    Doctor,
    /// A group's trail of epochs
    #[command(subcommand)]
    Trail(TrailCmd),
    /// Records that could not be stored, kept sealed in dead_letters
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCmd),
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCmd {
    /// Newest first
    List(DeadLettersList),
    /// One dead letter with its envelope's fields decoded (never the record)
    Show(DeadLetterId),
    /// Verify again and store what now can be (an unknown_device record once
    /// the device is registered), in order; the rest is kept with its reason
    Replay(DeadLettersReplay),
}

#[derive(Debug, Args)]
pub struct DeadLettersList {
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long)]
    pub reason: Option<String>,
    /// Only those of the last DURATION ("1h", "30m")
    #[arg(long, value_parser = duration)]
    pub since: Option<Duration>,
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
}

#[derive(Debug, Args)]
pub struct DeadLetterId {
    #[arg(long)]
    pub id: i64,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct DeadLettersReplay {
    #[arg(long)]
    pub id: Option<i64>,
    /// Every dead letter with this reason (oldest first)
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum TrailCmd {
    /// Give up on an old epoch whose region is gone for good: the worker goes
    /// on to the next epoch and what that queue still holds is not stored.
    /// Shows how much that is first; needs --yes
    Abandon(TrailAbandon),
}

#[derive(Debug, Args)]
pub struct TrailAbandon {
    #[arg(long)]
    pub group: String,
    #[arg(long)]
    pub epoch: i64,
    /// Recorded in failover_events
    #[arg(long)]
    pub reason: Option<String>,
    /// Do it (without: only say what it would give up)
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TransportArg {
    Nats,
    Servicebus,
}

impl TransportArg {
    pub fn kind(self) -> georelay_core::TransportKind {
        match self {
            Self::Nats => georelay_core::TransportKind::Nats,
            Self::Servicebus => georelay_core::TransportKind::ServiceBus,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCmd {
    /// Register a namespace
    Add(NamespaceAdd),
    /// List namespaces by priority
    List,
    /// Put a namespace back into rotation
    Enable(NameArg),
    /// Take a namespace out of rotation (senders are never moved to it)
    Disable(NameArg),
    /// Replace a namespace's key: a Service Bus SAS key (after regenerating
    /// it), or NATS credentials (key name user:NAME with the password, or
    /// token); running services reconnect with it without a restart
    SetKey(NamespaceSetKey),
}

#[derive(Debug, Args)]
pub struct NamespaceSetKey {
    #[arg(long)]
    pub name: String,
    /// SAS policy (issuer) name; for NATS, user:NAME or token
    #[arg(long)]
    pub key_name: String,
    /// SAS (issuer) key, NATS password or token, stored sealed with the
    /// master key; `-` reads it from stdin (keeps it out of `ps`)
    #[arg(long)]
    pub key: String,
}

#[derive(Debug, Args)]
pub struct NamespaceAdd {
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub region: String,
    #[arg(long, value_enum)]
    pub transport: TransportArg,
    /// nats://host:port (tls://host:port to require TLS), or the Service Bus
    /// namespace (https://NAME.servicebus.windows.net)
    #[arg(long)]
    pub endpoint: String,
    /// Lower is preferred
    #[arg(long, allow_negative_numbers = true)]
    pub priority: i32,
    /// SAS policy (issuer) name; for NATS, user:NAME or token (credentials
    /// never go in the endpoint)
    #[arg(long, requires = "key")]
    pub key_name: Option<String>,
    /// SAS (issuer) key, NATS password or token, stored sealed with the
    /// master key; `-` reads it from stdin (keeps it out of `ps`)
    #[arg(long, requires = "key_name")]
    pub key: Option<String>,
}

#[derive(Debug, Args)]
pub struct NameArg {
    #[arg(long)]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group whose senders start on NAMESPACE
    Add(GroupAdd),
    /// List groups with their epoch and namespaces
    List,
    /// Change a group's settings
    Set(GroupSet),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("setting").required(true).multiple(true)))]
pub struct GroupSet {
    #[arg(long)]
    pub name: String,
    /// Automatic failover for this group
    #[arg(long, value_enum, group = "setting")]
    pub failover: Option<OnOff>,
    /// Give up on an old epoch its worker cannot read for this long (at
    /// least 1s), as `admin trail abandon` would: devices with records
    /// stranded there wait for their agents to send them again, the others
    /// flow on. `off` (the default): only an SRE gives up on a region
    #[arg(long, value_parser = off_or_duration, group = "setting")]
    pub abandon_after: Option<OffOr>,
    /// Why (kept in failover_events with the change)
    #[arg(long)]
    pub reason: Option<String>,
}

/// `off`, or a duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffOr {
    Off,
    After(Duration),
}

fn off_or_duration(s: &str) -> Result<OffOr, String> {
    match s.trim() {
        "off" => Ok(OffOr::Off),
        other => duration(other).map(OffOr::After),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct GroupAdd {
    #[arg(long)]
    pub name: String,
    /// Queue (Service Bus) or stream (NATS) name, the same in every namespace
    #[arg(long)]
    pub queue: String,
    /// Where the senders start
    #[arg(long)]
    pub namespace: String,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Register a device; prints its new key (base64) once
    Add(DeviceAdd),
    /// List devices
    List(DeviceList),
    /// Refuse a device's records from now on
    Disable(DeviceIdArg),
    /// Take a device's records again
    Enable(DeviceIdArg),
    /// Give up waiting for a device's records stranded in an abandoned
    /// epoch (it will never send them again: it died, or it keeps nothing
    /// after a 202); its parked newer records are then stored in order
    ReleaseGap(ReleaseGap),
}

#[derive(Debug, Args)]
pub struct ReleaseGap {
    #[arg(long)]
    pub device: String,
    /// Only the gap of this abandoned epoch (default: all of the device's)
    #[arg(long)]
    pub epoch: Option<i64>,
    /// Why (kept in failover_events as a gap_released event)
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeviceAdd {
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub group: String,
}

#[derive(Debug, Args)]
pub struct DeviceList {
    /// Only this group's devices
    #[arg(long)]
    pub group: Option<String>,
    /// Only enabled devices that sent before but nothing stored within
    /// this long (10m, 1h): silent devices
    #[arg(long, value_parser = duration)]
    pub silent_for: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct DeviceIdArg {
    #[arg(long)]
    pub id: String,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    #[arg(long)]
    pub group: String,
    /// The namespace to move the senders to
    #[arg(long)]
    pub to: String,
    /// Recorded in failover_events
    #[arg(long)]
    pub reason: Option<String>,
}
