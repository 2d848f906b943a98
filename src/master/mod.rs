//! The master process: binds, forks the pool, then only supervises.
//!
//! Runs in the process started by the user or systemd; single-threaded, so `fork(2)` is
//! sound. It blocks in exactly one place, [`Master::wait`]: a poll(2) on the signal
//! self-pipe whose timeout is the next deadline (respawn backoff, kill escalation). Signals
//! become intents, each with one `handle_*` method:
//!
//! | signal | intent |
//! |---|---|
//! | CHLD | reap: reclaim the worker's per-client counts, respawn with backoff |
//! | TERM, INT | fast stop: workers get TERM, then KILL after [`FAST_STOP_GRACE`] |
//! | QUIT | graceful stop: workers get QUIT, then KILL after `graceful_timeout`; a second QUIT or a TERM goes fast |
//! | USR1 | reopen logs (nothing to reopen for stderr and syslog) |
//! | HUP, USR2, WINCH, TTIN, TTOU | not supported yet: logged and ignored, never fatal |

mod spawn;
pub mod table;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use thiserror::Error;

use crate::config::{Config, LogTarget};
use crate::exit::ExitStatus;
use crate::limits::{Limits, LimitsError};
use crate::listener::{BindError, Listener};
use crate::signals::{MASTER_SIGNALS, Signals};
use table::{WorkerExit, WorkerSlot, classify};

/// How long a fast stop waits for workers to exit after SIGTERM before SIGKILL.
pub const FAST_STOP_GRACE: Duration = Duration::from_millis(500);

/// The master could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The shared per-client table could not be created.
    #[error(transparent)]
    Limits(#[from] LimitsError),
    /// Signal handlers could not be installed.
    #[error("could not install signal handlers: {0}")]
    Signals(io::Error),
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
    /// The exit status for this failure ([`ExitStatus::Unavailable`] for bind errors,
    /// [`ExitStatus::OsErr`] otherwise).
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            StartError::Bind(_) => ExitStatus::Unavailable,
            _ => ExitStatus::OsErr,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Stopping { graceful: bool, kill_at: Instant, killed: bool },
}

/// The supervisor state.
pub struct Master {
    pid: Pid,
    config: Config,
    listeners: Vec<Listener>,
    limits: Limits,
    signals: Signals,
    slots: Vec<WorkerSlot>,
    generation: u64,
    phase: Phase,
    status: ExitStatus,
    random: RandomState,
}

/// Binds, forks the workers and supervises them until stopped; returns the exit status.
/// A startup failure is also written to stderr when logs go elsewhere, so whoever started
/// the daemon sees why it did not start.
pub fn run(config: Config) -> ExitStatus {
    let logs_elsewhere = config.log.target != LogTarget::Stderr;
    match Master::start(config) {
        Ok(mut master) => master.supervise(),
        Err(error) => {
            log::error!("{error}");
            if logs_elsewhere {
                use std::io::Write;
                let _ = writeln!(io::stderr(), "preforkd: {error}");
            }
            error.exit_status()
        }
    }
}

impl Master {
    /// Binds every listener, creates the limits table, installs the signal handlers and forks
    /// the first generation of workers.
    ///
    /// # Errors
    /// [`StartError`]; nothing stays bound and no worker stays running.
    pub fn start(config: Config) -> Result<Self, StartError> {
        let listeners = Listener::bind_all(&config.listeners)?;
        for listener in &listeners {
            log::info!(
                "listener {} ({}) listening on {}, backlog {}",
                listener.config.name,
                listener.config.service,
                listener.local_addr,
                listener.config.backlog
            );
        }
        let workers = config.daemon.workers.get();
        let limits = Limits::new(workers, config.daemon.max_connections_per_worker.get())?;
        let signals = Signals::install(MASTER_SIGNALS).map_err(StartError::Signals)?;
        let mut master = Master {
            pid: nix::unistd::getpid(),
            config,
            listeners,
            limits,
            signals,
            slots: vec![WorkerSlot::default(); workers],
            generation: 1,
            phase: Phase::Running,
            status: ExitStatus::Ok,
            random: RandomState::new(),
        };
        let now = Instant::now();
        for slot in 0..workers {
            if let Err(source) = master.spawn(slot, now) {
                master.handle_stop_fast("startup failed");
                master.supervise();
                return Err(StartError::Fork { slot, source });
            }
        }
        log::info!("master started: {workers} workers, generation {}", master.generation);
        Ok(master)
    }

