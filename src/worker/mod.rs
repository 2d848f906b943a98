//! The worker process: one `select(2)` readiness loop over the shared listeners, its client
//! connections and its signal pipe.
//!
//! Runs only in a forked worker; [`run`] never returns into the master's code (the caller
//! exits with its result). Invariants:
//! - every socket is non-blocking; accept, read and write go until `WouldBlock`;
//! - the wait timeout is the earliest idle deadline (or accept pause), so a worker at rest
//!   sleeps in `select(2)` without waking;
//! - a connection's error closes that connection only;
//! - no descriptor >= `FD_SETSIZE` is ever watched: such a connection is closed at accept;
//! - out of descriptors (`EMFILE`/`ENFILE`), accepting pauses for [`ACCEPT_PAUSE`] instead of
//!   spinning, and the error is logged at a bounded rate.
//!
//! Signals: TERM/INT stop fast (close everything, exit), QUIT stops gracefully: stop
//! accepting, close each connection once no exchange is in flight and the client has been
//! quiet for [`DRAIN_QUIET`], exit when none is left. The worker dies with its master
//! (`PR_SET_PDEATHSIG`).
//!
//! Closes the worker starts while the client may still be sending (keep-alive refused,
//! graceful stop) are *lingering closes*, as nginx does: FIN first, then the client's late
//! input is read and discarded until its FIN or [`LINGER_TIMEOUT`]. A plain close with unread
//! input would make the kernel send RST, and the client could lose answers already sent.
//!
//! UDP listeners take a small path of their own (`datagram.rs`): datagrams are received until
//! `WouldBlock` (at most a batch per turn), each one checked against the client's datagram
//! rate and handed to the service; a service's [`services::Flow`] (a TFTP transfer) is
//! watched on its own socket with its own deadline, and counts as a connection.

pub mod conn;
mod datagram;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};

use crate::config::Config;
use crate::config::ListenerTransport;
use crate::exit::{WORKER_BOOT_FAILURE, WORKER_EXIT_OK, WORKER_RUNTIME_FAILURE};
use crate::limits::rate::Rates;
use crate::limits::{Admission, ClientKey, Limits, SlotLedger};
use crate::listener::Listener;
use crate::logging::{self, ACCESS_TARGET, RateLimit};
use crate::poller::{self, Event, Interest, Poller};
use crate::privileges::Credentials;
use crate::scoreboard::{Scoreboard, SlotState, WorkerScore};
use crate::services::{self, ConnInfo, Context, Extras, Progress, Ready};
use crate::signals::{self, MASTER_SIGNALS, Signals};
use conn::{CloseReason, Conn, ConnKind, idle_deadline, idle_reason};

/// Signals a worker handles: TERM and INT stop fast, QUIT stops gracefully, USR1 reopens
/// the log file.
pub const WORKER_SIGNALS: &[Signal] =
    &[Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT, Signal::SIGUSR1];

/// How long accepting pauses after `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM`.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// During a graceful stop, a connection with no exchange in flight is closed once the client
/// has sent nothing for this long (at once if it was already quiet that long). Closing at the
/// first instant of rest would cut a client that is still streaming (its next bytes are in
/// flight while the window reopens); a keep-alive client that pauses between exchanges is
/// closed in its first pause this long.
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// Longest a lingering close waits for the client's FIN.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections accepted per readiness event at most, so one worker does not take a whole
/// burst while the others sleep.
const ACCEPT_BATCH: usize = 32;

/// Least interval between two log lines about refusals or accept errors.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// What a worker is given by the master at fork.
pub struct WorkerContext<'a> {
    /// Slot in the master's table (also its per-client records).
    pub slot: usize,
    /// Configuration generation.
    pub generation: u64,
    /// The validated configuration.
    pub config: Config,
    /// The listening sockets, inherited through fork; the worker closes its copies when it
    /// stops accepting.
    pub listeners: Vec<Listener>,
    /// The shared per-client table.
    pub limits: &'a Limits,
    /// The shared per-client datagram rates (UDP listeners).
    pub rates: &'a Rates,
    /// The shared scoreboard; this worker writes its own slot.
    pub scoreboard: &'a Scoreboard,
    /// The master, to detect being orphaned.
    pub master: Pid,
    /// The user and group to switch to before serving (`None`: keep the master's).
    pub credentials: Option<Credentials>,
    /// How often to beat the heartbeat even when idle (`None`: only on activity).
    pub heartbeat: Option<Duration>,
}

