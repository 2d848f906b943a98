//! Binary upgrade (SIGUSR2), nginx style.
//!
//! The master forks a child that executes the binary again (the path resolved at start, so a
//! new file installed there is what runs) with the same arguments, handing over the listening
//! sockets by descriptor inheritance: their numbers are in [`INHERITED_LISTENERS_ENV`] as
//! `NAME=FD` pairs separated by `;`, NAME being the listener's name. The old master renames
//! its pid file and scoreboard to `*.oldbin` and keeps serving; the new master adopts the
//! socket of each listener whose name and configured address match, binds the others, and
//! writes the pid file. The per-client table goes along (see `inherit.rs`), so that limits
//! hold across both masters while they run. The operator then sends WINCH and QUIT to the old master (or, to
//! roll back, HUP to the old master and QUIT to the new one). If the new master exits while
//! the old one lives, the old one takes its pid file back and goes on as before.
//!
//! Runs in the master (and in the forked child until it executes the binary). The pure parts,
//! the variable's format ([`handover_value`], [`parse_handover`]) and where the state files
//! move ([`state_file_moves`]), are unit-tested; the rest is system calls.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use nix::sys::stat::{SFlag, fstat};
use nix::unistd::{ForkResult, execv, fork};

use super::Master;
use super::table::WorkerExit;
use crate::handoff::Channel;
use crate::scoreboard::{self, UpgradeState};
use crate::signals::{self, MASTER_SIGNALS};

/// Environment variable carrying inherited listening sockets to a new master.
pub const INHERITED_LISTENERS_ENV: &str = "PREFORKD_INHERITED_LISTENERS";

/// `path` with `.oldbin` appended.
pub fn oldbin(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".oldbin");
    PathBuf::from(name)
}

/// The value of [`INHERITED_LISTENERS_ENV`] for listening sockets named by listener:
/// `NAME=FD;` for each (listener names hold neither `=` nor `;`).
pub fn handover_value<'a>(sockets: impl IntoIterator<Item = (&'a str, RawFd)>) -> String {
    sockets.into_iter().map(|(name, fd)| format!("{name}={fd};")).collect()
}

/// The (listener name, descriptor) pairs of an [`INHERITED_LISTENERS_ENV`] value; entries
/// without a name or a descriptor number are skipped, and so is a name or a descriptor
/// named before: each descriptor is owned once (two owners would close it twice, the
/// second time perhaps another file that took its number).
pub fn parse_handover(value: &str) -> Vec<(&str, RawFd)> {
    let mut pairs: Vec<(&str, RawFd)> = Vec::new();
    let entries = value.split(';').filter_map(|entry| entry.rsplit_once('='));
    for (name, fd) in entries.filter(|(name, _)| !name.is_empty()) {
        let Ok(fd) = fd.parse() else { continue };
        if !pairs.iter().any(|&(seen, taken)| seen == name || taken == fd) {
            pairs.push((name, fd));
        }
    }
    pairs
}

/// Where the pid file and the scoreboard go for a binary upgrade, from the pid file's path:
/// to `*.oldbin` (`aside`) or back. Returns (the pid file's new path, the scoreboard's
/// path now, its new path).
pub fn state_file_moves(pid_path: &Path, aside: bool) -> (PathBuf, PathBuf, PathBuf) {
    let board = scoreboard::path_for(pid_path);
    let old_board = scoreboard::path_for(&oldbin(pid_path));
    if aside {
        (oldbin(pid_path), board, old_board)
    } else {
        (pid_path.to_owned(), old_board, board)
    }
}

