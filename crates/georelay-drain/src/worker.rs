//! One group's drain loop: hold the lease, drain the oldest undrained trail
//! epoch in queue order, follow the trail once an epoch is sealed and empty.
//!
//! Per batch: receive in queue order; cut the batch at the first authentic
//! message of a later epoch of this namespace (a namespace can appear twice
//! in a trail, A → B → A; see [`read`]); open
//! each envelope; store rows and dead letters in one transaction that checks
//! the lease; commit; only then ack at the broker. A crash between commit and
//! ack redelivers, and the `(device_id, seq)` key drops the copies.
//!
//! Strict order: while the namespace of the epoch being drained cannot be
//! read, nothing newer is stored; the worker retries with back-off and says
//! how long it has been blocked.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use georelay_core::{envelope, Envelope, EnvelopeError, RecordError};
use georelay_store::control::Actor;
use georelay_store::drain::{
    self, DeadLetter, DeadLetterReason, LeaseToken, Position, Row, Stored,
};
use georelay_store::gaps;
use georelay_store::routing::{self, Failover, Trouble};
use georelay_store::StoreError;
use georelay_transport::{Delivery, ErrorKind, Namespace, Pooled, TransportError};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Why a step did not go on.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error("lost the drain lease")]
    LeaseLost,
    #[error("namespace: {0}")]
    Broker(TransportError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
}

/// What a step did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Stored a batch (there may be more).
    Stored,
    /// The current epoch's queue is empty: nothing to do for now.
    Idle,
    /// An old epoch is empty but not sealed yet.
    WaitingForSeal,
    /// An old epoch was drained; the worker moved to the next.
    Followed,
}

struct Blocked {
    since: Instant,
    namespace_id: i64,
    epoch: i64,
    declared: bool,
}

pub struct GroupWorker {
    shared: Arc<Shared>,
    group_id: i64,
    lease: Option<LeaseToken>,
    lease_renewed: Instant,
    blocked: Option<Blocked>,
    backoff: Duration,
    last_sweep: Instant,
    /// When the undrained depth was last measured (none yet: at once).
    last_depth: Option<Instant>,
    db_failing: bool,
    /// Set when the lease was (re)taken: reads restart at the oldest unacked.
    fresh_lease: bool,
    /// `(namespace id, epoch)` of an old epoch whose queue reached a later
    /// epoch's message (A → B → A): nothing of it is left before that, so
    /// while it waits for its seal it is not read again (each read would
    /// only take and give back the later epoch's messages: on Service Bus,
    /// a delivery each).
    boundary: Option<(i64, i64)>,
    /// When the group's open gaps were last counted for the gauges (none
    /// yet, or none open: `None`).
    gaps_counted: Option<Instant>,
    /// Open gaps (device, epoch) already reported at ERROR as long open.
    gaps_reported: HashSet<(String, i64)>,
    /// Records per queue message in the last batch read (ingest bundles up
    /// to 64): a read asks for `batch_size` / this many messages, so a
    /// batch holds about `batch_size` records, not 64 times that.
    per_message: usize,
}

impl GroupWorker {
    pub fn new(shared: Arc<Shared>, group_id: i64) -> Self {
        Self {
            shared,
            group_id,
            lease: None,
            lease_renewed: Instant::now(),
            blocked: None,
            backoff: Duration::from_millis(100),
            last_sweep: Instant::now(),
            last_depth: None,
            db_failing: false,
            fresh_lease: false,
            boundary: None,
            gaps_counted: None,
            gaps_reported: HashSet::new(),
            // Until a batch says otherwise, as if every message were a
            // full bundle: a backlog of bundles after a restart is not read
            // 500 messages at a time.
            per_message: envelope::MAX_BUNDLE,
        }
    }

    /// How many messages the next read asks for.
    fn receive_max(&self) -> usize {
        (self.shared.config.batch_size / self.per_message).max(1)
    }

    fn note_read(&mut self, opened: &Opened) {
        if !opened.batch.is_empty() {
            self.per_message = opened.records().div_ceil(opened.batch.len()).max(1);
        }
    }

    pub async fn run(mut self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let pause = self.turn().await;
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        // The batch in hand was committed and acked, or never acked: either
        // way a standby may take over at once.
        if let Some(lease) = self.lease.take() {
            if let Err(e) = drain::release_lease(&self.shared.pool, &lease).await {
                tracing::debug!(error = %e, "could not release the drain lease; it will lapse");
            }
        }
    }

