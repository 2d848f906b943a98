//! One relayed connection: read the ClientHello when routing by server name, connect to a
//! backend (with failover, and TLS when the relay speaks it to its backends), then two
//! half-duplex pumps.
//!
//! Runs in workers. States ([`State`]): `Start` (accepted; the first callback reads the
//! ClientHello or picks a backend) -> `Preread` (routing by server name: reading the client's
//! ClientHello, bounded in bytes and by `preread_timeout`) -> `Connecting` (a non-blocking
//! connect and a `connect_timeout` timer; on refusal or timeout the next backend, at most
//! `retries` more times) -> `Handshaking` (with `backend_tls`: the TLS handshake with the
//! backend, within the same `connect_timeout`; a failure is a failed connect) ->
//! `Confirming` (TLS 1.3: the backend's verdict on our certificate, which comes after our
//! side of the handshake is done, as its first record or an alert; a refusal is a failed
//! connect) -> `Open` (relaying) -> `Over`.
//!
//! While open, bytes move through two [`Pump`]s: *up* (client to backend) and *down* (backend
//! to client). Each carries its bytes in one bounded buffer or, with `splice = true`, one
//! pipe (splice(2)), and has its own half-close state ([`Flow`]): when the carrier is full
//! the pump stops reading its source, so a slow reader on one side holds back the writer on
//! the other through TCP flow control and a worker's memory never grows with traffic
//! (backpressure both ways). A FIN read from one side is passed on (shutdown(2) `SHUT_WR`)
//! once the carried bytes are written; the connection ends when both directions are shut. An
//! error on one side (a reset) resets the other: `SO_LINGER` 0 on the backend,
//! [`Context::reset`] for the client. With TLS to the backend, the backend's side of each
//! pump is rustls's plaintext ([`TlsLink`]): the client's FIN goes up as `close_notify`, the
//! backend's `close_notify` comes down as a FIN, and nothing is spliced.
//!
//! The client socket is not read before a backend is connected, but for the ClientHello of a
//! relay that routes by it: what the client sends waits in its socket, and the ClientHello
//! is kept until a backend is connected, so a failover replays nothing and loses nothing.
//! What was read goes first to the backend, after the PROXY header if any, unchanged.
//!
//! Hand-off (a reload, a binary upgrade): an open relay moves to the serving generation at
//! any point of its life ([`Movable::Now`]), whole: the backend socket and the pipes, the
//! bytes buffered in each direction, each direction's half-close state, the PROXY header
//! bytes not yet counted, the backend's address, what the access line will say. The
//! receiver counts the connection in its own generation's `least-connections` table (a
//! [`Lease`] on the backend of that address, if its configuration still has it) before it
//! takes the connection, and the sender's lease is given back when it drops the session
//! once the receiver has: each generation's table counts exactly the connections its
//! workers serve. A relay still reading the ClientHello, connecting or in its backend
//! handshake is not moved ([`Movable::Later`]): it is offered once open (each is bounded in
//! time), so the timeouts, the failover plan and the backend's health stay one worker's
//! business. A relay with TLS to its backend is never moved ([`Movable::Never`]: its keys
//! live in this process): a reload drains it.

use std::ffi::OsStr;
use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend_tls::{Fault as TlsFault, TlsLink};
use super::hello::{Hello, Refusal, Step};
use super::pump::{Fault, Flow, PipeHeld, Pump};
use super::shared::Lease;
use super::{Backends, Shared};
use crate::clock::monotonic_ms;
use crate::net::{self, Address, Peer, Stream};
use crate::services::{
    CloseReason, Context, Interest, Movable, Progress, Ready, Session, TlsFailure,
};

/// Version of a relay session's exported state (its first byte).
const STATE_VERSION: u8 = 1;

/// Reads of the client's ClientHello per callback at most, for fairness.
const HELLO_READS: usize = 8;

