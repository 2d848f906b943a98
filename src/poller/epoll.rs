//! The epoll(7) backend: interest lives in the kernel, a wait costs in proportion to the
//! ready descriptors only. Listening sockets are added with `EPOLLEXCLUSIVE`, so a new
//! connection wakes one idle worker rather than all of them (no thundering herd).

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::{Event, Interest, Poller, timeout_millis};

/// Events fetched per wait at most; more stay ready for the next one.
const EVENTS_PER_WAIT: usize = 512;

/// An epoll poller.
#[derive(Debug)]
pub struct EpollPoller {
    epoll: Epoll,
    /// What each descriptor is registered for (`Interest::NONE`: not registered).
    registered: Vec<Interest>,
    ready: Vec<EpollEvent>,
}

impl EpollPoller {
    /// A new epoll instance (close-on-exec).
    ///
    /// # Errors
    /// epoll_create1(2) failed.
    pub fn new() -> io::Result<Self> {
        Ok(EpollPoller {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            registered: Vec::new(),
            ready: vec![EpollEvent::empty(); EVENTS_PER_WAIT],
        })
    }
}

fn flags_of(interest: Interest) -> EpollFlags {
    let mut flags = EpollFlags::empty();
    if interest.read {
        flags |= EpollFlags::EPOLLIN;
    }
    if interest.write {
        flags |= EpollFlags::EPOLLOUT;
    }
    if interest.exclusive {
        flags |= EpollFlags::EPOLLEXCLUSIVE;
    }
    flags
}

impl Poller for EpollPoller {
    fn set(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let slot = usize::try_from(fd).map_err(|_| io::Error::from(Errno::EBADF))?;
        if slot >= self.registered.len() {
            if interest.is_none() {
                return Ok(());
            }
            self.registered.resize(slot + 1, Interest::NONE);
        }
        let old = self.registered[slot];
        if old == interest {
            return Ok(());
        }
        // SAFETY: `Poller::set`'s contract: the descriptor is open while registered, and the
        // caller unregisters it before closing it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let event = EpollEvent::new(flags_of(interest), slot as u64);
        if old.is_none() {
            self.epoll.add(borrowed, event)?;
        } else if interest.is_none() {
            self.epoll.delete(borrowed)?;
        } else if old.exclusive || interest.exclusive {
            // EPOLLEXCLUSIVE cannot be modified in place.
            self.epoll.delete(borrowed)?;
            self.epoll.add(borrowed, event)?;
        } else {
            let mut event = event;
            self.epoll.modify(borrowed, &mut event)?;
        }
        self.registered[slot] = interest;
        Ok(())
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()> {
        events.clear();
        let millis = EpollTimeout::try_from(timeout_millis(timeout)).unwrap_or(EpollTimeout::NONE);
        let count = match self.epoll.wait(&mut self.ready, millis) {
            Ok(count) => count,
            Err(Errno::EINTR) => return Ok(()),
            Err(errno) => return Err(errno.into()),
        };
        for event in &self.ready[..count] {
            let flags = event.events();
            let trouble = flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP);
            let fd = event.data() as RawFd;
            let interest = self.registered.get(fd as usize).copied().unwrap_or(Interest::NONE);
            let readable = interest.read && (flags.contains(EpollFlags::EPOLLIN) || trouble);
            let writable = interest.write && (flags.contains(EpollFlags::EPOLLOUT) || trouble);
            if readable || writable {
                events.push(Event { fd, readable, writable });
            }
        }
        Ok(())
    }
}
