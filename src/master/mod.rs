//! The master process: binds, forks the pool, then only supervises.
//!
//! Runs in the process started by the user or systemd; single-threaded, so `fork(2)` is
//! sound. It blocks in exactly one place, `Master::wait`: a poll(2) on the signal
//! self-pipe whose timeout is the next deadline (respawn backoff, kill escalation, heartbeat
//! check, reload start-up). Signals become intents, each with one `handle_*` method:
//!
//! | signal | intent |
//! |---|---|
//! | CHLD | reap: reclaim the worker's per-client counts, respawn with backoff |
//! | TERM, INT | fast stop: workers get TERM, then KILL after [`FAST_STOP_GRACE`] |
//! | QUIT | graceful stop: workers get QUIT, then KILL after `graceful_timeout`; a second QUIT or a TERM goes fast |
//! | HUP | reload the configuration as a new generation (see `reload.rs`) |
//! | USR1 | reopen the log file, and have every worker reopen its own |
//! | USR2 | binary upgrade: exec the binary again on the same listening sockets |
//! | WINCH | gracefully stop every worker, keep the master and its sockets |
//! | TTIN, TTOU | one worker more, one fewer |
//!
//! Workers live in slots (the limits records and the scoreboard entry of the same index).
//! A slot is free, serving a generation (respawned when its worker dies, while that
//! generation serves), or retiring (told to stop; freed when reaped).

mod handoff;
mod inherit;
mod orphans;
mod peer;
mod reload;
mod spawn;
pub mod supervisor;
pub mod table;
mod upgrade;

pub use inherit::{INHERITED_LIMITS_ENV, RECLAIM_PROBE};
pub use peer::UPGRADE_CHANNEL_ENV;
pub use upgrade::INHERITED_LISTENERS_ENV;

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::{Pid, Uid};
use thiserror::Error;

use crate::activation;
use crate::clock::{self, unix_ms};
use crate::config::{Config, ListenerTransport};
use crate::exit::ExitStatus;
use crate::limits::DatagramRates;
use crate::limits::{Limits, LimitsError};
use crate::listener::{BindError, Listener};
use crate::logging::{self, LogTarget};
use crate::pidfile::{PidFile, PidFileError};
use crate::privileges::{self, Credentials, PrivilegeError};
use crate::scoreboard::{self, Scoreboard, ScoreboardError, SlotState};
use crate::sdnotify::Notifier;
use crate::signals::{MASTER_SIGNALS, Signals};
use supervisor::{Action, Lifecycle, Notice, Origin, Supervisor};
use table::{Role, WorkerExit, WorkerSlot, classify};

/// How long a fast stop waits for workers to exit after SIGTERM before SIGKILL.
pub const FAST_STOP_GRACE: Duration = Duration::from_millis(500);

/// Least interval between two reports of log lines that could not be written.
pub const DROPPED_LINES_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// How long a worker that got SIGABRT for a stale heartbeat has before SIGKILL.
pub const ABORT_GRACE: Duration = Duration::from_secs(2);

pub use crate::config::SLOT_HEADROOM;

/// The master could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The shared per-client table could not be created.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// The scoreboard could not be created.
    #[error(transparent)]
    Scoreboard(#[from] ScoreboardError),
    /// The pid file is held by another master, or cannot be written.
    #[error(transparent)]
    PidFile(#[from] PidFileError),
    /// Signal handlers could not be installed.
    #[error("could not install signal handlers: {0}")]
    Signals(io::Error),
    /// The worker user or group cannot be used.
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    /// Started as root without `daemon.user` and without `allow_root_workers`.
    #[error(
        "the master runs as root and workers would too: set daemon.user (e.g. \"preforkd\"), or allow_root_workers = true"
    )]
    RootWorkers,
    /// A socket passed by systemd matches no listener, or the variables are malformed.
    #[error("socket activation: {0}")]
    Activation(String),
    /// The first workers could not be forked.
    #[error("could not fork worker {slot}: {source}")]
    Fork {
        /// Worker slot.
        slot: usize,
        /// The system error.
        source: io::Error,
    },
}

impl StartError {
    /// The exit status for this failure: [`ExitStatus::Unavailable`] for bind errors and a
    /// pid file held by a running master, [`ExitStatus::OsErr`] otherwise.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            StartError::Bind(_) | StartError::PidFile(PidFileError::Running { .. }) => {
                ExitStatus::Unavailable
            }
            StartError::Privileges(PrivilegeError::Unknown { .. })
            | StartError::RootWorkers
            | StartError::Activation(_) => ExitStatus::Config,
            _ => ExitStatus::OsErr,
        }
    }
}