/// The backend connection of a session.
struct Link {
    stream: Stream,
    /// The backend's address.
    address: Address,
    /// What the poller watches the stream for.
    watched: Interest,
    /// With `backend_tls`: the connection's TLS (made with the connect, so its ClientHello
    /// is ready once the socket connects).
    tls: Option<Box<TlsLink>>,
    /// Its place on the backend's row (`active`, bytes) until dropped; `None` for a
    /// connection handed over to a generation whose configuration no longer names its
    /// backend (nothing there balances over it).
    lease: Option<Lease>,
    /// The connect was counted as a success on the row: once connected (with TLS, once the
    /// backend accepted us: [`TlsLink::accepted`]). Until then a TLS failure is a failed
    /// connect.
    counted: bool,
}

impl Link {
    /// Counts the connect as a success on the backend's row, once.
    fn count_success(&mut self) {
        if std::mem::replace(&mut self.counted, true) {
            return;
        }
        if self.lease.as_ref().is_some_and(|lease| lease.row().succeeded()) {
            log::info!("relay backend {} is up again (a connect succeeded)", self.address);
        }
    }
}

/// What ends the wait for a TLS 1.3 backend's verdict ([`State::Confirming`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirm {
    /// The backend's socket is ready: a record, an alert or its end.
    Backend,
    /// The client's socket is readable: it speaks first, and waits for nothing.
    Client,
    /// `connect_timeout` passed and the backend said nothing: no refusal came.
    Timer,
}

enum State {
    /// Accepted; the first callback (the client socket is writable at once) reads the
    /// ClientHello or connects.
    Start,
    /// Reading the client's ClientHello to route by the server name it asks for; the timer
    /// is `preread_timeout`'s.
    Preread(Box<Hello>),
    /// A connect in flight since the instant given.
    Connecting(Link, Instant),
    /// The TLS handshake with the backend, whose connect began at the instant given (the
    /// timer is still `connect_timeout`'s).
    Handshaking(Link, Instant),
    /// TLS 1.3, the handshake complete on our side: waiting for the backend's first record,
    /// which says it accepted our certificate (or our lack of one), before the client is
    /// read, so that a refusal (an alert) is a failed connect followed by the next backend.
    /// Ended as well by the client speaking first and by the timer (still
    /// `connect_timeout`'s): then relaying, and a refusal that comes later is still counted
    /// as a failed connect (the client is reset).
    Confirming(Link, Instant),
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
    /// The backends it may use, or that its ClientHello decides them.
    backends: Backends,
    plan: Option<super::Plan>,
    state: State,
    /// PROXY header to send first, until connected.
    header: Option<Vec<u8>>,
    /// The client's first bytes, read to route by its ClientHello, until connected.
    hello: Vec<u8>,
    /// The server name the ClientHello asked for, for the access line.
    server_name: Option<String>,
    /// Bytes at the head of what the up pump writes that are not counted again: the PROXY
    /// header (never counted) and the ClientHello (counted when read).
    header_left: u64,
    /// Connects started.
    tries: u32,
    /// The backend connected to, and how long the connect took (its TLS handshake included).
    connected: Option<(Address, Duration)>,
    /// With TLS to the backend: the version it settled and whether it resumed a session.
    backend_tls: Option<(&'static str, bool)>,
    up: Pump,
    down: Pump,
    first_fin: Option<Side>,
    /// Client bytes delivered to the backend, and backend bytes delivered to the client.
    delivered: (u64, u64),
    /// With TLS to the backend: plaintext (or the backend's end) waits in rustls for the down
    /// pump, which must be called back (the backend socket's readiness no longer tells).
    pending: bool,
    /// Both directions shut after the client's FIN: the loop closes as `client-close`.
    done: bool,
}

impl RelaySession {
    pub(super) fn new(
        shared: Arc<Shared>,
        peer: Peer,
        header: Option<Vec<u8>>,
        backends: Backends,
    ) -> Self {
        let splices = shared.config.splice;
        RelaySession {
            shared,
            peer,
            backends,
            plan: None,
            state: State::Start,
            header,
            hello: Vec::new(),
            server_name: None,
            header_left: 0,
            tries: 0,
            connected: None,
            backend_tls: None,
            up: Pump::new(splices),
            down: Pump::new(splices),
            first_fin: None,
            delivered: (0, 0),
            pending: false,
            done: false,
        }
    }

