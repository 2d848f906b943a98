//! The worker's UDP path: datagrams from a ready UDP listener, and the flows (TFTP transfers)
//! services start, each on a socket of its own with one deadline.
//!
//! Runs in a worker. Invariants:
//! - a ready UDP socket is read until `WouldBlock`, at most [`DATAGRAM_BATCH`] datagrams per
//!   turn, so one flood cannot starve the worker's connections;
//! - a datagram over its client's `max_datagram_rate_per_client` is dropped before the
//!   service sees it (the rate is a token bucket shared by all workers, [`DatagramRates`]);
//! - a flow is admitted like a connection: against the worker's descriptor budget and the
//!   client's `max_connections_per_client` in the shared table, and its record is released
//!   when it ends, whatever the way;
//! - flows live in the worker's generic table (`table.rs`), by descriptor: a deadline that
//!   moves later costs nothing until its entry comes due, then it is pushed again; entries
//!   of flows gone are skipped by serial;
//! - datagrams are not connections: they get a summary access line per listener at most
//!   every [`SUMMARY_INTERVAL`], flows get one access line each;
//! - every datagram received on a listener's socket is counted on the scoreboard under its
//!   listener with exactly one [`Datagram`] outcome, its bytes with the listener's bytes; a
//!   flow counts like a connection (accepted, open, closed for `shutdown` or for its
//!   result as a reason of the service's own, its bytes when it ends);
//! - a flow that waits for its peer is busy-polled ([`BusyPoll`]: the loop polls with a zero
//!   timeout) only while it is the worker's only work, and never past its budget.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, SockaddrStorage, recvfrom, sendto};

use crate::limits::{Admission, DatagramRates, Ticket, Verdict};
use crate::logging::ACCESS_TARGET;
use crate::net::Peer;
use crate::poller::Interest;
use crate::scoreboard::Datagram;
use crate::services::{Answer, CloseReason, Flow, Progress, Step};

use super::env::Env;
use super::table::Table;

/// Datagrams read from one ready socket per turn at most.
pub const DATAGRAM_BATCH: usize = 64;

/// Least interval between two summary lines of a UDP listener.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);

/// Largest datagram received (the UDP maximum payload): nothing is ever truncated.
const DATAGRAM_MAX: usize = 65_535;

/// Busy polling of one flow ([`Flow::busy_poll`]), after the model of Linux's busy polling
/// of select and poll (`net.core.busy_poll`, socket(7)): once the flow has sent and waits
/// for its peer, the worker polls with a zero timeout for up to the budget instead of
/// sleeping in the poller. In lock-step (TFTP's windowsize 1) every packet is answered, and
/// on a near peer (loopback, a fast LAN) the wake-up of a sleeping worker is most of the
/// round trip. The loop turns as usual meanwhile: other sockets, signals and timers are
/// served as soon as they are ready.
///
/// Only the worker's only work is polled for (one flow, no connection), so a busy worker
/// never burns the CPU its peers need. Adaptive, like an adaptive mutex: a wait the budget
/// did not cover means the peer is further away than the budget (or was descheduled), and
/// the next wait sleeps at once; misses in a row skip 3, 7 ... up to 1023 waits before
/// polling is tried again, so a distant peer costs one budget in about a thousand packets.
#[derive(Debug, Default)]
struct BusyPoll {
    /// Waits left before polling is tried again.
    skip: u32,
    /// Polls in a row the budget did not cover (at most 10).
    misses: u32,
}

