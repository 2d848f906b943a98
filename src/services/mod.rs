//! Services: what a listener serves, behind two traits.
//!
//! Runs in the master (building a [`Service`] from a listener's options, for `check`, start
//! and reload) and in workers (a [`Session`] per accepted connection). The roles are those of
//! every server framework (tower's `MakeService`, pingora's `ServerApp`):
//!
//! - a [`Service`] is built once per listener from that listener's validated options
//!   (`[listener.options]`) and makes a [`Session`] for each accepted connection;
//! - a [`Session`] moves bytes through its [`Context`] and reports *exchanges* and whether
//!   it is at rest. It never blocks and never sees the poller: it tells the loop what it waits
//!   for ([`Session::interest`], [`Context::watch`], [`Context::set_timer`]) and how it ends
//!   ([`Context::close`], [`Session::is_done`]).
//!
//! The worker loop keeps every policy: per-client limits, short and long idle timeouts,
//! graceful drain, hand-off, lingering close and the access log.
//!
//! Hand-off: when a generation retires (a reload, an upgrade), each connection is moved to a
//! worker of the serving generation if its session can be, at a moment its
//! [`Session::movable`] says: [`Session::export`] gives its state as versioned bytes (and
//! [`Session::export_descriptors`] the descriptors it owns besides the client socket), the
//! receiving worker's [`Service::import`] rebuilds it and [`Session::resume`] hands it those
//! descriptors back to watch. A session that cannot (the default: no `export`) is *drained*:
//! the old worker serves it until it ends. A simple session moves at rest with two short
//! methods, as echo, the line services and `examples/upper.rs` do; a relay moves at any point
//! of its life, buffers, pipes and half-closes included.
//!
//! A new built-in service is one file in this folder plus one name in the `builtins!` list
//! below. A program that embeds preforkd registers its own services by name with
//! [`crate::Daemon::service`].

mod context;
mod datagram;
pub mod framing;
mod options;
pub mod pool;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

pub use context::Context;
pub(crate) use context::{Ending, Extras, Requests, unwatch};
pub use datagram::{Answer, DatagramService, Flow, Step};
pub use framing::{Decoder, Frame, FrameAction, FrameHandler, Framed};
pub use options::{Invalid, Options};

pub use crate::net::{Credentials, Peer};
pub use crate::poller::Interest;
pub use crate::scoreboard::TlsFailure;

/// Declares the built-in services: each name is a module in this folder with a `NAME`
/// constant, its RFC in the module doc, and `fn build(&mut Options) -> Result<Arc<dyn
/// Service>, Invalid>`. Adding a built-in is one file plus one name here.
macro_rules! builtins {
    ($($module:ident),* $(,)?) => {
        $(mod $module;)*
        /// The built-in services, in the order `preforkd check` lists them.
        const BUILTINS: &[(&str, BuildFn)] = &[$(($module::NAME, $module::build)),*];
    };
}

builtins!(echo, discard, chargen, daytime, time, exec, relay, tftp, metrics);

mod test_only;

pub use chargen::Chargen;
pub use daytime::Daytime;
pub use discard::Discard;
pub use echo::Echo;
pub use exec::{DEFAULT_USER, Exec, Program, StderrTo, set_spawner_link, wire};
pub use metrics::Metrics;
pub use relay::{Balance, ProxyVersion, Relay, RelayConfig};
pub use time::Time;

/// The byte stream a session reads and writes: a non-blocking socket in the daemon, any
/// `Read + Write` in tests. Reads and writes return `WouldBlock` when they would block.
pub trait Transport: io::Read + io::Write {}

impl<T: io::Read + io::Write> Transport for T {}

/// What one callback did, added to the connection's totals (the access log's `in=`, `out=`
/// and `exchanges=`). Any byte moved, in either direction and on any descriptor of the
/// session, counts as activity for the idle timeouts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes read from the client (or, for a relay, moved from client to backend).
    pub bytes_in: u64,
    /// Bytes written to the client.
    pub bytes_out: u64,
    /// Exchanges completed during the call (see [`Session`]).
    pub exchanges: u64,
}

impl Progress {
    /// Whether any byte moved.
    pub fn moved(&self) -> bool {
        self.bytes_in + self.bytes_out > 0
    }
}

