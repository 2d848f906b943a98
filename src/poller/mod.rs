//! Readiness backends behind one small trait, so the worker loop does not care which:
//! `select(2)` (the default), `poll(2)` and `epoll(7)`, named by [`EventBackend`]
//! (`daemon.event_backend`).
//!
//! Runs in workers. Interest is *registered* per descriptor and kept until changed, the way
//! epoll works; select and poll rebuild their sets from that table on every wait. Another
//! backend is one more implementation of [`Poller`] and one more [`EventBackend`].

mod epoll;
mod poll;
mod select;

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub use epoll::EpollPoller;
pub use poll::PollPoller;
pub use select::SelectPoller;

/// `select(2)` can only watch descriptors below this number (`FD_SETSIZE` in glibc).
pub const FD_SETSIZE: usize = 1024;

/// The readiness system call workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventBackend {
    /// select(2): the classic; descriptors must stay below [`FD_SETSIZE`].
    Select,
    /// poll(2): no descriptor limit; cost grows with the number of connections.
    Poll,
    /// epoll(7): cost grows with activity only; listeners use `EPOLLEXCLUSIVE`, so one
    /// incoming connection wakes one worker.
    Epoll,
}

impl EventBackend {
    /// Every backend, the default first.
    pub const ALL: [EventBackend; 3] =
        [EventBackend::Select, EventBackend::Poll, EventBackend::Epoll];

    /// The configuration spelling.
    pub fn name(self) -> &'static str {
        match self {
            EventBackend::Select => "select",
            EventBackend::Poll => "poll",
            EventBackend::Epoll => "epoll",
        }
    }
}

/// A poller of the configured kind.
///
/// # Errors
/// epoll_create1(2) failed.
pub fn create(backend: EventBackend) -> io::Result<Box<dyn Poller>> {
    Ok(match backend {
        EventBackend::Select => Box::new(SelectPoller::new()),
        EventBackend::Poll => Box::new(PollPoller::new()),
        EventBackend::Epoll => Box::new(EpollPoller::new()?),
    })
}

/// Milliseconds for poll(2)/epoll_wait(2), rounded up so a wait never ends just before its
/// deadline (which would spin through the last partial millisecond); -1 is no timeout.
pub(crate) fn timeout_millis(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    }
}

/// What a descriptor is watched for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Readable (or end-of-file, or an incoming connection on a listener).
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// A listening socket shared with other workers: with epoll, wake only one of them
    /// (`EPOLLEXCLUSIVE`); select and poll cannot, and ignore it.
    pub exclusive: bool,
}

impl Interest {
    /// Not watched at all.
    pub const NONE: Interest = Interest { read: false, write: false, exclusive: false };
    /// Readable only.
    pub const READ: Interest = Interest { read: true, write: false, exclusive: false };
    /// Writable only.
    pub const WRITE: Interest = Interest { read: false, write: true, exclusive: false };
    /// Readable or writable.
    pub const BOTH: Interest = Interest { read: true, write: true, exclusive: false };
    /// A shared listening socket.
    pub const ACCEPT: Interest = Interest { read: true, write: false, exclusive: true };

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

    /// Whether [`Poller::set`] can ever watch `fd` (for select: `fd < FD_SETSIZE`), so that
    /// a descriptor can be checked when it is accepted and registered only once something
    /// is wanted of it. Default: every descriptor.
    fn can_watch(&self, fd: RawFd) -> bool {
        fd >= 0
    }

    /// Waits until a watched descriptor is ready or `timeout` passes (`None`: no timeout),
    /// replacing `events` with the ready descriptors. A signal interrupting the wait returns
    /// `Ok` with no events.
    ///
    /// # Errors
    /// The underlying system call failed for another reason than `EINTR`.
    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn readable(fd: RawFd) -> Event {
        Event { fd, readable: true, writable: false }
    }

    /// The same behaviour from every backend.
    #[test]
    fn every_backend_reports_readiness_and_forgets_unwatched_descriptors() {
        for backend in [EventBackend::Select, EventBackend::Poll, EventBackend::Epoll] {
            let mut poller = create(backend).unwrap();
            let (mut a, b) = UnixStream::pair().unwrap();
            let (mut c, d) = UnixStream::pair().unwrap();
            let mut events = Vec::new();
            poller.set(b.as_raw_fd(), Interest::READ).unwrap();
            poller.set(d.as_raw_fd(), Interest::ACCEPT).unwrap();
            poller.wait(Some(Duration::ZERO), &mut events).unwrap();
            assert!(events.is_empty(), "{backend:?}");
            a.write_all(b"x").unwrap();
            c.write_all(b"y").unwrap();
            poller.wait(Some(Duration::from_secs(5)), &mut events).unwrap();
            events.sort_by_key(|e| e.fd);
            // Sorted by descriptor too: tests running beside this one take descriptors as
            // well, so b's is not always below d's.
            let mut expected = vec![readable(b.as_raw_fd()), readable(d.as_raw_fd())];
            expected.sort_by_key(|e| e.fd);
            assert_eq!(events, expected, "{backend:?}");
            let write_only = Interest { read: false, write: true, exclusive: false };
            poller.set(b.as_raw_fd(), write_only).unwrap();
            poller.set(d.as_raw_fd(), Interest::NONE).unwrap();
            poller.wait(Some(Duration::from_secs(5)), &mut events).unwrap();
            assert_eq!(
                events,
                vec![Event { fd: b.as_raw_fd(), readable: false, writable: true }],
                "{backend:?}"
            );
            poller.set(b.as_raw_fd(), Interest::NONE).unwrap();
            poller.wait(Some(Duration::ZERO), &mut events).unwrap();
            assert!(events.is_empty(), "{backend:?}");
            // Watching again after forgetting works (re-registration).
            poller.set(d.as_raw_fd(), Interest::READ).unwrap();
            poller.wait(Some(Duration::from_secs(5)), &mut events).unwrap();
            assert_eq!(events, vec![readable(d.as_raw_fd())], "{backend:?}");
        }
    }

    #[test]
    fn poll_and_epoll_watch_descriptors_beyond_fd_setsize() {
        for backend in [EventBackend::Poll, EventBackend::Epoll] {
            let mut poller = create(backend).unwrap();
            let (mut a, b) = UnixStream::pair().unwrap();
            let high = nix::fcntl::fcntl(&b, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(2000));
            let Ok(high) = high else { return }; // RLIMIT_NOFILE too low to try
            poller.set(high, Interest::READ).unwrap();
            a.write_all(b"x").unwrap();
            let mut events = Vec::new();
            poller.wait(Some(Duration::from_secs(5)), &mut events).unwrap();
            assert_eq!(events, vec![readable(high)], "{backend:?}");
            poller.set(high, Interest::NONE).unwrap();
            nix::unistd::close(high).unwrap();
        }
    }
}