/// Runs a worker until it stops; returns its exit status ([`WORKER_EXIT_OK`], or
/// [`WORKER_BOOT_FAILURE`] if it could not set itself up).
///
/// `master_signals` is the master's signal set, inherited through fork: its actions are
/// removed before the worker installs its own. The master blocked [`MASTER_SIGNALS`] around
/// `fork(2)`; they are unblocked once the worker's actions are in place.
pub fn run(context: WorkerContext<'_>, master_signals: &mut Signals) -> i32 {
    logging::set_worker(context.slot, context.generation);
    master_signals.uninstall();
    let mut worker = match Worker::boot(context) {
        Ok(worker) => worker,
        Err(error) => {
            log::error!("worker failed to boot: {error}");
            return WORKER_BOOT_FAILURE;
        }
    };
    worker.serve()
}

struct Worker<'a> {
    context: WorkerContext<'a>,
    signals: Signals,
    poller: Box<dyn Poller>,
    ledger: SlotLedger,
    /// Connections by descriptor number.
    conns: Vec<Option<Conn>>,
    /// The connection owning each extra descriptor a session watches, by descriptor number:
    /// (client descriptor, connection serial).
    extra_owners: Vec<Option<(usize, u64)>>,
    /// Extra descriptors watched by all sessions; they count against the connection budget.
    extra_fds: usize,
    /// Connection deadlines, earliest first: (deadline, descriptor, connection serial).
    /// Entries go stale when a connection's deadline moves later (activity) or it closes;
    /// they are checked when they come due, so activity costs no heap operation.
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_serial: u64,
    /// Listening sockets found ready in the current turn, with their listener index (kept
    /// to avoid an allocation per turn).
    ready_listeners: Vec<(RawFd, usize)>,
    /// `reuseport`: this worker's own sockets, with their listener index.
    own_listeners: Vec<(crate::listener::ListenSocket, usize)>,
    /// UDP listeners' flows (TFTP transfers) and datagram counters.
    datagrams: datagram::Datagrams,
    open: usize,
    accepting: bool,
    draining: bool,
    accept_paused_until: Option<Instant>,
    refusal_log: RateLimit,
    accept_error_log: RateLimit,
    /// Counters not yet published on the scoreboard (published at most every
    /// [`PUBLISH_INTERVAL`], so the hot path writes no shared memory).
    unpublished: Unpublished,
    last_published: Instant,
}

/// Scoreboard counters gathered since the last [`Worker::publish`].
#[derive(Debug, Default)]
struct Unpublished {
    bytes_in: u64,
    bytes_out: u64,
    accepted: u64,
    /// Anything happened (the open count may have changed too).
    dirty: bool,
}

/// How often a busy worker publishes its heartbeat and counters on the scoreboard.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