/// Readiness of a descriptor a session registered with [`Context::watch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    /// Readable, or end-of-file, or an error pending.
    pub readable: bool,
    /// Writable (for a connecting socket: the connect finished, successfully or not).
    pub writable: bool,
}

/// Why a connection was closed, as written in the access log (`reason=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed its side and every answer was sent.
    ClientClose,
    /// The service ended the conversation after its answer (daytime, time).
    ServerClose,
    /// Silent for `short_idle_timeout` before its first exchange completed.
    IdleShort,
    /// Kept alive and silent for `long_idle_timeout`.
    IdleLong,
    /// Over `max_connections_per_client`: closed right after accept.
    Limit,
    /// Over `max_long_connections_per_client`: closed after its exchange.
    LongLimit,
    /// A socket error (reset, broken pipe ...) or an internal failure.
    Error,
    /// The worker is stopping (graceful or fast).
    Shutdown,
    /// Refused by the listener's `allow` / `deny` lists, right after accept.
    Denied,
    /// Over `max_connection_rate_per_client`: closed right after accept.
    Rate,
    /// Over the listener's `max_connections`: closed right after accept.
    ListenerFull,
    /// Closed by a full worker, before its first exchange completed, to admit a new client.
    Shed,
    /// A trusted proxy's PROXY protocol header was malformed, or did not come in time.
    ProxyHeader,
    /// Closed at rest by a full worker to admit a new client, its client holding more than
    /// its fair share of the worker; or refused by a full worker, its client then holding
    /// more than its fair share (see preforkd.toml(5), `shed_when_full`).
    OverShare,
    /// A reason of the service's own, such as `backend-unavailable` or `frame-too-long`:
    /// lowercase words joined by `-`, as the access log prints it.
    Service(&'static str),
    /// The TLS handshake failed, for this reason: the service never saw the connection. Not
    /// an access line: counted per listener and reason, and summarized in the log.
    Handshake(TlsFailure),
}

impl CloseReason {
    /// The access-log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClose => "client-close",
            CloseReason::ServerClose => "server-close",
            CloseReason::IdleShort => "idle-short",
            CloseReason::IdleLong => "idle-long",
            CloseReason::Limit => "limit",
            CloseReason::LongLimit => "long-limit",
            CloseReason::Error => "error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Denied => "denied",
            CloseReason::Rate => "rate",
            CloseReason::ListenerFull => "listener-full",
            CloseReason::Shed => "shed",
            CloseReason::ProxyHeader => "proxy-header",
            CloseReason::OverShare => "over-share",
            CloseReason::Service(reason) => reason,
            CloseReason::Handshake(failure) => failure.close_reason(),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The connection a session is made for. Made by the worker (non-exhaustive: fields may be
/// added).
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnInfo<'a> {
    /// The listener's `name`.
    pub listener: &'a str,
    /// Who the client is: [`Peer::Ip`] with its address and port (the one a trusted PROXY
    /// protocol header named, if any), or [`Peer::Unix`] with its credentials for a client of
    /// a Unix listener. `peer.ip()` is the address, when there is one.
    pub peer: Peer,
    /// The accepted socket, for [`ConnInfo::local_addr`] or for a service that hands the
    /// connection to something else (a child process). The worker owns it: do not close it.
    pub socket: BorrowedFd<'a>,
    /// The local address when the worker knows it without asking the kernel: the listener's
    /// bound address, unless that is a wildcard (`0.0.0.0`, `[::]`) or a Unix socket. `None`:
    /// ask [`ConnInfo::local_addr`].
    pub bound: Option<SocketAddr>,
    /// On a TLS listener, what the handshake settled (the session is made once it
    /// completed); `None` on a plain one.
    pub tls: Option<&'a TlsInfo>,
}

/// What a TLS handshake settled, for a session made on a TLS listener ([`ConnInfo::tls`]).
/// Non-exhaustive: fields may be added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsInfo {
    /// The protocol, as OpenSSL and mod_ssl spell it: `TLSv1.3` or `TLSv1.2`.
    pub protocol: &'static str,
    /// The cipher suite's IANA name, such as `TLS_AES_256_GCM_SHA384` or
    /// `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`.
    pub cipher: &'static str,
    /// The server name the client asked for (SNI, RFC 6066), if any.
    pub server_name: Option<String>,
    /// The application protocol negotiated (ALPN, RFC 7301), if any.
    pub alpn: Option<Vec<u8>>,
    /// Whether the session was resumed from a ticket (no certificate was exchanged).
    pub resumed: bool,
    /// The client's certificate, when it presented one (it was verified against the
    /// listener's `client_ca`: otherwise the handshake fails).
    pub client_certificate: Option<ClientCertificate>,
}

