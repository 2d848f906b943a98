//! What the workers of a relay share besides the backend rows: the round-robin turns (the
//! relay's, and each route's), and a connection's place on its backend's row ([`Lease`]).
//!
//! The turns live in a small anonymous `MAP_SHARED` mapping made in the master when the
//! service is built (so before fork: every worker of the generation inherits it, and they
//! take turns from one counter); `preforkd check` maps it too and drops it at once. The
//! per-backend facts (health, counts, bytes) are the scoreboard's backend rows
//! ([`crate::scoreboard::BackendTable`]), which outlive generations.
//!
//! Invariants: the turn is an atomic, so no lock is held across processes; a lease gives its
//! place back exactly once, when dropped, and flushes the bytes it counted. A worker killed
//! with connections open cannot drop its leases: its places are counted in its worker
//! slot's column too, and the master gives them back when it reaps it
//! ([`BackendTable::reclaim`]), so a `max_connections` cap admits again at once.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::munmap;

use crate::scoreboard::{BackendScore, BackendTable};

/// Bytes a lease counts locally before it adds them to its row (and at its end): the row is
/// a cache line every worker writes, so not at every read.
const FLUSH_BYTES: u64 = 1 << 20;

/// The shared round-robin turns of one relay: counters, each taken from by every worker.
pub struct Turn {
    base: NonNull<AtomicU64>,
    counters: usize,
}

// SAFETY: the mapping is only reached through an atomic, which any thread or process may use;
// the pointer itself is never written after creation.
unsafe impl Send for Turn {}
// SAFETY: as above.
unsafe impl Sync for Turn {}

impl Turn {
    /// `counters` counters (at least 1) at 0, in a new shared mapping.
    ///
    /// # Errors
    /// mmap(2) failed.
    pub fn new(counters: usize) -> io::Result<Turn> {
        let counters = counters.max(1);
        let length = NonZeroUsize::new(counters * size_of::<AtomicU64>()).expect("not empty");
        let base = crate::sys::map_shared_zeroed(length)?;
        Ok(Turn { base: base.cast(), counters })
    }

    /// The next turn of counter `counter` (shared by all workers, so they take turns); a
    /// counter past the last is the last.
    pub fn next(&self, counter: usize) -> u64 {
        let index = counter.min(self.counters - 1);
        // SAFETY: the mapping holds `counters` zero-initialised (valid) `AtomicU64`s,
        // page-aligned, and lives as long as `self`; `index` is below `counters`.
        unsafe { &*self.base.as_ptr().add(index) }.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // SAFETY: mapped by `Turn::new` with this length, unmapped once; no reference into it
        // outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), self.counters * size_of::<AtomicU64>()) };
    }
}

/// One connection's place on a backend row, given back on drop.
pub struct Lease {
    table: BackendTable,
    row: usize,
    /// Bytes up (to the backend) and down not yet added to the row.
    pending: (u64, u64),
}

impl Lease {
    /// Takes a place on row `row` of `table`, unless its `max_connections` is reached.
    pub fn take(table: &BackendTable, row: usize) -> Option<Lease> {
        table.take(row).then(|| Lease { table: table.clone(), row, pending: (0, 0) })
    }

    /// Takes a place on row `row` of `table` whatever its `max_connections`: for a
    /// connection that exists already (a hand-off), whose sender gives its own place back.
    pub fn adopt(table: &BackendTable, row: usize) -> Lease {
        table.take_anyway(row);
        Lease { table: table.clone(), row, pending: (0, 0) }
    }

    /// The row.
    pub fn row(&self) -> &BackendScore {
        self.table.row(self.row)
    }

    /// The row's index.
    pub fn index(&self) -> usize {
        self.row
    }

    /// Counts bytes relayed to the backend (`up`) and from it (`down`).
    #[inline]
    pub fn moved(&mut self, up: u64, down: u64) {
        self.pending.0 += up;
        self.pending.1 += down;
        if self.pending.0 + self.pending.1 >= FLUSH_BYTES {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let (up, down) = std::mem::take(&mut self.pending);
        self.table.row(self.row).moved(up, down);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.flush();
        self.table.give_back(self.row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::{RowSettings, Scoreboard};

    #[test]
    fn the_turn_is_shared_with_a_forked_child() {
        let turn = Turn::new(2).unwrap();
        assert_eq!(turn.next(1), 0);
        // SAFETY: the child only does an atomic add and _exit(2), both async-signal-safe.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                turn.next(1);
                // SAFETY: _exit(2) ends the child without running the parent's destructors.
                unsafe { nix::libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(turn.next(1), 2);
            }
        }
    }

    #[test]
    fn a_lease_counts_its_place_and_bytes_until_dropped() {
        let board = Scoreboard::create(None, 1).unwrap();
        let table = board.backends();
        let settings = RowSettings {
            listener: 0,
            name: "127.0.0.1:1".into(),
            weight: 1,
            backup: false,
            max_connections: 1,
            checked: false,
            address: "127.0.0.1:1".parse().ok(),
            slot: 0,
        };
        let row = table.assign(1, &settings).unwrap();
        let mut lease = Lease::take(&table, row).expect("a place");
        assert!(Lease::take(&table, row).is_none(), "max_connections 1");
        lease.moved(10, 20);
        assert_eq!(table.views()[0].bytes_in, 0, "counted locally first");
        drop(lease);
        let view = &table.views()[0];
        assert_eq!((view.active, view.bytes_in, view.bytes_out), (0, 10, 20));
        assert!(Lease::take(&table, row).is_some(), "the place is back");
    }
}
