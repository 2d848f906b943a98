//! The few raw system calls nix does not wrap the way the worker needs them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

/// A zeroed, readable and writable anonymous `MAP_SHARED` mapping of `length` bytes
/// (mmap(2)): made before fork, it is the same memory in the master and every worker (the
/// scoreboard, the per-client tables, the relay's backend health, the log relay's counter).
/// It is page-aligned; unmapping it (munmap(2)) is the caller's. Its memory is accounted for
/// in full when it is mapped (no `MAP_NORESERVE`), so no page of it faults with `SIGBUS`
/// when first touched, unlike a file on a full filesystem ([`allocate`]).
///
/// # Errors
/// The mmap(2) error, such as `ENOMEM`.
pub fn map_shared_zeroed(
    length: std::num::NonZeroUsize,
) -> nix::Result<std::ptr::NonNull<nix::libc::c_void>> {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous};
    // SAFETY: a new mapping at an address the kernel picks: it aliases nothing. Anonymous
    // memory is zeroed.
    unsafe {
        mmap_anonymous(
            None,
            length,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )
    }
}

/// This process's nice value, getpriority(2) of `PRIO_PROCESS` 0: -20 (most favoured) to
/// 19; 0 if it cannot be read.
pub fn nice() -> i32 {
    nix::errno::Errno::clear();
    // SAFETY: getpriority reads this process's nice value; -1 is a valid value too, told
    // apart from a failure by errno.
    let nice = unsafe { nix::libc::getpriority(nix::libc::PRIO_PROCESS, 0) };
    if nice == -1 && nix::errno::Errno::last_raw() != 0 { 0 } else { nice }
}

/// This process's resident memory (RSS) in bytes: the second field of `/proc/self/statm`,
/// in pages (proc(5)), times the page size. One open(2), read(2) and close(2): call it at a
/// bounded rate.
///
/// # Errors
/// `/proc` is not mounted or not readable, or the file is not as proc(5) describes it.
pub fn resident_bytes() -> std::io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages = statm
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|field| field.parse::<u64>().ok())
        .ok_or_else(|| std::io::Error::other("/proc/self/statm: no resident page count"))?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)?.unwrap_or(4096);
    Ok(pages.saturating_mul(u64::try_from(page).unwrap_or(4096)))
}

/// How [`allocate`] reserved a file's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// fallocate(2) reserved them.
    Reserved,
    /// The filesystem has no fallocate(2) (`EOPNOTSUPP`): zeros were written over the whole
    /// length and synced (fsync(2)), so the blocks exist, or the error came now.
    Written,
}

