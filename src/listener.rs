//! Listening sockets, bound by the master before any worker is forked.
//!
//! Each socket has `SO_REUSEADDR` (a restart does not wait for TIME_WAIT), `IPV6_V6ONLY` for
//! IPv6 addresses (an `[::]` listener does not also take IPv4), the configured backlog,
//! `O_NONBLOCK` (workers accept until `EAGAIN`) and `FD_CLOEXEC`. Workers inherit them
//! through `fork(2)` and all accept on the same sockets.
//!
//! A `transport = "udp"` listener is a bound datagram socket with the same options (no
//! listen, no backlog): every worker receives on it until `EAGAIN`, and it is handed over on
//! reload and upgrade like a TCP one.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use thiserror::Error;

use crate::config::{ListenerConfig, ListenerTransport, SocketFile};
use crate::net::Address;

/// A listener's socket: listening stream (TCP or Unix) or bound UDP.
#[derive(Debug)]
pub enum ListenSocket {
    /// A stream listener (`transport = "tcp"`, or a Unix address): accept connections.
    Stream(Socket),
    /// `transport = "udp"`: receive datagrams.
    Datagram(UdpSocket),
}

impl ListenSocket {
    /// The UDP socket, for a datagram listener.
    pub fn datagram(&self) -> Option<&UdpSocket> {
        match self {
            ListenSocket::Datagram(socket) => Some(socket),
            ListenSocket::Stream(_) => None,
        }
    }

    fn sock_ref(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(self)
    }

    fn try_clone(&self) -> io::Result<ListenSocket> {
        Ok(match self {
            ListenSocket::Stream(s) => ListenSocket::Stream(s.try_clone()?),
            ListenSocket::Datagram(s) => ListenSocket::Datagram(s.try_clone()?),
        })
    }
}

