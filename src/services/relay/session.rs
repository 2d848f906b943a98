//! One relayed connection: connect to a backend (with failover), then two half-duplex pumps.
//!
//! Runs in workers. States ([`State`]): `Start` (accepted; the first callback picks a backend)
//! -> `Connecting` (a non-blocking connect and a `connect_timeout` timer; on refusal or
//! timeout the next backend, at most `retries` more times) -> `Open` (relaying) -> `Over`.
//!
//! While open, bytes move through two [`Pump`]s: *up* (client to backend) and *down* (backend
//! to client). Each carries its bytes in one bounded buffer or, with `splice = true`, one
//! pipe (splice(2)), and has its own half-close state ([`Flow`]): when the carrier is full
//! the pump stops reading its source, so a slow reader on one side holds back the writer on
//! the other through TCP flow control and a worker's memory never grows with traffic
//! (backpressure both ways). A FIN read from one side is passed on (shutdown(2) `SHUT_WR`)
//! once the carried bytes are written; the connection ends when both directions are shut. An
//! error on one side (a reset) resets the other: `SO_LINGER` 0 on the backend,
//! [`Context::reset`] for the client.
//!
//! The client socket is not read before a backend is connected: what the client sends first
//! waits in its socket, so a failover replays nothing.
//!
//! Hand-off (a reload, a binary upgrade): an open relay moves to the serving generation at
//! any point of its life ([`Movable::Now`]), whole: the backend socket and the pipes, the
//! bytes buffered in each direction, each direction's half-close state, the PROXY header
//! bytes not yet counted, the backend's address, what the access line will say. The
//! receiver counts the connection in its own generation's `least-connections` table (a
//! [`Lease`] on the backend of that address, if its configuration still has it) before it
//! takes the connection, and the sender's lease is given back when it drops the session
//! once the receiver has: each generation's table counts exactly the connections its
//! workers serve. A relay still connecting is not moved ([`Movable::Later`]): it is offered
//! once connected (a connect is at most `connect_timeout`), so the connect timeout, the
//! failover plan and the backend's health stay one worker's business.

use std::ffi::OsStr;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Shared;
use super::pump::{Fault, Flow, PipeHeld, Pump};
use super::shared::Lease;
use crate::clock::monotonic_ms;
use crate::net::{self, Address, Peer, Stream};
use crate::services::{CloseReason, Context, Interest, Movable, Progress, Ready, Session};

/// Version of a relay session's exported state (its first byte).
const STATE_VERSION: u8 = 1;

/// The backend connection of a session.
struct Link {
    stream: Stream,
    /// The backend's address.
    address: Address,
    /// What the poller watches the stream for.
    watched: Interest,
    /// Its place on the backend's row (`active`, bytes) until dropped; `None` for a
    /// connection handed over to a generation whose configuration no longer names its
    /// backend (nothing there balances over it).
    lease: Option<Lease>,
}

enum State {
    /// Accepted; the first callback (the client socket is writable at once) connects.
    Start,
    /// A connect in flight since the instant given.
    Connecting(Link, Instant),
    /// Relaying.
    Open(Link),
    /// Handed over and rebuilt from its state, waiting for its descriptors
    /// ([`Session::resume`]).
    Arriving(Arriving),
    /// Over: the backend connection is closed (or never was).
    Over,
}

/// What an imported relay needs besides its state: the backend socket and the pipes.
struct Arriving {
    address: Address,
    /// Pipes the pumps held (up, down), with their counts.
    pipes: [Option<PipeHeld>; 2],
    lease: Option<Lease>,
}

/// Which side sent FIN first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// The relay's per-connection state.
pub struct RelaySession {
    shared: Arc<Shared>,
    peer: Peer,
    plan: Option<super::Plan>,
    state: State,
    /// PROXY header bytes not yet counted out of what the up pump wrote.
    header: Option<Vec<u8>>,
    header_left: u64,
    /// Connects started.
    tries: u32,
    /// The backend connected to, and how long the connect took.
    connected: Option<(Address, Duration)>,
    up: Pump,
    down: Pump,
    first_fin: Option<Side>,
    /// Client bytes delivered to the backend, and backend bytes delivered to the client.
    delivered: (u64, u64),
    /// Both directions shut after the client's FIN: the loop closes as `client-close`.
    done: bool,
}

