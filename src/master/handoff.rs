//! The master's end of the workers' channels: each worker's `Ready`, and routing offers
//! from retiring workers to workers of the serving generation (see `crate::handoff` for the
//! protocol).
//!
//! Runs in the master. The master holds one channel per worker slot, created before the
//! fork; it reads them when its one poll(2) says they are readable. A worker's `Ready` goes
//! to the pool (`pool.rs`), which decides when a generation is ready. It never serves a
//! connection: it holds an offer's descriptors only between receiving it and forwarding it.
//! Invariants:
//! - every offer gets exactly one answer: the receiver's, passed on; `Busy`/`Refused` from
//!   the master itself; or `Lost` when the receiver dies first;
//! - a connection goes only to a ready worker of the newest serving generation that has
//!   its listener (by name): a listener removed by a reload is refused, so its connections
//!   finish in the old worker, as before hand-off existed;
//! - after a binary upgrade, a master that no longer keeps a pool (WINCH, QUIT) forwards its
//!   workers' offers to the new master over the upgrade channel (see `peer.rs`), which
//!   routes them as its own; the new master takes offers from the old one only if it shares
//!   its per-client table, since the offer names a record in it.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::unistd::Pid;

use super::Master;
use super::pool::Recycled;
use super::table::{Role, Running};
use crate::handoff::{Channel, Message, Offer, Outcome, Recycle};
use crate::scoreboard::SlotState;

/// Messages read from one worker's channel per turn of the master's loop at most, so that
/// a flood of offers cannot delay signals.
const BATCH: usize = 1024;

/// One end of a route: a worker of this master, or the other master of a binary upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// The worker in this slot.
    Worker(usize),
    /// The old master that executed this one (its draining workers offer).
    Predecessor,
    /// The new master this one executed (its ready workers adopt).
    Successor,
}

/// An offer the master forwarded and awaits the answer to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Route {
    /// The sender and its token for the offer.
    from: Endpoint,
    token: u64,
    /// The receiver.
    to: Endpoint,
}

/// The master's hand-off state: the channels by worker slot, the offers in flight.
#[derive(Debug, Default)]
pub(super) struct Routing {
    /// The master's end of each slot's channel, while its worker lives.
    pub channels: Vec<Option<Channel>>,
    routes: HashMap<u64, Route>,
    next_route: u64,
    /// Offers in flight to each slot, to spread them.
    in_flight: Vec<usize>,
    /// Connections handed over since start.
    pub adopted: u64,
    /// The channel to the old master of a binary upgrade, while it lives and shares the
    /// per-client table.
    pub predecessor: Option<Channel>,
    /// The channel to the new master of a binary upgrade, while it lives.
    pub successor: Option<Successor>,
}

/// The channel to the new master of a binary upgrade.
#[derive(Debug)]
pub(super) enum Successor {
    /// It has not said [`Message::Taking`] yet (it may be an older binary, or may not share
    /// the per-client table): offers are not forwarded.
    Waiting(Channel),
    /// It takes offers.
    Taking(Channel),
}

impl Successor {
    fn channel(&self) -> &Channel {
        match self {
            Successor::Waiting(channel) | Successor::Taking(channel) => channel,
        }
    }

    fn channel_mut(&mut self) -> &mut Channel {
        match self {
            Successor::Waiting(channel) | Successor::Taking(channel) => channel,
        }
    }
}

impl Routing {
    /// Room for `slots` worker slots.
    pub fn new(slots: usize) -> Self {
        Routing {
            channels: (0..slots).map(|_| None).collect(),
            in_flight: vec![0; slots],
            ..Routing::default()
        }
    }
}

impl Routing {
    fn channel(&mut self, end: Endpoint) -> Option<&mut Channel> {
        match end {
            Endpoint::Worker(slot) => self.channels[slot].as_mut(),
            Endpoint::Predecessor => self.predecessor.as_mut(),
            Endpoint::Successor => self.successor.as_mut().map(Successor::channel_mut),
        }
    }

    fn close(&mut self, end: Endpoint) {
        match end {
            Endpoint::Worker(slot) => self.channels[slot] = None,
            Endpoint::Predecessor => self.predecessor = None,
            Endpoint::Successor => self.successor = None,
        }
    }

    /// Every open channel, to poll.
    pub fn all(&self) -> impl Iterator<Item = &Channel> {
        let successor = self.successor.as_ref().map(Successor::channel);
        self.channels.iter().flatten().chain(&self.predecessor).chain(successor)
    }

    /// In a forked worker: every channel is the master's, none is the worker's.
    pub fn forget(&mut self) {
        self.channels.clear();
        self.predecessor = None;
        self.successor = None;
    }
}

