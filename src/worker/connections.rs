//! The worker's TCP connections: their table, and everything that happens to one between
//! admission and close, carried out as `phase.rs` decides: session callbacks and what follows
//! them, deadlines, lingering and abortive closes, shedding.
//!
//! Runs in workers. Invariants:
//! - the loop reads, writes and closes a connection only here, and only as its phase allows
//!   (an `Offered` one is left alone; a `Lingering` one is only drained of input);
//! - a connection's poller interest is what `Conn::interest` says, and it is unregistered
//!   (with the session's extra descriptors) before its socket closes;
//! - readiness is level-triggered: a callback that stops early (fairness, backpressure) is
//!   called again on the next turn, and input that arrives during a lingering close is read;
//! - every extra descriptor a session watches has its owner `(descriptor, serial)` in
//!   `extras` (`extras.rs`), and counts against the budget until unwatched;
//! - each connection's count in the shared table is released exactly once, when it closes
//!   (or moved, when it is handed off: see `handoff.rs`).

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::clock::{monotonic_ns, unix_ms};
use crate::handoff::Channel;
use crate::net::{Peer, Stream};
use crate::poller::{Event, Interest, Poller};
use crate::scoreboard::Child;
use crate::services::{CloseReason, ConnInfo, Context, Ending, Movable, Progress, Ready};

use crate::limits::ClientKey;

use super::admission::{self, SHED_LINGER_MAX, SHED_SCAN_CLIENTS, SHED_SCAN_MEMBERS};
use super::admission::{ShedQueue, Verdict};
use super::books::Closed;
use super::conn::{Conn, discard_input, unread_input};
use super::env::Env;
use super::extras::ExtraFds;
use super::handoff::Link;
use super::listeners::Listeners;
use super::phase::{ConnKind, ConnState, Drain, Expiry, Next, Phase, Promotion};
use super::shares::{Share, Shares};
use super::table::Table;

/// A session callback the loop makes.
#[derive(Debug, Clone, Copy)]
pub enum Callback {
    /// The client socket is readable.
    Readable,
    /// The client socket is writable.
    Writable,
    /// An extra descriptor of the session is ready.
    Extra(RawFd, Ready),
    /// The session's timer came due.
    Timer,
    /// The worker drains and keeps the connection (`Session::on_drain`).
    Drain,
}

/// A client to admit: a connection just accepted, or one whose PROXY header is complete.
pub struct Client {
    /// Its socket (positioned at the client's first byte).
    pub stream: Stream,
    /// The listener's index.
    pub listener: usize,
    /// Who the client is (the one a PROXY header named, if any).
    pub peer: Peer,
    /// The proxy it came through, if it sent a PROXY header.
    pub proxy: Option<SocketAddr>,
}

/// The worker's TCP connections.
pub struct Connections {
    table: Table<Conn>,
    /// The extra descriptors sessions watch; they count against the budget.
    extras: ExtraFds,
    /// Connections that may be shed when the worker is full because they completed no
    /// exchange, oldest first.
    shed: ShedQueue,
    /// Each client's connections here (on listeners with `shed_when_full`), for shedding
    /// by fair share.
    shares: Shares,
    /// Connections shed by fair share that are still in their lingering close, in `table`
    /// (each holds a descriptor beyond the budget): at most [`SHED_LINGER_MAX`].
    lingering_sheds: usize,
    /// Turns of the search for a connection to shed by fair share (each looks at other
    /// candidates first).
    shed_turn: usize,
    /// The hand-off channel to the master, and the offers in flight.
    pub link: Link,
}

impl Connections {
    /// No connection yet; `channel` is the hand-off channel to the master (registered with
    /// the poller already).
    pub fn new(channel: Option<Channel>) -> Self {
        Connections {
            table: Table::default(),
            extras: ExtraFds::default(),
            shed: ShedQueue::default(),
            shares: Shares::default(),
            lingering_sheds: 0,
            shed_turn: 0,
            link: Link::new(channel),
        }
    }

    /// Connections open (offered ones included).
    #[inline]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Descriptors held against the budget: connections and the extra descriptors their
    /// sessions watch, but for the lingering closes of connections shed by fair share (at
    /// most [`SHED_LINGER_MAX`] beyond the budget: each gave its place to a new client).
    #[inline]
    pub fn held(&self) -> usize {
        self.table.len() + self.extras.len() - self.lingering_sheds
    }