impl RelaySession {
    pub(super) fn new(shared: Arc<Shared>, peer: Peer, header: Option<Vec<u8>>) -> Self {
        let splices = shared.config.splice;
        RelaySession {
            shared,
            peer,
            plan: None,
            state: State::Start,
            header,
            header_left: 0,
            tries: 0,
            connected: None,
            up: Pump::new(splices),
            down: Pump::new(splices),
            first_fin: None,
            delivered: (0, 0),
            done: false,
        }
    }

    /// Starts a connect to the next backend the plan gives, skipping those that refuse at
    /// once; closes the client as `backend-unavailable` (or `backend-full`, every usable
    /// backend at its `max_connections`) when the plan or the retries run out.
    fn connect_next(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let candidates = shared.candidates();
        let Some(placed) = config.upstreams.placed() else {
            // Outside the daemon nothing placed the rows: no backend to go to.
            return self.give_up(super::NoBackend::Unavailable, cx);
        };
        let plan = self.plan.get_or_insert_with(|| super::Plan::new(&shared, self.peer));
        loop {
            if self.tries > config.retries {
                return self.give_up(super::NoBackend::Unavailable, cx);
            }
            let lease = match plan.next(&shared, &placed.table, candidates, monotonic_ms()) {
                Ok(lease) => lease,
                Err(none) => return self.give_up(none, cx),
            };
            self.tries += 1;
            // A host name's address may have changed since the row was picked: read it now.
            let Some(address) = lease.row().address() else { continue };
            match net::connect(&address, config.source) {
                Ok(stream) => {
                    cx.watch(stream.as_fd(), Interest::WRITE)?;
                    let link = Link { stream, address, watched: Interest::WRITE, lease: Some(lease) };
                    cx.set_timer(Some(cx.now() + config.connect_timeout));
                    self.state = State::Connecting(link, cx.now());
                    return Ok(Progress::default());
                }
                Err(error) => failed(&shared, &lease, &address, &error),
            }
        }
    }

    /// No backend to connect to: the client is closed with `why`'s reason.
    fn give_up(&mut self, why: super::NoBackend, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.state = State::Over;
        cx.set_timer(None);
        cx.close(CloseReason::Service(why.reason()));
        Ok(Progress::default())
    }

    /// The connect in flight ended (`ready` from the poller, `None`: the timer): relay, or
    /// try the next backend.
    fn connect_done(&mut self, ready: Option<Ready>, cx: &mut Context<'_>) -> io::Result<Progress> {
        let State::Connecting(link, since) = std::mem::replace(&mut self.state, State::Over) else {
            unreachable!("only called while connecting");
        };
        let outcome = match ready {
            None => Err(io::Error::new(ErrorKind::TimedOut, "connect timed out")),
            Some(ready) => match link.stream.take_error() {
                Ok(Some(error)) | Err(error) => Err(error),
                // Writable means the connect finished, and SO_ERROR said how (connect(2));
                // without it, ask whether the socket is connected.
                Ok(None) if ready.writable => Ok(()),
                Ok(None) => link.stream.peer_addr().map(drop),
            },
        };
        if let Err(error) = outcome {
            cx.unwatch(link.stream.as_fd());
            if let Some(lease) = &link.lease {
                failed(&self.shared, lease, &link.address, &error);
            }
            drop(link);
            return self.connect_next(cx);
        }
        cx.set_timer(None);
        if link.lease.as_ref().is_some_and(|lease| lease.row().succeeded()) {
            log::info!("relay backend {} is up again (a connect succeeded)", link.address);
        }
        self.connected = Some((link.address.clone(), cx.now().saturating_duration_since(since)));
        // Best effort, as for clients: a failure shows on the first write.
        let _ = link.stream.set_nodelay(true);
        if let (Some(keepalive), Address::Ip(_)) = (&self.shared.config.tcp_keepalive, &link.address) {
            let _ = keepalive.apply(link.stream.socket());
        }
        if let Some(header) = self.header.take() {
            self.header_left = header.len() as u64;
            self.up.preload(&header);
        }
        self.state = State::Open(link);
        // Up only: the client may have sent already, while the backend's first bytes (a
        // greeting) are reported by the poller once the backend is watched for reading, so
        // the read that would almost always say `WouldBlock` is not made.
        self.relay(cx, Pumps { up: true, down: false })
    }

