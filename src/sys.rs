//! The few raw system calls nix does not wrap the way the worker needs them.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

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

/// What [`spawn`] sets up in the child besides the program and its arguments.
#[derive(Debug)]
pub struct SpawnSetup<'a> {
    /// Becomes descriptors 0 and 1.
    pub stdio: BorrowedFd<'a>,
    /// Becomes descriptor 2; `None`: `/dev/null`.
    pub stderr: Option<BorrowedFd<'a>>,
    /// The working directory.
    pub directory: &'a std::ffi::CStr,
}

/// posix_spawn(3) of `program` with `argv` and exactly the environment `envp`, the cheap way
/// (glibc clones with `CLONE_VM | CLONE_VFORK`: nothing of the parent is copied), with: fds
/// 0 and 1 = `setup.stdio`, 2 = `setup.stderr` or /dev/null, every other descriptor closed
/// (`posix_spawn_file_actions_addclosefrom_np`), `setup.directory` as working directory
/// (`addchdir_np`), every signal at its default action (`POSIX_SPAWN_SETSIGDEF` over the full
/// set) and none blocked, and a process group of its own.
///
/// # Errors
/// The posix_spawn(3) error, such as `ENOENT` or `EACCES` for the program (glibc reports
/// exec failures to the caller), or `EAGAIN`/`ENOMEM`.
pub fn spawn(
    program: &std::ffi::CStr,
    argv: &[std::ffi::CString],
    envp: &[std::ffi::CString],
    setup: &SpawnSetup<'_>,
) -> io::Result<nix::unistd::Pid> {
    use nix::libc;
    let check =
        |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(rc)) };
    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_p.push(std::ptr::null_mut());
    let mut envp_p: Vec<*mut libc::c_char> = envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_p.push(std::ptr::null_mut());
    let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
    let mut actions = std::mem::MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
    // SAFETY: each object is initialised by its *_init before any other use and destroyed
    // exactly once below; every pointer handed over (program, argv, envp, the directory, the
    // "/dev/null" literal) points to a NUL-terminated string that outlives the call, and the
    // argv/envp arrays end with a null pointer. posix_spawn only reads them.
    unsafe {
        check(libc::posix_spawnattr_init(attr.as_mut_ptr()))?;
        let attr = attr.assume_init_mut();
        if let Err(error) = check(libc::posix_spawn_file_actions_init(actions.as_mut_ptr())) {
            libc::posix_spawnattr_destroy(attr);
            return Err(error);
        }
        let actions = actions.assume_init_mut();
        let result = (|| {
            let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigfillset(all.as_mut_ptr());
            let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(none.as_mut_ptr());
            check(libc::posix_spawnattr_setsigdefault(attr, all.as_ptr()))?;
            check(libc::posix_spawnattr_setsigmask(attr, none.as_ptr()))?;
            check(libc::posix_spawnattr_setpgroup(attr, 0))?;
            let flags = libc::POSIX_SPAWN_SETSIGDEF
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETPGROUP;
            check(libc::posix_spawnattr_setflags(attr, flags as libc::c_short))?;
            let stdio = setup.stdio.as_raw_fd();
            check(libc::posix_spawn_file_actions_adddup2(actions, stdio, 0))?;
            check(libc::posix_spawn_file_actions_adddup2(actions, stdio, 1))?;
            match setup.stderr {
                Some(stderr) => {
                    check(libc::posix_spawn_file_actions_adddup2(actions, stderr.as_raw_fd(), 2))?
                }
                None => check(libc::posix_spawn_file_actions_addopen(
                    actions,
                    2,
                    c"/dev/null".as_ptr(),
                    libc::O_WRONLY,
                    0,
                ))?,
            }
            check(libc::posix_spawn_file_actions_addclosefrom_np(actions, 3))?;
            check(libc::posix_spawn_file_actions_addchdir_np(actions, setup.directory.as_ptr()))?;
            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(
                &mut pid,
                program.as_ptr(),
                actions,
                attr,
                argv_p.as_ptr(),
                envp_p.as_ptr(),
            ))?;
            Ok(nix::unistd::Pid::from_raw(pid))
        })();
        libc::posix_spawn_file_actions_destroy(actions);
        libc::posix_spawnattr_destroy(attr);
        result
    }
}
