//! The master's worker table, one slot at a time: what a slot holds, respawn backoff, exit
//! classification.
//!
//! Runs in the master. Pure: no system calls, time passed in. The policy over the whole
//! table (which slot to respawn, retire or escalate) is `pool.rs`; this file holds what one
//! slot is and the transitions that concern it alone. Invariants:
//! - a slot's [`Running`] worker exists exactly from the fork to the reap;
//! - a slot with a worker is never [`Role::Free`]; a [`Role::Retiring`] slot always has one
//!   (retiring a slot without a worker frees it);
//! - a slot is reused only when [`WorkerSlot::is_free`]: its dead worker's per-client records
//!   are released first.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::exit::{WORKER_BOOT_FAILURE, WORKER_EXIT_OK};

/// A worker that lived less than this before exiting counts as a crash-loop failure.
pub const MIN_HEALTHY_UPTIME: Duration = Duration::from_secs(1);
/// First respawn delay of a crash loop; doubles with each further failure.
pub const RESPAWN_BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest respawn delay of a crash loop.
pub const RESPAWN_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What a slot is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    /// Unused: available for a new worker.
    #[default]
    Free,
    /// Part of a generation's pool: respawned when it dies, while its generation serves.
    Serving,
    /// Told to stop (graceful or fast); becomes free when reaped. `kill_at` is when SIGKILL
    /// follows (`None` once sent); `fast` when it was sent SIGTERM rather than SIGQUIT.
    Retiring {
        /// When to send SIGKILL.
        kill_at: Option<Instant>,
        /// Fast stop (TERM) rather than graceful (QUIT).
        fast: bool,
    },
}

/// Whether a slot's worker asked to be replaced (recycling: `daemon.recycle_*`), and how
/// far that is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recycling {
    /// Not asked.
    #[default]
    No,
    /// Asked; its replacement waits for a free slot.
    Wanted,
    /// Its replacement boots in this slot; the worker is retired once that one is ready.
    By(usize),
}

/// Where a live worker stands with the master: booting, ready, or on the hang ladder
/// (SIGABRT for a core dump, then SIGKILL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Forked, and has not said `Ready` on its channel yet: its heartbeat is not judged.
    Booting,
    /// Said `Ready`: it accepts, and its heartbeat is watched.
    Ready,
    /// Hung: it was sent SIGABRT; SIGKILL follows at `kill_at`.
    Aborted {
        /// When SIGKILL follows.
        kill_at: Instant,
    },
    /// Hung, and sent SIGKILL after surviving SIGABRT: only the reap is left.
    Killed,
}

/// What a worker is judged by, fixed when it is forked (a reload may change them for later
/// workers only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watch {
    /// No heartbeat for longer than this is a hang (`worker_timeout`; `None`: never).
    pub hang_timeout: Option<Duration>,
    /// How often it beats (`None`: only on activity).
    pub beat: Option<Duration>,
}

/// The live worker of a slot, from the fork to the reap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Its process.
    pub pid: Pid,
    /// When it was forked.
    pub started: Instant,
    /// Booting, ready, or hung.
    pub health: Health,
    /// Its hang timeout and heartbeat interval.
    pub watch: Watch,
}

impl Running {
    /// It said `Ready` on its channel (and may since have hung).
    pub fn is_ready(&self) -> bool {
        self.health != Health::Booting
    }
}

/// One worker slot. The slot index is also the worker's record range in the limits table and
/// its entry in the scoreboard.
#[derive(Debug, Clone, Default)]
pub struct WorkerSlot {
    /// What the slot is for.
    pub role: Role,
    /// Configuration generation of the slot (of its worker, while it has one).
    pub generation: u64,
    /// The live worker, if any.
    pub worker: Option<Running>,
    /// Consecutive exits within [`MIN_HEALTHY_UPTIME`].
    pub failures: u32,
    /// When to fork a replacement, if one is due (only without a worker).
    pub respawn_at: Option<Instant>,
    /// The dead worker's per-client records could not be released yet: the slot is not
    /// reused until they are (a new worker would overwrite records still counted).
    pub needs_reclaim: bool,
    /// Whether its worker asked to be replaced.
    pub recycling: Recycling,
    /// A worker of this slot's generation said `Ready` in it and has since exited: the next
    /// one is a replacement, and if it cannot boot that is a crash, not the daemon's start
    /// failing.
    pub booted: bool,
}

impl WorkerSlot {
    /// The live worker's pid.
    pub fn pid(&self) -> Option<Pid> {
        self.worker.map(|worker| worker.pid)
    }

    /// Unused and reusable: no worker, not serving, no per-client records left to release.
    pub fn is_free(&self) -> bool {
        self.role == Role::Free && self.worker.is_none() && !self.needs_reclaim
    }

    /// Makes the slot part of `generation`'s pool, with a fresh crash-loop count; the caller
    /// forks its worker or sets `respawn_at`.
    pub fn serve(&mut self, generation: u64) {
        self.role = Role::Serving;
        self.generation = generation;
        self.failures = 0;
        self.booted = false;
    }

