//! The backend rows and the health checker the master keeps: it places each generation's
//! upstreams in the scoreboard's backend table before forking its processes, and supervises
//! the one health checker process (see [`crate::checker`]).
//!
//! Runs in the master. A checker is forked for a generation when its workers are (at start
//! and at each reload), with that generation's configuration by fork, so nothing is sent or
//! parsed again; the older generation's checker is stopped (SIGTERM) once the reload is
//! complete, or the new one if the reload is rolled back: one checker probes at a time,
//! except for the moments of a reload. A checker that dies is forked again with backoff
//! (logged), while its generation serves; the rows keep what it wrote, so clients keep going
//! to the backends last seen up meanwhile.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{ForkResult, Pid, fork};

use super::Master;
use super::table::WorkerExit;
use crate::checker::{CheckerContext, run};
use crate::config::Config;
use crate::signals::{self, MASTER_SIGNALS};
use crate::upstream::NoRoom;

/// First delay before a dead checker is forked again; it doubles with each quick death.
const RESPAWN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between two tries.
const MAX_RESPAWN_BACKOFF: Duration = Duration::from_secs(10);
/// A checker that lived this long before dying is forked again at once.
const STABLE: Duration = Duration::from_secs(10);

/// One generation's checker.
struct Checker {
    generation: u64,
    pid: Option<Pid>,
    started: Instant,
    failures: u32,
    restart_at: Option<Instant>,
    /// Told to stop: reaped without a respawn.
    retired: bool,
}

/// The checkers the master supervises.
#[derive(Default)]
pub(super) struct Checkers {
    checkers: Vec<Checker>,
}

impl Checkers {
    /// Pids of the running checkers.
    pub(super) fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.checkers.iter().filter_map(|c| c.pid)
    }

    /// The earliest respawn.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.checkers.iter().filter_map(|c| c.restart_at).min()
    }

    /// Drops what is held here (in a forked child).
    pub(super) fn forget(&mut self) {
        self.checkers.clear();
    }
}

/// Places the upstreams of every listener of `config` in the scoreboard's backend table
/// (`ids`: each listener's stable id, by name); returns every row placed.
///
/// # Errors
/// [`NoRoom`] when the table is full.
pub(super) fn place(
    board: &crate::scoreboard::Scoreboard,
    config: &Config,
    ids: &std::collections::HashMap<String, u16>,
) -> Result<Vec<usize>, NoRoom> {
    let table = board.backends();
    let mut rows = Vec::new();
    for listener in &config.listeners {
        if let Some(upstreams) = listener.service.service.upstreams() {
            let id = ids.get(&listener.name).copied().unwrap_or(u16::MAX);
            rows.extend(upstreams.place(&table, id, &listener.name)?);
        }
    }
    Ok(rows)
}

impl Master {
    /// Frees the backend rows the serving configuration no longer names (once a reload is
    /// complete: the old generation's rows stay while a rollback may need them).
    pub(super) fn retire_rows(&self) {
        match place(&self.scoreboard, &self.config, &self.listener_ids) {
            Ok(rows) => self.scoreboard.backends().retire(&rows),
            Err(error) => log::error!("{error}"),
        }
    }

    /// Forks the checker of the serving generation, if its configuration needs one; a
    /// failure is logged and retried like a death.
    pub(super) fn start_checker(&mut self, now: Instant) {
        if !crate::checker::needed(&self.config) {
            return;
        }
        let generation = self.pool.generation();
        if !self.checkers.checkers.iter().any(|c| c.generation == generation) {
            self.checkers.checkers.push(Checker {
                generation,
                pid: None,
                started: now,
                failures: 0,
                restart_at: None,
                retired: false,
            });
        }
        if let Err(error) = self.fork_checker(generation, now) {
            log::error!("could not start the health checker of generation {generation}: {error}");
            self.checker_failed(generation, now);
        }
    }

