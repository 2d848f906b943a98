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

/// Takes the listening sockets handed over by an old master, by listener name, and
/// removes the variable so that no later child sees it. Entries that do not name an open
/// socket are ignored (logged).
pub fn take_inherited_listeners() -> HashMap<String, OwnedFd> {
    let Some(value) = std::env::var_os(INHERITED_LISTENERS_ENV) else { return HashMap::new() };
    // SAFETY: called by the master before it forks anything or starts any thread: nothing
    // can read the environment concurrently.
    unsafe { std::env::remove_var(INHERITED_LISTENERS_ENV) };
    let mut sockets = HashMap::new();
    for entry in value.to_string_lossy().split(';').filter(|e| !e.is_empty()) {
        let Some((name, fd)) = entry.rsplit_once('=') else { continue };
        let Ok(fd) = fd.parse::<RawFd>() else { continue };
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
        let mut handover = String::new();
        for listener in &self.listeners {
            if let Err(error) = listener.set_inheritable() {
                log::error!("binary upgrade: cannot hand over {}: {error}", listener.local_addr);
                std::process::exit(crate::exit::ExitStatus::OsErr as i32);
            }
            handover.push_str(&format!("{}={};", listener.config.name, listener.as_raw_fd()));
        }
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
        let board = scoreboard::path_for(&pid_path);
        let (pid_to, board_from, board_to) = if aside {
            (oldbin(&pid_path), board.clone(), scoreboard::path_for(&oldbin(&pid_path)))
        } else {
            (pid_path.clone(), scoreboard::path_for(&oldbin(&pid_path)), board)
        };
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
