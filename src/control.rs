//! Control commands: `preforkd reload|stop|quit|reopen|upgrade|status [--json] -c FILE`.
//!
//! Runs in a short-lived process of its own. It reads the configuration for `pid_file`,
//! finds the master through the locked pid file, sends the signal, and waits for the
//! *outcome* on the master's scoreboard (reload applied or rejected, logs reopened, new
//! master ready) or for the master to be gone. Waiting polls with a deadline.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cli::Command;
use crate::config;
use crate::exit::ExitStatus;
use crate::master::FAST_STOP_GRACE;
use crate::pidfile;
use crate::scoreboard::{self, Scoreboard, SlotState, monotonic_ms, unix_ms};
use crate::status_json;

/// How long `reload`, `reopen` and `upgrade` wait for the outcome.
pub const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// Runs a control command against the daemon of `config_path`.
pub fn run(command: Command, config_path: &Path) -> ExitStatus {
    match execute(command, config_path) {
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

fn name(command: Command) -> &'static str {
    match command {
        Command::Run => "run",
        Command::Check => "check",
        Command::Reload => "reload",
        Command::Stop => "stop",
        Command::Quit => "quit",
        Command::Reopen => "reopen",
        Command::Upgrade => "upgrade",
        Command::Status { .. } => "status",
    }
}

type Outcome = Result<String, (ExitStatus, String)>;

fn execute(command: Command, config_path: &Path) -> Outcome {
    let config = config::load(config_path).map_err(|e| (e.exit_status(), e.to_string()))?;
    let pid_path = config.daemon.pid_file.clone().ok_or_else(|| {
        (
            ExitStatus::Config,
            format!(
                "daemon.pid_file is not set in {}: the running master cannot be found",
                config_path.display()
            ),
        )
    })?;
    let pid =
        pidfile::running_pid(&pid_path).map_err(|e| (ExitStatus::Unavailable, e.to_string()))?;
    let master = Pid::from_raw(pid);
    let board = Scoreboard::open(&scoreboard::path_for(&pid_path))
        .map_err(|e| (ExitStatus::Unavailable, e.to_string()))?;
    let header = board.header();
    match command {
        Command::Status { json: false } => Ok(status(&board)),
        Command::Status { json: true } => Ok(status_json::render(&board)),
        Command::Stop => stop(master, Signal::SIGTERM, FAST_STOP_GRACE + Duration::from_secs(10)),
        Command::Quit => {
            stop(master, Signal::SIGQUIT, config.daemon.graceful_timeout + Duration::from_secs(10))
        }
        Command::Reload => {
            let before = (
                header.reloads_ok.load(Ordering::Acquire),
                header.reloads_failed.load(Ordering::Acquire),
            );
            send(master, Signal::SIGHUP)?;
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
            send(master, Signal::SIGUSR1)?;
            wait_for("the log reopen", || {
                (header.reopens.load(Ordering::Acquire) != before)
                    .then(|| Ok("logs reopened".to_owned()))
            })
        }
        Command::Upgrade => upgrade(master, &board, &pid_path),
        Command::Run | Command::Check => unreachable!("handled by main"),
    }
}

fn send(master: Pid, signal: Signal) -> Result<(), (ExitStatus, String)> {
    kill(master, signal).map_err(|e| {
        (ExitStatus::Unavailable, format!("could not send {signal} to master pid {master}: {e}"))
    })
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

fn stop(master: Pid, signal: Signal, patience: Duration) -> Outcome {
    send(master, signal)?;
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

fn upgrade(master: Pid, board: &Scoreboard, pid_path: &Path) -> Outcome {
    let header = board.header();
    let failed_before = header.upgrades_failed.load(Ordering::Acquire);
    send(master, Signal::SIGUSR2)?;
    wait_for("the new master", || {
        if header.upgrades_failed.load(Ordering::Acquire) != failed_before {
            return Some(Err((ExitStatus::Software, board.message())));
        }
        let new = pidfile::running_pid(pid_path).ok().filter(|&pid| pid != master.as_raw())?;
        let new_board = Scoreboard::open(&scoreboard::path_for(pid_path)).ok()?;
        if new_board.header().master_pid.load(Ordering::Acquire) != new {
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
        "master pid {}, generation {}, up {}, {} workers wanted, reloads {} applied / {} rejected\n",
        header.master_pid.load(Ordering::Relaxed),
        header.generation.load(Ordering::Relaxed),
        age(header.started_unix_ms.load(Ordering::Relaxed)),
        header.target_workers.load(Ordering::Relaxed),
        header.reloads_ok.load(Ordering::Relaxed),
        header.reloads_failed.load(Ordering::Relaxed),
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
    out.trim_end().to_owned()
}
