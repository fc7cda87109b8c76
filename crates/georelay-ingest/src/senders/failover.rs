//! Failover as ingest runs it: when a publish trips its namespace's breaker,
//! run the failover transaction (`store::routing::fail_over`) — one per
//! group at a time in this process — and adopt its outcome, so the waiting
//! records can be re-published under the new epoch.

use georelay_store::control::Actor;
use georelay_store::routing::{fail_over, Failover, Trouble};

use super::flights::GroupFlight;
use super::snapshot::NsEntry;
use super::{RouteError, Senders};

/// The `outcome` label of `georelay_ingest_failovers_total`: moved,
/// adopted, disabled, cooling_down, exhausted.
pub(crate) const OUTCOMES: [&str; 5] =
    ["moved", "adopted", "disabled", "cooling_down", "exhausted"];

impl Senders {
    /// Moves group `flight` off `troubled` (or adopts a move already made).
    /// `Ok` means publishes now go to a later epoch.
    pub(super) async fn fail_over(
        &self,
        group_id: i64,
        flight: &GroupFlight,
        failed_epoch: i64,
        troubled: &NsEntry,
        trouble: Trouble,
        avoid: &[i64],
    ) -> Result<(), RouteError> {
        let _one_at_a_time = flight.failover.lock().await;
        if flight.epoch() > failed_epoch {
            // Another request of this process moved the group meanwhile.
            return Ok(());
        }
        let what = match trouble {
            Trouble::Down => "down (errors or no answer)",
            Trouble::Slow => "degraded (answers too slowly)",
        };
        let actor = Actor {
            actor: self.actor.clone(),
            reason: Some(format!("namespace {} is {what}", troubled.info.name)),
        };
        let transaction = fail_over(
            &self.pool,
            group_id,
            troubled.info.id,
            trouble,
            avoid,
            self.config.cooldown,
            &actor,
        );
        // Bounded: a hung database must not hold the group's failover lock.
        let outcome = match tokio::time::timeout(self.config.lease, transaction).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::warn!(group = %flight.name, error = %e, "cannot reach the control plane to fail over");
                return Err(RouteError::ControlPlaneUnavailable);
            }
            Err(_) => {
                tracing::warn!(group = %flight.name, after = ?self.config.lease, "the failover transaction did not answer");
                return Err(RouteError::ControlPlaneUnavailable);
            }
        };
        let (label, result) = match outcome {
            Failover::Moved {
                namespace_id,
                epoch,
            } => {
                flight.advance(epoch, namespace_id);
                let to = self.namespaces.name(namespace_id);
                tracing::warn!(group = %flight.name, from = %troubled.info.name, to = %to, epoch, reason = what, "senders failed over");
                (OUTCOMES[0], Ok(()))
            }
            Failover::Adopted {
                namespace_id,
                epoch,
            } => {
                flight.advance(epoch, namespace_id);
                tracing::info!(group = %flight.name, epoch, "adopted another instance's failover");
                (OUTCOMES[1], Ok(()))
            }
            Failover::Disabled => (OUTCOMES[2], Err(RouteError::FailoverDisabled)),
            Failover::CoolingDown { retry_after } => {
                (OUTCOMES[3], Err(RouteError::CoolingDown { retry_after }))
            }
            Failover::Exhausted { first } => {
                if first {
                    tracing::error!(group = %flight.name, troubled = %troubled.info.name, "no namespace can take the group's senders: records are refused (503) until a region recovers or an operator acts");
                }
                (OUTCOMES[4], Err(RouteError::NoRegion))
            }
        };
        self.metrics
            .failovers
            .with_label_values(&[&flight.name, label])
            .inc();
        self.reload_wanted.notify_one();
        result
    }
}
