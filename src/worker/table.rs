//! The one table the worker keeps what it watches in: TCP connections, connections reading a
//! PROXY protocol header, UDP flows. Indexed by descriptor number, with a serial per entry and
//! a lazy timer heap.
//!
//! Runs in workers; pure data, time passed in. Invariants:
//! - an entry lives at the index of its descriptor, so a descriptor holds at most one entry
//!   and a readiness event finds its entry in one step;
//! - each entry gets a serial this table never gave before, so that a reference kept across
//!   turns, `(descriptor, serial)` (a timer, a shed-queue entry, a hand-off token, the owner
//!   of an extra descriptor), tells its entry from a later one on the reused descriptor;
//! - timers are lazy: [`Table::schedule`] pushes only when a deadline moves *earlier* than the
//!   entry's earliest heap entry (its `scheduled` time); a deadline that moves later (activity)
//!   costs nothing until its entry comes due, and [`Table::pop_due`] hands it to the caller,
//!   who computes the deadline in force and acts or schedules again. Heap entries of removed
//!   or reused entries, and those superseded by an earlier one, are stale and skipped;
//! - stale heap entries are bounded: when the heap holds more than twice the entries (and
//!   [`COMPACT_SLACK`]), it is rebuilt from the live entries' `scheduled` times. Without it,
//!   each short connection would leave its idle deadline in the heap until that time came:
//!   a rate of connections times the timeout (an hour's `short_idle_timeout` at 10,000
//!   connections a second is 36 million entries), whatever the connections open.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Heap entries allowed beyond twice the table's entries before the heap is rebuilt
/// without its stale ones.
pub const COMPACT_SLACK: usize = 64;

/// An entry and its table bookkeeping.
#[derive(Debug)]
struct Slot<T> {
    value: T,
    serial: u64,
    /// The earliest live heap entry of this entry, if any.
    scheduled: Option<Instant>,
}

/// An fd-indexed slab with serials and a lazy timer heap (see the module documentation).
#[derive(Debug)]
pub struct Table<T> {
    slots: Vec<Option<Slot<T>>>,
    len: usize,
    next_serial: u64,
    /// (deadline, descriptor, serial), earliest first.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table { slots: Vec::new(), len: 0, next_serial: 0, timers: BinaryHeap::new() }
    }
}

impl<T> Table<T> {
    /// Entries held.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether descriptor `fd` holds an entry.
    #[inline]
    pub fn contains(&self, fd: usize) -> bool {
        self.slots.get(fd).is_some_and(Option::is_some)
    }

