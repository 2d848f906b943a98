//! The worker process: one `select(2)` readiness loop over the shared listeners, its client
//! connections and its signal pipe.
//!
//! Runs only in a forked worker; [`run`] never returns into the master's code (the caller
//! exits with its result). Invariants:
//! - every socket is non-blocking (an exec child's, which is blocking while the child owns
//!   it, is read afterwards only with `MSG_DONTWAIT`); accept, read and write go until
//!   `WouldBlock`;
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
//! graceful stop) are *lingering closes*, as nginx does: FIN, then the client's late input
//! is read and discarded until its FIN or [`LINGER_TIMEOUT`]. A plain close with unread input
//! would make the kernel send RST, and the client could lose answers already sent; so a
//! plain close is made only once the client's FIN has been read with nothing left unread.
//!
//! UDP listeners take a small path of their own (`datagram.rs`): datagrams are received until
//! `WouldBlock` (at most a batch per turn), each one checked against the client's datagram
//! rate and handed to the service; a service's [`services::Flow`] (a TFTP transfer) is
//! watched on its own socket with its own deadline, and counts as a connection.

pub mod conn;
mod counters;
mod datagram;
mod handoff;
pub mod refusals;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::MsgFlags;
use nix::unistd::{Pid, getppid};

use crate::clock::monotonic_ns;
use crate::config::Config;
use crate::config::ListenerTransport;
use crate::exit::{WORKER_BOOT_FAILURE, WORKER_EXIT_OK, WORKER_RUNTIME_FAILURE};
use crate::limits::DatagramRates;
use crate::limits::{Admission, ClientKey, Limits, SlotLedger, access};
use crate::listener::Listener;
use crate::logging::{self, ACCESS_TARGET};
use crate::poller::{self, Event, Interest, Poller};
use crate::privileges::Credentials;
use crate::proxy_protocol::{self, Parsed};
use crate::rate::RateLimit;
use crate::scoreboard::{REFUSALS, Refusal, Scoreboard, SlotState, WorkerScore};
use crate::services::{self, ConnInfo, Context, Ending, Extras, Progress, Ready};
use crate::signals::{self, MASTER_SIGNALS, Signals};
use conn::{CloseReason, Conn, ConnKind, HandOff, idle_deadline, idle_reason};
use counters::ListenerTallies;
use refusals::Summaries;

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

/// How long a full worker that could shed lets a waiting client be, before it accepts it
/// and sheds: a worker with room takes the client in the meantime, and no connection is shed
/// needlessly.
pub const SHED_GRACE: Duration = Duration::from_millis(50);

/// How long a trusted proxy has to send the whole PROXY protocol header after accept; the
/// connection is closed with reason `proxy-header` then. Proxies send it with the connection,
/// so this is short.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether the worker takes new connections: one state, so that "watching the listeners",
/// "pausing after an accept error" and "stopping" cannot contradict each other.
/// Invariant: the listening descriptors are registered with the poller exactly while
/// [`Intake::Accepting`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intake {
    /// The listeners are watched.
    Accepting,
    /// Not watched: the connection budget is spent (`until` is `None`), or accepting pauses
    /// until `until` after `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM`.
    Held {
        /// End of an accept pause.
        until: Option<Instant>,
    },
    /// Graceful stop: the listeners are closed; connections finish (or are handed off).
    Draining,
}

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
    pub rates: &'a DatagramRates,
    /// The shared scoreboard; this worker writes its own slot.
    pub scoreboard: &'a Scoreboard,
    /// The master, to detect being orphaned.
    pub master: Pid,
    /// The user and group to switch to before serving (`None`: keep the master's).
    pub credentials: Option<Credentials>,
    /// How often to beat the heartbeat even when idle (`None`: only on activity).
    pub heartbeat: Option<Duration>,
    /// The hand-off channel to the master (`None`: connections are never handed off).
    pub channel: Option<crate::handoff::Channel>,
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
    if let Err(error) = default_sigchld() {
        log::error!("worker failed to boot: SIGCHLD: {error}");
        return WORKER_BOOT_FAILURE;
    }
    let mut worker = match Worker::boot(context) {
        Ok(worker) => worker,
        Err(error) => {
            log::error!("worker failed to boot: {error}");
            return WORKER_BOOT_FAILURE;
        }
    };
    worker.serve()
}

