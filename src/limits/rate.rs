//! Per-client datagram rates in shared memory, exact across all workers: a token bucket per
//! (listener, client IP), for `max_datagram_rate_per_client`.
//!
//! Runs in workers (and is created by the master before the first fork, like
//! [`super::Limits`]). Invariants:
//! - one anonymous `MAP_SHARED` region holds a robust, process-shared mutex and a fixed
//!   table of [`BUCKETS`] buckets; every check-and-take happens under the mutex, so a rate of
//!   N per period admits exactly N datagrams in a burst whatever the number of workers;
//! - arithmetic is exact integers: a bucket holds `count * period_ns` credits at most (the
//!   burst), gains `count` credits per elapsed nanosecond of `CLOCK_MONOTONIC` (one clock for
//!   every process), and a datagram costs `period_ns` credits;
//! - a bucket that has refilled to its burst is the same as no bucket, so its entry may be
//!   reused for another client with no loss of exactness. A client whose home and the
//!   [`PROBE`] entries after it all hold partly drained buckets is refused (fail closed): a
//!   flood from more than [`BUCKETS`] forged addresses at once cannot buy anyone fresh tokens;
//! - a process that dies holding the mutex leaves the table to be reset by the next locker
//!   (every bucket full again); this is counted and logged, never silent.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sys::mman::munmap;

use super::{ClientKey, LimitsError};
use crate::clock;
use crate::rate::Rate;

/// Buckets in the shared table: clients rate-limited at once, all UDP listeners together.
pub const BUCKETS: usize = 16_384;

/// Entries looked at from a key's home entry before a client is refused for want of room.
pub const PROBE: usize = 32;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Credits left (see the module doc); meaningful when `used`.
    credits: u128,
    /// `CLOCK_MONOTONIC` nanoseconds of the last refill.
    updated: u64,
    key: ClientKey,
    used: u8,
}

#[repr(C)]
struct Header {
    mutex: libc::pthread_mutex_t,
    /// How often a dead lock owner forced a reset.
    resets: AtomicU64,
}

/// The verdict on one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the client's rate: a token was taken.
    Allowed,
    /// Over the rate: drop it.
    OverRate,
    /// No bucket free near the client's home entry: dropped (fail closed).
    TableFull,
}

/// Handle to the shared region. Not `Send`/`Sync`: each process is single-threaded.
#[derive(Debug)]
pub struct Rates {
    base: NonNull<u8>,
    bytes: usize,
    buckets_offset: usize,
    hasher: RandomState,
}

impl Rates {
    /// Maps and initialises the shared region.
    ///
    /// # Errors
    /// [`LimitsError::Map`] when mmap(2) fails, [`LimitsError::Lock`] when the mutex cannot
    /// be initialised.
    pub fn new() -> Result<Self, LimitsError> {
        let buckets_offset = size_of::<Header>().next_multiple_of(align_of::<Bucket>());
        let bytes = buckets_offset + BUCKETS * size_of::<Bucket>();
        let length = NonZeroUsize::new(bytes)
            .ok_or(LimitsError::TooLarge { slots: 1, per_slot: BUCKETS })?;
        // Zeroed: every bucket unused.
        let base = crate::sys::map_shared_zeroed(length)
            .map_err(|source| LimitsError::Map { bytes, source })?;
        let rates = Rates { base: base.cast(), bytes, buckets_offset, hasher: RandomState::new() };
        // SAFETY: the header is at the start of the fresh mapping, which no other process
        // sees yet.
        unsafe { super::init_robust_mutex(&raw mut (*rates.header()).mutex)? };
        Ok(rates)
    }

    fn header(&self) -> *mut Header {
        self.base.as_ptr().cast()
    }

    /// Takes one token of `key`'s bucket at `rate`, now.
    ///
    /// # Errors
    /// [`LimitsError::Lock`]; the caller drops the datagram then (fail closed).
    pub fn take(&self, key: ClientKey, rate: Rate) -> Result<Verdict, LimitsError> {
        self.take_at(key, rate, clock::monotonic_ns())
    }

