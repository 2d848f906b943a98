//! The worker process: one readiness loop (`select(2)`, `poll(2)` or `epoll(7)`) over the
//! shared listeners, its client connections, its hand-off channel and its signal pipe.
//!
//! Runs only in a forked worker; [`run`] never returns into the master's code (the caller
//! exits with its result). Invariants:
//! - every socket is non-blocking (an exec child's, which is blocking while the child owns
//!   it, is read afterwards only with `MSG_DONTWAIT`); accept, read and write go until
//!   `WouldBlock`;
//! - the wait timeout is the earliest deadline of the tables and the intake (or an accept
//!   pause), so a worker at rest sleeps in the poller without waking;
//! - within a turn, every ready descriptor is served before any listener is accepted from,
//!   so that no event of the turn can refer to a descriptor reused by a new connection;
//! - a connection's error closes that connection only;
//! - no descriptor >= `FD_SETSIZE` is ever watched with select: such a connection is closed
//!   at accept;
//! - out of descriptors (`EMFILE`/`ENFILE`), accepting pauses for [`ACCEPT_PAUSE`] instead of
//!   spinning, and the error is logged at a bounded rate.
//!
//! Signals: TERM/INT stop fast (close everything, exit). USR2 retires the worker (the master
//! sends it to a reload's old generation, on TTOU and on WINCH): stop accepting, hand each
//! connection to the serving generation when its session can move, serve the others until
//! they end, exit when none is left. QUIT stops gracefully (the daemon stops): the same, but
//! a connection not handed off is closed once no exchange is in flight and the client has
//! been quiet for [`DRAIN_QUIET`]; QUIT to a retiring worker makes it stop so. The worker
//! dies with its master (`PR_SET_PDEATHSIG`).
//!
//! Closes the worker starts while the client may still be sending (keep-alive refused,
//! graceful stop) are *lingering closes*, as nginx does: FIN, then the client's late input
//! is read and discarded until its FIN or [`LINGER_TIMEOUT`]. A plain close with unread input
//! would make the kernel send RST, and the client could lose answers already sent; so a
//! plain close is made only once the client's FIN has been read with nothing left unread.
//!
//! The state is split by who owns it; this file keeps boot, the loop, signals and the drain:
//! - `listeners.rs`: one entry per listener (policy, sockets, address, counters);
//! - `table.rs`: the fd-indexed table with serials and a lazy timer heap that holds TCP
//!   connections (`connections.rs`, each with its `phase.rs` state), connections reading a
//!   PROXY header (`header.rs`) and UDP flows (`datagram.rs`);
//! - `phase.rs`, `admission.rs`, `intake.rs`: the pure decisions (a connection's deadlines
//!   and what follows a callback; who is admitted or shed; whether to accept at all);
//! - `shares.rs`: each client's connections in the worker, for shedding by fair share;
//! - `handoff.rs`: the channel to the master and connections on their way to another worker;
//! - `env.rs`, `books.rs`, `counters.rs`, `refusals.rs`: what the tables share, and the
//!   accounting of every connection's end.

mod admission;
mod books;
mod conn;
mod connections;
mod counters;
mod datagram;
mod env;
mod extras;
mod handoff;
mod header;
mod intake;
mod listeners;
mod phase;
mod recycle;
pub mod refusals;
mod shares;
mod table;

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};

use crate::config::{Config, ListenerTransport};
use crate::exit::{WORKER_BOOT_FAILURE, WORKER_EXIT_OK, WORKER_RUNTIME_FAILURE};
use crate::handoff::Message;
use crate::limits::DatagramRates;
use crate::limits::{Limits, access};
use crate::listener::Listener;
use crate::logging;
use crate::net::{Peer, Stream};
use crate::poller::{self, Event, Interest};
use crate::privileges::Credentials;
use crate::scoreboard::{Scoreboard, SlotState, WorkerScore};
use crate::services::{CloseReason, WorkerInfo, WorkerStop};
use crate::signals::{self, MASTER_SIGNALS, Signals};
use books::Books;
use connections::Client;
use connections::Connections;
use datagram::Datagrams;
use env::Env;
use header::Headers;
use intake::{Gate, Watch};
use listeners::{ListenerEntry, Listeners};
use phase::Drain;
use recycle::Recycler;

pub use header::PROXY_HEADER_TIMEOUT;
pub use intake::{ACCEPT_PAUSE, SHED_GRACE};
pub use phase::{DRAIN_QUIET, HANDOFF_RETRY, HANDOFF_TRIES, LINGER_TIMEOUT};

