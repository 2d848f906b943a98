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
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::config::{ListenerConfig, ListenerTransport};

/// A listener's socket: listening TCP or bound UDP.
#[derive(Debug)]
pub enum ListenSocket {
    /// `transport = "tcp"`: accept connections.
    Stream(TcpListener),
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

/// Creates, configures and binds a socket of `transport` on `address` (listening, for TCP),
/// non-blocking and close-on-exec.
fn open(
    config: &ListenerConfig,
    address: SocketAddr,
    reuseport: bool,
    fail: &dyn Fn(&'static str, io::Error) -> BindError,
) -> Result<ListenSocket, BindError> {
    let (transport, backlog) = (config.transport, config.backlog.get());
    let (kind, protocol) = match transport {
        ListenerTransport::Tcp => (Type::STREAM, Protocol::TCP),
        ListenerTransport::Udp => (Type::DGRAM, Protocol::UDP),
    };
    // socket2 creates the socket with SOCK_CLOEXEC.
    let socket = Socket::new(Domain::for_address(address), kind, Some(protocol))
        .map_err(|e| fail("create a socket for", e))?;
    socket.set_reuse_address(true).map_err(|e| fail("set SO_REUSEADDR on", e))?;
    if reuseport {
        socket.set_reuse_port(true).map_err(|e| fail("set SO_REUSEPORT on", e))?;
    }
    if address.is_ipv6() {
        socket.set_only_v6(true).map_err(|e| fail("set IPV6_V6ONLY on", e))?;
    }
    socket.bind(&address.into()).map_err(|e| fail("bind", e))?;
    if transport == ListenerTransport::Tcp {
        set_nodelay(&socket, config).map_err(|e| fail("set TCP_NODELAY on", e))?;
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        socket.listen(backlog).map_err(|e| fail("listen on", e))?;
    }
    socket.set_nonblocking(true).map_err(|e| fail("set O_NONBLOCK on", e))?;
    Ok(match transport {
        ListenerTransport::Tcp => ListenSocket::Stream(socket.into()),
        ListenerTransport::Udp => ListenSocket::Datagram(socket.into()),
    })
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
/// read: the caller then sets the option on each connection.
pub fn inherits_nodelay(socket: &ListenSocket, nodelay: bool) -> bool {
    matches!(socket, ListenSocket::Stream(_))
        && socket.sock_ref().tcp_nodelay().is_ok_and(|value| value == nodelay)
}

/// A bound, listening socket and the configuration it serves.
#[derive(Debug)]
pub struct Listener {
    /// The `[[listener]]` it was bound for.
    pub config: ListenerConfig,
    /// The address actually bound (the kernel's port when the configuration says 0).
    pub local_addr: SocketAddr,
    /// Stable identity across reloads (assigned per listener name by the master): per-client
    /// counts are keyed by it, so a client keeps its count when the configuration changes.
    pub id: u16,
    socket: ListenSocket,
}

/// A listener could not be set up.
#[derive(Debug, Error)]
#[error("could not {step} {address} (listener {name}): {source}")]
pub struct BindError {
    /// The failing step: `create a socket for`, `bind`, `listen on` ...
    pub step: &'static str,
    /// The configured address.
    pub address: SocketAddr,
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
        let address = config.address;
        let fail = |step: &'static str, source: io::Error| BindError {
            step,
            address,
            name: config.name.clone(),
            source,
        };
        let socket = open(config, address, config.reuseport, &fail)?;
        let local_addr = local_addr(&socket).map_err(|e| fail("read the bound address of", e))?;
        Ok(Listener { config: config.clone(), local_addr, id, socket })
    }

    /// The same listening socket (a duplicate descriptor) serving `config`, for a reload that
    /// keeps this address: no moment without a listening socket. A changed backlog is applied
    /// with listen(2) on the live socket.
    ///
    /// # Errors
    /// [`BindError`] if the descriptor cannot be duplicated or the backlog set.
    pub fn reuse(&self, config: &ListenerConfig, id: u16) -> Result<Self, BindError> {
        let fail = |step: &'static str| {
            let (address, name) = (config.address, config.name.clone());
            move |source: io::Error| BindError { step, address, name, source }
        };
        let socket = self.socket.try_clone().map_err(fail("duplicate the socket of"))?;
        if config.backlog != self.config.backlog && config.transport == ListenerTransport::Tcp {
            let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
            socket.sock_ref().listen(backlog).map_err(fail("listen on"))?;
        }
        Ok(Listener { config: config.clone(), local_addr: self.local_addr, id, socket })
    }

