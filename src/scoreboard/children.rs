//! The children a retiring worker still supervises: the programs exec started for
//! connections that a reload or an upgrade could not hand off, which the worker keeps serving
//! until they end. A few rows per worker slot, after every slot's listener rows, for
//! `preforkd status`.
//!
//! Written by the worker of the slot (when it starts to retire, and whenever the set
//! changes), cleared by the master when it claims the slot for a new worker; read by anyone.
//! Invariants:
//! - each slot's count counts them all; the first [`CHILD_ROWS`] have a row each, the rest
//!   only count;
//! - a row with pid 0 is empty; a reader may see a row half rewritten (each field is its own
//!   atomic) while the set changes, never a torn field.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::Scoreboard;

/// Rows of children per worker slot.
pub const CHILD_ROWS: usize = 8;

/// One child: its pid, its listener and when it started.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ChildScore {
    /// The child's pid; 0: an empty row.
    pid: AtomicU32,
    /// Its listener's id (the scoreboard's listener rows and names).
    listener: AtomicU32,
    /// When its connection was accepted: Unix milliseconds.
    started_unix_ms: AtomicU64,
}

/// A slot's children: how many, and the first [`CHILD_ROWS`].
#[repr(C)]
#[derive(Debug, Default)]
pub struct ChildRows {
    count: AtomicU64,
    rows: [ChildScore; CHILD_ROWS],
}

/// A child as [`Scoreboard::children`] reads it: a plain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child {
    /// The child's pid.
    pub pid: u32,
    /// Its listener's id.
    pub listener: u16,
    /// When its connection was accepted: Unix milliseconds.
    pub started_unix_ms: u64,
}

impl ChildScore {
    fn store(&self, child: Option<Child>) {
        let child = child.unwrap_or(Child { pid: 0, listener: 0, started_unix_ms: 0 });
        self.listener.store(u32::from(child.listener), Ordering::Relaxed);
        self.started_unix_ms.store(child.started_unix_ms, Ordering::Relaxed);
        self.pid.store(child.pid, Ordering::Release);
    }

    fn load(&self) -> Option<Child> {
        let pid = self.pid.load(Ordering::Acquire);
        (pid != 0).then(|| Child {
            pid,
            listener: u16::try_from(self.listener.load(Ordering::Relaxed)).unwrap_or(u16::MAX),
            started_unix_ms: self.started_unix_ms.load(Ordering::Relaxed),
        })
    }
}

impl Scoreboard {
    /// Publishes the children `slot`'s worker supervises: all counted, the first
    /// [`CHILD_ROWS`] listed (by the worker of the slot).
    pub fn set_children(&self, slot: usize, children: impl ExactSizeIterator<Item = Child>) {
        let table = &self.all_child_rows()[slot];
        table.count.store(children.len() as u64, Ordering::Relaxed);
        let mut children = children.fuse();
        for row in &table.rows {
            row.store(children.next());
        }
    }

    /// The children `slot`'s worker supervises: how many, and those listed (at most
    /// [`CHILD_ROWS`]).
    pub fn children(&self, slot: usize) -> (u64, Vec<Child>) {
        let table = &self.all_child_rows()[slot];
        let listed = table.rows.iter().filter_map(ChildScore::load).collect();
        (table.count.load(Ordering::Relaxed), listed)
    }

    /// Clears `slot`'s children (by the master, when it claims the slot).
    pub(super) fn clear_children(&self, slot: usize) {
        self.set_children(slot, std::iter::empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_are_counted_listed_up_to_the_rows_and_cleared() {
        let board = Scoreboard::create(None, 2).unwrap();
        let child = |pid| Child { pid, listener: 3, started_unix_ms: 1000 + u64::from(pid) };
        board.set_children(1, (1..=10).map(child).collect::<Vec<_>>().into_iter());
        assert_eq!(board.children(1), (10, (1..=8).map(child).collect()), "the first 8");
        assert_eq!(board.children(0), (0, Vec::new()), "another slot's");
        board.set_children(1, [child(42)].into_iter());
        assert_eq!(board.children(1), (1, vec![child(42)]), "rows left over are emptied");
        board.claim(1, 2);
        assert_eq!(board.children(1), (0, Vec::new()));
    }
}
