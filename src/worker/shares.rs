//! Each client's share of a worker: how many of its connections it holds, who holds the most,
//! and the fair-share rule by which a full worker takes a place from that client for a new
//! one.
//!
//! Runs in workers. Pure bookkeeping, kept up to date one connection at a time: joining and
//! leaving cost a few hash lookups, and finding the client that holds the most costs one
//! look at the top level, so nothing ever goes through all the connections. Invariants:
//! - a client has a [`Holder`] exactly while it holds at least one counted connection, and
//!   `members` lists them, each as `(descriptor, serial)` of the connection table;
//! - `levels[c]` lists exactly the clients holding `c` counted connections, and a holder's
//!   `at` is its index there; `top` is the highest `c` whose level is not empty (0: none);
//! - a counted connection's [`Seat`] names its client and its index in `members`.
//!
//! The rule ([`Shares::over_share`]): a new client that holds `n` connections here may take
//! a place from the client that holds the most, if that client holds at least `n + 2`, so
//! that it still holds more than the new client afterwards. Such a client always holds more
//! than its *fair share*: the connections counted here (the new one included) divided by the
//! clients holding them (the new one included), rounded down; a client holding no more than
//! that never loses a connection by this rule. A client is as the listener counts it for
//! `max_connections_per_client` (its address reduced to the listener's client prefix).

use std::collections::HashMap;

use crate::limits::ClientKey;

/// A counted connection's place: its client, and its index in the client's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    key: ClientKey,
    index: u32,
}

/// Whether and where a connection counts in its client's share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Not counted: its listener does not shed (`shed_when_full = false`), or it is being
    /// closed.
    Uncounted,
    /// To be counted at its next event (one adopted from a retiring worker).
    Unseated,
    /// Counted, at this seat.
    Seated(Seat),
}

/// A client's counted connections.
#[derive(Debug)]
struct Holder {
    /// `(descriptor, serial)` of each.
    members: Vec<(usize, u64)>,
    /// Index in `levels[members.len()]`.
    at: usize,
}

/// The clients of a worker, by the number of connections each holds.
#[derive(Debug, Default)]
pub struct Shares {
    holders: HashMap<ClientKey, Holder>,
    /// `levels[c]`: the clients holding `c` counted connections (`levels[0]` stays empty).
    levels: Vec<Vec<ClientKey>>,
    top: usize,
    /// Counted connections, all clients together.
    connections: usize,
}

impl Shares {
    /// Counts connection `(fd, serial)` of client `key`; its seat, to give back with
    /// [`Shares::leave`].
    pub fn join(&mut self, key: ClientKey, fd: usize, serial: u64) -> Seat {
        let holder = self.holders.entry(key).or_insert(Holder { members: Vec::new(), at: 0 });
        let before = holder.members.len();
        holder.members.push((fd, serial));
        let index = before as u32;
        self.connections += 1;
        self.relevel(key, before, before + 1);
        Seat { key, index }
    }

    /// Stops counting the connection of `seat`. The client's last member moves into its
    /// place: returned with its new seat, for the caller to record in that connection.
    pub fn leave(&mut self, seat: Seat) -> Option<((usize, u64), Seat)> {
        let holder = self.holders.get_mut(&seat.key)?;
        let index = seat.index as usize;
        if index >= holder.members.len() {
            return None; // not a seat of this table (cannot happen)
        }
        let before = holder.members.len();
        holder.members.swap_remove(index);
        let moved = holder.members.get(index).map(|&member| (member, seat));
        self.connections -= 1;
        self.relevel(seat.key, before, before - 1);
        moved
    }

    /// Moves `key` from level `from` to level `to` (0: forgotten).
    fn relevel(&mut self, key: ClientKey, from: usize, to: usize) {
        if from > 0 {
            let level = &mut self.levels[from];
            let at = self.holders[&key].at;
            level.swap_remove(at);
            if let Some(&other) = level.get(at) {
                self.holders.get_mut(&other).expect("a levelled client has a holder").at = at;
            }
        }
        if to == 0 {
            self.holders.remove(&key);
        } else {
            if self.levels.len() <= to {
                self.levels.resize_with(to + 1, Vec::new);
            }
            let level = &mut self.levels[to];
            self.holders.get_mut(&key).expect("joined").at = level.len();
            level.push(key);
        }
        if to > self.top {
            self.top = to;
        }
        while self.top > 0 && self.levels[self.top].is_empty() {
            self.top -= 1;
        }
    }

    /// Connections `key` holds here.
    pub fn held_by(&self, key: &ClientKey) -> usize {
        self.holders.get(key).map_or(0, |holder| holder.members.len())
    }

    /// The fair share of a new connection's client `newcomer` (`None`: not known yet, taken
    /// as a client without connections here): the connections counted here and the new one,
    /// divided by the clients holding them and the new client, rounded down.
    pub fn fair_share(&self, newcomer: Option<&ClientKey>) -> usize {
        let known = newcomer.is_some_and(|key| self.holders.contains_key(key));
        let clients = self.holders.len() + usize::from(!known);
        (self.connections + 1) / clients
    }

