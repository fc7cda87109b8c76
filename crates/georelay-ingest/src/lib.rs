//! georelay-ingest: the stateless REST side of docs/DESIGN.md's failover protocol.
//!
//! Plug computers POST sealed records; this service verifies each one (device
//! known and enabled, AES-256-GCM tag, plaintext a JSON object) and publishes
//! the still-sealed record, wrapped in a [`georelay_core::Envelope`] that
//! names the epoch, to the group's current namespace. It answers 202 only
//! once the broker has the record durably.
//!
//! Guarantees:
//! - **Bad input never harms good data**: every refusal is a 4xx with the
//!   JSON error shape, decided before anything is published.
//! - **Bounded everything**: body size, batch size, header and body read
//!   time, request deadline, concurrent requests (load shedding answers 503
//!   at once), open connections.
//! - **Failover**: per-namespace breakers on errors and latency; on a trip
//!   the group is moved (or another instance's move adopted) in one
//!   transaction, and the waiting records are re-published there.
//! - **Fencing**: the instance heartbeats its lease and, per group, the
//!   epoch it acknowledges (never newer than its oldest publish in flight);
//!   with a lapsed lease it answers 503 instead of writing.
//!
//! [`run`] serves until `shutdown` is cancelled, then stops accepting,
//! finishes what is in flight and deregisters.

mod breaker;
mod error;
mod http;
mod metrics;
mod senders;
mod server;
pub mod tracker;

pub use breaker::BreakerConfig;
pub use error::{ApiError, ErrorCode};

use georelay_core::{check_range, ConfigError, MasterKey};
use georelay_store::instances::{self, Beat, Role};
use georelay_store::PgPool;
use georelay_transport::Limits;
use sqlx::postgres::PgListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::senders::{Senders, SendersConfig};
pub use crate::tracker::{Network, TrackerConfig};
use georelay_store::keys::Devices;

/// What an operator sets (`georelay ingest` flags). Everything else in
/// [`Config`] is derived from it, or fixed, by [`Config::new`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bound on one publish (or one batch) to a broker.
    pub publish_deadline: Duration,
    /// Bound on a whole records request, failovers included.
    pub request_deadline: Duration,
    /// A publish slower than this is a slow sample for the breaker.
    pub breaker_slow: Duration,
    /// Least time between two automatic moves of one group.
    pub failover_cooldown: Duration,
    /// Lease length; the heartbeat renews it every lease/5.
    pub lease: Duration,
    /// Routing is reloaded on NOTIFY, and at least this often.
    pub poll_interval: Duration,
    pub max_concurrent_requests: usize,
    /// Request body bytes held at once (bodies being read, and read ones
    /// until answered); a body reserves its declared length, else the limit.
    pub max_bytes_in_flight: usize,
    /// The largest message the Service Bus namespaces take, in bytes.
    pub servicebus_max_message: usize,
    /// The peek-lock duration of the Service Bus queues it creates.
    pub servicebus_lock_duration: Duration,
    /// The CA of `tls://` NATS servers, if the system does not trust it.
    pub nats_ca_file: Option<std::path::PathBuf>,
    /// How long a device's cached key and state are trusted without a
    /// notification: at worst, how long a disabled device is still accepted.
    pub device_cache_ttl: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            publish_deadline: Duration::from_secs(2),
            request_deadline: Duration::from_secs(10),
            breaker_slow: Duration::from_millis(500),
            failover_cooldown: Duration::from_secs(10),
            lease: Duration::from_secs(5),
            poll_interval: Duration::from_secs(2),
            max_concurrent_requests: 2048,
            max_bytes_in_flight: 256 * 1024 * 1024,
            servicebus_max_message: georelay_transport::SERVICEBUS_STANDARD_MAX_MESSAGE,
            servicebus_lock_duration: georelay_transport::SERVICEBUS_LOCK_DURATION,
            nats_ca_file: None,
            device_cache_ttl: georelay_store::keys::KNOWN_TTL,
        }
    }
}

/// Everything tunable, with the defaults documented in docs/architecture.md.
/// Built only by [`Config::new`], which checks each setting's range and the
/// rules between them.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bound on one publish (or one batch) to a broker.
    pub(crate) publish_deadline: Duration,
    /// Bound on broker management calls and probes.
    pub(crate) broker_request_deadline: Duration,
    pub(crate) servicebus_max_message: usize,
    pub(crate) servicebus_lock_duration: Duration,
    pub(crate) nats_ca_file: Option<std::path::PathBuf>,
    pub(crate) device_cache_ttl: Duration,
    /// Bound on a whole records request, failovers included: longer than
    /// the publish deadline, so a publish can finish within it.
    pub(crate) request_deadline: Duration,
    pub(crate) breaker: BreakerConfig,
    /// Least time between two automatic moves of one group.
    pub(crate) failover_cooldown: Duration,
    /// Lease length, renewed every `heartbeat_interval` (lease/5).
    pub(crate) lease: Duration,
    pub(crate) heartbeat_interval: Duration,
    /// Routing is reloaded on NOTIFY, and at least this often.
    pub(crate) poll_interval: Duration,
    pub(crate) probe_interval: Duration,
    pub(crate) max_body: usize,
    pub(crate) max_batch_body: usize,
    pub(crate) max_batch: usize,
    pub(crate) max_concurrent_requests: usize,
    pub(crate) max_bytes_in_flight: usize,
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub(crate) shutdown_grace: Duration,
}

