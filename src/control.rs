//! Control commands: `preforkd reload|stop|quit|reopen|upgrade|status [--json] -c FILE`.
//!
//! Runs in a short-lived process of its own. It reads the configuration for `pid_file`,
//! finds the master through the locked pid file, sends the signal, and waits for the
//! *outcome* on the master's scoreboard (reload applied or rejected, logs reopened, new
//! master ready) or for the master to be gone. Waiting polls with a deadline.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cli::Command;
use crate::clock::{monotonic_ms, unix_ms};
use crate::config;
use crate::exit::ExitStatus;
use crate::master::FAST_STOP_GRACE;
use crate::pidfile;
use crate::scoreboard::{self, Refusal, Scoreboard, SlotState, TlsFailure};
use crate::services::Registry;
use crate::status_json;
use crate::sys;

/// How long `reload`, `reopen` and `upgrade` wait for the outcome.
pub const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// Runs a control command against the daemon of `config_path`, or of the pid file
/// `pid_file` when given (`--pid-file`); `services` are the `service` names the
/// configuration may use.
pub fn run(
    command: &Command,
    config_path: &Path,
    pid_file: Option<&Path>,
    services: &Registry,
) -> ExitStatus {
    match execute(command, config_path, pid_file, services) {
        Ok(message) => {
            let _ = writeln!(std::io::stdout(), "{message}");
            ExitStatus::Ok
        }
        Err((status, message)) => {
            let _ = writeln!(std::io::stderr(), "preforkd {}: {message}", name(command));
            status
        }
    }
}

fn name(command: &Command) -> &'static str {
    match command {
        Command::Run => "run",
        Command::Check => "check",
        Command::Reload => "reload",
        Command::Stop => "stop",
        Command::Quit => "quit",
        Command::Reopen => "reopen",
        Command::Upgrade => "upgrade",
        Command::Status { .. } => "status",
        Command::Import(_) => "import",
    }
}

type Outcome = Result<String, (ExitStatus, String)>;

/// Where a control command finds the master: the pid file, and the graceful timeout `quit`
/// waits for.
struct Located {
    pid_path: std::path::PathBuf,
    graceful_timeout: Duration,
}

/// Finds the master of `config_path` (or of `pid_file`). `status`, `stop` and `quit` also
/// work while the file is invalid (an operator is editing it): they read `daemon.pid_file`
/// leniently and say so on stderr. The others need a valid file.
fn locate(
    command: &Command,
    config_path: &Path,
    pid_file: Option<&Path>,
    services: &Registry,
) -> Result<Located, (ExitStatus, String)> {
    let not_set = || {
        (
            ExitStatus::Config,
            format!(
                "daemon.pid_file is not set in {}: the running master cannot be found (or give --pid-file)",
                config_path.display()
            ),
        )
    };
    let error = match config::load(config_path, services) {
        Ok(config) => {
            let pid_path =
                pid_file.map(Path::to_owned).or(config.daemon.pid_file).ok_or_else(not_set)?;
            return Ok(Located { pid_path, graceful_timeout: config.daemon.graceful_timeout });
        }
        Err(error) => error,
    };
    let lenient = matches!(command, Command::Status { .. } | Command::Stop | Command::Quit);
    if !lenient {
        return Err((error.exit_status(), error.to_string()));
    }
    let keys = config::lenient::control_keys(config_path).unwrap_or_default();
    let Some(pid_path) = pid_file.map(Path::to_owned).or(keys.pid_file) else {
        return Err((error.exit_status(), error.to_string()));
    };
    let _ = writeln!(
        std::io::stderr(),
        "preforkd {command}: {config} is not valid now (`preforkd check -c {config}` lists why); the master is looked up through {pid}",
        command = name(command),
        config = config_path.display(),
        pid = pid_path.display()
    );
    let graceful_timeout = keys
        .graceful_timeout
        .or_else(|| config::keys::GRACEFUL_TIMEOUT.default_duration())
        .unwrap_or_default();
    Ok(Located { pid_path, graceful_timeout })
}

