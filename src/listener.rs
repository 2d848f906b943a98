//! Listening sockets, bound by the master before any worker is forked.
//!
//! Each socket has `SO_REUSEADDR` (a restart does not wait for TIME_WAIT), `IPV6_V6ONLY` for
//! IPv6 addresses (an `[::]` listener does not also take IPv4), the configured backlog,
//! `O_NONBLOCK` (workers accept until `EAGAIN`) and `FD_CLOEXEC`. Workers inherit them
//! through `fork(2)` and all accept on the same sockets.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};

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
    pub fn bind(config: &ListenerConfig) -> Result<Self, BindError> {
        let address = config.address;
        let fail = |step: &'static str| {
            move |source: io::Error| BindError { step, address, name: config.name.clone(), source }
        };
        // socket2 creates the socket with SOCK_CLOEXEC.
        let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))
            .map_err(fail("create a socket for"))?;
        socket.set_reuse_address(true).map_err(fail("set SO_REUSEADDR on"))?;
        if address.is_ipv6() {
            socket.set_only_v6(true).map_err(fail("set IPV6_V6ONLY on"))?;
        }
        socket.bind(&address.into()).map_err(fail("bind"))?;
        let backlog = i32::try_from(config.backlog.get()).unwrap_or(i32::MAX);
        socket.listen(backlog).map_err(fail("listen on"))?;
        socket.set_nonblocking(true).map_err(fail("set O_NONBLOCK on"))?;
        let socket = TcpListener::from(socket);
        let local_addr = socket.local_addr().map_err(fail("read the bound address of"))?;
        Ok(Listener { config: config.clone(), local_addr, socket })
    }

    /// Binds every listener in order; nothing stays bound if one fails.
    ///
    /// # Errors
    /// The first [`BindError`].
    pub fn bind_all(configs: &[ListenerConfig]) -> Result<Vec<Self>, BindError> {
        configs.iter().map(Listener::bind).collect()
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
    use crate::services::ServiceKind;

    fn config(address: &str) -> ListenerConfig {
        ListenerConfig {
            name: "t".into(),
            address: address.parse().unwrap(),
            service: ServiceKind::Echo,
            backlog: NonZeroU32::new(16).unwrap(),
            short_idle_timeout: None,
            long_idle_timeout: None,
            max_connections_per_client: None,
            max_long_connections_per_client: None,
        }
    }

    #[test]
    fn binds_port_zero_and_accepts_connections() {
        let listener = Listener::bind(&config("127.0.0.1:0")).unwrap();
        assert_ne!(listener.local_addr.port(), 0);
        TcpStream::connect(listener.local_addr).unwrap();
        let (_client, peer) = crate::sys::accept_nonblocking(&listener).unwrap();
        assert!(peer.ip().is_loopback());
        let again = crate::sys::accept_nonblocking(&listener).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_taken_address_names_the_step_and_the_address() {
        let first = Listener::bind(&config("127.0.0.1:0")).unwrap();
        let taken = config(&first.local_addr.to_string());
        let error = Listener::bind(&taken).unwrap_err().to_string();
        assert!(error.starts_with(&format!("could not bind {}", first.local_addr)), "{error}");
        assert!(error.contains("in use"), "{error}");
    }
}
