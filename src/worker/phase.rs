//! A TCP connection's phase, and the worker's decisions about a connection as pure functions
//! of its state and the time: when it is due (idle timeouts, the drain's quiet period, a
//! lingering close, a hand-off retry, the session's timer), what a due deadline means, and
//! what happens after a session callback. The connection table (`connections.rs`) makes the
//! system calls and passes their results in: whether unread input waits (a peek, made only
//! when the answer matters), the shared table's answer to a promotion.
//!
//! Runs in workers. The transitions of [`Phase`]:
//!
//! ```text
//! Open ──first exchange, long quota spent──▶ ClosingAtRest(long-limit)
//! Open ──the worker retires or stops──▶ Draining(Local)
//! ClosingAtRest, of a session that moves in flight ──the worker retires or stops──▶ Draining(Local)
//! Draining(Local | Pending) ──movable now (at rest, or any time), offered to the master──▶ Offered
//! Offered ──Busy or Lost, still ours, tries left──▶ Draining(Retry) ──its time──▶ Draining(Pending)
//! Offered ──Refused, or tries spent──▶ kept: Open (retiring) or Draining(Never) (stopping)
//! Draining(Local | Pending) ──the session cannot be moved──▶ kept, as above
//! Offered ──Adopted (or Lost, no longer ours)──▶ handed over: gone, without a close
//! Draining(Never) ──at rest and quiet for DRAIN_QUIET──▶ Lingering(shutdown)
//! Open (kept by a retiring worker) ──the worker stops──▶ Draining(Local)
//! ClosingAtRest(reason) ──at rest, nothing unread──▶ Lingering(reason)
//! Open | ClosingAtRest | Draining ──the session closes──▶ Lingering(reason), or closed at once
//! Lingering ──the client's FIN, or LINGER_TIMEOUT──▶ closed
//! any but Offered ──error, reset, done, idle timeout──▶ closed
//! ```
//!
//! A worker drains for one of two reasons ([`Drain`]): it *retires* (a reload, TTOU, a binary
//! upgrade: the daemon goes on), and a connection it cannot hand off is kept and served
//! until it ends, as nginx's stream module and HAProxy do; or the daemon *stops*
//! gracefully, and such a connection is closed once at rest and quiet. A retiring worker told
//! to stop (a graceful stop during a drain) stops: its kept connections drain again. A kept
//! connection's session is told once in the connection's life (`Session::on_drain`, at the
//! end of the loop's turn: `Connections::tell_kept`), so it can say goodbye; one handed off
//! is never told.
//!
//! Invariants:
//! - `Draining` and `Offered` exist only in a draining worker, and every connection of a
//!   stopping worker is `Draining`, `Offered`, `ClosingAtRest` or `Lingering` (one admitted
//!   while the worker drains, its PROXY header completing late, starts `Draining`); a
//!   retiring worker also serves `Open` connections, those it keeps;
//! - a `Draining(Local | Pending | Retry)` connection is never closed by the drain itself:
//!   it is on its way to the serving generation, or kept;
//! - an `Offered` connection has no deadline and is not watched: it is not the worker's to
//!   read, write, time out or close until the answer;
//! - a `Lingering` connection's only deadline is its `until`; only its client socket is
//!   watched, for reading, and the session is never called again;
//! - only an `Open` connection is promoted (kept alive as long);
//! - a deadline computed without the peek is never late, only possibly early: a session at
//!   rest is taken to be at rest, and when that deadline comes the peek decides.
//!
//! [`ConnKind`] (short or long) and the session's timer are not part of the phase: a long
//! connection can drain, close at rest or linger like a short one.

use std::time::{Duration, Instant};

use crate::handoff::Outcome;
use crate::services::{CloseReason, Ending, Session};

/// During a graceful stop, a connection with no exchange in flight is closed once the client
/// has sent nothing for this long (at once if it was already quiet that long). Closing at the
/// first instant of rest would cut a client that is still streaming (its next bytes are in
/// flight while the window reopens); a keep-alive client that pauses between exchanges is
/// closed in its first pause this long.
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// Longest a lingering close waits for the client's FIN.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(5);