fn execute(
    command: &Command,
    config_path: &Path,
    pid_file: Option<&Path>,
    services: &Registry,
) -> Outcome {
    let Located { pid_path, graceful_timeout } = locate(command, config_path, pid_file, services)?;
    let pid =
        pidfile::running_pid(&pid_path).map_err(|e| (ExitStatus::Unavailable, e.to_string()))?;
    let board_path = scoreboard::path_for(&pid_path);
    let board =
        Scoreboard::open(&board_path).map_err(|e| (ExitStatus::Unavailable, e.to_string()))?;
    if let &Command::Status { json } = command {
        // Reading the scoreboard signals nothing: no master to verify.
        let old = old_master(&pid_path);
        return Ok(match (json, &old) {
            (true, _) => status_json::render_with(&board, old.as_ref()),
            (false, None) => status(&board),
            (false, Some(old)) => format!(
                "{}\n\nthe old master of a binary upgrade still runs (its workers retiring):\n{}",
                status(&board),
                status(old)
            ),
        });
    }
    let master = Target::verify(pid, &board, &board_path)?;
    let header = board.header();
    match command {
        Command::Stop => stop(&master, Signal::SIGTERM, FAST_STOP_GRACE + Duration::from_secs(10)),
        Command::Quit => stop(&master, Signal::SIGQUIT, graceful_timeout + Duration::from_secs(10)),
        Command::Reload => {
            let before = (
                header.reloads_ok.load(Ordering::Acquire),
                header.reloads_failed.load(Ordering::Acquire),
            );
            master.send(Signal::SIGHUP)?;
            wait_for("the reload outcome", || {
                let ok = header.reloads_ok.load(Ordering::Acquire);
                let failed = header.reloads_failed.load(Ordering::Acquire);
                if failed != before.1 {
                    Some(Err((
                        ExitStatus::Software,
                        format!("reload rejected: {}", board.message()),
                    )))
                } else if ok != before.0 {
                    let generation = header.generation.load(Ordering::Relaxed);
                    Some(Ok(format!("reload applied: generation {generation} serving")))
                } else {
                    None
                }
            })
        }
        Command::Reopen => {
            let before = header.reopens.load(Ordering::Acquire);
            let failed_before = header.reopens_failed.load(Ordering::Acquire);
            master.send(Signal::SIGUSR1)?;
            wait_for("the log reopen", || {
                if header.reopens_failed.load(Ordering::Acquire) != failed_before {
                    return Some(Err((
                        ExitStatus::Software,
                        format!("reopen failed: {}", board.message()),
                    )));
                }
                (header.reopens.load(Ordering::Acquire) != before)
                    .then(|| Ok("logs reopened".to_owned()))
            })
        }
        Command::Upgrade => upgrade(&master, &board, &pid_path),
        Command::Run | Command::Check | Command::Status { .. } | Command::Import(_) => {
            unreachable!("handled above, or not a control command")
        }
    }
}

/// The master a control command signals, verified to be the process that created the
/// scoreboard, never just whatever pid a file holds.
struct Target {
    pid: Pid,
    /// Refers to the verified process itself (pidfd_open(2)): a signal sent through it
    /// cannot reach a process that reuses the pid. `None` on kernels before 5.3.
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Target {
    /// Checks that `pid` (from the pid file) is the master recorded in `board`: the same pid,
    /// the same start time (`/proc/PID/stat`), and a scoreboard file owned by the user that
    /// process runs as (only the master's user can have written it).
    fn verify(
        pid: i32,
        board: &Scoreboard,
        board_path: &Path,
    ) -> Result<Target, (ExitStatus, String)> {
        let refuse = |why: String| {
            Err((ExitStatus::Unavailable, format!("refusing to signal pid {pid}: {why}")))
        };
        let header = board.header();
        let recorded = header.master_pid.load(Ordering::Acquire);
        if recorded != pid {
            return refuse(format!(
                "the pid file names it, but the scoreboard {} was written by master pid {recorded}",
                board_path.display()
            ));
        }
        // Opened before the checks: if they pass, this descriptor is the checked process.
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSYS) => None,
            Err(e) => return refuse(format!("{e}")),
        };
        let started = header.master_start_ticks.load(Ordering::Relaxed);
        match sys::process_start_ticks(pid) {
            Ok(ticks) if started != 0 && ticks == started => {}
            Ok(_) => {
                return refuse(format!(
                    "it is not the master that wrote {} (its start time differs): the pid was reused or a file forged",
                    board_path.display()
                ));
            }
            Err(e) => return refuse(e.to_string()),
        }
        let owner = |path: &str| std::fs::metadata(path).map(|m| m.uid());
        match (owner(&format!("/proc/{pid}")), board.owner()) {
            (Ok(process), Some(file)) if process == file => {}
            (Ok(process), file) => {
                return refuse(format!(
                    "it runs as uid {process} but {} belongs to uid {}",
                    board_path.display(),
                    file.map_or("unknown".into(), |u| u.to_string())
                ));
            }
            (Err(e), _) => return refuse(e.to_string()),
        }
        Ok(Target { pid: Pid::from_raw(pid), pidfd })
    }

    fn send(&self, signal: Signal) -> Result<(), (ExitStatus, String)> {
        let sent = match &self.pidfd {
            Some(pidfd) => sys::pidfd_send_signal(pidfd, signal),
            None => kill(self.pid, signal).map_err(std::io::Error::from),
        };
        sent.map_err(|e| {
            let pid = self.pid;
            (ExitStatus::Unavailable, format!("could not send {signal} to master pid {pid}: {e}"))
        })
    }
}