/// Sets SIGCHLD back to its default disposition (ignored, but children are not reaped by
/// the kernel: signal(7)). Unregistering the master's action leaves signal-hook's handler in
/// place, so every exit of an exec child would interrupt the worker with a signal that runs
/// no action; the worker waits for its children through pidfds instead. signal-hook is not
/// told: no worker code registers SIGCHLD with it.
///
/// # Errors
/// sigaction(2) failed.
fn default_sigchld() -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: SIG_DFL installs no handler of ours, so no code runs in signal context; SIGCHLD
    // stays blocked until `Worker::boot` unblocks the master's signals.
    unsafe { sigaction(Signal::SIGCHLD, &default) }.map(drop)
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
    /// Stable id of each listener (by index), kept after a graceful stop closes the sockets.
    listener_ids: Vec<u16>,
    /// Whether each listener's accepted sockets already have `TCP_NODELAY` as its
    /// `tcp_nodelay` says (the master sets it on the listening socket; accept copies it), so
    /// no setsockopt(2) per connection. Read once, at start.
    inherits_nodelay: Vec<bool>,
    /// Each listener's [`Listener::specific_addr`], for [`ConnInfo::bound`].
    bound: Vec<Option<SocketAddr>>,
    /// `reuseport`: this worker's own sockets, with their listener index.
    own_listeners: Vec<(crate::listener::ListenSocket, usize)>,
    /// UDP listeners' flows (TFTP transfers) and datagram counters.
    datagrams: datagram::Datagrams,
    open: usize,
    intake: Intake,
    /// The hand-off channel to the master, and what it is watched for.
    channel: Option<crate::handoff::Channel>,
    channel_interest: Interest,
    /// Connections offered for hand-off, by token (their serial): descriptor.
    offered: HashMap<u64, usize>,
    refusal_log: RateLimit,
    accept_error_log: RateLimit,
    /// Refusals logged per client and reason per interval.
    summaries: Summaries,
    /// Connections that may be shed, oldest first: (descriptor, serial). Entries go stale
    /// when the connection closes or completes an exchange; they are dropped when they reach
    /// the front (see [`Worker::can_shed`]).
    shed_queue: VecDeque<(usize, u64)>,
    /// The budget was reached and not yet relieved (to count and log each time it fills).
    full: bool,
    full_log: RateLimit,
    /// Full and a client waits: when this worker accepts it, shedding (see [`SHED_GRACE`]).
    shed_at: Option<Instant>,
    /// Connections from trusted proxies whose PROXY protocol header is being read, by
    /// descriptor; they count against the budget.
    pending: Vec<Option<PendingProxy>>,
    pending_open: usize,
    /// Header deadlines in accept order (all [`PROXY_HEADER_TIMEOUT`] long, so sorted):
    /// (deadline, descriptor, serial).
    pending_deadlines: VecDeque<(Instant, usize, u64)>,
    /// Counters not yet published on the scoreboard (published at most every
    /// [`PUBLISH_INTERVAL`], so the hot path writes no shared memory).
    unpublished: Unpublished,
    /// Per-listener counters not yet published (with `unpublished`).
    listener_tallies: ListenerTallies,
    last_published: Instant,
}

