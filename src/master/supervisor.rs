//! The master's lifecycle as one typed state machine: events in, actions out.
//!
//! Runs in the master. Pure: no system calls, time passed in, so every transition is
//! unit-tested without a process. The [`super::Master`] owns the sockets and the system
//! calls (the worker table is `pool.rs`, the other pure half); it feeds the [`Supervisor`]
//! what happened (a signal, a child's exit, a timer turn with the facts it observed, such as
//! whether the pool is ready) and carries out the [`Action`]s it gets back, in order.
//!
//! Invariants:
//! - exactly one [`Lifecycle`] at a time; nothing else says whether the master is starting,
//!   reloading, paused or stopping;
//! - a reload asked for while one starts (or before the first generation is ready) is queued,
//!   never lost and never run concurrently;
//! - a stop is final: once [`Lifecycle::Stopping`], only a faster stop or the kill escalation
//!   changes anything;
//! - only the serving master speaks to systemd: while a binary upgrade's new master (the
//!   *successor*) lives, this master sends no `STOPPING=1` and no watchdog ping, so that under
//!   `NotifyAccess=all` the old master's exit is not taken for the service's.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// After SIGKILL was sent to every worker, how often to look for a lost SIGCHLD.
pub const KILLED_RECHECK: Duration = Duration::from_secs(1);

/// How long each way of stopping lets workers run before SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace {
    /// A graceful stop: `graceful_timeout`.
    pub graceful: Duration,
    /// A fast stop: `FAST_STOP_GRACE`.
    pub fast: Duration,
    /// Workers retiring while the service goes on (a reload's old generation, an upgrade's
    /// old master): `reload_drain_timeout`, `None` for no bound.
    pub drain: Option<Duration>,
}

/// How a stopping master stops its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// QUIT to the old master of a binary upgrade whose new master serves: the service goes
    /// on, so the workers retire (SIGUSR2) as a reload's old generation does, handing their
    /// connections to the new master and serving the others until they end.
    Retire,
    /// QUIT: the workers stop gracefully (SIGQUIT).
    Graceful,
    /// TERM, INT, or a second QUIT: the workers stop at once (SIGTERM).
    Fast,
}

impl Halt {
    /// The signal the workers get.
    pub fn signal(self) -> Signal {
        match self {
            Halt::Retire => Signal::SIGUSR2,
            Halt::Graceful => Signal::SIGQUIT,
            Halt::Fast => Signal::SIGTERM,
        }
    }
}

/// Where the master is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// The first generation is starting; `READY=1` is not sent yet. A HUP meanwhile is
    /// `queued` and runs once the pool is ready.
    Starting {
        /// A reload was asked for.
        queued: bool,
    },
    /// One generation serves; older ones may be draining.
    Serving,
    /// A reload's new `generation` is starting; it is rolled back at `deadline` unless all of
    /// its workers are ready. `queued`: another HUP came meanwhile.
    Reloading {
        /// The new generation.
        generation: u64,
        /// When to give up and roll back.
        deadline: Instant,
        /// A reload was asked for meanwhile.
        queued: bool,
    },
    /// WINCH: every worker was told to stop, the listeners stay open; HUP (or the failure of
    /// the upgrade that WINCH made room for) starts workers again.
    Paused,
    /// Stopping: workers were told to stop (see [`Halt`]); at `kill_at` the survivors get
    /// SIGKILL (`killed` once sent).
    Stopping {
        /// How.
        how: Halt,
        /// When SIGKILL follows; `None`: never (workers retiring without a bound).
        kill_at: Option<Instant>,
        /// SIGKILL was sent.
        killed: bool,
    },
}

impl Lifecycle {
    /// Serving workers are respawned when they die: not while paused or stopping.
    pub fn keeps_pool(self) -> bool {
        !matches!(self, Lifecycle::Paused | Lifecycle::Stopping { .. })
    }

    /// Stopping (graceful or fast).
    pub fn is_stopping(self) -> bool {
        matches!(self, Lifecycle::Stopping { .. })
    }
}

/// How this master came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Started by a user or by systemd.
    Fresh,
    /// Executed by an old master's binary upgrade: announces itself as the main process.
    Upgrade,
}