fn wait_for(what: &str, mut check: impl FnMut() -> Option<Outcome>) -> Outcome {
    let deadline = Instant::now() + OUTCOME_TIMEOUT;
    loop {
        if let Some(outcome) = check() {
            return outcome;
        }
        if Instant::now() >= deadline {
            return Err((
                ExitStatus::TempFail,
                format!("no answer for {what} within {OUTCOME_TIMEOUT:?}"),
            ));
        }
        thread::sleep(POLL);
    }
}

/// Whether `pid` still runs (a zombie counts as gone).
fn alive(pid: Pid) -> bool {
    if kill(pid, None) == Err(Errno::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()),
            Some("Z" | "X")
        ),
        Err(_) => false,
    }
}

fn stop(target: &Target, signal: Signal, patience: Duration) -> Outcome {
    target.send(signal)?;
    let master = target.pid;
    let deadline = Instant::now() + patience;
    while alive(master) {
        if Instant::now() >= deadline {
            return Err((
                ExitStatus::TempFail,
                format!("master pid {master} still running after {patience:?}"),
            ));
        }
        thread::sleep(POLL);
    }
    Ok(format!("master pid {master} stopped"))
}

fn upgrade(target: &Target, board: &Scoreboard, pid_path: &Path) -> Outcome {
    let header = board.header();
    let failed_before = header.upgrades_failed.load(Ordering::Acquire);
    target.send(Signal::SIGUSR2)?;
    let master = target.pid;
    wait_for("the new master", || {
        if header.upgrades_failed.load(Ordering::Acquire) != failed_before {
            return Some(Err((ExitStatus::Software, board.message())));
        }
        let new = pidfile::running_pid(pid_path).ok().filter(|&pid| pid != master.as_raw())?;
        let new_board = Scoreboard::open(&scoreboard::path_for(pid_path)).ok()?;
        if new_board.header().master_pid.load(Ordering::Acquire) != new
            || new_board.header().ready_unix_ms.load(Ordering::Acquire) == 0
        {
            return None;
        }
        let target = new_board.header().target_workers.load(Ordering::Relaxed) as usize;
        let ready = new_board.slots().iter().filter(|s| s.state() == SlotState::Ready).count();
        (ready >= target).then(|| {
            Ok(format!(
                "new master pid {new} is ready with {ready} workers; the old master pid {master} still serves: \
                 send it WINCH, then QUIT (kill -WINCH {master}; kill -QUIT {master})"
            ))
        })
    })
}

fn status(board: &Scoreboard) -> String {
    let header = board.header();
    let now_unix = unix_ms();
    let now_mono = monotonic_ms();
    let age = |since_ms: u64| {
        humantime::format_duration(Duration::from_secs(now_unix.saturating_sub(since_ms) / 1000))
    };
    let mut out = format!(
        "master pid {}, generation {}, up {}, {} workers wanted, reloads {} applied / {} rejected, {} log lines dropped, {} worker slots\n",
        header.master_pid.load(Ordering::Relaxed),
        header.generation.load(Ordering::Relaxed),
        age(header.started_unix_ms.load(Ordering::Relaxed)),
        header.target_workers.load(Ordering::Relaxed),
        header.reloads_ok.load(Ordering::Relaxed),
        header.reloads_failed.load(Ordering::Relaxed),
        header.log_lines_dropped.load(Ordering::Relaxed),
        board.slots().len(),
    );
    out.push_str(
        "slot  pid      gen  state     open  accepted  bytes_in    bytes_out   uptime  heartbeat\n",
    );
    for (slot, score) in board.slots().iter().enumerate() {
        let pid = score.pid.load(Ordering::Acquire);
        let state = score.state();
        if pid == 0 || state == SlotState::Empty {
            continue;
        }
        let beat = now_mono.saturating_sub(score.heartbeat_ms.load(Ordering::Relaxed));
        out.push_str(&format!(
            "{slot:<5} {pid:<8} {:<4} {:<9} {:<5} {:<9} {:<11} {:<11} {:<7} {beat}ms ago\n",
            score.generation.load(Ordering::Relaxed),
            state.name(),
            score.open.load(Ordering::Relaxed),
            score.accepted.load(Ordering::Relaxed),
            score.bytes_in.load(Ordering::Relaxed),
            score.bytes_out.load(Ordering::Relaxed),
            age(score.started_unix_ms.load(Ordering::Relaxed)).to_string(),
        ));
    }
    out.push_str(&children(board, now_unix));
    out.push_str(&refusals(board));
    out.push_str(&handshakes(board));
    out.push_str(&backends(board));
    out.trim_end().to_owned()
}

