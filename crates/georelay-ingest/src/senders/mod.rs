//! Sender routing: where a group's records go now, and getting them there
//! through breakers and failover. One concern per module:
//!
//! - [`snapshot`]: the namespaces as the control plane last described them,
//!   each with its pooled connection, breaker and histogram; reloaded on
//!   `NOTIFY` and by polling ([`Senders::reload`]).
//! - [`flights`]: per group, the route new publishes use and the publishes
//!   in flight per epoch — what fencing acknowledges ([`Senders::acked_epochs`]).
//! - [`failover`]: a publish whose breaker trips runs the failover
//!   transaction (one per group at a time here) and adopts its outcome.
//! - [`lease`]: the instance's lease; past it, records are refused.
//! - [`bundles`]: single-record publishes to one queue, joined into
//!   bundles while the bundle before them is at the broker.
//!
//! [`Senders::deliver`] ties them together: publish to the group's route;
//! on a trip, fail over and re-publish the waiting records to the new
//! namespace under the new epoch, so the device still gets its 202. Errors
//! are [`RouteError`]s: what went wrong for routing, not HTTP; the HTTP edge
//! maps them to answers (`crate::error`).

mod bundles;
mod failover;
mod flights;
mod lease;
mod snapshot;

use bytes::Bytes;
use futures_util::future::join_all;
use georelay_core::{envelope, DeviceId, MasterKey, SealedRecord};
use georelay_store::routing::{load_routing, set_health, Health, Trouble};
use georelay_store::{PgPool, StoreError};
use georelay_transport::{ErrorKind, Limits, NamespacePool, TransportError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

use crate::breaker::BreakerConfig;
use crate::metrics::Metrics;
use flights::{Flights, GroupFlight, Route};
pub use lease::Lease;
use snapshot::{Namespaces, NsEntry};

/// Namespaces one request may try (the first, then up to two failovers).
const MAX_ATTEMPTS: usize = 3;

/// What [`Senders`] needs from the configuration.
#[derive(Debug, Clone)]
pub struct SendersConfig {
    pub limits: Limits,
    pub breaker: BreakerConfig,
    /// Least time between two automatic moves of a group.
    pub cooldown: Duration,
    /// Lease length: an instance that could not renew for this long stops.
    pub lease: Duration,
}

/// Why records were not queued. Each says what the client can do: all but
/// [`RouteError::RecordTooLarge`] are worth a retry later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A record is larger than some enabled namespace carries: it could be
    /// queued in one region and not in the next, so it is queued in none.
    /// Nothing of its request was queued.
    #[error("record seq {seq} is {size} bytes as queued; the regions take at most {limit} bytes per record")]
    RecordTooLarge { seq: u64, size: usize, limit: usize },
    #[error("this ingest instance lost its lease on the control plane")]
    Fenced,
    #[error("the device's group is not routed yet")]
    UnknownGroup,
    #[error("the group's namespace is not loaded yet")]
    UnknownNamespace,
    /// One publish failed; the namespace is not (yet) judged troubled.
    #[error("the region did not take the record in time")]
    RegionUnavailable,
    #[error("the group's region is unavailable and its failover bit is off")]
    FailoverDisabled,
    #[error("the group moved moments ago; it is not moved again so soon")]
    CoolingDown { retry_after: Duration },
    #[error("no region can take records now")]
    NoRegion,
    #[error("the region is unavailable and failover cannot reach the control plane")]
    ControlPlaneUnavailable,
    /// This instance's first publish to the group's epoch must be recorded
    /// first (`epoch_publishes`), and the control plane did not answer.
    #[error(
        "the first record of a new epoch cannot be recorded: the control plane does not answer"
    )]
    EpochUnrecorded,
}

/// Where a record went.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub namespace: String,
    pub region: String,
    pub epoch: i64,
}

/// Where one publish goes.
struct Target<'a> {
    group_id: i64,
    flight: &'a GroupFlight,
    epoch: i64,
    queue: &'a str,
}

