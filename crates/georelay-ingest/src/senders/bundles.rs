//! Records joined into bundles (`georelay_core::envelope::bundle`).
//!
//! Every broker message costs the broker a store and an ack, whatever its
//! size; with one message per record that, not georelay, bounds ingest. So:
//!
//! - **A batch request** is packed into as few messages as fit ([`pack`]).
//! - **Single-record requests** to one queue share a lane ([`Lanes`]): one
//!   message of it is at the broker at a time, and the records that arrive
//!   meanwhile wait and go together in the next. A lone record goes alone;
//!   under load a bundle carries the records of up to [`envelope::MAX_BUNDLE`]
//!   concurrent requests. No timer: nothing waits longer than the publish
//!   before it, and then a few turns of the runtime while they bring more
//!   records (requests it is already reading or verifying). Under load the
//!   broker's answer comes back sooner than the next requests are read, so
//!   without those turns a bundle carries a third as many records and the
//!   broker spends twice the CPU on them (ingest bench, 2026-12-07:
//!   17 against 42 records a message).
//!
//! A message of one record is that record's envelope under its own id. A
//! bundle holds records of one epoch (the worker ends an epoch only at a
//! message's first envelope), in order, and no more bytes than the
//! namespace carries (unknown yet: no bundles); its id names its records
//! ([`envelope::bundle_id`]), so the broker drops only a true copy. A device
//! re-sends a record whose request failed, maybe in another bundle: the
//! worker drops the copy by `(device_id, seq)`.
//!
//! A request waits at most the publish deadline for its record to be taken
//! into a lane's message, and then gives up and is left out. Once taken, it
//! waits for that message's answer (bounded by the deadline in the
//! transport): until then its record may still land, so the request keeps
//! holding its flight ticket, which keeps its epoch from being sealed.

use bytes::Bytes;
use georelay_core::envelope;
use georelay_transport::{ErrorKind, Pooled, TransportError};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

type Outcome = Result<(), TransportError>;

/// At most this many turns of the runtime a lane lets pass, while records
/// keep joining, before it takes the next message's records ([`Lane::gather`]).
const TURNS: usize = 4;

/// The lanes of one namespace connection, by queue.
#[derive(Debug, Default)]
pub struct Lanes {
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
    /// Numbers the records that join, so one can find itself.
    joined: u64,
    /// A task is publishing this lane's bundles.
    running: bool,
}

#[derive(Debug)]
struct Waiting {
    number: u64,
    epoch: u64,
    id: String,
    envelope: Bytes,
    done: oneshot::Sender<Outcome>,
}

impl Lanes {
    /// Publishes the envelope of one record (message id `id`, published
    /// under `epoch`) to `queue` on `conn`, alone or in a bundle. `Ok` once
    /// the broker has it durably; a timeout after `deadline`.
    pub async fn publish(
        &self,
        conn: &Pooled,
        queue: &str,
        epoch: u64,
        id: String,
        envelope: Bytes,
        deadline: Duration,
    ) -> Outcome {
        let lane = {
            let mut lanes = self.lanes.lock();
            match lanes.get(queue) {
                Some(lane) => lane.clone(),
                None => {
                    let lane = Arc::new(Lane {
                        queue: queue.into(),
                        state: Mutex::default(),
                    });
                    lanes.insert(queue.into(), lane.clone());
                    lane
                }
            }
        };
        let (done, mut outcome) = oneshot::channel();
        let (number, start) = {
            let mut state = lane.state.lock();
            let number = state.joined;
            state.joined += 1;
            state.waiting.push_back(Waiting {
                number,
                epoch,
                id,
                envelope,
                done,
            });
            (number, !std::mem::replace(&mut state.running, true))
        };
        if start {
            tokio::spawn(run(lane.clone(), conn.clone()));
        }
        if let Ok(answer) = tokio::time::timeout(deadline, &mut outcome).await {
            return answered(answer);
        }
        let left_out = {
            let mut state = lane.state.lock();
            let at = state.waiting.iter().position(|w| w.number == number);
            at.and_then(|at| state.waiting.remove(at)).is_some()
        };
        match left_out {
            true => Err(TransportError::new(
                ErrorKind::Timeout,
                format!("publish: not sent within {deadline:?}: the queue's publishes before it were slow"),
            )),
            // In a bundle at the broker now: it may still land.
            false => answered(outcome.await),
        }
    }
}

/// Publishes `lane`'s messages one after another until nothing waits.
async fn run(lane: Arc<Lane>, conn: Pooled) {
    let ns = conn.namespace();
    loop {
        lane.gather().await;
        let Some(taken) = lane.next(ns.max_payload()) else {
            break;
        };
        let records: Vec<_> = taken.iter().map(|w| (&w.id, &w.envelope)).collect();
        let (id, message) = message(&records);
        let outcome = ns.publish(&lane.queue, &id, message).await;
        for w in taken {
            // Only a request whose task was dropped no longer listens.
            let _ = w.done.send(outcome.clone());
        }
    }
}

