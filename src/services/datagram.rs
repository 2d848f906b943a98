//! The datagram side of a service (`transport = "udp"`): [`DatagramService`] answers one
//! datagram at a time; a [`Flow`] is a longer conversation on a socket of its own (a TFTP
//! transfer and its TID).
//!
//! Runs in workers. A [`super::Service`] offers its datagram side with
//! [`super::Service::datagram`]; a service without one is refused on a UDP listener by
//! `preforkd check`, with its reason. The worker loop keeps the policy, as for TCP: it
//! receives on the listener's socket until `WouldBlock`, drops datagrams over the client's
//! `max_datagram_rate_per_client` before the service sees them, sends the reply, and for a
//! flow: counts it against `max_connections_per_client` and the worker's descriptor budget,
//! watches its socket, keeps its timer and writes its access line.
//!
//! Reflection: a datagram's source address can be forged, so a reply goes to whoever the
//! sender claims to be. Services keep replies small (echo's is never larger than the request)
//! and the loop's rate limit caps what any one address can draw.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::Progress;

/// The datagram side of a service.
pub trait DatagramService {
    /// Answers `request`, received from `peer` on the listener's `local` address at `now`.
    /// A service that replies writes the reply into `reply` (empty on entry; the loop sends
    /// it to `peer` from the listener's socket) and returns [`Answer::Reply`].
    ///
    /// Must not block. The reply should be no larger than needed: see the module doc.
    fn on_datagram(
        &self,
        request: &[u8],
        peer: SocketAddr,
        local: SocketAddr,
        now: Instant,
        reply: &mut Vec<u8>,
    ) -> Answer;
}

/// What a [`DatagramService`] does with one datagram.
pub enum Answer {
    /// Send `reply` back to the peer.
    Reply,
    /// Nothing to send (malformed or unwanted request); the loop counts it as ignored.
    Ignore,
    /// Nothing sent because the peer is not verified yet (it has answered nothing, so its
    /// address may be forged) and the listener's budget for such peers is spent (TFTP's
    /// `max_unverified_transfers`); the loop counts it apart from ignored ones.
    Unverified,
    /// Start a conversation on a socket of its own (the loop calls [`Flow::start`] unless
    /// its per-client limit or budget refuses it, then [`Flow::refuse`]).
    Flow(Box<dyn Flow>),
}

/// Where a [`Flow`] stands after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Call [`Flow::on_timer`] at this instant unless the socket is readable first.
    Wait(Instant),
    /// Nothing changed (a duplicate or stray packet): the last deadline stands.
    Unchanged,
    /// The conversation is over, with this result for the access log (lowercase words
    /// joined by `-`: `complete`, `timeout`, `client-error` ...).
    Done(&'static str),
}

/// A conversation on a socket the flow owns (for TFTP, the transfer's TID). Callbacks must
/// not block: read until `WouldBlock`, send what the protocol allows, and return the next
/// deadline.
pub trait Flow {
    /// The socket the loop watches for readability while the flow lives (one descriptor of
    /// the worker's `max_connections_per_worker` budget).
    fn socket(&self) -> BorrowedFd<'_>;

    /// The loop admitted the flow: send the first packet.
    fn start(&mut self, now: Instant) -> Step;

    /// The socket is readable.
    fn on_readable(&mut self, now: Instant) -> Step;

    /// How long the loop may poll with a zero timeout for the peer's answer after a
    /// [`Step::Wait`], instead of sleeping in the poller, after the model of Linux's busy
    /// polling (`net.core.busy_poll`, socket(7)). The loop polls only while the flow is the
    /// worker's only work, and polls less and less for a peer that does not answer within
    /// it. Default zero: never.
    fn busy_poll(&self) -> Duration {
        Duration::ZERO
    }

    /// The deadline of the last [`Step::Wait`] has passed.
    fn on_timer(&mut self, now: Instant) -> Step;

    /// The loop will not run this flow (`reason`: `limit`, `budget`, `shutdown`): tell the
    /// peer if the protocol can, best effort. The flow is dropped next.
    fn refuse(&mut self, reason: &str);

    /// Bytes moved so far (for the scoreboard and the access line).
    fn totals(&self) -> Progress;

    /// The flow's own access-log fields, `key=value` separated by spaces (the loop adds
    /// listener, peer, duration and result).
    fn describe(&self) -> String;
}
