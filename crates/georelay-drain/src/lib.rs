//! georelay-drain: the worker side of docs/DESIGN.md's failover protocol — what
//! makes a failover lose nothing and reorder nothing.
//!
//! - **One active drainer per group**: a lease row with a fencing token
//!   (`drain_leases`, see migrations/0002), checked inside every transaction
//!   that writes. Other workers stand by and take over when it lapses.
//! - **In order, at least once, stored once**: a batch is received in queue
//!   order, stored in one transaction (`ON CONFLICT (device_id, seq) DO
//!   NOTHING`), committed, and only then acked.
//! - **Drain, then follow**: the oldest undrained trail epoch first; an epoch
//!   is left only when it is sealed (senders past it, every live ingest
//!   instance acknowledging a later epoch, the grace passed) and empty.
//! - **Poison never blocks**: whatever a queue message carries (see
//!   `DeadLetterReason`: undecodable, unknown device, bad tag, not an object,
//!   an epoch that does not belong on this namespace, an unopenable device
//!   key, a value PostgreSQL refuses) goes to `dead_letters` in the same
//!   transaction and is acked. A database outage is not poison: nothing is
//!   acked, the worker retries with back-off. The two are told apart by
//!   SQLSTATE: a refusal of the values is retried row by row without them.
//!
//! [`run`] drains every group until `shutdown`, then finishes the batch in
//! hand (or leaves it unacked) and releases its leases.

mod metrics;
mod worker;

use axum::extract::State;
use axum::routing::get;
use georelay_core::{check_range, ConfigError, MasterKey};
use georelay_store::drain;
use georelay_store::instances::{self, Beat, Role};
use georelay_store::keys::Devices;
use georelay_store::routing::load_routing;
use georelay_store::PgPool;
use georelay_transport::{Limits, NamespacePool, Pooled, TransportError};
use parking_lot::RwLock;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::worker::GroupWorker;

/// How often device liveness is written and silent devices are counted.
const SILENT_COUNT_INTERVAL: Duration = Duration::from_secs(30);

/// What an operator sets (`georelay drain` flags). Everything else in
/// [`Config`] is derived from it by [`Config::new`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// About this many records stored in one transaction (`--batch-size`;
    /// a read asks for fewer messages when they carry bundles).
    pub batch_size: usize,
    /// Drain lease length (`--lease`).
    pub lease: Duration,
    /// The ingest instances' `--publish-deadline`.
    pub ingest_publish_deadline: Duration,
    /// The ingest instances' `--lease`.
    pub ingest_lease: Duration,
    /// How long the senders' own namespace must be unreadable before the
    /// worker moves them (`--declare-trouble-after`).
    pub declare_trouble_after: Duration,
    /// `--failover-cooldown`.
    pub failover_cooldown: Duration,
    /// `--servicebus-lock-duration`: the peek-lock duration of Service Bus
    /// queues; a fresh reader waits this long before it reads.
    pub servicebus_lock_duration: Duration,
    /// `--silent-after`: a device that sent before and nothing stored for
    /// this long counts as silent (`georelay_drain_silent_devices`).
    pub silent_after: Duration,
    /// `--gap-warn-after`: a device's gap open this long is named at ERROR.
    pub gap_warn_after: Duration,
    /// `--nats-ca-file`: the CA of `tls://` NATS servers.
    pub nats_ca_file: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            lease: Duration::from_secs(5),
            ingest_publish_deadline: Duration::from_secs(2),
            ingest_lease: Duration::from_secs(5),
            declare_trouble_after: Duration::from_secs(10),
            failover_cooldown: Duration::from_secs(10),
            servicebus_lock_duration: georelay_transport::SERVICEBUS_LOCK_DURATION,
            silent_after: Duration::from_secs(600),
            gap_warn_after: Duration::from_secs(60),
            nats_ca_file: None,
        }
    }
}

