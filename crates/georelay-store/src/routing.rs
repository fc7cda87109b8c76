//! The senders' view of the control plane and the one transaction that moves
//! them (docs/DESIGN.md "Senders", step 3).
//!
//! Ingest instances keep a [`Routing`] snapshot in memory, reloaded on
//! `NOTIFY georelay` and by polling. When a namespace's breaker trips,
//! [`fail_over`] locks the group row and either adopts a move another process
//! already made or picks the next namespace, and moves the group through the
//! trigger (which bumps the epoch, opens the trail row, audits and notifies).
//! The drain worker uses the same function when it declares trouble.

use georelay_core::secret::{device_key_context, namespace_key_context};
use georelay_core::{DeviceKey, MasterKey, SecretError, TransportKind, Triplet};
use sqlx::PgPool;
use std::time::Duration;
use zeroize::Zeroizing;

use crate::control::{set_actor, Actor};
use crate::StoreError;

/// A routing group as the senders need it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RouteGroup {
    pub id: i64,
    pub name: String,
    pub queue: String,
    pub epoch: i64,
    pub sender_namespace_id: i64,
    pub drain_namespace_id: i64,
    pub failover_enabled: bool,
}

/// A namespace with its key opened: what a transport connects with.
#[derive(Debug, Clone)]
pub struct RouteNamespace {
    pub id: i64,
    pub name: String,
    pub region: String,
    pub triplet: Triplet,
    pub priority: i32,
    pub enabled: bool,
    pub health: Health,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Degraded,
    Down,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Down => "down",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "down" => Self::Down,
            "degraded" => Self::Degraded,
            _ => Self::Healthy,
        }
    }
}

/// Everything the senders route by, read in one transaction.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub groups: Vec<RouteGroup>,
    pub namespaces: Vec<RouteNamespace>,
    /// Namespaces left out because their sealed key does not open (a row
    /// edited by hand or restored from another installation): one bad row
    /// must not stop the routing of every other namespace.
    pub unopenable: Vec<Unopenable>,
}

/// A namespace whose sealed key does not open with this master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unopenable {
    pub id: i64,
    pub name: String,
    pub why: String,
}

#[derive(sqlx::FromRow)]
struct NamespaceRow {
    id: i64,
    name: String,
    region: String,
    transport: String,
    endpoint: String,
    key_name: Option<String>,
    key_sealed: Option<Vec<u8>>,
    priority: i32,
    enabled: bool,
    health: String,
}

