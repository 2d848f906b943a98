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

use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};


use super::Shared;
use super::pump::{Fault, Flow, Pump};
use super::shared::{Health, Lease};
use crate::clock::monotonic_ms;
use crate::net::{self, Peer, Stream};
use crate::services::{CloseReason, Context, Interest, Progress, Ready, Session};

/// The backend connection of a session.
struct Link {
    stream: Stream,
    /// Index in the relay's backends.
    backend: usize,
    /// What the poller watches the stream for.
    watched: Interest,
    /// Counts this connection in the backend's `active` until dropped.
    _lease: Lease,
}

enum State {
    /// Accepted; the first callback (the client socket is writable at once) connects.
    Start,
    /// A connect in flight since the instant given.
    Connecting(Link, Instant),
    /// Relaying.
    Open(Link),
    /// Over: the backend connection is closed (or never was).
    Over,
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
    connected: Option<(usize, Duration)>,
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
    /// once; closes the client as `backend-unavailable` when the plan or the retries run out.
    fn connect_next(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let plan = self.plan.get_or_insert_with(|| super::Plan::new(&shared, self.peer));
        loop {
            let next = if self.tries > config.retries { None } else { plan.next(&shared, monotonic_ms()) };
            let Some(index) = next else {
                self.state = State::Over;
                cx.set_timer(None);
                cx.close(CloseReason::Service("backend-unavailable"));
                return Ok(Progress::default());
            };
            self.tries += 1;
            let address = &config.backends[index];
            let lease = Lease::new(Arc::clone(&shared.table), index);
            match net::connect(address, None) {
                Ok(stream) => {
                    cx.watch(stream.as_fd(), Interest::WRITE)?;
                    let link = Link { stream, backend: index, watched: Interest::WRITE, _lease: lease };
                    cx.set_timer(Some(cx.now() + config.connect_timeout));
                    self.state = State::Connecting(link, cx.now());
                    return Ok(Progress::default());
                }
                Err(error) => failed(&shared, index, &error),
            }
        }
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
            failed(&self.shared, link.backend, &error);
            drop(link);
            return self.connect_next(cx);
        }
        cx.set_timer(None);
        let address = &self.shared.config.backends[link.backend];
        if self.shared.table.backend(link.backend).succeeded() {
            log::info!("relay backend {address} is up again");
        }
        self.connected = Some((link.backend, cx.now().saturating_duration_since(since)));
        // Best effort, as for clients: a failure shows on the first write.
        let _ = link.stream.set_nodelay(true);
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
            let address = &self.shared.config.backends[link.backend];
            log::debug!("relay: backend {address} failed for client {}: {error}", self.peer);
            cx.unwatch(link.stream.as_fd());
        }
        cx.reset(CloseReason::Service("backend-reset"));
        Ok(Progress::default())
    }
}

/// Records a failed connect to backend `index` in the shared table and logs it.
fn failed(shared: &Shared, index: usize, error: &io::Error) {
    let address = &shared.config.backends[index];
    log::debug!("relay: connect to backend {address} failed: {error}");
    let down_ms = u64::try_from(shared.config.down_time.as_millis()).unwrap_or(u64::MAX);
    let health = shared.table.backend(index).failed(shared.config.fail_threshold, monotonic_ms(), down_ms);
    if health == Health::WentDown {
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
            State::Connecting(..) | State::Over => Interest::NONE,
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
        // rest, so a graceful stop (reload) lets it run until either side ends it, or until
        // `graceful_timeout`, as HAProxy and nginx's stream module do.
        matches!(self.state, State::Start | State::Over)
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn describe(&self, line: &mut String) {
        use std::fmt::Write as _;
        let _ = match self.connected {
            Some((index, took)) => write!(
                line,
                " backend={} connect={:.6}s tries={}",
                self.shared.config.backends[index],
                took.as_secs_f64(),
                self.tries
            ),
            None => write!(line, " backend=- tries={}", self.tries),
        };
    }
}