impl<'a> Worker<'a> {
    fn boot(context: WorkerContext<'a>) -> io::Result<Self> {
        let signals = Signals::install(WORKER_SIGNALS)?;
        signals::unblock(MASTER_SIGNALS)?;
        // Before dropping privileges: a port below 1024 needs them.
        let mut own_listeners = Vec::new();
        for (index, listener) in context.listeners.iter().enumerate() {
            if listener.config.reuseport {
                own_listeners.push((listener.bind_own().map_err(io::Error::other)?, index));
            }
        }
        if let Some(credentials) = &context.credentials {
            credentials.apply().map_err(|e| {
                io::Error::other(format!("switching to user {}: {e}", credentials.user))
            })?;
        }
        // After the switch: changing credentials clears the parent-death signal.
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
        if getppid() != context.master {
            // The master died before PR_SET_PDEATHSIG was in place.
            return Err(io::Error::other("the master exited while this worker started"));
        }
        let mut poller = poller::create(context.config.daemon.event_backend)?;
        poller.set(signals.raw_fd(), Interest::READ)?;
        let ledger = context.limits.ledger(context.slot);
        let own_count = context.listeners.len();
        let score = context.scoreboard.slot(context.slot);
        score.beat();
        score.set_state(SlotState::Ready);
        log::info!(
            "worker started: {} listener(s), at most {} connections, {}",
            context.listeners.len(),
            context.config.daemon.max_connections_per_worker,
            context.config.daemon.event_backend.name()
        );
        Ok(Worker {
            context,
            signals,
            poller,
            ledger,
            conns: Vec::new(),
            extra_owners: Vec::new(),
            extra_fds: 0,
            timers: BinaryHeap::new(),
            next_serial: 0,
            ready_listeners: Vec::new(),
            own_listeners,
            datagrams: datagram::Datagrams::new(own_count),
            open: 0,
            accepting: false,
            draining: false,
            accept_paused_until: None,
            refusal_log: RateLimit::new(LOG_INTERVAL),
            accept_error_log: RateLimit::new(LOG_INTERVAL),
            unpublished: Unpublished::default(),
            last_published: Instant::now(),
        })
    }