/// Takes the listening sockets handed over by an old master, by listener name, and
/// removes the variable so that no later child sees it. Entries that do not name an open
/// socket are ignored (logged).
pub fn take_inherited_listeners() -> HashMap<String, OwnedFd> {
    let Some(value) = std::env::var_os(INHERITED_LISTENERS_ENV) else { return HashMap::new() };
    // SAFETY: called by the master before it forks anything or starts any thread: nothing
    // can read the environment concurrently.
    unsafe { std::env::remove_var(INHERITED_LISTENERS_ENV) };
    let mut sockets = HashMap::new();
    for (name, fd) in parse_handover(&value.to_string_lossy()) {
        let is_socket = fd > 2
            && fstat(unsafe_borrow(fd)).is_ok_and(|st| {
                SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK
            });
        if !is_socket {
            log::warn!(
                "{INHERITED_LISTENERS_ENV}: descriptor {fd} for listener {name} is not an open socket; ignored"
            );
            continue;
        }
        // SAFETY: the old master put this descriptor in our environment for us to take, and
        // fstat just showed it is an open socket that nothing else in this process owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        log::info!("binary upgrade: adopting the socket of listener {name} (descriptor {fd})");
        sockets.insert(name.to_owned(), owned);
    }
    sockets
}

fn unsafe_borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for the fstat(2) probe right above, while `fd` is not closed.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

impl Master {
    /// SIGUSR2.
    pub(super) fn handle_upgrade(&mut self) {
        let renamed = self.rename_state_files(true);
        // The hand-off channel to the new master, created before the fork so that its peer
        // is known by construction.
        let channel = match Channel::pair() {
            Ok(pair) => Some(pair),
            Err(error) => {
                log::warn!("binary upgrade: no hand-off channel to the new master: {error}");
                None
            }
        };
        if let Err(error) = signals::block(MASTER_SIGNALS) {
            log::error!("binary upgrade failed: {error}");
            return self.restore_after_upgrade(renamed);
        }
        // SAFETY: the master is single-threaded; the child only prepares descriptors and the
        // environment, then executes the binary (or exits).
        match unsafe { fork() } {
            Ok(ForkResult::Child) => self.exec_new_master(channel.map(|(_, theirs)| theirs)),
            Ok(ForkResult::Parent { child }) => {
                let _ = signals::unblock(MASTER_SIGNALS);
                self.routing.successor =
                    channel.map(|(ours, _)| super::handoff::Successor::Waiting(ours));
                log::info!(
                    "binary upgrade: new master pid {child} started from {}",
                    self.invocation.exe.display()
                );
                self.supervisor.upgrade_started(child);
                self.scoreboard.header().set_upgrade_state(UpgradeState::NewMasterRunning);
            }
            Err(error) => {
                let _ = signals::unblock(MASTER_SIGNALS);
                log::error!("binary upgrade failed: could not fork: {error}");
                self.restore_after_upgrade(renamed);
            }
        }
    }

    fn exec_new_master(&mut self, channel: Option<Channel>) -> ! {
        let channel = channel.and_then(|channel| match super::peer::inheritable(&channel) {
            Ok(fd) => Some((channel, fd)),
            Err(error) => {
                log::warn!("binary upgrade: cannot pass the hand-off channel: {error}");
                None
            }
        });
        for listener in &self.listeners {
            if let Err(error) = listener.set_inheritable() {
                log::error!("binary upgrade: cannot hand over {}: {error}", listener.local_addr);
                std::process::exit(crate::exit::ExitStatus::OsErr as i32);
            }
        }
        let handover =
            handover_value(self.listeners.iter().map(|l| (l.config.name.as_str(), l.as_raw_fd())));
        // The per-client table: without it the new master counts on its own.
        let limits = super::inherit::limits_handover(&self.limits, &self.listener_ids);
        if let Err(error) = &limits {
            log::warn!("binary upgrade: cannot hand over the per-client table: {error}");
        }
        // SAFETY: this forked child is single-threaded and about to exec.
        unsafe {
            std::env::set_var(INHERITED_LISTENERS_ENV, &handover);
            if let Ok(limits) = &limits {
                std::env::set_var(super::INHERITED_LIMITS_ENV, limits);
            }
            if let Some((_, fd)) = &channel {
                std::env::set_var(super::UPGRADE_CHANNEL_ENV, fd.to_string());
            }
            // The systemd watchdog, if any, now watches the new master (which must send
            // MAINPID=; see NotifyAccess in the unit).
            if std::env::var_os("WATCHDOG_USEC").is_some() {
                std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
            }
        }
        let _ = signals::unblock(MASTER_SIGNALS);
        let path = c_string(self.invocation.exe.as_os_str());
        let args: Vec<CString> = self.invocation.args.iter().map(|a| c_string(a)).collect();
        let error = match execv(&path, &args) {
            Err(error) => error,
            Ok(never) => match never {},
        };
        log::error!("binary upgrade: could not execute {}: {error}", self.invocation.exe.display());
        std::process::exit(127);
    }

