//! Pipes for the relay's `splice(2)` pumps, from a small per-worker pool.
//!
//! Runs in workers. With `splice = true` a pump moves bytes socket -> pipe -> socket with
//! splice(2) (`SPLICE_F_MOVE | SPLICE_F_NONBLOCK`), so they never cross into user space; the
//! pipe is the pump's bounded buffer (pipe(7): its capacity, set with `F_SETPIPE_SZ`). This
//! module makes, lends and takes back those pipes; the pump itself is in `pump.rs`.
//!
//! Invariants:
//! - a pump holds a pipe only while bytes are in it (or during one callback): a drained pipe
//!   comes back with [`give`], so an idle connection holds no pipe and the descriptors pipes
//!   take grow with the bytes in flight, not with the connections open (as HAProxy's pipe
//!   pool, `src/pipe.c`, does);
//! - at most [`MAX_POOLED`] idle pipes are kept per worker; more are closed;
//! - a pipe that still holds bytes is never pooled: it is closed, bytes and all (a reset);
//! - pipes are never watched by the poller (only the two sockets are), so they do not count
//!   against `max_connections_per_worker`;
//! - when no pipe can be made (EMFILE, ENFILE, ENOMEM ...), [`take`] returns `None` without
//!   trying again for [`RETRY_AFTER`], the pump relays through its 16 KiB buffer meanwhile,
//!   and the reason is logged at most once per [`RETRY_AFTER`] (with how many were held back).
//!
//! Workers are single-threaded: the pool is thread-local and needs no lock.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};

use crate::rate::RateLimit;

/// The capacity asked of each pipe (`F_SETPIPE_SZ`), in bytes: Linux's default pipe size.
/// The kernel may round it up to a power of two pages, or leave a pipe smaller when the
/// user's pipe allowance is spent (pipe(7), `pipe-user-pages-soft`): the pipe's own size is
/// then used.
pub const PIPE_SIZE: usize = 64 * 1024;

/// Idle pipes kept per worker at most (2 descriptors each).
pub const MAX_POOLED: usize = 16;

/// After a pipe could not be made, how long pumps relay through buffers without trying again,
/// and how often the reason is logged at most.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A pipe and its capacity in bytes.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A non-blocking, close-on-exec pipe of about [`PIPE_SIZE`] bytes.
    ///
    /// # Errors
    /// pipe2(2) failed (EMFILE, ENFILE ...).
    pub(super) fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let size = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        // Best effort: a pipe keeps the size it has when this is refused (EPERM over the
        // user's pipe allowance); F_GETPIPE_SZ tells which.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_err(io::Error::from)?;
        let capacity = usize::try_from(capacity).unwrap_or(0).max(1);
        Ok(Pipe { read, write, capacity })
    }

    /// The pipe whose ends are `read` and `write`, passed from another worker with a relayed
    /// connection (non-blocking already: the flag belongs to the pipe, not the descriptor).
    ///
    /// # Errors
    /// They are not a pipe (`F_GETPIPE_SZ` fails).
    pub(super) fn adopt(read: OwnedFd, write: OwnedFd) -> io::Result<Pipe> {
        let capacity = fcntl(&write, FcntlArg::F_GETPIPE_SZ).map_err(io::Error::from)?;
        let capacity = usize::try_from(capacity).unwrap_or(0).max(1);
        Ok(Pipe { read, write, capacity })
    }

    /// The bytes the pipe holds at most (what the pump counts against; the kernel may take
    /// fewer when the bytes come in many small pieces, and then says `EAGAIN`).
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The end bytes are spliced into.
    pub(super) fn input(&self) -> BorrowedFd<'_> {
        self.write.as_fd()
    }

    /// The end bytes are spliced out of.
    pub(super) fn output(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

/// Moves at most `len` (> 0) bytes from `from` to `to`, one of which is a pipe, without
/// blocking (splice(2) with `SPLICE_F_MOVE | SPLICE_F_NONBLOCK`; the sockets are
/// non-blocking themselves). `Ok(0)` from a socket is its end of file.
///
/// SIGPIPE is ignored in the daemon (Rust's runtime does so before `main`, and workers
/// inherit it), so a sink whose peer is gone fails with `EPIPE` like a write.
///
/// # Errors
/// `WouldBlock` when the source has nothing or the sink (or the pipe) no room; otherwise the
/// socket's error (`ECONNRESET`, `EPIPE` ...).
pub(super) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    nix::fcntl::splice(from, None, to, None, len, flags).map_err(io::Error::from)
}

