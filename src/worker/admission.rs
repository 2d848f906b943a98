//! Who gets in, and who is shed to make room: a new client's admission as a plain function of
//! the listener's policy, the client and the counts, and the queue of connections a full
//! worker may shed.
//!
//! Runs in workers. Pure: the shared per-client table (`limits`) is asked through a closure,
//! only once the access list let the client through, so a denied client spends no token of
//! its rate. Admission checks, in order: the listener's `allow`/`deny` lists, then the shared
//! table (the client's rate, its open connections, the listener's cap: one lock, see
//! [`crate::limits::Limits::admit_with`]), then room in this worker.
//!
//! A worker without room admits only because it can shed a connection for the new client
//! (its intake decided so, see `intake.rs`), and only once the client passed the checks
//! above, so that a refused client never costs anyone a connection. What it sheds, on
//! listeners with `shed_when_full`, first that can be had:
//! 1. the oldest connection from a trusted proxy still waiting for its PROXY header (a proxy
//!    sends it with the connection: one that waits is broken or hostile, and would be closed
//!    at `PROXY_HEADER_TIMEOUT` anyway) — see `header.rs`;
//! 2. the oldest connection that has completed no exchange ([`sheddable`]; closed at once:
//!    it was answered nothing);
//! 3. a connection at rest ([`over_share_sheddable`], nothing unread) of the client holding
//!    the most connections in the worker, if it holds at least two more than the new client:
//!    a lingering close, so that no answer is lost (reason `over-share`; the rule and what
//!    a *fair share* is are in `shares.rs`). At most [`SHED_LINGER_MAX`] such closes linger
//!    at once (each holds its descriptor beyond the budget until the client's FIN).
//!
//! With none of them, the new client is refused (reason `over-share`): it holds as many
//! connections in the worker as anyone else, so taking one of theirs would not be fair.

use std::collections::VecDeque;
use std::net::IpAddr;

use crate::config::ListenerConfig;
use crate::limits::{Admission, LimitsError, Rules, Ticket};
use crate::services::CloseReason;

use super::phase::{ConnKind, ConnState, Phase};

/// Connections shed by fair share (reason `over-share`) that may be in their lingering close
/// at once, beyond the worker's budget: past it, a full worker sheds by fair share only once
/// one of them has closed (at the latest `LINGER_TIMEOUT` after it was shed).
pub const SHED_LINGER_MAX: usize = 16;

/// Clients holding the most connections that one search for a connection to shed by fair
/// share looks at (ties), and connections of each: the search is bounded whatever the
/// number of connections.
pub const SHED_SCAN_CLIENTS: usize = 2;
/// See [`SHED_SCAN_CLIENTS`].
pub const SHED_SCAN_MEMBERS: usize = 8;

/// The outcome of [`admit`].
#[derive(Debug)]
pub enum Verdict {
    /// Serve the client, with its count in the shared table (`None` when the listener counts
    /// nothing); `shed`: the worker is full, shed a connection first.
    Admit {
        /// The shared table's record of this connection.
        ticket: Option<Ticket>,
        /// No room left: shed the oldest sheddable connection first.
        shed: bool,
    },
    /// Turn the client away: close at once, counted as a refusal of `reason`; `error` when the
    /// shared table failed (the refusal fails closed, and the error is logged).
    Refuse {
        /// `denied`, `limit`, `listener-full`, `rate` or `error`.
        reason: CloseReason,
        /// The shared table's error, for `error`.
        error: Option<LimitsError>,
    },
}

/// Whether `client` (its IP address; `None` for a Unix client, which no access list names)
/// may open a connection on the listener of `policy`, with `room`
/// descriptors left in this worker's budget; `count` asks the shared table to count it under
/// the listener's [`Rules`] (called only when the listener counts connections and the access
/// list allows the client).
pub fn admit(
    policy: &ListenerConfig,
    client: Option<IpAddr>,
    room: usize,
    count: impl FnOnce(&Rules) -> Result<Admission, LimitsError>,
) -> Verdict {
    let access = &policy.admission.access;
    if !access.is_open() && !client.is_some_and(|ip| access.allows(ip)) {
        return Verdict::Refuse { reason: CloseReason::Denied, error: None };
    }
    let mut ticket = None;
    if policy.counts_connections() {
        let reason = match count(&policy.rules()) {
            Ok(Admission::Admitted(counted)) => {
                ticket = Some(counted);
                None
            }
            Ok(Admission::Refused { .. }) => Some(CloseReason::Limit),
            Ok(Admission::ListenerFull { .. }) => Some(CloseReason::ListenerFull),
            Ok(Admission::RateLimited) => Some(CloseReason::Rate),
            Err(error) => {
                return Verdict::Refuse { reason: CloseReason::Error, error: Some(error) };
            }
        };
        if let Some(reason) = reason {
            return Verdict::Refuse { reason, error: None };
        }
    }
    // Without room the intake took the client only because something can be shed. (Should
    // nothing be sheddable after all, it is served one over the budget; select()'s budget
    // keeps spare descriptors for that.)
    Verdict::Admit { ticket, shed: room == 0 }
}

