//! Classic daemon mode (`daemonize = true` or `-d`), for hosts without systemd.
//!
//! Runs in the starting process, before anything else is set up: fork; the child calls
//! setsid(2) and forks again, so the daemon is no session leader and can never regain a
//! controlling terminal; the grandchild changes to `/`, sets umask 027 and points stdio at
//! `/dev/null`. The starting process waits on a pipe until the daemon reports its startup
//! outcome (one byte: 0 when ready, else its exit status) and exits with it, so
//! `preforkd -d` returns only once the daemon serves, or fails with the reason's status.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::stat::{Mode, umask};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid};

use crate::exit::ExitStatus;

/// Which side of the daemonization this process is on.
#[derive(Debug)]
pub enum Side {
    /// The starting process: exit with this status.
    Starter(ExitStatus),
    /// The daemon: report readiness (or failure) on this pipe.
    Daemon(File),
}

/// Detaches, as described in the module documentation.
///
/// # Errors
/// pipe(2), fork(2), setsid(2) or opening `/dev/null` failed (in the starting process).
pub fn daemonize() -> io::Result<Side> {
    // Close-on-exec: neither end leaks into anything the daemon may execute.
    let (mut read_end, write_end) = io::pipe()?;
    // SAFETY: called from main before any thread exists; each side only continues with
    // plain system calls or the normal program.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut byte = [0u8; 1];
            let read = read_end.read(&mut byte);
            let _ = waitpid(child, None);
            Ok(Side::Starter(match read {
                Ok(1) if byte[0] == 0 => ExitStatus::Ok,
                Ok(1) => status_from(byte[0]),
                _ => ExitStatus::Software,
            }))
        }
        ForkResult::Child => {
            drop(read_end);
            setsid()?;
            // SAFETY: still single-threaded; the intermediate child exits at once.
            if let ForkResult::Parent { .. } = unsafe { fork() }? {
                std::process::exit(0);
            }
            std::env::set_current_dir("/")?;
            umask(Mode::from_bits_truncate(0o027));
            let null = OpenOptions::new().read(true).write(true).open("/dev/null")?;
            dup2_stdin(&null)?;
            dup2_stdout(&null)?;
            dup2_stderr(&null)?;
            debug_assert!(null.as_raw_fd() > 2);
            Ok(Side::Daemon(File::from(OwnedFd::from(write_end))))
        }
    }
}

fn status_from(byte: u8) -> ExitStatus {
    [
        ExitStatus::Usage,
        ExitStatus::NoInput,
        ExitStatus::Unavailable,
        ExitStatus::Software,
        ExitStatus::OsErr,
        ExitStatus::TempFail,
        ExitStatus::Config,
    ]
    .into_iter()
    .find(|s| *s as u8 == byte)
    .unwrap_or(ExitStatus::Software)
}