/// After a `Busy` answer, how long before the connection is offered again.
pub const HANDOFF_RETRY: Duration = Duration::from_millis(50);

/// Offers per connection at most; after that many `Busy` answers it finishes here.
pub const HANDOFF_TRIES: u32 = 40;

/// Why a worker drains, and so what becomes of a connection it does not hand off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Retired while the daemon goes on (SIGUSR2 from the master: a reload's old generation,
    /// TTOU, WINCH, an upgrade's old master): such a connection is served until it ends.
    Retire,
    /// The daemon stops gracefully (SIGQUIT): such a connection is closed once at rest and
    /// quiet for [`DRAIN_QUIET`].
    Stop,
}

impl Drain {
    /// The phase of a connection that stays in this worker (not handed off): served as any
    /// other until it ends when retiring, closed at rest when stopping.
    pub fn kept(self) -> Phase {
        match self {
            Drain::Retire => Phase::Open,
            Drain::Stop => Phase::Draining(HandOff::Never),
        }
    }
}

/// Short until the first completed exchange, long (kept-alive) after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// No exchange completed yet: `short_idle_timeout` applies.
    Short,
    /// At least one exchange completed and the connection was kept: `long_idle_timeout`.
    Long,
}

/// Where a connection is in its life (see the module documentation for the transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Served; no close planned.
    Open,
    /// Keep-alive refused (its client's long quota is spent, or the count failed): closed
    /// with this reason once no exchange is in flight and nothing unread waits.
    ClosingAtRest(CloseReason),
    /// The worker retires or stops: the connection is offered to the serving generation when
    /// its session can move (see [`HandOff`]); if it cannot, it is kept ([`Drain::kept`]).
    Draining(HandOff),
    /// Offered for hand-off (the `tries`th time): not watched, not timed, not touched until
    /// the answer.
    Offered {
        /// Offers made, this one included.
        tries: u32,
    },
    /// Lingering close: our FIN is sent; the client's late input is read and discarded until
    /// its FIN or `until`, then the connection is closed for `reason`.
    Lingering {
        /// The reason in the access line.
        reason: CloseReason,
        /// [`LINGER_TIMEOUT`] after the FIN.
        until: Instant,
    },
}

/// A draining connection's way to the serving generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOff {
    /// Not offered yet: offered when its session can move.
    Local,
    /// A retry came due: offered again at its next rest (not closed by the drain
    /// meanwhile). `tries` so far.
    Pending {
        /// Offers made.
        tries: u32,
    },
    /// Nobody could take it: offered again at its first rest after `at`. `tries` so far.
    Retry {
        /// Not before.
        at: Instant,
        /// Offers made.
        tries: u32,
    },
    /// Not to be handed off (refused, or its session cannot be) by a stopping worker: closed
    /// once at rest and quiet.
    Never,
}

/// A listener's idle timeouts (`None`: that timeout is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `short_idle_timeout`.
    pub short: Option<Duration>,
    /// `long_idle_timeout`.
    pub long: Option<Duration>,
}

/// What the loop knows of a connection's time and phase: all its deadlines derive from this
/// (with the listener's [`Timeouts`] and the session's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnState {
    /// The phase.
    pub phase: Phase,
    /// Short or long.
    pub kind: ConnKind,
    /// Last time a byte moved (or accept time).
    pub last_activity: Instant,
    /// The session's timer ([`crate::services::Context::set_timer`]).
    pub timer: Option<Instant>,
}

/// What a session callback leads to, for the loop to carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The session ended the conversation: a lingering close ([`Ending::Graceful`]) or an RST.
    Close(CloseReason, Ending),
    /// The first exchange of a short connection completed: ask the shared table whether the
    /// client may keep it ([`ConnState::promoted`]), then decide again.
    Promote,
    /// The client closed and everything is answered: close now (`client-close`).
    Finish,
    /// Closing at rest, and the session is at rest: a lingering close for this reason, unless
    /// unread input waits in the socket (then as [`Next::Serve`]).
    CloseAtRest(CloseReason),
    /// A hand-off candidate: offer it, unless that cannot be done now (then as
    /// [`Next::Serve`]).
    Offer,
    /// Go on serving: register what the session now wants.
    Serve,
}