/// Scoreboard counters gathered since the last [`Worker::publish`].
#[derive(Debug, Default)]
struct Unpublished {
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

/// A connection from a trusted proxy, before its PROXY protocol header is complete.
struct PendingProxy {
    stream: std::net::TcpStream,
    listener: usize,
    /// The proxy's address.
    proxy: SocketAddr,
    /// Header bytes consumed so far (at most [`proxy_protocol::MAX_HEADER`]).
    header: Vec<u8>,
    serial: u64,
}

/// How often a busy worker publishes its heartbeat and counters on the scoreboard.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

impl<'a> Worker<'a> {
    fn boot(mut context: WorkerContext<'a>) -> io::Result<Self> {
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
        let mut channel = context.channel.take();
        if let Some(channel) = &channel {
            poller.set(channel.raw_fd(), Interest::READ)?;
        }
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
        // After the log line: the master relays it before it acts on the message.
        crate::handoff::report_ready(channel.as_mut())?;
        let listener_ids = context.listeners.iter().map(|l| l.id).collect();
        // Kept here: a graceful stop empties `context.listeners`, and connections still
        // reading their PROXY header are admitted after that.
        let bound = context.listeners.iter().map(Listener::specific_addr).collect();
        let inherits_nodelay = context
            .listeners
            .iter()
            .map(|l| crate::listener::inherits_nodelay(l.socket(), l.config.tcp_nodelay))
            .collect();
        let listener_tallies = ListenerTallies::new(context.listeners.len());
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
            listener_ids,
            inherits_nodelay,
            bound,
            own_listeners,
            datagrams: datagram::Datagrams::new(own_count),
            open: 0,
            intake: Intake::Held { until: None },
            channel,
            channel_interest: Interest::READ,
            offered: HashMap::new(),
            refusal_log: RateLimit::new(LOG_INTERVAL),
            accept_error_log: RateLimit::new(LOG_INTERVAL),
            summaries: Summaries::default(),
            shed_queue: VecDeque::new(),
            full: false,
            full_log: RateLimit::new(LOG_INTERVAL),
            shed_at: None,
            pending: Vec::new(),
            pending_open: 0,
            pending_deadlines: VecDeque::new(),
            unpublished: Unpublished::default(),
            listener_tallies,
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
            let deadline = self.next_deadline(now);
            let mut timeout = deadline.map(|d| d.saturating_duration_since(now));
            if let Some(beat) = self.context.heartbeat {
                // Wake up often enough to prove to the master that this loop still turns.
                timeout = Some(timeout.map_or(beat, |t| t.min(beat)));
            }
            if self.unpublished.dirty {
                // Counters from the last burst reach the scoreboard soon after it ends.
                timeout = Some(timeout.map_or(PUBLISH_INTERVAL, |t| t.min(PUBLISH_INTERVAL)));
            }
            if self.datagrams.busy_polling(now, self.open + self.pending_open) {
                timeout = Some(Duration::ZERO);
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
                } else if self.is_channel(event.fd) {
                    self.on_channel(*event, now);
                } else if self.datagrams.owns(event.fd) {
                    self.on_flow_ready(event.fd, now);
                } else {
                    self.on_ready(*event, now);
                }
            }
            // Accept last, so that no event of this round can refer to a reused descriptor.
            for i in 0..self.ready_listeners.len() {
                if self.intake == Intake::Accepting {
                    let (fd, index) = self.ready_listeners[i];
                    match self.context.config.listeners[index].transport {
                        ListenerTransport::Tcp => self.accept(fd, index, now),
                        ListenerTransport::Udp => self.receive(fd, index, now),
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let now = Instant::now();
                self.expire(now);
                self.expire_pending(now);
                self.expire_flows(now);
                self.log_summaries(now, false);
            }
            if self.intake == Intake::Draining
                && self.open == 0
                && self.pending_open == 0
                && self.datagrams.flows() == 0
            {
                if let Some(channel) = self.channel.as_mut() {
                    let _ = channel.flush();
                }
                self.summarize_datagrams(now, true);
                log::info!("graceful stop complete: no connection left");
                self.log_summaries(Instant::now(), true);
                // The last counts (closes, hand-offs) reach the scoreboard before the master
                // folds this slot into the retired totals.
                self.publish(Instant::now());
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
        for (counter, n) in score.refused.iter().zip(totals.refused) {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
        score.full.fetch_add(totals.full, Ordering::Relaxed);
        score.open.store(
            (self.open + self.pending_open + self.datagrams.flows()) as u64,
            Ordering::Relaxed,
        );
        let rows = self.context.scoreboard.listener_rows(self.context.slot);
        self.listener_tallies.publish(rows, &self.listener_ids);
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
        let room = match self.intake {
            Intake::Draining => return Ok(()),
            Intake::Held { until: Some(until) } if now < until => return Ok(()),
            Intake::Accepting | Intake::Held { .. } => self.room() > 0,
        };
        if room {
            self.full = false;
            self.shed_at = None;
        } else if !self.full {
            self.full = true;
            self.unpublished.full += 1;
            self.unpublished.dirty = true;
            let max = self.context.config.daemon.max_connections_per_worker;
            let shedding = self.can_shed();
            if let Some(held_back) = self.full_log.allow(now) {
                let then = if shedding {
                    "the oldest connection without a completed exchange is shed for each new client"
                } else {
                    "no connection can be shed: new clients wait in the backlog"
                };
                log::warn!(
                    "worker full: {} connections open, max_connections_per_worker {max}; {then} ({held_back} similar not logged)",
                    self.open + self.pending_open
                );
            }
        }
        // Full: watch the listeners to learn that a client waits, then not during the grace.
        let shed_ready = self.shed_at.is_none_or(|at| now >= at);
        let want = room || (self.full && shed_ready && self.can_shed());
        match (self.intake, want) {
            (Intake::Accepting, true) => {}
            (Intake::Accepting, false) => self.hold(None),
            (_, true) => {
                for fd in self.listening_fds() {
                    self.poller.set(fd, Interest::ACCEPT)?;
                }
                self.intake = Intake::Accepting;
            }
            (_, false) => self.intake = Intake::Held { until: None },
        }
        Ok(())
    }

    /// Stops watching the listeners, until `until` (an accept pause) or until there is room.
    fn hold(&mut self, until: Option<Instant>) {
        if self.intake == Intake::Accepting {
            for fd in self.listening_fds() {
                let _ = self.poller.set(fd, Interest::NONE);
            }
        }
        self.intake = Intake::Held { until };
    }

    /// Descriptors the budget (`max_connections_per_worker`) still allows: for connections
    /// and for what their sessions watch.
    fn room(&self) -> usize {
        let max = self.context.config.daemon.max_connections_per_worker.get();
        max.saturating_sub(self.open + self.extra_fds + self.pending_open + self.datagrams.flows())
    }

    /// Whether connection `fd` of serial `serial` may be shed: still open, short, no exchange
    /// completed, not closing, on a listener that sheds.
    fn sheddable(&self, fd: usize, serial: u64) -> bool {
        self.conns.get(fd).and_then(Option::as_ref).is_some_and(|conn| {
            conn.serial == serial
                && conn.kind == ConnKind::Short
                && conn.totals.exchanges == 0
                && conn.lingering.is_none()
                && conn.close_at_rest.is_none()
                // Whose traffic the loop cannot see (a child owns the socket) is never idle.
                && conn.session.idle_timeouts()
        })
    }

    /// Whether some connection may be shed; drops stale entries from the front of the queue
    /// (each entry is dropped once, so this is O(1) amortised).
    fn can_shed(&mut self) -> bool {
        while let Some(&(fd, serial)) = self.shed_queue.front() {
            if self.sheddable(fd, serial) {
                return true;
            }
            self.shed_queue.pop_front();
        }
        false
    }

    /// Closes the oldest connection that has not completed an exchange (reason `shed`), to
    /// make room for a new client. False if there is none.
    fn shed_oldest(&mut self, now: Instant) -> bool {
        if !self.can_shed() {
            return false;
        }
        let (fd, _) = self.shed_queue.pop_front().expect("can_shed checked");
        self.finish(fd, CloseReason::Shed, now);
        true
    }

    /// The earliest timer (possibly stale, which only means an early wake-up) or the end of
    /// an accept pause.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let pause = match self.intake {
            Intake::Held { until } => until,
            Intake::Accepting | Intake::Draining => None,
        };
        let header = self.pending_deadlines.front().map(|(at, _, _)| *at);
        let summary = self.summaries.next_deadline();
        let grace = self.shed_at.filter(|at| *at > now);
        let flow = self.datagrams.next_deadline();
        let deadlines = [pause, header, summary, grace, flow];
        timer.into_iter().chain(deadlines.into_iter().flatten()).min()
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
        let retry = match conn.handoff {
            HandOff::Offered { .. } => return None,
            HandOff::Retry { at, .. } => Some(at),
            HandOff::Local | HandOff::Pending { .. } | HandOff::Never => None,
        };
        let policy = &self.context.config.listeners[conn.listener];
        let idle = conn
            .session
            .idle_timeouts()
            .then(|| {
                idle_deadline(
                    conn.kind,
                    conn.last_activity,
                    policy.short_idle_timeout,
                    policy.long_idle_timeout,
                )
            })
            .flatten();
        [idle, self.drain_deadline(conn), conn.timer, retry].into_iter().flatten().min()
    }

    /// When a draining connection at rest is to be closed; `None` if not draining or an
    /// exchange is in flight (then only its idle timeout applies).
    fn drain_deadline(&self, conn: &Conn) -> Option<Instant> {
        let draining = conn.close_at_rest == Some(CloseReason::Shutdown);
        // A connection on its way to another worker is not closed meanwhile.
        let handing = matches!(
            conn.handoff,
            HandOff::Offered { .. } | HandOff::Retry { .. } | HandOff::Pending { .. }
        );
        (draining && !handing && at_rest(conn)).then(|| conn.last_activity + DRAIN_QUIET)
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
                Signal::SIGQUIT if self.intake != Intake::Draining => self.start_drain(),
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
        self.hold(None);
        self.intake = Intake::Draining;
        self.score().set_state(SlotState::Draining);
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
                // At rest now and movable: offered to the serving generation at once.
                if !self.offer(fd, now) {
                    self.schedule(fd);
                }
            }
        }
    }

