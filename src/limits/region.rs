//! The shared region behind the per-client table: a sealed memfd, its validation when a new
//! master adopts it, and the record locks that tell which processes use a range of slots.
//!
//! Runs in the master (creation, adoption, the liveness probe) and in workers (each takes its
//! lock once). Invariants:
//! - the region is a memfd sealed against shrinking (memfd_create(2), `F_SEAL_SHRINK`), so
//!   a mapping of it can never fault with SIGBUS;
//! - a master adopts a region only after checking its size, the header's magic, version,
//!   type sizes and lengths, and that every offset computed from them lies inside the file:
//!   nothing read from the region is trusted before that, and afterwards only integers are
//!   read from it, each index masked or bounds-checked;
//! - every process that counts in a range of slots (a master and its workers) holds a shared
//!   POSIX record lock (fcntl(2) `F_SETLK`) on that range's byte of the file. The kernel
//!   drops it when the process dies, so "no lock on the byte" means "nobody of that master
//!   is left" (`F_GETLK`), without pids that could be reused.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, SealFlag, fcntl};
use nix::libc;
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::stat::{SFlag, fstat};
use thiserror::Error;

/// Ranges of worker slots in one table: one for each master that may run at once (the
/// serving master and the new master of its binary upgrade).
pub const RANGES: usize = 2;

/// A shared mapping, unmapped on drop.
#[derive(Debug)]
pub(super) struct Mapping {
    pub(super) base: NonNull<u8>,
    pub(super) bytes: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created with this size and nothing borrows it past `self`
        // (tables borrow the `Limits` that owns it).
        let _ = unsafe { munmap(self.base.cast(), self.bytes) };
    }
}

/// Why a new master did not adopt the table its old master passed. Counts are then kept
/// apart (each master its own table) until the old master exits.
#[derive(Debug, Error)]
pub enum AdoptError {
    /// The descriptor is not a memfd of the expected kind, or could not be inspected.
    #[error("descriptor {fd} is not a sealed shared-memory file: {why}")]
    NotRegion {
        /// The inherited descriptor.
        fd: RawFd,
        /// What is wrong with it.
        why: String,
    },
    /// The region was made by a binary with another layout (an older or newer preforkd).
    #[error("its layout differs from this binary's (version {found}, this binary has {ours})")]
    Layout {
        /// Version (or description) found in the region's header.
        found: String,
        /// This binary's layout version.
        ours: u64,
    },
    /// The region's header is inconsistent with its size.
    #[error("its header does not describe a valid table of {bytes} bytes")]
    Corrupt {
        /// The file's size.
        bytes: usize,
    },
    /// The new configuration needs more records per master than the table has.
    #[error(
        "the new configuration needs {need} per-client records per master, the table holds {have}"
    )]
    TooSmall {
        /// Worker slots x (connections per worker + 1).
        need: usize,
        /// Records in one range of the table.
        have: usize,
    },
    /// The range the new master would use still has live processes (an earlier master's).
    #[error("its worker slot range {range} is still in use by pid {pid}")]
    Occupied {
        /// The range.
        range: usize,
        /// A process that holds it.
        pid: i32,
    },
    /// The range the old master said it uses does not exist.
    #[error("the old master's slot range {0} does not exist")]
    Range(usize),
    /// A system call failed while mapping or locking.
    #[error("{step}: {source}")]
    System {
        /// What was being done.
        step: &'static str,
        /// The system error.
        source: Errno,
    },
}

/// Creates a sealed memfd of `bytes` zero bytes, close-on-exec, and maps it shared.
pub(super) fn create(bytes: NonZeroUsize) -> Result<(OwnedFd, Mapping), Errno> {
    let fd = memfd_create(c"preforkd-limits", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    nix::unistd::ftruncate(&fd, bytes.get() as libc::off_t)?;
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(seals))?;
    let mapping = map(&fd, bytes)?;
    Ok((fd, mapping))
}

fn map(fd: &OwnedFd, bytes: NonZeroUsize) -> Result<Mapping, Errno> {
    // SAFETY: a new shared mapping of a file we hold; it aliases nothing in this process.
    // The file is sealed against shrinking (checked by `inspect` for an inherited one), so
    // no access inside `bytes` can fault.
    let base = unsafe {
        mmap(
            None,
            bytes,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd.as_fd(),
            0,
        )
    }?;
    Ok(Mapping { base: base.cast(), bytes: bytes.get() })
}

/// Checks that an inherited `fd` is a regular shared-memory file sealed against shrinking,
/// makes it close-on-exec again, and maps all of it. Returns the mapping (its size is the
/// file's).
pub(super) fn inspect(fd: &OwnedFd) -> Result<Mapping, AdoptError> {
    let raw = fd.as_raw_fd();
    let not = |why: String| AdoptError::NotRegion { fd: raw, why };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| not(e.to_string()))?;
    let stat = fstat(fd).map_err(|e| not(e.to_string()))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(not("not a regular file".into()));
    }
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| not(e.to_string()))?;
    if SealFlag::from_bits_truncate(seals) & SealFlag::F_SEAL_SHRINK != SealFlag::F_SEAL_SHRINK {
        return Err(not("not sealed against shrinking".into()));
    }
    let bytes = usize::try_from(stat.st_size)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| not(format!("size {}", stat.st_size)))?;
    map(fd, bytes).map_err(|source| AdoptError::System { step: "mmap", source })
}

/// Clears close-on-exec on `fd`, for the exec of a new master (in the forked child only).
///
/// # Errors
/// fcntl(2) failed.
pub(super) fn inheritable(fd: &OwnedFd) -> Result<RawFd, Errno> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(fd.as_raw_fd())
}

fn range_lock(kind: libc::c_short, range: usize) -> libc::flock {
    // SAFETY: `flock` is plain data; all zero is a valid value, completed below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = range as libc::off_t;
    lock.l_len = 1;
    lock
}

/// Marks this process as a user of `range`: a shared record lock on its byte, held until
/// the process exits (or closes any descriptor of the file, which no process here does).
///
/// # Errors
/// fcntl(2) `F_SETLK` failed (`ENOLCK`).
pub(super) fn occupy(fd: &OwnedFd, range: usize) -> Result<(), Errno> {
    let lock = range_lock(libc::F_RDLCK as libc::c_short, range);
    fcntl(fd, FcntlArg::F_SETLK(&lock)).map(drop)
}

/// A process other than this one that uses `range`, if any.
///
/// # Errors
/// fcntl(2) `F_GETLK` failed.
pub(super) fn occupant(fd: &OwnedFd, range: usize) -> Result<Option<i32>, Errno> {
    let mut lock = range_lock(libc::F_WRLCK as libc::c_short, range);
    fcntl(fd, FcntlArg::F_GETLK(&mut lock))?;
    Ok((lock.l_type != libc::F_UNLCK as libc::c_short).then_some(lock.l_pid))
}
