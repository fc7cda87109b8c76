//! georelay-agent: the plug computer side of "no loss".
//!
//! [`run`] is `georelay agent run`: readings come in (stdin, a watched
//! folder), each is sealed under the next seq and kept in a durable offline
//! buffer ([`buffer`]) before anything is sent, and the sender ([`sender`])
//! delivers the buffer in seq order, removing a record only after its 202.
//! A crash or power cut loses nothing and never reuses a seq (and so never a
//! nonce).
//!
//! [`simulate`] is `georelay agent simulate`: a fleet of devices in one
//! process, each the same buffer and sender as the agent, fed readings at a
//! fixed rate, with a ledger of every 202 for the invariant checker.

pub mod buffer;
pub mod input;
pub mod lines;
pub mod sender;

use georelay_core::{DeviceId, DeviceKey};
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buffer::{Buffer, BufferError};
use crate::input::InputError;
use crate::sender::{Ledger, Sender, SenderConfig, Stats, Until};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("input failed")]
    Input(#[from] InputError),
    #[error("cannot {what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    #[error("the {0} task failed")]
    Task(&'static str, #[source] tokio::task::JoinError),
    #[error("the rate must be between {lo} and {hi} readings/s per device (got {got})", lo = RATE_RANGE.start(), hi = RATE_RANGE.end(), got = .0)]
    Rate(f64),
}

#[derive(Debug)]
pub struct AgentConfig {
    pub device: DeviceId,
    pub key: DeviceKey,
    pub sender: SenderConfig,
    pub state_dir: PathBuf,
    pub read_stdin: bool,
    pub watch: Option<PathBuf>,
    /// The LAN line gateway: local devices' lines over TCP ([`lines`]).
    pub lines: Option<(tokio::net::TcpListener, lines::LinesConfig)>,
    pub max_buffer: u64,
}

/// Runs the agent until `stop`. With stdin and no watched folder, it ends by
/// itself once stdin is closed and the buffer is delivered.
pub async fn run(config: AgentConfig, stop: CancellationToken) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::File {
        what: "create",
        path: config.state_dir.clone(),
        source,
    })?;
    let path = buffer::path(&config.state_dir, &config.device);
    let buffer = Buffer::open(
        &path,
        config.device.clone(),
        config.key,
        config.max_buffer,
        true,
    )
    .await?;
    let waiting = buffer.waiting().await?;
    if waiting > 0 {
        tracing::info!(
            records = waiting,
            "records from before are waiting in the buffer: sending them first"
        );
    }
    let sender =
        Sender::new(buffer.clone(), config.sender, None).map_err(AgentError::HttpClient)?;
    let wake = Arc::new(Notify::new());
    let inputs_done = stop.child_token();
    let tasks = TaskTracker::new();
    if std::io::stderr().is_terminal() {
        tasks.spawn(progress(buffer.clone(), sender.stats.clone(), stop.clone()));
    }
    let only_stdin = config.read_stdin && config.watch.is_none() && config.lines.is_none();
    if let Some((listener, lines_config)) = config.lines {
        tasks.spawn(lines::serve(
            listener,
            buffer.clone(),
            wake.clone(),
            lines_config,
            stop.clone(),
        ));
    }
    let input = {
        let (buffer, wake, stop, done) = (
            buffer.clone(),
            wake.clone(),
            stop.clone(),
            inputs_done.clone(),
        );
        tasks.spawn(async move {
            let result = async {
                match (&config.watch, config.read_stdin) {
                    (Some(dir), true) => {
                        tokio::try_join!(
                            input::stdin(&buffer, &wake, &stop),
                            input::watch(dir, &buffer, &wake, &stop)
                        )?;
                    }
                    (Some(dir), false) => input::watch(dir, &buffer, &wake, &stop).await?,
                    (None, true) => input::stdin(&buffer, &wake, &stop).await?,
                    (None, false) => stop.cancelled().await,
                }
                Ok::<_, InputError>(())
            }
            .await;
            done.cancel();
            // Stopped while waiting for room is not a failure.
            if let Err(e) = &result {
                if !matches!(e, InputError::Buffer(BufferError::Full(_))) {
                    tracing::error!(error = %e, "input failed: stopping the agent (what was taken is buffered and will be sent next time)");
                    stop.cancel();
                }
            }
            result
        })
    };
    // With stdin only: once it is closed, deliver what is left and finish.
    // The sender is told to stop, never dropped: it stops between posts, so
    // an answer is never half recorded.
    let send_stop = stop.clone();
    let sending = async {
        if only_stdin {
            sender.run(&wake, &inputs_done, Until::Stopped).await?;
            sender.run(&wake, &send_stop, Until::Sent).await?;
        } else {
            sender.run(&wake, &send_stop, Until::Stopped).await?;
        }
        Ok::<_, BufferError>(())
    };
    sending.await?;
    stop.cancel();
    tasks.close();
    let input_result = input.await.map_err(|e| AgentError::Task("input", e))?;
    match input_result {
        Ok(()) | Err(InputError::Buffer(BufferError::Full(_))) => {}
        Err(e) => return Err(e.into()),
    }
    tasks.wait().await;
    let left = buffer.waiting().await?;
    let rejected = buffer.rejected().await?.len();
    tracing::info!(
        delivered = sender.stats.accepted.load(Ordering::Relaxed),
        left,
        rejected,
        "agent stopped"
    );
    Ok(())
}

