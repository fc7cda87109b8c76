//! Sender routing: where a group's records go now, the per-namespace
//! breakers, failover, and the bookkeeping fencing needs.
//!
//! - **Snapshot.** Groups and namespaces from the control plane, reloaded on
//!   `NOTIFY` and by polling ([`Router::reload`]). Connections and breakers
//!   live per namespace across reloads.
//! - **Flights.** Per group, the `(epoch, namespace)` new publishes use and a
//!   count of publishes in flight per epoch. A publish takes a [`Ticket`]
//!   (epoch read and count raised under one lock) and holds it until the
//!   broker answered or the deadline passed. The epoch this instance
//!   acknowledges to the worker ([`Router::acked_epochs`]) is the oldest epoch
//!   with a publish in flight, else the current one: so a new epoch is
//!   acknowledged only once every publish to older ones has finished.
//! - **Failover** ([`Router::deliver`]): a publish whose breaker trips runs the
//!   failover transaction (one per group at a time in this process), adopts
//!   or makes the move, and re-publishes the waiting records to the new
//!   namespace under the new epoch, so the device still gets its 202.

use bytes::Bytes;
use futures_util::future::join_all;
use georelay_core::{envelope, DeviceId, MasterKey, SealedRecord};
use georelay_store::control::Actor;
use georelay_store::routing::{
    fail_over, load_routing, set_health, Failover, Health, RouteGroup, RouteNamespace, Trouble,
};
use georelay_store::{PgPool, StoreError};
use georelay_transport::{ErrorKind, Limits, Namespace, TransportError};
use prometheus::Histogram;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use zeroize::Zeroizing;

use crate::breaker::{Breaker, BreakerConfig};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Namespaces one request may try (the first, then up to two failovers).
const MAX_ATTEMPTS: usize = 3;

/// What [`Router`] needs from the configuration.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub limits: Limits,
    pub breaker: BreakerConfig,
    /// Least time between two automatic moves of a group.
    pub cooldown: Duration,
    /// Lease length: an instance that could not renew for this long stops.
    pub lease: Duration,
}

/// Where a record went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub namespace: String,
    pub region: String,
    pub epoch: i64,
}

#[derive(Debug)]
struct NsRuntime {
    name: String,
    endpoint: String,
    key: Option<Zeroizing<String>>,
    /// This namespace's publish latency histogram (label looked up once).
    publish_seconds: Histogram,
    conn: Option<Namespace>,
    breaker: Mutex<Breaker>,
    ensured: Mutex<HashSet<String>>,
}

impl NsRuntime {
    fn breaker_open(&self) -> Option<Trouble> {
        self.breaker.lock().ok().and_then(|b| b.open())
    }

    fn is_ensured(&self, queue: &str) -> bool {
        self.ensured.lock().is_ok_and(|s| s.contains(queue))
    }

    fn set_ensured(&self, queue: &str, ensured: bool) {
        if let Ok(mut s) = self.ensured.lock() {
            if ensured {
                s.insert(queue.to_owned());
            } else {
                s.remove(queue);
            }
        }
    }
}

#[derive(Debug)]
struct NsEntry {
    info: RouteNamespace,
    rt: Arc<NsRuntime>,
}

#[derive(Debug, Default)]
struct Snapshot {
    namespaces: HashMap<i64, Arc<NsEntry>>,
}

#[derive(Debug)]
struct FlightState {
    epoch: i64,
    namespace_id: i64,
    queue: String,
    in_flight: BTreeMap<i64, usize>,
}

#[derive(Debug)]
struct GroupFlight {
    name: String,
    state: Mutex<FlightState>,
    /// One failover transaction per group at a time in this process.
    failover: tokio::sync::Mutex<()>,
}

impl GroupFlight {
    fn epoch(&self) -> i64 {
        self.state.lock().map(|s| s.epoch).unwrap_or(0)
    }

