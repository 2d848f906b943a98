//! Network vocabulary of every layer: an [`Address`] to bind or connect to (IPv4, IPv6, a
//! Unix socket file or a Linux abstract name), the [`Peer`] a connection comes from (an IP
//! address and port, or a Unix client's credentials), and the connected [`Stream`] socket.
//!
//! Pure types and a few system calls; any process. Invariants:
//! - an address is parsed once, from its written form ([`Address::from_str`]), and printed
//!   back the same way ([`Address`]'s `Display`): `IP:PORT`, `[IPv6]:PORT`, `unix:/path` or
//!   `unix:@name`. Nothing else in the code looks at the text;
//! - an abstract name's socket address is exactly as long as the name (no NUL padding to
//!   `sizeof(sun_path)`, the HAProxy surprise: `@name` there binds a 108-byte name that other
//!   programs cannot reach by `name`);
//! - a Unix peer is known by its credentials at connect time (`SO_PEERCRED`, unix(7)), which
//!   the kernel vouches for; its socket address (almost always unnamed) says nothing.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

/// Longest Unix socket path, in bytes: `sun_path` holds 108 with the terminating NUL.
pub const MAX_UNIX_PATH: usize = 107;

/// The prefix of a Unix socket address's written form.
const UNIX_PREFIX: &str = "unix:";

/// Where to bind or connect: an IP socket address, a Unix socket file, or a name in Linux's
/// abstract Unix namespace (unix(7)), which has no file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// `IP:PORT` or `[IPv6]:PORT`.
    Ip(SocketAddr),
    /// `unix:/path`: an absolute path of at most [`MAX_UNIX_PATH`] bytes.
    Unix(PathBuf),
    /// `unix:@name`: the name's bytes (without the leading NUL the kernel wants), 1 to
    /// [`MAX_UNIX_PATH`] of them.
    Abstract(Vec<u8>),
}

/// Why a written address was refused; the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddressError(String);

impl FromStr for Address {
    type Err = AddressError;

    /// Reads `IP:PORT`, `[IPv6]:PORT`, `unix:/absolute/path` or `unix:@name`.
    ///
    /// # Errors
    /// [`AddressError`] naming what is wrong: not one of these forms, a relative or too long
    /// path, an empty or too long abstract name, a NUL byte.
    fn from_str(text: &str) -> Result<Address, AddressError> {
        let Some(rest) = text.strip_prefix(UNIX_PREFIX) else {
            return text.parse().map(Address::Ip).map_err(|_| {
                AddressError(format!(
                    "{text:?} is not an address: write IP:PORT, [IPv6]:PORT, unix:/path or unix:@name"
                ))
            });
        };
        if rest.contains('\0') {
            return Err(AddressError(format!("{text:?}: a Unix socket address holds no NUL byte")));
        }
        if let Some(name) = rest.strip_prefix('@') {
            if name.is_empty() || name.len() > MAX_UNIX_PATH {
                return Err(AddressError(format!(
                    "{text:?}: an abstract name has 1 to {MAX_UNIX_PATH} bytes"
                )));
            }
            return Ok(Address::Abstract(name.as_bytes().to_vec()));
        }
        let path = Path::new(rest);
        if !path.is_absolute() {
            return Err(AddressError(format!(
                "{text:?}: a Unix socket path must be absolute (unix:/run/app.sock), or an abstract name (unix:@name)"
            )));
        }
        if rest.len() > MAX_UNIX_PATH {
            return Err(AddressError(format!(
                "{text:?}: a Unix socket path has at most {MAX_UNIX_PATH} bytes"
            )));
        }
        if path.file_name().is_none() {
            return Err(AddressError(format!("{text:?}: the path names no file")));
        }
        Ok(Address::Unix(path.to_owned()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(address) => address.fmt(f),
            Address::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
            Address::Abstract(name) => {
                write!(f, "{UNIX_PREFIX}@{}", String::from_utf8_lossy(name))
            }
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(address: SocketAddr) -> Address {
        Address::Ip(address)
    }
}

impl Address {
    /// The IP socket address, if this is one.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            Address::Ip(address) => Some(*address),
            Address::Unix(_) | Address::Abstract(_) => None,
        }
    }

    /// The socket file's path, for [`Address::Unix`].
    pub fn path(&self) -> Option<&Path> {
        match self {
            Address::Unix(path) => Some(path),
            Address::Ip(_) | Address::Abstract(_) => None,
        }
    }

    /// Whether this is a Unix-domain address (a file or an abstract name).
    pub fn is_unix(&self) -> bool {
        !matches!(self, Address::Ip(_))
    }

    /// Whether the kernel picks the port at bind (`IP:0`): such an address names no one
    /// socket until bound, so two of them never clash.
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, Address::Ip(address) if address.port() == 0)
    }

    /// The socket domain: `AF_INET`, `AF_INET6` or `AF_UNIX`.
    pub fn domain(&self) -> Domain {
        match self {
            Address::Ip(address) => Domain::for_address(*address),
            Address::Unix(_) | Address::Abstract(_) => Domain::UNIX,
        }
    }

    /// The protocol of a stream socket in [`Address::domain`]: TCP, or none for Unix.
    pub fn stream_protocol(&self) -> Option<Protocol> {
        match self {
            Address::Ip(_) => Some(Protocol::TCP),
            Address::Unix(_) | Address::Abstract(_) => None,
        }
    }

    /// The socket address for bind(2) and connect(2); an abstract name's is exactly as long
    /// as the name (see the module documentation).
    ///
    /// # Errors
    /// Never for an address made by [`Address::from_str`] (lengths are checked there).
    pub fn sockaddr(&self) -> io::Result<SockAddr> {
        match self {
            Address::Ip(address) => Ok(SockAddr::from(*address)),
            Address::Unix(path) => SockAddr::unix(path),
            Address::Abstract(name) => {
                let mut bytes = Vec::with_capacity(name.len() + 1);
                bytes.push(0);
                bytes.extend_from_slice(name);
                SockAddr::unix(std::ffi::OsStr::from_bytes(&bytes))
            }
        }
    }

    /// The address a socket address names: IP, a path, or an abstract name; `None` for an
    /// unnamed Unix socket or another family.
    pub fn from_sockaddr(address: &SockAddr) -> Option<Address> {
        if let Some(ip) = address.as_socket() {
            return Some(Address::Ip(ip));
        }
        if let Some(path) = address.as_pathname() {
            return Some(Address::Unix(path.to_owned()));
        }
        address.as_abstract_namespace().map(|name| Address::Abstract(name.to_vec()))
    }
}