    /// The earliest connection deadline (possibly stale: an early wake-up only).
    #[inline]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    /// Whether a connection may be shed for a new client `newcomer` (`None`: not known yet,
    /// taken as a client without connections here), by [`Connections::make_room`]: one
    /// without a completed exchange, or one at rest of a client over its fair share. Drops
    /// stale queue entries; looks at a bounded number of connections.
    pub fn can_shed(&mut self, newcomer: Option<&ClientKey>) -> bool {
        let table = &self.table;
        if self.shed.front(|fd, serial| table.live(fd, serial).is_some_and(sheddable)).is_some()
            || self.over_share_candidates(newcomer).next().is_some()
        {
            return true;
        }
        // None at rest among those looked at: look at others next time.
        self.shed_turn = self.shed_turn.wrapping_add(1);
        false
    }

    /// Makes room for a new connection of `newcomer` (`None`: not known yet) in a full
    /// worker: closes the oldest connection that has not completed an exchange (reason
    /// `shed`), or else starts a lingering close of a connection at rest of the client
    /// holding the most connections here, if it holds at least two more than `newcomer`
    /// (reason `over-share`; see `shares.rs`). False if neither can be had.
    pub fn make_room(
        &mut self,
        newcomer: Option<&ClientKey>,
        now: Instant,
        env: &mut Env<'_>,
    ) -> bool {
        let table = &self.table;
        if let Some((fd, _)) =
            self.shed.pop(|fd, serial| table.live(fd, serial).is_some_and(sheddable))
        {
            // Answered nothing yet: a refusal, with the listener's `banner_fail`.
            if let Some(conn) = self.table.get(fd) {
                env.refusal_banner(fd as RawFd, conn.listener);
            }
            self.finish(fd, CloseReason::Shed, now, env);
            return true;
        }
        // At rest, and nothing unread: the client has every answer, and a request it sent
        // last is not left unanswered (the peek only for the candidate at hand).
        let table = &self.table;
        let found = self.over_share_candidates(newcomer).find(|&(fd, serial)| {
            table.live(fd, serial).is_some_and(|conn| !unread_input(&conn.stream))
        });
        self.shed_turn = self.shed_turn.wrapping_add(1);
        let Some((fd, _)) = found else { return false };
        let Some(conn) = self.table.get_mut(fd) else { return false };
        log::debug!(
            "shedding a connection at rest from {}: its client holds {} connections here, over its fair share of {}",
            conn.peer,
            self.shares.held_by(&env.listeners[conn.listener].client_key(&conn.peer)),
            self.shares.fair_share(newcomer)
        );
        // It no longer counts: neither in its client's share nor against its limits.
        let (ticket, peer) = (conn.ticket.take(), conn.peer);
        env.release(ticket, peer);
        self.unseat(fd);
        self.linger(fd, CloseReason::OverShare, now, env);
        if self.table.get(fd).is_some_and(|conn| shed_lingering(&conn.state.phase)) {
            self.lingering_sheds += 1;
        }
        true
    }

