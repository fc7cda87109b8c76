//! Control-plane queries: namespaces, routing groups and their trail, devices.
//!
//! Names (of namespaces, groups, devices) are what operators type; ids stay
//! inside the database. Writes that move senders set `georelay.actor` and
//! `georelay.reason` for the trigger that audits them, in the same transaction.

use chrono::{DateTime, Utc};
use georelay_core::secret::{device_key_context, namespace_key_context};
pub use georelay_core::TransportKind;
use georelay_core::{DeviceId, DeviceKey, KeyId, MasterKey, SecretError};
use sqlx::{PgPool, Postgres, Transaction};

use crate::StoreError;

/// Who the audit trail names for a change, and why.
#[derive(Debug, Clone)]
pub struct Actor {
    pub actor: String,
    pub reason: Option<String>,
}

/// Sets the session settings the move trigger reads, for this transaction only.
pub async fn set_actor(
    tx: &mut Transaction<'_, Postgres>,
    actor: &Actor,
) -> Result<(), StoreError> {
    sqlx::query(
        "SELECT set_config('georelay.actor', $1, true), set_config('georelay.reason', $2, true)",
    )
    .bind(&actor.actor)
    .bind(actor.reason.as_deref().unwrap_or(""))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A namespace to register. `key` is the plaintext SAS/issuer key; it is
/// sealed before it reaches the database.
#[derive(Debug)]
pub struct NewNamespace<'a> {
    pub name: &'a str,
    pub region: &'a str,
    pub transport: TransportKind,
    pub endpoint: &'a str,
    pub priority: i32,
    pub key_name: Option<&'a str>,
    pub key: Option<&'a [u8]>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Namespace {
    pub id: i64,
    pub name: String,
    pub region: String,
    pub transport: String,
    pub endpoint: String,
    pub key_name: Option<String>,
    pub priority: i32,
    pub enabled: bool,
    pub health: String,
    pub health_changed_at: DateTime<Utc>,
}

pub async fn add_namespace(
    pool: &PgPool,
    master: &MasterKey,
    ns: &NewNamespace<'_>,
) -> Result<i64, StoreError> {
    let sealed = ns
        .key
        .map(|k| master.seal(&namespace_key_context(ns.name), k))
        .transpose()?;
    sqlx::query_scalar(
        "INSERT INTO namespaces (name, region, transport, endpoint, priority, key_name, key_sealed)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(ns.name)
    .bind(ns.region)
    .bind(ns.transport.as_str())
    .bind(ns.endpoint)
    .bind(ns.priority)
    .bind(ns.key_name)
    .bind(sealed)
    .fetch_one(pool)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "namespace", ns.name))
}

pub async fn list_namespaces(pool: &PgPool) -> Result<Vec<Namespace>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, name, region, transport, endpoint, key_name, priority, enabled, health, health_changed_at
         FROM namespaces ORDER BY priority, name",
    )
    .fetch_all(pool)
    .await?)
}

/// Takes a namespace in or out of rotation. Returns whether anything changed.
pub async fn set_namespace_enabled(
    pool: &PgPool,
    name: &str,
    enabled: bool,
) -> Result<bool, StoreError> {
    set_flag(
        pool,
        "UPDATE namespaces n SET enabled = $2 FROM namespaces old
         WHERE n.id = old.id AND n.name = $1 RETURNING old.enabled",
        "namespace",
        name,
        enabled,
    )
    .await
}

/// Runs `sql` (`$1` the row's name, `$2` the new value, returning the old
/// value) on one row; whether it changed anything, or `NotFound`.
async fn set_flag(
    pool: &PgPool,
    sql: &'static str,
    what: &'static str,
    name: &str,
    value: bool,
) -> Result<bool, StoreError> {
    let was: Option<bool> = sqlx::query_scalar(sql)
        .bind(name)
        .bind(value)
        .fetch_optional(pool)
        .await?;
    match was {
        Some(was) => Ok(was != value),
        None => Err(StoreError::NotFound {
            what,
            name: name.to_owned(),
        }),
    }
}