    /// One turn of the loop; returns how long to pause before the next.
    async fn turn(&mut self) -> Duration {
        let shared = self.shared.clone();
        let config = &shared.config;
        let Some(lease) = self.lease_or_standby().await else {
            return config.standby_poll;
        };
        if let Some(pause) = self.renew_if_due(&lease).await {
            return pause;
        }
        let Some(lease) = self.lease else {
            return Duration::ZERO;
        };
        let position = match drain::position(&self.shared.pool, self.group_id).await {
            Ok(Some(p)) => p,
            Ok(None) => return config.standby_poll,
            Err(e) => return self.db_error(e),
        };
        if self.fresh_lease {
            // Anything read under an earlier lease may have been stored by
            // another worker since: start over at the oldest unacked message.
            self.shared.forget_consumers(&position.queue).await;
            self.fresh_lease = false;
            // Present from the start, so an alert sees 0 before it sees more.
            let metrics = &self.shared.metrics;
            metrics
                .blocked_seconds
                .with_label_values(&[&position.group]);
            metrics
                .seal_held_by_ingest
                .with_label_values(&[&position.group]);
            metrics.open_gaps.with_label_values(&[&position.group]);
            metrics.parked_records.with_label_values(&[&position.group]);
            metrics
                .oldest_gap_seconds
                .with_label_values(&[&position.group]);
        }
        self.shared
            .metrics
            .drain_epoch
            .with_label_values(&[&position.group])
            .set(position.drain_epoch);
        if position.open_gaps > 0 || self.gaps_counted.is_some() {
            if let Some(pause) = self.tend_gaps(&lease, &position).await {
                return pause;
            }
        }
        // Bounded: a database or broker that hangs (rather than refuses)
        // must not freeze the worker; what was in flight is read again. Far
        // above a slow but working step (every call in it has its own bound).
        let step_limit = config.step_limit;
        // Blocked on an old epoch: an SRE (or abandon_after) may give it up
        // at any moment; the devices with nothing stranded there must not
        // wait for this attempt on a dead region to time out.
        let old_epoch = position.drain_epoch < position.epoch;
        let blocked_here = old_epoch
            && self
                .blocked
                .as_ref()
                .is_some_and(|b| b.epoch == position.drain_epoch);
        let group_id = self.group_id;
        let step = tokio::time::timeout(step_limit, self.step(&lease, &position));
        let stepped = if blocked_here {
            tokio::select! {
                stepped = step => Some(stepped),
                () = given_up(&shared.pool, group_id, position.drain_epoch, step_limit) => None,
            }
        } else {
            Some(step.await)
        };
        let result = match stepped {
            Some(Ok(result)) => result,
            Some(Err(_)) => {
                self.shared.forget_consumers(&position.queue).await;
                Err(StepError::Store(StoreError::TimedOut {
                    what: "a drain step",
                    limit: step_limit,
                }))
            }
            None => {
                // Whatever the step had read is unacked: read again.
                self.shared.forget_consumers(&position.queue).await;
                tracing::info!(group = %position.group, epoch = position.drain_epoch,
                    "the epoch this worker was blocked on was given up: going on");
                self.unblocked(&position).await;
                return Duration::ZERO;
            }
        };
        if result.is_ok() && self.db_failing {
            tracing::info!(group = %position.group, "database answers again: draining");
            self.db_failing = false;
        }
        match result {
            Ok(step) => {
                self.unblocked(&position).await;
                self.backoff = Duration::from_millis(100);
                if step != Step::Stored && self.last_sweep.elapsed() >= config.sweep_interval {
                    self.sweep_leftovers(&lease, &position).await;
                }
                match step {
                    // receive already waited for messages when idle
                    Step::Stored | Step::Followed | Step::Idle => Duration::ZERO,
                    Step::WaitingForSeal => config.seal_poll,
                }
            }
            Err(StepError::LeaseLost) => {
                tracing::warn!(group = %position.group, "lost the drain lease: standing by");
                self.drop_lease(&position.group);
                Duration::ZERO
            }
            Err(StepError::Store(e)) => self.db_error(e),
            Err(StepError::Broker(e)) => {
                let pause = self.blocked_on(&position, e).await;
                if old_epoch {
                    // The back-off, unless the epoch is given up meanwhile.
                    given_up(&shared.pool, self.group_id, position.drain_epoch, pause).await;
                    return Duration::ZERO;
                }
                pause
            }
        }
    }

    async fn lease_or_standby(&mut self) -> Option<LeaseToken> {
        if let Some(lease) = self.lease {
            return Some(lease);
        }
        let config = &self.shared.config;
        match drain::acquire_lease(
            &self.shared.pool,
            self.group_id,
            self.shared.instance,
            config.lease,
        )
        .await
        {
            Ok(Some(lease)) => {
                tracing::info!(
                    group_id = self.group_id,
                    token = lease.token,
                    "took the drain lease: draining"
                );
                self.lease = Some(lease);
                self.lease_renewed = Instant::now();
                self.fresh_lease = true;
                self.set_lease_gauge(1);
                Some(lease)
            }
            Ok(None) => None,
            Err(e) => {
                self.db_error(e);
                None
            }
        }
    }

    /// Renews the lease when a quarter of it has passed since the last
    /// renewal (every stored batch renews it too). `Some(pause)` on a
    /// database error.
    async fn renew_if_due(&mut self, lease: &LeaseToken) -> Option<Duration> {
        let length = self.shared.config.lease;
        if self.lease_renewed.elapsed() < length / 4 {
            return None;
        }
        match drain::renew_lease(&self.shared.pool, lease, length).await {
            Ok(true) => self.lease_renewed = Instant::now(),
            Ok(false) => {
                tracing::warn!(
                    group_id = self.group_id,
                    "lost the drain lease: standing by"
                );
                self.lease = None;
                self.set_lease_gauge(0);
            }
            Err(e) => return Some(self.db_error(e)),
        }
        None
    }

    fn drop_lease(&mut self, group: &str) {
        self.lease = None;
        self.shared
            .metrics
            .lease_held
            .with_label_values(&[group])
            .set(0);
    }

    fn set_lease_gauge(&self, v: i64) {
        if let Some(name) = self.shared.group_name(self.group_id) {
            self.shared
                .metrics
                .lease_held
                .with_label_values(&[&name])
                .set(v);
        }
    }

    fn db_error(&mut self, e: StoreError) -> Duration {
        if !self.db_failing {
            tracing::warn!(group_id = self.group_id, error = %e, "database unavailable: acking nothing, retrying");
            self.db_failing = true;
        }
        self.next_backoff()
    }

    fn next_backoff(&mut self) -> Duration {
        let b = self.backoff;
        // Never sleep through the lease: it is renewed between turns.
        let cap = (self.shared.config.lease / 4).min(Duration::from_secs(5));
        self.backoff = (self.backoff * 2).min(cap);
        b
    }

