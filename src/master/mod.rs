//! The master process: binds, forks the pool (see `start.rs`), then only supervises.
//!
//! Runs in the process started by the user or systemd; single-threaded, so `fork(2)` is
//! sound. It blocks in exactly one place, `Master::wait`: a poll(2) on the signal
//! self-pipe, the workers' log relay and their channels (where each worker says `Ready` once
//! booted, and offers connections for hand-off), whose timeout is the next deadline (respawn
//! backoff, kill escalation, heartbeat check, a reload's start timeout). Signals become
//! intents, each with one `handle_*` method:
//!
//! | signal | intent |
//! |---|---|
//! | CHLD | reap: reclaim the worker's per-client counts and its places on relay backends, respawn with backoff |
//! | TERM, INT | fast stop: workers get TERM, then KILL after [`FAST_STOP_GRACE`] |
//! | QUIT | graceful stop: workers get QUIT, then KILL after `graceful_timeout`; a second QUIT or a TERM goes fast; the old master of an upgrade whose new master serves retires its workers instead (USR2, as a reload) |
//! | HUP | reload the configuration as a new generation (see `reload.rs`); the old one retires |
//! | USR1 | reopen the log file, and have every worker reopen its own |
//! | USR2 | binary upgrade: exec the binary again on the same listening sockets |
//! | WINCH | retire every worker, keep the master and its sockets |
//! | TTIN, TTOU | one worker more, one fewer (retired) |
//!
//! A retired worker (SIGUSR2; see `worker::run`) hands its connections to the serving
//! generation when they can move and serves the others until they end, bounded only by
//! `reload_drain_timeout` if set; `max_draining_generations` bounds how many generations
//! drain at once.
//!
//! Workers live in slots (the limits records and the scoreboard entry of the same index).
//! A slot is free, serving a generation (respawned when its worker dies, while that
//! generation serves), or retiring (told to stop; freed when reaped). What happens to them is
//! decided by two pure state machines, `supervisor.rs` (the master's lifecycle) and `pool.rs`
//! (the worker table); this file carries out their actions with the system calls.

mod checkers;
mod handoff;
mod inherit;
mod orphans;
mod peer;
pub mod pool;
mod reload;
mod spawn;
mod spawners;
mod start;
pub mod supervisor;
pub mod table;
mod upgrade;

pub use inherit::{INHERITED_LIMITS_ENV, RECLAIM_PROBE};
pub use peer::UPGRADE_CHANNEL_ENV;
pub use pool::ABORT_GRACE;
pub use start::StartError;
pub use upgrade::{INHERITED_LISTENERS_ENV, oldbin};

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
use nix::unistd::Pid;

use crate::clock::{self, unix_ms};
use crate::config::Config;
use crate::exit::ExitStatus;
use crate::limits::{DatagramRates, Limits};
use crate::listener::Listener;
use crate::logging::{self, LogTarget};
use crate::pidfile::PidFile;
use crate::privileges::Credentials;
use crate::scoreboard::{self, Scoreboard, SlotState};
use crate::sdnotify::Notifier;
use crate::signals::{self, MASTER_SIGNALS, Signals};
use pool::{Fate, Observed, Pool, PoolAction, Resize, Stop, Why};
use supervisor::{Action, Grace, Notice, Supervisor};
use table::{WorkerExit, classify};

/// How long a fast stop waits for workers to exit after SIGTERM before SIGKILL.
pub const FAST_STOP_GRACE: Duration = Duration::from_millis(500);

/// Least interval between two reports of log lines that could not be written.
pub const DROPPED_LINES_REPORT_INTERVAL: Duration = Duration::from_secs(10);

pub use crate::config::SLOT_HEADROOM;

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
    /// The serving generation's listeners (the master's copies).
    listeners: Vec<Listener>,
    listener_ids: HashMap<String, u16>,
    limits: Limits,
    /// Per-client datagram rates (UDP listeners), shared by every generation's workers.
    rates: DatagramRates,
    /// The TLS listeners' session-ticket keys (shared with every worker) and when each is
    /// replaced next.
    tickets: crate::tls::tickets::Rotation,
    /// When to look whether the other master of a binary upgrade and its workers are gone,
    /// to release what they counted in the shared table (`None`: nothing to look for).
    probe_other_at: Option<Instant>,
    /// Records per slot in the limits table: the most `max_connections_per_worker` can be.
    per_slot: usize,
    scoreboard: Scoreboard,
    pidfile: Option<PidFile>,
    signals: Signals,
    /// The worker table and the serving generation (the starting one during a reload).
    pool: Pool,
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
    /// The exec spawners and the workers' links to them.
    spawners: spawners::Spawners,
    /// The health checkers (one, but for the moments of a reload).
    checkers: checkers::Checkers,
}