/// What a connection's due deadline means, for the loop to carry out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Not due after all (activity moved it): due again then, if ever.
    Later(Option<Instant>),
    /// A hand-off retry came due (the phase is `Draining(Pending)` now): offer it if it can
    /// be now, else schedule it.
    Offer,
    /// The session's timer (cleared now): call `on_timer`, then schedule.
    Timer,
    /// The lingering close is over: close for this reason.
    Finish(CloseReason),
    /// Draining, at rest and quiet: start a lingering close (`shutdown`).
    Linger(CloseReason),
    /// Idle for its timeout: close for this reason.
    Idle(CloseReason),
}

/// The shared table's answer to a promotion ([`ConnState::promoted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    /// The client may keep it alive (or the listener does not count long connections).
    Long,
    /// The client's long quota is spent.
    Refused,
    /// The count failed.
    Failed,
}

/// When a connection of `kind`, last active at `last_activity`, is to be closed as idle;
/// `None` when the applicable timeout is off.
pub fn idle_deadline(
    kind: ConnKind,
    last_activity: Instant,
    timeouts: Timeouts,
) -> Option<Instant> {
    let timeout = match kind {
        ConnKind::Short => timeouts.short,
        ConnKind::Long => timeouts.long,
    }?;
    last_activity.checked_add(timeout)
}

/// The close reason for an idle connection of `kind`.
pub fn idle_reason(kind: ConnKind) -> CloseReason {
    match kind {
        ConnKind::Short => CloseReason::IdleShort,
        ConnKind::Long => CloseReason::IdleLong,
    }
}

impl Phase {
    /// Whether the drain closes this connection once it is at rest and quiet: kept by a
    /// stopping worker.
    pub fn waits_for_quiet(self) -> bool {
        self == Phase::Draining(HandOff::Never)
    }

    /// Offers made so far, if the connection is to be offered at its next rest.
    pub fn offerable(self) -> Option<u32> {
        match self {
            Phase::Draining(HandOff::Local) => Some(0),
            Phase::Draining(HandOff::Pending { tries }) => Some(tries),
            _ => None,
        }
    }

    /// The worker began to drain (or a retiring one to stop): an open connection drains;
    /// so does one closing at rest whose session moves in flight (`moves_in_flight`: a
    /// relay, which never rests, so the close it waits for would never come, and it would
    /// keep the old worker forever); one lingering, offered or already draining keeps its
    /// phase.
    pub fn drain(&mut self, moves_in_flight: bool) {
        match *self {
            Phase::Open => *self = Phase::Draining(HandOff::Local),
            Phase::ClosingAtRest(_) if moves_in_flight => *self = Phase::Draining(HandOff::Local),
            _ => {}
        }
    }

    /// The phase of a connection admitted now: draining if the worker drains.
    pub fn admitted(draining: bool) -> Phase {
        if draining { Phase::Draining(HandOff::Local) } else { Phase::Open }
    }
}

/// After an offer made `tries` times was answered `outcome` and the connection is still
/// ours: its phase, offered again later or kept as `drain` keeps connections.
pub fn after_answer(tries: u32, outcome: Outcome, now: Instant, drain: Drain) -> Phase {
    match outcome {
        Outcome::Busy | Outcome::Lost if tries < HANDOFF_TRIES => {
            Phase::Draining(HandOff::Retry { at: now + HANDOFF_RETRY, tries })
        }
        _ => drain.kept(),
    }
}

impl ConnState {
    /// A connection that starts now in `phase`.
    pub fn new(phase: Phase, kind: ConnKind, now: Instant) -> Self {
        ConnState { phase, kind, last_activity: now, timer: None }
    }

