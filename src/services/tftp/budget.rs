//! The listener-wide budget of unverified transfers: transfers whose peer has not answered
//! anything yet, so whose address may be forged. It bounds what a flood of spoofed requests
//! can make the listener send to its victims (reflection), whatever the number of forged
//! addresses; see the `max_unverified_transfers` option.
//!
//! Created in the master when the service is built, so before fork: the workers of a
//! generation share one anonymous `MAP_SHARED` mapping, as the relay's table. `preforkd
//! check` builds one too and drops it at once. Each reload builds a new service and so a new
//! budget; the old generation's workers keep theirs until they exit.
//!
//! Invariants:
//! - a slot holds 0 (free) or the `CLOCK_MONOTONIC` millisecond at which its claim lapses;
//!   a slot whose time has passed is free again, so a worker killed while it held claims
//!   leaks nothing past that time;
//! - a claim is taken by compare-and-swap from a free value to its expiry, and given back
//!   by compare-and-swap from that same value, so a claim that lapsed never frees a slot a
//!   later transfer took;
//! - every field is an atomic: no lock is held across processes.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::mman::munmap;

/// Least interval between two reports of refusals ([`Budget::refuse`]), over all workers.
pub const REPORT_INTERVAL_MS: u64 = 10_000;

/// The budget's first line: refusal counts and the report schedule.
#[repr(C, align(64))]
struct Head {
    /// Where the next claim starts looking, so that claims spread over the slots.
    cursor: AtomicU64,
    /// Requests refused since the budget was made.
    refused: AtomicU64,
    /// `refused` when the last report was made.
    reported: AtomicU64,
    /// No report before this `CLOCK_MONOTONIC` millisecond.
    next_report_ms: AtomicU64,
}

/// A shared table of claim slots: at most that many unverified transfers at once, over all
/// the workers of a generation.
pub struct Budget {
    base: NonNull<u8>,
    bytes: usize,
    slots: usize,
}

// SAFETY: the mapping is only reached through atomics, which are safe to use from any thread
// or process; the pointer itself is never written after creation.
unsafe impl Send for Budget {}
// SAFETY: as above: all access is through atomics.
unsafe impl Sync for Budget {}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget").field("slots", &self.slots).finish()
    }
}

impl Budget {
    /// A budget of `slots` unverified transfers, all free.
    ///
    /// # Errors
    /// mmap(2) failed (out of memory or address space).
    pub fn new(slots: NonZeroUsize) -> io::Result<Budget> {
        let bytes = size_of::<Head>() + slots.get() * size_of::<AtomicU64>();
        let length = NonZeroUsize::new(bytes).expect("the head is never empty");
        // Shared with the workers forked later; zeroed: every slot free, nothing refused.
        let base = crate::sys::map_shared_zeroed(length)?;
        Ok(Budget { base: base.cast(), bytes, slots: slots.get() })
    }

