use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;

fn key(listener: usize, last: u8) -> ClientKey {
    ClientKey::new(listener, IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

fn limit(n: u32) -> Option<NonZeroU32> {
    NonZeroU32::new(n)
}

fn admitted(admission: Admission) -> Ticket {
    match admission {
        Admission::Admitted(ticket) => ticket,
        other => panic!("refused: {other:?}"),
    }
}

#[test]
fn admits_exactly_the_limit_per_client_and_listener() {
    let limits = Limits::new(2, 8).unwrap();
    let (mut a, mut b) = (limits.ledger(0), limits.ledger(1));
    let mut tickets = Vec::new();
    for i in 0..5 {
        let ledger = if i % 2 == 0 { &mut a } else { &mut b };
        tickets.push(admitted(limits.admit(ledger, key(0, 1), limit(5)).unwrap()));
    }
    assert_eq!(limits.admit(&mut a, key(0, 1), limit(5)).unwrap(), Admission::Refused { open: 5 });
    assert_eq!(limits.admit(&mut b, key(0, 1), limit(5)).unwrap(), Admission::Refused { open: 5 });
    // Another client, and the same client on another listener, have their own quota.
    admitted(limits.admit(&mut a, key(0, 2), limit(5)).unwrap());
    admitted(limits.admit(&mut a, key(1, 1), limit(5)).unwrap());
    let first = tickets.remove(0);
    limits.release(&mut a, first).unwrap();
    assert_eq!(limits.counts(key(0, 1)).unwrap(), (4, 0));
    admitted(limits.admit(&mut b, key(0, 1), limit(5)).unwrap());
}

#[test]
fn long_connections_have_their_own_limit() {
    let limits = Limits::new(1, 8).unwrap();
    let mut ledger = limits.ledger(0);
    let tickets: Vec<Ticket> =
        (0..3).map(|_| admitted(limits.admit(&mut ledger, key(0, 3), None).unwrap())).collect();
    assert!(limits.promote(&tickets[0], limit(2)).unwrap());
    assert!(limits.promote(&tickets[0], limit(2)).unwrap(), "promoting twice counts once");
    assert!(limits.promote(&tickets[1], limit(2)).unwrap());
    assert!(!limits.promote(&tickets[2], limit(2)).unwrap());
    assert_eq!(limits.counts(key(0, 3)).unwrap(), (3, 2));
    let mut tickets = tickets.into_iter();
    limits.release(&mut ledger, tickets.next().unwrap()).unwrap();
    assert_eq!(limits.counts(key(0, 3)).unwrap(), (2, 1));
    assert!(limits.promote(&tickets.nth(1).unwrap(), limit(2)).unwrap());
}

#[test]
fn reclaim_releases_only_the_dead_slot() {
    let limits = Limits::new(2, 4).unwrap();
    let (mut a, mut b) = (limits.ledger(0), limits.ledger(1));
    for _ in 0..3 {
        let t = admitted(limits.admit(&mut a, key(0, 9), limit(5)).unwrap());
        limits.promote(&t, None).unwrap();
    }
    admitted(limits.admit(&mut b, key(0, 9), limit(5)).unwrap());
    assert_eq!(limits.reclaim(0).unwrap(), 3);
    assert_eq!(limits.counts(key(0, 9)).unwrap(), (1, 0));
    assert_eq!(limits.reclaim(0).unwrap(), 0, "reclaim is idempotent");
    // A fresh worker in slot 0 gets every record back: 4, and the spare.
    let mut fresh = limits.ledger(0);
    for _ in 0..5 {
        admitted(limits.admit(&mut fresh, key(0, 9), limit(6)).unwrap());
    }
    assert!(matches!(limits.admit(&mut fresh, key(0, 9), None), Err(LimitsError::SlotFull(0))));
}

#[test]
fn table_never_fills_with_distinct_clients_and_churn() {
    let (slots, per_slot) = (4, 64);
    let limits = Limits::new(slots, per_slot).unwrap();
    let mut ledgers: Vec<SlotLedger> = (0..slots).map(|s| limits.ledger(s)).collect();
    let mut model: HashMap<ClientKey, u32> = HashMap::new();
    let mut held: Vec<(usize, ClientKey, Ticket)> = Vec::new();
    // A deterministic pseudo-random walk of admits and releases over many distinct IPv6 keys.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..20_000u32 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let slot = (state % slots as u64) as usize;
        let full = ledgers[slot].free.is_empty();
        if full || (state >> 32).is_multiple_of(3) && !held.is_empty() {
            let index = (state >> 8) as usize % held.len();
            let (slot, key, ticket) = held.swap_remove(index);
            limits.release(&mut ledgers[slot], ticket).unwrap();
            *model.get_mut(&key).unwrap() -= 1;
        } else {
            let ip = Ipv6Addr::from(((state >> 40) as u128 % 600) << 64 | u128::from(round % 3));
            let key = ClientKey::new(0, IpAddr::V6(ip));
            let ticket = admitted(limits.admit(&mut ledgers[slot], key, None).unwrap());
            *model.entry(key).or_default() += 1;
            held.push((slot, key, ticket));
        }
        if round % 997 == 0 {
            for (key, open) in &model {
                assert_eq!(limits.counts(*key).unwrap().0, *open, "round {round}");
            }
        }
    }
    for (slot, _, ticket) in held {
        limits.release(&mut ledgers[slot], ticket).unwrap();
    }
    let table = limits.lock().unwrap();
    assert!(table.entries.iter().all(|e| e.open == 0 && e.long == 0), "everything released");
}

#[test]
fn rebuild_recomputes_entries_from_records() {
    let limits = Limits::new(2, 4).unwrap();
    let mut a = limits.ledger(0);
    let t = admitted(limits.admit(&mut a, key(0, 1), None).unwrap());
    limits.promote(&t, None).unwrap();
    admitted(limits.admit(&mut a, key(0, 1), None).unwrap());
    admitted(limits.admit(&mut a, key(0, 2), None).unwrap());
    {
        let mut table = limits.lock().unwrap();
        // Simulate a half-done update by a process that died holding the lock.
        table.entries.fill(Entry::default());
        table.increment(key(0, 1), false);
        table.rebuild();
    }
    assert_eq!(limits.counts(key(0, 1)).unwrap(), (2, 1));
    assert_eq!(limits.counts(key(0, 2)).unwrap(), (1, 0));
}

#[test]
fn ipv4_mapped_ipv6_counts_as_ipv4() {
    let mapped: Ipv6Addr = "::ffff:127.0.0.1".parse().unwrap();
    assert_eq!(ClientKey::new(0, IpAddr::V6(mapped)), key(0, 1));
}

fn v6(text: &str) -> IpAddr {
    IpAddr::V6(text.parse::<Ipv6Addr>().unwrap())
}

#[test]
fn clients_are_keyed_by_prefix() {
    // As configured by default (`client_ipv4_prefix`, `client_ipv6_prefix`): each IPv4
    // address, each IPv6 /64 (RFC 6177: the block one site usually gets).
    let (d4, d6) = (32, 64);
    let a = ClientKey::with_prefix(0, v6("2001:db8:1:2::1"), d4, d6);
    let b = ClientKey::with_prefix(0, v6("2001:db8:1:2:ffff:ffff:ffff:fffe"), d4, d6);
    let c = ClientKey::with_prefix(0, v6("2001:db8:1:3::1"), d4, d6);
    assert_eq!(a, b, "one /64 is one client");
    assert_ne!(a, c, "the next /64 is another");
    assert_eq!(a.to_string(), "2001:db8:1:2::/64");
    // IPv4 by address by default; by /24 when asked; IPv4-mapped IPv6 counts as IPv4.
    let v4 = |last| IpAddr::V4(Ipv4Addr::new(192, 0, 2, last));
    assert_ne!(ClientKey::with_prefix(0, v4(1), d4, d6), ClientKey::with_prefix(0, v4(2), d4, d6));
    assert_eq!(ClientKey::with_prefix(0, v4(1), 24, d6), ClientKey::with_prefix(0, v4(2), 24, d6));
    assert_eq!(ClientKey::with_prefix(0, v4(1), 24, d6).to_string(), "192.0.2.0/24");
    assert_eq!(ClientKey::with_prefix(0, v6("::ffff:192.0.2.1"), d4, d6).to_string(), "192.0.2.1");
    assert_eq!(
        ClientKey::with_prefix(0, v6("::ffff:192.0.2.1"), d4, d6),
        ClientKey::with_prefix(0, v4(1), d4, d6)
    );
    // Full-length prefixes keep the address whole; other listeners are other clients.
    assert_ne!(
        ClientKey::with_prefix(0, v6("2001:db8::1"), d4, 128),
        ClientKey::with_prefix(0, v6("2001:db8::2"), d4, 128)
    );
    assert_ne!(a, ClientKey::with_prefix(1, v6("2001:db8:1:2::1"), d4, d6));
}

#[test]
fn a_64_shares_one_quota() {
    let limits = Limits::new(1, 8).unwrap();
    let mut ledger = limits.ledger(0);
    let rules = Rules { per_client: limit(2), ..Rules::default() };
    let key = |ip: &str| ClientKey::with_prefix(0, v6(ip), 32, 64);
    admitted(limits.admit_with(&mut ledger, key("2001:db8::1"), &rules, 0).unwrap());
    admitted(limits.admit_with(&mut ledger, key("2001:db8::2"), &rules, 0).unwrap());
    assert_eq!(
        limits.admit_with(&mut ledger, key("2001:db8::3"), &rules, 0).unwrap(),
        Admission::Refused { open: 2 }
    );
    admitted(limits.admit_with(&mut ledger, key("2001:db8:0:1::1"), &rules, 0).unwrap());
}

#[test]
fn the_listener_cap_is_exact_and_released() {
    let limits = Limits::new(2, 8).unwrap();
    let (mut a, mut b) = (limits.ledger(0), limits.ledger(1));
    let rules = Rules { listener: limit(3), ..Rules::default() };
    let mut tickets = Vec::new();
    for last in 1..=3 {
        let ledger = if last % 2 == 0 { &mut a } else { &mut b };
        tickets.push(admitted(limits.admit_with(ledger, key(7, last), &rules, 0).unwrap()));
    }
    assert_eq!(
        limits.admit_with(&mut a, key(7, 9), &rules, 0).unwrap(),
        Admission::ListenerFull { open: 3 }
    );
    // Another listener is not affected.
    admitted(limits.admit_with(&mut a, key(8, 9), &rules, 0).unwrap());
    assert_eq!(limits.listener_open(7).unwrap(), 3);
    limits.release(&mut b, tickets.remove(0)).unwrap();
    assert_eq!(limits.listener_open(7).unwrap(), 2);
    admitted(limits.admit_with(&mut a, key(7, 9), &rules, 0).unwrap());
    // A dead worker's connections leave the listener's count too.
    assert_eq!(limits.reclaim(0).unwrap(), 3);
    assert_eq!(limits.listener_open(7).unwrap(), 1);
}

#[test]
fn the_rate_is_a_token_bucket_shared_by_all_workers() {
    let limits = Limits::new(2, 64).unwrap();
    let (mut a, mut b) = (limits.ledger(0), limits.ledger(1));
    let rate = Rate {
        count: NonZeroU32::new(10).unwrap(),
        period: std::time::Duration::from_secs(1),
        burst: NonZeroU32::new(4).unwrap(),
    };
    let rules = Rules { rate: Some(rate), ..Rules::default() };
    let t0 = 5_000_000_000;
    let attempt = |ledger: &mut SlotLedger, last: u8, at: u64| match limits
        .admit_with(ledger, key(0, last), &rules, at)
        .unwrap()
    {
        Admission::Admitted(ticket) => {
            limits.release(ledger, ticket).unwrap();
            true
        }
        Admission::RateLimited => false,
        other => panic!("{other:?}"),
    };
    // The burst, from two workers together, then nothing.
    let burst: Vec<bool> =
        (0..6).map(|i| attempt(if i % 2 == 0 { &mut a } else { &mut b }, 1, t0)).collect();
    assert_eq!(burst, [true, true, true, true, false, false]);
    // Another client has its own bucket.
    assert!(attempt(&mut a, 2, t0));
    // 10 per second: one token every 100 ms, fractions kept.
    assert!(!attempt(&mut a, 1, t0 + 99_000_000));
    assert!(attempt(&mut b, 1, t0 + 100_000_000));
    assert!(!attempt(&mut a, 1, t0 + 150_000_000));
    assert!(attempt(&mut a, 1, t0 + 200_000_000));
    // Refills up to the burst, no further.
    let later = t0 + 60_000_000_000;
    let refilled: usize = (0..6).filter(|_| attempt(&mut a, 1, later)).count();
    assert_eq!(refilled, 4);
}

#[test]
fn rate_buckets_survive_a_flood_of_other_clients() {
    // More distinct clients than buckets: the table never fails, and a client that spent
    // its burst gets at most one fresh burst back, never a refusal it did not earn.
    let limits = Limits::new(1, 4).unwrap();
    let mut ledger = limits.ledger(0);
    let rate = Rate {
        count: NonZeroU32::new(1).unwrap(),
        period: std::time::Duration::from_secs(3600),
        burst: NonZeroU32::new(1).unwrap(),
    };
    let rules = Rules { rate: Some(rate), ..Rules::default() };
    for n in 0..20_000u32 {
        let ip = IpAddr::V6(Ipv6Addr::from(u128::from(n) << 64));
        let key = ClientKey::with_prefix(0, ip, 32, 64);
        match limits.admit_with(&mut ledger, key, &rules, 1).unwrap() {
            Admission::Admitted(ticket) => limits.release(&mut ledger, ticket).unwrap(),
            other => panic!("client {n}'s first connection: {other:?}"),
        }
    }
}

#[test]
fn a_transfer_moves_the_count_once_and_the_sender_learns_of_it() {
    let limits = Limits::new(2, 4).unwrap();
    let (mut sender, mut receiver) = (limits.ledger(0), limits.ledger(1));
    let ticket = admitted(limits.admit(&mut sender, key(0, 1), limit(2)).unwrap());
    limits.promote(&ticket, None).unwrap();
    let moved = limits.transfer(&mut receiver, ticket.handed(), key(0, 1)).unwrap().unwrap();
    assert_eq!(limits.counts(key(0, 1)).unwrap(), (1, 1), "counted once, still long");
    assert_eq!(limits.transfer(&mut receiver, ticket.handed(), key(0, 1)).unwrap(), None);
    // The sender learns the record moved; its record is free for it again.
    assert_eq!(limits.settle(&mut sender, ticket).unwrap(), None);
    assert_eq!(sender.free.len(), 4 + 1, "every record free again (4 and the spare one)");
    // The sender's death no longer touches the count; the receiver's releases it.
    assert_eq!(limits.reclaim(0).unwrap(), 0);
    assert_eq!(limits.counts(key(0, 1)).unwrap(), (1, 1));
    assert_eq!(limits.reclaim(1).unwrap(), 1);
    assert_eq!(limits.counts(key(0, 1)).unwrap(), (0, 0));
    let _ = moved;
}

#[test]
fn a_transfer_after_the_sender_was_reclaimed_takes_nothing() {
    let limits = Limits::new(2, 4).unwrap();
    let (mut sender, mut receiver) = (limits.ledger(0), limits.ledger(1));
    let ticket = admitted(limits.admit(&mut sender, key(0, 1), limit(2)).unwrap());
    let handed = ticket.handed();
    assert_eq!(limits.reclaim(0).unwrap(), 1, "the sender died mid hand-off");
    // A new worker in the same slot admits into the same record: another admission.
    let mut fresh = limits.ledger(0);
    let again = admitted(limits.admit(&mut fresh, key(0, 1), limit(2)).unwrap());
    assert_eq!(again.handed().0, handed.0, "the same record, reused");
    assert_eq!(limits.transfer(&mut receiver, handed, key(0, 1)).unwrap(), None);
    assert_eq!(limits.counts(key(0, 1)).unwrap(), (1, 0), "neither doubled nor lost");
    // A receiver that died before moving anything leaves the sender its count.
    assert_eq!(limits.settle(&mut fresh, again).unwrap().map(|t| t.handed().0), Some(handed.0));
}

#[test]
fn a_transfer_to_a_renumbered_listener_moves_the_entry() {
    let limits = Limits::new(2, 4).unwrap();
    let (mut sender, mut receiver) = (limits.ledger(0), limits.ledger(1));
    let ticket = admitted(limits.admit(&mut sender, key(0, 1), None).unwrap());
    limits.promote(&ticket, None).unwrap();
    let moved = limits.transfer(&mut receiver, ticket.handed(), key(3, 1)).unwrap().unwrap();
    assert_eq!(limits.counts(key(0, 1)).unwrap(), (0, 0));
    assert_eq!(limits.counts(key(3, 1)).unwrap(), (1, 1));
    limits.release(&mut receiver, moved).unwrap();
    assert_eq!(limits.counts(key(3, 1)).unwrap(), (0, 0));
}

/// A second handle on the same region, as a new master gets it after an upgrade.
fn successor_of(limits: &Limits, slots: usize, per_slot: usize) -> Result<Limits, AdoptError> {
    let fd = limits.memfd.try_clone().unwrap();
    Limits::adopt(fd, limits.range(), slots, per_slot)
}

#[test]
fn an_adopting_master_shares_the_counts_in_its_own_range() {
    let old = Limits::new(2, 4).unwrap();
    let new = successor_of(&old, 3, 2).unwrap();
    assert_eq!((old.range(), new.range()), (0, 1));
    let (mut a, mut b) = (old.ledger(0), new.ledger(0));
    for i in 0..5 {
        let (limits, ledger) = if i % 2 == 0 { (&old, &mut a) } else { (&new, &mut b) };
        admitted(limits.admit(ledger, key(0, 1), limit(5)).unwrap());
    }
    assert_eq!(old.admit(&mut a, key(0, 1), limit(5)).unwrap(), Admission::Refused { open: 5 });
    assert_eq!(new.admit(&mut b, key(0, 1), limit(5)).unwrap(), Admission::Refused { open: 5 });
    assert_eq!(new.counts(key(0, 1)).unwrap(), (5, 0));
    // A hand-off across masters moves the count from the old range into the new one.
    let old_ticket = admitted(old.admit(&mut a, key(0, 2), None).unwrap());
    let moved = new.transfer(&mut b, old_ticket.handed(), key(0, 2)).unwrap().expect("moved");
    assert_eq!(old.settle(&mut a, old_ticket).unwrap(), None, "the sender holds it no more");
    assert_eq!(new.counts(key(0, 2)).unwrap(), (1, 0));
    new.release(&mut b, moved).unwrap();
    assert_eq!(old.counts(key(0, 2)).unwrap(), (0, 0));
    // Slot 0 of each master is its own: reclaiming the new master's slot 0 leaves the old
    // master's three counts.
    assert_eq!(new.reclaim(0).unwrap(), 2);
    assert_eq!(old.counts(key(0, 1)).unwrap(), (3, 0));
}

#[test]
fn the_survivor_reclaims_the_other_range_once_nobody_uses_it() {
    let old = Limits::new(1, 4).unwrap();
    let new = successor_of(&old, 1, 4).unwrap();
    let mut ledger = old.ledger(0);
    for _ in 0..3 {
        admitted(old.admit(&mut ledger, key(0, 7), limit(3)).unwrap());
    }
    // Record locks never conflict within one process, so here the old range reads as
    // unused: the new master releases its three counts (the daemon test covers a live
    // old master).
    assert_eq!(new.reclaim_other().unwrap(), Some(3));
    assert_eq!(new.counts(key(0, 7)).unwrap(), (0, 0));
    assert_eq!(new.reclaim_other().unwrap(), Some(0));
}

#[test]
fn a_region_of_another_layout_or_size_is_refused() {
    let old = Limits::new(1, 4).unwrap();
    assert!(matches!(successor_of(&old, 1, 100), Err(AdoptError::TooSmall { need: 101, .. })));
    assert!(matches!(
        Limits::adopt(old.memfd.try_clone().unwrap(), 2, 1, 4),
        Err(AdoptError::Range(2))
    ));
    // SAFETY: test-only writes to the header of a region nobody else maps.
    unsafe { (*old.header()).version = LAYOUT_VERSION + 1 };
    assert!(matches!(successor_of(&old, 1, 4), Err(AdoptError::Layout { .. })));
    unsafe {
        (*old.header()).version = LAYOUT_VERSION;
        (*old.header()).range_len = u64::MAX / 2;
    }
    assert!(matches!(successor_of(&old, 1, 4), Err(AdoptError::Corrupt { .. })));
    unsafe { (*old.header()).magic = *b"NOTATABL" };
    assert!(matches!(successor_of(&old, 1, 4), Err(AdoptError::Layout { .. })));
    // Not a sealed memfd: a plain file.
    let file = tempfile::tempfile().unwrap();
    let fd = OwnedFd::from(file);
    assert!(matches!(Limits::adopt(fd, 0, 1, 4), Err(AdoptError::NotRegion { .. })));
}