    /// The supervision loop; returns when every worker is gone after a stop.
    pub fn supervise(&mut self) -> ExitStatus {
        loop {
            if matches!(self.phase, Phase::Stopping { .. }) {
                self.handle_reap();
                if self.slots.iter().all(|slot| slot.pid.is_none()) {
                    break;
                }
            }
            let deadline = self.next_deadline();
            self.wait(deadline);
            for signal in self.signals.drain() {
                self.handle_signal(signal);
            }
            self.tick(Instant::now());
        }
        log::info!("master exiting with status {}", self.status as u8);
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
        let mut fds = [PollFd::new(self.signals.fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(error) => log::error!("poll on the signal pipe failed: {error}"),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running => self.slots.iter().filter_map(|slot| slot.respawn_at).min(),
            Phase::Stopping { kill_at, killed: false, .. } => Some(kill_at),
            // Killed: SIGCHLD will come; a periodic check covers a lost one.
            Phase::Stopping { killed: true, .. } => Some(Instant::now() + Duration::from_secs(1)),
        }
    }

    fn handle_signal(&mut self, signal: Signal) {
        match signal {
            Signal::SIGCHLD => self.handle_reap(),
            Signal::SIGTERM | Signal::SIGINT => self.handle_stop_fast(signal.as_str()),
            Signal::SIGQUIT => match self.phase {
                Phase::Running => self.handle_stop_graceful(),
                Phase::Stopping { graceful: true, .. } => self.handle_stop_fast("second SIGQUIT"),
                Phase::Stopping { graceful: false, .. } => {}
            },
            Signal::SIGUSR1 => {
                log::info!("SIGUSR1: logs go to stderr or syslog, nothing to reopen")
            }
            other => log::warn!("{other} is not supported yet; ignored"),
        }
    }

    /// Reaps every exited worker, reclaims its per-client counts and schedules a replacement.
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
            let Some((pid, exit)) = classify(status) else {
                return;
            };
            self.worker_exited(pid, exit);
        }
    }

    fn worker_exited(&mut self, pid: Pid, exit: WorkerExit) {
        let Some(slot) = self.slots.iter().position(|s| s.pid == Some(pid)) else {
            log::debug!("reaped pid {pid}, not a current worker");
            return;
        };
        match self.limits.reclaim(slot) {
            Ok(0) => {}
            Ok(held) => {
                log::info!("worker {slot} (pid {pid}) held {held} per-client count(s): released")
            }
            Err(error) => {
                log::error!("could not release the counts of worker {slot} (pid {pid}): {error}")
            }
        }
        let now = Instant::now();
        let jitter = self.jitter();
        let delay = self.slots[slot].exited(now, jitter);
        if matches!(self.phase, Phase::Stopping { .. }) {
            log::debug!("worker {slot} (pid {pid}) exited: {exit:?}");
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
        if delay.is_zero() {
            log::info!("respawning worker {slot}");
        } else {
            log::warn!(
                "worker {slot} is crash-looping ({} quick exits): respawning in {delay:.1?}",
                self.slots[slot].failures
            );
        }
    }

    fn jitter(&self) -> f64 {
        let mut hasher = self.random.build_hasher();
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        hasher.write_u128(since_epoch.as_nanos());
        (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn handle_stop_fast(&mut self, why: &str) {
        let now = Instant::now();
        let kill_at = match self.phase {
            Phase::Stopping { kill_at, .. } => kill_at.min(now + FAST_STOP_GRACE),
            Phase::Running => now + FAST_STOP_GRACE,
        };
        log::info!("fast stop ({why}): stopping {} workers", self.live_workers());
        self.phase = Phase::Stopping { graceful: false, kill_at, killed: false };
        self.listeners.clear();
        self.signal_workers(Signal::SIGTERM);
    }

    fn handle_stop_graceful(&mut self) {
        let timeout = self.config.daemon.graceful_timeout;
        log::info!(
            "graceful stop (SIGQUIT): {} workers finish open exchanges, {timeout:?} at most",
            self.live_workers()
        );
        self.phase =
            Phase::Stopping { graceful: true, kill_at: Instant::now() + timeout, killed: false };
        // Close the master's listening sockets; workers close theirs as they stop accepting.
        self.listeners.clear();
        self.signal_workers(Signal::SIGQUIT);
    }

    /// Respawns due workers while running; escalates to SIGKILL when a stop times out.
    fn tick(&mut self, now: Instant) {
        match self.phase {
            Phase::Running => {
                for slot in 0..self.slots.len() {
                    let due = self.slots[slot].pid.is_none()
                        && self.slots[slot].respawn_at.is_some_and(|at| now >= at);
                    if due {
                        if let Err(error) = self.spawn(slot, now) {
                            let jitter = self.jitter();
                            let delay = self.slots[slot].exited(now, jitter);
                            log::error!(
                                "could not fork worker {slot}: {error}; retrying in {delay:.1?}"
                            );
                        }
                    }
                }
            }
            Phase::Stopping { graceful, kill_at, killed: false } if now >= kill_at => {
                log::error!("stop timed out: killing {} workers", self.live_workers());
                self.signal_workers(Signal::SIGKILL);
                self.phase = Phase::Stopping { graceful, kill_at, killed: true };
            }
            Phase::Stopping { .. } => {}
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
