//! The worker's counters not yet on the scoreboard: worker-wide ([`Counters`]) and per
//! listener ([`Tally`], one in each entry of the listeners table). Gathered in private memory
//! and published at most every `PUBLISH_INTERVAL` (see `Worker::publish`), so counting a
//! connection, a refusal or a byte writes no shared memory.
//!
//! Runs in workers. A listener's tally is published under its stable id (ids past the
//! scoreboard's rows are not published).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::scoreboard::{
    CLOSES, Close, DATAGRAM_OUTCOMES, Datagram, ListenerScore, REFUSALS, Refusal, TLS_FAILURES,
    TlsFailure, WorkerScore,
};
use crate::services::{CloseReason, Progress};

/// The worker's counts since the last publication.
#[derive(Debug, Default)]
pub struct Counters {
    bytes_in: u64,
    bytes_out: u64,
    accepted: u64,
    /// Refusals by [`Refusal`].
    refused: [u64; REFUSALS],
    /// Times the worker became full.
    full: u64,
    /// Anything happened (the open count may have changed too).
    dirty: bool,
}

impl Counters {
    /// Whether anything happened since the last publication.
    #[inline]
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Something changed that the scoreboard shows (an open count).
    #[inline]
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Bytes moved.
    #[inline]
    pub fn moved(&mut self, bytes_in: u64, bytes_out: u64) {
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
        self.dirty = true;
    }

    /// A connection or a flow was accepted.
    pub fn accepted(&mut self) {
        self.accepted += 1;
        self.dirty = true;
    }

    /// Connections and flows accepted since the last publication.
    #[inline]
    pub fn accepted_since_published(&self) -> u64 {
        self.accepted
    }

    /// A connection was refused.
    pub fn refused(&mut self, refusal: Refusal) {
        self.refused[refusal as usize] += 1;
        self.dirty = true;
    }

    /// The worker became full.
    pub fn became_full(&mut self) {
        self.full += 1;
        self.dirty = true;
    }

    /// Adds the counts to the worker's scoreboard slot and starts counting afresh.
    pub fn publish(&mut self, score: &WorkerScore) {
        let counts = std::mem::take(self);
        score.bytes_in.fetch_add(counts.bytes_in, Ordering::Relaxed);
        score.bytes_out.fetch_add(counts.bytes_out, Ordering::Relaxed);
        score.accepted.fetch_add(counts.accepted, Ordering::Relaxed);
        for (counter, n) in score.refused.iter().zip(counts.refused) {
            add(counter, n);
        }
        score.full.fetch_add(counts.full, Ordering::Relaxed);
    }
}

/// One listener's counts since the last publication, and its open connections (and flows).
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Connections and flows open now (a level, not reset by publishing).
    open: u64,
    accepted: u64,
    bytes_in: u64,
    bytes_out: u64,
    refused: [u64; REFUSALS],
    closed: [u64; CLOSES],
    handed_off: u64,
    adopted: u64,
    datagrams: [u64; DATAGRAM_OUTCOMES],
    tls_failed: [u64; TLS_FAILURES],
}

/// The refusal counter a close reason counts in, if it is a refusal (summarized in the log
/// instead of one access line each).
pub fn refusal_of(reason: CloseReason) -> Option<Refusal> {
    Some(match reason {
        CloseReason::Denied => Refusal::Denied,
        CloseReason::Rate => Refusal::Rate,
        CloseReason::Limit => Refusal::Limit,
        CloseReason::ListenerFull => Refusal::ListenerFull,
        CloseReason::Shed => Refusal::Shed,
        CloseReason::ProxyHeader => Refusal::ProxyHeader,
        CloseReason::OverShare => Refusal::OverShare,
        _ => return None,
    })
}

/// The close counter of a served connection's `reason`.
pub fn close_of(reason: CloseReason) -> Close {
    match reason {
        CloseReason::ClientClose => Close::ClientClose,
        CloseReason::ServerClose => Close::ServerClose,
        CloseReason::IdleShort => Close::IdleShort,
        CloseReason::IdleLong => Close::IdleLong,
        CloseReason::LongLimit => Close::LongLimit,
        CloseReason::Shutdown => Close::Shutdown,
        CloseReason::Service(_) => Close::Service,
        // Counted as TLS failures (`Books::closed`); they never get here either.
        CloseReason::Handshake(_) => Close::Error,
        // Refusals are counted apart (`refusal_of`); they never get here.
        CloseReason::Error
        | CloseReason::Limit
        | CloseReason::Denied
        | CloseReason::Rate
        | CloseReason::ListenerFull
        | CloseReason::Shed
        | CloseReason::ProxyHeader
        | CloseReason::OverShare => Close::Error,
    }
}