/// Records left, rate and estimated time, on one terminal line, while there
/// is a backlog.
async fn progress(buffer: Buffer, stats: Arc<Stats>, stop: CancellationToken) {
    let mut last = (Instant::now(), stats.accepted.load(Ordering::Relaxed));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Ok(left) = buffer.waiting().await else {
            continue;
        };
        let now = (Instant::now(), stats.accepted.load(Ordering::Relaxed));
        let rate = (now.1 - last.1) as f64 / now.0.duration_since(last.0).as_secs_f64().max(1e-3);
        last = now;
        if left > 1 {
            let eta = if rate > 0.0 {
                format!("~{:.0} s", left as f64 / rate)
            } else {
                "waiting for the server".into()
            };
            eprint!(
                "\r\x1b[2K{}: {left} records to send, {rate:.0}/s, {eta}",
                buffer.device()
            );
        } else {
            eprint!("\r\x1b[2K");
        }
    }
}

/// One simulated device: its id and key.
#[derive(Debug, Clone)]
pub struct SimDevice {
    pub id: DeviceId,
    pub key: DeviceKey,
}

/// Readings a second per simulated device: above it the interval between
/// two readings would round to nothing.
pub const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;

#[derive(Debug)]
pub struct SimulateConfig {
    pub devices: Vec<SimDevice>,
    pub sender: SenderConfig,
    pub state_dir: PathBuf,
    /// Readings per second per device.
    pub rate: f64,
    /// Readings per device (`None`: until `duration` or `stop`).
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub ledger: Option<PathBuf>,
    /// After the readings stop, how long to keep delivering the backlog.
    pub settle: Duration,
}

/// What a simulation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub devices: usize,
    pub produced: u64,
    pub accepted: u64,
    pub retries: u64,
    pub rejected: u64,
    /// Not sent when the simulation ended.
    pub left: u64,
    /// Sent, not known to be stored when it ended.
    pub unconfirmed: u64,
    /// Sent again: queued in an abandoned epoch and not stored.
    pub resent: u64,
    /// The most records one device held sent-but-not-stored at once.
    pub peak_unconfirmed: u64,
}

