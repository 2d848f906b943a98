//! The messages between a worker and the exec spawners (`crate::spawner`), and the raw
//! sendmsg(2) / recvmsg(2) calls that carry descriptors with them (`SCM_RIGHTS`, unix(7)).
//!
//! Runs in workers (the exec session) and in the spawner. Two kinds of socket:
//! - a worker's *link*, one per worker, made by the master when it forks the worker: the
//!   worker sends one [`Request`] per connection, with two descriptors, the client socket and
//!   one end of a fresh *reply channel*. Nothing comes back on the link. It is a
//!   `SOCK_STREAM` pair with a large send buffer ([`link_pair`]): a datagram or seqpacket
//!   socket would hold only `net.unix.max_dgram_qlen` (often 10) requests, and a burst of
//!   connections waits there while the spawner works. Each request is one sendmsg(2) that
//!   carries descriptors, and a unix stream socket never joins such a message with the
//!   next one in a read, so one recvmsg(2) gets one request, framed by its length, even
//!   with several readers: each spawner of the generation reads every link;
//! - the *reply channel*, one per connection, made by the worker: the spawner that read the
//!   request sends [`Event::Started`] with the read end of the stderr pipe when stderr is
//!   logged (only then: the worker needs nothing else before the end, and each message would
//!   wake it),
//!   or [`Event::Failed`]; then [`Event::Exited`] with the pid and wait status once it has
//!   reaped the child, then closes its end. The worker may send [`Event::Signal`] (`max_lifetime`); closing its end asks the
//!   spawner to kill the child's process group (the connection ended first). Holding the
//!   channel is what lets a worker act on that one child, and on nothing else. It is
//!   `SOCK_SEQPACKET` (one message per call, descriptors with their message).
//!
//! A request names a listener by its index in the worker's generation, never a path or an
//! argument: the spawner runs only the program the configuration gives that listener.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

use crate::net::{Credentials, Peer};

/// Bytes of an encoded [`Request`] before the listener's name: its length (2 bytes), then
/// the addresses.
const REQUEST_HEAD: usize = 42;

/// Longest listener name a request carries.
pub const MAX_LISTENER_NAME: usize = 256;

/// Longest TLS environment a request carries (`NAME=VALUE` pairs, each ended by NUL).
pub const MAX_TLS_ENV: usize = 4096;

/// The variables a worker may pass for a TLS connection: what the handshake settled
/// ([`crate::services::TlsInfo::environment`]); the spawner takes no other name from a worker.
pub const TLS_NAMES: [&str; 9] = [
    "SSL_PROTOCOL",
    "SSL_CIPHER",
    "SSL_SESSION_RESUMED",
    "SSL_TLS_SNI",
    "SSL_CLIENT_VERIFY",
    "SSL_CLIENT_S_DN",
    "SSL_CLIENT_I_DN",
    "SSL_CLIENT_M_SERIAL",
    "SSL_ALPN",
];

/// Bytes of the longest encoded [`Request`].
pub const MAX_REQUEST: usize = REQUEST_HEAD + MAX_LISTENER_NAME + MAX_TLS_ENV;

/// Bytes of an encoded [`Event`].
pub const EVENT_LEN: usize = 12;

/// A worker's request: start the program of `listener` for the connection whose socket
/// comes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The listener's name (unique in the worker's generation).
    pub listener: &'a str,
    /// The client (from a PROXY protocol header when the listener trusts one; a Unix
    /// client's credentials).
    pub peer: Peer,
    /// The local address when the worker knows it; `None`: the spawner asks the socket.
    pub local: Option<SocketAddr>,
    /// On a TLS listener, what the handshake settled, as `NAME=VALUE` pairs each ended by a
    /// NUL byte, names from [`TLS_NAMES`] only; empty otherwise.
    pub tls: &'a [u8],
}

impl Request<'_> {
    /// The TLS variables, each checked: a name of [`TLS_NAMES`], no NUL byte; `None` when
    /// one is not.
    pub fn tls_env(&self) -> Option<Vec<(String, String)>> {
        let mut vars = Vec::new();
        for pair in self.tls.split(|&b| b == 0).filter(|p| !p.is_empty()) {
            let pair = std::str::from_utf8(pair).ok()?;
            let (name, value) = pair.split_once('=')?;
            if !TLS_NAMES.contains(&name) {
                return None;
            }
            vars.push((name.to_owned(), value.to_owned()));
        }
        Some(vars)
    }
}

