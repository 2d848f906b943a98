//! Forking a worker. The only place that calls into the worker's entry point.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::unistd::{ForkResult, fork};

use super::Master;
use crate::handoff::Channel;
use crate::signals::{self, MASTER_SIGNALS};
use crate::worker::{self, WorkerContext};

impl Master {
    /// Forks the worker of `slot`. The child runs the worker loop and exits; it never
    /// returns here. Signals stay blocked across `fork(2)`, so a signal that arrives meanwhile
    /// is handled by the right process's actions once each unblocks.
    ///
    /// # Errors
    /// sigprocmask(2) or fork(2) failed (`EAGAIN`, `ENOMEM`); the slot stays empty.
    pub(super) fn spawn(&mut self, slot: usize, now: Instant) -> io::Result<()> {
        // The listener names first: the child counts per listener id at once.
        let names = self.listeners.iter().map(|l| (l.id, l.config.name.as_str(), l.local_addr));
        self.scoreboard.name_listeners(names);
        // Claimed before the fork: the child marks itself ready, and must not be overwritten.
        self.scoreboard.claim(slot, self.generation);
        // The hand-off channel; without one the worker only never hands off or adopts.
        let (master_end, worker_end) = match Channel::pair() {
            Ok((master_end, worker_end)) => (Some(master_end), Some(worker_end)),
            Err(error) => {
                log::warn!("worker {slot}: no hand-off channel: {error}");
                (None, None)
            }
        };
        signals::block(MASTER_SIGNALS)?;
        // SAFETY: the master is single-threaded, so no other thread can hold a lock or be
        // mid-allocation at the fork; the child only runs the worker and then exits.
        let forked = unsafe { fork() };
        match forked {
            Ok(ForkResult::Child) => {
                // Descriptors the worker must not keep: the previous generation's listeners
                // (a removed address must close once its own workers are gone) and the pid
                // file (dropping our copy in the child leaves the file alone).
                self.previous = None;
                self.pidfile = None;
                self.ready_pipe = None;
                // The other workers' channels (and the other master's of an upgrade) are the
                // master's, not this worker's.
                self.routing.forget();
                drop(master_end);
                let context = WorkerContext {
                    slot,
                    generation: self.generation,
                    config: self.config.clone(),
                    listeners: std::mem::take(&mut self.listeners),
                    limits: &self.limits,
                    rates: &self.rates,
                    scoreboard: &self.scoreboard,
                    master: self.pid,
                    credentials: self.credentials.clone(),
                    heartbeat: self.heartbeat(),
                    channel: worker_end,
                };
                let status = worker::run(context, &mut self.signals);
                std::process::exit(status);
            }
            Ok(ForkResult::Parent { child }) => {
                self.unblock_signals();
                drop(worker_end);
                self.routing.channels[slot] = master_end;
                self.scoreboard.slot(slot).pid.store(child.as_raw(), Ordering::Release);
                let (hang_timeout, beat) = (self.config.daemon.worker_timeout, self.heartbeat());
                let entry = &mut self.slots[slot];
                entry.pid = Some(child);
                entry.generation = self.generation;
                entry.started = Some(now);
                entry.respawn_at = None;
                entry.abort_sent = None;
                entry.hang_timeout = hang_timeout;
                entry.beat = beat;
                log::debug!(
                    "spawned worker {slot} (generation {}) as pid {child}",
                    self.generation
                );
                Ok(())
            }
            Err(errno) => {
                self.unblock_signals();
                Err(errno.into())
            }
        }
    }

    fn unblock_signals(&self) {
        if let Err(error) = signals::unblock(MASTER_SIGNALS) {
            log::error!("could not unblock signals after fork: {error}");
        }
    }
}
