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

    /// When the lines held back are due to be reported (one interval after the last line
    /// written, when [`RateLimit::allow`] lets the report through); `None` while none is held
    /// back. For a caller that reports them at that deadline rather than with the next line.
    pub fn report_due(&self) -> Option<Instant> {
        match (self.suppressed, self.last) {
            (0, _) | (_, None) => None,
            (_, Some(last)) => Some(last + self.interval),
        }
    }

    /// `Some(n)`, the lines held back, when their report is due at `now` (at any time with
    /// `force`, for a last report): the report counts as a line written, so the next
    /// interval starts. `None` when none is held back, or before [`RateLimit::report_due`].
    pub fn report(&mut self, now: Instant, force: bool) -> Option<u64> {
        let due = self.report_due()?;
        if !force && now < due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
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
        assert_eq!(limit.report_due(), None, "nothing held back");
        assert_eq!(limit.allow(t0 + Duration::from_secs(12)), None);
        assert_eq!(limit.report_due(), Some(t0 + Duration::from_secs(21)));
        assert_eq!(limit.report(t0 + Duration::from_secs(20), false), None, "not yet due");
        assert_eq!(limit.report(t0 + Duration::from_secs(21), false), Some(1));
        assert_eq!(limit.report(t0 + Duration::from_secs(40), false), None, "reported once");
        assert_eq!(limit.allow(t0 + Duration::from_secs(22)), None, "a report counts as a line");
        assert_eq!(limit.report(t0 + Duration::from_secs(23), true), Some(1), "forced");
    }
}