    /// [`Rates::take`] at `now` (nanoseconds of `CLOCK_MONOTONIC`), for tests.
    ///
    /// # Errors
    /// As for [`Rates::take`].
    pub fn take_at(&self, key: ClientKey, rate: Rate, now: u64) -> Result<Verdict, LimitsError> {
        // SAFETY: initialised in `new`, lives as long as the mapping.
        let mutex = unsafe { &raw mut (*self.header()).mutex };
        // SAFETY: as above.
        let rc = unsafe { libc::pthread_mutex_lock(mutex) };
        if rc != 0 && rc != libc::EOWNERDEAD {
            return Err(LimitsError::Lock(Errno::from_raw(rc)));
        }
        // SAFETY: we hold the process-shared mutex, which serialises every access to the
        // buckets; each process is single-threaded, so this is the only live reference. The
        // offset and length lie inside the mapping (computed in `new`).
        let buckets = unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(self.buckets_offset).cast::<Bucket>(),
                BUCKETS,
            )
        };
        if rc == libc::EOWNERDEAD {
            buckets.fill(Bucket::default());
            // SAFETY: EOWNERDEAD hands us the mutex; the table is consistent again.
            unsafe {
                libc::pthread_mutex_consistent(mutex);
                (*self.header()).resets.fetch_add(1, Ordering::Relaxed);
            }
            log::warn!("a process died holding the datagram rate lock; every bucket was reset");
        }
        let verdict = take(buckets, self.hasher.hash_one(key) as usize, key, rate, now);
        // SAFETY: we hold the mutex (locked above).
        unsafe { libc::pthread_mutex_unlock(mutex) };
        Ok(verdict)
    }
}

/// The bucket arithmetic, pure: `hash` picks the home entry.
fn take(buckets: &mut [Bucket], hash: usize, key: ClientKey, rate: Rate, now: u64) -> Verdict {
    let period = rate.period.as_nanos().max(1);
    let burst = u128::from(rate.count.get()) * period;
    let refill = |bucket: &Bucket| {
        let elapsed = u128::from(now.saturating_sub(bucket.updated));
        bucket
            .credits
            .saturating_add(elapsed.saturating_mul(u128::from(rate.count.get())))
            .min(burst)
    };
    let mask = buckets.len() - 1;
    let mut free = None;
    for step in 0..PROBE {
        let index = (hash + step) & mask;
        let bucket = &buckets[index];
        if bucket.used != 0 && bucket.key == key {
            let credits = refill(bucket);
            let bucket = &mut buckets[index];
            bucket.updated = now;
            if credits >= period {
                bucket.credits = credits - period;
                return Verdict::Allowed;
            }
            bucket.credits = credits;
            return Verdict::OverRate;
        }
        if free.is_none() && (bucket.used == 0 || refill(bucket) >= burst) {
            free = Some(index);
        }
    }
    let Some(index) = free else { return Verdict::TableFull };
    buckets[index] = Bucket { credits: burst - period, updated: now, key, used: 1 };
    Verdict::Allowed
}

impl Drop for Rates {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this size; nothing borrows it past
        // `self`.
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;

    fn rate(count: u32, period: Duration) -> Rate {
        Rate::per(NonZeroU32::new(count).unwrap(), period)
    }

    fn client(n: u8) -> ClientKey {
        ClientKey::new(0, IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
    }

    #[test]
    fn a_burst_is_exact_and_refills_at_the_rate() {
        let rates = Rates::new().unwrap();
        let per_second = rate(10, Duration::from_secs(1));
        let t0 = 5_000_000_000;
        let allowed = (0..100)
            .filter(|_| rates.take_at(client(2), per_second, t0).unwrap() == Verdict::Allowed);
        assert_eq!(allowed.count(), 10, "the burst is the count");
        assert_eq!(
            rates.take_at(client(3), per_second, t0).unwrap(),
            Verdict::Allowed,
            "own bucket"
        );
        // 10 per second is one per 100 ms: 99 ms later still nothing, 100 ms later one.
        assert_eq!(
            rates.take_at(client(2), per_second, t0 + 99_999_999).unwrap(),
            Verdict::OverRate
        );
        assert_eq!(
            rates.take_at(client(2), per_second, t0 + 100_000_000).unwrap(),
            Verdict::Allowed
        );
        assert_eq!(
            rates.take_at(client(2), per_second, t0 + 100_000_001).unwrap(),
            Verdict::OverRate
        );
    }

    #[test]
    fn full_buckets_are_reused_and_a_full_neighbourhood_fails_closed() {
        let mut buckets = vec![Bucket::default(); 64];
        let one_per_hour = rate(1, Duration::from_secs(3600));
        for n in 0..PROBE as u8 {
            assert_eq!(take(&mut buckets, 0, client(n), one_per_hour, 0), Verdict::Allowed);
        }
        // Every entry near home 0 holds a drained bucket: a new client is refused.
        assert_eq!(take(&mut buckets, 0, client(200), one_per_hour, 1), Verdict::TableFull);
        // An hour later they are all full again: reusable, and the new client gets one.
        assert_eq!(
            take(&mut buckets, 0, client(200), one_per_hour, 3_600_000_000_000),
            Verdict::Allowed
        );
        assert_eq!(
            take(&mut buckets, 0, client(200), one_per_hour, 3_600_000_000_001),
            Verdict::OverRate
        );
    }
}