/// Replaces a namespace's credentials (a rotated SAS key), sealed with
/// `master`. Running services reconnect with them at their next reload.
pub async fn set_namespace_key(
    pool: &PgPool,
    master: &MasterKey,
    name: &str,
    key_name: &str,
    key: &[u8],
) -> Result<(), StoreError> {
    let sealed = master.seal(&namespace_key_context(name), key)?;
    let done = sqlx::query("UPDATE namespaces SET key_name = $2, key_sealed = $3 WHERE name = $1")
        .bind(name)
        .bind(key_name)
        .bind(sealed)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound {
            what: "namespace",
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Group {
    pub id: i64,
    pub name: String,
    pub queue: String,
    pub failover_enabled: bool,
    pub epoch: i64,
    pub sender_namespace: String,
    pub drain_namespace: String,
    pub moved_at: DateTime<Utc>,
}

impl Group {
    /// Senders and worker are on different namespaces: a failover is being
    /// drained.
    pub fn failover_in_progress(&self) -> bool {
        self.sender_namespace != self.drain_namespace
    }
}

/// Creates a group whose senders start on `namespace`, as `actor`.
pub async fn add_group(
    pool: &PgPool,
    name: &str,
    queue: &str,
    namespace: &str,
    actor: &Actor,
) -> Result<i64, StoreError> {
    let mut tx = pool.begin().await?;
    set_actor(&mut tx, actor).await?;
    let ns_id = namespace_id(&mut tx, namespace).await?;
    let id = sqlx::query_scalar("INSERT INTO routing_groups (name, queue, sender_namespace_id) VALUES ($1, $2, $3) RETURNING id")
        .bind(name)
        .bind(queue)
        .bind(ns_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| StoreError::from_sqlx(e, "group", name))?;
    tx.commit().await?;
    Ok(id)
}

pub async fn list_groups(pool: &PgPool) -> Result<Vec<Group>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT g.id, g.name, g.queue, g.failover_enabled, g.epoch,
                s.name AS sender_namespace, d.name AS drain_namespace, g.moved_at
         FROM routing_groups g
         JOIN namespaces s ON s.id = g.sender_namespace_id
         JOIN namespaces d ON d.id = g.drain_namespace_id
         ORDER BY g.name",
    )
    .fetch_all(pool)
    .await?)
}

async fn namespace_id(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<i64, StoreError> {
    sqlx::query_scalar("SELECT id FROM namespaces WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: "namespace",
            name: name.to_owned(),
        })
}

/// What a manual failover did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: String,
    pub to: String,
    /// The group's epoch after the call.
    pub epoch: i64,
    /// False when the senders were already on `to`: nothing changed.
    pub moved: bool,
}

/// Moves a group's senders to namespace `to`. The database trigger bumps the
/// epoch, opens the trail row, audits and notifies; it refuses a disabled
/// namespace. The worker follows once the old epochs are drained.
pub async fn move_senders(
    pool: &PgPool,
    group: &str,
    to: &str,
    actor: &Actor,
) -> Result<Move, StoreError> {
    let mut tx = pool.begin().await?;
    set_actor(&mut tx, actor).await?;
    let (group_id, from): (i64, String) = sqlx::query_as(
        "SELECT g.id, n.name FROM routing_groups g JOIN namespaces n ON n.id = g.sender_namespace_id
         WHERE g.name = $1 FOR UPDATE OF g",
    )
    .bind(group)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| StoreError::NotFound { what: "group", name: group.to_owned() })?;
    let to_id = namespace_id(&mut tx, to).await?;
    let epoch: i64 = sqlx::query_scalar(
        "UPDATE routing_groups SET sender_namespace_id = $2 WHERE id = $1 RETURNING epoch",
    )
    .bind(group_id)
    .bind(to_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "group", group))?;
    tx.commit().await?;
    Ok(Move {
        moved: from != to,
        from,
        to: to.to_owned(),
        epoch,
    })
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TrailEpoch {
    pub group: String,
    pub epoch: i64,
    pub namespace: String,
    pub opened_at: DateTime<Utc>,
    pub sealed_at: Option<DateTime<Utc>>,
}

/// Every trail epoch not yet drained, per group in epoch order.
pub async fn undrained_trail(pool: &PgPool) -> Result<Vec<TrailEpoch>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT g.name AS \"group\", t.epoch, n.name AS namespace, t.opened_at, t.sealed_at
         FROM routing_trail t
         JOIN routing_groups g ON g.id = t.group_id
         JOIN namespaces n ON n.id = t.namespace_id
         WHERE t.drained_at IS NULL
         ORDER BY g.name, t.epoch",
    )
    .fetch_all(pool)
    .await?)
}