    async fn step(&mut self, lease: &LeaseToken, pos: &Position) -> Result<Step, StepError> {
        let shared = self.shared.clone();
        let config = &shared.config;
        let old_epoch = pos.drain_epoch < pos.epoch;
        let conn = match self.reach(pos).await {
            Ok(conn) => conn,
            // An old epoch on a namespace that cannot be reached may hold
            // nothing at all: then it need not be read.
            Err(e) if old_epoch => {
                return match self.skip_if_never_published(lease, pos).await? {
                    Some(step) => Ok(step),
                    None => Err(StepError::Broker(e)),
                }
            }
            Err(e) => return Err(StepError::Broker(e)),
        };
        let ns = conn.namespace();
        if self
            .last_depth
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(2))
        {
            self.last_depth = Some(Instant::now());
            if let Ok(depth) = ns.depth(&pos.queue).await {
                self.shared
                    .metrics
                    .backlog
                    .with_label_values(&[
                        &pos.group,
                        &self.shared.namespace_name(pos.drain_namespace_id),
                    ])
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
        }
        // An old epoch that is sealed needs no waiting for more messages.
        let wait = if old_epoch {
            Duration::from_millis(50)
        } else {
            config.receive_wait
        };
        let here = (pos.drain_namespace_id, pos.drain_epoch);
        let reached_later_epoch = if old_epoch && self.boundary == Some(here) {
            true
        } else {
            let (first, later) = match read(&shared, ns, pos, wait, self.receive_max()).await {
                Ok(read) => {
                    self.note_read(&read.0);
                    read
                }
                Err(e) => {
                    reset(ns, &pos.queue).await?;
                    return Err(e);
                }
            };
            if first.batch.is_empty() {
                if !later.is_empty() {
                    reset(ns, &pos.queue).await?;
                }
                !later.is_empty()
            } else {
                let run = self.store_run(lease, pos, ns, first, later).await?;
                if !run.reached_later_epoch {
                    return Ok(Step::Stored);
                }
                true
            }
        };
        if old_epoch && reached_later_epoch {
            self.boundary = Some(here);
        }
        if !old_epoch {
            return Ok(Step::Idle);
        }
        // An old epoch: once sealed (no sender can still write to it) and
        // empty, follow the trail.
        if !self.sealed(pos).await? {
            return Ok(Step::WaitingForSeal);
        }
        if !reached_later_epoch {
            // Sealed now: anything that landed before the seal is in the
            // queue. Look once more, then count what is left.
            let again = ns
                .receive(&pos.queue, config.batch_size, Duration::from_millis(50))
                .await
                .map_err(StepError::Broker)?;
            if !again.is_empty() {
                ns.nack(&pos.queue, again)
                    .await
                    .map_err(StepError::Broker)?;
                return Ok(Step::Stored);
            }
            if ns.depth(&pos.queue).await.map_err(StepError::Broker)? > 0 {
                return Ok(Step::Stored);
            }
        }
        // Let the next epoch's reads start at its oldest message.
        ns.nack(&pos.queue, Vec::new())
            .await
            .map_err(StepError::Broker)?;
        self.follow(lease, pos, format!("epoch {} drained", pos.drain_epoch))
            .await
    }

    /// The connection to the namespace being drained, its queue ensured.
    async fn reach(&self, pos: &Position) -> Result<Pooled, TransportError> {
        let conn = self.shared.namespace(pos.drain_namespace_id).await?;
        conn.ensure_queue(&pos.queue).await?;
        Ok(conn)
    }

    /// An old epoch whose namespace cannot be reached and that no ingest
    /// instance ever published to, once sealed: followed past without
    /// reading its queue (senders moved to a mistyped endpoint and straight
    /// back). `None`: it was published to, it waits for its namespace.
    async fn skip_if_never_published(
        &mut self,
        lease: &LeaseToken,
        pos: &Position,
    ) -> Result<Option<Step>, StepError> {
        let pool = &self.shared.pool;
        if !drain::never_published(pool, self.group_id, pos.drain_epoch).await? {
            return Ok(None);
        }
        if !self.sealed(pos).await? {
            return Ok(Some(Step::WaitingForSeal));
        }
        let name = self.shared.namespace_name(pos.drain_namespace_id);
        let reason = format!(
            "epoch {} on {name} drained unread: no ingest instance ever published to it",
            pos.drain_epoch
        );
        tracing::info!(group = %pos.group, epoch = pos.drain_epoch, namespace = %name,
            "no ingest instance ever published to this epoch: following the trail without reading it");
        self.follow(lease, pos, reason).await.map(Some)
    }

    /// Whether the old epoch being drained is sealed; sets
    /// `georelay_drain_seal_held_by_ingest` to the ingest instances that
    /// alone keep it from sealing past the grace.
    async fn sealed(&self, pos: &Position) -> Result<bool, StepError> {
        let config = &self.shared.config;
        let seal = drain::seal_if_ready(
            &self.shared.pool,
            self.group_id,
            pos.drain_epoch,
            config.seal_grace,
            config.publish_deadline,
        )
        .await?;
        self.shared
            .metrics
            .seal_held_by_ingest
            .with_label_values(&[&pos.group])
            .set(seal.held_by_ingest);
        Ok(seal.sealed)
    }

    /// Marks the drained epoch done and moves to the next (`reason` goes in
    /// the `drain_followed` event).
    async fn follow(
        &mut self,
        lease: &LeaseToken,
        pos: &Position,
        reason: String,
    ) -> Result<Step, StepError> {
        let config = &self.shared.config;
        let actor = Actor {
            actor: self.shared.actor.clone(),
            reason: Some(reason),
        };
        match drain::follow_trail(
            &self.shared.pool,
            lease,
            config.lease,
            pos.drain_epoch,
            &actor,
        )
        .await?
        {
            None => Err(StepError::LeaseLost),
            Some(to) => {
                // Whoever held that epoch's seal holds nothing now; the
                // next old epoch, if any, is measured at its seal check.
                self.shared
                    .metrics
                    .seal_held_by_ingest
                    .with_label_values(&[&pos.group])
                    .set(0);
                tracing::info!(
                    group = %pos.group,
                    drained = pos.drain_epoch,
                    from = %self.shared.namespace_name(pos.drain_namespace_id),
                    to = %self.shared.namespace_name(to),
                    "epoch drained: following the senders"
                );
                Ok(Step::Followed)
            }
        }
    }