/// What the master was started with, to start itself again (binary upgrade).
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The executable, as resolved at start (`/proc/self/exe` before any replacement).
    pub exe: PathBuf,
    /// The full argument vector, `argv[0]` included.
    pub args: Vec<OsString>,
    /// The configuration file.
    pub config_path: PathBuf,
    /// The services the configuration may name (re-read at each reload).
    pub services: crate::services::Registry,
}

/// The supervisor state.
pub struct Master {
    pid: Pid,
    invocation: Invocation,
    /// The serving generation's configuration (the new one while a reload starts).
    config: Config,
    generation: u64,
    /// The serving generation's listeners (the master's copies).
    listeners: Vec<Listener>,
    listener_ids: HashMap<String, u16>,
    limits: Limits,
    /// Per-client datagram rates (UDP listeners), shared by every generation's workers.
    rates: DatagramRates,
    /// When to look whether the other master of a binary upgrade and its workers are gone,
    /// to release what they counted in the shared table (`None`: nothing to look for).
    probe_other_at: Option<Instant>,
    /// Records per slot in the limits table: the most `max_connections_per_worker` can be.
    per_slot: usize,
    scoreboard: Scoreboard,
    pidfile: Option<PidFile>,
    signals: Signals,
    slots: Vec<WorkerSlot>,
    /// The lifecycle: starting, serving, reloading, paused, stopping; and the successor of
    /// a binary upgrade.
    supervisor: Supervisor,
    /// What a rollback restores: `Some` exactly while the supervisor is reloading.
    previous: Option<reload::Previous>,
    /// Hand-off channels and the offers in flight.
    routing: handoff::Routing,
    status: ExitStatus,
    random: RandomState,
    /// The user workers switch to, when the master runs as root.
    credentials: Option<Credentials>,
    notifier: Notifier,
    /// Gets one byte once the first generation is ready (daemon mode).
    ready_pipe: Option<File>,
    /// When to report log lines that could not be written.
    dropped_report: logging::DropReport,
}

/// Binds, forks the workers and supervises them until stopped; returns the exit status.
///
/// A startup failure is also written to stderr when logs go elsewhere, so whoever started
/// the daemon sees why it did not start.
///
/// `ready_pipe` (daemon mode) gets one byte once the first generation is ready: 0, or the
/// exit status if startup failed.
pub fn run(config: Config, invocation: Invocation, mut ready_pipe: Option<File>) -> ExitStatus {
    let logs_elsewhere = config.log.target != LogTarget::Stderr;
    match Master::start(config, invocation, &mut ready_pipe) {
        Ok(mut master) => master.supervise(),
        Err(error) => {
            log::error!("{error}");
            if logs_elsewhere {
                let _ = writeln!(io::stderr(), "preforkd: {error}");
            }
            let status = error.exit_status();
            if let Some(mut pipe) = ready_pipe {
                let _ = pipe.write_all(&[status as u8]);
            }
            status
        }
    }
}

/// Worker credentials for `config` in a master whose effective user is `euid`.
fn worker_credentials(config: &Config, euid: Uid) -> Result<Option<Credentials>, StartError> {
    let daemon = &config.daemon;
    match (&daemon.user, euid.is_root()) {
        (Some(user), true) => {
            let credentials = Credentials::resolve(user, daemon.group.as_deref())?;
            if credentials.uid.is_root() && !daemon.allow_root_workers {
                return Err(StartError::RootWorkers);
            }
            Ok(Some(credentials))
        }
        (None, true) if daemon.allow_root_workers => Ok(None),
        (None, true) => Err(StartError::RootWorkers),
        (Some(user), false) => {
            log::warn!(
                "not running as root: daemon.user = {user:?} is ignored, workers run as uid {euid}"
            );
            Ok(None)
        }
        (None, false) => Ok(None),
    }
}