impl Config {
    pub fn new(s: Settings) -> Result<Self, ConfigError> {
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        check_range("publish-deadline", s.publish_deadline, ms(10), ms(60_000))?;
        // A request must outlive its publish, or every slow publish is a 503.
        check_range(
            "request-deadline",
            s.request_deadline,
            s.publish_deadline + ms(1),
            ms(300_000),
        )?;
        check_range("breaker-slow", s.breaker_slow, ms(1), s.publish_deadline)?;
        check_range(
            "failover-cooldown",
            s.failover_cooldown,
            Duration::ZERO,
            hour,
        )?;
        check_range("lease", s.lease, ms(200), hour)?;
        check_range("poll-interval", s.poll_interval, ms(50), hour)?;
        // tokio's semaphore holds at most Semaphore::MAX_PERMITS.
        check_range(
            "max-concurrent-requests",
            s.max_concurrent_requests,
            1,
            1_000_000,
        )?;
        // A full batch body must fit.
        check_range(
            "max-bytes-in-flight",
            s.max_bytes_in_flight,
            8 * 1024 * 1024,
            64 * 1024 * 1024 * 1024,
        )?;
        // Service Bus standard takes 256 KiB, premium up to 100 MiB.
        check_range(
            "servicebus-max-message",
            s.servicebus_max_message,
            64 * 1024,
            100 * 1024 * 1024,
        )?;
        georelay_transport::check_servicebus_lock_duration(s.servicebus_lock_duration)?;
        check_range("device-cache-ttl", s.device_cache_ttl, ms(1000), hour)?;
        Ok(Self {
            publish_deadline: s.publish_deadline,
            broker_request_deadline: Duration::from_secs(5),
            servicebus_max_message: s.servicebus_max_message,
            servicebus_lock_duration: s.servicebus_lock_duration,
            nats_ca_file: s.nats_ca_file.clone(),
            device_cache_ttl: s.device_cache_ttl,
            request_deadline: s.request_deadline,
            breaker: BreakerConfig {
                slow: s.breaker_slow,
                ..BreakerConfig::default()
            },
            failover_cooldown: s.failover_cooldown,
            lease: s.lease,
            heartbeat_interval: (s.lease / 5).max(ms(40)),
            poll_interval: s.poll_interval,
            probe_interval: Duration::from_secs(1),
            max_body: 64 * 1024,
            max_batch_body: 8 * 1024 * 1024,
            max_batch: 1000,
            max_concurrent_requests: s.max_concurrent_requests,
            max_bytes_in_flight: s.max_bytes_in_flight,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(15),
        })
    }
}

impl Config {
    /// How long after a device is disabled this instance may still
    /// acknowledge a record of it: a request admitted under a cached key
    /// (at worst the cache's life) and published within the deadline.
    pub(crate) fn ack_horizon(&self) -> Duration {
        self.device_cache_ttl + self.request_deadline
    }
}