impl BusyPoll {
    /// Whether to poll for this wait: false while skipping after a miss.
    fn arm(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// The peer answered within the budget.
    fn answered(&mut self) {
        self.misses = 0;
    }

    /// The budget passed without an answer.
    fn missed(&mut self) {
        self.misses = (self.misses + 1).min(10);
        self.skip = (1 << self.misses) - 1;
    }
}

/// The flow being busy-polled for: (descriptor, serial, end of the budget).
#[derive(Debug, Clone, Copy)]
struct BusyWait {
    fd: usize,
    serial: u64,
    until: Instant,
}

/// One running flow (its serial and timer bookkeeping are the table's).
struct FlowEntry {
    flow: Box<dyn Flow>,
    listener: usize,
    peer: SocketAddr,
    opened: Instant,
    ticket: Option<Ticket>,
    /// The deadline in force. A deadline that moves later (every block sent) costs no heap
    /// operation: the table's entry is checked when it comes due and pushed again at the
    /// deadline then in force, so the heap holds about one entry per flow instead of one
    /// per packet.
    deadline: Option<Instant>,
    /// Busy polling for the peer's answers.
    busy: BusyPoll,
}

/// Counters of one UDP listener since its last summary line (kept in its entry of the
/// listeners table).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    received: u64,
    answered: u64,
    over_rate: u64,
    ignored: u64,
    unverified: u64,
    flows: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// Counts a datagram of listener `index` that came to `outcome`: in the summary line's
/// totals and in the listener's tally for the scoreboard.
fn count(env: &mut Env<'_>, index: usize, outcome: Datagram) {
    let entry = &mut env.listeners[index];
    entry.tally.datagram(outcome);
    let totals = &mut entry.datagrams;
    match outcome {
        Datagram::Answered => totals.answered += 1,
        Datagram::Ignored => totals.ignored += 1,
        Datagram::OverRate => totals.over_rate += 1,
        Datagram::Unverified => totals.unverified += 1,
        Datagram::Flow | Datagram::FlowRefused => totals.flows += 1,
    }
}

/// The worker's UDP state: its flows and the buffers of its listeners' datagrams.
pub struct Datagrams {
    /// Flows by the descriptor of their socket.
    flows: Table<FlowEntry>,
    buffer: Vec<u8>,
    reply: Vec<u8>,
    last_summary: Instant,
    /// The flow polled for, if any (see [`BusyPoll`]).
    busy: Option<BusyWait>,
}

impl Default for Datagrams {
    fn default() -> Self {
        Datagrams {
            flows: Table::default(),
            buffer: Vec::new(),
            reply: Vec::new(),
            last_summary: Instant::now(),
            busy: None,
        }
    }
}

/// The peer address of a received datagram.
fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

impl Datagrams {
    /// Flows running: each holds a descriptor of the worker's budget.
    #[inline]
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether `fd` is a flow's socket.
    #[inline]
    pub fn owns(&self, fd: RawFd) -> bool {
        usize::try_from(fd).is_ok_and(|fd| self.flows.contains(fd))
    }

    /// Whether one flow is the worker's only work, with `connections` open besides (served
    /// connections and PROXY headers being read): the condition for busy polling.
    #[inline]
    fn alone(&self, connections: usize) -> bool {
        self.flows.len() == 1 && connections == 0
    }

    /// Whether the loop should poll with a zero timeout now (see [`BusyPoll`]). A budget
    /// that has passed counts as a miss of its flow and ends the polling; so does other
    /// work arriving (another flow, or `connections` above 0), without counting a miss.
    #[inline]
    pub fn busy_polling(&mut self, now: Instant, connections: usize) -> bool {
        let Some(busy) = self.busy else { return false };
        if !self.alone(connections) {
            self.busy = None;
            return false;
        }
        if now < busy.until {
            return true;
        }
        self.busy = None;
        if let Some(entry) = self.flows.live_mut(busy.fd, busy.serial) {
            entry.busy.missed();
        }
        false
    }

    /// The earliest flow deadline (possibly stale: an early wake-up only).
    #[inline]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.flows.next_deadline()
    }