fn add(counter: &AtomicU64, n: u64) {
    if n > 0 {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Tally {
    /// A connection was accepted and is served (or a flow started).
    pub fn accepted(&mut self) {
        self.accepted += 1;
        self.open += 1;
    }

    /// A served connection is closed (its reason comes through [`Tally::ended`]).
    pub fn finished(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// A connection was handed to a worker of the serving generation (it is no longer open
    /// here).
    pub fn handed_off(&mut self) {
        self.handed_off += 1;
        self.open = self.open.saturating_sub(1);
    }

    /// A connection a retiring worker handed off was adopted (open here now).
    pub fn adopted(&mut self) {
        self.adopted += 1;
        self.open += 1;
    }

    /// A connection ended with `reason`: a refusal, or a close.
    pub fn ended(&mut self, reason: CloseReason) {
        match refusal_of(reason) {
            Some(refusal) => self.refused[refusal as usize] += 1,
            None => self.closed[close_of(reason) as usize] += 1,
        }
    }

    /// A TLS handshake failed (or a relay refused a ClientHello) for `failure`.
    pub fn tls_failed(&mut self, failure: TlsFailure) {
        self.tls_failed[failure as usize] += 1;
    }

    /// Bytes moved on a connection (or by datagrams, or a flow).
    #[inline]
    pub fn moved(&mut self, progress: Progress) {
        self.bytes_in += progress.bytes_in;
        self.bytes_out += progress.bytes_out;
    }

    /// A datagram received on the listener's socket came to `outcome`.
    #[inline]
    pub fn datagram(&mut self, outcome: Datagram) {
        self.datagrams[outcome as usize] += 1;
    }

    /// Adds the counts to `row` (the listener's row in this worker's scoreboard rows, if it
    /// has one) and starts counting afresh; stores the open count.
    pub fn publish(&mut self, row: Option<&ListenerScore>) {
        let open = self.open;
        let counts = std::mem::replace(self, Tally { open, ..Tally::default() });
        // Ids past the table (`LISTENER_ROWS`) have no row.
        let Some(row) = row else { return };
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
        for (counter, n) in row.tls_failed.iter().zip(counts.tls_failed) {
            add(counter, n);
        }
        for (counter, n) in row.datagrams.iter().zip(counts.datagrams) {
            add(counter, n);
        }
        row.open.store(open, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scoreboard::Scoreboard;

    #[test]
    fn a_tally_reaches_its_row_once() {
        let board = Scoreboard::create(None, 1).unwrap();
        let rows = board.listener_rows(0);
        let (mut first, mut second) = (Tally::default(), Tally::default());
        second.accepted();
        second.accepted();
        second.moved(Progress { bytes_in: 5, bytes_out: 7, exchanges: 1 });
        second.finished();
        second.ended(CloseReason::ClientClose);
        first.ended(CloseReason::Rate);
        first.ended(CloseReason::Service("line-too-long"));
        first.datagram(Datagram::Unverified);
        first.datagram(Datagram::Unverified);
        first.datagram(Datagram::Answered);
        for _ in 0..2 {
            first.publish(rows.get(3));
            second.publish(rows.get(9));
        }
        let (first, second) = (&rows[3], &rows[9]);
        assert_eq!(second.accepted.load(Ordering::Relaxed), 2, "published once");
        assert_eq!(second.open.load(Ordering::Relaxed), 1);
        assert_eq!(second.bytes_out.load(Ordering::Relaxed), 7);
        assert_eq!(second.closed[Close::ClientClose as usize].load(Ordering::Relaxed), 1);
        assert_eq!(first.refused[Refusal::Rate as usize].load(Ordering::Relaxed), 1);
        assert_eq!(first.closed[Close::Service as usize].load(Ordering::Relaxed), 1);
        assert_eq!(first.accepted.load(Ordering::Relaxed), 0);
        assert_eq!(first.datagrams[Datagram::Unverified as usize].load(Ordering::Relaxed), 2);
        assert_eq!(first.datagrams[Datagram::Answered as usize].load(Ordering::Relaxed), 1);
        assert_eq!(second.datagrams[Datagram::Answered as usize].load(Ordering::Relaxed), 0);
    }

    #[test]
    fn worker_counts_are_published_once() {
        let board = Scoreboard::create(None, 1).unwrap();
        let mut counters = Counters::default();
        assert!(!counters.dirty());
        counters.accepted();
        counters.moved(3, 4);
        counters.refused(Refusal::Shed);
        counters.became_full();
        assert!(counters.dirty());
        let score = board.slot(0);
        counters.publish(score);
        counters.publish(score);
        assert!(!counters.dirty());
        assert_eq!(score.accepted.load(Ordering::Relaxed), 1);
        assert_eq!(score.bytes_out.load(Ordering::Relaxed), 4);
        assert_eq!(score.refused[Refusal::Shed as usize].load(Ordering::Relaxed), 1);
        assert_eq!(score.full.load(Ordering::Relaxed), 1);
    }
}