    /// The clients a full worker may take a place from for a new connection of `newcomer`
    /// (`None`: not known yet, taken as a client without connections here): those holding
    /// the most connections, when that is at least two more than `newcomer` holds; at most
    /// `limit` of them, each with its connections, from the `turn`th on (so that successive
    /// asks look at different ones).
    pub fn over_share<'a>(
        &'a self,
        newcomer: Option<&ClientKey>,
        limit: usize,
        turn: usize,
    ) -> impl Iterator<Item = &'a [(usize, u64)]> + use<'a> {
        let held = newcomer.map_or(0, |key| self.held_by(key));
        let level: &[ClientKey] = match self.levels.get(self.top) {
            Some(level) if self.top >= held + 2 => level,
            _ => &[],
        };
        let start = if level.is_empty() { 0 } else { turn % level.len() };
        let (after, before) = level.split_at(start);
        before.iter().chain(after).take(limit).map(|key| self.holders[key].members.as_slice())
    }

    /// Clients holding counted connections.
    #[cfg(test)]
    pub fn clients(&self) -> usize {
        self.holders.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn client(n: u8) -> ClientKey {
        ClientKey::new(0, IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
    }

    /// Checks the invariants against the members.
    fn check(shares: &Shares) {
        let mut top = 0;
        for (count, level) in shares.levels.iter().enumerate() {
            for (at, key) in level.iter().enumerate() {
                let holder = &shares.holders[key];
                assert_eq!((holder.members.len(), holder.at), (count, at), "{key}");
            }
            if !level.is_empty() {
                top = count;
            }
        }
        assert_eq!(shares.top, top);
        let connections: usize = shares.holders.values().map(|h| h.members.len()).sum();
        assert_eq!(shares.connections, connections);
        assert!(shares.holders.values().all(|h| !h.members.is_empty()));
    }

    #[test]
    fn counts_and_the_top_follow_every_join_and_leave() {
        let mut shares = Shares::default();
        let mut seats = Vec::new();
        // Client 1 holds 3, client 2 holds 2, client 3 holds 1.
        for (fd, n) in [(10, 1), (11, 1), (12, 2), (13, 1), (14, 2), (15, 3)] {
            seats.push((fd, shares.join(client(n), fd, fd as u64 + 100)));
            check(&shares);
        }
        assert_eq!((shares.top, shares.clients()), (3, 3));
        assert_eq!(shares.held_by(&client(1)), 3);
        // Client 1's first connection leaves: its last member (fd 13) takes its seat.
        let moved = shares.leave(seats[0].1);
        assert_eq!(moved, Some(((13, 113), Seat { key: client(1), index: 0 })));
        check(&shares);
        assert_eq!(shares.top, 2, "clients 1 and 2 hold two each");
        // Client 3's only one leaves: forgotten.
        assert_eq!(shares.leave(seats[5].1), None);
        check(&shares);
        assert_eq!(shares.clients(), 2);
        assert_eq!(shares.held_by(&client(3)), 0);
        // Client 2's: the second one takes the first one's seat, and leaves from there.
        let (member, seat) = shares.leave(seats[2].1).expect("fd 14 moves");
        assert_eq!(member, (14, 114));
        check(&shares);
        assert_eq!(shares.leave(seat), None);
        check(&shares);
        assert_eq!((shares.top, shares.clients()), (2, 1));
    }

    #[test]
    fn a_place_is_taken_only_from_a_client_holding_two_more_than_the_newcomer() {
        let mut shares = Shares::default();
        for fd in 0..4 {
            shares.join(client(1), fd, 0);
        }
        for fd in 4..6 {
            shares.join(client(2), fd, 0);
        }
        shares.join(client(3), 6, 0);
        let victims = |shares: &Shares, newcomer: Option<ClientKey>| {
            let found: Vec<usize> =
                shares.over_share(newcomer.as_ref(), 4, 0).map(<[_]>::len).collect();
            found
        };
        assert_eq!(victims(&shares, None), [4], "a new client: from the one holding the most");
        assert_eq!(victims(&shares, Some(client(9))), [4]);
        assert_eq!(victims(&shares, Some(client(2))), [4], "4 >= 2 + 2");
        assert_eq!(victims(&shares, Some(client(3))), [4]);
        // Client 1 holding 4 and client 2 holding 3: neither takes from the other.
        shares.join(client(2), 7, 0);
        assert!(victims(&shares, Some(client(2))).is_empty(), "4 < 3 + 2: it would hold the most");
        assert!(victims(&shares, Some(client(1))).is_empty());
        // Fair shares: 8 connections and the new one over 3 clients, or 4 with a new client.
        assert_eq!(shares.fair_share(Some(&client(2))), 3);
        assert_eq!(shares.fair_share(None), 2);
        // A client shed from holds more than the newcomer's fair share view of it.
        assert!(shares.held_by(&client(1)) > shares.fair_share(None));
    }

    #[test]
    fn ties_at_the_top_are_taken_in_turn() {
        let mut shares = Shares::default();
        for (fd, n) in [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3)] {
            shares.join(client(n), fd, 0);
        }
        let first: Vec<usize> =
            (0..3).map(|turn| shares.over_share(None, 1, turn).next().unwrap()[0].0).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 2, 4], "each of the three in turn: {first:?}");
        assert_eq!(shares.over_share(None, 8, 0).count(), 3);
    }
}
