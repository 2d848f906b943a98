//! The master's worker pool as one policy: events in, actions out.
//!
//! Runs in the master. Pure: no system calls; time, jitter and what the scoreboard shows are
//! passed in, so every rule is unit-tested without a process, as in `supervisor.rs`. The
//! [`super::Master`] forks, signals and reaps; it tells the [`Pool`] what happened (a fork, a
//! worker's `Ready` on its channel, a reap, a turn of the loop, TTIN or TTOU, a step of a
//! reload) and carries out the [`PoolAction`]s it gets back, in order.
//!
//! The rules:
//! - a worker's exit means, checked in this order: its slot is free (it was retiring);
//!   nothing (the daemon stops); a rollback (it belonged to the generation a reload starts);
//!   a stop (it could not boot, [`WorkerExit::BootFailure`], while the daemon starts, and
//!   no worker had booted in its slot: respawning it would loop on a mistake, as gunicorn's
//!   `WORKER_BOOT_ERROR` halts; the replacement of a worker that had booted is a crash); a
//!   respawn, at once after a healthy life and with jittered exponential backoff in a crash
//!   loop (see `table.rs`), if its generation serves and the pool is kept (a replacement that
//!   cannot boot in a generation that did, such as a service hook whose database is down,
//!   is such a crash: it may come back); else nothing (an old generation, or workers stopped
//!   by WINCH);
//! - retiring is SIGUSR2 (the service goes on: a reload's old generation, TTOU, WINCH,
//!   recycling; the worker hands off what can move and serves the rest until it ends),
//!   SIGQUIT (a graceful stop) or SIGTERM (fast), then SIGKILL once at the deadline, if there
//!   is one (a retirement has none unless `reload_drain_timeout` is set);
//! - a ready worker whose heartbeat is older than its `worker_timeout` is hung: SIGABRT (for
//!   a core dump), then SIGKILL once after [`ABORT_GRACE`]; its reap replaces it;
//! - while more than `max_draining_generations` generations drain, the oldest is stopped
//!   fast (its connections are cut): the bound on what unbounded drains hold;
//! - TTIN takes a free slot for the serving generation; TTOU retires the last serving worker
//!   (one asking to be replaced first), never the only one;
//! - a serving worker that asks to be replaced (recycling) gets a replacement in a free slot
//!   of its generation (at the next turn with one free, if none is now); once the
//!   replacement is ready, the worker is retired, so the pool never runs short. If it dies
//!   first, its slot is freed, not respawned: the replacement is on its way; if the
//!   replacement is retired first, the worker asks again;
//! - a generation is ready when each of its slots has a worker that said `Ready` on its
//!   channel.
//!
//! Invariants (besides each slot's, in `table.rs`):
//! - only slots of the serving generation are respawned, and only while the lifecycle keeps a
//!   pool ([`Lifecycle::keeps_pool`]);
//! - nothing happens to the pool while the daemon stops, except reaps: the supervisor's stop
//!   signals and kills every worker at once;
//! - the serving generation only grows, except when [`Pool::roll_back`] returns to the one a
//!   failed reload was to replace.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use thiserror::Error;

use super::SLOT_HEADROOM;
use super::supervisor::Lifecycle;
use super::table::{Health, Recycling, Role, Running, Watch, WorkerExit, WorkerSlot};

/// How long a worker that got SIGABRT for a stale heartbeat has before SIGKILL.
pub const ABORT_GRACE: Duration = Duration::from_secs(2);

/// How often to try again to release a dead worker's per-client records.
pub const RECLAIM_RETRY: Duration = Duration::from_secs(1);

/// Heartbeats are checked this many times per shortest `worker_timeout` of the live workers.
const HANG_CHECKS_PER_TIMEOUT: u32 = 4;

/// How to stop a worker, with how long it has before SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGUSR2: retire while the service goes on: hand each connection to the serving
    /// generation when it can move, serve the others until they end, for at most this long
    /// (`reload_drain_timeout`; `None`: no bound).
    Retire(Option<Duration>),
    /// SIGQUIT: finish the connections, for at most this long (`graceful_timeout`).
    Graceful(Duration),
    /// SIGTERM: close everything now, for at most this long (`FAST_STOP_GRACE`).
    Fast(Duration),
}

/// Why the pool signals a worker: what the master logs with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Retired: a reload's old generation, TTOU, WINCH, a rollback, the draining cap.
    Retire,
    /// Retired and still alive at its deadline.
    Overdue,
    /// No heartbeat for `silent`, longer than its `timeout`.
    Hung {
        /// Time since its last heartbeat.
        silent: Duration,
        /// Its `worker_timeout`.
        timeout: Duration,
    },
    /// Hung, and still alive [`ABORT_GRACE`] after SIGABRT.
    SurvivedAbort,
}

/// What the master is to do for the pool, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolAction {
    /// Fork a worker of the serving generation into `slot`, then report
    /// [`Pool::spawned`] or [`Pool::spawn_failed`].
    Spawn {
        /// The slot.
        slot: usize,
    },
    /// Send `signal` to the worker `pid` of `slot`.
    Signal {
        /// The slot.
        slot: usize,
        /// The worker.
        pid: Pid,
        /// QUIT, TERM, ABRT or KILL.
        signal: Signal,
        /// What to log.
        why: Why,
    },
}

/// What a worker's exit means (see the rules above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It was retiring: its slot is free.
    Retired,
    /// The daemon stops: not replaced.
    Stopping,
    /// It belonged to the generation a reload starts: roll the reload back (its slot is
    /// free).
    StartFailed,
    /// It could not boot while the daemon starts: stop the daemon rather than respawn it in a
    /// loop.
    BootFailure,
    /// Replaced after `delay` (zero: at once); `failures` quick exits in a row.
    Respawn {
        /// The backoff.
        delay: Duration,
        /// Consecutive exits within `MIN_HEALTHY_UPTIME`.
        failures: u32,
    },
    /// Not replaced: its generation no longer serves, or WINCH stopped the workers.
    Dropped,
    /// It asked to be replaced and its replacement was started: not respawned (its slot is
    /// free).
    Replaced,
}

/// The outcome of a worker's request to be replaced ([`Pool::recycle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycled {
    /// Its replacement is forked into this slot by the next turn of the loop.
    Replacing(usize),
    /// No slot is free: a replacement is started at the first turn with one.
    Waiting,
    /// A reload is starting the next generation: the worker retires if it completes, and
    /// is replaced once its generation serves again if the reload is rolled back.
    Deferred,
    /// Not now: it does not serve, the pool is not kept (stopping, WINCH), or it asked
    /// already.
    Ignored,
}