/// The idle pipes of one worker, and what happened when the last one could not be made.
#[derive(Debug)]
struct Pool {
    idle: Vec<Pipe>,
    /// No new pipe is tried before this instant.
    retry_at: Option<Instant>,
    log: RateLimit,
}

impl Pool {
    const fn new() -> Pool {
        Pool { idle: Vec::new(), retry_at: None, log: RateLimit::new(RETRY_AFTER) }
    }

    /// An idle pipe, or one from `make`; `None` while making them fails (see the module doc).
    fn take(&mut self, now: Instant, make: impl FnOnce() -> io::Result<Pipe>) -> Option<Pipe> {
        if let Some(pipe) = self.idle.pop() {
            return Some(pipe);
        }
        if self.retry_at.is_some_and(|at| now < at) {
            return None;
        }
        match make() {
            Ok(pipe) => {
                self.retry_at = None;
                Some(pipe)
            }
            Err(error) => {
                self.retry_at = Some(now + RETRY_AFTER);
                if let Some(held_back) = self.log.allow(now) {
                    log::warn!(
                        "relay: could not make a pipe for splice(2): {error}; relaying through \
                         buffers for {} ({held_back} more such failures since the last report)",
                        humantime::format_duration(RETRY_AFTER)
                    );
                }
                None
            }
        }
    }

    /// Takes a drained pipe back: kept if there is room, else closed.
    fn give(&mut self, pipe: Pipe) {
        if self.idle.len() < MAX_POOLED {
            self.idle.push(pipe);
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool::new()) };
}

/// A pipe for a pump that is about to splice, or `None` while pipes cannot be made (then
/// relay through a buffer; see the module doc).
pub(super) fn take(now: Instant) -> Option<Pipe> {
    POOL.with(|pool| pool.borrow_mut().take(now, Pipe::new))
}

/// Takes back a pipe from [`take`] that holds no bytes.
pub(super) fn give(pipe: Pipe) {
    POOL.with(|pool| pool.borrow_mut().give(pipe));
}

/// Idle pipes in this thread's pool.
#[cfg(test)]
pub(super) fn pooled() -> usize {
    POOL.with(|pool| pool.borrow().idle.len())
}

/// Empties this thread's pool and makes its next attempt at `now` fail with EMFILE, as when
/// the worker is out of descriptors.
#[cfg(test)]
pub(super) fn exhaust(now: Instant) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.idle.clear();
        let _ = pool.take(now, || Err(io::Error::from_raw_os_error(nix::libc::EMFILE)));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Result<Pipe> {
        Err(io::Error::from_raw_os_error(nix::libc::EMFILE))
    }

    #[test]
    fn a_failure_is_not_retried_before_retry_after_then_is() {
        let mut pool = Pool::new();
        let start = Instant::now();
        assert!(pool.take(start, emfile).is_none());
        let mut tried = false;
        let again = pool.take(start + RETRY_AFTER / 2, || {
            tried = true;
            Pipe::new()
        });
        assert!(again.is_none() && !tried, "no pipe2(2) within RETRY_AFTER of a failure");
        let pipe = pool.take(start + RETRY_AFTER, Pipe::new).expect("tried again after RETRY_AFTER");
        assert!(pipe.capacity() >= 4096);
        assert!(pool.retry_at.is_none(), "a success clears the back-off");
    }

    #[test]
    fn drained_pipes_are_reused_and_the_pool_is_bounded() {
        let mut pool = Pool::new();
        let now = Instant::now();
        let pipe = pool.take(now, Pipe::new).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&pipe.input());
        pool.give(pipe);
        let again = pool.take(now, emfile).expect("the pooled pipe, not a new one");
        assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&again.input()), fd);
        for _ in 0..MAX_POOLED + 3 {
            pool.give(Pipe::new().unwrap());
        }
        assert_eq!(pool.idle.len(), MAX_POOLED, "the rest were closed");
    }

    #[test]
    fn a_pipe_has_the_size_asked_for() {
        // Root, or an unprivileged user within the default allowance: 64 KiB is granted.
        assert_eq!(Pipe::new().unwrap().capacity(), PIPE_SIZE);
    }
}
