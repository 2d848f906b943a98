//! Opening the files an operator (or an attacker who can write a directory) names: the
//! configuration, the pid file, the scoreboard and the log file.
//!
//! Runs in the master and in the control commands, usually as root. Invariants:
//! - nothing blocks on open: every open is `O_NONBLOCK`, so a FIFO planted where a file is
//!   expected is reported instead of hanging the process;
//! - reads are bounded: only regular files are read, and never more than the caller's limit
//!   (`/dev/zero` or a huge file cannot exhaust memory);
//! - the files the master writes as root (the log file) and the state files the control
//!   commands trust (pid file, scoreboard) are opened with `O_NOFOLLOW`, so a symlink planted
//!   at their path is refused rather than followed;
//! - secrets the master reads (TLS keys and certificates, [`read_trusted`]) are reached
//!   through a symlink only when root or the master's own user owns it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;

/// Largest configuration file read: 1 MiB. A real configuration is a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Largest pid file read: 64 bytes (a pid and a newline).
pub const MAX_PID_FILE_BYTES: u64 = 64;

/// Permission bits of a log file the master creates: owner read-write, group read.
pub const LOG_FILE_MODE: u32 = 0o640;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// What kind of file `meta` describes, in words, for error messages.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_symlink() {
        "a symbolic link"
    } else {
        "a regular file"
    }
}

/// Opens `path` for reading without blocking, and checks that it is a regular file of at
/// most `max_bytes`. With `follow` false, a symlink at `path` is refused (`ELOOP`).
///
/// # Errors
/// The open(2) error, or `InvalidInput` naming what the file is instead (a FIFO, a device,
/// a directory) or saying that it is larger than `max_bytes`.
pub fn open_regular(path: &Path, max_bytes: u64, follow: bool) -> io::Result<File> {
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new().read(true).custom_flags(flags).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) && !follow {
            invalid("is a symbolic link, which is not followed".into())
        } else {
            e
        }
    })?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(invalid(format!("is {}, not a regular file", kind_of(&meta))));
    }
    if meta.len() > max_bytes {
        return Err(invalid(format!(
            "is {} bytes, more than the limit of {max_bytes} bytes",
            meta.len()
        )));
    }
    Ok(file)
}

/// Reads the regular file at `path` (symlinks followed), at most `max_bytes` of it.
///
/// # Errors
/// As [`open_regular`]; also when the file grew past `max_bytes` while being read.
pub fn read_bounded(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path, max_bytes, true)?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(invalid(format!("is more than the limit of {max_bytes} bytes")));
    }
    Ok(bytes)
}

/// Largest certificate, key or CA file read: 1 MiB (a chain of a few certificates is a few
/// KiB; a CA bundle such as Debian's is about 200 KiB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Symbolic links followed at most at the end of a path by [`read_trusted`].
const MAX_LINKS: usize = 8;

/// Reads the regular file at `path`, at most `max_bytes` of it, as the master reads TLS
/// certificates and keys (usually as root).
///
/// The rule: the last component of `path` may be a symbolic link (certbot's `live/`
/// directory is made of them), and so may each link's target in turn, but only a link owned
/// by root or by the user the master runs as is followed. A link owned by anyone else is
/// refused: its owner could point it at a file only root may read (`/etc/shadow`) and have
/// the master load it. Each link is examined through a descriptor of the link itself
/// (`O_PATH | O_NOFOLLOW`), so its owner and target are one link's; the file at the end is
/// opened with `O_NOFOLLOW`, so a link swapped in meanwhile is refused. Directories on the
/// way are trusted as for every other file the configuration names.
///
/// # Errors
/// As [`open_regular`]; `InvalidInput` for a link owned by another user or a chain of more
/// than 8 links.
pub fn read_trusted(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut at = path.to_path_buf();
    for _ in 0..=MAX_LINKS {
        let link = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
            .open(&at)?;
        let meta = link.metadata()?;
        if !meta.file_type().is_symlink() {
            let file = open_regular(&at, max_bytes, false)?;
            let mut bytes = Vec::new();
            file.take(max_bytes + 1).read_to_end(&mut bytes)?;
            if bytes.len() as u64 > max_bytes {
                return Err(invalid(format!("is more than the limit of {max_bytes} bytes")));
            }
            return Ok(bytes);
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != euid {
            return Err(invalid(format!(
                "{} is a symbolic link owned by uid {}, which is not followed (only links owned by root or by the master's user are)",
                at.display(),
                meta.uid()
            )));
        }
        // readlinkat(2) on an O_PATH descriptor of the link, with an empty path, reads that
        // very link.
        let target = nix::fcntl::readlinkat(&link, "")?;
        let target = Path::new(&target);
        at = match at.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target.to_path_buf(),
        };
    }
    Err(invalid(format!("more than {MAX_LINKS} symbolic links in a row")))
}

