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

use georelay_core::{MasterKey, SecretError};
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
    /// The row's sealed key does not open (a key pasted in by hand, a row
    /// copied or restored from elsewhere): that device is refused, briefly
    /// cached like an unknown one so its retries are not a query each.
    Broken(SecretError, Instant),
}

#[derive(Debug)]
pub struct Devices {
    pool: PgPool,
    master: Arc<MasterKey>,
    cache: RwLock<HashMap<String, Entry>>,
    lookups: tokio::sync::Semaphore,
    /// How long a known device's entry is trusted without a notification.
    known_ttl: Duration,
}

impl Devices {
    pub fn new(pool: PgPool, master: Arc<MasterKey>) -> Self {
        Self::with_ttl(pool, master, KNOWN_TTL)
    }

    /// [`new`](Self::new) with another life for known devices' entries: at
    /// worst, how long a disabled device is still accepted.
    pub fn with_ttl(pool: PgPool, master: Arc<MasterKey>, known_ttl: Duration) -> Self {
        Self {
            pool,
            master,
            cache: RwLock::new(HashMap::new()),
            lookups: tokio::sync::Semaphore::new(MAX_LOOKUPS),
            known_ttl,
        }
    }

    /// The device's group, state and key; `None` if there is no such device;
    /// [`StoreError::Secret`] if its row's sealed key does not open.
    pub async fn get(&self, id: &str) -> Result<Option<Arc<DeviceAuth>>, StoreError> {
        if let Some(cached) = self.cached(id) {
            return cached;
        }
        // Never closed, so acquiring only waits.
        let _permit = self.lookups.acquire().await;
        // Another request may have looked it up meanwhile.
        if let Some(cached) = self.cached(id) {
            return cached;
        }
        let found = match device_auth(&self.pool, &self.master, id).await {
            Ok(found) => found.map(Arc::new),
            Err(StoreError::Secret(e)) => {
                self.cache
                    .write()
                    .insert(id.to_owned(), Entry::Broken(e.clone(), Instant::now()));
                return Err(StoreError::Secret(e));
            }
            Err(e) => return Err(e),
        };
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
    fn cached(&self, id: &str) -> Option<Result<Option<Arc<DeviceAuth>>, StoreError>> {
        match self.cache.read().get(id) {
            Some(Entry::Known(auth, at)) if at.elapsed() < self.known_ttl => {
                Some(Ok(Some(auth.clone())))
            }
            Some(Entry::Unknown(at)) if at.elapsed() < UNKNOWN_TTL => Some(Ok(None)),
            Some(Entry::Broken(e, at)) if at.elapsed() < UNKNOWN_TTL => {
                Some(Err(StoreError::Secret(e.clone())))
            }
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