    /// The new master of an upgrade (`pid`) exited while we live: take the pid file back.
    /// (The supervisor resumes the pool if WINCH had stopped it.)
    pub(super) fn upgrade_exited(&mut self, pid: nix::unistd::Pid, exit: WorkerExit) {
        self.scoreboard.header().set_upgrade_state(UpgradeState::None);
        let reason = format!("new master pid {pid} exited ({exit:?})");
        self.restore_after_upgrade(true);
        // What it and its workers counted in the shared table, once they are all gone.
        self.probe_other_at = Some(std::time::Instant::now());
        self.handoff_successor_gone();
        log::error!("binary upgrade failed or rolled back: {reason}; this master keeps serving");
        self.scoreboard.set_message(&format!("binary upgrade failed: {reason}"));
        self.scoreboard.header().upgrades_failed.fetch_add(1, Ordering::Release);
    }

    fn restore_after_upgrade(&mut self, renamed: bool) {
        if renamed {
            self.rename_state_files(false);
        }
    }

    /// Moves the pid file and scoreboard to `*.oldbin` (`aside`) or back. Returns whether
    /// they were moved.
    fn rename_state_files(&mut self, aside: bool) -> bool {
        let Some(pid_path) = self.config.daemon.pid_file.clone() else { return false };
        let (pid_to, board_from, board_to) = state_file_moves(&pid_path, aside);
        let Some(pidfile) = self.pidfile.as_mut() else { return false };
        if !aside && crate::pidfile::running_pid(&pid_to).is_ok() {
            log::warn!(
                "{} exists (another master?): keeping {}",
                pid_to.display(),
                pidfile.path().display()
            );
            return false;
        }
        if let Err(error) = pidfile.rename(&pid_to) {
            log::error!("could not move the pid file to {}: {error}", pid_to.display());
            return false;
        }
        if let Err(error) = std::fs::rename(&board_from, &board_to) {
            log::error!("could not move the scoreboard to {}: {error}", board_to.display());
        }
        true
    }
}

fn c_string(text: &OsStr) -> CString {
    CString::new(text.as_bytes()).unwrap_or_else(|_| CString::from(c"preforkd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_handover_round_trips_and_skips_malformed_entries() {
        let value = handover_value([("echo", 5), ("tftp.v6", 12)]);
        assert_eq!(value, "echo=5;tftp.v6=12;");
        assert_eq!(parse_handover(&value), vec![("echo", 5), ("tftp.v6", 12)]);
        assert_eq!(parse_handover(""), vec![]);
        assert_eq!(parse_handover("echo;=4;a=x;b=7"), vec![("b", 7)], "the last one lacks ';'");
        // A descriptor or a name given twice is taken once: one owner closes it.
        assert_eq!(parse_handover("a=5;b=5;a=6;c=7;"), vec![("a", 5), ("c", 7)]);
    }

    #[test]
    fn state_files_move_to_oldbin_and_back() {
        let pid = Path::new("/run/preforkd.pid");
        assert_eq!(oldbin(pid), Path::new("/run/preforkd.pid.oldbin"));
        let (pid_to, from, to) = state_file_moves(pid, true);
        assert_eq!(pid_to, oldbin(pid));
        assert_eq!(
            (from.clone(), to.clone()),
            (scoreboard::path_for(pid), scoreboard::path_for(&oldbin(pid)))
        );
        let back = state_file_moves(pid, false);
        assert_eq!(back, (pid.to_owned(), to, from), "back where they were");
    }
}