/// Makes `file` `length` bytes long with every block allocated, so that a shared mapping of
/// it can never fault with `SIGBUS` for want of space: a full filesystem fails here, with an
/// error, instead of later, when a page of the mapping is first written.
///
/// fallocate(2) (mode 0) first; on a filesystem without it (`EOPNOTSUPP`, such as some
/// FUSE or network filesystems), zeros are written and synced. The file's content becomes
/// zeros either way, so call it on a new, empty file. On a copy-on-write filesystem (btrfs,
/// ZFS) a block written again needs new space, which no reservation guarantees: keep such
/// files on tmpfs (`/run`) or another filesystem that overwrites in place.
///
/// # Errors
/// The fallocate(2), write(2) or fsync(2) error: `ENOSPC` or `EDQUOT` when the space is not
/// there, `EFBIG` past the file size limit.
pub fn allocate(file: BorrowedFd<'_>, length: u64) -> io::Result<Allocation> {
    use nix::errno::Errno;
    use nix::fcntl::{FallocateFlags, fallocate};
    use nix::libc::off_t;

    let too_large = || io::Error::from(Errno::EFBIG);
    let len = off_t::try_from(length).map_err(|_| too_large())?;
    if len == 0 {
        return Ok(Allocation::Reserved);
    }
    match fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) => return Ok(Allocation::Reserved),
        Err(Errno::EOPNOTSUPP) => {}
        Err(error) => return Err(error.into()),
    }
    const CHUNK: usize = 64 << 10;
    let zeros = [0u8; CHUNK];
    let mut offset: off_t = 0;
    while offset < len {
        let n = (len - offset).min(CHUNK as off_t) as usize;
        match nix::sys::uio::pwrite(file, &zeros[..n], offset) {
            // pwrite(2) of a regular file writes something or fails; 0 would loop forever.
            Ok(0) => return Err(Errno::ENOSPC.into()),
            Ok(written) => offset += written as off_t,
            Err(Errno::EINTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    nix::unistd::fsync(file)?;
    Ok(Allocation::Written)
}

/// What [`spawn`] sets up in the child besides the program and its arguments.
#[derive(Debug)]
pub struct SpawnSetup<'a> {
    /// Becomes descriptors 0 and 1 (made blocking: its file status flags are shared with
    /// every other descriptor of the same open file, so the caller's copy blocks too).
    pub stdio: BorrowedFd<'a>,
    /// Becomes descriptor 2; `None`: `/dev/null`.
    pub stderr: Option<BorrowedFd<'a>>,
    /// The working directory, entered after the switch of credentials (so it is checked
    /// as the program's user).
    pub directory: &'a std::ffi::CStr,
    /// Resource limits, nice value, umask and credentials of the child.
    pub process: &'a ProcessSettings,
}

/// Why [`spawn`] failed: the step (`None`: execve(2) itself) and its error.
#[derive(Debug, thiserror::Error)]
#[error("{}{error}", step.map(|s| format!("{s}: ")).unwrap_or_default())]
pub struct SpawnError {
    /// The step before execve that failed: `setuid`, `chdir` ...; `None` for execve.
    pub step: Option<&'static str>,
    /// Its error (its errno in `raw_os_error`).
    pub error: io::Error,
}

/// Process settings [`spawn`] applies in the child before execve(2), in this order:
/// resource limits and the nice value (while the parent's privileges may still raise
/// them), the umask, then supplementary groups, group and user (setgroups(2), setgid(2),
/// setuid(2)). Switching from root to another user clears every capability (capabilities(7)),
/// so a program that is not set-user-ID runs with none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSettings {
    /// `(resource, limit)`: setrlimit(2) with the soft and the hard limit both at `limit`
    /// (`RLIM_INFINITY` for none), as `RLIMIT_AS`, `RLIMIT_NOFILE` ...
    pub rlimits: Vec<(nix::libc::c_int, u64)>,
    /// setpriority(2) of the process: -20 (most favoured) to 19; `None` keeps the parent's.
    pub nice: Option<i32>,
    /// umask(2); `None` keeps the parent's.
    pub umask: Option<u32>,
    /// The credentials; `None` keeps the parent's (a parent that is not root cannot
    /// switch).
    pub ids: Option<Ids>,
}

/// A user id, group id and supplementary groups for [`ProcessSettings::ids`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// setuid(2).
    pub uid: nix::libc::uid_t,
    /// setgid(2).
    pub gid: nix::libc::gid_t,
    /// setgroups(2): every supplementary group (empty: none).
    pub groups: Vec<nix::libc::gid_t>,
}

/// The step of [`spawn`]'s child that failed, for the error message.
const SPAWN_STEPS: [&str; 11] = [
    "execve",
    "setpgid",
    "fcntl",
    "dup2",
    "close_range",
    "setrlimit",
    "setpriority",
    "setgroups",
    "setgid",
    "setuid",
    "chdir",
];

