//! Readiness backends behind one small trait, so the worker loop does not care which.
//!
//! Runs in workers. Interest is *registered* per descriptor and kept until changed, the way
//! epoll works; `select(2)` rebuilds its sets from that table on every wait. Adding an epoll
//! or poll backend means one more implementation of [`Poller`], nothing else.

mod select;

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub use select::SelectPoller;

/// What a descriptor is watched for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Readable (or end-of-file, or an incoming connection on a listener).
    pub read: bool,
    /// Writable.
    pub write: bool,
}

impl Interest {
    /// Not watched at all.
    pub const NONE: Interest = Interest { read: false, write: false };
    /// Readable only.
    pub const READ: Interest = Interest { read: true, write: false };

    /// Whether anything is watched.
    pub fn is_none(self) -> bool {
        !self.read && !self.write
    }
}

/// One ready descriptor, as returned by [`Poller::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The descriptor.
    pub fd: RawFd,
    /// Ready to read (select(2) also reports errors and end-of-file this way).
    pub readable: bool,
    /// Ready to write.
    pub writable: bool,
}

/// A readiness backend.
pub trait Poller {
    /// Watches `fd` for `interest`, replacing what was registered; [`Interest::NONE`] stops
    /// watching it. The caller keeps `fd` open until it sets [`Interest::NONE`] for it.
    ///
    /// # Errors
    /// The backend cannot watch this descriptor (for select: `fd >= FD_SETSIZE`).
    fn set(&mut self, fd: RawFd, interest: Interest) -> io::Result<()>;

    /// Waits until a watched descriptor is ready or `timeout` passes (`None`: no timeout),
    /// replacing `events` with the ready descriptors. A signal interrupting the wait returns
    /// `Ok` with no events.
    ///
    /// # Errors
    /// The underlying system call failed for another reason than `EINTR`.
    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()>;
}
