//! The exec spawners the master supervises: for each generation whose configuration has
//! exec listeners, [`crate::spawner::count`] of them, min(workers, CPUs) (see
//! [`crate::spawner`] for what a spawner is and holds).
//!
//! Runs in the master. The spawners are forked when their generation starts (at start, at
//! each reload, before the generation's workers), so they have that generation's
//! configuration by fork and nothing has to be sent or parsed again. Each worker of the
//! generation gets one link (`SOCK_STREAM`, see [`crate::services::wire`]), whose spawner
//! end goes to *every* spawner of the generation: whichever is free reads the next request,
//! so the spawns of all workers run in parallel on as many CPUs, however unevenly the
//! workers share the clients (one spawn blocks its spawner until the child's execve, see
//! [`crate::sys::spawn`]). The master keeps the spawner ends too: a spawner that dies is
//! forked again (with backoff, logged) and inherits every link of its generation, so
//! workers never need a new one; requests made meanwhile are served by the others, or wait
//! in the link, with their descriptors, for the next spawner. Children a dead spawner leaves
//! behind become the master's (it is a child subreaper) and are killed, as a dead worker's
//! were. When a generation's last worker is gone, the master closes its spawners' control
//! links and each exits once its children have; a stop waits for that, at most
//! [`super::FAST_STOP_GRACE`] after the last worker, then kills them.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{ForkResult, Pid, fork};

use super::table::WorkerExit;
use super::{FAST_STOP_GRACE, Master};
use crate::services::wire;
use crate::signals::{self, MASTER_SIGNALS};
use crate::spawner::{SpawnerContext, run};

/// First delay before a dead spawner is forked again; it doubles with each quick death.
pub const RESPAWN_BACKOFF: Duration = Duration::from_millis(100);

/// Longest delay between two tries.
pub const MAX_RESPAWN_BACKOFF: Duration = Duration::from_secs(10);

/// A spawner that lived this long before dying is forked again at once.
const STABLE: Duration = Duration::from_secs(10);

/// One spawner of a generation.
struct Spawner {
    generation: u64,
    /// Its place among its generation's spawners, from 0 (for logs and restarts).
    index: usize,
    /// Its pid while it runs.
    pid: Option<Pid>,
    /// The master's end of its control link; `None` once the generation retired.
    control: Option<OwnedFd>,
    started: Instant,
    /// Quick deaths in a row.
    failures: u32,
    /// When to fork it again, after a death.
    restart_at: Option<Instant>,
}

/// The spawners and the master's copies of the workers' links.
#[derive(Default)]
pub(super) struct Spawners {
    /// The spawner end of each worker slot's link, with the slot's generation.
    links: Vec<Option<(u64, OwnedFd)>>,
    spawners: Vec<Spawner>,
    /// When a stop kills the spawners still running.
    kill_at: Option<Instant>,
}

impl Spawners {
    /// Pids of the running spawners.
    pub(super) fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.spawners.iter().filter_map(|s| s.pid)
    }

    /// Drops every descriptor held here (in a forked worker: they are the master's).
    pub(super) fn forget(&mut self) {
        self.links.clear();
        self.spawners.clear();
    }

    /// The earliest restart or stop deadline.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.spawners.iter().filter_map(|s| s.restart_at).chain(self.kill_at).min()
    }

    fn find(&mut self, generation: u64, index: usize) -> Option<&mut Spawner> {
        self.spawners.iter_mut().find(|s| s.generation == generation && s.index == index)
    }
}

impl Master {
    /// Whether the serving configuration starts programs.
    fn has_programs(&self) -> bool {
        self.config.listeners.iter().any(|l| l.service.service.program().is_some())
    }

    /// Forks the spawners of the serving generation if its configuration has exec
    /// listeners: [`crate::spawner::count`] of them for its number of workers and the CPUs
    /// this process may run on. A failure is logged and retried like a death.
    pub(super) fn start_spawner(&mut self, now: Instant) {
        if !self.has_programs() {
            return;
        }
        let generation = self.pool.generation();
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let count = crate::spawner::count(self.config.daemon.workers.get(), cpus);
        for index in 0..count {
            if self.spawners.find(generation, index).is_none() {
                self.spawners.spawners.push(Spawner {
                    generation,
                    index,
                    pid: None,
                    control: None,
                    started: now,
                    failures: 0,
                    restart_at: None,
                });
            }
            self.fork_or_retry(generation, index, now);
        }
    }