    /// Runs the pumps `run` names, passes FINs on, and watches what each side now waits for.
    ///
    /// Only the pumps a readiness event concerns run: the client readable or the backend
    /// writable moves bytes up, the backend readable or the client writable moves them down.
    /// The poller is level-triggered, so a pump not run now runs when its own event comes,
    /// and the read that would only say `WouldBlock` is never made.
    fn relay(&mut self, cx: &mut Context<'_>, run: Pumps) -> io::Result<Progress> {
        let State::Open(link) = &mut self.state else { return Ok(Progress::default()) };
        let mut progress = Progress::default();
        let now = cx.now();
        // Splice only between two descriptors (always, in the daemon); else read and write.
        let up = if !run.up {
            Ok(0)
        } else {
            match cx.socket().filter(|_| self.up.takes_pipe(now)) {
                Some(client) => self.up.splice(client, link.stream.as_fd()),
                None => self.up.copy(cx.io(), &mut &link.stream),
            }
        };
        let up = match up {
            Ok(moved) => moved,
            Err(Fault::Source(error)) => return self.client_failed(error, cx),
            Err(Fault::Sink(error)) => return self.backend_failed(error, cx),
        };
        let State::Open(link) = &mut self.state else { unreachable!() };
        let down = if !run.down {
            Ok(0)
        } else {
            match cx.socket().filter(|_| self.down.takes_pipe(now)) {
                Some(client) => self.down.splice(link.stream.as_fd(), client),
                None => self.down.copy(&mut &link.stream, cx.io()),
            }
        };
        let down = match down {
            Ok(moved) => moved,
            Err(Fault::Source(error)) => return self.backend_failed(error, cx),
            Err(Fault::Sink(error)) => return self.client_failed(error, cx),
        };
        let header = up.min(self.header_left);
        self.header_left -= header;
        progress.bytes_in = up - header;
        progress.bytes_out = down;
        if let State::Open(Link { lease: Some(lease), .. }) = &mut self.state {
            lease.moved(progress.bytes_in, down);
        }
        let was_exchanged = self.delivered.0 > 0 && self.delivered.1 > 0;
        self.delivered.0 += progress.bytes_in;
        self.delivered.1 += down;
        if !was_exchanged && self.delivered.0 > 0 && self.delivered.1 > 0 {
            // Data went both ways: the connection is now long (kept alive).
            progress.exchanges = 1;
        }
        if self.up.flow != Flow::Open {
            self.first_fin.get_or_insert(Side::Client);
        }
        if self.down.flow != Flow::Open {
            self.first_fin.get_or_insert(Side::Backend);
        }
        let State::Open(link) = &mut self.state else { unreachable!() };
        if self.up.needs_shutdown() {
            if let Err(error) = link.stream.shutdown(Shutdown::Write) {
                return self.backend_failed(error, cx).map(|_| progress);
            }
            self.up.flow = Flow::Shut;
        }
        if self.down.needs_shutdown() {
            // After the client's FIN, with all it sent delivered, the session ends here and
            // the close that follows sends our FIN (nothing unread: no RST); a shutdown(2)
            // first would only cost a system call.
            if !(self.up.flow == Flow::Shut && self.first_fin == Some(Side::Client)) {
                cx.shutdown_write();
            }
            self.down.flow = Flow::Shut;
        }
        if self.up.flow == Flow::Shut && self.down.flow == Flow::Shut {
            cx.unwatch(link.stream.as_fd());
            self.state = State::Over;
            if self.first_fin == Some(Side::Backend) {
                cx.close(CloseReason::Service("backend-close"));
            } else {
                self.done = true;
            }
            return Ok(progress);
        }
        let wanted = Interest {
            read: self.down.wants_input(),
            write: self.up.has_output(),
            exclusive: false,
        };
        if wanted != link.watched {
            cx.watch(link.stream.as_fd(), wanted)?;
            link.watched = wanted;
        }
        Ok(progress)
    }