/// Spawns `program` with `argv` and exactly the environment `envp` the way posix_spawn(3)
/// does in glibc, by clone(2) with `CLONE_VM | CLONE_VFORK` (nothing of the parent is
/// copied, and the parent waits until the child has called execve or failed), with: fds 0
/// and 1 = `setup.stdio`, 2 = `setup.stderr` or /dev/null, every other descriptor closed
/// (close_range(2)), `setup.directory` as working directory, every signal at its default
/// action and none blocked, and a process group of its own.
///
/// Why not posix_spawn itself: per call, glibc maps and unmaps a fresh stack for the child
/// (page faults, and a TLB shootdown on the other core when it unmaps), checks every file
/// action against getrlimit (six prlimit64 calls here), and with `POSIX_SPAWN_SETSIGDEF`
/// makes 64 sigaction calls in the child. Here the stack is a heap buffer the allocator
/// reuses; the child resets only the signals whose action is not the default in this
/// process (read once per process: a dozen, not 64), and it must reset the handled ones
/// too, not leave them to execve(2): a signal sent to the worker's process group before the
/// child's setpgid is pending in the child, and unblocking it would run the worker's
/// handler on the child's stack; /dev/null is opened once per process. Measured with
/// `perf record -a` under `preforkd-bench` short connections to `exec` of /bin/cat: see
/// BENCHMARKS.md.
///
/// Descriptors 0 to 2 of this process may be closed (a foreground daemon started with them
/// closed), so `setup.stdio`, `setup.stderr` or /dev/null may themselves be 0, 1 or 2: the
/// child first moves any such source above 2 (`F_DUPFD`), then places them.
/// close_range(2) needs Linux 5.9; on older kernels the child closes descriptors one by one
/// up to the `RLIMIT_NOFILE` of this process.
///
/// # Errors
/// `ENOENT`, `EACCES`, `ENOEXEC` ... from execve(2) or an earlier step in the child (the
/// child reports it through memory it shares with the parent, as glibc does; the message
/// names the step, e.g. `setuid: Operation not permitted`), or `EAGAIN`/`ENOMEM` from
/// clone(2).
pub fn spawn(
    program: &std::ffi::CStr,
    argv: &[std::ffi::CString],
    envp: &[std::ffi::CString],
    setup: &SpawnSetup<'_>,
) -> Result<nix::unistd::Pid, SpawnError> {
    use nix::libc;
    /// The child's stack: execve's needs are small; glibc gives its spawn child 32 KiB plus
    /// the size of argv.
    const STACK: usize = 64 * 1024;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let stderr = match setup.stderr {
        Some(stderr) => stderr.as_raw_fd(),
        None => dev_null()
            .map_err(|error| SpawnError { step: Some("open /dev/null"), error })?
            .as_raw_fd(),
    };
    let reset = non_default_signals();
    let process = setup.process;
    let (ids, uid, gid, groups): (bool, libc::uid_t, libc::gid_t, &[libc::gid_t]) =
        match &process.ids {
            Some(ids) => (true, ids.uid, ids.gid, &ids.groups),
            None => (false, 0, 0, &[]),
        };
    let mut child = SpawnChild {
        program: program.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        stdio: setup.stdio.as_raw_fd(),
        stderr,
        directory: setup.directory.as_ptr(),
        reset: reset.as_ptr(),
        reset_len: reset.len(),
        max_fd: open_max(),
        rlimits: process.rlimits.as_ptr(),
        rlimits_len: process.rlimits.len(),
        nice: process.nice.unwrap_or(0),
        set_nice: process.nice.is_some(),
        umask: process.umask.unwrap_or(0),
        set_umask: process.umask.is_some(),
        ids,
        uid,
        gid,
        groups: groups.as_ptr(),
        groups_len: groups.len(),
        error: 0,
        step: 0,
    };
    /// The stack's unit: 16 bytes, aligned as the x86-64 and AArch64 ABIs want a stack.
    #[repr(C, align(16))]
    struct Chunk([u8; 16]);
    let mut stack: Vec<std::mem::MaybeUninit<Chunk>> = Vec::with_capacity(STACK / 16);
    // SAFETY: the stack grows down from the end of a live, 16-byte aligned buffer of STACK
    // bytes; the child only runs `spawn_child` on it, and CLONE_VFORK suspends this thread
    // until the child has called execve (which replaces its memory) or _exit, so `stack`,
    // `child` and every pointer in it outlive the child's use of them. When this process
    // has signal handlers, all signals are blocked across the clone so that no handler runs
    // on the child's stack (the child sets every handled signal to its default before it
    // clears its mask), and restored after.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(STACK / 16).cast::<libc::c_void>();
        // Without a handler in this process (the exec spawner resets them all), no handler
        // can run on the child's stack: two system calls saved.
        let handlers = has_handlers();
        let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigfillset(all.as_mut_ptr());
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        if handlers {
            libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), old.as_mut_ptr());
        }
        let pid = libc::clone(
            spawn_child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw mut child).cast(),
        );
        let clone_error = io::Error::last_os_error();
        if handlers {
            libc::pthread_sigmask(libc::SIG_SETMASK, old.as_ptr(), std::ptr::null_mut());
        }
        if pid < 0 {
            return Err(SpawnError { step: Some("clone"), error: clone_error });
        }
        pid
    };
    drop(stack);
    let pid = nix::unistd::Pid::from_raw(pid);
    // SAFETY: the child's stores are visible: it ran in this address space and ended its use
    // of it (execve or _exit) before clone returned; `child` is still alive here.
    let (error, step) = unsafe {
        (
            std::ptr::read_volatile(&raw const child.error),
            std::ptr::read_volatile(&raw const child.step),
        )
    };
    if error != 0 {
        // It exited with 127 after the failure: reap it so no zombie is left.
        let _ = nix::sys::wait::waitpid(pid, None);
        let step = SPAWN_STEPS.get(step).copied().filter(|&s| s != "execve");
        return Err(SpawnError { step, error: io::Error::from_raw_os_error(error) });
    }
    Ok(pid)
}