    /// Reads datagrams from UDP listening descriptor `fd` (listener `index`) until
    /// `WouldBlock` or a batch, and hands each within its client's rate to the service.
    /// `held`: descriptors the worker holds against its budget besides its flows;
    /// `draining`: the worker stops gracefully (new flows are refused).
    pub fn receive(
        &mut self,
        fd: RawFd,
        index: usize,
        now: Instant,
        env: &mut Env<'_>,
        held: usize,
        draining: bool,
    ) {
        let entry = &env.listeners[index];
        let service = entry.policy.service.service.clone();
        let Ok(datagram) = service.datagram() else { return };
        // A datagram listener is bound to an IP address (the configuration check says so).
        let Some(local) = entry.local.ip() else { return };
        let rate = entry.policy.max_datagram_rate_per_client;
        let rates: &DatagramRates = env.rates;
        if self.buffer.len() < DATAGRAM_MAX {
            self.buffer.resize(DATAGRAM_MAX, 0);
        }
        for _ in 0..DATAGRAM_BATCH {
            let (n, peer) = match recvfrom::<SockaddrStorage>(fd, &mut self.buffer) {
                Ok((n, Some(from))) => match socket_addr(&from) {
                    Some(peer) => (n, peer),
                    None => continue,
                },
                Ok((_, None)) => continue,
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                // An ICMP error queued for an earlier reply: not this datagram's business.
                Err(Errno::ECONNREFUSED | Errno::EHOSTUNREACH | Errno::ENETUNREACH) => continue,
                Err(error) => {
                    if let Some(held_back) = env.books.accept_error_log.allow(now) {
                        log::error!(
                            "receive on {} failed: {error} ({held_back} similar errors not logged)",
                            env.listeners[index].policy.name
                        );
                    }
                    return;
                }
            };
            let entry = &mut env.listeners[index];
            entry.datagrams.received += 1;
            entry.datagrams.bytes_in += n as u64;
            entry.tally.moved(Progress { bytes_in: n as u64, ..Progress::default() });
            env.books.counters.moved(n as u64, 0);
            if let Some(rate) = rate {
                let verdict = rates.take(env.listeners[index].client_key(&Peer::Ip(peer)), rate);
                if verdict.as_ref().is_ok_and(|v| *v != Verdict::Allowed) || verdict.is_err() {
                    count(env, index, Datagram::OverRate);
                    if let Some(held_back) = env.books.refusal_log.allow(now) {
                        let why = match verdict {
                            Ok(_) => "max_datagram_rate_per_client reached".to_owned(),
                            Err(error) => error.to_string(),
                        };
                        log::warn!(
                            "dropped datagrams from {} on {}: {why} ({held_back} refusals not logged)",
                            peer.ip(),
                            env.listeners[index].policy.name
                        );
                    }
                    continue;
                }
            }
            self.reply.clear();
            let request = &self.buffer[..n];
            match datagram.on_datagram(request, peer, local, now, &mut self.reply) {
                Answer::Reply => {
                    let sent =
                        sendto(fd, &self.reply, &SockaddrStorage::from(peer), MsgFlags::empty());
                    match sent {
                        Ok(sent) => {
                            count(env, index, Datagram::Answered);
                            let entry = &mut env.listeners[index];
                            entry.datagrams.bytes_out += sent as u64;
                            entry
                                .tally
                                .moved(Progress { bytes_out: sent as u64, ..Progress::default() });
                            env.books.counters.moved(0, sent as u64);
                        }
                        // A full send buffer drops the reply as the network could.
                        Err(_) => count(env, index, Datagram::Ignored),
                    }
                }
                Answer::Ignore => count(env, index, Datagram::Ignored),
                Answer::Unverified => count(env, index, Datagram::Unverified),
                Answer::Flow(mut flow) => {
                    let full = env.room(held + self.flows.len()) == 0;
                    if draining || full {
                        let reason = if draining { "shutdown" } else { "budget" };
                        count(env, index, Datagram::FlowRefused);
                        flow.refuse(reason);
                        flow_line(env, index, peer, Duration::ZERO, &*flow, reason);
                    } else {
                        self.start_flow(index, peer, flow, now, env);
                    }
                }
            }
        }
    }