impl Lane {
    /// Lets the runtime take up to [`TURNS`] turns while each brings more
    /// records: requests it is already reading or verifying join this
    /// message instead of starting the next. Idle, this costs one turn.
    async fn gather(&self) {
        let mut waiting = self.state.lock().waiting.len();
        for _ in 0..TURNS {
            if waiting >= envelope::MAX_BUNDLE {
                return;
            }
            tokio::task::yield_now().await;
            let now = self.state.lock().waiting.len();
            if now == waiting {
                return;
            }
            waiting = now;
        }
    }

    /// The next message's records: the oldest waiting and those behind it
    /// of the same epoch that fit ([`fitting`]). `None`, and the lane's
    /// task ends, when nothing waits.
    fn next(&self, max_payload: Option<usize>) -> Option<Vec<Waiting>> {
        let mut state = self.state.lock();
        let Some(epoch) = state.waiting.front().map(|w| w.epoch) else {
            state.running = false;
            return None;
        };
        let same_epoch = state.waiting.iter().take_while(|w| w.epoch == epoch);
        let n = fitting(same_epoch.map(|w| w.envelope.len()), max_payload);
        Some(state.waiting.drain(..n).collect())
    }
}

/// How many of these envelopes go in the next message: a namespace whose
/// limit is not known yet gets them one by one.
fn fitting(lens: impl Iterator<Item = usize>, max_payload: Option<usize>) -> usize {
    envelope::fitting(lens, max_payload.unwrap_or(0))
}

/// The broker message of records `(message id, envelope)`: a lone record's
/// envelope under its id, or their bundle under its id.
fn message(records: &[(&String, &Bytes)]) -> (String, Bytes) {
    match records {
        [(id, envelope)] => ((*id).clone(), (*envelope).clone()),
        _ => {
            let envelopes: Vec<Bytes> = records.iter().map(|(_, e)| (*e).clone()).collect();
            let id = envelope::bundle_id(records.iter().map(|(id, _)| id.as_str()));
            (id, envelope::bundle(&envelopes))
        }
    }
}

/// A batch's records `(message id, envelope)`, in order, packed into as
/// few messages as fit; with the index of each message's first record.
pub fn pack(
    items: &[(String, Bytes)],
    max_payload: Option<usize>,
) -> (Vec<(String, Bytes)>, Vec<usize>) {
    let (mut messages, mut firsts) = (Vec::new(), Vec::new());
    let mut at = 0;
    while at < items.len() {
        let n = fitting(items[at..].iter().map(|(_, e)| e.len()), max_payload);
        let records: Vec<_> = items[at..at + n].iter().map(|(id, e)| (id, e)).collect();
        messages.push(message(&records));
        firsts.push(at);
        at += n;
    }
    (messages, firsts)
}