    /// The client reset (or a write to it failed): reset the backend too.
    fn client_failed(&mut self, error: io::Error, cx: &mut Context<'_>) -> io::Result<Progress> {
        log::debug!("relay: client {} failed: {error}", self.peer);
        if let State::Open(link) = std::mem::replace(&mut self.state, State::Over) {
            cx.unwatch(link.stream.as_fd());
            // SO_LINGER 0: the close sends RST, as the client did.
            let _ = link.stream.socket().set_linger(Some(Duration::ZERO));
        }
        cx.close(CloseReason::Service("client-reset"));
        Ok(Progress::default())
    }

    /// The backend reset (or a write to it failed): reset the client too.
    fn backend_failed(&mut self, error: io::Error, cx: &mut Context<'_>) -> io::Result<Progress> {
        if let State::Open(link) = std::mem::replace(&mut self.state, State::Over) {
            log::debug!("relay: backend {} failed for client {}: {error}", link.address, self.peer);
            cx.unwatch(link.stream.as_fd());
        }
        cx.reset(CloseReason::Service("backend-reset"));
        Ok(Progress::default())
    }
}

/// Records a failed connect to the backend of `lease` (at `address`) on its row and logs it;
/// the passive health marks it down after `fail_threshold` in a row (logged once, by the
/// worker whose failure did it).
fn failed(shared: &Shared, lease: &Lease, address: &Address, error: &io::Error) {
    log::debug!("relay: connect to backend {address} failed: {error}");
    let down_ms = u64::try_from(shared.config.down_time.as_millis()).unwrap_or(u64::MAX);
    if lease.row().failed(shared.config.fail_threshold, monotonic_ms(), down_ms) {
        log::warn!(
            "relay backend {address} is down: {} failed connects in a row (last: {error}); skipped for {}",
            shared.config.fail_threshold,
            humantime::format_duration(shared.config.down_time)
        );
    }
}

/// Which pumps [`RelaySession::relay`] runs: `up` (client to backend), `down` (backend to
/// client).
#[derive(Debug, Clone, Copy)]
struct Pumps {
    up: bool,
    down: bool,
}

impl Session for RelaySession {
    fn interest(&self) -> Interest {
        match self.state {
            State::Start => Interest::WRITE,
            State::Connecting(..) | State::Arriving(_) | State::Over => Interest::NONE,
            State::Open(_) => Interest {
                read: self.up.wants_input(),
                write: self.down.has_output(),
                exclusive: false,
            },
        }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        self.relay(cx, Pumps { up: true, down: false })
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.state {
            State::Start => self.connect_next(cx),
            _ => self.relay(cx, Pumps { up: false, down: true }),
        }
    }

    fn on_extra(&mut self, _fd: std::os::fd::RawFd, ready: Ready, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.state {
            State::Connecting(..) if ready.writable || ready.readable => {
                self.connect_done(Some(ready), cx)
            }
            State::Open(_) => self.relay(cx, Pumps { up: ready.writable, down: ready.readable }),
            _ => Ok(Progress::default()),
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.state {
            State::Connecting(..) => self.connect_done(None, cx),
            _ => Ok(Progress::default()),
        }
    }

    fn is_at_rest(&self) -> bool {
        // A relay cannot see its backend protocol's boundaries: an open relay is never at
        // rest, so a graceful stop lets it run until either side ends it, or until
        // `graceful_timeout`, as HAProxy and nginx's stream module do (a reload moves it:
        // see `movable`).
        matches!(self.state, State::Start | State::Over)
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn describe(&self, line: &mut String) {
        use std::fmt::Write as _;
        let _ = match &self.connected {
            Some((address, took)) => write!(
                line,
                " backend={address} connect={:.6}s tries={}",
                took.as_secs_f64(),
                self.tries
            ),
            None => write!(line, " backend=- tries={}", self.tries),
        };
    }

    fn movable(&self) -> Movable {
        match self.state {
            State::Open(_) => Movable::Now,
            // Connecting: offered once connected. Over: the loop is closing it.
            State::Start | State::Connecting(..) | State::Arriving(_) | State::Over => Movable::Later,
        }
    }

    /// See [`RelaySession::state`].
    fn export(&self) -> Option<Vec<u8>> {
        self.state()
    }

    fn export_descriptors(&self) -> Vec<BorrowedFd<'_>> {
        let State::Open(link) = &self.state else { return Vec::new() };
        let mut fds = vec![link.stream.as_fd()];
        for pump in [&self.up, &self.down] {
            fds.extend(pump.pipe_fds().into_iter().flatten());
        }
        fds
    }

    fn resume(&mut self, descriptors: Vec<OwnedFd>, cx: &mut Context<'_>) -> io::Result<()> {
        let State::Arriving(arriving) = std::mem::replace(&mut self.state, State::Over) else {
            return Err(io::Error::other("not a handed-over relay"));
        };
        let expected = 1 + 2 * arriving.pipes.iter().flatten().count();
        if descriptors.len() != expected {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                format!("{} descriptors where the state says {expected}", descriptors.len()),
            ));
        }
        let mut fds = descriptors.into_iter();
        let stream = Stream::from(fds.next().expect("counted above"));
        for (pump, held) in [&mut self.up, &mut self.down].into_iter().zip(arriving.pipes) {
            if let Some(held) = held {
                let (read, write) = (fds.next().expect("counted"), fds.next().expect("counted"));
                pump.attach(read, write, held)?;
            }
        }
        let watched = Interest {
            read: self.down.wants_input(),
            write: self.up.has_output(),
            exclusive: false,
        };
        cx.watch(stream.as_fd(), watched)?;
        let link = Link { stream, address: arriving.address, watched, lease: arriving.lease };
        self.state = State::Open(link);
        Ok(())
    }
}

