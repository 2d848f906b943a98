//! The worker's side of connection hand-off (see `crate::handoff` for the route): the
//! channel to the master and the offers in flight ([`Link`]), which the connection table
//! lends its connections to.
//!
//! Runs in workers. A draining worker offers each connection whose session can move now
//! (`services::Movable`: at rest by default, at any point for a relay), with the session's
//! exported state and duplicates of its client socket and its own descriptors, and stops
//! watching them; a connection it cannot hand off is kept (`phase::Drain::kept`). A worker of
//! the serving generation adopts what the master forwards, under its own listener policy from
//! then on: the idle deadline is recomputed from the time since the last byte with its
//! timeouts, the session's timer from the time it had left, and the per-client count is
//! moved, never counted again. Invariants:
//! - an offered connection is neither read, written, timed out nor closed by the sender
//!   until the answer, and none of its descriptors is watched (a fast stop only closes the
//!   sender's copies);
//! - whoever holds a connection's per-client record owns the connection: the receiver moves
//!   the record as the last step of adopting it, before it answers `Adopted`, and a sender
//!   that hears `Lost` serves on only if it still holds the record;
//! - a receiver that declines has done no I/O on the connection and holds no count for it
//!   (the session it rebuilt is unwatched and dropped, giving back what it took).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use crate::handoff::{Channel, Message, Offer, Outcome};
use crate::limits::Admission;
use crate::net::Stream;
use crate::poller::{Event, Interest, Poller};
use crate::services::{
    CloseReason, ConnInfo, Context, MAX_EXPORT, MAX_EXPORT_DESCRIPTORS, Movable, Progress,
};

use super::conn::{Conn, unread_input};
use super::connections::{schedule, update_interest};
use super::env::Env;
use super::extras::{self, ExtraFds};
use super::phase::{ConnKind, ConnState, Drain, HANDOFF_RETRY, HandOff, Phase, after_answer};
use super::shares::Share;
use super::table::Table;

/// Messages handled per readiness of the channel at most, so a flood of offers cannot starve
/// the clients.
const CHANNEL_BATCH: usize = 256;

/// The hand-off channel to the master, and the connections offered on it.
#[derive(Debug)]
pub struct Link {
    channel: Option<Channel>,
    /// What the channel is watched for.
    interest: Interest,
    /// Connections offered, by token (their serial): descriptor.
    offered: HashMap<u64, usize>,
    /// Why this worker drains, once it does (it then offers, and declines offers).
    drain: Option<Drain>,
    /// Connections kept here (not handed off) since the loop last told their sessions
    /// (`Session::on_drain`): descriptor and serial.
    kept: Vec<(usize, u64)>,
}

impl Link {
    /// A link over `channel` (registered with the poller for reading already; `None`:
    /// connections are never handed off).
    pub fn new(channel: Option<Channel>) -> Self {
        Link {
            channel,
            interest: Interest::READ,
            offered: HashMap::new(),
            drain: None,
            kept: Vec::new(),
        }
    }

    /// The worker drains for `why` from now on (a stop replaces a retirement).
    pub fn drain(&mut self, why: Drain) {
        self.drain = Some(why);
    }

    /// Why the worker drains, if it does.
    pub fn draining(&self) -> Option<Drain> {
        self.drain
    }

    /// Whether connections were kept since the last [`take_kept`](Self::take_kept): asked
    /// once per turn of the loop, which is almost always told no.
    #[inline]
    pub fn has_kept(&self) -> bool {
        !self.kept.is_empty()
    }