    fn close_all(&mut self, now: Instant) {
        for fd in 0..self.pending.len() {
            self.drop_pending(fd, None);
        }
        for fd in 0..self.conns.len() {
            let reason = match &self.conns[fd] {
                Some(Conn { lingering: Some((reason, _)), .. }) => *reason,
                Some(_) => CloseReason::Shutdown,
                None => continue,
            };
            self.finish(fd, reason, now);
        }
        self.log_summaries(now, true);
    }

    /// Accepts a batch from listening descriptor `fd`, which serves listener `index`.
    fn accept(&mut self, fd: RawFd, index: usize, now: Instant) {
        let mut shedding = false;
        for _ in 0..ACCEPT_BATCH {
            if self.room() == 0 && !shedding {
                // A full worker takes a new client only if it can shed an older one for it,
                // and only once the client has waited [`SHED_GRACE`] for a worker with room.
                if !self.can_shed() {
                    return;
                }
                match self.shed_at {
                    Some(at) if now < at => return,
                    // Still waiting right after the grace: take it, shedding.
                    Some(at) if now < at + SHED_GRACE => {
                        self.shed_at = None;
                        shedding = true;
                    }
                    // A new wait (or one long past: that client went to another worker).
                    _ => {
                        self.shed_at = Some(now + SHED_GRACE);
                        return;
                    }
                }
            }
            if self.room() == 0 && !self.can_shed() {
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
                    self.hold(Some(now + ACCEPT_PAUSE));
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
        if policy.tcp_nodelay != self.inherits_nodelay[index] {
            // Best effort: an error here (the client already left) shows on the first read.
            let _ = stream.set_nodelay(policy.tcp_nodelay);
        }
        // Checked now, registered once the session says what it wants (a relay connecting
        // to its backend, or an exec'd program, wants nothing of the socket at first).
        if !self.poller.can_watch(fd) {
            if let Some(held_back) = self.accept_error_log.allow(now) {
                log::warn!(
                    "closing connection from {peer} on {}: descriptor {fd} is over select()'s limit ({held_back} similar not logged)",
                    policy.name
                );
            }
            return self.refuse(fd, index, peer, CloseReason::Error);
        }
        if policy.admission.accept_proxy_protocol
            && access::contains(&policy.admission.trusted_proxies, peer.ip())
        {
            // The client is whoever the header names: wait for it.
            let slot = fd as usize;
            if self.pending.len() <= slot {
                self.pending.resize_with(slot + 1, || None);
            }
            let serial = self.next_serial;
            self.next_serial += 1;
            self.pending[slot] = Some(PendingProxy {
                stream,
                listener: index,
                proxy: peer,
                header: Vec::new(),
                serial,
            });
            if self.room() == 0 {
                // Accepted because something could be shed; who the client is comes later.
                self.shed_oldest(now);
            }
            // Cannot fail: `can_watch` said yes.
            let _ = self.poller.set(fd, Interest::READ);
            self.pending_open += 1;
            self.pending_deadlines.push_back((now + PROXY_HEADER_TIMEOUT, slot, serial));
            self.unpublished.dirty = true;
            return self.read_proxy_header(slot, now);
        }
        self.admit_client(index, stream, peer, None, now);
    }

    /// Applies the listener's admission rules to `client` (the peer, or the address a PROXY
    /// protocol header gave) and makes the session: access list, then the shared table
    /// (rate, per-client limit, listener cap), then room in this worker (shedding if full).
    fn admit_client(
        &mut self,
        index: usize,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        proxy: Option<SocketAddr>,
        now: Instant,
    ) {
        let fd = stream.as_raw_fd();
        let policy = &self.context.config.listeners[index];
        let key = self.client_key(index, peer);
        if !policy.admission.access.is_open() && !policy.admission.access.allows(peer.ip()) {
            return self.refuse(fd, index, peer, CloseReason::Denied);
        }
        let mut ticket = None;
        if policy.counts_connections() {
            let rules = policy.rules();
            let admission =
                self.context.limits.admit_with(&mut self.ledger, key, &rules, monotonic_ns());
            let reason = match admission {
                Ok(Admission::Admitted(t)) => {
                    ticket = Some(t);
                    None
                }
                Ok(Admission::Refused { .. }) => Some(CloseReason::Limit),
                Ok(Admission::ListenerFull { .. }) => Some(CloseReason::ListenerFull),
                Ok(Admission::RateLimited) => Some(CloseReason::Rate),
                Err(error) => {
                    if let Some(held_back) = self.refusal_log.allow(now) {
                        log::error!(
                            "refused {peer} on {}: {error} ({held_back} refusals not logged)",
                            policy.name
                        );
                    }
                    Some(CloseReason::Error)
                }
            };
            if let Some(reason) = reason {
                return self.refuse(fd, index, peer, reason);
            }
        }
        if self.room() == 0 {
            // Accepted because something could be shed: make the room now. (Should nothing be
            // sheddable after all, the connection is served one over the budget; select()'s
            // budget keeps spare descriptors for that.)
            self.shed_oldest(now);
        }
        let policy = &self.context.config.listeners[index];
        let info = ConnInfo {
            listener: &policy.name,
            peer,
            socket: std::os::fd::AsFd::as_fd(&stream),
            bound: self.bound[index],
        };
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
            proxy,
            close_at_rest: None,
            lingering: None,
            // What the poller has: a header was read through it, else nothing yet.
            interest: if proxy.is_some() { Interest::READ } else { Interest::NONE },
            serial: self.next_serial,
            scheduled: None,
            timer: None,
            extras: Vec::new(),
            handoff: HandOff::Local,
        });
        if policy.admission.shed_when_full {
            self.shed_queue.push_back((slot, self.next_serial));
            if self.shed_queue.len() > 2 * self.conns.len() + 64 {
                // Old short connections at the front keep stale entries behind them alive.
                let conns = &self.conns;
                self.shed_queue.retain(|&(fd, serial)| {
                    conns.get(fd).and_then(Option::as_ref).is_some_and(|c| {
                        c.serial == serial && c.kind == ConnKind::Short && c.totals.exchanges == 0
                    })
                });
            }
        }
        self.next_serial += 1;
        self.schedule(slot);
        self.open += 1;
        self.unpublished.accepted += 1;
        self.unpublished.dirty = true;
        self.listener_tallies.accepted(index);
        if interest.write {
            // The server speaks first: a new socket is writable, so write now rather than
            // after one more turn of the loop (the dispatch registers what is wanted next).
            self.dispatch(slot, Callback::Writable, now);
        } else {
            self.update_interest(slot);
        }
    }