    /// Forks spawner `index` of `generation`; a failure is logged and retried with backoff,
    /// like a death.
    fn fork_or_retry(&mut self, generation: u64, index: usize, now: Instant) {
        if let Err(error) = self.fork_spawner(generation, index, now) {
            log::error!("could not start exec spawner {index} of generation {generation}: {error}");
            self.spawner_failed(generation, index, now);
        }
    }

    fn fork_spawner(&mut self, generation: u64, index: usize, now: Instant) -> std::io::Result<()> {
        // A stream, like the workers' links: a burst of worker forks must not overflow it.
        let (ours, theirs) = wire::link_pair()?;
        signals::block(MASTER_SIGNALS)?;
        // SAFETY: the master is single-threaded, so no other thread can hold a lock or be
        // mid-allocation at the fork; the child only runs the spawner and then exits.
        let forked = unsafe { fork() };
        match forked {
            Ok(ForkResult::Child) => {
                drop(ours);
                // Its generation's links (all of them: see the module doc); nothing else of
                // the master's: no listening socket, no channel, no other generation's link.
                let links = std::mem::take(&mut self.spawners.links)
                    .into_iter()
                    .enumerate()
                    .filter_map(|(slot, link)| match link {
                        Some((g, fd)) if g == generation => Some((slot, fd)),
                        _ => None,
                    })
                    .collect();
                self.listeners.clear();
                self.forget_in_child();
                self.signals.uninstall();
                let context = SpawnerContext {
                    generation,
                    config: self.config.clone(),
                    control: theirs,
                    links,
                    master: self.pid,
                };
                std::process::exit(run(context));
            }
            Ok(ForkResult::Parent { child }) => {
                self.unblock_signals();
                drop(theirs);
                if let Some(spawner) = self.spawners.find(generation, index) {
                    spawner.pid = Some(child);
                    spawner.control = Some(ours);
                    spawner.started = now;
                    spawner.restart_at = None;
                }
                log::debug!(
                    "started exec spawner {index} of generation {generation} as pid {child}"
                );
                Ok(())
            }
            Err(errno) => {
                self.unblock_signals();
                Err(errno.into())
            }
        }
    }

    /// A link for the worker about to be forked in `slot`: the worker's end, or `None` when
    /// the serving generation starts no program. The spawner's end goes now to each spawner
    /// of the generation that runs, and is kept for the next ones in any case.
    pub(super) fn link_worker(&mut self, slot: usize) -> std::io::Result<Option<OwnedFd>> {
        let generation = self.pool.generation();
        let mut spawners =
            self.spawners.spawners.iter().filter(|s| s.generation == generation).peekable();
        if spawners.peek().is_none() {
            return Ok(None);
        }
        let (worker_end, spawner_end) = wire::link_pair()?;
        for spawner in spawners {
            if let Some(control) = &spawner.control
                && let Err(error) = wire::send(
                    control.as_fd(),
                    &(slot as u32).to_le_bytes(),
                    &[spawner_end.as_raw_fd()],
                )
            {
                // It is dead or stuck: its successor inherits the link; the others serve it.
                log::warn!(
                    "could not pass worker {slot}'s link to exec spawner {}: {error}",
                    spawner.index
                );
            }
        }
        if self.spawners.links.len() <= slot {
            self.spawners.links.resize_with(slot + 1, || None);
        }
        self.spawners.links[slot] = Some((generation, spawner_end));
        Ok(Some(worker_end))
    }

    /// The worker of `slot` is gone: its link closes, and a spawner whose generation has no
    /// worker left is told to finish (its control link closes).
    pub(super) fn spawner_link_gone(&mut self, slot: usize) {
        if let Some(link) = self.spawners.links.get_mut(slot) {
            *link = None;
        }
        self.retire_spawners();
    }