impl Master {
    /// Reads every channel (the workers', and the other master's of an upgrade): routes
    /// offers, passes answers on, sends what waits.
    pub(super) fn pump_channels(&mut self) {
        for slot in 0..self.routing.channels.len() {
            self.pump(Endpoint::Worker(slot));
        }
        self.pump(Endpoint::Predecessor);
        self.pump(Endpoint::Successor);
    }

    fn pump(&mut self, end: Endpoint) {
        for _ in 0..BATCH {
            let Some(channel) = self.routing.channel(end) else { break };
            if channel.backlogged()
                && let Err(error) = channel.flush()
            {
                self.channel_failed(end, &error);
                break;
            }
            match channel.recv() {
                Ok(None) => break,
                Ok(Some((Message::Offer(offer), fds))) => self.route(end, offer, fds),
                Ok(Some((Message::Resolved { token, outcome }, _))) => {
                    self.pass_answer(end, token, outcome)
                }
                Ok(Some((Message::Taking, _))) => self.successor_takes(end),
                Ok(Some((Message::Ready, _))) => self.worker_ready(end),
                Ok(Some((Message::Recycle(why), _))) => self.worker_recycle(end, why),
                Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                    log::error!("hand-off channel of {}: {error}; dropped", name(end));
                }
                Err(error) => {
                    self.channel_failed(end, &error);
                    break;
                }
            }
        }
    }

    fn channel_failed(&mut self, end: Endpoint, error: &io::Error) {
        if error.kind() != io::ErrorKind::UnexpectedEof {
            log::warn!("hand-off channel of {}: {error}; closed", name(end));
        }
        self.routing.close(end);
        if end == Endpoint::Successor {
            // Offers forwarded to the new master get no answer now.
            self.routes_gone(end);
        }
    }

    fn send_to(&mut self, end: Endpoint, message: &Message, fds: Vec<OwnedFd>) -> bool {
        let Some(channel) = self.routing.channel(end) else { return false };
        match channel.send(message, fds) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => false,
            Err(error) => {
                self.channel_failed(end, &error);
                false
            }
        }
    }

    /// Forwards an offer from `from` (a worker, or the old master) to a serving worker (or
    /// the new master), or answers it.
    fn route(&mut self, from: Endpoint, mut offer: Offer, fds: Vec<OwnedFd>) {
        let token = offer.token;
        if !offer.complete(fds.len()) {
            // Out of descriptors here: the sender keeps the connection and offers it later.
            let busy = Message::Resolved { token, outcome: Outcome::Busy };
            self.send_to(from, &busy, Vec::new());
            return;
        }
        let to = match self.handoff_target(from, &offer.listener) {
            Ok(to) => to,
            Err(outcome) => {
                self.send_to(from, &Message::Resolved { token, outcome }, Vec::new());
                return;
            }
        };
        let route = self.routing.next_route;
        self.routing.next_route += 1;
        offer.token = route;
        if self.send_to(to, &Message::Offer(offer), fds) {
            self.routing.routes.insert(route, Route { from, token, to });
            if let Endpoint::Worker(to) = to {
                self.routing.in_flight[to] += 1;
            }
        } else {
            let busy = Message::Resolved { token, outcome: Outcome::Busy };
            self.send_to(from, &busy, Vec::new());
        }
    }

    /// Where a connection of `listener` offered by `from` goes: a ready worker of the
    /// newest serving generation, the least busy; the new master of an upgrade when this
    /// master keeps no pool; or why none.
    fn handoff_target(&self, from: Endpoint, listener: &str) -> Result<Endpoint, Outcome> {
        if from == Endpoint::Successor {
            return Err(Outcome::Refused); // the new master's workers never hand back
        }
        if !self.supervisor.keeps_pool() {
            // Stopping, or paused by WINCH: the new master of an upgrade serves on.
            return match (from, &self.routing.successor) {
                (Endpoint::Worker(_), Some(Successor::Taking(_))) => Ok(Endpoint::Successor),
                _ => Err(Outcome::Refused),
            };
        }
        if !self.config.listeners.iter().any(|l| l.name == listener) {
            return Err(Outcome::Refused); // removed by the reload: finishes where it is
        }
        let slots = self.pool.slots();
        let candidates = (0..slots.len()).filter(|&i| {
            let slot = &slots[i];
            from != Endpoint::Worker(i)
                && slot.role == Role::Serving
                && slot.worker.is_some_and(|worker| Running::is_ready(&worker))
                && self.routing.channels[i].is_some()
                && self.scoreboard.slot(i).state() == SlotState::Ready
        });
        let load = |i: usize| {
            self.scoreboard.slot(i).open.load(Ordering::Relaxed) as usize
                + self.routing.in_flight[i]
        };
        candidates
            .max_by_key(|&i| (slots[i].generation, std::cmp::Reverse(load(i))))
            .map(Endpoint::Worker)
            .ok_or(Outcome::Busy)
    }

    /// The receiver `end` answered the offer routed as `route`.
    fn pass_answer(&mut self, end: Endpoint, route: u64, outcome: Outcome) {
        let Some(entry) = self.routing.routes.get(&route).copied() else { return };
        if entry.to != end {
            return; // not this receiver's to answer
        }
        self.routing.routes.remove(&route);
        if let Endpoint::Worker(slot) = end {
            self.routing.in_flight[slot] -= 1;
        }
        if outcome == Outcome::Adopted {
            self.routing.adopted += 1;
        }
        let answer = Message::Resolved { token: entry.token, outcome };
        self.send_to(entry.from, &answer, Vec::new());
    }

    /// The worker of `slot` is gone (reaped): offers it was to answer are lost, answers to
    /// its own offers have nobody to go to.
    pub(super) fn handoff_slot_gone(&mut self, slot: usize) {
        self.routing.channels[slot] = None;
        self.routes_gone(Endpoint::Worker(slot));
    }

    /// The worker of `end` said it is booted and accepting; if it replaces one that asked to
    /// be, that one drains now.
    fn worker_ready(&mut self, end: Endpoint) {
        let Endpoint::Worker(slot) = end else { return };
        if !self.pool.worker_ready(slot) {
            return;
        }
        log::debug!("worker {slot} ready");
        let stop = self.retire();
        if let Some((old, action)) = self.pool.replacement_ready(slot, stop, Instant::now()) {
            log::debug!("worker {slot} replaces worker {old}, which now drains");
            self.perform_pool(vec![action]);
        }
    }

    /// The worker of `end` asks to be replaced (recycling): the pool starts its replacement
    /// (see `pool.rs`). Logged once, counted in the scoreboard.
    fn worker_recycle(&mut self, end: Endpoint, why: Recycle) {
        let Endpoint::Worker(slot) = end else { return };
        let pid = self.pool.slots()[slot].pid().map_or(0, Pid::as_raw);
        let (now, lifecycle) = (Instant::now(), self.supervisor.lifecycle());
        let then = match self.pool.recycle(slot, now, lifecycle) {
            Recycled::Replacing(by) => format!("starting worker {by} to replace it"),
            Recycled::Waiting => "its replacement waits for a free worker slot".to_owned(),
            Recycled::Deferred => {
                log::info!(
                    "worker {slot} (pid {pid}) asks to be replaced ({why}) while a reload starts: it retires with its generation, or is replaced if the reload is rolled back"
                );
                return;
            }
            Recycled::Ignored => {
                log::debug!("worker {slot} (pid {pid}) asks to be replaced ({why}): not now");
                return;
            }
        };
        self.scoreboard.header().worker_recycles.fetch_add(1, Ordering::Relaxed);
        log::info!("recycling worker {slot} (pid {pid}): {why}; {then}, then it drains");
    }

    /// The new master said it takes offers.
    fn successor_takes(&mut self, end: Endpoint) {
        if end != Endpoint::Successor {
            return;
        }
        if let Some(Successor::Waiting(channel)) = self.routing.successor.take() {
            log::info!(
                "binary upgrade: the new master shares the per-client table: connections go to it when this master stops"
            );
            self.routing.successor = Some(Successor::Taking(channel));
        }
    }

    /// The new master of an upgrade exited: offers forwarded to it are lost.
    pub(super) fn handoff_successor_gone(&mut self) {
        self.routing.successor = None;
        self.routes_gone(Endpoint::Successor);
    }

    /// `end` is gone: offers it was to answer are lost, answers to its own offers have
    /// nobody to go to.
    fn routes_gone(&mut self, end: Endpoint) {
        let gone: Vec<(u64, Route)> = self
            .routing
            .routes
            .iter()
            .filter(|(_, r)| r.to == end || r.from == end)
            .map(|(&id, &r)| (id, r))
            .collect();
        for (id, route) in gone {
            self.routing.routes.remove(&id);
            if let Endpoint::Worker(to) = route.to {
                self.routing.in_flight[to] -= 1;
            }
            if route.to == end {
                let lost = Message::Resolved { token: route.token, outcome: Outcome::Lost };
                self.send_to(route.from, &lost, Vec::new());
            }
        }
    }
}

fn name(end: Endpoint) -> String {
    match end {
        Endpoint::Worker(slot) => format!("worker {slot}"),
        Endpoint::Predecessor => "the old master".into(),
        Endpoint::Successor => "the new master".into(),
    }
}