    /// Stores `current` and acks it once committed. While batches come full
    /// and in the same epoch, it reads the next batch while the current one
    /// is stored and the one before it acked, so the broker's round trips
    /// and the database's overlap. Order is unchanged: a batch is stored only
    /// after the one before it committed, and acked only after its own
    /// commit; on any error nothing uncommitted is acked and reads start over
    /// at the oldest unacked message. `later`: messages of a later epoch
    /// behind `current`, given back to the queue at the end.
    async fn store_run(
        &mut self,
        lease: &LeaseToken,
        pos: &Position,
        ns: &Namespace,
        mut current: Opened,
        mut later: Vec<Delivery>,
    ) -> Result<Run, StepError> {
        let shared = self.shared.clone();
        let config = &shared.config;
        // Bounded, so the position (a moved sender) is looked at again soon.
        let until = Instant::now() + RUN_LIMIT.min(config.lease / 4);
        let mut acking: Vec<Delivery> = Vec::new();
        let mut ack_failed = false;
        let mut messages = 0;
        loop {
            let go_on = later.is_empty() && current.full() && Instant::now() < until;
            let max = self.receive_max();
            let read_next = async {
                match go_on {
                    true => Some(read(&shared, ns, pos, config.receive_wait, max).await),
                    false => None,
                }
            };
            let previous = std::mem::take(&mut acking);
            let ack_previous = async {
                match previous.is_empty() {
                    true => Ok(()),
                    false => ns.ack(previous).await,
                }
            };
            // Counted as soon as it commits, not when the read beside it ends.
            let store = async {
                let stored = shared.store(lease, pos, &current).await;
                if let Ok(Some(stored)) = &stored {
                    shared.record(pos, &current, stored);
                }
                (stored, Instant::now())
            };
            let ((stored, committed_at), next, acked) =
                tokio::join!(store, read_next, ack_previous);
            if let Err(e) = acked {
                tracing::debug!(error = %e, "ack failed after commit; the records will come again and be dropped");
                ack_failed = true;
            }
            match stored {
                Ok(Some(_)) => {
                    // Storing extends the lease.
                    self.lease_renewed = committed_at;
                    messages += current.batch.len();
                    acking = current.batch;
                }
                Ok(None) => {
                    reset(ns, &pos.queue).await?;
                    return Err(StepError::LeaseLost);
                }
                Err(e) => {
                    reset(ns, &pos.queue).await?;
                    return Err(e.into());
                }
            }
            match next {
                Some(Ok((opened, rest))) if !opened.batch.is_empty() => {
                    self.note_read(&opened);
                    current = opened;
                    later = rest;
                }
                Some(Ok((_, rest))) => {
                    later = rest;
                    break;
                }
                Some(Err(e)) => {
                    // Stored and committed: ack that, then report the read.
                    if let Err(e) = ns.ack(acking).await {
                        tracing::debug!(error = %e, "ack failed after commit; the records will come again and be dropped");
                    }
                    reset(ns, &pos.queue).await?;
                    return Err(e);
                }
                None => break,
            }
        }
        if let Err(e) = ns.ack(acking).await {
            tracing::debug!(error = %e, "ack failed after commit; the records will come again and be dropped");
            ack_failed = true;
        }
        let reached_later_epoch = !later.is_empty();
        if ack_failed || reached_later_epoch {
            reset(ns, &pos.queue).await?;
        }
        Ok(Run {
            reached_later_epoch,
            messages,
        })
    }

    async fn blocked_on(&mut self, pos: &Position, e: TransportError) -> Duration {
        let name = self.shared.namespace_name(pos.drain_namespace_id);
        let now = Instant::now();
        let b = match &mut self.blocked {
            Some(b) if b.namespace_id == pos.drain_namespace_id && b.epoch == pos.drain_epoch => b,
            _ => {
                tracing::warn!(group = %pos.group, epoch = pos.drain_epoch, namespace = %name, error = %e,
                    "drain blocked: cannot read the epoch being drained; newer records wait (strict order)");
                self.report_blocked(Some(format!(
                    "cannot read epoch {} on namespace {name}: {e}",
                    pos.drain_epoch
                )))
                .await;
                self.blocked.insert(Blocked {
                    since: now,
                    namespace_id: pos.drain_namespace_id,
                    epoch: pos.drain_epoch,
                    declared: false,
                })
            }
        };
        let blocked_for = now - b.since;
        self.shared
            .metrics
            .blocked_seconds
            .with_label_values(&[&pos.group])
            .set(blocked_for.as_secs_f64());
        // The worker, too, may declare the senders' namespace troubled.
        let senders_here =
            pos.drain_namespace_id == pos.sender_namespace_id && pos.drain_epoch == pos.epoch;
        let config = &self.shared.config;
        if senders_here
            && !b.declared
            && blocked_for >= config.declare_trouble_after
            && e.kind() != ErrorKind::Rejected
        {
            b.declared = true;
            let actor = Actor {
                actor: self.shared.actor.clone(),
                reason: Some(format!(
                    "drain cannot read namespace {name} for {blocked_for:?}"
                )),
            };
            match routing::fail_over(
                &self.shared.pool,
                self.group_id,
                pos.drain_namespace_id,
                Trouble::Down,
                &[],
                config.failover_cooldown,
                &actor,
            )
            .await
            {
                Ok(Failover::Moved {
                    namespace_id,
                    epoch,
                }) => tracing::warn!(
                    group = %pos.group, from = %name, to = %self.shared.namespace_name(namespace_id), epoch,
                    "worker moved the senders away from an unreadable namespace"
                ),
                Ok(other) => {
                    tracing::info!(group = %pos.group, outcome = ?other, "worker declared trouble")
                }
                Err(e) => {
                    tracing::warn!(group = %pos.group, error = %e, "could not declare trouble")
                }
            }
        }
        let old_epoch = pos.drain_epoch < pos.epoch;
        if let Some(after) = pos.abandon_after_s.filter(|_| old_epoch) {
            if blocked_for.as_secs_f64() >= after {
                self.give_up(pos, &name, blocked_for, after).await;
            }
        }
        self.next_backoff()
    }

