//! Certificates, keys and trust anchors as a TLS endpoint uses them: read from PEM files,
//! checked, and made into what rustls takes. Shared by TLS termination ([`crate::tls`]: a
//! listener's certificates and client CA) and by the relay's TLS to its backends
//! ([`client`]: the CA a backend's certificate must chain to, the client certificate it may
//! ask for).
//!
//! Runs in the master: at `check`, at start and at each reload, so that a bad file is found
//! before any worker of the new generation starts. Files are read with
//! [`files::read_trusted`] (bounded, symbolic links only when root or the master's user owns
//! them). Certificates are parsed by `x509-parser` and keys loaded by the crypto provider;
//! nothing here parses X.509 itself. Problems are collected ([`Findings`]), each against the
//! configuration key that names the file (`F`, the caller's field type), never only the
//! first.
//!
//! What is checked:
//! - every PEM file holds what it should (a chain with the leaf first, one private key, CA
//!   certificates);
//! - the key matches the leaf certificate (`CertifiedKey::keys_match`);
//! - the chain is in order: each certificate is issued by the next;
//! - a certificate meant for a name covers it ([`covers`], RFC 6125);
//! - dates: an expired (or not yet valid) certificate is an error; one that expires within
//!   [`EXPIRY_WARNING`] is a warning.
//!
//! Provider: aws-lc-rs (rustls's default), for every TLS connection either way.

pub mod client;
mod names;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::files;

pub use names::{ByName, covers, is_server_name};

/// A certificate that expires sooner than this is reported with a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// What loading found: errors (each with the key `F` it is about) and warnings.
#[derive(Debug)]
pub struct Findings<F> {
    /// Problems that make the configuration invalid.
    pub errors: Vec<(F, String)>,
    /// Problems worth a warning (a certificate about to expire).
    pub warnings: Vec<String>,
}

impl<F> Default for Findings<F> {
    fn default() -> Self {
        Findings { errors: Vec::new(), warnings: Vec::new() }
    }
}

/// The crypto provider of every TLS connection, either side: aws-lc-rs, with its default
/// suites, groups and key types.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads file `path` (at most [`files::MAX_PEM_BYTES`]) for key `field`; `None`, reported,
/// when it cannot be read.
pub fn read<F>(path: &Path, field: F, findings: &mut Findings<F>) -> Option<Vec<u8>> {
    match files::read_trusted(path, files::MAX_PEM_BYTES) {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            findings.errors.push((field, format!("{}: {error}", path.display())));
            None
        }
    }
}

/// A certificate file and its key, as named in the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Pair<'a> {
    /// The chain's file (PEM, leaf first).
    pub certificate: &'a Path,
    /// The key's file (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: &'a Path,
    /// The server name the certificate must cover (an SNI entry's), if any.
    pub name: Option<&'a str>,
}

/// The chain and key of `pair` (their files' bytes, `None` when unreadable: reported
/// already), checked at `now` and made one; problems with the chain are reported against
/// `cert_field`, with the key against `key_field`.
pub fn certified_key<F: Copy>(
    provider: &CryptoProvider,
    chain: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    pair: &Pair<'_>,
    (cert_field, key_field): (F, F),
    now: SystemTime,
    findings: &mut Findings<F>,
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
fn check_chain<F: Copy>(
    chain: &[CertificateDer<'_>],
    pair: &Pair<'_>,
    now: SystemTime,
    findings: &mut Findings<F>,
    field: F,
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

/// The CA certificates of file `path` (its bytes: `bytes`) as trust anchors, checked at
/// `now` (an expired one is a warning: the others may still serve); `None`, reported
/// against `field`, when one is not a certificate or the file has none.
pub fn roots<F: Copy>(
    path: &Path,
    bytes: &[u8],
    field: F,
    now: SystemTime,
    findings: &mut Findings<F>,
) -> Option<RootCertStore> {
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    for (index, certificate) in CertificateDer::pem_slice_iter(bytes).enumerate() {
        let certificate = match certificate {
            Ok(certificate) => certificate,
            Err(error) => {
                findings.errors.push((field, format!("{shown}: {error}")));
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
                .push((field, format!("{shown}: CA certificate {}: {error}", index + 1)));
            return None;
        }
    }
    if roots.is_empty() {
        findings.errors.push((field, format!("{shown}: no PEM certificate in it")));
        return None;
    }
    Some(roots)
}
