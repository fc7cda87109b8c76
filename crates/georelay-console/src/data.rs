//! What the pages show, loaded from the control plane into one snapshot:
//! again at every NOTIFY on the `georelay` channel (a move, a namespace or
//! device change) and every poll interval in any case. Queue depths come
//! from the brokers themselves, every depth interval, each call bounded.
//!
//! When the database does not answer, the pages keep the last snapshot and
//! say since when it is stale.

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use georelay_core::MasterKey;
use georelay_store::control::{self, Group, Namespace, Process, TrailEpoch};
use georelay_store::dead_letters::{self, ByReason, Letter};
use georelay_store::doctor::{self, Problem};
use georelay_store::gaps::{self, OpenGap};
use georelay_store::overview::{self, DrainProgress, Event, Fleet, OpenBreaker, Seen};
use georelay_store::{routing, PgPool, StoreError};
use georelay_transport::{ErrorKind, Limits, NamespacePool};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::Config;

/// A queue's depth as the broker last told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Depth {
    Messages(u64),
    /// The broker refused the question: it has no such queue (none was
    /// ever published to there).
    NoQueue(String),
    /// The broker could not be asked (down, key refused, timed out).
    Unknown(String),
}

/// Everything the pages show, as of `at`.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub at: Option<DateTime<Utc>>,
    /// Set when the last load failed: the rest is from `at`.
    pub stale: Option<String>,
    pub problems: Vec<Problem>,
    pub groups: Vec<Group>,
    pub trail: Vec<TrailEpoch>,
    pub progress: Vec<DrainProgress>,
    /// Records stored per minute, per group, over the last minute.
    pub per_minute: HashMap<String, f64>,
    pub namespaces: Vec<Namespace>,
    pub ingest_live: i64,
    pub open_breakers: Vec<OpenBreaker>,
    /// `(namespace, queue)` → depth.
    pub depths: BTreeMap<(String, String), Depth>,
    pub processes: Vec<Process>,
    pub events: Vec<Event>,
    pub dead: Vec<ByReason>,
    pub newest_dead: Vec<Letter>,
    pub fleets: Vec<Fleet>,
    pub devices: Vec<Seen>,
    /// Devices waiting for records stranded in an abandoned epoch.
    pub stranded: Vec<OpenGap>,
}

/// Newest audit events a page shows.
const EVENTS: i64 = 50;
/// Newest dead letters a page shows.
const NEWEST_DEAD: i64 = 10;
/// Most devices a page lists (the silent ones first).
const DEVICES: i64 = 200;
/// Least time between two loads, however often NOTIFY fires.
const MIN_RELOAD: Duration = Duration::from_millis(250);

impl Snapshot {
    async fn load(
        pool: &PgPool,
        master: &MasterKey,
        silent_after: Duration,
    ) -> Result<Self, StoreError> {
        // Before any read: everything committed before it is in the load.
        let at = Utc::now();
        let (live, open) = overview::breakers(pool).await?;
        Ok(Self {
            at: Some(at),
            stale: None,
            problems: doctor::problems(pool, Some(master)).await?,
            groups: control::list_groups(pool).await?,
            trail: control::undrained_trail(pool).await?,
            progress: overview::drain_progress(pool).await?,
            per_minute: HashMap::new(),
            namespaces: control::list_namespaces(pool).await?,
            ingest_live: live,
            open_breakers: open,
            depths: BTreeMap::new(),
            processes: control::list_processes(pool).await?,
            events: overview::recent_events(pool, EVENTS).await?,
            dead: dead_letters::by_reason(pool).await?,
            newest_dead: dead_letters::list(
                pool,
                &dead_letters::Filter {
                    limit: NEWEST_DEAD,
                    ..dead_letters::Filter::default()
                },
            )
            .await?,
            fleets: overview::fleets(pool, silent_after).await?,
            devices: overview::devices(pool, silent_after, DEVICES).await?,
            stranded: gaps::open(pool, None).await?,
        })
    }
}

