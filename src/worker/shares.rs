//! Each client's share of a worker: how many of its connections it holds, who holds the most,
//! and the fair-share rule by which a full worker takes a place from that client for a new
//! one.
//!
//! Runs in workers. Pure bookkeeping, kept up to date one connection at a time: joining
//! costs one hash lookup, leaving none, and finding the client that holds the most is one
//! look at the top level, so nothing ever goes through all the connections. Invariants:
//! - a client has a [`Holder`] (in `ids`) while it holds at least one counted connection,
//!   and `members` lists them, each as `(descriptor, serial)` of the connection table; a
//!   client whose last connection left keeps its (empty) holder until a purge, which comes
//!   once more than `idle` of them pile up (so a client that comes back costs no insertion,
//!   and memory stays bounded); a holder without a client is in `free`;
//! - `levels[c]` lists exactly the holders of clients holding `c` counted connections, and a
//!   holder's `at` is its index there; `top` is the highest `c` whose level is not empty
//!   (0: none);
//! - a counted connection's [`Seat`] names its holder and its index in `members`.
//!
//! The rule ([`Shares::over_share`]): a new client that holds `n` connections here may take
//! a place from the client that holds the most, if that client holds at least `n + 2`, so
//! that it still holds more than the new client afterwards. Such a client always holds more
//! than its *fair share*: the connections counted here (the new one included) divided by the
//! clients holding them (the new one included), rounded down; a client holding no more than
//! that never loses a connection by this rule. A client is as the listener counts it for
//! `max_connections_per_client` (its address reduced to the listener's client prefix).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::limits::ClientKey;

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

/// Holders of clients without connections kept at least, before a purge (see the module
/// documentation).
const IDLE_HOLDERS: usize = 1024;

/// A counted connection's place: its client's holder, and its index in the holder's
/// members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    holder: u32,
    index: u32,
}

/// A client's counted connections (a free holder has none, and keeps its allocation for the
/// next client).
#[derive(Debug)]
struct Holder {
    key: ClientKey,
    /// `(descriptor, serial)` of each.
    members: Vec<(usize, u64)>,
    /// Index in `levels[members.len()]`.
    at: usize,
}

/// A client key hashed as its 20 bytes in one write: the map is asked once per connection
/// opened, and a field-by-field hash costs several times as much. Keyed (SipHash-1-3 under
/// the process's random keys), since clients choose their addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Client(ClientKey);

impl Hash for Client {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0.to_bytes());
    }
}

/// The clients of a worker, by the number of connections each holds.
#[derive(Debug, Default)]
pub struct Shares {
    /// Each client's holder.
    ids: HashMap<Client, u32>,
    holders: Vec<Holder>,
    /// Holders without a client.
    free: Vec<u32>,
    /// Clients holding at least one counted connection.
    clients: usize,
    /// Clients in `ids` holding none (purged when they outnumber [`IDLE_HOLDERS`] and the
    /// clients holding some).
    idle: usize,
    /// `levels[c]`: the holders of clients holding `c` counted connections (`levels[0]`
    /// stays empty).
    levels: Vec<Vec<u32>>,
    top: usize,
    /// Counted connections, all clients together.
    connections: usize,
}

impl Shares {
    /// Counts connection `(fd, serial)` of client `key`; its seat, to give back with
    /// [`Shares::leave`]. One hash lookup.
    pub fn join(&mut self, key: ClientKey, fd: usize, serial: u64) -> Seat {
        let Shares { ids, holders, free, .. } = self;
        let mut known = true;
        let id = *ids.entry(Client(key)).or_insert_with(|| {
            known = false;
            match free.pop() {
                Some(id) => {
                    holders[id as usize].key = key;
                    id
                }
                None => {
                    holders.push(Holder { key, members: Vec::new(), at: 0 });
                    (holders.len() - 1) as u32
                }
            }
        });
        let holder = &mut self.holders[id as usize];
        let before = holder.members.len();
        holder.members.push((fd, serial));
        if before == 0 {
            self.clients += 1;
            if known {
                self.idle -= 1; // back while its holder was kept
            }
        }
        self.connections += 1;
        self.relevel(id, before, before + 1);
        Seat { holder: id, index: before as u32 }
    }

