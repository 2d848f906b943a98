//! Children that outlive their parent: what `exec` started, reparented to the master.
//!
//! Runs in the master. The master is a child subreaper (`PR_SET_CHILD_SUBREAPER`,
//! prctl(2)), so a process whose parent dies becomes the master's child instead of init's:
//! the children of an exec spawner that died (see `crate::spawner`), and the programs that an
//! exec child put in the background (a double fork). They get no parent-death signal
//! (`PR_SET_PDEATHSIG` would reach a direct child only); instead, whenever a worker or a
//! spawner exits, the master ends every child of its own that is neither a worker, nor a
//! spawner, nor the new master of an upgrade.

use std::io;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Makes this process the reaper of its descendants' orphans.
///
/// # Errors
/// prctl(2) failed (not on Linux 3.4 or later).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// The master's children, from `/proc/self/task/PID/children` (proc(5)); empty if it cannot
/// be read.
fn children() -> Vec<Pid> {
    let me = nix::unistd::getpid();
    let path = format!("/proc/self/task/{me}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok().map(Pid::from_raw))
        .collect()
}

/// Sends SIGKILL to every child, and its process group, that `keep` does not hold (the
/// workers, the spawners, the new master of an upgrade). Returns how many were ended; they are reaped like
/// any child.
pub fn kill_orphans(keep: &[Pid]) -> usize {
    let mut ended = 0;
    for child in children().into_iter().filter(|child| !keep.contains(child)) {
        // An exec child leads its own process group: its own children go with it.
        let _ = killpg(child, Signal::SIGKILL);
        if kill(child, Signal::SIGKILL).is_ok() {
            ended += 1;
        }
    }
    ended
}
