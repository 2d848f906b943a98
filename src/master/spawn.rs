//! Forking a worker. The only place that calls into the worker's entry point.
//!
//! Runs in the master (and, until it enters the worker, in the forked child). Every worker
//! gets a channel to the master (see `crate::handoff`): it says `Ready` on it once booted,
//! which is how the master learns that a generation is ready, and hands connections off on
//! it. A worker is not forked without one.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::unistd::{ForkResult, fork};

use super::Master;
use super::table::Watch;
use crate::handoff::Channel;
use crate::signals::{self, MASTER_SIGNALS};
use crate::worker::{self, WorkerContext};

impl Master {
    /// Publishes the serving listeners' names and bound addresses on the scoreboard (for
    /// `status`): before each fork, and when a rollback brings the previous listeners back.
    pub(super) fn publish_listeners(&self) {
        let names =
            self.listeners.iter().map(|l| (l.id, l.config.name.as_str(), Some(&l.local_addr)));
        self.scoreboard.name_listeners(names);
    }

    /// Forks the worker of `slot`. The child runs the worker loop and exits; it never
    /// returns here. Signals stay blocked across `fork(2)`, so a signal that arrives meanwhile
    /// is handled by the right process's actions once each unblocks.
    ///
    /// # Errors
    /// socketpair(2) failed (`EMFILE`, `ENFILE`: no channel, so no worker), sigprocmask(2)
    /// or fork(2) failed (`EAGAIN`, `ENOMEM`); the slot stays empty.
    pub(super) fn spawn(&mut self, slot: usize, now: Instant) -> io::Result<()> {
        let generation = self.pool.generation();
        // The channel first: without it the master would never learn the worker is ready.
        let (master_end, worker_end) = Channel::pair().map_err(|error| {
            io::Error::new(error.kind(), format!("no channel to the worker: {error}"))
        })?;
        // The listener names first: the child counts per listener id at once.
        self.publish_listeners();
        // Claimed before the fork: the child marks itself ready, and must not be overwritten.
        self.scoreboard.claim(slot, generation);
        // Its link to the generation's exec spawner (if the generation starts programs).
        let link = self.link_worker(slot)?;
        signals::block(MASTER_SIGNALS)?;
        // SAFETY: the master is single-threaded, so no other thread can hold a lock or be
        // mid-allocation at the fork; the child only runs the worker and then exits.
        let forked = unsafe { fork() };
        match forked {
            Ok(ForkResult::Child) => {
                // Descriptors the worker must not keep: the previous generation's listeners
                // (a removed address must close once its own workers are gone), the other
                // workers' channels, and the master's copies of the spawners' links (another
                // worker's link would let this one read that worker's requests).
                self.forget_in_child();
                if let Some(link) = link {
                    crate::services::set_spawner_link(link);
                }
                drop(master_end);
                let context = WorkerContext {
                    slot,
                    generation,
                    config: self.config.clone(),
                    listeners: std::mem::take(&mut self.listeners),
                    limits: &self.limits,
                    rates: &self.rates,
                    scoreboard: &self.scoreboard,
                    master: self.pid,
                    credentials: self.credentials.clone(),
                    heartbeat: self.heartbeat(),
                    channel: Some(worker_end),
                    tickets: Some(self.tickets.keys()),
                };
                let status = worker::run(context, &mut self.signals);
                std::process::exit(status);
            }
            Ok(ForkResult::Parent { child }) => {
                self.unblock_signals();
                drop(worker_end);
                drop(link);
                self.routing.channels[slot] = Some(master_end);
                self.scoreboard.slot(slot).pid.store(child.as_raw(), Ordering::Release);
                let watch = Watch {
                    hang_timeout: self.config.daemon.worker_timeout,
                    beat: self.heartbeat(),
                };
                self.pool.spawned(slot, child, now, watch);
                log::debug!("spawned worker {slot} (generation {generation}) as pid {child}");
                Ok(())
            }
            Err(errno) => {
                self.unblock_signals();
                Err(errno.into())
            }
        }
    }
}