    fn serve(&mut self) -> i32 {
        let mut events = Vec::new();
        loop {
            let now = Instant::now();
            if let Err(error) = self.update_accepting(now) {
                log::error!("cannot watch the listeners: {error}");
                return WORKER_RUNTIME_FAILURE;
            }
            if now.saturating_duration_since(self.last_published) >= PUBLISH_INTERVAL {
                self.publish(now);
            }
            let deadline = self.next_deadline();
            let mut timeout = deadline.map(|d| d.saturating_duration_since(now));
            if let Some(beat) = self.context.heartbeat {
                // Wake up often enough to prove to the master that this loop still turns.
                timeout = Some(timeout.map_or(beat, |t| t.min(beat)));
            }
            if self.unpublished.dirty {
                // Counters from the last burst reach the scoreboard soon after it ends.
                timeout = Some(timeout.map_or(PUBLISH_INTERVAL, |t| t.min(PUBLISH_INTERVAL)));
            }
            if let Err(error) = self.poller.wait(timeout, &mut events) {
                log::error!("waiting for readiness failed: {error}");
                return WORKER_RUNTIME_FAILURE;
            }
            let now = Instant::now();
            self.ready_listeners.clear();
            for event in &events {
                if event.fd == self.signals.raw_fd() {
                    if let Some(status) = self.handle_signals(now) {
                        return status;
                    }
                } else if let Some(index) = self.listener_index(event.fd) {
                    self.ready_listeners.push((event.fd, index));
                } else if self.datagrams.owns(event.fd) {
                    self.on_flow_ready(event.fd, now);
                } else {
                    self.on_ready(*event, now);
                }
            }
            // Accept last, so that no event of this round can refer to a reused descriptor.
            for i in 0..self.ready_listeners.len() {
                if self.accepting {
                    let (fd, index) = self.ready_listeners[i];
                    match self.context.config.listeners[index].transport {
                        ListenerTransport::Tcp => self.accept(fd, index, now),
                        ListenerTransport::Udp => self.receive(fd, index, now),
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.expire(Instant::now());
                self.expire_flows(Instant::now());
            }
            if self.draining && self.open == 0 && self.datagrams.flows() == 0 {
                self.summarize_datagrams(now, true);
                log::info!("graceful stop complete: no connection left");
                return WORKER_EXIT_OK;
            }
        }
    }

    fn score(&self) -> &WorkerScore {
        self.context.scoreboard.slot(self.context.slot)
    }

    /// Heartbeat and counters to the scoreboard.
    fn publish(&mut self, now: Instant) {
        let totals = std::mem::take(&mut self.unpublished);
        let score = self.score();
        score.beat();
        score.bytes_in.fetch_add(totals.bytes_in, Ordering::Relaxed);
        score.bytes_out.fetch_add(totals.bytes_out, Ordering::Relaxed);
        score.accepted.fetch_add(totals.accepted, Ordering::Relaxed);
        score.open.store((self.open + self.datagrams.flows()) as u64, Ordering::Relaxed);
        self.last_published = now;
        self.summarize_datagrams(now, false);
    }

    /// The listener index of a listening descriptor (shared or this worker's own).
    fn listener_index(&self, fd: RawFd) -> Option<usize> {
        self.context.listeners.iter().position(|l| l.as_raw_fd() == fd).or_else(|| {
            self.own_listeners
                .iter()
                .find(|(own, _)| own.as_raw_fd() == fd)
                .map(|(_, index)| *index)
        })
    }

    /// Every listening descriptor this worker accepts from.
    fn listening_fds(&self) -> Vec<RawFd> {
        let shared = self.context.listeners.iter().map(AsRawFd::as_raw_fd);
        shared.chain(self.own_listeners.iter().map(|(own, _)| own.as_raw_fd())).collect()
    }

    /// Watches the listeners while the worker has room and is not pausing; stops otherwise.
    fn update_accepting(&mut self, now: Instant) -> io::Result<()> {
        if self.accept_paused_until.is_some_and(|until| now >= until) {
            self.accept_paused_until = None;
        }
        let want = !self.draining && self.accept_paused_until.is_none() && self.room() > 0;
        if want != self.accepting {
            let interest = if want { Interest::ACCEPT } else { Interest::NONE };
            for fd in self.listening_fds() {
                self.poller.set(fd, interest)?;
            }
            self.accepting = want;
        }
        Ok(())
    }

    /// Descriptors the budget (`max_connections_per_worker`) still allows: for connections
    /// and for what their sessions watch.
    fn room(&self) -> usize {
        let max = self.context.config.daemon.max_connections_per_worker.get();
        max.saturating_sub(self.open + self.extra_fds + self.datagrams.flows())
    }

    /// The earliest timer (possibly stale, which only means an early wake-up) or the end of
    /// an accept pause.
    fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let flow = self.datagrams.next_deadline();
        timer.into_iter().chain(flow).chain(self.accept_paused_until).min()
    }

    /// Puts the connection's current deadline in the timer heap, unless an entry at least as
    /// early is there already. Called whenever a deadline may have moved *earlier* (accept,
    /// keep-alive, drain, lingering close); later moves need nothing.
    fn schedule(&mut self, fd: usize) {
        let Some(conn) = self.conns[fd].as_ref() else { return };
        let Some(deadline) = self.deadline_of(conn) else { return };
        let conn = self.conns[fd].as_mut().expect("checked above");
        if conn.scheduled.is_none_or(|scheduled| deadline < scheduled) {
            conn.scheduled = Some(deadline);
            self.timers.push(Reverse((deadline, fd, conn.serial)));
        }
    }

    fn deadline_of(&self, conn: &Conn) -> Option<Instant> {
        if let Some((_, until)) = conn.lingering {
            return Some(until);
        }
        let policy = &self.context.config.listeners[conn.listener];
        let idle = idle_deadline(
            conn.kind,
            conn.last_activity,
            policy.short_idle_timeout,
            policy.long_idle_timeout,
        );
        [idle, self.drain_deadline(conn), conn.timer].into_iter().flatten().min()
    }

    /// When a draining connection at rest is to be closed; `None` if not draining or an
    /// exchange is in flight (then only its idle timeout applies).
    fn drain_deadline(&self, conn: &Conn) -> Option<Instant> {
        let draining = conn.close_at_rest == Some(CloseReason::Shutdown);
        (draining && at_rest(conn)).then(|| conn.last_activity + DRAIN_QUIET)
    }

    fn handle_signals(&mut self, now: Instant) -> Option<i32> {
        for signal in self.signals.drain() {
            match signal {
                Signal::SIGTERM | Signal::SIGINT => {
                    log::info!("fast stop ({signal}): closing {} connection(s)", self.open);
                    self.close_all(now);
                    self.end_flows(now);
                    self.summarize_datagrams(now, true);
                    return Some(WORKER_EXIT_OK);
                }
                Signal::SIGUSR1 => {
                    if let Err(error) = logging::reopen() {
                        log::error!("{error}");
                    }
                }
                Signal::SIGQUIT if !self.draining => self.start_drain(),
                _ => {}
            }
        }
        None
    }

    fn start_drain(&mut self) {
        // Connections queued on this worker's own sockets would be lost with them: take them
        // in first (they are served, then closed like the others).
        let now = Instant::now();
        for i in 0..self.own_listeners.len() {
            let (fd, index) = (self.own_listeners[i].0.as_raw_fd(), self.own_listeners[i].1);
            match self.context.config.listeners[index].transport {
                ListenerTransport::Tcp => self.accept(fd, index, now),
                ListenerTransport::Udp => self.receive(fd, index, now),
            }
        }
        self.draining = true;
        self.score().set_state(SlotState::Draining);
        for fd in self.listening_fds() {
            let _ = self.poller.set(fd, Interest::NONE);
        }
        self.accepting = false;
        // Close this worker's copies: once every process has, clients are refused at once
        // instead of waiting in a backlog nobody accepts from.
        self.context.listeners.clear();
        self.own_listeners.clear();
        log::info!("graceful stop: no longer accepting; {} connection(s) open", self.open);
        // Each connection closes once at rest and quiet (see `drain_deadline`); those already
        // quiet go on the next turn of the loop.
        for fd in 0..self.conns.len() {
            if let Some(conn) = self.conns[fd].as_mut() {
                if conn.lingering.is_none() {
                    conn.close_at_rest.get_or_insert(CloseReason::Shutdown);
                }
                self.schedule(fd);
            }
        }
    }

    fn close_all(&mut self, now: Instant) {
        for fd in 0..self.conns.len() {
            let reason = match &self.conns[fd] {
                Some(Conn { lingering: Some((reason, _)), .. }) => *reason,
                Some(_) => CloseReason::Shutdown,
                None => continue,
            };
            self.finish(fd, reason, now);
        }
    }

    /// Accepts a batch from listening descriptor `fd`, which serves listener `index`.
    fn accept(&mut self, fd: RawFd, index: usize, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            if self.room() == 0 {
                return;
            }
            let accepted = crate::sys::accept_nonblocking(&fd);
            match accepted {
                Ok((stream, peer)) => self.admit(index, stream, peer, now),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The client gave up between the handshake and accept: not our problem.
                Err(e)
                    if matches!(
                        Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                        Errno::ECONNABORTED | Errno::EPROTO | Errno::EPERM
                    ) => {}
                Err(e) => {
                    self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                    if let Some(held_back) = self.accept_error_log.allow(now) {
                        log::error!(
                            "accept on {} failed: {e}; pausing accept for {ACCEPT_PAUSE:?} ({held_back} similar errors not logged)",
                            self.context.config.listeners[index].name
                        );
                    }
                    return;
                }
            }
        }
    }

