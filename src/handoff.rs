//! The channel between each worker and the master: readiness and connection hand-off, the
//! messages and their transport.
//!
//! Runs in the master and in workers. Each worker has one [`Channel`] to the master: a
//! `SOCK_SEQPACKET` Unix socket pair the master creates before forking the worker, so the
//! peer is authenticated by construction (no name to connect to, nothing to check with
//! `SO_PEERCRED`); both ends are close-on-exec. A message is one datagram of at most
//! [`MAX_MESSAGE`] bytes, and an [`Offer`] carries the client socket and the session's own
//! descriptors (a relay's backend socket and pipes) with `SCM_RIGHTS` (unix(7)): at most
//! [`MAX_DESCRIPTORS`], the client's first.
//!
//! A worker says [`Message::Ready`] once, when it is booted (privileges dropped, listeners
//! open, about to accept): see [`report_ready`]. That is how the master learns that a
//! generation is ready (it wakes on the channel; nothing is polled). A worker that wants to
//! be replaced (recycling: `daemon.recycle_*`) says [`Message::Recycle`] once, and serves on
//! until the master stops it.
//!
//! A hand-off's route is old worker -> master -> new worker:
//! 1. a retiring worker sends an [`Offer`] for a connection its session can move now (at
//!    rest, or at any point for a session whose state holds what is in flight: see
//!    `services::Movable`), with its policy state, the session's exported state and
//!    duplicates of its descriptors, and stops watching them (it still owns them);
//! 2. the master forwards it to a ready worker of the serving generation, under a route
//!    number of its own, or answers [`Outcome::Busy`] / [`Outcome::Refused`] itself;
//! 3. the receiver rebuilds the session, lets it watch its descriptors, moves the per-client
//!    count (see `limits::Limits::transfer`) and answers, or declines having done no I/O;
//!    the master passes the answer to the sender as [`Message::Resolved`], or
//!    [`Outcome::Lost`] if the receiver died. The sender then drops its copies without a
//!    close being seen by anyone (adopted: the receiver holds the sockets) or serves on.
//!
//! The wire format is versioned ([`WIRE_VERSION`]): a message of another version is
//! refused, so a master and workers of different binaries never misread each other. Across
//! a binary upgrade the new master announces itself with [`Message::Taking`] in its own
//! version: a master of another version cannot read it, never forwards offers, and its
//! workers drain their connections instead of handing them off.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::net::{Credentials, Peer};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

/// Version of the message format; the first byte of every message. Version 2: an offer
/// carries the session's descriptors besides the client socket ([`Offer::descriptors`]),
/// and its client may be a Unix-domain one (its credentials).
pub const WIRE_VERSION: u8 = 2;

/// Descriptors one message carries at most: the client socket and up to 7 of the session's
/// (a relay splicing both ways has 5: its backend socket and two pipes).
pub const MAX_DESCRIPTORS: usize = 8;

/// Largest message, in bytes: the connection's state and the session's (see
/// `services::MAX_EXPORT`).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Messages queued on a channel at most; beyond, [`Channel::send`] refuses (the caller
/// serves the connection on instead of growing memory), but for answers
/// ([`Message::Resolved`]): every offer gets exactly one, so their number is bounded by the
/// offers received, and one dropped would leave its connection offered, untouched by
/// anyone, for good.
pub const MAX_QUEUED: usize = 4096;

const KIND_OFFER: u8 = 1;
const KIND_RESOLVED: u8 = 2;
const KIND_TAKING: u8 = 3;
const KIND_READY: u8 = 4;
const KIND_RECYCLE: u8 = 5;

/// A connection offered for hand-off, with everything the receiving worker needs to go on
/// serving it: its policy state and its session's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// The sender's name for this offer (the master rewrites it into its route number).
    pub token: u64,
    /// The listener's name: the receiver applies *its* policy for that name.
    pub listener: String,
    /// The client: its address, or a Unix client's credentials.
    pub peer: Peer,
    /// Kept alive (long) rather than short.
    pub long: bool,
    /// Time since accept.
    pub age: Duration,
    /// Time since the last byte moved: the idle deadline is computed from it, under the
    /// receiver's timeouts.
    pub quiet: Duration,
    /// Bytes read so far.
    pub bytes_in: u64,
    /// Bytes written so far.
    pub bytes_out: u64,
    /// Exchanges so far.
    pub exchanges: u64,
    /// The per-client count: (record, tag) in the shared table, when counted.
    pub record: Option<(u32, u64)>,
    /// Time left on the session's timer, if set.
    pub timer: Option<Duration>,
    /// What `Session::export` returned.
    pub state: Vec<u8>,
    /// How many of the session's own descriptors follow the client socket in the message's
    /// `SCM_RIGHTS` (what `Session::export_descriptors` gave, in that order).
    pub descriptors: usize,
}