    /// Unverified transfers allowed at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    fn head(&self) -> &Head {
        // SAFETY: the mapping starts with a `Head`, is page-aligned (so aligned for it),
        // zeroed (a valid `Head`), and lives as long as `self`.
        unsafe { self.base.cast::<Head>().as_ref() }
    }

    fn slot(&self, index: usize) -> &AtomicU64 {
        assert!(index < self.slots, "budget slot out of range");
        // SAFETY: in bounds (checked above); the slots follow the 64-byte `Head`, so each is
        // aligned for `AtomicU64`; zeroed memory is a valid `AtomicU64`; lives as long as
        // `self`.
        unsafe { &*self.base.as_ptr().add(size_of::<Head>()).cast::<AtomicU64>().add(index) }
    }

    /// Takes a slot for a transfer that starts at `now_ms` (`CLOCK_MONOTONIC`
    /// milliseconds) and stays unverified for at most `hold`; `None` when every slot is
    /// taken. The slot is free again when the [`Claim`] is dropped (the peer answered, or
    /// the transfer ended) or, at the latest, once `hold` has passed.
    pub fn claim(self: &Arc<Self>, now_ms: u64, hold: Duration) -> Option<Claim> {
        let until = now_ms.saturating_add(hold.as_millis().max(1) as u64);
        let start = self.head().cursor.fetch_add(1, Ordering::Relaxed) as usize;
        for i in 0..self.slots {
            let index = (start + i) % self.slots;
            let slot = self.slot(index);
            let current = slot.load(Ordering::Relaxed);
            if current > now_ms {
                continue; // held, and not lapsed
            }
            if slot.compare_exchange(current, until, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return Some(Claim { budget: Arc::clone(self), index, until });
            }
        }
        None
    }

    /// Counts a request refused for want of a slot, at `now_ms`. Returns, at most once per
    /// [`REPORT_INTERVAL_MS`] over all workers, the refusals since the last report and in
    /// all: the caller logs them.
    pub fn refuse(&self, now_ms: u64) -> Option<(u64, u64)> {
        let head = self.head();
        let total = head.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let due = head.next_report_ms.load(Ordering::Relaxed);
        if now_ms < due {
            return None;
        }
        let next = now_ms.saturating_add(REPORT_INTERVAL_MS);
        head.next_report_ms.compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed).ok()?;
        let reported = head.reported.swap(total, Ordering::AcqRel);
        Some((total.saturating_sub(reported), total))
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        // SAFETY: mapped by `Budget::new` with this length, unmapped once; no reference into
        // it outlives `self` (every `Claim` holds an `Arc` of it).
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

/// One slot of a [`Budget`], given back when dropped.
pub struct Claim {
    budget: Arc<Budget>,
    index: usize,
    until: u64,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim").field("index", &self.index).field("until", &self.until).finish()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Only if still ours: a claim that lapsed may have been taken over since.
        let slot = self.budget.slot(self.index);
        let _ = slot.compare_exchange(self.until, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(2);

    #[test]
    fn claims_stop_at_the_slots_and_come_back_when_dropped_or_lapsed() {
        let budget = Arc::new(Budget::new(NonZeroUsize::new(3).unwrap()).unwrap());
        let t0 = 1_000_000;
        let mut held: Vec<Claim> = (0..3).map(|_| budget.claim(t0, HOLD).unwrap()).collect();
        assert!(budget.claim(t0, HOLD).is_none(), "every slot is taken");
        assert!(budget.claim(t0 + 1999, HOLD).is_none(), "none lapsed yet");
        held.pop();
        let again = budget.claim(t0, HOLD).expect("a dropped claim frees its slot");
        assert!(budget.claim(t0, HOLD).is_none());
        // A worker killed with its claims: they lapse after their hold.
        std::mem::forget(again);
        std::mem::forget(held);
        let later = t0 + 2000;
        let fresh: Vec<Claim> = (0..3).map(|_| budget.claim(later, HOLD).unwrap()).collect();
        assert!(budget.claim(later, HOLD).is_none());
        drop(fresh);
        assert_eq!((0..3).filter_map(|_| budget.claim(later, HOLD)).count(), 3);
    }

    #[test]
    fn a_lapsed_claim_does_not_free_the_slot_taken_after_it() {
        let budget = Arc::new(Budget::new(NonZeroUsize::new(1).unwrap()).unwrap());
        let old = budget.claim(0, HOLD).unwrap();
        let new = budget.claim(5000, HOLD).expect("the old claim lapsed");
        drop(old);
        assert!(budget.claim(5000, HOLD).is_none(), "the new claim still holds the slot");
        drop(new);
        assert!(budget.claim(5000, HOLD).is_some());
    }

    #[test]
    fn refusals_are_counted_and_reported_at_most_once_per_interval() {
        let budget = Budget::new(NonZeroUsize::new(1).unwrap()).unwrap();
        let t0 = 50_000;
        assert_eq!(budget.refuse(t0), Some((1, 1)), "the first refusal is reported");
        assert_eq!(budget.refuse(t0 + 1), None);
        assert_eq!(budget.refuse(t0 + REPORT_INTERVAL_MS - 1), None);
        assert_eq!(budget.refuse(t0 + REPORT_INTERVAL_MS), Some((3, 4)));
        assert_eq!(budget.refuse(t0 + 3 * REPORT_INTERVAL_MS), Some((1, 5)));
    }
}
