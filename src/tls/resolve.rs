//! The certificate a handshake gets, by the server name the client asked for (SNI, RFC 6066
//! section 3): an exact `[[listener.tls.sni]]` name first, then a wildcard entry for the name's
//! parent, else the listener's default certificate (no SNI, or an unknown name).
//!
//! Runs in workers (rustls calls [`Certificates::resolve`] during each full handshake); built
//! in the master by `load.rs`. Immutable once built.

use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::pki::ByName;

/// A listener's certificates, by server name.
#[derive(Debug)]
pub struct Certificates {
    default: Arc<CertifiedKey>,
    named: ByName<Arc<CertifiedKey>>,
}

impl Certificates {
    /// `default` for any name not in `named` (`(name, certificate)`; a `*.` prefix makes a
    /// wildcard entry). A name given twice keeps its first certificate.
    pub fn new(default: Arc<CertifiedKey>, named: Vec<(String, Arc<CertifiedKey>)>) -> Self {
        Certificates { default, named: ByName::new(named) }
    }

    /// The certificate for server name `name` (as the client sent it, any case).
    pub fn for_name(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        name.and_then(|name| self.named.get(name)).unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.for_name(client_hello.server_name()).clone())
    }
}
