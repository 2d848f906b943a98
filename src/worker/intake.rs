//! Whether the worker takes new clients: watching the listeners, pausing after an accept
//! error, holding off while full, the shed grace, and the graceful stop's end of accepting.
//!
//! Runs in workers. Pure: time, room and "something could be shed" are passed in; the loop
//! registers and unregisters the listening descriptors as told ([`Watch`]) and logs.
//! Invariants:
//! - the listening descriptors are registered with the poller exactly while
//!   [`Intake::Accepting`];
//! - a full worker watches the listeners only to learn that a client waits, and only if it
//!   could shed a connection for it; then it lets that client wait [`SHED_GRACE`] for a
//!   worker with room, and takes it (shedding) only if it still waits right after;
//! - [`Intake::Draining`] is final.

use std::time::{Duration, Instant};

/// How long accepting pauses after `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM`.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// How long a full worker that could shed lets a waiting client be, before it accepts it
/// and sheds: a worker with room takes the client in the meantime, and no connection is shed
/// needlessly.
pub const SHED_GRACE: Duration = Duration::from_millis(50);

/// Whether the worker takes new connections: one state, so that "watching the listeners",
/// "pausing after an accept error" and "stopping" cannot contradict each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// The listeners are watched.
    Accepting,
    /// Not watched: the connection budget is spent (`until` is `None`), or accepting pauses
    /// until `until` after `EMFILE`/`ENFILE`/`ENOBUFS`/`ENOMEM`.
    Held {
        /// End of an accept pause.
        until: Option<Instant>,
    },
    /// Graceful stop: the listeners are closed; connections finish (or are handed off).
    Draining,
}

/// What to do with the listening descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Leave them as they are.
    Keep,
    /// Register them (for accepting).
    Start,
    /// Unregister them.
    Stop,
}

/// What the start of a turn decided ([`Gate::turn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// The listening descriptors.
    pub watch: Watch,
    /// The worker just became full (count it and log, saying whether it sheds).
    pub became_full: bool,
}

/// The worker's intake and its memory of being full.
#[derive(Debug)]
pub struct Gate {
    intake: Intake,
    /// The budget was reached and not yet relieved (to count and log each time it fills).
    full: bool,
    /// Full and a client waits: when this worker accepts it, shedding (see [`SHED_GRACE`]).
    shed_at: Option<Instant>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate { intake: Intake::Held { until: None }, full: false, shed_at: None }
    }
}

impl Gate {
    /// The intake now.
    #[cfg(test)]
    pub fn intake(&self) -> Intake {
        self.intake
    }

    /// Whether the listeners are watched.
    #[inline]
    pub fn accepting(&self) -> bool {
        self.intake == Intake::Accepting
    }

    /// Whether the worker stops gracefully.
    #[inline]
    pub fn draining(&self) -> bool {
        self.intake == Intake::Draining
    }

    /// The start of a turn at `now`: whether the listeners are to be watched, given whether
    /// the budget has `room` and whether a connection `can_shed` (needed only without room).
    #[inline]
    pub fn turn(&mut self, now: Instant, room: bool, can_shed: bool) -> Turn {
        let keep = Turn { watch: Watch::Keep, became_full: false };
        match self.intake {
            Intake::Draining => return keep,
            Intake::Held { until: Some(until) } if now < until => return keep,
            Intake::Accepting | Intake::Held { .. } => {}
        }
        let mut became_full = false;
        if room {
            self.full = false;
            self.shed_at = None;
        } else if !self.full {
            self.full = true;
            became_full = true;
        }
        // Full: watch the listeners to learn that a client waits, then not during the grace.
        let shed_ready = self.shed_at.is_none_or(|at| now >= at);
        let want = room || (self.full && shed_ready && can_shed);
        let watch = match (self.intake, want) {
            (Intake::Accepting, true) => Watch::Keep,
            (Intake::Accepting, false) => Watch::Stop,
            (_, true) => Watch::Start,
            (_, false) => Watch::Keep,
        };
        self.intake = if want { Intake::Accepting } else { Intake::Held { until: None } };
        Turn { watch, became_full }
    }

    /// Whether to take one more client from a ready listener now, in an accept batch that
    /// is `shedding` already (a client was taken to be served by shedding): with `room` left
    /// in the budget, or by shedding once the client has waited [`SHED_GRACE`].
    pub fn take(&mut self, now: Instant, room: usize, can_shed: bool, shedding: &mut bool) -> bool {
        if room == 0 && !*shedding {
            if !can_shed {
                return false;
            }
            match self.shed_at {
                Some(at) if now < at => return false,
                // Still waiting right after the grace: take it, shedding.
                Some(at) if now < at + SHED_GRACE => {
                    self.shed_at = None;
                    *shedding = true;
                }
                // A new wait (or one long past: that client went to another worker).
                _ => {
                    self.shed_at = Some(now + SHED_GRACE);
                    return false;
                }
            }
        }
        room > 0 || can_shed
    }