/// What the child of [`spawn`] reads, and where it writes its error.
#[repr(C)]
struct SpawnChild {
    program: *const nix::libc::c_char,
    argv: *const *const nix::libc::c_char,
    envp: *const *const nix::libc::c_char,
    stdio: RawFd,
    stderr: RawFd,
    directory: *const nix::libc::c_char,
    /// Signals to set to `SIG_DFL` before the mask is cleared.
    reset: *const nix::libc::c_int,
    reset_len: usize,
    /// The descriptor limit, for closing one by one without close_range(2).
    max_fd: nix::libc::c_int,
    /// [`ProcessSettings::rlimits`].
    rlimits: *const (nix::libc::c_int, u64),
    rlimits_len: usize,
    nice: nix::libc::c_int,
    set_nice: bool,
    umask: u32,
    set_umask: bool,
    /// Whether to switch to `uid`, `gid` and `groups`.
    ids: bool,
    uid: nix::libc::uid_t,
    gid: nix::libc::gid_t,
    groups: *const nix::libc::gid_t,
    groups_len: usize,
    /// errno of the step that failed, 0 if execve succeeded.
    error: nix::libc::c_int,
    /// Which step failed: an index into [`SPAWN_STEPS`].
    step: usize,
}

/// The child of [`spawn`], on its own stack in the parent's memory: only async-signal-safe
/// calls, no allocation, no unwinding; on failure it stores errno and exits with 127.
extern "C" fn spawn_child(arg: *mut nix::libc::c_void) -> nix::libc::c_int {
    use nix::libc;
    // SAFETY: `arg` is the `SpawnChild` that `spawn` passed to clone, alive and not touched
    // by the parent (suspended by CLONE_VFORK) until this child has called execve or _exit;
    // every pointer in it is valid for the same time. The calls are plain system calls.
    unsafe {
        let child = &mut *arg.cast::<SpawnChild>();
        let fail = |child: &mut SpawnChild, step: usize| -> ! {
            std::ptr::write_volatile(&raw mut child.error, *libc::__errno_location());
            std::ptr::write_volatile(&raw mut child.step, step);
            libc::_exit(127)
        };
        // Its own process group first, so that signals to the parent's group stop reaching it.
        if libc::setpgid(0, 0) < 0 {
            fail(child, 1);
        }
        // Programs expect blocking standard input and output.
        if libc::fcntl(child.stdio, libc::F_SETFL, 0) < 0 {
            fail(child, 2);
        }
        // A source among 0-2 would be overwritten before it is copied: move it above 2
        // first (the copy is not close-on-exec; close_range below closes it).
        let above = |fd: RawFd| if fd < 3 { libc::fcntl(fd, libc::F_DUPFD, 3) } else { fd };
        let stdio = above(child.stdio);
        let stderr = above(child.stderr);
        if stdio < 0 || stderr < 0 {
            fail(child, 2);
        }
        if libc::dup2(stdio, 0) < 0 || libc::dup2(stdio, 1) < 0 || libc::dup2(stderr, 2) < 0 {
            fail(child, 3);
        }
        if close_from_3(child.max_fd) < 0 {
            fail(child, 4);
        }
        for i in 0..child.rlimits_len {
            let (resource, value) = *child.rlimits.add(i);
            let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
            if libc::setrlimit(resource as _, &limit) < 0 {
                fail(child, 5);
            }
        }
        if child.set_nice && libc::setpriority(libc::PRIO_PROCESS, 0, child.nice) < 0 {
            fail(child, 6);
        }
        if child.set_umask {
            libc::umask(child.umask as libc::mode_t);
        }
        if child.ids {
            // The raw system calls: glibc's wrappers of setgroups, setgid and setuid signal
            // every thread of the process, which a CLONE_VM child must not do.
            if libc::syscall(libc::SYS_setgroups, child.groups_len, child.groups) < 0 {
                fail(child, 7);
            }
            if libc::syscall(libc::SYS_setgid, child.gid) < 0 {
                fail(child, 8);
            }
            if libc::syscall(libc::SYS_setuid, child.uid) < 0 {
                fail(child, 9);
            }
        }
        if libc::chdir(child.directory) < 0 {
            fail(child, 10);
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        for i in 0..child.reset_len {
            libc::sigaction(*child.reset.add(i), &action, std::ptr::null_mut());
        }
        let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(none.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut());
        libc::execve(child.program, child.argv, child.envp);
        fail(child, 0)
    }
}

/// Closes every descriptor from 3 up: close_range(2), or one by one below `max_fd` where
/// the kernel lacks it (before Linux 5.9). Async-signal-safe: for [`spawn_child`].
///
/// # Safety
/// Only in a child about to execve: it closes descriptors other code may own.
unsafe fn close_from_3(max_fd: nix::libc::c_int) -> nix::libc::c_long {
    use nix::libc;
    // SAFETY: the caller's contract; close_range and close take plain integers.
    unsafe {
        let rc = libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        if rc == 0 || *libc::__errno_location() != libc::ENOSYS {
            return rc;
        }
        for fd in 3..max_fd {
            libc::close(fd);
        }
    }
    0
}

/// The descriptor limit (`RLIMIT_NOFILE`'s soft limit), read once per process: the master
/// sets it from `rlimit_nofile` before it starts workers. 1024 if it cannot be read.
fn open_max() -> nix::libc::c_int {
    static OPEN_MAX: std::sync::OnceLock<nix::libc::c_int> = std::sync::OnceLock::new();
    *OPEN_MAX.get_or_init(|| {
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft.min(i32::MAX as u64) as nix::libc::c_int)
    })
}