/// TCP keepalive (tcp(7)): after `idle` without traffic the kernel sends a probe, then one
/// every `interval`, and gives the connection up after `count` unanswered ones; `None`
/// keeps the system's value (`net.ipv4.tcp_keepalive_intvl`, `tcp_keepalive_probes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe (`TCP_KEEPIDLE`), at least a second.
    pub idle: std::time::Duration,
    /// Between probes (`TCP_KEEPINTVL`).
    pub interval: Option<std::time::Duration>,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub count: Option<u32>,
}

impl Keepalive {
    /// Sets `SO_KEEPALIVE` and the times on `socket` (a listening socket passes them on to
    /// the connections it accepts, as Linux copies a listener's options).
    ///
    /// # Errors
    /// setsockopt(2) failed.
    pub fn apply(&self, socket: SockRef<'_>) -> io::Result<()> {
        let mut params = socket2::TcpKeepalive::new().with_time(self.idle);
        if let Some(interval) = self.interval {
            params = params.with_interval(interval);
        }
        if let Some(count) = self.count {
            params = params.with_retries(count);
        }
        socket.set_tcp_keepalive(&params)
    }
}

/// A Unix client's credentials when it connected (`SO_PEERCRED`, unix(7)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// Its process id (in the listener's pid namespace; 0 when it is in none the kernel can
    /// name).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

/// Who a connection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A TCP client: its address and port (the one a PROXY protocol header named, if any).
    Ip(SocketAddr),
    /// A Unix-domain client, known by its credentials.
    Unix(Credentials),
}

impl Peer {
    /// The client's IP address, for a TCP client.
    pub fn ip(&self) -> Option<IpAddr> {
        self.socket_addr().map(|address| address.ip())
    }