    fn admit(&mut self, index: usize, stream: std::net::TcpStream, peer: SocketAddr, now: Instant) {
        let fd = stream.as_raw_fd();
        let policy = &self.context.config.listeners[index];
        if policy.tcp_nodelay {
            // Best effort: an error here (the client already left) shows on the first read.
            let _ = stream.set_nodelay(true);
        }
        if self.poller.set(fd, Interest::READ).is_err() {
            if let Some(held_back) = self.accept_error_log.allow(now) {
                log::warn!(
                    "closing connection from {peer} on {}: descriptor {fd} is over select()'s limit ({held_back} similar not logged)",
                    policy.name
                );
            }
            return self.refuse(fd, index, peer, CloseReason::Error);
        }
        let mut ticket = None;
        if policy.has_client_limits() {
            let key = ClientKey::new(self.context.listeners[index].id.into(), peer.ip());
            let max = policy.max_connections_per_client;
            match self.context.limits.admit(&mut self.ledger, key, max) {
                Ok(Admission::Admitted(t)) => ticket = Some(t),
                Ok(Admission::Refused { open }) => {
                    if let Some(held_back) = self.refusal_log.allow(now) {
                        log::warn!(
                            "refused {} on {}: {open} connections open, max_connections_per_client reached ({held_back} refusals not logged)",
                            peer.ip(),
                            policy.name
                        );
                    }
                    return self.refuse(fd, index, peer, CloseReason::Limit);
                }
                Err(error) => {
                    if let Some(held_back) = self.refusal_log.allow(now) {
                        log::error!(
                            "refused {peer} on {}: {error} ({held_back} refusals not logged)",
                            policy.name
                        );
                    }
                    return self.refuse(fd, index, peer, CloseReason::Error);
                }
            }
        }
        let info =
            ConnInfo { listener: &policy.name, peer, socket: std::os::fd::AsFd::as_fd(&stream) };
        let session = policy.service.service.session(&info);
        let interest = session.interest();
        let slot = fd as usize;
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        self.conns[slot] = Some(Conn {
            stream,
            listener: index,
            peer,
            session,
            kind: ConnKind::Short,
            opened: now,
            last_activity: now,
            totals: Progress::default(),
            ticket,
            close_at_rest: None,
            lingering: None,
            interest: Interest::READ,
            serial: self.next_serial,
            scheduled: None,
            timer: None,
            extras: Vec::new(),
        });
        self.next_serial += 1;
        self.schedule(slot);
        self.open += 1;
        self.unpublished.accepted += 1;
        self.unpublished.dirty = true;
        if interest.write {
            // The server speaks first: a new socket is writable, so write now rather than
            // after one more turn of the loop.
            self.dispatch(slot, Callback::Writable, now);
        } else if interest != Interest::READ {
            self.update_interest(slot);
        }
    }