impl Offer {
    /// Whether all of the offer's descriptors arrived with it (`got` of them): when this
    /// process is out of descriptors the kernel drops some (see [`Channel::recv`]), and the
    /// offer must be answered [`Outcome::Busy`] rather than dropped, so that the sender, who
    /// waits for the answer without touching the connection, serves it on.
    pub fn complete(&self, got: usize) -> bool {
        got == 1 + self.descriptors
    }
}

/// How an offer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver serves the connection now: close your copy, do not write to it.
    Adopted,
    /// Nobody could take it now (no ready worker, no room): serve it, offer again later.
    Busy,
    /// It will not be taken (the listener was removed, the session's state was refused,
    /// the daemon stops): serve it until it ends, as a graceful stop does.
    Refused,
    /// The receiver died before answering: the connection is yours only if you still hold
    /// its per-client count (see `limits::Limits::settle`).
    Lost,
}

/// One message on a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A connection, with its socket and then [`Offer::descriptors`] more as `SCM_RIGHTS`.
    Offer(Offer),
    /// The answer to the offer named `token`.
    Resolved {
        /// The offer's token (for the sender) or route (for the master).
        token: u64,
        /// How it ended.
        outcome: Outcome,
    },
    /// From the new master of a binary upgrade to the old one, once: it shares the
    /// per-client table and takes offers (an older binary never sends it, so the old master
    /// never forwards offers that nobody would answer).
    Taking,
    /// From a worker to its master, once: booted, it accepts (see [`report_ready`]). Only
    /// ever sent by a worker to the master that forked it, so of the same binary.
    Ready,
    /// From a worker to its master, at most once: replace me (recycling), for this reason.
    /// The worker serves on until the master stops it gracefully.
    Recycle(Recycle),
}

/// Why a worker asks to be replaced ([`Message::Recycle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recycle {
    /// It accepted this many connections (and UDP flows), reaching its
    /// `daemon.recycle_after_connections` (with its jitter).
    Connections(u64),
    /// Its resident memory reached this many bytes, over `daemon.recycle_above_rss`.
    Memory(u64),
}

