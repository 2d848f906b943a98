//! The channel between each worker and the master: readiness and connection hand-off, the
//! messages and their transport.
//!
//! Runs in the master and in workers. Each worker has one [`Channel`] to the master: a
//! `SOCK_SEQPACKET` Unix socket pair the master creates before forking the worker, so the
//! peer is authenticated by construction (no name to connect to, nothing to check with
//! `SO_PEERCRED`); both ends are close-on-exec. A message is one datagram of at most
//! [`MAX_MESSAGE`] bytes, and an [`Offer`] carries the client socket with `SCM_RIGHTS`
//! (unix(7)).
//!
//! A worker says [`Message::Ready`] once, when it is booted (privileges dropped, listeners
//! open, about to accept): see [`report_ready`]. That is how the master learns that a
//! generation is ready (it wakes on the channel; nothing is polled). A worker that wants to
//! be replaced (recycling: `daemon.recycle_*`) says [`Message::Recycle`] once, and serves on
//! until the master stops it.
//!
//! A hand-off's route is old worker -> master -> new worker:
//! 1. a retiring worker sends an [`Offer`] for a connection at rest, with its policy state
//!    and the session's exported state, and stops watching that socket (it still owns it);
//! 2. the master forwards it to a ready worker of the serving generation, under a route
//!    number of its own, or answers [`Outcome::Busy`] / [`Outcome::Refused`] itself;
//! 3. the receiver adopts the connection (moving its per-client count, see
//!    `limits::Limits::transfer`) or declines, and answers; the master passes the answer
//!    to the sender as [`Message::Resolved`], or [`Outcome::Lost`] if the receiver died.
//!    The sender then closes its copy of the socket (adopted) or serves it on.
//!
//! The wire format is versioned ([`WIRE_VERSION`]): a message of another version is
//! refused, so a master and workers of different binaries never misread each other.

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

/// Version of the message format; the first byte of every message.
pub const WIRE_VERSION: u8 = 1;

/// Largest message, in bytes: the connection's state and the session's (see
/// `services::MAX_EXPORT`).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Messages queued on a channel at most; beyond, [`Channel::send`] refuses (the caller
/// serves the connection on instead of growing memory).
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
    /// A connection, with its socket as `SCM_RIGHTS`.
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
    channel.send(&Message::Ready, None).map_err(|error| {
        io::Error::new(error.kind(), format!("telling the master it is ready: {error}"))
    })
}

/// One end of a hand-off channel, with the messages waiting for room in the socket.
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
    queue: VecDeque<(Vec<u8>, Option<OwnedFd>)>,
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

    /// Queues `message` (with `fd` as `SCM_RIGHTS`) and sends what the socket takes.
    ///
    /// # Errors
    /// `WouldBlock` when [`MAX_QUEUED`] messages wait already (nothing queued); a send
    /// error other than `WouldBlock` (the peer is gone).
    pub fn send(&mut self, message: &Message, fd: Option<OwnedFd>) -> io::Result<()> {
        if self.queue.len() >= MAX_QUEUED {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.queue.push_back((message.encode(), fd));
        self.flush()
    }

    /// Sends queued messages until the socket is full.
    ///
    /// # Errors
    /// A send error other than `WouldBlock`/`EINTR`; too many descriptors in flight
    /// (`ETOOMANYREFS`) counts as full.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some((bytes, fd)) = self.queue.front() {
            let raw = fd.as_ref().map(AsRawFd::as_raw_fd);
            let fds = raw.as_slice();
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage<'_>] = if raw.is_some() { &rights } else { &[] };
            let iov = [IoSlice::new(bytes)];
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            match sendmsg::<()>(self.socket.as_raw_fd(), &iov, cmsgs, flags, None) {
                Ok(_) => {
                    // Our copy of the descriptor closes here; the peer has its own now.
                    self.queue.pop_front();
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN | Errno::ETOOMANYREFS | Errno::ENOBUFS) => return Ok(()),
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// The next message, with its descriptor; `Ok(None)` when nothing is waiting.
    ///
    /// # Errors
    /// `UnexpectedEof` when the peer closed its end; `InvalidData` for a malformed message
    /// (its descriptor, if any, is closed); another receive error.
    pub fn recv(&mut self) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
        let mut buffer = vec![0u8; MAX_MESSAGE + 1];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        loop {
            let mut iov = [IoSliceMut::new(&mut buffer)];
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
            let (bytes, truncated) = (
                received.bytes,
                received.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
            );
            if bytes == 0 && fds.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if truncated || bytes > MAX_MESSAGE || fds.len() > 1 {
                return Err(invalid("oversized, or more than one descriptor"));
            }
            let message = Message::decode(&buffer[..bytes])?;
            let fd = fds.pop();
            if matches!(message, Message::Offer(_)) != fd.is_some() {
                return Err(invalid("an offer comes with exactly one descriptor"));
            }
            return Ok(Some((message, fd)));
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
        }
    }

    #[test]
    fn messages_round_trip_and_other_versions_are_refused() {
        let mut v6 = offer();
        v6.peer = Peer::Ip("[::1]:80".parse().unwrap());
        v6.record = None;
        v6.timer = Some(Duration::from_millis(5));
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
    }

    #[test]
    fn a_socket_crosses_the_channel_and_keeps_working() {
        let (mut master, mut worker) = Channel::pair().unwrap();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        worker.send(&Message::Offer(offer()), Some(OwnedFd::from(theirs))).unwrap();
        let (message, fd) = master.recv().unwrap().expect("a message");
        assert_eq!(message, Message::Offer(offer()));
        let mut moved = std::os::unix::net::UnixStream::from(fd.expect("the socket"));
        moved.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        assert!(master.recv().unwrap().is_none(), "nothing more");
        drop(worker);
        assert_eq!(master.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_worker_reports_ready_once_over_its_channel() {
        let (mut master, mut worker) = Channel::pair().unwrap();
        assert!(master.recv().unwrap().is_none());
        report_ready(Some(&mut worker)).unwrap();
        let (message, fd) = master.recv().unwrap().expect("a message");
        assert_eq!((message, fd.is_none()), (Message::Ready, true));
        assert!(report_ready(None).is_err(), "a worker without a channel cannot boot");
        drop(master);
        let error = report_ready(Some(&mut worker)).unwrap_err();
        assert!(error.to_string().contains("telling the master it is ready"), "{error}");
    }
}