enum Failure {
    /// The breaker is open: fail over.
    Tripped(Trouble),
    /// The first publish to the epoch could not be recorded (the control
    /// plane did not answer): nothing was sent.
    Unrecorded,
    /// `items[index]` is over the namespace's limit; nothing was sent.
    TooLarge { index: usize, limit: usize },
    /// This publish failed, the namespace is not (yet) judged troubled.
    Transient(TransportError),
}

/// The ingest instance's sender side: routing snapshot, flights, failover.
#[derive(Debug)]
pub struct Senders {
    config: SendersConfig,
    pool: PgPool,
    master: Arc<MasterKey>,
    actor: String,
    namespaces: Namespaces,
    flights: Flights,
    metrics: Metrics,
    pub lease: Lease,
    /// This process's instance id.
    instance: uuid::Uuid,
    /// Ask the reload task for a fresh snapshot.
    pub reload_wanted: Notify,
    /// Namespaces left out of the routing (their key does not open), as
    /// last reported: an ERROR when the set changes, not at every reload.
    unopenable: parking_lot::Mutex<Vec<georelay_store::routing::Unopenable>>,
    /// The highest seq acknowledged per `(group, epoch, device)` since the
    /// last heartbeat wrote them (`device_acks`).
    acks: parking_lot::Mutex<HashMap<(i64, i64), HashMap<DeviceId, u64>>>,
}

impl Senders {
    pub fn new(
        config: SendersConfig,
        pool: PgPool,
        master: Arc<MasterKey>,
        instance: uuid::Uuid,
        metrics: Metrics,
    ) -> Self {
        Self {
            actor: format!("ingest:{instance}"),
            instance,
            lease: Lease::new(config.lease),
            namespaces: Namespaces::new(
                NamespacePool::new(config.limits.clone()),
                config.breaker.clone(),
                metrics.clone(),
            ),
            config,
            pool,
            master,
            flights: Flights::default(),
            metrics,
            reload_wanted: Notify::new(),
            unopenable: parking_lot::Mutex::default(),
            acks: parking_lot::Mutex::default(),
        }
    }

    /// The acknowledgements noted since the last call, for the heartbeat:
    /// `(group_id, epoch, device, highest seq)`.
    pub fn take_acks(&self) -> Vec<(i64, i64, String, i64)> {
        std::mem::take(&mut *self.acks.lock())
            .into_iter()
            .flat_map(|((g, e), devices)| {
                devices.into_iter().map(move |(d, seq)| {
                    (g, e, d.to_string(), i64::try_from(seq).unwrap_or(i64::MAX))
                })
            })
            .collect()
    }

    /// Puts back acknowledgements a heartbeat could not write.
    pub fn restore_acks(&self, acks: Vec<(i64, i64, String, i64)>) {
        let mut map = self.acks.lock();
        for (g, e, d, seq) in acks {
            if let Ok(d) = DeviceId::parse(&d) {
                let seq = u64::try_from(seq).unwrap_or(0);
                let at = map.entry((g, e)).or_default().entry(d).or_insert(seq);
                *at = (*at).max(seq);
            }
        }
    }

    fn note_acked(&self, group_id: i64, epoch: i64, device: &DeviceId, seq: u64) {
        let mut map = self.acks.lock();
        let devices = map.entry((group_id, epoch)).or_default();
        match devices.get_mut(device) {
            Some(at) => *at = (*at).max(seq),
            None => {
                devices.insert(device.clone(), seq);
            }
        }
    }

