//! Socket activation (sd_listen_fds(3)): adopting the listening sockets systemd passes.
//!
//! Runs in the master at start. With `LISTEN_PID` equal to our pid, descriptors 3 to
//! 3 + `LISTEN_FDS` - 1 are passed sockets, named by `LISTEN_FDNAMES` (colon-separated). Each
//! is matched to a `[[listener]]` by name, else by its bound address; a listener with no
//! match is bound as usual; a passed socket that matches no listener is an error. The
//! variables are removed so that children do not see them.

use std::os::fd::{FromRawFd, OwnedFd};

use socket2::SockRef;

use crate::net::Address;

/// One passed socket.
#[derive(Debug)]
pub struct Passed {
    /// Its name from `LISTEN_FDNAMES`, if given (systemd's default name `unknown` counts as
    /// none).
    pub name: Option<String>,
    /// The address it is bound to: IP, a Unix socket file or an abstract name (systemd
    /// passes `ListenStream=/run/app.sock` sockets too).
    pub address: Option<Address>,
    /// The descriptor.
    pub fd: OwnedFd,
}

/// Takes the sockets passed by socket activation, if any.
///
/// # Errors
/// A message when the variables are malformed.
pub fn take() -> Result<Vec<Passed>, String> {
    let fds: Vec<i32> =
        sd_notify::listen_fds().map_err(|e| format!("socket activation: {e}"))?.collect();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: the master is single-threaded at this point; nothing reads the environment
    // concurrently.
    unsafe {
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
    }
    let names: Vec<&str> = names.as_deref().map(|n| n.split(':').collect()).unwrap_or_default();
    Ok(fds
        .into_iter()
        .enumerate()
        .map(|(index, raw)| {
            // SAFETY: sd_listen_fds(3)'s protocol hands these descriptors to this process;
            // nothing else in it owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let address =
                SockRef::from(&fd).local_addr().ok().and_then(|a| Address::from_sockaddr(&a));
            let name = names
                .get(index)
                .filter(|n| !n.is_empty() && **n != "unknown")
                .map(|n| (*n).to_owned());
            Passed { name, address, fd }
        })
        .collect())
}