    /// Turns away a connection just accepted (its socket closes when the caller drops it).
    fn refuse(&mut self, fd: RawFd, index: usize, peer: SocketAddr, reason: CloseReason) {
        let _ = self.poller.set(fd, Interest::NONE);
        let name = &self.context.config.listeners[index].name;
        self.access_line(name, peer, Duration::ZERO, Progress::default(), reason);
    }

    fn on_ready(&mut self, event: Event, now: Instant) {
        let fd = event.fd as usize;
        let ready = Ready { readable: event.readable, writable: event.writable };
        if let Some(conn) = self.conns.get_mut(fd).and_then(Option::as_mut) {
            if let Some((reason, _)) = conn.lingering {
                if discard_input(&mut conn.stream) {
                    self.finish(fd, reason, now);
                }
                return;
            }
            let callback = if event.readable { Callback::Readable } else { Callback::Writable };
            self.dispatch(fd, callback, now);
        } else if let Some(&Some((owner, serial))) = self.extra_owners.get(fd) {
            let live = self
                .conns
                .get(owner)
                .and_then(Option::as_ref)
                .is_some_and(|conn| conn.serial == serial && conn.lingering.is_none());
            if live {
                self.dispatch(owner, Callback::Extra(event.fd, ready), now);
            }
        }
    }