impl RelaySession {
    /// The state of an open relay as bytes ([`STATE_VERSION`] 1), for a hand-off: the
    /// backend's address ([`put_address`]), the connect time in microseconds, the connects
    /// tried, the PROXY header bytes not yet counted, the bytes delivered each way, which
    /// side sent FIN first (0 none, 1 the client, 2 the backend), then the up and the down
    /// pump ([`Pump::export`]). Integers are little-endian. `None` unless open.
    fn state(&self) -> Option<Vec<u8>> {
        let State::Open(link) = &self.state else { return None };
        let mut out = Vec::with_capacity(128);
        out.push(STATE_VERSION);
        put_address(&mut out, &link.address);
        let took = self.connected.as_ref().map_or(0, |(_, took)| u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        out.extend(took.to_le_bytes());
        out.extend(self.tries.to_le_bytes());
        for value in [self.header_left, self.delivered.0, self.delivered.1] {
            out.extend(value.to_le_bytes());
        }
        out.push(match self.first_fin {
            None => 0,
            Some(Side::Client) => 1,
            Some(Side::Backend) => 2,
        });
        self.up.export(&mut out);
        self.down.export(&mut out);
        Some(out)
    }

    /// A session rebuilt from [`RelaySession::state`] (of this or an older generation, or of
    /// the old master of an upgrade), waiting for its descriptors; it takes a place on the
    /// row of the backend of the same address, if this configuration has one (beyond its
    /// `max_connections` if need be: the connection exists already, and the sender gives its
    /// place back once the receiver has it). `None` when the state is of another version or
    /// malformed.
    pub(super) fn import(shared: Arc<Shared>, peer: Peer, state: &[u8]) -> Option<RelaySession> {
        let mut wire = Wire(state);
        if wire.u8()? != STATE_VERSION {
            return None;
        }
        let address = wire.address()?;
        let took = Duration::from_micros(wire.u64()?);
        let tries = u32::from_le_bytes(wire.take(4)?.try_into().ok()?);
        let (header_left, up_bytes, down_bytes) = (wire.u64()?, wire.u64()?, wire.u64()?);
        let first_fin = match wire.u8()? {
            0 => None,
            1 => Some(Side::Client),
            2 => Some(Side::Backend),
            _ => return None,
        };
        let splices = shared.config.splice;
        let mut rest = wire.0;
        let (up, up_pipe) = Pump::import(&mut rest, splices)?;
        let (down, down_pipe) = Pump::import(&mut rest, splices)?;
        if !rest.is_empty() {
            return None;
        }
        let lease = shared.config.upstreams.placed().and_then(|placed| {
            let row = shared
                .candidates()
                .iter()
                .find(|c| placed.table.row(c.row).address().as_ref() == Some(&address))?
                .row;
            Some(Lease::adopt(&placed.table, row))
        });
        Some(RelaySession {
            shared,
            peer,
            plan: None,
            state: State::Arriving(Arriving {
                address: address.clone(),
                pipes: [up_pipe, down_pipe],
                lease,
            }),
            header: None,
            header_left,
            tries,
            connected: Some((address, took)),
            up,
            down,
            first_fin,
            delivered: (up_bytes, down_bytes),
            done: false,
        })
    }
}

/// A reader of [`RelaySession::state`]'s bytes.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    /// What [`put_address`] wrote.
    fn address(&mut self) -> Option<Address> {
        let address = match self.u8()? {
            0 => {
                let ip: [u8; 4] = self.take(4)?.try_into().ok()?;
                Address::Ip(SocketAddr::new(IpAddr::from(ip), self.u16()?))
            }
            1 => {
                let ip: [u8; 16] = self.take(16)?.try_into().ok()?;
                Address::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), self.u16()?))
            }
            kind @ (2 | 3) => {
                let len = usize::from(self.u16()?);
                let bytes = self.take(len)?;
                if bytes.is_empty() || bytes.len() > net::MAX_UNIX_PATH || bytes.contains(&0) {
                    return None;
                }
                if kind == 3 {
                    return Some(Address::Abstract(bytes.to_vec()));
                }
                let path = PathBuf::from(OsStr::from_bytes(bytes));
                if !path.is_absolute() {
                    return None;
                }
                Address::Unix(path)
            }
            _ => return None,
        };
        Some(address)
    }
}

