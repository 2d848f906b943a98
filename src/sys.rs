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

/// pidfd_open(2): a descriptor that becomes readable when process `pid` exits, so a worker
/// waits for its children in its readiness loop (no SIGCHLD handler, no blocking waitpid).
/// Close-on-exec. `pid` must be a child not yet reaped, so that it cannot have been reused.
///
/// # Errors
/// The pidfd_open(2) error (`ENOSYS` before Linux 5.3, `ESRCH`, `EMFILE`).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it reads
    // and writes no memory of ours.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns (pidfd_open sets O_CLOEXEC itself).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