    /// The connection's deadline: the earliest of its idle timeout (when `idle_timeouts`, the
    /// session's own say), the drain's quiet period (when `at_rest`), the session's timer
    /// and a hand-off retry; a lingering close's end; none while offered. `at_rest`: the
    /// session is at rest and (as far as the caller knows) nothing unread waits.
    pub fn deadline(
        &self,
        timeouts: Timeouts,
        idle_timeouts: bool,
        at_rest: bool,
    ) -> Option<Instant> {
        let retry = match self.phase {
            Phase::Lingering { until, .. } => return Some(until),
            Phase::Offered { .. } => return None,
            Phase::Draining(HandOff::Retry { at, .. }) => Some(at),
            Phase::Open | Phase::ClosingAtRest(_) | Phase::Draining(_) => None,
        };
        let idle = if idle_timeouts {
            idle_deadline(self.kind, self.last_activity, timeouts)
        } else {
            None
        };
        let quiet = self.quiet_deadline(at_rest);
        [idle, quiet, self.timer, retry].into_iter().flatten().min()
    }

    /// When the drain closes the connection, if it waits for quiet and is `at_rest`.
    fn quiet_deadline(&self, at_rest: bool) -> Option<Instant> {
        (self.phase.waits_for_quiet() && at_rest).then(|| self.last_activity + DRAIN_QUIET)
    }

    /// The connection's timer entry came due at `now`: what it means, with the phase and the
    /// timer updated. `at_rest` as for [`ConnState::deadline`], this time with the peek made
    /// (it matters only when [`Phase::waits_for_quiet`] and the session is at rest).
    pub fn expire(
        &mut self,
        now: Instant,
        timeouts: Timeouts,
        idle_timeouts: bool,
        at_rest: bool,
    ) -> Expiry {
        match self.deadline(timeouts, idle_timeouts, at_rest) {
            Some(deadline) if deadline <= now => {}
            later => return Expiry::Later(later),
        }
        if let Phase::Draining(HandOff::Retry { at, tries }) = self.phase
            && at <= now
        {
            self.phase = Phase::Draining(HandOff::Pending { tries });
            return Expiry::Offer;
        }
        let lingering = matches!(self.phase, Phase::Lingering { .. });
        if !lingering && self.timer.is_some_and(|timer| timer <= now) {
            // The idle and drain deadlines are looked at again after it (they may be due too).
            self.timer = None;
            return Expiry::Timer;
        }
        if let Phase::Lingering { reason, .. } = self.phase {
            return Expiry::Finish(reason);
        }
        if self.quiet_deadline(at_rest).is_some_and(|quiet| quiet <= now) {
            return Expiry::Linger(CloseReason::Shutdown);
        }
        Expiry::Idle(idle_reason(self.kind))
    }

    /// What follows a session callback that returned `Ok`: `close` is what the session asked
    /// for ([`crate::services::Context::close`] or `reset`), `exchanges` the exchanges it
    /// completed. Asks the session whether it is done and, when it matters, at rest.
    #[inline]
    pub fn after_callback(
        &self,
        close: Option<(CloseReason, Ending)>,
        exchanges: u64,
        session: &dyn Session,
    ) -> Next {
        if let Some((reason, ending)) = close {
            return Next::Close(reason, ending);
        }
        if exchanges > 0 && self.kind == ConnKind::Short && self.phase == Phase::Open {
            return Next::Promote;
        }
        if session.is_done() {
            return Next::Finish;
        }
        match self.phase {
            Phase::ClosingAtRest(reason) if session.is_at_rest() => Next::CloseAtRest(reason),
            Phase::Draining(HandOff::Local | HandOff::Pending { .. }) => Next::Offer,
            _ => Next::Serve,
        }
    }

    /// Applies the shared table's answer to [`Next::Promote`].
    pub fn promoted(&mut self, promotion: Promotion) {
        match promotion {
            Promotion::Long => self.kind = ConnKind::Long,
            Promotion::Refused => self.phase = Phase::ClosingAtRest(CloseReason::LongLimit),
            Promotion::Failed => self.phase = Phase::ClosingAtRest(CloseReason::Error),
        }
    }

