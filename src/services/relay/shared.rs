//! The relay's shared table: per-backend counters every worker of a generation sees.
//!
//! Created in the master when the service is built (so before fork: workers inherit one
//! `MAP_SHARED` anonymous mapping), unmapped when the last copy of the service is dropped in
//! each process. `preforkd check` builds it too and drops it at once: no file, no lasting
//! effect. Each reload builds a new service and so a new table; the old generation's workers
//! keep theirs until they exit.
//!
//! Invariants:
//! - every field is an atomic, so no lock is ever held across processes, and a worker that
//!   dies mid-update leaves nothing locked;
//! - `active` counts relay attempts and connections in flight to the backend (for
//!   `least-connections`); a worker decrements what it incremented when the connection ends
//!   ([`Lease`]). A worker killed with connections open leaks its increments until the next
//!   reload (its connections were cut anyway; the skew only steers balance);
//! - `fails` counts connect failures in a row; `down_until_ms` is the `CLOCK_MONOTONIC`
//!   millisecond until which the backend is skipped (0: never down). Times are comparable
//!   across processes.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use nix::sys::mman::munmap;

/// One backend's counters, on a cache line of its own so workers updating different backends
/// do not contend.
#[repr(C, align(64))]
#[derive(Default)]
pub struct BackendCounters {
    /// Connections (and connect attempts) in flight, over all workers.
    active: AtomicU64,
    /// Failed connects in a row.
    fails: AtomicU32,
    /// 1 while marked down (until a connect succeeds), 0 otherwise: tells the worker that
    /// marks it down, or sees it back, to log it, once.
    down: AtomicU32,
    /// Skipped until this `CLOCK_MONOTONIC` millisecond.
    down_until_ms: AtomicU64,
}

/// The table's first line: the shared round-robin cursor.
#[repr(C, align(64))]
struct Head {
    next: AtomicU64,
}

/// What a failed connect did to the backend's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Still up (fewer than `fail_threshold` failures in a row), or health checks are off.
    Up,
    /// This failure marked it down: log it.
    WentDown,
    /// Down already (a retry after `down_time` failed again): it stays down.
    StillDown,
}

/// A shared-memory table of [`BackendCounters`], one per backend.
pub struct Table {
    base: NonNull<u8>,
    bytes: usize,
    backends: usize,
}

// SAFETY: the mapping is only reached through atomics (`&AtomicU64`/`&AtomicU32`), which are
// safe to use from any thread or process; the pointer itself is never written after creation.
unsafe impl Send for Table {}
// SAFETY: as above: all access is through atomics.
unsafe impl Sync for Table {}

impl Table {
    /// A zeroed table for `backends` backends: none active, none failed, none down.
    ///
    /// # Errors
    /// mmap(2) failed (out of memory or address space).
    pub fn new(backends: usize) -> io::Result<Table> {
        let bytes = size_of::<Head>() + backends * size_of::<BackendCounters>();
        let length = NonZeroUsize::new(bytes).expect("the head is never empty");
        // Shared with the workers forked later; zeroed, the initial state of every atomic in it.
        let base = crate::sys::map_shared_zeroed(length)?;
        Ok(Table { base: base.cast(), bytes, backends })
    }

    fn head(&self) -> &Head {
        // SAFETY: the mapping starts with a `Head`, is page-aligned (so aligned for it), zeroed
        // (a valid `Head`), and lives as long as `self`.
        unsafe { self.base.cast::<Head>().as_ref() }
    }

    /// The counters of backend `index` (< the number of backends).
    pub fn backend(&self, index: usize) -> &BackendCounters {
        assert!(index < self.backends, "backend index out of range");
        // SAFETY: in bounds (checked above); the slots follow the 64-byte `Head`, so each is
        // 64-byte aligned; zeroed memory is a valid `BackendCounters`; lives as long as `self`.
        unsafe {
            let slots = self.base.as_ptr().add(size_of::<Head>()).cast::<BackendCounters>();
            &*slots.add(index)
        }
    }

    /// The next round-robin position (shared by all workers, so they take turns).
    pub fn next_turn(&self) -> usize {
        self.head().next.fetch_add(1, Ordering::Relaxed) as usize
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: mapped by `Table::new` with this length, unmapped once; no reference into
        // it outlives `self`.
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

impl BackendCounters {
    /// Connections in flight to this backend, over all workers.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether the backend may be tried at `now_ms` (`CLOCK_MONOTONIC` milliseconds): never
    /// marked down (0), or strictly after `down_until_ms`. Both are whole milliseconds rounded
    /// down, so reaching `down_until_ms` itself could end a `down_time` up to a millisecond
    /// early.
    pub fn is_available(&self, now_ms: u64) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || until < now_ms
    }

    /// Counts a connect failure; after `threshold` in a row (0: never) the backend is skipped
    /// until `now_ms + down_ms`.
    pub fn failed(&self, threshold: u32, now_ms: u64, down_ms: u64) -> Health {
        let fails = self.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if threshold == 0 || fails < threshold {
            return Health::Up;
        }
        self.down_until_ms.fetch_max(now_ms.saturating_add(down_ms), Ordering::Relaxed);
        if self.down.swap(1, Ordering::Relaxed) == 0 { Health::WentDown } else { Health::StillDown }
    }

    /// Counts a successful connect; true when this brought the backend back up (log it).
    pub fn succeeded(&self) -> bool {
        self.fails.store(0, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.down_until_ms.store(0, Ordering::Relaxed);
        self.down.swap(0, Ordering::Relaxed) == 1
    }
}

/// One connection's claim on a backend's `active` count, given back on drop.
pub struct Lease {
    table: std::sync::Arc<Table>,
    index: usize,
}

impl Lease {
    /// Counts one more connection to backend `index`.
    pub fn new(table: std::sync::Arc<Table>, index: usize) -> Lease {
        table.backend(index).active.fetch_add(1, Ordering::Relaxed);
        Lease { table, index }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.table.backend(self.index).active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn leases_count_and_failures_mark_down_then_up() {
        let table = Arc::new(Table::new(2).unwrap());
        let lease = Lease::new(Arc::clone(&table), 1);
        assert_eq!((table.backend(0).active(), table.backend(1).active()), (0, 1));
        drop(lease);
        assert_eq!(table.backend(1).active(), 0);

        let b = table.backend(0);
        assert_eq!(b.failed(2, 1000, 500), Health::Up);
        assert!(b.is_available(1000));
        assert_eq!(b.failed(2, 1000, 500), Health::WentDown);
        assert!(!b.is_available(1499));
        assert!(!b.is_available(1500), "1500 ms may be 1499.x after a failure at 1000.y");
        assert!(b.is_available(1501), "tried again after down_time");
        assert_eq!(b.failed(2, 1501, 500), Health::StillDown, "one more failure: down again");
        assert!(!b.is_available(2001));
        assert!(b.succeeded(), "back up: logged once");
        assert!(!b.succeeded());
        assert!(b.is_available(0));
        assert_eq!(table.backend(1).failed(0, 0, 500), Health::Up, "threshold 0: never down");
    }

    #[test]
    fn the_table_is_shared_with_a_forked_child() {
        let table = Table::new(1).unwrap();
        // SAFETY: the child only does an atomic add and _exit(2), both async-signal-safe.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                table.backend(0).active.fetch_add(5, Ordering::Relaxed);
                // SAFETY: _exit(2) ends the child without running the parent's destructors.
                unsafe { nix::libc::_exit(0) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(table.backend(0).active(), 5);
            }
        }
    }
}