/// A verified client certificate's names, as mod_ssl's `SSL_CLIENT_*` variables give them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientCertificate {
    /// The subject's distinguished name, RFC 4514 (`CN=alice,O=Example`).
    pub subject: String,
    /// The issuer's distinguished name, RFC 4514.
    pub issuer: String,
    /// The serial number, hexadecimal, uppercase.
    pub serial: String,
}

impl TlsInfo {
    /// The variables mod_ssl and ucspi-ssl's sslserver give a program: `SSL_PROTOCOL`,
    /// `SSL_CIPHER`, `SSL_TLS_SNI` (with SNI), `SSL_SESSION_RESUMED` (`Initial` or
    /// `Resumed`), `SSL_CLIENT_VERIFY` (`SUCCESS` or `NONE`) and, with a client certificate,
    /// `SSL_CLIENT_S_DN`, `SSL_CLIENT_I_DN` and `SSL_CLIENT_M_SERIAL`.
    pub fn environment(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            ("SSL_PROTOCOL", self.protocol.to_owned()),
            ("SSL_CIPHER", self.cipher.to_owned()),
            ("SSL_SESSION_RESUMED", if self.resumed { "Resumed" } else { "Initial" }.to_owned()),
        ];
        if let Some(name) = &self.server_name {
            vars.push(("SSL_TLS_SNI", name.clone()));
        }
        match &self.client_certificate {
            Some(certificate) => {
                vars.push(("SSL_CLIENT_VERIFY", "SUCCESS".to_owned()));
                vars.push(("SSL_CLIENT_S_DN", certificate.subject.clone()));
                vars.push(("SSL_CLIENT_I_DN", certificate.issuer.clone()));
                vars.push(("SSL_CLIENT_M_SERIAL", certificate.serial.clone()));
            }
            None => vars.push(("SSL_CLIENT_VERIFY", "NONE".to_owned())),
        }
        vars
    }
}

impl ConnInfo<'_> {
    /// The local address the client connected to: [`ConnInfo::bound`] when known, else
    /// getsockname(2) (one system call, so only services that need it pay for it).
    ///
    /// # Errors
    /// getsockname(2) failed (the socket is already gone), or the connection came in on a
    /// Unix socket, which has no IP address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        if let Some(bound) = self.bound {
            return Ok(bound);
        }
        let address = socket2::SockRef::from(&self.socket).local_addr()?;
        address.as_socket().ok_or_else(|| io::Error::other("not an IP socket"))
    }
}

/// The worker a [`Service`] hook runs in. Made by the worker (non-exhaustive: fields may be
/// added).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct WorkerInfo<'a> {
    /// The worker's slot in the master's table (also its row in `preforkd status`): from 0,
    /// below the slot count fixed at start; a replacement takes a free slot, perhaps another.
    pub slot: usize,
    /// The configuration generation the worker serves (1 at start, one more per reload).
    pub generation: u64,
    /// The name of the listener whose service this is.
    pub listener: &'a str,
}

/// How a worker ends, as [`Service::before_exit`] is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStop {
    /// The worker ended with no connection left: its graceful stop (SIGQUIT) finished, or it
    /// was retired (a reload's old generation, TTOU, WINCH, recycling) and every connection
    /// has moved to another worker or ended.
    Graceful,
    /// A fast stop (SIGTERM or SIGINT, or the master died): the connections were just closed.
    Fast,
    /// The worker could not go on: its loop failed, or another service's
    /// [`Service::after_fork`] failed after this one's succeeded.
    Failed,
}

