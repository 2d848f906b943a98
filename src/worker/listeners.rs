//! The worker's listeners table: one entry per configured listener, with its policy, its
//! sockets (the shared one inherited from the master and, with `reuseport`, the worker's
//! own), what is known of its address, and its counters.
//!
//! Runs in workers. Entry `i` is `[[listener]]` number `i` of the worker's generation; the
//! index is how connections, flows and counters name their listener. Invariants:
//! - the sockets are open until the graceful stop closes them ([`Listeners::close`]); every
//!   other fact of an entry outlives them, since connections (and PROXY headers completing
//!   late) still need their listener's policy, bound address and counters;
//! - a readiness event names a listener only through a socket still open
//!   ([`Listeners::find`]).

use std::io;
use std::net::SocketAddr;
use std::ops::{Index, IndexMut};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use crate::config::ListenerConfig;
use crate::limits::ClientKey;
use crate::listener::{ListenSocket, Listener};
use crate::net::{Address, Peer};
use crate::poller::{Interest, Poller};
use crate::scoreboard::ListenerScore;
use crate::tls::Acceptor;
use crate::tls::tickets::TicketKeys;

use super::counters::Tally;
use super::datagram::Totals;
use super::phase::Timeouts;

/// One listener, as the worker serves it.
#[derive(Debug)]
pub struct ListenerEntry {
    /// Its `[[listener]]` configuration.
    pub policy: ListenerConfig,
    /// Stable id across reloads: per-client counts and scoreboard rows are keyed by it.
    pub id: u16,
    /// The address bound (the kernel's port when the configuration says 0).
    pub local: Address,
    /// [`Listener::specific_addr`]: every accepted connection's local address, when known
    /// without asking the kernel ([`crate::services::ConnInfo::bound`]).
    pub bound: Option<SocketAddr>,
    /// Whether accepted sockets already have `TCP_NODELAY` as `tcp_nodelay` says (the master
    /// set it on the listening socket and accept copies it), so no setsockopt(2) per
    /// connection. Read once, at start.
    pub inherits_nodelay: bool,
    /// Served connections' counts not yet published.
    pub tally: Tally,
    /// A UDP listener's datagram counts since its last summary line.
    pub datagrams: Totals,
    /// A TLS listener's handshakes (its rustls configuration and counts); `None`: plain.
    pub tls: Option<Rc<Acceptor>>,
    /// The socket every worker shares; `None` once closed.
    shared: Option<Listener>,
    /// `reuseport`: this worker's own socket on the same address.
    own: Option<ListenSocket>,
}

impl ListenerEntry {
    /// Its idle timeouts.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts { short: self.policy.short_idle_timeout, long: self.policy.long_idle_timeout }
    }

    /// The key `peer` is counted and logged by on this listener: its IP address with the
    /// client prefix applied, or a Unix client's user id.
    pub fn client_key(&self, peer: &Peer) -> ClientKey {
        let admission = &self.policy.admission;
        let (v4, v6) = (admission.client_ipv4_prefix, admission.client_ipv6_prefix);
        match peer {
            Peer::Ip(address) => ClientKey::with_prefix(usize::from(self.id), address.ip(), v4, v6),
            Peer::Unix(credentials) => ClientKey::uid(usize::from(self.id), credentials.uid),
        }
    }
}

/// Every listener of the worker, by index.
#[derive(Debug, Default)]
pub struct Listeners {
    entries: Vec<ListenerEntry>,
}