/// Signals a worker handles: TERM and INT stop fast, QUIT stops gracefully, USR2 retires
/// (drains for a reload: connections not handed off are served until they end), USR1
/// reopens the log file.
pub const WORKER_SIGNALS: &[Signal] =
    &[Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT, Signal::SIGUSR2, Signal::SIGUSR1];

/// Connections accepted per readiness event at most, so one worker does not take a whole
/// burst while the others sleep.
const ACCEPT_BATCH: usize = 32;

/// How often a busy worker publishes its heartbeat and counters on the scoreboard.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);

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
    /// The session-ticket keys the master shares with every worker (`None`: TLS listeners
    /// issue no tickets).
    pub tickets: Option<crate::tls::tickets::TicketKeys>,
}

/// Runs a worker until it stops; returns its exit status ([`WORKER_EXIT_OK`], or
/// [`WORKER_BOOT_FAILURE`] if it could not set itself up).
///
/// `master_signals` is the master's signal set, inherited through fork: its actions are
/// removed before the worker installs its own. The master blocked [`MASTER_SIGNALS`] around
/// `fork(2)`; they are unblocked once the worker's actions are in place.
pub fn run(context: WorkerContext<'_>, master_signals: &mut Signals) -> i32 {
    logging::set_worker(context.slot, context.generation);
    // The places its relays take on backend rows count in its slot's column, which the
    // master gives back when it reaps it, however it ends.
    crate::scoreboard::hold_places_for(context.slot);
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
    let stop = worker.serve();
    stop_services(&worker.env.listeners, worker.slot, worker.generation, stop);
    match stop {
        WorkerStop::Graceful | WorkerStop::Fast => WORKER_EXIT_OK,
        WorkerStop::Failed => WORKER_RUNTIME_FAILURE,
    }
}

/// Runs each listener's [`crate::services::Service::after_fork`] hook, in listener order.
/// When one fails, the hooks that succeeded get `before_exit` ([`WorkerStop::Failed`]), in
/// reverse order, and the error names the listener.
///
/// # Errors
/// The first hook that failed, as `listener NAME: after_fork: ERROR`.
fn start_services(listeners: &Listeners, slot: usize, generation: u64) -> io::Result<()> {
    let info = |listener| WorkerInfo { slot, generation, listener };
    for (started, entry) in listeners.iter().enumerate() {
        let name = entry.policy.name.as_str();
        if let Err(error) = entry.policy.service.service.after_fork(&info(name)) {
            let done: Vec<&ListenerEntry> = listeners.iter().take(started).collect();
            for entry in done.into_iter().rev() {
                let info = info(&entry.policy.name);
                entry.policy.service.service.before_exit(&info, WorkerStop::Failed);
            }
            return Err(io::Error::other(format!("listener {name}: after_fork: {error}")));
        }
    }
    Ok(())
}

/// Runs each listener's [`crate::services::Service::before_exit`] hook, in reverse listener
/// order (the last started ends first), after its last housekeeping (everything pending).
fn stop_services(listeners: &Listeners, slot: usize, generation: u64, stop: WorkerStop) {
    let entries: Vec<&ListenerEntry> = listeners.iter().collect();
    let now = Instant::now();
    for entry in entries.into_iter().rev() {
        let info = WorkerInfo { slot, generation, listener: &entry.policy.name };
        // What the service held back (a summary of failures) is written before it goes.
        entry.policy.service.service.housekeeping(now, true);
        entry.policy.service.service.before_exit(&info, stop);
    }
}

/// A number that differs from one worker to the next (the recycling jitter's pick): the
/// standard library's random hash keys, with the pid mixed in, since a forked child starts
/// from its parent's keys.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(crate::clock::monotonic_ns().into());
    hasher.finish()
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

/// The worker: its shared means, its tables and its intake, and the loop over them.
struct Worker<'a> {
    env: Env<'a>,
    signals: Signals,
    /// Its slot on the scoreboard.
    slot: usize,
    /// The configuration generation it serves.
    generation: u64,
    /// How often to beat the heartbeat even when idle.
    heartbeat: Option<Duration>,
    gate: Gate,
    conns: Connections,
    headers: Headers,
    datagrams: Datagrams,
    /// Listening sockets found ready in the current turn, with their listener index (kept
    /// to avoid an allocation per turn).
    ready_listeners: Vec<(RawFd, usize)>,
    last_published: Instant,
    /// When to ask the master for a replacement (`daemon.recycle_*`).
    recycler: Recycler,
    /// Connections open when the children were last published (a draining worker's set of
    /// connections only shrinks, so a change in their number is a change in its children).
    children_published: Option<usize>,
    /// The listeners whose services keep house (`Service::keeps_house`), by index: the only
    /// ones asked for a deadline of their own at each turn.
    housekeepers: Vec<usize>,
}

