//! georelay-testkit: the real parts tests run against.
//!
//! - [`TestDb`]: a fresh, migrated PostgreSQL database per test, dropped
//!   (with its connections) when the guard goes out of scope.
//! - [`NatsRegion`]: a real `nats-server` region to kill, freeze and restart;
//!   [`Region`]: that or a Service Bus double, behind the same faults.
//! - [`ServiceBusDouble`]: a local HTTP double of the Service Bus REST API
//!   that checks SAS signatures as the service does.
//! - [`Stack`]: a database, regions registered as namespaces, a group,
//!   devices ([`TestDevice`] seals and posts records) and real `georelay`
//!   service processes ([`Service`]).
//! - [`FaultProxy`]: latency, blackhole, resets and a bandwidth cap in front
//!   of a region or PostgreSQL.
//! - [`chaos`]: drills: a whole system, a fault on a seeded schedule, the
//!   checker; the chaos tests and `georelay chaos drill` run them.
//! - [`checker`]: docs/DESIGN.md's invariants over a ledger of 202s and the
//!   database, with examples of each violation.
//! - [`Georelay`], [`georelay_command`]: the built `georelay` binary as a
//!   `Command`, for tests that run it the way a user does.
//!
//! The server comes from `GEORELAY_TEST_DATABASE_URL`, else `DATABASE_URL`,
//! else `postgres://georelay:georelay@127.0.0.1:5432/georelay` (what `./dev`
//! creates). That role needs `CREATEDB`.

pub mod chaos;
pub mod checker;
mod db;
mod proxy;
mod region;
mod servicebus_double;
mod stack;

pub use db::TestDb;
pub use proxy::{Fault, FaultProxy};
pub use region::{NatsRegion, Region, SERVICEBUS_KEY, SERVICEBUS_POLICY};
pub use servicebus_double::ServiceBusDouble;
pub use stack::{
    master_key, master_key_b64, metrics_text, InProcessIngest, Service, Stack, TestDevice,
    DRAIN_TEST_ARGS, GROUP, INGEST_TEST_ARGS, QUEUE,
};

use anyhow::{bail, Context as _};
use std::path::PathBuf;
use std::process::Command;

/// The default server, as `./dev up` sets it up.
pub const DEFAULT_DATABASE_URL: &str = "postgres://georelay:georelay@127.0.0.1:5432/georelay";

/// The `georelay` binary the test kit starts, and the log filter its
/// services get (`RUST_LOG`). Passed explicitly, never through the process
/// environment: `georelay chaos drill` runs the harness with its own binary.
#[derive(Debug, Clone)]
pub struct Georelay {
    pub bin: PathBuf,
    pub log: String,
}

impl Georelay {
    /// The binary built in the same target directory as the running test
    /// (`cargo build --bins` puts it there; `./dev test` does that first);
    /// services log at `GEORELAY_TEST_LOG` (default `warn`).
    pub fn for_tests() -> anyhow::Result<Self> {
        Ok(Self {
            bin: georelay_bin()?,
            log: std::env::var("GEORELAY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        })
    }

    /// A command for this binary with `DATABASE_URL` pointing at `db`, and
    /// nothing else from the caller's environment that georelay reads (no
    /// master key, no log filter), so each caller states what it gives.
    pub fn command(&self, db: &TestDb) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env_remove("GEORELAY_MASTER_KEY")
            .env_remove("RUST_LOG")
            .env("DATABASE_URL", db.url());
        cmd
    }
}

/// Path of the `georelay` binary built in the same target directory as the
/// running test.
pub fn georelay_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    // target/<profile>/deps/<test> -> target/<profile>/georelay
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable is not inside a cargo target directory")?;
    let bin = profile_dir.join("georelay");
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo build --bins` first (./dev test does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// [`Georelay::command`] for the binary built beside the running test.
pub fn georelay_command(db: &TestDb) -> anyhow::Result<Command> {
    Ok(Georelay::for_tests()?.command(db))
}

/// What `georelay admin status` prints for `db`.
pub fn admin_status(db: &TestDb) -> anyhow::Result<String> {
    let out = georelay_command(db)?.args(["admin", "status"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// User + system CPU seconds of a process (`/proc/PID/stat`, fields 14 and
/// 15, in USER_HZ = 100 ticks a second on Linux); `None` once it is gone.
/// For benchmarks' CPU figures.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may hold spaces;
    // the first field there is the state (field 3).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns
/// whether it held. Tests wait for conditions, never for fixed sleeps.
pub async fn wait_until<F, Fut>(timeout: std::time::Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
