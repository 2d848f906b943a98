//! The descriptors sessions watch besides their client sockets (a relay's backend socket, an
//! exec child's pidfd and stderr pipe): whose each is, and how many there are.
//!
//! Runs in workers. Invariants:
//! - every descriptor a session watches has its owner, `(client descriptor, serial)`, here,
//!   and is in its connection's list with the interest the session asked for;
//! - each counts against the worker's budget (`max_connections_per_worker`) until unwatched;
//! - each is unwatched (unregistered from the poller) before it closes;
//! - while its connection is offered for hand-off, each is unregistered from the poller (its
//!   interest kept in the list) and registered again if the connection stays.

use std::os::fd::RawFd;

use crate::poller::{Interest, Poller};
use crate::services::{self, Extras};

/// A connection's extra descriptors, with what the session watches each for.
pub type Watched = Vec<(RawFd, Interest)>;

/// Who owns each extra descriptor, and how many there are.
#[derive(Debug, Default)]
pub struct ExtraFds {
    /// The connection owning each extra descriptor, by descriptor number: (client
    /// descriptor, connection serial).
    owners: Vec<Option<(usize, u64)>>,
    /// Extra descriptors watched by all sessions.
    in_use: usize,
}

impl ExtraFds {
    /// Extra descriptors watched by all sessions (they count against the budget).
    #[inline]
    pub fn len(&self) -> usize {
        self.in_use
    }

    /// The connection owning `fd`, if a session watches it: (client descriptor, serial).
    pub fn owner(&self, fd: RawFd) -> Option<(usize, u64)> {
        usize::try_from(fd).ok().and_then(|fd| self.owners.get(fd)).copied().flatten()
    }

    /// What a session's [`services::Context`] needs to watch descriptors for the connection
    /// `owner`, whose list is `watched`, with `room` descriptors left in the budget.
    pub fn lend<'a>(
        &'a mut self,
        poller: &'a mut dyn Poller,
        watched: &'a mut Watched,
        room: usize,
        owner: (usize, u64),
    ) -> Extras<'a> {
        Extras { poller, owners: &mut self.owners, watched, in_use: &mut self.in_use, room, owner }
    }

    /// Stops watching every descriptor in `watched` (before they are closed).
    pub fn unwatch_all(&mut self, poller: &mut dyn Poller, watched: &mut Watched) {
        while let Some(&(extra, _)) = watched.last() {
            services::unwatch(poller, &mut self.owners, watched, &mut self.in_use, extra);
        }
    }
}

/// Unregisters every descriptor of `watched` from the poller, keeping them owned and counted
/// (an offered connection: nobody serves it until the answer).
pub fn suspend(poller: &mut dyn Poller, watched: &Watched) {
    for &(fd, _) in watched {
        let _ = poller.set(fd, Interest::NONE);
    }
}

/// Registers every descriptor of `watched` again, for what the session asked.
pub fn restore(poller: &mut dyn Poller, watched: &Watched) {
    for &(fd, interest) in watched {
        // Cannot fail: each was registered this way before.
        let _ = poller.set(fd, interest);
    }
}