/// `children supervised by draining workers:` then one line per child: the exec programs a
/// retiring worker still serves after a reload or an upgrade (empty when there is none).
fn children(board: &Scoreboard, now_unix: u64) -> String {
    let mut out = String::new();
    for (slot, score) in board.slots().iter().enumerate() {
        let pid = score.pid.load(Ordering::Acquire);
        let (total, listed) = board.children(slot);
        if pid == 0 || score.state() == SlotState::Empty || total == 0 {
            continue;
        }
        if out.is_empty() {
            out.push_str("children supervised by draining workers:\n");
        }
        let generation = score.generation.load(Ordering::Relaxed);
        let worker = format!("worker slot {slot}, pid {pid}, generation {generation}");
        for child in &listed {
            let listener = board.listener_name(usize::from(child.listener)).unwrap_or_default();
            let age = Duration::from_secs(now_unix.saturating_sub(child.started_unix_ms) / 1000);
            let age = humantime::format_duration(age);
            out.push_str(&format!("  child {} on {listener}, up {age}: {worker}\n", child.pid));
        }
        if total > listed.len() as u64 {
            out.push_str(&format!("  and {} more: {worker}\n", total - listed.len() as u64));
        }
    }
    out
}

/// One line per listener that has made or failed a TLS handshake: `tls NAME: handshakes N,
/// resumed N; failed: timeout N, ...`.
fn handshakes(board: &Scoreboard) -> String {
    let mut out = String::new();
    for totals in board.listener_totals() {
        let failed: u64 = totals.tls_failed.iter().sum();
        if totals.tls_handshakes + failed == 0 {
            continue;
        }
        let reasons: Vec<String> = TlsFailure::ALL
            .iter()
            .map(|&reason| format!("{} {}", reason.name(), totals.tls_failed(reason)))
            .collect();
        out.push_str(&format!(
            "tls {}: handshakes {}, resumed {}; failed: {}\n",
            totals.name,
            totals.tls_handshakes,
            totals.tls_resumed,
            reasons.join(", ")
        ));
    }
    out
}

/// The scoreboard of a binary upgrade's old master (`PID_FILE.oldbin`), while it runs: its
/// retiring workers may still serve exec children and TFTP transfers.
fn old_master(pid_path: &Path) -> Option<Scoreboard> {
    let old = crate::master::oldbin(pid_path);
    pidfile::running_pid(&old).ok()?;
    Scoreboard::open(&scoreboard::path_for(&old)).ok()
}

/// One line per backend address of the relay listeners: up or down and why, connections
/// open, connects, failures, bytes, the last check.
fn backends(board: &Scoreboard) -> String {
    let views = board.backends().views();
    if views.is_empty() {
        return String::new();
    }
    let names: Vec<String> = board.listener_totals().into_iter().map(|t| t.name).collect();
    let mut out = String::from("backends:\n");
    for view in views {
        let listener = names.get(usize::from(view.listener)).map_or("?", String::as_str);
        let state = if view.up { "up" } else { "DOWN" };
        let address = match &view.address {
            Some(address) if address.to_string() != view.name => format!(" ({address})"),
            Some(_) => String::new(),
            None => " (no address)".to_owned(),
        };
        let why = if view.reason.is_empty() { String::new() } else { format!(": {}", view.reason) };
        let checked = match view.last_check_unix_ms {
            0 => String::new(),
            at => format!(
                ", checked {}s ago in {:.1}ms",
                unix_ms().saturating_sub(at) / 1000,
                view.check_us as f64 / 1000.0
            ),
        };
        out.push_str(&format!(
            "  {listener} {}{address} {state}{why}; weight {}{}, active {}, connects {}, failures {}, bytes in {} out {}{checked}\n",
            view.name,
            view.weight,
            if view.backup { " backup" } else { "" },
            view.active,
            view.connects,
            view.failures,
            view.bytes_in,
            view.bytes_out,
        ));
    }
    out
}

/// `refused: denied N, rate N, ...; full N times`: the live workers' refusal counters (those
/// of workers that have exited are gone with them).
fn refusals(board: &Scoreboard) -> String {
    let counts = board.refusals();
    let reasons: Vec<String> = Refusal::ALL
        .iter()
        .zip(counts)
        .map(|(reason, n)| format!("{} {n}", reason.name()))
        .collect();
    let live = board.slots().iter().filter(|s| s.state() != SlotState::Empty);
    let full: u64 = live.map(|s| s.full.load(Ordering::Relaxed)).sum();
    format!("refused: {}; workers became full {full} times\n", reasons.join(", "))
}