/// The outcome of TTIN or TTOU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resize {
    /// The serving generation now has `target` workers; `actions` carry it out (a new slot
    /// is forked by the next [`Pool::on_tick`]).
    To {
        /// Workers wanted.
        target: usize,
        /// What to do now.
        actions: Vec<PoolAction>,
    },
    /// TTIN: every slot is in use (their number is fixed at start).
    NoFreeSlot,
    /// TTOU: one worker is the minimum.
    AtMinimum,
    /// TTOU: no worker serves (WINCH stopped them).
    NoPool,
}

/// Why a reload cannot start its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NoRoom {
    /// More workers than the shared tables were sized for.
    #[error("{wanted} workers need a restart: the shared tables were sized at start for {most}")]
    Restart {
        /// Workers the new configuration asks for.
        wanted: usize,
        /// Most workers a generation can have.
        most: usize,
    },
    /// Not enough free slots while older generations drain.
    #[error(
        "{wanted} workers need {wanted} free slots, {free} are free while old generations drain; try again shortly"
    )]
    Busy {
        /// Workers the new configuration asks for.
        wanted: usize,
        /// Free slots now.
        free: usize,
    },
}

/// What the scoreboard shows of a live worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Time since its last heartbeat.
    pub silent: Duration,
    /// It says it accepts (ready, not draining).
    pub accepting: bool,
}

/// The worker table and the serving generation, with the decisions on them.
#[derive(Debug)]
pub struct Pool {
    slots: Vec<WorkerSlot>,
    /// The serving generation (the starting one during a reload).
    generation: u64,
}

impl Pool {
    /// `capacity` slots, the first `workers` of them serving generation 1; the caller forks
    /// their workers and reports [`Pool::spawned`].
    pub fn new(capacity: usize, workers: usize) -> Pool {
        let mut slots = vec![WorkerSlot::default(); capacity];
        for slot in slots.iter_mut().take(workers) {
            slot.serve(1);
        }
        Pool { slots, generation: 1 }
    }

    /// The serving generation (the starting one during a reload).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every slot, by index.
    pub fn slots(&self) -> &[WorkerSlot] {
        &self.slots
    }

    /// The slot of worker `pid`.
    pub fn slot_of(&self, pid: Pid) -> Option<usize> {
        self.slots.iter().position(|slot| slot.pid() == Some(pid))
    }