/// Opens the log file at `path` for appending, creating it with [`LOG_FILE_MODE`], as the
/// master does (usually as root) at start and on SIGUSR1.
///
/// A symlink at `path` is refused (`O_NOFOLLOW`), so whoever can write the log directory
/// cannot make the master append to another file. The file must be a regular file with a
/// single link (a hard link to another file is refused for the same reason) or a character
/// device such as `/dev/null`. A regular file owned by another user (an older preforkd gave
/// it to the workers' user) is taken back: it is made ours and loses write permission for
/// others, through the open descriptor, never through the path.
///
/// # Errors
/// The open(2) error, or `InvalidInput` naming what is wrong with the file.
pub fn open_log(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(LOG_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ELOOP) => {
                    invalid("is a symbolic link, which the master does not follow".into())
                }
                // A FIFO nobody reads, opened for writing without blocking.
                Some(libc::ENXIO) => invalid("is a FIFO, not a regular file".into()),
                _ => e,
            }
        })?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if kind.is_file() {
        if meta.nlink() != 1 {
            return Err(invalid(format!(
                "has {} hard links: the master only writes a file with one",
                meta.nlink()
            )));
        }
        let euid = nix::unistd::geteuid();
        if meta.uid() != euid.as_raw() {
            nix::unistd::fchown(&file, Some(euid), None).map_err(io::Error::from)?;
            log::warn!("log file {} belonged to uid {}: taken back", path.display(), meta.uid());
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 || mode & 0o7000 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(mode & LOG_FILE_MODE))?;
        }
    } else if !kind.is_char_device() {
        return Err(invalid(format!(
            "is {}, not a regular file or a character device",
            kind_of(&meta)
        )));
    }
    // Writes block as usual from here on (a character device may honour O_NONBLOCK).
    let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
    fcntl(&file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    Ok(file)
}

/// What [`open_log`] would say about `path`, without creating or changing anything: for
/// `preforkd check`. A missing file is fine if its directory exists.
///
/// # Errors
/// A message saying what startup would refuse.
pub fn check_log_path(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err("is a symbolic link, which the master does not follow".into())
        }
        Ok(meta) if meta.file_type().is_file() && meta.nlink() != 1 => {
            Err(format!("has {} hard links: the master only writes a file with one", meta.nlink()))
        }
        Ok(meta) if meta.file_type().is_file() || meta.file_type().is_char_device() => Ok(()),
        Ok(meta) => Err(format!("is {}, not a regular file or a character device", kind_of(&meta))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => check_parent_dir(path),
        Err(e) => Err(e.to_string()),
    }
}

/// The directory that holds `path` (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Creates the directory that will hold `path` when it is missing but its own parent is a
/// directory, as systemd's `RuntimeDirectory=` does for the packaged unit (mode 0755, less
/// the umask); only that last component is ever created. Returns whether it created it.
///
/// # Errors
/// mkdir(2) failed (a symlink or anything else already at that name is never followed).
pub fn create_parent_dir(path: &Path) -> io::Result<bool> {
    let dir = parent_of(path);
    if std::fs::symlink_metadata(dir).is_ok() {
        return Ok(false);
    }
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// What startup's [`create_parent_dir`] and the file's creation would meet, for `preforkd
/// check`: the directory that will hold `path` exists, or it is missing and its parent is a
/// directory this user may write, so startup creates it.
///
/// # Errors
/// A message naming the directory and what is wrong with it.
pub fn check_creatable_parent_dir(path: &Path) -> Result<(), String> {
    let dir = parent_of(path);
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let above = parent_of(dir);
            match std::fs::metadata(above) {
                Ok(meta) if meta.is_dir() => {
                    nix::unistd::access(above, nix::unistd::AccessFlags::W_OK).map_err(|e| {
                        format!(
                            "directory {} is missing and cannot be created in {}: {e}",
                            dir.display(),
                            above.display()
                        )
                    })
                }
                _ => Err(format!(
                    "directory {}: {e}, nor does {} exist to create it in",
                    dir.display(),
                    above.display()
                )),
            }
        }
        _ => check_parent_dir(path),
    }
}