/// A lane's answer; none at all means its publishing task is gone (the
/// runtime is shutting down).
fn answered(answer: Result<Outcome, oneshot::error::RecvError>) -> Outcome {
    answer.unwrap_or_else(|_| {
        Err(TransportError::new(
            ErrorKind::Unreachable,
            "the publish was abandoned",
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use georelay_core::{DeviceKey, Envelope};
    use georelay_testkit::{wait_until, NatsRegion, TestDevice};
    use georelay_transport::{Limits, NamespacePool, Triplet};

    const QUEUE: &str = "bundles";

    /// A nats-server with the queue, and a connection to it.
    async fn queue() -> (NatsRegion, Pooled) {
        let region = NatsRegion::start("eu-west").unwrap();
        let pool = NamespacePool::new(Limits::default());
        let conn = pool.get(1, &Triplet::nats(region.url())).await.unwrap();
        assert!(
            conn.namespace()
                .wait_connected(Duration::from_secs(5))
                .await
        );
        conn.ensure_queue(QUEUE).await.unwrap();
        (region, conn)
    }

    async fn queued(conn: &Pooled) -> Vec<georelay_transport::Delivery> {
        conn.namespace()
            .receive(QUEUE, 10, Duration::from_millis(500))
            .await
            .unwrap()
    }

    /// `(seq, epoch)` of the records of each message, in order.
    fn seqs(messages: &[georelay_transport::Delivery]) -> Vec<Vec<(u64, u64)>> {
        messages
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
            .collect()
    }

    #[test]
    fn a_batch_is_packed_into_as_few_messages_as_fit() {
        let items: Vec<(String, Bytes)> = (0..150)
            .map(|i| (format!("plug-1/{i}/ab"), Bytes::from(vec![i as u8; 100])))
            .collect();
        // A namespace whose limit is not known yet: one message a record.
        let (messages, firsts) = pack(&items, None);
        assert_eq!(messages, items);
        assert_eq!(firsts, (0..150).collect::<Vec<_>>());
        // At most 64 a bundle, in order.
        let (messages, firsts) = pack(&items, Some(1 << 20));
        assert_eq!(firsts, vec![0, 64, 128]);
        let unpacked: Vec<Bytes> = messages
            .iter()
            .flat_map(|(_, m)| envelope::unbundle(m).unwrap())
            .collect();
        let envelopes: Vec<Bytes> = items.iter().map(|(_, e)| e.clone()).collect();
        assert_eq!(unpacked, envelopes);
        let ids: Vec<&str> = items[..64].iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(messages[0].0, envelope::bundle_id(ids));
        // Within the namespace's bytes: a bundle of three is 3 + 3 × 104;
        // the one left over goes alone, under its own id.
        let (messages, firsts) = pack(&items[..7], Some(315));
        assert_eq!(firsts, vec![0, 3, 6]);
        assert_eq!(messages[2], items[6]);
    }

    /// Records that arrive while a publish is at the broker go together in
    /// the next message, in arrival order, one epoch per message; a record
    /// whose request gave up before it was taken is not published at all,
    /// and one already at the broker is waited for past the deadline.
    #[tokio::test]
    async fn records_that_wait_for_the_broker_go_together_one_epoch_per_message() {
        let (region, conn) = queue().await;
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
        // Long enough that the lane takes the first record, and that the
        // look at the lane below sees the last one waiting, on a busy
        // machine too (50 ms was not: the first record could give up
        // before the lane's task ran).
        let short = Duration::from_secs(1);
        // Until `n` records have joined the lane, and `waiting` of them wait.
        let joined = |n: u64, waiting: usize| {
            let lanes = lanes.clone();
            async move {
                let state = || {
                    let lane = lanes.lanes.lock().get(QUEUE).cloned();
                    lane.map(|l| {
                        let s = l.state.lock();
                        (s.joined, s.waiting.len())
                    })
                };
                let ok = wait_until(Duration::from_secs(5), || async {
                    state() == Some((n, waiting))
                })
                .await;
                assert!(ok, "lane is {:?}, not ({n}, {waiting})", state());
            }
        };
        region.pause().unwrap();
        // Taken at once, and at the broker, which does not answer.
        let first = publish(1, 1, short);
        joined(1, 0).await;
        let mut rest = vec![publish(2, 1, long)];
        joined(2, 1).await;
        rest.push(publish(3, 1, long));
        joined(3, 2).await;
        let gives_up = publish(5, 1, short);
        joined(4, 3).await;
        rest.push(publish(4, 2, long));
        joined(5, 4).await;
        // Gave up while waiting: left out. The first record's deadline,
        // which began before, has passed too.
        assert_eq!(
            gives_up.await.unwrap().map_err(|e| e.kind()),
            Err(ErrorKind::Timeout)
        );
        joined(5, 3).await;
        region.resume().unwrap();
        assert!(first.await.unwrap().is_ok(), "taken, then answered late");
        for r in rest {
            r.await.unwrap().unwrap();
        }
        let messages = queued(&conn).await;
        assert_eq!(
            seqs(&messages),
            vec![vec![(1, 1)], vec![(2, 1), (3, 1)], vec![(4, 2)]]
        );
        // A lone record keeps its own id, so the broker drops a re-publish.
        assert_eq!(
            messages[0].id.as_deref(),
            Some(device.id.record_id(1).as_str())
        );
    }

    /// Records of requests whose bytes are in when the lane is free, but
    /// not yet read by the runtime, go in its next message: not the first
    /// record alone and the rest in the message after it.
    #[tokio::test]
    async fn a_free_lane_waits_a_turn_for_records_on_their_way() {
        use tokio::io::AsyncReadExt as _;
        let (_region, conn) = queue().await;
        let device = TestDevice::new("plug-1".parse().unwrap(), DeviceKey::generate());
        let lanes = Arc::new(Lanes::default());
        let deadline = Duration::from_secs(10);
        let publish = |seq: u64, socket: Option<tokio::net::UnixStream>| {
            let (lanes, conn) = (lanes.clone(), conn.clone());
            let envelope = device.envelope(seq, 1).encode();
            let id = device.id.record_id(seq);
            tokio::spawn(async move {
                if let Some(mut socket) = socket {
                    socket.read_exact(&mut [0]).await.unwrap();
                }
                lanes.publish(&conn, QUEUE, 1, id, envelope, deadline).await
            })
        };
        // Requests 2..=5, each waiting for its body.
        let (mut bodies, mut tasks) = (Vec::new(), Vec::new());
        for seq in 2..=5 {
            let (body, socket) = tokio::net::UnixStream::pair().unwrap();
            tasks.push(publish(seq, Some(socket)));
            bodies.push(body);
        }
        // One turn: each of them runs and waits on its socket.
        tokio::task::yield_now().await;
        // Their bodies arrive, and request 1, read already, finds the lane free.
        for body in &bodies {
            assert_eq!(body.try_write(&[1]).unwrap(), 1);
        }
        tasks.push(publish(1, None));
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let messages = queued(&conn).await;
        let one_message: Vec<_> = (1..=5).map(|seq| (seq, 1)).collect();
        assert_eq!(seqs(&messages), vec![one_message]);
    }
}
