//! The certificate a handshake gets, by the server name the client asked for (SNI, RFC 6066
//! section 3): an exact `[[listener.tls.sni]]` name first, then a wildcard entry for the name's
//! parent, else the listener's default certificate (no SNI, or an unknown name).
//!
//! Runs in workers (rustls calls [`Certificates::resolve`] during each full handshake); built
//! in the master by `load.rs`. Immutable once built.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// A listener's certificates, by server name.
#[derive(Debug)]
pub struct Certificates {
    default: Arc<CertifiedKey>,
    /// Exact names, lowercase.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.org` entries, by `example.org`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl Certificates {
    /// `default` for any name not in `named` (`(name, certificate)`, names lowercase; a
    /// `*.` prefix makes a wildcard entry). A name given twice keeps its first certificate.
    pub fn new(default: Arc<CertifiedKey>, named: Vec<(String, Arc<CertifiedKey>)>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (name, certified) in named {
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()).or_insert(certified),
                None => exact.entry(name).or_insert(certified),
            };
        }
        Certificates { default, exact, wildcard }
    }

    /// The certificate for server name `name` (as the client sent it, any case).
    pub fn for_name(&self, name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = name else { return &self.default };
        let name = name.to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return found;
        }
        let parent = name.split_once('.').map(|(_, parent)| parent);
        parent.and_then(|p| self.wildcard.get(p)).unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.for_name(client_hello.server_name()).clone())
    }
}