    /// Adopts a listening socket inherited from another process (binary upgrade), making it
    /// non-blocking and close-on-exec again and applying the configured backlog (for UDP: a
    /// bound datagram socket).
    ///
    /// # Errors
    /// [`BindError`] if `fd` is not a socket of the listener's transport or cannot be set up.
    pub fn adopt(config: &ListenerConfig, id: u16, fd: OwnedFd) -> Result<Self, BindError> {
        let address = config.address;
        let fail = |step: &'static str| {
            move |source: io::Error| BindError { step, address, name: config.name.clone(), source }
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
            socket.set_cloexec(true).map_err(fail("set FD_CLOEXEC on"))?;
            socket.set_nonblocking(true).map_err(fail("set O_NONBLOCK on"))?;
            set_nodelay(&socket, config).map_err(fail("set TCP_NODELAY on"))?;
            let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
            socket.listen(backlog).map_err(fail("listen on"))?;
            ListenSocket::Stream(socket.into())
        };
        let local_addr = local_addr(&socket).map_err(fail("read the bound address of"))?;
        Ok(Listener { config: config.clone(), local_addr, id, socket })
    }

    /// A socket of the calling worker's own on the same address, with `SO_REUSEPORT`, for
    /// `reuseport = true`: the kernel spreads new connections over every such socket.
    ///
    /// # Errors
    /// [`BindError`] if it cannot be created or bound (the shared socket must have been bound
    /// with `SO_REUSEPORT` by the same user).
    pub fn bind_own(&self) -> Result<ListenSocket, BindError> {
        let address = self.local_addr;
        let fail = |step: &'static str, source: io::Error| {
            let step = if step == "bind" { "bind a worker's own socket to" } else { step };
            BindError { step, address, name: self.config.name.clone(), source }
        };
        open(&self.config, address, true, &fail)
    }

    /// [`Listener::local_addr`] when it names one address, so it is every accepted
    /// connection's local address; `None` for a wildcard (`0.0.0.0`, `[::]`), where each
    /// connection's comes from getsockname(2).
    pub fn specific_addr(&self) -> Option<SocketAddr> {
        Some(self.local_addr).filter(|address| !address.ip().to_canonical().is_unspecified())
    }

    /// The socket: listening TCP or bound UDP.
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
}

/// The address a socket is bound to.
fn local_addr(socket: &ListenSocket) -> io::Result<SocketAddr> {
    match socket {
        ListenSocket::Stream(s) => s.local_addr(),
        ListenSocket::Datagram(s) => s.local_addr(),
    }
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

    fn config(address: &str) -> ListenerConfig {
        ListenerConfig {
            name: "t".into(),
            address: address.parse().unwrap(),
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
        assert_ne!(listener.local_addr.port(), 0);
        TcpStream::connect(listener.local_addr).unwrap();
        let (_client, peer) = crate::sys::accept_nonblocking(&listener).unwrap();
        assert!(peer.ip().is_loopback());
        let again = crate::sys::accept_nonblocking(&listener).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
    }

    fn accepted_nodelay(listener: &Listener) -> bool {
        let _client = TcpStream::connect(listener.local_addr).unwrap();
        let (accepted, _) = crate::sys::accept_nonblocking(listener).unwrap();
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
        let adopted = Listener::adopt(&on, 0, fd).unwrap();
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
        TcpStream::connect(again.local_addr).expect("still listening after the original closed");
        crate::sys::accept_nonblocking(&again).unwrap();
        let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let error = Listener::adopt(&wider, 3, OwnedFd::from(not_listening)).unwrap_err();
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
        client.send_to(b"hi", bound.local_addr).unwrap();
        let mut buffer = [0u8; 8];
        let (n, from) = socket.recv_from(&mut buffer).unwrap();
        assert_eq!((&buffer[..n], from), (&b"hi"[..], client.local_addr().unwrap()));
        let again = socket.recv_from(&mut buffer).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock, "non-blocking");
        // Handed over (reload, upgrade): the same socket, checked for its type.
        let reused = bound.reuse(&udp, 1).unwrap();
        let fd = OwnedFd::from(reused.socket().datagram().unwrap().try_clone().unwrap());
        assert!(Listener::adopt(&udp, 1, fd).is_ok());
        let stream = OwnedFd::from(std::net::TcpListener::bind("127.0.0.1:0").unwrap());
        let error = Listener::adopt(&udp, 1, stream).unwrap_err();
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
}