/// A message to systemd (see `sdnotify.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// `READY=1`.
    Ready,
    /// `MAINPID=` and `READY=1`: the new master of an upgrade takes over.
    ReadyAsMain,
    /// `RELOADING=1`.
    Reloading,
    /// `STOPPING=1`.
    Stopping,
}

/// What the master is to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Reap exited children.
    Reap,
    /// Read and validate the configuration; if it is good, start a generation and report
    /// [`Supervisor::reload_started`].
    StartReload,
    /// Start the serving generation's workers again (after WINCH); `reload`: a HUP asked
    /// for it (and counts as a reload applied).
    Resume {
        /// Asked for by HUP.
        reload: bool,
    },
    /// Reopen the log file, and have every worker reopen its own.
    ReopenLogs,
    /// Execute the binary again on the same sockets.
    StartUpgrade,
    /// Retire every worker of the serving generation gracefully, keep the listeners (WINCH).
    RetireServing,
    /// One worker more.
    AddWorker,
    /// One worker fewer.
    RemoveWorker,
    /// Undo the starting reload, for this reason.
    RollBack(String),
    /// The new generation is ready: retire the old one.
    CompleteReload,
    /// Close the listening sockets and send `signal` to every worker.
    StopWorkers {
        /// TERM (fast) or QUIT (graceful).
        signal: Signal,
    },
    /// The stop timed out: SIGKILL to every worker.
    KillWorkers,
    /// Tell systemd.
    Notify(Notice),
    /// The first generation is ready: tell whoever waits for the daemon (daemon mode).
    Announce,
    /// Nothing to do; log why at info level.
    Ignore(String),
}

/// The master's lifecycle and the binary-upgrade successor, with the decisions on them.
#[derive(Debug)]
pub struct Supervisor {
    lifecycle: Lifecycle,
    /// The new master of a binary upgrade, while it is our child. Not part of
    /// [`Lifecycle`]: a successor can live through any phase (serving, reloading, paused,
    /// stopping), and what it changes is who speaks to systemd.
    successor: Option<Pid>,
    origin: Origin,
}

impl Supervisor {
    /// A master that is starting its first generation.
    pub fn new(origin: Origin) -> Self {
        Supervisor { lifecycle: Lifecycle::Starting { queued: false }, successor: None, origin }
    }

    /// The current phase.
    pub fn lifecycle(&self) -> Lifecycle {
        self.lifecycle
    }

    /// Stopping (graceful or fast).
    pub fn is_stopping(&self) -> bool {
        self.lifecycle.is_stopping()
    }

    /// Paused by WINCH: no serving worker is kept running.
    pub fn is_paused(&self) -> bool {
        self.lifecycle == Lifecycle::Paused
    }

    /// The generation a reload is starting, if one is.
    pub fn reloading(&self) -> Option<u64> {
        match self.lifecycle {
            Lifecycle::Reloading { generation, .. } => Some(generation),
            _ => None,
        }
    }

    /// The upgrade's new master, while it lives.
    pub fn successor(&self) -> Option<Pid> {
        self.successor
    }

    /// Whether this master talks to systemd (status, watchdog): not while starting, and not
    /// once a successor serves.
    pub fn speaks_to_systemd(&self) -> bool {
        self.successor.is_none() && !matches!(self.lifecycle, Lifecycle::Starting { .. })
    }

    /// Serving workers are respawned when they die: not while paused or stopping.
    pub fn keeps_pool(&self) -> bool {
        self.lifecycle.keeps_pool()
    }