/// What a [`Service::after_fork`] hook fails with: any error, whose message the worker logs.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// A listener's service: built once from the listener's options, makes one [`Session`] per
/// accepted connection.
///
/// The value is built in the master (for `preforkd check`, at start and at each reload, where
/// a changed `[listener.options]` applies to the new generation's connections) and reaches
/// the workers through fork(2), so each worker holds its own copy: state kept in it with
/// interior mutability is per worker (see the crate documentation for a picture, and
/// [`crate::shared`] for state all workers see). Building must have no side effect (no
/// socket, no thread, no file written): `check` builds every service and throws it away.
/// What each worker needs of its own (a database connection, an open file, a client pool)
/// is made by [`Service::after_fork`] and ended by [`Service::before_exit`].
///
/// Workers leave SIGCHLD at its default disposition and install no handler for it, and
/// start no process themselves: a service that runs a program per connection describes it
/// with [`Service::program`], and exec's sessions have the exec spawner start it (see
/// `crate::spawner`).
pub trait Service {
    /// A session for a newly accepted connection. Called in the worker; it must not block.
    fn session(&self, conn: &ConnInfo<'_>) -> Box<dyn Session>;

    /// Called once in each worker, after fork(2), once the worker has dropped its
    /// privileges (it runs as `daemon.user`) and before it accepts anything: open what the
    /// worker needs of its own (a database, a file, a client pool) and keep it in the
    /// service with interior mutability (a `OnceCell`, a `RefCell`: the worker is
    /// single-threaded). Hooks run in listener order. It may block, briefly: until every
    /// worker of a reload's generation has returned from it, the old generation serves
    /// (and a reload not ready within its start timeout is rolled back).
    ///
    /// Default: nothing.
    ///
    /// # Errors
    /// Any error: the worker logs `worker failed to boot: listener NAME: after_fork: ERROR`,
    /// calls [`Service::before_exit`] ([`WorkerStop::Failed`]) for the services whose hook
    /// succeeded, and exits as a worker that could not boot. While the daemon starts, that
    /// stops it (exit status 70, as for any worker that cannot boot); in a reload, the
    /// reload is rolled back; later (a replacement worker), the worker is respawned with the
    /// backoff of a crash loop, since what failed (a database down) may come back.
    fn after_fork(&self, worker: &WorkerInfo<'_>) -> Result<(), HookError> {
        let _ = worker;
        Ok(())
    }

    /// Called once in each worker before it exits, after its connections are closed or
    /// handed off (`stop` says how it ends): flush and close what [`Service::after_fork`]
    /// opened. It may block, briefly: a graceful stop's `graceful_timeout` still runs, and
    /// SIGKILL at its end skips the hook, as do a crash and a kill for a hang. Default:
    /// nothing.
    fn before_exit(&self, worker: &WorkerInfo<'_>, stop: WorkerStop) {
        let _ = (worker, stop);
    }

    /// A cap of the service's own on the listener's open connections, counted exactly across
    /// workers like the listener's `max_connections` (the lower of the two applies; a
    /// connection over it is refused with reason `listener-full`): exec's `max_instances`.
    /// Default: none.
    fn max_connections(&self) -> Option<NonZeroU32> {
        None
    }

    /// The program this listener starts per connection, if any (exec's): the exec spawner
    /// (see `crate::spawner`) starts only programs named this way, for the listener that
    /// names them, as its user. Default: none.
    fn program(&self) -> Option<&Program> {
        None
    }

    /// The backends this service connects to, if any (relay's): the master places their
    /// rows in the scoreboard's backend table before it forks the workers, the health
    /// checker probes them and resolves their host names, and `status` and the metrics show
    /// them. Default: none.
    fn upstreams(&self) -> Option<&crate::upstream::Upstreams> {
        None
    }

    /// Whether the service may have work of its own due in a worker, outside any session
    /// ([`Service::next_deadline`]). Asked once, when the worker boots: only such services
    /// are asked for their deadline at each turn of its loop, so that the others cost that
    /// loop nothing. Default: false.
    fn keeps_house(&self) -> bool {
        false
    }

    /// When the service next has work of its own due in this worker, outside any session
    /// (a summary of log lines it held back, such as relay's failures of TLS with its
    /// backends); the worker wakes by then and calls [`Service::housekeeping`]. Asked at
    /// every turn of the worker's loop, and only if [`Service::keeps_house`] said so: keep
    /// it cheap. Default: never.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        None
    }

