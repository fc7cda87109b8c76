//! The control plane's invariants, checked: what `georelay admin doctor`
//! prints, what `admin status` shows first, and what the ingest and drain
//! watchdogs log and count (`georelay_control_plane_problems`). The
//! database refuses most hand edits that would break these (migrations/0007);
//! these checks catch what it cannot (rows from before the guards, a
//! hand-inserted instance, a key row from elsewhere) and say how to fix it.

use georelay_core::MasterKey;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::routing::load_routing;
use crate::StoreError;

/// One broken invariant: what is wrong, and the statement or command that
/// fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

/// Every problem found. Key checks need the master key (`None`: skipped).
pub async fn problems(
    pool: &PgPool,
    master: Option<&MasterKey>,
) -> Result<Vec<Problem>, StoreError> {
    let mut out = Vec::new();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT g.name, g.epoch FROM routing_groups g
         WHERE NOT EXISTS (SELECT 1 FROM routing_trail t WHERE t.group_id = g.id AND t.epoch = g.epoch)",
    )
    .fetch_all(pool)
    .await?;
    for (group, epoch) in rows {
        out.push(Problem {
            what: format!("group {group}: its current epoch {epoch} has no trail row (the senders' epoch is unknown to the worker)"),
            fix: format!("open a new epoch by moving the senders: georelay admin failover --group {group} --to NAMESPACE"),
        });
    }
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT g.name FROM routing_groups g
         WHERE NOT EXISTS (SELECT 1 FROM routing_trail t WHERE t.group_id = g.id AND t.drained_at IS NULL)",
    )
    .fetch_all(pool)
    .await?;
    for (group,) in rows {
        out.push(Problem {
            what: format!("group {group}: every epoch is marked drained, the current one too: the worker stores nothing"),
            fix: format!("open a new epoch by moving the senders: georelay admin failover --group {group} --to NAMESPACE"),
        });
    }
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT g.name, nt.name, nd.name FROM routing_groups g
         JOIN LATERAL (SELECT namespace_id FROM routing_trail
                       WHERE group_id = g.id AND drained_at IS NULL ORDER BY epoch LIMIT 1) t ON true
         JOIN namespaces nt ON nt.id = t.namespace_id
         JOIN namespaces nd ON nd.id = g.drain_namespace_id
         WHERE t.namespace_id <> g.drain_namespace_id",
    )
    .fetch_all(pool)
    .await?;
    for (group, trail, shown) in rows {
        out.push(Problem {
            what: format!("group {group}: the worker drains {trail} (oldest undrained epoch) but routing_groups.drain_namespace_id says {shown}"),
            fix: format!("UPDATE routing_groups SET drain_namespace_id = (SELECT id FROM namespaces WHERE name = '{trail}') WHERE name = '{group}'"),
        });
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT g.name, l.instance_id::text FROM drain_leases l JOIN routing_groups g ON g.id = l.group_id
         WHERE l.lease_until > now()
           AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = l.instance_id AND i.lease_until > now())",
    )
    .fetch_all(pool)
    .await?;
    for (group, instance) in rows {
        out.push(Problem {
            what: format!("group {group}: its drain lease names instance {instance}, which is not running: no worker drains it until the lease lapses"),
            fix: format!("UPDATE drain_leases SET lease_until = now() WHERE group_id = (SELECT id FROM routing_groups WHERE name = '{group}')"),
        });
    }
    // Leases are at most 1 h (ingest) and 3 × 1 h (drain's instance row).
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT id::text, role, hostname FROM instances
         WHERE lease_until > heartbeat_at + CASE role WHEN 'ingest' THEN interval '1 hour 1 minute'
                                                      ELSE interval '3 hours 1 minute' END",
    )
    .fetch_all(pool)
    .await?;
    for (id, role, host) in rows {
        out.push(Problem {
            what: format!("{role} instance {id} on {host} holds a lease longer than any georelay process takes (a row written by hand; the seal barrier ignores it)"),
            fix: format!("DELETE FROM instances WHERE id = '{id}'"),
        });
    }
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT queue, string_agg(name, ', ' ORDER BY name) FROM routing_groups
         GROUP BY queue HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await?;
    for (queue, groups) in rows {
        out.push(Problem {
            what: format!("groups {groups} share queue {queue}: two workers read one queue and reorder"),
            fix: "give each group a queue of its own: a new group (georelay admin group add) and its devices moved to it".to_owned(),
        });
    }
    if let Some(master) = master {
        let odd = match crate::control::check_master_key(pool, master).await {
            Ok(odd) => odd,
            Err(StoreError::Secret(e)) => {
                out.push(Problem {
                    what: format!("the configured master key sealed none of the keys in the database: {e}"),
                    fix: "start with the master key this installation was set up with (GEORELAY_MASTER_KEY)".to_owned(),
                });
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        for row in &odd {
            out.push(Problem {
                what: format!("{row}: its sealed key was not sealed with this master key"),
                fix: "a device: register it again with a new key; a namespace: georelay admin namespace set-key".to_owned(),
            });
        }
        let routing = load_routing(pool, master).await?;
        for n in routing.unopenable {
            if odd.contains(&format!("namespace {}", n.name)) {
                continue;
            }
            out.push(Problem {
                what: format!("namespace {}: its sealed key does not open ({}); it is left out of the routing", n.name, n.why),
                fix: format!("georelay admin namespace set-key --name {} --key-name NAME --key -", n.name),
            });
        }
    }
    Ok(out)
}

/// How often the services' watchdogs run [`problems`].
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(30);

/// The ingest and drain watchdog: runs [`problems`] every
/// [`WATCHDOG_INTERVAL`] until `stop` resolves. Each problem is an ERROR
/// with its fix when the set of problems changes, an INFO when it clears;
/// `count` gets the number after every run (the metric).
pub async fn watchdog(
    pool: PgPool,
    master: Arc<MasterKey>,
    count: impl Fn(usize),
    stop: impl Future<Output = ()>,
) {
    let mut last: Vec<Problem> = Vec::new();
    let run = async {
        loop {
            match problems(&pool, Some(&master)).await {
                Ok(found) => {
                    count(found.len());
                    if found != last {
                        for p in &found {
                            tracing::error!(problem = %p.what, fix = %p.fix, "control plane problem");
                        }
                        if found.is_empty() {
                            tracing::info!("control plane problems resolved");
                        }
                        last = found;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "control plane checks did not run; next time")
                }
            }
            tokio::time::sleep(WATCHDOG_INTERVAL).await;
        }
    };
    tokio::select! {
        () = run => {}
        () = stop => {}
    }
}
