//! A client connection as the worker loop sees it, and the idle-deadline rules.
//!
//! Pure data and pure functions of `now`, so the timeout policy is unit-tested without
//! sockets or clocks.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::limits::Ticket;
use crate::poller::Interest;
pub use crate::services::CloseReason;
use crate::services::{Progress, Session};

/// Short until the first completed exchange, long (kept-alive) after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKind {
    /// No exchange completed yet: `short_idle_timeout` applies.
    Short,
    /// At least one exchange completed and the connection was kept: `long_idle_timeout`.
    Long,
}

/// When a connection of `kind`, last active at `last_activity`, is to be closed as idle;
/// `None` when the applicable timeout is disabled.
pub fn idle_deadline(
    kind: ConnKind,
    last_activity: Instant,
    short: Option<Duration>,
    long: Option<Duration>,
) -> Option<Instant> {
    let timeout = match kind {
        ConnKind::Short => short,
        ConnKind::Long => long,
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

/// Where a connection stands in a hand-off to the serving generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOff {
    /// Served here; once the worker retires, offered at its next rest.
    Local,
    /// Offered (the `tries`th time): the socket is not watched and not touched until the
    /// answer.
    Offered {
        /// Offers made, this one included.
        tries: u32,
    },
    /// A retry came due: offered again at its next rest. `tries` so far.
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
    /// Not to be handed off (refused, or its session cannot be): it finishes here.
    Never,
}

/// One accepted client connection.
pub struct Conn {
    /// The non-blocking socket.
    pub stream: TcpStream,
    /// Index of the listener it came in on.
    pub listener: usize,
    /// The client's address.
    pub peer: SocketAddr,
    /// The service's per-connection state.
    pub session: Box<dyn Session>,
    /// Short or long.
    pub kind: ConnKind,
    /// Accept time.
    pub opened: Instant,
    /// Last time a byte moved (or accept time).
    pub last_activity: Instant,
    /// Bytes and exchanges so far.
    pub totals: Progress,
    /// The per-client limits record, when the listener has limits.
    pub ticket: Option<Ticket>,
    /// The PROXY protocol proxy it came through (`peer` is then the client the header named).
    pub proxy: Option<SocketAddr>,
    /// Close as soon as no exchange is in flight, for this reason.
    pub close_at_rest: Option<CloseReason>,
    /// Lingering close under way: our FIN is sent, the client's remaining input is read and
    /// discarded until its FIN or the deadline, then the connection is closed for the reason.
    pub lingering: Option<(CloseReason, Instant)>,
    /// The interest registered with the poller.
    pub interest: Interest,
    /// Unique among this worker's connections: tells a timer entry for this connection from
    /// one for an earlier connection on the same descriptor.
    pub serial: u64,
    /// The earliest deadline this connection has in the worker's timer heap, if any.
    pub scheduled: Option<Instant>,
    /// The session's timer ([`crate::services::Context::set_timer`]).
    pub timer: Option<Instant>,
    /// Descriptors the session watches besides the client socket.
    pub extras: Vec<RawFd>,
    /// Hand-off to the serving generation.
    pub handoff: HandOff,
}

impl Conn {
    /// Adds one callback's progress; any byte moved counts as activity.
    pub fn record(&mut self, progress: Progress, now: Instant) {
        self.totals.bytes_in += progress.bytes_in;
        self.totals.bytes_out += progress.bytes_out;
        self.totals.exchanges += progress.exchanges;
        if progress.moved() {
            self.last_activity = now;
        }
    }

    /// What the poller should watch for this connection now.
    pub fn wanted_interest(&self) -> Interest {
        let Interest { read, write, .. } = self.session.interest();
        Interest { read, write, exclusive: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_connections_get_their_own_timeout() {
        let t0 = Instant::now();
        let short = Some(Duration::from_secs(10));
        let long = Some(Duration::from_secs(300));
        assert_eq!(
            idle_deadline(ConnKind::Short, t0, short, long),
            Some(t0 + Duration::from_secs(10))
        );
        assert_eq!(
            idle_deadline(ConnKind::Long, t0, short, long),
            Some(t0 + Duration::from_secs(300))
        );
        assert_eq!(idle_deadline(ConnKind::Short, t0, None, long), None, "0 disables");
        assert_eq!(idle_reason(ConnKind::Short), CloseReason::IdleShort);
        assert_eq!(idle_reason(ConnKind::Long).as_str(), "idle-long");
    }
}