    /// A signal arrived (already filtered: a WINCH from a terminal resize never gets here).
    /// `grace` bounds each way of stopping.
    pub fn on_signal(&mut self, signal: Signal, now: Instant, grace: Grace) -> Vec<Action> {
        match (signal, self.lifecycle) {
            (Signal::SIGCHLD, _) => vec![Action::Reap],
            (Signal::SIGTERM | Signal::SIGINT, _) => self.stop(Halt::Fast, Some(now + grace.fast)),
            (Signal::SIGQUIT, Lifecycle::Stopping { how: Halt::Fast, .. }) => vec![],
            (Signal::SIGQUIT, Lifecycle::Stopping { .. }) => {
                self.stop(Halt::Fast, Some(now + grace.fast))
            }
            (Signal::SIGQUIT, _) if self.successor.is_some() => {
                self.stop(Halt::Retire, grace.drain.map(|drain| now + drain))
            }
            (Signal::SIGQUIT, _) => self.stop(Halt::Graceful, Some(now + grace.graceful)),
            (_, Lifecycle::Stopping { .. }) => {
                vec![Action::Ignore(format!("{signal} ignored: stopping"))]
            }
            (Signal::SIGHUP, Lifecycle::Starting { .. }) => {
                self.lifecycle = Lifecycle::Starting { queued: true };
                vec![Action::Ignore("reload queued: the first generation is still starting".into())]
            }
            (Signal::SIGHUP, Lifecycle::Reloading { generation, deadline, .. }) => {
                self.lifecycle = Lifecycle::Reloading { generation, deadline, queued: true };
                vec![Action::Ignore(format!(
                    "reload queued: generation {generation} is still starting"
                ))]
            }
            (Signal::SIGHUP, Lifecycle::Paused) => {
                self.lifecycle = Lifecycle::Serving;
                vec![Action::Resume { reload: true }]
            }
            (Signal::SIGHUP, _) => vec![Action::Notify(Notice::Reloading), Action::StartReload],
            (Signal::SIGUSR1, _) => vec![Action::ReopenLogs],
            (Signal::SIGUSR2, _) => match self.successor {
                Some(pid) => vec![Action::Ignore(format!(
                    "SIGUSR2 ignored: new master pid {pid} is already running"
                ))],
                None => vec![Action::StartUpgrade],
            },
            (Signal::SIGWINCH, lifecycle) => {
                let mut actions = Vec::new();
                if let Lifecycle::Reloading { .. } = lifecycle {
                    actions.push(Action::RollBack("SIGWINCH during a reload".into()));
                }
                actions.push(Action::RetireServing);
                self.lifecycle = Lifecycle::Paused;
                actions
            }
            (Signal::SIGTTIN, Lifecycle::Paused) => vec![Action::Ignore(
                "SIGTTIN ignored: workers are stopped (WINCH); send HUP first".into(),
            )],
            (Signal::SIGTTIN, _) => vec![Action::AddWorker],
            (Signal::SIGTTOU, _) => vec![Action::RemoveWorker],
            (other, _) => vec![Action::Ignore(format!("{other} is not handled; ignored"))],
        }
    }

    fn stop(&mut self, how: Halt, kill_at: Option<Instant>) -> Vec<Action> {
        let kill_at = match self.lifecycle {
            Lifecycle::Stopping { kill_at: Some(earlier), .. } => {
                Some(kill_at.map_or(earlier, |at| at.min(earlier)))
            }
            _ => kill_at,
        };
        self.lifecycle = Lifecycle::Stopping { how, kill_at, killed: false };
        let mut actions = Vec::new();
        if self.successor.is_none() {
            actions.push(Action::Notify(Notice::Stopping));
        }
        actions.push(Action::StopWorkers { signal: how.signal() });
        actions
    }

    /// A fast stop the master decides itself (a worker that cannot boot, a failed start).
    pub fn stop_fast(&mut self, now: Instant, fast_grace: Duration) -> Vec<Action> {
        self.stop(Halt::Fast, Some(now + fast_grace))
    }

    /// A loop turn at `now`. `pool_ready`: every worker of the newest generation said
    /// `Ready` on its channel (see `pool.rs`).
    pub fn on_tick(&mut self, now: Instant, pool_ready: bool) -> Vec<Action> {
        match self.lifecycle {
            Lifecycle::Stopping { how, kill_at: Some(at), killed: false } if now >= at => {
                self.lifecycle = Lifecycle::Stopping { how, kill_at: Some(at), killed: true };
                vec![Action::KillWorkers]
            }
            Lifecycle::Starting { queued } if pool_ready => {
                self.lifecycle = Lifecycle::Serving;
                let notice = match self.origin {
                    Origin::Fresh => Notice::Ready,
                    Origin::Upgrade => Notice::ReadyAsMain,
                };
                let mut actions = vec![Action::Notify(notice), Action::Announce];
                if queued {
                    actions.extend([Action::Notify(Notice::Reloading), Action::StartReload]);
                }
                actions
            }
            Lifecycle::Reloading { .. } if pool_ready => vec![Action::CompleteReload],
            Lifecycle::Reloading { generation, deadline, .. } if now >= deadline => {
                vec![Action::RollBack(format!(
                    "generation {generation}: not every worker ready after the start timeout"
                ))]
            }
            _ => vec![],
        }
    }

