//! Single-record publishes to one queue, joined into bundles
//! (`georelay_core::envelope::bundle`).
//!
//! Every broker message costs the broker a store and an ack, whatever its
//! size; with one message per record that, not georelay, bounds
//! single-record ingest. So each queue has a lane: one bundle of it is at
//! the broker at a time, and the records that arrive meanwhile wait and go
//! together in the next. A lone record goes at once, as itself (its own
//! message id, so the broker drops a re-publish); under load a bundle
//! carries the records of up to [`MAX_BUNDLE`] concurrent requests. No
//! timer: nothing waits longer than the publish before it.
//!
//! A bundle holds records of one epoch (the worker ends an epoch only at a
//! message's first envelope), in arrival order, and no more bytes than the
//! namespace carries. Its id is unique (`bundle/{lane}/{n}`), never reused:
//! a bundle is not re-published; a device re-sends a record whose request
//! failed, and the worker drops a copy by `(device_id, seq)`.
//!
//! Each request waits for its bundle's outcome at most the publish deadline
//! from when it joined; one that gave up is left out of later bundles.

use bytes::Bytes;
use georelay_core::envelope::{self, MAX_BUNDLE};
use georelay_transport::{ErrorKind, Pooled, TransportError};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

type Outcome = Result<(), TransportError>;

/// The lanes of one namespace connection, by queue.
#[derive(Debug)]
pub struct Lanes {
    /// Makes bundle ids unique across lanes, connections and processes.
    prefix: uuid::Uuid,
    bundles: AtomicU64,
    lanes: Mutex<HashMap<Box<str>, Arc<Lane>>>,
}

#[derive(Debug)]
struct Lane {
    queue: Box<str>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    waiting: VecDeque<Waiting>,
    /// A task is publishing this lane's bundles.
    running: bool,
}

#[derive(Debug)]
struct Waiting {
    epoch: u64,
    id: String,
    envelope: Bytes,
    done: oneshot::Sender<Outcome>,
}

impl Default for Lanes {
    fn default() -> Self {
        Self {
            prefix: uuid::Uuid::new_v4(),
            bundles: AtomicU64::new(0),
            lanes: Mutex::default(),
        }
    }
}

impl Lanes {
    /// Publishes the envelope of one record (message id `id`, published
    /// under `epoch`) to `queue` on `conn`, alone or in a bundle. `Ok` once
    /// the broker has it durably; a timeout after `deadline`.
    pub async fn publish(
        self: &Arc<Self>,
        conn: &Pooled,
        queue: &str,
        epoch: u64,
        id: String,
        envelope: Bytes,
        deadline: Duration,
    ) -> Outcome {
        let lane = self
            .lanes
            .lock()
            .entry(queue.into())
            .or_insert_with(|| {
                Arc::new(Lane {
                    queue: queue.into(),
                    state: Mutex::default(),
                })
            })
            .clone();
        let (done, outcome) = oneshot::channel();
        let start = {
            let mut state = lane.state.lock();
            state.waiting.push_back(Waiting {
                epoch,
                id,
                envelope,
                done,
            });
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            tokio::spawn(self.clone().run(lane, conn.clone()));
        }
        match tokio::time::timeout(deadline, outcome).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(TransportError::new(
                ErrorKind::Unreachable,
                "the publish was abandoned",
            )),
            Err(_) => Err(TransportError::new(
                ErrorKind::Timeout,
                format!("publish: no answer within {deadline:?}"),
            )),
        }
    }

    /// Publishes `lane`'s bundles one after another until nothing waits.
    async fn run(self: Arc<Self>, lane: Arc<Lane>, conn: Pooled) {
        let ns = conn.namespace();
        while let Some(bundle) = lane.next(ns.max_payload()) {
            let outcome = match bundle.as_slice() {
                [one] => ns.publish(&lane.queue, &one.id, one.envelope.clone()).await,
                many => {
                    let envelopes: Vec<Bytes> = many.iter().map(|w| w.envelope.clone()).collect();
                    let n = self.bundles.fetch_add(1, Ordering::Relaxed);
                    let id = format!("bundle/{}/{n}", self.prefix.simple());
                    ns.publish(&lane.queue, &id, envelope::bundle(&envelopes))
                        .await
                }
            };
            for w in bundle {
                // A request that gave up meanwhile no longer listens.
                let _ = w.done.send(outcome.clone());
            }
        }
    }
}