/// The signals whose action in this process is not the default: ignored (`SIG_IGN`
/// survives execve(2)) or handled (see [`spawn`] for why those are reset too). Read once per
/// process with sigaction(2): the worker installs its handlers before it serves and never
/// changes them after (Rust's runtime ignores `SIGPIPE`; a daemon started under nohup(1)
/// ignores `SIGHUP` until it installs its own handler).
fn non_default_signals() -> &'static [nix::libc::c_int] {
    use nix::libc;
    static NON_DEFAULT: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    NON_DEFAULT.get_or_init(|| {
        (1..=libc::SIGRTMAX())
            .filter(|&signal| {
                let mut action = std::mem::MaybeUninit::<libc::sigaction>::uninit();
                // SAFETY: a query only (no new action); `action` is written on success.
                let rc = unsafe { libc::sigaction(signal, std::ptr::null(), action.as_mut_ptr()) };
                // SAFETY: initialised by the successful call above.
                rc == 0 && unsafe { action.assume_init() }.sa_sigaction != libc::SIG_DFL
            })
            .collect()
    })
}

/// Capabilities by number (capabilities(7), `<linux/capability.h>`).
pub mod capability {
    /// Signal any process (`CAP_KILL`).
    pub const KILL: u32 = 5;
    /// Set any group id and supplementary groups (`CAP_SETGID`).
    pub const SETGID: u32 = 6;
    /// Set any user id (`CAP_SETUID`).
    pub const SETUID: u32 = 7;
    /// Lower the nice value below the process's own (`CAP_SYS_NICE`).
    pub const SYS_NICE: u32 = 23;
    /// Raise a hard resource limit (`CAP_SYS_RESOURCE`).
    pub const SYS_RESOURCE: u32 = 24;
}