    /// Starts a lingering close at `now` for `reason`.
    pub fn linger(&mut self, reason: CloseReason, now: Instant) {
        self.phase = Phase::Lingering { reason, until: now + LINGER_TIMEOUT };
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::poller::Interest;
    use crate::services::{Context, Progress};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const TIMEOUTS: Timeouts =
        Timeouts { short: Some(Duration::from_secs(10)), long: Some(Duration::from_secs(300)) };

    /// A session that only answers the loop's questions.
    struct Facts {
        done: bool,
        at_rest: bool,
    }

    impl Session for Facts {
        fn interest(&self) -> Interest {
            Interest::READ
        }
        fn on_readable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
            Ok(Progress::default())
        }
        fn on_writable(&mut self, _cx: &mut Context<'_>) -> io::Result<Progress> {
            Ok(Progress::default())
        }
        fn is_at_rest(&self) -> bool {
            self.at_rest
        }
        fn is_done(&self) -> bool {
            self.done
        }
    }

    const AT_REST: Facts = Facts { done: false, at_rest: true };
    const BUSY: Facts = Facts { done: false, at_rest: false };

    fn state(phase: Phase, kind: ConnKind, t0: Instant) -> ConnState {
        ConnState::new(phase, kind, t0)
    }

    #[test]
    fn short_and_long_connections_get_their_own_idle_timeout() {
        let t0 = Instant::now();
        let short = state(Phase::Open, ConnKind::Short, t0);
        let long = state(Phase::Open, ConnKind::Long, t0);
        assert_eq!(short.deadline(TIMEOUTS, true, true), Some(t0 + ms(10_000)));
        assert_eq!(long.deadline(TIMEOUTS, true, true), Some(t0 + ms(300_000)));
        let off = Timeouts { short: None, ..TIMEOUTS };
        assert_eq!(short.deadline(off, true, false), None, "0 disables");
        assert_eq!(short.deadline(TIMEOUTS, false, false), None, "the session's say: no idle");
        assert_eq!(idle_reason(ConnKind::Short), CloseReason::IdleShort);
        assert_eq!(idle_reason(ConnKind::Long).as_str(), "idle-long");
        // Due: the idle close, with its reason; activity moves it later.
        let mut due = short;
        assert_eq!(
            due.expire(t0 + ms(10_000), TIMEOUTS, true, true),
            Expiry::Idle(CloseReason::IdleShort)
        );
        let mut moved = short;
        moved.last_activity = t0 + ms(4_000);
        assert_eq!(
            moved.expire(t0 + ms(10_000), TIMEOUTS, true, true),
            Expiry::Later(Some(t0 + ms(14_000)))
        );
    }