    /// Moves new publishes to `(epoch, namespace_id)` unless already there or
    /// further (epochs only grow).
    fn advance(&self, epoch: i64, namespace_id: i64) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        if epoch > s.epoch {
            s.epoch = epoch;
            s.namespace_id = namespace_id;
            true
        } else {
            false
        }
    }

    fn set_queue(&self, queue: &str) {
        if let Ok(mut s) = self.state.lock() {
            if s.queue != queue {
                s.queue = queue.to_owned();
            }
        }
    }

    fn acked_epoch(&self) -> Option<i64> {
        let s = self.state.lock().ok()?;
        let oldest_in_flight = s.in_flight.iter().find(|(_, n)| **n > 0).map(|(e, _)| *e);
        Some(oldest_in_flight.map_or(s.epoch, |e| e.min(s.epoch)))
    }
}

/// A publish in flight to one epoch of a group: counted until dropped.
#[derive(Debug)]
pub struct Ticket {
    flight: Arc<GroupFlight>,
    epoch: i64,
    namespace_id: i64,
    queue: String,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut s) = self.flight.state.lock() {
            if let Some(n) = s.in_flight.get_mut(&self.epoch) {
                *n -= 1;
                if *n == 0 {
                    s.in_flight.remove(&self.epoch);
                }
            }
        }
    }
}

enum Failure {
    /// The breaker is open: fail over.
    Tripped(Trouble),
    /// This publish failed, the namespace is not (yet) judged troubled.
    Transient(TransportError),
}

/// The lease as this process sees it: valid until the start of the last
/// successful heartbeat plus the lease length (the database set
/// `lease_until` from a `now()` no earlier than that start).
#[derive(Debug)]
pub struct Lease {
    length: Duration,
    valid_until: Mutex<Option<Instant>>,
}

impl Lease {
    fn new(length: Duration) -> Self {
        Self {
            length,
            valid_until: Mutex::new(None),
        }
    }

    pub fn renewed(&self, heartbeat_started: Instant) {
        if let Ok(mut v) = self.valid_until.lock() {
            *v = Some(heartbeat_started + self.length);
        }
    }

    pub fn is_valid(&self) -> bool {
        self.valid_until
            .lock()
            .ok()
            .and_then(|v| *v)
            .is_some_and(|until| Instant::now() < until)
    }
}

#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    pool: PgPool,
    master: Arc<MasterKey>,
    actor: String,
    snapshot: RwLock<Arc<Snapshot>>,
    runtimes: Mutex<HashMap<i64, Arc<NsRuntime>>>,
    flights: RwLock<HashMap<i64, Arc<GroupFlight>>>,
    metrics: Metrics,
    pub lease: Lease,
    /// Ask the reload task for a fresh snapshot.
    pub reload_wanted: Notify,
}

impl Router {
    pub fn new(
        config: RouterConfig,
        pool: PgPool,
        master: Arc<MasterKey>,
        actor: String,
        metrics: Metrics,
    ) -> Self {
        Self {
            lease: Lease::new(config.lease),
            config,
            pool,
            master,
            actor,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            runtimes: Mutex::new(HashMap::new()),
            flights: RwLock::new(HashMap::new()),
            metrics,
            reload_wanted: Notify::new(),
        }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().map(|s| s.clone()).unwrap_or_default()
    }

    fn flight(&self, group_id: i64) -> Option<Arc<GroupFlight>> {
        self.flights.read().ok()?.get(&group_id).cloned()
    }