fn put_addr(bytes: &mut [u8], address: Option<SocketAddr>) {
    let (family, ip, port) = match address {
        None => (0, [0; 16], 0),
        Some(SocketAddr::V4(a)) => (4, a.ip().to_ipv6_mapped().octets(), a.port()),
        Some(SocketAddr::V6(a)) => (6, a.ip().octets(), a.port()),
    };
    bytes[0] = family;
    bytes[1..17].copy_from_slice(&ip);
    bytes[17..19].copy_from_slice(&port.to_le_bytes());
}

/// The peer as [`put_addr`] writes an address, a Unix client with family 1 and its pid,
/// uid and gid as the first 12 address bytes.
fn put_peer(bytes: &mut [u8], peer: Peer) {
    match peer {
        Peer::Ip(address) => put_addr(bytes, Some(address)),
        Peer::Unix(Credentials { pid, uid, gid }) => {
            bytes.fill(0);
            bytes[0] = 1;
            bytes[1..5].copy_from_slice(&pid.to_le_bytes());
            bytes[5..9].copy_from_slice(&uid.to_le_bytes());
            bytes[9..13].copy_from_slice(&gid.to_le_bytes());
        }
    }
}

fn get_peer(bytes: &[u8]) -> Option<Peer> {
    if bytes[0] == 1 {
        let word = |i: usize| <[u8; 4]>::try_from(&bytes[i..i + 4]).ok();
        return Some(Peer::Unix(Credentials {
            pid: i32::from_le_bytes(word(1)?),
            uid: u32::from_le_bytes(word(5)?),
            gid: u32::from_le_bytes(word(9)?),
        }));
    }
    get_addr(bytes)?.map(Peer::Ip)
}

fn get_addr(bytes: &[u8]) -> Option<Option<SocketAddr>> {
    let ip: [u8; 16] = bytes[1..17].try_into().ok()?;
    let port = u16::from_le_bytes([bytes[17], bytes[18]]);
    let ip = match bytes[0] {
        0 => return Some(None),
        4 => IpAddr::V4(Ipv6Addr::from(ip).to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED)),
        6 => IpAddr::V6(Ipv6Addr::from(ip)),
        _ => return None,
    };
    Some(Some(SocketAddr::new(ip, port)))
}

impl<'a> Request<'a> {
    /// Writes the request as sent into `bytes`: its whole length (2 bytes), peer and local
    /// address (family 0, 4 or 6; 16 bytes of address; port; a Unix peer is family 1 with its
    /// pid, uid and gid in the address bytes), the length of the TLS variables (2 bytes),
    /// then the listener's name and the TLS variables; little-endian. Returns its length;
    /// `None` when the name is longer than [`MAX_LISTENER_NAME`] or the variables than
    /// [`MAX_TLS_ENV`].
    pub fn encode(&self, bytes: &mut [u8; MAX_REQUEST]) -> Option<usize> {
        let name = self.listener.as_bytes();
        if name.len() > MAX_LISTENER_NAME || self.tls.len() > MAX_TLS_ENV {
            return None;
        }
        let len = REQUEST_HEAD + name.len() + self.tls.len();
        bytes[..2].copy_from_slice(&(len as u16).to_le_bytes());
        put_peer(&mut bytes[2..21], self.peer);
        put_addr(&mut bytes[21..40], self.local);
        bytes[40..REQUEST_HEAD].copy_from_slice(&(self.tls.len() as u16).to_le_bytes());
        bytes[REQUEST_HEAD..REQUEST_HEAD + name.len()].copy_from_slice(name);
        bytes[REQUEST_HEAD + name.len()..len].copy_from_slice(self.tls);
        Some(len)
    }

