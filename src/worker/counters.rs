//! The worker's per-listener counters, gathered in private memory and published on the
//! scoreboard's listener rows with the worker's other counters (see `Worker::publish`), so
//! counting a connection, a refusal or a byte writes no shared memory.
//!
//! Runs in workers. Indexed by listener index in the worker's configuration; published under
//! each listener's stable id (ids past the scoreboard's rows are not published).

use std::sync::atomic::Ordering;

use super::refusal_of;
use crate::scoreboard::{CLOSES, Close, ListenerScore, REFUSALS};
use crate::services::{CloseReason, Progress};

/// One listener's counts since the last publication, and its open connections.
#[derive(Debug, Default, Clone)]
struct Tally {
    /// Connections open now (a level, not reset by publishing).
    open: u64,
    accepted: u64,
    bytes_in: u64,
    bytes_out: u64,
    refused: [u64; REFUSALS],
    closed: [u64; CLOSES],
    handed_off: u64,
    adopted: u64,
}

/// Per-listener counters not yet on the scoreboard.
#[derive(Debug, Default)]
pub(super) struct ListenerTallies {
    tallies: Vec<Tally>,
}

/// The close counter of a served connection's `reason`.
pub(super) fn close_of(reason: CloseReason) -> Close {
    match reason {
        CloseReason::ClientClose => Close::ClientClose,
        CloseReason::ServerClose => Close::ServerClose,
        CloseReason::IdleShort => Close::IdleShort,
        CloseReason::IdleLong => Close::IdleLong,
        CloseReason::LongLimit => Close::LongLimit,
        CloseReason::Shutdown => Close::Shutdown,
        CloseReason::Service(_) => Close::Service,
        // Refusals are counted apart (`refusal_of`); they never get here.
        CloseReason::Error
        | CloseReason::Limit
        | CloseReason::Denied
        | CloseReason::Rate
        | CloseReason::ListenerFull
        | CloseReason::Shed
        | CloseReason::ProxyHeader => Close::Error,
    }
}

impl ListenerTallies {
    /// Tallies for `listeners` listeners.
    pub(super) fn new(listeners: usize) -> Self {
        ListenerTallies { tallies: vec![Tally::default(); listeners] }
    }

    fn tally(&mut self, listener: usize) -> Option<&mut Tally> {
        self.tallies.get_mut(listener)
    }

    /// A connection of `listener` was accepted and is served.
    pub(super) fn accepted(&mut self, listener: usize) {
        if let Some(tally) = self.tally(listener) {
            tally.accepted += 1;
            tally.open += 1;
        }
    }

    /// A served connection of `listener` is closed (its reason comes through
    /// [`ListenerTallies::ended`]).
    pub(super) fn finished(&mut self, listener: usize) {
        if let Some(tally) = self.tally(listener) {
            tally.open = tally.open.saturating_sub(1);
        }
    }

    /// A connection of `listener` was handed to a worker of the serving generation (it is
    /// no longer open here).
    pub(super) fn handed_off(&mut self, listener: usize) {
        if let Some(tally) = self.tally(listener) {
            tally.handed_off += 1;
            tally.open = tally.open.saturating_sub(1);
        }
    }

    /// A connection a retiring worker handed off was adopted on `listener` (open here now).
    pub(super) fn adopted(&mut self, listener: usize) {
        if let Some(tally) = self.tally(listener) {
            tally.adopted += 1;
            tally.open += 1;
        }
    }

    /// A connection of `listener` ended with `reason`: a refusal, or a close.
    pub(super) fn ended(&mut self, listener: usize, reason: CloseReason) {
        let Some(tally) = self.tally(listener) else { return };
        match refusal_of(reason) {
            Some(refusal) => tally.refused[refusal as usize] += 1,
            None => tally.closed[close_of(reason) as usize] += 1,
        }
    }

    /// Bytes moved on a connection of `listener`.
    pub(super) fn moved(&mut self, listener: usize, progress: Progress) {
        if let Some(tally) = self.tally(listener) {
            tally.bytes_in += progress.bytes_in;
            tally.bytes_out += progress.bytes_out;
        }
    }

    /// Adds the counts to `rows` (this worker's scoreboard rows, by listener id; `ids` maps
    /// listener index to id) and starts counting afresh; stores each open count.
    pub(super) fn publish(&mut self, rows: &[ListenerScore], ids: &[u16]) {
        for (tally, &id) in self.tallies.iter_mut().zip(ids) {
            let open = tally.open;
            let counts = std::mem::replace(tally, Tally { open, ..Tally::default() });
            // Ids past the table (`LISTENER_ROWS`) have no row.
            let Some(row) = rows.get(usize::from(id)) else { continue };
            let add = |counter: &std::sync::atomic::AtomicU64, n: u64| {
                if n > 0 {
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            };
            add(&row.accepted, counts.accepted);
            add(&row.bytes_in, counts.bytes_in);
            add(&row.bytes_out, counts.bytes_out);
            add(&row.handed_off, counts.handed_off);
            add(&row.adopted, counts.adopted);
            for (counter, n) in row.refused.iter().zip(counts.refused) {
                add(counter, n);
            }
            for (counter, n) in row.closed.iter().zip(counts.closed) {
                add(counter, n);
            }
            row.open.store(open, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::{Refusal, Scoreboard};

    #[test]
    fn counts_reach_the_row_of_the_listener_id_once() {
        let board = Scoreboard::create(None, 1).unwrap();
        let mut tallies = ListenerTallies::new(2);
        tallies.accepted(1);
        tallies.accepted(1);
        tallies.moved(1, Progress { bytes_in: 5, bytes_out: 7, exchanges: 1 });
        tallies.finished(1);
        tallies.ended(1, CloseReason::ClientClose);
        tallies.ended(0, CloseReason::Rate);
        tallies.ended(0, CloseReason::Service("line-too-long"));
        let ids = [3, 9];
        tallies.publish(board.listener_rows(0), &ids);
        tallies.publish(board.listener_rows(0), &ids);
        let (first, second) = (&board.listener_rows(0)[3], &board.listener_rows(0)[9]);
        assert_eq!(second.accepted.load(Ordering::Relaxed), 2, "published once");
        assert_eq!(second.open.load(Ordering::Relaxed), 1);
        assert_eq!(second.bytes_out.load(Ordering::Relaxed), 7);
        assert_eq!(second.closed[Close::ClientClose as usize].load(Ordering::Relaxed), 1);
        assert_eq!(first.refused[Refusal::Rate as usize].load(Ordering::Relaxed), 1);
        assert_eq!(first.closed[Close::Service as usize].load(Ordering::Relaxed), 1);
        assert_eq!(first.accepted.load(Ordering::Relaxed), 0);
    }
}
