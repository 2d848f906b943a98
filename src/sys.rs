//! The few raw system calls nix does not wrap the way the worker needs them.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use socket2::SockAddr;

/// accept4(2) with `SOCK_NONBLOCK | SOCK_CLOEXEC`: one system call yields a non-blocking,
/// close-on-exec client socket and its peer address.
///
/// # Errors
/// The accept4(2) error: `WouldBlock` when no connection is pending, `EMFILE`/`ENFILE` when
/// out of descriptors, `ECONNABORTED` when the client already gave up.
pub fn accept_nonblocking(listener: &impl AsRawFd) -> io::Result<(TcpStream, SocketAddr)> {
    let fd = listener.as_raw_fd();
    // SAFETY: `try_init` hands us storage for a sockaddr and its length, which accept4 fills
    // in; `fd` is a listening socket borrowed for the duration of the call.
    let (client, address) = unsafe {
        SockAddr::try_init(|storage, len| {
            let client = nix::libc::accept4(
                fd,
                storage.cast(),
                len,
                nix::libc::SOCK_NONBLOCK | nix::libc::SOCK_CLOEXEC,
            );
            if client < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(OwnedFd::from_raw_fd(client))
        })?
    };
    let peer = address
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((TcpStream::from(client), peer))
}

/// The start time of process `pid`, in clock ticks after boot: field 22 of
/// `/proc/PID/stat` (proc(5)). With the pid it names one process, even after the pid is
/// reused.
///
/// # Errors
/// The process does not exist, or its stat line cannot be parsed.
pub fn process_start_ticks(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces or ')': fields
    // resume after the last ')', with the state (field 3) first.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(22 - 3))
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat")))
}

/// pidfd_open(2): a descriptor (close-on-exec) that refers to process `pid` for as long as
/// it is open, so a signal sent through it ([`pidfd_send_signal`]) can never reach a process
/// that took the pid over meanwhile; and that becomes readable when the process exits, so a
/// worker waits for its children in its readiness loop (no SIGCHLD handler, no blocking
/// waitpid).
///
/// # Errors
/// `ESRCH` when there is no such process; `ENOSYS` before Linux 5.3; `EMFILE`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it reads
    // and writes no memory of ours.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// pidfd_send_signal(2): sends `signal` to the process `pidfd` refers to.
///
/// # Errors
/// `ESRCH` when that process has exited; `EPERM` without permission.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: nix::sys::signal::Signal) -> io::Result<()> {
    // SAFETY: a descriptor we own, a valid signal number, no siginfo, no flags.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as i32,
            std::ptr::null::<nix::libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