/// The worker's configuration: built only by [`Config::new`], which checks
/// each setting's range and derives the rest, so the timing rules the
/// protocol rests on hold whoever builds it.
#[derive(Debug, Clone)]
pub struct Config {
    /// Most records stored in one transaction.
    batch_size: usize,
    /// How long a receive on the current epoch waits for the first message.
    receive_wait: Duration,
    /// Drain lease length; renewed at every batch and every lease/4 when idle.
    lease: Duration,
    /// How often a standby tries to take a group's lease: lease/5.
    standby_poll: Duration,
    /// Ingest's publish deadline: an ingest instance whose lease lapsed less
    /// than this ago may still have a publish landing.
    publish_deadline: Duration,
    /// Least time after the senders moved before an epoch can be sealed:
    /// ingest's publish deadline plus its lease (a publish that started just
    /// before an instance's last heartbeat lands within it).
    seal_grace: Duration,
    /// How often an empty old epoch re-checks the seal barrier.
    seal_poll: Duration,
    /// How often drained namespaces are swept for leftovers.
    sweep_interval: Duration,
    declare_trouble_after: Duration,
    failover_cooldown: Duration,
    /// Bounds on broker calls: never more than half the lease, so a slow
    /// region cannot make the worker lose its lease between renewals.
    limits: Limits,
    /// How often the group list and namespaces are reloaded.
    poll_interval: Duration,
    /// Bound on one drain step: far above a slow but working one, plus the
    /// Service Bus lock duration a receive may first wait out.
    step_limit: Duration,
    silent_after: Duration,
    gap_warn_after: Duration,
}

