//! The pid file: written atomically, locked while the master lives, removed on exit.
//!
//! Runs in the master (and in control commands, which only read it). The file is written to a
//! temporary name in the same directory, locked with flock(2), then renamed into place, so a
//! reader never sees it half-written and the lock travels with the file. A pid file whose lock
//! is free belongs to a dead master (stale) and is replaced; a locked one means another master
//! is running.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::files;

/// A pid file problem.
#[derive(Debug, Error)]
pub enum PidFileError {
    /// Another master holds the lock on the pid file.
    #[error("another preforkd is running as pid {pid} (pid file {} is locked)", path.display())]
    Running {
        /// The pid file.
        path: PathBuf,
        /// The pid it holds.
        pid: i32,
    },
    /// Reading, writing, locking or renaming failed.
    #[error("pid file {}: {source}", path.display())]
    Io {
        /// The pid file.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// No master holds the pid file (missing, unlocked or unreadable).
    #[error("preforkd is not running (pid file {}: {reason})", path.display())]
    NotRunning {
        /// The pid file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
}

/// The master's pid file; the lock is held while this lives.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
    /// The process that created it; a forked child dropping its copy leaves the file alone.
    owner: u32,
}

impl PidFile {
    /// Writes `pid` to `path` atomically and locks it; creates its directory first when
    /// only that last component is missing ([`files::create_parent_dir`]).
    ///
    /// # Errors
    /// [`PidFileError::Running`] when a live master holds `path`, [`PidFileError::Io`] when the
    /// file cannot be written, locked or renamed into place.
    pub fn create(path: &Path, pid: i32) -> Result<Self, PidFileError> {
        let io_error = |source| PidFileError::Io { path: path.to_owned(), source };
        // Whatever is not a regular file there (a symlink, a FIFO) is replaced by the rename
        // below, never followed or read.
        if let Ok(mut existing) = files::open_regular(path, files::MAX_PID_FILE_BYTES, false) {
            if existing.try_lock().is_err() {
                let pid = read_pid(&mut existing).unwrap_or(0);
                return Err(PidFileError::Running { path: path.to_owned(), pid });
            }
            log::warn!("replacing stale pid file {}", path.display());
        }
        // Outside systemd nothing made /run/preforkd (its RuntimeDirectory=) yet.
        if files::create_parent_dir(path).map_err(io_error)? {
            log::info!("created the pid file's directory for {}", path.display());
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut temp = tempfile::Builder::new()
            .prefix(".preforkd-pid")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(io_error)?;
        temp.as_file().try_lock().map_err(|e| io_error(io::Error::other(e.to_string())))?;
        writeln!(temp, "{pid}").map_err(io_error)?;
        let file = temp.persist(path).map_err(|e| io_error(e.error))?;
        Ok(PidFile { path: path.to_owned(), file, owner: std::process::id() })
    }

    /// Where the pid file is now.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the pid file (binary upgrade: to `.oldbin`, and back if the upgrade fails).
    ///
    /// # Errors
    /// rename(2) failed.
    pub fn rename(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_owned();
        Ok(())
    }

    /// Whether the path still names this pid file (and not a newer master's).
    pub fn is_ours(&self) -> bool {
        self.still_ours()
    }

    /// Whether `self.path` still names our file (and not a newer master's).
    fn still_ours(&self) -> bool {
        match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(on_disk), Ok(ours)) => on_disk.dev() == ours.dev() && on_disk.ino() == ours.ino(),
            _ => false,
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if std::process::id() == self.owner && self.still_ours() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The pid in the pid file at `path`, if a live master holds it (its lock is taken).
///
/// The file must be a regular file of at most [`files::MAX_PID_FILE_BYTES`], not reached
/// through a symlink, holding a pid above 1. That the pid is really the master is for the
/// caller to verify (see `control`): the file only says where to look.
///
/// # Errors
/// [`PidFileError::NotRunning`] when the file is missing, unreadable, not locked or holds
/// no valid pid.
pub fn running_pid(path: &Path) -> Result<i32, PidFileError> {
    let not_running = |reason: String| PidFileError::NotRunning { path: path.to_owned(), reason };
    let mut file = files::open_regular(path, files::MAX_PID_FILE_BYTES, false)
        .map_err(|e| not_running(e.to_string()))?;
    if file.try_lock_shared().is_ok() {
        return Err(not_running("stale: no process holds its lock".into()));
    }
    read_pid(&mut file).map_err(|e| not_running(e.to_string()))
}

/// The pid written in `file`: a number above 1 (0, 1 and negative numbers would make
/// kill(2) signal a process group, init or every process).
fn read_pid(file: &mut File) -> io::Result<i32> {
    let mut text = String::new();
    file.take(files::MAX_PID_FILE_BYTES).read_to_string(&mut text)?;
    match text.trim().parse::<i32>() {
        Ok(pid) if pid > 1 => Ok(pid),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("no pid in {text:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_lock_detect_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preforkd.pid");
        let pidfile = PidFile::create(&path, 1234).unwrap();
        for forged in ["1\n", "-1\n", "0\n", "junk\n"] {
            // Rewritten in place: the lock stays, the content is not a pid to signal.
            std::fs::write(&path, forged).unwrap();
            assert!(matches!(running_pid(&path), Err(PidFileError::NotRunning { .. })), "{forged}");
        }
        std::fs::write(&path, "1234\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1234\n");
        assert_eq!(running_pid(&path).unwrap(), 1234);
        assert!(matches!(PidFile::create(&path, 99), Err(PidFileError::Running { pid: 1234, .. })));
        drop(pidfile);
        assert!(!path.exists(), "removed on drop");
        assert!(matches!(running_pid(&path), Err(PidFileError::NotRunning { .. })));
    }

    #[test]
    fn a_stale_pid_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preforkd.pid");
        std::fs::write(&path, "999999\n").unwrap();
        assert!(matches!(running_pid(&path), Err(PidFileError::NotRunning { .. })));
        let _pidfile = PidFile::create(&path, 42).unwrap();
        assert_eq!(running_pid(&path).unwrap(), 42);
    }

    #[test]
    fn a_moved_pid_file_is_not_removed_from_its_old_name_when_another_took_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("preforkd.pid");
        let oldbin = dir.path().join("preforkd.pid.oldbin");
        let mut old = PidFile::create(&path, 1).unwrap();
        old.rename(&oldbin).unwrap();
        let new = PidFile::create(&path, 2).unwrap();
        drop(old);
        assert!(!oldbin.exists());
        assert_eq!(running_pid(&path).unwrap(), 2);
        drop(new);
        assert!(!path.exists());
    }
}
