//! TLS termination (rustls): a layer between a TCP connection's socket and its session, so
//! that every TCP service (echo, the line services, relay, exec, metrics, a program's own)
//! can be served over TLS unchanged.
//!
//! Runs in the master and in workers:
//! - the master reads and checks every certificate and key file with the rest of the
//!   configuration (`check`, start, reload: [`load`]), so a bad file keeps the serving
//!   generation; it makes the session-ticket keys every worker shares and replaces them on
//!   a schedule and at each reload ([`tickets`]);
//! - a worker builds one [`Acceptor`] per TLS listener at boot, and wraps each admitted
//!   connection's session in the TLS layer ([`Acceptor::session`]). Admission (access lists,
//!   rates, per-client limits, the PROXY protocol header) comes first, so a client refused
//!   costs no cryptography. The layer owns the `rustls::ServerConnection`; the service's
//!   session, made once the handshake completes, reads and writes plaintext through the same
//!   [`crate::services::Context`] as on a plain listener (see `layer.rs` for its invariants).
//!
//! Provider: aws-lc-rs, for rustls and for the ticket AEAD. TLS sessions are never handed
//! off on reload (their traffic keys live in the worker): they are drained.

mod acceptor;
mod layer;
pub mod load;
mod resolve;
pub mod tickets;

pub use acceptor::{Acceptor, Counts, SEND_BUFFER};
pub use layer::TlsSession;
pub use load::{Field, Findings, SniSpec, TlsConfig, TlsSpec, TlsVersion};
pub use resolve::Certificates;