    /// The master started generation `generation` for a reload; it must be ready by
    /// `deadline`.
    pub fn reload_started(&mut self, generation: u64, deadline: Instant) {
        if self.lifecycle == Lifecycle::Serving {
            self.lifecycle = Lifecycle::Reloading { generation, deadline, queued: false };
        }
    }

    /// The starting reload was completed or rolled back: serving again. Returns the queued
    /// reload, if one was asked for meanwhile (it may carry the fix of a rolled-back one).
    pub fn reload_ended(&mut self) -> Vec<Action> {
        match self.lifecycle {
            Lifecycle::Reloading { queued, .. } => {
                self.lifecycle = Lifecycle::Serving;
                if queued {
                    vec![Action::Notify(Notice::Reloading), Action::StartReload]
                } else {
                    vec![]
                }
            }
            _ => vec![],
        }
    }

    /// A binary upgrade forked its new master.
    pub fn upgrade_started(&mut self, successor: Pid) {
        self.successor = Some(successor);
    }

    /// The upgrade's new master exited while we live: we serve again, and resume the pool
    /// if WINCH had stopped it; if we were retiring our workers for it (QUIT), the service
    /// is over and that becomes a graceful stop (bounded by `grace.graceful`). Returns `None`
    /// when `pid` is not the successor.
    pub fn successor_exited(
        &mut self,
        pid: Pid,
        now: Instant,
        grace: Grace,
    ) -> Option<Vec<Action>> {
        if self.successor != Some(pid) {
            return None;
        }
        self.successor = None;
        match self.lifecycle {
            Lifecycle::Paused => {
                self.lifecycle = Lifecycle::Serving;
                Some(vec![Action::Resume { reload: false }])
            }
            Lifecycle::Stopping { how: Halt::Retire, .. } => {
                Some(self.stop(Halt::Graceful, Some(now + grace.graceful)))
            }
            _ => Some(vec![]),
        }
    }