    /// Runs one session callback for the connection on descriptor `fd`, then applies what
    /// the session asked for (close, timer) and the loop's policy (promotion, drain, interest).
    fn dispatch(&mut self, fd: usize, callback: Callback, now: Instant) {
        let room = self.room();
        let Worker { conns, poller, extra_owners, extra_fds, .. } = self;
        let Some(conn) = conns.get_mut(fd).and_then(Option::as_mut) else {
            return;
        };
        let extras = Extras {
            poller: &mut **poller,
            owners: extra_owners,
            watched: &mut conn.extras,
            in_use: extra_fds,
            room,
            owner: (fd, conn.serial),
        };
        let mut cx = Context::with_extras(&mut conn.stream, now, extras);
        let result = match callback {
            Callback::Readable => conn.session.on_readable(&mut cx),
            Callback::Writable => conn.session.on_writable(&mut cx),
            Callback::Extra(extra, ready) => conn.session.on_extra(extra, ready, &mut cx),
            Callback::Timer => conn.session.on_timer(&mut cx),
        };
        let (close, timer) = (cx.close, cx.timer);
        let progress = match result {
            Ok(progress) => progress,
            Err(error) => {
                log::debug!("connection from {} failed: {error}", conn.peer);
                self.finish(fd, CloseReason::Error, now);
                return;
            }
        };
        conn.record(progress, now);
        if let Some(timer) = timer {
            conn.timer = timer;
        }
        self.unpublished.bytes_in += progress.bytes_in;
        self.unpublished.bytes_out += progress.bytes_out;
        self.unpublished.dirty = true;
        if let Some(reason) = close {
            return self.linger(fd, reason, now);
        }
        // A connection already bound to close (keep-alive refused, draining) is not promoted.
        if progress.exchanges > 0 && conn.kind == ConnKind::Short && conn.close_at_rest.is_none() {
            self.promote(fd);
        }
        if self.draining || timer.is_some() {
            // At rest now, the quiet deadline may be sooner than anything scheduled; a new
            // session timer may be too.
            self.schedule(fd);
        }
        let Some(conn) = self.conns[fd].as_mut() else {
            return;
        };
        let at_rest = conn.close_at_rest.is_some() && at_rest(conn);
        if conn.session.is_done() {
            self.finish(fd, CloseReason::ClientClose, now);
        } else if let Some(reason) =
            conn.close_at_rest.filter(|r| at_rest && *r != CloseReason::Shutdown)
        {
            self.linger(fd, reason, now);
        } else {
            self.update_interest(fd);
        }
    }

    /// Registers what the session now wants the client socket watched for, if it changed.
    fn update_interest(&mut self, fd: usize) {
        let Some(conn) = self.conns[fd].as_mut() else { return };
        let wanted = conn.wanted_interest();
        if wanted != conn.interest {
            conn.interest = wanted;
            // Cannot fail: the descriptor was accepted by this poller's check.
            let _ = self.poller.set(fd as RawFd, wanted);
        }
    }

    /// The first exchange completed: keep the connection alive if the client's long quota
    /// allows, else close it once the exchange is fully answered.
    fn promote(&mut self, fd: usize) {
        let Some(conn) = self.conns[fd].as_mut() else {
            return;
        };
        let policy = &self.context.config.listeners[conn.listener];
        let Some(ticket) = &conn.ticket else {
            conn.kind = ConnKind::Long;
            self.schedule(fd);
            return;
        };
        match self.context.limits.promote(ticket, policy.max_long_connections_per_client) {
            Ok(true) => {
                conn.kind = ConnKind::Long;
                // A long timeout shorter than the short one moves the deadline earlier.
                self.schedule(fd);
            }
            Ok(false) => {
                conn.close_at_rest.get_or_insert(CloseReason::LongLimit);
            }
            Err(error) => {
                log::error!("connection from {}: {error}", conn.peer);
                conn.close_at_rest.get_or_insert(CloseReason::Error);
            }
        }
    }

