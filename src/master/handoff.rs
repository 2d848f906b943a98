//! The master's part of connection hand-off: routing offers from retiring workers to
//! workers of the serving generation (see `crate::handoff` for the protocol).
//!
//! Runs in the master. The master holds one channel per worker slot, created before the
//! fork; it reads them when its one poll(2) says they are readable. It never serves a
//! connection: it holds a client socket only between receiving an offer and forwarding it.
//! Invariants:
//! - every offer gets exactly one answer: the receiver's, passed on; `Busy`/`Refused` from
//!   the master itself; or `Lost` when the receiver dies first;
//! - a connection goes only to a ready worker of the newest serving generation that has
//!   its listener (by name): a listener removed by a reload is refused, so its connections
//!   finish in the old worker, as before hand-off existed.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use super::Master;
use super::table::Role;
use crate::handoff::{Channel, Message, Offer, Outcome};
use crate::scoreboard::SlotState;

/// Messages read from one worker's channel per turn of the master's loop at most, so that
/// a flood of offers cannot delay signals.
const BATCH: usize = 1024;

/// An offer the master forwarded and awaits the answer to.
#[derive(Debug, Clone, Copy)]
pub(super) struct Route {
    /// The sender's slot and its token for the offer.
    from: usize,
    token: u64,
    /// The receiver's slot.
    to: usize,
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

impl Master {
    /// Reads every worker's channel: routes offers, passes answers on, sends what waits.
    pub(super) fn pump_channels(&mut self) {
        for slot in 0..self.routing.channels.len() {
            for _ in 0..BATCH {
                let Some(channel) = self.routing.channels[slot].as_mut() else { break };
                if channel.backlogged()
                    && let Err(error) = channel.flush()
                {
                    self.channel_failed(slot, &error);
                    break;
                }
                match channel.recv() {
                    Ok(None) => break,
                    Ok(Some((Message::Offer(offer), Some(fd)))) => self.route(slot, offer, fd),
                    Ok(Some((Message::Resolved { token, outcome }, _))) => {
                        self.pass_answer(slot, token, outcome)
                    }
                    Ok(Some((Message::Offer(_), None))) => {}
                    Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                        log::error!("hand-off channel of worker {slot}: {error}; dropped");
                    }
                    Err(error) => {
                        self.channel_failed(slot, &error);
                        break;
                    }
                }
            }
        }
    }

    fn channel_failed(&mut self, slot: usize, error: &io::Error) {
        if error.kind() != io::ErrorKind::UnexpectedEof {
            log::warn!("hand-off channel of worker {slot}: {error}; closed");
        }
        self.routing.channels[slot] = None;
    }

    fn send_to(&mut self, slot: usize, message: &Message, fd: Option<OwnedFd>) -> bool {
        let Some(channel) = self.routing.channels[slot].as_mut() else { return false };
        match channel.send(message, fd) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => false,
            Err(error) => {
                self.channel_failed(slot, &error);
                false
            }
        }
    }

    /// Forwards an offer from the worker of slot `from` to a serving worker, or answers it.
    fn route(&mut self, from: usize, mut offer: Offer, fd: OwnedFd) {
        let token = offer.token;
        let to = match self.handoff_target(from, &offer.listener) {
            Ok(to) => to,
            Err(outcome) => {
                self.send_to(from, &Message::Resolved { token, outcome }, None);
                return;
            }
        };
        let route = self.routing.next_route;
        self.routing.next_route += 1;
        offer.token = route;
        if self.send_to(to, &Message::Offer(offer), Some(fd)) {
            self.routing.routes.insert(route, Route { from, token, to });
            self.routing.in_flight[to] += 1;
        } else {
            self.send_to(from, &Message::Resolved { token, outcome: Outcome::Busy }, None);
        }
    }

    /// Where a connection of `listener` offered by slot `from` goes: a ready worker of the
    /// newest serving generation, the least busy; or why none.
    fn handoff_target(&self, from: usize, listener: &str) -> Result<usize, Outcome> {
        if !self.supervisor.keeps_pool() {
            return Err(Outcome::Refused); // stopping, or paused by WINCH
        }
        if !self.config.listeners.iter().any(|l| l.name == listener) {
            return Err(Outcome::Refused); // removed by the reload: finishes where it is
        }
        let candidates = (0..self.slots.len()).filter(|&i| {
            let slot = &self.slots[i];
            i != from
                && slot.role == Role::Serving
                && slot.pid.is_some()
                && self.routing.channels[i].is_some()
                && self.scoreboard.slot(i).state() == SlotState::Ready
        });
        let load = |i: usize| {
            self.scoreboard.slot(i).open.load(Ordering::Relaxed) as usize
                + self.routing.in_flight[i]
        };
        candidates
            .max_by_key(|&i| (self.slots[i].generation, std::cmp::Reverse(load(i))))
            .ok_or(Outcome::Busy)
    }

    /// The receiver in slot `slot` answered the offer routed as `route`.
    fn pass_answer(&mut self, slot: usize, route: u64, outcome: Outcome) {
        let Some(entry) = self.routing.routes.get(&route).copied() else { return };
        if entry.to != slot {
            return; // not this worker's to answer
        }
        self.routing.routes.remove(&route);
        self.routing.in_flight[slot] -= 1;
        if outcome == Outcome::Adopted {
            self.routing.adopted += 1;
        }
        let answer = Message::Resolved { token: entry.token, outcome };
        self.send_to(entry.from, &answer, None);
    }

    /// The worker of `slot` is gone (reaped): offers it was to answer are lost, answers to
    /// its own offers have nobody to go to.
    pub(super) fn handoff_slot_gone(&mut self, slot: usize) {
        self.routing.channels[slot] = None;
        let gone: Vec<(u64, Route)> = self
            .routing
            .routes
            .iter()
            .filter(|(_, r)| r.to == slot || r.from == slot)
            .map(|(&id, &r)| (id, r))
            .collect();
        for (id, route) in gone {
            self.routing.routes.remove(&id);
            self.routing.in_flight[route.to] -= 1;
            if route.to == slot {
                let lost = Message::Resolved { token: route.token, outcome: Outcome::Lost };
                self.send_to(route.from, &lost, None);
            }
        }
    }
}
