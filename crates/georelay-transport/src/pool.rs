//! One connection per namespace, shared by everything in a process that
//! talks to it (ingest's publishes and probes, the worker's reads), and
//! replaced when the control plane describes the namespace differently.
//!
//! Keyed by namespace id. [`NamespacePool::get`] returns the pooled
//! connection while its [`Triplet`] is the one asked for, and connects anew
//! when it is not: a rotated key, an edited endpoint or a changed transport
//! takes effect at the next call, without a restart. [`NamespacePool::retain`]
//! drops connections the control plane no longer describes that way.
//!
//! A pooled connection also remembers which queues it has ensured, so a new
//! connection (perhaps to a new, empty broker) ensures them again.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::{Limits, Namespace, TransportError, Triplet};

/// A connection from the pool. Cheap to clone; clones share the connection
/// and its set of ensured queues.
#[derive(Debug, Clone)]
pub struct Pooled {
    namespace: Namespace,
    triplet: Arc<Triplet>,
    ensured: Arc<Mutex<HashSet<String>>>,
}

impl Pooled {
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// Whether `other` is the very same pooled connection.
    pub fn same(&self, other: &Pooled) -> bool {
        Arc::ptr_eq(&self.ensured, &other.ensured)
    }

    /// [`Namespace::ensure_queue`], once per queue for this connection.
    pub async fn ensure_queue(&self, queue: &str) -> Result<(), TransportError> {
        if self.ensured.lock().contains(queue) {
            return Ok(());
        }
        // Boxed: creating a queue is a large future, and every publish's
        // future would carry its size (and copy it on each spawn) otherwise.
        Box::pin(self.namespace.ensure_queue(queue)).await?;
        self.ensured.lock().insert(queue.to_owned());
        Ok(())
    }

    /// Forgets that `queue` exists (a region restarted on an empty store may
    /// have lost it): the next [`ensure_queue`](Self::ensure_queue) creates it.
    pub fn forget_queue(&self, queue: &str) {
        self.ensured.lock().remove(queue);
    }
}

/// The process's connections, one per namespace id.
#[derive(Debug)]
pub struct NamespacePool {
    limits: Limits,
    conns: Mutex<HashMap<i64, Pooled>>,
}

impl NamespacePool {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// The pooled connection to namespace `id` if it was made for `triplet`;
    /// otherwise a new one, which replaces it. Connecting happens outside
    /// the pool's lock, so one slow namespace does not hold up the others.
    pub async fn get(&self, id: i64, triplet: &Triplet) -> Result<Pooled, TransportError> {
        if let Some(p) = self.cached(id).filter(|p| *p.triplet == *triplet) {
            return Ok(p);
        }
        let namespace = Namespace::connect(triplet, self.limits.clone()).await?;
        let fresh = Pooled {
            namespace,
            triplet: Arc::new(triplet.clone()),
            ensured: Arc::new(Mutex::new(HashSet::new())),
        };
        let mut conns = self.conns.lock();
        // Another caller may have connected with the same triplet meanwhile:
        // keep one connection.
        match conns.get(&id) {
            Some(p) if *p.triplet == *triplet => Ok(p.clone()),
            _ => {
                if conns.contains_key(&id) {
                    tracing::info!(
                        namespace_id = id,
                        endpoint = %crate::redacted_endpoint(&triplet.endpoint),
                        "namespace changed (endpoint, transport or key): reconnected"
                    );
                }
                conns.insert(id, fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// The pooled connection to namespace `id`, whatever it was made for.
    pub fn cached(&self, id: i64) -> Option<Pooled> {
        self.conns.lock().get(&id).cloned()
    }

    /// Every pooled connection.
    pub fn all(&self) -> Vec<Pooled> {
        self.conns.lock().values().cloned().collect()
    }

    /// Keeps only the connections for which `keep(id, triplet)` holds: the
    /// control plane's current description of each namespace.
    pub fn retain(&self, mut keep: impl FnMut(i64, &Triplet) -> bool) {
        self.conns.lock().retain(|id, p| keep(*id, &p.triplet));
    }
}
