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
//! - a flow's deadlines sit in their own heap, about one entry per flow: a deadline that
//!   moves later costs nothing until its entry comes due, then it is pushed again; entries
//!   of flows gone are skipped by serial;
//! - datagrams are not connections: they get a summary access line per listener at most
//!   every [`SUMMARY_INTERVAL`], flows get one access line each;
//! - a flow that waits for its peer is busy-polled ([`BusyPoll`]: the loop polls with a zero
//!   timeout) only while it is the worker's only work, and never past its budget.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, SockaddrStorage, recvfrom, sendto};

use super::{Intake, Worker};
use crate::limits::{Admission, Ticket};
use crate::limits::{DatagramRates, Verdict};
use crate::logging::ACCESS_TARGET;
use crate::poller::Interest;
use crate::services::{Answer, Flow, Step};

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

/// One running flow.
struct FlowEntry {
    flow: Box<dyn Flow>,
    listener: usize,
    peer: SocketAddr,
    opened: Instant,
    ticket: Option<Ticket>,
    serial: u64,
    /// The deadline in force.
    deadline: Option<Instant>,
    /// The earliest entry this flow has in the timer heap. A deadline that moves later
    /// (every block sent) costs no heap operation: the entry is checked when it comes due
    /// and pushed again at the deadline then in force, so the heap holds about one entry
    /// per flow instead of one per packet.
    scheduled: Option<Instant>,
    /// Busy polling for the peer's answers.
    busy: BusyPoll,
}

/// Counters of one UDP listener since its last summary line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    received: u64,
    answered: u64,
    over_rate: u64,
    ignored: u64,
    flows: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// The worker's UDP state.
pub(super) struct Datagrams {
    /// Flows by the descriptor of their socket.
    flows: Vec<Option<FlowEntry>>,
    count: usize,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    next_serial: u64,
    buffer: Vec<u8>,
    reply: Vec<u8>,
    totals: Vec<Totals>,
    last_summary: Instant,
    /// The flow polled for, if any (see [`BusyPoll`]).
    busy: Option<BusyWait>,
}

impl Datagrams {
    pub(super) fn new(listeners: usize) -> Self {
        Datagrams {
            flows: Vec::new(),
            count: 0,
            timers: BinaryHeap::new(),
            next_serial: 0,
            buffer: Vec::new(),
            reply: Vec::new(),
            totals: vec![Totals::default(); listeners],
            last_summary: Instant::now(),
            busy: None,
        }
    }

    /// Flows running: each holds a descriptor of the worker's budget.
    pub(super) fn flows(&self) -> usize {
        self.count
    }

    /// Whether `fd` is a flow's socket.
    pub(super) fn owns(&self, fd: RawFd) -> bool {
        usize::try_from(fd).ok().and_then(|i| self.flows.get(i)).is_some_and(Option::is_some)
    }

    /// Whether one flow is the worker's only work, with `connections` open besides (served
    /// connections and PROXY headers being read): the condition for busy polling.
    fn alone(&self, connections: usize) -> bool {
        self.count == 1 && connections == 0
    }

    /// Whether the loop should poll with a zero timeout now (see [`BusyPoll`]). A budget
    /// that has passed counts as a miss of its flow and ends the polling; so does other
    /// work arriving (another flow, or `connections` above 0), without counting a miss.
    pub(super) fn busy_polling(&mut self, now: Instant, connections: usize) -> bool {
        let Some(busy) = self.busy else { return false };
        if !self.alone(connections) {
            self.busy = None;
            return false;
        }
        if now < busy.until {
            return true;
        }
        self.busy = None;
        if let Some(entry) = self.flows.get_mut(busy.fd).and_then(Option::as_mut)
            && entry.serial == busy.serial
        {
            entry.busy.missed();
        }
        false
    }

    /// The earliest flow deadline (possibly stale: an early wake-up only).
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }
}

/// The peer address of a received datagram.
fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

