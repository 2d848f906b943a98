//! The log relay: how workers' lines reach a log file that only the master can open.
//!
//! Runs in both processes. With `target = "file"` the master opens the file (as root, no
//! symlink followed) and creates one pipe before forking; a worker closes the file and the
//! pipe's read end right after `fork(2)` and writes each line to the pipe's write end, and
//! the master copies whole lines from the pipe to the file. Workers therefore never own, open
//! or hold the file: a compromised worker can add lines, but cannot truncate or rewrite the
//! log, and a reopen (SIGUSR1) happens in the master alone.
//!
//! Invariants:
//! - a worker's line is written with one write(2) of at most `PIPE_BUF` bytes (longer lines
//!   are cut), so lines of several workers never interleave in the pipe;
//! - the worker's end is non-blocking: when the pipe is full (the master cannot keep up, or
//!   the disk is full) the line is dropped and counted, the worker never stalls;
//! - the master writes only complete lines to the file, so its own lines never land in the
//!   middle of a relayed one;
//! - every line that cannot be written anywhere is counted in one shared counter
//!   ([`dropped`]), which the master reports.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;

/// Pipe capacity asked for (the kernel default is 64 KiB): about 5,000 access lines, so a
/// burst of workers' lines waits while the master is busy instead of being dropped.
pub const RELAY_PIPE_BYTES: i32 = 1 << 20;

/// Most bytes the master moves from the pipe per call of [`Relay::drain`], so a flood of
/// workers' lines cannot hold the master away from its signals.
const DRAIN_BUDGET: usize = 4 << 20;

/// The pipe between workers and the master.
#[derive(Debug)]
pub(super) struct Relay {
    read: OwnedFd,
    write: OwnedFd,
    /// The start of a line whose end has not arrived yet (it cannot: workers write whole
    /// lines; a cut line is completed by the master).
    carry: Vec<u8>,
}

impl Relay {
    /// Creates the pipe: close-on-exec and non-blocking at both ends.
    pub(super) fn new() -> io::Result<Relay> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // Best effort: an unprivileged master may be held to /proc/sys/fs/pipe-max-size.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(RELAY_PIPE_BYTES));
        Ok(Relay { read, write, carry: Vec::new() })
    }

    /// The end the master polls.
    pub(super) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// For a worker: keeps the write end, closes the read end.
    pub(super) fn into_writer(self) -> OwnedFd {
        self.write
    }

    /// Moves the complete lines waiting in the pipe to `out`, one call per batch; returns
    /// whether anything was read.
    pub(super) fn drain(&mut self, mut out: impl FnMut(&[u8])) -> bool {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut moved = 0;
        while moved < DRAIN_BUDGET {
            let n = match nix::unistd::read(&self.read, &mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                // EAGAIN: empty. Anything else cannot happen on a pipe we own.
                Err(_) => break,
            };
            moved += n;
            let chunk = &buffer[..n];
            match chunk.iter().rposition(|&b| b == b'\n') {
                Some(end) => {
                    if self.carry.is_empty() {
                        out(&chunk[..=end]);
                    } else {
                        self.carry.extend_from_slice(&chunk[..=end]);
                        out(&std::mem::take(&mut self.carry));
                    }
                    self.carry.extend_from_slice(&chunk[end + 1..]);
                }
                None => self.carry.extend_from_slice(chunk),
            }
            if self.carry.len() > libc::PIPE_BUF {
                // Not a line a worker wrote: pass it on rather than hold it forever.
                self.carry.push(b'\n');
                out(&std::mem::take(&mut self.carry));
            }
        }
        moved > 0
    }
}

/// Writes one line to the relay pipe with one write(2), cut to `PIPE_BUF` bytes so that it
/// stays atomic; a line that does not fit now is dropped and counted.
pub(super) fn send(pipe: &impl AsFd, line: &[u8]) {
    let written = if line.len() <= libc::PIPE_BUF {
        nix::unistd::write(pipe, line)
    } else {
        let mut cut = line[..libc::PIPE_BUF - 4].to_vec();
        cut.extend_from_slice("…\n".as_bytes());
        nix::unistd::write(pipe, &cut)
    };
    if written.is_err() {
        count_dropped(1);
    }
}

static DROPPED: OnceLock<&'static AtomicU64> = OnceLock::new();

/// Maps the drop counter, shared with every worker forked afterwards. Call in the master
/// before the first fork; later calls do nothing.
pub(super) fn share_counter() {
    DROPPED.get_or_init(|| {
        let length = std::num::NonZeroUsize::new(4096).expect("non-zero");
        // Never unmapped, so the 'static reference below stays valid in this process and in
        // its children.
        match crate::sys::map_shared_zeroed(length) {
            // SAFETY: zeroed memory, page-aligned, is a valid AtomicU64 that lives forever.
            Ok(base) => unsafe { base.cast::<AtomicU64>().as_ref() },
            // Then the counter is this process's own: workers' drops are not seen.
            Err(_) => Box::leak(Box::new(AtomicU64::new(0))),
        }
    });
}

/// Counts `lines` log lines that could not be written.
pub(super) fn count_dropped(lines: u64) {
    if let Some(counter) = DROPPED.get() {
        counter.fetch_add(lines, Ordering::Relaxed);
    }
}

/// Log lines dropped so far by the master and its workers.
pub fn dropped() -> u64 {
    DROPPED.get().map_or(0, |counter| counter.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_cross_the_relay_whole_and_a_full_pipe_drops_and_counts() {
        share_counter();
        let mut relay = Relay::new().unwrap();
        let before = dropped();
        send(&relay.write, b"one\n");
        send(&relay.write, b"two\n");
        let mut long = vec![b'x'; 10_000];
        long.push(b'\n');
        send(&relay.write, &long);
        let mut out = Vec::new();
        assert!(relay.drain(|bytes| out.extend_from_slice(bytes)));
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..2], ["one", "two"]);
        assert!(lines[2].ends_with('…') && lines[2].len() <= libc::PIPE_BUF, "cut to PIPE_BUF");
        assert!(!relay.drain(|_| panic!("nothing left")));
        let line = [b'y'; 100];
        let mut sent = 0;
        while dropped() == before {
            send(&relay.write, &line);
            sent += 1;
            assert!(sent < 1 << 20, "the pipe never filled");
        }
        assert_eq!(dropped(), before + 1, "the first line that did not fit was counted");
    }
}
