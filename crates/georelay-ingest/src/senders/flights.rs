//! Flights: per group, the `(epoch, namespace, queue)` new publishes use,
//! and how many publishes are in flight to each epoch. Pure bookkeeping, no
//! I/O: fencing rests on it, so it is unit-tested on its own.
//!
//! A publish takes a [`Ticket`] (epoch read and in-flight count raised under
//! one lock) and holds it until the broker answered or the deadline passed.
//! The epoch this instance acknowledges to the worker
//! ([`Flights::acked_epochs`]) is the oldest epoch with a publish in flight,
//! else the current one: so a new epoch is acknowledged only once every
//! publish to older ones has finished.

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Where one group's new publishes go, as the control plane last said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub epoch: i64,
    pub namespace_id: i64,
    /// Shared, so taking a ticket (once per publish) copies no string.
    pub queue: Arc<str>,
}

#[derive(Debug)]
struct FlightState {
    route: Route,
    in_flight: BTreeMap<i64, usize>,
}

/// One group's flight state.
#[derive(Debug)]
pub struct GroupFlight {
    pub name: String,
    state: Mutex<FlightState>,
    /// One failover transaction per group at a time in this process.
    pub failover: tokio::sync::Mutex<()>,
    /// The epoch this instance last recorded publishing to
    /// (`epoch_publishes`; 0: none yet).
    recorded: AtomicI64,
}

impl GroupFlight {
    fn new(name: &str, route: Route) -> Self {
        Self {
            name: name.to_owned(),
            state: Mutex::new(FlightState {
                route,
                in_flight: BTreeMap::new(),
            }),
            failover: tokio::sync::Mutex::new(()),
            recorded: AtomicI64::new(0),
        }
    }

    /// Whether this instance recorded publishing to `epoch` last.
    pub fn recorded(&self, epoch: i64) -> bool {
        self.recorded.load(Ordering::Relaxed) == epoch
    }

    /// Notes that this instance recorded publishing to `epoch`.
    pub fn set_recorded(&self, epoch: i64) {
        self.recorded.store(epoch, Ordering::Relaxed);
    }

    pub fn epoch(&self) -> i64 {
        self.state.lock().route.epoch
    }

    /// Moves new publishes to `(epoch, namespace_id)` unless already there or
    /// further (epochs only grow). Returns whether it moved.
    pub fn advance(&self, epoch: i64, namespace_id: i64) -> bool {
        let mut s = self.state.lock();
        if epoch > s.route.epoch {
            s.route.epoch = epoch;
            s.route.namespace_id = namespace_id;
            true
        } else {
            false
        }
    }

    fn set_queue(&self, queue: &str) {
        let mut s = self.state.lock();
        if *s.route.queue != *queue {
            s.route.queue = queue.into();
        }
    }

    /// The oldest epoch with a publish in flight, else the current epoch.
    fn acked_epoch(&self) -> i64 {
        let s = self.state.lock();
        let oldest_in_flight = s.in_flight.iter().find(|(_, n)| **n > 0).map(|(e, _)| *e);
        oldest_in_flight.map_or(s.route.epoch, |e| e.min(s.route.epoch))
    }
}

/// A publish in flight to one epoch of a group: counted until dropped.
#[derive(Debug)]
pub struct Ticket {
    flight: Arc<GroupFlight>,
    pub route: Route,
}

impl Ticket {
    pub fn flight(&self) -> &Arc<GroupFlight> {
        &self.flight
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.flight.state.lock();
        if let Some(n) = s.in_flight.get_mut(&self.route.epoch) {
            *n -= 1;
            if *n == 0 {
                s.in_flight.remove(&self.route.epoch);
            }
        }
    }
}

/// Every group's flight state, by group id.
#[derive(Debug, Default)]
pub struct Flights {
    groups: RwLock<HashMap<i64, Arc<GroupFlight>>>,
}

impl Flights {
    pub fn get(&self, group_id: i64) -> Option<Arc<GroupFlight>> {
        self.groups.read().get(&group_id).cloned()
    }