/// Devices ingest acknowledged records of in `epoch` of `group` (reported
/// so far): what `admin trail abandon` asks about before it gives it up.
pub async fn devices_acknowledged_in(
    pool: &PgPool,
    group: &str,
    epoch: i64,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM device_acks a JOIN routing_groups g ON g.id = a.group_id
         WHERE g.name = $1 AND a.epoch = $2",
    )
    .bind(group)
    .bind(epoch)
    .fetch_one(pool)
    .await?)
}

/// What [`abandon_epoch`] gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abandoned {
    /// The namespace the epoch was on.
    pub namespace: String,
    /// Where the worker drains now.
    pub worker_on: String,
    /// Devices with records stranded there (acknowledged, not stored):
    /// their newer records wait until the agents send those again.
    pub gaps: u64,
    /// Devices with records stranded there that do not send again
    /// (trackers): those records are given up, their newer ones flow.
    pub given_up: u64,
}

/// Gives up on epoch `epoch` of `group` (its region is gone for good): marks
/// it drained and abandoned, so the worker goes on to the next epoch at
/// once. Nothing acknowledged is lost: each device with records ingest
/// acknowledged there and the worker had not stored gets a gap
/// ([`crate::gaps`]); its newer records are parked until its agent has sent
/// those again. Refused for the current epoch (GR005: move the senders
/// first), and while an ingest instance alive still acknowledges the epoch
/// (it may hold acknowledgements of records there not reported yet).
/// Recorded as an `abandoned` event with `actor`.
pub async fn abandon_epoch(
    pool: &PgPool,
    group: &str,
    epoch: i64,
    actor: &Actor,
) -> Result<Abandoned, StoreError> {
    let mut tx = pool.begin().await?;
    set_actor(&mut tx, actor).await?;
    let group_id: i64 =
        sqlx::query_scalar("SELECT id FROM routing_groups WHERE name = $1 FOR UPDATE")
            .bind(group)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: "group",
                name: group.to_owned(),
            })?;
    // Acknowledgements are reported with each heartbeat, in the same
    // transaction as the epoch the instance acknowledges: one alive that
    // still acknowledges this epoch or older (a publish to it in flight, or
    // it has not seen the senders move) may hold some not reported yet.
    let unreported: Option<(String, Option<i32>)> = sqlx::query_as(
        "SELECT i.hostname, i.pid FROM instances i
         JOIN instance_epochs e ON e.instance_id = i.id AND e.group_id = $1
         WHERE i.role = 'ingest' AND i.lease_until > now()
           AND i.lease_until <= i.heartbeat_at + interval '1 hour 1 minute'
           AND e.epoch <= $2
         LIMIT 1",
    )
    .bind(group_id)
    .bind(epoch)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((host, pid)) = unreported {
        return Err(StoreError::NotYet(format!(
            "ingest on {host} (pid {}) still acknowledges epoch {epoch} or older (a publish to it in flight, or it has not seen the senders move): it may hold acknowledgements of records there it has not reported; try again in a few seconds",
            pid.map_or("?".to_owned(), |p| p.to_string())
        )));
    }
    let from: i64 = sqlx::query_scalar(
        "UPDATE routing_trail SET sealed_at = coalesce(sealed_at, now()), drained_at = now(),
                abandoned_at = now()
         WHERE group_id = $1 AND epoch = $2 AND drained_at IS NULL RETURNING namespace_id",
    )
    .bind(group_id)
    .bind(epoch)
    .fetch_optional(&mut *tx)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "epoch", &epoch.to_string()))?
    .ok_or_else(|| StoreError::NotFound {
        what: "undrained epoch",
        name: format!("{epoch} of group {group}"),
    })?;
    let (gaps, given_up) = crate::gaps::open_gaps(&mut tx, group_id, epoch).await?;
    let (to, namespace, worker_on): (i64, String, String) = sqlx::query_as(
        "WITH oldest AS (SELECT namespace_id FROM routing_trail
                         WHERE group_id = $1 AND drained_at IS NULL ORDER BY epoch LIMIT 1),
              moved AS (UPDATE routing_groups SET drain_namespace_id = (SELECT namespace_id FROM oldest)
                        WHERE id = $1 RETURNING drain_namespace_id)
         SELECT m.drain_namespace_id, f.name, t.name FROM moved m
         JOIN namespaces f ON f.id = $2 JOIN namespaces t ON t.id = m.drain_namespace_id",
    )
    .bind(group_id)
    .bind(from)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO failover_events (group_id, kind, from_namespace_id, to_namespace_id, epoch, actor, reason)
         VALUES ($1, 'abandoned', $2, $3, $4, $5, $6)",
    )
    .bind(group_id)
    .bind(from)
    .bind(to)
    .bind(epoch)
    .bind(&actor.actor)
    .bind(&actor.reason)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Abandoned {
        namespace,
        worker_on,
        gaps,
        given_up,
    })
}

