//! The namespaces as the control plane last described them, each with its
//! pooled connection, its breaker and its publish histogram. Reloaded on
//! `NOTIFY` and by polling; a namespace keeps its breaker across reloads
//! while its connection is the same (a changed triplet means a new
//! connection and a fresh breaker).

use georelay_store::routing::{RouteNamespace, Trouble};
use georelay_transport::{NamespacePool, Pooled};
use parking_lot::{Mutex, RwLock};
use prometheus::Histogram;
use std::collections::HashMap;
use std::sync::Arc;

use super::bundles::Lanes;
use crate::breaker::{Breaker, BreakerConfig};
use crate::metrics::Metrics;

/// What lives per namespace across reloads.
#[derive(Debug)]
pub struct NsRuntime {
    name: String,
    /// None when the namespace cannot be connected to (bad configuration):
    /// it counts as down.
    pub conn: Option<Pooled>,
    pub breaker: Mutex<Breaker>,
    /// This namespace's publish latency histogram (label looked up once).
    pub publish_seconds: Histogram,
    /// Single-record publishes, joined per queue into bundles.
    pub lanes: Lanes,
}

impl NsRuntime {
    pub fn breaker_open(&self) -> Option<Trouble> {
        self.breaker.lock().open()
    }

    fn serves(&self, info: &RouteNamespace, conn: Option<&Pooled>) -> bool {
        self.name == info.name
            && match (&self.conn, conn) {
                (Some(a), Some(b)) => a.same(b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// One namespace: the control plane's row and its runtime.
#[derive(Debug)]
pub struct NsEntry {
    pub info: RouteNamespace,
    pub rt: Arc<NsRuntime>,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub namespaces: HashMap<i64, Arc<NsEntry>>,
}

/// The snapshot in force, and what makes the next one.
#[derive(Debug)]
pub struct Namespaces {
    pool: NamespacePool,
    breaker: BreakerConfig,
    metrics: Metrics,
    snapshot: RwLock<Arc<Snapshot>>,
    runtimes: Mutex<HashMap<i64, Arc<NsRuntime>>>,
}

impl Namespaces {
    pub fn new(pool: NamespacePool, breaker: BreakerConfig, metrics: Metrics) -> Self {
        Self {
            pool,
            breaker,
            metrics,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            runtimes: Mutex::new(HashMap::new()),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().clone()
    }

    pub fn get(&self, id: i64) -> Option<Arc<NsEntry>> {
        self.snapshot.read().namespaces.get(&id).cloned()
    }

    pub fn name(&self, id: i64) -> String {
        self.get(id)
            .map_or_else(|| format!("#{id}"), |e| e.info.name.clone())
    }

    /// Makes `namespaces` the snapshot in force. New or changed namespaces
    /// get a connection (from the pool) and a breaker; the others keep
    /// theirs; connections to namespaces no longer listed are closed.
    pub async fn load(&self, namespaces: Vec<RouteNamespace>) {
        self.pool.retain(|id, triplet| {
            namespaces
                .iter()
                .any(|n| n.id == id && n.triplet == *triplet)
        });
        let mut next = HashMap::new();
        for info in namespaces {
            let rt = self.runtime_for(&info).await;
            next.insert(info.id, Arc::new(NsEntry { info, rt }));
        }
        *self.snapshot.write() = Arc::new(Snapshot { namespaces: next });
    }

    async fn runtime_for(&self, info: &RouteNamespace) -> Arc<NsRuntime> {
        let conn = match self.pool.get(info.id, &info.triplet).await {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::warn!(namespace = %info.name, error = %e, "cannot set up a connection to the namespace; it counts as down");
                None
            }
        };
        let mut runtimes = self.runtimes.lock();
        if let Some(rt) = runtimes
            .get(&info.id)
            .filter(|rt| rt.serves(info, conn.as_ref()))
        {
            return rt.clone();
        }
        let rt = Arc::new(NsRuntime {
            name: info.name.clone(),
            conn,
            breaker: Mutex::new(Breaker::new(self.breaker.clone())),
            publish_seconds: self
                .metrics
                .publish_seconds
                .with_label_values(&[&info.name]),
            lanes: Lanes::default(),
        });
        runtimes.insert(info.id, rt.clone());
        rt
    }
}