    /// Turns away a connection just accepted (its socket closes when the caller drops it).
    fn refuse(&mut self, fd: RawFd, index: usize, peer: SocketAddr, reason: CloseReason) {
        let _ = self.poller.set(fd, Interest::NONE);
        self.closed(Closed::refused(index, peer, None, reason));
    }

    /// The key `peer` is counted and logged by on listener `index`.
    fn client_key(&self, index: usize, peer: SocketAddr) -> ClientKey {
        let policy = &self.context.config.listeners[index];
        let id = usize::from(self.listener_ids[index]);
        ClientKey::with_prefix(
            id,
            peer.ip(),
            policy.admission.client_ipv4_prefix,
            policy.admission.client_ipv6_prefix,
        )
    }

    /// Accounts for a closed connection: a refusal is counted and summarized (see
    /// [`refusals`]), anything else gets its access line.
    fn closed(&mut self, record: Closed<'_>) {
        self.listener_tallies.ended(record.listener, record.reason);
        self.unpublished.dirty = true;
        let Some(refusal) = refusal_of(record.reason) else {
            return self.access_line(&record);
        };
        self.unpublished.refused[refusal as usize] += 1;
        self.unpublished.dirty = true;
        let key = self.client_key(record.listener, record.peer);
        if let Some(line) = self.summaries.record(record.listener, key, refusal, Instant::now()) {
            self.log_summary(&line);
        }
    }

