//! Per-client datagram rates in shared memory, exact across all workers: a token bucket per
//! (listener, client key), for `max_datagram_rate_per_client`.
//!
//! Runs in workers (and is created by the master before the first fork, like
//! [`super::Limits`]). Invariants:
//! - one anonymous `MAP_SHARED` region holds a [`RobustMutex`] and a fixed table of
//!   [`BUCKETS`] places; every check-and-take happens under the mutex, so a rate of N per
//!   period admits exactly N datagrams in a burst whatever the number of workers;
//! - the buckets are [`crate::rate::TokenBucket`]s, exact integers, in the table of
//!   [`super::buckets`]: a key lives within [`PROBE`] places of its home; a place whose
//!   bucket is full by its own rate is free, so the table holds every client that spent a
//!   token within its bucket's refill time (at most [`BUCKETS`] of them);
//! - a client is never refused for want of room: when more clients than that are being
//!   limited at once (a flood from more than [`BUCKETS`] forged sources), a new one takes
//!   over the fullest bucket near its home. A client within its rate is always answered;
//!   one over its rate can get a burst again only after its bucket was taken over, which
//!   takes about [`BUCKETS`] new sources after its last token (see `buckets.rs`), so an
//!   abuser gains one burst per table's worth of forged datagrams at most;
//! - a process that dies holding the mutex leaves the table to be reset by the next locker
//!   (every bucket full again); this is counted and logged, never silent.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::munmap;

use super::buckets::{self, Place, Verdict};
use super::mutex::RobustMutex;
use super::{ClientKey, LimitsError};
use crate::clock;
use crate::rate::Rate;

/// Places in the shared table: clients rate-limited at once, all UDP listeners together.
pub const BUCKETS: usize = 16_384;

/// Places looked at from a key's home: its bucket is in one of them.
pub const PROBE: usize = 32;

#[repr(C)]
struct Header {
    mutex: RobustMutex,
}

/// Handle to the shared region. Not `Send`/`Sync`: each process is single-threaded.
#[derive(Debug)]
pub struct DatagramRates {
    base: NonNull<u8>,
    bytes: usize,
    places_offset: usize,
    hasher: RandomState,
}

impl DatagramRates {
    /// Maps and initialises the shared region.
    ///
    /// # Errors
    /// [`LimitsError::Map`] when mmap(2) fails, [`LimitsError::Lock`] when the mutex cannot
    /// be initialised.
    pub fn new() -> Result<Self, LimitsError> {
        let places_offset = size_of::<Header>().next_multiple_of(align_of::<Place>());
        let bytes = places_offset + BUCKETS * size_of::<Place>();
        let length = NonZeroUsize::new(bytes)
            .ok_or(LimitsError::TooLarge { slots: 1, per_slot: BUCKETS })?;
        // Zeroed: every bucket empty.
        let base = crate::sys::map_shared_zeroed(length)
            .map_err(|source| LimitsError::Map { bytes, source })?;
        let rates =
            DatagramRates { base: base.cast(), bytes, places_offset, hasher: RandomState::new() };
        // SAFETY: the header is at the start of the fresh mapping, which no other process
        // sees yet.
        unsafe { RobustMutex::init(&raw mut (*rates.header()).mutex) }
            .map_err(LimitsError::Lock)?;
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

    /// [`DatagramRates::take`] at `now` (nanoseconds of `CLOCK_MONOTONIC`), for tests.
    ///
    /// # Errors
    /// As for [`DatagramRates::take`].
    pub fn take_at(&self, key: ClientKey, rate: Rate, now: u64) -> Result<Verdict, LimitsError> {
        // SAFETY: initialised in `new`; lives as long as the mapping `self` owns.
        let mutex = unsafe { &(*self.header()).mutex };
        // SAFETY (of the view): we hold the process-shared mutex, which serialises every
        // access to the places; each process is single-threaded, so this is the only live
        // reference. The offset and length lie inside the mapping (computed in `new`), and
        // every field of a place is an integer: any content is a value.
        let open = || unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(self.places_offset).cast::<Place>(),
                BUCKETS,
            )
        };
        let reset = |places: &mut &mut [Place]| {
            places.fill(Place::default());
            log::warn!("a process died holding the datagram rate lock; every bucket was reset");
        };
        let mut places = mutex.lock(open, reset).map_err(LimitsError::Lock)?;
        let home = self.hasher.hash_one(key) as usize;
        Ok(buckets::take(&mut places, home, key, &rate, now, PROBE))
    }
}

impl Drop for DatagramRates {
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
        let rates = DatagramRates::new().unwrap();
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
    fn more_clients_than_places_are_all_served_within_their_rate() {
        // 1.5 tables of clients at one per hour, all within the hour: none is refused for
        // want of room, and a client that spent its token stays over its rate while fewer
        // new clients than the table holds came after it.
        let rates = DatagramRates::new().unwrap();
        let one_per_hour = rate(1, Duration::from_secs(3600));
        let key = |n: u32| ClientKey::new(0, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
        let t0 = 1_000_000_000;
        let late = (BUCKETS + BUCKETS / 2) as u32;
        for n in 0..late {
            let verdict = rates.take_at(key(n), one_per_hour, t0 + u64::from(n)).unwrap();
            assert_eq!(verdict, Verdict::Allowed, "client {n}");
        }
        let now = t0 + u64::from(late);
        assert_eq!(rates.take_at(key(late - 1), one_per_hour, now).unwrap(), Verdict::OverRate);
        assert_eq!(rates.take_at(key(late - 100), one_per_hour, now).unwrap(), Verdict::OverRate);
    }
}