impl Lane {
    /// The next bundle: the oldest waiting record and those behind it of
    /// the same epoch, up to [`MAX_BUNDLE`] and `max_payload` bytes (a
    /// namespace whose limit is not known yet gets lone records). `None`,
    /// and the lane's task ends, when nothing waits.
    fn next(&self, max_payload: Option<usize>) -> Option<Vec<Waiting>> {
        let mut state = self.state.lock();
        state.waiting.retain(|w| !w.done.is_closed());
        let Some(first) = state.waiting.pop_front() else {
            state.running = false;
            return None;
        };
        let max = max_payload.unwrap_or(0);
        let mut bundle = vec![first];
        while bundle.len() < MAX_BUNDLE {
            match state.waiting.pop_front() {
                Some(w)
                    if w.epoch == bundle[0].epoch && {
                        let lens = bundle.iter().chain([&w]).map(|w| w.envelope.len());
                        envelope::bundle_len(lens) <= max
                    } =>
                {
                    bundle.push(w)
                }
                Some(w) => {
                    state.waiting.push_front(w);
                    break;
                }
                None => break,
            }
        }
        Some(bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use georelay_core::{DeviceKey, Envelope};
    use georelay_testkit::{NatsRegion, TestDevice};
    use georelay_transport::{Limits, NamespacePool, Triplet};

    const QUEUE: &str = "bundles";

    /// Records that arrive while a publish is at the broker go together in
    /// the next message, in arrival order, one epoch per message; a record
    /// whose request gave up meanwhile is not published at all.
    #[tokio::test]
    async fn records_that_wait_for_the_broker_go_together_one_epoch_per_message() {
        let region = NatsRegion::start("eu-west").unwrap();
        let pool = NamespacePool::new(Limits::default());
        let conn = pool.get(1, &Triplet::nats(&region.url())).await.unwrap();
        assert!(
            conn.namespace()
                .wait_connected(Duration::from_secs(5))
                .await
        );
        conn.ensure_queue(QUEUE).await.unwrap();
        let device = TestDevice::new("plug-1".parse().unwrap(), DeviceKey::generate());
        let lanes = Arc::new(Lanes::default());
        let publish = |seq: u64, epoch: u64, deadline: Duration| {
            let (lanes, conn) = (lanes.clone(), conn.clone());
            let envelope = device.envelope(seq, epoch).encode();
            let id = device.id.record_id(seq);
            tokio::spawn(async move {
                lanes
                    .publish(&conn, QUEUE, epoch, id, envelope, deadline)
                    .await
            })
        };
        let long = Duration::from_secs(10);
        region.pause().unwrap();
        let first = publish(1, 1, long);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut rest = vec![publish(2, 1, long), publish(3, 1, long)];
        tokio::time::sleep(Duration::from_millis(20)).await;
        let gives_up = publish(5, 1, Duration::from_millis(50));
        tokio::time::sleep(Duration::from_millis(20)).await;
        rest.push(publish(4, 2, long));
        tokio::time::sleep(Duration::from_millis(200)).await;
        region.resume().unwrap();
        assert_eq!(
            gives_up.await.unwrap().map_err(|e| e.kind()),
            Err(ErrorKind::Timeout)
        );
        first.await.unwrap().unwrap();
        for r in rest {
            r.await.unwrap().unwrap();
        }
        let messages = conn
            .namespace()
            .receive(QUEUE, 10, Duration::from_millis(500))
            .await
            .unwrap();
        let seqs: Vec<Vec<(u64, u64)>> = messages
            .iter()
            .map(|m| {
                envelope::unbundle(&m.payload)
                    .unwrap()
                    .iter()
                    .map(|e| {
                        let e = Envelope::decode(e).unwrap();
                        (e.record.seq, e.epoch)
                    })
                    .collect()
            })
            .collect();
        assert_eq!(seqs, vec![vec![(1, 1)], vec![(2, 1), (3, 1)], vec![(4, 2)]]);
        // A lone record keeps its own id, so the broker drops a re-publish.
        assert_eq!(
            messages[0].id.as_deref(),
            Some(device.id.record_id(1).as_str())
        );
    }
}
