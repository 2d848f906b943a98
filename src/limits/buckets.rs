//! A table of token buckets keyed by client, in shared memory: the one lookup both rate
//! tables use (connection rates in [`super::Limits`], datagram rates in
//! [`super::DatagramRates`]).
//!
//! Pure over a slice the caller holds under its lock. Invariants:
//! - a key lives in one of `probe` places from its home (`home`, `home + 1` ... masked), so a
//!   lookup is bounded whatever the table holds;
//! - a bucket that is full by its own rate ([`TokenBucket::is_full`]) is the same as no
//!   bucket, so its place may go to another key with no token gained or lost by anyone;
//! - a key is never refused for want of room: when every place near a new key's home holds a
//!   partly spent bucket, the fullest of them (the one that needs the least time to be full
//!   again, by its own rate) is given to the new key. Its owner loses what it had spent: if
//!   it comes back it starts with a full bucket. That is the only way a client gets more
//!   than its rate, and it is bounded: a bucket is taken over only once every other place
//!   around it holds a bucket spent more recently, so the places fill and empty like a queue
//!   and a client's bucket lasts about as many new keys as the table has places after its
//!   last token (under a flood of forged sources, one burst more per table's worth of new
//!   sources; the home of a key is a keyed hash the sender cannot aim at).

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
}

/// Spends a token of `key`'s bucket at `now_ns` under `rate`, looking in `probe` places from
/// `home` (`places.len()` is a power of two, at least `probe`). A key without a bucket gets
/// the first free place, or else the fullest bucket's (see the module documentation).
pub(super) fn take(
    places: &mut [Place],
    home: usize,
    key: ClientKey,
    rate: &Rate,
    now_ns: u64,
    probe: usize,
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
    let index = match (own, free) {
        (Some(index), _) | (None, Some(index)) => index,
        (None, None) => {
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
    fn full_buckets_are_reused_and_a_crowded_neighbourhood_gives_the_fullest_away() {
        let one_per_hour = rate(1, Duration::from_secs(3600));
        let mut places = vec![Place::default(); 64];
        for n in 0..8 {
            let verdict = take(&mut places, 0, client(n), &one_per_hour, u64::from(n), 8);
            assert_eq!(verdict, Verdict::Allowed);
        }
        // Every place near home 0 holds a spent bucket: a newcomer is not refused. Client 0
        // spent first, so its bucket was the fullest and went to the newcomer: client 0
        // starts afresh; the others kept theirs.
        assert_eq!(take(&mut places, 0, client(200), &one_per_hour, 10, 8), Verdict::Allowed);
        assert_eq!(take(&mut places, 0, client(200), &one_per_hour, 11, 8), Verdict::OverRate);
        assert_eq!(take(&mut places, 0, client(1), &one_per_hour, 12, 8), Verdict::OverRate);
        assert_eq!(take(&mut places, 0, client(0), &one_per_hour, 13, 8), Verdict::Allowed);
        // An hour later all are full again, as good as none: the first place is free.
        assert_eq!(
            take(&mut places, 0, client(201), &one_per_hour, HOUR + 20, 8),
            Verdict::Allowed
        );
        assert_eq!(places[0].key, client(201));
    }

    #[test]
    fn fullness_is_each_buckets_own() {
        // A fast listener's spent bucket refills in a millisecond; a slow one's in an hour.
        // A newcomer on the slow listener takes the fast bucket's place, never the slow
        // bucket's because the asker's rate would call it full (issue 22: a 1/m client got
        // fresh tokens after a flood on a 100/s listener).
        let mut places = vec![Place::default(); 4];
        let fast = rate(1000, Duration::from_secs(1));
        let slow = rate(1, Duration::from_secs(3600));
        let fast_client = ClientKey::new(1, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(take(&mut places, 0, client(1), &slow, 0, 2), Verdict::Allowed);
        assert_eq!(take(&mut places, 0, fast_client, &fast, 0, 2), Verdict::Allowed);
        assert_eq!(take(&mut places, 0, client(2), &slow, 500_000, 2), Verdict::Allowed);
        assert_eq!(places[1].key, client(2), "the fast bucket, half refilled, was the fullest");
        assert_eq!(take(&mut places, 0, client(1), &slow, 1_000_000, 2), Verdict::OverRate);
    }

    #[test]
    fn a_flood_of_new_keys_is_never_refused_and_gives_an_abuser_one_burst_per_table() {
        // 20 tables' worth of new keys at 1/m, none refilling during the flood, and a client
        // over its rate that tries after every one of them.
        let (len, flood) = (1024usize, 20 * 1024u32);
        let per_minute = rate(1, Duration::from_secs(60));
        let mut places = vec![Place::default(); len];
        let abuser = client(9);
        let mut state = 7u64;
        let mut home = || {
            // A linear congruential generator: homes spread over the table, as a keyed
            // hash spreads them.
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        let mut granted = 0;
        for n in 0..flood {
            let now = u64::from(n) * 1000;
            let key = ClientKey::new(0, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
            assert_eq!(take(&mut places, home(), key, &per_minute, now, 32), Verdict::Allowed);
            if take(&mut places, 77, abuser, &per_minute, now, 32) == Verdict::Allowed {
                granted += 1;
            }
        }
        let per_table = flood / len as u32;
        assert!(granted >= 1, "its first token");
        assert!(granted <= 1 + per_table + per_table / 4, "{granted} tokens for 1 + {per_table}");
    }
}