    /// Reads a request; `None` when it is malformed (the spawner then drops the link: its
    /// framing cannot be trusted any more).
    pub fn decode(bytes: &'a [u8]) -> Option<Request<'a>> {
        if bytes.len() < REQUEST_HEAD || bytes.len() > MAX_REQUEST {
            return None;
        }
        if usize::from(u16::from_le_bytes([bytes[0], bytes[1]])) != bytes.len() {
            return None;
        }
        let peer = get_peer(&bytes[2..21])?;
        let local = get_addr(&bytes[21..40])?;
        let tls_len = usize::from(u16::from_le_bytes([bytes[40], bytes[41]]));
        let name_end = bytes.len().checked_sub(tls_len).filter(|&end| end >= REQUEST_HEAD)?;
        let listener = std::str::from_utf8(&bytes[REQUEST_HEAD..name_end]).ok()?;
        Some(Request { listener, peer, local, tls: &bytes[name_end..] })
    }
}

/// A message on a reply channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Spawner to worker: the child runs with this pid (sent with its stderr pipe, when
    /// stderr is logged).
    Started(i32),
    /// Spawner to worker: it could not be started (an errno); the channel closes.
    Failed(i32),
    /// Spawner to worker: the child (pid) was reaped, with this wait status (waitpid(2)'s
    /// raw value); the channel closes.
    Exited(i32, i32),
    /// Worker to spawner: send this signal to the child's process group.
    Signal(i32),
}

impl Event {
    /// Kind (4 bytes), then two values (4 bytes each), little-endian.
    pub fn encode(self) -> [u8; EVENT_LEN] {
        let (kind, a, b): (u32, i32, i32) = match self {
            Event::Started(pid) => (1, pid, 0),
            Event::Failed(errno) => (2, errno, 0),
            Event::Exited(pid, status) => (3, pid, status),
            Event::Signal(signal) => (4, signal, 0),
        };
        let mut bytes = [0u8; EVENT_LEN];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[4..8].copy_from_slice(&a.to_le_bytes());
        bytes[8..].copy_from_slice(&b.to_le_bytes());
        bytes
    }

    /// Reads a message; `None` when it is malformed.
    pub fn decode(bytes: &[u8]) -> Option<Event> {
        let bytes: &[u8; EVENT_LEN] = bytes.try_into().ok()?;
        let word = |at: usize| [bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]];
        let (a, b) = (i32::from_le_bytes(word(4)), i32::from_le_bytes(word(8)));
        Some(match u32::from_le_bytes(word(0)) {
            1 => Event::Started(a),
            2 => Event::Failed(a),
            3 => Event::Exited(a, b),
            4 => Event::Signal(a),
            _ => return None,
        })
    }
}

/// Descriptors one message carries at most.
pub const MAX_FDS: usize = 2;

/// Room for a `SCM_RIGHTS` control message of [`MAX_FDS`] descriptors, aligned for
/// `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

/// sendmsg(2) of `bytes` with `fds` (at most [`MAX_FDS`]), non-blocking, without SIGPIPE.
///
/// # Errors
/// `WouldBlock` when the socket's buffer is full; `EPIPE`/`ECONNRESET` when the other end
/// is closed.
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS, "at most {MAX_FDS} descriptors per message");
    let mut control = ControlBuffer([0; 64]);
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: a zeroed msghdr is valid ("no name, no data"); the fields set below point to
    // `iov`, `control` and `fds`, all alive for the call. CMSG_* compute offsets inside
    // `control`, which has room for MAX_FDS descriptors (CMSG_SPACE(8) is 24 bytes).
    let sent = unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &raw mut iov;
        message.msg_iovlen = 1;
        if !fds.is_empty() {
            let data_len = std::mem::size_of_val(fds) as u32;
            message.msg_control = control.0.as_mut_ptr().cast();
            message.msg_controllen = libc::CMSG_SPACE(data_len) as _;
            let header = libc::CMSG_FIRSTHDR(&raw const message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(data_len) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(header),
                data_len as usize,
            );
        }
        libc::sendmsg(
            socket.as_raw_fd(),
            &raw const message,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != bytes.len() {
        return Err(io::Error::other("message cut short"));
    }
    Ok(())
}

/// One message received: its length (0 at end of file) and the descriptors that came with
/// it (close-on-exec).
#[derive(Debug, Default)]
pub struct Received {
    /// Bytes of the message.
    pub len: usize,
    /// Its descriptors, in order (more than [`MAX_FDS`] are closed).
    pub fds: [Option<OwnedFd>; MAX_FDS],
    /// Some of its descriptors could not be installed (`MSG_CTRUNC`: this process is out of
    /// descriptors, unix(7)): the kernel closed those, and `fds` holds the ones before them.
    /// The message's bytes are whole.
    pub truncated: bool,
}

