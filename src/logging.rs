//! Log targets behind the `log` facade.
//!
//! Runs in both processes. The master calls [`init`] first thing (stderr, `info`), then
//! [`apply`] once the configuration is read. A worker calls [`set_worker`] right after
//! `fork(2)`, so its lines carry its own role and pid. The master is single-threaded, so the
//! state mutex is never held across `fork(2)`.
//!
//! stderr lines: `TIME LEVEL ROLE pid=PID: MESSAGE`, e.g.
//! `2026-11-22T10:00:00.123Z INFO worker=0 gen=1 pid=4242: accepting`. Each line is written
//! with one `write(2)`, so lines of several processes sharing a pipe do not interleave.
//! syslog: RFC 3164 over `/dev/log` with the configured facility; the role leads the message.
//! file: the stderr format, appended (`O_APPEND`) to a file that only the master opens (no
//! symlink followed, see [`crate::files::open_log`]) and reopens on SIGUSR1; workers write
//! their lines through a pipe the master relays (see `relay.rs`), so they never own the file.
//! A line that cannot be written (full disk, full pipe, syslog gone) is counted
//! (`dropped_lines`); the master reports the count.
//! Access lines use the `access` target (see [`ACCESS_TARGET`]).
//!
//! With `log.format = "json"` ([`LogFormat::Json`]) every line, access lines included, is
//! one JSON object instead (`json.rs` names the members): on stderr and in the file one
//! object per line; to syslog the object is the message, after the RFC 3164 header (with
//! rsyslog, `mmjsonparse` with `cookie=""` reads it).

mod json;
mod relay;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Formatter3164, LoggerBackend};
use thiserror::Error;

use crate::files;
use crate::rate::RateLimit;
pub use relay::{RELAY_PIPE_BYTES, dropped as dropped_lines};

/// `[log]`: log target and verbosity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Where lines go (`log.target`; its default is in the configuration's key table,
    /// preforkd.toml(5)).
    pub target: LogTarget,
    /// Most verbose level written (`log.level`).
    pub level: log::LevelFilter,
    /// Write one access line per closed connection, at `info` (`log.access_log`).
    pub access_log: bool,
    /// How each line is written (`log.format`).
    pub format: LogFormat,
}

/// How each log line is written (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `TIME LEVEL ROLE pid=PID: MESSAGE`, access lines as `key=value` pairs.
    #[default]
    Text,
    /// One JSON object per line, with stable member names (see preforkd.toml(5)).
    Json,
}

impl LogFormat {
    /// Both formats, as the configuration writes them.
    pub const ALL: [LogFormat; 2] = [LogFormat::Text, LogFormat::Json];

    /// The configuration spelling: `"text"` or `"json"`.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error, one line per record with time, level, role and pid (systemd's journal
    /// picks it up as is).
    Stderr,
    /// The local syslog daemon (RFC 3164 over a unix datagram socket).
    Syslog {
        /// Facility of every message (`log.facility`).
        facility: SyslogFacility,
        /// The syslog socket (`log.syslog_socket`); `None` tries `/dev/log`, then
        /// `/var/run/syslog`.
        socket: Option<PathBuf>,
    },
    /// A file, opened for appending; reopened on SIGUSR1 (for logrotate).
    File(PathBuf),
}

/// A syslog(3) facility (`daemon`, `local0` ... `local7`, ...).
#[derive(Debug, Clone, Copy)]
pub struct SyslogFacility(pub syslog::Facility);

impl PartialEq for SyslogFacility {
    fn eq(&self, other: &Self) -> bool {
        self.0 as i32 == other.0 as i32
    }
}

impl Eq for SyslogFacility {}

/// `log` target of access lines (one per closed connection).
pub const ACCESS_TARGET: &str = "access";

/// Which process is logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The supervising master.
    Master,
    /// A worker, by its slot in the master's table and its generation.
    Worker {
        /// Slot index, from 0.
        slot: usize,
        /// Configuration generation, from 1.
        generation: u64,
    },
    /// The exec spawner of a generation.
    Spawner {
        /// Configuration generation, from 1.
        generation: u64,
    },
    /// The health checker of a generation (backend probes and name resolution).
    Checker {
        /// Configuration generation, from 1.
        generation: u64,
    },
}

enum Sink {
    Stderr,
    Syslog(syslog::Logger<LoggerBackend, Formatter3164>),
    /// The master's log file.
    File {
        path: PathBuf,
        file: File,
    },
    /// A worker's end of the relay pipe to the master, which writes the file.
    Relay(OwnedFd),
}