/// Binds, forks the workers and supervises them until stopped; returns the exit status.
///
/// A startup failure is also written to stderr when logs go elsewhere, so whoever started
/// the daemon sees why it did not start.
///
/// `ready_pipe` (daemon mode) gets one byte once the first generation is ready: 0, or the
/// exit status and the reason if startup failed (`daemonize::report_failure`).
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
                crate::daemonize::report_failure(&mut pipe, status, &error.to_string());
            }
            status
        }
    }
}

impl Master {
    /// One line for systemd's STATUS=: generation, workers, open connections.
    fn status_line(&self) -> String {
        let open: u64 =
            self.scoreboard.slots().iter().map(|s| s.open.load(Ordering::Relaxed)).sum();
        format!(
            "generation {}, {} workers, {open} connections",
            self.pool.generation(),
            self.serving_count()
        )
    }

    /// Workers of the serving generation, running or due for a respawn.
    fn serving_count(&self) -> usize {
        self.pool.target(self.supervisor.lifecycle())
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
                let (how, timeout) = match signal {
                    Signal::SIGUSR2 => ("retiring", self.config.daemon.reload_drain_timeout),
                    Signal::SIGQUIT => ("graceful", Some(self.config.daemon.graceful_timeout)),
                    _ => ("fast", Some(FAST_STOP_GRACE)),
                };
                let bound = timeout.map_or("until their connections end".into(), |t| {
                    format!("{} at most", humantime::format_duration(t))
                });
                log::info!(
                    "{how} stop ({signal}): stopping {} workers, {bound}",
                    self.live_workers()
                );
                // Close the master's listening sockets; workers close theirs as they stop
                // accepting. A starting reload is dropped with its listeners. Socket files go
                // with them, unless the new master of a binary upgrade serves on them.
                if self.supervisor.successor().is_none() {
                    let previous = self.previous.iter().flat_map(|p| &p.listeners);
                    for listener in self.listeners.iter().chain(previous) {
                        listener.remove_file();
                    }
                }
                self.listeners.clear();
                self.previous = None;
                self.retire_checkers(None);
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
                if self.live_workers() == 0 && !self.stop_spawners(Instant::now()) {
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
        deadlines.extend(self.tickets.deadline());
        deadlines.extend(self.spawners.deadline());
        deadlines.extend(self.checkers.deadline());
        let lifecycle = self.supervisor.lifecycle();
        deadlines.extend(self.pool.deadline(now, lifecycle));
        if !lifecycle.is_stopping() && self.supervisor.speaks_to_systemd() {
            deadlines.extend(self.notifier.next_ping(now));
        }
        deadlines.into_iter().min()
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
        let actions = self.supervisor.on_signal(signal, Instant::now(), self.grace());
        self.perform(actions);
    }

    /// How long each way of stopping lets workers run, under the serving configuration.
    fn grace(&self) -> Grace {
        let daemon = &self.config.daemon;
        Grace {
            graceful: daemon.graceful_timeout,
            fast: FAST_STOP_GRACE,
            drain: daemon.reload_drain_timeout,
        }
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
            if self.spawner_exited(pid, exit) || self.checker_exited(pid, exit) {
                continue;
            }
            match self.supervisor.successor_exited(pid, Instant::now(), self.grace()) {
                Some(actions) => {
                    self.upgrade_exited(pid, exit);
                    self.perform(actions);
                }
                None => self.worker_exited(pid, exit),
            }
        }
    }