    /// The client's IP socket address, for a TCP client.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Peer::Ip(address) => Some(*address),
            Peer::Unix(_) => None,
        }
    }

    /// The credentials of a Unix client.
    pub fn credentials(&self) -> Option<Credentials> {
        match self {
            Peer::Unix(credentials) => Some(*credentials),
            Peer::Ip(_) => None,
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(address: SocketAddr) -> Peer {
        Peer::Ip(address)
    }
}

impl fmt::Display for Peer {
    /// `IP:PORT` (`[IPv6]:PORT`), or `uid:UID,pid:PID` for a Unix client: what the access
    /// line's `peer=` says.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Ip(address) => address.fmt(f),
            Peer::Unix(credentials) => write!(f, "uid:{},pid:{}", credentials.uid, credentials.pid),
        }
    }
}

/// A connected stream socket, TCP or Unix, as the worker and the relay hold it: reads and
/// writes are recv(2) and send(2) (`MSG_NOSIGNAL`: a closed peer is `EPIPE`, never
/// SIGPIPE).
#[derive(Debug)]
pub struct Stream(Socket);

impl Stream {
    /// Shuts down one or both directions (shutdown(2)).
    ///
    /// # Errors
    /// shutdown(2) failed (`ENOTCONN`: the peer is gone).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.0.shutdown(how)
    }

    /// Sets `TCP_NODELAY`; nothing for a Unix socket, which has no Nagle algorithm.
    ///
    /// # Errors
    /// setsockopt(2) failed.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        match self.0.domain()? {
            Domain::UNIX => Ok(()),
            _ => self.0.set_tcp_nodelay(nodelay),
        }
    }

    /// Whether `TCP_NODELAY` is set (false for a Unix socket).
    ///
    /// # Errors
    /// getsockopt(2) failed.
    pub fn nodelay(&self) -> io::Result<bool> {
        match self.0.domain()? {
            Domain::UNIX => Ok(false),
            _ => self.0.tcp_nodelay(),
        }
    }

    /// The pending socket error (`SO_ERROR`), cleared by reading it: how a non-blocking
    /// connect ended.
    ///
    /// # Errors
    /// getsockopt(2) failed.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.0.take_error()
    }

    /// The peer's address (getpeername(2)); fails with `ENOTCONN` while a connect is under
    /// way or after it failed.
    ///
    /// # Errors
    /// getpeername(2) failed.
    pub fn peer_addr(&self) -> io::Result<SockAddr> {
        self.0.peer_addr()
    }

    /// Switches `O_NONBLOCK`.
    ///
    /// # Errors
    /// fcntl(2) failed.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.0.set_nonblocking(nonblocking)
    }

    /// The socket as socket2 sees it, for socket options.
    pub fn socket(&self) -> SockRef<'_> {
        SockRef::from(&self.0)
    }
}

impl From<OwnedFd> for Stream {
    fn from(fd: OwnedFd) -> Stream {
        Stream(Socket::from(fd))
    }
}

impl From<Stream> for OwnedFd {
    fn from(stream: Stream) -> OwnedFd {
        stream.0.into()
    }
}

impl From<std::net::TcpStream> for Stream {
    fn from(stream: std::net::TcpStream) -> Stream {
        Stream(Socket::from(stream))
    }
}