/// Keeps the snapshot fresh; pages and live streams read it from `rx`.
pub struct Loader {
    pool: PgPool,
    master: Arc<MasterKey>,
    config: Config,
    depths: Arc<Mutex<BTreeMap<(String, String), Depth>>>,
    /// `(when, stored_total per group)` over the last minute.
    samples: VecDeque<(Instant, HashMap<String, i64>)>,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Poked by NOTIFY and by the console's own actions: load now.
    changed: Arc<Notify>,
}

/// The reading side of a [`Loader`].
#[derive(Debug, Clone)]
pub struct Snapshots {
    pub rx: watch::Receiver<Arc<Snapshot>>,
    changed: Arc<Notify>,
}

impl Snapshots {
    /// Asks for a load now and waits (up to `within`) for one that began
    /// after the ask: after an action, the next page shows its outcome. (A
    /// load already under way when the action committed may not see it.)
    pub async fn refresh(&self, within: Duration) {
        let asked = Utc::now();
        let mut rx = self.rx.clone();
        self.changed.notify_one();
        let fresh = async {
            while rx.borrow_and_update().at.is_none_or(|at| at < asked) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(within, fresh).await;
    }
}

impl Loader {
    pub fn new(pool: PgPool, master: Arc<MasterKey>, config: Config) -> (Self, Snapshots) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let changed = Arc::new(Notify::new());
        let loader = Self {
            pool,
            master,
            config,
            depths: Arc::default(),
            samples: VecDeque::new(),
            tx,
            changed: changed.clone(),
        };
        (loader, Snapshots { rx, changed })
    }

    /// Loads until `stop`; spawns the NOTIFY listener and the depth poller.
    pub async fn run(mut self, stop: CancellationToken) {
        let changed = self.changed.clone();
        tokio::spawn(listen(self.pool.clone(), changed.clone(), stop.clone()));
        tokio::spawn(poll_depths(
            self.pool.clone(),
            self.master.clone(),
            self.tx.subscribe(),
            self.config.depth_interval,
            self.depths.clone(),
            stop.clone(),
        ));
        loop {
            self.reload().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changed.notified() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
            tokio::time::sleep(MIN_RELOAD).await;
        }
    }

    async fn reload(&mut self) {
        let load = Snapshot::load(&self.pool, &self.master, self.config.silent_after);
        let loaded = match tokio::time::timeout(self.config.poll_interval * 5, load).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the database did not answer in time".to_owned()),
        };
        let snapshot = match loaded {
            Ok(mut s) => {
                s.per_minute = self.per_minute(&s.progress);
                s.depths = self.depths.lock().clone();
                s
            }
            Err(e) => {
                let mut s = (**self.tx.borrow()).clone();
                if s.stale.is_none() {
                    tracing::warn!(error = %e, "console: cannot load the control plane; showing the last snapshot");
                }
                s.stale = Some(e);
                s.depths = self.depths.lock().clone();
                s
            }
        };
        self.tx.send_replace(Arc::new(snapshot));
    }

    /// Records per minute per group, from the rise of `stored_total` over
    /// the samples of the last minute.
    fn per_minute(&mut self, progress: &[DrainProgress]) -> HashMap<String, f64> {
        let now = Instant::now();
        let totals: HashMap<String, i64> = progress
            .iter()
            .map(|p| (p.group.clone(), p.stored_total))
            .collect();
        self.samples.push_back((now, totals.clone()));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - *t > Duration::from_secs(60))
        {
            self.samples.pop_front();
        }
        let Some((first, old)) = self.samples.front() else {
            return HashMap::new();
        };
        let span = (now - *first).as_secs_f64();
        if span < 1.0 {
            return HashMap::new();
        }
        totals
            .iter()
            .filter_map(|(g, total)| {
                let before = old.get(g)?;
                Some((g.clone(), (total - before).max(0) as f64 * 60.0 / span))
            })
            .collect()
    }
}