    /// Pauses accepting until `until` (`EMFILE` and the like); whether the listeners were
    /// watched (the caller unregisters them).
    pub fn pause(&mut self, until: Instant) -> bool {
        let watched = self.intake == Intake::Accepting;
        if self.intake != Intake::Draining {
            self.intake = Intake::Held { until: Some(until) };
        }
        watched
    }

    /// The graceful stop: no more accepting, ever; whether the listeners were watched (the
    /// caller unregisters them before closing them).
    pub fn drain(&mut self) -> bool {
        let watched = self.intake == Intake::Accepting;
        self.intake = Intake::Draining;
        watched
    }

    /// The end of an accept pause, or of the shed grace, whichever comes first after `now`.
    #[inline]
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let pause = match self.intake {
            Intake::Held { until } => until,
            Intake::Accepting | Intake::Draining => None,
        };
        match (pause, self.shed_at.filter(|at| *at > now)) {
            (Some(pause), Some(grace)) => Some(pause.min(grace)),
            (pause, grace) => pause.or(grace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn listeners_are_watched_while_there_is_room() {
        let t0 = Instant::now();
        let mut gate = Gate::default();
        assert_eq!(gate.turn(t0, true, false), Turn { watch: Watch::Start, became_full: false });
        assert_eq!(gate.intake(), Intake::Accepting);
        assert_eq!(gate.turn(t0, true, false).watch, Watch::Keep);
        // Full, nothing to shed: stop watching; counted once.
        assert_eq!(gate.turn(t0, false, false), Turn { watch: Watch::Stop, became_full: true });
        assert_eq!(gate.intake(), Intake::Held { until: None });
        assert_eq!(gate.turn(t0, false, false), Turn { watch: Watch::Keep, became_full: false });
        // Room again: watch again, and the next fill is counted again.
        assert_eq!(gate.turn(t0, true, false).watch, Watch::Start);
        assert!(gate.turn(t0, false, false).became_full);
    }

    #[test]
    fn a_full_worker_that_can_shed_takes_a_client_only_after_the_grace() {
        let t0 = Instant::now();
        let mut gate = Gate::default();
        gate.turn(t0, true, false);
        // Full but something is sheddable: keep watching, to learn that a client waits.
        assert_eq!(gate.turn(t0, false, true), Turn { watch: Watch::Keep, became_full: true });
        let mut shedding = false;
        assert!(!gate.take(t0, 0, true, &mut shedding), "a new wait starts the grace");
        assert_eq!(gate.next_deadline(t0), Some(t0 + SHED_GRACE));
        // During the grace the listeners are not watched (another worker may take it).
        assert_eq!(gate.turn(t0 + ms(10), false, true).watch, Watch::Stop);
        assert!(!gate.take(t0 + ms(10), 0, true, &mut shedding));
        assert_eq!(gate.turn(t0 + SHED_GRACE, false, true).watch, Watch::Start);
        assert!(gate.take(t0 + SHED_GRACE, 0, true, &mut shedding), "still waiting: taken");
        assert!(shedding);
        assert!(gate.take(t0 + SHED_GRACE, 0, true, &mut shedding), "the batch goes on shedding");
        assert!(!gate.take(t0 + SHED_GRACE, 0, false, &mut shedding), "nothing left to shed");
    }

    #[test]
    fn a_wait_long_past_the_grace_starts_a_new_one() {
        let t0 = Instant::now();
        let mut gate = Gate::default();
        let mut shedding = false;
        assert!(!gate.take(t0, 0, true, &mut shedding));
        let late = t0 + SHED_GRACE * 3;
        assert!(!gate.take(late, 0, true, &mut shedding), "that client went elsewhere");
        assert_eq!(gate.next_deadline(late), Some(late + SHED_GRACE));
        assert!(gate.take(late, 1, false, &mut shedding), "room: no shedding needed");
        assert!(!shedding);
    }

    #[test]
    fn an_accept_error_pauses_and_the_drain_is_final() {
        let t0 = Instant::now();
        let mut gate = Gate::default();
        gate.turn(t0, true, false);
        assert!(gate.pause(t0 + ACCEPT_PAUSE), "was watching: unregister");
        assert_eq!(gate.next_deadline(t0), Some(t0 + ACCEPT_PAUSE));
        assert_eq!(gate.turn(t0 + ms(50), true, false).watch, Watch::Keep, "paused");
        assert_eq!(gate.turn(t0 + ACCEPT_PAUSE, true, false).watch, Watch::Start);
        assert!(gate.drain());
        assert!(gate.draining());
        assert_eq!(gate.turn(t0 + ACCEPT_PAUSE, true, false).watch, Watch::Keep);
        assert!(!gate.pause(t0), "no pause once draining");
        assert_eq!(gate.intake(), Intake::Draining);
        assert_eq!(gate.next_deadline(t0), None);
    }
}