/// Runs the fleet; returns when every device produced its readings and
/// they are stored (or `settle` ran out, or `stop`).
pub async fn simulate(
    config: SimulateConfig,
    stop: CancellationToken,
) -> Result<Summary, AgentError> {
    if !RATE_RANGE.contains(&config.rate) {
        return Err(AgentError::Rate(config.rate));
    }
    std::fs::create_dir_all(&config.state_dir).map_err(|source| AgentError::File {
        what: "create",
        path: config.state_dir.clone(),
        source,
    })?;
    let ledger = match &config.ledger {
        Some(path) => Some(Arc::new(Ledger::create(path).map_err(|source| {
            AgentError::File {
                what: "open the ledger",
                path: path.clone(),
                source,
            }
        })?)),
        None => None,
    };
    let interval = Duration::from_secs_f64(1.0 / config.rate);
    let produce_until = config.duration.map(|d| tokio::time::Instant::now() + d);
    let tasks = TaskTracker::new();
    let mut handles = Vec::new();
    for device in &config.devices {
        let path = buffer::path(&config.state_dir, &device.id);
        let buffer = Buffer::open(
            &path,
            device.id.clone(),
            device.key.clone(),
            1_000_000,
            false,
        )
        .await?;
        let sender = Arc::new(
            Sender::new(buffer.clone(), config.sender.clone(), ledger.clone())
                .map_err(AgentError::HttpClient)?,
        );
        let (stop, count, settle) = (stop.clone(), config.count, config.settle);
        handles.push(tasks.spawn(async move {
            let wake = Notify::new();
            let producing = stop.child_token();
            let produce = async {
                let mut produced = 0u64;
                let mut tick = tokio::time::interval(interval);
                // Readings on a fixed schedule: a late tick is made up, so
                // the rate holds on average (the timer's 1 ms resolution and
                // a busy machine would otherwise lower it).
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                loop {
                    if count.is_some_and(|c| produced >= c) || produce_until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                        break;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let reading = serde_json::json!({
                        "n": produced + 1,
                        "temperature_c": 20.0 + (produced % 100) as f64 / 10.0,
                        "at_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
                    });
                    buffer.push(&reading.to_string(), None).await?;
                    produced += 1;
                    wake.notify_one();
                }
                producing.cancel();
                Ok::<_, BufferError>(produced)
            };
            let send = async {
                // Told to stop once the readings end, never dropped: a
                // sender dropped between a 202 and its bookkeeping left
                // that record out of the ledger and the summary.
                sender.run(&wake, &producing, Until::Stopped).await?;
                // Readings done: deliver the rest, for at most `settle`.
                let settle_stop = stop.child_token();
                let s = settle_stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(settle).await;
                    s.cancel();
                });
                sender.run(&wake, &settle_stop, Until::Stored).await
            };
            let (produced, sent) = tokio::join!(produce, send);
            sent?;
            let stats = &sender.stats;
            Ok::<_, BufferError>(Summary {
                devices: 1,
                produced: produced?,
                accepted: stats.accepted.load(Ordering::Relaxed),
                retries: stats.retries.load(Ordering::Relaxed),
                rejected: stats.rejected.load(Ordering::Relaxed),
                left: buffer.waiting().await?,
                unconfirmed: buffer.unconfirmed().await?,
                resent: stats.resent.load(Ordering::Relaxed),
                peak_unconfirmed: stats.peak_unconfirmed.load(Ordering::Relaxed),
            })
        }));
    }
    tasks.close();
    let mut summary = Summary {
        devices: config.devices.len(),
        produced: 0,
        accepted: 0,
        retries: 0,
        rejected: 0,
        left: 0,
        unconfirmed: 0,
        resent: 0,
        peak_unconfirmed: 0,
    };
    for h in handles {
        let one = h.await.map_err(|e| AgentError::Task("device", e))??;
        summary.produced += one.produced;
        summary.accepted += one.accepted;
        summary.retries += one.retries;
        summary.rejected += one.rejected;
        summary.left += one.left;
        summary.unconfirmed += one.unconfirmed;
        summary.resent += one.resent;
        summary.peak_unconfirmed = summary.peak_unconfirmed.max(one.peak_unconfirmed);
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rate_without_a_usable_interval_is_refused_not_a_panic() {
        for rate in [0.0, 1e12, f64::NAN, f64::INFINITY] {
            let config = SimulateConfig {
                devices: Vec::new(),
                sender: SenderConfig::default(),
                state_dir: std::env::temp_dir().join("georelay-rate-test"),
                rate,
                count: Some(1),
                duration: None,
                ledger: None,
                settle: Duration::ZERO,
            };
            let result = simulate(config, CancellationToken::new()).await;
            assert!(
                matches!(result, Err(AgentError::Rate(_))),
                "{rate}: {result:?}"
            );
        }
    }
}
