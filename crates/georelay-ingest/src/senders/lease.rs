//! The instance's lease as this process sees it: valid until the start of
//! the last successful heartbeat plus the lease length (the database set
//! `lease_until` from a `now()` no earlier than that start). Past it, the
//! instance refuses records (503 `fenced`): the worker may already count it
//! as gone.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Lease {
    length: Duration,
    valid_until: Mutex<Option<Instant>>,
}

impl Lease {
    pub fn new(length: Duration) -> Self {
        Self {
            length,
            valid_until: Mutex::new(None),
        }
    }

    /// A heartbeat that started at `heartbeat_started` succeeded.
    pub fn renewed(&self, heartbeat_started: Instant) {
        *self.valid_until.lock() = Some(heartbeat_started + self.length);
    }

    pub fn is_valid(&self) -> bool {
        self.valid_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_from_the_heartbeat_start_for_the_lease_length() {
        let lease = Lease::new(Duration::from_secs(5));
        assert!(!lease.is_valid(), "no heartbeat yet");
        lease.renewed(Instant::now());
        assert!(lease.is_valid());
        // A heartbeat that started long ago gives no lease now.
        if let Some(then) = Instant::now().checked_sub(Duration::from_secs(6)) {
            lease.renewed(then);
            assert!(!lease.is_valid());
        }
    }
}
