//! A client connection as the worker loop sees it: its socket, its session, its state (see
//! `phase.rs`) and what it has moved.
//!
//! Runs in workers. Data only; the connection table (`connections.rs`) owns every `Conn`.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::MsgFlags;

use crate::limits::Ticket;
use crate::net::{Peer, Stream};
use crate::poller::{Interest, Poller};
use crate::services::{Progress, Session};

use super::extras::Watched;
use super::phase::ConnState;
use super::shares::Share;

/// One accepted (or adopted) client connection.
pub struct Conn {
    /// The non-blocking socket (blocking while an exec child owns it).
    pub stream: Stream,
    /// Index of the listener it came in on.
    pub listener: usize,
    /// Who the client is: its address, or a Unix client's credentials.
    pub peer: Peer,
    /// The PROXY protocol proxy it came through (`peer` is then the client the header named).
    pub proxy: Option<SocketAddr>,
    /// The service's per-connection state.
    pub session: Box<dyn Session>,
    /// Phase, kind, last activity, the session's timer.
    pub state: ConnState,
    /// Accept time.
    pub opened: Instant,
    /// Bytes and exchanges so far.
    pub totals: Progress,
    /// The per-client limits record, when the listener counts connections.
    pub ticket: Option<Ticket>,
    /// The interest registered with the poller.
    pub interest: Interest,
    /// Descriptors the session watches besides the client socket, with what for.
    pub extras: Watched,
    /// Its place in its client's share of the worker (`shares.rs`).
    pub share: Share,
    /// Its session got the drain notice (`Session::on_drain`), which comes once.
    pub told_drain: bool,
}

impl Conn {
    /// Adds one callback's progress; any byte moved counts as activity.
    #[inline]
    pub fn record(&mut self, progress: Progress, now: Instant) {
        self.totals.bytes_in += progress.bytes_in;
        self.totals.bytes_out += progress.bytes_out;
        self.totals.exchanges += progress.exchanges;
        if progress.moved() {
            self.state.last_activity = now;
        }
    }

    /// Registers with `poller` what the session now wants the socket (descriptor `fd`)
    /// watched for, if that changed.
    #[inline]
    pub fn update_interest(&mut self, fd: usize, poller: &mut dyn Poller) {
        let Interest { read, write, .. } = self.session.interest();
        let wanted = Interest { read, write, exclusive: false };
        if wanted != self.interest {
            self.interest = wanted;
            // Cannot fail: the descriptor was accepted by this poller's check.
            let _ = poller.set(fd as RawFd, wanted);
        }
    }
}

/// Whether the client's socket holds unread input: a peek that never blocks, even on an exec
/// child's socket, which stays in blocking mode. An interrupted peek counts as input (the
/// connection is not closed on its word).
pub fn unread_input(stream: &Stream) -> bool {
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match nix::sys::socket::recv(stream.as_raw_fd(), &mut byte, flags) {
        Ok(0) => false,
        Ok(_) => true,
        Err(error) => error == Errno::EINTR,
    }
}

/// Reads and throws away whatever the client sent; true once the client's FIN (or an error)
/// is seen, i.e. a lingering close may finish.
pub fn discard_input(stream: &Stream) -> bool {
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        // MSG_DONTWAIT: an exec child's socket is still in blocking mode when it ends.
        match nix::sys::socket::recv(stream.as_raw_fd(), &mut sink, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return true,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(error) => return error != Errno::EAGAIN,
        }
    }
    false
}