    /// Every live worker.
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.slots.iter().filter_map(WorkerSlot::pid)
    }

    /// How many workers live.
    pub fn live(&self) -> usize {
        self.pids().count()
    }

    /// Whether `slot` is kept running: it serves the serving generation and the lifecycle
    /// keeps a pool.
    fn keeps(&self, slot: &WorkerSlot, lifecycle: Lifecycle) -> bool {
        slot.role == Role::Serving && slot.generation == self.generation && lifecycle.keeps_pool()
    }

    /// Workers of the serving generation, running or due for a respawn.
    pub fn target(&self, lifecycle: Lifecycle) -> usize {
        self.slots.iter().filter(|slot| self.keeps(slot, lifecycle)).count()
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(WorkerSlot::is_free)
    }

    /// Every slot of the serving generation has a worker that said `Ready` (and there is at
    /// least one).
    pub fn ready(&self) -> bool {
        let mut serving = self
            .slots
            .iter()
            .filter(|slot| slot.role == Role::Serving && slot.generation == self.generation)
            .peekable();
        serving.peek().is_some()
            && serving.all(|slot| slot.worker.is_some_and(|worker| worker.is_ready()))
    }

    /// Healthy for the systemd watchdog: some ready worker accepts and none beats later than
    /// three of its heartbeat intervals (at least a second). `paused`: WINCH emptied the
    /// pool on purpose, and the master itself is the service.
    pub fn healthy(&self, paused: bool, observe: impl Fn(usize) -> Observed) -> bool {
        let mut accepting = false;
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(worker) = slot.worker.filter(Running::is_ready) else { continue };
            let seen = observe(index);
            if let Some(beat) = worker.watch.beat
                && seen.silent > (beat * 3).max(Duration::from_secs(1))
            {
                return false;
            }
            accepting |= seen.accepting;
        }
        accepting || paused
    }

    /// The worker of `slot` was forked as `pid` at `now`, for the serving generation.
    pub fn spawned(&mut self, slot: usize, pid: Pid, now: Instant, watch: Watch) {
        let entry = &mut self.slots[slot];
        entry.generation = self.generation;
        entry.respawn_at = None;
        entry.recycling = Recycling::No;
        entry.worker = Some(Running { pid, started: now, health: Health::Booting, watch });
    }

    /// Forking the worker of `slot` failed at `now`: retry with backoff. Returns the delay.
    pub fn spawn_failed(&mut self, slot: usize, now: Instant, jitter: f64) -> Duration {
        self.slots[slot].exited(now, jitter)
    }

    /// The worker of `slot` said `Ready` on its channel. Returns whether that is news (it was
    /// booting).
    pub fn worker_ready(&mut self, slot: usize) -> bool {
        match self.slots.get_mut(slot).and_then(|entry| entry.worker.as_mut()) {
            Some(worker) if worker.health == Health::Booting => {
                worker.health = Health::Ready;
                true
            }
            _ => false,
        }
    }

    /// The worker of `slot` was reaped at `now`, having ended as `exit`: what that means,
    /// under `lifecycle`. `jitter` (0 to 1) stretches a crash loop's backoff.
    pub fn exited(
        &mut self,
        slot: usize,
        exit: WorkerExit,
        now: Instant,
        jitter: f64,
        lifecycle: Lifecycle,
    ) -> Fate {
        let keeps = self.keeps(&self.slots[slot], lifecycle);
        let entry = &mut self.slots[slot];
        // A replacement: an earlier worker of the slot's generation booted in it.
        let replacement = entry.booted;
        entry.booted |= entry.worker.is_some_and(|worker| worker.is_ready());
        let delay = entry.exited(now, jitter);
        let recycling = std::mem::take(&mut entry.recycling);
        let fate = match (entry.role, lifecycle) {
            (Role::Retiring { .. }, _) => Fate::Retired,
            (Role::Serving, _) if keeps && matches!(recycling, Recycling::By(_)) => Fate::Replaced,
            (_, Lifecycle::Stopping { .. }) => return Fate::Stopping,
            (_, Lifecycle::Reloading { generation, .. }) if generation == entry.generation => {
                Fate::StartFailed
            }
            // Only a slot's first worker: once one booted there, its replacement failing to
            // boot is a crash, even before the master marked itself serving.
            (_, Lifecycle::Starting { .. }) if exit == WorkerExit::BootFailure && !replacement => {
                Fate::BootFailure
            }
            _ if keeps => return Fate::Respawn { delay, failures: entry.failures },
            _ => Fate::Dropped,
        };
        if matches!(fate, Fate::Retired | Fate::StartFailed | Fate::Replaced) {
            entry.role = Role::Free;
        }
        entry.respawn_at = None;
        fate
    }

    /// Whether the dead worker's per-client records of `slot` are released; until they
    /// are, the slot is neither reused nor respawned.
    pub fn set_reclaimed(&mut self, slot: usize, released: bool) {
        self.slots[slot].needs_reclaim = !released;
    }

    /// Slots whose dead worker's per-client records are still to be released.
    pub fn unreclaimed(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&slot| self.slots[slot].needs_reclaim).collect()
    }

    /// A turn of the loop at `now`: the hang ladder, retirements past their deadline,
    /// respawns that are due. `silence(slot)` is the time since that worker's last heartbeat
    /// (asked only of ready workers with a hang timeout).
    pub fn on_tick(
        &mut self,
        now: Instant,
        lifecycle: Lifecycle,
        silence: impl Fn(usize) -> Duration,
    ) -> Vec<PoolAction> {
        let mut actions = Vec::new();
        if lifecycle.is_stopping() {
            return actions;
        }
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            let Some(worker) = entry.worker.as_mut() else { continue };
            let Some(timeout) = worker.watch.hang_timeout else { continue };
            let (signal, why) = match worker.health {
                Health::Ready => {
                    let silent = silence(slot);
                    if silent <= timeout {
                        continue;
                    }
                    worker.health = Health::Aborted { kill_at: now + ABORT_GRACE };
                    (Signal::SIGABRT, Why::Hung { silent, timeout })
                }
                Health::Aborted { kill_at } if now >= kill_at => {
                    worker.health = Health::Killed;
                    (Signal::SIGKILL, Why::SurvivedAbort)
                }
                Health::Booting | Health::Aborted { .. } | Health::Killed => continue,
            };
            actions.push(PoolAction::Signal { slot, pid: worker.pid, signal, why });
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].recycling == Recycling::Wanted
                && self.keeps(&self.slots[slot], lifecycle)
            {
                self.start_replacement(slot, now);
            }
        }
        for slot in 0..self.slots.len() {
            let keeps = self.keeps(&self.slots[slot], lifecycle);
            let entry = &mut self.slots[slot];
            if entry.needs_reclaim {
                continue;
            }
            match (entry.role, entry.worker) {
                (Role::Retiring { kill_at: Some(at), fast }, worker) if now >= at => {
                    entry.role = Role::Retiring { kill_at: None, fast };
                    if let Some(worker) = worker {
                        let (pid, signal, why) = (worker.pid, Signal::SIGKILL, Why::Overdue);
                        actions.push(PoolAction::Signal { slot, pid, signal, why });
                    }
                }
                (Role::Serving, None) if keeps && entry.respawn_at.is_some_and(|at| now >= at) => {
                    actions.push(PoolAction::Spawn { slot });
                }
                _ => {}
            }
        }
        actions
    }

    /// The earliest time the pool needs a turn of the loop, if any: a respawn, a retry to
    /// release records, a SIGKILL due, the next heartbeat check.
    pub fn deadline(&self, now: Instant, lifecycle: Lifecycle) -> Option<Instant> {
        if lifecycle.is_stopping() {
            return None;
        }
        let mut deadlines = Vec::new();
        for slot in &self.slots {
            if slot.needs_reclaim
                || (slot.recycling == Recycling::Wanted && self.keeps(slot, lifecycle))
            {
                // Records to release, or a replacement waiting for a free slot.
                deadlines.push(now + RECLAIM_RETRY);
                continue;
            }
            match (slot.role, slot.worker) {
                (Role::Serving, None) if self.keeps(slot, lifecycle) => {
                    deadlines.extend(slot.respawn_at)
                }
                (Role::Retiring { kill_at: Some(at), .. }, Some(_)) => deadlines.push(at),
                (_, Some(Running { health: Health::Aborted { kill_at }, .. })) => {
                    deadlines.push(kill_at)
                }
                _ => {}
            }
        }
        let shortest = self.slots.iter().filter_map(|s| s.worker?.watch.hang_timeout).min();
        deadlines.extend(shortest.map(|timeout| now + timeout / HANG_CHECKS_PER_TIMEOUT));
        deadlines.into_iter().min()
    }

    /// The worker of `slot` asked at `now` to be replaced (recycling): a free slot of its
    /// generation gets a replacement, forked by the next [`Pool::on_tick`]; the worker is
    /// retired when the replacement is ready ([`Pool::replacement_ready`]). A worker asks
    /// once: the request of one whose generation a starting reload replaces is kept, for
    /// the case that the reload is rolled back.
    pub fn recycle(&mut self, slot: usize, now: Instant, lifecycle: Lifecycle) -> Recycled {
        let entry = &self.slots[slot];
        let asking = entry.worker.is_some_and(|worker| worker.is_ready());
        if !asking
            || entry.role != Role::Serving
            || !lifecycle.keeps_pool()
            || entry.recycling != Recycling::No
        {
            return Recycled::Ignored;
        }
        self.slots[slot].recycling = Recycling::Wanted;
        if !self.keeps(&self.slots[slot], lifecycle) {
            return Recycled::Deferred;
        }
        match self.start_replacement(slot, now) {
            Some(by) => Recycled::Replacing(by),
            None => Recycled::Waiting,
        }
    }

    /// Takes a free slot for the replacement of `slot`'s worker, due now.
    fn start_replacement(&mut self, slot: usize, now: Instant) -> Option<usize> {
        let by = self.free_slot()?;
        self.slots[by].serve(self.generation);
        self.slots[by].respawn_at = Some(now);
        self.slots[slot].recycling = Recycling::By(by);
        Some(by)
    }

    /// The worker of `slot` said `Ready`: if it replaces a worker that asked to be
    /// replaced, that one is retired now (`stop`). Returns its slot and the action.
    pub fn replacement_ready(
        &mut self,
        slot: usize,
        stop: Stop,
        now: Instant,
    ) -> Option<(usize, PoolAction)> {
        let old = self.slots.iter().position(|s| s.recycling == Recycling::By(slot))?;
        let action = self.retire(old, stop, now)?;
        Some((old, action))
    }

    /// Tells the worker of `slot` to stop; a slot without a worker becomes free.
    pub fn retire(&mut self, slot: usize, stop: Stop, now: Instant) -> Option<PoolAction> {
        for other in &mut self.slots {
            if other.recycling == Recycling::By(slot) {
                // Its replacement is retired: it asks again, in effect.
                other.recycling = Recycling::Wanted;
            }
        }
        let entry = &mut self.slots[slot];
        entry.recycling = Recycling::No;
        entry.respawn_at = None;
        let Some(worker) = entry.worker else {
            entry.role = Role::Free;
            return None;
        };
        let (signal, grace, fast) = match stop {
            Stop::Retire(bound) => (Signal::SIGUSR2, bound, false),
            Stop::Graceful(grace) => (Signal::SIGQUIT, Some(grace), false),
            Stop::Fast(grace) => (Signal::SIGTERM, Some(grace), true),
        };
        entry.role = Role::Retiring { kill_at: grace.map(|grace| now + grace), fast };
        Some(PoolAction::Signal { slot, pid: worker.pid, signal, why: Why::Retire })
    }

    fn retire_all(
        &mut self,
        which: impl Fn(&WorkerSlot) -> bool,
        stop: Stop,
        now: Instant,
    ) -> (usize, Vec<PoolAction>) {
        let chosen: Vec<usize> = (0..self.slots.len()).filter(|&i| which(&self.slots[i])).collect();
        let actions = chosen.iter().filter_map(|&slot| self.retire(slot, stop, now)).collect();
        (chosen.len(), actions)
    }

    /// WINCH: retires every serving slot, of any generation. Returns how many.
    pub fn retire_serving(&mut self, stop: Stop, now: Instant) -> (usize, Vec<PoolAction>) {
        self.retire_all(|slot| slot.role == Role::Serving, stop, now)
    }

    /// TTIN: one more worker in the serving generation, forked by the next turn.
    pub fn add_worker(&mut self, now: Instant, lifecycle: Lifecycle) -> Resize {
        let Some(slot) = self.free_slot() else { return Resize::NoFreeSlot };
        self.slots[slot].serve(self.generation);
        self.slots[slot].respawn_at = Some(now);
        Resize::To { target: self.target(lifecycle), actions: Vec::new() }
    }

    /// TTOU: one worker fewer (the last serving slot, or one that asked to be replaced),
    /// at least one stays.
    pub fn remove_worker(&mut self, stop: Stop, now: Instant, lifecycle: Lifecycle) -> Resize {
        let kept: Vec<usize> =
            (0..self.slots.len()).filter(|&i| self.keeps(&self.slots[i], lifecycle)).collect();
        let Some(&last) = kept.last() else { return Resize::NoPool };
        if kept.len() <= 1 {
            return Resize::AtMinimum;
        }
        let asking = kept.iter().rev().find(|&&i| self.slots[i].recycling != Recycling::No);
        let chosen = asking.copied().unwrap_or(last);
        let actions = self.retire(chosen, stop, now).into_iter().collect();
        Resize::To { target: kept.len() - 1, actions }
    }

    /// Whether a reload can start a generation of `wanted` workers now.
    ///
    /// # Errors
    /// [`NoRoom`]: more than the slots fixed at start allow, or too few free while older
    /// generations drain.
    pub fn room_for(&self, wanted: usize) -> Result<(), NoRoom> {
        let most = self.slots.len() / SLOT_HEADROOM;
        if wanted > most {
            return Err(NoRoom::Restart { wanted, most });
        }
        let free = self.slots.iter().filter(|slot| slot.is_free()).count();
        if free < wanted {
            return Err(NoRoom::Busy { wanted, free });
        }
        Ok(())
    }

    /// A reload starts the next generation with `wanted` workers: returns it and its slots
    /// (fewer than `wanted` only without [`Pool::room_for`]); the caller forks each worker,
    /// and [`Pool::roll_back`]s if one cannot be.
    pub fn begin_generation(&mut self, wanted: usize) -> (u64, Vec<usize>) {
        self.generation += 1;
        let mut chosen = Vec::with_capacity(wanted);
        for _ in 0..wanted {
            let Some(slot) = self.free_slot() else { break };
            self.slots[slot].serve(self.generation);
            chosen.push(slot);
        }
        (self.generation, chosen)
    }

    /// The new generation is ready: retires every older serving worker. Returns how many.
    pub fn retire_older(&mut self, stop: Stop, now: Instant) -> (usize, Vec<PoolAction>) {
        let generation = self.generation;
        self.retire_all(|s| s.role == Role::Serving && s.generation < generation, stop, now)
    }

    /// The draining cap: when more than `max` older generations drain gracefully, how many
    /// do and which is the oldest (to [`Pool::hurry`]).
    pub fn over_draining_cap(&self, max: usize) -> Option<(usize, u64)> {
        let mut draining: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| matches!(s.role, Role::Retiring { fast: false, .. }) && s.worker.is_some())
            .filter(|s| s.generation < self.generation)
            .map(|s| s.generation)
            .collect();
        draining.sort_unstable();
        draining.dedup();
        (draining.len() > max).then(|| (draining.len(), draining[0]))
    }

    /// Stops fast every worker of `generation` that drains gracefully.
    pub fn hurry(&mut self, generation: u64, stop: Stop, now: Instant) -> Vec<PoolAction> {
        let which = |s: &WorkerSlot| {
            s.generation == generation && matches!(s.role, Role::Retiring { fast: false, .. })
        };
        self.retire_all(which, stop, now).1
    }

    /// Undoes a starting reload: its workers are stopped (`stop`, fast), the serving
    /// generation is `previous` again, and its pool is filled up to `target` at `now`.
    pub fn roll_back(
        &mut self,
        previous: u64,
        target: usize,
        stop: Stop,
        now: Instant,
    ) -> Vec<PoolAction> {
        let starting = self.generation;
        let (_, actions) =
            self.retire_all(|s| s.role == Role::Serving && s.generation == starting, stop, now);
        self.generation = previous;
        self.fill(target, now);
        actions
    }

    /// Makes every serving slot of the serving generation without a worker due now, and
    /// takes free slots until `target` serve.
    pub fn fill(&mut self, target: usize, now: Instant) {
        let mut serving = 0;
        for slot in &mut self.slots {
            if slot.role == Role::Serving && slot.generation == self.generation {
                serving += 1;
                if slot.worker.is_none() {
                    slot.respawn_at = Some(now);
                }
            }
        }
        while serving < target {
            let Some(slot) = self.free_slot() else { break };
            self.slots[slot].serve(self.generation);
            self.slots[slot].respawn_at = Some(now);
            serving += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::supervisor::Halt;
    use crate::master::table::{MIN_HEALTHY_UPTIME, respawn_delay};

    const GRACE: Duration = Duration::from_secs(10);
    const FAST: Duration = Duration::from_millis(500);
    const RETIRE: Stop = Stop::Retire(None);
    const SERVING: Lifecycle = Lifecycle::Serving;

    fn watch(timeout: Option<Duration>) -> Watch {
        Watch { hang_timeout: timeout, beat: timeout.map(|t| t / 3) }
    }

    /// A pool of `capacity` slots whose first `workers` run (pids 100, 101 ...) and are
    /// ready, at `t0`.
    fn running(capacity: usize, workers: usize) -> (Pool, Instant) {
        let t0 = Instant::now();
        let mut pool = Pool::new(capacity, workers);
        for slot in 0..workers {
            pool.spawned(slot, pid(slot), t0, watch(None));
            assert!(pool.worker_ready(slot));
        }
        (pool, t0)
    }

    fn pid(slot: usize) -> Pid {
        Pid::from_raw(100 + slot as i32)
    }

    fn signal(slot: usize, signal: Signal, why: Why) -> PoolAction {
        PoolAction::Signal { slot, pid: pid(slot), signal, why }
    }

    fn quiet(_: usize) -> Duration {
        Duration::ZERO
    }

    fn reloading(generation: u64, t0: Instant) -> Lifecycle {
        Lifecycle::Reloading { generation, deadline: t0 + GRACE, queued: false }
    }

    #[test]
    fn a_healthy_exit_respawns_at_once_and_a_crash_loop_backs_off_with_the_jitter() {
        let (mut pool, t0) = running(4, 2);
        let later = t0 + MIN_HEALTHY_UPTIME;
        let fate = pool.exited(0, WorkerExit::Clean, later, 0.5, SERVING);
        assert_eq!(fate, Fate::Respawn { delay: Duration::ZERO, failures: 0 });
        assert_eq!(pool.on_tick(later, SERVING, quiet), vec![PoolAction::Spawn { slot: 0 }]);
        assert_eq!(pool.deadline(later, SERVING), Some(later));

        // The replacement dies at once: backoff, stretched by the jitter.
        pool.spawned(0, pid(0), later, watch(None));
        let soon = later + Duration::from_millis(10);
        let fate = pool.exited(0, WorkerExit::Killed(Signal::SIGSEGV), soon, 1.0, SERVING);
        let delay = respawn_delay(1, 1.0);
        assert_eq!(fate, Fate::Respawn { delay, failures: 1 });
        assert_eq!(delay, Duration::from_millis(125));
        assert_eq!(pool.deadline(soon, SERVING), Some(soon + delay));
        assert_eq!(pool.on_tick(soon, SERVING, quiet), vec![], "not before the backoff");
        assert_eq!(pool.on_tick(soon + delay, SERVING, quiet), vec![PoolAction::Spawn { slot: 0 }]);
        assert_eq!(pool.target(SERVING), 2);
    }

    #[test]
    fn a_failed_fork_is_retried_with_backoff() {
        let (mut pool, t0) = running(4, 1);
        pool.exited(0, WorkerExit::Failed(3), t0 + MIN_HEALTHY_UPTIME, 0.0, SERVING);
        let now = t0 + MIN_HEALTHY_UPTIME;
        assert_eq!(pool.spawn_failed(0, now, 0.0), respawn_delay(1, 0.0));
        assert_eq!(pool.spawn_failed(0, now, 0.0), respawn_delay(2, 0.0));
        assert_eq!(pool.on_tick(now, SERVING, quiet), vec![]);
        let due = now + respawn_delay(2, 0.0);
        assert_eq!(pool.on_tick(due, SERVING, quiet), vec![PoolAction::Spawn { slot: 0 }]);
    }

    #[test]
    fn a_retired_worker_frees_its_slot_and_is_not_replaced() {
        let (mut pool, t0) = running(4, 2);
        let action = pool.retire(1, Stop::Graceful(GRACE), t0);
        assert_eq!(action, Some(signal(1, Signal::SIGQUIT, Why::Retire)));
        assert_eq!(pool.exited(1, WorkerExit::Clean, t0, 0.0, SERVING), Fate::Retired);
        assert!(pool.slots()[1].is_free());
        assert_eq!(pool.on_tick(t0 + GRACE, SERVING, quiet), vec![]);
        // A slot without a worker is freed at once.
        pool.exited(0, WorkerExit::Clean, t0 + GRACE, 0.0, SERVING);
        assert_eq!(pool.retire(0, Stop::Fast(FAST), t0 + GRACE), None);
        assert!(pool.slots()[0].is_free());
    }

    #[test]
    fn exits_while_stopping_are_not_replaced_and_nothing_else_happens() {
        let (mut pool, t0) = running(4, 2);
        let stopping =
            Lifecycle::Stopping { how: Halt::Graceful, kill_at: Some(t0 + GRACE), killed: false };
        assert_eq!(pool.exited(0, WorkerExit::Clean, t0, 0.0, stopping), Fate::Stopping);
        assert_eq!(pool.on_tick(t0 + GRACE * 2, stopping, quiet), vec![]);
        assert_eq!(pool.deadline(t0, stopping), None);
        assert_eq!(pool.live(), 1);
    }

    #[test]
    fn a_worker_of_a_starting_generation_dying_rolls_the_reload_back() {
        let (mut pool, t0) = running(8, 2);
        let (generation, slots) = pool.begin_generation(2);
        assert_eq!((generation, slots.clone()), (2, vec![2, 3]));
        for &slot in &slots {
            pool.spawned(slot, pid(slot), t0, watch(None));
        }
        let lifecycle = reloading(2, t0);
        // An old worker's death is an ordinary exit of a generation that no longer serves.
        assert_eq!(pool.exited(0, WorkerExit::Clean, t0, 0.0, lifecycle), Fate::Dropped);
        let fate = pool.exited(3, WorkerExit::BootFailure, t0, 0.0, lifecycle);
        assert_eq!(fate, Fate::StartFailed, "not a stop: the old generation serves on");
        assert!(pool.slots()[3].is_free());
        let actions = pool.roll_back(1, 2, Stop::Fast(FAST), t0);
        assert_eq!(actions, vec![signal(2, Signal::SIGTERM, Why::Retire)]);
        assert_eq!(pool.generation(), 1);
        // Slot 0 of generation 1 died meanwhile: it is respawned now.
        assert_eq!(pool.on_tick(t0, SERVING, quiet), vec![PoolAction::Spawn { slot: 0 }]);
        assert_eq!(pool.target(SERVING), 2);
    }

    #[test]
    fn a_worker_that_cannot_boot_at_start_stops_the_daemon_and_later_backs_off() {
        let (mut pool, t0) = running(4, 2);
        let starting = Lifecycle::Starting { queued: false };
        assert_eq!(pool.exited(1, WorkerExit::BootFailure, t0, 0.0, starting), Fate::BootFailure);
        assert_eq!(pool.on_tick(t0 + GRACE, starting, quiet), vec![]);
        // Once the generation served, a replacement that cannot boot (its service's hook
        // failed: a database down) is a crash loop: backoff, however long it took to fail.
        let later = t0 + MIN_HEALTHY_UPTIME * 5;
        pool.exited(0, WorkerExit::Clean, later, 0.0, SERVING);
        pool.spawned(0, pid(0), later, watch(None));
        let failed = later + MIN_HEALTHY_UPTIME * 2;
        let fate = pool.exited(0, WorkerExit::BootFailure, failed, 0.0, SERVING);
        assert_eq!(fate, Fate::Respawn { delay: respawn_delay(1, 0.0), failures: 1 });
        assert_eq!(pool.deadline(failed, SERVING), Some(failed + respawn_delay(1, 0.0)));
    }

    #[test]
    fn a_replacement_that_cannot_boot_while_the_daemon_starts_is_a_crash() {
        let starting = Lifecycle::Starting { queued: false };
        let mut pool = Pool::new(4, 2);
        let t0 = Instant::now();
        for slot in 0..2 {
            pool.spawned(slot, pid(slot), t0, watch(None));
        }
        // Slot 0 booted, then died (killed) before slot 1 was ready: the master is still
        // starting, and respawns it.
        assert!(pool.worker_ready(0));
        let killed = WorkerExit::Killed(Signal::SIGKILL);
        assert!(matches!(pool.exited(0, killed, t0, 0.0, starting), Fate::Respawn { .. }));
        pool.spawned(0, pid(10), t0, watch(None));
        // Its replacement cannot boot: a crash loop's backoff, not a stop.
        let fate = pool.exited(0, WorkerExit::BootFailure, t0, 0.0, starting);
        assert_eq!(fate, Fate::Respawn { delay: respawn_delay(2, 0.0), failures: 2 });
        // Slot 1's first worker cannot boot: the daemon's start failed.
        assert_eq!(pool.exited(1, WorkerExit::BootFailure, t0, 0.0, starting), Fate::BootFailure);
    }

    #[test]
    fn an_old_generation_or_a_paused_pool_is_not_respawned() {
        let (mut pool, t0) = running(8, 2);
        pool.begin_generation(2);
        assert_eq!(pool.exited(0, WorkerExit::Clean, t0, 0.0, SERVING), Fate::Dropped);
        let (mut pool, t0) = running(8, 2);
        let paused = Lifecycle::Paused;
        let (count, actions) = pool.retire_serving(Stop::Graceful(GRACE), t0);
        assert_eq!(count, 2);
        assert_eq!(
            actions,
            vec![signal(0, Signal::SIGQUIT, Why::Retire), signal(1, Signal::SIGQUIT, Why::Retire)]
        );
        assert_eq!(pool.exited(0, WorkerExit::Clean, t0, 0.0, paused), Fate::Retired);
        assert_eq!(pool.target(paused), 0);
        assert_eq!(pool.remove_worker(Stop::Graceful(GRACE), t0, paused), Resize::NoPool);
        // HUP resumes: the pool is filled again.
        pool.fill(2, t0);
        let spawns = pool.on_tick(t0, SERVING, quiet);
        assert_eq!(spawns.len(), 2, "{spawns:?}");
    }

    #[test]
    fn a_generation_is_ready_once_each_of_its_workers_said_so() {
        let t0 = Instant::now();
        let mut pool = Pool::new(4, 2);
        assert!(!pool.ready());
        assert!(!pool.worker_ready(0), "no worker yet");
        pool.spawned(0, pid(0), t0, watch(None));
        pool.spawned(1, pid(1), t0, watch(None));
        assert!(pool.worker_ready(0));
        assert!(!pool.worker_ready(0), "once");
        assert!(!pool.ready(), "slot 1 still boots");
        assert!(pool.worker_ready(1));
        assert!(pool.ready());
        // A reload's generation is ready on its own workers only.
        let (_, slots) = pool.begin_generation(2);
        assert!(!pool.ready());
        for slot in slots {
            pool.spawned(slot, pid(slot), t0, watch(None));
            pool.worker_ready(slot);
        }
        assert!(pool.ready());
        // A dead worker's replacement must say it again.
        pool.exited(2, WorkerExit::Clean, t0, 0.0, SERVING);
        assert!(!pool.ready());
        pool.spawned(2, pid(2), t0, watch(None));
        assert!(!pool.ready());
        assert!(!Pool::new(4, 0).ready(), "an empty generation is never ready");
    }

    #[test]
    fn a_retiring_worker_is_killed_once_at_its_deadline() {
        let (mut pool, t0) = running(4, 2);
        pool.retire(0, Stop::Graceful(GRACE), t0);
        let fast = pool.retire(1, Stop::Fast(FAST), t0);
        assert_eq!(fast, Some(signal(1, Signal::SIGTERM, Why::Retire)));
        assert_eq!(pool.deadline(t0, SERVING), Some(t0 + FAST));
        assert_eq!(
            pool.on_tick(t0 + FAST, SERVING, quiet),
            vec![signal(1, Signal::SIGKILL, Why::Overdue)]
        );
        assert_eq!(pool.deadline(t0 + FAST, SERVING), Some(t0 + GRACE), "killed once");
        assert_eq!(
            pool.on_tick(t0 + GRACE, SERVING, quiet),
            vec![signal(0, Signal::SIGKILL, Why::Overdue)]
        );
        assert_eq!(pool.on_tick(t0 + GRACE * 2, SERVING, quiet), vec![]);
        assert_eq!(pool.deadline(t0 + GRACE, SERVING), None);
    }

    #[test]
    fn a_hung_worker_gets_abort_then_kill_once_each_and_a_booting_one_is_not_judged() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(6);
        let mut pool = Pool::new(4, 2);
        pool.spawned(0, pid(0), t0, watch(Some(timeout)));
        pool.spawned(1, pid(1), t0, watch(Some(timeout)));
        pool.worker_ready(0);
        let silent = timeout + Duration::from_millis(1);
        assert_eq!(pool.deadline(t0, SERVING), Some(t0 + timeout / 4), "checked 4 times a timeout");
        assert_eq!(pool.on_tick(t0, SERVING, |_| timeout), vec![], "not older than the timeout");
        let hung = pool.on_tick(t0, SERVING, |_| silent);
        assert_eq!(hung, vec![signal(0, Signal::SIGABRT, Why::Hung { silent, timeout })]);
        assert_eq!(pool.on_tick(t0, SERVING, |_| silent), vec![], "one SIGABRT");
        assert_eq!(pool.deadline(t0, SERVING), Some(t0 + timeout / 4));
        let later = t0 + ABORT_GRACE;
        assert_eq!(
            pool.on_tick(later, SERVING, |_| silent),
            vec![signal(0, Signal::SIGKILL, Why::SurvivedAbort)]
        );
        assert_eq!(pool.on_tick(later + GRACE, SERVING, |_| silent), vec![], "one SIGKILL");
        // Still ready (hung is not booting); its reap replaces it.
        assert!(!pool.ready(), "slot 1 boots");
        let fate = pool.exited(0, WorkerExit::Killed(Signal::SIGKILL), later, 0.0, SERVING);
        assert!(matches!(fate, Fate::Respawn { .. }), "{fate:?}");
        // Without a timeout nothing is judged.
        let (mut pool, t0) = running(2, 1);
        assert_eq!(pool.on_tick(t0, SERVING, |_| GRACE * 100), vec![]);
        assert_eq!(pool.deadline(t0, SERVING), None);
    }

    #[test]
    fn ttin_takes_a_free_slot_until_none_is_left() {
        let (mut pool, t0) = running(3, 1);
        for target in [2, 3] {
            assert_eq!(pool.add_worker(t0, SERVING), Resize::To { target, actions: vec![] });
        }
        assert_eq!(pool.add_worker(t0, SERVING), Resize::NoFreeSlot);
        assert_eq!(
            pool.on_tick(t0, SERVING, quiet),
            vec![PoolAction::Spawn { slot: 1 }, PoolAction::Spawn { slot: 2 }]
        );
    }

    #[test]
    fn ttou_retires_the_last_serving_worker_but_never_the_only_one() {
        let (mut pool, t0) = running(4, 3);
        let stop = Stop::Graceful(GRACE);
        assert_eq!(
            pool.remove_worker(stop, t0, SERVING),
            Resize::To { target: 2, actions: vec![signal(2, Signal::SIGQUIT, Why::Retire)] }
        );
        assert_eq!(
            pool.remove_worker(stop, t0, SERVING),
            Resize::To { target: 1, actions: vec![signal(1, Signal::SIGQUIT, Why::Retire)] }
        );
        assert_eq!(pool.remove_worker(stop, t0, SERVING), Resize::AtMinimum);
        assert_eq!(pool.target(SERVING), 1);
        // A retiring slot is not free until reaped.
        assert_eq!(pool.add_worker(t0, SERVING), Resize::To { target: 2, actions: vec![] });
        assert_eq!(pool.add_worker(t0, SERVING), Resize::NoFreeSlot);
    }

    #[test]
    fn a_reload_needs_slots_sized_at_start_and_free_now() {
        // Room for 2 workers x SLOT_HEADROOM x 2 generations.
        let capacity = 2 * SLOT_HEADROOM * 2;
        let (mut pool, t0) = running(capacity, 2);
        let most = capacity / SLOT_HEADROOM;
        assert_eq!(pool.room_for(most + 1), Err(NoRoom::Restart { wanted: most + 1, most }));
        assert_eq!(pool.room_for(most), Ok(()));
        let (_, slots) = pool.begin_generation(most);
        for &slot in &slots {
            pool.spawned(slot, pid(slot), t0, watch(None));
        }
        let free = capacity - 2 - most;
        assert_eq!(pool.room_for(most), Err(NoRoom::Busy { wanted: most, free }));
        assert!(NoRoom::Busy { wanted: 4, free: 1 }.to_string().contains("try again shortly"));
    }

    #[test]
    fn a_completed_reload_retires_the_older_generation_gracefully() {
        let (mut pool, t0) = running(8, 2);
        let (_, slots) = pool.begin_generation(2);
        for &slot in &slots {
            pool.spawned(slot, pid(slot), t0, watch(None));
            pool.worker_ready(slot);
        }
        let (count, actions) = pool.retire_older(Stop::Graceful(GRACE), t0);
        assert_eq!(count, 2);
        assert_eq!(
            actions,
            vec![signal(0, Signal::SIGQUIT, Why::Retire), signal(1, Signal::SIGQUIT, Why::Retire)]
        );
        assert_eq!(pool.target(SERVING), 2);
        assert_eq!(pool.over_draining_cap(1), None);
    }

    #[test]
    fn the_draining_cap_stops_the_oldest_generation_fast() {
        let (mut pool, t0) = running(12, 2);
        for _ in 0..2 {
            let (_, slots) = pool.begin_generation(2);
            for &slot in &slots {
                pool.spawned(slot, pid(slot), t0, watch(None));
            }
            pool.retire_older(Stop::Graceful(GRACE), t0);
        }
        // Generations 1 and 2 drain while 3 serves.
        assert_eq!(pool.over_draining_cap(2), None);
        assert_eq!(pool.over_draining_cap(1), Some((2, 1)));
        let actions = pool.hurry(1, Stop::Fast(FAST), t0);
        assert_eq!(
            actions,
            vec![signal(0, Signal::SIGTERM, Why::Retire), signal(1, Signal::SIGTERM, Why::Retire)]
        );
        assert_eq!(pool.over_draining_cap(1), None, "a fast stop is not draining");
        assert_eq!(pool.deadline(t0, SERVING), Some(t0 + FAST));
    }

    #[test]
    fn records_not_yet_released_hold_the_slot_and_are_retried() {
        let (mut pool, t0) = running(2, 1);
        pool.exited(0, WorkerExit::Clean, t0 + MIN_HEALTHY_UPTIME, 0.0, SERVING);
        pool.set_reclaimed(0, false);
        assert_eq!(pool.unreclaimed(), vec![0]);
        let now = t0 + MIN_HEALTHY_UPTIME;
        assert_eq!(pool.on_tick(now, SERVING, quiet), vec![], "no respawn over live records");
        assert_eq!(pool.deadline(now, SERVING), Some(now + RECLAIM_RETRY));
        pool.set_reclaimed(0, true);
        assert_eq!(pool.unreclaimed(), Vec::<usize>::new());
        assert_eq!(pool.on_tick(now, SERVING, quiet), vec![PoolAction::Spawn { slot: 0 }]);
        // A freed slot with records left is not reused either.
        let (mut pool, t0) = running(2, 1);
        pool.retire(0, Stop::Fast(FAST), t0);
        pool.exited(0, WorkerExit::Clean, t0, 0.0, SERVING);
        pool.set_reclaimed(0, false);
        assert!(!pool.slots()[0].is_free());
        assert_eq!(pool.add_worker(t0, SERVING), Resize::To { target: 1, actions: vec![] });
        assert_eq!(pool.add_worker(t0, SERVING), Resize::NoFreeSlot);
    }

    #[test]
    fn a_worker_asking_to_be_replaced_drains_once_its_replacement_is_ready() {
        let (mut pool, t0) = running(8, 2);
        assert_eq!(pool.recycle(0, t0, SERVING), Recycled::Replacing(2));
        assert_eq!(pool.recycle(0, t0, SERVING), Recycled::Ignored, "asked already");
        assert_eq!(pool.on_tick(t0, SERVING, quiet), vec![PoolAction::Spawn { slot: 2 }]);
        pool.spawned(2, pid(2), t0, watch(None));
        assert_eq!(pool.target(SERVING), 3, "the pool never runs short meanwhile");
        assert_eq!(pool.replacement_ready(1, RETIRE, t0), None, "not 1's");
        assert!(pool.worker_ready(2));
        let retired = pool.replacement_ready(2, RETIRE, t0);
        assert_eq!(retired, Some((0, signal(0, Signal::SIGUSR2, Why::Retire))));
        assert_eq!(pool.target(SERVING), 2);
        assert_eq!(pool.exited(0, WorkerExit::Clean, t0, 0.0, SERVING), Fate::Retired);
        assert!(pool.slots()[0].is_free());
        assert_eq!(pool.on_tick(t0, SERVING, quiet), vec![]);
        // The replacement is a worker like any other: it may ask in its turn.
        assert_eq!(pool.recycle(2, t0, SERVING), Recycled::Replacing(0));
    }

    #[test]
    fn a_recycling_worker_that_dies_first_is_not_respawned_and_a_retired_replacement_is_redone() {
        let (mut pool, t0) = running(8, 2);
        assert_eq!(pool.recycle(0, t0, SERVING), Recycled::Replacing(2));
        pool.on_tick(t0, SERVING, quiet);
        pool.spawned(2, pid(2), t0, watch(None));
        let fate = pool.exited(0, WorkerExit::Killed(Signal::SIGSEGV), t0, 0.0, SERVING);
        assert_eq!(fate, Fate::Replaced, "its replacement is on its way");
        assert!(pool.slots()[0].is_free());
        assert!(pool.worker_ready(2));
        assert_eq!(pool.replacement_ready(2, RETIRE, t0), None);
        assert_eq!(pool.target(SERVING), 2);
        // Slot 1 asks and TTOU comes: the worker that asked is the one retired, and its
        // replacement (slot 0) stays.
        assert_eq!(pool.recycle(1, t0, SERVING), Recycled::Replacing(0));
        let resize = pool.remove_worker(RETIRE, t0, SERVING);
        assert_eq!(
            resize,
            Resize::To { target: 2, actions: vec![signal(1, Signal::SIGUSR2, Why::Retire)] }
        );
        // A replacement retired before it is ready (a reload would): the worker asks again.
        let (mut pool, t0) = running(8, 2);
        assert_eq!(pool.recycle(0, t0, SERVING), Recycled::Replacing(2));
        pool.on_tick(t0, SERVING, quiet);
        pool.spawned(2, pid(2), t0, watch(None));
        pool.retire(2, Stop::Fast(FAST), t0);
        assert_eq!(pool.slots()[0].recycling, Recycling::Wanted);
        assert_eq!(pool.on_tick(t0, SERVING, quiet), vec![PoolAction::Spawn { slot: 3 }]);
        assert_eq!(pool.slots()[0].recycling, Recycling::By(3));
    }

    #[test]
    fn a_replacement_waits_for_a_free_slot_and_only_serving_ready_workers_are_recycled() {
        let (mut pool, t0) = running(2, 2);
        assert_eq!(pool.recycle(1, t0, SERVING), Recycled::Waiting);
        assert_eq!(pool.deadline(t0, SERVING), Some(t0 + RECLAIM_RETRY), "looked at again");
        assert_eq!(pool.on_tick(t0, SERVING, quiet), vec![]);
        assert_eq!(
            pool.remove_worker(RETIRE, t0, SERVING),
            Resize::To { target: 1, actions: vec![signal(1, Signal::SIGUSR2, Why::Retire)] }
        );
        assert_eq!(pool.deadline(t0, SERVING), None, "retired without a bound: nothing is due");
        // Not while stopping, paused, in an old generation, or booting.
        let (mut pool, t0) = running(8, 2);
        let stopping =
            Lifecycle::Stopping { how: Halt::Graceful, kill_at: Some(t0 + GRACE), killed: false };
        assert_eq!(pool.recycle(0, t0, stopping), Recycled::Ignored);
        assert_eq!(pool.recycle(0, t0, Lifecycle::Paused), Recycled::Ignored);
        pool.begin_generation(2);
        assert_eq!(pool.recycle(0, t0, reloading(2, t0)), Recycled::Deferred, "old generation");
        assert_eq!(pool.on_tick(t0, reloading(2, t0), quiet), vec![], "while the reload starts");
        pool.retire_older(RETIRE, t0);
        assert_eq!(pool.slots()[0].recycling, Recycling::No, "retired: nothing more to do");
        let mut pool = Pool::new(4, 1);
        pool.spawned(0, pid(0), t0, watch(None));
        assert_eq!(pool.recycle(0, t0, SERVING), Recycled::Ignored, "still booting");
        // A waiting request goes once a slot is free.
        let (mut pool, t0) = running(3, 2);
        assert_eq!(pool.recycle(0, t0, SERVING), Recycled::Replacing(2));
        assert_eq!(pool.recycle(1, t0, SERVING), Recycled::Waiting);
        pool.on_tick(t0, SERVING, quiet);
        pool.spawned(2, pid(2), t0, watch(None));
        pool.worker_ready(2);
        pool.replacement_ready(2, RETIRE, t0);
        pool.exited(0, WorkerExit::Clean, t0, 0.0, SERVING);
        assert_eq!(pool.on_tick(t0, SERVING, quiet), vec![PoolAction::Spawn { slot: 0 }]);
        assert_eq!(pool.slots()[1].recycling, Recycling::By(0));
    }

    #[test]
    fn a_request_made_while_a_reload_starts_is_kept_if_the_reload_is_rolled_back() {
        let (mut pool, t0) = running(8, 2);
        let (generation, _) = pool.begin_generation(2);
        let lifecycle = reloading(generation, t0);
        assert_eq!(pool.recycle(1, t0, lifecycle), Recycled::Deferred);
        assert_eq!(pool.recycle(1, t0, lifecycle), Recycled::Ignored, "asked already");
        pool.roll_back(1, 2, Stop::Fast(FAST), t0);
        // Generation 1 serves again: the worker, which asks only once, is replaced.
        assert_eq!(pool.on_tick(t0, SERVING, quiet), vec![PoolAction::Spawn { slot: 2 }]);
        assert_eq!(pool.slots()[1].recycling, Recycling::By(2));
    }

    #[test]
    fn the_watchdog_wants_an_accepting_worker_and_fresh_heartbeats() {
        let t0 = Instant::now();
        let mut pool = Pool::new(2, 2);
        let beat = Duration::from_secs(1);
        let fresh = |_| Observed { silent: Duration::ZERO, accepting: true };
        assert!(!pool.healthy(false, fresh), "nobody accepts yet");
        assert!(pool.healthy(true, fresh), "paused by WINCH on purpose");
        let timeout = Some(beat * 3);
        for slot in 0..2 {
            pool.spawned(slot, pid(slot), t0, Watch { hang_timeout: timeout, beat: Some(beat) });
        }
        pool.worker_ready(0);
        assert!(pool.healthy(false, fresh));
        let stale = |slot| Observed { silent: beat * 3 + beat * slot as u32, accepting: true };
        assert!(pool.healthy(false, stale), "exactly three beats is not stale");
        pool.worker_ready(1);
        assert!(!pool.healthy(false, stale), "slot 1 is four beats late");
        let draining = |_| Observed { silent: Duration::ZERO, accepting: false };
        assert!(!pool.healthy(false, draining));
    }
}