/// Binds or adopts every configured listener: a socket handed over by an old master (binary
/// upgrade, by listener name) or by systemd (by name, else by bound address) is adopted;
/// the others are bound.
fn open_listeners(
    config: &Config,
    ids: &mut HashMap<String, u16>,
) -> Result<Vec<Listener>, StartError> {
    let mut inherited = upgrade::take_inherited_listeners();
    let mut activated = activation::take().map_err(StartError::Activation)?;
    let mut listeners = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        let id = listener_id(ids, &listener.name);
        let by_name = activated.iter().position(|p| p.name.as_deref() == Some(&listener.name));
        // By address, a TCP and a UDP socket on one port are told apart by their type.
        let datagram = listener.transport == ListenerTransport::Udp;
        let by_address = || {
            activated.iter().position(|p| {
                let kind = socket2::SockRef::from(&p.fd).r#type().ok();
                p.address == Some(listener.address)
                    && kind.is_some_and(|k| (k == socket2::Type::DGRAM) == datagram)
            })
        };
        let (bound, how) = if let Some(fd) = inherited.remove(&listener.name) {
            let adopted = Listener::adopt(listener, id, fd)?;
            let moved = listener.address.port() != 0 && adopted.local_addr != listener.address;
            if moved {
                // The configuration changed the address since: bind the new one instead.
                (Listener::bind(listener, id)?, "bound: the inherited socket is on another address")
            } else {
                (adopted, "inherited from the old master")
            }
        } else if let Some(index) = by_name.or_else(by_address) {
            let passed = activated.remove(index);
            (Listener::adopt(listener, id, passed.fd)?, "passed by systemd")
        } else {
            (Listener::bind(listener, id)?, "bound")
        };
        match bound.config.transport {
            ListenerTransport::Tcp => log::info!(
                "listener {} ({}) listening on {}, backlog {} ({how})",
                bound.config.name,
                bound.config.service.name,
                bound.local_addr,
                bound.config.backlog
            ),
            ListenerTransport::Udp => log::info!(
                "listener {} ({}) listening on {}, udp ({how})",
                bound.config.name,
                bound.config.service.name,
                bound.local_addr,
            ),
        }
        listeners.push(bound);
    }
    if let Some(extra) = activated.first() {
        return Err(StartError::Activation(format!(
            "a passed socket (name {:?}, address {:?}) matches no [[listener]] by name or address",
            extra.name.as_deref().unwrap_or("none"),
            extra.address
        )));
    }
    Ok(listeners)
}

impl Master {
    /// Binds (or adopts, after a binary upgrade) every listener, creates the limits table,
    /// the scoreboard and the pid file, installs the signal handlers and forks the first
    /// generation of workers.
    ///
    /// # Errors
    /// [`StartError`]; nothing stays bound and no worker stays running.
    pub fn start(
        config: Config,
        invocation: Invocation,
        ready_pipe: &mut Option<File>,
    ) -> Result<Self, StartError> {
        let pid = nix::unistd::getpid();
        if let Err(error) = orphans::become_subreaper() {
            log::warn!("cannot adopt the orphans of dead workers: {error}");
        }
        if let Some(limit) = config.daemon.rlimit_nofile {
            match privileges::set_nofile(limit) {
                Ok(()) => log::info!("RLIMIT_NOFILE set to {limit}"),
                Err(error) => log::warn!("{error}"),
            }
        }
        let credentials = worker_credentials(&config, nix::unistd::geteuid())?;
        let origin = match std::env::var_os(INHERITED_LISTENERS_ENV) {
            Some(_) => Origin::Upgrade,
            None => Origin::Fresh,
        };
        // The old master's listener ids first, so that both masters key clients alike.
        let inherited = inherit::take_inherited_limits();
        let predecessor = peer::take_upgrade_channel();
        let mut listener_ids = match &inherited {
            Some(Ok(inherited)) => inherited.ids.clone(),
            _ => HashMap::new(),
        };
        let listeners = open_listeners(&config, &mut listener_ids)?;
        let notifier = Notifier::from_env();
        let workers = config.daemon.workers.get();
        let capacity =
            crate::config::worker_slots(workers, config.daemon.max_draining_generations.get());
        let per_slot = config.daemon.max_connections_per_worker.get();
        let (limits, adopted) =
            inherit::open_limits(inherited, origin == Origin::Upgrade, capacity, per_slot)?;
        let predecessor = peer::keep_predecessor(predecessor, adopted);
        let rates = DatagramRates::new()?;
        let pidfile = match &config.daemon.pid_file {
            Some(path) => Some(PidFile::create(path, pid.as_raw())?),
            None => None,
        };
        let board_path = config.daemon.pid_file.as_deref().map(scoreboard::path_for);
        let scoreboard = Scoreboard::create(board_path.as_deref(), capacity)?;
        let header = scoreboard.header();
        header.master_pid.store(pid.as_raw(), Ordering::Relaxed);
        // Lets the control commands tell this master from a process that reuses its pid.
        match crate::sys::process_start_ticks(pid.as_raw()) {
            Ok(ticks) => header.master_start_ticks.store(ticks, Ordering::Relaxed),
            Err(error) => log::warn!("cannot read this master's start time: {error}"),
        }
        header.generation.store(1, Ordering::Relaxed);
        header.target_workers.store(workers as u64, Ordering::Relaxed);
        let signals = Signals::install(MASTER_SIGNALS).map_err(StartError::Signals)?;
        let mut master = Master {
            pid,
            invocation,
            config,
            generation: 1,
            listeners,
            listener_ids,
            limits,
            rates,
            probe_other_at: adopted.then(Instant::now),
            per_slot,
            scoreboard,
            pidfile,
            signals,
            slots: vec![WorkerSlot::default(); capacity],
            supervisor: Supervisor::new(origin),
            previous: None,
            routing: handoff::Routing::new(capacity),
            status: ExitStatus::Ok,
            random: RandomState::new(),
            credentials,
            notifier,
            ready_pipe: ready_pipe.take(),
            dropped_report: logging::DropReport::new(DROPPED_LINES_REPORT_INTERVAL),
        };
        master.routing.predecessor = predecessor;
        let now = Instant::now();
        for slot in 0..workers {
            master.slots[slot].role = Role::Serving;
            if let Err(source) = master.spawn(slot, now) {
                master.handle_stop_fast("startup failed");
                master.supervise();
                *ready_pipe = master.ready_pipe.take();
                return Err(StartError::Fork { slot, source });
            }
        }
        log::info!("master started: {workers} workers, generation {}", master.generation);
        Ok(master)
    }