/// The namespace epoch `epoch` of `group` is on, and the group's queue.
pub async fn epoch_home(
    pool: &PgPool,
    group: &str,
    epoch: i64,
) -> Result<(String, String), StoreError> {
    sqlx::query_as(
        "SELECT n.name, g.queue FROM routing_trail t
         JOIN routing_groups g ON g.id = t.group_id JOIN namespaces n ON n.id = t.namespace_id
         WHERE g.name = $1 AND t.epoch = $2",
    )
    .bind(group)
    .bind(epoch)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        what: "epoch",
        name: format!("{epoch} of group {group}"),
    })
}

/// Sets a group's failover bit. Returns whether anything changed.
pub async fn set_failover_enabled(
    pool: &PgPool,
    group: &str,
    enabled: bool,
    actor: &Actor,
) -> Result<bool, StoreError> {
    // The trigger audits a change as failover_on / failover_off with `actor`.
    let mut tx = pool.begin().await?;
    set_actor(&mut tx, actor).await?;
    let was: Option<bool> = sqlx::query_scalar(
        "UPDATE routing_groups g SET failover_enabled = $2 FROM routing_groups old
         WHERE g.id = old.id AND g.name = $1 RETURNING old.failover_enabled",
    )
    .bind(group)
    .bind(enabled)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    match was {
        Some(was) => Ok(was != enabled),
        None => Err(StoreError::NotFound {
            what: "group",
            name: group.to_owned(),
        }),
    }
}

/// Sets how long the group's worker waits on an old epoch it cannot read
/// before giving it up by itself (`None`: never; at least a second).
pub async fn set_abandon_after(
    pool: &PgPool,
    group: &str,
    after: Option<std::time::Duration>,
) -> Result<(), StoreError> {
    let done = sqlx::query("UPDATE routing_groups SET abandon_after_s = $2 WHERE name = $1")
        .bind(group)
        .bind(after.map(|d| d.as_secs_f64()))
        .execute(pool)
        .await
        .map_err(|e| StoreError::from_sqlx(e, "group", group))?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound {
            what: "group",
            name: group.to_owned(),
        });
    }
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Device {
    pub id: String,
    pub group: String,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    /// When its newest stored record was received (none yet: never).
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// Registers a device with a fresh random key, stored sealed. The key is
/// returned once, for the operator to install on the plug computer.
pub async fn add_device(
    pool: &PgPool,
    master: &MasterKey,
    id: &DeviceId,
    group: &str,
) -> Result<DeviceKey, StoreError> {
    let key = DeviceKey::generate();
    let sealed = master.seal(&device_key_context(id.as_str()), key.as_bytes())?;
    let inserted = sqlx::query(
        "INSERT INTO devices (id, group_id, key_sealed) SELECT $1, id, $3 FROM routing_groups WHERE name = $2",
    )
    .bind(id.as_str())
    .bind(group)
    .bind(sealed)
    .execute(pool)
    .await
    .map_err(|e| StoreError::from_sqlx(e, "device", id.as_str()))?;
    if inserted.rows_affected() == 0 {
        return Err(StoreError::NotFound {
            what: "group",
            name: group.to_owned(),
        });
    }
    Ok(key)
}

/// Devices by id, of one group or all; with `silent_for`, only enabled
/// devices seen before but not within it.
pub async fn list_devices(
    pool: &PgPool,
    group: Option<&str>,
    silent_for: Option<std::time::Duration>,
) -> Result<Vec<Device>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT d.id, g.name AS \"group\", d.enabled, d.created_at, d.last_seen_at
         FROM devices d JOIN routing_groups g ON g.id = d.group_id
         WHERE ($1::text IS NULL OR g.name = $1)
           AND ($2::float8 IS NULL
                OR (d.enabled AND d.last_seen_at < now() - make_interval(secs => $2)))
         ORDER BY d.id",
    )
    .bind(group)
    .bind(silent_for.map(|d| d.as_secs_f64()))
    .fetch_all(pool)
    .await?)
}