/// Keeps only the capabilities `keep` (see [`capability`]) in this process's effective and
/// permitted sets, empties its inheritable and ambient sets (capset(2), prctl(2)
/// `PR_CAP_AMBIENT_CLEAR_ALL`). What is dropped cannot come back, short of executing a
/// set-user-ID or file-capability program. The bounding set is left alone, so that such
/// programs behave in the children as they do elsewhere on the system.
///
/// # Errors
/// capset(2) failed (`EPERM`: asked to keep one this process does not have).
pub fn keep_only_capabilities(keep: &[u32]) -> io::Result<()> {
    use nix::libc;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    /// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
    const VERSION_3: u32 = 0x2008_0522;
    let mut data = [Data::default(); 2];
    for &cap in keep {
        let word = &mut data[(cap / 32) as usize];
        word.effective |= 1 << (cap % 32);
        word.permitted |= 1 << (cap % 32);
    }
    let mut header = Header { version: VERSION_3, pid: 0 };
    // SAFETY: capset reads a header and two data words of the layout above; both live for
    // the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a prctl with integer arguments only. EINVAL before Linux 4.3 (no ambient set,
    // so nothing to clear).
    unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    Ok(())
}

/// Whether any signal has a handler in this process (not `SIG_DFL` nor `SIG_IGN`), read
/// once per process, as [`non_default_signals`].
fn has_handlers() -> bool {
    use nix::libc;
    static HANDLERS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HANDLERS.get_or_init(|| {
        non_default_signals().iter().any(|&signal| {
            let mut action = std::mem::MaybeUninit::<libc::sigaction>::uninit();
            // SAFETY: a query only (no new action); `action` is written on success.
            let rc = unsafe { libc::sigaction(signal, std::ptr::null(), action.as_mut_ptr()) };
            // SAFETY: initialised by the successful call above.
            rc != 0 || unsafe { action.assume_init() }.sa_sigaction != libc::SIG_IGN
        })
    })
}

