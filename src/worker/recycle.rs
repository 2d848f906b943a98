//! Whether the worker should ask to be replaced (`daemon.recycle_*`): after so many accepted
//! connections, with a jitter of its own, or once its resident memory is over a ceiling.
//!
//! Runs in workers. Pure: the count, the time and the memory reading are passed in. The
//! memory is read at most every [`RSS_CHECK_INTERVAL`] (one small read of `/proc`), and only
//! when the loop publishes its counters, that is when it is active: an idle worker's memory
//! does not grow. The worker asks once; the master decides (see `master/pool.rs`) and stops
//! it gracefully once its replacement is ready, so it serves on meanwhile, a little past its
//! count.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use crate::config::Recycle;
use crate::handoff::Recycle as Why;

/// Least time between two readings of the worker's resident memory.
pub const RSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// One worker's recycling rule and where it stands.
#[derive(Debug)]
pub struct Recycler {
    /// Accepted connections after which to ask (the configured count plus this worker's
    /// jitter); `None`: never for that reason.
    after: Option<u64>,
    /// Resident bytes above which to ask; `None`: never for that reason.
    above_rss: Option<NonZeroU64>,
    /// When the memory may be read again.
    next_rss_check: Instant,
    /// The worker asked already.
    asked: bool,
}

impl Recycler {
    /// The rule of `recycle` for a worker started at `now`; `random` (any number) picks its
    /// jitter, from 0 to `recycle.jitter`.
    pub fn new(recycle: Recycle, random: u64, now: Instant) -> Self {
        let jitter = random % recycle.jitter.saturating_add(1);
        let after = recycle.after_connections.map(|n| n.get().saturating_add(jitter));
        Recycler { after, above_rss: recycle.above_rss, next_rss_check: now, asked: false }
    }

    /// Whether the rule may still ask: false when neither a count nor a memory ceiling is
    /// set (the default), or once the worker asked. The loop skips the check then, and so
    /// the scoreboard read it needs: it runs once per turn.
    #[inline]
    pub fn armed(&self) -> bool {
        !self.asked && (self.after.is_some() || self.above_rss.is_some())
    }

    /// Whether to ask now, having accepted `accepted` connections so far, at `now`; `rss`
    /// reads the resident memory in bytes (asked only when that rule is on and its interval
    /// has passed; `None`: unknown). Says so once.
    pub fn due(
        &mut self,
        accepted: u64,
        now: Instant,
        rss: impl FnOnce() -> Option<u64>,
    ) -> Option<Why> {
        if self.asked {
            return None;
        }
        let why = if self.after.is_some_and(|after| accepted >= after) {
            Some(Why::Connections(accepted))
        } else if let Some(ceiling) = self.above_rss
            && now >= self.next_rss_check
        {
            self.next_rss_check = now + RSS_CHECK_INTERVAL;
            rss().filter(|&bytes| bytes > ceiling.get()).map(Why::Memory)
        } else {
            None
        };
        self.asked = why.is_some();
        why
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(after: u64, jitter: u64, rss_mib: u64) -> Recycle {
        Recycle {
            after_connections: NonZeroU64::new(after),
            jitter,
            above_rss: NonZeroU64::new(rss_mib << 20),
        }
    }

    #[test]
    fn asks_once_after_its_count_with_its_own_jitter() {
        let t0 = Instant::now();
        let mut recycler = Recycler::new(rule(100, 10, 0), 7, t0);
        assert_eq!(recycler.due(106, t0, || unreachable!("the memory rule is off")), None);
        assert_eq!(recycler.due(107, t0, || None), Some(Why::Connections(107)), "100 + 7");
        assert_eq!(recycler.due(500, t0, || None), None, "once");
        // The jitter spans 0 to 10 inclusive; without jitter, the count itself.
        assert_eq!(Recycler::new(rule(100, 10, 0), 21, t0).after, Some(110));
        assert_eq!(Recycler::new(rule(100, 10, 0), 22, t0).after, Some(100));
        assert_eq!(Recycler::new(rule(100, 0, 0), 12345, t0).after, Some(100));
        let mut never = Recycler::new(rule(0, 10, 0), 3, t0);
        assert_eq!(never.due(u64::MAX, t0, || Some(u64::MAX)), None, "0 is never");
    }

    #[test]
    fn is_armed_only_while_a_rule_is_set_and_it_has_not_asked() {
        let t0 = Instant::now();
        assert!(!Recycler::new(rule(0, 10, 0), 3, t0).armed(), "the default: no rule");
        assert!(Recycler::new(rule(0, 0, 64), 0, t0).armed(), "a memory ceiling");
        let mut counted = Recycler::new(rule(5, 0, 0), 0, t0);
        assert!(counted.armed());
        assert_eq!(counted.due(5, t0, || None), Some(Why::Connections(5)));
        assert!(!counted.armed(), "asked once: the loop stops checking");
    }

    #[test]
    fn reads_the_memory_at_a_bounded_rate_and_asks_once_over_the_ceiling() {
        let t0 = Instant::now();
        let mut recycler = Recycler::new(rule(0, 0, 64), 0, t0);
        let mut reads = 0;
        let mut read = |bytes: u64| {
            reads += 1;
            move || Some(bytes)
        };
        assert_eq!(recycler.due(1, t0, read(10 << 20)), None);
        assert_eq!(recycler.due(2, t0 + Duration::from_millis(500), || unreachable!()), None);
        assert_eq!(recycler.due(3, t0 + RSS_CHECK_INTERVAL, read(64 << 20)), None, "at, not over");
        let later = t0 + RSS_CHECK_INTERVAL * 2;
        assert_eq!(recycler.due(4, later, read(65 << 20)), Some(Why::Memory(65 << 20)));
        assert_eq!(recycler.due(5, later + RSS_CHECK_INTERVAL, || unreachable!()), None, "once");
        assert_eq!(reads, 3);
        let unknown = Recycler::new(rule(0, 0, 64), 0, t0).due(1, t0, || None);
        assert_eq!(unknown, None, "an unreadable /proc asks nothing");
    }
}