    /// Handles every timer that is due: idle timeouts, drain quiet periods, lingering closes.
    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((at, fd, serial))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(fd).and_then(Option::as_mut) else { continue };
            if conn.serial != serial || conn.scheduled != Some(at) {
                continue; // stale: closed, reused, or superseded by an earlier entry
            }
            conn.scheduled = None;
            let conn = self.conns[fd].as_ref().expect("checked above");
            match self.deadline_of(conn) {
                Some(deadline) if deadline <= now => {}
                // Moved later (activity): due again then.
                _ => {
                    self.schedule(fd);
                    continue;
                }
            }
            if conn.lingering.is_none() && conn.timer.is_some_and(|t| t <= now) {
                // The session's own timer; the idle and drain deadlines are checked again
                // after it (they may be due too).
                self.conns[fd].as_mut().expect("checked above").timer = None;
                self.dispatch(fd, Callback::Timer, now);
                self.schedule(fd);
                continue;
            }
            if let Some((reason, _)) = conn.lingering {
                self.finish(fd, reason, now);
            } else if self.drain_deadline(conn).is_some_and(|quiet| now >= quiet) {
                self.linger(fd, CloseReason::Shutdown, now);
            } else {
                let reason = idle_reason(conn.kind);
                log::debug!("closing idle connection from {} ({reason})", conn.peer);
                self.finish(fd, reason, now);
            }
        }
    }

    /// Starts a lingering close: sends FIN after everything written, then reads and discards
    /// until the client's FIN or [`LINGER_TIMEOUT`].
    fn linger(&mut self, fd: usize, reason: CloseReason, now: Instant) {
        let Some(conn) = self.conns[fd].as_mut() else {
            return;
        };
        // The conversation is over: the session's own descriptors are no longer watched (a
        // readable backend would otherwise wake the loop for nothing until the close).
        let mut extras = std::mem::take(&mut conn.extras);
        self.unwatch_extras(&mut extras);
        let Some(conn) = self.conns[fd].as_mut() else {
            return;
        };
        if conn.stream.shutdown(std::net::Shutdown::Write).is_err()
            || discard_input(&mut conn.stream)
        {
            self.finish(fd, reason, now);
            return;
        }
        conn.lingering = Some((reason, now + LINGER_TIMEOUT));
        if conn.interest != Interest::READ {
            conn.interest = Interest::READ;
            let _ = self.poller.set(fd as RawFd, Interest::READ);
        }
        self.schedule(fd);
    }

    /// Stops watching a session's extra descriptors (before they are closed).
    fn unwatch_extras(&mut self, extras: &mut Vec<RawFd>) {
        while let Some(&extra) = extras.last() {
            let poller = &mut *self.poller;
            services::unwatch(poller, &mut self.extra_owners, extras, &mut self.extra_fds, extra);
        }
    }

    /// Closes the connection now: releases its per-client count and writes the access line.
    fn finish(&mut self, fd: usize, reason: CloseReason, now: Instant) {
        let Some(conn) = self.conns[fd].take() else {
            return;
        };
        // Unwatch before the descriptors are closed (the poller's contract): the session's
        // extra ones close when it is dropped, below.
        let _ = self.poller.set(fd as RawFd, Interest::NONE);
        let mut extras = conn.extras;
        self.unwatch_extras(&mut extras);
        self.open -= 1;
        if let Some(ticket) = conn.ticket
            && let Err(error) = self.context.limits.release(&mut self.ledger, ticket)
        {
            log::error!("could not release the count of {}: {error}", conn.peer);
        }
        let name = &self.context.config.listeners[conn.listener].name;
        self.access_line(
            name,
            conn.peer,
            now.saturating_duration_since(conn.opened),
            conn.totals,
            reason,
        );
        drop(conn.stream);
    }

    fn access_line(
        &self,
        listener: &str,
        peer: SocketAddr,
        duration: Duration,
        totals: Progress,
        reason: CloseReason,
    ) {
        if self.context.config.log.access_log {
            log::info!(
                target: ACCESS_TARGET,
                "access listener={listener} peer={peer} duration={:.3}s in={} out={} exchanges={} reason={reason}",
                duration.as_secs_f64(),
                totals.bytes_in,
                totals.bytes_out,
                totals.exchanges,
            );
        }
    }
}

/// A session callback the loop makes.
#[derive(Debug, Clone, Copy)]
enum Callback {
    Readable,
    Writable,
    Extra(RawFd, Ready),
    Timer,
}

/// Whether a connection can be closed without dropping anything: the session has answered
/// everything it read, and the socket holds no unread input (a peek, which never blocks).
fn at_rest(conn: &Conn) -> bool {
    if !conn.session.is_at_rest() {
        return false;
    }
    let mut byte = [0u8; 1];
    match conn.stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::Interrupted,
    }
}

/// Reads and throws away whatever the client sent; true once the client's FIN (or an error)
/// is seen, i.e. the lingering close may finish.
fn discard_input(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return e.kind() != ErrorKind::WouldBlock,
        }
    }
    false
}