    /// Does what [`Service::next_deadline`] said was due, at `now` (monotonic; the worker
    /// may call it early or late, and with `all` when it stops: then do everything pending).
    /// Must not block. Default: nothing.
    fn housekeeping(&self, now: std::time::Instant, all: bool) {
        let _ = (now, all);
    }

    /// Rebuilds a session handed off by a worker of an older generation (or of the old
    /// master of a binary upgrade) from what its [`Session::export`] returned. `None`
    /// refuses it, and the old worker keeps serving the connection until it ends: do so for
    /// a state version this code does not know. The session's own descriptors, if it
    /// exported any, come next, with [`Session::resume`]. Called in the receiving worker; it
    /// must not block and must do no I/O on the connection (the hand-off may still be
    /// declined, and the old worker then serves on). Default: `None`.
    fn import(&self, conn: &ConnInfo<'_>, state: &[u8]) -> Option<Box<dyn Session>> {
        let _ = (conn, state);
        None
    }

    /// Whether the service can serve a TCP listener; `Err(reason)` makes `preforkd check`
    /// refuse `transport = "tcp"` with that reason ([`Service::session`] is then never
    /// called). Default: `Ok`.
    ///
    /// # Errors
    /// The reason the service has no stream form, e.g. `"TFTP is a UDP protocol"`.
    fn stream(&self) -> Result<(), &'static str> {
        Ok(())
    }

    /// The service's datagram side, for `transport = "udp"` (see [`DatagramService`]).
    ///
    /// # Errors
    /// The reason the service refuses UDP, which `preforkd check` prints; the default is
    /// `"it has no datagram form"`.
    fn datagram(&self) -> Result<&dyn DatagramService, &'static str> {
        Err("it has no datagram form")
    }

    /// Whether the service's sessions pass the connection's socket to another process (exec
    /// gives it to its child as standard input and output) instead of reading and writing
    /// through [`Context::io`]. On a TLS listener such a session gets, as
    /// [`ConnInfo::socket`], one end of a socket pair whose other end the TLS layer carries
    /// to and from the client; the session must have passed it on (spawn, `SCM_RIGHTS`) by the
    /// time [`Service::session`] returns, since the worker then closes its copy, so that the
    /// other process's exit shows as end-of-file. Default: `false`.
    fn passes_socket(&self) -> bool {
        false
    }
}

/// The per-connection state of a service.
///
/// An *exchange* is one request answered: for echo, everything received so far has been
/// written back. The first completed exchange turns a short connection into a long
/// (kept-alive) one, with its own idle timeout and per-client quota.
///
/// Callbacks must not block: they read and write until `WouldBlock`, or stop earlier to be
/// fair to other connections (readiness is level-triggered: the loop calls again while the
/// socket stays ready). A callback may be called spuriously and must treat `WouldBlock` as
/// "nothing to do". An `Err` closes the connection with reason `error`.
///
/// A session that speaks first (daytime, chargen) returns [`Interest`] with `write` set
/// before it has read anything: the loop calls [`Session::on_writable`] right after accept.
pub trait Session {
    /// What the loop should watch the client socket for now. Asked after every callback.
    fn interest(&self) -> Interest;

    /// The client socket is readable (or has end-of-file or an error pending).
    ///
    /// # Errors
    /// An I/O error other than `WouldBlock`/`Interrupted`: the loop closes the connection.
    fn on_readable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress>;

