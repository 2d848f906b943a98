//! Classic daemon mode (`daemonize = true` or `-d`), for hosts without systemd.
//!
//! Runs in the starting process, before anything else is set up: fork; the child calls
//! setsid(2) and forks again, so the daemon is no session leader and can never regain a
//! controlling terminal; the grandchild changes to `/`, sets umask 027 and points stdio at
//! `/dev/null`. The starting process waits on a pipe until the daemon reports its startup
//! outcome (one byte: 0 when ready; else its exit status, then the reason as a length-prefixed
//! message, see [`report_failure`]) and exits with it, printing the reason on its standard
//! error, so `preforkd -d` returns only once the daemon serves, or fails on the terminal with
//! the reason and its status (the daemon's own stderr is `/dev/null` by then).
//!
//! The starter never waits for the pipe's end-of-file: workers forked before the outcome
//! hold copies of the write end, so the message carries its own length instead.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
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
            let status = match read {
                Ok(1) if byte[0] == 0 => ExitStatus::Ok,
                Ok(1) => status_from(byte[0]),
                _ => ExitStatus::Software,
            };
            if status != ExitStatus::Ok {
                let reason = match read_reason(&mut read_end) {
                    Some(reason) => reason,
                    None => "the daemon exited before it was ready (its log may say why)".into(),
                };
                let _ = writeln!(io::stderr(), "preforkd: {reason}");
            }
            Ok(Side::Starter(status))
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

/// Longest reason [`report_failure`] passes on, in bytes.
const MAX_REASON: usize = 4096;

/// Daemon side: tells the starting process that startup failed with `status`, and why; the
/// starter prints `reason` on its standard error and exits with `status`. Best effort: a
/// starter that is gone is not an error.
pub fn report_failure(pipe: &mut File, status: ExitStatus, reason: &str) {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut message = vec![status as u8];
    message.extend_from_slice(&(end as u16).to_be_bytes());
    message.extend_from_slice(&reason.as_bytes()[..end]);
    // One write of at most PIPE_BUF + 3 bytes into an empty pipe: it does not block.
    let _ = pipe.write_all(&message);
}

/// Starter side: the reason that follows a failure status, if the daemon sent one.
fn read_reason(pipe: &mut impl Read) -> Option<String> {
    let mut length = [0u8; 2];
    pipe.read_exact(&mut length).ok()?;
    let mut reason = vec![0u8; usize::from(u16::from_be_bytes(length)).min(MAX_REASON)];
    pipe.read_exact(&mut reason).ok()?;
    Some(String::from_utf8_lossy(&reason).into_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_crosses_the_pipe_with_its_reason() {
        let (mut read, write) = io::pipe().unwrap();
        let mut write = File::from(OwnedFd::from(write));
        report_failure(&mut write, ExitStatus::Unavailable, "could not bind 127.0.0.1:7: busy");
        let mut byte = [0u8; 1];
        read.read_exact(&mut byte).unwrap();
        assert_eq!(status_from(byte[0]), ExitStatus::Unavailable);
        assert_eq!(read_reason(&mut read).unwrap(), "could not bind 127.0.0.1:7: busy");
        let long = "é".repeat(MAX_REASON);
        report_failure(&mut write, ExitStatus::Config, &long);
        read.read_exact(&mut byte).unwrap();
        let reason = read_reason(&mut read).unwrap();
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'), "cut whole");
    }
}