    /// Closes the control link of every spawner whose generation is not serving and has no
    /// worker left; forgets those that are not running.
    pub(super) fn retire_spawners(&mut self) {
        let serving = self.pool.generation();
        let stopping = self.supervisor.is_stopping();
        let Spawners { links, spawners, .. } = &mut self.spawners;
        for spawner in spawners.iter_mut() {
            let used = links.iter().flatten().any(|(g, _)| *g == spawner.generation);
            if (stopping || spawner.generation != serving) && !used {
                spawner.control = None;
                spawner.restart_at = None;
            }
        }
        spawners.retain(|s| s.pid.is_some() || s.control.is_some() || s.restart_at.is_some());
    }

    /// Whether `pid` was a spawner; if so, it was reaped: a retired one is forgotten, any
    /// other is forked again after a backoff, and the children it left are killed.
    pub(super) fn spawner_exited(&mut self, pid: Pid, exit: WorkerExit) -> bool {
        let Some(spawner) = self.spawners.spawners.iter_mut().find(|s| s.pid == Some(pid)) else {
            return false;
        };
        spawner.pid = None;
        let (generation, index) = (spawner.generation, spawner.index);
        if spawner.control.is_none() {
            log::debug!(
                "exec spawner {index} of generation {generation} (pid {pid}) exited: {exit:?}"
            );
            self.retire_spawners();
            return true;
        }
        log::error!(
            "the exec spawner of generation {generation} (number {index}, pid {pid}) died ({exit:?}); its generation's other spawners serve exec connections, or they wait until it is back"
        );
        spawner.control = None;
        let ended = self.end_orphans();
        if ended > 0 {
            log::info!("the exec spawner left {ended} program(s) running: killed");
        }
        self.spawner_failed(generation, index, std::time::Instant::now());
        true
    }

    /// Schedules spawner `index` of `generation` to be forked again, with backoff.
    fn spawner_failed(&mut self, generation: u64, index: usize, now: Instant) {
        let Some(spawner) = self.spawners.find(generation, index) else { return };
        if now.saturating_duration_since(spawner.started) >= STABLE {
            spawner.failures = 0;
        }
        let delay =
            RESPAWN_BACKOFF.saturating_mul(1 << spawner.failures.min(10)).min(MAX_RESPAWN_BACKOFF);
        spawner.failures += 1;
        spawner.restart_at = Some(now + delay);
        log::warn!("exec spawner {index} of generation {generation} starts again in {delay:.1?}");
        self.retire_spawners();
    }

    /// Forks the spawners whose backoff ended (the serving generation's only: no other
    /// generation accepts connections); during a stop, kills those still running at the
    /// deadline.
    pub(super) fn tick_spawners(&mut self, now: Instant) {
        if let Some(at) = self.spawners.kill_at
            && now >= at
        {
            for pid in self.spawners.pids() {
                log::warn!("the exec spawner (pid {pid}) did not finish in time: SIGKILL");
                let _ = kill(pid, Signal::SIGKILL);
            }
            self.spawners.kill_at = None;
        }
        let serving = self.pool.generation();
        let due: Vec<(u64, usize)> = self
            .spawners
            .spawners
            .iter()
            .filter(|s| s.restart_at.is_some_and(|at| now >= at))
            .map(|s| (s.generation, s.index))
            .collect();
        for (generation, index) in due {
            if generation != serving || self.supervisor.is_stopping() {
                if let Some(spawner) = self.spawners.find(generation, index) {
                    spawner.restart_at = None;
                }
                self.retire_spawners();
                continue;
            }
            log::info!("starting exec spawner {index} of generation {generation} again");
            self.fork_or_retry(generation, index, now);
        }
    }

    /// Once the last worker of a stop is gone: every spawner is told to finish (it exits as
    /// soon as its children have, which the workers' ends ended), and is killed after
    /// [`FAST_STOP_GRACE`]. Returns whether one still runs.
    pub(super) fn stop_spawners(&mut self, now: Instant) -> bool {
        self.spawners.links.clear();
        for spawner in &mut self.spawners.spawners {
            spawner.control = None;
            spawner.restart_at = None;
        }
        self.spawners.spawners.retain(|s| s.pid.is_some());
        if self.spawners.spawners.is_empty() {
            return false;
        }
        self.spawners.kill_at.get_or_insert(now + FAST_STOP_GRACE);
        true
    }
}