    /// Applies the control plane's view of group `id`: its queue, and a move
    /// to a later epoch. Returns the epoch publishes now use and whether the
    /// group moved.
    pub fn apply(&self, id: i64, name: &str, route: Route) -> (i64, bool) {
        if let Some(f) = self.get(id) {
            f.set_queue(&route.queue);
            let moved = f.advance(route.epoch, route.namespace_id);
            return (f.epoch(), moved);
        }
        let mut groups = self.groups.write();
        let f = groups
            .entry(id)
            .or_insert_with(|| Arc::new(GroupFlight::new(name, route)));
        (f.epoch(), false)
    }

    /// A ticket for a publish to group `group_id`'s current route.
    pub fn begin(&self, group_id: i64) -> Option<Ticket> {
        let flight = self.get(group_id)?;
        let route = {
            let mut s = flight.state.lock();
            let epoch = s.route.epoch;
            *s.in_flight.entry(epoch).or_insert(0) += 1;
            s.route.clone()
        };
        Some(Ticket { flight, route })
    }

    /// Every known group with the epoch this instance acknowledges for it.
    pub fn acked_epochs(&self) -> Vec<(i64, i64)> {
        self.groups
            .read()
            .iter()
            .map(|(id, f)| (*id, f.acked_epoch()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(epoch: i64, namespace_id: i64) -> Route {
        Route {
            epoch,
            namespace_id,
            queue: "telemetry".into(),
        }
    }

    fn acked(f: &Flights, group: i64) -> i64 {
        f.acked_epochs()
            .into_iter()
            .find(|(g, _)| *g == group)
            .map(|(_, e)| e)
            .unwrap()
    }

    #[test]
    fn an_unknown_group_has_no_ticket() {
        assert!(Flights::default().begin(7).is_none());
    }

    #[test]
    fn a_move_is_acknowledged_only_once_older_publishes_are_over() {
        let f = Flights::default();
        f.apply(1, "g", route(1, 10));
        let old = f.begin(1).unwrap();
        assert_eq!(old.route, route(1, 10));
        assert_eq!(f.apply(1, "g", route(2, 20)), (2, true));
        // New publishes use epoch 2 at once ...
        let new = f.begin(1).unwrap();
        assert_eq!(new.route, route(2, 20));
        // ... but epoch 1 is acknowledged while its publish is in flight.
        assert_eq!(acked(&f, 1), 1);
        drop(old);
        assert_eq!(acked(&f, 1), 2);
        drop(new);
        assert_eq!(acked(&f, 1), 2);
    }

    #[test]
    fn the_oldest_epoch_in_flight_counts_and_each_ticket_once() {
        let f = Flights::default();
        f.apply(1, "g", route(1, 10));
        let a = f.begin(1).unwrap();
        let b = f.begin(1).unwrap();
        f.apply(1, "g", route(2, 20));
        let c = f.begin(1).unwrap();
        f.apply(1, "g", route(3, 10));
        drop(a);
        assert_eq!(acked(&f, 1), 1, "b still flies to epoch 1");
        drop(b);
        assert_eq!(acked(&f, 1), 2, "c still flies to epoch 2");
        drop(c);
        assert_eq!(acked(&f, 1), 3);
    }

    #[test]
    fn epochs_never_go_back_and_queue_renames_apply() {
        let f = Flights::default();
        f.apply(1, "g", route(3, 30));
        // A stale snapshot (epoch 2) does not move publishes back.
        assert_eq!(f.apply(1, "g", route(2, 20)), (3, false));
        let mut renamed = route(3, 30);
        renamed.queue = "other".into();
        f.apply(1, "g", renamed.clone());
        assert_eq!(f.begin(1).unwrap().route, renamed);
    }

    #[test]
    fn groups_are_independent() {
        let f = Flights::default();
        f.apply(1, "a", route(1, 10));
        f.apply(2, "b", route(5, 20));
        let _t = f.begin(1).unwrap();
        f.apply(1, "a", route(2, 20));
        assert_eq!(acked(&f, 1), 1);
        assert_eq!(acked(&f, 2), 5);
    }
}