impl From<std::os::unix::net::UnixStream> for Stream {
    fn from(stream: std::os::unix::net::UnixStream) -> Stream {
        Stream(Socket::from(OwnedFd::from(stream)))
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Read for &Stream {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Write for Stream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &Stream {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// accept4(2) with `SOCK_NONBLOCK | SOCK_CLOEXEC` on listening socket `listener`: a
/// non-blocking, close-on-exec client socket and who it comes from (for a Unix socket, one
/// more system call reads its credentials).
///
/// # Errors
/// The accept4(2) error: `WouldBlock` when no connection is pending, `EMFILE`/`ENFILE` when
/// out of descriptors, `ECONNABORTED` when the client already gave up; or getsockopt(2)'s.
pub fn accept(listener: &impl AsRawFd) -> io::Result<(Stream, Peer)> {
    let fd = listener.as_raw_fd();
    // SAFETY: `try_init` hands us storage for a sockaddr and its length, which accept4 fills
    // in; `fd` is a listening socket borrowed for the duration of the call.
    let (client, address) = unsafe {
        SockAddr::try_init(|storage, len| {
            let client = nix::libc::accept4(
                fd,
                storage.cast(),
                len,
                nix::libc::SOCK_NONBLOCK | nix::libc::SOCK_CLOEXEC,
            );
            if client < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(OwnedFd::from_raw_fd(client))
        })?
    };
    let stream = Stream::from(client);
    let peer = match address.as_socket() {
        Some(ip) => Peer::Ip(ip),
        None if address.domain() == Domain::UNIX => Peer::Unix(peer_credentials(&stream)?),
        None => return Err(io::Error::other("accepted a connection of an unknown family")),
    };
    Ok((stream, peer))
}

/// The credentials of the Unix socket `socket`'s peer (`SO_PEERCRED`).
///
/// # Errors
/// getsockopt(2) failed (not a connected Unix socket).
pub fn peer_credentials(socket: &impl AsFd) -> io::Result<Credentials> {
    let ucred = nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(Credentials { pid: ucred.pid(), uid: ucred.uid(), gid: ucred.gid() })
}

/// Starts a non-blocking connect to `address` from `source` (bound first when given: the
/// local IP to connect from); the stream is returned while the connect is under way
/// (`EINPROGRESS`; a Unix socket that cannot accept at once says `EAGAIN`, taken as refused).
///
/// # Errors
/// socket(2), bind(2) or connect(2) failed at once (`ECONNREFUSED`, `ENOENT` for a missing
/// socket file, `EAGAIN` for a Unix listener whose backlog is full).
pub fn connect(address: &Address, source: Option<IpAddr>) -> io::Result<Stream> {
    let kind = Type::STREAM.nonblocking().cloexec();
    let socket = Socket::new(address.domain(), kind, address.stream_protocol())?;
    if let (Some(ip), Address::Ip(_)) = (source, address) {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    match socket.connect(&address.sockaddr()?) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(Stream(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_and_print_back_the_same() {
        for text in ["127.0.0.1:80", "[::1]:6379", "unix:/run/app.sock", "unix:@preforkd"] {
            let address: Address = text.parse().unwrap();
            assert_eq!(address.to_string(), text);
        }
        assert!("unix:/run/app.sock".parse::<Address>().unwrap().is_unix());
        assert!("127.0.0.1:0".parse::<Address>().unwrap().is_ephemeral());
        assert!(!"unix:@x".parse::<Address>().unwrap().is_ephemeral());
        for bad in ["localhost", "unix:run/app.sock", "unix:@", "unix:", "unix:/", "unix:/a\0b"] {
            assert!(bad.parse::<Address>().is_err(), "{bad:?}");
        }
        let long = format!("unix:/{}", "a".repeat(MAX_UNIX_PATH));
        assert!(long.parse::<Address>().unwrap_err().to_string().contains("at most 107"));
        let longest = format!("unix:@{}", "a".repeat(MAX_UNIX_PATH));
        assert!(longest.parse::<Address>().is_ok());
    }

    #[test]
    fn an_abstract_name_is_exactly_as_long_as_the_name() {
        let address: Address = "unix:@pfd-test".parse().unwrap();
        let sockaddr = address.sockaddr().unwrap();
        let offset = std::mem::offset_of!(nix::libc::sockaddr_un, sun_path);
        assert_eq!(sockaddr.len() as usize, offset + 1 + "pfd-test".len(), "no NUL padding");
        assert_eq!(Address::from_sockaddr(&sockaddr), Some(address));
    }

    #[test]
    fn a_unix_connection_is_accepted_with_its_credentials_and_relays_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let address = Address::Unix(path.clone());
        let client = connect(&address, None).unwrap();
        let (accepted, peer) = accept(&listener).unwrap();
        let credentials = peer.credentials().expect("a Unix peer");
        assert_eq!(credentials.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(credentials.pid, std::process::id() as i32);
        assert_eq!(peer.to_string(), format!("uid:{},pid:{}", credentials.uid, credentials.pid));
        assert_eq!(peer.ip(), None);
        (&client).write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        accepted.set_nonblocking(false).unwrap();
        (&accepted).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        accepted.set_nodelay(true).expect("no-op on a Unix socket");
        assert!(!accepted.nodelay().unwrap());
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let refused = connect(&address, None).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_tcp_connection_is_accepted_with_its_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = Address::Ip(listener.local_addr().unwrap());
        let source = "127.0.0.3".parse().unwrap();
        let client = connect(&address, Some(source)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (_accepted, peer) = loop {
            match accept(&listener) {
                Ok(pair) => break pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline, "no connection");
                    std::thread::yield_now();
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(peer.ip(), Some(source), "connected from the source address");
        assert_eq!(client.take_error().unwrap().map(|e| e.to_string()), None);
    }
}