    /// The connections that fair-share shedding may close for `newcomer`, as `(descriptor,
    /// serial)`: at rest, of the clients holding the most (see [`Shares::over_share`]); none
    /// while [`SHED_LINGER_MAX`] such closes linger. At most [`SHED_SCAN_CLIENTS`] x
    /// [`SHED_SCAN_MEMBERS`] connections are looked at, starting elsewhere each turn.
    fn over_share_candidates<'a>(
        &'a self,
        newcomer: Option<&ClientKey>,
    ) -> impl Iterator<Item = (usize, u64)> + use<'a> {
        let table = &self.table;
        let turn = self.shed_turn;
        let clients = if self.lingering_sheds < SHED_LINGER_MAX { SHED_SCAN_CLIENTS } else { 0 };
        self.shares.over_share(newcomer, clients, turn).flat_map(move |members| {
            let start = turn % members.len();
            let (after, before) = members.split_at(start);
            before.iter().chain(after).take(SHED_SCAN_MEMBERS).copied().filter(|&(fd, serial)| {
                table.live(fd, serial).is_some_and(|conn| {
                    admission::over_share_sheddable(
                        &conn.state,
                        conn.session.idle_timeouts(),
                        conn.session.is_at_rest(),
                    )
                })
            })
        })
    }

    /// Counts the connection on `fd` in its client's share, if it is to be and is not yet;
    /// `key`: its client, if known already.
    fn seat(&mut self, fd: usize, key: Option<ClientKey>, env: &Env<'_>) {
        let Some((serial, conn)) = self.table.entry_mut(fd) else { return };
        if conn.share != Share::Unseated {
            return;
        }
        let entry = &env.listeners[conn.listener];
        conn.share = match entry.policy.admission.shed_when_full {
            true => {
                let key = key.unwrap_or_else(|| entry.client_key(&conn.peer));
                Share::Seated(self.shares.join(key, fd, serial))
            }
            false => Share::Uncounted,
        };
    }

    /// Offers the connection on `fd` for hand-off if it can move now (see [`Link::offer`]);
    /// true when offered. An offered connection leaves its client's share here (it is
    /// counted again at its next event if it stays).
    fn offer(&mut self, fd: usize, now: Instant, env: &mut Env<'_>) -> bool {
        if !self.link.offer(&mut self.table, fd, now, env) {
            return false;
        }
        self.unseat(fd);
        if let Some(conn) = self.table.get_mut(fd) {
            conn.share = Share::Unseated;
        }
        true
    }

    /// Stops counting the connection on `fd` in its client's share.
    fn unseat(&mut self, fd: usize) {
        let Some(conn) = self.table.get_mut(fd) else { return };
        let Share::Seated(seat) = std::mem::replace(&mut conn.share, Share::Uncounted) else {
            return;
        };
        if let Some(((moved, serial), seat)) = self.shares.leave(seat)
            && let Some(conn) = self.table.live_mut(moved, serial)
        {
            conn.share = Share::Seated(seat);
        }
    }

    /// Admits `client` under its listener's rules and makes its session. `others`:
    /// descriptors the other tables hold; `draining`: the worker stops gracefully. A full
    /// worker makes room first: `shed_header` sheds a connection still reading its PROXY
    /// header if there is one, else [`Connections::make_room`]; if neither can, the client is
    /// refused (reason `over-share`: it holds as many connections here as anyone).
    pub fn admit(
        &mut self,
        client: Client,
        now: Instant,
        env: &mut Env<'_>,
        others: usize,
        draining: bool,
        shed_header: impl FnOnce(&mut Env<'_>) -> bool,
    ) {
        let Client { stream, listener: index, peer, proxy } = client;
        let fd = stream.as_raw_fd();
        let room = env.room(self.held() + others);
        let entry = &env.listeners[index];
        let key = entry.client_key(&peer);
        let (limits, ledger) = (env.limits, &mut env.ledger);
        let verdict = admission::admit(&entry.policy, peer.ip(), room, |rules| {
            limits.admit_with(ledger, key, rules, monotonic_ns())
        });
        let ticket = match verdict {
            Verdict::Admit { ticket, shed } => {
                if shed && !shed_header(env) && !self.make_room(Some(&key), now, env) {
                    env.release(ticket, peer);
                    return env.refuse(fd, index, peer, CloseReason::OverShare);
                }
                ticket
            }
            Verdict::Refuse { reason, error } => {
                if let Some(error) = error
                    && let Some(held_back) = env.books.refusal_log.allow(now)
                {
                    log::error!(
                        "refused {peer} on {}: {error} ({held_back} refusals not logged)",
                        env.listeners[index].policy.name
                    );
                }
                return env.refuse(fd, index, peer, reason);
            }
        };
        let entry = &env.listeners[index];
        // Said before the service starts, so it comes before anything the service says
        // (never on a TLS listener: `check` refuses a banner there).
        let banner = entry.policy.banners.admitted.as_ref();
        let greeted = banner.map_or(0, |banner| super::env::send_banner(fd, &banner.bytes));
        let session = match &entry.tls {
            // TLS: the layer makes the service's session once the handshake completes.
            Some(acceptor) => match acceptor.session(peer, entry.bound) {
                Ok(session) => session,
                Err(error) => {
                    log::error!("connection from {peer}: cannot start TLS: {error}");
                    env.release(ticket, peer);
                    return env.refuse(fd, index, peer, CloseReason::Error);
                }
            },
            None => {
                let info = ConnInfo {
                    listener: &entry.policy.name,
                    peer,
                    socket: stream.as_fd(),
                    bound: entry.bound,
                    tls: None,
                };
                entry.policy.service.service.session(&info)
            }
        };
        let interest = session.interest();
        let shed_when_full = entry.policy.admission.shed_when_full;
        let share = if shed_when_full { Share::Unseated } else { Share::Uncounted };
        let conn = Conn {
            stream,
            listener: index,
            peer,
            proxy,
            session,
            state: ConnState::new(Phase::admitted(draining), ConnKind::Short, now),
            opened: now,
            totals: Progress { bytes_out: greeted as u64, ..Progress::default() },
            ticket,
            // What the poller has: a header was read through it, else nothing yet.
            interest: if proxy.is_some() { Interest::READ } else { Interest::NONE },
            extras: Vec::new(),
            share,
            told_drain: false,
        };
        let serial = match self.table.insert(fd as usize, conn) {
            Ok(serial) => serial,
            Err(conn) => {
                // Cannot happen: a descriptor just accepted is in no entry.
                log::error!("connection from {peer}: descriptor {fd} is in use already");
                return env.release(conn.ticket, peer);
            }
        };
        if shed_when_full {
            let table = &self.table;
            let candidate = |fd: usize, serial: u64| {
                table
                    .live(fd, serial)
                    .is_some_and(|c| c.state.kind == ConnKind::Short && c.totals.exchanges == 0)
            };
            self.shed.push(fd as usize, serial, self.table.len(), candidate);
            self.seat(fd as usize, Some(key), env);
        }
        schedule(&mut self.table, fd as usize, env);
        env.books.counters.accepted();
        env.listeners[index].tally.accepted();
        if interest.write {
            // The server speaks first: a new socket is writable, so write now rather than
            // after one more turn of the loop (the dispatch registers what is wanted next).
            self.dispatch(fd as usize, Callback::Writable, now, env, others);
        } else {
            update_interest(&mut self.table, fd as usize, &mut *env.poller);
        }
    }

    /// A readiness event on a connection's socket; false when `fd` is not one. `others`:
    /// descriptors the other tables hold (for the budget of the session's extra ones).
    #[inline]
    pub fn on_event(
        &mut self,
        event: Event,
        now: Instant,
        env: &mut Env<'_>,
        others: usize,
    ) -> bool {
        let fd = event.fd as usize;
        let Some(conn) = self.table.get(fd) else { return false };
        if conn.share == Share::Unseated {
            // Adopted from a retiring worker, or offered and kept: counted from its next event.
            self.seat(fd, None, env);
        }
        let Some(conn) = self.table.get(fd) else { return false };
        match conn.state.phase {
            Phase::Offered { .. } => {} // not ours to touch until the answer
            Phase::Lingering { reason, .. } => {
                if discard_input(&conn.stream) {
                    self.finish(fd, reason, now, env);
                }
            }
            _ => {
                let callback = if event.readable { Callback::Readable } else { Callback::Writable };
                self.dispatch(fd, callback, now, env, others);
            }
        }
        true
    }

    /// A readiness event on an extra descriptor a session watches; false when `fd` is not
    /// one. Nothing for a session whose conversation is over (lingering).
    pub fn on_extra(
        &mut self,
        event: Event,
        now: Instant,
        env: &mut Env<'_>,
        others: usize,
    ) -> bool {
        let Some((owner, serial)) = self.extras.owner(event.fd) else { return false };
        let live = self.table.live(owner, serial).is_some_and(|conn| {
            !matches!(conn.state.phase, Phase::Lingering { .. } | Phase::Offered { .. })
        });
        if live {
            let ready = Ready { readable: event.readable, writable: event.writable };
            self.dispatch(owner, Callback::Extra(event.fd, ready), now, env, others);
        }
        true
    }

    /// The hand-off channel is ready (see [`Link::on_channel`]).
    pub fn on_channel(&mut self, event: Event, now: Instant, env: &mut Env<'_>, others: usize) {
        self.link.on_channel(&mut self.table, &mut self.extras, event, now, env, others);
    }

    /// Runs one session callback for the connection on descriptor `fd`, then carries out
    /// what follows it ([`ConnState::after_callback`]).
    fn dispatch(
        &mut self,
        fd: usize,
        callback: Callback,
        now: Instant,
        env: &mut Env<'_>,
        others: usize,
    ) {
        let room = env.room(self.held() + others);
        let Connections { table, extras, .. } = self;
        let Some((serial, conn)) = table.entry_mut(fd) else { return };
        let watch = extras.lend(&mut *env.poller, &mut conn.extras, room, (fd, serial));
        // SAFETY: the descriptor is `conn.stream`'s, which stays open for the whole call: the
        // context (and so this borrow) is dropped before the connection can be finished.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(conn.stream.as_raw_fd()) };
        let mut cx = Context::with_extras(&mut conn.stream, socket, now, watch)
            .with_scoreboard(env.scoreboard);
        let result = match callback {
            Callback::Readable => conn.session.on_readable(&mut cx),
            Callback::Writable => conn.session.on_writable(&mut cx),
            Callback::Extra(extra, ready) => conn.session.on_extra(extra, ready, &mut cx),
            Callback::Timer => conn.session.on_timer(&mut cx),
            Callback::Drain => conn.session.on_drain(&mut cx),
        };
        let (close, timer, shutdown_write) = (cx.close, cx.timer, cx.shutdown_write);
        if cx.uncount {
            env.release(conn.ticket.take(), conn.peer);
        }
        let progress = match result {
            Ok(progress) => progress,
            Err(error) => {
                log::debug!("connection from {} failed: {error}", conn.peer);
                return self.finish(fd, CloseReason::Error, now, env);
            }
        };
        conn.record(progress, now);
        if let Some(timer) = timer {
            conn.state.timer = timer;
        }
        env.books.counters.moved(progress.bytes_in, progress.bytes_out);
        env.listeners[conn.listener].tally.moved(progress);
        if shutdown_write && let Err(error) = conn.stream.shutdown(std::net::Shutdown::Write) {
            log::debug!("connection from {}: shutdown(SHUT_WR) failed: {error}", conn.peer);
        }
        let mut next = conn.state.after_callback(close, progress.exchanges, &*conn.session);
        // At rest now, a draining connection's quiet deadline may be sooner than anything
        // scheduled; a new session timer may be too.
        let reschedule = matches!(conn.state.phase, Phase::Draining(_)) || timer.is_some();
        if next == Next::Serve && !reschedule {
            // The common case, on the connection at hand.
            return conn.update_interest(fd, &mut *env.poller);
        }
        if next == Next::Promote {
            self.promote(fd, env);
            let Some(conn) = self.table.get(fd) else { return };
            next = conn.state.after_callback(None, progress.exchanges, &*conn.session);
        }
        if reschedule {
            schedule(&mut self.table, fd, env);
        }
        match next {
            Next::Close(reason, Ending::Graceful) => self.linger(fd, reason, now, env),
            Next::Close(reason, Ending::Reset) => self.reset(fd, reason, now, env),
            Next::Finish => self.finish(fd, CloseReason::ClientClose, now, env),
            Next::CloseAtRest(reason) => {
                if self.table.get(fd).is_some_and(|conn| !unread_input(&conn.stream)) {
                    self.linger(fd, reason, now, env);
                } else {
                    update_interest(&mut self.table, fd, &mut *env.poller);
                }
            }
            Next::Offer => {
                if !self.offer(fd, now, env) {
                    update_interest(&mut self.table, fd, &mut *env.poller);
                }
            }
            Next::Serve | Next::Promote => update_interest(&mut self.table, fd, &mut *env.poller),
        }
    }

    /// The first exchange completed: keep the connection alive if the client's long quota
    /// allows, else close it once the exchange is fully answered.
    fn promote(&mut self, fd: usize, env: &mut Env<'_>) {
        let Some(conn) = self.table.get_mut(fd) else { return };
        let promotion = match &conn.ticket {
            None => Promotion::Long,
            Some(ticket) => {
                let max = env.listeners[conn.listener].policy.max_long_connections_per_client;
                match env.limits.promote(ticket, max) {
                    Ok(true) => Promotion::Long,
                    Ok(false) => Promotion::Refused,
                    Err(error) => {
                        log::error!("connection from {}: {error}", conn.peer);
                        Promotion::Failed
                    }
                }
            }
        };
        conn.state.promoted(promotion);
        if promotion == Promotion::Long {
            // A long timeout shorter than the short one moves the deadline earlier.
            schedule(&mut self.table, fd, env);
        }
    }

    /// Handles every connection deadline due at `now`: idle timeouts, drain quiet periods,
    /// lingering closes, hand-off retries, session timers.
    pub fn expire(&mut self, now: Instant, env: &mut Env<'_>, others: usize) {
        while let Some(fd) = self.table.pop_due(now) {
            let Some(conn) = self.table.get_mut(fd) else { continue };
            let timeouts = env.listeners[conn.listener].timeouts();
            let idle_timeouts = conn.session.idle_timeouts();
            // The peek only when its answer matters: draining, the session at rest.
            let at_rest = conn.state.phase.waits_for_quiet()
                && conn.session.is_at_rest()
                && !unread_input(&conn.stream);
            match conn.state.expire(now, timeouts, idle_timeouts, at_rest) {
                Expiry::Later(Some(at)) => self.table.schedule(fd, at),
                Expiry::Later(None) => {}
                Expiry::Offer => {
                    // Offered again now if it can move, else after a callback (`dispatch`).
                    if !self.offer(fd, now, env) {
                        schedule(&mut self.table, fd, env);
                    }
                }
                Expiry::Timer => {
                    self.dispatch(fd, Callback::Timer, now, env, others);
                    schedule(&mut self.table, fd, env);
                }
                Expiry::Finish(reason) => self.finish(fd, reason, now, env),
                Expiry::Linger(reason) => self.linger(fd, reason, now, env),
                Expiry::Idle(reason) => {
                    log::debug!("closing idle connection from {} ({reason})", conn.peer);
                    self.finish(fd, reason, now, env);
                }
            }
        }
    }

    /// The worker began to drain for `why` (or, retiring, was told to stop): every open
    /// connection drains; those that can move now are offered to the serving generation at
    /// once, the others when they can, or are kept ([`Drain::kept`]: served on when
    /// retiring, closed at rest and quiet when stopping, the quiet ones on the next turn of
    /// the loop).
    pub fn drain(&mut self, why: Drain, now: Instant, env: &mut Env<'_>) {
        self.link.drain(why);
        for fd in self.table.fds() {
            let Some(conn) = self.table.get_mut(fd) else { continue };
            // Open ones too that a retiring worker kept, when it stops: offered once more.
            let moves_in_flight = matches!(conn.session.movable(), Movable::Now | Movable::Later);
            conn.state.phase.drain(moves_in_flight);
            if !self.offer(fd, now, env) {
                schedule(&mut self.table, fd, env);
            }
        }
    }

    /// Why the worker drains, if it does.
    pub fn draining(&self) -> Option<Drain> {
        self.link.draining()
    }

    /// Gives the drain notice (`Session::on_drain`) to the sessions of the connections the
    /// worker kept since the last call rather than handing them off, each once in its life:
    /// they may say goodbye in their protocol, or close. `others`: as for
    /// [`Connections::on_event`].
    pub fn tell_kept(&mut self, now: Instant, env: &mut Env<'_>, others: usize) {
        for (fd, serial) in self.link.take_kept() {
            let Some(conn) = self.table.live_mut(fd, serial) else { continue };
            let live = !matches!(conn.state.phase, Phase::Lingering { .. } | Phase::Offered { .. });
            if conn.told_drain || !live {
                continue;
            }
            conn.told_drain = true;
            self.dispatch(fd, Callback::Drain, now, env, others);
        }
    }

    /// The children the sessions run (exec's programs), oldest connection first, for the
    /// scoreboard: pid, listener id, accept time as Unix milliseconds (from `now`).
    pub fn children(&self, listeners: &Listeners, now: Instant) -> Vec<Child> {
        let now_unix = unix_ms();
        let mut children: Vec<(Instant, Child)> = self
            .table
            .fds()
            .into_iter()
            .filter_map(|fd| self.table.get(fd))
            .filter_map(|conn| {
                let pid = conn.session.process()?;
                let age = now.saturating_duration_since(conn.opened).as_millis() as u64;
                let started_unix_ms = now_unix.saturating_sub(age);
                let listener = listeners[conn.listener].id;
                Some((conn.opened, Child { pid, listener, started_unix_ms }))
            })
            .collect();
        children.sort_by_key(|(opened, _)| *opened);
        children.into_iter().map(|(_, child)| child).collect()
    }

    /// Closes every connection (fast stop): lingering ones for their reason, the others as
    /// `shutdown`.
    pub fn close_all(&mut self, now: Instant, env: &mut Env<'_>) {
        for fd in self.table.fds() {
            let reason = match self.table.get(fd).map(|conn| conn.state.phase) {
                Some(Phase::Lingering { reason, .. }) => reason,
                Some(_) => CloseReason::Shutdown,
                None => continue,
            };
            self.finish(fd, reason, now, env);
        }
    }

    /// Starts a lingering close: sends FIN after everything written, then reads and discards
    /// until the client's FIN or `LINGER_TIMEOUT`; or closes at once when the client's FIN
    /// is already there with nothing unread before it.
    fn linger(&mut self, fd: usize, reason: CloseReason, now: Instant, env: &mut Env<'_>) {
        let Some(conn) = self.table.get_mut(fd) else { return };
        // The conversation is over: the session's own descriptors are no longer watched (a
        // readable backend would otherwise wake the loop for nothing until the close).
        self.extras.unwatch_all(&mut *env.poller, &mut conn.extras);
        // Input first: a client that already ended its side and left nothing unread gets a
        // plain close, which is as graceful (no unread data, so no RST: RFC 2525 2.17) and
        // saves the shutdown. Otherwise FIN now and wait for the client's; readiness is
        // level-triggered, so input that arrives meanwhile is not missed.
        // The session's last words first (TLS: close_notify), best effort.
        conn.session.closing(&mut conn.stream);
        if discard_input(&conn.stream) || conn.stream.shutdown(std::net::Shutdown::Write).is_err() {
            return self.finish(fd, reason, now, env);
        }
        conn.state.linger(reason, now);
        if conn.interest != Interest::READ {
            conn.interest = Interest::READ;
            let _ = env.poller.set(fd as RawFd, Interest::READ);
        }
        schedule(&mut self.table, fd, env);
    }

    /// Closes the connection abortively: `SO_LINGER` 0, so the close sends RST (tcp(7)).
    fn reset(&mut self, fd: usize, reason: CloseReason, now: Instant, env: &mut Env<'_>) {
        if let Some(conn) = self.table.get(fd) {
            // Best effort: if it fails, the close below sends FIN instead.
            let _ = socket2::SockRef::from(&conn.stream).set_linger(Some(Duration::ZERO));
        }
        self.finish(fd, reason, now, env);
    }

    /// Closes the connection now: releases its per-client count and writes the access line.
    fn finish(&mut self, fd: usize, reason: CloseReason, now: Instant, env: &mut Env<'_>) {
        self.unseat(fd);
        let Some(mut conn) = self.table.remove(fd) else { return };
        if shed_lingering(&conn.state.phase) {
            self.lingering_sheds -= 1;
        }
        // Unwatch before the descriptors are closed (the poller's contract): the session's
        // extra ones close when it is dropped, below.
        let _ = env.poller.set(fd as RawFd, Interest::NONE);
        self.extras.unwatch_all(&mut *env.poller, &mut conn.extras);
        env.listeners[conn.listener].tally.finished();
        env.release(conn.ticket.take(), conn.peer);
        let mut fields = String::new();
        if env.books.access_log {
            conn.session.describe(&mut fields);
        }
        env.closed(Closed {
            listener: conn.listener,
            peer: conn.peer,
            proxy: conn.proxy,
            duration: now.saturating_duration_since(conn.opened),
            totals: conn.totals,
            reason,
            fields: &fields,
        });
        drop(conn.stream);
    }
}