    /// The earliest time the lifecycle needs a turn of the loop, if any.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        match self.lifecycle {
            Lifecycle::Stopping { kill_at, killed: false, .. } => kill_at,
            // Killed: SIGCHLD will come; a periodic check covers a lost one.
            Lifecycle::Stopping { killed: true, .. } => Some(now + KILLED_RECHECK),
            // Readiness arrives on the workers' channels, which wake the master's wait: only
            // a reload's start timeout is a deadline.
            Lifecycle::Reloading { deadline, .. } => Some(deadline),
            Lifecycle::Starting { .. } | Lifecycle::Serving | Lifecycle::Paused => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);
    const FAST: Duration = Duration::from_millis(500);
    const DRAIN: Duration = Duration::from_secs(60);
    const TIMES: Grace = Grace { graceful: GRACE, fast: FAST, drain: None };

    fn serving() -> (Supervisor, Instant) {
        let mut supervisor = Supervisor::new(Origin::Fresh);
        let t0 = Instant::now();
        assert_eq!(supervisor.on_tick(t0, false), vec![]);
        assert_eq!(
            supervisor.on_tick(t0, true),
            vec![Action::Notify(Notice::Ready), Action::Announce]
        );
        (supervisor, t0)
    }

    fn signal(supervisor: &mut Supervisor, signal: Signal, now: Instant) -> Vec<Action> {
        supervisor.on_signal(signal, now, TIMES)
    }

    #[test]
    fn ready_once_the_first_pool_is_and_a_reload_meanwhile_waits() {
        let mut supervisor = Supervisor::new(Origin::Upgrade);
        let t0 = Instant::now();
        assert!(!supervisor.speaks_to_systemd(), "no watchdog before READY");
        assert_eq!(supervisor.deadline(t0), None, "readiness wakes the master, no poll");
        assert!(matches!(signal(&mut supervisor, Signal::SIGHUP, t0)[..], [Action::Ignore(_)]));
        assert_eq!(
            supervisor.on_tick(t0, true),
            vec![
                Action::Notify(Notice::ReadyAsMain),
                Action::Announce,
                Action::Notify(Notice::Reloading),
                Action::StartReload
            ]
        );
        assert_eq!(supervisor.lifecycle(), Lifecycle::Serving);
        assert!(supervisor.speaks_to_systemd());
    }

    #[test]
    fn a_reload_completes_or_rolls_back_and_runs_the_queued_one_after() {
        let (mut supervisor, t0) = serving();
        assert_eq!(
            signal(&mut supervisor, Signal::SIGHUP, t0),
            vec![Action::Notify(Notice::Reloading), Action::StartReload]
        );
        let deadline = t0 + Duration::from_secs(10);
        supervisor.reload_started(2, deadline);
        assert_eq!(supervisor.reloading(), Some(2));
        assert_eq!(supervisor.deadline(t0), Some(deadline), "readiness is not polled");
        assert_eq!(supervisor.on_tick(t0, false), vec![]);
        assert_eq!(supervisor.on_tick(t0, true), vec![Action::CompleteReload]);
        assert_eq!(supervisor.reload_ended(), vec![]);
        assert_eq!(supervisor.lifecycle(), Lifecycle::Serving);

        // A HUP while a generation starts is queued; the deadline rolls back.
        signal(&mut supervisor, Signal::SIGHUP, t0);
        supervisor.reload_started(3, deadline);
        assert!(matches!(signal(&mut supervisor, Signal::SIGHUP, t0)[..], [Action::Ignore(_)]));
        assert!(matches!(supervisor.on_tick(deadline, false)[..], [Action::RollBack(_)]));
        assert_eq!(
            supervisor.reload_ended(),
            vec![Action::Notify(Notice::Reloading), Action::StartReload],
            "the queued reload runs next"
        );
    }

    #[test]
    fn winch_pauses_rolls_back_a_starting_reload_and_hup_resumes() {
        let (mut supervisor, t0) = serving();
        signal(&mut supervisor, Signal::SIGHUP, t0);
        supervisor.reload_started(2, t0 + GRACE);
        assert_eq!(
            signal(&mut supervisor, Signal::SIGWINCH, t0),
            vec![Action::RollBack("SIGWINCH during a reload".into()), Action::RetireServing]
        );
        assert!(supervisor.is_paused() && !supervisor.keeps_pool());
        // The rollback's end does not unpause.
        assert_eq!(supervisor.reload_ended(), vec![]);
        assert!(supervisor.is_paused());
        assert!(matches!(signal(&mut supervisor, Signal::SIGTTIN, t0)[..], [Action::Ignore(_)]));
        assert_eq!(
            signal(&mut supervisor, Signal::SIGHUP, t0),
            vec![Action::Resume { reload: true }]
        );
        assert!(supervisor.keeps_pool());
    }

    #[test]
    fn quit_is_graceful_a_second_quit_or_term_is_fast_and_the_kill_follows() {
        let (mut supervisor, t0) = serving();
        assert_eq!(
            signal(&mut supervisor, Signal::SIGQUIT, t0),
            vec![Action::Notify(Notice::Stopping), Action::StopWorkers { signal: Signal::SIGQUIT }]
        );
        assert_eq!(supervisor.deadline(t0), Some(t0 + GRACE));
        assert!(matches!(signal(&mut supervisor, Signal::SIGHUP, t0)[..], [Action::Ignore(_)]));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            signal(&mut supervisor, Signal::SIGQUIT, t1),
            vec![Action::Notify(Notice::Stopping), Action::StopWorkers { signal: Signal::SIGTERM }]
        );
        assert_eq!(supervisor.deadline(t1), Some(t1 + FAST));
        assert_eq!(signal(&mut supervisor, Signal::SIGQUIT, t1), vec![], "already fast");
        assert_eq!(supervisor.on_tick(t1, true), vec![]);
        assert_eq!(supervisor.on_tick(t1 + FAST, true), vec![Action::KillWorkers]);
        assert_eq!(supervisor.on_tick(t1 + FAST * 2, true), vec![], "killed once");
        assert_eq!(supervisor.deadline(t1), Some(t1 + KILLED_RECHECK));
        // A later TERM never pushes the kill later.
        let mut fresh = serving().0;
        signal(&mut fresh, Signal::SIGTERM, t0);
        signal(&mut fresh, Signal::SIGTERM, t0 + GRACE);
        assert_eq!(fresh.deadline(t0), Some(t0 + FAST));
    }

    #[test]
    fn after_an_upgrade_the_old_master_never_says_stopping() {
        let (mut supervisor, t0) = serving();
        assert_eq!(signal(&mut supervisor, Signal::SIGUSR2, t0), vec![Action::StartUpgrade]);
        let new = Pid::from_raw(4242);
        supervisor.upgrade_started(new);
        assert!(!supervisor.speaks_to_systemd());
        assert!(matches!(signal(&mut supervisor, Signal::SIGUSR2, t0)[..], [Action::Ignore(_)]));
        assert_eq!(signal(&mut supervisor, Signal::SIGWINCH, t0), vec![Action::RetireServing]);
        assert_eq!(
            signal(&mut supervisor, Signal::SIGQUIT, t0),
            vec![Action::StopWorkers { signal: Signal::SIGUSR2 }],
            "no STOPPING=1 while the new master serves; the workers retire"
        );
        assert_eq!(supervisor.deadline(t0), None, "no reload_drain_timeout: no kill");
        assert_eq!(supervisor.on_tick(t0 + GRACE * 100, true), vec![]);
        assert_eq!(
            signal(&mut supervisor, Signal::SIGTERM, t0),
            vec![Action::StopWorkers { signal: Signal::SIGTERM }]
        );
        assert_eq!(supervisor.deadline(t0), Some(t0 + FAST));
        // With a bound, the retirement ends in SIGKILL at it.
        let mut bounded = serving().0;
        bounded.upgrade_started(Pid::from_raw(4243));
        let grace = Grace { drain: Some(DRAIN), ..TIMES };
        bounded.on_signal(Signal::SIGQUIT, t0, grace);
        assert_eq!(bounded.deadline(t0), Some(t0 + DRAIN));
        assert_eq!(bounded.on_tick(t0 + DRAIN, true), vec![Action::KillWorkers]);
    }

    #[test]
    fn a_new_master_that_dies_while_the_old_retires_turns_it_into_a_graceful_stop() {
        let (mut supervisor, t0) = serving();
        let new = Pid::from_raw(4242);
        supervisor.upgrade_started(new);
        signal(&mut supervisor, Signal::SIGQUIT, t0);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            supervisor.successor_exited(new, t1, TIMES),
            Some(vec![
                Action::Notify(Notice::Stopping),
                Action::StopWorkers { signal: Signal::SIGQUIT }
            ])
        );
        assert_eq!(supervisor.deadline(t1), Some(t1 + GRACE), "graceful_timeout from then");
    }

    #[test]
    fn a_failed_upgrade_resumes_a_paused_pool() {
        let (mut supervisor, t0) = serving();
        let new = Pid::from_raw(4242);
        supervisor.upgrade_started(new);
        signal(&mut supervisor, Signal::SIGWINCH, t0);
        let gone = |supervisor: &mut Supervisor, pid| supervisor.successor_exited(pid, t0, TIMES);
        assert_eq!(gone(&mut supervisor, Pid::from_raw(1)), None, "not the successor");
        assert_eq!(gone(&mut supervisor, new), Some(vec![Action::Resume { reload: false }]));
        assert_eq!(supervisor.lifecycle(), Lifecycle::Serving);
        assert!(supervisor.speaks_to_systemd());
        // Without WINCH, nothing to resume.
        supervisor.upgrade_started(new);
        assert_eq!(gone(&mut supervisor, new), Some(vec![]));
    }
}