    /// Starts a flow the budget has room for, or refuses it (per-client limit, or a socket
    /// the poller cannot watch).
    fn start_flow(
        &mut self,
        index: usize,
        peer: SocketAddr,
        mut flow: Box<dyn Flow>,
        now: Instant,
        env: &mut Env<'_>,
    ) {
        let fd = flow.socket().as_raw_fd();
        let mut ticket = None;
        let policy = &env.listeners[index].policy;
        if let Some(max) = policy.max_connections_per_client {
            let key = env.listeners[index].client_key(&Peer::Ip(peer));
            match env.limits.admit(&mut env.ledger, key, Some(max)) {
                Ok(Admission::Admitted(t)) => ticket = Some(t),
                // Only the per-client rule is asked for here.
                Ok(Admission::Refused { open } | Admission::ListenerFull { open }) => {
                    if let Some(held_back) = env.books.refusal_log.allow(now) {
                        log::warn!(
                            "refused a transfer to {} on {}: {open} running, max_connections_per_client reached ({held_back} refusals not logged)",
                            peer.ip(),
                            env.listeners[index].policy.name
                        );
                    }
                    count(env, index, Datagram::FlowRefused);
                    flow.refuse("limit");
                    return flow_line(env, index, peer, Duration::ZERO, &*flow, "limit");
                }
                Ok(Admission::RateLimited) => {
                    count(env, index, Datagram::FlowRefused);
                    flow.refuse("rate");
                    return flow_line(env, index, peer, Duration::ZERO, &*flow, "rate");
                }
                Err(error) => {
                    let name = &env.listeners[index].policy.name;
                    log::error!("refused a transfer to {peer} on {name}: {error}");
                    count(env, index, Datagram::FlowRefused);
                    flow.refuse("error");
                    return flow_line(env, index, peer, Duration::ZERO, &*flow, "error");
                }
            }
        }
        if self.owns(fd) || env.poller.set(fd, Interest::READ).is_err() {
            // Over select()'s FD_SETSIZE: no room after all.
            count(env, index, Datagram::FlowRefused);
            flow.refuse("budget");
            env.release(ticket, Peer::Ip(peer));
            return flow_line(env, index, peer, Duration::ZERO, &*flow, "budget");
        }
        let step = flow.start(now);
        let entry = FlowEntry {
            flow,
            listener: index,
            peer,
            opened: now,
            ticket,
            deadline: None,
            busy: BusyPoll::default(),
        };
        if self.flows.insert(fd as usize, entry).is_err() {
            return; // cannot happen: checked by `owns` above
        }
        count(env, index, Datagram::Flow);
        env.listeners[index].tally.accepted();
        env.books.counters.accepted();
        self.apply(fd as usize, step, now, env);
    }

    /// Applies what a flow callback returned.
    fn apply(&mut self, fd: usize, step: Step, now: Instant, env: &mut Env<'_>) {
        let Some(entry) = self.flows.get_mut(fd) else { return };
        match step {
            Step::Wait(at) => {
                entry.deadline = Some(at);
                self.flows.schedule(fd, at);
            }
            Step::Unchanged => {}
            Step::Done(result) => self.finish_flow(fd, result, now, env),
        }
    }

    /// A flow's socket is readable; `connections`: served connections and PROXY headers
    /// open besides (for busy polling).
    pub fn on_ready(&mut self, fd: RawFd, now: Instant, env: &mut Env<'_>, connections: usize) {
        let fd = fd as usize;
        let alone = self.alone(connections);
        let Some((serial, entry)) = self.flows.entry_mut(fd) else { return };
        let polled = self.busy.is_some_and(|b| b.fd == fd && b.serial == serial);
        let step = entry.flow.on_readable(now);
        // A duplicate or stray packet (no progress) is not the answer polled for.
        if polled && step != Step::Unchanged {
            entry.busy.answered();
            self.busy = None;
        }
        // The only work of this worker, waiting for its peer: poll rather than sleep.
        let budget = entry.flow.busy_poll();
        if matches!(step, Step::Wait(_)) && !budget.is_zero() && alone && entry.busy.arm() {
            // The budget starts now: after this turn's earlier events and the send just made.
            let until = Instant::now() + budget;
            self.busy = Some(BusyWait { fd, serial, until });
        }
        self.apply(fd, step, now, env);
    }