/// Whether a connection may be shed: short, no exchange completed, served with no close
/// planned, on a listener with `shed_when_full`, and with idle timeouts (whose traffic the
/// loop cannot see, a child owning the socket, is never idle).
pub fn sheddable(state: &ConnState, exchanges: u64, idle_timeouts: bool) -> bool {
    state.kind == ConnKind::Short && exchanges == 0 && state.phase == Phase::Open && idle_timeouts
}

/// Whether a connection of a client over its fair share may be shed now: served with no
/// close planned, with idle timeouts (a child owning the socket is never shed), and its
/// session `at_rest` (no exchange in flight: every answer written). The caller also makes
/// sure nothing unread waits in the socket before it sheds it.
pub fn over_share_sheddable(state: &ConnState, idle_timeouts: bool, at_rest: bool) -> bool {
    state.phase == Phase::Open && idle_timeouts && at_rest
}

/// The connections a full worker may shed, oldest first, as `(descriptor, serial)`.
///
/// Entries go stale when their connection closes or stops being sheddable (an exchange
/// completed); they are dropped when they reach the front, each once, so that asking costs
/// O(1) amortised. The queue is compacted when stale entries behind a long-lived front would
/// make it grow past twice the connections held.
#[derive(Debug, Default)]
pub struct ShedQueue {
    queue: VecDeque<(usize, u64)>,
}

impl ShedQueue {
    /// Adds a new connection; `held` is the number of descriptors the table spans, and
    /// `candidate` tells which entries may still become sheddable (for compaction).
    pub fn push(
        &mut self,
        fd: usize,
        serial: u64,
        held: usize,
        candidate: impl Fn(usize, u64) -> bool,
    ) {
        self.queue.push_back((fd, serial));
        if self.queue.len() > 2 * held + 64 {
            // Old short connections at the front keep stale entries behind them alive.
            self.queue.retain(|&(fd, serial)| candidate(fd, serial));
        }
    }

    /// The oldest connection that `sheddable` says may be shed, dropping the stale entries
    /// in front of it.
    pub fn front(&mut self, sheddable: impl Fn(usize, u64) -> bool) -> Option<(usize, u64)> {
        while let Some(&(fd, serial)) = self.queue.front() {
            if sheddable(fd, serial) {
                return Some((fd, serial));
            }
            self.queue.pop_front();
        }
        None
    }

    /// Takes the oldest sheddable connection out of the queue.
    pub fn pop(&mut self, sheddable: impl Fn(usize, u64) -> bool) -> Option<(usize, u64)> {
        let front = self.front(sheddable)?;
        self.queue.pop_front();
        Some(front)
    }

    /// Entries queued, stale ones included.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::limits::{ClientKey, Limits};
    use crate::services::Registry;
    use crate::worker::phase::HandOff;

    /// The first listener of a configuration with `lines` in its `[[listener]]` block.
    fn policy(lines: &str) -> ListenerConfig {
        let text = format!(
            "[[listener]]\nname = \"echo\"\naddress = \"127.0.0.1:0\"\nservice = \"echo\"\n{lines}\n"
        );
        let config = crate::config::parse(Path::new("test.toml"), &text, &Registry::builtin());
        config.expect("valid").listeners.remove(0)
    }