    /// The group's `abandon_after` ran out on an old epoch that cannot be
    /// read: gives it up as `admin trail abandon` would (nothing
    /// acknowledged is lost: the devices' gaps wait for their agents).
    async fn give_up(&mut self, pos: &Position, name: &str, blocked_for: Duration, after: f64) {
        let actor = Actor {
            actor: self.shared.actor.clone(),
            reason: Some(format!(
                "cannot read epoch {} on {name} for {blocked_for:?} (the group's abandon_after is {after} s)",
                pos.drain_epoch
            )),
        };
        let pool = &self.shared.pool;
        match georelay_store::control::abandon_epoch(pool, &pos.group, pos.drain_epoch, &actor)
            .await
        {
            Ok(done) => {
                tracing::warn!(group = %pos.group, epoch = pos.drain_epoch, namespace = %name,
                devices_waiting = done.gaps, worker_on = %done.worker_on,
                "gave up on an epoch that could not be read for the group's abandon_after: devices with records stranded there wait for their agents to send them again; the others flow now")
            }
            Err(e) => tracing::info!(group = %pos.group, epoch = pos.drain_epoch, error = %e,
                "cannot give up on the epoch yet; will try again"),
        }
    }

    /// Closes the gaps that filled (or that an SRE released) and stores the
    /// records parked behind them, in order; every few seconds counts what
    /// is still open for the gauges and says at ERROR which device has
    /// waited long and how to let it go. `Some(pause)`: stop this turn.
    async fn tend_gaps(&mut self, lease: &LeaseToken, pos: &Position) -> Option<Duration> {
        let shared = self.shared.clone();
        let release = gaps::release_gaps(&shared.pool, lease, shared.config.lease);
        match tokio::time::timeout(shared.config.step_limit, release).await {
            Ok(Ok(Some(released))) => {
                for g in &released.closed {
                    if g.how == "filled" {
                        tracing::info!(group = %pos.group, device = %g.device_id, epoch = g.epoch,
                            seqs = %gaps::seqs(g.after_seq, g.through_seq), open_for = ?g.open_for,
                            "records stranded in an abandoned epoch are back (sent again): the device's parked records are stored after them, in order");
                    } else {
                        tracing::warn!(group = %pos.group, device = %g.device_id, epoch = g.epoch,
                            seqs = %gaps::seqs(g.after_seq, g.through_seq), open_for = ?g.open_for,
                            "gap released by an SRE: whatever of those seqs is not stored is given up; the device's parked records are stored in order");
                    }
                    self.gaps_reported.remove(&(g.device_id.clone(), g.epoch));
                }
                if released.stored > 0 {
                    shared.metrics.rows_stored.inc_by(released.stored);
                }
                if !released.closed.is_empty() {
                    self.gaps_counted = None;
                }
            }
            Ok(Ok(None)) => {
                tracing::warn!(group = %pos.group, "lost the drain lease: standing by");
                self.drop_lease(&pos.group);
                return Some(Duration::ZERO);
            }
            Ok(Err(e)) => return Some(self.db_error(e)),
            Err(_) => {
                return Some(self.db_error(georelay_store::StoreError::TimedOut {
                    what: "releasing parked records",
                    limit: shared.config.step_limit,
                }))
            }
        }
        if self
            .gaps_counted
            .is_some_and(|at| at.elapsed() < GAP_COUNT_EVERY)
        {
            return None;
        }
        let open = match gaps::open(&shared.pool, Some(&pos.group)).await {
            Ok(open) => open,
            Err(e) => return Some(self.db_error(e)),
        };
        let m = &shared.metrics;
        let now = Utc::now();
        let oldest = open
            .iter()
            .map(|g| (now - g.opened_at).num_milliseconds() as f64 / 1000.0)
            .fold(0.0, f64::max);
        m.open_gaps
            .with_label_values(&[&pos.group])
            .set(open.len() as i64);
        m.parked_records
            .with_label_values(&[&pos.group])
            .set(open.iter().map(|g| g.parked).sum());
        m.oldest_gap_seconds
            .with_label_values(&[&pos.group])
            .set(oldest.max(0.0));
        for g in &open {
            let waited = (now - g.opened_at).to_std().unwrap_or_default();
            if waited >= shared.config.gap_warn_after
                && g.release_requested_at.is_none()
                && self.gaps_reported.insert((g.device_id.clone(), g.epoch))
            {
                tracing::error!(group = %pos.group, device = %g.device_id, epoch = g.epoch,
                    seqs = %gaps::seqs(g.after_seq, g.through_seq), waited = ?waited, parked = g.parked,
                    "device waits for records stranded in an abandoned epoch: its newer records are parked until its agent sends those again (it does when it next reaches ingest); if it never will (the device died, or it is a plain HTTP client that keeps nothing after a 202), give them up: georelay admin device release-gap --device {}", g.device_id);
            }
        }
        self.gaps_counted = (!open.is_empty()).then(Instant::now);
        None
    }

    async fn unblocked(&mut self, pos: &Position) {
        if let Some(b) = self.blocked.take() {
            tracing::info!(group = %pos.group, namespace = %self.shared.namespace_name(b.namespace_id),
                blocked_for = ?b.since.elapsed(), "drain resumed");
            self.shared
                .metrics
                .blocked_seconds
                .with_label_values(&[&pos.group])
                .set(0.0);
            self.report_blocked(None).await;
        }
    }

