//! [`RateLimit`]: at most one log line per interval, counting the ones held back, so that
//! a flood of refusals or errors cannot flood the log.
//!
//! Pure (time is passed in); used by workers, services and the master, each for its own
//! lines.

use std::time::{Duration, Instant};

/// Allows one log line per interval and counts the ones it held back, so that a flood of
/// refusals or accept errors cannot flood the log.
#[derive(Debug, Clone)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// One line per `interval` at most.
    pub const fn new(interval: Duration) -> Self {
        RateLimit { interval, last: None, suppressed: 0 }
    }

    /// `Some(n)` if a line may be written at `now`, `n` being how many were held back since
    /// the last one; `None` if this one is to be held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// When the next line may be written: `now` if none was written yet, else one interval
    /// after the last (in the past if one may be written now).
    pub fn next_allowed(&self, now: Instant) -> Instant {
        self.last.map_or(now, |last| last + self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_what_it_held_back() {
        let mut limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        assert_eq!(limit.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(11)), Some(2));
    }
}
