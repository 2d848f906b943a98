//! Built-in services behind the [`Session`] trait.
//!
//! Runs in workers. The readiness loop owns the socket and the policy (idle timeouts, limits,
//! shutdown); a session only moves bytes and says when an *exchange* has completed, so that a
//! new service plugs in without touching the loop. One file per service.

mod echo;
mod hang;
pub mod pool;

use std::fmt;
use std::io;
use std::str::FromStr;

pub use echo::Echo;

/// The byte stream a session reads and writes: a non-blocking socket in the daemon, any
/// `Read + Write` in tests. Reads and writes return `WouldBlock` when they would block.
pub trait Transport: io::Read + io::Write {}

impl<T: io::Read + io::Write> Transport for T {}

/// What one I/O callback did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes read from the client.
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

/// The per-connection state of a service.
///
/// An *exchange* is one request answered: for echo, everything received so far has been
/// written back. The first completed exchange turns a short connection into a long one.
/// Callbacks must not block: they read and write until `WouldBlock`, or stop earlier to be
/// fair to other connections (the loop calls again while the socket stays ready).
pub trait Session {
    /// The loop should call [`Session::on_readable`] when the socket is readable.
    fn wants_read(&self) -> bool;
    /// The loop should call [`Session::on_writable`] when the socket is writable.
    fn wants_write(&self) -> bool;
    /// The socket is readable (or has an error or end-of-file pending).
    ///
    /// # Errors
    /// An I/O error other than `WouldBlock`/`Interrupted`; the loop then closes the connection.
    fn on_readable(&mut self, io: &mut dyn Transport) -> io::Result<Progress>;
    /// The socket is writable.
    ///
    /// # Errors
    /// As for [`Session::on_readable`].
    fn on_writable(&mut self, io: &mut dyn Transport) -> io::Result<Progress>;
    /// No exchange is in flight: every request received has been answered. The loop also
    /// checks that the socket holds no unread input before it closes an at-rest connection
    /// (keep-alive limit, graceful stop), so nothing the client sent is dropped.
    fn is_at_rest(&self) -> bool;
    /// The session is over (the client closed its side and every answer was written): the
    /// loop closes the connection as `client-close`.
    fn is_done(&self) -> bool;
}

/// The built-in services, by their `service = "..."` name in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceKind {
    /// `echo`: RFC 862, everything received is sent back.
    Echo,
    /// `test-hang`: for tests of hung-worker detection only. Its first read never returns,
    /// wedging the worker. Accepted by the configuration only when the environment variable
    /// [`TEST_SERVICES_ENV`] is set; never listed.
    TestHang,
}

/// Environment variable that enables test-only services (`test-hang`) in the configuration.
pub const TEST_SERVICES_ENV: &str = "PREFORKD_TEST_SERVICES";

impl ServiceKind {
    /// Every service name the configuration accepts.
    pub const NAMES: &'static [&'static str] = &["echo"];

    /// The configuration name of this service.
    pub fn name(self) -> &'static str {
        match self {
            ServiceKind::Echo => "echo",
            ServiceKind::TestHang => "test-hang",
        }
    }

    /// A fresh session for a newly accepted connection.
    pub fn new_session(self) -> Box<dyn Session> {
        match self {
            ServiceKind::Echo => Box::new(Echo::new()),
            ServiceKind::TestHang => Box::new(hang::Hang),
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The name is not one of [`ServiceKind::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown service {0:?}")]
pub struct UnknownService(pub String);

impl FromStr for ServiceKind {
    type Err = UnknownService;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "echo" => Ok(ServiceKind::Echo),
            "test-hang" if std::env::var_os(TEST_SERVICES_ENV).is_some() => {
                Ok(ServiceKind::TestHang)
            }
            other => Err(UnknownService(other.to_owned())),
        }
    }
}