impl<'a> Worker<'a> {
    fn boot(context: WorkerContext<'a>) -> io::Result<Self> {
        let signals = Signals::install(WORKER_SIGNALS)?;
        signals::unblock(MASTER_SIGNALS)?;
        let WorkerContext {
            slot,
            generation,
            mut config,
            listeners,
            limits,
            rates,
            scoreboard,
            master,
            credentials,
            heartbeat,
            mut channel,
            tickets,
        } = context;
        // Before dropping privileges: a port below 1024 needs them.
        let listeners = Listeners::open(listeners, std::mem::take(&mut config.listeners), tickets)?;
        if let Some(credentials) = &credentials {
            credentials.apply().map_err(|e| {
                io::Error::other(format!("switching to user {}: {e}", credentials.user))
            })?;
        }
        // After the switch: changing credentials clears the parent-death signal.
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
        if getppid() != master {
            // The master died before PR_SET_PDEATHSIG was in place.
            return Err(io::Error::other("the master exited while this worker started"));
        }
        let mut poller = poller::create(config.daemon.event_backend)?;
        poller.set(signals.raw_fd(), Interest::READ)?;
        if let Some(channel) = &channel {
            poller.set(channel.raw_fd(), Interest::READ)?;
        }
        // As the worker's user (the service's files are that user's), last of the set-up;
        // before `Ready`, so the master never counts a worker ready whose hooks failed.
        start_services(&listeners, slot, generation)?;
        let score = scoreboard.slot(slot);
        score.beat();
        score.set_state(SlotState::Ready);
        let max = config.daemon.max_connections_per_worker;
        log::info!(
            "worker started: {} listener(s), at most {max} connections, {}",
            listeners.len(),
            config.daemon.event_backend.name()
        );
        // After the log line: the master relays it before it acts on the message.
        if let Err(error) = crate::handoff::report_ready(channel.as_mut()) {
            stop_services(&listeners, slot, generation, WorkerStop::Failed);
            return Err(error);
        }
        let env = Env {
            poller,
            listeners,
            books: Books::new(config.log.access_log),
            limits,
            ledger: limits.ledger(slot),
            rates,
            scoreboard,
            max_connections: max.get(),
        };
        let housekeepers = (env.listeners.iter().enumerate())
            .filter(|(_, entry)| entry.policy.service.service.keeps_house())
            .map(|(index, _)| index)
            .collect();
        Ok(Worker {
            env,
            signals,
            slot,
            generation,
            heartbeat,
            gate: Gate::default(),
            conns: Connections::new(channel),
            headers: Headers::default(),
            datagrams: Datagrams::default(),
            ready_listeners: Vec::new(),
            last_published: Instant::now(),
            recycler: Recycler::new(config.daemon.recycle, random(), Instant::now()),
            children_published: None,
            housekeepers,
        })
    }