    /// The first callback: read the ClientHello, or connect to one of the chosen backends.
    fn start(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.backends {
            Backends::ByHello => {
                let timeout = self.shared.config.routes.as_ref().map(|r| r.preread_timeout);
                if let Some(timeout) = timeout {
                    cx.set_timer(Some(cx.now() + timeout));
                }
                self.state = State::Preread(Box::default());
                // Whatever the client sent already is read at once.
                self.preread(cx)
            }
            Backends::Nowhere => Ok(self.refuse(TlsFailure::UnknownName, cx)),
            Backends::Every | Backends::Route(_) => self.connect_next(cx),
        }
    }

    /// Reads what the client sent of its ClientHello, at most what the bound leaves; once
    /// whole, picks the route its server name names and connects.
    fn preread(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let State::Preread(hello) = &mut self.state else { return Ok(Progress::default()) };
        let mut progress = Progress::default();
        let mut chunk = [0u8; 4096];
        let mut step = Step::More;
        for _ in 0..HELLO_READS {
            let room = hello.room().min(chunk.len());
            match cx.io().read(&mut chunk[..room]) {
                Ok(0) => return Ok(self.refuse(TlsFailure::Closed, cx)),
                Ok(n) => {
                    progress.bytes_in += n as u64;
                    step = hello.feed(&chunk[..n]);
                    if step != Step::More {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("relay: client {} failed in its ClientHello: {e}", self.peer);
                    return Ok(self.refuse(TlsFailure::Closed, cx));
                }
            }
        }
        let name = match step {
            Step::More => return Ok(progress),
            Step::Refused(refusal) => {
                log::debug!("relay: client {}: {refusal}", self.peer);
                let failure = match refusal {
                    Refusal::NotTls => TlsFailure::NotTls,
                    Refusal::TooLarge => TlsFailure::TooLarge,
                    Refusal::Malformed => TlsFailure::Protocol,
                };
                self.refuse(failure, cx);
                return Ok(progress);
            }
            Step::Done(name) => name,
        };
        let State::Preread(hello) = std::mem::replace(&mut self.state, State::Start) else {
            unreachable!("reading the ClientHello");
        };
        cx.set_timer(None);
        let routes = self.shared.config.routes.as_ref();
        let route = routes.and_then(|routes| routes.route_for(name.as_deref()));
        self.server_name = name;
        let Some(route) = route else {
            log::debug!(
                "relay: client {} asked for {:?}, which no route serves",
                self.peer,
                self.server_name.as_deref().unwrap_or("no name")
            );
            self.refuse(TlsFailure::UnknownName, cx);
            return Ok(progress);
        };
        self.backends = Backends::Route(route);
        self.hello = hello.into_bytes();
        // Counted now, as read: not again when written to the backend.
        self.header_left = self.hello.len() as u64;
        let connecting = self.connect_next(cx)?;
        progress.exchanges += connecting.exchanges;
        Ok(progress)
    }

    /// Ends a connection whose ClientHello cannot be routed: counted and summarized as a
    /// failed TLS handshake of the listener (no access line).
    fn refuse(&mut self, failure: TlsFailure, cx: &mut Context<'_>) -> Progress {
        self.state = State::Over;
        cx.set_timer(None);
        cx.close(CloseReason::Handshake(failure));
        Progress::default()
    }

    /// Starts a connect to the next backend the plan gives (among those of the session's
    /// route), skipping those that refuse at once; closes the client as
    /// `backend-unavailable` (or `backend-full`, every usable backend at its
    /// `max_connections`) when the plan or the retries run out.
    fn connect_next(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let Some(placed) = config.upstreams.placed() else {
            // Outside the daemon nothing placed the rows: no backend to go to.
            return self.give_up(super::NoBackend::Unavailable, cx);
        };
        let routed: Vec<super::Candidate>;
        let (candidates, counter) = match (self.backends, &config.routes) {
            (Backends::Route(route), Some(routes)) => {
                let mask = routes.backends(route);
                let all = shared.candidates().iter();
                routed = all.filter(|c| c.entry < 64 && mask & (1 << c.entry) != 0).copied().collect();
                (&routed[..], 1 + route)
            }
            (Backends::Every, _) => (shared.candidates(), 0),
            _ => (&[][..], 0),
        };
        let plan =
            self.plan.get_or_insert_with(|| super::Plan::new(&shared, self.peer, counter));
        loop {
            if self.tries > config.retries || candidates.is_empty() {
                return self.give_up(super::NoBackend::Unavailable, cx);
            }
            let lease = match plan.next(&shared, &placed.table, candidates, monotonic_ms()) {
                Ok(lease) => lease,
                Err(none) => return self.give_up(none, cx),
            };
            self.tries += 1;
            // A host name's address may have changed since the row was picked: read it now.
            let Some(address) = lease.row().address() else { continue };
            let tls = match &config.backend_tls {
                None => None,
                Some(backend_tls) => {
                    let entry = candidates.iter().find(|c| c.row == lease.index()).map(|c| c.entry);
                    let written = entry.map(|entry| config.upstreams.backends[entry].written.as_str());
                    let host = written.and_then(super::host_of);
                    let Some(name) = backend_tls.name_for(host.as_ref()) else {
                        // The configuration check requires a name for every backend.
                        return Err(io::Error::other("no server name to verify the backend against"));
                    };
                    // The PROXY header goes first, in plain text, as HAProxy sends it.
                    let ahead = self.header.clone().unwrap_or_default();
                    Some(Box::new(backend_tls.link(name, ahead).map_err(io::Error::other)?))
                }
            };
            match net::connect(&address, config.source) {
                Ok(stream) => {
                    cx.watch(stream.as_fd(), Interest::WRITE)?;
                    let link = Link {
                        stream,
                        address,
                        watched: Interest::WRITE,
                        tls,
                        lease: Some(lease),
                        counted: false,
                    };
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

    /// The connect in flight ended (`ready` from the poller, `None`: the timer): relay, start
    /// TLS with the backend, or try the next backend.
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
        // Best effort, as for clients: a failure shows on the first write.
        let _ = link.stream.set_nodelay(true);
        if let (Some(keepalive), Address::Ip(_)) = (&self.shared.config.tcp_keepalive, &link.address) {
            let _ = keepalive.apply(link.stream.socket());
        }
        if link.tls.is_none() {
            return self.opened(link, since, cx);
        }
        self.state = State::Handshaking(link, since);
        self.handshake(Some(Ready { readable: false, writable: true }), cx)
    }

    /// Moves the TLS handshake with the backend on (`ready` from the poller, `None`: the
    /// timer): relay once it completes, or try the next backend when it fails.
    fn handshake(&mut self, ready: Option<Ready>, cx: &mut Context<'_>) -> io::Result<Progress> {
        let State::Handshaking(mut link, since) = std::mem::replace(&mut self.state, State::Over) else {
            unreachable!("only called while handshaking");
        };
        let tls = link.tls.as_mut().expect("a handshaking link has TLS");
        let outcome = match ready {
            None => Err(TlsFault::Io(io::Error::new(ErrorKind::TimedOut, "TLS handshake timed out"))),
            Some(_) => tls.handshake(&link.stream),
        };
        match outcome {
            // TLS 1.3 leaves the backend's verdict to come: wait for it, unless the client's
            // ClientHello, read already, waits to go up (then relay at once; a refusal still
            // counts as a failed connect).
            Ok(true) if !tls.accepted() && self.hello.is_empty() => {
                rewatch(&mut link, cx)?;
                self.state = State::Confirming(link, since);
                Ok(Progress::default())
            }
            Ok(true) => self.opened(link, since, cx),
            Ok(false) => {
                rewatch(&mut link, cx)?;
                self.state = State::Handshaking(link, since);
                Ok(Progress::default())
            }
            Err(fault) => self.tls_connect_failed(link, fault, cx),
        }
    }

    /// The wait for a TLS 1.3 backend's verdict ended by `event`: relay once the backend
    /// accepted us (or the client speaks first, or the timer says no refusal came), or try
    /// the next backend when it refused us.
    fn confirm(&mut self, event: Confirm, cx: &mut Context<'_>) -> io::Result<Progress> {
        let State::Confirming(mut link, since) = std::mem::replace(&mut self.state, State::Over) else {
            unreachable!("only called while confirming");
        };
        if event != Confirm::Backend {
            return self.opened(link, since, cx);
        }
        let tls = link.tls.as_mut().expect("a confirming link has TLS");
        let read = tls.read_records(&link.stream);
        let outcome = read.and_then(|()| tls.flush(&link.stream).map_err(TlsFault::Io));
        match outcome {
            Ok(()) if tls.accepted() => self.opened(link, since, cx),
            Ok(()) if tls.ended() => self.tls_connect_failed(link, TlsFault::Closed, cx),
            Ok(()) => {
                rewatch(&mut link, cx)?;
                self.state = State::Confirming(link, since);
                Ok(Progress::default())
            }
            Err(fault) => self.tls_connect_failed(link, fault, cx),
        }
    }

    /// TLS with the backend of `link` failed before the relay began (in the handshake, or
    /// by a refusal of our certificate): a failed connect, logged in summary; the alert
    /// rustls queued is sent, and the next backend is tried.
    fn tls_connect_failed(&mut self, mut link: Link, fault: TlsFault, cx: &mut Context<'_>) -> io::Result<Progress> {
        if let Some(backend_tls) = &self.shared.config.backend_tls {
            backend_tls.log_failure(&link.address, &fault, cx.now());
        }
        if let Some(tls) = &mut link.tls {
            // The alert rustls queued, best effort.
            let _ = tls.flush(&link.stream);
        }
        cx.unwatch(link.stream.as_fd());
        if let Some(lease) = &link.lease {
            failed(&self.shared, lease, &link.address, &io::Error::other(fault.to_string()));
        }
        drop(link);
        self.connect_next(cx)
    }

    /// Connected (and, with TLS, the handshake done): count the backend up, send what waits
    /// (the PROXY header, the ClientHello read), relay.
    fn opened(&mut self, mut link: Link, since: Instant, cx: &mut Context<'_>) -> io::Result<Progress> {
        cx.set_timer(None);
        // With TLS 1.3, counted once the backend accepted us (see `State::Confirming`).
        if link.tls.as_mut().is_none_or(|tls| tls.accepted()) {
            link.count_success();
        }
        self.connected = Some((link.address.clone(), cx.now().saturating_duration_since(since)));
        self.backend_tls = link.tls.as_ref().and_then(|tls| tls.facts());
        // With TLS, the PROXY header went ahead of the handshake.
        let mut first = self.header.take().filter(|_| link.tls.is_none()).unwrap_or_default();
        self.header_left += first.len() as u64;
        first.append(&mut self.hello);
        if !first.is_empty() {
            self.up.preload(&first);
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
    /// and the read that would only say `WouldBlock` is never made. With TLS to the backend,
    /// records are read before the down pump runs and written after the up pump did.
    fn relay(&mut self, cx: &mut Context<'_>, run: Pumps) -> io::Result<Progress> {
        let State::Open(link) = &mut self.state else { return Ok(Progress::default()) };
        let mut progress = Progress::default();
        let now = cx.now();
        if let Some(tls) = &mut link.tls {
            let records = if run.down { tls.read_records(&link.stream) } else { Ok(()) };
            if let Err(fault) = records.and_then(|()| tls.flush(&link.stream).map_err(TlsFault::Io)) {
                return self.backend_tls_failed(fault, cx);
            }
            if !link.counted && tls.accepted() {
                link.count_success();
            }
        }
        let State::Open(link) = &mut self.state else { unreachable!() };
        // Splice only between two descriptors (always, in the daemon, but to a TLS backend);
        // else read and write.
        let up = if !run.up {
            Ok(0)
        } else if let Some(tls) = &mut link.tls {
            self.up.copy(cx.io(), &mut tls.plain())
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
        if let Some(tls) = &mut link.tls
            && let Err(error) = tls.flush(&link.stream)
        {
            return self.backend_failed(error, cx);
        }
        let down = if !run.down {
            Ok(0)
        } else if let Some(tls) = &mut link.tls {
            self.down.copy(&mut tls.plain(), cx.io())
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
            let shut = match &mut link.tls {
                None => link.stream.shutdown(Shutdown::Write).map(|()| true),
                // close_notify first, then FIN once every record is written.
                Some(tls) => {
                    tls.close_notify();
                    tls.flush(&link.stream).and_then(|()| match tls.wants_write() {
                        true => Ok(false),
                        false => link.stream.shutdown(Shutdown::Write).map(|()| true),
                    })
                }
            };
            match shut {
                Ok(true) => self.up.flow = Flow::Shut,
                Ok(false) => {}
                Err(error) => return self.backend_failed(error, cx).map(|_| progress),
            }
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
        let State::Open(link) = &mut self.state else { unreachable!() };
        if self.up.flow == Flow::Shut && self.down.flow == Flow::Shut {
            cx.unwatch(link.stream.as_fd());
            self.state = State::Over;
            self.pending = false;
            if self.first_fin == Some(Side::Backend) {
                cx.close(CloseReason::Service("backend-close"));
            } else {
                self.done = true;
            }
            return Ok(progress);
        }
        let wanted = match &mut link.tls {
            None => Interest {
                read: self.down.wants_input(),
                write: self.up.has_output(),
                exclusive: false,
            },
            Some(tls) => {
                self.pending = self.down.wants_input() && tls.has_input();
                tls.interest(self.down.wants_input())
            }
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

    /// The backend's TLS failed while relaying (an alert, such as a refused client
    /// certificate, which TLS 1.3 sends after the handshake; a bad record): logged in
    /// summary, the alert rustls queued sent, and the client reset. Before the backend
    /// accepted us (a refusal after the client spoke first), it is a failed connect too.
    fn backend_tls_failed(&mut self, fault: TlsFault, cx: &mut Context<'_>) -> io::Result<Progress> {
        if let State::Open(link) = &mut self.state {
            if let Some(backend_tls) = &self.shared.config.backend_tls {
                backend_tls.log_failure(&link.address, &fault, cx.now());
            }
            if let Some(tls) = &mut link.tls {
                let _ = tls.flush(&link.stream);
            }
            if !link.counted
                && let Some(lease) = &link.lease
            {
                failed(&self.shared, lease, &link.address, &io::Error::other(fault.to_string()));
            }
        }
        self.backend_failed(fault.into(), cx)
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

/// Watches the backend socket of a TLS `link` for what rustls now waits for.
fn rewatch(link: &mut Link, cx: &mut Context<'_>) -> io::Result<()> {
    let Some(tls) = &link.tls else { return Ok(()) };
    let wanted = tls.interest(true);
    if wanted != link.watched {
        cx.watch(link.stream.as_fd(), wanted)?;
        link.watched = wanted;
    }
    Ok(())
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
            // The client speaking first ends the wait for the backend's verdict.
            State::Preread(_) | State::Confirming(..) => Interest::READ,
            State::Connecting(..) | State::Handshaking(..) | State::Arriving(_) | State::Over => {
                Interest::NONE
            }
            State::Open(_) => Interest {
                read: self.up.wants_input(),
                // Plaintext waiting in rustls: called back at once (the client is writable).
                write: self.down.has_output() || self.pending,
                exclusive: false,
            },
        }
    }

    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.state {
            State::Preread(_) => self.preread(cx),
            State::Confirming(..) => self.confirm(Confirm::Client, cx),
            _ => self.relay(cx, Pumps { up: true, down: false }),
        }
    }

    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.state {
            State::Start => self.start(cx),
            _ => self.relay(cx, Pumps { up: false, down: true }),
        }
    }

    fn on_extra(&mut self, _fd: std::os::fd::RawFd, ready: Ready, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.state {
            State::Connecting(..) if ready.writable || ready.readable => {
                self.connect_done(Some(ready), cx)
            }
            State::Handshaking(..) => self.handshake(Some(ready), cx),
            State::Confirming(..) => self.confirm(Confirm::Backend, cx),
            State::Open(_) => self.relay(cx, Pumps { up: ready.writable, down: ready.readable }),
            _ => Ok(Progress::default()),
        }
    }

    fn on_timer(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        match self.state {
            State::Preread(_) => Ok(self.refuse(TlsFailure::Timeout, cx)),
            State::Connecting(..) => self.connect_done(None, cx),
            State::Handshaking(..) => self.handshake(None, cx),
            State::Confirming(..) => self.confirm(Confirm::Timer, cx),
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
        if let Some(name) = &self.server_name {
            let _ = write!(line, " sni={name}");
        }
        let _ = match &self.connected {
            Some((address, took)) => write!(
                line,
                " backend={address} connect={:.6}s tries={}",
                took.as_secs_f64(),
                self.tries
            ),
            None => write!(line, " backend=- tries={}", self.tries),
        };
        if let Some((version, resumed)) = self.backend_tls {
            let _ = write!(line, " backend_tls={version} backend_resumed={}", u8::from(resumed));
        }
    }

    fn movable(&self) -> Movable {
        match &self.state {
            State::Open(link) if link.tls.is_some() => Movable::Never,
            State::Open(_) => Movable::Now,
            // Reading the ClientHello, connecting: offered once open. Over: the loop is
            // closing it.
            State::Start
            | State::Preread(_)
            | State::Connecting(..)
            | State::Handshaking(..)
            | State::Confirming(..)
            | State::Arriving(_)
            | State::Over => Movable::Later,
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
        let link = Link {
            stream,
            address: arriving.address,
            watched,
            tls: None,
            lease: arriving.lease,
            counted: true,
        };
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
            backends: Backends::Every,
            plan: None,
            state: State::Arriving(Arriving {
                address: address.clone(),
                pipes: [up_pipe, down_pipe],
                lease,
            }),
            header: None,
            hello: Vec::new(),
            server_name: None,
            header_left,
            tries,
            connected: Some((address, took)),
            backend_tls: None,
            up,
            down,
            first_fin,
            delivered: (up_bytes, down_bytes),
            pending: false,
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
        let mut session = RelaySession::new(Arc::clone(shared), peer, None, Backends::Every);
        session.up.preload(b"in flight");
        session.header_left = 3;
        session.tries = 2;
        session.connected = Some((address.clone(), Duration::from_millis(1)));
        session.delivered = (10, 20);
        session.first_fin = Some(Side::Client);
        session.state =
            State::Open(Link { stream, address, watched: Interest::READ, tls: None, lease: Some(lease), counted: true });
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
        let fresh = RelaySession::new(Arc::clone(&shared), peer, None, Backends::Every);
        assert_eq!((fresh.movable(), fresh.export()), (Movable::Later, None));
        // Descriptors that do not match the state are refused.
        let mut receiver = RelaySession::import(Arc::clone(&shared), peer, &state).unwrap();
        let mut io = std::io::Cursor::new(Vec::new());
        let mut cx = Context::new(&mut io, Instant::now());
        let error = receiver.resume(Vec::new(), &mut cx).unwrap_err();
        assert!(error.to_string().contains("0 descriptors where the state says 1"), "{error}");
    }
}