    /// Stops counting the connection of `seat`. The client's last member moves into its
    /// place: returned with its new seat, for the caller to record in that connection. No
    /// hash lookup, but to forget a client whose last connection this was.
    pub fn leave(&mut self, seat: Seat) -> Option<((usize, u64), Seat)> {
        let id = seat.holder;
        let holder = self.holders.get_mut(id as usize)?;
        let index = seat.index as usize;
        if index >= holder.members.len() {
            return None; // not a seat of this table (cannot happen)
        }
        let before = holder.members.len();
        holder.members.swap_remove(index);
        let moved = holder.members.get(index).map(|&member| (member, seat));
        self.connections -= 1;
        self.relevel(id, before, before - 1);
        if before == 1 {
            self.clients -= 1;
            self.idle += 1;
            if self.idle > IDLE_HOLDERS.max(self.clients) {
                self.purge();
            }
        }
        moved
    }

    /// Forgets the clients that hold no connection, keeping their holders for others.
    fn purge(&mut self) {
        let Shares { ids, holders, free, .. } = self;
        ids.retain(|_, &mut id| {
            let idle = holders[id as usize].members.is_empty();
            if idle {
                free.push(id);
            }
            !idle
        });
        self.idle = 0;
    }

    /// Moves holder `id` from level `from` to level `to` (0: none).
    fn relevel(&mut self, id: u32, from: usize, to: usize) {
        if from > 0 {
            let level = &mut self.levels[from];
            let at = self.holders[id as usize].at;
            level.swap_remove(at);
            if let Some(&other) = level.get(at) {
                self.holders[other as usize].at = at;
            }
        }
        if to > 0 {
            if self.levels.len() <= to {
                self.levels.resize_with(to + 1, Vec::new);
            }
            let level = &mut self.levels[to];
            self.holders[id as usize].at = level.len();
            level.push(id);
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
        self.ids.get(&Client(*key)).map_or(0, |&id| self.holders[id as usize].members.len())
    }

    /// The fair share of a new connection's client `newcomer` (`None`: not known yet, taken
    /// as a client without connections here): the connections counted here and the new one,
    /// divided by the clients holding them and the new client, rounded down.
    pub fn fair_share(&self, newcomer: Option<&ClientKey>) -> usize {
        let holds = newcomer.is_some_and(|key| self.held_by(key) > 0);
        let clients = self.clients + usize::from(!holds);
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
        let level: &[u32] = match self.levels.get(self.top) {
            Some(level) if self.top >= held + 2 => level,
            _ => &[],
        };
        let start = if level.is_empty() { 0 } else { turn % level.len() };
        let (after, before) = level.split_at(start);
        before
            .iter()
            .chain(after)
            .take(limit)
            .map(|&id| self.holders[id as usize].members.as_slice())
    }

    /// Clients holding counted connections.
    #[cfg(test)]
    pub fn clients(&self) -> usize {
        self.clients
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
            for (at, &id) in level.iter().enumerate() {
                let holder = &shares.holders[id as usize];
                assert_eq!((holder.members.len(), holder.at), (count, at), "{}", holder.key);
                assert_eq!(shares.ids.get(&Client(holder.key)), Some(&id));
            }
            if !level.is_empty() {
                top = count;
            }
        }
        assert_eq!(shares.top, top);
        let live = shares.holders.iter().filter(|h| !h.members.is_empty());
        assert_eq!(live.clone().count(), shares.clients);
        assert_eq!(shares.ids.len(), shares.clients + shares.idle);
        assert_eq!(shares.holders.len(), shares.ids.len() + shares.free.len());
        assert_eq!(shares.connections, live.map(|h| h.members.len()).sum::<usize>());
        for &id in &shares.free {
            assert!(shares.holders[id as usize].members.is_empty());
        }
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
        assert_eq!(moved, Some(((13, 113), Seat { holder: 0, index: 0 })));
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
    fn clients_gone_are_forgotten_in_bounded_memory() {
        let mut shares = Shares::default();
        let key = |n: u32| ClientKey::new(0, IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
        let kept = shares.join(client(1), 1, 1);
        for n in 0..3 * IDLE_HOLDERS as u32 {
            let seat = shares.join(key(n), 2, u64::from(n));
            assert_eq!(shares.leave(seat), None);
            assert!(shares.ids.len() <= IDLE_HOLDERS + 2, "{}", shares.ids.len());
            assert!(shares.holders.len() <= IDLE_HOLDERS + 2);
        }
        check(&shares);
        // A client that comes back while its holder is kept reuses it.
        let again = shares.join(key(3 * IDLE_HOLDERS as u32 - 1), 3, 0);
        check(&shares);
        assert_eq!((shares.clients(), shares.connections), (2, 2));
        shares.leave(again);
        shares.leave(kept);
        check(&shares);
        assert_eq!((shares.clients(), shares.top), (0, 0));
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
