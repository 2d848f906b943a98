//! Listening sockets, bound by the master before any worker is forked.
//!
//! Each socket has `SO_REUSEADDR` (a restart does not wait for TIME_WAIT), `IPV6_V6ONLY` for
//! IPv6 addresses (an `[::]` listener does not also take IPv4), the configured backlog,
//! `O_NONBLOCK` (workers accept until `EAGAIN`) and `FD_CLOEXEC`. Workers inherit them
//! through `fork(2)` and all accept on the same sockets.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;

use crate::config::ListenerConfig;

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
    socket: TcpListener,
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
        let fail = |step: &'static str| {
            move |source: io::Error| BindError { step, address, name: config.name.clone(), source }
        };
        // socket2 creates the socket with SOCK_CLOEXEC.
        let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))
            .map_err(fail("create a socket for"))?;
        socket.set_reuse_address(true).map_err(fail("set SO_REUSEADDR on"))?;
        if config.reuseport {
            socket.set_reuse_port(true).map_err(fail("set SO_REUSEPORT on"))?;
        }
        if address.is_ipv6() {
            socket.set_only_v6(true).map_err(fail("set IPV6_V6ONLY on"))?;
        }
        socket.bind(&address.into()).map_err(fail("bind"))?;
        let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
        socket.listen(backlog).map_err(fail("listen on"))?;
        socket.set_nonblocking(true).map_err(fail("set O_NONBLOCK on"))?;
        let socket = TcpListener::from(socket);
        let local_addr = socket.local_addr().map_err(fail("read the bound address of"))?;
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
        if config.backlog != self.config.backlog {
            let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
            socket2::SockRef::from(&socket).listen(backlog).map_err(fail("listen on"))?;
        }
        Ok(Listener { config: config.clone(), local_addr: self.local_addr, id, socket })
    }

    /// Adopts a listening socket inherited from another process (binary upgrade), making it
    /// non-blocking and close-on-exec again and applying the configured backlog.
    ///
    /// # Errors
    /// [`BindError`] if `fd` is not a listening TCP socket or cannot be set up.
    pub fn adopt(config: &ListenerConfig, id: u16, fd: OwnedFd) -> Result<Self, BindError> {
        let address = config.address;
        let fail = |step: &'static str| {
            move |source: io::Error| BindError { step, address, name: config.name.clone(), source }
        };
        let socket = Socket::from(fd);
        if !socket.is_listener().map_err(fail("inspect the inherited socket for"))? {
            return Err(fail("adopt the inherited socket for")(io::Error::other(
                "not a listening socket",
            )));
        }
        socket.set_cloexec(true).map_err(fail("set FD_CLOEXEC on"))?;
        socket.set_nonblocking(true).map_err(fail("set O_NONBLOCK on"))?;
        let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
        socket.listen(backlog).map_err(fail("listen on"))?;
        let socket = TcpListener::from(socket);
        let local_addr = socket.local_addr().map_err(fail("read the bound address of"))?;
        Ok(Listener { config: config.clone(), local_addr, id, socket })
    }

    /// A socket of the calling worker's own on the same address, with `SO_REUSEPORT`, for
    /// `reuseport = true`: the kernel spreads new connections over every such socket.
    ///
    /// # Errors
    /// [`BindError`] if it cannot be created or bound (the shared socket must have been bound
    /// with `SO_REUSEPORT` by the same user).
    pub fn bind_own(&self) -> Result<TcpListener, BindError> {
        let address = self.local_addr;
        let fail = |step: &'static str| {
            let name = self.config.name.clone();
            move |source: io::Error| BindError { step, address, name, source }
        };
        let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))
            .map_err(fail("create a socket for"))?;
        socket.set_reuse_address(true).map_err(fail("set SO_REUSEADDR on"))?;
        socket.set_reuse_port(true).map_err(fail("set SO_REUSEPORT on"))?;
        if address.is_ipv6() {
            socket.set_only_v6(true).map_err(fail("set IPV6_V6ONLY on"))?;
        }
        socket.bind(&address.into()).map_err(fail("bind a worker's own socket to"))?;
        let backlog = i32::try_from(self.config.backlog.get()).unwrap_or(i32::MAX);
        socket.listen(backlog).map_err(fail("listen on"))?;
        socket.set_nonblocking(true).map_err(fail("set O_NONBLOCK on"))?;
        Ok(TcpListener::from(socket))
    }

    /// Lets the socket survive execve(2), for handing it to a new binary (in the forked
    /// child only: the flag is per descriptor).
    ///
    /// # Errors
    /// fcntl(2) failed.
    pub fn set_inheritable(&self) -> io::Result<()> {
        socket2::SockRef::from(&self.socket).set_cloexec(false)
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
    fn a_taken_address_names_the_step_and_the_address() {
        let first = Listener::bind(&config("127.0.0.1:0"), 0).unwrap();
        let taken = config(&first.local_addr.to_string());
        let error = Listener::bind(&taken, 0).unwrap_err().to_string();
        assert!(error.starts_with(&format!("could not bind {}", first.local_addr)), "{error}");
        assert!(error.contains("in use"), "{error}");
    }
}
