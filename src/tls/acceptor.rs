//! One TLS listener as a worker serves it: the rustls server configuration built at boot
//! from the listener's [`TlsConfig`] and the shared ticket keys, the service behind it, and
//! the handshake counts not yet on the scoreboard.
//!
//! Runs in workers, one per TLS listener, shared (`Rc`) by that listener's sessions; counts
//! are kept in private memory and published with the worker's other counters.

use std::cell::RefCell;
use std::net::SocketAddr;

use crate::net::Peer;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::{NoServerSessionStorage, ProducesTickets};

use super::layer::TlsSession;
use super::load::{TlsConfig, TlsVersion, provider};
use crate::scoreboard::{ListenerScore, TLS_FAILURES, TlsFailure};
use crate::services::{Service, Session};

/// Largest TLS output buffered per connection before the session is asked to wait, in
/// bytes: rustls's own default (64 KiB), written down here since backpressure relies on it.
pub const SEND_BUFFER: usize = 64 * 1024;

/// Handshake counts since the last publication.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Handshakes completed (resumed ones included).
    pub handshakes: u64,
    /// Of those, resumed.
    pub resumed: u64,
    /// Failures by [`TlsFailure`].
    pub failed: [u64; TLS_FAILURES],
}

/// A worker's side of one TLS listener.
pub struct Acceptor {
    /// The listener's name.
    pub(super) listener: String,
    /// The service behind the TLS layer.
    pub(super) service: Arc<dyn Service>,
    pub(super) config: Arc<ServerConfig>,
    pub(super) handshake_timeout: Option<Duration>,
    counts: RefCell<Counts>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").field("listener", &self.listener).finish_non_exhaustive()
    }
}

impl Acceptor {
    /// Builds listener `listener`'s rustls configuration from `tls`; `tickets` seals and
    /// opens its session tickets (`None`: no tickets, so no resumption).
    ///
    /// # Errors
    /// rustls refused the configuration (no cipher suite for the versions asked: cannot
    /// happen with the default provider).
    pub fn new(
        listener: &str,
        service: Arc<dyn Service>,
        tls: &TlsConfig,
        tickets: Option<Arc<dyn ProducesTickets>>,
    ) -> Result<Rc<Acceptor>, rustls::Error> {
        let spec = &tls.spec;
        let versions: &[&rustls::SupportedProtocolVersion] = match spec.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder =
            ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
        let builder = match &tls.client_verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(tls.certificates.clone());
        config.alpn_protocols = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        // Resumption is by ticket only: a server-side session cache would be per worker.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        match tickets {
            Some(ticketer) => config.ticketer = ticketer,
            None => config.send_tls13_tickets = 0,
        }
        Ok(Rc::new(Acceptor {
            listener: listener.to_owned(),
            service,
            config: Arc::new(config),
            handshake_timeout: spec.handshake_timeout,
            counts: RefCell::new(Counts::default()),
        }))
    }

    /// The TLS layer for a connection just admitted from `peer`, whose local address is
    /// `bound` when known without asking the kernel.
    ///
    /// # Errors
    /// rustls could not start a server connection (it cannot, with a valid configuration).
    pub fn session(
        self: &Rc<Self>,
        peer: Peer,
        bound: Option<SocketAddr>,
    ) -> Result<Box<dyn Session>, rustls::Error> {
        Ok(Box::new(TlsSession::new(self.clone(), peer, bound)?))
    }

    pub(super) fn completed(&self, resumed: bool) {
        let mut counts = self.counts.borrow_mut();
        counts.handshakes += 1;
        counts.resumed += u64::from(resumed);
    }

    pub(super) fn failed(&self, failure: TlsFailure) {
        self.counts.borrow_mut().failed[failure as usize] += 1;
    }

    /// Adds the counts to `row` (the listener's row in this worker's scoreboard rows, if it
    /// has one) and starts counting afresh.
    pub fn publish(&self, row: Option<&ListenerScore>) {
        let counts = std::mem::take(&mut *self.counts.borrow_mut());
        let Some(row) = row else { return };
        let add = |counter: &std::sync::atomic::AtomicU64, n: u64| {
            if n > 0 {
                counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        };
        add(&row.tls_handshakes, counts.handshakes);
        add(&row.tls_resumed, counts.resumed);
        for (counter, n) in row.tls_failed.iter().zip(counts.failed) {
            add(counter, n);
        }
    }

    /// The counts not yet published (for tests).
    pub fn counts(&self) -> Counts {
        *self.counts.borrow()
    }
}
