//! Where a write request's data goes while the transfer runs: a file without a name in the
//! target directory, given its name only when the last block is in.
//!
//! Runs in workers. Invariants:
//! - nothing appears under the requested name before the transfer completes: the data goes
//!   into an unnamed file of the target directory (open(2) `O_TMPFILE`), linked to its name
//!   (linkat(2)) after the last block. A transfer abandoned in any way (timeout, a client
//!   gone, a worker killed) leaves nothing behind: the file vanishes with its descriptor;
//! - nothing is replaced: the name is checked when the request comes (error 6 at once, as
//!   before) and the link fails with `EEXIST` if someone took the name meanwhile;
//! - names are resolved as for reads: beneath `root` with openat2(2) `RESOLVE_BENEATH |
//!   RESOLVE_NO_MAGICLINKS`, and the final component is never followed. The directory is
//!   held open from the request to the link, so the file lands in the directory checked;
//! - on a filesystem without `O_TMPFILE` (`EOPNOTSUPP`; `EISDIR` before Linux 3.11) a hidden
//!   name of the same directory stands in (`.preforkd-upload-` and 16 hex digits, created
//!   `O_EXCL | O_NOFOLLOW`): it is renamed into place with `RENAME_NOREPLACE` (or linked
//!   and unlinked, where the filesystem lacks that flag) and removed when the transfer
//!   fails; only a worker killed mid-transfer leaves it behind there.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::BuildHasher;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, RenameFlags, openat, openat2, renameat2};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};

use super::packet::ErrorCode;
use super::{OpenError, VIOLATION, how, relative_name, root_dir};

/// How the data is kept until the transfer completes.
#[derive(Debug)]
enum Staging {
    /// In an `O_TMPFILE` file: it has no name until linked.
    Unnamed,
    /// Under this hidden name of the directory (no `O_TMPFILE` there).
    Hidden(OsString),
    /// Under its requested name: the upload is complete.
    Linked,
}

/// A write request's file until it is complete ([`Upload::commit`]); dropped before, it
/// leaves nothing behind.
#[derive(Debug)]
pub struct Upload {
    file: File,
    /// The target directory (`O_PATH`).
    dir: OwnedFd,
    /// The requested name within it.
    name: OsString,
    staging: Staging,
}

/// The TFTP error for a failure to store the file.
fn store_error(errno: Errno) -> OpenError {
    match errno {
        Errno::EEXIST => (ErrorCode::FileExists, "file already exists", "exists"),
        Errno::ENOSPC | Errno::EDQUOT => (ErrorCode::DiskFull, "disk full", "disk-full"),
        Errno::EACCES | Errno::EPERM | Errno::EROFS => VIOLATION,
        _ => (ErrorCode::Undefined, "cannot store the file", "store-error"),
    }
}

impl Upload {
    /// Prepares an upload of `name` (as requested) beneath `root`, to be created with
    /// permissions `mode`: checks that the name is free and opens the unnamed file.
    ///
    /// # Errors
    /// The TFTP error, message and access-log result: access violation for a name that
    /// leaves `root` or a directory not writable, file not found for a missing directory,
    /// file exists, disk full.
    pub fn create(root: &Path, name: &[u8], mode: u32) -> Result<Upload, OpenError> {
        Upload::create_staged(root, name, mode, true)
    }