    #[test]
    fn a_connection_kept_by_a_stopping_worker_closes_once_at_rest_and_quiet() {
        let t0 = Instant::now();
        let mut local = state(Phase::Open, ConnKind::Long, t0);
        local.phase.drain(false);
        assert_eq!(local.phase, Phase::Draining(HandOff::Local));
        assert_eq!(
            local.deadline(TIMEOUTS, true, true),
            Some(t0 + ms(300_000)),
            "on its way to the serving generation: not closed by the drain"
        );
        let mut s = state(Drain::Stop.kept(), ConnKind::Long, t0);
        assert_eq!(
            s.deadline(TIMEOUTS, true, true),
            Some(t0 + DRAIN_QUIET),
            "at rest: quiet period"
        );
        assert_eq!(s.deadline(TIMEOUTS, true, false), Some(t0 + ms(300_000)), "busy: idle only");
        // The peek at the deadline found input: not closed, due again at its idle timeout.
        let mut unread = s;
        assert_eq!(
            unread.expire(t0 + DRAIN_QUIET, TIMEOUTS, true, false),
            Expiry::Later(Some(t0 + ms(300_000)))
        );
        assert_eq!(
            s.expire(t0 + DRAIN_QUIET, TIMEOUTS, true, true),
            Expiry::Linger(CloseReason::Shutdown)
        );
        // Kept by a retiring worker: served as an open connection, until it ends.
        let kept = state(Drain::Retire.kept(), ConnKind::Long, t0);
        assert_eq!(kept.phase, Phase::Open);
        assert_eq!(kept.deadline(TIMEOUTS, true, true), Some(t0 + ms(300_000)), "idle only");
        // On its way to another worker: not closed by the drain meanwhile.
        let pending = state(Phase::Draining(HandOff::Pending { tries: 1 }), ConnKind::Long, t0);
        assert_eq!(pending.deadline(TIMEOUTS, true, true), Some(t0 + ms(300_000)));
        // Closing or lingering connections keep their phase when the drain begins ...
        for mut phase in [
            Phase::ClosingAtRest(CloseReason::LongLimit),
            Phase::Lingering { reason: CloseReason::Error, until: t0 },
            Phase::Offered { tries: 1 },
        ] {
            let before = phase;
            phase.drain(false);
            assert_eq!(phase, before);
        }
        // ... but one closing at rest that never rests (a relay over its long quota) moves.
        let mut relay = Phase::ClosingAtRest(CloseReason::LongLimit);
        relay.drain(true);
        assert_eq!(relay, Phase::Draining(HandOff::Local));
        let mut lingering = Phase::Lingering { reason: CloseReason::Error, until: t0 };
        lingering.drain(true);
        assert!(matches!(lingering, Phase::Lingering { .. }), "the conversation is over");
        assert_eq!(Phase::admitted(true), Phase::Draining(HandOff::Local));
        assert_eq!(Phase::admitted(false), Phase::Open);
    }

    #[test]
    fn a_lingering_close_ends_at_its_timeout_and_an_offered_connection_has_no_deadline() {
        let t0 = Instant::now();
        let mut s = state(Phase::Open, ConnKind::Short, t0);
        s.timer = Some(t0 + ms(1));
        s.linger(CloseReason::LongLimit, t0);
        assert_eq!(s.deadline(TIMEOUTS, true, true), Some(t0 + LINGER_TIMEOUT), "only its end");
        assert_eq!(
            s.expire(t0 + ms(1), TIMEOUTS, true, true),
            Expiry::Later(Some(t0 + LINGER_TIMEOUT)),
            "no session timer"
        );
        assert_eq!(
            s.expire(t0 + LINGER_TIMEOUT, TIMEOUTS, true, true),
            Expiry::Finish(CloseReason::LongLimit)
        );
        let offered = state(Phase::Offered { tries: 1 }, ConnKind::Short, t0);
        assert_eq!(offered.deadline(TIMEOUTS, true, true), None);
    }

    #[test]
    fn a_hand_off_retry_comes_due_and_is_offered_again() {
        let t0 = Instant::now();
        let retry = HandOff::Retry { at: t0 + HANDOFF_RETRY, tries: 3 };
        assert_eq!(after_answer(3, Outcome::Busy, t0, Drain::Stop), Phase::Draining(retry));
        assert_eq!(
            after_answer(HANDOFF_TRIES, Outcome::Busy, t0, Drain::Stop),
            Phase::Draining(HandOff::Never),
            "tries spent: closed at rest by a stopping worker"
        );
        assert_eq!(
            after_answer(1, Outcome::Refused, t0, Drain::Retire),
            Phase::Open,
            "refused: served on by a retiring worker"
        );
        assert!(matches!(
            after_answer(1, Outcome::Lost, t0, Drain::Retire),
            Phase::Draining(HandOff::Retry { .. })
        ));
        let mut s = state(Phase::Draining(retry), ConnKind::Long, t0);
        // Not closed by the drain while it waits; the retry is the earliest deadline.
        assert_eq!(s.deadline(TIMEOUTS, true, true), Some(t0 + HANDOFF_RETRY));
        assert_eq!(s.phase.offerable(), None);
        assert_eq!(s.expire(t0 + HANDOFF_RETRY, TIMEOUTS, true, true), Expiry::Offer);
        assert_eq!(s.phase, Phase::Draining(HandOff::Pending { tries: 3 }));
        assert_eq!(s.phase.offerable(), Some(3));
        assert_eq!(Phase::Draining(HandOff::Local).offerable(), Some(0));
        assert_eq!(Phase::Open.offerable(), None);
    }