/// Appends `address` to `out`: a kind byte, then for 0 (IPv4) its 4 address bytes and its
/// port, for 1 (IPv6) its 16 address bytes and its port, for 2 (a Unix socket file) and 3
/// (an abstract name) the 2-byte length and the bytes of the path or name. Integers are
/// little-endian.
fn put_address(out: &mut Vec<u8>, address: &Address) {
    let unix = |out: &mut Vec<u8>, kind: u8, bytes: &[u8]| {
        out.push(kind);
        out.extend(u16::try_from(bytes.len()).unwrap_or(0).to_le_bytes());
        out.extend(bytes);
    };
    match address {
        Address::Ip(SocketAddr::V4(v4)) => {
            out.push(0);
            out.extend(v4.ip().octets());
            out.extend(v4.port().to_le_bytes());
        }
        Address::Ip(SocketAddr::V6(v6)) => {
            out.push(1);
            out.extend(v6.ip().octets());
            out.extend(v6.port().to_le_bytes());
        }
        Address::Unix(path) => unix(out, 2, path.as_os_str().as_bytes()),
        Address::Abstract(name) => unix(out, 3, name),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::scoreboard::Scoreboard;
    use crate::services::relay::{Balance, tests::relay};

    const BACKENDS: [(&str, u32, bool, u32); 2] =
        [("127.0.0.1:1000", 1, false, 0), ("127.0.0.1:1001", 1, false, 0)];

    fn row(shared: &Shared, index: usize) -> usize {
        shared.config.upstreams.placed().unwrap().rows[index][0]
    }

    /// An open relay to backend `index` of `shared`, in the middle of its life.
    fn open(shared: &Arc<Shared>, index: usize) -> RelaySession {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let stream = Stream::from(stream);
        let table = &shared.config.upstreams.placed().unwrap().table;
        let address = table.row(row(shared, index)).address().unwrap();
        let lease = Lease::take(table, row(shared, index)).unwrap();
        let peer = Peer::Ip("127.0.0.2:4000".parse().unwrap());
        let mut session = RelaySession::new(Arc::clone(shared), peer, None);
        session.up.preload(b"in flight");
        session.header_left = 3;
        session.tries = 2;
        session.connected = Some((address.clone(), Duration::from_millis(1)));
        session.delivered = (10, 20);
        session.first_fin = Some(Side::Client);
        session.state = State::Open(Link { stream, address, watched: Interest::READ, lease: Some(lease) });
        session
    }

    fn active(shared: &Shared, index: usize) -> u64 {
        shared.config.upstreams.placed().unwrap().table.row(row(shared, index)).active()
    }

    #[test]
    fn an_open_relay_moves_with_its_state_and_its_backend_counts_it_once() {
        let board = Scoreboard::create(None, 1).unwrap();
        let old = Arc::new(relay(&board, &BACKENDS, Balance::LeastConnections));
        let sender = open(&old, 1);
        assert_eq!(sender.movable(), Movable::Now);
        let state = sender.export().expect("an open relay exports");
        assert_eq!(sender.export_descriptors().len(), 1, "the backend socket (no pipe)");
        // The new generation has backend 1 as its only backend: the same row.
        let new = Arc::new(relay(&board, &BACKENDS[1..], Balance::LeastConnections));
        assert_eq!(row(&new, 0), row(&old, 1), "a reload keeps the backend's row");
        let peer = Peer::Ip("127.0.0.2:4000".parse().unwrap());
        let receiver = RelaySession::import(Arc::clone(&new), peer, &state).expect("imported");
        assert!(matches!(receiver.state, State::Arriving(_)), "waits for its descriptors");
        assert_eq!(active(&new, 0), 2, "counted by both while it moves");
        drop(sender);
        assert_eq!(active(&new, 0), 1, "once the sender drops it: once");
        assert_eq!(
            (receiver.header_left, receiver.tries, receiver.delivered, receiver.first_fin),
            (3, 2, (10, 20), Some(Side::Client))
        );
        let mut line = String::new();
        receiver.describe(&mut line);
        assert_eq!(line, " backend=127.0.0.1:1001 connect=0.001000s tries=2");
        assert!(receiver.up.has_output() && !receiver.down.has_output(), "the buffered bytes");
        drop(receiver);
        assert_eq!(active(&new, 0), 0);
        // A generation without that backend serves it without counting it anywhere.
        let other = Arc::new(relay(&board, &[("127.0.0.1:2000", 1, false, 0)], Balance::RoundRobin));
        let stray = RelaySession::import(Arc::clone(&other), peer, &state).expect("imported");
        assert_eq!(active(&other, 0), 0);
        drop(stray);
    }

    #[test]
    fn every_kind_of_backend_address_crosses_byte_exact() {
        for written in ["127.0.0.1:6379", "[::1]:6379", "unix:/run/redis/redis.sock", "unix:@redis"] {
            let address: Address = written.parse().unwrap();
            let mut out = Vec::new();
            put_address(&mut out, &address);
            let mut wire = Wire(&out);
            assert_eq!(wire.address(), Some(address), "{written}");
            assert!(wire.0.is_empty(), "{written}: read whole");
        }
        // Not absolute, empty, too long: refused.
        for bad in [&[2, 3, 0, b'a', b'/', b'b'][..], &[3, 0, 0], &[2, 200, 0], &[9]] {
            assert_eq!(Wire(bad).address(), None, "{bad:?}");
        }
    }

    #[test]
    fn other_versions_and_malformed_states_are_refused_and_a_connecting_relay_waits() {
        let board = Scoreboard::create(None, 1).unwrap();
        let shared = Arc::new(relay(&board, &BACKENDS[..1], Balance::RoundRobin));
        let sender = open(&shared, 0);
        let state = sender.export().unwrap();
        let peer = Peer::Ip("127.0.0.2:4000".parse().unwrap());
        let mut other = state.clone();
        other[0] = STATE_VERSION + 1;
        assert!(RelaySession::import(Arc::clone(&shared), peer, &other).is_none());
        for cut in [1, 20, state.len() - 1] {
            assert!(RelaySession::import(Arc::clone(&shared), peer, &state[..cut]).is_none());
        }
        let mut longer = state.clone();
        longer.push(0);
        assert!(RelaySession::import(Arc::clone(&shared), peer, &longer).is_none());
        assert_eq!(active(&shared, 0), 1, "refused imports count nothing");
        let fresh = RelaySession::new(Arc::clone(&shared), peer, None);
        assert_eq!((fresh.movable(), fresh.export()), (Movable::Later, None));
        // Descriptors that do not match the state are refused.
        let mut receiver = RelaySession::import(Arc::clone(&shared), peer, &state).unwrap();
        let mut io = std::io::Cursor::new(Vec::new());
        let mut cx = Context::new(&mut io, Instant::now());
        let error = receiver.resume(Vec::new(), &mut cx).unwrap_err();
        assert!(error.to_string().contains("0 descriptors where the state says 1"), "{error}");
    }
}