    /// [`Upload::create`]; with `unnamed` false, the hidden-name stand-in is used at once
    /// (for tests: the filesystems tests run on have `O_TMPFILE`).
    fn create_staged(root: &Path, name: &[u8], mode: u32, unnamed: bool) -> Result<Upload, OpenError> {
        let relative = relative_name(name).ok_or(VIOLATION)?;
        let (parent, base) = match relative.iter().rposition(|&b| b == b'/') {
            Some(slash) => (&relative[..slash], &relative[slash + 1..]),
            None => (&b"."[..], relative),
        };
        if base.is_empty() || base == b"." {
            return Err(VIOLATION);
        }
        let root = root_dir(root)?;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        let dir = openat2(&root, OsStr::from_bytes(parent), how(flags, 0)).map_err(|errno| match errno {
            Errno::ENOENT | Errno::ENOTDIR => (ErrorCode::NotFound, "directory not found", "not-found"),
            Errno::ENOSYS => (ErrorCode::Undefined, "server cannot confine paths", "no-openat2"),
            _ => VIOLATION,
        })?;
        let name = OsStr::from_bytes(base).to_owned();
        // A name taken (a file, a directory, a symlink even dangling) is refused now, as
        // O_CREAT | O_EXCL did; the link checks again at the end.
        match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => return Err(store_error(Errno::EEXIST)),
            Err(Errno::ENOENT) => {}
            Err(_) => return Err(VIOLATION),
        }
        let mode = Mode::from_bits_truncate(mode);
        if unnamed {
            let flags = OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
            match openat(&dir, ".", flags, mode) {
                Ok(fd) => {
                    return Ok(Upload { file: File::from(fd), dir, name, staging: Staging::Unnamed });
                }
                Err(Errno::EOPNOTSUPP | Errno::EISDIR) => {}
                Err(errno) => return Err(store_error(errno)),
            }
        }
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let random = std::collections::hash_map::RandomState::new();
        for attempt in 0u32..8 {
            let temp = OsString::from(format!(".preforkd-upload-{:016x}", random.hash_one(attempt)));
            match openat(&dir, temp.as_os_str(), flags, mode) {
                Ok(fd) => {
                    let staging = Staging::Hidden(temp);
                    return Ok(Upload { file: File::from(fd), dir, name, staging });
                }
                Err(Errno::EEXIST) => {}
                Err(errno) => return Err(store_error(errno)),
            }
        }
        Err(store_error(Errno::EEXIST))
    }

    /// The file to write the data to.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives the file its name: the upload is complete. Never replaces a file.
    ///
    /// # Errors
    /// The TFTP error: file exists when the name was taken since the request, disk full,
    /// or another failure to link.
    pub fn commit(&mut self) -> Result<(), OpenError> {
        let linked = match &self.staging {
            Staging::Linked => Ok(()),
            // linkat(2) of /proc/self/fd/N with AT_SYMLINK_FOLLOW needs no privilege, unlike
            // AT_EMPTY_PATH (CAP_DAC_READ_SEARCH), which is tried when /proc is not mounted.
            Staging::Unnamed => {
                let magic = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                match linkat(AT_FDCWD, magic.as_str(), &self.dir, self.name.as_os_str(), AtFlags::AT_SYMLINK_FOLLOW) {
                    Err(Errno::ENOENT) => linkat(&self.file, "", &self.dir, self.name.as_os_str(), AtFlags::AT_EMPTY_PATH),
                    other => other,
                }
            }
            Staging::Hidden(temp) => {
                let (dir, temp, name) = (&self.dir, temp.as_os_str(), self.name.as_os_str());
                match renameat2(dir, temp, dir, name, RenameFlags::RENAME_NOREPLACE) {
                    Err(Errno::EINVAL) => linkat(dir, temp, dir, name, AtFlags::empty()).map(|()| {
                        let _ = unlinkat(dir, temp, UnlinkatFlags::NoRemoveDir);
                    }),
                    other => other,
                }
            }
        };
        linked.map_err(store_error)?;
        self.staging = Staging::Linked;
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Staging::Hidden(temp) = &self.staging {
            let _ = unlinkat(&self.dir, temp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn an_upload_has_no_name_until_committed_and_never_replaces() {
        for unnamed in [true, false] {
            let root = tempfile::tempdir().unwrap();
            let r = root.path();
            std::fs::create_dir(r.join("sub")).unwrap();
            std::fs::write(r.join("taken"), b"old").unwrap();
            std::os::unix::fs::symlink("/etc/passwd", r.join("link")).unwrap();
            let mut upload = Upload::create_staged(r, b"/sub/new", 0o640, unnamed).unwrap();
            upload.file().write_all(b"data").unwrap();
            assert!(!r.join("sub/new").exists(), "no name before the end ({unnamed})");
            // Someone takes the name meanwhile: the link fails, nothing is replaced.
            let mut late = Upload::create_staged(r, b"taken2", 0o640, unnamed).unwrap();
            std::fs::write(r.join("taken2"), b"theirs").unwrap();
            assert_eq!(late.commit().unwrap_err().0, ErrorCode::FileExists);
            assert_eq!(std::fs::read(r.join("taken2")).unwrap(), b"theirs");
            upload.commit().unwrap();
            drop(upload);
            assert_eq!(std::fs::read(r.join("sub/new")).unwrap(), b"data");
            let exists = |name: &[u8]| Upload::create_staged(r, name, 0o640, unnamed).unwrap_err().0;
            assert_eq!(exists(b"taken"), ErrorCode::FileExists);
            assert_eq!(exists(b"link"), ErrorCode::FileExists, "a symlink is not followed");
            assert_eq!(exists(b"sub"), ErrorCode::FileExists);
            assert_eq!(exists(b"../x"), ErrorCode::AccessViolation);
            assert_eq!(exists(b"sub/"), ErrorCode::AccessViolation);
            assert_eq!(exists(b"missing/x"), ErrorCode::NotFound);
            // Abandoned: nothing is left, under any name.
            let abandoned = Upload::create_staged(r, b"gone", 0o640, unnamed).unwrap();
            abandoned.file().write_all(b"partial").unwrap();
            drop(abandoned);
            drop(late);
            assert_eq!(names(r), ["link", "sub", "taken", "taken2"], "({unnamed})");
        }
    }
}