    /// One line for systemd's STATUS=: generation, workers, open connections.
    fn status_line(&self) -> String {
        let open: u64 =
            self.scoreboard.slots().iter().map(|s| s.open.load(Ordering::Relaxed)).sum();
        format!(
            "generation {}, {} workers, {open} connections",
            self.generation,
            self.serving_count()
        )
    }

    /// Ready: every listener bound and every worker of the serving generation accepting.
    fn pool_ready(&self) -> bool {
        let generation = self.generation;
        let mut wanted = 0;
        let mut ready = 0;
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.role == Role::Serving && slot.generation == generation {
                wanted += 1;
                if slot.pid.is_some() && self.scoreboard.slot(index).state() == SlotState::Ready {
                    ready += 1;
                }
            }
        }
        wanted > 0 && ready == wanted
    }

    /// Healthy for the watchdog: some worker accepts and no live worker's heartbeat is stale.
    /// (After WINCH the pool is empty on purpose: the master itself is the service then.)
    fn pool_healthy(&self) -> bool {
        let now = clock::monotonic_ms();
        let mut accepting = false;
        for (index, slot) in self.slots.iter().enumerate() {
            let score = self.scoreboard.slot(index);
            if slot.pid.is_none() || score.state() == SlotState::Booting {
                continue;
            }
            if let Some(beat) = slot.beat {
                let stale = (beat * 3).max(Duration::from_secs(1)).as_millis() as u64;
                if now.saturating_sub(score.heartbeat_ms.load(Ordering::Relaxed)) > stale {
                    return false;
                }
            }
            accepting |= score.state() == SlotState::Ready;
        }
        accepting || self.supervisor.is_paused()
    }

    /// How often a worker forked now must beat: from the serving `worker_timeout` and the
    /// systemd watchdog.
    fn heartbeat(&self) -> Option<Duration> {
        heartbeat_interval(self.config.daemon.worker_timeout, self.notifier.watchdog())
    }

    /// Reports log lines that could not be written, at most once per
    /// [`DROPPED_LINES_REPORT_INTERVAL`], on stderr as well when the log goes elsewhere (the
    /// log itself may be what fails); publishes the count for `preforkd status`.
    fn report_dropped_log_lines(&mut self, now: Instant) {
        let total = logging::dropped_lines();
        self.scoreboard.header().log_lines_dropped.store(total, Ordering::Relaxed);
        let Some(new) = self.dropped_report.due(now, total) else { return };
        let message = format!(
            "{new} log line(s) could not be written (log target full or unreachable); {total} since start"
        );
        if self.config.log.target != LogTarget::Stderr {
            let _ = writeln!(io::stderr(), "preforkd: master pid {}: {message}", self.pid);
        }
        log::warn!("{message}");
    }

    fn announce_ready(&mut self) {
        // After the supervisor's Notify (READY=1 or MAINPID=): `preforkd upgrade` waits for
        // this, so the old master may be stopped as soon as it returns.
        self.scoreboard.header().ready_unix_ms.store(unix_ms(), Ordering::Release);
        log::info!("ready: {}", self.status_line());
        if let Some(mut pipe) = self.ready_pipe.take() {
            let _ = pipe.write_all(&[ExitStatus::Ok as u8]);
        }
    }

    fn notify(&mut self, notice: Notice) {
        let status = self.status_line();
        match notice {
            Notice::Ready => self.notifier.ready(&status),
            Notice::ReadyAsMain => self.notifier.ready_as_main(&status),
            Notice::Reloading => self.notifier.reloading(),
            Notice::Stopping => self.notifier.stopping(),
        }
    }

    /// Carries out the supervisor's decisions, in order.
    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            self.act(action);
        }
    }

    fn act(&mut self, action: Action) {
        let now = Instant::now();
        match action {
            Action::Reap => self.handle_reap(),
            Action::StartReload => self.handle_reload(),
            Action::Resume { reload } => {
                if reload {
                    log::info!(
                        "SIGHUP after WINCH: starting workers again (configuration not re-read)"
                    );
                    self.scoreboard.header().reloads_ok.fetch_add(1, Ordering::Release);
                } else {
                    log::info!("workers were stopped (WINCH): starting them again");
                }
                self.fill_pool(now);
            }
            Action::ReopenLogs => self.handle_reopen_logs(),
            Action::StartUpgrade => self.handle_upgrade(),
            Action::RetireServing => self.handle_winch(),
            Action::AddWorker => self.handle_add_worker(),
            Action::RemoveWorker => self.handle_remove_worker(),
            Action::RollBack(reason) => self.rollback(&reason),
            Action::CompleteReload => self.complete_transition(now),
            Action::StopWorkers { signal } => {
                let (how, timeout) = if signal == Signal::SIGQUIT {
                    ("graceful", self.config.daemon.graceful_timeout)
                } else {
                    ("fast", FAST_STOP_GRACE)
                };
                log::info!(
                    "{how} stop ({signal}): stopping {} workers, {timeout:?} at most",
                    self.live_workers()
                );
                // Close the master's listening sockets; workers close theirs as they stop
                // accepting. A starting reload is dropped with its listeners.
                self.listeners.clear();
                self.previous = None;
                self.signal_workers(signal);
            }
            Action::KillWorkers => {
                log::error!("stop timed out: killing {} workers", self.live_workers());
                self.signal_workers(Signal::SIGKILL);
            }
            Action::Notify(notice) => self.notify(notice),
            Action::Announce => self.announce_ready(),
            Action::Ignore(why) => log::info!("{why}"),
        }
    }

    /// The supervision loop; returns when every worker is gone after a stop.
    pub fn supervise(&mut self) -> ExitStatus {
        loop {
            if self.supervisor.is_stopping() {
                self.handle_reap();
                if self.live_workers() == 0 {
                    break;
                }
            }
            let deadline = self.next_deadline(Instant::now());
            self.wait(deadline);
            logging::relay_workers_lines();
            for signal in self.signals.drain() {
                self.handle_signal(signal);
            }
            self.pump_channels();
            self.tick(Instant::now());
            self.report_dropped_log_lines(Instant::now());
        }
        // The last lines of the workers, then the master's own.
        logging::relay_workers_lines();
        self.report_dropped_log_lines(Instant::now());
        log::info!("master exiting with status {}", self.status as u8);
        if let Some(pidfile) = &self.pidfile
            && pidfile.is_ours()
        {
            let _ = std::fs::remove_file(scoreboard::path_for(pidfile.path()));
        }
        self.status
    }

    /// The one place the master blocks: until a signal arrives or `deadline` passes.
    fn wait(&self, deadline: Option<Instant>) {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up, so the loop does not spin through the last partial millisecond.
                let millis = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
            }
        };
        let relay = logging::relay_fd().map(|fd| {
            // SAFETY: the relay pipe's read end stays open for the life of the master.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
        });
        let mut fds = vec![PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
        fds.extend(relay.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
        for channel in self.routing.all() {
            let events = if channel.backlogged() {
                PollFlags::POLLIN | PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            // SAFETY: the channel outlives this poll call; nothing closes it meanwhile.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(channel.raw_fd()) };
            fds.push(PollFd::new(fd, events));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(error) => log::error!("poll on the signal pipe failed: {error}"),
        }
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut deadlines: Vec<Instant> = Vec::new();
        deadlines.extend(self.dropped_report.deadline(now, logging::dropped_lines()));
        deadlines.extend(self.supervisor.deadline(now));
        deadlines.extend(self.probe_other_at);
        match self.supervisor.lifecycle() {
            Lifecycle::Stopping { .. } => {}
            _ => {
                for slot in &self.slots {
                    match slot.role {
                        Role::Serving if slot.pid.is_none() && self.respawns(slot) => {
                            if slot.needs_reclaim {
                                deadlines.push(now + Duration::from_secs(1));
                            } else {
                                deadlines.extend(slot.respawn_at);
                            }
                        }
                        Role::Retiring { kill_at: Some(at), .. } if slot.pid.is_some() => {
                            deadlines.push(at)
                        }
                        _ => {}
                    }
                    if let Some(sent) = slot.abort_sent {
                        deadlines.push(sent + ABORT_GRACE);
                    }
                }
                if self.supervisor.speaks_to_systemd() {
                    deadlines.extend(self.notifier.next_ping(now));
                }
                if let Some(timeout) = self
                    .slots
                    .iter()
                    .filter(|s| s.pid.is_some())
                    .filter_map(|s| s.hang_timeout)
                    .min()
                {
                    deadlines.push(now + timeout / 4);
                }
            }
        }
        deadlines.into_iter().min()
    }

    /// Whether a serving slot is to be kept running: its generation serves and the pool is
    /// not paused by WINCH.
    fn respawns(&self, slot: &WorkerSlot) -> bool {
        slot.role == Role::Serving
            && slot.generation == self.generation
            && self.supervisor.keeps_pool()
    }

    /// Hands a signal to the supervisor and carries out its decision.
    fn handle_signal(&mut self, signal: Signal) {
        if signal == Signal::SIGWINCH
            && !self.supervisor.is_stopping()
            && (nix::unistd::isatty(std::io::stdin()).unwrap_or(false)
                || nix::unistd::isatty(std::io::stderr()).unwrap_or(false))
        {
            // A terminal sends WINCH to its foreground group on every resize.
            log::info!("SIGWINCH ignored: running in a terminal, where a resize sends it");
            return;
        }
        let (graceful, now) = (self.config.daemon.graceful_timeout, Instant::now());
        let actions = self.supervisor.on_signal(signal, now, graceful, FAST_STOP_GRACE);
        self.perform(actions);
    }

    /// Reaps every exited child: workers, and the new master of a binary upgrade.
    fn handle_reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(status) => status,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => return,
                Err(error) => {
                    log::error!("waitpid failed: {error}");
                    return;
                }
            };
            let Some((pid, exit)) = classify(status) else { return };
            match self.supervisor.successor_exited(pid) {
                Some(actions) => {
                    self.upgrade_exited(pid, exit);
                    self.perform(actions);
                }
                None => self.worker_exited(pid, exit),
            }
        }
    }

    fn worker_exited(&mut self, pid: Pid, exit: WorkerExit) {
        let Some(slot) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
            log::debug!("reaped pid {pid}, not a current worker");
            return;
        };
        // Its counts first: a sender told its receiver died learns from them whether the
        // connection is still its own.
        self.reclaim(slot);
        self.handoff_slot_gone(slot);
        self.scoreboard.slot(slot).release();
        let keep: Vec<Pid> =
            self.slots.iter().filter_map(|s| s.pid).chain(self.supervisor.successor()).collect();
        let ended = orphans::kill_orphans(&keep);
        if ended > 0 {
            log::info!("worker {slot} (pid {pid}) left {ended} program(s) running: killed");
        }
        let now = Instant::now();
        let jitter = self.jitter();
        let generation = self.slots[slot].generation;
        let delay = self.slots[slot].exited(now, jitter);
        if let Role::Retiring { .. } = self.slots[slot].role {
            self.slots[slot].role = Role::Free;
            self.slots[slot].respawn_at = None;
            log::debug!("retired worker {slot} (pid {pid}, generation {generation}): {exit:?}");
            return;
        }
        if self.supervisor.is_stopping() {
            log::debug!("worker {slot} (pid {pid}) exited: {exit:?}");
            return;
        }
        if self.supervisor.reloading() == Some(generation) {
            self.slots[slot].role = Role::Free;
            self.rollback(&format!(
                "worker {slot} (pid {pid}) of generation {generation} exited while starting: {exit:?}"
            ));
            return;
        }
        match exit {
            WorkerExit::BootFailure => {
                log::error!(
                    "worker {slot} (pid {pid}) could not boot; stopping instead of respawning"
                );
                self.status = ExitStatus::Software;
                self.handle_stop_fast("worker boot failure");
                return;
            }
            WorkerExit::Clean => log::warn!("worker {slot} (pid {pid}) exited unexpectedly"),
            WorkerExit::Failed(code) => {
                log::warn!("worker {slot} (pid {pid}) exited with status {code}")
            }
            WorkerExit::Killed(signal) => {
                log::error!("worker {slot} (pid {pid}) was killed by {signal}")
            }
        }
        if self.respawns(&self.slots[slot]) {
            self.scoreboard.header().worker_restarts.fetch_add(1, Ordering::Relaxed);
        }
        if !self.respawns(&self.slots[slot]) {
            self.slots[slot].respawn_at = None;
        } else if delay.is_zero() {
            log::info!("respawning worker {slot}");
        } else {
            log::warn!(
                "worker {slot} is crash-looping ({} quick exits): respawning in {delay:.1?}",
                self.slots[slot].failures
            );
        }
    }

    /// Releases the per-client records of `slot`'s dead worker; on failure the slot waits,
    /// and [`Master::tick`] tries again.
    fn reclaim(&mut self, slot: usize) {
        match self.limits.reclaim(slot) {
            Ok(held) => {
                if held > 0 {
                    log::info!("worker slot {slot} held {held} per-client count(s): released");
                }
                self.slots[slot].needs_reclaim = false;
            }
            Err(error) => {
                if !self.slots[slot].needs_reclaim {
                    log::error!(
                        "could not release the per-client counts of worker slot {slot}: {error}; retrying"
                    );
                }
                self.slots[slot].needs_reclaim = true;
            }
        }
    }

    fn jitter(&self) -> f64 {
        let mut hasher = self.random.build_hasher();
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        hasher.write_u128(since_epoch.as_nanos());
        (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A fast stop the master decides itself.
    fn handle_stop_fast(&mut self, why: &str) {
        log::info!("fast stop ({why})");
        let actions = self.supervisor.stop_fast(Instant::now(), FAST_STOP_GRACE);
        self.perform(actions);
    }

    /// SIGUSR1: reopen the master's log file, then have each worker reopen its own.
    fn handle_reopen_logs(&mut self) {
        match logging::reopen() {
            Ok(true) => log::info!("log file reopened (SIGUSR1)"),
            Ok(false) => log::info!("SIGUSR1: logs go to stderr or syslog, nothing to reopen"),
            Err(error) => {
                // Logging goes on to the old file; `preforkd reopen` reports the reason.
                log::error!("{error}; still writing to the old file");
                self.scoreboard.set_message(&error.to_string());
                self.scoreboard.header().reopens_failed.fetch_add(1, Ordering::Release);
                return;
            }
        }
        self.signal_workers(Signal::SIGUSR1);
        self.scoreboard.header().reopens.fetch_add(1, Ordering::Release);
    }

    /// SIGWINCH: gracefully stop every worker but keep the master and its sockets, so that
    /// after a binary upgrade the old master can be kept as a fallback (HUP starts its
    /// workers again).
    fn handle_winch(&mut self) {
        let now = Instant::now();
        let serving: Vec<usize> =
            (0..self.slots.len()).filter(|&i| self.slots[i].role == Role::Serving).collect();
        log::info!(
            "SIGWINCH: stopping {} workers gracefully; listeners stay open, HUP starts workers again",
            serving.len()
        );
        for slot in serving {
            self.retire(slot, false, now);
        }
    }

    /// SIGTTIN: one more worker in the serving generation.
    fn handle_add_worker(&mut self) {
        let Some(slot) = self.free_slot() else {
            log::warn!(
                "SIGTTIN ignored: all {} worker slots are in use (fixed at start: workers x {SLOT_HEADROOM} x (1 + max_draining_generations); a restart with more workers raises it)",
                self.slots.len()
            );
            return;
        };
        self.slots[slot].serve(self.generation);
        self.slots[slot].respawn_at = Some(Instant::now());
        let target = self.serving_count();
        self.scoreboard.header().target_workers.store(target as u64, Ordering::Relaxed);
        log::info!("SIGTTIN: {target} workers");
    }

    /// SIGTTOU: one worker fewer (at least one stays).
    fn handle_remove_worker(&mut self) {
        let serving: Vec<usize> =
            (0..self.slots.len()).filter(|&i| self.respawns(&self.slots[i])).collect();
        let Some(&last) = serving.last() else { return };
        if serving.len() <= 1 {
            log::warn!("SIGTTOU ignored: one worker is the minimum");
            return;
        }
        self.retire(last, false, Instant::now());
        let target = serving.len() - 1;
        self.scoreboard.header().target_workers.store(target as u64, Ordering::Relaxed);
        log::info!("SIGTTOU: {target} workers");
    }

    /// Workers of the serving generation, running or due for a respawn.
    fn serving_count(&self) -> usize {
        self.slots.iter().filter(|slot| self.respawns(slot)).count()
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(WorkerSlot::is_free)
    }

    /// Tells a slot's worker to stop, gracefully (QUIT, KILL after `graceful_timeout`) or
    /// fast (TERM, KILL after [`FAST_STOP_GRACE`]). A slot without a worker becomes free.
    fn retire(&mut self, slot: usize, fast: bool, now: Instant) {
        let grace = if fast { FAST_STOP_GRACE } else { self.config.daemon.graceful_timeout };
        let entry = &mut self.slots[slot];
        entry.respawn_at = None;
        let Some(pid) = entry.pid else {
            entry.role = Role::Free;
            return;
        };
        entry.role = Role::Retiring { kill_at: Some(now + grace), fast };
        let signal = if fast { Signal::SIGTERM } else { Signal::SIGQUIT };
        if let Err(error) = kill(pid, signal) {
            log::warn!("could not send {signal} to worker {slot} (pid {pid}): {error}");
        }
    }

    /// Respawns due workers, completes or rolls back a reload, escalates stops, and checks
    /// heartbeats.
    fn tick(&mut self, now: Instant) {
        self.probe_other_range(now);
        let pool_ready = !self.supervisor.is_stopping() && self.pool_ready();
        let actions = self.supervisor.on_tick(now, pool_ready);
        self.perform(actions);
        if self.supervisor.is_stopping() {
            return;
        }
        if self.supervisor.speaks_to_systemd()
            && self.notifier.next_ping(now).is_some_and(|at| now >= at)
        {
            let (healthy, status) = (self.pool_healthy(), self.status_line());
            self.notifier.ping(now, healthy, &status);
        }
        self.check_heartbeats(now);
        for slot in 0..self.slots.len() {
            if self.slots[slot].needs_reclaim {
                self.reclaim(slot);
                if self.slots[slot].needs_reclaim {
                    continue;
                }
            }
            let entry = &self.slots[slot];
            match entry.role {
                Role::Retiring { kill_at: Some(at), fast } if now >= at => {
                    if let Some(pid) = entry.pid {
                        log::error!("worker {slot} (pid {pid}) did not stop in time: SIGKILL");
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    self.slots[slot].role = Role::Retiring { kill_at: None, fast };
                }
                Role::Serving
                    if entry.pid.is_none()
                        && self.respawns(entry)
                        && entry.respawn_at.is_some_and(|at| now >= at) =>
                {
                    if let Err(error) = self.spawn(slot, now) {
                        let jitter = self.jitter();
                        let delay = self.slots[slot].exited(now, jitter);
                        log::error!(
                            "could not fork worker {slot}: {error}; retrying in {delay:.1?}"
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// A worker whose heartbeat is older than `worker_timeout` is hung: SIGABRT (for a core
    /// dump), then SIGKILL after [`ABORT_GRACE`]; the reap replaces it.
    fn check_heartbeats(&mut self, now: Instant) {
        let now_ms = clock::monotonic_ms();
        for slot in 0..self.slots.len() {
            let Some(pid) = self.slots[slot].pid else { continue };
            // Judged by the timeout the worker was started with.
            let Some(timeout) = self.slots[slot].hang_timeout else { continue };
            if let Some(sent) = self.slots[slot].abort_sent {
                if now >= sent + ABORT_GRACE {
                    log::error!("worker {slot} (pid {pid}) survived SIGABRT: SIGKILL");
                    let _ = kill(pid, Signal::SIGKILL);
                    self.slots[slot].abort_sent = Some(now + Duration::from_secs(3600));
                }
                continue;
            }
            let score = self.scoreboard.slot(slot);
            if score.state() == SlotState::Booting {
                continue;
            }
            let silent = now_ms.saturating_sub(score.heartbeat_ms.load(Ordering::Relaxed));
            if silent > timeout.as_millis() as u64 {
                log::error!(
                    "worker {slot} (pid {pid}) is hung: no heartbeat for {silent} ms (worker_timeout {timeout:?}): SIGABRT"
                );
                let _ = kill(pid, Signal::SIGABRT);
                self.slots[slot].abort_sent = Some(now);
            }
        }
    }

    fn live_workers(&self) -> usize {
        self.slots.iter().filter(|slot| slot.pid.is_some()).count()
    }

    fn signal_workers(&self, signal: Signal) {
        for pid in self.slots.iter().filter_map(|slot| slot.pid) {
            if let Err(error) = kill(pid, signal) {
                log::warn!("could not send {signal} to worker pid {pid}: {error}");
            }
        }
    }
}

/// How often workers beat: a third of `worker_timeout` and a quarter of the systemd
/// watchdog interval, whichever is shorter; `None` when neither is set (workers then only
/// wake for their own deadlines).
fn heartbeat_interval(
    worker_timeout: Option<Duration>,
    watchdog: Option<Duration>,
) -> Option<Duration> {
    let from_timeout = worker_timeout.map(|t| t / 3);
    let from_watchdog = watchdog.map(|w| w / 4);
    let beat = match (from_timeout, from_watchdog) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    beat.map(|b| b.max(Duration::from_millis(100)))
}

/// The stable id of listener `name`, assigned on first sight.
fn listener_id(ids: &mut HashMap<String, u16>, name: &str) -> u16 {
    let next = ids.len() as u16;
    *ids.entry(name.to_owned()).or_insert(next)
}