    /// Writes the summaries due at `now` (all of them with `all`).
    fn log_summaries(&mut self, now: Instant, all: bool) {
        for line in self.summaries.flush(now, all) {
            self.log_summary(&line);
        }
    }

    fn log_summary(&self, line: &refusals::Line) {
        let listener = &self.context.config.listeners[line.listener].name;
        let client = line.client.map_or_else(|| "other clients".to_owned(), |c| c.to_string());
        let reason = line.reason.name();
        if line.first {
            log::warn!(
                "refused a connection from {client} on {listener} ({reason}); more are counted and logged every {}s",
                refusals::SUMMARY_INTERVAL.as_secs()
            );
        } else {
            log::warn!(
                "refused {} connections from {client} on {listener} ({reason}) in the last {}s",
                line.count,
                refusals::SUMMARY_INTERVAL.as_secs()
            );
        }
    }

    /// Reads what has come of the PROXY protocol header of pending connection `fd`; admits
    /// the client it names once complete, closes on a malformed header or end of file.
    fn read_proxy_header(&mut self, fd: usize, now: Instant) {
        let Some(pending) = self.pending.get_mut(fd).and_then(Option::as_mut) else { return };
        let mut peeked = [0u8; proxy_protocol::MAX_HEADER];
        let room = proxy_protocol::MAX_HEADER - pending.header.len();
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK;
        let n = match nix::sys::socket::recv(fd as RawFd, &mut peeked[..room], flags) {
            Ok(0) => return self.drop_pending(fd, Some(CloseReason::ProxyHeader)),
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return,
            Err(_) => return self.drop_pending(fd, Some(CloseReason::Error)),
        };
        let mut candidate = std::mem::take(&mut pending.header);
        let before = candidate.len();
        candidate.extend_from_slice(&peeked[..n]);
        let parsed = match proxy_protocol::parse(&candidate) {
            Ok(parsed) => parsed,
            Err(error) => {
                log::debug!("connection from proxy {}: {error}", pending.proxy);
                return self.drop_pending(fd, Some(CloseReason::ProxyHeader));
            }
        };
        // Consume exactly the header's bytes: the client's data stays for the session.
        let take = proxy_protocol::consumable(&candidate, &parsed) - before;
        let mut sink = vec![0u8; take];
        if std::io::Read::read_exact(&mut pending.stream, &mut sink).is_err() {
            return self.drop_pending(fd, Some(CloseReason::Error));
        }
        candidate.truncate(before + take);
        pending.header = candidate;
        if let Parsed::Complete { source, .. } = parsed {
            let pending = self.pending[fd].take().expect("checked above");
            self.pending_open -= 1;
            let client = source.unwrap_or(pending.proxy);
            self.admit_client(pending.listener, pending.stream, client, Some(pending.proxy), now);
        }
    }