impl std::fmt::Display for Recycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recycle::Connections(n) => write!(f, "accepted {n} connections"),
            Recycle::Memory(bytes) => write!(f, "resident memory {} MiB", bytes >> 20),
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend(v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.0.extend(v);
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.0.len() < n {
            return Err(invalid("truncated message"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let len = usize::try_from(self.u64()?).map_err(|_| invalid("length"))?;
        Ok(self.take(len)?.to_vec())
    }
    fn millis(&mut self) -> io::Result<Duration> {
        Ok(Duration::from_millis(self.u64()?))
    }
}

/// Whether `got` descriptors may come with `message`: exactly those an offer announces (none
/// for another message), or fewer for an offer when the kernel `dropped` some because this
/// process is out of descriptors (`MSG_CTRUNC`: unix(7)); the receiver then answers it
/// [`Outcome::Busy`] (see [`Offer::complete`]), and the sender, which still holds its own
/// copies, offers it again later.
///
/// # Errors
/// `InvalidData` for any other count.
fn check_descriptors(message: &Message, got: usize, dropped: bool) -> io::Result<()> {
    let expected = match message {
        Message::Offer(offer) => 1 + offer.descriptors,
        _ => 0,
    };
    if got == expected || (dropped && got < expected) {
        Ok(())
    } else {
        Err(invalid(&format!("{got} descriptors where {expected} were announced")))
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("hand-off message: {what}"))
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Message {
    /// The message as bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::with_capacity(128));
        w.u8(WIRE_VERSION);
        match self {
            Message::Offer(offer) => {
                w.u8(KIND_OFFER);
                w.u64(offer.token);
                w.bytes(offer.listener.as_bytes());
                // The peer: 16 address bytes, the port, flags (1: IPv4, 2: long, 4: Unix,
                // whose address bytes are its pid, uid and gid).
                let (bytes, port, family) = match offer.peer {
                    Peer::Ip(address) => match address.ip() {
                        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), address.port(), 1),
                        IpAddr::V6(v6) => (v6.octets(), address.port(), 0),
                    },
                    Peer::Unix(Credentials { pid, uid, gid }) => {
                        let mut bytes = [0; 16];
                        bytes[..4].copy_from_slice(&pid.to_le_bytes());
                        bytes[4..8].copy_from_slice(&uid.to_le_bytes());
                        bytes[8..12].copy_from_slice(&gid.to_le_bytes());
                        (bytes, 0, 4)
                    }
                };
                w.0.extend(bytes);
                w.0.extend(port.to_le_bytes());
                w.u8(family | u8::from(offer.long) << 1);
                for value in [millis(offer.age), millis(offer.quiet)] {
                    w.u64(value);
                }
                for value in [offer.bytes_in, offer.bytes_out, offer.exchanges] {
                    w.u64(value);
                }
                match offer.record {
                    Some((record, tag)) => {
                        w.u8(1);
                        w.u64(u64::from(record));
                        w.u64(tag);
                    }
                    None => w.u8(0),
                }
                match offer.timer {
                    Some(left) => {
                        w.u8(1);
                        w.u64(millis(left));
                    }
                    None => w.u8(0),
                }
                w.bytes(&offer.state);
                w.u8(u8::try_from(offer.descriptors).unwrap_or(u8::MAX));
            }
            Message::Resolved { token, outcome } => {
                w.u8(KIND_RESOLVED);
                w.u64(*token);
                w.u8(match outcome {
                    Outcome::Adopted => 0,
                    Outcome::Busy => 1,
                    Outcome::Refused => 2,
                    Outcome::Lost => 3,
                });
            }
            Message::Taking => w.u8(KIND_TAKING),
            Message::Ready => w.u8(KIND_READY),
            Message::Recycle(why) => {
                w.u8(KIND_RECYCLE);
                let (kind, value) = match why {
                    Recycle::Connections(n) => (1, n),
                    Recycle::Memory(bytes) => (2, bytes),
                };
                w.u8(kind);
                w.u64(*value);
            }
        }
        w.0
    }

    /// Parses a message.
    ///
    /// # Errors
    /// `InvalidData`: another wire version, an unknown kind, a truncated or malformed body.
    pub fn decode(bytes: &[u8]) -> io::Result<Message> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != WIRE_VERSION {
            return Err(invalid(&format!("version {version}, this binary speaks {WIRE_VERSION}")));
        }
        let message = match r.u8()? {
            KIND_OFFER => {
                let token = r.u64()?;
                let listener =
                    String::from_utf8(r.bytes()?).map_err(|_| invalid("listener name"))?;
                let bytes = <[u8; 16]>::try_from(r.take(16)?).expect("16 bytes");
                let port = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes"));
                let flags = r.u8()?;
                let ip = Ipv6Addr::from(bytes);
                let word = |i: usize| <[u8; 4]>::try_from(&bytes[i..i + 4]).expect("4 bytes");
                let peer = match (flags & 5, ip.to_ipv4_mapped()) {
                    (4, _) => Peer::Unix(Credentials {
                        pid: i32::from_le_bytes(word(0)),
                        uid: u32::from_le_bytes(word(4)),
                        gid: u32::from_le_bytes(word(8)),
                    }),
                    (1, Some(v4)) => Peer::Ip(SocketAddr::new(IpAddr::V4(v4), port)),
                    (1, None) => return Err(invalid("IPv4 flag on an IPv6 address")),
                    (0, _) => Peer::Ip(SocketAddr::new(IpAddr::V6(ip), port)),
                    _ => return Err(invalid("both the IPv4 and the Unix flag")),
                };
                let (age, quiet) = (r.millis()?, r.millis()?);
                let (bytes_in, bytes_out, exchanges) = (r.u64()?, r.u64()?, r.u64()?);
                let record = match r.u8()? {
                    0 => None,
                    _ => {
                        let record = u32::try_from(r.u64()?).map_err(|_| invalid("record"))?;
                        Some((record, r.u64()?))
                    }
                };
                let timer = match r.u8()? {
                    0 => None,
                    _ => Some(r.millis()?),
                };
                let state = r.bytes()?;
                let descriptors = usize::from(r.u8()?);
                if descriptors >= MAX_DESCRIPTORS {
                    return Err(invalid("too many descriptors"));
                }
                Message::Offer(Offer {
                    token,
                    listener,
                    peer,
                    long: flags & 2 == 2,
                    age,
                    quiet,
                    bytes_in,
                    bytes_out,
                    exchanges,
                    record,
                    timer,
                    state,
                    descriptors,
                })
            }
            KIND_RESOLVED => {
                let token = r.u64()?;
                let outcome = match r.u8()? {
                    0 => Outcome::Adopted,
                    1 => Outcome::Busy,
                    2 => Outcome::Refused,
                    3 => Outcome::Lost,
                    other => return Err(invalid(&format!("outcome {other}"))),
                };
                Message::Resolved { token, outcome }
            }
            KIND_TAKING => Message::Taking,
            KIND_READY => Message::Ready,
            KIND_RECYCLE => match (r.u8()?, r.u64()?) {
                (1, n) => Message::Recycle(Recycle::Connections(n)),
                (2, bytes) => Message::Recycle(Recycle::Memory(bytes)),
                (other, _) => return Err(invalid(&format!("recycling reason {other}"))),
            },
            other => return Err(invalid(&format!("kind {other}"))),
        };
        if !r.0.is_empty() {
            return Err(invalid("trailing bytes"));
        }
        Ok(message)
    }
}

