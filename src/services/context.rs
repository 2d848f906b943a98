//! [`Context`]: what a session may ask of the worker loop during a callback.
//!
//! Runs in workers. The context borrows the client socket and, in the daemon, the loop's
//! registration table for the session's extra descriptors; it records a close request and a
//! timer change, which the loop applies after the callback returns.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Instant;

use super::{CloseReason, Interest, Transport};
use crate::poller::Poller;
use crate::scoreboard::Scoreboard;

/// What a session may ask of the worker loop during a callback: its client socket, extra
/// descriptors to watch, a timer, and the end of the conversation.
pub struct Context<'a> {
    io: &'a mut dyn Transport,
    socket: Option<BorrowedFd<'a>>,
    now: Instant,
    extras: Option<Extras<'a>>,
    scoreboard: Option<&'a Scoreboard>,
    pub(crate) close: Option<(CloseReason, Ending)>,
    pub(crate) timer: Option<Option<Instant>>,
    pub(crate) shutdown_write: bool,
    pub(crate) uncount: bool,
}

/// How the loop ends a connection a session closed ([`Context::close`], [`Context::reset`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// FIN after everything written, then a lingering close.
    Graceful,
    /// RST at once (`SO_LINGER` 0): whatever is unsent is dropped.
    Reset,
}

/// What a session asked of the loop during one callback made through
/// [`Context::layered`]: the layer below it carries these out (TLS sends `close_notify`
/// first).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Requests {
    /// [`Context::close`] or [`Context::reset`].
    pub close: Option<(CloseReason, Ending)>,
    /// [`Context::set_timer`].
    pub timer: Option<Option<Instant>>,
    /// [`Context::shutdown_write`].
    pub shutdown_write: bool,
    /// [`Context::uncount`].
    pub uncount: bool,
}

/// The loop's side of [`Context::watch`]: the poller, who owns which descriptor, and the
/// worker's descriptor budget.
pub(crate) struct Extras<'a> {
    pub poller: &'a mut dyn Poller,
    /// Owner of each extra descriptor, by descriptor number: (client fd, connection serial).
    pub owners: &'a mut Vec<Option<(usize, u64)>>,
    /// The descriptors this session watches, with what for.
    pub watched: &'a mut Vec<(RawFd, Interest)>,
    /// Extra descriptors watched by all sessions of the worker.
    pub in_use: &'a mut usize,
    /// How many more descriptors the worker's budget allows.
    pub room: usize,
    /// This session's connection: (client fd, serial).
    pub owner: (usize, u64),
}

impl<'a> Context<'a> {
    /// A context over `io` alone, at time `now`: for unit tests of a session, and for running
    /// a session outside the daemon. [`Context::watch`] then fails with `Unsupported`.
    pub fn new(io: &'a mut dyn Transport, now: Instant) -> Self {
        Context {
            io,
            socket: None,
            now,
            extras: None,
            scoreboard: None,
            close: None,
            timer: None,
            shutdown_write: false,
            uncount: false,
        }
    }

    pub(crate) fn with_extras(
        io: &'a mut dyn Transport,
        socket: BorrowedFd<'a>,
        now: Instant,
        extras: Extras<'a>,
    ) -> Self {
        Context {
            io,
            socket: Some(socket),
            now,
            extras: Some(extras),
            scoreboard: None,
            close: None,
            timer: None,
            shutdown_write: false,
            uncount: false,
        }
    }

    /// Runs `call` with the context of a session layered above this one (TLS): the same
    /// time, scoreboard and extra descriptors, but `io` as its byte stream and no socket
    /// (the layer owns the socket; the session must not bypass it). Returns what `call`
    /// returned and what the session asked of the loop, for the layer to carry out.
    pub(crate) fn layered<R>(
        &mut self,
        io: &mut dyn Transport,
        call: impl FnOnce(&mut Context<'_>) -> R,
    ) -> (R, Requests) {
        let extras = self.extras.as_mut().map(|e| Extras {
            poller: &mut *e.poller,
            owners: &mut *e.owners,
            watched: &mut *e.watched,
            in_use: &mut *e.in_use,
            room: e.room,
            owner: e.owner,
        });
        let mut inner = Context {
            io,
            socket: None,
            now: self.now,
            extras,
            scoreboard: self.scoreboard,
            close: None,
            timer: None,
            shutdown_write: false,
            uncount: false,
        };
        let result = call(&mut inner);
        let requests = Requests {
            close: inner.close,
            timer: inner.timer,
            shutdown_write: inner.shutdown_write,
            uncount: inner.uncount,
        };
        let room = inner.extras.as_ref().map(|e| e.room);
        if let (Some(extras), Some(room)) = (self.extras.as_mut(), room) {
            extras.room = room;
        }
        (result, requests)
    }

    /// Gives the session read access to `board` ([`Context::scoreboard`]); the worker loop
    /// passes its scoreboard, a test may pass one of its own.
    pub fn with_scoreboard(mut self, board: &'a Scoreboard) -> Self {
        self.scoreboard = Some(board);
        self
    }

    /// The daemon's scoreboard (the master's and every worker's published state), for a
    /// service that reports on the daemon itself, such as `metrics`. Read it, never write
    /// it: the slots belong to the master and the workers. `None` outside the daemon unless
    /// given with [`Context::with_scoreboard`].
    pub fn scoreboard(&self) -> Option<&'a Scoreboard> {
        self.scoreboard
    }

