//! A listener's `[listener.tls]`: its settings ([`TlsSpec`], as validated from the file) and
//! what they become once every file is read and checked ([`TlsConfig`]).
//!
//! Runs in the master: at `check`, at start and at each reload, so that a bad certificate or
//! key is found before any worker of the new generation starts (the serving generation then
//! goes on, as with any invalid reload). Files are read with [`files::read_trusted`] (bounded,
//! symbolic links only when root or the master's user owns them). Certificates are parsed by
//! `x509-parser` and keys loaded by the crypto provider; nothing here parses X.509 itself.
//!
//! What is checked, each problem reported against the key that names the file:
//! - every PEM file holds what it should (a chain with the leaf first, one private key, CA
//!   certificates);
//! - the key matches the leaf certificate (`CertifiedKey::keys_match`);
//! - the chain is in order: each certificate is issued by the next;
//! - each `[[listener.tls.sni]]` certificate covers its `name`;
//! - dates: an expired (or not yet valid) certificate is an error; one that expires within
//!   [`EXPIRY_WARNING`] is a warning, logged by `check`, start and reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::resolve::Certificates;
use crate::files;

/// A certificate that expires sooner than this is reported with a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

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

/// What loading found: errors (each with the key it is about) and warnings.
#[derive(Debug, Default)]
pub struct Findings {
    /// Problems that make the configuration invalid.
    pub errors: Vec<(Field, String)>,
    /// Problems worth a warning (a certificate about to expire).
    pub warnings: Vec<String>,
}

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

/// The crypto provider every TLS listener uses: aws-lc-rs, with its default suites, groups
/// and key types.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads and checks every file of `spec` at time `now`; the configuration when nothing is
/// wrong. Problems go to `findings`.
pub fn load(spec: &TlsSpec, now: SystemTime, findings: &mut Findings) -> Option<TlsConfig> {
    let provider = provider();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    digest.update(format!("{spec:?}").as_bytes());
    let mut file = |path: &Path, field: Field, findings: &mut Findings| match files::read_trusted(
        path,
        files::MAX_PEM_BYTES,
    ) {
        Ok(bytes) => {
            digest.update(&(bytes.len() as u64).to_le_bytes());
            digest.update(&bytes);
            Some(bytes)
        }
        Err(error) => {
            findings.errors.push((field, format!("{}: {error}", path.display())));
            None
        }
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

/// A certificate file and its key, as named in the configuration.
struct Pair<'a> {
    certificate: &'a Path,
    key: &'a Path,
    /// The SNI name the certificate must cover, for an `sni` entry.
    name: Option<&'a str>,
}

fn certified_key(
    provider: &CryptoProvider,
    chain: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    pair: &Pair<'_>,
    (cert_field, key_field): (Field, Field),
    now: SystemTime,
    findings: &mut Findings,
) -> Option<Arc<CertifiedKey>> {
    let chain = chain.and_then(|bytes| {
        let shown = pair.certificate.display();
        let chain: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_slice_iter(&bytes).collect();
        match chain {
            Ok(chain) if chain.is_empty() => {
                findings.errors.push((cert_field, format!("{shown}: no PEM certificate in it")));
                None
            }
            Ok(chain) => check_chain(&chain, pair, now, findings, cert_field).then_some(chain),
            Err(error) => {
                findings.errors.push((cert_field, format!("{shown}: {error}")));
                None
            }
        }
    });
    let key = key.and_then(|bytes| {
        let shown = pair.key.display();
        match PrivateKeyDer::from_pem_slice(&bytes) {
            Ok(key) => match provider.key_provider.load_private_key(key) {
                Ok(key) => Some(key),
                Err(error) => {
                    findings.errors.push((key_field, format!("{shown}: unusable key: {error}")));
                    None
                }
            },
            Err(error) => {
                findings.errors.push((key_field, format!("{shown}: no private key: {error}")));
                None
            }
        }
    });
    let certified = CertifiedKey::new(chain?, key?);
    match certified.keys_match() {
        // `Unknown`: the provider cannot tell for this key type; the handshake would.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Some(Arc::new(certified))
        }
        Err(_) => {
            findings.errors.push((
                key_field,
                format!(
                    "{} does not match the certificate of {}",
                    pair.key.display(),
                    pair.certificate.display()
                ),
            ));
            None
        }
    }
}