/// Enables or disables a device. Returns whether anything changed.
pub async fn set_device_enabled(
    pool: &PgPool,
    id: &str,
    enabled: bool,
) -> Result<bool, StoreError> {
    set_flag(
        pool,
        "UPDATE devices d SET enabled = $2 FROM devices old
         WHERE d.id = old.id AND d.id = $1 RETURNING old.enabled",
        "device",
        id,
        enabled,
    )
    .await
}

/// Refuses to go on with a master key that sealed none of the secrets in the
/// database (a wrong key: every device would fail to authenticate). Rows
/// sealed otherwise beside rows sealed with it — a key pasted in by hand, a
/// row restored from another installation — are that row's problem, not the
/// fleet's: they are returned (`device ID`, `namespace NAME`; at most
/// [`MAX_ODD_ROWS`]) for the caller to report, and refused one by one where
/// they are used.
pub async fn check_master_key(
    pool: &PgPool,
    master: &MasterKey,
) -> Result<Vec<String>, StoreError> {
    const SEALED: &str = "SELECT 'device' AS kind, id AS name, substring(key_sealed FROM 1 FOR 5) AS head FROM devices
         UNION ALL
         SELECT 'namespace', name, substring(key_sealed FROM 1 FOR 5) FROM namespaces WHERE key_sealed IS NOT NULL";
    let header = master.id().sealed_header().to_vec();
    let odd: Vec<(String, String, Option<Vec<u8>>)> = sqlx::query_as(&format!(
        "SELECT kind, name, head FROM ({SEALED}) s WHERE head IS DISTINCT FROM $1 LIMIT $2"
    ))
    .bind(&header)
    .bind(MAX_ODD_ROWS as i64)
    .fetch_all(pool)
    .await?;
    let Some((_, _, head)) = odd.first() else {
        return Ok(Vec::new());
    };
    let ours: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM ({SEALED}) s WHERE head = $1)"
    ))
    .bind(&header)
    .fetch_one(pool)
    .await?;
    if !ours {
        return Err(match head.as_deref().and_then(KeyId::of_sealed) {
            Some(sealed_with) => SecretError::WrongMasterKey {
                sealed_with,
                configured: master.id(),
            },
            None => SecretError::Format,
        }
        .into());
    }
    Ok(odd
        .into_iter()
        .map(|(kind, name, _)| format!("{kind} {name}"))
        .collect())
}

/// Most rows [`check_master_key`] names.
pub const MAX_ODD_ROWS: usize = 20;

/// A running (or lately running) ingest or drain process, as operators see it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Process {
    pub role: String,
    pub hostname: String,
    pub pid: Option<i32>,
    /// Seconds the lease has left (negative: lapsed that long ago).
    pub lease_left: f64,
    /// `group:epoch` the process acknowledges (ingest), space-separated.
    pub epochs: String,
    /// Groups whose drain lease it holds (drain), space-separated.
    pub draining: String,
}

/// Every registered process, ingest first.
pub async fn list_processes(pool: &PgPool) -> Result<Vec<Process>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT i.role, i.hostname, i.pid,
                extract(epoch FROM i.lease_until - now())::float8 AS lease_left,
                coalesce(string_agg(g.name || ':' || e.epoch, ' ' ORDER BY g.name), '') AS epochs,
                coalesce((SELECT string_agg(g2.name, ' ' ORDER BY g2.name) FROM drain_leases l
                          JOIN routing_groups g2 ON g2.id = l.group_id
                          WHERE l.instance_id = i.id AND l.lease_until > clock_timestamp()), '') AS draining
         FROM instances i
         LEFT JOIN instance_epochs e ON e.instance_id = i.id
         LEFT JOIN routing_groups g ON g.id = e.group_id
         GROUP BY i.id
         ORDER BY i.role DESC, i.hostname, i.started_at",
    )
    .fetch_all(pool)
    .await?)
}