    /// Records an exit at `now` and schedules the replacement: at once after a healthy life,
    /// with exponential backoff (and `jitter`, from 0 to 1) in a crash loop. A life is
    /// healthy when the worker said `Ready` and lived [`MIN_HEALTHY_UPTIME`]: one that never
    /// booted (a service's `after_fork` hook that took long to fail) is a quick exit however
    /// long it took. Returns the delay chosen. (Whether the replacement happens is the
    /// pool's decision.)
    pub fn exited(&mut self, now: Instant, jitter: f64) -> Duration {
        let healthy = self.worker.take().is_some_and(|worker| {
            worker.is_ready() && now.saturating_duration_since(worker.started) >= MIN_HEALTHY_UPTIME
        });
        self.failures = if healthy { 0 } else { self.failures.saturating_add(1) };
        let delay = respawn_delay(self.failures, jitter);
        self.respawn_at = Some(now + delay);
        delay
    }
}

/// Delay before the next respawn after `failures` consecutive quick exits: none for 0, then
/// [`RESPAWN_BACKOFF_BASE`] doubling up to [`RESPAWN_BACKOFF_MAX`], each stretched by up to
/// 25% of `jitter` (0 to 1) so a pool of crashing workers does not retry in lockstep.
pub fn respawn_delay(failures: u32, jitter: f64) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doubled = RESPAWN_BACKOFF_BASE.saturating_mul(1u32 << (failures - 1).min(16));
    doubled.min(RESPAWN_BACKOFF_MAX).mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0))
}

/// How a worker ended, from `waitpid(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Exit status [`WORKER_EXIT_OK`].
    Clean,
    /// Exit status [`WORKER_BOOT_FAILURE`]: it could not set itself up.
    BootFailure,
    /// Another exit status.
    Failed(i32),
    /// Killed by a signal.
    Killed(Signal),
}

/// The pid and the way it ended, for statuses that mean the process is gone.
pub fn classify(status: WaitStatus) -> Option<(Pid, WorkerExit)> {
    match status {
        WaitStatus::Exited(pid, WORKER_EXIT_OK) => Some((pid, WorkerExit::Clean)),
        WaitStatus::Exited(pid, WORKER_BOOT_FAILURE) => Some((pid, WorkerExit::BootFailure)),
        WaitStatus::Exited(pid, code) => Some((pid, WorkerExit::Failed(code))),
        WaitStatus::Signaled(pid, signal, _) => Some((pid, WorkerExit::Killed(signal))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(respawn_delay(0, 0.0), Duration::ZERO);
        assert_eq!(respawn_delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(respawn_delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(respawn_delay(4, 0.0), Duration::from_millis(800));
        assert_eq!(respawn_delay(40, 0.0), RESPAWN_BACKOFF_MAX);
        assert_eq!(respawn_delay(40, 1.0), RESPAWN_BACKOFF_MAX.mul_f64(1.25));
    }

    #[test]
    fn a_crash_loop_backs_off_and_a_healthy_life_resets_it() {
        let t0 = Instant::now();
        let running = |started| Running {
            pid: Pid::from_raw(10),
            started,
            health: Health::Ready,
            watch: Watch::default(),
        };
        let mut slot = WorkerSlot { worker: Some(running(t0)), ..Default::default() };
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..5 {
            now += Duration::from_millis(10);
            delays.push(slot.exited(now, 0.0));
            slot.worker = Some(running(now));
        }
        assert_eq!(delays, [100, 200, 400, 800, 1600].map(Duration::from_millis));
        // Crashes per second stay bounded: five quick failures took over three seconds.
        assert!(delays.iter().sum::<Duration>() > Duration::from_secs(3));
        now += MIN_HEALTHY_UPTIME * 2;
        assert_eq!(slot.exited(now, 0.0), Duration::ZERO);
        assert_eq!(slot.failures, 0);
        assert_eq!(slot.pid(), None);
        // A worker that never said Ready failed to boot, however long that took.
        slot.worker = Some(Running { health: Health::Booting, ..running(now) });
        now += MIN_HEALTHY_UPTIME * 2;
        assert_eq!(slot.exited(now, 0.0), Duration::from_millis(100));
        assert_eq!(slot.failures, 1);
    }

    #[test]
    fn exits_are_classified() {
        let pid = Pid::from_raw(7);
        assert_eq!(classify(WaitStatus::Exited(pid, 0)), Some((pid, WorkerExit::Clean)));
        assert_eq!(
            classify(WaitStatus::Exited(pid, WORKER_BOOT_FAILURE)),
            Some((pid, WorkerExit::BootFailure))
        );
        assert_eq!(classify(WaitStatus::Exited(pid, 9)), Some((pid, WorkerExit::Failed(9))));
        assert_eq!(
            classify(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((pid, WorkerExit::Killed(Signal::SIGKILL)))
        );
        assert_eq!(classify(WaitStatus::StillAlive), None);
    }
}