    /// Adds `value` for descriptor `fd` and returns its serial; `Err(value)` when `fd` holds
    /// an entry already.
    ///
    /// # Errors
    /// The descriptor is taken: the value is given back untouched.
    pub fn insert(&mut self, fd: usize, value: T) -> Result<u64, T> {
        if self.slots.len() <= fd {
            self.slots.resize_with(fd + 1, || None);
        }
        if self.slots[fd].is_some() {
            return Err(value);
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        self.slots[fd] = Some(Slot { value, serial, scheduled: None });
        self.len += 1;
        Ok(serial)
    }

    /// The entry of descriptor `fd`.
    #[inline]
    pub fn get(&self, fd: usize) -> Option<&T> {
        self.slots.get(fd)?.as_ref().map(|slot| &slot.value)
    }

    /// The entry of descriptor `fd`, to change it.
    #[inline]
    pub fn get_mut(&mut self, fd: usize) -> Option<&mut T> {
        self.slots.get_mut(fd)?.as_mut().map(|slot| &mut slot.value)
    }

    /// The entry of descriptor `fd` with its serial, to change it (one lookup).
    #[inline]
    pub fn entry_mut(&mut self, fd: usize) -> Option<(u64, &mut T)> {
        self.slots.get_mut(fd)?.as_mut().map(|slot| (slot.serial, &mut slot.value))
    }

    /// The serial of the entry of descriptor `fd`.
    pub fn serial(&self, fd: usize) -> Option<u64> {
        self.slots.get(fd)?.as_ref().map(|slot| slot.serial)
    }

    /// The entry of descriptor `fd` if it is the one given `serial` (not a later one on the
    /// reused descriptor).
    #[inline]
    pub fn live(&self, fd: usize, serial: u64) -> Option<&T> {
        self.slots.get(fd)?.as_ref().filter(|slot| slot.serial == serial).map(|slot| &slot.value)
    }

    /// [`Table::live`], to change it.
    pub fn live_mut(&mut self, fd: usize, serial: u64) -> Option<&mut T> {
        let slot = self.slots.get_mut(fd)?.as_mut().filter(|slot| slot.serial == serial)?;
        Some(&mut slot.value)
    }

    /// Takes the entry of descriptor `fd` out; its heap entries go stale.
    pub fn remove(&mut self, fd: usize) -> Option<T> {
        let slot = self.slots.get_mut(fd)?.take()?;
        self.len -= 1;
        Some(slot.value)
    }

    /// The descriptors holding entries, lowest first (collected: the caller may remove
    /// entries while it goes through them).
    pub fn fds(&self) -> Vec<usize> {
        let occupied = self.slots.iter().enumerate().filter(|(_, slot)| slot.is_some());
        occupied.map(|(fd, _)| fd).collect()
    }

    /// Makes sure the entry of `fd` comes due no later than `at`: pushes a heap entry unless
    /// one at least as early is there already. Nothing for a descriptor without an entry.
    pub fn schedule(&mut self, fd: usize, at: Instant) {
        let Some(slot) = self.slots.get_mut(fd).and_then(Option::as_mut) else { return };
        if slot.scheduled.is_none_or(|scheduled| at < scheduled) {
            slot.scheduled = Some(at);
            self.timers.push(Reverse((at, fd, slot.serial)));
            if self.timers.len() > 2 * self.len + COMPACT_SLACK {
                self.compact();
            }
        }
    }

    /// Rebuilds the heap from the live entries' earliest times: one heap entry each, at
    /// most, so at least `len + COMPACT_SLACK` pushes come before the next rebuild.
    fn compact(&mut self) {
        let live = self.slots.iter().enumerate().filter_map(|(fd, slot)| {
            let slot = slot.as_ref()?;
            Some(Reverse((slot.scheduled?, fd, slot.serial)))
        });
        self.timers = live.collect();
    }

    /// The earliest heap entry's time: possibly stale, which only means an early wake-up.
    #[inline]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The descriptor of the next entry whose earliest heap entry is due at `now`, that heap
    /// entry consumed (the entry has none scheduled afterwards); `None` when nothing more is
    /// due. Stale heap entries met on the way are dropped. The caller computes the deadline
    /// in force (activity may have moved it later) and acts, or schedules it again.
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        while let Some(&Reverse((at, fd, serial))) = self.timers.peek() {
            if at > now {
                return None;
            }
            self.timers.pop();
            let Some(slot) = self.slots.get_mut(fd).and_then(Option::as_mut) else { continue };
            if slot.serial != serial || slot.scheduled != Some(at) {
                continue; // stale: removed, reused, or superseded by an earlier entry
            }
            slot.scheduled = None;
            return Some(fd);
        }
        None
    }

    /// The earliest time the entry of `fd` is in the heap for.
    #[cfg(test)]
    pub fn scheduled(&self, fd: usize) -> Option<Instant> {
        self.slots.get(fd)?.as_ref()?.scheduled
    }

