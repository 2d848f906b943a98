//! What the worker's tables share and the loop lends them for each operation: the poller,
//! the listeners table, the books, the shared per-client tables, the scoreboard and the
//! descriptor budget.
//!
//! Runs in workers. Owned by the loop (`Worker`), next to the tables (TCP connections, PROXY
//! headers, UDP flows) and the intake; a table's operation borrows it whole, so no table
//! holds a reference to another's state.

use std::os::fd::RawFd;

use nix::sys::socket::MsgFlags;

use crate::limits::{DatagramRates, Limits, SlotLedger, Ticket};
use crate::net::Peer;
use crate::poller::{Interest, Poller};
use crate::scoreboard::Scoreboard;
use crate::services::CloseReason;

use super::books::{Books, Closed};
use super::listeners::Listeners;

/// The worker's shared means (see the module documentation).
pub struct Env<'a> {
    /// The readiness backend.
    pub poller: Box<dyn Poller>,
    /// Every listener.
    pub listeners: Listeners,
    /// Counters, access lines, refusal summaries.
    pub books: Books,
    /// The shared per-client table.
    pub limits: &'a Limits,
    /// This worker's records in it.
    pub ledger: SlotLedger,
    /// The shared per-client datagram rates (UDP listeners).
    pub rates: &'a DatagramRates,
    /// The shared scoreboard (sessions may read it: `metrics`).
    pub scoreboard: &'a Scoreboard,
    /// `max_connections_per_worker`: descriptors the worker holds for clients at most
    /// (connections, PROXY headers, flows, and the extra descriptors sessions watch).
    pub max_connections: usize,
}

impl Env<'_> {
    /// Descriptors the budget still allows, with `held` held.
    #[inline]
    pub fn room(&self, held: usize) -> usize {
        self.max_connections.saturating_sub(held)
    }

    /// Accounts for an ended or refused connection (see [`Books::closed`]).
    pub fn closed(&mut self, record: Closed<'_>) {
        self.books.closed(&mut self.listeners, record);
    }

    /// Turns away a connection just accepted on listener `index`, counted as a refusal of
    /// `reason`, after its `banner_fail` (its socket closes when the caller drops it).
    pub fn refuse(&mut self, fd: RawFd, index: usize, peer: Peer, reason: CloseReason) {
        let _ = self.poller.set(fd, Interest::NONE);
        self.refusal_banner(fd, index);
        self.closed(Closed::refused(index, peer, None, reason));
    }

    /// Sends listener `index`'s `banner_fail`, if it has one, to the client on `fd`, which
    /// is being refused.
    pub fn refusal_banner(&self, fd: RawFd, index: usize) {
        if let Some(banner) = &self.listeners[index].policy.banners.refused {
            send_banner(fd, &banner.bytes);
        }
    }

    /// Gives a connection's count in the shared table back, if it has one.
    pub fn release(&mut self, ticket: Option<Ticket>, peer: Peer) {
        if let Some(ticket) = ticket
            && let Err(error) = self.limits.release(&mut self.ledger, ticket)
        {
            log::error!("could not release the count of {peer}: {error}");
        }
    }
}

/// Sends `banner` on `fd` with one non-blocking send and never waits: returns how many bytes
/// the socket took (all of a banner into a new connection's empty send buffer; fewer, or
/// none, for a client that keeps its window shut). Nothing is kept for later, so a client
/// that does not read costs one system call.
pub fn send_banner(fd: RawFd, banner: &[u8]) -> usize {
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    nix::sys::socket::send(fd, banner, flags).unwrap_or(0)
}