impl Default for Config {
    fn default() -> Self {
        // The default settings are within every range (a unit test checks).
        Self::new(Settings::default())
            .unwrap_or_else(|e| unreachable!("default ingest settings: {e}"))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] georelay_store::StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the ingest API on `listener` until `shutdown` is cancelled.
///
/// Before accepting: loads the routing and registers the instance (its first
/// heartbeat), so the worker's barrier sees it before it writes anything.
/// After `shutdown`: stops accepting, lets requests in flight finish (up to
/// `shutdown_grace`), then deregisters. If they did not finish, it does not
/// deregister: the lease lapses instead, and the worker waits out the grace.
/// Where ingest serves: the devices' API, and `/metrics` there or on a
/// listener of its own (metrics name namespaces and groups).
#[derive(Debug)]
pub struct Listeners {
    pub api: TcpListener,
    pub metrics: Option<TcpListener>,
    /// Teltonika trackers (Codec 8/8E over TCP), with the front door's bounds.
    pub teltonika: Option<(TcpListener, TrackerConfig)>,
}

impl From<TcpListener> for Listeners {
    /// Everything on one listener.
    fn from(api: TcpListener) -> Self {
        Self {
            api,
            metrics: None,
            teltonika: None,
        }
    }
}

pub async fn run(
    config: Config,
    pool: PgPool,
    master: MasterKey,
    listeners: impl Into<Listeners>,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let Listeners {
        api: listener,
        metrics: metrics_listener,
        teltonika,
    } = listeners.into();
    let master = Arc::new(master);
    let metrics = metrics::Metrics::new()?;
    let instance = Uuid::new_v4();
    let senders = Arc::new(Senders::new(
        SendersConfig {
            limits: Limits {
                publish_deadline: config.publish_deadline,
                request_deadline: config.broker_request_deadline,
                servicebus_max_message: config.servicebus_max_message,
                servicebus_lock_duration: config.servicebus_lock_duration,
                nats_ca_file: config.nats_ca_file.clone(),
            },
            breaker: config.breaker.clone(),
            cooldown: config.failover_cooldown,
            lease: config.lease,
        },
        pool.clone(),
        master.clone(),
        instance,
        metrics.clone(),
    ));
    senders.reload().await?;
    let started = Instant::now();
    instances::heartbeat(
        &pool,
        instance,
        Role::Ingest,
        config.lease,
        Beat {
            epochs: &senders.acked_epochs(),
            open_breakers: &senders.open_breakers(),
            acks: &[],
            ack_horizon: config.ack_horizon(),
        },
    )
    .await?;
    senders.lease.renewed(started);

    let devices = Arc::new(Devices::with_ttl(
        pool.clone(),
        master.clone(),
        config.device_cache_ttl,
    ));
    let background = CancellationToken::new();
    let tasks = TaskTracker::new();
    let loops = TaskTracker::new();
    loops.spawn(heartbeat_loop(
        config.clone(),
        pool.clone(),
        instance,
        senders.clone(),
        background.clone(),
    ));
    loops.spawn(reload_loop(
        config.poll_interval,
        senders.clone(),
        background.clone(),
    ));
    loops.spawn(listen_loop(
        pool.clone(),
        senders.clone(),
        devices.clone(),
        background.clone(),
    ));
    loops.spawn(probe_loop(
        config.probe_interval,
        senders.clone(),
        background.clone(),
    ));
    loops.spawn({
        let (gauge, stop) = (metrics.control_plane_problems.clone(), background.clone());
        georelay_store::doctor::watchdog(
            pool.clone(),
            master.clone(),
            move |n| gauge.set(n as i64),
            async move { stop.cancelled().await },
        )
    });

    let accepting = Arc::new(AtomicBool::new(true));
    let last_acks = senders.clone();
    let state = Arc::new(http::App {
        config: Arc::new(config.clone()),
        pool: pool.clone(),
        senders,
        devices,
        metrics,
        permits: Semaphore::new(config.max_concurrent_requests),
        body_kib: Arc::new(Semaphore::new(config.max_bytes_in_flight / 1024)),
        bodies_per_device: Arc::default(),
        tasks: tasks.clone(),
        accepting: accepting.clone(),
    });
    tracing::info!(%instance, addr = ?listener.local_addr().ok(), "ingest accepting");
    let trackers = teltonika.map(|(tracker_listener, tracker_config)| {
        tracing::info!(addr = ?tracker_listener.local_addr().ok(), "accepting Teltonika trackers");
        tokio::spawn(tracker::serve(
            Arc::new(tracker::teltonika::Teltonika),
            tracker_listener,
            state.clone(),
            Arc::new(tracker_config),
            shutdown.clone(),
        ))
    });
    match metrics_listener {
        None => {
            server::serve(
                listener,
                http::app(state, true),
                &config,
                shutdown,
                accepting,
            )
            .await
        }
        Some(metrics_listener) => {
            let metrics_server = server::serve(
                metrics_listener,
                http::metrics_app(state.clone()),
                &config,
                shutdown.clone(),
                Arc::new(AtomicBool::new(true)),
            );
            let api_server = server::serve(
                listener,
                http::app(state, false),
                &config,
                shutdown,
                accepting,
            );
            tokio::join!(api_server, metrics_server);
        }
    }

    if let Some(trackers) = trackers {
        // Stops accepting at shutdown; a packet being published is answered.
        if tokio::time::timeout(config.shutdown_grace, trackers)
            .await
            .is_err()
        {
            tracing::warn!("tracker connections still open at the end of the grace");
        }
    }
    tasks.close();
    let finished = tokio::time::timeout(config.shutdown_grace, tasks.wait())
        .await
        .is_ok();
    background.cancel();
    loops.close();
    loops.wait().await;
    if finished {
        // The acknowledgements since the last heartbeat, before the row goes.
        let acks = last_acks.take_acks();
        let last = Beat {
            acks: &acks,
            ack_horizon: config.ack_horizon(),
            ..Beat::default()
        };
        if let Err(e) =
            instances::heartbeat(&pool, instance, Role::Ingest, config.lease, last).await
        {
            tracing::warn!(error = %e, "could not write the last acknowledgements");
        }
        if let Err(e) = instances::deregister(&pool, instance).await {
            tracing::warn!(error = %e, "could not deregister; the lease will lapse instead");
        }
        tracing::info!(%instance, "ingest stopped");
    } else {
        tracing::warn!(%instance, "publishes still in flight at the end of the grace; leaving the lease to lapse");
    }
    Ok(())
}

/// Renews the lease and the acknowledged epochs. A failure leaves the lease
/// to lapse; requests are refused (503) once it has.
async fn heartbeat_loop(
    config: Config,
    pool: PgPool,
    instance: Uuid,
    senders: Arc<Senders>,
    stop: CancellationToken,
) {
    let mut failing = false;
    let mut tick = tokio::time::interval(config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let epochs = senders.acked_epochs();
        let open_breakers = senders.open_breakers();
        let acks = senders.take_acks();
        let beat = Beat {
            epochs: &epochs,
            open_breakers: &open_breakers,
            acks: &acks,
            ack_horizon: config.ack_horizon(),
        };
        let beat = tokio::time::timeout(
            config.lease,
            instances::heartbeat(&pool, instance, Role::Ingest, config.lease, beat),
        )
        .await;
        if !matches!(beat, Ok(Ok(()))) {
            // Written again next time (the upsert keeps the highest).
            senders.restore_acks(acks);
        }
        match beat {
            Ok(Ok(())) => {
                senders.lease.renewed(started);
                if failing {
                    tracing::info!("heartbeat renewed: accepting records again");
                    failing = false;
                }
            }
            Ok(Err(e)) if !failing => {
                tracing::warn!(error = %e, "heartbeat failed: the lease lapses unless the database answers");
                failing = true;
            }
            Err(_) if !failing => {
                tracing::warn!("heartbeat timed out: the lease lapses unless the database answers");
                failing = true;
            }
            _ => {}
        }
    }
}

/// Reloads the routing when asked (NOTIFY, a failover) and every
/// `poll_interval` in any case.
async fn reload_loop(poll_interval: Duration, senders: Arc<Senders>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = senders.reload_wanted.notified() => {}
            _ = tokio::time::sleep(poll_interval) => {}
        }
        if let Err(e) = senders.reload().await {
            tracing::debug!(error = %e, "routing reload failed; keeping the last one");
        }
    }
}

