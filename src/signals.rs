//! Signal handling that only records: each handler sets an atomic flag and writes one byte to
//! a self-pipe (both done by signal-hook). The process's loop waits on the pipe's read end,
//! then [`Signals::drain`] swaps the flags and returns the signals seen. Nothing else runs in
//! handler context: no logging, allocation, locking or `waitpid`.
//!
//! Used by both processes: the master installs its set before forking; a new worker
//! [`Signals::uninstall`]s the master's actions and installs its own. Signals are blocked
//! around `fork(2)` ([`block`]/[`unblock`]) so none is lost or handled by the wrong actions.

use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use signal_hook::SigId;

/// The signals the master handles; workers handle a subset. [`Signals::drain`] reports them
/// in this order, so a stop is seen before the exits it causes (a terminal's QUIT or INT
/// reaches the workers too).
pub const MASTER_SIGNALS: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    // WINCH before HUP: "stop the workers, then start them again" must keep that order.
    Signal::SIGWINCH,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGCHLD,
];

/// Recorded signals of one process, and the self-pipe that wakes its loop.
#[derive(Debug)]
pub struct Signals {
    wake: UnixStream,
    flags: Vec<(Signal, Arc<AtomicBool>)>,
    ids: Vec<SigId>,
}

impl Signals {
    /// Installs recording handlers for `signals`.
    ///
    /// # Errors
    /// The self-pipe cannot be created, or a handler cannot be installed (sigaction(2)).
    pub fn install(signals: &[Signal]) -> io::Result<Self> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let mut this = Signals { wake, flags: Vec::new(), ids: Vec::new() };
        for &signal in signals {
            let flag = Arc::new(AtomicBool::new(false));
            // Order matters: signal-hook runs actions in registration order, so the flag is
            // set before the byte that wakes the loop is written.
            this.ids.push(signal_hook::flag::register(signal as i32, Arc::clone(&flag))?);
            this.ids
                .push(signal_hook::low_level::pipe::register(signal as i32, notify.try_clone()?)?);
            this.flags.push((signal, flag));
        }
        Ok(this)
    }

    /// The descriptor to wait on for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The raw descriptor to wait on, for pollers keyed by descriptor number.
    pub fn raw_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Empties the self-pipe and returns every signal recorded since the last call, each once,
    /// in the order they were installed.
    pub fn drain(&mut self) -> Vec<Signal> {
        let mut sink = [0u8; 64];
        loop {
            match self.wake.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.flags
            .iter()
            .filter(|(_, flag)| flag.swap(false, Ordering::SeqCst))
            .map(|(signal, _)| *signal)
            .collect()
    }

    /// Removes this set's actions (closing the pipe's write ends). The process keeps
    /// signal-hook's handler, which then does nothing for these signals: they are ignored
    /// until another set installs actions for them. A new worker calls this on the set it
    /// inherited from the master.
    pub fn uninstall(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

fn mask(how: SigmaskHow, signals: &[Signal]) -> io::Result<()> {
    let set: SigSet = signals.iter().copied().collect();
    sigprocmask(how, Some(&set), None).map_err(io::Error::from)
}

/// Blocks `signals` in this thread (the master's only thread), e.g. around `fork(2)`.
///
/// # Errors
/// sigprocmask(2) failed.
pub fn block(signals: &[Signal]) -> io::Result<()> {
    mask(SigmaskHow::SIG_BLOCK, signals)
}

/// Unblocks `signals`; pending ones are delivered to the actions installed now.
///
/// # Errors
/// sigprocmask(2) failed.
pub fn unblock(signals: &[Signal]) -> io::Result<()> {
    mask(SigmaskHow::SIG_UNBLOCK, signals)
}
