//! Device keys, cached (ingest verifies with them, the worker opens records). A miss reads the sealed key from `devices` and opens
//! it with the master key; a `NOTIFY` on `devices` drops that entry, a lost
//! listener connection drops them all, and entries expire anyway
//! ([`KNOWN_TTL`]), so a disabled device is refused within a second or two
//! normally and within the TTL at worst. Unknown ids are cached briefly too,
//! so a flood of made-up ids does not become a flood of queries; that part of
//! the cache is bounded. And at most [`MAX_LOOKUPS`] look-ups run at once,
//! whatever the number of requests: a flood of made-up ids (each a miss)
//! waits for those, and never holds every connection of the pool, which the
//! lease heartbeat and failover need.

use georelay_core::MasterKey;
use sqlx::PgPool;

use crate::routing::{device_auth, DeviceAuth};
use crate::StoreError;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const KNOWN_TTL: Duration = Duration::from_secs(60);
const UNKNOWN_TTL: Duration = Duration::from_secs(5);
const MAX_UNKNOWN: usize = 10_000;
/// Device look-ups in the database at once, per process.
pub const MAX_LOOKUPS: usize = 4;

#[derive(Debug)]
enum Entry {
    Known(Arc<DeviceAuth>, Instant),
    Unknown(Instant),
}

#[derive(Debug)]
pub struct Devices {
    pool: PgPool,
    master: Arc<MasterKey>,
    cache: RwLock<HashMap<String, Entry>>,
    lookups: tokio::sync::Semaphore,
}

impl Devices {
    pub fn new(pool: PgPool, master: Arc<MasterKey>) -> Self {
        Self {
            pool,
            master,
            cache: RwLock::new(HashMap::new()),
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
        }
    }

    /// The device's group, state and key; `None` if there is no such device.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<DeviceAuth>>, StoreError> {
        if let Some(cached) = self.cached(id) {
            return Ok(cached);
        }
        // Never closed, so acquiring only waits.
        let _permit = self.lookups.acquire().await;
        // Another request may have looked it up meanwhile.
        if let Some(cached) = self.cached(id) {
            return Ok(cached);
        }
        let found = device_auth(&self.pool, &self.master, id)
            .await?
            .map(Arc::new);
        let mut cache = self.cache.write();
        let now = Instant::now();
        match &found {
            Some(auth) => {
                cache.insert(id.to_owned(), Entry::Known(auth.clone(), now));
            }
            None => {
                if cache.len() >= MAX_UNKNOWN {
                    cache.retain(|_, e| matches!(e, Entry::Known(..)));
                }
                cache.insert(id.to_owned(), Entry::Unknown(now));
            }
        }
        Ok(found)
    }

    /// The cached answer for `id`, if there is a fresh one.
    fn cached(&self, id: &str) -> Option<Option<Arc<DeviceAuth>>> {
        match self.cache.read().get(id) {
            Some(Entry::Known(auth, at)) if at.elapsed() < KNOWN_TTL => Some(Some(auth.clone())),
            Some(Entry::Unknown(at)) if at.elapsed() < UNKNOWN_TTL => Some(None),
            _ => None,
        }
    }

    /// Forgets one device (it changed).
    pub fn invalidate(&self, id: &str) {
        self.cache.write().remove(id);
    }

    /// Forgets every device (changes may have been missed).
    pub fn clear(&self) {
        self.cache.write().clear();
    }
}
