//! The worker's side of connection hand-off (see `crate::handoff` for the route).
//!
//! Runs in workers. A retiring (draining) worker offers each connection at rest whose
//! session exports its state, and stops watching it; a worker of the serving generation
//! adopts what the master forwards, under its own listener policy from then on: the idle
//! deadline is recomputed from the time since the last byte with its timeouts, and its
//! per-client count is moved, never counted again. Invariants:
//! - an offered connection is neither read, written, timed out nor closed by the sender
//!   until the answer (a fast stop only closes the sender's copy of the socket);
//! - whoever holds a connection's per-client record owns the connection: the receiver moves
//!   the record before it answers `Adopted`, and a sender that hears `Lost` serves on only
//!   if it still holds the record;
//! - a receiver that declines has touched neither the socket nor the counts.

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::conn::{CloseReason, Conn, ConnKind, HandOff};
use super::{Intake, Worker, at_rest};
use crate::handoff::{Message, Offer, Outcome};
use crate::limits::Admission;
use crate::poller::{Event, Interest};
use crate::services::{ConnInfo, MAX_EXPORT, Progress};

/// After a `Busy` answer, how long before the connection is offered again.
pub const HANDOFF_RETRY: Duration = Duration::from_millis(50);

/// Offers per connection at most; after that many `Busy` answers it finishes here.
pub const HANDOFF_TRIES: u32 = 40;

