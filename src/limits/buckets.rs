//! A table of token buckets keyed by client, in shared memory: the one lookup both rate
//! tables use (connection rates in [`super::Limits`], datagram rates in
//! [`super::DatagramRates`]).
//!
//! Pure over a slice the caller holds under its lock. Invariants:
//! - a key lives in one of `probe` places from its home (`home`, `home + 1` ... masked), so a
//!   lookup is bounded whatever the table holds;
//! - a bucket that is full by its own rate ([`TokenBucket::is_full`]) is the same as no
//!   bucket, so its place may go to another key with no token gained or lost by anyone;
//! - when every place near a new key's home holds a partly spent bucket, [`Crowded`] says
//!   what happens: the fullest bucket is taken over (never a refusal for want of room; under
//!   a flood of distinct keys a client may get a fresh burst early), or the key is refused
//!   (exact; under such a flood a client without a bucket is refused).

use crate::rate::{Rate, TokenBucket};

use super::ClientKey;

/// One place of the table: a bucket and the client it belongs to (meaningless while the
/// bucket is empty).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Place {
    bucket: TokenBucket,
    key: ClientKey,
}

/// The verdict on one attempt (a connection, a datagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the client's rate: a token was taken.
    Allowed,
    /// Over the rate: refuse it.
    OverRate,
    /// No place for the client's bucket near its home, and the table refuses then (datagram
    /// rates): refuse it.
    TableFull,
}

/// What a key gets that has no bucket yet and finds every place near its home holding a
/// partly spent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Crowded {
    /// The fullest bucket (by its own rate) is given to the key.
    TakeFullest,
    /// The key is refused ([`Verdict::TableFull`]).
    Refuse,
}

/// Spends a token of `key`'s bucket at `now_ns` under `rate`, looking in `probe` places from
/// `home` (`places.len()` is a power of two, at least `probe`).
pub(super) fn take(
    places: &mut [Place],
    home: usize,
    key: ClientKey,
    rate: &Rate,
    now_ns: u64,
    probe: usize,
    crowded: Crowded,
) -> Verdict {
    let mask = places.len() - 1;
    let near = (0..probe).map(|step| (home.wrapping_add(step)) & mask);
    let mut free = None;
    let mut own = None;
    for index in near.clone() {
        let place = &places[index];
        if !place.bucket.is_empty() && place.key == key {
            own = Some(index);
            break;
        }
        if free.is_none() && place.bucket.is_full(now_ns) {
            free = Some(index);
        }
    }
    let index = match (own, free, crowded) {
        (Some(index), _, _) => index,
        (None, Some(index), _) => index,
        (None, None, Crowded::Refuse) => return Verdict::TableFull,
        (None, None, Crowded::TakeFullest) => {
            near.min_by_key(|&index| places[index].bucket.until_full(now_ns)).unwrap_or(home & mask)
        }
    };
    let place = &mut places[index];
    if own.is_none() {
        *place = Place { bucket: TokenBucket::default(), key };
    }
    if place.bucket.take(rate, now_ns) { Verdict::Allowed } else { Verdict::OverRate }
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

    const HOUR: u64 = 3_600_000_000_000;

    #[test]
    fn full_buckets_are_reused_and_a_crowded_neighbourhood_refuses_or_takes_the_fullest() {
        let one_per_hour = rate(1, Duration::from_secs(3600));
        for crowded in [Crowded::Refuse, Crowded::TakeFullest] {
            let mut places = vec![Place::default(); 64];
            for n in 0..8 {
                assert_eq!(
                    take(&mut places, 0, client(n), &one_per_hour, u64::from(n), 8, crowded),
                    Verdict::Allowed
                );
            }
            // Every place near home 0 holds a spent bucket.
            let newcomer = take(&mut places, 0, client(200), &one_per_hour, 10, 8, crowded);
            match crowded {
                Crowded::Refuse => assert_eq!(newcomer, Verdict::TableFull),
                Crowded::TakeFullest => {
                    assert_eq!(newcomer, Verdict::Allowed);
                    // Client 0 spent first, so its bucket was the fullest and went to the
                    // newcomer: client 0 starts afresh; the others kept theirs.
                    assert_eq!(
                        take(&mut places, 0, client(1), &one_per_hour, 11, 8, crowded),
                        Verdict::OverRate
                    );
                }
            }
            // An hour later all are full again, as good as none: the newcomer gets one.
            assert_eq!(
                take(&mut places, 0, client(201), &one_per_hour, HOUR + 8, 8, crowded),
                Verdict::Allowed
            );
        }
    }

    #[test]
    fn fullness_is_each_buckets_own() {
        // A fast listener's spent bucket refills in a millisecond; a slow one's in an hour.
        // A newcomer on the slow listener may take the fast bucket's place once it is full,
        // never the slow bucket's place because the asker's rate would call it full.
        let mut places = vec![Place::default(); 4];
        let fast = rate(1000, Duration::from_secs(1));
        let slow = rate(1, Duration::from_secs(3600));
        let fast_client = ClientKey::new(1, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(take(&mut places, 0, client(1), &slow, 0, 2, Crowded::Refuse), Verdict::Allowed);
        assert_eq!(
            take(&mut places, 0, fast_client, &fast, 0, 2, Crowded::Refuse),
            Verdict::Allowed
        );
        assert_eq!(
            take(&mut places, 0, client(2), &slow, 500_000, 2, Crowded::Refuse),
            Verdict::TableFull
        );
        assert_eq!(
            take(&mut places, 0, client(2), &slow, 1_000_000, 2, Crowded::Refuse),
            Verdict::Allowed
        );
        assert_eq!(
            take(&mut places, 0, client(1), &slow, 1_000_000, 2, Crowded::Refuse),
            Verdict::OverRate
        );
    }
}