    /// Writes the blocked state on the lease row for the console and `admin
    /// status`; the metric and the log already have it, so a database that
    /// does not answer only costs the console its line.
    async fn report_blocked(&self, why: Option<String>) {
        let Some(lease) = self.lease else { return };
        let blocked = why.as_deref().map(|why| (Utc::now(), why));
        let report = drain::report_blocked(&self.shared.pool, &lease, blocked);
        match tokio::time::timeout(Duration::from_secs(2), report).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(group_id = self.group_id, error = %e, "cannot record the blocked state")
            }
            Err(_) => tracing::debug!(
                group_id = self.group_id,
                "recording the blocked state timed out"
            ),
        }
    }

    /// Stores leftovers from drained namespaces that are reachable: publishes
    /// that timed out but landed after the epoch was drained. The key drops
    /// those already stored. An unreachable one is skipped until next time.
    async fn sweep_leftovers(&mut self, lease: &LeaseToken, pos: &Position) {
        self.last_sweep = Instant::now();
        let drained = match drain::drained_namespaces(&self.shared.pool, self.group_id).await {
            Ok(d) => d,
            Err(_) => return,
        };
        for namespace_id in drained {
            let Ok(conn) = self.shared.namespace(namespace_id).await else {
                continue;
            };
            let ns = conn.namespace();
            if !ns.depth(&pos.queue).await.is_ok_and(|d| d > 0) {
                continue;
            }
            let leftover = Position {
                drain_namespace_id: namespace_id,
                ..pos.clone()
            };
            let (opened, later) = match read(
                &self.shared,
                ns,
                &leftover,
                Duration::from_millis(50),
                self.receive_max(),
            )
            .await
            {
                Ok((opened, later)) if opened.batch.is_empty() => {
                    if !later.is_empty() {
                        drop(reset(ns, &pos.queue).await);
                    }
                    continue;
                }
                Ok(read) => read,
                Err(e) => {
                    drop(reset(ns, &pos.queue).await);
                    tracing::debug!(error = %e, "leftover sweep failed; will try again");
                    continue;
                }
            };
            match self.store_run(lease, &leftover, ns, opened, later).await {
                Ok(run) => {
                    tracing::info!(group = %pos.group, namespace = %self.shared.namespace_name(namespace_id), count = run.messages, "swept leftovers from a drained namespace")
                }
                Err(e) => tracing::debug!(error = %e, "leftover sweep failed; will try again"),
            }
        }
        self.sweep_broker_dead_letters(lease, pos).await;
    }

    /// Moves what brokers set aside in the group queue's dead-letter
    /// sub-queue (Service Bus) to `dead_letters`, in every namespace, so an
    /// accepted record never ends there unseen.
    async fn sweep_broker_dead_letters(&mut self, lease: &LeaseToken, pos: &Position) {
        for (namespace_id, has_one) in self.shared.namespaces_with_dead_letter_queues() {
            let name = self.shared.namespace_name(namespace_id);
            let gauge = self
                .shared
                .metrics
                .broker_dead_lettered
                .with_label_values(&[&pos.group, &name]);
            // NATS has no such sub-queue (its gauge stays 0): no connection needed.
            if !has_one {
                continue;
            }
            let Ok(conn) = self.shared.namespace(namespace_id).await else {
                continue;
            };
            let ns = conn.namespace();
            let Some(queue) = ns.dead_letter_queue(&pos.queue) else {
                continue;
            };
            let Ok(count) = ns.dead_lettered(&pos.queue).await else {
                continue;
            };
            gauge.set(i64::try_from(count).unwrap_or(i64::MAX));
            if count == 0 {
                continue;
            }
            let dead = Position {
                drain_namespace_id: namespace_id,
                queue,
                ..pos.clone()
            };
            let result = match read(
                &self.shared,
                ns,
                &dead,
                Duration::from_millis(50),
                self.receive_max(),
            )
            .await
            {
                Ok((opened, later)) if !opened.batch.is_empty() => {
                    self.store_run(lease, &dead, ns, opened, later).await
                }
                Ok(_) => continue,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                drop(reset(ns, &dead.queue).await);
                tracing::warn!(group = %pos.group, namespace = %name, error = %e, "cannot move the broker's dead-lettered messages yet; will try again");
            }
        }
    }
}

/// Returns once epoch `epoch` of the group is drained (given up, by an SRE
/// or the group's abandon_after), or after `limit`; looks every 100 ms.
async fn given_up(pool: &georelay_store::PgPool, group_id: i64, epoch: i64, limit: Duration) {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        if drain::epoch_drained(pool, group_id, epoch)
            .await
            .unwrap_or(false)
        {
            return;
        }
    }
}

/// How often the gap gauges are counted while gaps are open.
const GAP_COUNT_EVERY: Duration = Duration::from_secs(5);

/// How long one run of pipelined batches may go on before the worker looks
/// at its position again (also bounded by a quarter of the lease).
const RUN_LIMIT: Duration = Duration::from_secs(1);

/// What a run of stored batches did.
struct Run {
    reached_later_epoch: bool,
    /// Messages stored (rows, duplicates and dead letters).
    messages: usize,
}

/// A batch read in queue order and opened, not stored yet.
struct Opened {
    batch: Vec<Delivery>,
    rows: Vec<Row>,
    dead: Vec<DeadLetter>,
    /// How many messages the read asked for.
    asked: usize,
}

impl Opened {
    /// The read got all it asked for: more may be waiting.
    fn full(&self) -> bool {
        self.batch.len() >= self.asked
    }

    /// Records the batch carried: rows and dead letters.
    fn records(&self) -> usize {
        self.rows.len() + self.dead.len()
    }
}