    /// The client socket is writable.
    ///
    /// # Errors
    /// As for [`Session::on_readable`].
    fn on_writable(&mut self, cx: &mut Context<'_>) -> io::Result<Progress>;

    /// A descriptor registered with [`Context::watch`] is ready. Default: nothing.
    ///
    /// # Errors
    /// As for [`Session::on_readable`].
    fn on_extra(&mut self, fd: RawFd, ready: Ready, cx: &mut Context<'_>) -> io::Result<Progress> {
        let _ = (fd, ready, cx);
        Ok(Progress::default())
    }

    /// The deadline set with [`Context::set_timer`] has passed (it is cleared before the
    /// call). Default: nothing.
    ///
    /// # Errors
    /// As for [`Session::on_readable`].
    fn on_timer(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let _ = cx;
        Ok(Progress::default())
    }

    /// The drain notice, called at most once in the connection's life: its worker drains and
    /// keeps this connection rather than handing it off. That is, the daemon stops
    /// gracefully (the connection is then closed once at rest and quiet for
    /// `DRAIN_QUIET`, 100 ms, and killed at `graceful_timeout`), or the worker's generation
    /// retires (a reload, TTOU, recycling, an upgrade) and this session cannot move (no
    /// [`Session::export`], or no worker took it): it is then served until it ends, or until
    /// `reload_drain_timeout`. A connection that is handed off is never told: its client
    /// sees nothing. Say goodbye if the protocol has a word for it (a line protocol's "server
    /// going away", an HTTP/2 GOAWAY), and close ([`Context::close`]) or go on. Default:
    /// nothing.
    ///
    /// # Errors
    /// As for [`Session::on_readable`].
    fn on_drain(&mut self, cx: &mut Context<'_>) -> io::Result<Progress> {
        let _ = cx;
        Ok(Progress::default())
    }

    /// No exchange is in flight: every request received has been answered. The loop also
    /// checks that the socket holds no unread input before it closes an at-rest connection
    /// (keep-alive limit, graceful stop), so nothing the client sent is dropped.
    fn is_at_rest(&self) -> bool;

    /// The conversation is over because the client closed its side and every answer was
    /// written: the loop closes the connection as `client-close`. (To end it from the
    /// server's side, use [`Context::close`].)
    fn is_done(&self) -> bool;

    /// Whether the listener's short and long idle timeouts apply to this connection now.
    /// Default `true`; a session whose traffic the loop cannot see (a child process owns the
    /// socket) returns `false`, and ends the connection itself.
    fn idle_timeouts(&self) -> bool {
        true
    }

    /// The process this session runs for its connection (exec's child), while it runs: a
    /// worker that retires lists those it keeps serving for `preforkd status`. Default:
    /// none.
    fn process(&self) -> Option<u32> {
        None
    }

    /// The loop is about to close the connection gracefully on its own account (a graceful
    /// stop, `max_long_connections_per_client`, after the session's own close): the
    /// session's last words, written to `socket` before the FIN, best effort (what does not
    /// fit is dropped). TLS sends its `close_notify` alert here. Default: nothing.
    fn closing(&mut self, socket: &mut dyn Transport) {
        let _ = socket;
    }

    /// Appends `key=value` fields of the service's own to the connection's access line, each
    /// with a leading space (` child=4242 status=exit:0`, a relay's ` backend=... connect=...`).
    /// Called once, when the connection closes, and only when the access log is on.
    /// Default: nothing.
    fn describe(&self, line: &mut String) {
        let _ = line;
    }

    /// The session's state, for a hand-off to a worker of the serving generation, as bytes
    /// that start with a version of the service's own (at most [`MAX_EXPORT`] bytes); the
    /// receiving worker's [`Service::import`] reads them. Asked when [`Session::movable`]
    /// allows: by default only at rest ([`Session::is_at_rest`], no unread input in the client
    /// socket, no extra descriptor watched), so the state is what lasts between exchanges.
    /// Return `None` when the session cannot be moved (a child process owns the socket): it
    /// is then served here until it ends (a reload drains it). Asking must change nothing:
    /// the hand-off may be declined, and the session then goes on here. The session is
    /// dropped, without a close, once the receiver has taken the connection. Default: `None`.
    fn export(&self) -> Option<Vec<u8>> {
        None
    }

    /// When the session can be handed off: [`Movable::AtRest`] (the default), at any moment
    /// ([`Movable::Now`]: its exported state holds what is in flight), not at this moment
    /// ([`Movable::Later`]), or never ([`Movable::Never`]: drained).
    fn movable(&self) -> Movable {
        Movable::AtRest
    }

    /// The descriptors the session owns besides the client socket (a backend socket, pipes),
    /// to move with a hand-off, in the order [`Session::resume`] gets them back. Asked right
    /// after [`Session::export`] returned state. The loop sends duplicates: the session keeps
    /// its own until the receiver has taken the connection (then drops them with itself,
    /// which the peers do not see: the sockets stay open in the receiver). At most
    /// [`MAX_EXPORT_DESCRIPTORS`]. Default: none.
    fn export_descriptors(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }

    /// In the receiving worker, right after [`Service::import`]: the descriptors
    /// [`Session::export_descriptors`] gave, in that order, to own and to watch again
    /// ([`Context::watch`]). The session must do no I/O here: the hand-off may still be
    /// declined (the loop then unwatches and drops it, and the old worker serves on). The
    /// loop registers the client socket itself ([`Session::interest`]) and restores the
    /// session's timer. An `Err` declines the hand-off. Default: accepts no descriptor.
    ///
    /// # Errors
    /// The descriptors are not what the state says, or one cannot be watched (the worker's
    /// budget is spent; select(2) and a descriptor at or above `FD_SETSIZE`).
    fn resume(&mut self, descriptors: Vec<OwnedFd>, cx: &mut Context<'_>) -> io::Result<()> {
        let _ = cx;
        if descriptors.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other("this session takes no descriptors"))
        }
    }
}