    fn client(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    #[test]
    fn the_access_list_comes_first_and_spends_nothing_of_the_table() {
        let listener = policy("deny = [\"127.0.0.2\"]\nmax_connections_per_client = 1");
        let asked = Cell::new(false);
        let verdict = admit(&listener, Some(client(2)), 5, |_| {
            asked.set(true);
            Ok(Admission::RateLimited)
        });
        assert!(matches!(verdict, Verdict::Refuse { reason: CloseReason::Denied, error: None }));
        assert!(!asked.get(), "a denied client is not counted");
    }

    #[test]
    fn the_shared_table_decides_limits_rates_and_the_listener_cap() {
        let listener = policy("max_connections_per_client = 1");
        for (answer, reason) in [
            (Admission::Refused { open: 1 }, CloseReason::Limit),
            (Admission::ListenerFull { open: 9 }, CloseReason::ListenerFull),
            (Admission::RateLimited, CloseReason::Rate),
        ] {
            let verdict = admit(&listener, Some(client(3)), 5, |rules| {
                assert_eq!(rules.per_client.map(|n| n.get()), Some(1));
                Ok(answer)
            });
            assert!(
                matches!(verdict, Verdict::Refuse { reason: r, error: None } if r == reason),
                "{verdict:?}"
            );
        }
        let failed = admit(&listener, Some(client(3)), 5, |_| Err(LimitsError::SlotFull(0)));
        assert!(matches!(
            failed,
            Verdict::Refuse { reason: CloseReason::Error, error: Some(LimitsError::SlotFull(0)) }
        ));
        // Admitted: the ticket is the table's, and no room means shedding first.
        let limits = Limits::new(1, 4).unwrap();
        let mut ledger = limits.ledger(0);
        let key = ClientKey::new(0, client(3));
        let verdict = admit(&listener, Some(client(3)), 0, |rules| {
            limits.admit_with(&mut ledger, key, rules, 0)
        });
        let Verdict::Admit { ticket: Some(_), shed: true } = verdict else { panic!("{verdict:?}") };
        let again = admit(&listener, Some(client(3)), 1, |rules| {
            limits.admit_with(&mut ledger, key, rules, 0)
        });
        assert!(
            matches!(again, Verdict::Refuse { reason: CloseReason::Limit, error: None }),
            "counted: {again:?}"
        );
    }

    #[test]
    fn a_listener_that_counts_nothing_never_asks_the_table() {
        let listener =
            policy("max_connections_per_client = 0\nmax_long_connections_per_client = 0");
        let verdict = admit(&listener, Some(client(4)), 1, |_| panic!("not asked"));
        assert!(matches!(verdict, Verdict::Admit { ticket: None, shed: false }));
    }

    #[test]
    fn only_open_short_connections_without_an_exchange_are_sheddable() {
        let t0 = Instant::now();
        let open = ConnState::new(Phase::Open, ConnKind::Short, t0);
        assert!(sheddable(&open, 0, true));
        assert!(!sheddable(&open, 1, true), "an exchange completed");
        assert!(!sheddable(&open, 0, false), "a child owns the socket");
        let long = ConnState { kind: ConnKind::Long, ..open };
        assert!(!sheddable(&long, 0, true));
        for phase in [
            Phase::ClosingAtRest(CloseReason::LongLimit),
            Phase::Draining(HandOff::Local),
            Phase::Lingering { reason: CloseReason::Shed, until: t0 },
        ] {
            assert!(!sheddable(&ConnState { phase, ..open }, 0, true), "{phase:?}");
        }
    }

    #[test]
    fn only_open_connections_at_rest_are_shed_by_fair_share() {
        let t0 = Instant::now();
        let long = ConnState::new(Phase::Open, ConnKind::Long, t0);
        assert!(over_share_sheddable(&long, true, true));
        assert!(!over_share_sheddable(&long, true, false), "an exchange in flight");
        assert!(!over_share_sheddable(&long, false, true), "a child owns the socket");
        let short = ConnState { kind: ConnKind::Short, ..long };
        assert!(over_share_sheddable(&short, true, true), "short or long alike");
        for phase in [
            Phase::ClosingAtRest(CloseReason::LongLimit),
            Phase::Draining(HandOff::Local),
            Phase::Lingering { reason: CloseReason::OverShare, until: t0 },
        ] {
            assert!(!over_share_sheddable(&ConnState { phase, ..long }, true, true), "{phase:?}");
        }
    }

    #[test]
    fn the_shed_queue_gives_the_oldest_live_entry_and_drops_stale_ones_once() {
        let mut queue = ShedQueue::default();
        for fd in 0..4 {
            queue.push(fd, fd as u64 + 100, 4, |_, _| true);
        }
        // Descriptor 0 closed, 1 reused by a later connection (another serial).
        let live = |fd: usize, serial: u64| fd >= 2 || (fd == 1 && serial == 999);
        assert_eq!(queue.front(live), Some((2, 102)));
        assert_eq!(queue.len(), 2, "the stale front entries are gone");
        assert_eq!(queue.pop(live), Some((2, 102)));
        assert_eq!(queue.pop(|_, _| false), None);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn the_shed_queue_is_compacted_when_stale_entries_pile_up() {
        let mut queue = ShedQueue::default();
        // A long-lived front entry (descriptor 0), then many short-lived ones.
        for serial in 0..100 {
            queue.push(if serial == 0 { 0 } else { 1 }, serial, 2, |fd, serial| {
                fd == 0 || serial == 99
            });
        }
        assert!(queue.len() <= 2 * 2 + 64 + 1, "bounded: {}", queue.len());
        assert_eq!(queue.pop(|fd, _| fd == 0), Some((0, 0)));
    }
}