    /// A worker was reaped: release what it held, then carry out what the pool says its
    /// exit means.
    fn worker_exited(&mut self, pid: Pid, exit: WorkerExit) {
        let Some(slot) = self.pool.slot_of(pid) else {
            log::debug!("reaped pid {pid}, not a current worker");
            return;
        };
        // Its counts first: a sender told its receiver died learns from them whether the
        // connection is still its own.
        self.reclaim(slot);
        let places = self.scoreboard.backends().reclaim(slot);
        if places > 0 {
            log::info!(
                "worker {slot} (pid {pid}) held {places} place(s) on relay backends: released"
            );
        }
        // A `Ready` still unread in its channel (the exit is handled first in a turn, and
        // the channel goes with the worker): the scoreboard tells, the worker marks itself
        // ready there just before it says so.
        if matches!(self.scoreboard.slot(slot).state(), SlotState::Ready | SlotState::Draining) {
            self.pool.worker_ready(slot);
        }
        self.handoff_slot_gone(slot);
        self.scoreboard.slot(slot).release();
        self.spawner_link_gone(slot);
        let ended = self.end_orphans();
        if ended > 0 {
            log::info!("worker {slot} (pid {pid}) left {ended} program(s) running: killed");
        }
        let generation = self.pool.slots()[slot].generation;
        let (now, jitter, lifecycle) = (Instant::now(), self.jitter(), self.supervisor.lifecycle());
        let fate = self.pool.exited(slot, exit, now, jitter, lifecycle);
        match fate {
            Fate::Retired => {
                log::debug!("retired worker {slot} (pid {pid}, generation {generation}): {exit:?}");
                return;
            }
            Fate::Stopping => {
                log::debug!("worker {slot} (pid {pid}) exited: {exit:?}");
                return;
            }
            Fate::StartFailed => {
                return self.rollback(&format!(
                    "worker {slot} (pid {pid}) of generation {generation} exited while starting: {exit:?}"
                ));
            }
            Fate::BootFailure => {
                log::error!(
                    "worker {slot} (pid {pid}) could not boot; stopping instead of respawning"
                );
                self.status = ExitStatus::Software;
                return self.handle_stop_fast("worker boot failure");
            }
            Fate::Respawn { .. } | Fate::Dropped | Fate::Replaced => {}
        }
        match exit {
            WorkerExit::Clean => log::warn!("worker {slot} (pid {pid}) exited unexpectedly"),
            WorkerExit::Failed(code) => {
                log::warn!("worker {slot} (pid {pid}) exited with status {code}")
            }
            WorkerExit::Killed(signal) => {
                log::error!("worker {slot} (pid {pid}) was killed by {signal}")
            }
            WorkerExit::BootFailure => {
                log::error!("worker {slot} (pid {pid}) could not boot (its log line says why)")
            }
        }
        if let Fate::Respawn { delay, failures } = fate {
            self.scoreboard.header().worker_restarts.fetch_add(1, Ordering::Relaxed);
            if delay.is_zero() {
                log::info!("respawning worker {slot}");
            } else {
                log::warn!(
                    "worker {slot} is crash-looping ({failures} quick exits): respawning in {delay:.1?}"
                );
            }
        }
    }

    /// Kills the master's children that are none of its own processes (workers, spawners,
    /// checkers, the new master of an upgrade): programs orphaned by a dead spawner or put
    /// in the background by an exec child (see `orphans.rs`). Returns how many.
    fn end_orphans(&self) -> usize {
        let keep: Vec<Pid> = self
            .pool
            .pids()
            .chain(self.supervisor.successor())
            .chain(self.spawners.pids())
            .chain(self.checkers.pids())
            .collect();
        orphans::kill_orphans(&keep)
    }

    /// In a process just forked from the master (a worker, a spawner, a checker): drops
    /// what only the master holds, the previous generation's listeners, the pid file (the
    /// copy only: the file stays), the ready pipe, the channels to the workers and to the
    /// other master of an upgrade, the spawners' links and control links, the checkers. The
    /// serving listeners are the caller's to take or drop.
    fn forget_in_child(&mut self) {
        self.previous = None;
        self.pidfile = None;
        self.ready_pipe = None;
        self.routing.forget();
        self.spawners.forget();
        self.checkers.forget();
    }

    /// Unblocks the master's signals after a fork (see [`signals::block`]); a failure is
    /// logged.
    fn unblock_signals(&self) {
        if let Err(error) = signals::unblock(MASTER_SIGNALS) {
            log::error!("could not unblock signals after fork: {error}");
        }
    }

    /// Releases the per-client records of `slot`'s dead worker; on failure the slot waits,
    /// and [`Master::tick`] tries again.
    fn reclaim(&mut self, slot: usize) {
        let retrying = self.pool.slots()[slot].needs_reclaim;
        match self.limits.reclaim(slot) {
            Ok(held) => {
                if held > 0 {
                    log::info!("worker slot {slot} held {held} per-client count(s): released");
                }
                self.pool.set_reclaimed(slot, true);
            }
            Err(error) => {
                if !retrying {
                    log::error!(
                        "could not release the per-client counts of worker slot {slot}: {error}; retrying"
                    );
                }
                self.pool.set_reclaimed(slot, false);
            }
        }
    }

    /// A number from 0 to 1 that stretches a crash loop's backoff, so that a pool of
    /// crashing workers does not retry in lockstep.
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

    /// How a worker is retired while the service goes on (a reload, TTOU, WINCH): it hands
    /// off or serves its connections until they end, within the serving
    /// `reload_drain_timeout` if set.
    fn retire(&self) -> Stop {
        Stop::Retire(self.config.daemon.reload_drain_timeout)
    }

    /// SIGWINCH: retire every worker but keep the master and its sockets, so that after a
    /// binary upgrade the old master can be kept as a fallback (HUP starts its workers
    /// again); their connections go to the new master's workers (those that can move).
    fn handle_winch(&mut self) {
        let (count, actions) = self.pool.retire_serving(self.retire(), Instant::now());
        log::info!(
            "SIGWINCH: stopping {count} workers (retiring); listeners stay open, HUP starts workers again"
        );
        self.perform_pool(actions);
    }