/// Tells the master that this worker is booted: its privileges dropped, its listeners open,
/// about to accept. A worker calls it once, at the end of its boot. (The scoreboard's slot
/// says `ready` too, for `preforkd status`; the master goes by this message.)
///
/// # Errors
/// The send failed: the master is gone, or the channel is missing (the master gives every
/// worker one); the worker cannot serve under a master that will never count it ready.
pub fn report_ready(channel: Option<&mut Channel>) -> io::Result<()> {
    let channel = channel.ok_or_else(|| io::Error::other("no channel to the master"))?;
    channel.send(&Message::Ready, Vec::new()).map_err(|error| {
        io::Error::new(error.kind(), format!("telling the master it is ready: {error}"))
    })
}

thread_local! {
    /// What [`Channel::recv`] receives into: one buffer of `MAX_MESSAGE + 1` bytes per
    /// thread (the master and each worker have one), allocated at the first receive and
    /// reused, since a message is decoded into owned values before the next receive.
    static RECEIVE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One end of a hand-off channel, with the messages waiting for room in the socket.
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
    queue: VecDeque<(Vec<u8>, Vec<OwnedFd>)>,
}

impl Channel {
    /// A connected pair (master end, worker end): non-blocking, close-on-exec.
    ///
    /// # Errors
    /// socketpair(2) failed (`EMFILE`, `ENFILE`).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, flags)?;
        Ok((Channel::from_fd(a), Channel::from_fd(b)))
    }

    /// A channel on `socket`, a connected `SOCK_SEQPACKET` Unix socket that the caller
    /// checked and made non-blocking (the end a binary upgrade's new master inherits).
    pub fn from_fd(socket: OwnedFd) -> Channel {
        Channel { socket, queue: VecDeque::new() }
    }

    /// The socket, to watch for readability (and writability while [`Channel::backlogged`]).
    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Messages wait for room in the socket: watch it for writability, then [`Channel::flush`].
    pub fn backlogged(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Queues `message` (with `fds`, at most [`MAX_DESCRIPTORS`], as `SCM_RIGHTS`) and sends
    /// what the socket takes.
    ///
    /// # Errors
    /// `WouldBlock` when [`MAX_QUEUED`] messages wait already (nothing queued; an answer is
    /// queued whatever waits); `InvalidInput` for more than [`MAX_DESCRIPTORS`] descriptors;
    /// a send error other than `WouldBlock` (the peer is gone).
    pub fn send(&mut self, message: &Message, fds: Vec<OwnedFd>) -> io::Result<()> {
        if fds.len() > MAX_DESCRIPTORS {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"));
        }
        let answer = matches!(message, Message::Resolved { .. });
        if self.queue.len() >= MAX_QUEUED && !answer {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.queue.push_back((message.encode(), fds));
        self.flush()
    }

    /// Sends queued messages until the socket is full.
    ///
    /// # Errors
    /// A send error other than `WouldBlock`/`EINTR`; too many descriptors in flight
    /// (`ETOOMANYREFS`) counts as full.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some((bytes, fds)) = self.queue.front() {
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
            let iov = [IoSlice::new(bytes)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            match sendmsg::<()>(self.socket.as_raw_fd(), &iov, cmsgs, flags, None) {
                Ok(_) => {
                    // Our copies of the descriptors close here; the peer has its own now.
                    self.queue.pop_front();
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN | Errno::ETOOMANYREFS | Errno::ENOBUFS) => return Ok(()),
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// The next message, with its descriptors (an offer's client socket first); `Ok(None)`
    /// when nothing is waiting. An offer may come with fewer descriptors than it announces
    /// when this process is out of descriptors: check [`Offer::complete`].
    ///
    /// # Errors
    /// `UnexpectedEof` when the peer closed its end; `InvalidData` for a malformed message
    /// (its descriptors, if any, are closed); another receive error.
    pub fn recv(&mut self) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        RECEIVE_BUFFER.with_borrow_mut(|buffer| self.recv_into(buffer))
    }

    /// [`Channel::recv`] with `buffer` to receive into: resized to `MAX_MESSAGE + 1` bytes
    /// (so an oversized message shows as truncated) the first time, reused after.
    fn recv_into(&mut self, buffer: &mut Vec<u8>) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        buffer.resize(MAX_MESSAGE + 1, 0);
        let mut space = nix::cmsg_space!([RawFd; MAX_DESCRIPTORS + 1]);
        loop {
            let mut iov = [IoSliceMut::new(buffer)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
            let received =
                match recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut space), flags) {
                    Ok(received) => received,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => return Ok(None),
                    Err(error) => return Err(error.into()),
                };
            let mut fds: Vec<OwnedFd> = Vec::new();
            if let Ok(cmsgs) = received.cmsgs() {
                for cmsg in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: SCM_RIGHTS just installed these descriptors in this
                        // process, and nothing else refers to them.
                        fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
            }
            let (bytes, flags) = (received.bytes, received.flags);
            if bytes == 0 && fds.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if flags.contains(MsgFlags::MSG_TRUNC) || bytes > MAX_MESSAGE {
                return Err(invalid("oversized"));
            }
            let message = Message::decode(&buffer[..bytes])?;
            check_descriptors(&message, fds.len(), flags.contains(MsgFlags::MSG_CTRUNC))?;
            return Ok(Some((message, fds)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn offer() -> Offer {
        Offer {
            token: 7,
            listener: "echo".into(),
            peer: Peer::Ip("127.0.0.2:4242".parse().unwrap()),
            long: true,
            age: Duration::from_millis(1500),
            quiet: Duration::from_millis(20),
            bytes_in: 10,
            bytes_out: 10,
            exchanges: 2,
            record: Some((12, 99)),
            timer: None,
            state: vec![1],
            descriptors: 0,
        }
    }

    #[test]
    fn messages_round_trip_and_other_versions_are_refused() {
        let mut v6 = offer();
        v6.peer = Peer::Ip("[::1]:80".parse().unwrap());
        v6.record = None;
        v6.timer = Some(Duration::from_millis(5));
        v6.descriptors = 5;
        let mut unix = offer();
        unix.peer = Peer::Unix(Credentials { pid: 4242, uid: 1000, gid: 100 });
        for message in [
            Message::Offer(offer()),
            Message::Offer(v6),
            Message::Offer(unix),
            Message::Resolved { token: 3, outcome: Outcome::Lost },
            Message::Taking,
            Message::Ready,
            Message::Recycle(Recycle::Connections(1000)),
            Message::Recycle(Recycle::Memory(512 << 20)),
        ] {
            assert_eq!(Message::decode(&message.encode()).unwrap(), message);
        }
        let mut bytes = Message::Offer(offer()).encode();
        bytes[0] = WIRE_VERSION + 1;
        assert!(Message::decode(&bytes).is_err());
        let bytes = Message::Offer(offer()).encode();
        assert!(Message::decode(&bytes[..bytes.len() - 1]).is_err(), "truncated");
        let mut many = offer();
        many.descriptors = MAX_DESCRIPTORS;
        assert!(Message::decode(&Message::Offer(many).encode()).is_err(), "too many");
        // Version 1 (one descriptor per offer, no count) is another format: refused whole.
        let mut older = Message::Taking.encode();
        older[0] = 1;
        let error = Message::decode(&older).unwrap_err();
        assert!(error.to_string().contains("version 1, this binary speaks 2"), "{error}");
    }

    #[test]
    fn sockets_cross_the_channel_in_order_and_keep_working() {
        use std::os::unix::net::UnixStream;
        let (mut master, mut worker) = Channel::pair().unwrap();
        let (mut client, theirs) = UnixStream::pair().unwrap();
        let (mut backend, backends) = UnixStream::pair().unwrap();
        let mut two = offer();
        two.descriptors = 1;
        let fds = vec![OwnedFd::from(theirs), OwnedFd::from(backends)];
        worker.send(&Message::Offer(two.clone()), fds).unwrap();
        let (message, fds) = master.recv().unwrap().expect("a message");
        assert_eq!((message, fds.len()), (Message::Offer(two), 2));
        let mut fds = fds.into_iter().map(UnixStream::from);
        for (peer, mut moved) in [&mut client, &mut backend].into_iter().zip(&mut fds) {
            moved.write_all(b"hi").unwrap();
            let mut got = [0u8; 2];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hi", "the client socket first, then the session's");
        }
        assert!(master.recv().unwrap().is_none(), "nothing more");
        // An offer whose descriptors do not match its count is refused, descriptors closed.
        let (_, lone) = UnixStream::pair().unwrap();
        let mut liar = offer();
        liar.descriptors = 2;
        worker.send(&Message::Offer(liar), vec![OwnedFd::from(lone)]).unwrap();
        assert_eq!(master.recv().unwrap_err().kind(), io::ErrorKind::InvalidData);
        let too_many = (0..=MAX_DESCRIPTORS).map(|_| OwnedFd::from(UnixStream::pair().unwrap().0));
        let error = worker.send(&Message::Ready, too_many.collect()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        drop(worker);
        assert_eq!(master.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn an_offer_short_of_descriptors_is_kept_for_a_busy_answer_only_if_the_kernel_dropped_them() {
        let mut two = offer();
        two.descriptors = 1;
        let message = Message::Offer(two.clone());
        assert!(check_descriptors(&message, 2, false).is_ok());
        assert!(check_descriptors(&message, 1, false).is_err(), "a liar");
        assert!(check_descriptors(&message, 3, true).is_err(), "more is never right");
        assert!(check_descriptors(&message, 1, true).is_ok(), "out of descriptors here");
        assert!(check_descriptors(&message, 0, true).is_ok());
        assert!((two.complete(2), two.complete(1)) == (true, false));
        assert!(check_descriptors(&Message::Ready, 0, false).is_ok());
        assert!(check_descriptors(&Message::Ready, 1, true).is_err());
    }

    #[test]
    fn a_full_queue_refuses_offers_but_never_an_answer() {
        let (mut master, _worker) = Channel::pair().unwrap();
        // Nobody reads the worker's end: the socket fills, then the queue.
        while !master.backlogged() {
            master.send(&Message::Taking, Vec::new()).unwrap();
        }
        while master.queue.len() < MAX_QUEUED {
            master.send(&Message::Taking, Vec::new()).unwrap();
        }
        let refused = master.send(&Message::Taking, Vec::new()).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock, "bounded");
        let answer = Message::Resolved { token: 7, outcome: Outcome::Adopted };
        master.send(&answer, Vec::new()).expect("an answer is never dropped");
        assert_eq!(
            master.queue.back().map(|(bytes, _)| Message::decode(bytes).unwrap()),
            Some(answer)
        );
    }

    #[test]
    fn a_worker_reports_ready_once_over_its_channel() {
        let (mut master, mut worker) = Channel::pair().unwrap();
        assert!(master.recv().unwrap().is_none());
        report_ready(Some(&mut worker)).unwrap();
        let (message, fds) = master.recv().unwrap().expect("a message");
        assert_eq!((message, fds.is_empty()), (Message::Ready, true));
        assert!(report_ready(None).is_err(), "a worker without a channel cannot boot");
        drop(master);
        let error = report_ready(Some(&mut worker)).unwrap_err();
        assert!(error.to_string().contains("telling the master it is ready"), "{error}");
    }

    #[test]
    fn receives_reuse_one_buffer_and_refuse_an_oversized_message() {
        let (mut master, mut worker) = Channel::pair().unwrap();
        let buffer = || RECEIVE_BUFFER.with_borrow(|b| (b.as_ptr(), b.len()));
        worker.send(&Message::Ready, Vec::new()).unwrap();
        assert_eq!(master.recv().unwrap().map(|(m, _)| m), Some(Message::Ready));
        let first = buffer();
        assert_eq!(first.1, MAX_MESSAGE + 1);
        // One byte too many: refused whole (and the channel goes on).
        worker.queue.push_back((vec![WIRE_VERSION; MAX_MESSAGE + 1], Vec::new()));
        worker.flush().unwrap();
        let error = master.recv().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        let answer = Message::Resolved { token: 9, outcome: Outcome::Busy };
        worker.send(&answer, Vec::new()).unwrap();
        assert_eq!(master.recv().unwrap().map(|(m, _)| m), Some(answer));
        assert_eq!(buffer(), first, "the same buffer, not one per call");
    }
}
