//! A listener's `[listener.tls]`: its settings ([`TlsSpec`], as validated from the file) and
//! what they become once every file is read and checked ([`TlsConfig`]).
//!
//! Runs in the master: at `check`, at start and at each reload, so that a bad certificate or
//! key is found before any worker of the new generation starts (the serving generation then
//! goes on, as with any invalid reload). Files are read and checked by [`crate::pki`] (key
//! against certificate, chain order, dates, names), each problem reported against the key
//! that names the file; each `[[listener.tls.sni]]` certificate must cover its `name`.
//! Warnings (a certificate about to expire) are logged by `check`, start and reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::resolve::Certificates;
use crate::pki::{self, Pair, certified_key};

pub use crate::pki::{EXPIRY_WARNING, covers, provider};

/// The lowest TLS version a listener accepts (`min_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2 (RFC 5246) and 1.3.
    Tls12,
    /// TLS 1.3 (RFC 8446) only.
    Tls13,
}

impl TlsVersion {
    /// The configuration spelling: `"1.2"` or `"1.3"`.
    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }

    /// The version a configuration spells `text`.
    pub fn parse(text: &str) -> Option<TlsVersion> {
        [TlsVersion::Tls12, TlsVersion::Tls13].into_iter().find(|v| v.name() == text)
    }
}

/// `[listener.tls]` as validated, before any file is read. Paths are absolute (relative ones
/// were resolved against the configuration file's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// The default certificate chain (PEM, leaf first).
    pub certificate: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Certificates chosen by the name the client asks for (SNI).
    pub sni: Vec<SniSpec>,
    /// CA certificates that client certificates must chain to (mTLS); `None`: no client
    /// certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: a client without a certificate is refused (`true`) or served.
    pub client_auth_required: bool,
    /// The lowest version accepted.
    pub min_version: TlsVersion,
    /// ALPN protocols, most preferred first (RFC 7301); empty: none negotiated.
    pub alpn: Vec<String>,
    /// How long a handshake may take; `None`: no limit.
    pub handshake_timeout: Option<Duration>,
    /// Whether clients get session tickets to resume with (RFC 8446 4.6.1, RFC 5077).
    pub session_tickets: bool,
    /// How often the master replaces the listener's ticket key.
    pub ticket_rotation: Duration,
}

/// One `[[listener.tls.sni]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniSpec {
    /// The server name, lowercase: `www.example.org`, or `*.example.org` for any one label in
    /// its place.
    pub name: String,
    /// Its certificate chain (PEM, leaf first).
    pub certificate: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// Which key of `[listener.tls]` a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `certificate`.
    Certificate,
    /// `key`.
    Key,
    /// `client_ca`.
    ClientCa,
    /// Entry `N` of `sni`: its `certificate`.
    SniCertificate(usize),
    /// Entry `N` of `sni`: its `key`.
    SniKey(usize),
}

/// What loading found: errors (each with the key of `[listener.tls]` it is about) and
/// warnings.
pub type Findings = pki::Findings<Field>;

/// A listener's TLS, every file read and checked: what workers build their rustls
/// configuration from. Two are equal when their settings and the files' bytes are.
#[derive(Clone)]
pub struct TlsConfig {
    /// The settings it was loaded from.
    pub spec: TlsSpec,
    /// The certificates, by server name.
    pub certificates: Arc<Certificates>,
    /// The client certificate verifier, with `client_ca`.
    pub client_verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// SHA-256 of the settings and of every file's bytes.
    digest: [u8; 32],
    /// SHA-256 of the `client_ca` file (zero without one).
    digest_of_ca: [u8; 32],
}

impl PartialEq for TlsConfig {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for TlsConfig {}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Whether a client that authenticated under `other` must not resume under this one: the
    /// client certificate policy changed (CA file, `client_auth`). Reload then gives the
    /// listener fresh ticket keys without the previous one.
    pub fn client_policy_differs(&self, other: &TlsConfig) -> bool {
        let (a, b) = (&self.spec, &other.spec);
        a.client_ca != b.client_ca
            || a.client_auth_required != b.client_auth_required
            || self.digest_of_ca != other.digest_of_ca
    }
}

/// Reads and checks every file of `spec` at time `now`; the configuration when nothing is
/// wrong. Problems go to `findings`.
pub fn load(spec: &TlsSpec, now: SystemTime, findings: &mut Findings) -> Option<TlsConfig> {
    let provider = provider();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    digest.update(format!("{spec:?}").as_bytes());
    let mut file = |path: &std::path::Path, field: Field, findings: &mut Findings| {
        let bytes = pki::read(path, field, findings)?;
        digest.update(&(bytes.len() as u64).to_le_bytes());
        digest.update(&bytes);
        Some(bytes)
    };
    let default = {
        let chain = file(&spec.certificate, Field::Certificate, findings);
        let key = file(&spec.key, Field::Key, findings);
        let pair = Pair { certificate: &spec.certificate, key: &spec.key, name: None };
        let fields = (Field::Certificate, Field::Key);
        certified_key(&provider, chain, key, &pair, fields, now, findings)
    };
    let mut named = Vec::with_capacity(spec.sni.len());
    for (index, entry) in spec.sni.iter().enumerate() {
        let fields = (Field::SniCertificate(index), Field::SniKey(index));
        let chain = file(&entry.certificate, fields.0, findings);
        let key = file(&entry.key, fields.1, findings);
        let pair =
            Pair { certificate: &entry.certificate, key: &entry.key, name: Some(&entry.name) };
        if let Some(certified) = certified_key(&provider, chain, key, &pair, fields, now, findings)
        {
            named.push((entry.name.clone(), certified));
        }
    }
    let mut digest_of_ca = [0u8; 32];
    let client_verifier = match &spec.client_ca {
        None => None,
        Some(path) => {
            let bytes = file(path, Field::ClientCa, findings)?;
            digest_of_ca.copy_from_slice(
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref(),
            );
            client_verifier(&provider, path, &bytes, spec.client_auth_required, now, findings)
        }
    };
    if !findings.errors.is_empty() {
        return None;
    }
    let mut sum = [0u8; 32];
    sum.copy_from_slice(digest.finish().as_ref());
    Some(TlsConfig {
        spec: spec.clone(),
        certificates: Arc::new(Certificates::new(default?, named)),
        client_verifier,
        digest: sum,
        digest_of_ca,
    })
}

fn client_verifier(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    path: &std::path::Path,
    bytes: &[u8],
    required: bool,
    now: SystemTime,
    findings: &mut Findings,
) -> Option<Arc<dyn ClientCertVerifier>> {
    let roots = pki::roots(path, bytes, Field::ClientCa, now, findings)?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if required { builder } else { builder.allow_unauthenticated() };
    match builder.build() {
        Ok(verifier) => Some(verifier),
        Err(error) => {
            findings.errors.push((Field::ClientCa, format!("{}: {error}", path.display())));
            None
        }
    }
}