    /// Runs the flow timers that are due.
    pub fn expire(&mut self, now: Instant, env: &mut Env<'_>) {
        while let Some(fd) = self.flows.pop_due(now) {
            let Some(entry) = self.flows.get_mut(fd) else { continue };
            match entry.deadline {
                Some(deadline) if deadline <= now => {}
                Some(later) => {
                    // Moved later since (activity): due again then.
                    self.flows.schedule(fd, later);
                    continue;
                }
                None => continue,
            }
            entry.deadline = None;
            let step = entry.flow.on_timer(now);
            self.apply(fd, step, now, env);
        }
    }

    /// Ends a flow: unwatches and closes its socket, releases its count, writes its line.
    fn finish_flow(&mut self, fd: usize, result: &'static str, now: Instant, env: &mut Env<'_>) {
        let serial = self.flows.serial(fd);
        let Some(entry) = self.flows.remove(fd) else { return };
        let _ = env.poller.set(fd as RawFd, Interest::NONE);
        if self.busy.is_some_and(|b| b.fd == fd && Some(b.serial) == serial) {
            self.busy = None;
        }
        env.release(entry.ticket, Peer::Ip(entry.peer));
        let totals = entry.flow.totals();
        env.books.counters.moved(totals.bytes_in, totals.bytes_out);
        let tally = &mut env.listeners[entry.listener].tally;
        tally.moved(totals);
        tally.finished();
        // A flow's result is a reason of the service's own, but for the worker's stop.
        let reason =
            if result == "shutdown" { CloseReason::Shutdown } else { CloseReason::Service(result) };
        tally.ended(reason);
        let duration = now.saturating_duration_since(entry.opened);
        flow_line(env, entry.listener, entry.peer, duration, &*entry.flow, result);
    }

    /// Ends every flow (fast stop), telling each client.
    pub fn end_all(&mut self, now: Instant, env: &mut Env<'_>) {
        for fd in self.flows.fds() {
            if let Some(entry) = self.flows.get_mut(fd) {
                entry.flow.refuse("shutdown");
                self.finish_flow(fd, "shutdown", now, env);
            }
        }
    }

    /// One summary line per UDP listener that saw datagrams, at most every
    /// [`SUMMARY_INTERVAL`] (or now, when `force`d at exit).
    pub fn summarize(&mut self, now: Instant, force: bool, env: &mut Env<'_>) {
        if !force && now.saturating_duration_since(self.last_summary) < SUMMARY_INTERVAL {
            return;
        }
        self.last_summary = now;
        let access_log = env.books.access_log;
        for entry in env.listeners.iter_mut() {
            let totals = std::mem::take(&mut entry.datagrams);
            if totals.received == 0 || !access_log {
                continue;
            }
            log::info!(
                target: ACCESS_TARGET,
                "datagrams listener={} received={} answered={} over_rate={} ignored={} unverified={} flows={} in={} out={}",
                entry.policy.name,
                totals.received,
                totals.answered,
                totals.over_rate,
                totals.ignored,
                totals.unverified,
                totals.flows,
                totals.bytes_in,
                totals.bytes_out,
            );
        }
    }
}

