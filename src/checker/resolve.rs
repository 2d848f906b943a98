//! Host name resolution for the checker, in a thread of its own: getaddrinfo(3) blocks, and
//! the checker's loop must not.
//!
//! The loop asks with [`Resolver::ask`]; the thread resolves, one name at a time, and sends
//! each answer back, writing a byte to a pipe the loop polls ([`Resolver::fd`]), then the
//! loop takes the answers ([`Resolver::answers`]). The checker process is never forked from,
//! so a thread in it is sound.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};

/// Debug builds only (the tests'): a file of `NAME ADDRESS...` lines resolved instead of
/// asking the system, so a test can change what a name resolves to without touching
/// `/etc/hosts`. A release build ignores it.
pub const TEST_HOSTS_ENV: &str = "PREFORKD_TEST_HOSTS";

/// What one resolution gave: the addresses, or why there are none.
pub type Answer = Result<Vec<SocketAddr>, String>;

/// The resolver thread's ends.
pub struct Resolver {
    requests: Sender<(usize, String, u16)>,
    answers: Receiver<(usize, Answer)>,
    wake: UnixStream,
}

impl Resolver {
    /// Starts the thread.
    ///
    /// # Errors
    /// The wake-up pair or the thread could not be made.
    pub fn start() -> io::Result<Resolver> {
        let (wake, mut waker) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let (requests, asked) = mpsc::channel::<(usize, String, u16)>();
        let (answer, answers) = mpsc::channel();
        std::thread::Builder::new().name("resolver".into()).spawn(move || {
            for (index, name, port) in asked {
                let result = resolve(&name, port);
                if answer.send((index, result)).is_err() {
                    return;
                }
                // A full pipe already wakes the loop.
                let _ = waker.write(&[1]);
            }
        })?;
        Ok(Resolver { requests, answers, wake })
    }

    /// Asks for `name`'s addresses (with `port`), answered under `index`.
    pub fn ask(&self, index: usize, name: &str, port: u16) {
        let _ = self.requests.send((index, name.to_owned(), port));
    }

    /// Readable when answers wait.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// The answers that came back.
    pub fn answers(&self) -> Vec<(usize, Answer)> {
        let mut drain = [0u8; 64];
        while matches!((&self.wake).read(&mut drain), Ok(n) if n > 0) {}
        self.answers.try_iter().collect()
    }
}

/// `name`'s addresses with `port`, in the resolver's order, without duplicates.
fn resolve(name: &str, port: u16) -> Answer {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os(TEST_HOSTS_ENV) {
        return from_file(std::path::Path::new(&path), name, port);
    }
    let found = (name, port).to_socket_addrs().map_err(|e| e.to_string())?;
    let mut addresses: Vec<SocketAddr> = Vec::new();
    for address in found {
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    Ok(addresses)
}

/// `name`'s addresses as the test file at `path` lists them (see [`TEST_HOSTS_ENV`]).
#[cfg(debug_assertions)]
fn from_file(path: &std::path::Path, name: &str, port: u16) -> Answer {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some(name) {
            return Ok(words
                .filter_map(|w| w.parse().ok())
                .map(|ip| SocketAddr::new(ip, port))
                .collect());
        }
    }
    Err(format!("{name}: not in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_resolves_in_the_thread_and_wakes_the_loop() {
        let resolver = Resolver::start().unwrap();
        resolver.ask(3, "localhost", 6379);
        let mut fds = [nix::poll::PollFd::new(resolver.fd(), nix::poll::PollFlags::POLLIN)];
        nix::poll::poll(&mut fds, 5000u16).unwrap();
        let answers = resolver.answers();
        assert_eq!(answers.len(), 1);
        let (index, addresses) = &answers[0];
        assert_eq!(*index, 3);
        let addresses = addresses.as_ref().unwrap();
        assert!(
            addresses.iter().all(|a| a.port() == 6379 && a.ip().is_loopback()),
            "{addresses:?}"
        );
    }
}
