//! [`TokenBucket`]: the one token bucket, for every rate that is enforced.
//!
//! Pure (time is passed in, `CLOCK_MONOTONIC` nanoseconds, [`crate::clock::monotonic_ns`]).
//! The shared tables of [`crate::limits`] keep buckets in shared memory, so a bucket is plain
//! integers, all zero when empty, and any bit pattern is a value: arithmetic saturates, so a
//! bucket read from a region another process wrote can be wrong but never panics.
//!
//! Arithmetic is exact integers: a token is `period_ns` credits, a bucket holds
//! `burst x period_ns` credits at most and gains `count` credits per nanosecond, so a rate of
//! N per period admits exactly the burst, then exactly N per period, with no rounding to
//! drift. A bucket remembers the rate it counts in (that of its last take): whether it is
//! full is decided by its own rate, and a bucket taken with another rate (after a reload
//! changed it) has its credits converted, keeping its tokens.

use super::Rate;

/// A token bucket's state. The default (all zero) is an empty bucket, which is the same as
/// a full one for any rate.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Credits left as of `updated_ns`, counted in the bucket's own rate.
    credits: u128,
    /// When `credits` was computed, `CLOCK_MONOTONIC` nanoseconds.
    updated_ns: u64,
    /// The bucket's rate: a token is `period_ns` credits; 0 marks an empty bucket.
    period_ns: u64,
    /// Credits gained per nanosecond (the rate's count).
    count: u32,
    /// Tokens the bucket holds at most.
    burst: u32,
}

/// The rate's period in nanoseconds, at least 1.
fn period_ns(rate: &Rate) -> u64 {
    u64::try_from(rate.period.as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl TokenBucket {
    /// Whether the bucket was never used (or was emptied for another key).
    pub fn is_empty(&self) -> bool {
        self.period_ns == 0
    }

    fn capacity(&self) -> u128 {
        u128::from(self.burst) * u128::from(self.period_ns)
    }

    /// Credits at `now_ns`, refilled at the bucket's own rate up to its capacity.
    fn credits_at(&self, now_ns: u64) -> u128 {
        let elapsed = u128::from(now_ns.saturating_sub(self.updated_ns));
        self.credits
            .saturating_add(elapsed.saturating_mul(u128::from(self.count)))
            .min(self.capacity())
    }

    /// Whether the bucket is full at `now_ns` by its own rate, and so as good as no bucket:
    /// another key may take its place without anyone gaining or losing a token. An empty
    /// bucket is full.
    pub fn is_full(&self, now_ns: u64) -> bool {
        self.is_empty() || self.credits_at(now_ns) >= self.capacity()
    }

    /// Nanoseconds from `now_ns` until the bucket is full by its own rate (0 when it is):
    /// of several buckets, the one with the least is the fullest.
    pub fn until_full(&self, now_ns: u64) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let missing = self.capacity() - self.credits_at(now_ns);
        u64::try_from(missing.div_ceil(u128::from(self.count.max(1)))).unwrap_or(u64::MAX)
    }

    /// Spends one token at `now_ns` under `rate`; `false`, and nothing spent, if the bucket
    /// has less than one. Either way the bucket is brought up to `now_ns` (fractions of a
    /// token are kept) and counts in `rate` from then on.
    pub fn take(&mut self, rate: &Rate, now_ns: u64) -> bool {
        let period = period_ns(rate);
        let credits = if self.is_empty() {
            u128::from(rate.burst.get()) * u128::from(period)
        } else {
            let credits = self.credits_at(now_ns);
            if self.period_ns == period {
                credits
            } else {
                // Whole tokens and the fraction of one, each in the new unit.
                let (old, new) = (u128::from(self.period_ns), u128::from(period));
                (credits / old).saturating_mul(new).saturating_add(credits % old * new / old)
            }
        };
        *self = TokenBucket {
            credits: credits.min(u128::from(rate.burst.get()) * u128::from(period)),
            updated_ns: now_ns,
            period_ns: period,
            count: rate.count.get(),
            burst: rate.burst.get(),
        };
        match self.credits.checked_sub(u128::from(period)) {
            Some(left) => {
                self.credits = left;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;

    fn rate(count: u32, period: Duration, burst: u32) -> Rate {
        Rate::per(NonZeroU32::new(count).unwrap(), period)
            .with_burst(NonZeroU32::new(burst).unwrap())
    }

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_burst_then_the_rate_exactly() {
        let ten_per_second = rate(10, Duration::from_secs(1), 4);
        let mut bucket = TokenBucket::default();
        let t0 = 5 * SECOND;
        let burst: Vec<bool> = (0..6).map(|_| bucket.take(&ten_per_second, t0)).collect();
        assert_eq!(burst, [true, true, true, true, false, false]);
        // One token per 100 ms; a refused attempt keeps the fraction gained so far.
        assert!(!bucket.take(&ten_per_second, t0 + 99_999_999));
        assert!(bucket.take(&ten_per_second, t0 + 100_000_000));
        assert!(!bucket.take(&ten_per_second, t0 + 150_000_000));
        assert!(bucket.take(&ten_per_second, t0 + 200_000_000));
        // Refilled to the burst, no further.
        let later = t0 + 60 * SECOND;
        assert_eq!((0..6).filter(|_| bucket.take(&ten_per_second, later)).count(), 4);
    }

    #[test]
    fn fullness_is_judged_by_the_buckets_own_rate() {
        let mut slow = TokenBucket::default();
        let one_per_hour = rate(1, Duration::from_secs(3600), 1);
        assert!(slow.is_full(0) && slow.until_full(0) == 0, "empty is full");
        assert!(slow.take(&one_per_hour, 0));
        assert!(!slow.is_full(SECOND));
        assert_eq!(slow.until_full(SECOND), 3599 * SECOND);
        assert!(slow.is_full(3600 * SECOND));
        let mut fast = TokenBucket::default();
        assert!(fast.take(&rate(1000, Duration::from_secs(1), 1), 0));
        assert!(fast.is_full(SECOND / 1000), "a thousandth of a second refills it");
        assert!(fast.until_full(0) < slow.until_full(0), "the fast bucket is the fuller");
    }

    #[test]
    fn a_changed_rate_keeps_the_tokens_left() {
        let mut bucket = TokenBucket::default();
        let per_second = rate(10, Duration::from_secs(1), 10);
        for _ in 0..7 {
            assert!(bucket.take(&per_second, 0));
        }
        // Three tokens left; counted per minute from now on, still three.
        let per_minute = rate(10, Duration::from_secs(60), 10);
        let left = (0..5).filter(|_| bucket.take(&per_minute, 0)).count();
        assert_eq!(left, 3);
    }

    #[test]
    fn garbage_never_panics() {
        let mut bucket = TokenBucket {
            credits: u128::MAX,
            updated_ns: u64::MAX,
            period_ns: 1,
            count: u32::MAX,
            burst: u32::MAX,
        };
        let _ = bucket.until_full(0);
        let _ = bucket.is_full(u64::MAX);
        let _ = bucket.take(&rate(1, Duration::from_secs(365 * 24 * 3600), u32::MAX), 0);
        assert!(bucket.credits <= u128::from(u32::MAX) * 365 * 24 * 3600 * u128::from(SECOND));
    }
}