    /// Reads the control plane and makes it the routing in force: new
    /// namespaces get a connection and a breaker, groups whose senders moved
    /// (a higher epoch) send to the new namespace from now on.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let routing = load_routing(&self.pool, &self.master).await?;
        let mut namespaces = HashMap::new();
        for info in routing.namespaces {
            let rt = self.runtime_for(&info).await;
            namespaces.insert(info.id, Arc::new(NsEntry { info, rt }));
        }
        self.apply_groups(&routing.groups);
        if let Ok(mut s) = self.snapshot.write() {
            *s = Arc::new(Snapshot { namespaces });
        }
        Ok(())
    }

    fn apply_groups(&self, groups: &[RouteGroup]) {
        let Ok(mut flights) = self.flights.write() else {
            return;
        };
        for g in groups {
            match flights.get(&g.id) {
                Some(f) => {
                    f.set_queue(&g.queue);
                    if f.advance(g.epoch, g.sender_namespace_id) {
                        tracing::info!(group = %g.name, epoch = g.epoch, "senders moved: writing to the new epoch");
                    }
                }
                None => {
                    flights.insert(
                        g.id,
                        Arc::new(GroupFlight {
                            name: g.name.clone(),
                            state: Mutex::new(FlightState {
                                epoch: g.epoch,
                                namespace_id: g.sender_namespace_id,
                                queue: g.queue.clone(),
                                in_flight: BTreeMap::new(),
                            }),
                            failover: tokio::sync::Mutex::new(()),
                        }),
                    );
                }
            }
            self.metrics
                .group_epoch
                .with_label_values(&[&g.name])
                .set(flights.get(&g.id).map_or(g.epoch, |f| f.epoch()));
        }
    }

    async fn runtime_for(&self, info: &RouteNamespace) -> Arc<NsRuntime> {
        let existing = self
            .runtimes
            .lock()
            .ok()
            .and_then(|r| r.get(&info.id).cloned())
            .filter(|rt| {
                rt.name == info.name && rt.endpoint == info.endpoint && rt.key == info.key
            });
        if let Some(rt) = existing {
            return rt;
        }
        let conn = match Namespace::connect(
            &info.transport,
            &info.endpoint,
            info.key_name.as_deref(),
            info.key.clone(),
            self.config.limits.clone(),
        )
        .await
        {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::warn!(namespace = %info.name, error = %e, "cannot set up a connection to the namespace; it counts as down");
                None
            }
        };
        let rt = Arc::new(NsRuntime {
            name: info.name.clone(),
            endpoint: info.endpoint.clone(),
            key: info.key.clone(),
            publish_seconds: self
                .metrics
                .publish_seconds
                .with_label_values(&[&info.name]),
            conn,
            breaker: Mutex::new(Breaker::new(self.config.breaker.clone())),
            ensured: Mutex::new(HashSet::new()),
        });
        if let Ok(mut r) = self.runtimes.lock() {
            r.insert(info.id, rt.clone());
        }
        rt
    }

    /// Every known group with the epoch this instance acknowledges for it.
    pub fn acked_epochs(&self) -> Vec<(i64, i64)> {
        let Ok(flights) = self.flights.read() else {
            return Vec::new();
        };
        flights
            .iter()
            .filter_map(|(id, f)| Some((*id, f.acked_epoch()?)))
            .collect()
    }

    fn begin(&self, group_id: i64) -> Option<Ticket> {
        let flight = self.flight(group_id)?;
        let (epoch, namespace_id, queue) = {
            let mut s = flight.state.lock().ok()?;
            let epoch = s.epoch;
            *s.in_flight.entry(epoch).or_insert(0) += 1;
            (epoch, s.namespace_id, s.queue.clone())
        };
        Some(Ticket {
            flight,
            epoch,
            namespace_id,
            queue,
        })
    }

    /// Whether some enabled, not-down namespace has a closed breaker here.
    pub fn some_region_writable(&self) -> bool {
        self.snapshot().namespaces.values().any(|e| {
            e.info.enabled
                && e.info.health != Health::Down
                && e.rt.conn.is_some()
                && e.rt.breaker_open().is_none()
        })
    }

    /// Queues `records` of `device` (verified, in seq order) to the group's
    /// namespace, failing over as needed. `Ok` once durably queued.
    pub async fn deliver(
        &self,
        group_id: i64,
        device: &DeviceId,
        records: &[SealedRecord],
    ) -> Result<Placement, ApiError> {
        let received_at_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut avoid = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            if !self.lease.is_valid() {
                return Err(ApiError::unavailable(
                    "fenced",
                    "this ingest instance lost its lease on the control plane",
                    Duration::from_secs(1),
                ));
            }
            let ticket = self.begin(group_id).ok_or_else(|| {
                self.reload_wanted.notify_one();
                ApiError::unavailable(
                    "unknown_group",
                    "the device's group is not routed yet",
                    Duration::from_secs(1),
                )
            })?;
            let Some(entry) = self
                .snapshot()
                .namespaces
                .get(&ticket.namespace_id)
                .cloned()
            else {
                self.reload_wanted.notify_one();
                return Err(ApiError::unavailable(
                    "unknown_namespace",
                    "the group's namespace is not loaded yet",
                    Duration::from_secs(1),
                ));
            };
            let epoch = u64::try_from(ticket.epoch).unwrap_or(0);
            let items: Vec<(String, Bytes)> = records
                .iter()
                .map(|r| {
                    let envelope = envelope::encode(epoch, received_at_micros, device, r);
                    (device.record_id(r.seq), envelope)
                })
                .collect();
            match self.publish(&entry, &ticket.queue, &items).await {
                Ok(()) => {
                    return Ok(Placement {
                        namespace: entry.info.name.clone(),
                        region: entry.info.region.clone(),
                        epoch: ticket.epoch,
                    })
                }
                Err(Failure::Transient(e)) => {
                    tracing::debug!(namespace = %entry.info.name, error = %e, "publish failed");
                    return Err(ApiError::unavailable(
                        "region_unavailable",
                        "the region did not take the record in time; retry",
                        Duration::from_secs(1),
                    ));
                }
                Err(Failure::Tripped(trouble)) => {
                    let failed_epoch = ticket.epoch;
                    drop(ticket);
                    avoid.push(entry.info.id);
                    self.fail_over(group_id, failed_epoch, &entry, trouble, &avoid)
                        .await?;
                }
            }
        }
        Err(ApiError::unavailable(
            "no_region",
            "no region took the record; retry later",
            Duration::from_secs(1),
        ))
    }

    async fn publish(
        &self,
        entry: &NsEntry,
        queue: &str,
        items: &[(String, Bytes)],
    ) -> Result<(), Failure> {
        let rt = &entry.rt;
        if let Some(trouble) = rt.breaker_open() {
            return Err(Failure::Tripped(trouble));
        }
        let Some(conn) = &rt.conn else {
            return Err(Failure::Tripped(Trouble::Down));
        };
        let mut retried = false;
        loop {
            if !rt.is_ensured(queue) {
                if let Err(e) = conn.ensure_queue(queue).await {
                    return Err(self.failed(entry, e));
                }
                rt.set_ensured(queue, true);
            }
            let started = Instant::now();
            let result = conn.publish_batch(queue, items).await;
            let elapsed = started.elapsed();
            rt.publish_seconds.observe(elapsed.as_secs_f64());
            match result {
                Ok(()) => {
                    let tripped = rt
                        .breaker
                        .lock()
                        .ok()
                        .and_then(|mut b| b.success(elapsed, Instant::now()));
                    if let Some(trouble) = tripped {
                        self.note_trip(entry, trouble);
                    }
                    return Ok(());
                }
                // The queue may be gone (a region restarted on an empty
                // store): create it and try once more.
                Err((_, e)) if e.kind() == ErrorKind::Rejected && !retried => {
                    retried = true;
                    rt.set_ensured(queue, false);
                }
                Err((_, e)) => return Err(self.failed(entry, e)),
            }
        }
    }

    fn failed(&self, entry: &NsEntry, e: TransportError) -> Failure {
        let tripped = entry
            .rt
            .breaker
            .lock()
            .ok()
            .and_then(|mut b| b.failure(e.kind(), Instant::now()));
        match tripped {
            Some(trouble) => {
                self.note_trip(entry, trouble);
                Failure::Tripped(trouble)
            }
            None => Failure::Transient(e),
        }
    }

    fn note_trip(&self, entry: &NsEntry, trouble: Trouble) {
        let was = self
            .metrics
            .breaker_open
            .with_label_values(&[&entry.info.name])
            .get();
        if was == 0 {
            self.metrics
                .breaker_open
                .with_label_values(&[&entry.info.name])
                .set(1);
            tracing::warn!(namespace = %entry.info.name, region = %entry.info.region, trouble = ?trouble, "breaker tripped");
        }
    }

    async fn fail_over(
        &self,
        group_id: i64,
        failed_epoch: i64,
        troubled: &NsEntry,
        trouble: Trouble,
        avoid: &[i64],
    ) -> Result<(), ApiError> {
        let flight = self.flight(group_id).ok_or_else(|| {
            ApiError::unavailable(
                "unknown_group",
                "the device's group is not routed yet",
                Duration::from_secs(1),
            )
        })?;
        let _one_at_a_time = flight.failover.lock().await;
        if flight.epoch() > failed_epoch {
            // Another request of this process moved the group meanwhile.
            return Ok(());
        }
        let what = match trouble {
            Trouble::Down => "down (errors or no answer)",
            Trouble::Slow => "degraded (answers too slowly)",
        };
        let actor = Actor {
            actor: self.actor.clone(),
            reason: Some(format!("namespace {} is {what}", troubled.info.name)),
        };
        let transaction = fail_over(
            &self.pool,
            group_id,
            troubled.info.id,
            trouble,
            avoid,
            self.config.cooldown,
            &actor,
        );
        // Bounded: a hung database must not hold the group's failover lock.
        let outcome = match tokio::time::timeout(self.config.lease, transaction).await {
            Ok(Ok(outcome)) => outcome,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", self.config.lease),
                };
                tracing::warn!(group = %flight.name, %error, "cannot reach the control plane to fail over");
                return Err(ApiError::unavailable(
                    "control_plane_unavailable",
                    "the region is unavailable and failover cannot reach the control plane",
                    Duration::from_secs(1),
                ));
            }
        };
        let (label, result) = match outcome {
            Failover::Moved {
                namespace_id,
                epoch,
            }
            | Failover::Adopted {
                namespace_id,
                epoch,
            } => {
                let moved = matches!(outcome, Failover::Moved { .. });
                flight.advance(epoch, namespace_id);
                if moved {
                    let to = self.namespace_name(namespace_id);
                    tracing::warn!(group = %flight.name, from = %troubled.info.name, to = %to, epoch, reason = what, "senders failed over");
                    ("moved", Ok(()))
                } else {
                    tracing::info!(group = %flight.name, epoch, "adopted another instance's failover");
                    ("adopted", Ok(()))
                }
            }
            Failover::Disabled => (
                "disabled",
                Err(ApiError::unavailable(
                    "failover_disabled",
                    "the group's region is unavailable and its failover bit is off",
                    Duration::from_secs(5),
                )),
            ),
            Failover::CoolingDown { retry_after } => (
                "cooling_down",
                Err(ApiError::unavailable(
                    "cooling_down",
                    "the group moved moments ago; it is not moved again so soon",
                    retry_after,
                )),
            ),
            Failover::Exhausted { first } => {
                if first {
                    tracing::error!(group = %flight.name, troubled = %troubled.info.name, "no namespace can take the group's senders: records are refused (503) until a region recovers or an operator acts");
                }
                (
                    "exhausted",
                    Err(ApiError::unavailable(
                        "no_region",
                        "no region can take records now; retry later",
                        Duration::from_secs(5),
                    )),
                )
            }
        };
        self.metrics
            .failovers
            .with_label_values(&[&flight.name, label])
            .inc();
        self.reload_wanted.notify_one();
        result
    }

    fn namespace_name(&self, id: i64) -> String {
        self.snapshot()
            .namespaces
            .get(&id)
            .map_or_else(|| format!("#{id}"), |e| e.info.name.clone())
    }

    /// Probes every namespace whose breaker is open here or that the control
    /// plane marks unhealthy. A namespace that answered well for
    /// `recover_probes` probes in a row gets its breaker closed and is marked
    /// healthy (so it can be chosen again); senders do not move back by
    /// themselves.
    pub async fn probe_round(&self) {
        let snapshot = self.snapshot();
        let probes = snapshot.namespaces.values().filter_map(|entry| {
            let open = entry.rt.breaker_open().is_some();
            let unhealthy = entry.info.enabled && entry.info.health != Health::Healthy;
            let conn = entry.rt.conn.clone()?;
            if !(open || unhealthy) {
                return None;
            }
            Some(async move {
                let result = conn.probe().await.map_err(|e| e.kind());
                (entry, result)
            })
        });
        for (entry, result) in join_all(probes).await {
            let recovered = entry.rt.breaker.lock().is_ok_and(|mut b| b.probe(result));
            if !recovered {
                continue;
            }
            self.metrics
                .breaker_open
                .with_label_values(&[&entry.info.name])
                .set(0);
            if entry.info.health != Health::Healthy {
                match set_health(&self.pool, entry.info.id, Health::Healthy).await {
                    Ok(true) => {
                        tracing::info!(namespace = %entry.info.name, "namespace answers well again: marked healthy");
                        self.reload_wanted.notify_one();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(namespace = %entry.info.name, error = %e, "cannot mark namespace healthy")
                    }
                }
            } else {
                tracing::info!(namespace = %entry.info.name, "breaker closed: namespace answers well again");
            }
        }
    }
}