    /// Closes pending connection `fd`, counting it as `reason` (`None`: a shutdown, not
    /// counted).
    fn drop_pending(&mut self, fd: usize, reason: Option<CloseReason>) {
        let Some(pending) = self.pending.get_mut(fd).and_then(Option::take) else { return };
        let _ = self.poller.set(fd as RawFd, Interest::NONE);
        self.pending_open -= 1;
        if let Some(reason) = reason {
            self.closed(Closed::refused(pending.listener, pending.proxy, None, reason));
        }
    }

    /// Closes the pending connections whose header is late.
    fn expire_pending(&mut self, now: Instant) {
        while let Some(&(at, fd, serial)) = self.pending_deadlines.front() {
            if at > now {
                return;
            }
            self.pending_deadlines.pop_front();
            let live =
                self.pending.get(fd).and_then(Option::as_ref).is_some_and(|p| p.serial == serial);
            if live {
                self.drop_pending(fd, Some(CloseReason::ProxyHeader));
            }
        }
    }

    fn on_ready(&mut self, event: Event, now: Instant) {
        let fd = event.fd as usize;
        if self.pending.get(fd).is_some_and(Option::is_some) {
            return self.read_proxy_header(fd, now);
        }
        let ready = Ready { readable: event.readable, writable: event.writable };
        if let Some(conn) = self.conns.get_mut(fd).and_then(Option::as_mut) {
            if let HandOff::Offered { .. } = conn.handoff {
                return; // not ours to touch until the answer
            }
            if let Some((reason, _)) = conn.lingering {
                if discard_input(&conn.stream) {
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
        let board = self.context.scoreboard;
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
        // SAFETY: the descriptor is `conn.stream`'s, which stays open for the whole call: the
        // context (and so this borrow) is dropped before the connection can be finished.
        let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(conn.stream.as_raw_fd()) };
        let mut cx =
            Context::with_extras(&mut conn.stream, socket, now, extras).with_scoreboard(board);
        let result = match callback {
            Callback::Readable => conn.session.on_readable(&mut cx),
            Callback::Writable => conn.session.on_writable(&mut cx),
            Callback::Extra(extra, ready) => conn.session.on_extra(extra, ready, &mut cx),
            Callback::Timer => conn.session.on_timer(&mut cx),
        };
        let (close, timer, shutdown_write) = (cx.close, cx.timer, cx.shutdown_write);
        if cx.uncount
            && let Some(ticket) = conn.ticket.take()
            && let Err(error) = self.context.limits.release(&mut self.ledger, ticket)
        {
            log::error!("could not release the count of {}: {error}", conn.peer);
        }
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
        self.listener_tallies.moved(conn.listener, progress);
        if shutdown_write && let Err(error) = conn.stream.shutdown(std::net::Shutdown::Write) {
            log::debug!("connection from {}: shutdown(SHUT_WR) failed: {error}", conn.peer);
        }
        match close {
            Some((reason, Ending::Graceful)) => return self.linger(fd, reason, now),
            Some((reason, Ending::Reset)) => return self.reset(fd, reason, now),
            None => {}
        }
        // A connection already bound to close (keep-alive refused, draining) is not promoted.
        if progress.exchanges > 0 && conn.kind == ConnKind::Short && conn.close_at_rest.is_none() {
            self.promote(fd);
        }
        if self.intake == Intake::Draining || timer.is_some() {
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
        } else if !self.offer(fd, now) {
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
            if let HandOff::Retry { at, tries } = conn.handoff
                && at <= now
            {
                // Offered again now if at rest, else at its next rest (see `dispatch`).
                self.conns[fd].as_mut().expect("checked above").handoff =
                    HandOff::Pending { tries };
                if !self.offer(fd, now) {
                    self.schedule(fd);
                }
                continue;
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
    /// until the client's FIN or [`LINGER_TIMEOUT`]; or closes at once when the client's FIN
    /// is already there with nothing unread before it.
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
        // Input first: a client that already ended its side and left nothing unread gets a
        // plain close, which is as graceful (no unread data, so no RST: RFC 2525 2.17) and
        // saves the shutdown. Otherwise FIN now and wait for the client's; readiness is
        // level-triggered, so input that arrives meanwhile is not missed.
        if discard_input(&conn.stream) || conn.stream.shutdown(std::net::Shutdown::Write).is_err() {
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

    /// Closes the connection abortively: `SO_LINGER` 0, so the close sends RST (tcp(7)).
    fn reset(&mut self, fd: usize, reason: CloseReason, now: Instant) {
        if let Some(conn) = self.conns[fd].as_ref() {
            // Best effort: if it fails, the close below sends FIN instead.
            let _ = socket2::SockRef::from(&conn.stream).set_linger(Some(Duration::ZERO));
        }
        self.finish(fd, reason, now);
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
        self.listener_tallies.finished(conn.listener);
        if let Some(ticket) = conn.ticket
            && let Err(error) = self.context.limits.release(&mut self.ledger, ticket)
        {
            log::error!("could not release the count of {}: {error}", conn.peer);
        }
        let mut fields = String::new();
        if self.context.config.log.access_log {
            conn.session.describe(&mut fields);
        }
        self.closed(Closed {
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

    fn access_line(&self, record: &Closed<'_>) {
        if self.context.config.log.access_log {
            let Closed { listener, peer, proxy, duration, totals, reason, fields } = *record;
            let listener = &self.context.config.listeners[listener].name;
            let via = proxy.map(|p| format!(" proxy={p}")).unwrap_or_default();
            log::info!(
                target: ACCESS_TARGET,
                "access listener={listener} peer={peer} duration={:.3}s in={} out={} exchanges={} reason={reason}{via}{fields}",
                duration.as_secs_f64(),
                totals.bytes_in,
                totals.bytes_out,
                totals.exchanges,
            );
        }
    }
}

/// The refusal counter a close reason counts in, if it is a refusal (summarized in the log
/// instead of one access line each).
fn refusal_of(reason: CloseReason) -> Option<Refusal> {
    Some(match reason {
        CloseReason::Denied => Refusal::Denied,
        CloseReason::Rate => Refusal::Rate,
        CloseReason::Limit => Refusal::Limit,
        CloseReason::ListenerFull => Refusal::ListenerFull,
        CloseReason::Shed => Refusal::Shed,
        CloseReason::ProxyHeader => Refusal::ProxyHeader,
        _ => return None,
    })
}

/// A connection that ended (or was refused), for its access line or refusal count.
#[derive(Debug, Clone, Copy)]
struct Closed<'a> {
    /// Listener index.
    listener: usize,
    /// The client (the one a PROXY header named, if any).
    peer: SocketAddr,
    /// The proxy it came through, if any.
    proxy: Option<SocketAddr>,
    duration: Duration,
    totals: Progress,
    reason: CloseReason,
    /// The service's own `key=value` fields ([`crate::services::Session::describe`]).
    fields: &'a str,
}

impl Closed<'_> {
    /// Turned away before any exchange.
    fn refused(
        listener: usize,
        peer: SocketAddr,
        proxy: Option<SocketAddr>,
        reason: CloseReason,
    ) -> Self {
        Closed {
            listener,
            peer,
            proxy,
            duration: Duration::ZERO,
            totals: Progress::default(),
            reason,
            fields: "",
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
/// everything it read, and the socket holds no unread input (a peek that never blocks, even
/// on an exec child's socket, which stays in blocking mode).
fn at_rest(conn: &Conn) -> bool {
    if !conn.session.is_at_rest() {
        return false;
    }
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match nix::sys::socket::recv(conn.stream.as_raw_fd(), &mut byte, flags) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error != Errno::EINTR,
    }
}

/// Reads and throws away whatever the client sent; true once the client's FIN (or an error)
/// is seen, i.e. the lingering close may finish.
fn discard_input(stream: &std::net::TcpStream) -> bool {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        // MSG_DONTWAIT: an exec child's socket is still in blocking mode when it ends.
        match nix::sys::socket::recv(stream.as_raw_fd(), &mut sink, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return true,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(error) => return error != Errno::EAGAIN,
        }
    }
    false
}