/// A flow's access line (or a refused one's).
fn flow_line(
    env: &Env<'_>,
    index: usize,
    peer: SocketAddr,
    duration: Duration,
    flow: &dyn Flow,
    result: &str,
) {
    if env.books.access_log {
        log::info!(
            target: ACCESS_TARGET,
            "access listener={} peer={peer} duration={:.3}s {} result={result}",
            env.listeners[index].policy.name,
            duration.as_secs_f64(),
            flow.describe(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::Progress;
    use std::os::fd::{AsFd, BorrowedFd};

    /// A flow that does nothing: only its busy-poll accounting is under test.
    struct Quiet(std::net::UdpSocket);

    impl Flow for Quiet {
        fn socket(&self) -> BorrowedFd<'_> {
            self.0.as_fd()
        }
        fn start(&mut self, now: Instant) -> Step {
            Step::Wait(now)
        }
        fn on_readable(&mut self, _now: Instant) -> Step {
            Step::Unchanged
        }
        fn on_timer(&mut self, _now: Instant) -> Step {
            Step::Done("timeout")
        }
        fn refuse(&mut self, _reason: &str) {}
        fn totals(&self) -> Progress {
            Progress::default()
        }
        fn describe(&self) -> String {
            String::new()
        }
    }

    fn entry() -> FlowEntry {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = socket.local_addr().unwrap();
        FlowEntry {
            flow: Box::new(Quiet(socket)),
            listener: 0,
            peer,
            opened: Instant::now(),
            ticket: None,
            deadline: None,
            busy: BusyPoll::default(),
        }
    }

    /// One flow on descriptor 5; its serial.
    fn one_flow() -> (Datagrams, u64) {
        let mut datagrams = Datagrams::default();
        let serial = datagrams.flows.insert(5, entry()).unwrap_or_else(|_| unreachable!());
        (datagrams, serial)
    }

    #[test]
    fn a_busy_poll_ends_at_its_budget_with_a_miss_or_at_other_work_without_one() {
        let now = Instant::now();
        let budget = Duration::from_micros(50);
        let (mut datagrams, serial) = one_flow();
        datagrams.busy = Some(BusyWait { fd: 5, serial, until: now + budget });
        assert!(datagrams.busy_polling(now, 0), "within the budget, alone: poll");
        assert!(!datagrams.busy_polling(now + budget, 0), "the budget passed");
        assert!(datagrams.busy.is_none());
        let missed = |d: &Datagrams| d.flows.get(5).unwrap().busy.misses;
        assert_eq!(missed(&datagrams), 1, "counted as a miss");

        datagrams.busy = Some(BusyWait { fd: 5, serial, until: now + budget });
        assert!(!datagrams.busy_polling(now, 1), "a connection arrived: stop polling");
        assert!(datagrams.busy.is_none());
        assert_eq!(missed(&datagrams), 1, "not the peer's fault: no miss");

        datagrams.busy = Some(BusyWait { fd: 5, serial, until: now + budget });
        let _ = datagrams.flows.insert(6, entry());
        assert!(!datagrams.busy_polling(now, 0), "another flow: stop polling");
        assert_eq!(missed(&datagrams), 1);

        // A flow gone (its serial differs) is not charged when the budget passes.
        datagrams.flows.remove(6);
        datagrams.busy = Some(BusyWait { fd: 5, serial: serial + 100, until: now });
        assert!(!datagrams.busy_polling(now, 0));
        assert_eq!(missed(&datagrams), 1);
    }

    #[test]
    fn busy_polling_backs_off_from_a_silent_peer_and_resumes_when_it_answers() {
        let mut busy = BusyPoll::default();
        assert!(busy.arm(), "polls from the start");
        busy.missed();
        assert!(!busy.arm(), "the wait after a miss sleeps");
        assert!(busy.arm(), "the next one polls again");
        busy.missed();
        for skipped in 0..3 {
            assert!(!busy.arm(), "wait {skipped} after two misses in a row polls");
        }
        assert!(busy.arm());
        for _ in 0..20 {
            busy.missed();
        }
        assert_eq!((busy.misses, busy.skip), (10, 1023), "up to 1023 waits");
        busy.answered();
        busy.skip = 0;
        assert!(busy.arm());
        busy.missed();
        assert_eq!(busy.skip, 1, "an answer forgets the misses");
    }
}
