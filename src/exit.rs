//! Exit statuses, following sysexits(3) where one fits.
//!
//! Runs in both processes: the master exits with [`ExitStatus`]; a worker exits with
//! [`WORKER_EXIT_OK`] or [`WORKER_BOOT_FAILURE`], which the master reads through `waitpid(2)`.
//! The values are part of the interface and are listed in preforkd(8).

use std::process::ExitCode;

/// How the `preforkd` process ends. The numeric values are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitStatus {
    /// 0: success (configuration OK, or the daemon stopped on request).
    Ok = 0,
    /// 64 (`EX_USAGE`): bad command-line arguments.
    Usage = 64,
    /// 66 (`EX_NOINPUT`): the configuration file cannot be read.
    NoInput = 66,
    /// 69 (`EX_UNAVAILABLE`): a listener cannot be bound, the log target is unreachable, or
    /// (control commands) no daemon is running for this configuration.
    Unavailable = 69,
    /// 70 (`EX_SOFTWARE`): workers cannot boot; for a control command, the daemon rejected
    /// the reload or the upgrade failed.
    Software = 70,
    /// 71 (`EX_OSERR`): an operating system resource failed (fork, pipe, mmap, signals).
    OsErr = 71,
    /// 75 (`EX_TEMPFAIL`): a control command saw no outcome in time.
    TempFail = 75,
    /// 78 (`EX_CONFIG`): the configuration file is invalid.
    Config = 78,
}

impl From<ExitStatus> for ExitCode {
    fn from(status: ExitStatus) -> Self {
        ExitCode::from(status as u8)
    }
}

/// Exit status of a worker that stopped normally (fast or graceful stop, or master gone).
pub const WORKER_EXIT_OK: i32 = 0;

/// Exit status of a worker whose loop failed after it started (its readiness wait failed): the master
/// respawns it, with backoff.
pub const WORKER_RUNTIME_FAILURE: i32 = 4;

/// Exit status of a worker that could not set itself up (signals, poller, privileges, a
/// service's `after_fork` hook).
///
/// While the daemon starts, the master does not respawn a worker that exits with this status:
/// it stops the daemon with [`ExitStatus::Software`] instead of looping forever (gunicorn's
/// `WORKER_BOOT_ERROR`); a reload whose worker does is rolled back. A replacement worker
/// that cannot boot (later, or while the daemon starts, in the slot of a worker that had
/// booted) is respawned with a crash loop's backoff.
pub const WORKER_BOOT_FAILURE: i32 = 3;