/// Wakes the loader at each notification on the control plane's channel.
async fn listen(pool: PgPool, changed: Arc<Notify>, stop: CancellationToken) {
    loop {
        let listened = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
            listener.listen("georelay").await?;
            loop {
                listener.recv().await?;
                changed.notify_one();
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            result = listened => {
                let result: Result<(), sqlx::Error> = result;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "console: LISTEN failed; polling until it answers again");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Asks each broker how deep each group's queue is: every enabled namespace
/// and every namespace still in an undrained trail.
async fn poll_depths(
    pool: PgPool,
    master: Arc<MasterKey>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    every: Duration,
    depths: Arc<Mutex<BTreeMap<(String, String), Depth>>>,
    stop: CancellationToken,
) {
    let connections = NamespacePool::new(Limits::default());
    loop {
        let snapshot = snapshots.borrow().clone();
        if let Ok(Ok(found)) = tokio::time::timeout(
            every * 4,
            measure(&pool, &master, &snapshot, &connections, every),
        )
        .await
        {
            *depths.lock() = found;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The depths of the groups' queues in the namespaces the latest snapshot
/// names; the routing is read for the keys to connect with.
async fn measure(
    pool: &PgPool,
    master: &MasterKey,
    snapshot: &Snapshot,
    connections: &NamespacePool,
    bound: Duration,
) -> Result<BTreeMap<(String, String), Depth>, StoreError> {
    let routing = routing::load_routing(pool, master).await?;
    let (trail, groups) = (&snapshot.trail, &snapshot.groups);
    connections.retain(|id, triplet| {
        routing
            .namespaces
            .iter()
            .any(|n| n.id == id && &n.triplet == triplet)
    });
    let mut wanted: Vec<(&routing::RouteNamespace, &str)> = Vec::new();
    for n in &routing.namespaces {
        for g in groups {
            let in_trail = trail
                .iter()
                .any(|t| t.group == g.name && t.namespace == n.name);
            if n.enabled || in_trail {
                wanted.push((n, g.queue.as_str()));
            }
        }
    }
    let asked = wanted.iter().map(|(n, queue)| async move {
        let depth = async {
            let conn = connections.get(n.id, &n.triplet).await?;
            conn.namespace().depth(queue).await
        };
        let depth = match tokio::time::timeout(bound, depth).await {
            Ok(Ok(d)) => Depth::Messages(d),
            Ok(Err(e)) if e.kind() == ErrorKind::Rejected => Depth::NoQueue(e.to_string()),
            Ok(Err(e)) => Depth::Unknown(e.to_string()),
            Err(_) => Depth::Unknown(format!("no answer within {bound:?}")),
        };
        ((n.name.clone(), (*queue).to_owned()), depth)
    });
    Ok(join_all(asked).await.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After an action, a load that was already under way when it committed
    /// does not count: the page waits for one that began after (the console
    /// test saw the senders' old namespace once when it did).
    #[tokio::test]
    async fn refresh_waits_for_a_load_that_began_after_it_asked() {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let changed = Arc::new(Notify::new());
        let snapshots = Snapshots {
            rx,
            changed: changed.clone(),
        };
        let asked = Utc::now();
        let loader = tokio::spawn(async move {
            changed.notified().await;
            let under_way = Snapshot {
                at: Some(asked - chrono::Duration::milliseconds(50)),
                ..Snapshot::default()
            };
            tx.send_replace(Arc::new(under_way));
            tokio::time::sleep(Duration::from_millis(200)).await;
            let fresh = Snapshot {
                at: Some(Utc::now()),
                ..Snapshot::default()
            };
            tx.send_replace(Arc::new(fresh));
            tx
        });
        snapshots.refresh(Duration::from_secs(5)).await;
        assert!(
            snapshots.rx.borrow().at.is_some_and(|at| at >= asked),
            "refresh returned with a load that began before it asked"
        );
        drop(loader.await.unwrap());
    }
}
