//! The invariant checker: docs/DESIGN.md's invariants, from the record of what got
//! a 202 (the simulator's ledger) and what the database and queues hold.
//!
//! - **No loss**: every `(device, seq)` in the ledger is in `telemetry`.
//! - **No duplicates**: each `(device, seq)` is stored once.
//! - **Per-device order**: for each device, `store_order` follows `seq`.
//! - **Nothing stranded**: every trail epoch but each group's current one is
//!   drained, and every queue is empty.
//!
//! [`check`] is pure, so it is tested on hand-made broken histories; [`gather`]
//! reads a real run.

use anyhow::Context as _;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// One 202, as the simulator's ledger has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Accepted {
    pub device: String,
    pub seq: i64,
    pub at_ms: u64,
    pub namespace: String,
    pub epoch: i64,
}

/// One stored row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub device: String,
    pub seq: i64,
    pub store_order: i64,
}

/// Everything the invariants are checked against.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub ledger: Vec<Accepted>,
    pub stored: Vec<Stored>,
    /// `(group, epoch)` of undrained trail epochs older than the group's current one
    pub undrained_old_epochs: Vec<(String, i64)>,
    /// `(namespace, messages)` left in queues
    pub queue_depths: Vec<(String, u64)>,
}

/// What the checker found, with up to [`EXAMPLES`] examples of each.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub accepted: usize,
    pub stored: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub reordered: usize,
    pub stranded_epochs: usize,
    pub stranded_messages: u64,
    pub examples: Vec<String>,
}

pub const EXAMPLES: usize = 5;

impl Report {
    /// All invariants hold.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.stranded_epochs == 0
            && self.stranded_messages == 0
    }
}

pub fn check(h: &History) -> Report {
    let mut r = Report {
        accepted: h.ledger.len(),
        stored: h.stored.len(),
        ..Report::default()
    };
    let mut examples: HashMap<&str, Vec<String>> = HashMap::new();
    let mut note = |kind: &'static str, text: String| {
        let e = examples.entry(kind).or_default();
        if e.len() < EXAMPLES {
            e.push(format!("{kind}: {text}"));
        }
    };
    let mut count: HashMap<(&str, i64), usize> = HashMap::new();
    for s in &h.stored {
        *count.entry((s.device.as_str(), s.seq)).or_default() += 1;
    }
    for ((device, seq), n) in &count {
        if *n > 1 {
            r.duplicated += 1;
            note("duplicated", format!("{device}/{seq} stored {n} times"));
        }
    }
    let mut seen = HashSet::new();
    for a in &h.ledger {
        if seen.insert((a.device.as_str(), a.seq))
            && !count.contains_key(&(a.device.as_str(), a.seq))
        {
            r.lost += 1;
            note(
                "lost",
                format!(
                    "{}/{} (202 from {} epoch {})",
                    a.device, a.seq, a.namespace, a.epoch
                ),
            );
        }
    }
    let mut by_device: HashMap<&str, Vec<&Stored>> = HashMap::new();
    for s in &h.stored {
        by_device.entry(s.device.as_str()).or_default().push(s);
    }
    for (device, mut rows) in by_device {
        rows.sort_by_key(|s| s.store_order);
        for w in rows.windows(2) {
            if w[1].seq <= w[0].seq {
                r.reordered += 1;
                note(
                    "reordered",
                    format!("{device}: seq {} stored after seq {}", w[1].seq, w[0].seq),
                );
            }
        }
    }
    for (group, epoch) in &h.undrained_old_epochs {
        r.stranded_epochs += 1;
        note(
            "stranded",
            format!("group {group} epoch {epoch} not drained"),
        );
    }
    for (namespace, depth) in &h.queue_depths {
        if *depth > 0 {
            r.stranded_messages += depth;
            note("stranded", format!("{depth} messages left in {namespace}"));
        }
    }
    let mut kinds: Vec<_> = examples.into_iter().collect();
    kinds.sort();
    r.examples = kinds.into_iter().flat_map(|(_, e)| e).collect();
    r
}