/// Receives up to `max` messages of the epoch being drained, cuts them at
/// the first message of a later epoch on the same namespace (a namespace can
/// appear twice in a trail, A → B → A) and opens what comes before, each
/// envelope of a bundle on its own. Returns the
/// opened batch and the later messages, which the caller gives back once
/// nothing it holds waits for an ack. Acks and nacks nothing itself, so it
/// can run beside a store.
///
/// Only an authentic message of an epoch the trail puts on this namespace
/// ends the epoch; one naming an epoch the trail does not put here is a
/// `wrong_epoch` dead letter (it would otherwise end the epoch early, or be
/// given back and read again forever), and one that does not open is dead
/// where it stands, like any other.
async fn read(
    shared: &Shared,
    ns: &Namespace,
    pos: &Position,
    wait: Duration,
    max: usize,
) -> Result<(Opened, Vec<Delivery>), StepError> {
    let mut batch = ns
        .receive(&pos.queue, max, wait)
        .await
        .map_err(StepError::Broker)?;
    let mut rows = Vec::with_capacity(batch.len());
    let mut dead = Vec::new();
    let mut homes = Vec::new();
    let mut cut = batch.len();
    'messages: for (i, d) in batch.iter().enumerate() {
        // Set aside whatever it holds: the broker gave up on it, or the
        // message itself cannot be read as usual.
        let aside = match (&d.dead_lettered, &d.unreadable) {
            (Some(why), _) => Some((
                DeadLetterReason::BrokerDeadLettered,
                format!("the broker dead-lettered it ({why}); `georelay admin dead-letters replay` stores it once its order no longer matters"),
            )),
            (None, Some(why)) => Some((
                DeadLetterReason::Unreadable,
                format!("the queue message cannot be read as usual: {why}"),
            )),
            (None, None) => None,
        };
        let parts = match envelope::unbundle(&d.payload) {
            Ok(parts) => parts,
            Err(e) => {
                let (reason, detail) =
                    aside.unwrap_or((DeadLetterReason::Undecodable, e.to_string()));
                dead.push(letter(&Part::whole(d), reason, detail, None, None));
                continue;
            }
        };
        let of = parts.len();
        for (index, raw) in parts.into_iter().enumerate() {
            let part = Part {
                delivery: d,
                index,
                of,
                raw,
            };
            // Decoded once: for the placing and for opening.
            let envelope = Envelope::decode(&part.raw);
            if let Some((reason, detail)) = &aside {
                let claimed = envelope.as_ref().ok();
                dead.push(letter(
                    &part,
                    *reason,
                    detail.clone(),
                    claimed.map(|e| e.device.to_string()),
                    claimed.and_then(|e| i64::try_from(e.record.seq).ok()),
                ));
                continue;
            }
            let place = match &envelope {
                Ok(e) => shared.place(pos, e.epoch as i64, &mut homes).await?,
                Err(_) => Place::Here,
            };
            // Ingest bundles one epoch's records: only a message's first
            // envelope can end the epoch being drained.
            let place = match place {
                Place::Later if index > 0 => Place::Wrong(
                    "a bundle whose envelopes name different epochs (ingest never makes one)"
                        .into(),
                ),
                place => place,
            };
            match (place, shared.open(&part, envelope).await?) {
                (Place::Here, Ok(row)) => rows.push(row),
                (Place::Later, Ok(_)) => {
                    cut = i;
                    break 'messages;
                }
                (Place::Wrong(detail), Ok(row)) => dead.push(letter(
                    &part,
                    DeadLetterReason::WrongEpoch,
                    detail,
                    Some(row.device_id),
                    Some(row.seq),
                )),
                (_, Err(letter)) => dead.push(letter),
            }
        }
    }
    let later = batch.split_off(cut);
    let opened = Opened {
        batch,
        rows,
        dead,
        asked: max,
    };
    Ok((opened, later))
}

/// Where a message read while draining a position belongs.
enum Place {
    /// The epoch being drained, or an older one (a publish that landed late):
    /// store it now.
    Here,
    /// A later epoch of this namespace: the epoch being drained ends here.
    Later,
    /// No ingest instance could have published it here: why.
    Wrong(String),
}

/// One envelope of a queue message: the message itself, or the `index`th
/// of the `of` envelopes of its bundle.
struct Part<'a> {
    delivery: &'a Delivery,
    index: usize,
    of: usize,
    raw: Bytes,
}

impl<'a> Part<'a> {
    /// The whole message, as one.
    fn whole(delivery: &'a Delivery) -> Self {
        Self {
            delivery,
            index: 0,
            of: 1,
            raw: delivery.payload.clone(),
        }
    }

    /// The message's id, and for a bundle's envelope its place in it
    /// (`"{id}#2"`), kept as text PostgreSQL can store (a NUL byte would
    /// refuse the dead letter itself).
    fn message_id(&self) -> Option<String> {
        let id = self.delivery.id.as_ref()?.replace('\0', "\u{FFFD}");
        Some(match self.of {
            1 => id,
            _ => format!("{id}#{}", self.index + 1),
        })
    }
}

/// A dead letter for `part`, keeping its envelope's bytes.
fn letter(
    part: &Part<'_>,
    reason: DeadLetterReason,
    detail: String,
    device: Option<String>,
    seq: Option<i64>,
) -> DeadLetter {
    DeadLetter {
        message_id: part.message_id(),
        device_id: device,
        seq,
        reason,
        detail,
        raw: part.raw.clone(),
    }
}

/// Forgets the queue's consumer: the next read starts at the oldest unacked
/// message (nothing read and not acked is lost or reordered).
async fn reset(ns: &Namespace, queue: &str) -> Result<(), StepError> {
    ns.nack(queue, Vec::new()).await.map_err(StepError::Broker)
}

