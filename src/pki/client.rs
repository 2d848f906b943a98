//! The TLS client side, as the relay speaks it to its backends (`backend_tls`): what it
//! trusts (a CA file, or the system's roots) and what it presents (a client certificate, for
//! a backend that asks for one: mTLS).
//!
//! Runs in the master (loaded with the rest of the configuration: `check`, start, reload);
//! the [`ClientTls`] it makes reaches the workers through fork(2), and each worker then has
//! its own copy of the session cache inside it (rustls's in-memory cache: a worker resumes
//! the sessions it made itself).
//!
//! Verification is always on: the backend's certificate must chain to the trusted roots and
//! be valid for the name the relay expects (rustls's `WebPkiServerVerifier`, RFC 5280 and
//! RFC 6125). There is no way to turn it off: nginx's `proxy_ssl_verify off` default is the
//! trap this avoids; a backend with a self-signed certificate is trusted by naming that
//! certificate (or its CA) in `ca`.
//!
//! The system's roots are the operating system's store, as OpenSSL and curl read it: the file
//! or directory `SSL_CERT_FILE` / `SSL_CERT_DIR` name, else the distribution's bundle
//! (`/etc/ssl/certs/ca-certificates.crt` on Debian), found by `rustls-native-certs`, so that
//! `update-ca-certificates` and a reload are all it takes to follow a change; a bundle
//! compiled into the binary (`webpki-roots`) would go stale with it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::Resumption;
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, RootCertStore};

use super::{Findings, Pair, certified_key, provider, read, roots};

/// Sessions a worker keeps to resume with, per relay listener (rustls's default).
pub const SESSION_CACHE: usize = 256;

/// `backend_tls` as validated, before any file is read. Paths are absolute.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientSpec {
    /// CA certificates (PEM) the backend's certificate must chain to; `None`: the system's
    /// roots.
    pub ca: Option<PathBuf>,
    /// The client certificate chain (PEM, leaf first) presented to a backend that asks for
    /// one, with `key`; `None`: none.
    pub certificate: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
}

/// Which key of `backend_tls` a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientField {
    /// `ca` (or, without it, the system's store).
    Ca,
    /// `certificate`.
    Certificate,
    /// `key`.
    Key,
}

/// A TLS client configuration, every file read and checked. Two are equal when their
/// settings and the files' bytes are.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// SHA-256 of the settings and of every file's bytes.
    digest: [u8; 32],
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for ClientTls {}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// The rustls configuration each backend connection is made with.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }
}

/// Reads and checks every file of `spec` at time `now`; the configuration when nothing is
/// wrong. Problems go to `findings`.
pub fn load(
    spec: &ClientSpec,
    now: SystemTime,
    findings: &mut Findings<ClientField>,
) -> Option<ClientTls> {
    let provider = provider();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    digest.update(format!("{spec:?}").as_bytes());
    let mut file = |path: &std::path::Path, field, findings: &mut Findings<ClientField>| {
        let bytes = read(path, field, findings)?;
        digest.update(&(bytes.len() as u64).to_le_bytes());
        digest.update(&bytes);
        Some(bytes)
    };
    let trusted = match &spec.ca {
        Some(path) => file(path, ClientField::Ca, findings)
            .and_then(|bytes| roots(path, &bytes, ClientField::Ca, now, findings)),
        None => system_roots(findings),
    };
    let presented = match (&spec.certificate, &spec.key) {
        (Some(certificate), Some(key)) => {
            let chain = file(certificate, ClientField::Certificate, findings);
            let key_bytes = file(key, ClientField::Key, findings);
            let pair = Pair { certificate, key, name: None };
            let fields = (ClientField::Certificate, ClientField::Key);
            certified_key(&provider, chain, key_bytes, &pair, fields, now, findings).map(Some)
        }
        (None, None) => Some(None),
        (Some(_), None) => {
            findings.errors.push((ClientField::Key, "missing: certificate needs its key".into()));
            None
        }
        (None, Some(_)) => {
            let message = "missing: key needs its certificate";
            findings.errors.push((ClientField::Certificate, message.into()));
            None
        }
    };
    let (trusted, presented) = (trusted?, presented?);
    if !findings.errors.is_empty() {
        return None;
    }
    let builder =
        match ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
            Ok(builder) => builder.with_root_certificates(trusted),
            Err(error) => {
                findings.errors.push((ClientField::Ca, format!("rustls: {error}")));
                return None;
            }
        };
    let mut config = match presented {
        Some(certified) => {
            let resolver = SingleCertAndKey::from(Arc::unwrap_or_clone(certified));
            builder.with_client_cert_resolver(Arc::new(resolver))
        }
        None => builder.with_no_client_auth(),
    };
    // Tickets and session ids to resume with, per worker (each has its copy after fork).
    config.resumption = Resumption::in_memory_sessions(SESSION_CACHE);
    let mut sum = [0u8; 32];
    sum.copy_from_slice(digest.finish().as_ref());
    Some(ClientTls { config: Arc::new(config), digest: sum })
}

/// The operating system's trusted roots (see the module doc); `None`, reported against
/// [`ClientField::Ca`], when the store has none. Certificates the store holds but rustls
/// cannot use are skipped; problems reading the store are warnings while some roots load.
fn system_roots(findings: &mut Findings<ClientField>) -> Option<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
        findings.errors.push((
            ClientField::Ca,
            format!(
                "no CA certificate in the system's store{why}: install ca-certificates, set SSL_CERT_FILE, or name a file with ca"
            ),
        ));
        return None;
    }
    for error in found.errors {
        findings.warnings.push(format!("the system's CA store: {error}"));
    }
    if ignored > 0 {
        log::debug!("the system's CA store: {ignored} certificates rustls cannot use skipped");
    }
    Some(roots)
}
