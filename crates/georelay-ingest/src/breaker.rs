//! A per-namespace circuit breaker that watches errors **and latency**.
//!
//! A namespace that answers, but slowly, is degraded even though it is "up":
//! the breaker trips as [`Trouble::Slow`] when, over the last `window`, at
//! least `min_samples` publishes were seen and at least `slow_ratio` of them
//! took longer than `slow` (timeouts count as slow). It trips as
//! [`Trouble::Down`] at once on an unreachable broker (connection refused or
//! lost: the client knows within a ping), and after `timeouts_to_trip`
//! consecutive timeouts (a hung server).
//!
//! An open breaker fails publishes at once, without touching the broker. It
//! closes again only through probes: `recover_probes` good probes in a row
//! (answered faster than `slow`).

use georelay_store::routing::Trouble;
use georelay_transport::ErrorKind;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// A publish slower than this is a slow sample.
    pub slow: Duration,
    /// Trip as slow when at least this share of the window's samples is slow.
    pub slow_ratio: f64,
    /// Fewest samples in the window before slowness can trip.
    pub min_samples: usize,
    /// How far back samples count.
    pub window: Duration,
    /// Consecutive timeouts that trip as down.
    pub timeouts_to_trip: u32,
    /// Consecutive good probes that close an open breaker.
    pub recover_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            slow: Duration::from_millis(500),
            slow_ratio: 0.5,
            min_samples: 5,
            window: Duration::from_secs(5),
            timeouts_to_trip: 2,
            recover_probes: 3,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    open: Option<Trouble>,
    consecutive_timeouts: u32,
    /// (when, slow?) of recent publishes, oldest first.
    samples: VecDeque<(Instant, bool)>,
    /// How many of `samples` are slow (kept as they come and go).
    slow_samples: usize,
    good_probes: u32,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            open: None,
            consecutive_timeouts: 0,
            samples: VecDeque::new(),
            slow_samples: 0,
            good_probes: 0,
        }
    }

    /// Why the breaker is open, if it is.
    pub fn open(&self) -> Option<Trouble> {
        self.open
    }

    /// A publish that succeeded after `latency`. Returns the trouble if this
    /// sample tripped the breaker.
    pub fn success(&mut self, latency: Duration, now: Instant) -> Option<Trouble> {
        self.consecutive_timeouts = 0;
        let slow = latency > self.config.slow;
        self.sample(slow, now)
    }

    /// A publish that failed with `kind`. Returns the trouble if the breaker
    /// is open now (tripped by this failure or before).
    pub fn failure(&mut self, kind: ErrorKind, now: Instant) -> Option<Trouble> {
        if self.open.is_some() {
            return self.open;
        }
        match kind {
            // A full queue takes nothing until it drains: move the senders.
            ErrorKind::Unreachable | ErrorKind::Auth | ErrorKind::Full => self.trip(Trouble::Down),
            ErrorKind::Timeout => {
                self.consecutive_timeouts += 1;
                if self.consecutive_timeouts >= self.config.timeouts_to_trip {
                    self.trip(Trouble::Down)
                } else {
                    self.sample(true, now)
                }
            }
            // The broker refused this request, or it was too large to send:
            // the sender's fault, not the namespace's health.
            ErrorKind::Rejected | ErrorKind::TooLarge => None,
        }
    }

    /// A probe's outcome. Returns true when this probe closed the breaker
    /// (or, if it was closed, completed a run of good probes: the namespace
    /// has answered well for a while).
    pub fn probe(&mut self, result: Result<Duration, ErrorKind>) -> bool {
        match result {
            Ok(latency) if latency <= self.config.slow => self.good_probes += 1,
            _ => {
                self.good_probes = 0;
                return false;
            }
        }
        if self.good_probes >= self.config.recover_probes {
            self.good_probes = 0;
            self.open = None;
            self.consecutive_timeouts = 0;
            self.samples.clear();
            self.slow_samples = 0;
            true
        } else {
            false
        }
    }

    fn sample(&mut self, slow: bool, now: Instant) -> Option<Trouble> {
        if self.open.is_some() {
            return self.open;
        }
        self.samples.push_back((now, slow));
        self.slow_samples += usize::from(slow);
        while let Some(&(at, was_slow)) = self.samples.front() {
            if now.duration_since(at) > self.config.window || self.samples.len() > 1024 {
                self.samples.pop_front();
                self.slow_samples -= usize::from(was_slow);
            } else {
                break;
            }
        }
        let total = self.samples.len();
        if total >= self.config.min_samples
            && self.slow_samples as f64 >= self.config.slow_ratio * total as f64
        {
            self.trip(Trouble::Slow)
        } else {
            None
        }
    }

    fn trip(&mut self, trouble: Trouble) -> Option<Trouble> {
        self.open = Some(trouble);
        self.good_probes = 0;
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig::default())
    }

    const FAST: Duration = Duration::from_millis(5);
    const SLOW: Duration = Duration::from_millis(800);

    #[test]
    fn unreachable_trips_at_once() {
        let mut b = breaker();
        assert_eq!(
            b.failure(ErrorKind::Unreachable, Instant::now()),
            Some(Trouble::Down)
        );
        assert_eq!(b.open(), Some(Trouble::Down));
    }

    #[test]
    fn consecutive_timeouts_trip_but_a_success_between_resets() {
        let mut b = breaker();
        let now = Instant::now();
        assert_eq!(b.failure(ErrorKind::Timeout, now), None);
        assert_eq!(b.success(FAST, now), None);
        assert_eq!(b.failure(ErrorKind::Timeout, now), None);
        assert_eq!(b.failure(ErrorKind::Timeout, now), Some(Trouble::Down));
    }

    #[test]
    fn rejections_are_not_the_namespace_s_fault() {
        let mut b = breaker();
        for _ in 0..100 {
            assert_eq!(b.failure(ErrorKind::Rejected, Instant::now()), None);
            assert_eq!(b.failure(ErrorKind::TooLarge, Instant::now()), None);
        }
        assert_eq!(b.open(), None);
    }

    #[test]
    fn a_full_queue_trips_at_once() {
        let mut b = breaker();
        assert_eq!(
            b.failure(ErrorKind::Full, Instant::now()),
            Some(Trouble::Down)
        );
    }

    #[test]
    fn slow_answers_trip_as_degraded() {
        let mut b = breaker();
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.success(FAST, now), None);
        }
        // 5 fast then slow ones: trips when slow reach half of the window.
        for i in 0..4 {
            assert_eq!(b.success(SLOW, now), None, "slow sample {i}");
        }
        assert_eq!(b.success(SLOW, now), Some(Trouble::Slow));
    }

    #[test]
    fn old_samples_leave_the_window() {
        let mut b = breaker();
        let start = Instant::now();
        for _ in 0..4 {
            b.success(SLOW, start);
        }
        // Long after, the old slow samples no longer count.
        let later = start + Duration::from_secs(60);
        for _ in 0..4 {
            assert_eq!(b.success(FAST, later), None);
        }
        assert_eq!(b.success(SLOW, later), None);
        assert_eq!(b.open(), None);
    }

    #[test]
    fn good_probes_in_a_row_close_it() {
        let mut b = breaker();
        b.failure(ErrorKind::Unreachable, Instant::now());
        assert!(!b.probe(Ok(FAST)));
        assert!(!b.probe(Ok(FAST)));
        assert!(
            !b.probe(Err(ErrorKind::Timeout)),
            "a bad probe restarts the run"
        );
        assert!(!b.probe(Ok(FAST)));
        assert!(!b.probe(Ok(SLOW)), "a slow probe is not good");
        assert!(!b.probe(Ok(FAST)));
        assert!(!b.probe(Ok(FAST)));
        assert_eq!(b.open(), Some(Trouble::Down));
        assert!(b.probe(Ok(FAST)));
        assert_eq!(b.open(), None);
        assert_eq!(b.success(FAST, Instant::now()), None);
    }
}