impl Listeners {
    /// The table for the listening sockets `sockets` inherited from the master and their
    /// configurations `policies` (in the same order), binding the worker's own socket for each
    /// `reuseport` listener (before privileges are dropped: a port below 1024 needs them),
    /// and the TLS side of each TLS listener, whose tickets `tickets` seals.
    ///
    /// # Errors
    /// A worker's own socket could not be bound, or rustls refused a TLS configuration.
    pub fn open(
        sockets: Vec<Listener>,
        policies: Vec<ListenerConfig>,
        tickets: Option<TicketKeys>,
    ) -> io::Result<Self> {
        let mut entries = Vec::with_capacity(sockets.len());
        for (listener, policy) in sockets.into_iter().zip(policies) {
            let own = match policy.reuseport {
                true => Some(listener.bind_own().map_err(io::Error::other)?),
                false => None,
            };
            let tls = match &policy.tls {
                Some(tls) => {
                    let id = usize::from(listener.id);
                    let ticketer = tickets
                        .filter(|_| tls.spec.session_tickets)
                        .and_then(|keys| keys.ticketer(id, tls.spec.ticket_rotation))
                        .map(|t| Arc::new(t) as Arc<dyn rustls::server::ProducesTickets>);
                    let service = policy.service.service.clone();
                    let acceptor = Acceptor::new(&policy.name, service, tls, ticketer)
                        .map_err(|e| io::Error::other(format!("TLS on {}: {e}", policy.name)))?;
                    Some(acceptor)
                }
                None => None,
            };
            entries.push(ListenerEntry {
                id: listener.id,
                bound: listener.specific_addr(),
                local: listener.local_addr.clone(),
                inherits_nodelay: crate::listener::inherits_nodelay(
                    listener.socket(),
                    policy.tcp_nodelay,
                ),
                tally: Tally::default(),
                datagrams: Totals::default(),
                tls,
                policy,
                shared: Some(listener),
                own,
            });
        }
        Ok(Listeners { entries })
    }

    /// Listeners configured.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The index of the listener named `name`.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.entries.iter().position(|entry| entry.policy.name == name)
    }

    /// The listener whose open socket (shared or own) is `fd`.
    #[inline]
    pub fn find(&self, fd: RawFd) -> Option<usize> {
        self.entries.iter().position(|entry| {
            entry.shared.as_ref().is_some_and(|s| s.as_raw_fd() == fd)
                || entry.own.as_ref().is_some_and(|s| s.as_raw_fd() == fd)
        })
    }

    /// Every open listening socket, with its listener's index.
    pub fn sockets(&self) -> Vec<(RawFd, usize)> {
        let mut sockets = Vec::with_capacity(self.entries.len());
        for (index, entry) in self.entries.iter().enumerate() {
            sockets.extend(entry.shared.as_ref().map(|s| (s.as_raw_fd(), index)));
            sockets.extend(entry.own.as_ref().map(|s| (s.as_raw_fd(), index)));
        }
        sockets
    }

    /// This worker's own (`reuseport`) sockets, with their listener's index.
    pub fn own_sockets(&self) -> Vec<(RawFd, usize)> {
        let own = self.entries.iter().enumerate();
        own.filter_map(|(index, entry)| entry.own.as_ref().map(|s| (s.as_raw_fd(), index)))
            .collect()
    }

    /// Registers every open listening socket with `poller` for `interest`
    /// ([`Interest::NONE`]: unregisters).
    ///
    /// # Errors
    /// The poller refused one (the rest are not tried).
    pub fn watch(&self, poller: &mut dyn Poller, interest: Interest) -> io::Result<()> {
        for (fd, _) in self.sockets() {
            poller.set(fd, interest)?;
        }
        Ok(())
    }

    /// Unregisters every open listening socket from `poller` (errors ignored: a descriptor
    /// the poller does not watch needs nothing).
    pub fn unwatch(&self, poller: &mut dyn Poller) {
        for (fd, _) in self.sockets() {
            let _ = poller.set(fd, Interest::NONE);
        }
    }

    /// Closes this worker's copies of the sockets (graceful stop; unregister them first):
    /// once every process has, clients are refused at once instead of waiting in a backlog
    /// nobody accepts from. The entries stay.
    pub fn close(&mut self) {
        for entry in &mut self.entries {
            entry.shared = None;
            entry.own = None;
        }
    }

    /// Publishes every listener's tally on `rows` (this worker's rows, by listener id).
    pub fn publish(&mut self, rows: &[ListenerScore]) {
        for entry in &mut self.entries {
            let row = rows.get(usize::from(entry.id));
            entry.tally.publish(row);
            if let Some(tls) = &entry.tls {
                tls.publish(row);
            }
        }
    }

    /// The entries, by index.
    pub fn iter(&self) -> impl Iterator<Item = &ListenerEntry> {
        self.entries.iter()
    }

    /// The entries, by index.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut ListenerEntry> {
        self.entries.iter_mut()
    }
}

impl Index<usize> for Listeners {
    type Output = ListenerEntry;

    fn index(&self, index: usize) -> &ListenerEntry {
        &self.entries[index]
    }
}

impl IndexMut<usize> for Listeners {
    fn index_mut(&mut self, index: usize) -> &mut ListenerEntry {
        &mut self.entries[index]
    }
}
