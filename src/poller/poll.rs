//! The poll(2) backend: no descriptor limit; each wait passes every watched descriptor.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use nix::libc;

use super::{Event, Interest, Poller, timeout_millis};

/// A poll(2) poller: a dense array of `pollfd` and an index by descriptor.
#[derive(Debug, Default)]
pub struct PollPoller {
    fds: Vec<libc::pollfd>,
    /// Position of each descriptor in `fds`, `usize::MAX` when not watched.
    index: Vec<usize>,
}

impl PollPoller {
    /// An empty poller.
    pub fn new() -> Self {
        Self::default()
    }
}

fn events_of(interest: Interest) -> libc::c_short {
    let mut events = 0;
    if interest.read {
        events |= libc::POLLIN;
    }
    if interest.write {
        events |= libc::POLLOUT;
    }
    events
}

impl Poller for PollPoller {
    fn set(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let slot = usize::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        if slot >= self.index.len() {
            if interest.is_none() {
                return Ok(());
            }
            self.index.resize(slot + 1, usize::MAX);
        }
        let position = self.index[slot];
        match (position == usize::MAX, interest.is_none()) {
            (true, true) => {}
            (true, false) => {
                self.index[slot] = self.fds.len();
                self.fds.push(libc::pollfd { fd, events: events_of(interest), revents: 0 });
            }
            (false, false) => self.fds[position].events = events_of(interest),
            (false, true) => {
                self.fds.swap_remove(position);
                self.index[slot] = usize::MAX;
                if let Some(moved) = self.fds.get(position) {
                    self.index[moved.fd as usize] = position;
                }
            }
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()> {
        events.clear();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures, owned by us for
        // the duration of the call; the kernel only writes their `revents`.
        let ready = unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                timeout_millis(timeout),
            )
        };
        if ready < 0 {
            let error = io::Error::last_os_error();
            return if error.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(error) };
        }
        for entry in self.fds.iter().filter(|e| e.revents != 0) {
            // Errors and hang-ups are reported as readiness: the next read or write says what.
            let trouble = entry.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
            let readable =
                entry.events & libc::POLLIN != 0 && (entry.revents & libc::POLLIN != 0 || trouble);
            let writable = entry.events & libc::POLLOUT != 0
                && (entry.revents & libc::POLLOUT != 0 || trouble);
            if readable || writable {
                events.push(Event { fd: entry.fd, readable, writable });
            }
        }
        Ok(())
    }
}
