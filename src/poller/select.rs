//! The `select(2)` backend (`nix::sys::select`), the classic design and the default.
//!
//! select can only watch descriptors below `FD_SETSIZE` (1024); [`SelectPoller::set`] refuses
//! larger ones (nix would panic), and the configuration check keeps a worker's budget below it.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::select::{FdSet, select};
use nix::sys::time::TimeVal;

use super::{Event, FD_SETSIZE, Interest, Poller};

/// Longest single wait; a longer timeout simply loops (and keeps `TimeVal` in range).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A `select(2)` poller. Interest is kept in a table indexed by descriptor.
#[derive(Debug, Default)]
pub struct SelectPoller {
    interest: Vec<Interest>,
}

impl SelectPoller {
    /// An empty poller.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Poller for SelectPoller {
    fn can_watch(&self, fd: RawFd) -> bool {
        usize::try_from(fd).is_ok_and(|index| index < FD_SETSIZE)
    }

    fn set(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let index = usize::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc_ebadf()))?;
        if index >= FD_SETSIZE {
            if interest.is_none() {
                return Ok(());
            }
            return Err(io::Error::other(format!(
                "descriptor {fd} is over select()'s FD_SETSIZE of {FD_SETSIZE}"
            )));
        }
        if index >= self.interest.len() {
            if interest.is_none() {
                return Ok(());
            }
            self.interest.resize(index + 1, Interest::NONE);
        }
        self.interest[index] = interest;
        while self.interest.last().is_some_and(|i| i.is_none()) {
            self.interest.pop();
        }
        Ok(())
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()> {
        events.clear();
        let mut readable = FdSet::new();
        let mut writable = FdSet::new();
        for (fd, interest) in self.interest.iter().enumerate() {
            // SAFETY: `Poller::set`'s contract: a registered descriptor stays open until it is
            // set to `Interest::NONE`, and `fd < FD_SETSIZE` was checked when it was set.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd as RawFd) };
            if interest.read {
                readable.insert(borrowed);
            }
            if interest.write {
                writable.insert(borrowed);
            }
        }
        let mut timeval = timeout.map(|t| {
            let t = t.min(MAX_WAIT);
            TimeVal::new(t.as_secs() as _, t.subsec_micros() as _)
        });
        let nfds = self.interest.len() as i32;
        match select(nfds, &mut readable, &mut writable, None, timeval.as_mut()) {
            Ok(0) | Err(Errno::EINTR) => return Ok(()),
            Ok(_) => {}
            Err(errno) => return Err(errno.into()),
        }
        for (fd, interest) in self.interest.iter().enumerate() {
            // SAFETY: as above; the descriptor is open and below FD_SETSIZE.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd as RawFd) };
            let is_readable = interest.read && readable.contains(borrowed);
            let is_writable = interest.write && writable.contains(borrowed);
            if is_readable || is_writable {
                events.push(Event {
                    fd: fd as RawFd,
                    readable: is_readable,
                    writable: is_writable,
                });
            }
        }
        Ok(())
    }
}

fn libc_ebadf() -> i32 {
    Errno::EBADF as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_descriptors_over_fd_setsize() {
        let mut poller = SelectPoller::new();
        assert!(poller.set(FD_SETSIZE as RawFd, Interest::READ).is_err());
        assert!(poller.set(FD_SETSIZE as RawFd, Interest::NONE).is_ok());
    }
}