impl Shared {
    /// Metrics and logs for a committed batch.
    fn record(&self, pos: &Position, opened: &Opened, stored: &Stored) {
        let m = &self.metrics;
        m.rows_stored.inc_by(stored.inserted);
        m.duplicates.inc_by(stored.duplicates);
        m.batch_size.observe(opened.records() as f64);
        for (device, seq) in &stored.conflicts {
            m.dead_letters
                .with_label_values(&[DeadLetterReason::SeqConflict.as_str()])
                .inc();
            tracing::error!(group = %pos.group, device = %device, seq,
                "the device reused a seq (and so a nonce) with a different payload: kept in dead_letters as seq_conflict; re-key the device");
        }
        for (device, seq) in &stored.late {
            m.dead_letters
                .with_label_values(&[DeadLetterReason::GapReleased.as_str()])
                .inc();
            tracing::error!(group = %pos.group, device = %device, seq,
                "a record of a gap an SRE released came back after all (its region returned, or the device woke up): newer records of the device are stored, so it is kept in dead_letters as gap_released instead of stored out of order");
        }
        for d in &stored.refused {
            m.dead_letters.with_label_values(&[d.reason.as_str()]).inc();
            tracing::error!(group = %pos.group, device = ?d.device_id, seq = ?d.seq, detail = %d.detail,
                "PostgreSQL refused one record: kept in dead_letters as refused_by_database, the rest of its batch stored");
        }
        for d in &opened.dead {
            m.dead_letters.with_label_values(&[d.reason.as_str()]).inc();
            match d.reason {
                DeadLetterReason::KeyUnopenable => {
                    tracing::error!(group = %pos.group, device = ?d.device_id, seq = ?d.seq, detail = %d.detail,
                    "record dead-lettered: the device's row in devices was altered or comes from another installation; restore its key_sealed from this installation's backup, or register the device again with a new key")
                }
                DeadLetterReason::BrokerDeadLettered => {
                    tracing::error!(group = %pos.group, device = ?d.device_id, seq = ?d.seq, detail = %d.detail,
                    "the broker dead-lettered a record behind georelay's back: kept in dead_letters as broker_dead_lettered (the queue was made with a low MaxDeliveryCount, or something else reads it); see `georelay admin dead-letters list --reason broker_dead_lettered`")
                }
                DeadLetterReason::WrongEpoch | DeadLetterReason::Unreadable => {
                    tracing::error!(group = %pos.group, device = ?d.device_id, seq = ?d.seq, detail = %d.detail,
                    "record dead-lettered: a message no ingest instance could have published here (someone else writes to this queue)")
                }
                _ => {
                    tracing::warn!(group = %pos.group, reason = d.reason.as_str(), message_id = ?d.message_id, detail = %d.detail, "record dead-lettered")
                }
            }
        }
        {
            let mut seen = self.seen.lock();
            for row in &opened.rows {
                match seen.get_mut(&row.device_id) {
                    Some(newest) => *newest = (*newest).max(row.received_at),
                    None => {
                        seen.insert(row.device_id.clone(), row.received_at);
                    }
                }
            }
        }
        if let Some(last) = opened.rows.last() {
            let lag = (Utc::now() - last.received_at).num_milliseconds() as f64 / 1000.0;
            m.lag_seconds
                .with_label_values(&[&pos.group])
                .set(lag.max(0.0));
        }
    }

    /// Stores an opened batch in one transaction that checks the lease.
    /// `Ok(None)`: the lease is lost, nothing was written.
    async fn store(
        &self,
        lease: &LeaseToken,
        pos: &Position,
        opened: &Opened,
    ) -> Result<Option<Stored>, StoreError> {
        let source = drain::Source {
            namespace_id: pos.drain_namespace_id,
            epoch: pos.drain_epoch,
            gaps: pos.gaps,
        };
        drain::store_batch(
            &self.pool,
            lease,
            self.config.lease,
            source,
            &opened.rows,
            &opened.dead,
        )
        .await
    }

    /// Where a message of `epoch` read while draining `pos` belongs.
    /// `homes` remembers the trail look-ups of one batch.
    async fn place(
        &self,
        pos: &Position,
        epoch: i64,
        homes: &mut Vec<(i64, Option<i64>)>,
    ) -> Result<Place, StoreError> {
        if epoch <= pos.drain_epoch {
            return Ok(Place::Here);
        }
        let home = match homes.iter().find(|(e, _)| *e == epoch) {
            Some(&(_, home)) => home,
            None => {
                let home = drain::epoch_namespace(&self.pool, pos.group_id, epoch).await?;
                homes.push((epoch, home));
                home
            }
        };
        let here = self.namespace_name(pos.drain_namespace_id);
        Ok(match home {
            Some(id) if id == pos.drain_namespace_id => Place::Later,
            Some(id) => Place::Wrong(format!(
                "envelope names epoch {epoch}, which the trail puts on namespace {}, but it was read from {here} while draining epoch {}",
                self.namespace_name(id),
                pos.drain_epoch
            )),
            None => Place::Wrong(format!(
                "envelope names epoch {epoch}, which the group's trail does not have; it was read from {here} while draining epoch {}",
                pos.drain_epoch
            )),
        })
    }

    /// A row, or the dead letter for a message that can never be stored.
    /// `Err` only for a database outage (not the message's fault).
    async fn open(
        &self,
        d: &Part<'_>,
        envelope: Result<Envelope, EnvelopeError>,
    ) -> Result<Result<Row, DeadLetter>, StoreError> {
        let envelope = match envelope {
            Ok(e) => e,
            Err(e) => {
                return Ok(Err(letter(
                    d,
                    DeadLetterReason::Undecodable,
                    e.to_string(),
                    None,
                    None,
                )))
            }
        };
        let device = envelope.device.to_string();
        let seq = i64::try_from(envelope.record.seq).ok();
        let auth = match self.keys.get(&device).await {
            Ok(Some(auth)) => auth,
            Ok(None) => {
                return Ok(Err(letter(
                    d,
                    DeadLetterReason::UnknownDevice,
                    "no such device".into(),
                    Some(device),
                    seq,
                )))
            }
            Err(StoreError::Secret(e)) => {
                return Ok(Err(letter(
                    d,
                    DeadLetterReason::KeyUnopenable,
                    format!("the device's sealed key does not open: {e}"),
                    Some(device),
                    seq,
                )))
            }
            Err(e) => return Err(e),
        };
        match envelope.record.open_object(&auth.key, &envelope.device) {
            Ok(payload) => Ok(Ok(Row {
                device_id: device,
                seq: seq.unwrap_or(i64::MAX),
                epoch: i64::try_from(envelope.epoch).unwrap_or(i64::MAX),
                raw: d.raw.clone(),
                payload,
                received_at: DateTime::from_timestamp_micros(envelope.received_at_micros)
                    .unwrap_or_else(Utc::now),
            })),
            Err(RecordError::Authentication) => Ok(Err(letter(
                d,
                DeadLetterReason::BadTag,
                "record does not authenticate".into(),
                Some(device),
                seq,
            ))),
            Err(e) => Ok(Err(letter(
                d,
                DeadLetterReason::NotJsonObject,
                e.to_string(),
                Some(device),
                seq,
            ))),
        }
    }
}