/// /dev/null, opened once per process for writing (close-on-exec): the stderr of programs
/// whose output is discarded.
///
/// # Errors
/// The open(2) error, such as `ENOENT` in a chroot without /dev/null (not cached: the next
/// call tries again).
fn dev_null() -> io::Result<&'static OwnedFd> {
    static DEV_NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd);
    }
    let file = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    Ok(DEV_NULL.get_or_init(|| file.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[test]
    fn resident_memory_grows_with_the_pages_touched() {
        let before = resident_bytes().unwrap();
        assert!(before > 0);
        let touched = vec![1u8; 32 << 20];
        let after = resident_bytes().unwrap();
        assert!(after >= before + (16 << 20), "{before} then {after}");
        drop(std::hint::black_box(touched));
    }
    use std::io::Read;
    use std::os::fd::AsFd;

    fn c(text: &str) -> CString {
        CString::new(text).unwrap()
    }

    #[test]
    fn allocate_reserves_every_block_of_a_new_file() {
        use std::os::unix::fs::MetadataExt;
        let file = tempfile::tempfile().unwrap();
        let length = 300_000;
        let how = allocate(file.as_fd(), length).unwrap();
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), length);
        assert!(meta.blocks() * 512 >= length, "{} blocks, {how:?}: sparse", meta.blocks());
        let mut content = Vec::new();
        (&file).read_to_end(&mut content).unwrap();
        assert!(content.iter().all(|&b| b == 0));
        assert_eq!(
            allocate(file.as_fd(), u64::MAX).unwrap_err().raw_os_error(),
            Some(nix::libc::EFBIG)
        );
    }

    /// One test: `waitpid(-1)` below must see only children spawned here.
    #[test]
    fn spawn_sets_up_the_child_and_reports_exec_errors_without_leaving_a_child() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let setup = SpawnSetup {
            stdio: theirs.as_fd(),
            stderr: None,
            directory: c"/tmp",
            process: &ProcessSettings::default(),
        };
        let error = spawn(c"/nonexistent/program", &[c("x")], &[], &setup).unwrap_err();
        assert_eq!((error.step, error.error.raw_os_error()), (None, Some(nix::libc::ENOENT)));
        let nowhere = SpawnSetup { directory: c"/nonexistent", ..setup };
        let error = spawn(c"/bin/sh", &[c("sh")], &[], &nowhere).unwrap_err();
        assert_eq!(
            (error.step, error.error.raw_os_error()),
            (Some("chdir"), Some(nix::libc::ENOENT))
        );
        assert!(error.to_string().starts_with("chdir: "), "the step is named: {error}");
        assert_eq!(
            nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
            Err(nix::errno::Errno::ECHILD),
            "the failed children were reaped"
        );

        assert!(
            non_default_signals().contains(&nix::libc::SIGPIPE),
            "Rust's runtime ignores SIGPIPE here, so the reset below is tested"
        );
        assert!(
            non_default_signals().contains(&nix::libc::SIGSEGV),
            "handled signals are reset too (Rust's stack-overflow handler is one)"
        );
        let script = "echo \"$FOO\"; ls /proc/self/fd | tr '\\n' ' '; echo; pwd; \
                      sed -n 's/^SigBlk:\\t//p; s/^SigIgn:\\t//p' /proc/self/status; \
                      echo oops >&2; exit 3";
        let argv = [c("sh"), c("-c"), c(script)];
        let pid = spawn(c"/bin/sh", &argv, &[c("FOO=bar")], &setup).unwrap();
        drop(theirs);
        let mut output = String::new();
        (&ours).read_to_string(&mut output).unwrap();
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 3));
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines[..3], ["bar", "0 1 2 3 ", "/tmp"], "fds 0-2 only (3 is ls's own)");
        assert_eq!(lines[3], "0000000000000000", "nothing blocked: {output:?}");
        // Signals 32 and 33 are glibc's own (posix_spawn leaves them ignored too).
        let ignored = u64::from_str_radix(lines[4], 16).unwrap() & !(0b11 << 31);
        assert_eq!(ignored, 0, "SIGPIPE and the rest at their defaults: {output:?}");
        assert_eq!(lines.len(), 5, "stderr went to /dev/null: {output:?}");

        // Sources among descriptors 0-2 (a daemon started with them closed): here the stderr
        // pipe is descriptor 0, which placing the socket at 0 would overwrite first.
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (err_read, err_write) = nix::unistd::pipe().unwrap();
        let stdin = nix::unistd::dup(std::io::stdin().as_fd()).unwrap();
        nix::unistd::dup2_stdin(&err_write).unwrap();
        drop(err_write);
        // SAFETY: descriptor 0 is open (the pipe's write end, just placed there) until it is
        // restored below; nothing else in this test process reads stdin.
        let zero = unsafe { BorrowedFd::borrow_raw(0) };
        let setup = SpawnSetup {
            stdio: theirs.as_fd(),
            stderr: Some(zero),
            directory: c"/",
            process: &ProcessSettings::default(),
        };
        let argv = [c("sh"), c("-c"), c("echo out; echo err >&2")];
        let spawned = spawn(c"/bin/sh", &argv, &[], &setup);
        nix::unistd::dup2_stdin(&stdin).unwrap();
        drop(theirs);
        let pid = spawned.unwrap();
        let mut output = String::new();
        (&ours).read_to_string(&mut output).unwrap();
        let mut errors = String::new();
        std::fs::File::from(err_read).read_to_string(&mut errors).unwrap();
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
        assert_eq!((output.as_str(), errors.as_str()), ("out\n", "err\n"));
    }
}