impl AsFd for ListenSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            ListenSocket::Stream(s) => s.as_fd(),
            ListenSocket::Datagram(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for ListenSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// Creates, configures and binds a socket of `transport` on `address` (listening, for a
/// stream), non-blocking and close-on-exec. A Unix socket file gets its mode and ownership
/// between bind and listen, so no client can connect before they are right.
fn open(
    config: &ListenerConfig,
    address: &Address,
    reuseport: bool,
    fail: &dyn Fn(&'static str, io::Error) -> BindError,
) -> Result<ListenSocket, BindError> {
    let (transport, backlog) = (config.transport, config.backlog.get());
    let (kind, protocol) = match (transport, address.is_unix()) {
        (ListenerTransport::Tcp, false) => (Type::STREAM, Some(Protocol::TCP)),
        (ListenerTransport::Tcp, true) => (Type::STREAM, None),
        (ListenerTransport::Udp, _) => (Type::DGRAM, Some(Protocol::UDP)),
    };
    if let Address::Unix(path) = address {
        clear_stale(path, &config.socket_file)
            .map_err(|e| fail("replace the socket file of", e))?;
    }
    // socket2 creates the socket with SOCK_CLOEXEC.
    let socket = Socket::new(address.domain(), kind, protocol)
        .map_err(|e| fail("create a socket for", e))?;
    if let Address::Ip(ip) = address {
        if let Some(interface) = &config.interface {
            socket
                .bind_device(Some(interface.as_bytes()))
                .map_err(|e| fail("bind to the interface (SO_BINDTODEVICE) of", e))?;
        }
        socket.set_reuse_address(true).map_err(|e| fail("set SO_REUSEADDR on", e))?;
        if reuseport {
            socket.set_reuse_port(true).map_err(|e| fail("set SO_REUSEPORT on", e))?;
        }
        if ip.is_ipv6() {
            socket.set_only_v6(true).map_err(|e| fail("set IPV6_V6ONLY on", e))?;
        }
    }
    let sockaddr = address.sockaddr().map_err(|e| fail("bind", e))?;
    socket.bind(&sockaddr).map_err(|e| fail("bind", e))?;
    if let Address::Unix(path) = address
        && let Err(error) = set_file(path, &config.socket_file)
    {
        // Not left behind half set up.
        let _ = remove_if_socket(path);
        return Err(fail("set the mode or owner of the socket file of", error));
    }
    if transport == ListenerTransport::Tcp {
        if !address.is_unix() {
            set_nodelay(&socket, config).map_err(|e| fail("set TCP_NODELAY on", e))?;
            if let Some(keepalive) = &config.tcp_keepalive {
                keepalive
                    .apply(SockRef::from(&socket))
                    .map_err(|e| fail("set TCP keepalive on", e))?;
            }
        }
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        socket.listen(backlog).map_err(|e| fail("listen on", e))?;
    }
    socket.set_nonblocking(true).map_err(|e| fail("set O_NONBLOCK on", e))?;
    Ok(match transport {
        ListenerTransport::Tcp => ListenSocket::Stream(socket),
        ListenerTransport::Udp => ListenSocket::Datagram(socket.into()),
    })
}

/// Makes room at `path` for a new socket file: nothing there is fine; a socket file that no
/// process listens on (a connect is refused: left by a crash) is removed. Anything else is
/// an error and is left alone: a symlink (never followed, never removed), a file that is not
/// a socket, a socket a process listens on, and, when running as root, a socket owned by
/// neither root nor the configured `owner` (someone else's, in a shared directory).
///
/// # Errors
/// `AddrInUse`, `AlreadyExists` or `PermissionDenied` saying which of these it is.
fn clear_stale(path: &Path, file: &SocketFile) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kind = meta.file_type();
    if kind.is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a symlink is there (neither followed nor removed)",
        ));
    }
    if !kind.is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is there (not removed)",
        ));
    }
    if nix::unistd::geteuid().is_root() {
        let owner = file.owner.as_deref().and_then(|o| crate::privileges::user_id(o).ok());
        if meta.uid() != 0 && Some(meta.uid()) != owner {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the socket file there belongs to uid {} (not removed)", meta.uid()),
            ));
        }
    }
    // A blocking connect to a Unix socket never waits for the listener to accept: it is
    // refused at once when nobody listens, and succeeds (or says EAGAIN, backlog full)
    // when someone does.
    match std::os::unix::net::UnixStream::connect(path) {
        Err(e) if e.raw_os_error() == Some(nix::libc::ECONNREFUSED) => {
            log::warn!("removing the stale socket file {} (nobody listens on it)", path.display());
            remove_if_socket(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() != Some(nix::libc::EAGAIN) => Err(e),
        _ => Err(io::Error::new(io::ErrorKind::AddrInUse, "a running process listens on it")),
    }
}

/// Removes `path` if it is a socket file (not through a symlink: unlink(2) never follows
/// the last component).
fn remove_if_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sets the socket file's owner, group and mode as `file` says, on the file itself: opened
/// with `O_PATH | O_NOFOLLOW` and checked to be a socket, so a symlink swapped in meanwhile
/// is never followed; fchownat(2) on that descriptor, chmod(2) through its `/proc/self/fd`
/// link (the way to chmod a file not opened for reading, as glibc's fchmodat does).
fn set_file(path: &Path, file: &SocketFile) -> io::Result<()> {
    if *file == SocketFile::default() {
        return Ok(());
    }
    let uid = file.owner.as_deref().map(crate::privileges::user_id).transpose()?;
    let gid = file.group.as_deref().map(crate::privileges::group_id).transpose()?;
    use nix::fcntl::{OFlag, open};
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = open(path, flags, nix::sys::stat::Mode::empty())?;
    let stat = nix::sys::stat::fstat(&fd)?;
    if stat.st_mode & nix::libc::S_IFMT != nix::libc::S_IFSOCK {
        return Err(io::Error::other("the socket file was replaced by another file"));
    }
    if uid.is_some() || gid.is_some() {
        nix::unistd::fchownat(
            &fd,
            "",
            uid.map(nix::unistd::Uid::from_raw),
            gid.map(nix::unistd::Gid::from_raw),
            nix::fcntl::AtFlags::AT_EMPTY_PATH,
        )?;
    }
    if let Some(mode) = file.mode {
        use std::os::unix::fs::PermissionsExt;
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        std::fs::set_permissions(link, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Sets `TCP_NODELAY` on a new listening socket as `tcp_nodelay` says: Linux copies it to
/// every socket accept(2) returns (as Stevens lists it, UNIX Network Programming 7.4), so a
/// worker need not set it per connection (it checks once, see [`inherits_nodelay`]). Only
/// new or adopted sockets: a reload keeps the socket's value (a generation that does not
/// match it sets the option per connection), so a reload that fails or is rolled back
/// leaves the serving generation's connections as they were.
fn set_nodelay(socket: &Socket, config: &ListenerConfig) -> io::Result<()> {
    if socket.tcp_nodelay()? == config.tcp_nodelay {
        return Ok(());
    }
    socket.set_tcp_nodelay(config.tcp_nodelay)
}

/// Whether the TCP listening socket `socket` passes `TCP_NODELAY` = `nodelay` on to the
/// connections it accepts: true when its own option has that value (Linux copies a listening
/// socket's options to accepted sockets). False for a datagram socket, or when it cannot be
/// read: the caller then sets the option on each connection. True for a Unix socket, which
/// has no such option to set.
pub fn inherits_nodelay(socket: &ListenSocket, nodelay: bool) -> bool {
    match socket {
        ListenSocket::Stream(s) if s.domain().is_ok_and(|d| d == Domain::UNIX) => true,
        ListenSocket::Stream(_) => {
            socket.sock_ref().tcp_nodelay().is_ok_and(|value| value == nodelay)
        }
        ListenSocket::Datagram(_) => false,
    }
}

/// The socket file a listener created (or adopted), as it was then: removed when the
/// listener is given up for good ([`Listener::remove_file`]) only if it is still that file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnFile {
    /// The socket file at `path` now, if there is one.
    fn at(path: &Path) -> Option<OwnFile> {
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.file_type().is_socket().then(|| OwnFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A bound, listening socket and the configuration it serves.
#[derive(Debug)]
pub struct Listener {
    /// The `[[listener]]` it was bound for.
    pub config: ListenerConfig,
    /// The address actually bound (the kernel's port when the configuration says 0).
    pub local_addr: Address,
    /// Stable identity across reloads (assigned per listener name by the master): per-client
    /// counts are keyed by it, so a client keeps its count when the configuration changes.
    pub id: u16,
    socket: ListenSocket,
    /// The socket file it made (a `unix:/path` listener bound or adopted by this master;
    /// not one systemd passed, which systemd removes).
    file: Option<OwnFile>,
}

/// A listener could not be set up.
#[derive(Debug, Error)]
#[error("could not {step} {address} (listener {name}): {source}")]
pub struct BindError {
    /// The failing step: `create a socket for`, `bind`, `listen on` ...
    pub step: &'static str,
    /// The configured address.
    pub address: Address,
    /// The listener's name.
    pub name: String,
    /// The system error.
    pub source: io::Error,
}

impl Listener {
    /// Creates, configures, binds and listens, as described in the module documentation.
    ///
    /// # Errors
    /// [`BindError`] naming the step that failed, e.g.
    /// `could not bind 127.0.0.1:7788 (listener echo): Address already in use`.
    pub fn bind(config: &ListenerConfig, id: u16) -> Result<Self, BindError> {
        let address = &config.address;
        let fail = |step: &'static str, source: io::Error| BindError {
            step,
            address: address.clone(),
            name: config.name.clone(),
            source,
        };
        let socket = open(config, address, config.reuseport, &fail)?;
        let local_addr = local_addr(&socket).map_err(|e| fail("read the bound address of", e))?;
        let file = address.path().and_then(OwnFile::at);
        Ok(Listener { config: config.clone(), local_addr, id, socket, file })
    }

    /// The same listening socket (a duplicate descriptor) serving `config`, for a reload that
    /// keeps this address: no moment without a listening socket. A changed backlog is applied
    /// with listen(2) on the live socket, a changed socket file mode or owner on the file.
    ///
    /// # Errors
    /// [`BindError`] if the descriptor cannot be duplicated, the backlog or the file's mode
    /// set.
    pub fn reuse(&self, config: &ListenerConfig, id: u16) -> Result<Self, BindError> {
        let fail = |step: &'static str| {
            let (address, name) = (config.address.clone(), config.name.clone());
            move |source: io::Error| BindError { step, address, name, source }
        };
        let socket = self.socket.try_clone().map_err(fail("duplicate the socket of"))?;
        if config.backlog != self.config.backlog && config.transport == ListenerTransport::Tcp {
            let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
            socket.sock_ref().listen(backlog).map_err(fail("listen on"))?;
        }
        if config.tcp_keepalive != self.config.tcp_keepalive {
            // New connections get it at once; accepted ones keep what they had.
            match &config.tcp_keepalive {
                Some(keepalive) => keepalive.apply(socket.sock_ref()),
                None => socket.sock_ref().set_keepalive(false),
            }
            .map_err(fail("set TCP keepalive on"))?;
        }
        if config.interface != self.config.interface && !self.local_addr.is_unix() {
            let device = config.interface.as_deref().map(str::as_bytes);
            socket.sock_ref().bind_device(device).map_err(fail("bind to the interface of"))?;
        }
        if let (Some(file), true) = (&self.file, config.socket_file != self.config.socket_file) {
            set_file(&file.path, &config.socket_file)
                .map_err(fail("set the mode or owner of the socket file of"))?;
        }
        Ok(Listener {
            config: config.clone(),
            local_addr: self.local_addr.clone(),
            id,
            socket,
            file: self.file.clone(),
        })
    }

    /// Adopts a listening socket inherited from another process (binary upgrade; socket
    /// activation), making it non-blocking and close-on-exec again and applying the
    /// configured backlog (for UDP: a bound datagram socket). A Unix socket's file becomes
    /// this master's to remove at exit when `owns_file` (a binary upgrade), not when systemd
    /// passed it.
    ///
    /// # Errors
    /// [`BindError`] if `fd` is not a socket of the listener's transport or cannot be set up.
    pub fn adopt(
        config: &ListenerConfig,
        id: u16,
        fd: OwnedFd,
        owns_file: bool,
    ) -> Result<Self, BindError> {
        let address = &config.address;
        let fail = |step: &'static str| {
            move |source: io::Error| BindError {
                step,
                address: address.clone(),
                name: config.name.clone(),
                source,
            }
        };
        let socket = Socket::from(fd);
        let socket = if config.transport == ListenerTransport::Udp {
            let kind = socket.r#type().map_err(fail("inspect the inherited socket for"))?;
            if kind != Type::DGRAM {
                return Err(fail("adopt the inherited socket for")(io::Error::other(
                    "not a datagram socket",
                )));
            }
            socket.set_cloexec(true).map_err(fail("set FD_CLOEXEC on"))?;
            socket.set_nonblocking(true).map_err(fail("set O_NONBLOCK on"))?;
            ListenSocket::Datagram(socket.into())
        } else {
            if !socket.is_listener().map_err(fail("inspect the inherited socket for"))? {
                return Err(fail("adopt the inherited socket for")(io::Error::other(
                    "not a listening socket",
                )));
            }
            let unix =
                socket.domain().map_err(fail("inspect the inherited socket for"))? == Domain::UNIX;
            socket.set_cloexec(true).map_err(fail("set FD_CLOEXEC on"))?;
            socket.set_nonblocking(true).map_err(fail("set O_NONBLOCK on"))?;
            if !unix {
                set_nodelay(&socket, config).map_err(fail("set TCP_NODELAY on"))?;
                if let Some(keepalive) = &config.tcp_keepalive {
                    keepalive
                        .apply(SockRef::from(&socket))
                        .map_err(fail("set TCP keepalive on"))?;
                }
            }
            let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
            socket.listen(backlog).map_err(fail("listen on"))?;
            ListenSocket::Stream(socket)
        };
        let local_addr = local_addr(&socket).map_err(fail("read the bound address of"))?;
        let file = match &local_addr {
            Address::Unix(path) if owns_file => OwnFile::at(path),
            _ => None,
        };
        Ok(Listener { config: config.clone(), local_addr, id, socket, file })
    }

    /// A socket of the calling worker's own on the same address, with `SO_REUSEPORT`, for
    /// `reuseport = true`: the kernel spreads new connections over every such socket.
    ///
    /// # Errors
    /// [`BindError`] if it cannot be created or bound (the shared socket must have been bound
    /// with `SO_REUSEPORT` by the same user).
    pub fn bind_own(&self) -> Result<ListenSocket, BindError> {
        let address = &self.local_addr;
        let fail = |step: &'static str, source: io::Error| {
            let step = if step == "bind" { "bind a worker's own socket to" } else { step };
            BindError { step, address: address.clone(), name: self.config.name.clone(), source }
        };
        open(&self.config, address, true, &fail)
    }

    /// [`Listener::local_addr`] when it names one IP address, so it is every accepted
    /// connection's local address; `None` for a wildcard (`0.0.0.0`, `[::]`), where each
    /// connection's comes from getsockname(2), and for a Unix socket.
    pub fn specific_addr(&self) -> Option<SocketAddr> {
        self.local_addr.ip().filter(|address| !address.ip().to_canonical().is_unspecified())
    }

    /// The socket: listening stream or bound UDP.
    pub fn socket(&self) -> &ListenSocket {
        &self.socket
    }

    /// Lets the socket survive execve(2), for handing it to a new binary (in the forked
    /// child only: the flag is per descriptor).
    ///
    /// # Errors
    /// fcntl(2) failed.
    pub fn set_inheritable(&self) -> io::Result<()> {
        self.socket.sock_ref().set_cloexec(false)
    }

    /// Removes the socket file this listener made, if it is still that file (the same
    /// inode; a file someone put there since is left alone), for a master that gives the
    /// listener up for good: at exit (unless a new master of a binary upgrade has it), or
    /// when a reload drops it. The socket itself stays open until every copy closes.
    pub fn remove_file(&self) {
        let Some(file) = &self.file else { return };
        if OwnFile::at(&file.path).as_ref() == Some(file)
            && let Err(error) = std::fs::remove_file(&file.path)
        {
            log::warn!("could not remove the socket file {}: {error}", file.path.display());
        }
    }
}

/// The address a socket is bound to.
fn local_addr(socket: &ListenSocket) -> io::Result<Address> {
    let address: SockAddr = socket.sock_ref().local_addr()?;
    Address::from_sockaddr(&address)
        .ok_or_else(|| io::Error::other("the socket is bound to no address (an unnamed socket)"))
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::num::NonZeroU32;

    use super::*;

    fn ip(listener: &Listener) -> SocketAddr {
        listener.local_addr.ip().expect("an IP listener")
    }

    fn config(address: &str) -> ListenerConfig {
        ListenerConfig {
            name: "t".into(),
            address: address.parse().unwrap(),
            socket_file: SocketFile::default(),
            tcp_keepalive: None,
            interface: None,
            service: crate::services::ServiceConfig::builtin("echo").unwrap(),
            backlog: NonZeroU32::new(16).unwrap(),
            short_idle_timeout: None,
            long_idle_timeout: None,
            max_connections_per_client: None,
            max_long_connections_per_client: None,
            tcp_nodelay: true,
            reuseport: false,
            admission: Default::default(),
            transport: ListenerTransport::Tcp,
            max_datagram_rate_per_client: None,
            tls: None,
            banners: Default::default(),
        }
    }

    #[test]
    fn binds_port_zero_and_accepts_connections() {
        let listener = Listener::bind(&config("127.0.0.1:0"), 0).unwrap();
        assert_ne!(ip(&listener).port(), 0);
        TcpStream::connect(ip(&listener)).unwrap();
        let (_client, peer) = crate::net::accept(&listener).unwrap();
        assert!(peer.ip().is_some_and(|ip| ip.is_loopback()));
        let again = crate::net::accept(&listener).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
    }

    fn accepted_nodelay(listener: &Listener) -> bool {
        let _client = TcpStream::connect(ip(listener)).unwrap();
        let (accepted, _) = crate::net::accept(listener).unwrap();
        accepted.nodelay().unwrap()
    }

    #[test]
    fn accepted_sockets_inherit_tcp_nodelay_from_the_listener_through_reloads() {
        let mut off = config("127.0.0.1:0");
        off.tcp_nodelay = false;
        let listener = Listener::bind(&off, 0).unwrap();
        assert!(!accepted_nodelay(&listener));
        assert!(inherits_nodelay(listener.socket(), false));
        assert!(
            !inherits_nodelay(listener.socket(), true),
            "the worker then sets it per connection"
        );
        let on = config(&listener.local_addr.to_string());
        let reloaded = listener.reuse(&on, 0).unwrap();
        assert!(!accepted_nodelay(&reloaded), "a reload does not touch the shared socket");
        assert!(!inherits_nodelay(reloaded.socket(), true), "its workers set it per connection");
        let fd = reloaded.socket().as_fd().try_clone_to_owned().unwrap();
        let adopted = Listener::adopt(&on, 0, fd, true).unwrap();
        assert!(accepted_nodelay(&adopted), "an adopted socket gets the configured value");
        assert!(inherits_nodelay(adopted.socket(), true));
        let fresh = Listener::bind(&config("127.0.0.1:0"), 1).unwrap();
        assert!(accepted_nodelay(&fresh), "a new socket carries the configured value");
    }

    #[test]
    fn a_reused_socket_is_the_same_socket_and_an_adopted_one_is_checked() {
        let first = Listener::bind(&config("127.0.0.1:0"), 3).unwrap();
        let mut wider = config(&first.local_addr.to_string());
        wider.backlog = NonZeroU32::new(64).unwrap();
        let again = first.reuse(&wider, 3).unwrap();
        drop(first);
        TcpStream::connect(ip(&again)).expect("still listening after the original closed");
        crate::net::accept(&again).unwrap();
        let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let error = Listener::adopt(&wider, 3, OwnedFd::from(not_listening), true).unwrap_err();
        assert!(error.to_string().contains("inherited socket"), "{error}");
    }

    #[test]
    fn udp_listeners_bind_share_the_port_with_tcp_and_adopt_only_datagram_sockets() {
        let tcp = Listener::bind(&config("127.0.0.1:0"), 0).unwrap();
        let mut udp = config(&tcp.local_addr.to_string());
        udp.transport = ListenerTransport::Udp;
        let bound = Listener::bind(&udp, 1).expect("UDP and TCP ports are separate");
        assert_eq!(bound.local_addr, tcp.local_addr);
        let socket = bound.socket().datagram().expect("a datagram socket");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"hi", ip(&bound)).unwrap();
        let mut buffer = [0u8; 8];
        let (n, from) = socket.recv_from(&mut buffer).unwrap();
        assert_eq!((&buffer[..n], from), (&b"hi"[..], client.local_addr().unwrap()));
        let again = socket.recv_from(&mut buffer).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock, "non-blocking");
        // Handed over (reload, upgrade): the same socket, checked for its type.
        let reused = bound.reuse(&udp, 1).unwrap();
        let fd = OwnedFd::from(reused.socket().datagram().unwrap().try_clone().unwrap());
        assert!(Listener::adopt(&udp, 1, fd, true).is_ok());
        let stream = OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let error = Listener::adopt(&udp, 1, stream, true).unwrap_err();
        assert!(error.to_string().contains("not a datagram socket"), "{error}");
    }

    #[test]
    fn a_taken_address_names_the_step_and_the_address() {
        let first = Listener::bind(&config("127.0.0.1:0"), 0).unwrap();
        let taken = config(&first.local_addr.to_string());
        let error = Listener::bind(&taken, 0).unwrap_err().to_string();
        assert!(error.starts_with(&format!("could not bind {}", first.local_addr)), "{error}");
        assert!(error.contains("in use"), "{error}");
    }

    fn unix(path: &Path) -> ListenerConfig {
        config(&format!("unix:{}", path.display()))
    }

    #[test]
    fn a_unix_listener_sets_its_file_before_listening_and_removes_only_its_own_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let mut wanted = unix(&path);
        wanted.socket_file.mode = Some(0o600);
        if nix::unistd::geteuid().is_root() {
            wanted.socket_file.owner = Some("1234".into());
            wanted.socket_file.group = Some("4321".into());
        }
        let listener = Listener::bind(&wanted, 0).unwrap();
        assert_eq!(listener.local_addr, Address::Unix(path.clone()));
        assert_eq!(listener.specific_addr(), None);
        assert!(inherits_nodelay(listener.socket(), true), "nothing to set on a Unix socket");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        if nix::unistd::geteuid().is_root() {
            assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
        }
        let client = crate::net::connect(&listener.local_addr, None).unwrap();
        let (_accepted, peer) = crate::net::accept(&listener).unwrap();
        assert_eq!(peer.credentials().map(|c| c.pid), Some(std::process::id() as i32));
        drop(client);
        // A reload changes the mode of the kept socket's file.
        let mut wider = wanted.clone();
        wider.socket_file.mode = Some(0o660);
        let reloaded = listener.reuse(&wider, 0).unwrap();
        let mode = std::fs::symlink_metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // In use: a second bind is refused and leaves the file alone.
        let error = Listener::bind(&wanted, 1).unwrap_err().to_string();
        assert!(error.contains("a running process listens on it"), "{error}");
        assert!(path.exists());
        // Someone else's file at the path is not removed.
        reloaded.remove_file();
        assert!(!path.exists(), "its own file is removed");
        std::fs::write(&path, b"not ours").unwrap();
        listener.remove_file();
        assert!(path.exists(), "a file put there since is left alone");
    }

    #[test]
    fn a_stale_socket_file_is_replaced_but_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        // A crash leaves the file of a socket nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = Listener::bind(&unix(&path), 0).expect("the stale file is replaced");
        crate::net::connect(&listener.local_addr, None).expect("listening on the new socket");
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let error = Listener::bind(&unix(&path), 0).unwrap_err().to_string();
        assert!(error.contains("symlink"), "{error}");
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"data").unwrap();
        let error = Listener::bind(&unix(&path), 0).unwrap_err().to_string();
        assert!(error.contains("not a socket"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn an_abstract_listener_has_no_file_and_is_reached_by_its_name() {
        let name = format!("preforkd-test-{}", std::process::id());
        let listener = Listener::bind(&config(&format!("unix:@{name}")), 0).unwrap();
        assert_eq!(listener.local_addr, Address::Abstract(name.clone().into_bytes()));
        // Another program reaches it by the name alone (no NUL padding).
        use std::os::linux::net::SocketAddrExt;
        let by_name = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        std::os::unix::net::UnixStream::connect_addr(&by_name).unwrap();
        crate::net::accept(&listener).unwrap();
        let fd = listener.socket().as_fd().try_clone_to_owned().unwrap();
        let adopted = Listener::adopt(&listener.config, 0, fd, true).unwrap();
        assert_eq!(adopted.local_addr, listener.local_addr);
    }

    #[test]
    fn keepalive_passes_to_accepted_connections_and_an_interface_binds_the_socket() {
        let mut wanted = config("127.0.0.1:0");
        wanted.tcp_keepalive = Some(crate::net::Keepalive {
            idle: std::time::Duration::from_secs(75),
            interval: Some(std::time::Duration::from_secs(9)),
            count: Some(4),
        });
        wanted.interface = Some("lo".into());
        let listener = match Listener::bind(&wanted, 0) {
            Ok(listener) => listener,
            // SO_BINDTODEVICE needs CAP_NET_RAW before Linux 5.7.
            Err(error) if error.source.kind() == io::ErrorKind::PermissionDenied => return,
            Err(error) => panic!("{error}"),
        };
        let _client = TcpStream::connect(ip(&listener)).unwrap();
        let (accepted, _) = crate::net::accept(&listener).unwrap();
        let socket = accepted.socket();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap().as_secs(), 75);
        assert_eq!(socket.tcp_keepalive_interval().unwrap().as_secs(), 9);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(listener.socket().sock_ref().device().unwrap().as_deref(), Some(&b"lo"[..]));
        let mut none = wanted.clone();
        none.interface = Some("nosuchif0".into());
        let error = Listener::bind(&none, 1).unwrap_err().to_string();
        assert!(error.contains("SO_BINDTODEVICE"), "{error}");
    }
}