    /// The loop, until the worker stops; returns how.
    fn serve(&mut self) -> WorkerStop {
        let mut events = Vec::new();
        loop {
            let now = Instant::now();
            if let Err(error) = self.open_intake(now) {
                log::error!("cannot watch the listeners: {error}");
                return WorkerStop::Failed;
            }
            if now.saturating_duration_since(self.last_published) >= PUBLISH_INTERVAL {
                self.publish(now);
            }
            let deadline = self.next_deadline(now);
            let mut timeout = deadline.map(|d| d.saturating_duration_since(now));
            if let Some(beat) = self.heartbeat {
                // Wake up often enough to prove to the master that this loop still turns.
                timeout = Some(timeout.map_or(beat, |t| t.min(beat)));
            }
            if self.env.books.counters.dirty() {
                // Counters from the last burst reach the scoreboard soon after it ends.
                timeout = Some(timeout.map_or(PUBLISH_INTERVAL, |t| t.min(PUBLISH_INTERVAL)));
            }
            let connections = self.conns.len() + self.headers.len();
            if self.datagrams.busy_polling(now, connections) {
                timeout = Some(Duration::ZERO);
            }
            if let Err(error) = self.env.poller.wait(timeout, &mut events) {
                log::error!("waiting for readiness failed: {error}");
                return WorkerStop::Failed;
            }
            let now = Instant::now();
            self.ready_listeners.clear();
            for event in &events {
                if event.fd == self.signals.raw_fd() {
                    if let Some(stop) = self.handle_signals(now) {
                        return stop;
                    }
                } else {
                    self.route(*event, now);
                }
            }
            // Accept last, so that no event of this round can refer to a reused descriptor.
            for i in 0..self.ready_listeners.len() {
                if self.gate.accepting() {
                    let (fd, index) = self.ready_listeners[i];
                    self.take(fd, index, now);
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.expire(Instant::now());
            }
            // Connections kept by a drain this turn (not handed off) hear of it.
            if self.conns.link.has_kept() {
                let others = self.headers.len() + self.datagrams.len();
                self.conns.tell_kept(now, &mut self.env, others);
            }
            self.check_recycling(now);
            if self.gate.draining()
                && self.conns.len() == 0
                && self.headers.len() == 0
                && self.datagrams.len() == 0
            {
                self.conns.link.flush();
                self.datagrams.summarize(now, true, &mut self.env);
                log::info!("graceful stop complete: no connection left");
                self.env.books.log_summaries(&self.env.listeners, Instant::now(), true);
                // The last counts (closes, hand-offs) reach the scoreboard before the master
                // folds this slot into the retired totals.
                self.publish(Instant::now());
                return WorkerStop::Graceful;
            }
        }
    }

    /// Hands a readiness event to the table that owns its descriptor (listeners are only
    /// noted: they are accepted from at the end of the turn).
    fn route(&mut self, event: Event, now: Instant) {
        let fd = event.fd;
        let others = self.headers.len() + self.datagrams.len();
        if self.conns.on_event(event, now, &mut self.env, others) {
            return;
        }
        if let Some(index) = self.env.listeners.find(fd) {
            self.ready_listeners.push((fd, index));
        } else if self.conns.link.is_channel(fd) {
            self.conns.on_channel(event, now, &mut self.env, others);
        } else if self.datagrams.owns(fd) {
            let connections = self.conns.len() + self.headers.len();
            self.datagrams.on_ready(fd, now, &mut self.env, connections);
        } else if self.headers.contains(fd) {
            if let Some(client) = self.headers.read(fd, &mut self.env) {
                self.admit_client(client, now);
            }
        } else {
            self.conns.on_extra(event, now, &mut self.env, others);
        }
    }

    fn score(&self) -> &WorkerScore {
        self.env.scoreboard.slot(self.slot)
    }

    /// Heartbeat and counters to the scoreboard.
    fn publish(&mut self, now: Instant) {
        let score = self.env.scoreboard.slot(self.slot);
        score.beat();
        self.env.books.counters.publish(score);
        let open = self.conns.len() + self.headers.len() + self.datagrams.len();
        score.open.store(open as u64, Ordering::Relaxed);
        self.env.listeners.publish(self.env.scoreboard.listener_rows(self.slot));
        if self.gate.draining() && self.children_published != Some(self.conns.len()) {
            // The children a retiring worker keeps, for `preforkd status`.
            let children = self.conns.children(&self.env.listeners, now);
            self.env.scoreboard.set_children(self.slot, children.into_iter());
            self.children_published = Some(self.conns.len());
        }
        self.last_published = now;
        self.datagrams.summarize(now, false, &mut self.env);
    }

    /// Asks the master for a replacement once the recycling rule says so (see
    /// `recycle.rs`); checked once per turn of the loop.
    fn check_recycling(&mut self, now: Instant) {
        if self.gate.draining() || !self.recycler.armed() {
            return;
        }
        let published = self.score().accepted.load(Ordering::Relaxed);
        let accepted = published + self.env.books.counters.accepted_since_published();
        let rss = || crate::sys::resident_bytes().ok();
        if let Some(why) = self.recycler.due(accepted, now, rss)
            && let Err(error) = self.conns.link.tell(&Message::Recycle(why), &mut *self.env.poller)
        {
            log::warn!("could not ask the master for a replacement ({why}): {error}");
        }
    }

    /// Descriptors the budget (`max_connections_per_worker`) still allows: for connections
    /// and for what their sessions watch, PROXY headers and flows.
    fn room(&self) -> usize {
        self.env.room(self.conns.held() + self.headers.len() + self.datagrams.len())
    }

    /// Watches the listeners while the worker has room and is not pausing (or is full and
    /// could shed); stops otherwise (see `intake.rs`).
    fn open_intake(&mut self, now: Instant) -> io::Result<()> {
        let room = self.room() > 0;
        let can_shed = !room && self.can_shed();
        let turn = self.gate.turn(now, room, can_shed);
        if turn.became_full {
            self.env.books.counters.became_full();
            let max = self.env.max_connections;
            if let Some(held_back) = self.env.books.full_log.allow(now) {
                let then = if can_shed {
                    "a connection is shed for each new client (a PROXY header late, no exchange completed, or over its client's fair share)"
                } else {
                    "no connection can be shed: new clients wait in the backlog"
                };
                log::warn!(
                    "worker full: {} connections open, max_connections_per_worker {max}; {then} ({held_back} similar not logged)",
                    self.conns.len() + self.headers.len()
                );
            }
        }
        match turn.watch {
            Watch::Keep => Ok(()),
            Watch::Start => self.env.listeners.watch(&mut *self.env.poller, Interest::ACCEPT),
            Watch::Stop => {
                self.env.listeners.unwatch(&mut *self.env.poller);
                Ok(())
            }
        }
    }

    /// The earliest deadline of the tables, the intake and the refusal summaries (possibly
    /// stale, which only means an early wake-up).
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let deadlines = [
            self.conns.next_deadline(),
            self.gate.next_deadline(now),
            self.headers.next_deadline(),
            self.env.books.next_deadline(),
            self.datagrams.next_deadline(),
        ];
        let mut next = deadlines.into_iter().flatten().min();
        // A plain loop over the few services that keep house: asked every turn, where an
        // iterator chain over every listener cost about 80 instructions per readiness event
        // of the echo hot path.
        for &index in &self.housekeepers {
            if let Some(at) = self.env.listeners[index].policy.service.service.next_deadline() {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    /// Runs everything due at `now`.
    fn expire(&mut self, now: Instant) {
        let others = self.headers.len() + self.datagrams.len();
        self.conns.expire(now, &mut self.env, others);
        self.headers.expire(now, &mut self.env);
        self.datagrams.expire(now, &mut self.env);
        self.env.books.log_summaries(&self.env.listeners, now, false);
        for &index in &self.housekeepers {
            let service = &self.env.listeners[index].policy.service.service;
            if service.next_deadline().is_some_and(|at| at <= now) {
                service.housekeeping(now, false);
            }
        }
    }

    fn handle_signals(&mut self, now: Instant) -> Option<WorkerStop> {
        for signal in self.signals.drain() {
            match signal {
                Signal::SIGTERM | Signal::SIGINT => {
                    log::info!("fast stop ({signal}): closing {} connection(s)", self.conns.len());
                    self.headers.close_all(&mut self.env);
                    self.conns.close_all(now, &mut self.env);
                    self.env.books.log_summaries(&self.env.listeners, now, true);
                    self.datagrams.end_all(now, &mut self.env);
                    self.datagrams.summarize(now, true, &mut self.env);
                    return Some(WorkerStop::Fast);
                }
                Signal::SIGUSR1 => {
                    if let Err(error) = logging::reopen() {
                        log::error!("{error}");
                    }
                }
                Signal::SIGUSR2 => self.start_drain(Drain::Retire),
                Signal::SIGQUIT => self.start_drain(Drain::Stop),
                _ => {}
            }
        }
        None
    }

    /// Starts draining for `why`; a retiring worker told to stop stops (its kept connections
    /// drain again, to be closed at rest). Nothing else changes a drain.
    fn start_drain(&mut self, why: Drain) {
        let now = Instant::now();
        match self.conns.draining() {
            None => {}
            Some(Drain::Retire) if why == Drain::Stop => {
                log::info!("graceful stop while retiring: {} connection(s) open", self.conns.len());
                return self.conns.drain(why, now, &mut self.env);
            }
            Some(_) => return,
        }
        // Connections queued on this worker's own sockets would be lost with them: take them
        // in first (they are served, then handed off or kept like the others).
        for (fd, index) in self.env.listeners.own_sockets() {
            self.take(fd, index, now);
        }
        if self.gate.drain() {
            self.env.listeners.unwatch(&mut *self.env.poller);
        }
        self.score().set_state(SlotState::Draining);
        // Close this worker's copies: once every process has, clients are refused at once
        // instead of waiting in a backlog nobody accepts from.
        self.env.listeners.close();
        let what = match why {
            Drain::Retire => "retiring",
            Drain::Stop => "graceful stop",
        };
        log::info!("{what}: no longer accepting; {} connection(s) open", self.conns.len());
        // Each connection is handed off, or kept (see `phase.rs`): served until it ends when
        // retiring, closed once at rest and quiet when stopping.
        self.conns.drain(why, now, &mut self.env);
        self.publish(now);
    }

    /// Takes what waits on listening descriptor `fd` of listener `index`: connections, or
    /// datagrams for a UDP listener.
    fn take(&mut self, fd: RawFd, index: usize, now: Instant) {
        match self.env.listeners[index].policy.transport {
            ListenerTransport::Tcp => self.accept(fd, index, now),
            ListenerTransport::Udp => {
                let held = self.conns.held() + self.headers.len();
                let draining = self.gate.draining();
                self.datagrams.receive(fd, index, now, &mut self.env, held, draining);
            }
        }
    }

    /// Accepts a batch from listening descriptor `fd`, which serves listener `index`.
    fn accept(&mut self, fd: RawFd, index: usize, now: Instant) {
        let mut shedding = false;
        for _ in 0..ACCEPT_BATCH {
            let room = self.room();
            let can_shed = room == 0 && self.can_shed();
            if !self.gate.take(now, room, can_shed, &mut shedding) {
                return;
            }
            match crate::net::accept(&fd) {
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
                    if self.gate.pause(now + ACCEPT_PAUSE) {
                        self.env.listeners.unwatch(&mut *self.env.poller);
                    }
                    if let Some(held_back) = self.env.books.accept_error_log.allow(now) {
                        log::error!(
                            "accept on {} failed: {e}; pausing accept for {ACCEPT_PAUSE:?} ({held_back} similar errors not logged)",
                            self.env.listeners[index].policy.name
                        );
                    }
                    return;
                }
            }
        }
    }

    /// A connection just accepted: served, or its PROXY header read first if it comes from
    /// a trusted proxy.
    fn admit(&mut self, index: usize, stream: Stream, peer: Peer, now: Instant) {
        let fd = stream.as_raw_fd();
        let entry = &self.env.listeners[index];
        let policy = &entry.policy;
        if policy.tcp_nodelay != entry.inherits_nodelay {
            // Best effort: an error here (the client already left) shows on the first read.
            let _ = stream.set_nodelay(policy.tcp_nodelay);
        }
        // Checked now, registered once the session says what it wants (a relay connecting
        // to its backend, or an exec'd program, wants nothing of the socket at first).
        if !self.env.poller.can_watch(fd) {
            if let Some(held_back) = self.env.books.accept_error_log.allow(now) {
                log::warn!(
                    "closing connection from {peer} on {}: descriptor {fd} is over select()'s limit ({held_back} similar not logged)",
                    self.env.listeners[index].policy.name
                );
            }
            return self.env.refuse(fd, index, peer, CloseReason::Error);
        }
        let admission = &policy.admission;
        if let Peer::Ip(proxy) = peer
            && admission.accept_proxy_protocol
            && access::contains(&admission.trusted_proxies, proxy.ip())
        {
            // The client is whoever the header names: wait for it.
            if self.room() == 0 {
                // Accepted because something could be shed; who the client is comes later
                // (taken as a client without connections here). Should nothing be
                // sheddable after all, it is held one over the budget until its header
                // completes (select()'s budget keeps spare descriptors).
                let _ = self.headers.shed_oldest(now, &mut self.env)
                    || self.conns.make_room(None, now, &mut self.env);
            }
            if let Some(client) = self.headers.start(stream, index, proxy, now, &mut self.env) {
                self.admit_client(client, now);
            }
            return;
        }
        self.admit_client(Client { stream, listener: index, peer, proxy: None }, now);
    }

    /// Admits a client: one just accepted, or the one a complete PROXY header names (even
    /// during a graceful stop, when the listeners are closed already).
    fn admit_client(&mut self, client: Client, now: Instant) {
        let others = self.headers.len() + self.datagrams.len();
        let draining = self.gate.draining();
        let headers = &mut self.headers;
        let shed_header = |env: &mut Env<'_>| headers.shed_oldest(now, env);
        self.conns.admit(client, now, &mut self.env, others, draining, shed_header);
    }

    /// Whether a full worker could shed a connection for a new client (not known yet: see
    /// `admission.rs` for what is shed, in which order).
    fn can_shed(&mut self) -> bool {
        self.headers.can_shed() || self.conns.can_shed(None)
    }
}