/// `LISTEN georelay`: device changes drop that device's cached key; anything
/// else asks for a routing reload. A lost connection drops every cached key
/// (changes may have been missed) and reconnects with back-off.
async fn listen_loop(
    pool: PgPool,
    senders: Arc<Senders>,
    devices: Arc<Devices>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen("georelay").await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            l = listener => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot LISTEN; polling meanwhile");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        };
        backoff = Duration::from_millis(100);
        devices.clear();
        senders.reload_wanted.notify_one();
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                m = listener.try_recv() => m,
            };
            match message {
                Ok(Some(n)) => {
                    let payload: serde_json::Value =
                        serde_json::from_str(n.payload()).unwrap_or_default();
                    if payload["table"] == "devices" {
                        if let Some(id) = payload["id"].as_str() {
                            devices.invalidate(id);
                        }
                    } else {
                        senders.reload_wanted.notify_one();
                    }
                }
                // The connection was lost; the next try_recv reconnects.
                Ok(None) => {
                    devices.clear();
                    senders.reload_wanted.notify_one();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "LISTEN connection failed");
                    break;
                }
            }
        }
    }
}

async fn probe_loop(interval: Duration, senders: Arc<Senders>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        senders.probe_round().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_the_heartbeat_is_a_fifth_of_the_lease() {
        let c = Config::default();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        assert!(c.request_deadline > c.publish_deadline);
    }

    #[test]
    fn nonsense_settings_are_refused_naming_the_flag() {
        let refused = |s: Settings| Config::new(s).unwrap_err().setting;
        let d = Settings::default;
        let zero = Duration::ZERO;
        assert_eq!(refused(Settings { lease: zero, ..d() }), "lease");
        assert_eq!(
            refused(Settings {
                poll_interval: zero,
                ..d()
            }),
            "poll-interval"
        );
        assert_eq!(
            refused(Settings {
                publish_deadline: zero,
                ..d()
            }),
            "publish-deadline"
        );
        assert_eq!(
            refused(Settings {
                request_deadline: Duration::from_secs(2),
                ..d()
            }),
            "request-deadline"
        );
        assert_eq!(
            refused(Settings {
                max_concurrent_requests: usize::MAX,
                ..d()
            }),
            "max-concurrent-requests"
        );
        assert_eq!(
            refused(Settings {
                max_concurrent_requests: 0,
                ..d()
            }),
            "max-concurrent-requests"
        );
    }
}