/// Reads a ledger file (JSON lines).
pub fn read_ledger(path: &Path) -> anyhow::Result<Vec<Accepted>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the ledger {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad ledger line {l:?}")))
        .collect()
}

/// The database's side of a history; `depths` are the queues' depths,
/// measured by the caller.
pub async fn gather(
    pool: &sqlx::PgPool,
    ledger: Vec<Accepted>,
    depths: Vec<(String, u64)>,
) -> anyhow::Result<History> {
    let stored = sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT device_id, seq, store_order FROM telemetry",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(device, seq, store_order)| Stored {
        device,
        seq,
        store_order,
    })
    .collect();
    let undrained_old_epochs = sqlx::query_as::<_, (String, i64)>(
        "SELECT g.name, t.epoch FROM routing_trail t JOIN routing_groups g ON g.id = t.group_id
         WHERE t.drained_at IS NULL AND t.epoch < g.epoch ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await?;
    Ok(History {
        ledger,
        stored,
        undrained_old_epochs,
        queue_depths: depths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(device: &str, seq: i64) -> Accepted {
        Accepted {
            device: device.into(),
            seq,
            at_ms: 0,
            namespace: "eu-west".into(),
            epoch: 1,
        }
    }

    fn stored(device: &str, seq: i64, store_order: i64) -> Stored {
        Stored {
            device: device.into(),
            seq,
            store_order,
        }
    }

    /// Two devices, three records each, all stored in order.
    fn clean() -> History {
        History {
            ledger: (1..=3)
                .flat_map(|s| [accepted("a", s), accepted("b", s)])
                .collect(),
            stored: vec![
                stored("a", 1, 1),
                stored("b", 1, 2),
                stored("a", 2, 3),
                stored("b", 2, 4),
                stored("a", 3, 5),
                stored("b", 3, 6),
            ],
            undrained_old_epochs: vec![],
            queue_depths: vec![("eu-west".into(), 0)],
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let r = check(&clean());
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.accepted, r.stored), (6, 6));
        assert!(r.examples.is_empty());
    }

    #[test]
    fn a_lost_record_is_caught() {
        let mut h = clean();
        h.stored.retain(|s| !(s.device == "b" && s.seq == 2));
        let r = check(&h);
        assert_eq!(r.lost, 1);
        assert!(!r.ok());
        assert!(r.examples[0].contains("b/2"), "{:?}", r.examples);
    }

    #[test]
    fn a_duplicate_is_caught() {
        let mut h = clean();
        h.stored.push(stored("a", 3, 7));
        let r = check(&h);
        assert_eq!(r.duplicated, 1);
        assert!(!r.ok());
    }

    #[test]
    fn a_reorder_is_caught() {
        let mut h = clean();
        // a/2 stored after a/3
        h.stored[2].store_order = 10;
        let r = check(&h);
        assert_eq!(r.reordered, 1);
        assert!(
            r.examples[0].contains("seq 2 stored after seq 3"),
            "{:?}",
            r.examples
        );
    }

    #[test]
    fn stranded_epochs_and_queues_are_caught() {
        let mut h = clean();
        h.undrained_old_epochs.push(("g".into(), 1));
        let r = check(&h);
        assert_eq!(r.stranded_epochs, 1);
        assert!(!r.ok());
        let mut h = clean();
        h.queue_depths.push(("eu-north".into(), 4));
        let r = check(&h);
        assert_eq!(r.stranded_messages, 4);
        assert!(!r.ok());
    }

    #[test]
    fn stored_records_without_a_202_are_not_losses() {
        // A record can be stored though its client never saw the 202
        // (timeout after the publish landed): not a violation.
        let mut h = clean();
        h.stored.push(stored("a", 4, 7));
        assert!(check(&h).ok());
    }
}