impl Config {
    pub fn new(s: Settings) -> Result<Self, ConfigError> {
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        check_range("batch-size", s.batch_size, 1, 10_000)?;
        check_range("lease", s.lease, ms(200), hour)?;
        check_range("publish-deadline", s.ingest_publish_deadline, ms(10), hour)?;
        check_range("ingest-lease", s.ingest_lease, ms(100), hour)?;
        check_range(
            "declare-trouble-after",
            s.declare_trouble_after,
            ms(100),
            hour,
        )?;
        check_range(
            "failover-cooldown",
            s.failover_cooldown,
            Duration::ZERO,
            hour,
        )?;
        georelay_transport::check_servicebus_lock_duration(s.servicebus_lock_duration)?;
        check_range(
            "silent-after",
            s.silent_after,
            Duration::from_secs(10),
            7 * 24 * hour,
        )?;
        check_range(
            "gap-warn-after",
            s.gap_warn_after,
            Duration::from_secs(1),
            7 * 24 * hour,
        )?;
        let defaults = Limits::default();
        Ok(Self {
            batch_size: s.batch_size,
            receive_wait: ms(500),
            lease: s.lease,
            standby_poll: (s.lease / 5).max(ms(100)),
            publish_deadline: s.ingest_publish_deadline,
            seal_grace: s.ingest_publish_deadline + s.ingest_lease,
            seal_poll: ms(250),
            sweep_interval: Duration::from_secs(10),
            declare_trouble_after: s.declare_trouble_after,
            failover_cooldown: s.failover_cooldown,
            limits: Limits {
                publish_deadline: s.ingest_publish_deadline.min(s.lease / 2),
                request_deadline: (s.lease / 2).min(defaults.request_deadline),
                servicebus_lock_duration: s.servicebus_lock_duration,
                nats_ca_file: s.nats_ca_file.clone(),
                ..Limits::default()
            },
            poll_interval: Duration::from_secs(2),
            step_limit: Duration::from_secs(30) + s.servicebus_lock_duration,
            silent_after: s.silent_after,
            gap_warn_after: s.gap_warn_after,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        // The default settings are within every range (a unit test checks).
        Self::new(Settings::default())
            .unwrap_or_else(|e| unreachable!("default drain settings: {e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Store(#[from] georelay_store::StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("health listener: {0}")]
    Io(#[from] std::io::Error),
}

/// What every group worker of this process shares.
#[derive(Debug)]
pub struct Shared {
    config: Config,
    pool: PgPool,
    master: Arc<MasterKey>,
    keys: Devices,
    metrics: Metrics,
    instance: Uuid,
    actor: String,
    /// One connection per namespace, replaced when its triplet changes.
    conns: NamespacePool,
    names: RwLock<HashMap<i64, String>>,
    /// Devices whose records were stored since the last liveness flush,
    /// with when the newest was received (written to `devices.last_seen_at`
    /// every 30 s, not per batch).
    seen: parking_lot::Mutex<HashMap<String, chrono::DateTime<chrono::Utc>>>,
    /// Namespaces whose broker keeps a dead-letter sub-queue (Service Bus).
    with_dead_letter_queue: RwLock<Vec<i64>>,
    groups: RwLock<HashMap<i64, String>>,
}

impl Shared {
    fn namespace_name(&self, id: i64) -> String {
        self.names
            .read()
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// Writes what was seen since the last flush to `devices.last_seen_at`
    /// (kept for the next flush if the database does not answer), then sets
    /// `georelay_drain_silent_devices{group}`: enabled devices seen before
    /// but not within `--silent-after`.
    async fn liveness(&self) {
        let seen: Vec<(String, chrono::DateTime<chrono::Utc>)> =
            std::mem::take(&mut *self.seen.lock()).into_iter().collect();
        if !seen.is_empty() {
            if let Err(e) = drain::mark_seen(&self.pool, &seen).await {
                tracing::debug!(error = %e, "cannot write device liveness; next time");
                let mut again = self.seen.lock();
                for (device, at) in seen {
                    let newest = again.entry(device).or_insert(at);
                    *newest = (*newest).max(at);
                }
            }
        }
        self.count_silent_devices().await;
    }

    async fn count_silent_devices(&self) {
        match drain::silent_devices(&self.pool, self.config.silent_after).await {
            Ok(groups) => {
                for (group, silent) in groups {
                    self.metrics
                        .silent_devices
                        .with_label_values(&[&group])
                        .set(silent);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot count silent devices; next time"),
        }
    }

    /// `(id, whether its broker keeps a dead-letter sub-queue)` of every
    /// namespace the control plane describes.
    fn namespaces_with_dead_letter_queues(&self) -> Vec<(i64, bool)> {
        let with = self.with_dead_letter_queue.read();
        self.names
            .read()
            .keys()
            .map(|id| (*id, with.contains(id)))
            .collect()
    }

    fn group_name(&self, id: i64) -> Option<String> {
        self.groups.read().get(&id).cloned()
    }

    /// The connection to namespace `id`, made on first use (and anew once
    /// [`refresh`](Self::refresh) saw the namespace change).
    async fn namespace(&self, id: i64) -> Result<Pooled, TransportError> {
        if let Some(conn) = self.conns.cached(id) {
            return Ok(conn);
        }
        let routing = load_routing(&self.pool, &self.master).await.map_err(|e| {
            TransportError::new(
                georelay_transport::ErrorKind::Unreachable,
                format!("control plane: {e}"),
            )
        })?;
        if let Some(n) = routing.unopenable.iter().find(|n| n.id == id) {
            return Err(TransportError::new(
                georelay_transport::ErrorKind::Auth,
                format!(
                    "namespace {}'s sealed key does not open ({}): set it again with `georelay admin namespace set-key`",
                    n.name, n.why
                ),
            ));
        }
        let info = routing
            .namespaces
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| {
                TransportError::new(
                    georelay_transport::ErrorKind::Rejected,
                    format!("no namespace #{id}"),
                )
            })?;
        self.conns.get(id, &info.triplet).await
    }

    /// Makes the next read of `queue` in every namespace start at its oldest
    /// unacked message.
    async fn forget_consumers(&self, queue: &str) {
        for conn in self.conns.all() {
            let _ = conn.namespace().nack(queue, Vec::new()).await;
        }
    }

    /// Reloads names and drops connections whose namespace is gone or
    /// changed (endpoint, transport or key: a rotated key is picked up here).
    async fn refresh(&self) -> Result<Vec<i64>, georelay_store::StoreError> {
        let routing = load_routing(&self.pool, &self.master).await?;
        self.conns.retain(|id, triplet| {
            routing
                .namespaces
                .iter()
                .any(|n| n.id == id && n.triplet == *triplet)
        });
        *self.names.write() = routing
            .namespaces
            .iter()
            .map(|n| (n.id, n.name.clone()))
            .collect();
        *self.with_dead_letter_queue.write() = routing
            .namespaces
            .iter()
            .filter(|n| n.triplet.transport == georelay_transport::TransportKind::ServiceBus)
            .map(|n| n.id)
            .collect();
        // A NATS stream has no dead-letter sub-queue: 0 from the start (a
        // Service Bus one gets its count at the worker's next sweep).
        for n in &routing.namespaces {
            if n.triplet.transport == georelay_transport::TransportKind::Nats {
                for g in &routing.groups {
                    self.metrics
                        .broker_dead_lettered
                        .with_label_values(&[&g.name, &n.name])
                        .set(0);
                }
            }
        }
        *self.groups.write() = routing
            .groups
            .iter()
            .map(|g| (g.id, g.name.clone()))
            .collect();
        Ok(routing.groups.iter().map(|g| g.id).collect())
    }
}

/// Drains every group (one worker task each, started as groups appear) and
/// serves `/healthz` and `/metrics` on `listener`, until `shutdown`.
pub async fn run(
    config: Config,
    pool: PgPool,
    master: MasterKey,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), DrainError> {
    let master = Arc::new(master);
    let instance = Uuid::new_v4();
    let shared = Arc::new(Shared {
        keys: Devices::new(pool.clone(), master.clone()),
        metrics: Metrics::new()?,
        actor: format!("drain:{instance}"),
        instance,
        conns: NamespacePool::new(config.limits.clone()),
        names: RwLock::new(HashMap::new()),
        seen: parking_lot::Mutex::new(HashMap::new()),
        with_dead_letter_queue: RwLock::new(Vec::new()),
        groups: RwLock::new(HashMap::new()),
        config,
        pool,
        master,
    });
    instances::heartbeat(
        &shared.pool,
        instance,
        Role::Drain,
        shared.config.lease,
        Beat::default(),
    )
    .await?;
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    let http_stop = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
    });
    tracing::info!(%instance, "drain worker started");
    let watchdog = tokio::spawn({
        let (gauge, stop) = (
            shared.metrics.control_plane_problems.clone(),
            shutdown.clone(),
        );
        georelay_store::doctor::watchdog(
            shared.pool.clone(),
            shared.master.clone(),
            move |n| gauge.set(n as i64),
            async move { stop.cancelled().await },
        )
    });

    let workers = TaskTracker::new();
    let mut running = HashSet::new();
    let mut silent_counted: Option<Instant> = None;
    loop {
        // Every 30 s, or a quarter of --silent-after when that is shorter.
        // (Liveness is at most that much behind.)
        let every = SILENT_COUNT_INTERVAL.min(shared.config.silent_after / 4);
        if silent_counted.is_none_or(|at| at.elapsed() >= every) {
            silent_counted = Some(Instant::now());
            shared.liveness().await;
        }
        match shared.refresh().await {
            Ok(groups) => {
                for id in groups {
                    if running.insert(id) {
                        workers.spawn(GroupWorker::new(shared.clone(), id).run(shutdown.clone()));
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot reload groups"),
        }
        if let Err(e) = instances::heartbeat(
            &shared.pool,
            instance,
            Role::Drain,
            shared.config.lease * 3,
            Beat::default(),
        )
        .await
        {
            tracing::debug!(error = %e, "drain heartbeat failed");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(shared.config.poll_interval) => {}
        }
    }
    workers.close();
    workers.wait().await;
    let _ = instances::deregister(&shared.pool, instance).await;
    let _ = http.await;
    let _ = watchdog.await;
    tracing::info!(%instance, "drain worker stopped");
    Ok(())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> String {
    shared.metrics.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seal_grace_covers_ingest_publish_deadline_plus_lease() {
        let c = Config::new(Settings {
            ingest_publish_deadline: Duration::from_secs(3),
            ingest_lease: Duration::from_secs(4),
            ..Settings::default()
        })
        .unwrap();
        assert_eq!(c.seal_grace, Duration::from_secs(7));
        // Broker calls fit in half the drain lease.
        assert!(c.limits.request_deadline <= c.lease / 2);
        assert!(c.limits.publish_deadline <= c.lease / 2);
        assert_eq!(Config::default().seal_grace, Duration::from_secs(7));
    }

    #[test]
    fn nonsense_settings_are_refused_naming_the_flag() {
        let refused = |s: Settings| Config::new(s).unwrap_err().setting;
        let d = Settings::default;
        assert_eq!(
            refused(Settings {
                lease: Duration::ZERO,
                ..d()
            }),
            "lease"
        );
        assert_eq!(
            refused(Settings {
                batch_size: 0,
                ..d()
            }),
            "batch-size"
        );
        assert_eq!(
            refused(Settings {
                ingest_publish_deadline: Duration::ZERO,
                ..d()
            }),
            "publish-deadline"
        );
        assert_eq!(
            refused(Settings {
                ingest_lease: Duration::ZERO,
                ..d()
            }),
            "ingest-lease"
        );
    }
}
