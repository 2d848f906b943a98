//! Binary upgrade, the hand-off channel between the old master and the new one.
//!
//! Runs in the master. Before it forks the child that executes the new binary, the old
//! master creates a `SOCK_SEQPACKET` socket pair; the child clears close-on-exec on its end
//! and names it in [`UPGRADE_CHANNEL_ENV`]. The new master takes it only if it is a connected
//! Unix `SOCK_SEQPACKET` socket whose peer (`SO_PEERCRED`, unix(7)) is its parent, the old
//! master; it keeps it only if it adopted the old master's per-client table (an offer names
//! a record in it), and then says so ([`Message::Taking`]): the old master forwards nothing
//! before, so a new master of an older binary, which ignores the channel, is never sent
//! offers it would not answer. Then, when the old master stops gracefully (WINCH, QUIT) while the new
//! one lives, its draining workers' offers go to the new master, which routes them to its
//! ready workers as for a reload (see `handoff.rs`). Invariants:
//! - the channel is close-on-exec in both masters, and no worker keeps a copy, so either
//!   master sees the other's end close when it exits;
//! - the new master never sends offers on it: the old master refuses any.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, UnixAddr, getsockname};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::{SFlag, fstat};

use crate::handoff::{Channel, Message};

/// Environment variable carrying the hand-off channel to a new master: a descriptor number.
pub const UPGRADE_CHANNEL_ENV: &str = "PREFORKD_UPGRADE_CHANNEL";

/// Takes [`UPGRADE_CHANNEL_ENV`] out of the environment: `None` when absent, `Some(Err)`
/// saying why the descriptor is not the channel.
pub(super) fn take_upgrade_channel() -> Option<Result<Channel, String>> {
    let value = std::env::var_os(UPGRADE_CHANNEL_ENV)?;
    // SAFETY: called by the master before it forks anything or starts any thread: nothing
    // can read the environment concurrently.
    unsafe { std::env::remove_var(UPGRADE_CHANNEL_ENV) };
    let fd = value.to_string_lossy().parse::<RawFd>().ok().filter(|&fd| fd > 2);
    let Some(fd) = fd else { return Some(Err(format!("{value:?} is not a descriptor"))) };
    // SAFETY: only probed; nothing is read or closed through this borrow.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = fstat(borrowed)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK);
    if !socket {
        return Some(Err(format!("descriptor {fd} is not an open socket")));
    }
    // SAFETY: the old master put this descriptor in our environment for us to take; fstat
    // just showed it is an open socket that nothing else in this process owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Some(check(owned).map(Channel::from_fd))
}

fn check(fd: OwnedFd) -> Result<OwnedFd, String> {
    let raw = fd.as_raw_fd();
    let kind = getsockopt(&fd, sockopt::SockType).map_err(|e| format!("descriptor {raw}: {e}"))?;
    let unix = getsockname::<UnixAddr>(raw).is_ok_and(|a| a.family() == Some(AddressFamily::Unix));
    if kind != SockType::SeqPacket || !unix {
        return Err(format!("descriptor {raw} is not a Unix SOCK_SEQPACKET socket"));
    }
    let peer = getsockopt(&fd, sockopt::PeerCredentials)
        .map_err(|e| format!("descriptor {raw}: SO_PEERCRED: {e}"))?;
    let parent = nix::unistd::getppid().as_raw();
    if peer.pid() != parent {
        return Err(format!(
            "descriptor {raw}: its peer is pid {}, not the old master (pid {parent})",
            peer.pid()
        ));
    }
    let system = |e: nix::errno::Errno| format!("descriptor {raw}: {e}");
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(system)?;
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(system)?;
    Ok(fd)
}

/// The channel to keep: the inherited one if the per-client table was `adopted` (an offer
/// names a record in it), else none; says in the log why not.
pub(super) fn keep_predecessor(
    channel: Option<Result<Channel, String>>,
    adopted: bool,
) -> Option<Channel> {
    match channel? {
        Ok(mut channel) if adopted => {
            // Tells the old master that offers are welcome.
            if let Err(error) = channel.send(&Message::Taking, Vec::new()) {
                log::warn!("binary upgrade: hand-off channel to the old master: {error}");
                return None;
            }
            log::info!(
                "binary upgrade: hand-off channel from the old master open: its connections come here when it stops"
            );
            Some(channel)
        }
        Ok(_) => {
            log::warn!(
                "binary upgrade: the per-client table is not shared, so the old master's connections are not taken over (they finish there)"
            );
            None
        }
        Err(why) => {
            log::warn!(
                "binary upgrade: {UPGRADE_CHANNEL_ENV}: {why}; the old master's connections finish there"
            );
            None
        }
    }
}

/// Clears close-on-exec on the new master's end, for the exec (in the forked child only).
///
/// # Errors
/// fcntl(2) failed.
pub(super) fn inheritable(channel: &Channel) -> Result<RawFd, nix::errno::Errno> {
    let fd = channel.raw_fd();
    // SAFETY: the channel owns `fd` and outlives this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(fd)
}