    /// Reads the control plane and makes it the routing in force: new or
    /// changed namespaces get a connection and a breaker, groups whose
    /// senders moved (a higher epoch) send to the new namespace from now on.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let routing = load_routing(&self.pool, &self.master).await?;
        {
            let mut known = self.unopenable.lock();
            if *known != routing.unopenable {
                for n in &routing.unopenable {
                    tracing::error!(namespace = %n.name, error = %n.why,
                        "namespace left out of the routing: its sealed key does not open (edited by hand, or restored from another installation); set it again with `georelay admin namespace set-key`");
                }
                known.clone_from(&routing.unopenable);
            }
        }
        // Every series an alert reads exists from the start at 0, so a rate
        // or increase sees the first event.
        for n in &routing.namespaces {
            self.metrics.breaker_open.with_label_values(&[&n.name]);
        }
        self.namespaces.load(routing.namespaces).await;
        for g in &routing.groups {
            for outcome in failover::OUTCOMES {
                self.metrics
                    .failovers
                    .with_label_values(&[&g.name, outcome]);
            }
            let route = Route {
                epoch: g.epoch,
                namespace_id: g.sender_namespace_id,
                queue: g.queue.as_str().into(),
            };
            let (epoch, moved) = self.flights.apply(g.id, &g.name, route);
            if moved {
                tracing::info!(group = %g.name, epoch, "senders moved: writing to the new epoch");
            }
            self.metrics
                .group_epoch
                .with_label_values(&[&g.name])
                .set(epoch);
        }
        Ok(())
    }

    /// Every known group with the epoch this instance acknowledges for it.
    pub fn acked_epochs(&self) -> Vec<(i64, i64)> {
        self.flights.acked_epochs()
    }

    /// The namespaces whose breaker is open here, by name (the heartbeat
    /// reports them for the console).
    pub fn open_breakers(&self) -> Vec<String> {
        let mut open: Vec<String> = self
            .namespaces
            .snapshot()
            .namespaces
            .values()
            .filter(|e| e.rt.breaker_open().is_some())
            .map(|e| e.info.name.clone())
            .collect();
        open.sort();
        open
    }

    /// Whether some enabled, not-down namespace has a closed breaker here.
    pub fn some_region_writable(&self) -> bool {
        self.namespaces.snapshot().namespaces.values().any(|e| {
            e.info.enabled
                && e.info.health != Health::Down
                && e.rt.conn.is_some()
                && e.rt.breaker_open().is_none()
        })
    }

    /// The largest envelope every enabled namespace carries (those whose
    /// limit is known: a NATS server tells it once connected).
    pub fn max_envelope(&self) -> Option<usize> {
        self.namespaces
            .snapshot()
            .namespaces
            .values()
            .filter(|e| e.info.enabled)
            .filter_map(|e| e.rt.conn.as_ref()?.namespace().max_payload())
            .min()
    }

    /// Queues `records` of `device` (verified, in seq order) to the group's
    /// namespace, failing over as needed. `Ok` once durably queued. Its
    /// future is spawned per request: the branches taken rarely (failover,
    /// recording the first publish to an epoch, a batch's publish) are boxed, so it
    /// stays small (`tests::a_publish_future_stays_small`).
    pub async fn deliver(
        &self,
        group_id: i64,
        device: &DeviceId,
        records: &[SealedRecord],
    ) -> Result<Placement, RouteError> {
        if let Some(limit) = self.max_envelope() {
            let too_large = records
                .iter()
                .map(|r| (r.seq, envelope::encoded_len(device, r)))
                .find(|&(_, size)| size > limit);
            if let Some((seq, size)) = too_large {
                return Err(RouteError::RecordTooLarge { seq, size, limit });
            }
        }
        let received_at_micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let mut avoid = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            if !self.lease.is_valid() {
                return Err(RouteError::Fenced);
            }
            let ticket = self.flights.begin(group_id).ok_or_else(|| {
                self.reload_wanted.notify_one();
                RouteError::UnknownGroup
            })?;
            let Some(entry) = self.namespaces.get(ticket.route.namespace_id) else {
                self.reload_wanted.notify_one();
                return Err(RouteError::UnknownNamespace);
            };
            let epoch = u64::try_from(ticket.route.epoch).unwrap_or(0);
            let items: Vec<(String, Bytes)> = records
                .iter()
                .map(|r| {
                    let envelope = envelope::encode(epoch, received_at_micros, device, r);
                    (r.message_id(device), envelope)
                })
                .collect();
            let target = Target {
                group_id,
                flight: ticket.flight(),
                epoch: ticket.route.epoch,
                queue: &ticket.route.queue,
            };
            match self.publish(&entry, &target, &items).await {
                Ok(()) => {
                    let highest = records.iter().map(|r| r.seq).max().unwrap_or(0);
                    self.note_acked(group_id, ticket.route.epoch, device, highest);
                    return Ok(Placement {
                        namespace: entry.info.name.clone(),
                        region: entry.info.region.clone(),
                        epoch: ticket.route.epoch,
                    });
                }
                Err(Failure::Unrecorded) => return Err(RouteError::EpochUnrecorded),
                Err(Failure::Transient(e)) => {
                    tracing::debug!(namespace = %entry.info.name, error = %e, "publish failed");
                    return Err(RouteError::RegionUnavailable);
                }
                // A namespace whose limit was not known yet above.
                Err(Failure::TooLarge { index, limit }) => {
                    let (seq, size) = (records[index].seq, items[index].1.len());
                    return Err(RouteError::RecordTooLarge { seq, size, limit });
                }
                Err(Failure::Tripped(trouble)) => {
                    let (flight, failed_epoch) = (ticket.flight().clone(), ticket.route.epoch);
                    drop(ticket);
                    avoid.push(entry.info.id);
                    Box::pin(self.fail_over(
                        group_id,
                        &flight,
                        failed_epoch,
                        &entry,
                        trouble,
                        &avoid,
                    ))
                    .await?;
                }
            }
        }
        Err(RouteError::NoRegion)
    }

    /// Records, once per group and epoch, that this instance publishes to
    /// `epoch` — before its first publish there that could reach the
    /// broker (the queue was ensured on this connection: a namespace never
    /// reached gets none), and while its flight ticket keeps the epoch from
    /// being sealed. The worker follows past an old epoch nobody recorded
    /// without reading it (senders moved to a mistyped endpoint and
    /// straight back). Without the control plane the first record of a new
    /// epoch is refused (503), never published unrecorded.
    async fn record_publishing(&self, target: &Target<'_>) -> Result<(), Failure> {
        let (group_id, epoch) = (target.group_id, target.epoch);
        if target.flight.recorded(epoch) {
            return Ok(());
        }
        // Boxed, as `Pooled::ensure_queue` boxes creating a queue: every
        // publish's future would carry this database call's size otherwise.
        let record = Box::pin(georelay_store::routing::record_publishing(
            &self.pool,
            group_id,
            epoch,
            self.instance,
        ));
        match tokio::time::timeout(self.config.limits.request_deadline, record).await {
            Ok(Ok(())) => {
                target.flight.set_recorded(epoch);
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::warn!(group_id, epoch, error = %e, "cannot record the first publish to a new epoch: refusing records until the control plane answers");
                Err(Failure::Unrecorded)
            }
            Err(_) => {
                tracing::warn!(group_id, epoch, "the control plane did not answer in time to record the first publish to a new epoch: refusing records until it does");
                Err(Failure::Unrecorded)
            }
        }
    }

    async fn publish(
        &self,
        entry: &NsEntry,
        target: &Target<'_>,
        items: &[(String, Bytes)],
    ) -> Result<(), Failure> {
        let queue = target.queue;
        let rt = &entry.rt;
        if let Some(trouble) = rt.breaker_open() {
            return Err(Failure::Tripped(trouble));
        }
        let Some(conn) = &rt.conn else {
            return Err(Failure::Tripped(Trouble::Down));
        };
        let mut retried = false;
        loop {
            if let Err(e) = conn.ensure_queue(queue).await {
                return Err(self.failed(entry, e));
            }
            self.record_publishing(target).await?;
            let started = Instant::now();
            let result = match items {
                [(id, envelope)] => rt
                    .lanes
                    .publish(
                        conn,
                        queue,
                        target.epoch as u64,
                        id.clone(),
                        envelope.clone(),
                        self.config.limits.publish_deadline,
                    )
                    .await
                    .map_err(|e| (0, e)),
                items => {
                    let (messages, firsts) = bundles::pack(items, conn.namespace().max_payload());
                    let result = Box::pin(conn.namespace().publish_batch(queue, &messages)).await;
                    result.map_err(|(at, e)| (firsts[at], e))
                }
            };
            let elapsed = started.elapsed();
            rt.publish_seconds.observe(elapsed.as_secs_f64());
            match result {
                Ok(()) => {
                    let tripped = rt.breaker.lock().success(elapsed, Instant::now());
                    if let Some(trouble) = tripped {
                        self.note_trip(entry, trouble);
                    }
                    return Ok(());
                }
                // The queue may be gone (a region restarted on an empty
                // store): create it and try once more.
                Err((_, e)) if e.kind() == ErrorKind::Rejected && !retried => {
                    retried = true;
                    conn.forget_queue(queue);
                }
                Err((index, e)) if e.kind() == ErrorKind::TooLarge => {
                    let limit = e.limit().unwrap_or(0);
                    return Err(Failure::TooLarge { index, limit });
                }
                Err((_, e)) => return Err(self.failed(entry, e)),
            }
        }
    }

    fn failed(&self, entry: &NsEntry, e: TransportError) -> Failure {
        let tripped = entry.rt.breaker.lock().failure(e.kind(), Instant::now());
        match tripped {
            Some(trouble) => {
                self.note_trip(entry, trouble);
                Failure::Tripped(trouble)
            }
            None => Failure::Transient(e),
        }
    }

    fn note_trip(&self, entry: &NsEntry, trouble: Trouble) {
        let gauge = self
            .metrics
            .breaker_open
            .with_label_values(&[&entry.info.name]);
        if gauge.get() == 0 {
            gauge.set(1);
            tracing::warn!(namespace = %entry.info.name, region = %entry.info.region, trouble = ?trouble, "breaker tripped");
        }
    }

    /// Probes every namespace whose breaker is open here or that the control
    /// plane marks unhealthy. A namespace that answered well for
    /// `recover_probes` probes in a row gets its breaker closed and is marked
    /// healthy (so it can be chosen again); senders do not move back by
    /// themselves.
    pub async fn probe_round(&self) {
        let snapshot = self.namespaces.snapshot();
        let probes = snapshot.namespaces.values().filter_map(|entry| {
            let open = entry.rt.breaker_open().is_some();
            let unhealthy = entry.info.enabled && entry.info.health != Health::Healthy;
            let conn = entry.rt.conn.clone()?;
            if !(open || unhealthy) {
                return None;
            }
            Some(async move {
                let result = conn.namespace().probe().await.map_err(|e| e.kind());
                (entry, result)
            })
        });
        for (entry, result) in join_all(probes).await {
            let recovered = entry.rt.breaker.lock().probe(result);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record's publish runs as a spawned task, and a spawn copies
    /// the future into the task: a cold path's large future (creating a
    /// queue was 6 KiB of it; failing over, recording a new epoch and a
    /// batch's publish another 1.5 KiB) must not be carried by every
    /// publish. Under 1 KiB the task is allocated from glibc's per-thread
    /// cache (blocks up to 1,032 bytes) instead of its shared bins.
    #[tokio::test]
    async fn a_publish_future_stays_small() {
        let pool =
            georelay_store::PgPool::connect_lazy("postgres://nobody@127.0.0.1/none").unwrap();
        let senders = Senders::new(
            SendersConfig {
                limits: Limits::default(),
                breaker: BreakerConfig::default(),
                cooldown: Duration::from_secs(1),
                lease: Duration::from_secs(5),
            },
            pool,
            Arc::new(georelay_testkit::master_key().unwrap()),
            uuid::Uuid::nil(),
            Metrics::new().unwrap(),
        );
        let device = DeviceId::parse("plug-1").unwrap();
        let publish = senders.deliver(1, &device, &[]);
        let size = std::mem::size_of_val(&publish);
        assert!(size <= 1024, "a publish's future is {size} bytes");
    }
}