/// Reads groups and namespaces (opening SAS keys with `master`).
pub async fn load_routing(pool: &PgPool, master: &MasterKey) -> Result<Routing, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let groups: Vec<RouteGroup> = sqlx::query_as(
        "SELECT id, name, queue, epoch, sender_namespace_id, drain_namespace_id, failover_enabled
         FROM routing_groups ORDER BY id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let rows: Vec<NamespaceRow> = sqlx::query_as(
        "SELECT id, name, region, transport, endpoint, key_name, key_sealed, priority, enabled, health
         FROM namespaces ORDER BY priority, id",
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut namespaces = Vec::with_capacity(rows.len());
    let mut unopenable = Vec::new();
    for r in rows {
        let key = match r
            .key_sealed
            .as_ref()
            .map(|sealed| open_text(master, &namespace_key_context(&r.name), sealed))
            .transpose()
        {
            Ok(key) => key,
            Err(StoreError::Secret(e)) => {
                unopenable.push(Unopenable {
                    id: r.id,
                    name: r.name,
                    why: e.to_string(),
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        namespaces.push({
            let transport = TransportKind::parse(&r.transport).ok_or_else(|| {
                StoreError::Inconsistent(format!(
                    "namespace {} has an unknown transport {:?}",
                    r.name, r.transport
                ))
            })?;
            RouteNamespace {
                id: r.id,
                name: r.name,
                region: r.region,
                triplet: Triplet {
                    transport,
                    endpoint: r.endpoint,
                    key_name: r.key_name,
                    key,
                },
                priority: r.priority,
                enabled: r.enabled,
                health: Health::parse(&r.health),
            }
        });
    }
    Ok(Routing {
        groups,
        namespaces,
        unopenable,
    })
}

fn open_text(
    master: &MasterKey,
    context: &str,
    sealed: &[u8],
) -> Result<Zeroizing<String>, StoreError> {
    let bytes = master.open(context, sealed)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| SecretError::Format)?;
    Ok(Zeroizing::new(text.to_owned()))
}

/// A device as ingest verifies it.
#[derive(Debug, Clone)]
pub struct DeviceAuth {
    pub group_id: i64,
    pub enabled: bool,
    pub key: DeviceKey,
}

/// The device's group, whether it is enabled, and its key (opened with
/// `master`); `None` if no such device.
pub async fn device_auth(
    pool: &PgPool,
    master: &MasterKey,
    id: &str,
) -> Result<Option<DeviceAuth>, StoreError> {
    let row: Option<(i64, bool, Vec<u8>)> =
        sqlx::query_as("SELECT group_id, enabled, key_sealed FROM devices WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    let Some((group_id, enabled, sealed)) = row else {
        return Ok(None);
    };
    let bytes = master.open(&device_key_context(id), &sealed)?;
    let key = DeviceKey::from_bytes(&bytes).ok_or(SecretError::Format)?;
    Ok(Some(DeviceAuth {
        group_id,
        enabled,
        key,
    }))
}

/// What [`fail_over`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failover {
    /// This call moved the group to `namespace_id`, opening `epoch`.
    Moved { namespace_id: i64, epoch: i64 },
    /// Someone else had already moved the group away from the troubled
    /// namespace: use theirs.
    Adopted { namespace_id: i64, epoch: i64 },
    /// The group's failover bit is off: nothing moved.
    Disabled,
    /// The group moved less than the cool-down ago: nothing moved.
    CoolingDown { retry_after: Duration },
    /// No enabled, not-down namespace in another region. `first` is true when
    /// this call wrote the `exhausted` event (once per episode, not per call).
    Exhausted { first: bool },
}

/// Why a namespace is troubled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Errors: refused, unreachable, hung.
    Down,
    /// It answers, but too slowly.
    Slow,
}

impl Trouble {
    pub fn health(self) -> Health {
        match self {
            Self::Down => Health::Down,
            Self::Slow => Health::Degraded,
        }
    }
}

/// Moves `group_id` away from `troubled` (docs/DESIGN.md "Senders", step 3), in one
/// transaction holding the group row's lock:
///
/// 1. if the group's senders are no longer on `troubled`, adopt that move;
/// 2. mark `troubled` down or degraded (never healthier than it is);
/// 3. with the failover bit off, or within `cooldown` of the last move (a
///    group whose senders never moved has none to wait out), stop;
/// 4. pick the enabled namespace, not down, not in `troubled`'s region and
///    not in `avoid` (namespaces the caller itself sees as broken), healthy
///    before degraded, then by priority; move the group there (the trigger
///    audits it with `actor`). None: record `exhausted` once.
pub async fn fail_over(
    pool: &PgPool,
    group_id: i64,
    troubled: i64,
    trouble: Trouble,
    avoid: &[i64],
    cooldown: Duration,
    actor: &Actor,
) -> Result<Failover, StoreError> {
    let mut tx = pool.begin().await?;
    set_actor(&mut tx, actor).await?;
    // Epoch 1: the senders never moved (moved_at is the group's creation),
    // so there is no cool-down to wait out.
    let (sender, epoch, failover_enabled, since_move): (i64, i64, bool, Option<f64>) =
        sqlx::query_as(
            "SELECT sender_namespace_id, epoch, failover_enabled,
                CASE WHEN epoch > 1 THEN extract(epoch FROM now() - moved_at)::float8 END
         FROM routing_groups WHERE id = $1 FOR UPDATE",
        )
        .bind(group_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "group",
            name: group_id.to_string(),
        })?;
    if sender != troubled {
        tx.commit().await?;
        return Ok(Failover::Adopted {
            namespace_id: sender,
            epoch,
        });
    }
    sqlx::query(
        "UPDATE namespaces SET health = $2
         WHERE id = $1 AND (health = 'healthy' OR $2 = 'down') AND health <> $2",
    )
    .bind(troubled)
    .bind(trouble.health().as_str())
    .execute(&mut *tx)
    .await?;
    if !failover_enabled {
        tx.commit().await?;
        return Ok(Failover::Disabled);
    }
    if let Some(since_move) = since_move.map(|s| Duration::from_secs_f64(s.max(0.0))) {
        if since_move < cooldown {
            tx.commit().await?;
            return Ok(Failover::CoolingDown {
                retry_after: cooldown - since_move,
            });
        }
    }
    let candidate: Option<i64> = sqlx::query_scalar(
        "SELECT n.id FROM namespaces n, namespaces t
         WHERE t.id = $1 AND n.enabled AND n.health <> 'down' AND n.region <> t.region
           AND n.id <> ALL($2)
         ORDER BY n.health = 'degraded', n.priority, n.id
         LIMIT 1",
    )
    .bind(troubled)
    .bind(avoid)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match candidate {
        Some(to) => {
            let epoch: i64 = sqlx::query_scalar(
                "UPDATE routing_groups SET sender_namespace_id = $2 WHERE id = $1 RETURNING epoch",
            )
            .bind(group_id)
            .bind(to)
            .fetch_one(&mut *tx)
            .await?;
            Failover::Moved {
                namespace_id: to,
                epoch,
            }
        }
        None => {
            let first = sqlx::query(
                "INSERT INTO failover_events (group_id, kind, from_namespace_id, epoch, actor, reason)
                 SELECT $1, 'exhausted', $2, $3, georelay_actor(), georelay_reason()
                 WHERE NOT EXISTS (
                     SELECT 1 FROM (SELECT kind FROM failover_events WHERE group_id = $1
                                    ORDER BY id DESC LIMIT 1) last
                     WHERE last.kind = 'exhausted')",
            )
            .bind(group_id)
            .bind(troubled)
            .bind(epoch)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            Failover::Exhausted { first }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

/// Sets a namespace's health (the prober marks a recovered namespace
/// healthy). Returns whether it changed.
pub async fn set_health(
    pool: &PgPool,
    namespace_id: i64,
    health: Health,
) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE namespaces SET health = $2 WHERE id = $1 AND health <> $2")
        .bind(namespace_id)
        .bind(health.as_str())
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Records that ingest instance `instance` is about to publish to `epoch` of
/// group `group_id` (once per instance, group and epoch: before its first
/// publish there). An epoch nobody recorded is known to hold nothing: see
/// [`crate::drain::never_published`].
pub async fn record_publishing(
    pool: &PgPool,
    group_id: i64,
    epoch: i64,
    instance: uuid::Uuid,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO epoch_publishes (group_id, epoch, instance_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(group_id)
    .bind(epoch)
    .bind(instance)
    .execute(pool)
    .await?;
    Ok(())
}