    fn fork_checker(&mut self, generation: u64, now: Instant) -> std::io::Result<()> {
        signals::block(MASTER_SIGNALS)?;
        // SAFETY: the master is single-threaded, so no other thread can hold a lock or be
        // mid-allocation at the fork; the child only runs the checker and then exits.
        let forked = unsafe { fork() };
        match forked {
            Ok(ForkResult::Child) => {
                // What the checker must not hold: listening sockets, the pid file, the
                // workers' channels and links.
                self.listeners.clear();
                self.forget_in_child();
                let context = CheckerContext {
                    generation,
                    config: self.config.clone(),
                    master: self.pid,
                    credentials: self.credentials.clone(),
                };
                std::process::exit(run(context, &mut self.signals));
            }
            Ok(ForkResult::Parent { child }) => {
                self.unblock_signals();
                if let Some(checker) =
                    self.checkers.checkers.iter_mut().find(|c| c.generation == generation)
                {
                    checker.pid = Some(child);
                    checker.started = now;
                    checker.restart_at = None;
                }
                log::debug!("started the health checker of generation {generation} as pid {child}");
                Ok(())
            }
            Err(errno) => {
                self.unblock_signals();
                Err(errno.into())
            }
        }
    }

    /// Stops the checkers of every generation but `keep` (`None`: all of them, at a stop).
    pub(super) fn retire_checkers(&mut self, keep: Option<u64>) {
        for checker in &mut self.checkers.checkers {
            if Some(checker.generation) == keep {
                continue;
            }
            checker.retired = true;
            checker.restart_at = None;
            if let Some(pid) = checker.pid {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        self.checkers.checkers.retain(|c| c.pid.is_some() || !c.retired);
    }

    /// Whether `pid` was a checker; if so, it was reaped: a retired one is forgotten, any
    /// other is forked again after a backoff.
    pub(super) fn checker_exited(&mut self, pid: Pid, exit: WorkerExit) -> bool {
        let Some(checker) = self.checkers.checkers.iter_mut().find(|c| c.pid == Some(pid)) else {
            return false;
        };
        checker.pid = None;
        let generation = checker.generation;
        if checker.retired || self.supervisor.is_stopping() {
            log::debug!(
                "the health checker of generation {generation} (pid {pid}) exited: {exit:?}"
            );
            self.checkers.checkers.retain(|c| c.pid.is_some() || !c.retired);
            return true;
        }
        log::error!(
            "the health checker of generation {generation} (pid {pid}) died ({exit:?}); backends keep their last verdicts until it is back"
        );
        self.checker_failed(generation, Instant::now());
        true
    }

    fn checker_failed(&mut self, generation: u64, now: Instant) {
        let Some(checker) = self.checkers.checkers.iter_mut().find(|c| c.generation == generation)
        else {
            return;
        };
        if now.saturating_duration_since(checker.started) >= STABLE {
            checker.failures = 0;
        }
        let delay =
            RESPAWN_BACKOFF.saturating_mul(1 << checker.failures.min(10)).min(MAX_RESPAWN_BACKOFF);
        checker.failures += 1;
        checker.restart_at = Some(now + delay);
        log::warn!("the health checker of generation {generation} starts again in {delay:.1?}");
    }

    /// Forks the checkers whose backoff ended.
    pub(super) fn tick_checkers(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .checkers
            .checkers
            .iter()
            .filter(|c| c.restart_at.is_some_and(|at| now >= at))
            .map(|c| c.generation)
            .collect();
        for generation in due {
            if self.supervisor.is_stopping() || generation != self.pool.generation() {
                self.checkers.checkers.retain(|c| c.generation != generation || c.pid.is_some());
                continue;
            }
            log::info!("starting the health checker of generation {generation} again");
            if let Err(error) = self.fork_checker(generation, now) {
                log::error!(
                    "could not start the health checker of generation {generation}: {error}"
                );
                self.checker_failed(generation, now);
            }
        }
    }
}