    /// SIGTTIN: one more worker in the serving generation.
    fn handle_add_worker(&mut self) {
        let (now, lifecycle) = (Instant::now(), self.supervisor.lifecycle());
        match self.pool.add_worker(now, lifecycle) {
            Resize::To { target, actions } => {
                self.perform_pool(actions);
                self.scoreboard.header().target_workers.store(target as u64, Ordering::Relaxed);
                log::info!("SIGTTIN: {target} workers");
            }
            _ => log::warn!(
                "SIGTTIN ignored: all {} worker slots are in use (fixed at start: workers x {SLOT_HEADROOM} x (1 + max_draining_generations); a restart with more workers raises it)",
                self.pool.slots().len()
            ),
        }
    }

    /// SIGTTOU: one worker fewer (at least one stays).
    fn handle_remove_worker(&mut self) {
        let (now, lifecycle) = (Instant::now(), self.supervisor.lifecycle());
        match self.pool.remove_worker(self.retire(), now, lifecycle) {
            Resize::To { target, actions } => {
                self.perform_pool(actions);
                self.scoreboard.header().target_workers.store(target as u64, Ordering::Relaxed);
                log::info!("SIGTTOU: {target} workers");
            }
            Resize::AtMinimum => log::warn!("SIGTTOU ignored: one worker is the minimum"),
            Resize::NoPool | Resize::NoFreeSlot => {}
        }
    }

    /// Carries out the pool's decisions, in order.
    fn perform_pool(&mut self, actions: Vec<PoolAction>) {
        for action in actions {
            match action {
                PoolAction::Spawn { slot } => {
                    let now = Instant::now();
                    if let Err(error) = self.spawn(slot, now) {
                        let delay = self.pool.spawn_failed(slot, now, self.jitter());
                        log::error!(
                            "could not fork worker {slot}: {error}; retrying in {delay:.1?}"
                        );
                    }
                }
                PoolAction::Signal { slot, pid, signal, why } => {
                    match why {
                        Why::Retire => {}
                        Why::Overdue => {
                            log::error!("worker {slot} (pid {pid}) did not stop in time: SIGKILL")
                        }
                        Why::Hung { silent, timeout } => log::error!(
                            "worker {slot} (pid {pid}) is hung: no heartbeat for {} ms (worker_timeout {timeout:?}): SIGABRT",
                            silent.as_millis()
                        ),
                        Why::SurvivedAbort => {
                            log::error!("worker {slot} (pid {pid}) survived SIGABRT: SIGKILL")
                        }
                    }
                    if let Err(error) = kill(pid, signal)
                        && why == Why::Retire
                    {
                        log::warn!("could not send {signal} to worker {slot} (pid {pid}): {error}");
                    }
                }
            }
        }
    }

    /// Completes or rolls back a reload, escalates stops, checks heartbeats and respawns
    /// due workers.
    fn tick(&mut self, now: Instant) {
        self.probe_other_range(now);
        if let Err(error) = self.tickets.tick(now) {
            log::error!("could not replace a TLS session-ticket key: {error}");
        }
        self.tick_spawners(now);
        self.tick_checkers(now);
        let pool_ready = !self.supervisor.is_stopping() && self.pool.ready();
        let actions = self.supervisor.on_tick(now, pool_ready);
        self.perform(actions);
        if self.supervisor.is_stopping() {
            return;
        }
        let now_ms = clock::monotonic_ms();
        if self.supervisor.speaks_to_systemd()
            && self.notifier.next_ping(now).is_some_and(|at| now >= at)
        {
            let board = &self.scoreboard;
            let paused = self.supervisor.is_paused();
            let healthy = self.pool.healthy(paused, |slot| observe(board, slot, now_ms));
            let status = self.status_line();
            self.notifier.ping(now, healthy, &status);
        }
        for slot in self.pool.unreclaimed() {
            self.reclaim(slot);
        }
        let board = &self.scoreboard;
        let lifecycle = self.supervisor.lifecycle();
        let actions = self.pool.on_tick(now, lifecycle, |slot| observe(board, slot, now_ms).silent);
        self.perform_pool(actions);
    }

    fn live_workers(&self) -> usize {
        self.pool.live()
    }

    fn signal_workers(&self, signal: Signal) {
        for pid in self.pool.pids() {
            if let Err(error) = kill(pid, signal) {
                log::warn!("could not send {signal} to worker pid {pid}: {error}");
            }
        }
    }
}

/// What the scoreboard shows of the worker in `slot`, at `now_ms` (`monotonic_ms`).
fn observe(board: &Scoreboard, slot: usize, now_ms: u64) -> Observed {
    let score = board.slot(slot);
    let silent = now_ms.saturating_sub(score.heartbeat_ms.load(Ordering::Relaxed));
    Observed { silent: Duration::from_millis(silent), accepting: score.state() == SlotState::Ready }
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