/// Whether a connection may be shed now (see [`admission::sheddable`]).
fn sheddable(conn: &Conn) -> bool {
    admission::sheddable(&conn.state, conn.totals.exchanges, conn.session.idle_timeouts())
}

/// Whether `phase` is the lingering close of a connection shed by fair share.
fn shed_lingering(phase: &Phase) -> bool {
    matches!(phase, Phase::Lingering { reason: CloseReason::OverShare, .. })
}

/// Puts the deadline of the connection on `fd` in the timer heap, unless an entry at least
/// as early is there already. Called whenever a deadline may have moved *earlier* (accept,
/// keep-alive, drain, lingering close, a session timer); later moves need nothing. Without
/// the peek: a session at rest is taken as at rest (an early wake-up at worst).
pub(super) fn schedule(table: &mut Table<Conn>, fd: usize, env: &Env<'_>) {
    let Some(conn) = table.get(fd) else { return };
    let timeouts = env.listeners[conn.listener].timeouts();
    let at_rest = conn.state.phase.waits_for_quiet() && conn.session.is_at_rest();
    if let Some(deadline) = conn.state.deadline(timeouts, conn.session.idle_timeouts(), at_rest) {
        table.schedule(fd, deadline);
    }
}

/// Registers what the session of the connection on `fd` now wants its socket watched for,
/// if that changed.
pub(super) fn update_interest(table: &mut Table<Conn>, fd: usize, poller: &mut dyn Poller) {
    if let Some(conn) = table.get_mut(fd) {
        conn.update_interest(fd, poller);
    }
}
