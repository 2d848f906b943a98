//! Binary upgrade, the shared state: the per-client table the old master passes to the new
//! one, and when the survivor releases the other master's counts.
//!
//! Runs in the master. The old master clears close-on-exec on the table's memfd in the child
//! it forks for the exec, and names it in [`INHERITED_LIMITS_ENV`] as `FD;RANGE;NAME=ID;...`:
//! the descriptor, the range of records the old master counts in, and its listener ids by
//! name (a client is keyed by listener id, so both masters must number listeners alike).
//! The new master takes the variable out of its environment, checks every part of it, and
//! adopts the table (see `limits::Limits::adopt`) or says in the log why not and counts on
//! its own, as an older binary does. Invariants:
//! - nothing in the variable is trusted: a descriptor is taken only if it is open and a
//!   regular file, ids only if they number the listeners 0..n, each once;
//! - while the other master of an upgrade may hold counts, this master probes its range
//!   every [`RECLAIM_PROBE`] and releases them once the other master and all its workers
//!   are gone.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::stat::{SFlag, fstat};

use super::Master;
use crate::limits::{Limits, LimitsError};

/// Environment variable carrying the per-client table to a new master.
pub const INHERITED_LIMITS_ENV: &str = "PREFORKD_INHERITED_LIMITS";

/// How often the survivor of an upgrade looks whether the other master's processes are
/// gone, while they may hold counts.
pub const RECLAIM_PROBE: Duration = Duration::from_millis(250);

/// What the old master passed, checked for form.
#[derive(Debug)]
pub(super) struct InheritedLimits {
    memfd: OwnedFd,
    range: usize,
    /// The old master's listener ids by name.
    pub ids: HashMap<String, u16>,
}

/// Takes [`INHERITED_LIMITS_ENV`] out of the environment. `None` when absent (a fresh start,
/// or an old master of a binary that does not pass its table); `Some(Err)` says why a value
/// is not usable.
pub(super) fn take_inherited_limits() -> Option<Result<InheritedLimits, String>> {
    let value = std::env::var_os(INHERITED_LIMITS_ENV)?;
    // SAFETY: called by the master before it forks anything or starts any thread: nothing
    // can read the environment concurrently.
    unsafe { std::env::remove_var(INHERITED_LIMITS_ENV) };
    Some(parse(&value.to_string_lossy()))
}

fn parse(value: &str) -> Result<InheritedLimits, String> {
    let mut parts = value.split(';').filter(|p| !p.is_empty());
    let fd: RawFd =
        parts.next().and_then(|p| p.parse().ok()).filter(|&fd| fd > 2).ok_or("no descriptor")?;
    let range: usize = parts.next().and_then(|p| p.parse().ok()).ok_or("no slot range")?;
    let mut ids = HashMap::new();
    for part in parts {
        let (name, id) = part.rsplit_once('=').ok_or("a listener id without a name")?;
        let id: u16 = id.parse().map_err(|_| format!("listener {name}: id {id:?}"))?;
        if ids.insert(name.to_owned(), id).is_some() {
            return Err(format!("listener {name} named twice"));
        }
    }
    let mut numbers: Vec<u16> = ids.values().copied().collect();
    numbers.sort_unstable();
    if numbers.iter().enumerate().any(|(i, &id)| usize::from(id) != i) {
        return Err("listener ids do not number the listeners 0..n".into());
    }
    // SAFETY: only probed; nothing is read or closed through this borrow.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let regular = fstat(borrowed)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG);
    if !regular {
        return Err(format!("descriptor {fd} is not an open file"));
    }
    // SAFETY: the old master put this descriptor in our environment for us to take; fstat
    // just showed it is open, and nothing else in this process owns it.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(InheritedLimits { memfd, range, ids })
}

/// The value of [`INHERITED_LIMITS_ENV`] for the new master; clears close-on-exec on the
/// table's descriptor. Call only in the child forked for the exec.
///
/// # Errors
/// fcntl(2) failed: the new master then counts on its own.
pub(super) fn limits_handover(
    limits: &Limits,
    ids: &HashMap<String, u16>,
) -> Result<String, nix::errno::Errno> {
    let fd = limits.inheritable_fd()?;
    let mut value = format!("{fd};{};", limits.range());
    for (name, id) in ids {
        value.push_str(&format!("{name}={id};"));
    }
    Ok(value)
}

/// The table for a new master of `slots` workers of `per_slot` connections: the inherited
/// one if it can be adopted, else a new one. Returns whether it was adopted. `upgrade`: this
/// master was executed by an old master (which, without the variable, is an older binary).
///
/// # Errors
/// [`LimitsError`] when a new table cannot be created.
pub(super) fn open_limits(
    inherited: Option<Result<InheritedLimits, String>>,
    upgrade: bool,
    slots: usize,
    per_slot: usize,
) -> Result<(Limits, bool), LimitsError> {
    let why = match inherited {
        None if upgrade => "the old master passed none (a binary older than this one)".into(),
        None => return Ok((Limits::new(slots, per_slot)?, false)),
        Some(Err(why)) => format!("{INHERITED_LIMITS_ENV}: {why}"),
        Some(Ok(inherited)) => {
            match Limits::adopt(inherited.memfd, inherited.range, slots, per_slot) {
                Ok(limits) => {
                    log::info!(
                        "binary upgrade: adopted the old master's per-client table (this master counts in slot range {}): limits hold across both masters",
                        limits.range()
                    );
                    return Ok((limits, true));
                }
                Err(error) => error.to_string(),
            }
        }
    };
    log::warn!(
        "binary upgrade: the old master's per-client table is not adopted: {why}; each master counts its own clients until the old one exits"
    );
    Ok((Limits::new(slots, per_slot)?, false))
}

impl Master {
    /// Releases the other master's counts once it and its workers are gone; probes again
    /// after [`RECLAIM_PROBE`] while they live.
    pub(super) fn probe_other_range(&mut self, now: Instant) {
        if self.probe_other_at.is_none_or(|at| now < at) {
            return;
        }
        self.probe_other_at = match self.limits.reclaim_other() {
            Ok(Some(held)) => {
                if held > 0 {
                    log::info!(
                        "the other master of the binary upgrade and its workers are gone: released {held} per-client count(s) they held"
                    );
                }
                None
            }
            Ok(None) => Some(now + RECLAIM_PROBE),
            Err(error) => {
                log::warn!("{error}; trying again");
                Some(now + RECLAIM_PROBE)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_values_are_refused() {
        for (value, why) in [
            ("", "no descriptor"),
            ("2;0;", "no descriptor"),
            ("9;x;", "no slot range"),
            ("9;0;echo=1;", "0..n"),
            ("9;0;echo=0;echo=1;", "twice"),
            ("9;0;echo=70000;", "id"),
            ("9;0;echo", "without a name"),
        ] {
            let error = parse(value).unwrap_err();
            assert!(error.contains(why), "{value:?}: {error}");
        }
    }
}