    /// The client's socket as a descriptor (in the daemon; `None` in a [`Context::new`]), for
    /// what `io()` cannot do: socket options, file status flags. The loop owns it: do not
    /// close it, and end or half-close the connection through [`Context::close`],
    /// [`Context::reset`] and [`Context::shutdown_write`].
    pub fn socket(&self) -> Option<BorrowedFd<'_>> {
        self.socket
    }

    /// The client's socket (non-blocking): read and write until `WouldBlock`.
    pub fn io(&mut self) -> &mut dyn Transport {
        &mut *self.io
    }

    /// The time the loop woke up for this event (monotonic).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Ends the conversation from the server's side once this callback returns, with
    /// `reason` in the access log. The loop sends FIN after what was already written to the
    /// socket, then reads and discards the client's late input until its FIN or 5 s
    /// (a lingering close), so the client gets every byte written before the close. Bytes
    /// still in the session's own buffers are not sent: close once they are written.
    pub fn close(&mut self, reason: CloseReason) {
        self.close = Some((reason, Ending::Graceful));
    }

    /// Ends the conversation abortively once this callback returns: the loop sets
    /// `SO_LINGER` to 0 and closes the client socket, so the client gets an RST (not a FIN)
    /// and unsent bytes are dropped (tcp(7)). For a relay whose backend reset its connection,
    /// so the client learns of the failure as it would have from the backend itself.
    /// `reason` goes to the access log. Replaces an earlier [`Context::close`] in the same
    /// callback, and is replaced by a later one.
    pub fn reset(&mut self, reason: CloseReason) {
        self.close = Some((reason, Ending::Reset));
    }

    /// Sends FIN to the client once this callback returns (shutdown(2) with `SHUT_WR`),
    /// after every byte already written, while the client may still send: a half-close, as a
    /// relay passes on its backend's FIN. Writing to the client afterwards fails with
    /// `EPIPE`. Reading goes on; the connection ends as usual ([`super::Session::is_done`],
    /// [`Context::close`], idle timeouts).
    pub fn shutdown_write(&mut self) {
        self.shutdown_write = true;
    }

    /// Stops counting the connection against the listener's limits once this callback
    /// returns: its per-client count and its place under the listener's `max_connections`
    /// (and [`super::Service::max_connections`]) are released, while the connection itself
    /// goes on (a lingering close). For a session whose service is over before the socket
    /// is, as exec's when its child exits: xinetd counts running servers, not sockets.
    pub fn uncount(&mut self) {
        self.uncount = true;
    }

    /// Calls [`super::Session::on_timer`] once `at` has passed; `None` cancels. One timer
    /// per session: setting it again replaces it. The connection's idle timeouts still apply.
    pub fn set_timer(&mut self, at: Option<Instant>) {
        self.timer = Some(at);
    }

    /// Watches a descriptor the session owns (a backend socket, a child's pipe) for
    /// `interest`, replacing what was registered; [`super::Session::on_extra`] is called when
    /// it is ready. Each watched descriptor counts against the worker's
    /// `max_connections_per_worker` until [`Context::unwatch`] or the end of the connection.
    /// The session must keep the descriptor open while it is watched, and unwatch it before
    /// closing it earlier than the connection (the loop unwatches the rest when the
    /// connection ends, before the session is dropped).
    ///
    /// # Errors
    /// `Unsupported` outside the daemon; otherwise when the worker's descriptor budget is
    /// spent, or the backend cannot watch the descriptor (with select(2): one at or above
    /// `FD_SETSIZE`). The session should then end the connection with a reason of its own.
    pub fn watch(&mut self, fd: BorrowedFd<'_>, interest: Interest) -> io::Result<()> {
        let Some(extras) = self.extras.as_mut() else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "no poller outside the daemon"));
        };
        let raw = fd.as_raw_fd();
        let index = usize::try_from(raw).map_err(|_| io::Error::other("negative descriptor"))?;
        let known = extras.watched.iter().position(|&(w, _)| w == raw);
        let new = known.is_none();
        if new && extras.room == 0 {
            return Err(io::Error::other(
                "the worker's descriptor budget (max_connections_per_worker) is spent",
            ));
        }
        if new && extras.owners.get(index).is_some_and(Option::is_some) {
            return Err(io::Error::other(format!("descriptor {raw} is watched already")));
        }
        extras.poller.set(raw, interest)?;
        match known {
            Some(position) => extras.watched[position].1 = interest,
            None => {
                if extras.owners.len() <= index {
                    extras.owners.resize(index + 1, None);
                }
                extras.owners[index] = Some(extras.owner);
                extras.watched.push((raw, interest));
                *extras.in_use += 1;
                extras.room -= 1;
            }
        }
        Ok(())
    }

    /// Stops watching a descriptor registered with [`Context::watch`] (before the session
    /// closes it). Unknown descriptors are ignored.
    pub fn unwatch(&mut self, fd: BorrowedFd<'_>) {
        if let Some(extras) = self.extras.as_mut()
            && unwatch(extras.poller, extras.owners, extras.watched, extras.in_use, fd.as_raw_fd())
        {
            extras.room += 1;
        }
    }
}

/// Forgets extra descriptor `raw` of a session: poller, owner table, the session's list and
/// the worker's count. False (and nothing done) when the session does not watch it.
pub(crate) fn unwatch(
    poller: &mut dyn Poller,
    owners: &mut [Option<(usize, u64)>],
    watched: &mut Vec<(RawFd, Interest)>,
    in_use: &mut usize,
    raw: RawFd,
) -> bool {
    let Some(position) = watched.iter().position(|&(w, _)| w == raw) else { return false };
    watched.swap_remove(position);
    let _ = poller.set(raw, Interest::NONE);
    if let Some(owner) = usize::try_from(raw).ok().and_then(|i| owners.get_mut(i)) {
        *owner = None;
    }
    *in_use -= 1;
    true
}
