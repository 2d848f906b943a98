//! Connections from trusted proxies whose PROXY protocol header is being read: their table,
//! reading the header, and its deadline.
//!
//! Runs in workers. Invariants:
//! - such a connection counts against the worker's budget like a served one, and is admitted
//!   (as the client the header names) only once the header is complete;
//! - exactly the header's bytes are consumed (peeked, parsed, then read): the client's own
//!   data stays in the socket for its session;
//! - a malformed header, an end of file, or a header not complete within
//!   [`PROXY_HEADER_TIMEOUT`] closes the connection, counted as a `proxy-header` refusal;
//! - a full worker may shed them, oldest first, before any other connection (see
//!   `admission.rs`): closed and counted as a `shed` refusal of the proxy.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use crate::net::{Peer, Stream};
use crate::poller::Interest;
use crate::proxy_protocol::{self, Parsed};
use crate::services::CloseReason;

use super::admission::ShedQueue;
use super::books::Closed;
use super::connections::Client;
use super::env::Env;
use super::table::Table;

/// How long a trusted proxy has to send the whole PROXY protocol header after accept; the
/// connection is closed with reason `proxy-header` then. Proxies send it with the connection,
/// so this is short.
pub const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection from a trusted proxy, before its PROXY protocol header is complete.
struct Pending {
    stream: Stream,
    listener: usize,
    /// The proxy's address.
    proxy: SocketAddr,
    /// Header bytes consumed so far (at most [`proxy_protocol::MAX_HEADER`]).
    header: Vec<u8>,
    /// Accept time.
    accepted: Instant,
}

/// The connections reading their PROXY header.
#[derive(Default)]
pub struct Headers {
    table: Table<Pending>,
    /// Every one of them, oldest first, for shedding (entries of those gone are stale).
    queue: ShedQueue,
}

impl Headers {
    /// Connections held.
    #[inline]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether `fd` is a connection reading its header.
    #[inline]
    pub fn contains(&self, fd: RawFd) -> bool {
        usize::try_from(fd).is_ok_and(|fd| self.table.contains(fd))
    }

    /// When the next header is late (possibly a stale entry: an early wake-up only).
    #[inline]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    /// Starts reading the header of `stream`, accepted from `proxy` on listener `index`;
    /// the client to admit if the header is complete already.
    pub fn start(
        &mut self,
        stream: Stream,
        index: usize,
        proxy: SocketAddr,
        now: Instant,
        env: &mut Env<'_>,
    ) -> Option<Client> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let pending = Pending { stream, listener: index, proxy, header: Vec::new(), accepted: now };
        let Ok(serial) = self.table.insert(fd as usize, pending) else {
            // Cannot happen: a descriptor just accepted is in no entry.
            log::error!("connection from proxy {proxy}: descriptor {fd} is in use already");
            return None;
        };
        let table = &self.table;
        let live = |fd: usize, serial: u64| table.live(fd, serial).is_some();
        self.queue.push(fd as usize, serial, self.table.len(), live);
        // Cannot fail: the caller checked `can_watch`.
        let _ = env.poller.set(fd, Interest::READ);
        self.table.schedule(fd as usize, now + PROXY_HEADER_TIMEOUT);
        env.books.counters.touch();
        self.read(fd, env)
    }

    /// Reads what has come of the header of connection `fd`; the client it names once
    /// complete. Closes the connection on a malformed header or end of file.
    pub fn read(&mut self, fd: RawFd, env: &mut Env<'_>) -> Option<Client> {
        let slot = usize::try_from(fd).ok()?;
        let pending = self.table.get_mut(slot)?;
        let mut peeked = [0u8; proxy_protocol::MAX_HEADER];
        let room = proxy_protocol::MAX_HEADER - pending.header.len();
        let n = match nix::sys::socket::recv(fd, &mut peeked[..room], MsgFlags::MSG_PEEK) {
            Ok(0) => return self.drop(slot, Some(CloseReason::ProxyHeader), env),
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return None,
            Err(_) => return self.drop(slot, Some(CloseReason::Error), env),
        };
        let mut candidate = std::mem::take(&mut pending.header);
        let before = candidate.len();
        candidate.extend_from_slice(&peeked[..n]);
        let parsed = match proxy_protocol::parse(&candidate) {
            Ok(parsed) => parsed,
            Err(error) => {
                log::debug!("connection from proxy {}: {error}", pending.proxy);
                return self.drop(slot, Some(CloseReason::ProxyHeader), env);
            }
        };
        // Consume exactly the header's bytes: the client's data stays for the session.
        let take = proxy_protocol::consumable(&candidate, &parsed) - before;
        let mut sink = vec![0u8; take];
        if std::io::Read::read_exact(&mut pending.stream, &mut sink).is_err() {
            return self.drop(slot, Some(CloseReason::Error), env);
        }
        candidate.truncate(before + take);
        pending.header = candidate;
        let Parsed::Complete { source, .. } = parsed else { return None };
        let Pending { stream, listener, proxy, .. } = self.table.remove(slot)?;
        env.books.counters.touch();
        // The proxy itself is the client of a `LOCAL` or `UNKNOWN` header.
        let peer = Peer::Ip(source.unwrap_or(proxy));
        Some(Client { stream, listener, peer, proxy: Some(proxy) })
    }

    /// Closes connection `fd`, counting it as `reason` (`None`: a shutdown, not counted).
    fn drop(
        &mut self,
        fd: usize,
        reason: Option<CloseReason>,
        env: &mut Env<'_>,
    ) -> Option<Client> {
        let pending = self.table.remove(fd)?;
        let _ = env.poller.set(fd as RawFd, Interest::NONE);
        env.books.counters.touch();
        if let Some(reason) = reason {
            env.refusal_banner(fd as RawFd, pending.listener);
            env.closed(Closed::refused(pending.listener, Peer::Ip(pending.proxy), None, reason));
        }
        None
    }

    /// Whether a connection still reads its header (dropping stale queue entries).
    pub fn can_shed(&mut self) -> bool {
        let table = &self.table;
        self.queue.front(|fd, serial| table.live(fd, serial).is_some()).is_some()
    }

    /// Closes the oldest connection still reading its header, to make room for a new
    /// client (a `shed` refusal of the proxy); false if there is none.
    pub fn shed_oldest(&mut self, now: Instant, env: &mut Env<'_>) -> bool {
        let table = &self.table;
        let Some((fd, _)) = self.queue.pop(|fd, serial| table.live(fd, serial).is_some()) else {
            return false;
        };
        if let Some(pending) = self.table.get(fd) {
            let waited = now.saturating_duration_since(pending.accepted);
            log::debug!(
                "shedding a connection from proxy {} waiting {waited:?} for its header",
                pending.proxy
            );
        }
        self.drop(fd, Some(CloseReason::Shed), env);
        true
    }

    /// Closes the connections whose header is late at `now`.
    pub fn expire(&mut self, now: Instant, env: &mut Env<'_>) {
        // A header's deadline never moves: every live entry that comes due is late.
        while let Some(fd) = self.table.pop_due(now) {
            self.drop(fd, Some(CloseReason::ProxyHeader), env);
        }
    }

    /// Closes every connection without counting it (fast stop).
    pub fn close_all(&mut self, env: &mut Env<'_>) {
        for fd in self.table.fds() {
            self.drop(fd, None, env);
        }
    }
}