struct State {
    role: Role,
    pid: u32,
    sink: Sink,
    format: LogFormat,
    /// The master's relay pipe, created with the first file target and kept for the life
    /// of the master (workers of every generation write to it).
    relay: Option<relay::Relay>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static LOGGER: Logger = Logger;

/// The log target could not be set up.
#[derive(Debug, Error)]
pub enum LogError {
    /// The syslog socket (`/dev/log`) could not be opened.
    #[error("could not connect to syslog: {0}")]
    Syslog(String),
    /// The log file could not be opened (or it is a symlink, a FIFO, a hard link ...).
    #[error("could not open log file {}: {source}", path.display())]
    File {
        /// The log file.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
}

fn open_log_file(path: &Path) -> Result<File, LogError> {
    files::open_log(path).map_err(|source| LogError::File { path: path.to_owned(), source })
}

/// Reopens the log file (SIGUSR1, after logrotate moved it away); nothing to do for stderr
/// and syslog, nor in a worker (the master writes the file). Returns whether a file was
/// reopened.
///
/// # Errors
/// [`LogError::File`] when the file cannot be opened again (a symlink planted at its path
/// included); logging goes on to the old one.
pub fn reopen() -> Result<bool, LogError> {
    let mut guard = lock();
    let Some(State { sink: Sink::File { path, file }, .. }) = guard.as_mut() else {
        return Ok(false);
    };
    *file = open_log_file(path)?;
    Ok(true)
}

/// Installs the logger: stderr, level `info`, role master. Call once, first thing.
pub fn init() {
    *lock() = Some(State {
        role: Role::Master,
        pid: std::process::id(),
        sink: Sink::Stderr,
        format: LogFormat::Text,
        relay: None,
    });
    // Only fails if a logger is already installed, which leaves that one in place.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

/// Switches to the configured target and level.
///
/// # Errors
/// [`LogError::Syslog`] when `/dev/log` cannot be reached; logging stays on stderr then.
pub fn apply(config: &LogConfig) -> Result<(), LogError> {
    let sink = match &config.target {
        LogTarget::Stderr => Sink::Stderr,
        LogTarget::Syslog { facility, socket } => {
            let formatter = Formatter3164 {
                facility: facility.0,
                hostname: None,
                process: "preforkd".into(),
                pid: std::process::id(),
            };
            let logger = match socket {
                Some(path) => syslog::unix_custom(formatter, path),
                None => syslog::unix(formatter),
            };
            Sink::Syslog(logger.map_err(|e| LogError::Syslog(e.to_string()))?)
        }
        LogTarget::File(path) => Sink::File { path: path.clone(), file: open_log_file(path)? },
    };
    relay::share_counter();
    if let Some(state) = lock().as_mut() {
        if matches!(sink, Sink::File { .. }) && state.relay.is_none() {
            state.relay = Some(relay::Relay::new().map_err(|source| LogError::File {
                path: PathBuf::from("(relay pipe)"),
                source,
            })?);
        }
        state.sink = sink;
        state.format = config.format;
    }
    log::set_max_level(config.level);
    Ok(())
}

/// The descriptor the master polls for workers' lines (file target only). It stays open for
/// the life of the master.
pub fn relay_fd() -> Option<RawFd> {
    lock().as_ref()?.relay.as_ref().map(relay::Relay::read_fd)
}

/// Master: copies the workers' lines waiting in the relay pipe to the log file (to stderr if
/// the target is no longer a file after a reload). Lines that cannot be written are counted.
pub fn relay_workers_lines() {
    let mut guard = lock();
    let Some(State { sink, relay: Some(relay), .. }) = guard.as_mut() else { return };
    relay.drain(|lines| {
        let written = match sink {
            Sink::File { file, .. } => file.write_all(lines),
            _ => io::stderr().lock().write_all(lines),
        };
        if written.is_err() {
            // Part of the batch may have landed; count it all, the disk said no.
            relay::count_dropped(lines.iter().filter(|&&b| b == b'\n').count() as u64);
        }
    });
}

/// Takes this process's pid again (after daemon mode forked the master).
pub fn refresh_pid() {
    if let Some(state) = lock().as_mut() {
        state.pid = std::process::id();
        if let Sink::Syslog(logger) = &mut state.sink {
            logger.formatter.pid = state.pid;
        }
    }
}

/// Marks this process as a worker (call right after `fork(2)`, in the child). With a file
/// target, the worker closes its copy of the file and keeps only the relay pipe's write end.
pub fn set_worker(slot: usize, generation: u64) {
    set_role(Role::Worker { slot, generation });
}

/// Marks this process as the exec spawner of `generation`, as [`set_worker`] does a worker.
pub fn set_spawner(generation: u64) {
    set_role(Role::Spawner { generation });
}

/// Marks this process as the health checker of `generation`, as [`set_worker`] does a
/// worker.
pub fn set_checker(generation: u64) {
    set_role(Role::Checker { generation });
}

fn set_role(role: Role) {
    if let Some(state) = lock().as_mut() {
        state.role = role;
        state.pid = std::process::id();
        let relay = state.relay.take();
        if let (Sink::File { .. }, Some(relay)) = (&state.sink, relay) {
            state.sink = Sink::Relay(relay.into_writer());
        }
        if let Sink::Syslog(logger) = &mut state.sink {
            logger.formatter.pid = state.pid;
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    // A panic while logging must not silence every later line.
    STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut guard = lock();
        let Some(state) = guard.as_mut() else { return };
        let written = match state.format {
            LogFormat::Text => write_text(state, record),
            LogFormat::Json => write_json(state, record),
        };
        if !written {
            relay::count_dropped(1);
        }
    }

    fn flush(&self) {}
}

/// Writes `record` in the text format; whether it was written (a failure is counted, never
/// reported here, where it would fail too, nor a panic).
fn write_text(state: &mut State, record: &Record<'_>) -> bool {
    let mut line = String::with_capacity(160);
    match state.role {
        Role::Master => line.push_str("master"),
        Role::Worker { slot, generation } => {
            let _ = write!(line, "worker={slot} gen={generation}");
        }
        Role::Spawner { generation } => {
            let _ = write!(line, "spawner gen={generation}");
        }
        Role::Checker { generation } => {
            let _ = write!(line, "checker gen={generation}");
        }
    }
    let _ = write!(line, " pid={}: {}", state.pid, record.args());
    let stamped = |line: &str| {
        let time = humantime::format_rfc3339_millis(SystemTime::now());
        format!("{time} {} {line}\n", record.level())
    };
    emit(&mut state.sink, record.level(), line, stamped)
}

/// Writes `record` as one JSON object; as [`write_text`].
fn write_json(state: &mut State, record: &Record<'_>) -> bool {
    let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let message = record.args().to_string();
    let fields = json::Record {
        time: &time,
        level: record.level(),
        pid: state.pid,
        role: state.role,
        target: record.target(),
        message: &message,
    };
    // The relay pipe takes a line whole only up to PIPE_BUF: the object is cut to fit, so
    // that it stays one valid object.
    let max = matches!(state.sink, Sink::Relay(_)).then_some(nix::libc::PIPE_BUF - 1);
    let object = json::render(&fields, max);
    emit(&mut state.sink, record.level(), object, |object| format!("{object}\n"))
}

/// Writes one line to `sink`: `line` as syslog's message (which has a header of its own), or
/// `stream(line)`, the whole line with its newline, to stderr, the file or the relay pipe.
/// Whether it was written.
fn emit(sink: &mut Sink, level: Level, line: String, stream: impl Fn(&str) -> String) -> bool {
    match sink {
        Sink::Stderr => io::stderr().lock().write_all(stream(&line).as_bytes()).is_ok(),
        // O_APPEND: each line lands whole at the end.
        Sink::File { file, .. } => file.write_all(stream(&line).as_bytes()).is_ok(),
        Sink::Relay(pipe) => {
            // `send` counts a line the pipe cannot take.
            relay::send(pipe, stream(&line).as_bytes());
            true
        }
        Sink::Syslog(logger) => match level {
            Level::Error => logger.err(line),
            Level::Warn => logger.warning(line),
            Level::Info => logger.info(line),
            Level::Debug | Level::Trace => logger.debug(line),
        }
        .is_ok(),
    }
}

/// Decides when the master reports dropped log lines: at most once per interval, and only
/// when the count grew. Pure: time and the count are passed in.
#[derive(Debug, Clone)]
pub struct DropReport {
    limit: RateLimit,
    reported: u64,
}

impl DropReport {
    /// At most one report per `interval`.
    pub const fn new(interval: std::time::Duration) -> Self {
        DropReport { limit: RateLimit::new(interval), reported: 0 }
    }

    /// `Some(new)` if a report is due at `now` for a total of `total` dropped lines, `new`
    /// being how many were dropped since the last report.
    pub fn due(&mut self, now: std::time::Instant, total: u64) -> Option<u64> {
        if total <= self.reported || now < self.next(now) {
            return None;
        }
        self.limit.allow(now)?;
        let new = total - self.reported;
        self.reported = total;
        Some(new)
    }

    /// When the next report may be made: `now` if one is allowed now.
    fn next(&self, now: std::time::Instant) -> std::time::Instant {
        self.limit.next_allowed(now)
    }

    /// When a report of `total` lines will be due, for the master's wait; `None` when every
    /// dropped line has been reported.
    pub fn deadline(&self, now: std::time::Instant, total: u64) -> Option<std::time::Instant> {
        (total > self.reported).then(|| self.next(now))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::DropReport;

    #[test]
    fn dropped_lines_are_reported_once_per_interval_with_the_new_count() {
        let mut report = DropReport::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(report.due(t0, 0), None);
        assert_eq!(report.deadline(t0, 0), None);
        assert_eq!(report.due(t0, 3), Some(3));
        assert_eq!(report.due(t0 + Duration::from_secs(1), 50), None, "too soon");
        assert_eq!(report.deadline(t0, 50), Some(t0 + Duration::from_secs(10)));
        assert_eq!(report.due(t0 + Duration::from_secs(10), 50), Some(47));
        assert_eq!(report.due(t0 + Duration::from_secs(30), 50), None, "nothing new");
    }
}