/// When a session can be handed off ([`Session::movable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movable {
    /// Only at rest: no exchange in flight, nothing unread in the client socket, no extra
    /// descriptor watched. Right for a session whose in-flight state is not exported.
    AtRest,
    /// Now, whatever is in flight: the exported state holds the bytes the session has
    /// buffered and its half-close states, and its own descriptors go along (a relay).
    Now,
    /// Not at this moment (a relay still connecting to its backend): asked again after the
    /// session's next callback.
    Later,
    /// Never: state lives in this process that cannot be exported (TLS traffic keys, a
    /// relay's TLS to its backend). The session is drained: served here until it ends.
    Never,
}

/// Largest [`Session::export`] state a hand-off carries, in bytes (64 KiB less room for
/// the connection's own state); a larger one is not handed off. A relay's state, with both of
/// its 16 KiB buffers full, fits.
pub const MAX_EXPORT: usize = 60 * 1024;

/// Most descriptors [`Session::export_descriptors`] may give (the client socket goes along
/// besides them); a session with more is not handed off.
pub const MAX_EXPORT_DESCRIPTORS: usize = crate::handoff::MAX_DESCRIPTORS - 1;

/// Builds a listener's service from its options; problems are reported through the
/// [`Options`] and the result is then `Err(Invalid)`.
pub type BuildFn = fn(&mut Options<'_>) -> Result<Arc<dyn Service>, Invalid>;

type DynBuild = Arc<dyn Fn(&mut Options<'_>) -> Result<Arc<dyn Service>, Invalid>>;

/// Environment variable that enables test-only services (`test-hang`) in the configuration.
pub const TEST_SERVICES_ENV: &str = "PREFORKD_TEST_SERVICES";

/// The services a configuration may name in `service = "..."`: the built-ins, plus those a
/// program registers ([`crate::Daemon::service`]).
#[derive(Clone)]
pub struct Registry {
    entries: Vec<(String, DynBuild)>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}

/// A name a service cannot be registered under.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Not 1 to 32 lowercase ASCII letters, digits or `-`, starting with a letter.
    #[error(
        "service name {0:?} must be 1 to 32 lowercase letters, digits or '-', starting with a letter"
    )]
    BadName(String),
    /// A service of that name (perhaps a built-in) is registered already.
    #[error("a service named {0:?} is registered already")]
    Taken(String),
}

impl Registry {
    /// The built-in services: echo, discard, chargen, daytime, time, exec, relay, tftp,
    /// metrics.
    pub fn builtin() -> Self {
        let entries =
            BUILTINS.iter().map(|&(name, build)| (name.to_owned(), Arc::new(build) as DynBuild));
        Registry { entries: entries.collect() }
    }