    /// Heap entries, stale ones included.
    #[cfg(test)]
    pub fn heap_len(&self) -> usize {
        self.timers.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn entries_live_at_their_descriptor_and_a_reused_descriptor_gets_a_new_serial() {
        let mut table = Table::default();
        let first = table.insert(7, "a").unwrap();
        assert_eq!(table.insert(7, "b"), Err("b"), "one entry per descriptor");
        assert_eq!(
            (table.len(), table.get(7), table.get(6), table.get(70)),
            (1, Some(&"a"), None, None)
        );
        assert_eq!(table.remove(7), Some("a"));
        assert_eq!((table.len(), table.remove(7)), (0, None));
        let second = table.insert(7, "c").unwrap();
        assert_ne!(first, second, "a serial is never given twice");
        assert_eq!(table.live(7, first), None, "a reference to the old entry is stale");
        assert_eq!(table.live(7, second), Some(&"c"));
        *table.live_mut(7, second).unwrap() = "d";
        assert_eq!(table.entry_mut(7).map(|(serial, _)| serial), Some(second));
        assert_eq!((table.serial(7), table.get(7)), (Some(second), Some(&"d")));
        table.insert(3, "e").unwrap();
        assert_eq!(table.fds(), [3, 7]);
        assert!(table.contains(3) && !table.contains(4));
    }

    #[test]
    fn a_deadline_moving_later_costs_no_heap_entry_and_comes_due_at_the_earlier_one() {
        let t0 = Instant::now();
        let mut table = Table::default();
        table.insert(4, ()).unwrap();
        table.schedule(4, t0 + secs(10));
        table.schedule(4, t0 + secs(20)); // later: nothing pushed
        assert_eq!((table.heap_len(), table.scheduled(4)), (1, Some(t0 + secs(10))));
        table.schedule(4, t0 + secs(5)); // earlier: pushed, the first one goes stale
        assert_eq!((table.heap_len(), table.next_deadline()), (2, Some(t0 + secs(5))));
        assert_eq!(table.pop_due(t0 + secs(4)), None, "not due yet");
        assert_eq!(table.pop_due(t0 + secs(5)), Some(4));
        assert_eq!(table.scheduled(4), None, "consumed: the caller schedules again");
        assert_eq!(table.pop_due(t0 + secs(30)), None, "the superseded entry is skipped");
        assert_eq!(table.heap_len(), 0);
        table.schedule(4, t0 + secs(40));
        assert_eq!(table.scheduled(4), Some(t0 + secs(40)), "scheduled again once consumed");
    }

    #[test]
    fn timers_of_removed_or_reused_entries_are_stale() {
        let t0 = Instant::now();
        let mut table = Table::default();
        table.insert(1, 'a').unwrap();
        table.insert(2, 'b').unwrap();
        table.schedule(1, t0 + secs(1));
        table.schedule(2, t0 + secs(2));
        table.remove(1);
        table.remove(2);
        table.insert(2, 'c').unwrap(); // the descriptor is reused
        table.schedule(2, t0 + secs(3));
        table.schedule(9, t0); // no entry: nothing
        assert_eq!(table.heap_len(), 3);
        assert_eq!(table.pop_due(t0 + secs(10)), Some(2), "only the new entry's own timer");
        assert_eq!(table.pop_due(t0 + secs(10)), None);
        assert_eq!(table.heap_len(), 0);
    }

    #[test]
    fn stale_timers_stay_bounded_by_the_entries_held() {
        let t0 = Instant::now();
        let mut table = Table::default();
        table.insert(3, ()).unwrap();
        table.schedule(3, t0 + secs(7200));
        // Many short connections on one descriptor, each gone long before its deadline.
        for n in 0..10_000 {
            table.insert(4, ()).unwrap();
            table.schedule(4, t0 + secs(3600) + Duration::from_millis(n));
            table.remove(4);
            // Two entries were held at most.
            assert!(table.heap_len() <= 2 * 2 + COMPACT_SLACK, "{}", table.heap_len());
        }
        // The live entry's deadline survives the rebuilds.
        table.insert(4, ()).unwrap();
        table.schedule(4, t0 + secs(1));
        let due: Vec<_> = std::iter::from_fn(|| table.pop_due(t0 + secs(9000))).collect();
        assert_eq!(due, [4, 3]);
    }

    #[test]
    fn due_entries_come_earliest_first() {
        let t0 = Instant::now();
        let mut table = Table::default();
        for (fd, at) in [(5, 3), (6, 1), (7, 2)] {
            table.insert(fd, ()).unwrap();
            table.schedule(fd, t0 + secs(at));
        }
        let due: Vec<_> = std::iter::from_fn(|| table.pop_due(t0 + secs(2))).collect();
        assert_eq!(due, [6, 7]);
        assert_eq!(table.next_deadline(), Some(t0 + secs(3)));
    }
}