/// Checks a chain's parse, order, dates and (for an SNI entry) names; false on an error.
fn check_chain(
    chain: &[CertificateDer<'_>],
    pair: &Pair<'_>,
    now: SystemTime,
    findings: &mut Findings,
    field: Field,
) -> bool {
    let shown = pair.certificate.display();
    let mut parsed = Vec::with_capacity(chain.len());
    for (index, der) in chain.iter().enumerate() {
        match X509Certificate::from_der(der) {
            Ok((_, certificate)) => parsed.push(certificate),
            Err(error) => {
                let n = index + 1;
                findings
                    .errors
                    .push((field, format!("{shown}: certificate {n} is not X.509: {error}")));
                return false;
            }
        }
    }
    let before = findings.errors.len();
    for (index, pair_of) in parsed.windows(2).enumerate() {
        if pair_of[0].issuer().as_raw() != pair_of[1].subject().as_raw() {
            findings.errors.push((
                field,
                format!(
                    "{shown}: the chain is out of order: certificate {} was issued by \"{}\", not by certificate {} (\"{}\"); write the server's certificate first, then each issuer",
                    index + 1,
                    pair_of[0].issuer(),
                    index + 2,
                    pair_of[1].subject()
                ),
            ));
        }
    }
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    for (index, certificate) in parsed.iter().enumerate() {
        let which = if index == 0 {
            "the certificate".to_owned()
        } else {
            format!("certificate {} of the chain", index + 1)
        };
        let validity = certificate.validity();
        let (from, until) = (validity.not_before.timestamp(), validity.not_after.timestamp());
        if until < now_secs {
            findings
                .errors
                .push((field, format!("{shown}: {which} expired on {}", validity.not_after)));
        } else if from > now_secs {
            findings.errors.push((
                field,
                format!("{shown}: {which} is not valid before {}", validity.not_before),
            ));
        } else if until - now_secs < EXPIRY_WARNING.as_secs() as i64 {
            let days = (until - now_secs) / 86_400;
            findings.warnings.push(format!(
                "{shown}: {which} expires on {} (in {days} days)",
                validity.not_after
            ));
        }
    }
    if let (Some(name), Some(leaf)) = (pair.name, parsed.first()) {
        let names = dns_names(leaf);
        if !names.iter().any(|n| covers(n, name)) {
            findings.errors.push((
                field,
                format!(
                    "{shown}: the certificate does not cover {name:?} (its names: {})",
                    names.join(", ")
                ),
            ));
        }
    }
    findings.errors.len() == before
}

/// The DNS names a certificate is for: its subjectAltName entries (RFC 6125: clients ignore
/// the common name when there are any), else its common names.
fn dns_names(certificate: &X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            certificate
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

/// Whether a certificate name (`www.example.org`, `*.example.org`) covers the configured SNI
/// name (lowercase; a wildcard entry must be covered by the same wildcard): RFC 6125 6.4.3,
/// a wildcard stands for exactly one whole label.
pub fn covers(certificate_name: &str, name: &str) -> bool {
    if certificate_name.eq_ignore_ascii_case(name) {
        return true;
    }
    match (certificate_name.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && label != "*" && suffix.eq_ignore_ascii_case(rest)
        }
        _ => false,
    }
}

fn client_verifier(
    provider: &Arc<CryptoProvider>,
    path: &Path,
    bytes: &[u8],
    required: bool,
    now: SystemTime,
    findings: &mut Findings,
) -> Option<Arc<dyn ClientCertVerifier>> {
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    let mut count = 0;
    for (index, certificate) in CertificateDer::pem_slice_iter(bytes).enumerate() {
        let certificate = match certificate {
            Ok(certificate) => certificate,
            Err(error) => {
                findings.errors.push((Field::ClientCa, format!("{shown}: {error}")));
                return None;
            }
        };
        if let Ok((_, parsed)) = X509Certificate::from_der(&certificate) {
            let until = parsed.validity().not_after.timestamp();
            let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            if until < now_secs {
                findings.warnings.push(format!(
                    "{shown}: CA certificate {} expired on {}",
                    index + 1,
                    parsed.validity().not_after
                ));
            }
        }
        if let Err(error) = roots.add(certificate) {
            findings
                .errors
                .push((Field::ClientCa, format!("{shown}: CA certificate {}: {error}", index + 1)));
            return None;
        }
        count += 1;
    }
    if count == 0 {
        findings.errors.push((Field::ClientCa, format!("{shown}: no PEM certificate in it")));
        return None;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if required { builder } else { builder.allow_unauthenticated() };
    match builder.build() {
        Ok(verifier) => Some(verifier),
        Err(error) => {
            findings.errors.push((Field::ClientCa, format!("{shown}: {error}")));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_stand_for_one_label() {
        assert!(covers("www.example.org", "www.example.org"));
        assert!(covers("WWW.example.org", "www.example.org"));
        assert!(covers("*.example.org", "a.example.org"));
        assert!(covers("*.example.org", "*.example.org"));
        assert!(!covers("*.example.org", "a.b.example.org"));
        assert!(!covers("*.example.org", "example.org"));
        assert!(!covers("www.example.org", "*.example.org"));
    }
}