impl Worker<'_> {
    /// Reads datagrams from UDP listening descriptor `fd` (listener `index`) until
    /// `WouldBlock` or a batch, and hands each within its client's rate to the service.
    pub(super) fn receive(&mut self, fd: RawFd, index: usize, now: Instant) {
        let service = self.context.config.listeners[index].service.service.clone();
        let Ok(datagram) = service.datagram() else { return };
        let rate = self.context.config.listeners[index].max_datagram_rate_per_client;
        let (_, local) = match self.context.listeners.get(index) {
            Some(listener) => (listener.id, listener.local_addr),
            None => return,
        };
        let rates: &DatagramRates = self.context.rates;
        if self.datagrams.buffer.len() < DATAGRAM_MAX {
            self.datagrams.buffer.resize(DATAGRAM_MAX, 0);
        }
        for _ in 0..DATAGRAM_BATCH {
            let (n, peer) = match recvfrom::<SockaddrStorage>(fd, &mut self.datagrams.buffer) {
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
                    if let Some(held_back) = self.accept_error_log.allow(now) {
                        log::error!(
                            "receive on {} failed: {error} ({held_back} similar errors not logged)",
                            self.context.config.listeners[index].name
                        );
                    }
                    return;
                }
            };
            let totals = &mut self.datagrams.totals[index];
            totals.received += 1;
            totals.bytes_in += n as u64;
            self.unpublished.bytes_in += n as u64;
            self.unpublished.dirty = true;
            if let Some(rate) = rate {
                let verdict = rates.take(self.client_key(index, peer), rate);
                if verdict.as_ref().is_ok_and(|v| *v != Verdict::Allowed) || verdict.is_err() {
                    self.datagrams.totals[index].over_rate += 1;
                    if let Some(held_back) = self.refusal_log.allow(now) {
                        let why = match verdict {
                            Ok(Verdict::TableFull) => "the rate table is full".to_owned(),
                            Ok(_) => "max_datagram_rate_per_client reached".to_owned(),
                            Err(error) => error.to_string(),
                        };
                        log::warn!(
                            "dropped datagrams from {} on {}: {why} ({held_back} refusals not logged)",
                            peer.ip(),
                            self.context.config.listeners[index].name
                        );
                    }
                    continue;
                }
            }
            self.datagrams.reply.clear();
            let request = &self.datagrams.buffer[..n];
            match datagram.on_datagram(request, peer, local, now, &mut self.datagrams.reply) {
                Answer::Reply => {
                    let reply = &self.datagrams.reply;
                    let sent = sendto(fd, reply, &SockaddrStorage::from(peer), MsgFlags::empty());
                    let totals = &mut self.datagrams.totals[index];
                    match sent {
                        Ok(sent) => {
                            totals.answered += 1;
                            totals.bytes_out += sent as u64;
                            self.unpublished.bytes_out += sent as u64;
                        }
                        // A full send buffer drops the reply as the network could.
                        Err(_) => totals.ignored += 1,
                    }
                }
                Answer::Ignore => self.datagrams.totals[index].ignored += 1,
                Answer::Flow(flow) => {
                    self.datagrams.totals[index].flows += 1;
                    self.start_flow(index, peer, flow, now);
                }
            }
        }
    }

    /// Admits and starts a flow, or refuses it (budget, per-client limit).
    fn start_flow(
        &mut self,
        index: usize,
        peer: SocketAddr,
        mut flow: Box<dyn Flow>,
        now: Instant,
    ) {
        let fd = flow.socket().as_raw_fd();
        let policy = &self.context.config.listeners[index];
        if self.room() == 0 || self.intake == Intake::Draining {
            let reason = if self.intake == Intake::Draining { "shutdown" } else { "budget" };
            flow.refuse(reason);
            return self.flow_line(index, peer, Duration::ZERO, &*flow, reason);
        }
        let mut ticket = None;
        if let Some(max) = policy.max_connections_per_client {
            let key = self.client_key(index, peer);
            match self.context.limits.admit(&mut self.ledger, key, Some(max)) {
                Ok(Admission::Admitted(t)) => ticket = Some(t),
                // Only the per-client rule is asked for here.
                Ok(Admission::Refused { open } | Admission::ListenerFull { open }) => {
                    if let Some(held_back) = self.refusal_log.allow(now) {
                        log::warn!(
                            "refused a transfer to {} on {}: {open} running, max_connections_per_client reached ({held_back} refusals not logged)",
                            peer.ip(),
                            policy.name
                        );
                    }
                    flow.refuse("limit");
                    return self.flow_line(index, peer, Duration::ZERO, &*flow, "limit");
                }
                Ok(Admission::RateLimited) => {
                    flow.refuse("rate");
                    return self.flow_line(index, peer, Duration::ZERO, &*flow, "rate");
                }
                Err(error) => {
                    log::error!("refused a transfer to {peer} on {}: {error}", policy.name);
                    flow.refuse("error");
                    return self.flow_line(index, peer, Duration::ZERO, &*flow, "error");
                }
            }
        }
        let slot = fd as usize;
        if self.poller.set(fd, Interest::READ).is_err() || self.datagrams.owns(fd) {
            // Over select()'s FD_SETSIZE: no room after all.
            flow.refuse("budget");
            self.release(ticket, peer);
            return self.flow_line(index, peer, Duration::ZERO, &*flow, "budget");
        }
        if self.datagrams.flows.len() <= slot {
            self.datagrams.flows.resize_with(slot + 1, || None);
        }
        let serial = self.datagrams.next_serial;
        self.datagrams.next_serial += 1;
        let step = flow.start(now);
        self.datagrams.flows[slot] = Some(FlowEntry {
            flow,
            listener: index,
            peer,
            opened: now,
            ticket,
            serial,
            deadline: None,
            scheduled: None,
            busy: BusyPoll::default(),
        });
        self.datagrams.count += 1;
        self.unpublished.accepted += 1;
        self.unpublished.dirty = true;
        self.apply(slot, step, now);
    }

    fn release(&mut self, ticket: Option<Ticket>, peer: SocketAddr) {
        if let Some(ticket) = ticket
            && let Err(error) = self.context.limits.release(&mut self.ledger, ticket)
        {
            log::error!("could not release the count of {peer}: {error}");
        }
    }

    /// Applies what a flow callback returned.
    fn apply(&mut self, fd: usize, step: Step, now: Instant) {
        let Some(entry) = self.datagrams.flows.get_mut(fd).and_then(Option::as_mut) else {
            return;
        };
        match step {
            Step::Wait(at) => {
                entry.deadline = Some(at);
                if entry.scheduled.is_none_or(|scheduled| at < scheduled) {
                    entry.scheduled = Some(at);
                    self.datagrams.timers.push(Reverse((at, fd, entry.serial)));
                }
            }
            Step::Unchanged => {}
            Step::Done(result) => self.finish_flow(fd, result, now),
        }
    }

    /// A flow's socket is readable.
    pub(super) fn on_flow_ready(&mut self, fd: RawFd, now: Instant) {
        let fd = fd as usize;
        let alone = self.datagrams.alone(self.open + self.pending_open);
        let Some(entry) = self.datagrams.flows.get_mut(fd).and_then(Option::as_mut) else {
            return;
        };
        let polled = self.datagrams.busy.is_some_and(|b| b.fd == fd && b.serial == entry.serial);
        let step = entry.flow.on_readable(now);
        // A duplicate or stray packet (no progress) is not the answer polled for.
        if polled && step != Step::Unchanged {
            entry.busy.answered();
            self.datagrams.busy = None;
        }
        // The only work of this worker, waiting for its peer: poll rather than sleep.
        let budget = entry.flow.busy_poll();
        if matches!(step, Step::Wait(_)) && !budget.is_zero() && alone && entry.busy.arm() {
            // The budget starts now: after this turn's earlier events and the send just made.
            let until = Instant::now() + budget;
            self.datagrams.busy = Some(BusyWait { fd, serial: entry.serial, until });
        }
        self.apply(fd, step, now);
    }

    /// Runs the flow timers that are due.
    pub(super) fn expire_flows(&mut self, now: Instant) {
        while let Some(Reverse((at, fd, serial))) = self.datagrams.timers.peek().copied() {
            if at > now {
                return;
            }
            self.datagrams.timers.pop();
            let Some(entry) = self.datagrams.flows.get_mut(fd).and_then(Option::as_mut) else {
                continue;
            };
            if entry.serial != serial || entry.scheduled != Some(at) {
                continue; // stale: the flow is gone, or an earlier entry replaced this one
            }
            entry.scheduled = None;
            match entry.deadline {
                Some(deadline) if deadline <= now => {}
                Some(later) => {
                    // Moved later since (activity): due again then.
                    entry.scheduled = Some(later);
                    self.datagrams.timers.push(Reverse((later, fd, serial)));
                    continue;
                }
                None => continue,
            }
            entry.deadline = None;
            let step = entry.flow.on_timer(now);
            self.apply(fd, step, now);
        }
    }

    /// Ends a flow: unwatches and closes its socket, releases its count, writes its line.
    fn finish_flow(&mut self, fd: usize, result: &'static str, now: Instant) {
        let Some(entry) = self.datagrams.flows.get_mut(fd).and_then(Option::take) else {
            return;
        };
        let _ = self.poller.set(fd as RawFd, Interest::NONE);
        self.datagrams.count -= 1;
        if self.datagrams.busy.is_some_and(|b| b.fd == fd && b.serial == entry.serial) {
            self.datagrams.busy = None;
        }
        self.release(entry.ticket, entry.peer);
        let totals = entry.flow.totals();
        self.unpublished.bytes_in += totals.bytes_in;
        self.unpublished.bytes_out += totals.bytes_out;
        self.unpublished.dirty = true;
        let duration = now.saturating_duration_since(entry.opened);
        self.flow_line(entry.listener, entry.peer, duration, &*entry.flow, result);
    }

    /// Ends every flow (fast stop), telling each client.
    pub(super) fn end_flows(&mut self, now: Instant) {
        for fd in 0..self.datagrams.flows.len() {
            if let Some(entry) = self.datagrams.flows[fd].as_mut() {
                entry.flow.refuse("shutdown");
                self.finish_flow(fd, "shutdown", now);
            }
        }
    }

    fn flow_line(
        &self,
        index: usize,
        peer: SocketAddr,
        duration: Duration,
        flow: &dyn Flow,
        result: &str,
    ) {
        if self.context.config.log.access_log {
            log::info!(
                target: ACCESS_TARGET,
                "access listener={} peer={peer} duration={:.3}s {} result={result}",
                self.context.config.listeners[index].name,
                duration.as_secs_f64(),
                flow.describe(),
            );
        }
    }

    /// One summary line per UDP listener that saw datagrams, at most every
    /// [`SUMMARY_INTERVAL`] (or now, when `force`d at exit).
    pub(super) fn summarize_datagrams(&mut self, now: Instant, force: bool) {
        if !force && now.saturating_duration_since(self.datagrams.last_summary) < SUMMARY_INTERVAL {
            return;
        }
        self.datagrams.last_summary = now;
        for index in 0..self.datagrams.totals.len() {
            let totals = std::mem::take(&mut self.datagrams.totals[index]);
            if totals.received == 0 || !self.context.config.log.access_log {
                continue;
            }
            log::info!(
                target: ACCESS_TARGET,
                "datagrams listener={} received={} answered={} over_rate={} ignored={} flows={} in={} out={}",
                self.context.config.listeners[index].name,
                totals.received,
                totals.answered,
                totals.over_rate,
                totals.ignored,
                totals.flows,
                totals.bytes_in,
                totals.bytes_out,
            );
        }
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

    fn one_flow() -> Datagrams {
        let mut datagrams = Datagrams::new(1);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = socket.local_addr().unwrap();
        datagrams.flows.resize_with(8, || None);
        datagrams.flows[5] = Some(FlowEntry {
            flow: Box::new(Quiet(socket)),
            listener: 0,
            peer,
            opened: Instant::now(),
            ticket: None,
            serial: 7,
            deadline: None,
            scheduled: None,
            busy: BusyPoll::default(),
        });
        datagrams.count = 1;
        datagrams
    }

    #[test]
    fn a_busy_poll_ends_at_its_budget_with_a_miss_or_at_other_work_without_one() {
        let now = Instant::now();
        let budget = Duration::from_micros(50);
        let mut datagrams = one_flow();
        datagrams.busy = Some(BusyWait { fd: 5, serial: 7, until: now + budget });
        assert!(datagrams.busy_polling(now, 0), "within the budget, alone: poll");
        assert!(!datagrams.busy_polling(now + budget, 0), "the budget passed");
        assert!(datagrams.busy.is_none());
        let missed = |d: &Datagrams| d.flows[5].as_ref().unwrap().busy.misses;
        assert_eq!(missed(&datagrams), 1, "counted as a miss");

        datagrams.busy = Some(BusyWait { fd: 5, serial: 7, until: now + budget });
        assert!(!datagrams.busy_polling(now, 1), "a connection arrived: stop polling");
        assert!(datagrams.busy.is_none());
        assert_eq!(missed(&datagrams), 1, "not the peer's fault: no miss");

        datagrams.busy = Some(BusyWait { fd: 5, serial: 7, until: now + budget });
        datagrams.count = 2;
        assert!(!datagrams.busy_polling(now, 0), "another flow: stop polling");
        assert_eq!(missed(&datagrams), 1);

        // A flow gone (its serial differs) is not charged when the budget passes.
        datagrams.count = 1;
        datagrams.busy = Some(BusyWait { fd: 5, serial: 6, until: now });
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