fn collect_fds(message: &libc::msghdr, fds: &mut [Option<OwnedFd>; MAX_FDS]) {
    // SAFETY: the kernel filled the control buffer `message` points to; CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk it within `msg_controllen`. Each SCM_RIGHTS descriptor is new and
    // ours to own.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS
            {
                let data = libc::CMSG_DATA(header);
                let count = ((*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.cast::<RawFd>().add(i)));
                    if let Some(free) = fds.iter_mut().find(|slot| slot.is_none()) {
                        *free = Some(fd);
                    }
                }
            }
            header = libc::CMSG_NXTHDR(message, header);
        }
    }
}

/// Receives up to `buffers.len()` (at most 2) messages at once (recvmmsg(2), non-blocking,
/// `MSG_CMSG_CLOEXEC`): how many arrived, each with its length and descriptors in
/// `received`. 0 messages is `WouldBlock`; a message of length 0 is the end of the stream.
///
/// # Errors
/// `WouldBlock` when nothing is waiting; other socket errors.
pub fn receive(
    socket: BorrowedFd<'_>,
    buffers: &mut [[u8; EVENT_LEN]],
    received: &mut [Received],
) -> io::Result<usize> {
    let count = buffers.len().min(received.len()).min(2);
    let mut controls = [ControlBuffer([0; 64]), ControlBuffer([0; 64])];
    // SAFETY: zeroed iovec, mmsghdr are valid; each header points to its own buffer and
    // control buffer, alive for the call; `count` headers are passed.
    let got = unsafe {
        let mut iovs: [libc::iovec; 2] = std::mem::zeroed();
        let mut headers: [libc::mmsghdr; 2] = std::mem::zeroed();
        for (i, (buffer, control)) in buffers.iter_mut().zip(controls.iter_mut()).take(count).enumerate() {
            iovs[i] = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
            headers[i].msg_hdr.msg_iov = &raw mut iovs[i];
            headers[i].msg_hdr.msg_iovlen = 1;
            headers[i].msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            headers[i].msg_hdr.msg_controllen = control.0.len() as _;
        }
        let got = libc::recvmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            count as u32,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            std::ptr::null_mut(),
        );
        if got > 0 {
            for (i, slot) in received.iter_mut().take(got as usize).enumerate() {
                slot.len = headers[i].msg_len as usize;
                slot.fds = [None, None];
                slot.truncated = headers[i].msg_hdr.msg_flags & libc::MSG_CTRUNC != 0;
                collect_fds(&headers[i].msg_hdr, &mut slot.fds);
            }
        }
        got
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(got as usize)
}

/// Receives one message of at most `buffer.len()` bytes with its descriptors (recvmsg(2),
/// non-blocking, `MSG_CMSG_CLOEXEC`). A message longer than the buffer is reported as
/// `InvalidData` (its descriptors are closed); one whose descriptors did not all fit in
/// this process is not an error: see [`Received::truncated`].
///
/// # Errors
/// `WouldBlock` when nothing is waiting; `InvalidData` for a message longer than `buffer`;
/// other socket errors.
pub fn receive_one(socket: BorrowedFd<'_>, buffer: &mut [u8]) -> io::Result<Received> {
    let mut control = ControlBuffer([0; 64]);
    let mut iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    let mut received = Received::default();
    // SAFETY: as in `receive`, for one header.
    let (got, flags) = unsafe {
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &raw mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.0.as_mut_ptr().cast();
        message.msg_controllen = control.0.len() as _;
        let got = libc::recvmsg(
            socket.as_raw_fd(),
            &raw mut message,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        );
        if got >= 0 {
            collect_fds(&message, &mut received.fds);
        }
        (got, message.msg_flags)
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message truncated"));
    }
    received.truncated = flags & libc::MSG_CTRUNC != 0;
    received.len = got as usize;
    Ok(received)
}