    /// The connections kept here since the last call, whose sessions get the drain notice
    /// (those never told before).
    pub fn take_kept(&mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.kept)
    }

    /// Whether `fd` is the channel to the master.
    pub fn is_channel(&self, fd: RawFd) -> bool {
        self.channel.as_ref().is_some_and(|c| c.raw_fd() == fd)
    }

    /// Sends what waits, as far as the socket takes it (at the end of a graceful stop).
    pub fn flush(&mut self) {
        if let Some(channel) = self.channel.as_mut() {
            let _ = channel.flush();
        }
    }

    /// Sends `message` to the master (queued while the channel is full; the loop sends the
    /// rest when it has room).
    ///
    /// # Errors
    /// There is no channel, too many messages wait, or the master is gone.
    pub fn tell(&mut self, message: &Message, poller: &mut dyn Poller) -> io::Result<()> {
        let channel = self.channel.as_mut().ok_or_else(|| io::Error::other("no channel"))?;
        channel.send(message, Vec::new())?;
        self.watch(poller);
        Ok(())
    }

    /// Watches the channel for messages, and for room while messages wait.
    fn watch(&mut self, poller: &mut dyn Poller) {
        let Some(channel) = &self.channel else { return };
        let wanted = if channel.backlogged() { Interest::BOTH } else { Interest::READ };
        if wanted != self.interest {
            let _ = poller.set(channel.raw_fd(), wanted);
            self.interest = wanted;
        }
    }

    /// The channel is ready: sends what waits, handles what came (offers to adopt, answers
    /// to our offers). `others`: descriptors held outside the connection table and its
    /// sessions' extra descriptors (for the budget).
    pub fn on_channel(
        &mut self,
        table: &mut Table<Conn>,
        extras: &mut ExtraFds,
        event: Event,
        now: Instant,
        env: &mut Env<'_>,
        others: usize,
    ) {
        let Some(channel) = self.channel.as_mut() else { return };
        if event.writable
            && let Err(error) = channel.flush()
        {
            return self.lost(table, extras, &error.to_string(), now, env);
        }
        for _ in 0..CHANNEL_BATCH {
            let Some(channel) = self.channel.as_mut() else { return };
            match channel.recv() {
                Ok(None) => break,
                Ok(Some((Message::Offer(offer), fds))) => {
                    let token = offer.token;
                    let outcome = if self.drain.is_some() || !offer.complete(fds.len()) {
                        // Retiring, or out of descriptors (some did not arrive).
                        Outcome::Busy
                    } else {
                        adopt(table, extras, offer, fds, now, env, others)
                    };
                    self.answer(table, extras, token, outcome, now, env);
                }
                Ok(Some((Message::Resolved { token, outcome }, _))) => {
                    self.resolved(table, extras, token, outcome, now, env)
                }
                Ok(Some((Message::Taking | Message::Ready | Message::Recycle(_), _))) => {}
                Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                    log::error!("hand-off channel: {error}; message dropped");
                }
                Err(error) => return self.lost(table, extras, &error.to_string(), now, env),
            }
        }
        self.watch(&mut *env.poller);
    }

    fn answer(
        &mut self,
        table: &mut Table<Conn>,
        extras: &mut ExtraFds,
        token: u64,
        outcome: Outcome,
        now: Instant,
        env: &mut Env<'_>,
    ) {
        let Some(channel) = self.channel.as_mut() else { return };
        if let Err(error) = channel.send(&Message::Resolved { token, outcome }, Vec::new()) {
            self.lost(table, extras, &error.to_string(), now, env);
        }
    }

    /// The master is gone (or the channel broke): offers in flight are lost.
    fn lost(
        &mut self,
        table: &mut Table<Conn>,
        extras: &mut ExtraFds,
        why: &str,
        now: Instant,
        env: &mut Env<'_>,
    ) {
        if let Some(channel) = self.channel.take() {
            let _ = env.poller.set(channel.raw_fd(), Interest::NONE);
            log::warn!("hand-off channel to the master closed: {why}");
        }
        let tokens: Vec<u64> = self.offered.keys().copied().collect();
        for token in tokens {
            self.resolved(table, extras, token, Outcome::Lost, now, env);
        }
    }

    /// Offers the connection on `fd` if its phase makes it a candidate and its session can
    /// move now; true when offered (the caller leaves it alone then). A connection whose
    /// session cannot be handed off is kept ([`Drain::kept`]).
    pub fn offer(
        &mut self,
        table: &mut Table<Conn>,
        fd: usize,
        now: Instant,
        env: &mut Env<'_>,
    ) -> bool {
        let Some((serial, conn)) = table.entry_mut(fd) else { return false };
        let Some(tries) = conn.state.phase.offerable() else { return false };
        let kept = self.drain.unwrap_or(Drain::Stop).kept();
        let mut keep = |conn: &mut Conn| {
            conn.state.phase = kept;
            self.kept.push((fd, serial));
        };
        let Some(channel) = self.channel.as_mut() else {
            keep(conn);
            return false;
        };
        if conn.session.is_done() {
            return false;
        }
        match conn.session.movable() {
            Movable::Later => return false, // asked again after its next callback
            Movable::Never => {
                conn.state.phase = kept;
                return false;
            }
            Movable::Now => {}
            Movable::AtRest => {
                if !conn.extras.is_empty() {
                    keep(conn);
                    return false;
                }
                if !conn.session.is_at_rest() || unread_input(&conn.stream) {
                    return false; // offered at its next rest
                }
            }
        }
        let Some(state) = conn.session.export().filter(|s| s.len() <= MAX_EXPORT) else {
            keep(conn);
            return false;
        };
        let own = conn.session.export_descriptors();
        if own.len() > MAX_EXPORT_DESCRIPTORS {
            drop(own);
            keep(conn);
            return false;
        }
        let descriptors = own.len();
        let copies: io::Result<Vec<OwnedFd>> = std::iter::once(conn.stream.as_fd())
            .chain(own)
            .map(|fd| fd.try_clone_to_owned())
            .collect();
        let retry = Phase::Draining(HandOff::Retry { at: now + HANDOFF_RETRY, tries: tries + 1 });
        let Ok(copies) = copies else {
            // Out of descriptors: try again later.
            conn.state.phase = retry;
            schedule(table, fd, env);
            return false;
        };
        let offer = Offer {
            token: serial,
            listener: env.listeners[conn.listener].policy.name.clone(),
            peer: conn.peer,
            long: conn.state.kind == ConnKind::Long,
            age: now.saturating_duration_since(conn.opened),
            quiet: now.saturating_duration_since(conn.state.last_activity),
            bytes_in: conn.totals.bytes_in,
            bytes_out: conn.totals.bytes_out,
            exchanges: conn.totals.exchanges,
            record: conn.ticket.as_ref().map(|t| t.handed()),
            timer: conn.state.timer.map(|t| t.saturating_duration_since(now)),
            state,
            descriptors,
        };
        if channel.send(&Message::Offer(offer), copies).is_err() {
            // The queue is full or the master is gone: serve on, try later.
            conn.state.phase = retry;
            schedule(table, fd, env);
            return false;
        }
        conn.state.phase = Phase::Offered { tries: tries + 1 };
        if conn.interest != Interest::NONE {
            conn.interest = Interest::NONE;
            let _ = env.poller.set(fd as RawFd, Interest::NONE);
        }
        extras::suspend(&mut *env.poller, &conn.extras);
        self.offered.insert(serial, fd);
        self.watch(&mut *env.poller);
        true
    }

    /// The answer to our offer `token`.
    fn resolved(
        &mut self,
        table: &mut Table<Conn>,
        extras: &mut ExtraFds,
        token: u64,
        outcome: Outcome,
        now: Instant,
        env: &mut Env<'_>,
    ) {
        let Some(fd) = self.offered.remove(&token) else { return };
        let Some(conn) = table.live_mut(fd, token) else { return };
        let Phase::Offered { tries } = conn.state.phase else { return };
        let ours = match outcome {
            Outcome::Adopted => false,
            Outcome::Busy | Outcome::Refused => true,
            Outcome::Lost => match conn.ticket.take() {
                // The count tells: still ours if the receiver never moved it.
                Some(ticket) => match env.limits.settle(&mut env.ledger, ticket) {
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
            return handed_over(table, extras, fd, outcome, env);
        }
        let drain = self.drain.unwrap_or(Drain::Stop);
        conn.state.phase = after_answer(tries, outcome, now, drain);
        if conn.state.phase == drain.kept() {
            self.kept.push((fd, token));
        }
        log::debug!("hand-off of {} not done ({outcome:?}): serving it here", conn.peer);
        extras::restore(&mut *env.poller, &conn.extras);
        update_interest(table, fd, &mut *env.poller);
        schedule(table, fd, env);
    }
}

/// The connection on `fd` is served elsewhere now: forget it without a close (the receiver
/// has its sockets; closing our descriptors sends nothing).
fn handed_over(
    table: &mut Table<Conn>,
    extras: &mut ExtraFds,
    fd: usize,
    outcome: Outcome,
    env: &mut Env<'_>,
) {
    let Some(mut conn) = table.remove(fd) else { return };
    // Unregistered already (offered); forgotten now, before the session drops its copies.
    extras.unwatch_all(&mut *env.poller, &mut conn.extras);
    let tally = &mut env.listeners[conn.listener].tally;
    if outcome == Outcome::Adopted {
        tally.handed_off();
    } else {
        // Lost with a receiver that died after taking its count: gone for us.
        tally.finished();
        tally.ended(CloseReason::Error);
    }
    env.books.counters.touch();
    if let Some(ticket) = conn.ticket.take() {
        // Moved by the receiver: the record is ours to reuse.
        match env.limits.settle(&mut env.ledger, ticket) {
            Ok(None) => {}
            Ok(Some(ticket)) => {
                let _ = env.limits.release(&mut env.ledger, ticket);
            }
            Err(error) => log::error!("hand-off of {}: {error}", conn.peer),
        }
    }
    log::debug!("connection from {} handed off ({outcome:?})", conn.peer);
}

/// Adopts a connection a retiring worker offered (`fds`: its client socket, then its
/// session's descriptors); the answer for the master. Every step that can fail comes before
/// the per-client record moves, and undoes what came before it.
fn adopt(
    table: &mut Table<Conn>,
    extras: &mut ExtraFds,
    offer: Offer,
    fds: Vec<OwnedFd>,
    now: Instant,
    env: &mut Env<'_>,
    others: usize,
) -> Outcome {
    let Some(index) = env.listeners.by_name(&offer.listener) else {
        return Outcome::Refused;
    };
    let mut fds = fds.into_iter();
    let Some(client) = fds.next() else { return Outcome::Refused };
    let own: Vec<OwnedFd> = fds.collect();
    if env.room(table.len() + extras.len() + others) < 1 + own.len() {
        return Outcome::Busy;
    }
    let stream = Stream::from(client);
    let raw = stream.as_raw_fd();
    let slot = raw as usize;
    if table.contains(slot) || !env.poller.can_watch(raw) {
        // Over select()'s limit, or a descriptor we did not expect to be in use.
        return Outcome::Busy;
    }
    let entry = &env.listeners[index];
    let info = ConnInfo {
        listener: &entry.policy.name,
        peer: offer.peer,
        socket: stream.as_fd(),
        // Accepted by another generation, maybe on another address under this name.
        bound: None,
        tls: None,
    };
    let Some(session) = entry.policy.service.service.import(&info, &offer.state) else {
        return Outcome::Refused;
    };
    let tcp_nodelay = entry.policy.tcp_nodelay;
    let opened = now.checked_sub(offer.age).unwrap_or(now);
    let kind = if offer.long { ConnKind::Long } else { ConnKind::Short };
    let mut state = ConnState::new(Phase::Open, kind, now);
    state.last_activity = now.checked_sub(offer.quiet).unwrap_or(opened).max(opened);
    state.timer = offer.timer.map(|left| now + left);
    let conn = Conn {
        stream,
        listener: index,
        peer: offer.peer,
        // The proxy a PROXY header named is not carried over: the access line of a moved
        // connection names the client only.
        proxy: None,
        session,
        state,
        opened,
        totals: Progress {
            bytes_in: offer.bytes_in,
            bytes_out: offer.bytes_out,
            exchanges: offer.exchanges,
        },
        ticket: None,
        interest: Interest::NONE,
        extras: Vec::new(),
        // Counted in its client's share at its first event here (`connections.rs`).
        share: Share::Unseated,
        // Handed off, so never told: told here if this worker keeps it when it drains.
        told_drain: false,
    };
    let Ok(serial) = table.insert(slot, conn) else {
        return Outcome::Busy; // checked above: the slot is free
    };
    // The session takes its descriptors back and watches them; no I/O yet.
    let room = env.room(table.len() + extras.len() + others);
    let resumed = {
        let conn = table.get_mut(slot).expect("inserted above");
        let watch = extras.lend(&mut *env.poller, &mut conn.extras, room, (slot, serial));
        // SAFETY: the descriptor is `conn.stream`'s, open for the whole call: the context
        // (and so this borrow) is dropped before the connection can be removed.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
        let mut cx = Context::with_extras(&mut conn.stream, socket, now, watch);
        conn.session.resume(own, &mut cx)
    };
    let decline = |table: &mut Table<Conn>, extras: &mut ExtraFds, env: &mut Env<'_>| {
        if let Some(mut conn) = table.remove(slot) {
            extras.unwatch_all(&mut *env.poller, &mut conn.extras);
        }
    };
    if let Err(error) = resumed {
        log::debug!("adopting a connection from {}: {error}", offer.peer);
        decline(table, extras, env);
        return Outcome::Refused;
    }
    let entry = &env.listeners[index];
    let key = entry.client_key(&offer.peer);
    let (limits, counted) = (env.limits, entry.policy.has_client_limits());
    let ticket = match offer.record {
        Some(handed) => match limits.transfer(&mut env.ledger, handed, key) {
            Ok(Some(ticket)) => Some(ticket),
            // The sender no longer holds it (it died and was reclaimed).
            Ok(None) => {
                decline(table, extras, env);
                return Outcome::Refused;
            }
            Err(error) => {
                log::error!("adopting a connection from {}: {error}", offer.peer);
                decline(table, extras, env);
                return Outcome::Busy;
            }
        },
        // Not counted by the old policy, counted by ours: count it, without a limit (it was
        // admitted already).
        None if counted => match limits.admit(&mut env.ledger, key, None) {
            Ok(Admission::Admitted(ticket)) => {
                if offer.long {
                    let _ = limits.promote(&ticket, None);
                }
                Some(ticket)
            }
            Ok(_) | Err(_) => {
                decline(table, extras, env);
                return Outcome::Busy;
            }
        },
        None => None,
    };
    let conn = table.get_mut(slot).expect("inserted above");
    conn.ticket = ticket;
    // Set by the accepting worker as its generation said; this one's may differ.
    let _ = conn.stream.set_nodelay(tcp_nodelay);
    env.listeners[index].tally.adopted();
    env.books.counters.touch();
    update_interest(table, slot, &mut *env.poller);
    schedule(table, slot, env);
    Outcome::Adopted
}