    #[test]
    fn the_session_timer_fires_first_then_the_other_deadlines() {
        let t0 = Instant::now();
        let mut s = state(Phase::Open, ConnKind::Short, t0);
        s.timer = Some(t0 + ms(10_000));
        // Timer and idle timeout due together: the timer first, cleared.
        assert_eq!(s.deadline(TIMEOUTS, true, true), Some(t0 + ms(10_000)));
        assert_eq!(s.expire(t0 + ms(10_000), TIMEOUTS, true, true), Expiry::Timer);
        assert_eq!(s.timer, None);
        assert_eq!(
            s.expire(t0 + ms(10_000), TIMEOUTS, true, true),
            Expiry::Idle(CloseReason::IdleShort)
        );
        // A timer alone (idle timeouts off for this session).
        let mut alone = state(Phase::Open, ConnKind::Long, t0);
        alone.timer = Some(t0 + ms(5));
        assert_eq!(alone.deadline(TIMEOUTS, false, false), Some(t0 + ms(5)));
        assert_eq!(
            alone.expire(t0 + ms(4), TIMEOUTS, false, false),
            Expiry::Later(Some(t0 + ms(5)))
        );
    }

    #[test]
    fn after_a_callback_the_session_close_comes_first_then_promotion_then_rest() {
        let t0 = Instant::now();
        let open = state(Phase::Open, ConnKind::Short, t0);
        let asked = Some((CloseReason::ServerClose, Ending::Graceful));
        assert_eq!(
            open.after_callback(asked, 1, &AT_REST),
            Next::Close(CloseReason::ServerClose, Ending::Graceful)
        );
        assert_eq!(open.after_callback(None, 1, &AT_REST), Next::Promote);
        assert_eq!(open.after_callback(None, 0, &AT_REST), Next::Serve);
        let done = Facts { done: true, at_rest: true };
        assert_eq!(open.after_callback(None, 0, &done), Next::Finish);
        // Promotion: kept alive, or closing at rest; decided again after it.
        let mut kept = open;
        kept.promoted(Promotion::Long);
        assert_eq!(
            (kept.kind, kept.after_callback(None, 1, &AT_REST)),
            (ConnKind::Long, Next::Serve)
        );
        let mut refused = open;
        refused.promoted(Promotion::Refused);
        assert_eq!(refused.phase, Phase::ClosingAtRest(CloseReason::LongLimit));
        assert_eq!(
            refused.after_callback(None, 1, &AT_REST),
            Next::CloseAtRest(CloseReason::LongLimit)
        );
        assert_eq!(refused.after_callback(None, 1, &BUSY), Next::Serve, "an exchange in flight");
        let mut failed = open;
        failed.promoted(Promotion::Failed);
        assert_eq!(failed.phase, Phase::ClosingAtRest(CloseReason::Error));
        // A draining connection is never promoted; it is a hand-off candidate.
        let draining = state(Phase::Draining(HandOff::Local), ConnKind::Short, t0);
        assert_eq!(draining.after_callback(None, 1, &AT_REST), Next::Offer);
        let pending = state(Phase::Draining(HandOff::Pending { tries: 2 }), ConnKind::Long, t0);
        assert_eq!(pending.after_callback(None, 0, &BUSY), Next::Offer);
        let never = state(Phase::Draining(HandOff::Never), ConnKind::Long, t0);
        assert_eq!(never.after_callback(None, 0, &AT_REST), Next::Serve);
        assert_eq!(never.after_callback(None, 0, &done), Next::Finish);
    }
}