/// Whether the directory that will hold `path` exists and is a directory.
///
/// # Errors
/// A message naming the directory and what is wrong with it.
pub fn check_parent_dir(path: &Path) -> Result<(), String> {
    let dir = parent_of(path);
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(meta) => Err(format!("{} is {}, not a directory", dir.display(), kind_of(&meta))),
        Err(e) => Err(format!("directory {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn a_missing_last_directory_is_created_and_a_deeper_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("run/preforkd.pid");
        assert_eq!(check_creatable_parent_dir(&pid), Ok(()));
        assert!(create_parent_dir(&pid).unwrap());
        assert!(dir.path().join("run").is_dir());
        assert!(!create_parent_dir(&pid).unwrap(), "there already");
        let deeper = dir.path().join("a/b/preforkd.pid");
        let error = check_creatable_parent_dir(&deeper).unwrap_err();
        assert!(error.contains("nor does"), "{error}");
        assert!(create_parent_dir(&deeper).is_err(), "only the last component");
        symlink(dir.path().join("elsewhere"), dir.path().join("link")).unwrap();
        assert!(!create_parent_dir(&dir.path().join("link/p.pid")).unwrap(), "not followed");
        assert!(!dir.path().join("elsewhere").exists());
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let error = read_bounded(&fifo, MAX_CONFIG_BYTES).unwrap_err();
        assert!(error.to_string().contains("a FIFO"), "{error}");
        assert!(open_log(&fifo).unwrap_err().to_string().contains("a FIFO"));
    }

    #[test]
    fn devices_and_large_files_are_not_read() {
        let error = read_bounded(Path::new("/dev/zero"), MAX_CONFIG_BYTES).unwrap_err();
        assert!(error.to_string().contains("character device"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let error = read_bounded(&big, MAX_CONFIG_BYTES).unwrap_err();
        assert!(error.to_string().contains("more than the limit of 1048576 bytes"), "{error}");
        std::fs::write(&big, b"a = 1\n").unwrap();
        assert_eq!(read_bounded(&big, MAX_CONFIG_BYTES).unwrap(), b"a = 1\n");
    }

    #[test]
    fn secrets_are_read_through_links_of_root_or_our_user_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("privkey1.pem");
        std::fs::write(&key, b"secret\n").unwrap();
        let link = dir.path().join("privkey.pem");
        symlink("privkey1.pem", &link).unwrap();
        assert_eq!(read_trusted(&link, MAX_PEM_BYTES).unwrap(), b"secret\n", "our own link");
        // A link another user owns (only root can make one here) is not followed.
        if nix::unistd::geteuid().is_root() {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                &link,
                Some(nix::unistd::Uid::from_raw(4242)),
                None,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .unwrap();
            let error = read_trusted(&link, MAX_PEM_BYTES).unwrap_err().to_string();
            assert!(error.contains("owned by uid 4242, which is not followed"), "{error}");
        }
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(read_trusted(&fifo, MAX_PEM_BYTES).unwrap_err().to_string().contains("a FIFO"));
        let looping = dir.path().join("loop");
        symlink("loop", &looping).unwrap();
        assert!(
            read_trusted(&looping, MAX_PEM_BYTES)
                .unwrap_err()
                .to_string()
                .contains("symbolic links in a row")
        );
    }

    #[test]
    fn the_log_file_is_never_reached_through_a_symlink_or_a_hard_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious\n").unwrap();
        let link = dir.path().join("preforkd.log");
        symlink(&victim, &link).unwrap();
        assert!(open_log(&link).unwrap_err().to_string().contains("symbolic link"));
        assert!(check_log_path(&link).unwrap_err().contains("symbolic link"));
        std::fs::remove_file(&link).unwrap();
        std::fs::hard_link(&victim, &link).unwrap();
        assert!(open_log(&link).unwrap_err().to_string().contains("hard links"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
        std::fs::remove_file(&link).unwrap();
        let file = open_log(&link).unwrap();
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, LOG_FILE_MODE);
        assert!(check_log_path(&dir.path().join("missing/preforkd.log")).is_err());
        assert!(check_log_path(&dir.path().join("new.log")).is_ok());
    }
}