/// A worker's link to the spawner: a `SOCK_STREAM` pair, close-on-exec, whose first end
/// (the worker's) can hold [`LINK_BUFFER`] bytes of requests the spawner has not read (as
/// root; else as much of it as `net.core.wmem_max` allows).
///
/// # Errors
/// socketpair(2) failed (`EMFILE`, `ENFILE`).
pub fn link_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into `fds` on success.
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if unsafe { libc::socketpair(libc::AF_UNIX, flags, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors, owned by nothing else.
    let (worker, spawner) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let size = LINK_BUFFER as libc::c_int;
    for option in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt reads one int from `size`.
        let rc = unsafe {
            libc::setsockopt(
                worker.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
    }
    Ok((worker, spawner))
}

/// Send buffer of a worker's link, in bytes: each request waiting in it takes about 1 KiB
/// of kernel memory, so about 4,000 can wait.
pub const LINK_BUFFER: usize = 4 << 20;

/// A `SOCK_SEQPACKET` socket pair, close-on-exec; non-blocking when asked.
///
/// # Errors
/// socketpair(2) failed (`EMFILE`, `ENFILE`).
pub fn seqpacket_pair(nonblocking: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut flags = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if nonblocking {
        flags |= libc::SOCK_NONBLOCK;
    }
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into `fds` on success.
    if unsafe { libc::socketpair(libc::AF_UNIX, flags, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors, owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn requests_and_events_survive_the_wire() {
        let request = Request {
            listener: "git",
            peer: Peer::Ip("127.0.0.2:4242".parse().unwrap()),
            local: Some("[::1]:80".parse().unwrap()),
            tls: b"",
        };
        let unix = Credentials { pid: 77, uid: 1000, gid: 100 };
        let from_unix = Request { peer: Peer::Unix(unix), local: None, ..request };
        let mut bytes = [0u8; MAX_REQUEST];
        let len = from_unix.encode(&mut bytes).unwrap();
        assert_eq!(Request::decode(&bytes[..len]), Some(from_unix));
        let mut bytes = [0u8; MAX_REQUEST];
        let len = request.encode(&mut bytes).unwrap();
        assert_eq!(Request::decode(&bytes[..len]), Some(request));
        let unknown = Request { local: None, ..request };
        let len = unknown.encode(&mut bytes).unwrap();
        assert_eq!(Request::decode(&bytes[..len]), Some(unknown));
        assert_eq!(Request::decode(&[0; 3]), None, "a short request is refused");
        let tls = Request { tls: b"SSL_PROTOCOL=TLSv1.3\0SSL_CLIENT_S_DN=CN=a,O=b\0", ..request };
        let len = tls.encode(&mut bytes).unwrap();
        let decoded = Request::decode(&bytes[..len]).unwrap();
        assert_eq!((decoded.listener, decoded.tls_env().unwrap().len()), ("git", 2));
        let forged = Request { tls: b"LD_PRELOAD=/tmp/x.so\0", ..request };
        let len = forged.encode(&mut bytes).unwrap();
        assert_eq!(Request::decode(&bytes[..len]).unwrap().tls_env(), None, "only SSL_* names");
        let long = "x".repeat(MAX_LISTENER_NAME + 1);
        assert_eq!(Request { listener: &long, ..request }.encode(&mut bytes), None);
        for event in [Event::Started(9), Event::Failed(2), Event::Exited(77, 256), Event::Signal(15)] {
            assert_eq!(Event::decode(&event.encode()), Some(event));
        }
        assert_eq!(Event::decode(&[9; EVENT_LEN]), None);
    }

    #[test]
    fn descriptors_travel_with_their_message() {
        let (a, b) = seqpacket_pair(true).unwrap();
        let (x, y) = seqpacket_pair(true).unwrap();
        send(a.as_fd(), &Event::Started(1).encode(), &[x.as_raw_fd()]).unwrap();
        send(a.as_fd(), &Event::Exited(1, 0).encode(), &[]).unwrap();
        let mut buffers = [[0u8; EVENT_LEN]; 2];
        let mut received = [Received::default(), Received::default()];
        assert_eq!(receive(b.as_fd(), &mut buffers, &mut received).unwrap(), 2);
        assert_eq!(Event::decode(&buffers[0]), Some(Event::Started(1)));
        assert!(received[0].fds[0].is_some() && received[0].fds[1].is_none());
        assert_eq!(Event::decode(&buffers[1]), Some(Event::Exited(1, 0)));
        assert!(received[1].fds[0].is_none());
        // The received descriptor is the same socket: y hears what goes into it.
        send(received[0].fds[0].as_ref().unwrap().as_fd(), b"ping", &[]).unwrap();
        let mut buffer = [0u8; 8];
        assert_eq!(receive_one(y.as_fd(), &mut buffer).unwrap().len, 4);
        let error = receive(b.as_fd(), &mut buffers, &mut received).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(receive_one(b.as_fd(), &mut buffer).unwrap().len, 0, "end of file");
    }
}