impl Worker<'_> {
    /// Watches the channel to the master for messages, and for room while messages wait.
    pub(super) fn watch_channel(&mut self) {
        let Some(channel) = &self.channel else { return };
        let wanted = if channel.backlogged() { Interest::BOTH } else { Interest::READ };
        if wanted != self.channel_interest {
            let _ = self.poller.set(channel.raw_fd(), wanted);
            self.channel_interest = wanted;
        }
    }

    /// Whether `fd` is the channel to the master.
    pub(super) fn is_channel(&self, fd: RawFd) -> bool {
        self.channel.as_ref().is_some_and(|c| c.raw_fd() == fd)
    }

    /// The channel is ready: send what waits, handle what came.
    pub(super) fn on_channel(&mut self, event: Event, now: Instant) {
        let Some(channel) = self.channel.as_mut() else { return };
        if event.writable
            && let Err(error) = channel.flush()
        {
            return self.channel_lost(&error.to_string(), now);
        }
        // A bounded batch, so a flood of offers cannot starve the clients.
        for _ in 0..256 {
            let Some(channel) = self.channel.as_mut() else { return };
            match channel.recv() {
                Ok(None) => break,
                Ok(Some((Message::Offer(offer), Some(fd)))) => {
                    let token = offer.token;
                    let outcome = self.adopt(offer, fd, now);
                    self.answer(token, outcome, now);
                }
                Ok(Some((Message::Resolved { token, outcome }, _))) => {
                    self.resolved(token, outcome, now)
                }
                Ok(Some((Message::Offer(_), None) | (Message::Taking | Message::Ready, _))) => {}
                Err(error) if error.kind() == std::io::ErrorKind::InvalidData => {
                    log::error!("hand-off channel: {error}; message dropped");
                }
                Err(error) => return self.channel_lost(&error.to_string(), now),
            }
        }
        self.watch_channel();
    }

    fn answer(&mut self, token: u64, outcome: Outcome, now: Instant) {
        let Some(channel) = self.channel.as_mut() else { return };
        if let Err(error) = channel.send(&Message::Resolved { token, outcome }, None) {
            self.channel_lost(&error.to_string(), now);
        }
    }

    /// The master is gone (or the channel broke): offers in flight are lost.
    fn channel_lost(&mut self, why: &str, now: Instant) {
        if let Some(channel) = self.channel.take() {
            let _ = self.poller.set(channel.raw_fd(), Interest::NONE);
            log::warn!("hand-off channel to the master closed: {why}");
        }
        let tokens: Vec<u64> = self.offered.keys().copied().collect();
        for token in tokens {
            self.resolved(token, Outcome::Lost, now);
        }
    }

    /// Offers the connection on `fd` if this worker retires, the connection is at rest and
    /// its session can be handed off; true when offered (the caller leaves it alone then).
    pub(super) fn offer(&mut self, fd: usize, now: Instant) -> bool {
        if self.intake != Intake::Draining || self.channel.is_none() {
            return false;
        }
        let Some(conn) = self.conns.get_mut(fd).and_then(Option::as_mut) else { return false };
        let tries = match conn.handoff {
            HandOff::Local => 0,
            HandOff::Pending { tries } => tries,
            HandOff::Retry { .. } | HandOff::Offered { .. } | HandOff::Never => return false,
        };
        let closing = conn.close_at_rest.is_some_and(|r| r != super::CloseReason::Shutdown);
        if conn.lingering.is_some() || closing || conn.session.is_done() {
            return false;
        }
        if !conn.extras.is_empty() {
            conn.handoff = HandOff::Never;
            return false;
        }
        if !at_rest(conn) {
            return false; // offered at its next rest
        }
        let Some(state) = conn.session.export().filter(|s| s.len() <= MAX_EXPORT) else {
            conn.handoff = HandOff::Never;
            return false;
        };
        let Ok(copy) = conn.stream.as_fd().try_clone_to_owned() else {
            // Out of descriptors: try again later.
            conn.handoff = HandOff::Retry { at: now + HANDOFF_RETRY, tries: tries + 1 };
            return false;
        };
        let offer = Offer {
            token: conn.serial,
            listener: self.context.config.listeners[conn.listener].name.clone(),
            peer: conn.peer,
            long: conn.kind == ConnKind::Long,
            age: now.saturating_duration_since(conn.opened),
            quiet: now.saturating_duration_since(conn.last_activity),
            bytes_in: conn.totals.bytes_in,
            bytes_out: conn.totals.bytes_out,
            exchanges: conn.totals.exchanges,
            record: conn.ticket.as_ref().map(|t| t.handed()),
            timer: conn.timer.map(|t| t.saturating_duration_since(now)),
            state,
        };
        let channel = self.channel.as_mut().expect("checked above");
        if channel.send(&Message::Offer(offer), Some(copy)).is_err() {
            // The queue is full or the master is gone: serve on, try later.
            conn.handoff = HandOff::Retry { at: now + HANDOFF_RETRY, tries: tries + 1 };
            self.schedule(fd);
            return false;
        }
        conn.handoff = HandOff::Offered { tries: tries + 1 };
        if conn.interest != Interest::NONE {
            conn.interest = Interest::NONE;
            let _ = self.poller.set(fd as RawFd, Interest::NONE);
        }
        self.offered.insert(conn.serial, fd);
        self.watch_channel();
        true
    }

    /// The answer to our offer `token`.
    fn resolved(&mut self, token: u64, outcome: Outcome, now: Instant) {
        let Some(fd) = self.offered.remove(&token) else { return };
        let Some(conn) = self.conns.get_mut(fd).and_then(Option::as_mut) else { return };
        let HandOff::Offered { tries } = conn.handoff else { return };
        if conn.serial != token {
            return;
        }
        let ours = match outcome {
            Outcome::Adopted => false,
            Outcome::Busy | Outcome::Refused => true,
            Outcome::Lost => match conn.ticket.take() {
                // The count tells: still ours if the receiver never moved it.
                Some(ticket) => match self.context.limits.settle(&mut self.ledger, ticket) {
                    Ok(kept) => {
                        let ours = kept.is_some();
                        conn.ticket = kept;
                        ours
                    }
                    Err(error) => {
                        log::error!("hand-off of {}: {error}", conn.peer);
                        false
                    }
                },
                // Nothing tells whether the receiver began serving it: close our copy.
                None => false,
            },
        };
        if !ours {
            return self.handed_over(fd, outcome);
        }
        conn.handoff = match outcome {
            Outcome::Busy | Outcome::Lost if tries < HANDOFF_TRIES => {
                HandOff::Retry { at: now + HANDOFF_RETRY, tries }
            }
            _ => HandOff::Never,
        };
        log::debug!("hand-off of {} not done ({outcome:?}): serving it here", conn.peer);
        self.update_interest(fd);
        self.schedule(fd);
    }

    /// The connection on `fd` is served elsewhere now: forget it without a close (the
    /// receiver has the socket; closing our descriptor sends nothing).
    fn handed_over(&mut self, fd: usize, outcome: Outcome) {
        let Some(mut conn) = self.conns[fd].take() else { return };
        self.open -= 1;
        if outcome == Outcome::Adopted {
            self.listener_tallies.handed_off(conn.listener);
        } else {
            // Lost with a receiver that died after taking its count: gone for us.
            self.listener_tallies.finished(conn.listener);
            self.listener_tallies.ended(conn.listener, CloseReason::Error);
        }
        self.unpublished.dirty = true;
        if let Some(ticket) = conn.ticket.take() {
            // Moved by the receiver: the record is ours to reuse.
            match self.context.limits.settle(&mut self.ledger, ticket) {
                Ok(None) => {}
                Ok(Some(ticket)) => {
                    let _ = self.context.limits.release(&mut self.ledger, ticket);
                }
                Err(error) => log::error!("hand-off of {}: {error}", conn.peer),
            }
        }
        log::debug!("connection from {} handed off ({outcome:?})", conn.peer);
        drop(conn);
    }

    /// Adopts a connection a retiring worker offered; the answer for the master.
    fn adopt(&mut self, offer: Offer, fd: OwnedFd, now: Instant) -> Outcome {
        if self.intake == Intake::Draining {
            return Outcome::Busy;
        }
        let listeners = &self.context.config.listeners;
        let Some(index) = listeners.iter().position(|l| l.name == offer.listener) else {
            return Outcome::Refused;
        };
        if self.room() == 0 {
            return Outcome::Busy;
        }
        let stream = TcpStream::from(fd);
        let raw = stream.as_raw_fd();
        let slot = raw as usize;
        if self.conns.get(slot).is_some_and(Option::is_some)
            || self.poller.set(raw, Interest::READ).is_err()
        {
            // Over select()'s limit, or a descriptor we did not expect to be in use.
            return Outcome::Busy;
        }
        let unwatch = |worker: &mut Self| {
            let _ = worker.poller.set(raw, Interest::NONE);
        };
        let policy = &self.context.config.listeners[index];
        let info = ConnInfo {
            listener: &policy.name,
            peer: offer.peer,
            socket: stream.as_fd(),
            // Accepted by another generation, maybe on another address under this name.
            bound: None,
        };
        let Some(session) = policy.service.service.import(&info, &offer.state) else {
            unwatch(self);
            return Outcome::Refused;
        };
        let key = self.client_key(index, offer.peer);
        let limits = self.context.limits;
        let ticket = match offer.record {
            Some(handed) => match limits.transfer(&mut self.ledger, handed, key) {
                Ok(Some(ticket)) => Some(ticket),
                // The sender no longer holds it (it died and was reclaimed).
                Ok(None) => {
                    unwatch(self);
                    return Outcome::Refused;
                }
                Err(error) => {
                    log::error!("adopting a connection from {}: {error}", offer.peer);
                    unwatch(self);
                    return Outcome::Busy;
                }
            },
            // Not counted by the old policy, counted by ours: count it, without a limit
            // (it was admitted already).
            None if policy.has_client_limits() => match limits.admit(&mut self.ledger, key, None) {
                Ok(Admission::Admitted(ticket)) => {
                    if offer.long {
                        let _ = limits.promote(&ticket, None);
                    }
                    Some(ticket)
                }
                Ok(_) | Err(_) => {
                    unwatch(self);
                    return Outcome::Busy;
                }
            },
            None => None,
        };
        // Set by the accepting worker as its generation said; this one's may differ.
        let _ = stream.set_nodelay(policy.tcp_nodelay);
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        let opened = now.checked_sub(offer.age).unwrap_or(now);
        self.conns[slot] = Some(Conn {
            stream,
            listener: index,
            peer: offer.peer,
            // The proxy a PROXY header named is not carried over: the access line of a moved
            // connection names the client only.
            proxy: None,
            session,
            kind: if offer.long { ConnKind::Long } else { ConnKind::Short },
            opened,
            last_activity: now.checked_sub(offer.quiet).unwrap_or(opened).max(opened),
            totals: Progress {
                bytes_in: offer.bytes_in,
                bytes_out: offer.bytes_out,
                exchanges: offer.exchanges,
            },
            ticket,
            close_at_rest: None,
            lingering: None,
            interest: Interest::READ,
            serial: self.next_serial,
            scheduled: None,
            timer: offer.timer.map(|left| now + left),
            extras: Vec::new(),
            handoff: HandOff::Local,
        });
        self.next_serial += 1;
        self.open += 1;
        self.listener_tallies.adopted(index);
        self.unpublished.dirty = true;
        self.update_interest(slot);
        self.schedule(slot);
        Outcome::Adopted
    }
}