    /// Adds a service under `name`, built by `build` from each listener's options.
    ///
    /// # Errors
    /// [`RegisterError`] when the name is malformed or taken.
    pub fn register<S: Service + 'static>(
        &mut self,
        name: &str,
        build: impl Fn(&mut Options<'_>) -> Result<S, Invalid> + 'static,
    ) -> Result<(), RegisterError> {
        let well_formed = (1..=32).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !well_formed {
            return Err(RegisterError::BadName(name.to_owned()));
        }
        if self.entries.iter().any(|(taken, _)| taken == name) {
            return Err(RegisterError::Taken(name.to_owned()));
        }
        let build: DynBuild = Arc::new(move |options: &mut Options<'_>| {
            build(options).map(|service| Arc::new(service) as Arc<dyn Service>)
        });
        self.entries.push((name.to_owned(), build));
        Ok(())
    }

    /// The names a configuration may use, in registration order (test-only services are
    /// not listed).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(name, _)| name.as_str())
    }

    /// The built-in service `name` built leniently from invalid options ([`Options::probe`]),
    /// only to ask it which transports it serves ([`Service::stream`],
    /// [`Service::datagram`]); `None` for a service registered by a program (whose build is
    /// not known to survive invalid values) or when nothing could be built.
    pub(crate) fn probe_builtin(
        &self,
        name: &str,
        table: Option<toml::Spanned<toml::de::DeTable<'_>>>,
        listener_span: std::ops::Range<usize>,
    ) -> Option<Arc<dyn Service>> {
        let (_, build) = BUILTINS.iter().find(|(builtin, _)| *builtin == name)?;
        let mut scratch = Vec::new();
        build(&mut Options::probe(table, listener_span, &mut scratch)).ok()
    }

    /// Builds the service `name` from `options`; `None` when no service has that name.
    pub(crate) fn build(
        &self,
        name: &str,
        options: &mut Options<'_>,
    ) -> Option<Result<Arc<dyn Service>, Invalid>> {
        if let Some((_, build)) = self.entries.iter().find(|(n, _)| n == name) {
            return Some(build(options));
        }
        if std::env::var_os(TEST_SERVICES_ENV).is_some() {
            return test_only::build(name, options);
        }
        None
    }
}

/// A listener's service as configured: its name, its options as written, and the service
/// built from them. Two are equal when name and options are.
#[derive(Clone)]
pub struct ServiceConfig {
    /// The `service = "..."` name.
    pub name: String,
    /// `[listener.options]` as written (empty when absent).
    pub options: toml::Table,
    /// The service built from them.
    pub service: Arc<dyn Service>,
}

impl ServiceConfig {
    /// A built-in service with no options, such as `echo` (for tests and programs that
    /// build a [`crate::config::Config`] by hand).
    ///
    /// # Errors
    /// [`Invalid`] when `name` is not a built-in that takes no options.
    pub fn builtin(name: &str) -> Result<ServiceConfig, Invalid> {
        let mut issues = Vec::new();
        let mut options = Options::absent("", 0..0, &mut issues);
        let service = Registry::builtin().build(name, &mut options).ok_or(Invalid)??;
        Ok(ServiceConfig { name: name.to_owned(), options: toml::Table::new(), service })
    }
}

impl PartialEq for ServiceConfig {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.options == other.options
    }
}

impl Eq for ServiceConfig {}

impl fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for ServiceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Reads and writes through `cx` until `WouldBlock`, at most `rounds` times: a helper for
/// services whose input is thrown away (discard, chargen, daytime, time). Returns the bytes
/// read and whether the client's FIN was seen.
///
/// # Errors
/// A read error other than `WouldBlock`/`Interrupted`.
pub fn discard_input(cx: &mut Context<'_>, rounds: usize) -> io::Result<(u64, bool)> {
    let mut sink = [0u8; 4096];
    let mut total = 0;
    for _ in 0..rounds {
        match cx.io().read(&mut sink) {
            Ok(0) => return Ok((total, true)),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok((total, false))
}

/// Writes `bytes` through `cx` until done or `WouldBlock`; returns how many were written.
///
/// # Errors
/// A write error other than `WouldBlock`/`Interrupted`; a zero-length write is `WriteZero`.
pub fn write_some(cx: &mut Context<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match cx.io().write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_listed_in_order_and_names_are_checked() {
        let mut registry = Registry::builtin();
        let names: Vec<_> = registry.names().collect();
        assert_eq!(
            names,
            ["echo", "discard", "chargen", "daytime", "time", "exec", "relay", "tftp", "metrics"]
        );
        let taken = registry.register("echo", |_| Ok(Echo::new())).unwrap_err();
        assert_eq!(taken, RegisterError::Taken("echo".into()));
        let bad = registry.register("Echo2", |_| Ok(Echo::new())).unwrap_err();
        assert!(matches!(bad, RegisterError::BadName(_)));
        registry.register("echo2", |_| Ok(Echo::new())).unwrap();
        assert_eq!(registry.names().last(), Some("echo2"));
        assert!(
            !registry.names().any(|n| n.starts_with("test-")),
            "test-only services are not listed"
        );
    }
}
